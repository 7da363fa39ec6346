"""Rules through the real Envoy with the built phi-guard .wasm (issue #3):
which rule a request lands on, what its token's scopes allow, what reaches the
upstream and what never does. Unless a test says otherwise it runs on the
shipped policy (envoy/envoy.yaml), whose rules are:

    health          *                /healthz             public
    patient-read    GET              /fhir/Patient/{id}   read:patient-profile
    billing-update  PUT PATCH        /billing/{account}   update:billing
    lab-delete      DELETE           /labs/{id}           delete:lab-results, token at most 300 s old
    bulk-*          (see test_stepup.py)

and whose claims_to_headers forward sub, client_id, scopes and rule as
x-phi-subject, x-phi-client-id, x-phi-scopes and x-phi-rule.
"""

from __future__ import annotations

import time

import pytest
import yaml

from harness import ISSUER, Response, assert_insufficient_scope, audits, challenge_of, mint, phi_guard_stats

PATIENT = "/fhir/Patient/123"
IDENTITY_HEADERS = ["x-phi-subject", "x-phi-client-id", "x-phi-scopes", "x-phi-rule"]
ALL_SCOPES = "read:patient-profile update:billing delete:lab-results export:bulk"


# --------------------------------------------------------------------------
# Helpers


def assert_no_rule(resp: Response, upstream) -> None:
    """Default deny: 403 with no challenge (no token would help)."""
    assert resp.status == 403, (resp.status, resp.text)
    assert resp.header("www-authenticate") is None, resp.headers
    assert upstream.requests == [], "a refused request reached the upstream"


def token(keys, scope: str | None = "read:patient-profile", **claims) -> str:
    return mint(keys["ES256"], scope=scope, **claims)


# --------------------------------------------------------------------------
# Allowed


def test_allowed_request_reaches_upstream_with_identity_headers(envoy, upstream, keys):
    tok = token(keys, scope="read:patient-profile openid", sub="user-4711", client_id="ward-app")
    resp = envoy.get(PATIENT, token=tok)
    assert resp.status == 200, (resp.status, resp.text, envoy.log_tail())
    assert resp.text == "upstream ok\n"
    assert len(upstream.requests) == 1
    seen = upstream.last
    assert (seen.method, seen.path) == ("GET", PATIENT)
    assert seen.header_all("x-phi-subject") == ["user-4711"]
    assert seen.header_all("x-phi-client-id") == ["ward-app"]
    assert seen.header_all("x-phi-rule") == ["patient-read"]
    assert sorted(seen.header("x-phi-scopes").split(" ")) == ["openid", "read:patient-profile"]
    # forward_token is false in the shipped policy.
    assert seen.header_all("authorization") == []
    (record,) = audits(envoy, 1)
    assert (record["decision"], record["reason"], record["rule"]) == ("allow", "ok", "patient-read")


def test_each_rule_allows_its_own_method_and_scope(envoy, upstream, keys):
    cases = [
        ("PUT", "/billing/acct-9", "update:billing", "billing-update"),
        ("PATCH", "/billing/acct-9", "update:billing", "billing-update"),
        ("DELETE", "/labs/lab-1", "delete:lab-results", "lab-delete"),
    ]
    for method, path, scope, rule in cases:
        upstream.reset()
        resp = envoy.request(method, path, token=token(keys, scope=scope), body=b"{}")
        assert resp.status == 200, (method, path, resp.status, resp.text)
        assert (upstream.last.method, upstream.last.path) == (method, path)
        assert upstream.last.header_all("x-phi-rule") == [rule]


# --------------------------------------------------------------------------
# Scopes


@pytest.mark.parametrize(
    "method, path, scope, required",
    [
        pytest.param("GET", PATIENT, "update:billing delete:lab-results", {"read:patient-profile"}, id="patient-read"),
        pytest.param("PATCH", "/billing/acct-9", "read:patient-profile", {"update:billing"}, id="billing-update"),
        pytest.param(
            "DELETE", "/labs/lab-1", "read:patient-profile update:billing", {"delete:lab-results"}, id="lab-delete"
        ),
        # A scope that merely starts like the required one is another scope.
        pytest.param("GET", PATIENT, "read:patient-profile-lite read:patient", {"read:patient-profile"}, id="prefix"),
        pytest.param("GET", PATIENT, "READ:PATIENT-PROFILE", {"read:patient-profile"}, id="case"),
        pytest.param("GET", PATIENT, None, {"read:patient-profile"}, id="no_scope_claim"),
    ],
)
def test_insufficient_scope_is_403_naming_the_rule_scopes(envoy, upstream, keys, method, path, scope, required):
    tok = token(keys, scope=scope)
    resp = envoy.request(method, path, token=tok)
    assert_insufficient_scope(resp, upstream, required)
    assert tok not in resp.text


