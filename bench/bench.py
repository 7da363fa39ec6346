"""phi-guard against Envoy's native jwt_authn + rbac, side by side (`make bench`).

One run starts ten Envoys, each with one worker (`--concurrency 1`), all
pinned to CPU 0: no auth; the native reference config
(../shared/reference/native-jwt-authn.yaml) with its JWT cache at 10,000
(one Envoy per algorithm) and without it; phi-guard on the shipped envoy.yaml
and policy with `verified_token_cache_size` 10,000 (one per algorithm) and 0;
and the same three phi-guard sides as the dynamic module (`module`: the same
core, policy and envoy.yaml, `make native`), target >= 1.3x native on
repeated and 10k.
Every side answers GET /fhir/Patient/{id} with a direct 200 (no upstream
hop), so the filters are what is measured; both auth sides check the same
rule (GET, scope read:patient-profile). No side has an access log; phi-guard
still builds and chains its audit record on every request. Native reads the
JWKS from a file, phi-guard fetches the same JWKS from a local JwksServer.

wrk (`-t1 -c16 --latency`, pinned to CPU 1) loads one side at a time through
a Lua script that rotates the Authorization header over a token file. Rounds
alternate the sides (native and phi-guard swap order every round); the
round with the median req/s is reported. Workloads, each for RS256 (2048-bit)
and ES256:

  repeated  one token over and over (caches on; the token is one of the 10k)
  10k       10,000 distinct tokens round robin (caches on, 10,000 entries,
            filled with exactly these tokens before the first round)
  cold      the same 10,000 tokens, every verified-token cache off: one
            signature check per request

Also printed: each side's cache hit rate per workload (from its own stats, so
the table says what was measured), the RSS of an Envoy with 10,000 cached
RS256 tokens against the same process fresh, and the .wasm size.

BENCH_QUICK=1 (or --quick) gives one short round, for a smoke check. The exit
status is non-zero only when a side gives wrong answers (a valid token not
200, a tampered or missing one not 401/403, any non-2xx under load) or cannot
run; figures below a target are marked BELOW but do not fail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import yaml  # noqa: E402
from harness import (  # noqa: E402
    ENVOY_BIN,
    NATIVE,
    STATS_PREFIX,
    WASM,
    Envoy,
    EnvoyFailedToStart,
    JwksServer,
    KeyPair,
    http_request,
    jwks,
    mint,
    shipped_policy,
    tamper,
)

NATIVE_YAML = Path(os.environ.get("NATIVE_YAML", REPO.parent / "shared" / "reference" / "native-jwt-authn.yaml"))
PATH = "/fhir/Patient/1"
TOKENS = 10_000
# Entries in the revocation list of the revocation-cost runs (issue #13: 100,000).
REVOKED = 100_000
ALGS = ("RS256", "ES256")
WORKLOADS = ("repeated", "10k", "cold")
# The phi-guard builds measured: the wasm filter and the dynamic module.
WHO = ("native", "phi-guard", "module")
# The dynamic module / native req/s (issue #19), repeated and 10k.
MODULE_TARGET = 1.3
# phi-guard / native req/s; the cold target is for RS256 only.
TARGETS = {
    ("repeated", "RS256"): 1.0,
    ("repeated", "ES256"): 1.0,
    ("10k", "RS256"): 1.0,
    ("10k", "ES256"): 1.0,
    ("cold", "RS256"): 0.3,
}
ENVOY_CPU, LOAD_CPU = "0", "1"
CONNECTIONS = 16


def log(msg: str) -> None:
    print(msg, flush=True)


class WrongAnswer(Exception):
    """A side answered something it should not have: the figures would be meaningless."""


# --------------------------------------------------------------------------
# The sides
# --------------------------------------------------------------------------


def taskset(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _hcm(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


class Side:
    """One Envoy under test. Every side is run by the e2e harness's Envoy
    runner (same flags, OS-picked ports found through admin), with its
    config replaced by the side's own, and pinned to ENVOY_CPU."""

    def __init__(self, name: str, envoy: Envoy, config: dict, cache_stats: dict[str, str] | None):
        self.name = name
        self.envoy = envoy
        self.envoy.config = config
        self.envoy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._cache_stats = cache_stats

    def start(self) -> Side:
        self.envoy.start()
        if taskset(ENVOY_CPU):
            # -a: every thread, the worker and the main thread alike.
            argv = ["taskset", "-a", "-p", "-c", ENVOY_CPU, str(self.proc.pid)]
            subprocess.run(argv, capture_output=True, check=True)
        return self

    def stop(self) -> None:
        self.envoy.stop()

    @property
    def proc(self) -> subprocess.Popen:
        return self.envoy.proc

    @property
    def port(self) -> int:
        return self.envoy.port

    @property
    def admin_port(self) -> int:
        return self.envoy.admin_port

    def cache_stats(self) -> dict[str, int] | None:
        """The verified-token cache's hit and miss counters; None if it has none."""
        if not self._cache_stats:
            return None
        text = http_request(self.admin_port, "GET", "/stats").text
        values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
        if not all(name in values for name in self._cache_stats.values()):
            return None
        return {label: int(values[name]) for label, name in self._cache_stats.items()}


