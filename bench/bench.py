"""phi-guard against Envoy's native jwt_authn + rbac, side by side (`make bench`).

Two configurations, each side an Envoy with one worker (`--concurrency 1`)
pinned to CPU 0, loaded by wrk (`-t1 -c16 --latency`) pinned to CPU 1.
Every side answers GET /fhir/Patient/{id} with a direct 200 (no upstream
hop), so the filters are what is measured, and every side is plaintext:
TLS is not what is compared (phi-guard runs with `transport.require_tls:
false`; the native reference config has no TLS either).

Equal features (the headline, DESIGN.md §6 "like for like"):
  no auth    the router only, with the access log below
  native     the reference config (../shared/reference/native-jwt-authn.yaml):
             jwt_authn with its JWKS, jwt_cache_config 10,000,
             payload_in_metadata, `forward: false` (the token is removed),
             claim_to_headers sub -> x-phi-subject, client_id -> x-phi-client-id,
             scope -> x-phi-scopes, and x-phi-rule: patient-read set by a
             header_mutation filter (a rule id is no claim), + rbac, + the
             access log below with the JWT payload from dynamic metadata
  phi-guard  the shipped envoy.yaml and policy (identity headers x-phi-subject,
             x-phi-client-id, x-phi-scopes, x-phi-rule; token removed), its
             audit record built, sealed and written into the access log below
  module     phi-guard as the Envoy dynamic module (`make native`): the same
             core, envoy.yaml and policy, no VM (issue #19)
  The access log, the same on all four: one JSON line per request to a
  file, with %START_TIME%, x-request-id, method, path without the query,
  status, downstream address, TLS version, the JWT payload
  (%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt)%) and the audit
  record (%FILTER_STATE(wasm.phi_guard.audit:PLAIN)%); a side without one
  of the last two writes `-` there. The files are emptied after every run.

Plain (as before): the reference config as shipped, no access log, no
identity headers; phi-guard without an access log (it still builds and
chains its audit record); no auth without a log.

Workloads, RS256 (2048-bit) and ES256:

  repeated  one token over and over (caches on; the token is one of the 10k)
  10k       10,000 distinct tokens round robin (caches on, 10,000 entries,
            filled with exactly these tokens before the first round)
  cold      (plain only) every verified-token cache off: one signature
            check per request; also ES384, PS256 and EdDSA
  paced     (equal features) p50/p99 at the same load on both sides: each
            connection waits PACE_MS between requests, so both see about
            the same request rate, well below either side's maximum

Every comparison (no auth; native, phi-guard, module) is also a row of the
module's own table, plain and equal features, target >= 1.3x native on
repeated and 10k with equal features. A cached side gets one Envoy per
algorithm. Rounds alternate the sides (each group of compared runs goes in
reverse order every other round); the round with the median
req/s is reported, with the spread of the per-round ratio.

Also: each side's cache hit rate per workload (from its own stats), the RSS
of an Envoy with 10,000 cached RS256 tokens against the same process fresh
(plain and equal features), two workers against one on the equal-features
repeated-RS256 workload (Envoy with `--concurrency 2` on both CPUs, wrk
-t2 on both too: the machine has two cores, so load generator and Envoy
share them; native is measured the same way, as the yardstick of what the
machine allows), the revocation check's cost on a cached request
(100,000-entry list, back to back), and the .wasm size.

BENCH_QUICK=1 (or --quick) gives one short round, for a smoke check. The exit
status is non-zero only when a side gives wrong answers (a valid token not
200, a tampered or missing one not 401/403, any non-2xx under load, an access
log line without its record or payload) or cannot run; figures below a
target are marked BELOW but do not fail.
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
# Tokens per extra cold algorithm: every cache is off there, so fewer do.
COLD_EXTRA_TOKENS = 2_000
# Entries in the revocation list of the revocation-cost runs (issue #13: 100,000).
REVOKED = 100_000
ALGS = ("RS256", "ES256")
COLD_ALGS = ("RS256", "ES256", "ES384", "PS256", "EdDSA")
PLAIN_WORKLOADS = ("repeated", "10k", "cold")
EQUAL_WORKLOADS = ("repeated", "10k", "paced")
# phi-guard / native req/s (issue #15).
TARGETS = {
    ("equal", "repeated", "RS256"): 1.0,
    ("equal", "repeated", "ES256"): 1.0,
    ("equal", "10k", "RS256"): 1.0,
    ("equal", "10k", "ES256"): 1.0,
    ("plain", "repeated", "RS256"): 0.75,
    ("plain", "repeated", "ES256"): 0.75,
    ("plain", "10k", "RS256"): 0.75,
    ("plain", "10k", "ES256"): 0.75,
    ("plain", "cold", "RS256"): 0.5,
    ("plain", "cold", "ES256"): 0.3,
}
# The dynamic module / native req/s, equal features (issue #19).
MODULE_TARGETS = {
    ("equal", "repeated", "RS256"): 1.3,
    ("equal", "repeated", "ES256"): 1.3,
    ("equal", "10k", "RS256"): 1.3,
    ("equal", "10k", "ES256"): 1.3,
}
# The phi-guard builds measured against native: the wasm filter and the dynamic module.
BUILDS_MEASURED = {"phi-guard": "wasm", "module": "native"}
# At the same load, phi-guard's p99 at most this many times native's.
P99_TARGET = 1.5
# Two workers against one, req/s.
SCALE_TARGET = 1.7
ENVOY_CPU, LOAD_CPU, BOTH_CPUS = "0", "1", "0,1"
CONNECTIONS = 16
# The paced workload: each connection waits this long after an answer, so
# 16 connections send about 16 * 1000 / PACE_MS req/s on any side that keeps up.
PACE_MS = 2
# The identity headers phi-guard's shipped policy forwards, and the claims
# native's claim_to_headers fills them from (the rule id is no claim).
IDENTITY_CLAIMS = {"sub": "x-phi-subject", "client_id": "x-phi-client-id", "scope": "x-phi-scopes"}
RULE_HEADER = ("x-phi-rule", "patient-read")
# What every phi-guard side's route becomes: a direct answer, no upstream hop.
DIRECT_ROUTES = [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]
# The one access log of the equal-features configuration, the same on every side.
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ_WITHOUT_QUERY(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "source": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "tls": "%DOWNSTREAM_TLS_VERSION%",
    "jwt": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt)%",
    "audit": "%FILTER_STATE(wasm.phi_guard.audit:PLAIN)%",
}


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


def access_log(path: Path) -> list[dict]:
    """The equal-features access log: JSON lines to `path`."""
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {
                    "formatters": [
                        {
                            "name": "envoy.formatter.req_without_query",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"
                            },
                        }
                    ],
                    "json_format": dict(ACCESS_LOG_FORMAT),
                },
            },
        }
    ]


class Side:
    """One Envoy under test. Every side is run by the e2e harness's Envoy
    runner (same flags, OS-picked ports found through admin), with its
    config replaced by the side's own, and pinned to `cpus`. `log_path`
    is its equal-features access log, if it has one."""

    def __init__(
        self,
        name: str,
        envoy: Envoy,
        config: dict,
        cache_stats: dict[str, str] | None,
        log_path: Path | None = None,
        cpus: str = ENVOY_CPU,
    ):
        self.name = name
        self.envoy = envoy
        self.envoy.config = config
        self.envoy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._cache_stats = cache_stats
        self.log_path = log_path
        self.cpus = cpus
        # A valid token the side accepts, for the access-log check.
        self.check_token = ""

    def start(self) -> Side:
        self.envoy.start()
        if taskset(self.cpus):
            # -a: every thread, the workers, the main thread and the access-log flusher alike.
            argv = ["taskset", "-a", "-p", "-c", self.cpus, str(self.proc.pid)]
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

    def last_log_line(self) -> dict | None:
        """The access log's last complete line, once Envoy flushed it (200 ms)."""
        if self.log_path is None:
            return None
        for _ in range(50):
            if self.log_path.exists():
                lines = self.log_path.read_bytes().splitlines()
                if lines:
                    return json.loads(lines[-1])
            time.sleep(0.1)
        raise WrongAnswer(f"{self.name}: nothing in its access log {self.log_path}")

    def empty_log(self) -> None:
        """Envoy appends (O_APPEND), so a truncated file just starts again:
        the disk does not fill up over a full run."""
        if self.log_path is not None and self.log_path.exists():
            os.truncate(self.log_path, 0)


