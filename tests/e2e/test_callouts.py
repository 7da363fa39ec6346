"""Callouts that go wrong (issue #12): the VM must live through every answer.

Every callout phi-guard makes is covered: a provider's JWKS and the
revocation list (both through host/fetcher.rs), and introspection queries
(host/introspect.rs), which a request waits for: there a bad answer is 503
`introspection_unavailable` on the introspect rule only.

A JWKS endpoint that answers 50 MB, nothing, half a body, a reset, an HTML
page, a redirect or one byte a second, or that flaps up and down, must
never take the filter down. Each case is checked at start (no keys yet:
protected rules 503, public rules 200, recovery once the endpoint behaves)
and on a refresh (the last good keys keep serving). `jwks_fetch.failed`
rising proves the bad answer really reached the filter.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from harness import Envoy, MisbehavingJwks, eventually, mint, shipped_policy

PROTECTED = "/fhir/Patient/7"
PUBLIC = "/healthz"


@pytest.fixture
def idp(keys):
    with MisbehavingJwks(*keys.values()) as server:
        yield server


def make_envoy(tmp_path, upstream, idp, keys, **jwks) -> Envoy:
    policy = Envoy.point_jwks(shipped_policy(), idp.port)
    policy["providers"][0]["algorithms"] = list(keys)
    policy["providers"][0]["jwks"].update({"timeout_ms": 1000, "retry_seconds": 1, **jwks})
    envoy = Envoy(tmp_path / "envoy", upstream.port, idp.port, policy)
    return envoy.start()


def failed_fetches(envoy: Envoy) -> int:
    return envoy.phi_stats().get("jwks_fetch.failed", 0)


def assert_vm_alive(envoy: Envoy) -> None:
    """Public rule served, nothing aborted in the VM."""
    resp = envoy.get(PUBLIC)
    assert resp.status == 200, (resp.status, resp.text, envoy.log_tail())
    log = envoy.log_text()
    for sign in ("panicked", "unexpected status", "Uncaught RuntimeError", "wasm_fail_stream"):
        assert sign not in log, f"{sign!r} in Envoy's log:\n{envoy.log_tail()}"


@pytest.fixture
def stopped(request):
    """Envoys to stop at teardown, pass or fail."""
    made: list[Envoy] = []
    yield made
    for envoy in made:
        envoy.stop()


@pytest.mark.parametrize("mode", MisbehavingJwks.MODES)
def test_bad_answer_at_start_is_503_and_the_vm_lives(tmp_path, upstream, idp, keys, stopped, mode):
    idp.mode = mode
    envoy = make_envoy(tmp_path, upstream, idp, keys)
    stopped.append(envoy)
    token = mint(keys["RS256"])
    resp = envoy.get(PROTECTED, token=token)
    assert resp.status == 503, (resp.status, resp.text)
    assert upstream.requests == []
    assert eventually(lambda: failed_fetches(envoy) >= 1, timeout=15), envoy.phi_stats()
    assert_vm_alive(envoy)
    if mode == "redirect":
        assert idp.hits_on("/moved") == 0, "the redirect was followed"

    idp.mode = "ok"
    assert eventually(lambda: envoy.get(PROTECTED, token=token).status == 200, timeout=15), envoy.log_tail()
    assert_vm_alive(envoy)


@pytest.mark.parametrize("mode", MisbehavingJwks.MODES)
def test_bad_answer_on_refresh_keeps_the_last_good_keys(tmp_path, upstream, idp, keys, stopped, mode):
    envoy = make_envoy(tmp_path, upstream, idp, keys, cache_seconds=1)
    stopped.append(envoy)
    token = mint(keys["ES256"])
    assert eventually(lambda: envoy.get(PROTECTED, token=token).status == 200, timeout=10), envoy.log_tail()

    before = failed_fetches(envoy)
    idp.mode = mode
    # Two failed refreshes: the filter went on fetching after the first.
    assert eventually(lambda: failed_fetches(envoy) >= before + 2, timeout=20), envoy.phi_stats()
    # A fresh token, so the verified-token cache does not answer for the keys.
    resp = envoy.get(PROTECTED, token=mint(keys["ES256"]))
    assert resp.status == 200, (resp.status, resp.text, envoy.log_tail())
    assert_vm_alive(envoy)


def test_flapping_endpoint_never_takes_the_filter_down(tmp_path, upstream, idp, keys, stopped):
    idp.down()
    envoy = make_envoy(tmp_path, upstream, idp, keys, cache_seconds=1)
    stopped.append(envoy)
    stop = threading.Event()

    def flap():
        while not stop.is_set():
            idp.up()
            time.sleep(0.3)
            idp.down()
            time.sleep(0.3)

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    try:
        seen = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            seen.append(envoy.get(PROTECTED, token=mint(keys["RS256"])).status)
            assert envoy.get(PUBLIC).status == 200
            time.sleep(0.05)
    finally:
        stop.set()
        flapper.join(timeout=5)
    idp.up()
    # Before the first good fetch: 503; after it, the keys serve through every outage.
    assert 200 in seen, f"never recovered while flapping:\n{envoy.log_tail()}"
    first = seen.index(200)
    assert set(seen[:first]) <= {503} and set(seen[first:]) == {200}, seen
    assert eventually(lambda: envoy.get(PROTECTED, token=mint(keys["RS256"])).status == 200, timeout=10)
    assert failed_fetches(envoy) >= 1 and envoy.phi_stats().get("jwks_fetch.ok", 0) >= 1, envoy.phi_stats()
    assert_vm_alive(envoy)


# --------------------------------------------------------------------------
# The revocation list is fetched by the same machinery; it must fail alike.

SENSITIVE = "/labs/7"


@pytest.fixture
def list_server(keys):
    with MisbehavingJwks() as server:
        server.document = json.dumps({"jti": ["jti-revoked"]}).encode()
        yield server


@pytest.mark.parametrize("mode", MisbehavingJwks.MODES)
def test_bad_revocation_answer_keeps_the_vm_and_the_last_list(tmp_path, upstream, idp, list_server, keys, stopped, mode):
    policy = Envoy.point_jwks(shipped_policy(), idp.port)
    policy["providers"][0]["algorithms"] = list(keys)
    policy["revocation"] = {
        "uri": f"http://127.0.0.1:{list_server.port}/revoked.json",
        "cluster": "revocation",
        "refresh_seconds": 1,
        "timeout_ms": 1000,
        "max_stale_seconds": 3600,
    }
    policy["rules"].append({"id": "lab-read", "methods": ["GET"], "path": "/labs/{id}",
                            "scopes": ["read:patient-profile"], "sensitive": True})
    # At start: no list ever, so sensitive rules are closed and others serve.
    list_server.mode = mode
    envoy = Envoy(tmp_path / "envoy", upstream.port, idp.port, policy, clusters={"revocation": list_server.port})
    stopped.append(envoy.start())
    revoked, fine = mint(keys["RS256"], jti="jti-revoked"), mint(keys["RS256"])
    assert envoy.get(SENSITIVE, token=fine).status == 503
    assert envoy.get(PROTECTED, token=fine).status == 200
    assert eventually(lambda: envoy.phi_stats().get("revocation_fetch.failed", 0) >= 1, timeout=15)
    assert_vm_alive(envoy)

    # Once a list arrives it is in force; a bad refresh keeps it.
    list_server.mode = "ok"
    assert eventually(lambda: envoy.get(PROTECTED, token=revoked).status == 401, timeout=15), envoy.log_tail()
    before = envoy.phi_stats().get("revocation_fetch.failed", 0)
    list_server.mode = mode
    assert eventually(lambda: envoy.phi_stats().get("revocation_fetch.failed", 0) >= before + 2, timeout=20)
    assert envoy.get(PROTECTED, token=revoked).status == 401
    assert envoy.get(SENSITIVE, token=fine).status == 200
    assert_vm_alive(envoy)


# --------------------------------------------------------------------------
# Introspection queries: POSTed while the request waits; a bad answer is 503
# on the introspect rule, and nothing else is harmed.

INTROSPECTED = "/labs/7"
SECRET_ENV = "PHI_GUARD_TEST_INTROSPECTION_SECRET"


@pytest.fixture
def authz():
    with MisbehavingJwks() as server:
        server.set_document({"active": True})
        yield server


@pytest.fixture
def introspecting(envoy_factory, policy, authz, monkeypatch):
    """Envoy whose /labs/{id} rule introspects at `authz` (JWKS served well)."""
    monkeypatch.setenv(SECRET_ENV, "callout-test-secret")
    policy["providers"][0]["introspection"] = {
        "uri": f"http://127.0.0.1:{authz.port}/introspect",
        "cluster": "introspection",
        "client_id": "phi-guard",
        "client_secret_env": SECRET_ENV,
        "timeout_ms": 1000,
        "cache_seconds": 1,
    }
    policy["rules"].append({"id": "lab-read", "methods": ["GET"], "path": "/labs/{id}",
                            "scopes": ["read:patient-profile"], "introspect": True})

    def make() -> Envoy:
        return envoy_factory(policy, clusters={"introspection": authz.port}, host_env_keys=[SECRET_ENV])

    return make


def introspect_reason(envoy: Envoy, token: str) -> tuple[int, str | None]:
    rid = uuid.uuid4().hex
    status = envoy.get(INTROSPECTED, token=token, headers={"x-request-id": rid}).status

    def reason():
        for r in envoy.access_log():
            if r.get("request_id") == rid and r.get("audit") not in (None, "", "-"):
                return json.loads(r["audit"])["reason"]
        return None

    return status, eventually(reason, timeout=10)


@pytest.mark.parametrize("mode", MisbehavingJwks.MODES)
def test_bad_introspection_answer_is_503_and_the_vm_lives(introspecting, authz, keys, upstream, mode):
    envoy = introspecting()
    authz.mode = mode
    token = mint(keys["RS256"])
    assert introspect_reason(envoy, token) == (503, "introspection_unavailable"), envoy.log_tail()
    assert authz.hits_on("/introspect") >= 1, "the query never reached the endpoint"
    assert eventually(lambda: envoy.phi_stats().get("introspection.failed", 0) >= 1, timeout=10), envoy.phi_stats()
    assert_vm_alive(envoy)
    assert envoy.get(PROTECTED, token=token).status == 200, "rules without introspect go on"
    assert INTROSPECTED not in [r.path for r in upstream.requests], "allowed without an answer"
    if mode == "redirect":
        assert authz.hits_on("/moved") == 0, "the redirect was followed"

    authz.mode = "ok"
    assert eventually(lambda: envoy.get(INTROSPECTED, token=token).status == 200, timeout=15), envoy.log_tail()
    assert envoy.phi_stats().get("introspection.active", 0) >= 1
    assert_vm_alive(envoy)


def test_flapping_introspection_endpoint_never_allows_without_an_answer(introspecting, authz, keys):
    authz.down()
    envoy = introspecting()
    stop = threading.Event()

    def flap():
        while not stop.is_set():
            authz.up()
            time.sleep(0.3)
            authz.down()
            time.sleep(0.3)

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    try:
        seen = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            # A fresh token each time: every request needs its own answer.
            seen.append(envoy.get(INTROSPECTED, token=mint(keys["RS256"])).status)
            assert envoy.get(PUBLIC).status == 200
            time.sleep(0.05)
    finally:
        stop.set()
        flapper.join(timeout=5)
    authz.up()
    assert set(seen) <= {200, 503}, seen
    assert 200 in seen and 503 in seen, seen
    assert eventually(lambda: envoy.get(INTROSPECTED, token=mint(keys["RS256"])).status == 200, timeout=10)
    stats = envoy.phi_stats()
    assert stats.get("introspection.failed", 0) >= 1 and stats.get("introspection.active", 0) >= 1, stats
    assert_vm_alive(envoy)
