"""Step-up authentication (RFC 9470) through the real Envoy with the built
phi-guard .wasm (issue #4). The shipped policy protects FHIR bulk data export
— the kick-off URLs, status polling and the files — with scope export:bulk and
`"step_up": "default"`, i.e. step_up_defaults: acr "urn:example:loa:mfa" and an
authentication (auth_time) at most 300 s old; clock skew is 60 s.

Order per rule (README "What a request goes through", 5.): token age, then
scopes (403 insufficient_scope), then step-up (401
insufficient_user_authentication).
"""

from __future__ import annotations

import time

import pytest

from harness import Response, assert_insufficient_scope, audits, challenge_of, mint

MFA = "urn:example:loa:mfa"
EXPORT = "/fhir/$export"

# Every bulk-data URL of the shipped policy: (method, path, rule id).
BULK_URLS = [
    ("GET", "/fhir/$export", "bulk-export"),
    ("GET", "/fhir/Patient/$export", "bulk-export-patient"),
    ("GET", "/fhir/Group/cohort-7/$export", "bulk-export-group"),
    ("GET", "/fhir/bulkstatus/job-42", "bulk-status"),
    ("DELETE", "/fhir/bulkstatus/job-42", "bulk-status"),
    ("GET", "/fhir/bulkfiles/job-42/Patient.1.ndjson", "bulk-files"),
    ("GET", "/fhir/bulkfiles/job-42/out/Observation.3.ndjson", "bulk-files"),
]


def export_token(
    keys, scope: str | None = "export:bulk", acr: str | None = MFA, auth_age: int | None = 30, **claims
) -> str:
    """A token for bulk export: by default stepped up (mfa, authenticated
    `auth_age` seconds ago); None drops the claim."""
    now = int(time.time())
    return mint(
        keys["ES256"],
        scope=scope,
        acr=acr,
        auth_time=None if auth_age is None else now - auth_age,
        **claims,
    )


def assert_step_up_challenge(
    resp: Response, upstream, acr_values: list[str] | None = None, max_age: int | None = 300
) -> None:
    """401 with the RFC 9470 challenge, checked field by field:
    Bearer error="insufficient_user_authentication", error_description="…",
    acr_values="<space-separated>", max_age=<number>. A field the rule does not
    set must be absent."""
    acr_values = [MFA] if acr_values is None else acr_values
    assert resp.status == 401, (resp.status, resp.text)
    scheme, params = challenge_of(resp)
    assert scheme == "Bearer"
    assert params.pop("error") == ("insufficient_user_authentication", True)
    description, quoted = params.pop("error_description")
    assert quoted and description.strip(), description
    if acr_values:
        # RFC 9470 §3: a quoted, space-separated list, in the rule's order.
        assert params.pop("acr_values") == (" ".join(acr_values), True)
    if max_age is not None:
        # RFC 9470 §3: max_age is a number, not a quoted-string.
        assert params.pop("max_age") == (str(max_age), False)
    assert params == {}, f"unexpected or missing parameters: {params}"
    assert upstream.requests == [], "a refused request reached the upstream"


# --------------------------------------------------------------------------
# /fhir/$export: each way of failing step-up


@pytest.mark.parametrize(
    "claims, failed",
    [
        pytest.param({"acr": None}, "acr", id="no_acr"),
        pytest.param({"acr": "urn:example:loa:pwd"}, "acr", id="wrong_acr"),
        pytest.param({"acr": "urn:example:loa:mfa:weak"}, "acr", id="acr_longer_than_wanted"),
        # 400 s ago: past max_age_seconds (300) plus the 60 s clock skew.
        pytest.param({"auth_age": 400}, "age", id="stale_auth_time"),
        pytest.param({"auth_age": None}, "age", id="missing_auth_time"),
        pytest.param({"auth_age": -600}, "age", id="auth_time_in_future"),
    ],
)
def test_export_without_step_up_is_401_insufficient_user_authentication(envoy, upstream, keys, claims, failed):
    tok = export_token(keys, **claims)
    resp = envoy.get(EXPORT, token=tok)
    assert_step_up_challenge(resp, upstream)
    assert tok not in resp.text
    (record,) = audits(envoy, 1)
    # The audit says which requirement failed (the wire answer does not).
    assert (record["reason"], record["step_up"], record["rule"]) == ("step_up_required", failed, "bulk-export")


def test_acr_that_is_not_a_string_is_a_malformed_token(envoy, upstream, keys):
    # OIDC Core §2: acr is a string. An array holding the wanted value is not
    # that value: the token is malformed (401 invalid_token), not one a step-up could fix.
    tok = export_token(keys, acr=[MFA])
    resp = envoy.get(EXPORT, token=tok)
    assert resp.status == 401, (resp.status, resp.text)
    assert challenge_of(resp) == ("Bearer", {"error": ("invalid_token", True)})
    assert upstream.requests == []
    (record,) = audits(envoy, 1)
    assert (record["reason"], record["rule"]) == ("malformed_token", "bulk-export"), record


