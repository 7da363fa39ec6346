"""Token verification through the real Envoy with the built phi-guard .wasm,
against the contract's answers (DESIGN.md §3). Every test uses GET
/fhir/Patient/{id} (rule patient-read, scope read:patient-profile) unless it
says otherwise, so only the token decides."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from conftest import FAMILIES
from harness import (
    ENVOY_BIN,
    REPO,
    Envoy,
    KeyPair,
    Response,
    audits,
    challenge_of,
    client_tls,
    default_claims,
    eventually,
    http_request,
    mint,
    phi_guard_stats,
    shipped_policy,
    tamper,
)

PATH = "/fhir/Patient/123"


def assert_refused(resp: Response, upstream, *tokens: str) -> None:
    """A refusal never reaches the upstream and never echoes a token."""
    assert upstream.requests == [], "a refused request reached the upstream"
    for token in tokens:
        assert token not in resp.text
        for _, value in resp.headers:
            assert token not in value


def assert_invalid_token(resp: Response, upstream, *tokens: str) -> None:
    assert resp.status == 401, (resp.status, resp.text)
    www = resp.header("www-authenticate") or ""
    assert www.startswith("Bearer ") and 'error="invalid_token"' in www, www
    assert_refused(resp, upstream, *tokens)


def assert_missing_token(resp: Response, upstream) -> None:
    assert resp.status == 401, (resp.status, resp.text)
    www = resp.header("www-authenticate") or ""
    # RFC 6750 §3.1: no error code when the request carried no credentials.
    assert www.startswith("Bearer realm="), www
    assert "error=" not in www, www
    assert_refused(resp, upstream)


def jwks_settings(policy: dict, **settings) -> dict:
    policy["providers"][0]["jwks"].update(settings)
    return policy


# --------------------------------------------------------------------------
# Good tokens


@pytest.mark.parametrize("alg", FAMILIES)
def test_valid_token_of_each_family_is_forwarded_without_authorization(envoy, upstream, keys, alg):
    resp = envoy.get(PATH, token=mint(keys[alg]))
    assert resp.status == 200, (resp.status, resp.text, envoy.log_tail())
    assert len(upstream.requests) == 1
    seen = upstream.last
    assert (seen.method, seen.path) == ("GET", PATH)
    # forward_token is false: the bearer token must not travel upstream.
    assert seen.header_all("authorization") == []


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_scheme_is_case_insensitive(envoy, upstream, keys, scheme):
    token = mint(keys["ES256"])
    resp = envoy.get(PATH, headers=[("Authorization", f"{scheme} {token}")])
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header("authorization") is None


def test_public_rule_needs_no_token(envoy, upstream):
    assert envoy.get("/healthz").status == 200
    assert upstream.last.path == "/healthz"


# --------------------------------------------------------------------------
# Missing token


def test_no_token_on_protected_rule_is_401_without_error(envoy, upstream):
    assert_missing_token(envoy.get(PATH), upstream)


def test_realm_is_configurable(envoy_factory, policy, upstream):
    policy["realm"] = "fhir-demo"
    resp = envoy_factory(policy).get(PATH)
    assert_missing_token(resp, upstream)
    assert resp.header("www-authenticate").startswith('Bearer realm="fhir-demo"')


def test_token_in_query_string_is_not_accepted(envoy, upstream, keys):
    token = mint(keys["RS256"])
    resp = envoy.get(f"{PATH}?access_token={token}")
    assert_missing_token(resp, upstream)
    assert token not in resp.text


# --------------------------------------------------------------------------
# Invalid tokens: 401 invalid_token


def _forged(name: str, keys: dict) -> str:
    """Bad tokens, each wrong in exactly one way."""
    rsa, now = keys["RS256"], int(time.time())
    return {
        "expired": lambda: mint(rsa, iat=now - 900, exp=now - 600),  # well past the 60 s skew
        "not_yet_valid": lambda: mint(rsa, nbf=now + 600),
        "wrong_issuer": lambda: mint(rsa, iss="https://evil.example.org"),
        "wrong_audience": lambda: mint(rsa, aud="https://other.example.org"),
        "missing_exp": lambda: mint(rsa, exp=None),
        "lifetime_over_max": lambda: mint(rsa, exp=now + 7200),  # max_token_lifetime_seconds 3600
        "bad_signature": lambda: tamper(mint(rsa)),
        "signed_by_other_key_same_kid": lambda: mint(KeyPair.rsa(kid=rsa.kid)),
        "alg_none": lambda: mint(None, alg="none", header={"kid": rsa.kid}),
        # HMAC confusion: the RSA public key's PEM used as the HS256 secret.
        "hs256_with_rsa_public_key": lambda: mint(rsa, alg="HS256", hmac_secret=rsa.public_pem()),
        # The key, not the header, picks the algorithm (RFC 8725 §3.1).
        "alg_differs_from_key": lambda: mint(rsa, alg="PS256"),
        "unknown_kid": lambda: mint(rsa, header={"kid": "nobody-knows-me"}),
        "unknown_crit_header": lambda: mint(rsa, header={"crit": ["x-unknown"], "x-unknown": 1}),
        "id_token_typ": lambda: mint(rsa, header={"typ": "id+jwt"}),
        "malformed_two_parts": lambda: mint(rsa).rsplit(".", 1)[0],
        "malformed_not_base64": lambda: "e30.%%%%.abc",
        "malformed_payload_not_json": lambda: mint(rsa).split(".")[0] + ".bm90IGpzb24." + mint(rsa).split(".")[2],
    }[name]()


# Each forged token and the reason its audit record and counter must give (README "Audit record").
REASON_OF_CASE = {
    "expired": "expired",
    "not_yet_valid": "not_yet_valid",
    "wrong_issuer": "unknown_issuer",
    "wrong_audience": "wrong_audience",
    "missing_exp": "missing_exp",
    "lifetime_over_max": "lifetime_too_long",
    "bad_signature": "invalid_signature",
    "signed_by_other_key_same_kid": "invalid_signature",
    "alg_none": "alg_not_allowed",
    "hs256_with_rsa_public_key": "alg_not_allowed",
    "alg_differs_from_key": "alg_not_allowed",
    "unknown_kid": "unknown_key",
    "unknown_crit_header": "unsupported_crit",
    "id_token_typ": "bad_token_type",
    "malformed_two_parts": "malformed_token",
    "malformed_not_base64": "malformed_token",
    "malformed_payload_not_json": "malformed_token",
}


def assert_denied_once(envoy, reason: str, index: int = 0) -> None:
    """Request number `index` is audited as a denial for `reason`, and the
    reason's counter (README "Stats") counted it, once."""
    record = audits(envoy, index + 1)[index]
    assert record is not None and (record["decision"], record["reason"]) == ("deny", reason), record
    stats = phi_guard_stats(envoy)
    assert stats.get(f"denied.{reason}") == 1, stats
    assert stats.get("allowed", 0) == 0, stats


