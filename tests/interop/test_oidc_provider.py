"""phi-guard against a real, certified OpenID provider (issue #18).

oidc-provider (npm, pinned in tests/interop/package.json) runs on loopback
with its own RS256 and ES256 keys, the client-credentials grant and resource
indicators, so its token endpoint issues RFC 9068 JWT access tokens (`typ`
`at+jwt`) for the API's audience. Every token here comes from that endpoint
over HTTP; phi-guard gets the keys from the provider's own `jwks_uri` (found
in its discovery document) and introspects at its introspection endpoint.
"""

from __future__ import annotations

import json
import uuid

from conftest import INTROSPECTOR, INTROSPECTOR_ENV
from harness import assert_insufficient_scope, b64url_decode, eventually
from oidc import AUDIENCE

PATIENT = "/fhir/Patient/7"
LAB = "/labs/7"


def claims(token: str) -> tuple[dict, dict]:
    """Header and payload of a JWT (read, not trusted: phi-guard verifies)."""
    head, payload, _ = token.split(".")
    return json.loads(b64url_decode(head)), json.loads(b64url_decode(payload))


def record(envoy, rid: str) -> dict | None:
    for line in envoy.access_log():
        if line.get("request_id") == rid and line.get("audit") not in (None, "", "-"):
            return json.loads(line["audit"])
    return None


def send(envoy, method: str, path: str, token: str):
    """The answer and the audit record of one request."""
    rid = uuid.uuid4().hex
    resp = envoy.request(method, path, headers={"x-request-id": rid}, token=token)
    audit = eventually(lambda: record(envoy, rid), timeout=10)
    assert audit, f"no audit record for {method} {path}:\n{envoy.log_tail()}"
    return resp, audit


def introspect_policy(policy: dict, idp, cache_seconds: int = 1) -> dict:
    """`/labs/{id}` GET as an introspect rule at the provider's own endpoint."""
    policy["providers"][0]["introspection"] = {
        "uri": idp.introspection_uri,
        "cluster": "introspection",
        "client_id": INTROSPECTOR[0],
        "client_secret_env": INTROSPECTOR_ENV,
        "timeout_ms": 2000,
        "cache_seconds": cache_seconds,
    }
    policy["rules"].append(
        {"id": "lab-read", "methods": ["GET"], "path": "/labs/{id}", "scopes": ["read:patient-profile"],
         "introspect": True, "provider": "oidc-provider"}
    )
    return policy


def test_rs256_and_es256_access_tokens_from_the_token_endpoint_are_allowed(envoy_factory, policy, idp, upstream):
    envoy = envoy_factory(policy)
    for client, alg, method, path, rule in [
        ("ward-app", "RS256", "GET", PATIENT, "patient-read"),
        ("lab-robot", "ES256", "DELETE", LAB, "lab-delete"),
    ]:
        scope = idp.clients[client].scope
        token = idp.token(client, scope)
        header, payload = claims(token)
        # RFC 9068 as the provider issues it, with its own key.
        assert (header["typ"], header["alg"], header["kid"]) == ("at+jwt", alg, idp.kids[alg]), header
        assert (payload["iss"], payload["aud"], payload["client_id"]) == (idp.issuer, AUDIENCE, client), payload

        resp, audit = send(envoy, method, path, token)
        assert resp.status == 200, (client, resp.status, resp.text, audit, envoy.log_tail())
        assert (audit["decision"], audit["reason"], audit["rule"]) == ("allow", "ok", rule), audit
        assert (audit["iss"], audit["sub"], audit["client_id"], audit["jti"]) == (
            idp.issuer, client, client, payload["jti"]), audit
        assert sorted(audit["scopes_granted"]) == sorted(scope.split()), audit
        seen = upstream.last
        assert (seen.method, seen.path) == (method, path)
        assert seen.header("x-phi-subject") == client and seen.header("x-phi-client-id") == client
        assert seen.header("authorization") is None, "the token must not reach the upstream"
    stats = envoy.phi_stats()
    assert stats.get("allowed") == 2 and stats.get("jwks_fetch.ok") == 1, stats


def test_a_scope_the_provider_did_not_grant_is_403_insufficient_scope(envoy_factory, policy, idp, upstream):
    envoy = envoy_factory(policy)
    # ward-app asks for more than it may have: the provider grants only what
    # the API lets this client have, and phi-guard holds the rule to that.
    token = idp.token("ward-app", "read:patient-profile delete:lab-results export:bulk")
    assert claims(token)[1]["scope"] == "read:patient-profile"
    for method, path, rule, required in [
        ("DELETE", LAB, "lab-delete", {"delete:lab-results"}),
        ("GET", "/fhir/$export", "bulk-export", {"export:bulk"}),
    ]:
        resp, audit = send(envoy, method, path, token)
        assert_insufficient_scope(resp, upstream, required)
        assert (audit["reason"], audit["rule"], audit["client_id"]) == ("insufficient_scope", rule, "ward-app"), audit
    resp, _ = send(envoy, "GET", PATIENT, token)
    assert resp.status == 200
    assert envoy.phi_stats().get("denied.insufficient_scope") == 2