def test_challenge_names_all_scopes_or_any_of_scopes(envoy_factory, policy, upstream, keys):
    policy["rules"] = [
        {"id": "notes", "methods": ["GET"], "path": "/notes/{id}", "scopes": ["read:notes", "read:patient-profile"]},
        {"id": "docs", "methods": ["GET"], "path": "/docs/{rest=**}", "scopes_any": ["docs:read", "docs:admin"]},
    ]
    envoy = envoy_factory(policy)
    # `scopes`: every one is needed; having one of two is not enough.
    resp = envoy.get("/notes/7", token=token(keys, scope="read:patient-profile"))
    assert_insufficient_scope(resp, upstream, {"read:notes", "read:patient-profile"})
    assert envoy.get("/notes/7", token=token(keys, scope="read:patient-profile read:notes")).status == 200
    # `scopes_any`: one is enough; the challenge names the choices.
    upstream.reset()
    resp = envoy.get("/docs/a/b", token=token(keys, scope="docs:write"))
    assert_insufficient_scope(resp, upstream, {"docs:read", "docs:admin"})
    resp = envoy.get("/docs/a/b", token=token(keys, scope="docs:admin"))
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header("x-phi-rule") == "docs"


@pytest.mark.parametrize(
    "wildcard",
    ["*", "read:*", "*:*", "patient/*.*", "all", "ALL", "read:all", "x:all", "x.all", "read:patient-profile:all"],
)
def test_wildcard_scope_grants_nothing(envoy, upstream, keys, wildcard):
    # deny_wildcard_scopes defaults to true (and the shipped policy says so).
    resp = envoy.get(PATIENT, token=token(keys, scope=wildcard))
    assert_insufficient_scope(resp, upstream, {"read:patient-profile"})


def test_wildcard_scopes_are_dropped_from_the_granted_set(envoy, upstream, keys):
    # Beside a real scope, wildcards neither help nor travel upstream as granted.
    tok = token(keys, scope="* x:all x.all read:* read:patient-profile", scp=["patient/*.*", "all"])
    resp = envoy.get(PATIENT, token=tok)
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header("x-phi-scopes") == "read:patient-profile"


def test_wildcards_are_never_expanded_even_when_allowed(envoy_factory, policy, upstream, keys):
    policy["deny_wildcard_scopes"] = False
    envoy = envoy_factory(policy)
    resp = envoy.get(PATIENT, token=token(keys, scope="* read:* read:all"))
    # Kept as granted, `*` is only the scope named `*`.
    assert_insufficient_scope(resp, upstream, {"read:patient-profile"})
    resp = envoy.request("DELETE", "/labs/1", token=token(keys, scope="* delete:lab-results"))
    assert resp.status == 200, (resp.status, resp.text)
    assert sorted(upstream.last.header("x-phi-scopes").split(" ")) == ["*", "delete:lab-results"]


def test_scopes_from_scp_array(envoy, upstream, keys):
    resp = envoy.get(PATIENT, token=token(keys, scope=None, scp=["openid", "read:patient-profile"]))
    assert resp.status == 200, (resp.status, resp.text)
    assert sorted(upstream.last.header("x-phi-scopes").split(" ")) == ["openid", "read:patient-profile"]

    upstream.reset()
    resp = envoy.get(PATIENT, token=token(keys, scope=None, scp=["update:billing"]))
    assert_insufficient_scope(resp, upstream, {"read:patient-profile"})
    # An scp element is one scope, never split on spaces.
    resp = envoy.get(PATIENT, token=token(keys, scope=None, scp=["openid read:patient-profile"]))
    assert_insufficient_scope(resp, upstream, {"read:patient-profile"})
    resp = envoy.get(PATIENT, token=token(keys, scope=None, scp=["*"]))
    assert_insufficient_scope(resp, upstream, {"read:patient-profile"})