def native_side(name: str, workdir: Path, jwks_file: Path, auth: bool = True, cache: bool = True) -> Side:
    """The reference config as it is in ../shared with its placeholders filled
    (ports 0: the OS picks); `auth=False` keeps only the router (the no-auth
    baseline); the JWT cache is set to TOKENS, or dropped (absent = no cache)."""
    text = NATIVE_YAML.read_text()
    for placeholder, value in {"__JWKS_FILE__": jwks_file, "__PORT__": 0, "__ADMIN_PORT__": 0}.items():
        if placeholder not in text:
            raise SystemExit(f"{NATIVE_YAML}: placeholder {placeholder} not found")
        text = text.replace(placeholder, str(value))
    config = yaml.safe_load(text)
    hcm = _hcm(config)
    if hcm.get("access_log"):
        raise SystemExit(f"{NATIVE_YAML} has an access log: the sides would not be equal")
    if not auth:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    else:
        (jwt_filter,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn"]
        for provider in jwt_filter["typed_config"]["providers"].values():
            if cache:
                provider["jwt_cache_config"] = {"jwt_cache_size": TOKENS}
            else:
                provider.pop("jwt_cache_config", None)
    prefix = hcm["stat_prefix"]
    stats = {"hit": f"http.{prefix}.jwt_authn.jwt_cache_hit", "miss": f"http.{prefix}.jwt_authn.jwt_cache_miss"}
    envoy = Envoy(workdir / name, upstream_port=0, jwks_port=0, with_wasm=False, tls=False)
    return Side(name, envoy, config, stats if auth and cache else None)


def phi_guard_side(
    name: str,
    workdir: Path,
    jwks_port: int,
    cache: bool,
    policy_overrides: dict | None = None,
    revocation_port: int | None = None,
    build: str = "wasm",
) -> Side:
    """The shipped envoy.yaml and policy as the e2e tests run them, keys from
    our JWKS server, the route turned into the same direct answer as the
    native side's, no access log; the verified-token cache TOKENS or off;
    `policy_overrides` set further top-level policy fields."""
    policy = Envoy.point_jwks(shipped_policy(), jwks_port)
    policy["verified_token_cache_size"] = TOKENS if cache else 0
    # Plaintext on every side, as the native reference config is: the
    # benchmark compares the checks, not TLS (issue #14 keeps TLS the default).
    policy["transport"] = {"require_tls": False}
    policy.update(policy_overrides or {})
    if revocation_port is not None:
        policy["revocation"] = {"uri": f"http://127.0.0.1:{revocation_port}/revoked.json", "cluster": "revocation"}
    # Upstream port 0: nothing may go there (the route answers directly).
    clusters = {} if revocation_port is None else {"revocation": revocation_port}
    envoy = Envoy(
        workdir / name, upstream_port=0, jwks_port=jwks_port, policy=policy, tls=False, clusters=clusters, build=build
    )
    config = envoy.config
    hcm = _hcm(config)
    hcm.pop("access_log", None)
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
    ]
    prefix = STATS_PREFIX[build]
    stats = {"hit": f"{prefix}phi_guard.token_cache.hit", "miss": f"{prefix}phi_guard.token_cache.miss"}
    return Side(name, envoy, config, stats if cache else None)


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------

