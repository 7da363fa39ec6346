"""Verification floods (issue #12): forged signatures against one Envoy worker (`make bench-flood`).

A client can send tokens whose header and claims are valid — issuer,
audience, `kid` and expiry are public knowledge — and whose signature is
forged: each forces a full signature check, and none is cached. This
measures, per algorithm (RS256 2048-bit, ES256, EdDSA), how many such
requests per second one Envoy worker absorbs, and how much a legitimate
client's throughput with a cached token drops meanwhile.

The sides are bench.py's (its machinery is imported, not copied): Envoy with
one worker pinned to CPU 0, every route a direct 200, no access log;
native jwt_authn + rbac from ../shared/reference/native-jwt-authn.yaml with
its JWT cache on, and phi-guard on the shipped envoy.yaml and policy with its
verified-token cache on. FLOOD_BUDGET=N sets phi-guard's
`verification_budget` to N (issue #12: failed signature checks per source
per second, over budget refused without a check); unset, the build's default
applies. A build that does not know the key refuses the policy, so
FLOOD_BUDGET=0 fails to start on a build from before the budget: expected.

Two wrk processes, both pinned to CPU 1, run at once for each measurement:

  forged  -c FLOOD_CONNECTIONS (default 16): forged tokens from a file
          (FLOOD_TOKENS per algorithm, default 150,000), each distinct
          (distinct jti) so no cache can help; each side walks on through
          the file from run to run. Every signature is well-formed and in
          range — RSA: an integer below the modulus; ECDSA: r and s below the
          group order; EdDSA: R a curve point and S below the group order —
          so the verifier cannot refuse it on its shape and does the whole
          computation. The Lua script counts the answers: all must be 401.
  legit   -c LEGIT_CONNECTIONS (default 4): one valid token of the same
          algorithm, over and over (cached after its first use); every answer
          must be 2xx.

The legitimate client's share under flood depends on those counts: a worker
serves its ready connections in turn, so with 16 forged and 4 legitimate
connections the legitimate one gets at most about 4 requests in 20 however
cheap they are. The counts are fixed so runs and builds compare; the ratio
is not an absolute. Both clients come from 127.0.0.1: a per-source budget
sees them as one source, but the legitimate token is cached, and only tokens
not already cached are refused over budget. FLOOD_NATIVE=0 leaves native out
(a before/after comparison of phi-guard needs only phi-guard).

Per side and algorithm three runs: legit alone, forged alone (what the
worker absorbs with nothing else to do) and both together (forged absorbed
under a legitimate load, and the legitimate rate under flood). Rounds
alternate the order of the sides; the run with the median req/s is shown.
FLOOD_QUICK=1 (or BENCH_QUICK=1, or --quick) gives one short round for a
smoke check. Exit status non-zero if a side answers wrongly or cannot start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (puts tests/e2e on sys.path for harness)
from bench import (  # noqa: E402
    CONNECTIONS,
    ENVOY_CPU,
    LOAD_CPU,
    PATH,
    Result,
    Side,
    WrongAnswer,
    native_side,
    parse_wrk,
    phi_guard_side,
    wrk_argv,
)
from harness import (  # noqa: E402
    ENVOY_BIN,
    WASM,
    EnvoyFailedToStart,
    JwksServer,
    KeyPair,
    b64url,
    default_claims,
    http_request,
    jwks,
    mint,
)

ALGS = ("RS256", "ES256", "EdDSA")
# Group orders: a forged ECDSA r, s or EdDSA S at or above them is refused on sight.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------


def forged_tokens(key: KeyPair, count: int, exp: int) -> list[str]:
    """`count` distinct tokens with `key`'s kid and valid claims whose
    signatures are random but in range (see the module doc)."""
    header = b64url(json.dumps({"alg": key.alg, "typ": "at+jwt", "kid": key.kid}, separators=(",", ":")).encode())
    if key.alg == "RS256":
        modulus = key.private.public_key().public_numbers().n

        def signature() -> bytes:
            return secrets.randbelow(modulus).to_bytes(256, "big")

    elif key.alg == "ES256":

        def signature() -> bytes:
            r, s = (1 + secrets.randbelow(P256_ORDER - 1) for _ in range(2))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    else:
        # Any real Ed25519 signature's R is a point on the curve.
        r_point = KeyPair.ed25519().private.sign(b"flood")[:32]

        def signature() -> bytes:
            return r_point + secrets.randbelow(ED25519_ORDER).to_bytes(32, "little")

    out = []
    for i in range(count):
        claims = default_claims(exp=exp, sub=f"flood-{i}")
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        out.append(f"{header}.{payload}.{b64url(signature())}")
    return out


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------

# bench.py's rotation over a token file, plus a count of the answers by
# status (wrk's own summary only counts non-2xx), printed by done() from
# every thread's Lua state.
COUNTING_LUA = (
    bench.LUA
    + """
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      io.write(string.format("status %d %d\\n", status, n))
    end
  end