def test_scope_and_scp_claims_add_up(envoy, upstream, keys):
    tok = token(keys, scope="update:billing", scp=["read:patient-profile"])
    assert envoy.get(PATIENT, token=tok).status == 200
    assert envoy.request("PATCH", "/billing/1", token=tok).status == 200
    assert [r.header("x-phi-rule") for r in upstream.requests] == ["patient-read", "billing-update"]


# --------------------------------------------------------------------------
# Rules: method, path, default deny


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", PATIENT),
        ("DELETE", PATIENT),
        ("PUT", PATIENT),
        ("GET", "/billing/acct-9"),
        ("DELETE", "/billing/acct-9"),
        ("GET", "/labs/lab-1"),
        ("PATCH", "/labs/lab-1"),
        ("POST", "/fhir/$export"),
    ],
)
def test_method_not_allowed_by_any_rule_is_403(envoy, upstream, keys, method, path):
    # The token holds every scope: only the method is wrong.
    resp = envoy.request(method, path, token=token(keys, scope=ALL_SCOPES))
    assert_no_rule(resp, upstream)
    (record,) = audits(envoy, 1)
    assert (record["reason"], record.get("rule")) == ("no_rule", None)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/fhir",
        "/fhir/Patient",
        "/fhir/Patient/",  # {id} needs a non-empty segment
        "/fhir/Patient/123/_history/1",  # {id} is one segment only
        "/fhir/Observation/1",
        "/FHIR/Patient/123",  # literals are case-sensitive
        "/healthz/extra",
        "/admin",
    ],
)
def test_unmatched_path_is_403_default_deny(envoy, upstream, keys, path):
    resp = envoy.get(path, token=token(keys, scope=ALL_SCOPES))
    assert_no_rule(resp, upstream)


def test_unmatched_path_is_403_even_without_a_token(envoy, upstream):
    # No rule: no token could help, so no 401 challenge either.
    assert_no_rule(envoy.get("/fhir/Observation/1"), upstream)


def test_query_string_never_takes_part_in_matching(envoy, upstream, keys):
    reader = token(keys, scope="read:patient-profile")
    # A query that looks like another rule's path changes nothing ...
    resp = envoy.get(PATIENT + "?x=/labs/1", token=reader)
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.path == PATIENT + "?x=/labs/1"  # forwarded unchanged
    assert upstream.last.header("x-phi-rule") == "patient-read"
    upstream.reset()
    # ... neither to reach the other rule ...
    deleter = token(keys, scope="delete:lab-results")
    assert_no_rule(envoy.request("DELETE", PATIENT + "?x=/labs/1", token=deleter), upstream)
    assert_no_rule(envoy.request("DELETE", PATIENT + "?/labs/1", token=deleter), upstream)
    # ... nor to escape the rule the path names.
    resp = envoy.request("DELETE", "/labs/1?next=/fhir/Patient/1", token=reader)
    assert_insufficient_scope(resp, upstream, {"delete:lab-results"})
    assert_no_rule(envoy.get("/labs/1?/healthz", token=reader), upstream)
    # A public path with a protected-looking query is still only public.
    resp = envoy.get("/healthz?/fhir/Patient/1")
    assert resp.status == 200
    assert upstream.last.header("x-phi-rule") == "health"


# --------------------------------------------------------------------------
# Public rule


def test_public_path_needs_no_token(envoy, upstream):
    resp = envoy.get("/healthz")
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.path == "/healthz"
    assert upstream.last.header("x-phi-rule") == "health"
    assert upstream.last.header("x-phi-subject") is None


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer garbage",
        "Bearer e30.e30.",
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ],
)
def test_invalid_credentials_on_public_path_are_ignored_and_not_forwarded(envoy, upstream, authorization):
    resp = envoy.get("/healthz", headers=[("Authorization", authorization)])
    assert resp.status == 200, (resp.status, resp.text)
    assert resp.header("www-authenticate") is None
    assert upstream.last.header_all("authorization") == []
    assert upstream.last.header("x-phi-subject") is None