def native_side(
    name: str,
    workdir: Path,
    jwks_file: Path,
    auth: bool = True,
    cache: bool = True,
    equal: bool = False,
    concurrency: int = 1,
) -> Side:
    """The reference config as it is in ../shared with its placeholders filled
    (ports 0: the OS picks); `auth=False` keeps only the router (the no-auth
    baseline); the JWT cache is set to TOKENS, or dropped (absent = no
    cache). `equal` adds what phi-guard does besides deciding: the identity
    headers, the token removed, and the access log."""
    text = NATIVE_YAML.read_text()
    for placeholder, value in {"__JWKS_FILE__": jwks_file, "__PORT__": 0, "__ADMIN_PORT__": 0}.items():
        if placeholder not in text:
            raise SystemExit(f"{NATIVE_YAML}: placeholder {placeholder} not found")
        text = text.replace(placeholder, str(value))
    config = yaml.safe_load(text)
    hcm = _hcm(config)
    if hcm.get("access_log"):
        raise SystemExit(f"{NATIVE_YAML} has an access log: the plain sides would not be equal")
    if not auth:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    else:
        (jwt_filter,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn"]
        for provider in jwt_filter["typed_config"]["providers"].values():
            if cache:
                provider["jwt_cache_config"] = {"jwt_cache_size": TOKENS}
            else:
                provider.pop("jwt_cache_config", None)
            if equal:
                if "payload_in_metadata" not in provider:
                    raise SystemExit(f"{NATIVE_YAML}: the provider has no payload_in_metadata")
                provider["forward"] = False
                provider["claim_to_headers"] = [
                    {"claim_name": claim, "header_name": header} for claim, header in IDENTITY_CLAIMS.items()
                ]
        if equal:
            # A rule id is no claim: the fourth identity header comes from a
            # header_mutation filter after rbac, as a route's own header would.
            mutation = {
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {
                        "request_mutations": [
                            {
                                "append": {
                                    "header": {"key": RULE_HEADER[0], "value": RULE_HEADER[1]},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                }
                            }
                        ]
                    },
                },
            }
            hcm["http_filters"].insert(len(hcm["http_filters"]) - 1, mutation)
    log_path = workdir / name / "access.log" if equal else None
    if log_path is not None:
        hcm["access_log"] = access_log(log_path)
    prefix = hcm["stat_prefix"]
    stats = {"hit": f"http.{prefix}.jwt_authn.jwt_cache_hit", "miss": f"http.{prefix}.jwt_authn.jwt_cache_miss"}
    envoy = Envoy(workdir / name, upstream_port=0, jwks_port=0, with_wasm=False, tls=False, concurrency=concurrency)
    cpus = ENVOY_CPU if concurrency == 1 else BOTH_CPUS
    return Side(name, envoy, config, stats if auth and cache else None, log_path, cpus)