@pytest.mark.parametrize("case", list(REASON_OF_CASE))
def test_invalid_token_is_401_invalid_token(envoy, upstream, keys, case):
    token = _forged(case, keys)
    assert_invalid_token(envoy.get(PATH, token=token), upstream, token)
    assert_denied_once(envoy, REASON_OF_CASE[case])


def test_lifetime_is_measured_from_nbf_when_there_is_no_iat(envoy, upstream, keys):
    # README: exp minus iat (or nbf) must not exceed max_token_lifetime_seconds (3600).
    # Both tokens expire well within an hour from now: only a lifetime counted
    # from nbf can tell them apart.
    now, key = int(time.time()), keys["EdDSA"]
    assert envoy.get(PATH, token=mint(key, iat=None, nbf=now - 1000, exp=now + 2500)).status == 200
    upstream.reset()
    long_lived = mint(key, iat=None, nbf=now - 1000, exp=now + 2700)
    assert_invalid_token(envoy.get(PATH, token=long_lived), upstream, long_lived)
    record = audits(envoy, 2)[1]
    assert record["reason"] == "lifetime_too_long", record


def test_token_types_are_configurable_and_case_insensitive(envoy_factory, policy, upstream, keys):
    policy["providers"][0]["token_types"] = ["at+jwt"]
    envoy = envoy_factory(policy)
    assert envoy.get(PATH, token=mint(keys["EdDSA"], header={"typ": "AT+JWT"})).status == 200
    upstream.reset()
    plain = mint(keys["EdDSA"], header={"typ": "JWT"})
    assert_invalid_token(envoy.get(PATH, token=plain), upstream, plain)


