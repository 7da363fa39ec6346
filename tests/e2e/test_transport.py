"""Tokens only over TLS 1.2+, bound to their sender, free of PHI (issue #14).

In the real Envoy: plaintext against TLS 1.2 and 1.3 listeners (plaintext
tests say so: `tls=False`), an old client refused where the listener would
take it, x-forwarded-proto trusted only when configured, certificate-bound
tokens (RFC 8705) with the right, the wrong and no client certificate, DPoP
(RFC 9449) proofs the test signs (good, wrong htm/htu/ath, stale, replayed
on the other worker, another key, Bearer scheme, `none` and HS256), and
tokens carrying forbidden claims, refused or flagged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
import uuid

import pytest

from harness import (
    KeyPair,
    b64url,
    challenge_of,
    client_tls,
    eventually,
    mint,
    tls_certs,
)

PATH = "/fhir/Patient/7"
PUBLIC = "/healthz"


def record_of(envoy, request_id: str) -> dict | None:
    for line in envoy.access_log():
        if line.get("request_id") == request_id and line.get("audit") not in (None, "", "-"):
            return json.loads(line["audit"])
    return None


def audited(envoy, request_id: str) -> dict:
    record = eventually(lambda: record_of(envoy, request_id), timeout=10)
    assert record, f"no audit record for {request_id}"
    return record


def ask(envoy, path=PATH, token=None, scheme="Bearer", headers=(), tls=None, method="GET"):
    """A request with its own x-request-id; (response, request id)."""
    rid = uuid.uuid4().hex
    items = [("x-request-id", rid), *headers]
    if token is not None:
        items.append(("Authorization", f"{scheme} {token}"))
    return envoy.request(method, path, items, tls=tls), rid


# --------------------------------------------------------------------------
# TLS 1.2 or newer


def test_plaintext_is_refused_before_the_token_is_read(envoy_factory, policy, upstream, keys):
    envoy = envoy_factory(policy, tls=False)  # plaintext on purpose
    resp, rid = ask(envoy, token=mint(keys["RS256"]))
    assert resp.status == 403, (resp.status, resp.text)
    assert resp.header("www-authenticate") is None
    assert upstream.requests == []
    record = audited(envoy, rid)
    assert record["reason"] == "insecure_transport" and record["tls"] == "none", record
    assert "token_fp" not in record and "sub" not in record, "a token sent in clear is not logged"
    # Even without a token, and whatever it holds.
    assert ask(envoy)[0].status == 403
    assert ask(envoy, token="garbage")[0].status == 403
    # Public rules are exempt.
    assert envoy.get(PUBLIC).status == 200
    assert envoy.phi_stats().get("denied.insecure_transport") == 3


def test_require_tls_false_serves_plaintext_and_says_so_at_start(envoy_factory, policy, upstream, keys):
    policy["transport"] = {"require_tls": False}
    envoy = envoy_factory(policy, tls=False)  # plaintext on purpose
    resp, rid = ask(envoy, token=mint(keys["RS256"]))
    assert resp.status == 200
    assert audited(envoy, rid)["tls"] == "none"
    assert "require_tls is false" in envoy.log_text()


def test_a_rule_may_require_tls_where_the_policy_does_not(envoy_factory, policy, upstream, keys):
    policy["transport"] = {"require_tls": False}
    for rule in policy["rules"]:
        if rule["id"] == "patient-read":
            rule["require_tls"] = True
    envoy = envoy_factory(policy, tls=False)  # plaintext on purpose
    assert ask(envoy, token=mint(keys["RS256"]))[0].status == 403
    billing = mint(keys["RS256"], scope="update:billing")
    assert ask(envoy, path="/billing/1", token=billing, method="PUT")[0].status == 200


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_tls_12_and_13_are_served_and_recorded(envoy_factory, policy, upstream, keys, version):
    envoy = envoy_factory(policy)
    pinned = getattr(ssl.TLSVersion, version.replace(".", "_"))
    resp, rid = ask(envoy, token=mint(keys["ES256"]), tls=envoy.client_tls(minimum=pinned, maximum=pinned))
    assert resp.status == 200
    assert audited(envoy, rid)["tls"] == version


def test_min_tls_13_refuses_a_tls_12_client(envoy_factory, policy, upstream, keys):
    policy["transport"] = {"min_tls_version": "TLSv1.3"}
    envoy = envoy_factory(policy)
    token = mint(keys["ES256"])
    v12 = envoy.client_tls(minimum=ssl.TLSVersion.TLSv1_2, maximum=ssl.TLSVersion.TLSv1_2)
    resp, rid = ask(envoy, token=token, tls=v12)
    assert resp.status == 403 and audited(envoy, rid)["reason"] == "insecure_transport"
    assert ask(envoy, token=token)[0].status == 200


def test_a_tls_11_client_is_refused_where_the_listener_allows_it(envoy_factory, policy, upstream, keys):
    envoy = envoy_factory(policy, tls_versions=("TLSv1_1", "TLSv1_3"))
    v11 = envoy.client_tls(minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1)
    try:
        resp, rid = ask(envoy, token=mint(keys["RS256"]), tls=v11)
    except ssl.SSLError as e:
        pytest.fail(f"this machine's OpenSSL cannot speak TLS 1.1 to the test listener: {e}")
    assert resp.status == 403, resp.status
    record = audited(envoy, rid)
    assert record["reason"] == "insecure_transport" and record["tls"] == "TLSv1.1", record
    assert upstream.requests == []


def test_forwarded_proto_counts_only_when_trusted(envoy_factory, policy, upstream, keys):
    token = mint(keys["RS256"])
    https = [("x-forwarded-proto", "https")]
    untrusted = envoy_factory(policy, tls=False)  # plaintext on purpose
    assert ask(untrusted, token=token, headers=https)[0].status == 403
    policy["transport"] = {"trusted_forwarded_proto": True}
    trusted = envoy_factory(policy, tls=False)  # behind a terminating balancer
    assert ask(trusted, token=token, headers=https)[0].status == 200
    assert ask(trusted, token=token, headers=[("x-forwarded-proto", "http")])[0].status == 403
    assert ask(trusted, token=token)[0].status == 403


def test_an_edge_envoy_does_not_let_clients_claim_https(envoy_factory, policy, upstream, keys):
    """README: at the edge (`use_remote_address: true`) Envoy sets
    x-forwarded-proto itself, so trusting it cannot be abused there."""
    policy["transport"] = {"trusted_forwarded_proto": True}
    envoy = envoy_factory(policy, tls=False, start=False)  # plaintext on purpose
    hcm = envoy.config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["use_remote_address"] = True
    envoy.write_config()
    envoy.start()
    resp, _ = ask(envoy, token=mint(keys["RS256"]), headers=[("x-forwarded-proto", "https")])
    assert resp.status == 403, "a client's x-forwarded-proto must not pass for TLS at the edge"


# --------------------------------------------------------------------------
# Certificate-bound tokens (RFC 8705)


def test_certificate_bound_tokens_need_their_certificate(envoy_factory, policy, upstream, keys):
    envoy = envoy_factory(policy)
    certs = tls_certs()
    bound = mint(keys["ES256"], cnf={"x5t#S256": b64url(certs.client_sha256("alice"))})
    resp, rid = ask(envoy, token=bound, tls=envoy.client_tls("alice"))
    assert resp.status == 200, (resp.status, resp.text)
    assert audited(envoy, rid)["binding"] == "mtls"
    for tls in (envoy.client_tls("bob"), envoy.client_tls()):
        resp, rid = ask(envoy, token=bound, tls=tls)
        assert resp.status == 401 and challenge_of(resp)[1]["error"][0] == "invalid_token"
        assert audited(envoy, rid)["reason"] == "cnf_mismatch"
    # An unbound token over mTLS is a bearer token: no binding recorded.
    resp, rid = ask(envoy, token=mint(keys["ES256"]), tls=envoy.client_tls("alice"))
    assert resp.status == 200 and "binding" not in audited(envoy, rid)


def test_a_rule_may_demand_a_bound_token(envoy_factory, policy, upstream, keys):
    for rule in policy["rules"]:
        if rule["id"] == "patient-read":
            rule["require_sender_constraint"] = True
    envoy = envoy_factory(policy)
    resp, rid = ask(envoy, token=mint(keys["ES256"]), tls=envoy.client_tls("alice"))
    assert resp.status == 401 and audited(envoy, rid)["reason"] == "sender_constraint_required"
    bound = mint(keys["ES256"], cnf={"x5t#S256": b64url(tls_certs().client_sha256("alice"))})
    assert ask(envoy, token=bound, tls=envoy.client_tls("alice"))[0].status == 200


# --------------------------------------------------------------------------
# DPoP (RFC 9449)


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638, written independently of the product."""
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


