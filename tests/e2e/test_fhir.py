"""SMART on FHIR in the real Envoy (issue #17): the rows of the FHIR table
(tests/fhir_table.json) marked `e2e`, sent through Envoy with the shipped
policy and the table's `fhir` block, to a FHIR-shaped upstream that records
what reaches it.

Each row says what must come of its request; here that is the status, the
challenge, what the upstream saw (nothing on a refusal; the request as sent,
form body included, on an allow) and the audit record: reason, rule,
`fhir_interaction`, `fhir_type` and `patient_fp`, the keyed fingerprint of the
compartment's patient, recomputed here from the audit key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid

import pytest

from conftest import only
from harness import REPO, Envoy, audits, challenge_of, eventually, mint, parse_challenge, shipped_policy

TABLE = json.loads((REPO / "tests" / "fhir_table.json").read_text())
KEY_ENV = "PHI_GUARD_FHIR_TEST_AUDIT_KEY"
FORM = "application/x-www-form-urlencoded"
FAMILIES = ["RS256", "PS256", "ES256", "ES384", "EdDSA"]
IDENTITY_HEADERS = ["x-phi-subject", "x-phi-client-id", "x-phi-scopes", "x-phi-rule"]

STATUS = {
    "ok": 200,
    "insufficient_scope": 403,
    "no_rule": 403,
    "missing_token": 401,
    "malformed_token": 401,
    "bad_fhir_request": 400,
    "body_too_large": 413,
}


def patient_fp(key: bytes, patient: str) -> str:
    """README: HMAC-SHA256 under a key derived from the audit key, 16 hex digits."""
    derived = hmac.new(key, b"phi-guard patient_fp v1", hashlib.sha256).digest()
    return hmac.new(derived, patient.encode(), hashlib.sha256).hexdigest()[:16]


def table_policy(name: str, jwks_port: int, audit_key_env: str | None = KEY_ENV) -> dict:
    """The shipped policy with the table's patch for `name` (its members replace the shipped ones)."""
    policy = Envoy.point_jwks(shipped_policy(), jwks_port)
    policy["providers"][0]["algorithms"] = list(FAMILIES)
    policy.update(json.loads(json.dumps(TABLE["policies"][name])))
    if audit_key_env:
        policy["audit"] = {"hmac_key_env": audit_key_env}
    return policy


def row_body(row: dict) -> bytes | None:
    if "form" not in row:
        return None
    body = row["form"]
    if "pad_to" in row:
        body += "&pad="
        body += "a" * (row["pad_to"] - len(body))
    return body.encode()


def row_headers(row: dict, keys) -> list[tuple[str, str]]:
    headers = [("x-request-id", f"fhir-{uuid.uuid4().hex[:12]}")]
    if "form" in row:
        headers.append(("Content-Type", row.get("content_type", FORM)))
    if not row.get("token", True):
        return headers
    if "bearer" in row:
        return headers + [("Authorization", f"Bearer {row['bearer']}")]
    claims = {"scope": row.get("scopes", "")}
    if "launch" in row:
        claims["patient"] = row["launch"]
    claims.update(row.get("claims", {}))
    return headers + [("Authorization", f"Bearer {mint(keys['ES256'], **claims)}")]


def check_upstream(row: dict, seen: list, body: bytes | None) -> list[str]:
    """What is wrong with what reached the upstream for `row` (`seen`: its requests there)."""
    problems = []
    if row["want"] == "ok":
        if [(r.method, r.path) for r in seen] != [(row["method"], row["path"])]:
            problems.append(f"upstream saw {[(r.method, r.path) for r in seen]}")
        elif body is not None and seen[0].body != body:
            problems.append(f"upstream body {seen[0].body[:40]!r}… differs from what was sent")
        elif seen[0].header_all("authorization"):
            problems.append("the token was forwarded")
        elif row.get("rule") and seen[0].header("x-phi-rule") != row["rule"]:
            problems.append(f"x-phi-rule {seen[0].header('x-phi-rule')}")
    elif row.get("reads_body"):
        # Its headers went on ahead of the form (README): the upstream may
        # have seen them, never the whole request.
        if any(body and r.body == body for r in seen):
            problems.append("a refused search reached the upstream whole")
    elif seen:
        problems.append(f"a refused request reached the upstream: {[(r.method, r.path) for r in seen]}")
    return problems