def test_valid_token_on_public_path_is_not_forwarded_even_with_forward_token(envoy_factory, policy, upstream, keys):
    policy["forward_token"] = True
    envoy = envoy_factory(policy)
    tok = token(keys, sub="user-4711")
    resp = envoy.get("/healthz", token=tok)
    assert resp.status == 200, (resp.status, resp.text)
    seen = upstream.last
    assert seen.header_all("authorization") == []
    # Ignored means ignored: no identity from it either.
    assert seen.header("x-phi-subject") is None and seen.header("x-phi-scopes") is None
    assert seen.header("x-phi-rule") == "health"


# --------------------------------------------------------------------------
# Token age per rule


def test_old_token_on_lab_delete_is_401_invalid_token(envoy, upstream, keys):
    now = int(time.time())
    # iat 400 s ago: past max_token_age_seconds (300) plus clock skew (60);
    # exp is still ahead and the lifetime (700 s) is under the 3600 s maximum.
    old = token(keys, scope="delete:lab-results read:patient-profile", iat=now - 400, exp=now + 300)
    resp = envoy.request("DELETE", "/labs/lab-1", token=old)
    assert resp.status == 401, (resp.status, resp.text)
    scheme, params = challenge_of(resp)
    assert (scheme, params) == ("Bearer", {"error": ("invalid_token", True)})
    assert upstream.requests == []
    # The age limit is the rule's: the same token still reads a patient.
    resp = envoy.get(PATIENT, token=old)
    assert resp.status == 200, (resp.status, resp.text)
    record, _ = audits(envoy, 2)
    assert (record["reason"], record["rule"]) == ("token_too_old", "lab-delete")
    assert phi_guard_stats(envoy)["denied.token_too_old"] == 1


def test_fresh_token_on_lab_delete_is_allowed_and_one_without_iat_is_not(envoy, upstream, keys):
    fresh = token(keys, scope="delete:lab-results")
    resp = envoy.request("DELETE", "/labs/lab-1", token=fresh)
    assert resp.status == 200, (resp.status, resp.text)
    assert (upstream.last.method, upstream.last.path) == ("DELETE", "/labs/lab-1")
    upstream.reset()
    # Without iat the age cannot be proven.
    resp = envoy.request("DELETE", "/labs/lab-1", token=token(keys, scope="delete:lab-results", iat=None))
    assert resp.status == 401, (resp.status, resp.text)
    assert 'error="invalid_token"' in resp.header("www-authenticate")
    assert upstream.requests == []


# --------------------------------------------------------------------------
# Path safety
#
# The shipped envoy.yaml has Envoy normalise the path before any filter runs:
# normalize_path (RFC 3986 dot-segment removal, `\` -> `/`, decoding of
# unreserved %XX such as %2e), merge_slashes, and
# path_with_escaped_slashes_action REJECT_REQUEST (%2F/%5C -> 400). So for most
# ambiguous paths it is Envoy that answers (400) or resolves the path, and the
# filter then decides on the same resolved path the upstream receives. What
# must hold either way: nothing ambiguous gets a 200 on another rule's
# resource, and the upstream never receives a path under a rule the token lacks.
#
# Which layer answered is read from the access log: no audit record means
# Envoy answered before the filter ran; otherwise the record's `path` is what
# the filter was handed and judged.

_READER = "read:patient-profile"  # the token in every case below can only read patients


def _envoy_refuses(case_id: str, method: str, raw_path: str):
    """Envoy answers 400 itself; the filter never sees the request."""
    return pytest.param(method, raw_path, 400, None, None, id=case_id)


def _filter_sees(case_id: str, method: str, raw_path: str, status: int, seen: str, reason: str = "insufficient_scope"):
    """Envoy passes the request on as `seen`; the filter decides (`reason`;
    by default the 403 of lab-delete, a rule the reading token lacks)."""
    return pytest.param(method, raw_path, status, seen, reason, id=case_id)


def _filter_refuses(case_id: str, raw_path: str):
    """Envoy passes the GET on unchanged; the filter itself answers 400."""
    return pytest.param("GET", raw_path, 400, raw_path, "bad_path", id=case_id)