# wrk runs one thread (-t1) with one Lua state: a single counter shared by
# all its connections walks the whole token list in order, starting after
# `offset` tokens (so a warm-up can go on where its last run stopped).
LUA = """
local tokens, i = {}, 0
function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then tokens[#tokens + 1] = "Bearer " .. line end
  end
  i = (tonumber(args[2]) or 0) % #tokens
end
function request()
  i = i % #tokens + 1
  return wrk.format("GET", "__PATH__", {["Authorization"] = tokens[i]})
end
""".replace("__PATH__", PATH)


@dataclass
class Result:
    """One wrk run."""

    rps: float
    p50: float  # ms
    p99: float  # ms
    requests: int
    non2xx: int
    socket_errors: str


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def wrk_argv(port: int, seconds: float, token_file: Path, lua: Path, offset: int = 0, connections: int = CONNECTIONS):
    """wrk pinned to LOAD_CPU, one thread, rotating the token file through `lua`."""
    argv = taskset(LOAD_CPU) + ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(lua)]
    return argv + [f"http://127.0.0.1:{port}{PATH}", "--", str(token_file), str(offset)]


def wrk(port: int, seconds: float, token_file: Path, lua: Path, offset: int = 0) -> Result:
    run = subprocess.run(wrk_argv(port, seconds, token_file, lua, offset), capture_output=True, text=True, check=False)
    return parse_wrk(run.returncode, run.stdout, run.stderr)