def test_empty_token_types_leave_typ_unchecked(envoy_factory, policy, upstream, keys):
    # README: `token_types: []` = not checked. id+jwt is refused by default (see above).
    policy["providers"][0]["token_types"] = []
    envoy = envoy_factory(policy)
    for typ in ("id+jwt", None, "anything/at-all"):
        resp = envoy.get(PATH, token=mint(keys["ES256"], header={"typ": typ}))
        assert resp.status == 200, (typ, resp.status, resp.text)
    assert len(upstream.requests) == 3


# --------------------------------------------------------------------------
# Suspicious Authorization headers: refused before any verification


def assert_invalid_request(resp: Response, upstream, *tokens: str) -> None:
    """400 with `Bearer error="invalid_request"` (README, answers table)."""
    assert resp.status == 400, (resp.status, resp.text)
    scheme, params = challenge_of(resp)
    assert (scheme, params) == ("Bearer", {"error": ("invalid_request", True)}), params
    assert_refused(resp, upstream, *tokens)


def test_two_authorization_headers_are_refused(envoy, upstream, keys):
    # Both tokens are valid: ambiguity alone must be enough to refuse.
    first, second = mint(keys["RS256"]), mint(keys["ES256"])
    resp = envoy.get(PATH, headers=[("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")])
    assert_invalid_request(resp, upstream, first, second)


def test_authorization_over_8_kib_is_refused(envoy, upstream, keys):
    # Validly signed, only too big.
    token = mint(keys["ES256"], padding="x" * 9000)
    assert len(token) > 8192
    resp = envoy.get(PATH, token=token)
    assert_invalid_request(resp, upstream, token)


def _token_of_length(key: KeyPair, lengths: set[int]) -> str:
    """A valid token whose length is one of `lengths` (base64 cannot make every length)."""
    for pad in range(5000, 6500):
        token = mint(key, padding="x" * pad)
        if len(token) in lengths:
            return token
    raise AssertionError(f"no token of length {lengths}")


def test_authorization_of_exactly_8_kib_is_read_and_one_byte_more_is_not(envoy, upstream, keys):
    # README: a header *over* 8 KiB is refused. The value is "Bearer", blanks,
    # the token; the blanks make up the exact length with the same token.
    limit = 8 * 1024
    token = _token_of_length(keys["ES256"], {limit - 7, limit - 8})
    blanks = " " * (limit - len("Bearer") - len(token))
    at_limit = f"Bearer{blanks}{token}"
    assert len(at_limit) == limit
    resp = envoy.get(PATH, headers=[("Authorization", at_limit)])
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header("authorization") is None
    upstream.reset()
    over = f"Bearer {blanks}{token}"
    assert len(over) == limit + 1
    assert_invalid_request(envoy.get(PATH, headers=[("Authorization", over)]), upstream, token)
    assert [r["reason"] for r in audits(envoy, 2)] == ["ok", "invalid_request"]


# --------------------------------------------------------------------------
# JWKS: rotation, outages, garbage


