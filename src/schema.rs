//! The policy's JSON Schema (`envoy/phi-guard.schema.json`, `phi-guard
//! schema`), for editor completion and CI.
//!
//! Written as a table, one line per field, beside the parser in
//! `config.rs`; tests hold it to the parser: every object's fields are
//! exactly the ones the parser accepts (so a field added to a `Raw*` type
//! and not here fails them), every default is the parser's, shipped configs
//! validate, and documents the parser refuses for a reason a schema can
//! state are refused by it too. To add a field: one [`f`] line in the
//! object it belongs to, then `cargo run --bin phi-guard -- schema >
//! envoy/phi-guard.schema.json`.

use serde_json::{json, Map, Value};

/// One field of an object.
struct Field {
    name: &'static str,
    schema: Value,
    required: bool,
    default: Option<Value>,
    description: &'static str,
}

/// A field: its name, schema and description.
fn f(name: &'static str, schema: Value, description: &'static str) -> Field {
    Field {
        name,
        schema,
        required: false,
        default: None,
        description,
    }
}

impl Field {
    fn required(mut self) -> Field {
        self.required = true;
        self
    }

    fn default(mut self, v: Value) -> Field {
        self.default = Some(v);
        self
    }
}

/// Sets `key` of an object value (nothing on other values).
fn set(v: &mut Value, key: &str, to: Value) {
    if let Value::Object(m) = v {
        m.insert(key.into(), to);
    }
}

/// A closed object (the parser refuses unknown fields) of `fields`.
fn object(fields: Vec<Field>) -> Value {
    let mut props = Map::new();
    let mut required = Vec::new();
    for field in fields {
        let mut s = field.schema;
        if let Value::Object(m) = &mut s {
            m.insert("description".into(), field.description.into());
            if let Some(d) = field.default {
                m.insert("default".into(), d);
            }
        }
        if field.required {
            required.push(Value::from(field.name));
        }
        props.insert(field.name.into(), s);
    }
    let mut o = json!({"type": "object", "additionalProperties": false, "properties": props});
    if !required.is_empty() {
        set(&mut o, "required", Value::Array(required));
    }
    o
}

fn string() -> Value {
    json!({"type": "string"})
}

fn nonempty() -> Value {
    json!({"type": "string", "minLength": 1})
}

fn boolean() -> Value {
    json!({"type": "boolean"})
}

/// A whole number in `min..=max` (`max` `None`: no bound).
fn uint(min: u64, max: Option<u64>) -> Value {
    let mut v = json!({"type": "integer", "minimum": min});
    if let Some(m) = max {
        set(&mut v, "maximum", m.into());
    }
    v
}

fn list(items: Value) -> Value {
    json!({"type": "array", "items": items})
}

/// RFC 6749 §3.3 scope-token.
fn scope() -> Value {
    json!({"type": "string", "pattern": "^[\\x21\\x23-\\x5B\\x5D-\\x7E]+$"})
}

fn env_name() -> Value {
    json!({"type": "string", "pattern": "^[A-Za-z0-9_]+$"})
}

fn http_uri() -> Value {
    json!({"type": "string", "pattern": "^https?://[^/@\\s]+(/.*)?$"})
}

/// Printable ASCII without quotes or backslashes (goes into a quoted header value).
fn quotable(spaces: bool) -> Value {
    let class = if spaces {
        "^[\\x20\\x21\\x23-\\x5B\\x5D-\\x7E]+$"
    } else {
        "^[\\x21\\x23-\\x5B\\x5D-\\x7E]+$"
    };
    json!({"type": "string", "pattern": class})
}

fn step_up() -> Value {
    let mut o = object(vec![
        f(
            "acr_values",
            list(quotable(false)),
            "the token's `acr` must be one of these",
        )
        .default(json!([])),
        f(
            "amr_any",
            list(quotable(false)),
            "the token's `amr` must contain one of these",
        )
        .default(json!([])),
        f(
            "max_age_seconds",
            uint(0, None),
            "`auth_time` at most this old (seconds)",
        ),
    ]);
    // "set at least one of acr_values, amr_any, max_age_seconds"
    set(
        &mut o,
        "anyOf",
        json!([
            {"required": ["acr_values"], "properties": {"acr_values": {"minItems": 1}}},
            {"required": ["amr_any"], "properties": {"amr_any": {"minItems": 1}}},
            {"required": ["max_age_seconds"]},
        ]),
    );
    o
}