def parse_wrk(returncode: int, out: str, err: str) -> Result:
    """One finished wrk run's figures; exits if wrk failed."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if returncode != 0 or not rps or not total:
        raise SystemExit(f"wrk failed ({returncode}):\n{out}\n{err}")
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return Result(
        rps=float(rps.group(1)),
        p50=_ms(p50.group(1)) if p50 else float("nan"),
        p99=_ms(p99.group(1)) if p99 else float("nan"),
        requests=int(total.group(1)),
        non2xx=int(bad.group(1)) if bad else 0,
        socket_errors=errors.group(0) if errors else "",
    )


def load(side: Side, seconds: float, token_file: Path, lua: Path, what: str, offset: int = 0) -> Result:
    """One wrk run that must see only 2xx answers."""
    res = wrk(side.port, seconds, token_file, lua, offset)
    if res.non2xx:
        raise WrongAnswer(f"{what}: {res.non2xx} of {res.requests} answers were not 2xx")
    if res.requests == 0:
        raise WrongAnswer(f"{what}: no request completed")
    if res.socket_errors:
        log(f"  warning, {what}: {res.socket_errors}")
    return res


def warm(side: Side, token_file: Path, lua: Path, what: str) -> None:
    """Send every token of the file at least once, in short wrk runs that go
    on where the last one stopped (wrk always runs its full -d), so a cache of
    TOKENS entries then holds exactly these tokens."""
    done = 0
    while done < TOKENS:
        # Completed answers, not sent requests: the few in flight at the end
        # of a run are sent again by the next, none is skipped.
        done += load(side, 1, token_file, lua, f"warm-up {what}", offset=done).requests


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def check_answers(side: Side, good: dict[str, str], auth: bool) -> None:
    """Valid token of each algorithm: 200; tampered: 401/403 (200 without auth)."""
    for alg, token in good.items():
        ok = http_request(side.port, "GET", PATH, [("Authorization", f"Bearer {token}")]).status
        refused = http_request(side.port, "GET", PATH, [("Authorization", f"Bearer {tamper(token)}")]).status
        missing = http_request(side.port, "GET", PATH).status
        want_bad = (401, 403) if auth else (200,)
        if ok != 200 or refused not in want_bad or missing not in want_bad:
            raise WrongAnswer(
                f"{side.name} ({alg}): valid token got {ok}, tampered {refused}, none {missing};"
                f" want 200, {'/'.join(map(str, want_bad))}, {'/'.join(map(str, want_bad))}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"))
    parser.add_argument("--seconds", type=float, help="length of one measurement (default 8, quick 3)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5, quick 1)")
    args = parser.parse_args()
    seconds = args.seconds or (3 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 5)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    if not WASM.exists():
        raise SystemExit(f"{WASM} is missing: make wasm")
    if not NATIVE.exists():
        raise SystemExit(f"{NATIVE} is missing: make native")
    if not ENVOY_BIN.exists():
        raise SystemExit(f"{ENVOY_BIN} is missing: make venv")

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="phi-guard-bench-"))
    keys = {"RS256": KeyPair.rsa("RS256", kid="bench-rs256"), "ES256": KeyPair.ec("ES256", kid="bench-es256")}
    log(f"minting {TOKENS:,} tokens per algorithm (work dir {work}) ...")
    # Long enough for any run, within the policy's 3600 s maximum lifetime.
    exp = int(time.time()) + 3300
    tokens = {alg: [mint(keys[alg], exp=exp) for _ in range(TOKENS)] for alg in ALGS}
    files: dict[tuple[str, str], Path] = {}
    for alg in ALGS:
        files[("10k", alg)] = files[("cold", alg)] = work / f"tokens-{alg}.txt"
        files[("10k", alg)].write_text("\n".join(tokens[alg]) + "\n")
        files[("repeated", alg)] = work / f"token-{alg}.txt"
        files[("repeated", alg)].write_text(tokens[alg][0] + "\n")
    lua = work / "rotate.lua"
    lua.write_text(LUA)
    jwks_file = work / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(*keys.values())))
    first = {alg: tokens[alg][0] for alg in ALGS}

    # A cached side gets one Envoy per algorithm, so its cache only ever
    # sees that algorithm's 10,000 tokens: a cyclic walk over exactly the
    # capacity stays all hits under LRU or CLOCK only while no other token
    # holds a slot (one stray entry turns it into all misses).
    sides: dict[str, Side] = {}
    results: dict[tuple[str, str, str], list[Result]] = {}
    hits: dict[tuple[str, str, str], list[float]] = {}
    try:
        # A revocation list of REVOKED entries, none of them the bench tokens.
        revoked = {"jti": [f"revoked-{i}" for i in range(REVOKED // 2)],
                   "sub": [f"gone-{i}" for i in range(REVOKED - REVOKED // 2)]}  # fmt: skip
        with JwksServer(*keys.values()) as jwks_server, JwksServer() as list_server:
            list_server.set_document(revoked)
            sides["noauth"] = native_side("noauth", work, jwks_file, auth=False)
            for alg in ALGS:
                sides[f"native-{alg}"] = native_side(f"native-{alg}", work, jwks_file)
            sides["native-cold"] = native_side("native-cold", work, jwks_file, cache=False)
            for alg in ALGS:
                sides[f"phi-guard-{alg}"] = phi_guard_side(f"phi-guard-{alg}", work, jwks_server.port, cache=True)
            sides["phi-guard-cold"] = phi_guard_side("phi-guard-cold", work, jwks_server.port, cache=False)
            for alg in ALGS:
                sides[f"module-{alg}"] = phi_guard_side(
                    f"module-{alg}", work, jwks_server.port, cache=True, build="native"
                )
            sides["module-cold"] = phi_guard_side("module-cold", work, jwks_server.port, cache=False, build="native")
            sides["phi-guard-revocation"] = phi_guard_side(
                "phi-guard-revocation", work, jwks_server.port, cache=True, revocation_port=list_server.port
            )

            def side_for(workload: str, alg: str, who: str):
                if who == "noauth":
                    return sides["noauth"]
                if who == "phi-guard-revocation":
                    return sides["phi-guard-revocation"]
                if who == "phi-guard-base":
                    return sides["phi-guard-RS256"]
                return sides[f"{who}-cold" if workload == "cold" else f"{who}-{alg}"]

            try:
                log(f"starting {len(sides)} Envoys ...")
                for side in sides.values():
                    side.start()
                for name, side in sides.items():
                    alg = "RS256" if name == "phi-guard-revocation" else name.rsplit("-", 1)[-1]
                    check_answers(side, {alg: first[alg]} if alg in ALGS else first, auth=name != "noauth")

                # Fill each cache with its algorithm's 10,000 tokens; the
                # RS256 ones, fresh and then full, give the memory figures.
                memory = ("native-RS256", "phi-guard-RS256", "module-RS256")
                rss_fresh = {n: rss_kib(sides[n].proc.pid) for n in memory}
                for alg in ALGS:
                    for who in WHO:
                        log(f"sending {TOKENS:,} {alg} tokens to {who}-{alg} ...")
                        warm(sides[f"{who}-{alg}"], files[("10k", alg)], lua, f"{who}-{alg}")
                time.sleep(0.5)
                rss_cached = {n: rss_kib(sides[n].proc.pid) for n in memory}
                # Every other side serves for a moment first (first-use costs, buffers).
                for name in ("noauth", "native-cold", "phi-guard-cold", "module-cold"):
                    for alg in ALGS:
                        load(sides[name], 1, files[("cold", alg)], lua, f"warm-up {name}")

                plan: list[tuple[str, str, str]] = [("noauth", "-", "noauth")]
                for workload in WORKLOADS:
                    for alg in ALGS:
                        plan += [(workload, alg, who) for who in WHO]
                # The revocation check's cost on a cached request: the same
                # token with and without a REVOKED-entry list, back to back.
                plan += [("repeated", "RS256", "phi-guard-base"), ("repeated", "RS256", "phi-guard-revocation")]
                for r in range(rounds):
                    log(f"round {r + 1}/{rounds}: {len(plan)} runs of {seconds:g}s ...")
                    for workload, alg, who in plan if r % 2 == 0 else _swap_pairs(plan):
                        side = side_for(workload, alg, who)
                        file = files[("10k", "RS256")] if who == "noauth" else files[(workload, alg)]
                        what = f"{workload} {alg} {side.name}"
                        before = side.cache_stats() if who != "noauth" else None
                        res = load(side, seconds, file, lua, what)
                        after = side.cache_stats() if before is not None else None
                        if after is not None:
                            looked = (after["hit"] - before["hit"]) + (after["miss"] - before["miss"])
                            hits.setdefault((workload, alg, who), []).append(
                                (after["hit"] - before["hit"]) / looked if looked else 0.0
                            )
                        results.setdefault((workload, alg, who), []).append(res)
                        log(f"  {what:32} {res.rps:10,.0f} req/s  p50 {res.p50:6.2f} ms  p99 {res.p99:6.2f} ms")
                token_cache_bytes = re.search(
                    r"phi_guard\.token_cache\.bytes: (\d+)",
                    http_request(sides["phi-guard-RS256"].admin_port, "GET", "/stats?filter=token_cache").text,
                )
            finally:
                for side in sides.values():
                    side.stop()
    except (WrongAnswer, EnvoyFailedToStart) as e:
        print(f"\nFAIL: {e}\nEnvoy configs and logs are in {work}", file=sys.stderr)
        return 1

    report(results, hits, rounds, seconds, rss_fresh, rss_cached, token_cache_bytes, args.quick)
    report_revocation(results)
    log(f"\ntook {time.monotonic() - started:.0f}s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report_revocation(results) -> None:
    """What the revocation check adds to a cached request: 1/rate with the
    list minus 1/rate without, per round (the runs are back to back)."""
    plain = results[("repeated", "RS256", "phi-guard-base")]
    listed = results[("repeated", "RS256", "phi-guard-revocation")]
    added = [1e6 / b.rps - 1e6 / a.rps for a, b in zip(plain, listed)]
    log("")
    log(
        f"revocation list of {REVOKED:,} entries, one RS256 token repeated: "
        f"{_median(listed).rps:,.0f} req/s with it, {_median(plain).rps:,.0f} without; "
        f"added per request {statistics.median(added):+.2f} µs (rounds {min(added):+.2f} to {max(added):+.2f}; target <= 1 µs)"
    )


def _swap_pairs(plan):
    """The same plan with every group of sides (after no-auth) in reverse order."""
    head, rest = plan[:1], plan[1:]
    out = list(head)
    for i in range(0, len(rest), len(WHO)):
        out += list(reversed(rest[i : i + len(WHO)]))
    return out


def _median(runs: list[Result]) -> Result:
    """The run with the median req/s (its latencies come with it)."""
    return sorted(runs, key=lambda r: r.rps)[(len(runs) - 1) // 2]


def _rate(rates: list[float] | None) -> str:
    return f"{statistics.mean(rates):.0%}" if rates else "n/a"


def report(results, hits, rounds, seconds, rss_fresh, rss_cached, token_cache_bytes, quick) -> None:
    mode = "QUICK (smoke check, figures rough)" if quick else "full"
    noauth = _median(results[("noauth", "-", "noauth")])
    log("")
    log(f"phi-guard vs Envoy native jwt_authn+rbac — {mode} run")
    log(
        f"Envoy --concurrency 1 on CPU {ENVOY_CPU}, wrk -t1 -c{CONNECTIONS} on CPU {LOAD_CPU}; {rounds} alternating"
        f" round(s) of {seconds:g}s, the median-req/s round shown; direct 200 answers; no access log on any side"
    )
    log(f"wasm: {WASM} ({WASM.stat().st_size:,} bytes); module: {NATIVE} ({NATIVE.stat().st_size:,} bytes)")
    log("")
    cols = f"{'req/s':>8} {'p50':>6} {'p99':>6}"
    head = f"{'workload':9} {'alg':5} | {'no auth':^22} | {'native':^22} {'hit':>4} | {'phi-guard':^22} {'hit':>4} |"
    head += f" {'phi/native (rounds)':^22} | target"
    log(head)
    log(f"{'':9} {'':5} | {cols} | {cols} {'':>4} | {cols} {'':>4} | {'req/s':^22} |")
    log("-" * len(head))

    def fmt(r: Result) -> str:
        return f"{r.rps:8,.0f} {r.p50:6.2f} {r.p99:6.2f}"

    for workload in WORKLOADS:
        for alg in ALGS:
            n, p = _median(results[(workload, alg, "native")]), _median(results[(workload, alg, "phi-guard")])
            nh, ph = (
                "off" if workload == "cold" else _rate(hits.get((workload, alg, who))) for who in ("native", "phi-guard")
            )
            ratio = p.rps / n.rps
            # The same ratio round by round: how much the median can be trusted.
            pairs = zip(results[(workload, alg, "native")], results[(workload, alg, "phi-guard")])
            per_round = [b.rps / a.rps for a, b in pairs]
            spread = f"({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
            target = TARGETS.get((workload, alg))
            mark = "" if target is None else f">= {target:.1f}x {'PASS' if ratio >= target else 'BELOW'}"
            log(
                f"{workload:9} {alg:5} | {fmt(noauth)} | {fmt(n)} {nh:>4} | {fmt(p)} {ph:>4} |"
                f" {ratio:5.2f}x {spread:<15} | {mark}"
            )
    log("")
    log(f"the dynamic module (`module`, same policy and core, no VM) against native jwt_authn+rbac:")
    mhead = f"{'workload':9} {'alg':5} | {'module':^22} {'hit':>4} | {'module/native':^22} | {'module/wasm':>11} | target"
    log(mhead)
    log("-" * len(mhead))
    for workload in WORKLOADS:
        for alg in ALGS:
            n, p = _median(results[(workload, alg, "native")]), _median(results[(workload, alg, "phi-guard")])
            m = _median(results[(workload, alg, "module")])
            mh = "off" if workload == "cold" else _rate(hits.get((workload, alg, "module")))
            ratio = m.rps / n.rps
            pairs = zip(results[(workload, alg, "native")], results[(workload, alg, "module")])
            per_round = [b.rps / a.rps for a, b in pairs]
            spread = f"({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
            mark = ""
            if workload in ("repeated", "10k"):
                mark = f">= {MODULE_TARGET:.1f}x {'PASS' if ratio >= MODULE_TARGET else 'BELOW'}"
            log(f"{workload:9} {alg:5} | {fmt(m)} {mh:>4} | {ratio:5.2f}x {spread:<15} | {m.rps / p.rps:10.2f}x | {mark}")
    log("")
    log("(latencies in ms; 'no auth' is one measurement per round, shown on every row; 'hit' = the side's")
    log(" verified-token cache hit rate during the measured runs, from its own stats; 'off' = no cache)")
    log("")
    for name in rss_fresh:
        fresh, cached = rss_fresh[name] / 1024, rss_cached[name] / 1024
        log(f"RSS {name:15}: fresh {fresh:6.1f} MiB, {TOKENS:,} RS256 tokens cached {cached:6.1f} MiB")
    if token_cache_bytes:
        estimate = int(token_cache_bytes.group(1)) / 1024 / 1024
        log(f"phi-guard-RS256's own estimate (phi_guard.token_cache.bytes) at the end: {estimate:.1f} MiB")
    log(f".wasm size: {WASM.stat().st_size / 1024:.0f} KiB; module .so size: {NATIVE.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