class Holder:
    """A DPoP key and the proofs it signs."""

    def __init__(self, key: KeyPair):
        self.key = key
        self.jwk = {k: v for k, v in key.public_jwk().items() if k not in ("kid", "alg", "use")}

    @property
    def jkt(self) -> str:
        return jwk_thumbprint(self.jwk)

    def proof(self, envoy, token: str, method="GET", path=PATH, **edits) -> str:
        claims = {
            "jti": uuid.uuid4().hex,
            "htm": method,
            "htu": f"{envoy.origin}{path}",
            "iat": int(time.time()),
            "ath": b64url(hashlib.sha256(token.encode()).digest()),
        }
        header = {"typ": "dpop+jwt", "jwk": self.jwk}
        alg = edits.pop("alg", self.key.alg)
        for name, value in edits.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        header["alg"] = alg
        head = b64url(json.dumps(header, separators=(",", ":")).encode())
        body = b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{head}.{body}".encode()
        if alg == "none":
            return f"{head}.{body}."
        if alg == "HS256":
            import hmac

            secret = json.dumps(self.jwk).encode()
            return f"{head}.{body}.{b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())}"
        return f"{head}.{body}.{b64url(self.key.sign(alg, signing_input))}"


def dpop_ask(envoy, token, proof=None, scheme="DPoP"):
    headers = [] if proof is None else [("DPoP", proof)]
    return ask(envoy, token=token, scheme=scheme, headers=headers)


