"""Token introspection (RFC 7662, issue #13), in the real Envoy.

On an `introspect` rule a JWT that passed every other check is POSTed to the
provider's introspection endpoint (form body, HTTP Basic client credentials
encoded as RFC 6749 §2.3.1 says) while the request waits; `"active": false`
is 401 `invalid_token` (reason `inactive`). Answers are kept `cache_seconds`,
never past the answer's `exp`. An opaque token is accepted on introspect
rules only, known by the answer alone (identity headers from it). An answer
whose `aud` or `exp` does not fit is refused like a JWT's. No usable answer
(down, slow, not 200, garbage) is 503 `introspection_unavailable`, never an
allow. The client secret comes from the VM's environment; unset, the plugin
does not start. The introspection server here records every request.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid

import pytest

from harness import AUDIENCE, ISSUER, IntrospectionServer, eventually, mint, tamper

LABS = "/labs/7"  # the introspect rule
PATIENT = "/fhir/Patient/7"  # an ordinary rule
SECRET_ENV = "PHI_GUARD_TEST_INTROSPECTION_SECRET"
CLIENT_ID = "phi-guard gw"
# Reserved characters: `:` would move the split of user:password, `%` would be
# read as an escape, unless each part is form-urlencoded before base64.
SECRET = "s3:cr%t+/=\u00fc"


@pytest.fixture
def authz():
    with IntrospectionServer() as server:
        yield server


@pytest.fixture
def start(envoy_factory, policy, authz, monkeypatch):
    """make(**introspection overrides) -> Envoy with an introspect rule on /labs/{id}."""
    monkeypatch.setenv(SECRET_ENV, SECRET)  # Envoy inherits the test's environment

    def make(**overrides):
        policy["providers"][0]["introspection"] = {
            "uri": f"http://127.0.0.1:{authz.port}/oauth2/introspect",
            "cluster": "introspection",
            "client_id": CLIENT_ID,
            "client_secret_env": SECRET_ENV,
            "timeout_ms": 1000,
            "cache_seconds": 2,
            **overrides,
        }
        policy["rules"].append(
            {"id": "lab-read", "methods": ["GET"], "path": "/labs/{id}",
             "scopes": ["read:patient-profile"], "introspect": True}
        )
        return envoy_factory(policy, clusters={"introspection": authz.port}, host_env_keys=[SECRET_ENV])

    return make


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def record(envoy, rid: str) -> dict | None:
    for r in envoy.access_log():
        if r.get("request_id") == rid and r.get("audit") not in (None, "", "-"):
            return json.loads(r["audit"])
    return None


def ask(envoy, path: str, token: str) -> tuple[int, dict]:
    """Status and audit record of one request."""
    rid = uuid.uuid4().hex
    resp = envoy.get(path, token=token, headers={"x-request-id": rid})
    audit = eventually(lambda: record(envoy, rid), timeout=10)
    assert audit, f"no audit record for {rid}:\n{envoy.log_tail()}"
    return resp.status, audit


def assert_refused(envoy, path: str, token: str, status: int, reason: str) -> dict:
    rid = uuid.uuid4().hex
    resp = envoy.get(path, token=token, headers={"x-request-id": rid})
    assert resp.status == status, (reason, resp.status, resp.text, envoy.log_tail())
    if status == 401:
        assert resp.header("www-authenticate") == 'Bearer error="invalid_token"', resp.headers
    audit = eventually(lambda: record(envoy, rid), timeout=10)
    assert audit and audit["reason"] == reason, (reason, audit)
    return audit


def active(**claims) -> dict:
    return {"active": True, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300, **claims}


def test_an_active_jwt_is_allowed_after_an_rfc7662_request(start, authz, upstream, keys):
    envoy = start()
    token = mint(keys["RS256"])
    authz.answer(token, active())
    status, audit = ask(envoy, LABS, token)
    assert status == 200, (audit, envoy.log_tail())
    assert audit["reason"] == "ok" and audit["sub"] == "user-4711", audit
    assert len(upstream.requests) == 1 and upstream.last.header("authorization") is None

    (seen,) = authz.requests
    assert (seen.method, seen.path) == ("POST", "/oauth2/introspect")
    assert seen.content_type == "application/x-www-form-urlencoded"
    assert seen.content_length == str(len(seen.body)), (seen.content_length, seen.body)
    assert seen.form == {"token": [token], "token_type_hint": ["access_token"]}, seen.form
    # RFC 6749 §2.3.1: each part form-urlencoded (UTF-8, space as +), then base64.
    assert seen.basic_raw == ("phi-guard+gw", "s3%3Acr%25t%2B%2F%3D%C3%BC"), seen.basic_raw
    assert seen.client == (CLIENT_ID, SECRET)
    # Neither the secret nor the token is logged.
    for text in (envoy.log_text(), envoy.access_log_path.read_text()):
        assert SECRET not in text and token not in text
    stats = envoy.phi_stats()
    assert stats.get("introspection.active") == 1 and stats.get("introspection_cache.miss") == 1, stats


def test_an_inactive_jwt_is_401_inactive(start, authz, upstream, keys):
    envoy = start()
    token = mint(keys["ES256"])
    authz.answer(token, {"active": False})
    audit = assert_refused(envoy, LABS, token, 401, "inactive")
    assert audit["sub"] == "user-4711" and audit["token_fp"] == fingerprint(token), audit
    assert upstream.requests == []
    # Rules without introspect do not ask.
    assert envoy.get(PATIENT, token=token).status == 200
    assert authz.asked_about(token) == 1
    # A JWT that fails its own checks is never sent to the authorization server.
    forged = tamper(mint(keys["ES256"]))
    assert_refused(envoy, LABS, forged, 401, "invalid_signature")
    assert authz.asked_about(forged) == 0 and authz.count == 1
    stats = envoy.phi_stats()
    assert stats.get("introspection.inactive") == 1 and stats.get("denied.inactive") == 1, stats


def test_answers_are_kept_cache_seconds(start, authz, keys):
    envoy = start(cache_seconds=3)
    good, bad = mint(keys["RS256"]), mint(keys["RS256"])
    authz.answer(good, active())
    authz.answer(bad, {"active": False})
    assert envoy.get(LABS, token=good).status == 200
    first = time.monotonic()
    assert envoy.get(LABS, token=bad).status == 401
    # Across a second boundary at least: both answers are kept, the inactive one too.
    again = 0
    while time.monotonic() - first < 1.5:
        assert envoy.get(LABS, token=good).status == 200
        assert envoy.get(LABS, token=bad).status == 401
        again += 1
        time.sleep(0.1)
    assert (authz.asked_about(good), authz.asked_about(bad)) == (1, 1), "inactive answers are kept too"
    stats = envoy.phi_stats()
    assert (stats.get("introspection_cache.hit"), stats.get("introspection_cache.miss")) == (2 * again, 2), stats

    # After cache_seconds the server is asked again (and its new word counts).
    authz.answer(good, {"active": False})
    assert eventually(lambda: envoy.get(LABS, token=good).status == 401, timeout=8), envoy.log_tail()
    took = time.monotonic() - first
    assert authz.asked_about(good) == 2
    # Whole seconds: kept more than cache_seconds - 1, and not much past cache_seconds.
    assert 2 <= took <= 3 + 3, took


def test_an_active_answer_is_never_kept_past_its_exp(start, authz, keys):
    envoy = start(cache_seconds=60)
    token = mint(keys["RS256"])
    authz.answer(token, active(exp=int(time.time()) + 2))
    assert envoy.get(LABS, token=token).status == 200
    started = time.monotonic()
    authz.answer(token, {"active": False})
    assert envoy.get(LABS, token=token).status == 200, "kept before exp"
    assert eventually(lambda: envoy.get(LABS, token=token).status == 401, timeout=15), envoy.log_tail()
    assert time.monotonic() - started < 10, "kept past exp"
    assert authz.asked_about(token) == 2


def test_an_opaque_token_is_known_by_its_answer(start, authz, upstream, policy):
    policy["claims_to_headers"]["jti"] = "x-phi-jti"
    envoy = start()
    opaque = "2YotnFZFEjr1zCsicMWpAA-" + uuid.uuid4().hex
    authz.answer(opaque, active(sub="nurse-7", client_id="ward-app", jti="op-1",
                                scope="read:patient-profile write:all"))
    status, audit = ask(envoy, LABS, opaque)
    assert status == 200, (audit, envoy.log_tail())
    headers = upstream.last
    assert headers.header("x-phi-subject") == "nurse-7"
    assert headers.header("x-phi-client-id") == "ward-app"
    assert headers.header("x-phi-jti") == "op-1"
    assert headers.header("x-phi-scopes") == "read:patient-profile", "wildcards grant nothing"
    assert headers.header("x-phi-rule") == "lab-read"
    assert headers.header("authorization") is None
    assert (audit["iss"], audit["sub"], audit["client_id"]) == (ISSUER, "nurse-7", "ward-app"), audit
    assert audit["token_fp"] == fingerprint(opaque)
    assert authz.requests[-1].form == {"token": [opaque], "token_type_hint": ["access_token"]}

    inactive = "opaque-inactive-" + uuid.uuid4().hex
    authz.answer(inactive, {"active": False})
    assert_refused(envoy, LABS, inactive, 401, "inactive")
    narrow = "opaque-narrow-" + uuid.uuid4().hex
    authz.answer(narrow, active(scope="read:other"))
    assert envoy.get(LABS, token=narrow).status == 403
    # Anywhere but an introspect rule an opaque token is malformed, and nobody is asked.
    asked = authz.count
    assert_refused(envoy, PATIENT, opaque, 401, "malformed_token")
    assert authz.count == asked
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("kind", ["jwt", "opaque"])
def test_an_answer_for_another_audience_or_expired_is_refused(start, authz, upstream, keys, kind):
    envoy = start()
    now = int(time.time())
    cases = [
        (active(aud=["https://other.example.org"]), "wrong_audience"),
        (active(exp=now - 3600), "expired"),
        (active(iss="https://elsewhere.example.org"), "unknown_issuer"),
    ]
    for answer, reason in cases:
        token = mint(keys["RS256"]) if kind == "jwt" else f"opaque-{uuid.uuid4().hex}"
        authz.answer(token, answer)
        assert_refused(envoy, LABS, token, 401, reason)
        # Kept like any other answer.
        assert_refused(envoy, LABS, token, 401, reason)
        assert authz.asked_about(token) == 1
    assert upstream.requests == []


def test_no_usable_answer_is_503_never_an_allow(start, authz, upstream, keys):
    envoy = start(timeout_ms=800)

    def down():
        authz.down()

    def slow():
        authz.delay_seconds = 2

    def not_200():
        authz.status = 500

    def redirect():
        authz.status = 302

    def garbage():
        authz.raw = b"<html><body>502 Bad Gateway</body></html>"

    def not_a_boolean():
        authz.raw = b'{"active": "true"}'

    def restore():
        authz.up()
        authz.delay_seconds, authz.status, authz.raw = 0, 200, None

    failed = 0
    for breaks in (down, slow, not_200, redirect, garbage, not_a_boolean):
        token = mint(keys["ES256"])
        authz.answer(token, active())
        breaks()
        started = time.monotonic()
        audit = assert_refused(envoy, LABS, token, 503, "introspection_unavailable")
        assert time.monotonic() - started < 5, breaks.__name__
        assert audit["sub"] == "user-4711", audit
        assert envoy.get("/healthz").status == 200
        assert envoy.get(PATIENT, token=token).status == 200, "other rules go on"
        assert eventually(lambda: envoy.phi_stats().get("introspection.failed", 0) > failed, timeout=5)
        failed = envoy.phi_stats()["introspection.failed"]
        restore()
        # Nothing was kept: once the server answers, the same token is allowed.
        assert eventually(lambda: envoy.get(LABS, token=token).status == 200, timeout=5), breaks.__name__
    # The introspect rule reached the upstream only once the server answered.
    assert sum(r.path == LABS for r in upstream.requests) == 6
    # Logged once each time it starts failing, with the cause.
    log = envoy.log_text()
    assert log.count("introspection failed") == 6, envoy.log_tail()
    assert "HTTP 500" in log and "not an introspection response" in log


def test_concurrent_requests_with_one_token_share_one_callout(start, authz, keys):
    envoy = start()
    token = mint(keys["EdDSA"])
    authz.answer(token, active())
    authz.delay_seconds = 0.5
    statuses: list[int] = []
    lock = threading.Lock()

    def one():
        status = envoy.get(LABS, token=token).status
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert statuses == [200] * 4, statuses
    assert authz.asked_about(token) == 1


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_a_missing_client_secret_stops_the_plugin(envoy_factory, policy, authz, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(SECRET_ENV, raising=False)
    else:
        monkeypatch.setenv(SECRET_ENV, value)
    policy["providers"][0]["introspection"] = {
        "uri": f"http://127.0.0.1:{authz.port}/oauth2/introspect",
        "cluster": "introspection",
        "client_id": CLIENT_ID,
        "client_secret_env": SECRET_ENV,
    }
    envoy = envoy_factory(policy, start=False, clusters={"introspection": authz.port}, host_env_keys=[SECRET_ENV])
    log = envoy.expect_start_failure()
    assert "invalid configuration at `providers[0].introspection.client_secret_env`" in log, log[-3000:]
    assert SECRET_ENV in log