def test_key_rotation_refetches_once_then_rate_limits(envoy_factory, policy, jwks_server, upstream, keys):
    # A short window instead of a huge one: the test then holds whether the
    # limit counts from the last unknown-kid refetch or from any fetch, and
    # can also see the window end.
    window = 3
    jwks_settings(policy, min_refetch_seconds=window, cache_seconds=300)
    old, new, newer = keys["ES256"], KeyPair.ec("ES256", kid="rotated-1"), KeyPair.ec("ES256", kid="rotated-2")
    jwks_server.set_keys(old)
    envoy = envoy_factory(policy)
    assert envoy.get(PATH, token=mint(old)).status == 200
    time.sleep(window + 0.5)

    jwks_server.set_keys(new)
    hits = jwks_server.hits
    assert envoy.get(PATH, token=mint(new)).status == 200
    assert jwks_server.hits == hits + 1, "an unknown kid should cause exactly one refetch"

    jwks_server.set_keys(new, newer)
    upstream.reset()
    token = mint(newer)
    assert_invalid_token(envoy.get(PATH, token=token), upstream, token)
    assert jwks_server.hits == hits + 1, "a second unknown kid within min_refetch_seconds must not refetch"

    time.sleep(window + 0.5)
    assert envoy.get(PATH, token=mint(newer)).status == 200


def test_refetch_lands_when_the_request_that_started_it_is_gone(envoy_factory, policy, jwks_server, upstream, keys):
    # The keys a request's unknown kid fetched must serve later requests even
    # when that client gave up first (its stream context is gone by then).
    jwks_settings(policy, min_refetch_seconds=30, timeout_ms=3000, cache_seconds=300)
    old, new = keys["ES256"], KeyPair.ec("ES256", kid="rotated-1")
    jwks_server.set_keys(old)
    envoy = envoy_factory(policy)
    assert envoy.get(PATH, token=mint(old)).status == 200

    jwks_server.set_keys(old, new)
    jwks_server.delay_seconds = 1
    hits = jwks_server.hits
    with pytest.raises(OSError):  # the client times out while the fetch runs
        envoy.request("GET", PATH, [("Authorization", f"Bearer {mint(new)}")], timeout=0.3)
    time.sleep(1.5)
    jwks_server.delay_seconds = 0
    assert jwks_server.hits == hits + 1
    assert envoy.get(PATH, token=mint(new)).status == 200
    assert jwks_server.hits == hits + 1, "the fetched keys were not used"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_key_added_while_a_refresh_is_answering_is_fetched_for_its_first_tokens(
    envoy_factory, policy, jwks_server, upstream, keys, workers
):
    # Found by the soak: a scheduled refresh read the IdP's keys just before a
    # key was added, and the first tokens signed with it came while that
    # refresh was still answering. Its old set must not answer their wait,
    # and a burst of them must not be refused by the refetch rate limit: a
    # fetch started after the wait began answers every one. With two workers
    # the refresh runs in one VM and some tokens reach the other.
    jwks_settings(policy, cache_seconds=2, retry_seconds=1, min_refetch_seconds=3600, timeout_ms=5000)
    old, new = keys["ES256"], KeyPair.ec("ES256", kid="added-mid-refresh")
    jwks_server.set_keys(old)
    envoy = envoy_factory(policy, concurrency=workers)
    assert envoy.get(PATH, token=mint(old)).status == 200

    jwks_server.hold(as_arrived=True)  # the next refresh reads the old set, then is slow
    assert jwks_server.wait_held(1, timeout=15)
    jwks_server.set_keys(old, new)
    hits = jwks_server.hits
    with ThreadPoolExecutor(8) as pool:
        # Each on a connection of its own, so two workers both get some.
        answers = [pool.submit(envoy.get, PATH, mint(new)) for _ in range(8)]
        time.sleep(0.5)  # every one is waiting for keys by now
        jwks_server.release()
        responses = [a.result() for a in answers]
        statuses = [r.status for r in responses]
    assert statuses == [200] * 8, [(r.status, r.text[:80]) for r in responses]
    # The old set, then one refetch per worker at most (the lease serialises them).
    assert 1 <= jwks_server.hits - hits <= 1 + workers, jwks_server.hits - hits
    records = audits(envoy, 9)
    assert [r["reason"] for r in records[1:]] == ["ok"] * 8, records