def check_answer(row: dict, resp, seen: list, body: bytes | None) -> list[str]:
    """What is wrong with the answer to `row` and with what reached the upstream."""
    want = row["want"]
    if resp.status != STATUS[want]:
        return [f"status {resp.status} (want {STATUS[want]}): {resp.text!r}"]
    problems = check_upstream(row, seen, body)
    if want == "ok":
        return problems
    www = [v for k, v in resp.headers if k.lower() == "www-authenticate"]
    if want == "insufficient_scope":
        scheme, params = challenge_of(resp)
        if (scheme, params.get("error")) != ("Bearer", ("insufficient_scope", True)):
            problems.append(f"challenge {www}")
        elif params.get("scope") != (row["scope"], True):
            problems.append(f"scope {params.get('scope')} (want {row['scope']!r})")
    elif want == "missing_token":
        if www != ['Bearer realm="phi-guard"']:
            problems.append(f"challenge {www}")
    elif want == "malformed_token":
        if www != ['Bearer error="invalid_token"']:
            problems.append(f"challenge {www}")
    elif www:
        problems.append(f"a challenge where none helps: {www}")
    return problems


def check_record(row: dict, record: dict | None, key: bytes) -> list[str]:
    if record is None:
        return ["no audit record"]
    problems = []
    if record["reason"] != row["want"]:
        problems.append(f"reason {record['reason']}")
    if "rule" in row and record.get("rule", "-") != row["rule"]:
        problems.append(f"rule {record.get('rule')}")
    if "interaction" in row and record.get("fhir_interaction", "-") != row["interaction"]:
        problems.append(f"fhir_interaction {record.get('fhir_interaction')}")
    if "patient" in row:
        want = None if row["patient"] == "-" else patient_fp(key, row["patient"])
        if record.get("patient_fp") != want:
            problems.append(f"patient_fp {record.get('patient_fp')} (want {want} for {row['patient']})")
    if row["want"] == "insufficient_scope" and row.get("rule", "fhir") == "fhir":
        if record.get("scopes_required") != row["scope"].split(" "):
            problems.append(f"scopes_required {record.get('scopes_required')}")
    return problems


def upstream_quiet(upstream, for_seconds: float = 0.5) -> bool:
    """No new request reached the upstream for `for_seconds`."""
    before = len(upstream.requests)
    time.sleep(for_seconds)
    return len(upstream.requests) == before


E2E_POLICIES = sorted({r["policy"] for r in TABLE["rows"] if r.get("e2e")})


@pytest.mark.parametrize("policy_name", E2E_POLICIES)
def test_fhir_table_rows_in_envoy(envoy_factory, jwks_server, upstream, keys, monkeypatch, policy_name, build):
    key = f"fhir-audit-key-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)  # Envoy inherits the test's environment
    envoy = envoy_factory(table_policy(policy_name, jwks_server.port), host_env_keys=[KEY_ENV])
    rows = [r for r in TABLE["rows"] if r.get("e2e") and r["policy"] == policy_name]
    if build == "native":
        # The module reads no body (README, Native module): form rows are
        # test_native_refuses_a_search_its_form_would_decide's.
        rows = [r for r in rows if "form" not in r]
    assert rows
    wrong = []

    def what_reached(i: int) -> list:
        # Each row's requests are told apart by a header of their own: a
        # search refused after its form arrives had its headers sent ahead,
        # and Envoy resets that upstream stream, so the upstream may note
        # them only after the answer, while a later row is under way.
        return [r for r in upstream.requests if r.header("x-test-row") == str(i)]

    def name(row: dict) -> str:
        return f"{row['method']} {row['path']} [{row.get('scopes', '')}] ({row['why']})"

    upstream.reset()
    for i, row in enumerate(rows):
        body = row_body(row)
        headers = row_headers(row, keys) + [("x-test-row", str(i))]
        resp = envoy.request(row["method"], row["path"], headers=headers, body=body)
        for problem in check_answer(row, resp, what_reached(i), body):
            wrong.append(f"{name(row)}: {problem}")
    records = audits(envoy, len(rows))
    # Every stream has ended (each has its record): what reached the
    # upstream late is held to the same rules.
    settled = eventually(lambda: upstream_quiet(upstream), timeout=10)
    assert settled, "the upstream kept receiving"
    for i, row in enumerate(rows):
        for problem in check_upstream(row, what_reached(i), row_body(row)):
            late = f"{name(row)}: {problem}"
            if late not in wrong:
                wrong.append(late)
    for row, record in zip(rows, records):
        for problem in check_record(row, record, key.encode()):
            wrong.append(f"{row['method']} {row['path']} record ({row['why']}): {problem}")
    assert not wrong, f"{len(wrong)} wrong of {len(rows)} rows:\n" + "\n".join(wrong)
    assert envoy.alive, envoy.log_tail()