end
"""
)


@dataclass
class Run:
    """One wrk run and its answers by status (counted only for the forged stream)."""

    result: Result
    statuses: dict[int, int]


def start_wrk(side: Side, seconds: float, tokens: Path, lua: Path, connections: int, offset: int = 0):
    argv = wrk_argv(side.port, seconds, tokens, lua, offset, connections)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_wrk(proc: subprocess.Popen) -> Run:
    out, err = proc.communicate(timeout=600)
    statuses: dict[int, int] = {}
    for status, n in re.findall(r"^status (\d+) (\d+)$", out, re.M):
        statuses[int(status)] = statuses.get(int(status), 0) + int(n)
    return Run(parse_wrk(proc.returncode, out, err), statuses)


def check_forged(run: Run, what: str) -> None:
    answered = sum(run.statuses.values())
    if answered == 0:
        raise WrongAnswer(f"{what}: no forged request was answered")
    if set(run.statuses) != {401}:
        raise WrongAnswer(f"{what}: forged tokens were answered {run.statuses}; want only 401")


def check_legit(run: Run, what: str) -> None:
    if run.result.requests == 0:
        raise WrongAnswer(f"{what}: no legitimate request completed")
    if run.result.non2xx:
        raise WrongAnswer(f"{what}: {run.result.non2xx} of {run.result.requests} legitimate answers were not 2xx")


def measure(side: Side, seconds: float, legit: Path, forged: Path, offset: int, files: dict, conns) -> dict:
    """Legit alone, forged alone, both together: {"legit", "forged", "flood_legit", "flood_forged"} -> Run.
    The forged stream starts `offset` tokens into its file."""
    lua_legit, lua_forged = files["lua"], files["counting_lua"]
    forged_conns, legit_conns = conns
    out = {}
    out["legit"] = finish_wrk(start_wrk(side, seconds, legit, lua_legit, legit_conns))
    check_legit(out["legit"], f"{side.name}: legit alone")
    out["forged"] = finish_wrk(start_wrk(side, seconds, forged, lua_forged, forged_conns, offset))
    check_forged(out["forged"], f"{side.name}: forged alone")
    offset += sum(out["forged"].statuses.values())
    attack = start_wrk(side, seconds, forged, lua_forged, forged_conns, offset)
    client = start_wrk(side, seconds, legit, lua_legit, legit_conns)
    out["flood_legit"], out["flood_forged"] = finish_wrk(client), finish_wrk(attack)
    check_legit(out["flood_legit"], f"{side.name}: legit under flood")
    check_forged(out["flood_forged"], f"{side.name}: forged with legit")
    return out


def refusals(side: Side) -> dict[str, int] | None:
    """phi-guard's count of forged tokens refused after a signature check and
    without one (over budget); None for native, which does not say."""
    if side.name != "phi-guard":
        return None
    stats = side.envoy.phi_stats()
    return {reason: stats.get(f"denied.{reason}", 0) for reason in ("invalid_signature", "verification_rate_limited")}


def check_side(side: Side, good: str, forged: str, alg: str) -> None:
    ok = http_request(side.port, "GET", PATH, [("Authorization", f"Bearer {good}")]).status
    refused = http_request(side.port, "GET", PATH, [("Authorization", f"Bearer {forged}")]).status
    if ok != 200 or refused != 401:
        raise WrongAnswer(f"{side.name} ({alg}): valid token got {ok}, forged {refused}; want 200, 401")


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def main() -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quick_env = any(env(v, "") not in ("", "0") for v in ("FLOOD_QUICK", "BENCH_QUICK"))
    parser.add_argument("--quick", action="store_true", default=quick_env)
    parser.add_argument("--seconds", type=float, help="length of one measurement (default 8, quick 3)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    parser.add_argument("--budget", default=env("FLOOD_BUDGET"), help="phi-guard verification_budget (unset: default)")
    parser.add_argument("--forged-connections", type=int, default=int(env("FLOOD_CONNECTIONS", str(CONNECTIONS))))
    parser.add_argument("--legit-connections", type=int, default=int(env("LEGIT_CONNECTIONS", "4")))
    parser.add_argument(
        "--tokens",
        type=int,
        default=int(env("FLOOD_TOKENS", "0")) or None,
        help="forged tokens per algorithm (default 150,000, quick 40,000)",
    )
    parser.add_argument("--no-native", action="store_true", default=env("FLOOD_NATIVE", "1") == "0")
    args = parser.parse_args()
    seconds = args.seconds or (3 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    count = args.tokens or (40_000 if args.quick else 150_000)
    conns = (args.forged_connections, args.legit_connections)
    budget = None if args.budget in (None, "") else int(args.budget)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    if not WASM.exists():
        raise SystemExit(f"{WASM} is missing: make wasm")
    if not ENVOY_BIN.exists():
        raise SystemExit(f"{ENVOY_BIN} is missing: make venv")

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="phi-guard-flood-"))
    keys = {alg: KeyPair.for_alg(alg, kid=f"flood-{alg.lower()}") for alg in ALGS}
    exp = int(time.time()) + 3300  # within the policy's 3600 s maximum lifetime
    log(f"making {count:,} forged tokens per algorithm (work dir {work}) ...")
    files: dict = {"lua": work / "rotate.lua", "counting_lua": work / "count.lua"}
    files["lua"].write_text(bench.LUA)
    files["counting_lua"].write_text(COUNTING_LUA)
    legit, forged, one_forged, good = {}, {}, {}, {}
    for alg in ALGS:
        good[alg] = mint(keys[alg], exp=exp)
        legit[alg] = work / f"legit-{alg}.txt"
        legit[alg].write_text(good[alg] + "\n")
        tokens = forged_tokens(keys[alg], count, exp)
        one_forged[alg] = tokens[0]
        forged[alg] = work / f"forged-{alg}.txt"
        forged[alg].write_text("\n".join(tokens) + "\n")
    jwks_file = work / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(*keys.values())))

    budget_label = "build default" if budget is None else f"verification_budget {budget}"
    overrides = {} if budget is None else {"verification_budget": budget}
    results: dict[tuple[str, str], list[dict]] = {}
    sent: dict[tuple[str, str], int] = {}
    try:
        with JwksServer(*keys.values()) as jwks_server:
            sides = {} if args.no_native else {"native": native_side("native", work, jwks_file)}
            sides["phi-guard"] = phi_guard_side(
                "phi-guard", work, jwks_server.port, cache=True, policy_overrides=overrides
            )
            try:
                log(f"starting {len(sides)} Envoy(s) ...")
                for name, side in sides.items():
                    try:
                        side.start()
                    except EnvoyFailedToStart as e:
                        if name == "phi-guard" and budget is not None and "verification_budget" in str(e):
                            raise EnvoyFailedToStart(
                                f"phi-guard refused verification_budget {budget}: this build does not know the key"
                                " (expected before issue #12's budget lands)"
                            ) from None
                        raise
                for side in sides.values():
                    for alg in ALGS:
                        check_side(side, good[alg], one_forged[alg], alg)
                for r in range(rounds):
                    order = list(sides) if r % 2 == 0 else list(reversed(sides))
                    log(f"round {r + 1}/{rounds}: {len(ALGS) * len(order)} x 3 runs of {seconds:g}s ...")
                    for alg in ALGS:
                        for name in order:
                            # Each side walks on through the forged tokens, so one comes back only once
                            # all were sent (bar the few in flight when a run ends).
                            at = sent.get((alg, name), 0)
                            before = refusals(sides[name])
                            m = measure(sides[name], seconds, legit[alg], forged[alg], at, files, conns)
                            after = refusals(sides[name])
                            m["refusals"] = {k: after[k] - before[k] for k in after} if before and after else None
                            answered = sum(sum(m[k].statuses.values()) for k in ("forged", "flood_forged"))
                            sent[(alg, name)] = at + answered
                            results.setdefault((alg, name), []).append(m)
                            log(
                                f"  {alg:5} {name:9} legit {m['legit'].result.rps:8,.0f}"
                                f" | forged {m['forged'].result.rps:8,.0f}"
                                f" | together: forged {m['flood_forged'].result.rps:8,.0f}"
                                f" legit {m['flood_legit'].result.rps:8,.0f}"
                            )
            finally:
                for side in sides.values():
                    side.stop()
    except (WrongAnswer, EnvoyFailedToStart) as e:
        print(f"\nFAIL: {e}\nEnvoy configs and logs are in {work}", file=sys.stderr)
        return 1

    report(results, sent, sides, rounds, seconds, conns, count, budget_label, args.quick)
    log(f"\ntook {time.monotonic() - started:.0f}s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _median(runs: list[dict], key: str) -> Run:
    return sorted((m[key] for m in runs), key=lambda run: run.result.rps)[(len(runs) - 1) // 2]


def report(results, sent, sides, rounds, seconds, conns, count, budget_label, quick) -> None:
    mode = "QUICK (smoke check, figures rough)" if quick else "full"
    forged_conns, legit_conns = conns
    log("")
    log(f"verification flood — {mode} run; phi-guard: {budget_label}")
    log(
        f"Envoy --concurrency 1 on CPU {ENVOY_CPU}; wrk forged -c{forged_conns} and legit -c{legit_conns}, both on"
        f" CPU {LOAD_CPU}; {rounds} round(s) of {seconds:g}s, median shown; {count:,} distinct forged tokens per alg"
    )
    log("")
    head = (
        f"{'alg':5} {'side':9} | {'forged alone':>12} | {'forged w/ legit':>15} | {'legit alone':>11}"
        f" {'p99':>7} | {'legit in flood':>14} {'p99':>7} | {'legit kept':>10} | {'unchecked':>9}"
    )
    log(head)
    log("-" * len(head))
    for alg in ALGS:
        for name in sides:
            runs = results[(alg, name)]
            alone, under = _median(runs, "legit").result, _median(runs, "flood_legit").result
            forged_alone, forged_mixed = _median(runs, "forged").result, _median(runs, "flood_forged").result
            wrapped = "*" if sent[(alg, name)] > count else ""
            refused = [m["refusals"] for m in runs if m["refusals"]]
            checked = sum(r["invalid_signature"] for r in refused)
            unchecked = sum(r["verification_rate_limited"] for r in refused)
            share = f"{unchecked / (checked + unchecked):.1%}" if checked + unchecked else "-"
            log(
                f"{alg:5} {name:9} | {forged_alone.rps:11,.0f}{wrapped:1} | {forged_mixed.rps:15,.0f} |"
                f" {alone.rps:11,.0f} {alone.p99:5.2f}ms | {under.rps:14,.0f} {under.p99:5.2f}ms |"
                f" {under.rps / alone.rps:9.0%} | {share:>9}"
            )
    log("(req/s; 'forged' answers were all 401 and 'legit' all 2xx, or the run would have stopped;")
    log(" 'legit kept' = legit req/s under flood / legit req/s alone; * = this side was sent more forged requests")
    log(" than there are forged tokens, so some were sent again (FLOOD_TOKENS raises the count); 'unchecked' =")
    log(" forged tokens phi-guard refused over budget without a signature check, from its denied.* counters)")


if __name__ == "__main__":
    sys.exit(main())
