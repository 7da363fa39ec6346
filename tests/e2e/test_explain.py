"""`phi-guard explain` agrees with the real filter (issue #16).

The same requests, with the same tokens, go to Envoy with the built .wasm
and to `phi-guard explain` on the very policy Envoy was given and the very
key set the JWKS server serves: the decision, status, WWW-Authenticate and
the audit record's reason (and step-up detail) must be the same. With
`--claims` (the token's own claims, signed by explain with a throwaway key)
the answer must be the same too.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest

from harness import REPO, audits, jwks, mint

MFA = "urn:example:loa:mfa"  # the shipped step_up_defaults.acr_values
PATIENT = "/fhir/Patient/p-1"


@pytest.fixture(scope="session")
def phi_guard_cli() -> Path:
    """The native `phi-guard` command, built once per session."""
    subprocess.run(["cargo", "build", "--quiet", "--bin", "phi-guard"], cwd=REPO, check=True, timeout=900)
    binary = REPO / "target" / "debug" / "phi-guard"
    assert binary.exists(), binary
    return binary


def claims_of(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def explain(cli: Path, tmp: Path, policy: dict, keys, method: str, path: str, *, token=None, claims=None, headers=(), at=None) -> dict:
    config = tmp / "policy.json"
    config.write_text(json.dumps(policy, indent=2))
    args = [str(cli), "explain", "--config", str(config), "--method", method, "--path", path, "--format", "json"]
    if token is not None:
        key_set = tmp / "jwks.json"
        key_set.write_text(json.dumps(jwks(*keys.values())))
        args += ["--token", token, "--jwks", str(key_set)]
    if claims is not None:
        args += ["--claims", json.dumps(claims)]
    for h in headers:
        args += ["--header", h]
    if at is not None:
        args += ["--at", str(at)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def cases(keys) -> list[tuple[str, str, str, str | None, tuple]]:
    """(id, method, path, token, extra headers): one per row of the README's answers table the filter decides."""
    now = int(time.time())
    es = keys["ES256"]
    return [
        ("public", "GET", "/healthz", None, ()),
        ("allowed", "GET", PATIENT + "?_format=json", mint(es), ()),
        ("missing_token", "GET", PATIENT, None, ()),
        ("insufficient_scope", "GET", PATIENT, mint(es, scope="update:billing"), ()),
        ("expired", "GET", PATIENT, mint(es, iat=now - 900, exp=now - 600), ()),
        ("wrong_audience", "GET", PATIENT, mint(es, aud="https://billing.example.org"), ()),
        ("unknown_issuer", "GET", PATIENT, mint(es, iss="https://evil.example.org"), ()),
        ("lifetime_too_long", "GET", PATIENT, mint(es, exp=now + 7200), ()),
        ("step_up", "GET", "/fhir/$export", mint(es, scope="export:bulk"), ()),
        ("step_up_age", "GET", "/fhir/$export", mint(es, scope="export:bulk", acr=MFA, auth_time=now - 400), ()),
        ("step_up_ok", "GET", "/fhir/$export", mint(es, scope="export:bulk", acr=MFA, auth_time=now - 30), ()),
        ("token_too_old", "DELETE", "/labs/l-1", mint(es, scope="delete:lab-results", iat=now - 400, exp=now + 300), ()),
        ("no_rule", "POST", PATIENT, mint(es), ()),
        ("bad_token_type", "GET", PATIENT, mint(es, header={"typ": "JWT+weird"}), ()),
        ("two_tokens", "GET", PATIENT, mint(es), ("authorization: Bearer other",)),
        ("malformed", "GET", PATIENT, "not-a-jwt", ()),
        ("rsa", "PATCH", "/billing/b-1", mint(keys["RS256"], scope="update:billing"), ()),
    ]


def test_explain_agrees_with_the_filter(envoy, upstream, keys, policy, phi_guard_cli, tmp_path):
    table = cases(keys)
    answers, reached = [], []
    for _, method, path, token, extra in table:
        headers = [tuple(h.split(": ", 1)) for h in extra]
        before = len(upstream.requests)
        answers.append(envoy.request(method, path, headers=headers, token=token))
        reached.append(upstream.requests[-1] if len(upstream.requests) > before else None)
    records = audits(envoy, len(table))
    for (name, method, path, token, extra), resp, record, seen in zip(table, answers, records, reached):
        assert record is not None, name
        want = {
            "decision": record["decision"],
            "status": None if record["decision"] == "allow" else resp.status,
            "www": resp.header("www-authenticate"),
            "reason": record["reason"],
            "step_up": record.get("step_up"),
        }
        if record["decision"] == "allow":
            assert resp.status == 200, name
        e = explain(phi_guard_cli, tmp_path, policy, keys, method, path, token=token, headers=extra)
        got = {
            "decision": e["decision"],
            "status": e.get("status"),
            "www": e.get("www_authenticate"),
            "reason": e["reason"],
            "step_up": e.get("step_up"),
        }
        assert got == want, (name, e)
        if e["decision"] == "allow" and e.get("rule", {}).get("public") is False:
            # The identity headers explain names are those the upstream got.
            assert seen is not None, name
            for header, value in e["forwarded_headers"].items():
                assert seen.header(header) == value, (name, header)
            assert e["token_forwarded"] is (seen.header("authorization") is not None), name
    # Both ways taken, several reasons.
    assert {a["decision"] for a in (audit for audit in records if audit)} == {"allow", "deny"}
    assert len({r["reason"] for r in records if r}) >= 10


def test_claims_give_the_tokens_answer(envoy, keys, policy, phi_guard_cli, tmp_path):
    """--claims: the token's own claims, signed by explain; same answer, and it says the signature was not checked."""
    for name, method, path, token, extra in cases(keys):
        if token is None or token.count(".") != 2 or extra or name == "bad_token_type":
            continue  # no claims to give (or a header, not a claim, is the point)
        with_token = explain(phi_guard_cli, tmp_path, policy, keys, method, path, token=token)
        with_claims = explain(phi_guard_cli, tmp_path, policy, keys, method, path, claims=claims_of(token))
        for field in ("decision", "status", "www_authenticate", "reason", "step_up"):
            assert with_claims.get(field) == with_token.get(field), (name, field)
        assert with_claims["signature"].startswith("NOT CHECKED"), with_claims["signature"]
        assert with_token["signature"].startswith("checked"), with_token["signature"]
    # A forged signature is what --claims cannot see: the token says so.
    forged = mint(keys["ES256"])[:-4] + "AAAA"
    e = explain(phi_guard_cli, tmp_path, policy, keys, "GET", PATIENT, token=forged)
    assert (e["status"], e["reason"]) == (401, "invalid_signature")
    assert envoy.get(PATIENT, token=forged).status == 401