def test_the_patient_id_is_never_in_clear(envoy_factory, jwks_server, upstream, keys, monkeypatch, build):
    """Records name the compartment's patient by its keyed fingerprint (one
    key for every worker, so one fingerprint); when the id is only in the query or the form, no
    log holds it (an id in the path, /fhir/Patient/[id], stays in the
    record's and Envoy's `path`, as every path does)."""
    key = f"fhir-audit-key-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)
    policy = table_policy("fhir", jwks_server.port)
    envoy = envoy_factory(policy, host_env_keys=[KEY_ENV], concurrency=2, log_level="info")
    patient = f"pt-{uuid.uuid4().hex[:10]}"
    token = mint(keys["ES256"], scope="patient/Observation.rs patient/Condition.rs", patient=patient)
    paths = [f"/fhir/Observation?patient={patient}&code=8867-4", f"/fhir/Condition?subject=Patient/{patient}"]
    n = 12
    for i in range(n):
        resp = envoy.get(paths[i % 2], token=token)
        assert resp.status == 200, (resp.status, resp.text)
    if build == "native":
        # The module reads no form: one more search by query in its place.
        resp = envoy.get(paths[0], token=token)
    else:
        form = f"patient={patient}".encode()
        resp = envoy.request("POST", "/fhir/Observation/_search", token=token, body=form, headers={"Content-Type": FORM})
    assert resp.status == 200, (resp.status, resp.text)
    # Another patient's search, refused, is fingerprinted too (who tried to reach whom).
    other = f"pt-{uuid.uuid4().hex[:10]}"
    resp = envoy.get(f"/fhir/Observation?patient={other}", token=token)
    assert resp.status == 403, (resp.status, resp.text)
    records = audits(envoy, n + 2)
    # Two workers write their lines as their streams end: not in request order.
    allowed = [r for r in records if r["reason"] == "ok"]
    (refused,) = [r for r in records if r["reason"] == "insufficient_scope"]
    want = patient_fp(key.encode(), patient)
    assert len(allowed) == n + 1 and {r["patient_fp"] for r in allowed} == {want}
    assert refused["patient_fp"] == patient_fp(key.encode(), other) != want
    assert {r["fhir_type"] for r in records} == {"Observation", "Condition"}
    assert all(r["fhir_interaction"] == "search-type" for r in records)
    for text in (envoy.access_log_path.read_text(), envoy.log_text()):
        assert patient not in text and other not in text and key not in text


def test_no_audit_key_no_patient_fp(envoy_factory, jwks_server, upstream, keys):
    """Without audit.hmac_key_env there is nothing to key a fingerprint with: none is written."""
    envoy = envoy_factory(table_policy("fhir", jwks_server.port, audit_key_env=None))
    token = mint(keys["ES256"], scope="patient/Observation.rs", patient="123")
    assert envoy.get("/fhir/Observation?patient=123", token=token).status == 200
    (record,) = audits(envoy, 1)
    assert (record["fhir_interaction"], record["fhir_type"]) == ("search-type", "Observation")
    assert "patient_fp" not in record, record
    assert "no audit.hmac_key_env, so audit records carry no patient_fp" in envoy.log_text(), envoy.log_tail()