def phi_guard_side(
    name: str,
    workdir: Path,
    jwks_port: int,
    cache: bool,
    policy_overrides: dict | None = None,
    revocation_port: int | None = None,
    equal: bool = False,
    concurrency: int = 1,
    algorithms: list[str] | None = None,
    build: str = "wasm",
) -> Side:
    """The shipped envoy.yaml and policy as the e2e tests run them, keys from
    our JWKS server, the route turned into the same direct answer as the
    native side's; the verified-token cache TOKENS or off; `policy_overrides`
    set further top-level policy fields, `algorithms` the provider's list.
    Plain: no access log. `equal`: the equal-features access log, the
    audit record in it. `build` "native" runs the dynamic module instead
    of the wasm filter (same envoy.yaml, same policy)."""
    policy = Envoy.point_jwks(shipped_policy(), jwks_port)
    policy["verified_token_cache_size"] = TOKENS if cache else 0
    # Plaintext on every side, as the native reference config is: the
    # benchmark compares the checks, not TLS (issue #14 keeps TLS the default).
    policy["transport"] = {"require_tls": False}
    policy.update(policy_overrides or {})
    if algorithms:
        for provider in policy["providers"]:
            provider["algorithms"] = list(algorithms)
    if revocation_port is not None:
        policy["revocation"] = {"uri": f"http://127.0.0.1:{revocation_port}/revoked.json", "cluster": "revocation"}
    # Upstream port 0: nothing may go there (the route answers directly).
    clusters = {} if revocation_port is None else {"revocation": revocation_port}
    envoy = Envoy(
        workdir / name,
        upstream_port=0,
        jwks_port=jwks_port,
        policy=policy,
        tls=False,
        clusters=clusters,
        concurrency=concurrency,
        build=build,
    )
    config = envoy.config
    hcm = _hcm(config)
    hcm.pop("access_log", None)
    log_path = workdir / name / "access.log" if equal else None
    if log_path is not None:
        hcm["access_log"] = access_log(log_path)
    hcm["route_config"]["virtual_hosts"][0]["routes"] = DIRECT_ROUTES
    prefix = STATS_PREFIX[build] + "phi_guard.token_cache."
    stats = {"hit": f"{prefix}hit", "miss": f"{prefix}miss"}
    cpus = ENVOY_CPU if concurrency == 1 else BOTH_CPUS
    return Side(name, envoy, config, stats if cache else None, log_path, cpus)


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------