@pytest.mark.parametrize("outage", ["connection_refused", "http_503"])
def test_jwks_unavailable_at_start_is_503_then_recovers(envoy_factory, policy, jwks_server, upstream, keys, outage):
    jwks_settings(policy, timeout_ms=500, retry_seconds=1)
    if outage == "connection_refused":
        jwks_server.down()
    else:
        jwks_server.set_status(503)
    envoy = envoy_factory(policy)
    token = mint(keys["RS256"])
    resp = envoy.get(PATH, token=token)
    assert resp.status == 503, (resp.status, resp.text)
    assert_refused(resp, upstream, token)
    assert_denied_once(envoy, "keys_unavailable")
    assert phi_guard_stats(envoy)["jwks_fetch.failed"] >= 1

    if outage == "connection_refused":
        jwks_server.up()
    else:
        jwks_server.set_status(200)
    ok = eventually(lambda: envoy.get(PATH, token=token).status == 200, timeout=10)
    assert ok, f"no recovery after the JWKS came back:\n{envoy.log_tail()}"
    assert jwks_server.hits >= 1


def test_slow_jwks_is_bounded_by_timeout(envoy_factory, policy, jwks_server, upstream, keys):
    jwks_settings(policy, timeout_ms=500, retry_seconds=1)
    jwks_server.delay_seconds = 3
    envoy = envoy_factory(policy)
    token = mint(keys["PS256"])
    started = time.monotonic()
    resp = envoy.get(PATH, token=token)
    assert resp.status == 503, (resp.status, resp.text)
    assert time.monotonic() - started < 2.5, "the request waited past the fetch timeout"
    assert_refused(resp, upstream, token)
    jwks_server.delay_seconds = 0
    assert eventually(lambda: envoy.get(PATH, token=token).status == 200, timeout=10)