def test_search_body_is_read_only_for_the_fhir_model(envoy_factory, jwks_server, upstream, keys, build):
    """A create's body, an explicit rule's body and a body sent while the request
    waits for nothing are forwarded untouched; a _search form reaches the upstream
    whole after it was read."""
    only(build, "wasm", "the native module reads no body")
    policy = table_policy("fhir", jwks_server.port, audit_key_env=None)
    policy["rules"].append({"id": "search-rule", "methods": ["POST"], "path": "/fhir/Basic/_search", "scopes": ["basic:search"]})
    envoy = envoy_factory(policy)
    big = b'{"resourceType": "Observation", "note": "' + b"x" * 100_000 + b'"}'
    tok = mint(keys["ES256"], scope="user/Observation.c basic:search")
    resp = envoy.request("POST", "/fhir/Observation", token=tok, body=big, headers={"Content-Type": "application/fhir+json"})
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.body == big
    # An explicit rule decides without the body, whatever its size or type.
    upstream.reset()
    resp = envoy.request("POST", "/fhir/Basic/_search", token=tok, body=big, headers={"Content-Type": "application/json"})
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.body == big
    # The FHIR model reads a _search form and forwards it as it came.
    upstream.reset()
    form = b"patient=123&code=http%3A%2F%2Floinc.org%7C8867-4&_count=10"
    tok = mint(keys["ES256"], scope="patient/Observation.rs", patient="123")
    resp = envoy.request("POST", "/fhir/Observation/_search", token=tok, body=form, headers={"Content-Type": FORM})
    assert resp.status == 200, (resp.status, resp.text)
    assert (upstream.last.path, upstream.last.body) == ("/fhir/Observation/_search", form)
    records = audits(envoy, 3)
    assert [r["reason"] for r in records] == ["ok"] * 3
    assert [r.get("rule") for r in records] == ["fhir", "search-rule", "fhir"]
    # Never a body in the record.
    assert all("loinc" not in json.dumps(r) and "xxxx" not in json.dumps(r) for r in records), records


def test_search_body_waits_for_keys_too(envoy_factory, jwks_server, upstream, keys, build):
    """A _search read before any keys came waits for them, then is decided on its form."""
    only(build, "wasm", "the native module reads no body")
    policy = table_policy("fhir", jwks_server.port, audit_key_env=None)
    policy["providers"][0]["jwks"].update(timeout_ms=30000)
    jwks_server.hold()
    envoy = envoy_factory(policy)
    try:
        assert jwks_server.wait_held(1, timeout=30), envoy.log_tail()
        import threading

        answers = []
        tok = mint(keys["ES256"], scope="patient/Observation.rs", patient="123")

        def send(form: bytes):
            answers.append(
                envoy.request("POST", "/fhir/Observation/_search", token=tok, body=form, headers={"Content-Type": FORM})
            )

        threads = [threading.Thread(target=send, args=(f,), daemon=True) for f in (b"patient=123", b"patient=456")]
        for t in threads:
            t.start()
        assert eventually(lambda: envoy.phi_stats().get("key_cache.miss", 0) >= 1, timeout=15), envoy.phi_stats()
        assert upstream.requests == [] and answers == []
    finally:
        jwks_server.release()
    for t in threads:
        t.join(30)
    assert sorted(a.status for a in answers) == [200, 403], [(a.status, a.text) for a in answers]
    # The refused one's headers may have gone on ahead of its form; only the allowed one arrived whole.
    whole = [(r.path, r.body) for r in upstream.requests if r.body]
    assert whole == [("/fhir/Observation/_search", b"patient=123")], whole


def test_native_refuses_a_search_its_form_would_decide(envoy_factory, jwks_server, upstream, keys, build):
    """The native module reads no body: a _search whose form would decide it is
    refused 400 bad_fhir_request (never judged on its query alone), nothing
    reaches the upstream, and the load log says so; GET searches are judged."""
    only(build, "native", "the wasm filter reads the form")
    envoy = envoy_factory(table_policy("fhir", jwks_server.port, audit_key_env=None))
    tok = mint(keys["ES256"], scope="patient/Observation.rs", patient="123")
    resp = envoy.request("POST", "/fhir/Observation/_search", token=tok, body=b"patient=123", headers={"Content-Type": FORM})
    assert resp.status == 400 and resp.text == "bad request\n", (resp.status, resp.text)
    assert upstream.requests == []
    assert envoy.get("/fhir/Observation?patient=123", token=tok).status == 200
    refused, allowed = audits(envoy, 2)
    assert (refused["reason"], refused["rule"], refused["fhir_interaction"]) == ("bad_fhir_request", "fhir", "search-type")
    assert allowed["reason"] == "ok"
    assert "reads no request body" in envoy.log_text(), envoy.log_tail()
