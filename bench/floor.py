"""Where a cached request's time goes in the wasm filter (`make bench-floor`).

The equal-features repeated-RS256 workload of `make bench` (one worker on
CPU 0, wrk -t1 -c16 on CPU 1, direct 200 answers, the same JSON access log on
every side), on six Envoys:

  no auth    the router only
  empty      a proxy-wasm filter whose callbacks all return at once
             (examples/floor.rs, mode `empty`): the VM's floor
  twin       the same filter making phi-guard's host calls for a cached,
             allowed request and nothing else (mode `twin N`, N the size of
             phi-guard's audit record in the log, measured first)
  phi-guard  the wasm filter, shipped policy
  module     the same core as the dynamic module
  native     jwt_authn + rbac, as in `make bench`

Envoy is the bottleneck on its one CPU, so 1 / req/s is its CPU time per
request; the differences between sides split phi-guard's cost into the VM
(empty - no auth), the host calls (twin - empty) and the core running in V8
(phi-guard - twin), next to native's whole cost (native - no auth). Rounds
alternate the order; the median round is shown. `--parts` prices each
group of host calls (examples/floor.rs names them): a twin that makes that
group REPEAT times over, its time less the twin's, over REPEAT - 1.
`--twin "SPEC"` (repeatable) adds a twin of that spec: GROUP*K makes a group
K times (0 leaves it out), `bytes=N` writes an N-byte record instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench as b  # bench/ is on sys.path when this file runs
from harness import REPO, Envoy, EnvoyFailedToStart, JwksServer, KeyPair, mint  # noqa: E402

FLOOR = REPO / "target" / "wasm32-wasip1" / "release" / "examples" / "floor.wasm"
SIDES = ("noauth", "empty", "twin", "phi-guard", "module", "native")
# examples/floor.rs's groups of host calls, in the order it makes them, and
# how many calls each group is.
GROUPS = {"pairs": 1, "source": 1, "tls": 1, "time": 1, "counters": 2, "remove": 1, "set": 4, "code": 1, "record": 1}
# --parts: a group's calls made this many times over; a single call is about
# a microsecond, below the run-to-run noise of req/s, twenty more are not.
REPEAT = 21


def floor_side(name: str, workdir: Path, mode: str) -> b.Side:
    """The floor filter in the shipped envoy.yaml's wasm slot, as phi-guard's side has it."""
    envoy = Envoy(workdir / name, upstream_port=0, jwks_port=0, policy=mode, wasm=FLOOR, tls=False)
    config = envoy.config
    hcm = b._hcm(config)
    log_path = workdir / name / "access.log"
    hcm["access_log"] = b.access_log(log_path)
    hcm["route_config"]["virtual_hosts"][0]["routes"] = b.DIRECT_ROUTES
    return b.Side(name, envoy, config, None, log_path)


def logged_record(side: b.Side, token: str) -> str:
    """The audit field of the access-log line of one request ("" for none)."""
    side.empty_log()
    b.http_request(side.port, "GET", b.PATH, [("Authorization", f"Bearer {token}")])
    audit = (side.last_log_line() or {}).get("audit")
    side.empty_log()
    return "" if audit in (None, "-") else audit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8, help="length of one run (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--parts", action="store_true", help="also price each group of host calls")
    parser.add_argument("--twin", action="append", default=[], help='another twin, e.g. "set*0 remove*0" or "bytes=2"')
    args = parser.parse_args()
    # Every twin by name, with the words of its mode after "twin N".
    twins = {"twin": []}
    twins.update({f"twin-{g}": [f"{g}*{REPEAT}"] for g in GROUPS if args.parts})
    twins.update({f"twin[{spec}]": spec.split() for spec in args.twin})
    names = SIDES + tuple(n for n in twins if n != "twin")
    for path, make in ((FLOOR, "make bench-floor"), (b.WASM, "make wasm"), (b.NATIVE, "make native")):
        if not path.exists():
            raise SystemExit(f"{path} is missing: {make}")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="phi-guard-floor-"))
    key = KeyPair.for_alg("RS256", kid="bench-rs256")
    token = mint(key, exp=int(time.time()) + 3300)
    token_file = work / "token.txt"
    token_file.write_text(token + "\n")
    lua = work / "rotate.lua"
    lua.write_text(b.LUA)
    jwks_file = work / "jwks.json"
    jwks_file.write_text(json.dumps(b.jwks(key)))
    runs: dict[str, list[b.Result]] = {name: [] for name in names}
    sides: dict[str, b.Side] = {}
    try:
        with JwksServer(key) as jwks_server:
            sides["noauth"] = b.native_side("noauth", work, jwks_file, auth=False, equal=True)
            sides["phi-guard"] = b.phi_guard_side("phi-guard", work, jwks_server.port, cache=True, equal=True)
            sides["module"] = b.phi_guard_side("module", work, jwks_server.port, cache=True, equal=True, build="native")
            sides["native"] = b.native_side("native", work, jwks_file, equal=True)
            sides["empty"] = floor_side("empty", work, "empty")
            try:
                for name in ("noauth", "phi-guard", "module", "native", "empty"):
                    sides[name].start()
                    sides[name].check_token = token
                    kind = {"noauth": "noauth", "empty": "noauth", "native": "native"}.get(name, "phi-guard")
                    b.check_log(sides[name], kind)
                # A twin writes a record as long as phi-guard's, unless told otherwise.
                record = logged_record(sides["phi-guard"], token)
                for i, (name, words) in enumerate(twins.items()):
                    size = next((int(w[6:]) for w in words if w.startswith("bytes=")), len(record))
                    words = [w for w in words if not w.startswith("bytes=")]
                    sides[name] = floor_side(f"twin{i}", work, " ".join(["twin", str(size), *words])).start()
                    sides[name].check_token = token
                    b.check_log(sides[name], "noauth")
                    got, want = len(logged_record(sides[name], token)), 0 if "record*0" in words else size
                    if got != want:
                        raise b.WrongAnswer(f"{name}: a {got}-byte record in the access log, not {want}")
                b.log(f"phi-guard's audit record: {len(record)} bytes; the twin writes as many")
                for name in names:
                    b.load(sides[name], 1, token_file, lua, f"warm-up {name}")
                for r in range(args.rounds):
                    b.log(f"round {r + 1}/{args.rounds}: {len(names)} runs of {args.seconds:g}s ...")
                    for name in names if r % 2 == 0 else reversed(names):
                        res = b.load(sides[name], args.seconds, token_file, lua, name)
                        runs[name].append(res)
                        b.log(f"  {name:10} {res.rps:10,.0f} req/s  p50 {res.p50:6.2f} ms  p99 {res.p99:6.2f} ms")
            finally:
                for side in sides.values():
                    side.stop()
    except (b.WrongAnswer, EnvoyFailedToStart) as e:
        print(f"\nFAIL: {e}\nEnvoy configs and logs are in {work}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    report(runs, args.rounds, args.seconds)
    return 0


def report(runs: dict[str, list[b.Result]], rounds: int, seconds: float) -> None:
    rps = {name: statistics.median(r.rps for r in rs) for name, rs in runs.items()}
    us = {name: 1e6 / v for name, v in rps.items()}
    print(f"\nEQUAL FEATURES, one RS256 token repeated; median of {rounds} rounds of {seconds:g}s")
    print(f"{'side':10} {'req/s':>9} {'us/req':>8} {'over no auth':>13}")
    for name in SIDES + tuple(n for n in us if n.startswith("twin[")):
        print(f"{name:10} {rps[name]:9,.0f} {us[name]:8.1f} {us[name] - us['noauth']:13.1f}")
    parts = [g for g in GROUPS if f"twin-{g}" in us]
    if parts:
        print(f"\nphi-guard's host calls, each group made {REPEAT} times over (per call: the difference / {REPEAT - 1} / calls):")
        for g in parts:
            extra = us[f"twin-{g}"] - us["twin"]
            print(f"  {g:10} x{GROUPS[g]}  {extra / (REPEAT - 1):5.2f} us per group, {extra / (REPEAT - 1) / GROUPS[g]:5.2f} us per call")
    vm = us["empty"] - us["noauth"]
    calls = us["twin"] - us["empty"]
    core = us["phi-guard"] - us["twin"]
    native = us["native"] - us["noauth"]
    print("\nphi-guard (wasm) over no auth, per request:")
    print(f"  the VM: a context per stream and its callbacks (empty - no auth)  {vm:6.1f} us")
    print(f"  phi-guard's host calls (twin - empty)                             {calls:6.1f} us")
    print(f"  the core in V8: decide, headers, draft, seal (phi-guard - twin)   {core:6.1f} us")
    print(f"  in all                                                            {vm + calls + core:6.1f} us")
    print(f"native jwt_authn + rbac over no auth                                {native:6.1f} us")
    print(f"the module over no auth                                             {us['module'] - us['noauth']:6.1f} us")
    print(f"\nphi-guard / native req/s: {rps['phi-guard'] / rps['native']:.2f}x;"
          f" with no core at all (the twin): {rps['twin'] / rps['native']:.2f}x;"
          f" an empty wasm filter: {rps['empty'] / rps['native']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