_SHIPPED_PATH_CASES = [
    # Encoded slash / backslash: Envoy's REJECT_REQUEST.
    _envoy_refuses("encoded_slash", "GET", "/fhir/Patient/a%2Fb"),
    _envoy_refuses("encoded_slash_lower", "GET", "/fhir/Patient/a%2fb"),
    _envoy_refuses("encoded_backslash", "GET", "/fhir/Patient/a%5Cb"),
    _envoy_refuses("encoded_slash_traversal", "PATCH", "/fhir/Patient/1/..%2F..%2Fbilling/9"),
    # NUL: Envoy refuses %00 in the path.
    _envoy_refuses("nul", "GET", "/fhir/Patient/1%00"),
    # Dot segments (also %2e, which Envoy decodes as unreserved): Envoy
    # resolves them and the filter judges the resolved path.
    _filter_sees("dotdot_to_lab_delete", "DELETE", "/fhir/Patient/../../labs/1", 403, "/labs/1"),
    _filter_sees("encoded_dotdot", "DELETE", "/fhir/Patient/%2e%2e/%2e%2e/labs/1", 403, "/labs/1"),
    _filter_sees("encoded_dotdot_upper", "DELETE", "/fhir/Patient/%2E%2E/%2E%2E/labs/1", 403, "/labs/1"),
    _filter_sees("encoded_dotdot_to_nothing", "GET", "/fhir/Patient/%2e%2e/x", 403, "/fhir/x", "no_rule"),
    _filter_sees("trailing_dot", "GET", "/fhir/Patient/1/.", 403, "/fhir/Patient/1/", "no_rule"),
    _filter_sees("encoded_dot", "GET", "/fhir/Patient/%2e", 403, "/fhir/Patient/", "no_rule"),
    _filter_sees("dot_same_resource", "GET", "/fhir/Patient/./1", 200, "/fhir/Patient/1", "ok"),
    _filter_sees("dotdot_same_scope", "GET", "/labs/../fhir/Patient/1", 200, "/fhir/Patient/1", "ok"),
    # Backslash: Envoy turns `\` into `/` (then resolves dot segments).
    _filter_sees("backslash", "GET", "/fhir/Patient/a\\b", 403, "/fhir/Patient/a/b", "no_rule"),
    _filter_sees("backslash_traversal", "DELETE", "/fhir/Patient\\..\\..\\labs\\1", 403, "/labs/1"),
    # Empty segments: merge_slashes.
    _filter_sees("double_slash", "GET", "/fhir//Patient/1", 200, "/fhir/Patient/1", "ok"),
    _filter_sees("double_slash_to_lab_delete", "DELETE", "//labs//1", 403, "/labs/1"),
    # Encoded twice: Envoy leaves %25 alone; the filter refuses what a second
    # decode upstream would turn into `..`, `/` or `\`.
    _filter_refuses("double_encoded_dotdot", "/fhir/Patient/%252e%252e"),
    _filter_refuses("double_encoded_slash", "/fhir/Patient/a%252fb"),
    _filter_refuses("double_encoded_backslash", "/fhir/Patient/a%255cb"),
]


@pytest.mark.parametrize("method, raw_path, status, filter_path, reason", _SHIPPED_PATH_CASES)
def test_ambiguous_path_on_shipped_config(envoy, upstream, keys, method, raw_path, status, filter_path, reason):
    # http.client sends the path byte for byte: no client-side normalisation.
    resp = envoy.request(method, raw_path, token=token(keys, scope=_READER))
    assert resp.status == status, (resp.status, resp.text, upstream.requests)
    (record,) = audits(envoy, 1)
    if filter_path is None:
        assert record is None, f"expected Envoy to answer before the filter, got {record}"
    else:
        assert record is not None, "the filter never saw the request"
        assert (record["path"], record["reason"]) == (filter_path, reason)
    if status == 200:
        # Allowed only onto patient-read, the token's own rule, and what the
        # upstream got is exactly the path the filter judged.
        assert [(r.method, r.path) for r in upstream.requests] == [(method, filter_path)]
        assert upstream.last.header("x-phi-rule") == "patient-read"
    else:
        assert upstream.requests == [], "a refused request reached the upstream"


