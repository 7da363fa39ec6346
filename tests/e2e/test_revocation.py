"""The revocation list (issue #13), in the real Envoy.

A list server the test changes while Envoy runs: a token is refused (401
`invalid_token`, reason `revoked`) within `refresh_seconds` + 1 s of its
`jti`, `sub` or `client_id` being listed, or its `iat` falling before a
`revoked_before` time, on every worker, cached tokens included. A list
refused as a whole (too large, too many entries, garbage) leaves the
previous one in force; a list server down past `max_stale_seconds` closes
sensitive rules (503) while the others go on with the last list.
"""

from __future__ import annotations

import json
import time

import pytest

from harness import JwksServer, eventually, mint

PATH = "/fhir/Patient/7"
SENSITIVE = "/labs/7"
REFRESH = 2


@pytest.fixture
def lists():
    with JwksServer() as server:
        server.set_document({})
        yield server


@pytest.fixture
def rev_policy(policy, lists):
    policy["revocation"] = {
        "uri": f"http://127.0.0.1:{lists.port}/revoked.json",
        "cluster": "revocation",
        "refresh_seconds": REFRESH,
        "timeout_ms": 500,
        "max_stale_seconds": 3,
    }
    policy["rules"].append(
        {"id": "lab-read", "methods": ["GET"], "path": "/labs/{id}",
         "scopes": ["read:patient-profile"], "sensitive": True}
    )
    return policy


@pytest.fixture
def start(envoy_factory, rev_policy, lists):
    def make(concurrency: int = 1, **overrides):
        rev_policy["revocation"].update(overrides)
        return envoy_factory(rev_policy, clusters={"revocation": lists.port}, concurrency=concurrency)

    return make


def reason_of(envoy, request_id: str) -> str | None:
    for r in envoy.access_log():
        if r.get("request_id") == request_id and r.get("audit") not in (None, "", "-"):
            return json.loads(r["audit"])["reason"]
    return None


def get(envoy, path, token, rid=None):
    headers = {"x-request-id": rid} if rid else None
    return envoy.get(path, token=token, headers=headers)


def time_until_refused(envoy, token, limit: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit + 2:
        if get(envoy, PATH, token).status == 401:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"still allowed {limit + 2:.1f}s after the list changed")


@pytest.mark.parametrize("member", ["jti", "sub", "client_id", "revoked_before_sub", "revoked_before_client_id"])
def test_a_listed_token_is_refused_within_refresh_plus_one_second(start, lists, keys, member):
    envoy = start()
    now = int(time.time())
    victim = mint(keys["RS256"], sub="user-left", client_id="app-leaked", jti="jti-stolen", iat=now - 10)
    bystander = mint(keys["RS256"])
    # Both allowed and cached before the list changes.
    assert get(envoy, PATH, victim).status == 200
    assert get(envoy, PATH, bystander).status == 200
    doc = {
        "jti": {"jti": ["jti-stolen"]},
        "sub": {"sub": ["user-left"]},
        "client_id": {"client_id": ["app-leaked"]},
        "revoked_before_sub": {"revoked_before": {"sub": {"user-left": now}}},
        "revoked_before_client_id": {"revoked_before": {"client_id": {"app-leaked": now}}},
    }[member]
    lists.set_document(doc)
    took = time_until_refused(envoy, victim, REFRESH + 1)
    assert took <= REFRESH + 1, f"refused only after {took:.2f}s"
    resp = get(envoy, PATH, victim, rid="revoked-1")
    assert resp.status == 401 and resp.header("www-authenticate") == 'Bearer error="invalid_token"'
    assert get(envoy, PATH, bystander).status == 200
    assert eventually(lambda: reason_of(envoy, "revoked-1") == "revoked", timeout=5)
    assert envoy.phi_stats().get("denied.revoked", 0) >= 1


def test_revoked_before_spares_tokens_issued_after(start, lists, keys):
    envoy = start()
    now = int(time.time())
    lists.set_document({"revoked_before": {"sub": {"user-4711": now - 60}}})
    old = mint(keys["ES256"], iat=now - 120)
    new = mint(keys["ES256"], iat=now - 30)
    assert eventually(lambda: get(envoy, PATH, old).status == 401, timeout=REFRESH + 3)
    assert get(envoy, PATH, new).status == 200