def test_a_short_lived_token_is_refused_once_the_providers_exp_passes(envoy_factory, policy, idp):
    envoy = envoy_factory(policy)
    token = idp.token("brief-app", "read:patient-profile")
    _, payload = claims(token)
    assert payload["exp"] - payload["iat"] == 2, payload
    resp, audit = send(envoy, "GET", PATIENT, token)
    assert resp.status == 200, (audit, envoy.log_tail())
    # The verified-token cache keeps it only until `exp`.
    assert eventually(lambda: envoy.get(PATIENT, token=token).status == 401, timeout=10), envoy.log_tail()
    resp, audit = send(envoy, "GET", PATIENT, token)
    assert resp.status == 401 and resp.header("www-authenticate") == 'Bearer error="invalid_token"', resp.headers
    assert audit["reason"] == "expired", audit


def test_key_rotation_at_the_provider_is_followed_through_the_unknown_kid_refetch(envoy_factory, policy, idp):
    # Keys are refreshed every 300 s (shipped): only an unknown kid makes
    # phi-guard fetch again within this test.
    envoy = envoy_factory(policy)
    old = {c: idp.token(c, idp.clients[c].scope) for c in ("ward-app", "lab-robot")}
    for token in old.values():
        assert envoy.get(PATIENT, token=token).status == 200
    assert envoy.phi_stats().get("jwks_fetch.ok") == 1

    before = dict(idp.kids)
    after = idp.rotate()
    assert set(after.values()).isdisjoint(before.values()), (before, after)
    for client, alg in [("ward-app", "RS256"), ("lab-robot", "ES256")]:
        token = idp.token(client, idp.clients[client].scope)
        assert claims(token)[0]["kid"] == after[alg]
        # The first request with the new kid waits for the refetch and passes.
        resp, audit = send(envoy, "GET", PATIENT, token)
        assert resp.status == 200, (alg, resp.status, audit, envoy.log_tail())
    stats = envoy.phi_stats()
    # One refetch brought both new keys (the second kid was known by then).
    assert stats.get("jwks_fetch.ok") == 2 and stats.get("denied.unknown_key", 0) == 0, stats
    # Tokens signed before the rotation still verify: the old keys stay published.
    for token in old.values():
        assert envoy.get(PATIENT, token=token).status == 200


def test_an_opaque_token_is_introspected_at_the_provider_and_its_revocation_there_cuts_it_off(
    envoy_factory, policy, idp, upstream
):
    envoy = envoy_factory(introspect_policy(policy, idp, cache_seconds=1))
    token = idp.token("opaque-app", "read:patient-profile")
    assert token.count(".") != 2, "the provider was to issue an opaque token"
    resp, audit = send(envoy, "GET", LAB, token)
    assert resp.status == 200, (resp.status, audit, envoy.log_tail(), idp.log_text()[-2000:])
    # Identity from the provider's answer (a client-credentials token has no user).
    assert (audit["rule"], audit["iss"], audit["client_id"]) == ("lab-read", idp.issuer, "opaque-app"), audit
    assert upstream.last.header("x-phi-client-id") == "opaque-app"
    # Elsewhere an opaque token is no token at all.
    resp, audit = send(envoy, "GET", PATIENT, token)
    assert (resp.status, audit["reason"]) == (401, "malformed_token"), audit

    # Revoked at the provider (RFC 7009, by its own client): once phi-guard's
    # answer is older than cache_seconds, the provider says inactive.
    assert idp.revoke("opaque-app", token) == 200
    assert idp.introspect(token, *INTROSPECTOR) == (200, {"active": False})
    assert eventually(lambda: envoy.get(LAB, token=token).status == 401, timeout=10), envoy.log_tail()
    resp, audit = send(envoy, "GET", LAB, token)
    assert (resp.status, audit["reason"]) == (401, "inactive"), audit
    stats = envoy.phi_stats()
    assert stats.get("introspection.active", 0) >= 1 and stats.get("introspection.inactive", 0) >= 1, stats
    assert stats.get("introspection.failed", 0) == 0, stats


def test_the_provider_does_not_introspect_its_jwt_access_tokens_so_an_introspect_rule_fails_closed(
    envoy_factory, policy, idp, upstream
):
    # oidc-provider refuses to introspect (or revoke) a structured token:
    # 400 unsupported_token_type. phi-guard has no usable answer: 503, never an allow.
    envoy = envoy_factory(introspect_policy(policy, idp))
    token = idp.token("ward-app", "read:patient-profile")
    status, answer = idp.introspect(token, *INTROSPECTOR)
    assert (status, answer.get("error")) == (400, "unsupported_token_type"), answer
    resp, audit = send(envoy, "GET", LAB, token)
    assert (resp.status, audit["reason"]) == (503, "introspection_unavailable"), (resp.status, audit)
    assert upstream.requests == []
    # The JWT itself is fine wherever introspection is not asked for.
    assert envoy.get(PATIENT, token=token).status == 200
    assert envoy.phi_stats().get("introspection.failed", 0) >= 1