# wrk runs one Lua state per thread: with -t1 a single counter shared by
# all its connections walks the whole token list in order, starting after
# `offset` tokens (so a warm-up can go on where its last run stopped).
# `__DELAY__` is the pause (ms) each connection takes after an answer:
# 0 for the load runs, PACE_MS for the paced one.
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
PACED = "\nfunction delay()\n  return __DELAY__\nend\n".replace("__DELAY__", str(PACE_MS))


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


def wrk_argv(
    port: int,
    seconds: float,
    token_file: Path,
    lua: Path,
    offset: int = 0,
    connections: int = CONNECTIONS,
    threads: int = 1,
    cpus: str = LOAD_CPU,
):
    """wrk pinned to `cpus`, rotating the token file through `lua`."""
    argv = taskset(cpus) + ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(lua)]
    return argv + [f"http://127.0.0.1:{port}{PATH}", "--", str(token_file), str(offset)]


def wrk(port: int, seconds: float, token_file: Path, lua: Path, offset: int = 0, threads: int = 1, cpus=LOAD_CPU):
    argv = wrk_argv(port, seconds, token_file, lua, offset, threads=threads, cpus=cpus)
    run = subprocess.run(argv, capture_output=True, text=True, check=False)
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


def load(
    side: Side, seconds: float, token_file: Path, lua: Path, what: str, offset: int = 0, threads: int = 1, cpus=LOAD_CPU
) -> Result:
    """One wrk run that must see only 2xx answers."""
    res = wrk(side.port, seconds, token_file, lua, offset, threads=threads, cpus=cpus)
    if res.non2xx:
        raise WrongAnswer(f"{what}: {res.non2xx} of {res.requests} answers were not 2xx")
    if res.requests == 0:
        raise WrongAnswer(f"{what}: no request completed")
    if res.socket_errors:
        log(f"  warning, {what}: {res.socket_errors}")
    side.empty_log()
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