def test_every_worker_refuses(start, lists, keys):
    envoy = start(concurrency=2)
    token = mint(keys["EdDSA"], jti="jti-two-workers")
    for _ in range(10):  # fresh connections: the kernel spreads them over both workers
        assert get(envoy, PATH, token).status == 200
    lists.set_document({"jti": ["jti-two-workers"]})
    time.sleep(REFRESH + 1)
    statuses = [get(envoy, PATH, token).status for _ in range(30)]
    assert statuses == [401] * 30, statuses
    vms = {json.loads(r["audit"])["vm"] for r in envoy.access_log() if r.get("audit") not in (None, "", "-")}
    assert len(vms) == 2, f"want both workers to have decided: {vms}"


def test_a_refused_list_leaves_the_previous_in_force(start, lists, keys):
    envoy = start()
    lists.set_document({"jti": ["jti-a"]})
    a, b = mint(keys["RS256"], jti="jti-a"), mint(keys["RS256"], jti="jti-b")
    assert eventually(lambda: get(envoy, PATH, a).status == 401, timeout=REFRESH + 3)
    failed = envoy.phi_stats().get("revocation_fetch.failed", 0)
    too_many = {"jti": ["jti-b"] + [f"x{i}" for i in range(200_000)]}
    too_large = {"jti": ["jti-b"], "sub": ["y" * (8 * 1024 * 1024)]}
    for bad in (too_many, too_large, b"{not json", {"jtis": ["jti-b"]}):
        lists.set_document(bad)
        assert eventually(lambda: envoy.phi_stats().get("revocation_fetch.failed", 0) > failed, timeout=REFRESH + 5)
        failed = envoy.phi_stats().get("revocation_fetch.failed", 0)
        assert get(envoy, PATH, a).status == 401, "the previous list must stay in force"
        assert get(envoy, PATH, b).status == 200, "a refused list must not take effect"
    assert envoy.get("/healthz").status == 200
    assert "revocation list" in envoy.log_text()


def test_list_server_down_past_max_stale_closes_sensitive_rules_only(start, lists, keys):
    envoy = start()
    lists.set_document({"jti": ["jti-dead"]})
    dead, fine = mint(keys["RS256"], jti="jti-dead"), mint(keys["RS256"])
    assert eventually(lambda: get(envoy, PATH, dead).status == 401, timeout=REFRESH + 3)
    assert get(envoy, SENSITIVE, fine).status == 200
    lists.down()
    # refresh 2 s + max_stale 3 s after the last good fetch.
    assert eventually(lambda: get(envoy, SENSITIVE, fine).status == 503, timeout=REFRESH + 3 + 4)
    assert get(envoy, SENSITIVE, fine, rid="closed").status == 503
    assert get(envoy, PATH, fine).status == 200, "other rules go on with the last list"
    assert get(envoy, PATH, dead).status == 401, "and the last list still revokes"
    assert eventually(lambda: reason_of(envoy, "closed") == "revocation_unavailable", timeout=5)
    stats = envoy.phi_stats()
    assert stats.get("revocation_fetch.failed", 0) >= 1 and stats.get("revocation.stale_decisions", 0) >= 2, stats
    lists.up()
    assert eventually(lambda: get(envoy, SENSITIVE, fine).status == 200, timeout=REFRESH + 3)


def test_stats_report_the_list(start, lists, keys):
    lists.set_document({"jti": ["a", "b"], "sub": ["c"], "revoked_before": {"client_id": {"d": 1}}})
    envoy = start()
    assert get(envoy, PATH, mint(keys["RS256"])).status == 200
    stats = eventually(lambda: (s := envoy.phi_stats()).get("revocation.entries") == 4 and s, timeout=5)
    assert stats and stats.get("revocation_fetch.ok", 0) >= 1, envoy.phi_stats()
    assert 0 <= stats.get("revocation.age_seconds", -1) <= REFRESH + 1, stats