_FILTER_ONLY_PATHS = [
    "/fhir/Patient/a%2Fb",
    "/fhir/Patient/a%2fb",
    "/fhir/Patient/a%5Cb",
    "/fhir/Patient/./1",
    "/fhir/Patient/1/.",
    "/fhir/Patient/x/../1",
    "/labs/../fhir/Patient/1",
    "/fhir/Patient/%2e%2e/x",
    "/fhir/Patient/%2E%2E/1",
    "/fhir/Patient/%2e",
    "/fhir/Patient/.%2e/1",
    "/fhir/Patient/..;/1",
    "/fhir/Patient/1%00",
    "/fhir/Patient/a\\b",
    "/fhir/Patient\\..\\..\\labs\\1",
    "/fhir//Patient/1",
    "//fhir/Patient/1",
    "/fhir/Patient/1//",
    "/fhir/Patient/%252e%252e",
    "/fhir/Patient/a%252fb",
    "/fhir/Patient/%zz",
]


def test_filter_itself_refuses_ambiguous_paths_without_envoy_normalisation(envoy_factory, policy, upstream, keys):
    # Envoy's normalisation switched off: now the filter is the only layer,
    # and it must answer 400 itself (README "Path safety") on every case.
    envoy = envoy_factory(policy, start=False)
    hcm = envoy.config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.update(normalize_path=False, merge_slashes=False, path_with_escaped_slashes_action="KEEP_UNCHANGED")
    envoy.config_path.write_text(yaml.safe_dump(envoy.config, sort_keys=False))
    envoy.start()
    tok = token(keys, scope=ALL_SCOPES)
    wrong = {}
    for path in _FILTER_ONLY_PATHS:
        method = "DELETE" if "labs" in path else "GET"
        resp = envoy.request(method, path, token=tok)
        if resp.status != 400 or resp.text != "bad request\n":
            wrong[path] = (resp.status, resp.text)
    assert wrong == {}, wrong
    assert upstream.requests == [], [r.path for r in upstream.requests]
    records = audits(envoy, len(_FILTER_ONLY_PATHS))
    assert [r and r["reason"] for r in records] == ["bad_path"] * len(_FILTER_ONLY_PATHS)
    # And a clean path still works on this Envoy: the 400s are not a broken setup.
    assert envoy.get(PATIENT, token=tok).status == 200


# --------------------------------------------------------------------------
# Identity headers and the token upstream


def _spoofed() -> list[tuple[str, str]]:
    return [
        ("x-phi-subject", "admin"),
        ("X-PHI-Subject", "root"),
        ("x-phi-rule", "bulk-export"),
        ("x-phi-scopes", "export:bulk delete:lab-results"),
        ("x-phi-client-id", "trusted-backend"),
    ]


def test_spoofed_identity_headers_are_replaced_on_allowed_request(envoy, upstream, keys):
    tok = token(keys, sub="user-4711", client_id="ward-app")
    resp = envoy.get(PATIENT, token=tok, headers=_spoofed())
    assert resp.status == 200, (resp.status, resp.text)
    seen = upstream.last
    assert seen.header_all("x-phi-subject") == ["user-4711"]
    assert seen.header_all("x-phi-rule") == ["patient-read"]
    assert seen.header_all("x-phi-scopes") == ["read:patient-profile"]
    assert seen.header_all("x-phi-client-id") == ["ward-app"]


def test_spoofed_identity_headers_are_removed_when_the_token_lacks_the_claim(envoy, upstream, keys):
    # No sub, no client_id: nothing to set, and the client's values must not survive.
    tok = token(keys, sub=None, client_id=None)
    resp = envoy.get(PATIENT, token=tok, headers=_spoofed())
    assert resp.status == 200, (resp.status, resp.text)
    seen = upstream.last
    assert seen.header_all("x-phi-subject") == []
    assert seen.header_all("x-phi-client-id") == []
    assert seen.header_all("x-phi-rule") == ["patient-read"]


def test_spoofed_identity_headers_are_stripped_on_public_path(envoy, upstream):
    resp = envoy.get("/healthz", headers=_spoofed())
    assert resp.status == 200, (resp.status, resp.text)
    seen = upstream.last
    for name in ("x-phi-subject", "x-phi-scopes", "x-phi-client-id"):
        assert seen.header_all(name) == [], (name, seen.headers)
    assert seen.header_all("x-phi-rule") == ["health"]