fn fetch_source(what: &'static str, refresh: Field, max_stale_default: u64) -> Vec<Field> {
    vec![
        f(
            "uri",
            http_uri(),
            "http(s)://host[:port]/path: the callout's :authority and :path",
        )
        .required(),
        f(
            "cluster",
            nonempty(),
            "the Envoy cluster the callout goes through (TLS is the cluster's business)",
        )
        .required(),
        f(
            "timeout_ms",
            uint(1, Some(60_000)),
            "callout timeout; also how long a request waits for it",
        )
        .default(json!(2000)),
        refresh,
        f("max_stale_seconds", uint(0, None), what).default(json!(max_stale_default)),
    ]
}

fn provider() -> Value {
    let mut jwks = fetch_source(
        "how long the last good keys serve after refreshes fail",
        f("cache_seconds", uint(1, None), "refresh interval").default(json!(300)),
        3600,
    );
    jwks.push(
        f(
            "min_refetch_seconds",
            uint(0, None),
            "at most one refetch per window for an unknown `kid`",
        )
        .default(json!(30)),
    );
    jwks.push(
        f(
            "retry_seconds",
            uint(1, None),
            "retry interval while no keys are held",
        )
        .default(json!(1)),
    );
    object(vec![
        f("name", nonempty(), "unique name (stats, shared-data keys)").required(),
        f("issuer", nonempty(), "exact `iss`; picks this provider").required(),
        f("audiences", json!({"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}),
            "a token's `aud` (string or array) must contain one").required(),
        f("algorithms", json!({"type": "array", "minItems": 1, "items": {"enum": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]}}),
            "allowed `alg` values (never `none` or HMAC)").default(json!(["RS256", "PS256", "ES256", "EdDSA"])),
        f("token_types", list(string()), "accepted header `typ` (case-insensitive, `application/` prefix allowed); [] = not checked")
            .default(json!(["at+jwt", "JWT"])),
        f("jwks", object(jwks), "where the provider's keys are fetched").required(),
        f("introspection", object(vec![
            f("uri", http_uri(), "the RFC 7662 endpoint: the POST's :authority and :path").required(),
            f("cluster", nonempty(), "the Envoy cluster the callout goes through").required(),
            f("client_id", nonempty(), "phi-guard's client id at the authorization server (HTTP Basic)").required(),
            f("client_secret_env", env_name(), "environment variable holding the client secret (never the secret itself)").required(),
            f("timeout_ms", uint(1, Some(60_000)), "callout timeout; also how long a request waits for the answer").default(json!(2000)),
            f("cache_seconds", uint(1, Some(3600)), "how long an answer is kept (an active one never past its exp)").default(json!(30)),
            f("cache_size", uint(1, Some(1_000_000)), "answers kept per worker").default(json!(10_000)),
        ]), "the provider's token introspection endpoint, for `introspect` rules"),
    ])
}

fn rule() -> Value {
    let mut o = object(vec![
        f(
            "id",
            json!({"type": "string", "pattern": "^[A-Za-z0-9._:-]+$"}),
            "unique; in the audit record and stats",
        )
        .required(),
        f(
            "methods",
            json!({"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^[A-Z]+$"}}),
            "upper-case methods; absent = any",
        ),
        f(
            "path",
            json!({"type": "string", "pattern": "^/", "maxLength": 1024}),
            "Envoy URI template: `{name}` one segment, `{name=**}` the rest",
        )
        .required(),
        f("public", boolean(), "no token needed").default(json!(false)),
        f("scopes", list(scope()), "all required").default(json!([])),
        f("scopes_any", list(scope()), "at least one required").default(json!([])),
        f(
            "max_token_age_seconds",
            uint(0, None),
            "`iat` at most this old",
        ),
        f(
            "step_up",
            json!({"oneOf": [{"const": "default"}, step_up()]}),
            "\"default\" (step_up_defaults) or {acr_values, amr_any, max_age_seconds} (RFC 9470)",
        ),
        f(
            "sensitive",
            boolean(),
            "fails closed (503) without a fresh revocation list",
        )
        .default(json!(false)),
        f(
            "introspect",
            boolean(),
            "ask the authorization server whether the token is active (RFC 7662)",
        )
        .default(json!(false)),
        f(
            "provider",
            nonempty(),
            "an introspect rule's provider (by name, with an introspection block)",
        ),
        f(
            "require_tls",
            boolean(),
            "overrides transport.require_tls for this rule",
        ),
        f(
            "require_sender_constraint",
            boolean(),
            "only certificate- or DPoP-bound tokens (RFC 8705, RFC 9449)",
        )
        .default(json!(false)),
    ]);
    set(
        &mut o,
        "allOf",
        json!([
            {"if": {"required": ["public"], "properties": {"public": {"const": true}}},
             "then": {"not": {"anyOf": [
                 {"required": ["scopes"], "properties": {"scopes": {"minItems": 1}}},
                 {"required": ["scopes_any"], "properties": {"scopes_any": {"minItems": 1}}},
                 {"required": ["max_token_age_seconds"]}, {"required": ["step_up"]},
                 {"required": ["sensitive"], "properties": {"sensitive": {"const": true}}},
                 {"required": ["require_sender_constraint"], "properties": {"require_sender_constraint": {"const": true}}},
                 {"required": ["introspect"], "properties": {"introspect": {"const": true}}}]}}},
            {"if": {"required": ["provider"]},
             "then": {"required": ["introspect"], "properties": {"introspect": {"const": true}}}},
        ]),
    );
    o
}