GARBAGE = {
    "not_json": b"<html><body>502 Bad Gateway</body></html>",
    "truncated_json": b'{"keys": [{"kty": "RSA", ',
    "no_keys_member": {"issuer": "https://idp.example.org"},
    "keys_not_a_list": {"keys": "nope"},
    "empty_key_set": {"keys": []},
    "rsa_key_bad_modulus": {"keys": [{"kty": "RSA", "kid": "test-rs256", "alg": "RS256", "n": "%%%", "e": "AQAB"}]},
    # A symmetric key under the token's kid must never become a verifier.
    "symmetric_key": {"keys": [{"kty": "oct", "kid": "test-rs256", "alg": "HS256", "k": "c2VjcmV0"}]},
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbage_jwks_is_503_and_envoy_keeps_serving(envoy_factory, policy, jwks_server, upstream, keys, garbage):
    jwks_settings(policy, timeout_ms=1000, retry_seconds=1, min_refetch_seconds=1)
    jwks_server.set_document(GARBAGE[garbage])
    envoy = envoy_factory(policy)
    token = mint(keys["RS256"])
    resp = envoy.get(PATH, token=token)
    assert resp.status == 503, (resp.status, resp.text)
    assert_refused(resp, upstream, token)
    assert envoy.alive and envoy.admin("/ready").text.strip() == "LIVE"

    jwks_server.set_keys(*keys.values())
    assert eventually(lambda: envoy.get(PATH, token=token).status == 200, timeout=10), envoy.log_tail()


# --------------------------------------------------------------------------
# Configuration errors stop the plugin


@pytest.mark.parametrize(
    "mutate, field",
    [
        pytest.param(lambda p: p.update(bogus_option=True), "bogus_option", id="unknown_top_level_field"),
        pytest.param(
            lambda p: p["providers"][0].update(algorithms=["RS256", "RS999"]), "providers[0].algorithms", id="unknown_alg"
        ),
        pytest.param(lambda p: p["providers"][0].update(algorithms=["HS256"]), "providers[0].algorithms", id="hmac_alg"),
        pytest.param(
            lambda p: p["providers"][0]["jwks"].update(refresh_s=5), "providers[0].jwks.refresh_s", id="unknown_jwks_field"
        ),
        pytest.param(
            lambda p: p["providers"][0]["jwks"].update(timeout_ms="2000"), "providers[0].jwks.timeout_ms", id="wrong_type"
        ),
        pytest.param(lambda p: p["rules"][1].update(scope=["read:patient-profile"]), "rules[1].scope", id="unknown_rule_field"),
        pytest.param(lambda p: p.update(providers=[]), "providers", id="no_providers"),
    ],
)
def test_invalid_config_fails_plugin_start(envoy_factory, policy, mutate, field):
    mutate(policy)
    log = envoy_factory(policy, start=False).expect_start_failure()
    # README: Envoy logs `invalid configuration at `<field>`: <problem>`.
    assert f"invalid configuration at `{field}`: " in log, log[-3000:]


def test_config_that_is_not_json_fails_plugin_start(envoy_factory):
    log = envoy_factory('{"providers": [', start=False).expect_start_failure()
    assert "phi_guard" in log


def test_envoy_validate_mode_checks_the_policy(envoy_factory, policy):
    """`envoy --mode validate` loads the plugin, so CI can check a config change
    (README, Deploying): the shipped config passes, a broken policy fails naming the field."""

    def validate(envoy):
        argv = [str(ENVOY_BIN), "--mode", "validate", "-c", str(envoy.config_path), "--use-dynamic-base-id"]
        return subprocess.run(argv, cwd=REPO, env=Envoy.env(), capture_output=True, text=True, timeout=120)

    good = validate(envoy_factory(policy, start=False))
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    policy["rules"][1]["methods"] = ["get"]
    bad = validate(envoy_factory(policy, start=False))
    assert bad.returncode != 0
    assert "methods" in bad.stdout + bad.stderr and '"get"' in bad.stdout + bad.stderr, bad.stderr[-2000:]


def test_istio_plugin_config_is_a_valid_policy(envoy_factory, upstream):
    """envoy/istio/wasmplugin.yaml's pluginConfig reaches the plugin as this JSON:
    it must load (its JWKS cluster exists only in a mesh, so only public rules answer)."""
    plugin = yaml.safe_load((REPO / "envoy" / "istio" / "wasmplugin.yaml").read_text())
    envoy = envoy_factory(plugin["spec"]["pluginConfig"])
    assert envoy.get("/healthz").status == 200
    assert envoy.get("/fhir/Patient/1").status == 401


# --------------------------------------------------------------------------
# HTTP/2 (the shipped listener speaks both; h2c with prior knowledge here)


def h2_get(port: int, path: str, *headers: str) -> int:
    """One HTTP/2 request through nghttp (Debian's nghttp2-client) over TLS
    (h2 by ALPN; nghttp does not check the certificate); the status."""
    if not shutil.which("nghttp"):
        pytest.fail("nghttp is missing: apt-get install nghttp2-client (.ci/run does)")
    argv = ["nghttp", "-v", "-t", "10", f"https://127.0.0.1:{port}{path}"]
    for header in headers:
        argv += ["-H", header]
    out = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=30).stdout
    statuses = [line.rsplit(" ", 1)[-1] for line in out.splitlines() if "recv (stream_id=" in line and ":status:" in line]
    assert statuses, out[-2000:]
    return int(statuses[-1])


def test_http2_requests_are_decided_alike(envoy, upstream, keys):
    token = mint(keys["ES256"])
    bearer = f"authorization: Bearer {token}"
    assert h2_get(envoy.port, PATH, bearer, "x-phi-subject: admin") == 200
    seen = upstream.last
    assert seen.header("authorization") is None
    assert seen.header_all("x-phi-subject") == ["user-4711"]
    assert h2_get(envoy.port, PATH) == 401
    assert h2_get(envoy.port, PATH, bearer, bearer) == 400
    assert h2_get(envoy.port, "/fhir/Patient/1/_history", bearer) == 403
    assert len(upstream.requests) == 1