def test_every_forwardable_claim_reaches_the_upstream(envoy_factory, policy, upstream, keys):
    # README claims_to_headers keys: sub, iss, client_id, azp, jti, acr, scopes, rule.
    names = ["sub", "iss", "client_id", "azp", "jti", "acr", "scopes", "rule"]
    policy["claims_to_headers"] = {name: f"x-fwd-{name.replace('_', '-')}" for name in names}
    envoy = envoy_factory(policy)
    spoofed = [(f"x-fwd-{n.replace('_', '-')}", "spoofed") for n in names]
    claims = {"sub": "u-1", "client_id": "c-1", "azp": "azp-1", "jti": "jti-1", "acr": "urn:example:loa:mfa"}
    resp = envoy.get(PATIENT, token=token(keys, **claims), headers=spoofed)
    assert resp.status == 200, (resp.status, resp.text)
    got = {n: upstream.last.header_all(f"x-fwd-{n.replace('_', '-')}") for n in names}
    want = {n: [v] for n, v in claims.items()}
    want.update(iss=[ISSUER], scopes=["read:patient-profile"], rule=["patient-read"])
    assert got == want, got
    # A token without azp, jti and acr: nothing set for those (no stand-in from
    # another claim), and the client's values are gone too.
    resp = envoy.get(PATIENT, token=token(keys, sub="u-1", client_id="c-1", azp=None, jti=None), headers=spoofed)
    assert resp.status == 200, (resp.status, resp.text)
    got = {n: upstream.last.header_all(f"x-fwd-{n.replace('_', '-')}") for n in names}
    want.update(azp=[], jti=[], acr=[])
    assert got == want, got


def test_authorization_is_not_forwarded_by_default(envoy, upstream, keys):
    tok = token(keys)
    # Also not in a second spelling of the name.
    resp = envoy.get(PATIENT, headers=[("AUTHORIZATION", f"Bearer {tok}")])
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header_all("authorization") == []
    for _, value in upstream.last.headers:
        assert tok not in value


def test_forward_token_true_passes_authorization_upstream(envoy_factory, policy, upstream, keys):
    policy["forward_token"] = True
    envoy = envoy_factory(policy)
    tok = token(keys)
    resp = envoy.get(PATIENT, token=tok)
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header_all("authorization") == [f"Bearer {tok}"]
    # Identity headers are still set as usual.
    assert upstream.last.header("x-phi-rule") == "patient-read"


# --------------------------------------------------------------------------
# Role mapping


def test_roles_map_to_listed_scopes_only(envoy_factory, policy, upstream, keys):
    policy["roles_claim"] = "roles"
    policy["role_scopes"] = {"clinician": ["read:patient-profile"], "billing-clerk": ["update:billing"]}
    envoy = envoy_factory(policy)

    clinician = token(keys, scope=None, roles=["clinician"])
    resp = envoy.get(PATIENT, token=clinician)
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header("x-phi-scopes") == "read:patient-profile"
    upstream.reset()
    # The role grants its scopes, not every scope.
    assert_insufficient_scope(envoy.request("PATCH", "/billing/1", token=clinician), upstream, {"update:billing"})

    # A space-separated string of roles works as well.
    resp = envoy.request("PATCH", "/billing/1", token=token(keys, scope=None, roles="nurse billing-clerk"))
    assert resp.status == 200, (resp.status, resp.text)
    assert upstream.last.header("x-phi-scopes") == "update:billing"
    upstream.reset()

    for unmapped in (["admin"], ["read:patient-profile"], ["Clinician"], []):
        resp = envoy.get(PATIENT, token=token(keys, scope=None, roles=unmapped))
        assert_insufficient_scope(resp, upstream, {"read:patient-profile"})
    # Roles in another claim are not roles.
    resp = envoy.get(PATIENT, token=token(keys, scope=None, groups=["clinician"]))
    assert_insufficient_scope(resp, upstream, {"read:patient-profile"})


def test_roles_are_ignored_without_roles_claim(envoy, upstream, keys):
    resp = envoy.get(PATIENT, token=token(keys, scope=None, roles=["clinician"]))
    assert_insufficient_scope(resp, upstream, {"read:patient-profile"})