def test_export_with_step_up_satisfied_is_allowed(envoy, upstream, keys):
    resp = envoy.get(EXPORT, token=export_token(keys, sub="analyst-1", auth_age=250))
    assert resp.status == 200, (resp.status, resp.text, envoy.log_tail())
    seen = upstream.last
    assert (seen.method, seen.path) == ("GET", EXPORT)
    assert seen.header("x-phi-rule") == "bulk-export"
    assert seen.header("x-phi-subject") == "analyst-1"
    assert seen.header("x-phi-scopes") == "export:bulk"
    assert seen.header_all("authorization") == []


def test_step_up_satisfied_but_scope_missing_is_403_insufficient_scope(envoy, upstream, keys):
    resp = envoy.get(EXPORT, token=export_token(keys, scope="read:patient-profile"))
    assert_insufficient_scope(resp, upstream, {"export:bulk"})


def test_scope_is_checked_before_step_up(envoy, upstream, keys):
    # Neither scope nor step-up: the answer is about the scope, since stepping
    # up would not help a token that can never export.
    resp = envoy.get(EXPORT, token=export_token(keys, scope="read:patient-profile", acr=None, auth_age=None))
    assert_insufficient_scope(resp, upstream, {"export:bulk"})
    (record,) = audits(envoy, 1)
    assert record["reason"] == "insufficient_scope"


def test_export_without_token_asks_for_a_token_not_a_step_up(envoy, upstream):
    resp = envoy.get(EXPORT)
    assert resp.status == 401, (resp.status, resp.text)
    scheme, params = challenge_of(resp)
    assert (scheme, params) == ("Bearer", {"realm": ("phi-guard", True)})
    assert upstream.requests == []


def test_step_up_does_not_apply_to_other_rules(envoy, upstream, keys):
    # A plain password login reads a patient: step-up is per rule.
    tok = export_token(keys, scope="read:patient-profile export:bulk", acr="urn:example:loa:pwd", auth_age=None)
    assert envoy.get("/fhir/Patient/123", token=tok).status == 200
    assert envoy.get(EXPORT, token=tok).status == 401


def test_step_up_challenges_are_counted(envoy, keys):
    envoy.get(EXPORT, token=export_token(keys, acr=None))
    envoy.get(EXPORT, token=export_token(keys, auth_age=None))
    stats = envoy.admin("/stats?filter=phi_guard").text
    counters = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
    assert counters.get("wasmcustom.phi_guard.step_up_challenges") == "2", stats
    assert counters.get("wasmcustom.phi_guard.denied.step_up_required") == "2", stats


# --------------------------------------------------------------------------
# Every bulk URL: a token that could not start an export gets nothing


def _url_id(case) -> str:
    return case.id if hasattr(case, "id") else f"{case[0]} {case[1]}"


@pytest.mark.parametrize("method, path, rule", BULK_URLS, ids=[_url_id(c) for c in BULK_URLS])
def test_every_bulk_url_demands_scope_and_step_up(envoy, upstream, keys, method, path, rule):
    # Refused at kick-off: not stepped up (a long-lived session from this morning).
    not_stepped_up = export_token(keys, acr="urn:example:loa:pwd", auth_age=3 * 3600)
    resp = envoy.request(method, path, token=not_stepped_up)
    assert_step_up_challenge(resp, upstream)
    # Step-up that has gone stale since the export was started.
    assert_step_up_challenge(envoy.request(method, path, token=export_token(keys, auth_age=400)), upstream)
    # Refused at kick-off: stepped up, but no export:bulk (an ordinary clinician token).
    no_scope = export_token(keys, scope="read:patient-profile update:billing delete:lab-results")
    assert_insufficient_scope(envoy.request(method, path, token=no_scope), upstream, {"export:bulk"})
    # No token at all.
    assert envoy.request(method, path).status == 401
    assert upstream.requests == []

    # The token that could start the export can poll and fetch too.
    resp = envoy.request(method, path, token=export_token(keys))
    assert resp.status == 200, (resp.status, resp.text)
    assert [(r.method, r.path) for r in upstream.requests] == [(method, path)]
    assert upstream.last.header("x-phi-rule") == rule


def test_bulk_status_refuses_methods_it_does_not_list(envoy, upstream, keys):
    tok = export_token(keys)
    for method in ("POST", "PUT", "PATCH"):
        resp = envoy.request(method, "/fhir/bulkstatus/job-42", token=tok)
        assert resp.status == 403, (method, resp.status, resp.text)
        assert resp.header("www-authenticate") is None
    assert upstream.requests == []


def test_percent_encoded_dollar_is_the_same_export_rule(envoy, upstream, keys):
    # Envoy leaves %24 encoded; the filter decodes once and must still see
    # /fhir/$export (what the upstream serves), not a path with no step-up.
    resp = envoy.get("/fhir/%24export", token=export_token(keys, acr=None))
    assert_step_up_challenge(resp, upstream)
    resp = envoy.get("/fhir/Group/cohort-7/%24export", token=export_token(keys, auth_age=None))
    assert_step_up_challenge(resp, upstream)
    resp = envoy.get("/fhir/%24export", token=export_token(keys))
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header("x-phi-rule") == "bulk-export"