# --------------------------------------------------------------------------
# Bytes that are not UTF-8 (HTTP allows obs-text in header values)


def raw_get(port: int, target: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """One HTTP/1.1 request written byte for byte over TLS; returns the status code."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with client_tls().wrap_socket(sock, server_hostname="127.0.0.1") as s:
        lines = [b"GET " + target + b" HTTP/1.1", b"Host: fhir.example.org", b"Connection: close"]
        lines += [name + b": " + value for name, value in headers]
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def test_header_bytes_that_are_not_utf8_are_passed_on_and_the_filter_keeps_serving(envoy, upstream, keys):
    token = mint(keys["RS256"]).encode()
    # A Latin-1 value once aborted the VM (the SDK's String API panics): every
    # later request was then 503.
    auth = (b"Authorization", b"Bearer " + token)
    assert raw_get(envoy.port, PATH.encode(), [(b"X-Note", b"caf\xe9"), auth]) == 200
    assert upstream.last.header("x-note") == "caf\xe9"  # read as Latin-1 upstream too
    assert upstream.last.header("authorization") is None
    assert upstream.last.header("x-phi-subject") == "user-4711"
    # In the token itself it is an invalid token, and a spoofed identity
    # header with such bytes is still removed.
    assert raw_get(envoy.port, PATH.encode(), [(b"Authorization", b"Bearer " + token[:-3] + b"\xff\xfe")]) == 401
    spoof = (b"X-Phi-Subject", b"adm\xefn")
    assert raw_get(envoy.port, PATH.encode(), [spoof, auth]) == 200
    assert upstream.last.header_all("x-phi-subject") == ["user-4711"]
    assert envoy.get(PATH, token=token.decode()).status == 200
    assert "panicked" not in envoy.log_text()


def test_path_bytes_that_are_not_utf8_are_refused(envoy, upstream, keys):
    token = mint(keys["RS256"]).encode()
    before = len(upstream.requests)
    status = raw_get(envoy.port, b"/fhir/Patient/caf\xe9", [(b"Authorization", b"Bearer " + token)])
    # Refused by Envoy's codec or by phi-guard's path check; never forwarded.
    assert status == 400, status
    assert len(upstream.requests) == before
    assert envoy.get(PATH, token=token.decode()).status == 200
    assert "panicked" not in envoy.log_text()


# --------------------------------------------------------------------------
# Logs never carry the token


def test_logs_carry_audit_but_never_the_token(envoy, upstream, keys):
    good, bad = mint(keys["RS256"]), tamper(mint(keys["ES384"]))
    assert envoy.get(PATH + "?q=secret", token=good).status == 200
    assert envoy.get(PATH, token=bad).status == 401
    assert envoy.get(PATH).status == 401
    records = envoy.access_log(at_least=3)
    assert len(records) == 3
    for record in records:
        assert record["audit"] not in ("", "-", None), record
        json.loads(record["audit"])  # one JSON document per request
    for text in (envoy.access_log_path.read_text(), envoy.log_text()):
        assert good not in text and bad not in text
        # Nor any single part of them (a payload alone is as telling).
        for part in good.split(".") + bad.split("."):
            assert part not in text
        assert "q=secret" not in envoy.access_log_path.read_text()


def test_default_claims_are_what_the_shipped_policy_expects():
    # Guards the tests above: the harness's "good" claims must be good for the
    # policy in envoy/envoy.yaml, read from there (not the harness's own constants).
    policy = shipped_policy()
    (provider,) = policy["providers"]
    (rule,) = [r for r in policy["rules"] if r["id"] == "patient-read"]
    claims = default_claims()
    assert claims["iss"] == provider["issuer"]
    assert claims["aud"] in provider["audiences"]
    assert set(rule["scopes"]) <= set(claims["scope"].split(" "))
    assert claims["exp"] - claims["iat"] <= policy["max_token_lifetime_seconds"]
    assert rule["path"] == "/fhir/Patient/{id}" and "GET" in rule["methods"], "PATH above must land on this rule"