/// The schema.
pub fn schema() -> Value {
    let claims = [
        "sub",
        "iss",
        "client_id",
        "azp",
        "jti",
        "acr",
        "scopes",
        "rule",
    ];
    let revocation = fetch_source(
        "how long the last good list stays in force after refreshes fail",
        f(
            "refresh_seconds",
            uint(1, None),
            "how often the list is fetched",
        )
        .default(json!(5)),
        300,
    );
    let mut top = object(vec![
        f(
            "providers",
            json!({"type": "array", "minItems": 1, "items": provider()}),
            "trusted issuers; a token's `iss` picks one",
        )
        .required(),
        f(
            "clock_skew_seconds",
            uint(0, Some(300)),
            "tolerance for exp, nbf, iat, token age and auth_time",
        )
        .default(json!(60)),
        f(
            "max_token_lifetime_seconds",
            uint(1, None),
            "exp minus iat (or nbf) must not exceed it",
        )
        .default(json!(3600)),
        f("forward_token", boolean(), "pass Authorization upstream").default(json!(false)),
        f(
            "forward_token_reason",
            json!({"type": "string", "pattern": "\\S"}),
            "why the upstream needs the token (lint requires it with forward_token)",
        ),
        f(
            "deny_wildcard_scopes",
            boolean(),
            "a granted `*`, `all`, `…:all` or `….all` scope grants nothing",
        )
        .default(json!(true)),
        f(
            "verified_token_cache_size",
            uint(0, Some(1_000_000)),
            "verified tokens remembered per worker; 0 = off",
        )
        .default(json!(10_000)),
        f(
            "verification_budget",
            uint(0, Some(100_000)),
            "failed signature checks per source per second; 0 = off",
        )
        .default(json!(20)),
        f("realm", quotable(true), "realm in the no-token challenge").default(json!("phi-guard")),
        f(
            "rules",
            list(rule()),
            "tried in order; first match wins; no match = 403",
        )
        .default(json!([])),
        f(
            "claims_to_headers",
            json!({"type": "object", "propertyNames": {"enum": claims},
            "additionalProperties": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}}),
            "identity forwarded upstream: claim -> header name",
        )
        .default(json!({})),
        f(
            "roles_claim",
            nonempty(),
            "the claim holding roles (needs role_scopes)",
        ),
        f(
            "role_scopes",
            json!({"type": "object", "additionalProperties": list(scope())}),
            "role -> the scopes it adds (needs roles_claim)",
        )
        .default(json!({})),
        f(
            "step_up_defaults",
            step_up(),
            "what `\"step_up\": \"default\"` means",
        ),
        f(
            "audit",
            object(vec![
                f(
                    "hmac_key_env",
                    env_name(),
                    "environment variable whose value keys the audit chain's HMAC",
                ),
                f(
                    "checkpoint_seconds",
                    uint(1, Some(3600)),
                    "how often each VM writes its chain's head to Envoy's log",
                )
                .default(json!(10)),
            ]),
            "the audit chain",
        )
        .default(json!({})),
        f(
            "revocation",
            object(revocation),
            "a revocation list to poll",
        ),
        f(
            "transport",
            object(vec![
                f(
                    "require_tls",
                    boolean(),
                    "protected rules answer only requests over TLS; false is logged at every start",
                )
                .default(json!(true)),
                f(
                    "min_tls_version",
                    json!({"enum": ["TLSv1.2", "TLSv1.3"]}),
                    "the oldest TLS version accepted",
                )
                .default(json!("TLSv1.2")),
                f(
                    "trusted_forwarded_proto",
                    boolean(),
                    "take x-forwarded-proto: https as TLS (only behind a terminating balancer clients cannot bypass)",
                )
                .default(json!(false)),
            ]),
            "what a protected request must arrive over",
        )
        .default(json!({})),
        f(
            "dpop",
            object(vec![f(
                "max_age_seconds",
                uint(1, Some(600)),
                "how old a DPoP proof may be (RFC 9449)",
            )
            .default(json!(60))]),
            "DPoP proofs",
        )
        .default(json!({})),
        f(
            "fhir",
            object(vec![
                f(
                    "base_path",
                    json!({"type": "string", "pattern": "^/([^/?#*{}]+(/[^/?#*{}]+)*)?$"}),
                    "where the FHIR server's base is: / or plain segments, e.g. /fhir",
                )
                .required(),
                f(
                    "smart",
                    boolean(),
                    "SMART App Launch scopes grant access; false: the FHIR model grants nothing",
                )
                .default(json!(true)),
                f(
                    "smart_v1",
                    boolean(),
                    "also accept SMART v1 scopes (read, write, *)",
                )
                .default(json!(false)),
                f(
                    "patient_compartment",
                    boolean(),
                    "patient/ scopes reach only the launch patient's compartment",
                )
                .default(json!(true)),
                f(
                    "launch_claim",
                    json!({"type": "string", "minLength": 1, "maxLength": 64}),
                    "the token claim holding the launch patient's id",
                )
                .default(json!("patient")),
            ]),
            "a FHIR R4 server: requests under base_path no rule matches are judged by SMART scopes",
        ),
        f(
            "forbidden_claims",
            list(nonempty()),
            "claims a token must not carry (PHI, identity data); replaces the default list",
        )
        .default(json!([
            "name", "given_name", "family_name", "middle_name", "nickname", "birthdate",
            "address", "phone_number", "email", "gender", "picture"
        ])),
        f(
            "forbidden_claims_action",
            json!({"enum": ["reject", "audit"]}),
            "reject: 401 invalid_token (phi_in_token); audit: allowed, flagged",
        )
        .default(json!("reject")),
    ]);
    set(
        &mut top,
        "dependentRequired",
        json!({"roles_claim": ["role_scopes"], "role_scopes": ["roles_claim"]}),
    );
    let mut out = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/phi-guard/phi-guard/envoy/phi-guard.schema.json",
        "title": "phi-guard policy",
        "description": "The filter's configuration (README, Configuration reference). Some checks are the parser's alone: unique rule ids and provider names, rules hidden by earlier ones, URI template syntax; run `phi-guard lint`.",
    });
    if let (Value::Object(o), Value::Object(t)) = (&mut out, top) {
        o.extend(t);
    }
    out
}

/// The schema as `envoy/phi-guard.schema.json` holds it.
pub fn text() -> String {
    let mut s = serde_json::to_string_pretty(&schema()).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests;