def test_bulk_file_path_traversal_does_not_skip_step_up(envoy, upstream, keys):
    # Envoy resolves the dot segments first; the filter judges the result,
    # which is again a bulk-files path needing step-up.
    tok = export_token(keys, acr=None)
    resp = envoy.get("/fhir/Patient/../bulkfiles/job-42/Patient.1.ndjson", token=tok)
    assert_step_up_challenge(resp, upstream)
    resp = envoy.get("/fhir/bulkfiles/job-42/%2e%2e/%2e%2e/Group/cohort-7/$export", token=tok)
    assert_step_up_challenge(resp, upstream)


def test_patient_level_export_is_not_open_to_patient_readers(envoy, upstream, keys):
    # An ordinary clinician token: may read a patient, may not export, and did
    # not step up. Kicking off a Patient-level bulk export must be refused —
    # for the scope first (403 insufficient_scope, scope="export:bulk").
    clinician = mint(keys["ES256"], scope="read:patient-profile", acr="urn:example:loa:pwd")
    resp = envoy.get("/fhir/Patient/$export", token=clinician)
    assert upstream.requests == [], f"export started by a patient reader, as rule {upstream.last.header('x-phi-rule')}"
    assert_insufficient_scope(resp, upstream, {"export:bulk"})


# --------------------------------------------------------------------------
# Rules with their own step_up: amr_any, several acr values, another max_age


def _custom_policy(policy: dict) -> dict:
    policy["rules"] = [
        {"id": "order-sign", "methods": ["POST"], "path": "/orders/{id}/sign", "scopes": ["sign:orders"],
         "step_up": {"amr_any": ["otp", "hwk"]}},
        {"id": "key-rotate", "methods": ["POST"], "path": "/admin/keys", "scopes": ["admin:keys"],
         "step_up": {"acr_values": [MFA, "urn:example:loa:hw"], "amr_any": ["hwk"], "max_age_seconds": 120}},
    ]
    return policy


def test_amr_any_requires_one_listed_method(envoy_factory, policy, upstream, keys):
    envoy = envoy_factory(_custom_policy(policy))
    sign = lambda **c: mint(keys["ES256"], scope="sign:orders", **c)  # noqa: E731

    for amr in (["pwd"], [], ["OTP"], ["otp-ish"]):
        resp = envoy.request("POST", "/orders/o-1/sign", token=sign(amr=amr))
        # Only amr is asked for: the challenge names no acr_values and no max_age.
        assert_step_up_challenge(resp, upstream, acr_values=[], max_age=None)
    resp = envoy.request("POST", "/orders/o-1/sign", token=sign())  # no amr claim
    assert_step_up_challenge(resp, upstream, acr_values=[], max_age=None)
    records = audits(envoy, 5)
    assert {(r["reason"], r["step_up"]) for r in records} == {("step_up_required", "amr")}

    for amr in (["pwd", "otp"], ["hwk"]):
        upstream.reset()
        resp = envoy.request("POST", "/orders/o-1/sign", token=sign(amr=amr))
        assert resp.status == 200, (amr, resp.status, resp.text)
        assert upstream.last.header("x-phi-rule") == "order-sign"
    # amr_any alone puts no limit on acr or auth_time.
    upstream.reset()
    resp = envoy.request("POST", "/orders/o-1/sign", token=sign(amr=["otp"], acr="urn:example:loa:pwd", auth_time=1))
    assert resp.status == 200, (resp.status, resp.text)


def test_custom_step_up_checks_every_part_and_says_so(envoy_factory, policy, upstream, keys):
    envoy = envoy_factory(_custom_policy(policy))
    now = int(time.time())
    rotate = lambda **c: mint(keys["ES256"], **{"scope": "admin:keys", **c})  # noqa: E731
    want = {"acr_values": [MFA, "urn:example:loa:hw"], "max_age": 120}

    good = {"acr": "urn:example:loa:hw", "amr": ["pwd", "hwk"], "auth_time": now - 30}
    resp = envoy.request("POST", "/admin/keys", token=rotate(**good))
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header("x-phi-rule") == "key-rotate"
    upstream.reset()

    failing = [
        ({**good, "acr": "urn:example:loa:pwd"}, "acr"),
        ({**good, "amr": ["pwd", "otp"]}, "amr"),  # otp is not enough here
        # 200 s: past 120 + 60 s skew, yet within the default policy's 300.
        ({**good, "auth_time": now - 200}, "age"),
    ]
    for claims, _ in failing:
        assert_step_up_challenge(envoy.request("POST", "/admin/keys", token=rotate(**claims)), upstream, **want)
    records = audits(envoy, 1 + len(failing))[1:]
    assert [r["step_up"] for r in records] == [part for _, part in failing]

    # Scope still comes first.
    resp = envoy.request("POST", "/admin/keys", token=rotate(**{**good, "acr": None, "scope": "sign:orders"}))
    assert_insufficient_scope(resp, upstream, {"admin:keys"})