def check_log(side: Side, kind: str) -> None:
    """After a valid request, the equal-features log line holds every field,
    and the payload (native) or the audit record (phi-guard) of the request."""
    time.sleep(0.3)
    side.empty_log()
    token = side.check_token
    status = http_request(side.port, "GET", PATH + "?q=1", [("Authorization", f"Bearer {token}"), ("x-request-id", "bench-check")]).status
    if status != 200:
        raise WrongAnswer(f"{side.name}: valid token got {status}")
    line = side.last_log_line() or {}
    want = {"request_id": "bench-check", "method": "GET", "path": PATH, "status": 200}
    wrong = {k: line.get(k) for k, v in want.items() if line.get(k) != v}
    if not line.get("source") or line.get("source") == "-" or line.get("tls") not in ("-", None):
        wrong["source/tls"] = (line.get("source"), line.get("tls"))
    if kind == "native" and not (isinstance(line.get("jwt"), dict) and line["jwt"].get("sub")):
        wrong["jwt"] = line.get("jwt")
    if kind == "phi-guard":
        audit = line.get("audit")
        try:
            record = json.loads(audit) if isinstance(audit, str) else audit
        except ValueError:
            record = None
        if not (isinstance(record, dict) and record.get("decision") == "allow" and record.get("chain")):
            wrong["audit"] = audit
    if wrong:
        raise WrongAnswer(f"{side.name}: access log line lacks {wrong}: {line}")
    side.empty_log()


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
    keys = {alg: KeyPair.for_alg(alg, kid=f"bench-{alg.lower()}") for alg in COLD_ALGS}
    log(f"minting {TOKENS:,} tokens per algorithm, {COLD_EXTRA_TOKENS:,} for the other cold ones (work dir {work}) ...")
    # Long enough for any run, within the policy's 3600 s maximum lifetime.
    exp = int(time.time()) + 3300
    tokens = {
        alg: [mint(keys[alg], exp=exp) for _ in range(TOKENS if alg in ALGS else COLD_EXTRA_TOKENS)]
        for alg in COLD_ALGS
    }
    files: dict[tuple[str, str], Path] = {}
    for alg in COLD_ALGS:
        files[("10k", alg)] = files[("cold", alg)] = work / f"tokens-{alg}.txt"
        files[("10k", alg)].write_text("\n".join(tokens[alg]) + "\n")
        files[("repeated", alg)] = files[("paced", alg)] = work / f"token-{alg}.txt"
        files[("repeated", alg)].write_text(tokens[alg][0] + "\n")
    lua = work / "rotate.lua"
    lua.write_text(LUA)
    paced_lua = work / "paced.lua"
    paced_lua.write_text(LUA + PACED)
    jwks_file = work / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(*keys.values())))
    first = {alg: tokens[alg][0] for alg in COLD_ALGS}

    # A cached side gets one Envoy per algorithm, so its cache only ever
    # sees that algorithm's 10,000 tokens: a cyclic walk over exactly the
    # capacity stays all hits under LRU or CLOCK only while no other token
    # holds a slot (one stray entry turns it into all misses).
    sides: dict[str, Side] = {}
    # (config, workload, alg, who) -> runs
    results: dict[tuple[str, str, str, str], list[Result]] = {}
    hits: dict[tuple[str, str, str, str], list[float]] = {}
    try:
        # A revocation list of REVOKED entries, none of them the bench tokens.
        revoked = {"jti": [f"revoked-{i}" for i in range(REVOKED // 2)],
                   "sub": [f"gone-{i}" for i in range(REVOKED - REVOKED // 2)]}  # fmt: skip
        with JwksServer(*keys.values()) as jwks_server, JwksServer() as list_server:
            list_server.set_document(revoked)
            # Plain.
            sides["noauth"] = native_side("noauth", work, jwks_file, auth=False)
            for alg in ALGS:
                sides[f"native-{alg}"] = native_side(f"native-{alg}", work, jwks_file)
            sides["native-cold"] = native_side("native-cold", work, jwks_file, cache=False)
            for who, build in BUILDS_MEASURED.items():
                for alg in ALGS:
                    sides[f"{who}-{alg}"] = phi_guard_side(f"{who}-{alg}", work, jwks_server.port, cache=True, build=build)
                sides[f"{who}-cold"] = phi_guard_side(
                    f"{who}-cold", work, jwks_server.port, cache=False, algorithms=list(COLD_ALGS), build=build
                )
            sides["phi-guard-revocation"] = phi_guard_side(
                "phi-guard-revocation", work, jwks_server.port, cache=True, revocation_port=list_server.port
            )
            # Equal features.
            sides["eq-noauth"] = native_side("eq-noauth", work, jwks_file, auth=False, equal=True)
            for alg in ALGS:
                sides[f"eq-native-{alg}"] = native_side(f"eq-native-{alg}", work, jwks_file, equal=True)
                for who, build in BUILDS_MEASURED.items():
                    sides[f"eq-{who}-{alg}"] = phi_guard_side(
                        f"eq-{who}-{alg}", work, jwks_server.port, cache=True, equal=True, build=build
                    )
            # Two workers (equal features, RS256).
            sides["x2-native"] = native_side("x2-native", work, jwks_file, equal=True, concurrency=2)
            sides["x2-phi-guard"] = phi_guard_side(
                "x2-phi-guard", work, jwks_server.port, cache=True, equal=True, concurrency=2
            )

            def side_for(config: str, workload: str, alg: str, who: str) -> Side:
                if who in ("noauth", "phi-guard-revocation"):
                    return sides[who if config == "plain" else f"eq-{who}"]
                if who == "phi-guard-base":
                    return sides["phi-guard-RS256"]
                if config == "x2":
                    return sides[f"x2-{who}"]
                if config == "plain":
                    return sides[f"{who}-cold" if workload == "cold" else f"{who}-{alg}"]
                return sides[f"eq-{who}-{alg}"]

            try:
                log(f"starting {len(sides)} Envoys ...")
                for side in sides.values():
                    side.start()
                for name, side in sides.items():
                    alg = name.rsplit("-", 1)[-1]
                    if alg in ALGS:
                        good = {alg: first[alg]}
                    elif name.endswith("cold"):
                        good = first
                    else:
                        good = {a: first[a] for a in ALGS}
                    check_answers(side, good, auth="noauth" not in name)
                    side.check_token = first["RS256"] if alg not in ALGS else first[alg]
                    if side.log_path is not None:
                        check_log(side, "noauth" if "noauth" in name else "native" if "native" in name else "phi-guard")

                # Fill each cache with its algorithm's 10,000 tokens; the
                # RS256 ones, fresh and then full, give the memory figures.
                memory = tuple(f"{config}{who}-RS256" for config in ("", "eq-") for who in ("native", *BUILDS_MEASURED))
                rss_fresh = {n: rss_kib(sides[n].proc.pid) for n in memory}
                for alg in ALGS:
                    for who in (f"{c}{w}" for c in ("", "eq-") for w in ("native", *BUILDS_MEASURED)):
                        log(f"sending {TOKENS:,} {alg} tokens to {who}-{alg} ...")
                        warm(sides[f"{who}-{alg}"], files[("10k", alg)], lua, f"{who}-{alg}")
                time.sleep(0.5)
                rss_cached = {n: rss_kib(sides[n].proc.pid) for n in memory}
                # Every other side serves for a moment first (first-use costs, buffers).
                for name in ("noauth", "eq-noauth", "native-cold", "phi-guard-cold", "module-cold"):
                    for alg in COLD_ALGS if name.endswith("cold") else ALGS:
                        load(sides[name], 1, files[("cold", alg)], lua, f"warm-up {name}")
                for name in ("x2-native", "x2-phi-guard"):
                    load(sides[name], 1, files[("repeated", "RS256")], lua, f"warm-up {name}", threads=2, cpus=BOTH_CPUS)

                # Groups of runs that are compared, run back to back; every
                # other round runs each group in reverse order.
                plan: list[list[tuple[str, str, str, str]]] = [[("plain", "-", "-", "noauth")], [("equal", "-", "-", "noauth")]]
                for config, workloads in (("equal", EQUAL_WORKLOADS), ("plain", PLAIN_WORKLOADS)):
                    for workload in workloads:
                        for alg in COLD_ALGS if workload == "cold" else ALGS:
                            plan.append([(config, workload, alg, who) for who in ("native", *BUILDS_MEASURED)])
                # Scaling: the same token, two workers against the one-worker sides.
                plan.append([("x2", "repeated", "RS256", "native"), ("x2", "repeated", "RS256", "phi-guard")])
                # The revocation check's cost on a cached request: the same
                # token with and without a REVOKED-entry list, back to back.
                plan.append([("plain", "repeated", "RS256", "phi-guard-base"), ("plain", "repeated", "RS256", "phi-guard-revocation")])
                runs = sum(len(g) for g in plan)
                for r in range(rounds):
                    log(f"round {r + 1}/{rounds}: {runs} runs of {seconds:g}s ...")
                    order = [run for g in plan for run in (g if r % 2 == 0 else reversed(g))]
                    for config, workload, alg, who in order:
                        side = side_for(config, workload, alg, who)
                        file = files[("repeated", "RS256")] if who == "noauth" else files[(workload, alg)]
                        what = f"{config} {workload} {alg} {side.name}"
                        before = side.cache_stats() if who != "noauth" else None
                        two = config == "x2"
                        res = load(
                            side,
                            seconds,
                            file,
                            paced_lua if workload == "paced" else lua,
                            what,
                            threads=2 if two else 1,
                            cpus=BOTH_CPUS if two else LOAD_CPU,
                        )
                        after = side.cache_stats() if before is not None else None
                        key = (config, workload, alg, who)
                        if after is not None:
                            looked = (after["hit"] - before["hit"]) + (after["miss"] - before["miss"])
                            hits.setdefault(key, []).append((after["hit"] - before["hit"]) / looked if looked else 0.0)
                        results.setdefault(key, []).append(res)
                        log(f"  {what:40} {res.rps:10,.0f} req/s  p50 {res.p50:6.2f} ms  p99 {res.p99:6.2f} ms")
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

    report(results, hits, rounds, seconds, args.quick)
    report_memory(rss_fresh, rss_cached, token_cache_bytes)
    report_scaling(results)
    report_revocation(results)
    log(f"\ntook {time.monotonic() - started:.0f}s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report_revocation(results) -> None:
    """What the revocation check adds to a cached request: 1/rate with the
    list minus 1/rate without, per round (the runs are back to back)."""
    plain = results[("plain", "repeated", "RS256", "phi-guard-base")]
    listed = results[("plain", "repeated", "RS256", "phi-guard-revocation")]
    added = [1e6 / b.rps - 1e6 / a.rps for a, b in zip(plain, listed)]
    log("")
    log(
        f"revocation list of {REVOKED:,} entries, one RS256 token repeated: "
        f"{_median(listed).rps:,.0f} req/s with it, {_median(plain).rps:,.0f} without; "
        f"added per request {statistics.median(added):+.2f} µs (rounds {min(added):+.2f} to {max(added):+.2f}; target <= 1 µs)"
    )


def report_scaling(results) -> None:
    """Two workers against one, equal features, one RS256 token repeated."""
    log("")
    log(
        f"two workers (Envoy --concurrency 2 and wrk -t2, all on CPUs {BOTH_CPUS}) against one"
        f" (Envoy on CPU {ENVOY_CPU}, wrk on CPU {LOAD_CPU}); equal features, one RS256 token repeated:"
    )
    for who in ("native", "phi-guard"):
        one = _median(results[("equal", "repeated", "RS256", who)])
        two = _median(results[("x2", "repeated", "RS256", who)])
        scale = two.rps / one.rps
        mark = "" if who == "native" else f"  target >= {SCALE_TARGET}x {'PASS' if scale >= SCALE_TARGET else 'BELOW'}"
        log(f"  {who:9}: {one.rps:10,.0f} -> {two.rps:10,.0f} req/s, {scale:.2f}x{mark}")


def report_memory(rss_fresh, rss_cached, token_cache_bytes) -> None:
    log("")
    for name in rss_fresh:
        fresh, cached = rss_fresh[name] / 1024, rss_cached[name] / 1024
        log(
            f"RSS {name:18}: fresh {fresh:6.1f} MiB, {TOKENS:,} RS256 tokens cached {cached:6.1f} MiB"
            f" ({cached - fresh:+.1f})"
        )
    for config, prefix in (("plain", ""), ("equal", "eq-")):
        for who in BUILDS_MEASURED:
            native = rss_cached[f"{prefix}native-RS256"] - rss_fresh[f"{prefix}native-RS256"]
            phi = rss_cached[f"{prefix}{who}-RS256"] - rss_fresh[f"{prefix}{who}-RS256"]
            total_native, total_phi = rss_cached[f"{prefix}native-RS256"], rss_cached[f"{prefix}{who}-RS256"]
            log(
                f"  {config}: with 10,000 tokens cached {who}'s Envoy holds {total_phi / 1024:.1f} MiB, native's"
                f" {total_native / 1024:.1f} MiB (target <= native's: {'PASS' if total_phi <= total_native else 'BELOW'});"
                f" the cache itself adds {phi / 1024:.1f} MiB and {native / 1024:.1f} MiB"
            )
    if token_cache_bytes:
        estimate = int(token_cache_bytes.group(1)) / 1024 / 1024
        log(f"phi-guard-RS256's own estimate (phi_guard.token_cache.bytes) at the end: {estimate:.1f} MiB")
    log(f".wasm size: {WASM.stat().st_size / 1024:.0f} KiB; module .so size: {NATIVE.stat().st_size / 1024:.0f} KiB")


def _median(runs: list[Result]) -> Result:
    """The run with the median req/s (its latencies come with it)."""
    return sorted(runs, key=lambda r: r.rps)[(len(runs) - 1) // 2]


def _rate(rates: list[float] | None) -> str:
    return f"{statistics.mean(rates):.0%}" if rates else "n/a"


def report(results, hits, rounds, seconds, quick) -> None:
    mode = "QUICK (smoke check, figures rough)" if quick else "full"
    log("")
    log(f"phi-guard vs Envoy native jwt_authn+rbac — {mode} run")
    log(
        f"Envoy --concurrency 1 on CPU {ENVOY_CPU}, wrk -t1 -c{CONNECTIONS} on CPU {LOAD_CPU}; {rounds} alternating"
        f" round(s) of {seconds:g}s, the median-req/s round shown; direct 200 answers; plaintext on every side"
        " (TLS is not what is measured)"
    )
    log(f"wasm: {WASM} ({WASM.stat().st_size:,} bytes)")

    def fmt(r: Result) -> str:
        return f"{r.rps:8,.0f} {r.p50:6.2f} {r.p99:6.2f}"

    for config, workloads, title in (
        ("equal", EQUAL_WORKLOADS, "EQUAL FEATURES (headline): access log on every side; identity headers, token removed"),
        ("plain", PLAIN_WORKLOADS, "PLAIN: no access log, no identity headers (phi-guard still seals its record)"),
    ):
        noauth = _median(results[(config, "-", "-", "noauth")])
        log("")
        log(title)
        cols = f"{'req/s':>8} {'p50':>6} {'p99':>6}"
        head = f"{'workload':9} {'alg':5} | {'no auth':^22} | {'native':^22} {'hit':>4} | {'phi-guard':^22} {'hit':>4} |"
        head += f" {'phi/native req/s (rounds)':^26} | {'p99 phi/nat':>11} | target"
        log(head)
        log(f"{'':9} {'':5} | {cols} | {cols} {'':>4} | {cols} {'':>4} | {'':^26} | {'':>11} |")
        log("-" * len(head))
        for workload in workloads:
            for alg in COLD_ALGS if workload == "cold" else ALGS:
                native_runs, phi_runs = (results[(config, workload, alg, who)] for who in ("native", "phi-guard"))
                n, p = _median(native_runs), _median(phi_runs)
                nh, ph = (
                    "off" if workload == "cold" else _rate(hits.get((config, workload, alg, who)))
                    for who in ("native", "phi-guard")
                )
                ratio = p.rps / n.rps
                # The same ratio round by round: how much the median can be trusted.
                per_round = [b.rps / a.rps for a, b in zip(native_runs, phi_runs)]
                spread = f"({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
                p99 = statistics.median([b.p99 / a.p99 for a, b in zip(native_runs, phi_runs)])
                if workload == "paced":
                    # Same load: the rates are equal by design, latency is the figure.
                    target = P99_TARGET
                    mark = f"p99 <= {target:.1f}x {'PASS' if p99 <= target else 'BELOW'}"
                else:
                    target = TARGETS.get((config, workload, alg))
                    mark = "reported" if target is None else f">= {target:.2f}x {'PASS' if ratio >= target else 'BELOW'}"
                log(
                    f"{workload:9} {alg:5} | {fmt(noauth)} | {fmt(n)} {nh:>4} | {fmt(p)} {ph:>4} |"
                    f" {ratio:5.2f}x {spread:<19} | {p99:10.2f}x | {mark}"
                )
        # The dynamic module: the same core, policy and envoy.yaml, no VM.
        log("")
        log(f"  the dynamic module (`make native`) on the same {config} configuration:")
        mhead = f"{'workload':9} {'alg':5} | {'module':^22} {'hit':>4} | {'module/native req/s (rounds)':^29} |"
        mhead += f" {'p99 mod/nat':>11} | {'module/wasm':>11} | target"
        log(mhead)
        log("-" * len(mhead))
        for workload in workloads:
            for alg in COLD_ALGS if workload == "cold" else ALGS:
                native_runs, phi_runs, mod_runs = (
                    results[(config, workload, alg, who)] for who in ("native", "phi-guard", "module")
                )
                n, p, m = _median(native_runs), _median(phi_runs), _median(mod_runs)
                mh = "off" if workload == "cold" else _rate(hits.get((config, workload, alg, "module")))
                ratio = m.rps / n.rps
                per_round = [b.rps / a.rps for a, b in zip(native_runs, mod_runs)]
                spread = f"({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
                p99 = statistics.median([b.p99 / a.p99 for a, b in zip(native_runs, mod_runs)])
                if workload == "paced":
                    mark = f"p99 <= {P99_TARGET:.1f}x {'PASS' if p99 <= P99_TARGET else 'BELOW'}"
                else:
                    target = MODULE_TARGETS.get((config, workload, alg))
                    mark = "reported" if target is None else f">= {target:.2f}x {'PASS' if ratio >= target else 'BELOW'}"
                log(
                    f"{workload:9} {alg:5} | {fmt(m)} {mh:>4} | {ratio:5.2f}x {spread:<22} | {p99:10.2f}x |"
                    f" {m.rps / p.rps:10.2f}x | {mark}"
                )
    log("")
    log("(latencies in ms; 'no auth' is one measurement per round, shown on every row; 'hit' = the side's")
    log(" verified-token cache hit rate during the measured runs, from its own stats; 'off' = no cache;")
    log(f" 'paced': each connection waits {PACE_MS} ms after every answer, so both sides carry about the same")
    log(" load and p99 is compared there; 'p99 phi/nat' is the per-round median of the p99 ratio)")


if __name__ == "__main__":
    sys.exit(main())