def test_dpop_bound_tokens_need_a_fresh_proof_of_their_key(envoy_factory, policy, upstream, keys):
    envoy = envoy_factory(policy, concurrency=2)
    holder = Holder(KeyPair.ec("ES256", kid="dpop"))
    token = mint(keys["RS256"], cnf={"jkt": holder.jkt})
    resp, rid = dpop_ask(envoy, token, holder.proof(envoy, token))
    assert resp.status == 200, (resp.status, resp.text, resp.headers)
    record = audited(envoy, rid)
    assert record["binding"] == "dpop" and record["reason"] == "ok"
    assert upstream.last.header("authorization") is None

    def refused(proof, reason, scheme="DPoP"):
        resp, rid = dpop_ask(envoy, token, proof, scheme)
        assert resp.status == 401, (reason, resp.status)
        assert audited(envoy, rid)["reason"] == reason
        return resp

    now = int(time.time())
    resp = refused(holder.proof(envoy, token, method="POST"), "invalid_dpop_proof")
    scheme, params = challenge_of(resp)
    assert scheme == "DPoP" and params["error"] == ("invalid_dpop_proof", True), params
    assert "ES256" in params["algs"][0].split(), params
    refused(holder.proof(envoy, token, htu=f"{envoy.origin}/fhir/Patient/8"), "invalid_dpop_proof")
    refused(holder.proof(envoy, token, htu=f"https://evil.example.org{PATH}"), "invalid_dpop_proof")
    refused(holder.proof(envoy, token, ath=b64url(b"x" * 32)), "invalid_dpop_proof")
    refused(holder.proof(envoy, token, iat=now - 300), "invalid_dpop_proof")
    refused(holder.proof(envoy, token, alg="none"), "invalid_dpop_proof")
    refused(holder.proof(envoy, token, alg="HS256"), "invalid_dpop_proof")
    refused(None, "invalid_dpop_proof")
    # Another key's proof, and the Bearer scheme for a DPoP-bound token.
    other = Holder(KeyPair.ec("ES256", kid="other"))
    refused(other.proof(envoy, token), "cnf_mismatch")
    resp = refused(holder.proof(envoy, token), "cnf_mismatch", scheme="Bearer")
    assert challenge_of(resp)[0] == "DPoP"


def test_a_dpop_proof_works_once_on_any_worker(envoy_factory, policy, upstream, keys):
    envoy = envoy_factory(policy, concurrency=2)
    holder = Holder(KeyPair.ed25519(kid="dpop-ed"))
    token = mint(keys["ES256"], cnf={"jkt": holder.jkt})
    # Each used once, then replayed, each on a fresh connection, until the
    # replays reached both workers (the kernel picks a worker per connection).
    replays, vms = [], set()
    for _ in range(40):
        proof = holder.proof(envoy, token)
        assert dpop_ask(envoy, token, proof)[0].status == 200
        replays.append(dpop_ask(envoy, token, proof))
        vms |= {audited(envoy, replays[-1][1])["vm"]}
        if len(vms) == 2 and len(replays) >= 6:
            break
    assert [r.status for r, _ in replays] == [401] * len(replays)
    assert {audited(envoy, rid)["reason"] for _, rid in replays} == {"dpop_replay"}
    assert len(vms) == 2, f"40 replays should have reached both workers: {vms}"


# --------------------------------------------------------------------------
# No PHI in tokens

DEFAULT_FORBIDDEN = [
    "name", "given_name", "family_name", "middle_name", "nickname", "birthdate",
    "address", "phone_number", "email", "gender", "picture",
]


def test_each_forbidden_claim_is_refused_and_named_never_shown(envoy_factory, policy, upstream, keys):
    policy["forbidden_claims"] = DEFAULT_FORBIDDEN + ["mrn"]
    envoy = envoy_factory(policy)
    for claim in DEFAULT_FORBIDDEN + ["mrn"]:
        value = f"secret-{claim}-{uuid.uuid4().hex[:6]}"
        resp, rid = ask(envoy, token=mint(keys["ES256"], **{claim: value}))
        assert resp.status == 401 and challenge_of(resp)[1]["error"][0] == "invalid_token", claim
        record = audited(envoy, rid)
        assert record["reason"] == "phi_in_token" and record["phi_claims"] == [claim], record
        assert value not in envoy.access_log_path.read_text() and value not in envoy.log_text()
    assert upstream.requests == []
    assert ask(envoy, token=mint(keys["ES256"]))[0].status == 200


def test_forbidden_claims_may_be_flagged_instead(envoy_factory, policy, upstream, keys):
    policy["forbidden_claims_action"] = "audit"
    envoy = envoy_factory(policy)
    resp, rid = ask(envoy, token=mint(keys["ES256"], email="jane@example.org", birthdate="1970-01-01"))
    assert resp.status == 200
    record = audited(envoy, rid)
    assert record["reason"] == "ok" and sorted(record["phi_claims"]) == ["birthdate", "email"], record
    assert eventually(lambda: envoy.phi_stats().get("phi_in_token.flagged") == 1, timeout=5)
