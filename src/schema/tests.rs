//! The schema held to the parser it describes.

use super::*;
use crate::config::Policy;
use crate::policy_file;

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&schema()).unwrap()
}

/// A policy with every object the schema describes, each field away from
/// its default where it can be.
fn full() -> Value {
    json!({
        "providers": [{
            "name": "idp", "issuer": "https://idp.example.org", "audiences": ["api"],
            "algorithms": ["RS256", "ES384"], "token_types": ["at+jwt"],
            "jwks": {"uri": "https://idp.example.org/keys", "cluster": "idp", "timeout_ms": 1500,
                     "cache_seconds": 120, "max_stale_seconds": 600, "min_refetch_seconds": 10, "retry_seconds": 2},
            "introspection": {"uri": "https://as.example.org/introspect", "cluster": "as", "client_id": "pg",
                "client_secret_env": "AS_SECRET", "timeout_ms": 1000, "cache_seconds": 10, "cache_size": 50}
        }],
        "clock_skew_seconds": 30, "max_token_lifetime_seconds": 1800,
        "forward_token": true, "forward_token_reason": "the upstream checks it again",
        "deny_wildcard_scopes": false, "verified_token_cache_size": 50, "verification_budget": 5,
        "realm": "hospital", "claims_to_headers": {"sub": "x-phi-subject"},
        "roles_claim": "roles", "role_scopes": {"nurse": ["read"]},
        "step_up_defaults": {"acr_values": ["urn:mfa"], "max_age_seconds": 300},
        "audit": {"hmac_key_env": "KEY", "checkpoint_seconds": 5},
        "revocation": {"uri": "https://lists.example.org/r", "cluster": "lists", "refresh_seconds": 3,
                       "timeout_ms": 1000, "max_stale_seconds": 60},
        "transport": {"require_tls": false, "min_tls_version": "TLSv1.3", "trusted_forwarded_proto": true},
        "dpop": {"max_age_seconds": 30},
        "fhir": {"base_path": "/fhir", "smart": true, "smart_v1": true, "patient_compartment": false,
                 "launch_claim": "launch_patient"},
        "forbidden_claims": ["email", "mrn"], "forbidden_claims_action": "audit",
        "rules": [
            {"id": "h", "path": "/healthz", "public": true},
            {"id": "e", "methods": ["GET"], "path": "/fhir/$export", "scopes": ["export"], "step_up": "default",
             "max_token_age_seconds": 300, "sensitive": true, "require_tls": true,
             "require_sender_constraint": true},
            {"id": "i", "methods": ["POST"], "path": "/x/{id}", "scopes_any": ["a", "b"], "introspect": true, "provider": "idp",
             "step_up": {"amr_any": ["otp"]}}
        ]
    })
}

/// (where the object is in `full()`, its schema) for every closed object.
fn objects(s: &Value) -> Vec<(&'static str, Value)> {
    let provider = &s["properties"]["providers"]["items"];
    let rule = &s["properties"]["rules"]["items"];
    vec![
        ("", s.clone()),
        ("/providers/0", provider.clone()),
        ("/providers/0/jwks", provider["properties"]["jwks"].clone()),
        (
            "/providers/0/introspection",
            provider["properties"]["introspection"].clone(),
        ),
        ("/rules/1", rule.clone()),
        (
            "/rules/2/step_up",
            rule["properties"]["step_up"]["oneOf"][1].clone(),
        ),
        (
            "/step_up_defaults",
            s["properties"]["step_up_defaults"].clone(),
        ),
        ("/audit", s["properties"]["audit"].clone()),
        ("/revocation", s["properties"]["revocation"].clone()),
        ("/transport", s["properties"]["transport"].clone()),
        ("/dpop", s["properties"]["dpop"].clone()),
        ("/fhir", s["properties"]["fhir"].clone()),
    ]
}

fn load(doc: &Value) -> Result<Policy, crate::config::ConfigError> {
    Policy::from_json(doc.to_string().as_bytes())
}

#[test]
fn the_checked_in_file_is_the_generated_schema() {
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/envoy/phi-guard.schema.json"
    ))
    .unwrap();
    assert!(
        file == text(),
        "envoy/phi-guard.schema.json is stale: cargo run --bin phi-guard -- schema > envoy/phi-guard.schema.json"
    );
}

/// Every object's fields are exactly those the parser accepts: its own
/// "unknown field, expected one of …" says which.
#[test]
fn fields_are_the_parsers() {
    let s = schema();
    load(&full()).unwrap();
    assert!(validator().is_valid(&full()));
    for (at, object) in objects(&s) {
        let mut doc = full();
        doc.pointer_mut(at)
            .and_then(Value::as_object_mut)
            .unwrap()
            .insert("zz_not_a_field".into(), json!(1));
        let e = load(&doc).unwrap_err();
        let expected = e
            .problem
            .split("expected one of ")
            .nth(1)
            .or_else(|| e.problem.split("expected ").nth(1))
            .unwrap_or_else(|| panic!("{at}: {e}"));
        let mut parser: Vec<String> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        parser.sort();
        let mut ours: Vec<String> = object["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        ours.sort();
        assert_eq!(
            ours, parser,
            "fields of {at:?}: add the new ones to src/schema.rs"
        );
        assert!(!validator().is_valid(&doc), "{at}: unknown field accepted");
        // Every field has a description; required ones are the parser's too.
        for (name, p) in object["properties"].as_object().unwrap() {
            assert!(
                p["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{at}.{name}"
            );
        }
        for name in object["required"].as_array().into_iter().flatten() {
            let mut doc = full();
            doc.pointer_mut(at)
                .and_then(Value::as_object_mut)
                .unwrap()
                .remove(name.as_str().unwrap());
            assert!(
                load(&doc).is_err(),
                "{at}.{name} is required by the schema only"
            );
            assert!(!validator().is_valid(&doc), "{at}.{name}");
        }
    }
}

/// A default in the schema is what the parser takes for a missing field:
/// the field left out and the field set to it load the same policy.
#[test]
fn defaults_are_the_parsers() {
    let s = schema();
    let mut checked = 0;
    for (at, object) in objects(&s) {
        for (name, p) in object["properties"].as_object().unwrap() {
            let Some(default) = p.get("default") else {
                continue;
            };
            let mut with = full();
            let mut without = full();
            with.pointer_mut(at)
                .and_then(Value::as_object_mut)
                .unwrap()
                .insert(name.clone(), default.clone());
            without
                .pointer_mut(at)
                .and_then(Value::as_object_mut)
                .unwrap()
                .remove(name);
            // Fields another one needs cannot be dropped alone: role_scopes
            // (roles_claim needs it), the step-up's only part.
            let (Ok(a), Ok(b)) = (load(&with), load(&without)) else {
                assert!(
                    matches!(
                        (at, name.as_str()),
                        ("", "role_scopes") | ("/rules/2/step_up", "amr_any")
                    ),
                    "{at}.{name}"
                );
                continue;
            };
            assert_eq!(
                format!("{a:?}"),
                format!("{b:?}"),
                "{at}.{name}: default {default}"
            );
            assert!(
                validator().is_valid(&with),
                "{at}.{name}: default {default} is invalid"
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "{checked}");
}

#[test]
fn shipped_and_clean_configs_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let v = validator();
    let mut n = 0;
    for file in [
        "envoy/envoy.yaml",
        "envoy/istio/wasmplugin.yaml",
        "tests/lint/clean.json",
        "tests/lint/envoy-clean.yaml",
        "tests/lint/wasmplugin-clean.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let docs = policy_file::read_documents(&text).unwrap();
        for p in policy_file::find_policies(&docs) {
            let doc: Value = serde_json::from_str(&p.json).unwrap();
            let errors: Vec<String> = v
                .iter_errors(&doc)
                .map(|e| format!("{e} at {}", e.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{file}: {errors:?}");
            n += 1;
        }
    }
    assert_eq!(n, 5);
}

/// Documents the parser refuses, for reasons a schema can state: the schema refuses them too.
#[test]
fn refused_documents_are_invalid() {
    type Edit = fn(&mut Value);
    let cases: Vec<Edit> = vec![
        |d| d["providers"] = json!([]),
        |d| d["providers"][0]["audiences"] = json!([]),
        |d| d["providers"][0]["audiences"] = json!([""]),
        |d| d["providers"][0]["algorithms"] = json!(["HS256"]),
        |d| d["providers"][0]["algorithms"] = json!(["none"]),
        |d| d["providers"][0]["algorithms"] = json!([]),
        |d| d["providers"][0]["name"] = json!(""),
        |d| d["providers"][0]["jwks"]["uri"] = json!("ftp://idp/keys"),
        |d| d["providers"][0]["jwks"]["uri"] = json!("https://user@idp/keys"),
        |d| d["providers"][0]["jwks"]["cluster"] = json!(""),
        |d| d["providers"][0]["jwks"]["timeout_ms"] = json!(0),
        |d| d["providers"][0]["jwks"]["timeout_ms"] = json!(60_001),
        |d| d["providers"][0]["jwks"]["timeout_ms"] = json!("2000"),
        |d| d["providers"][0]["jwks"]["cache_seconds"] = json!(0),
        |d| d["providers"][0]["jwks"]["retry_seconds"] = json!(0),
        |d| d["providers"][0]["introspection"]["client_secret_env"] = json!("A SECRET"),
        |d| d["providers"][0]["introspection"]["cache_seconds"] = json!(3601),
        |d| d["providers"][0]["introspection"]["cache_size"] = json!(0),
        |d| d["clock_skew_seconds"] = json!(301),
        |d| d["clock_skew_seconds"] = json!(-1),
        |d| d["clock_skew_seconds"] = json!(2.5),
        |d| d["max_token_lifetime_seconds"] = json!(0),
        |d| d["verified_token_cache_size"] = json!(1_000_001),
        |d| d["verification_budget"] = json!(100_001),
        |d| d["forward_token"] = json!("true"),
        |d| d["forward_token_reason"] = json!(""),
        |d| d["realm"] = json!("a\"b"),
        |d| d["realm"] = json!(""),
        |d| d["claims_to_headers"] = json!({"email": "x-email"}),
        |d| d["claims_to_headers"] = json!({"sub": "x phi"}),
        |d| {
            d.as_object_mut().unwrap().remove("role_scopes");
        },
        |d| {
            d.as_object_mut().unwrap().remove("roles_claim");
        },
        |d| d["role_scopes"] = json!({"nurse": ["a b"]}),
        |d| d["audit"]["hmac_key_env"] = json!("A-B"),
        |d| d["audit"]["checkpoint_seconds"] = json!(0),
        |d| d["audit"]["checkpoint_seconds"] = json!(3601),
        |d| d["revocation"]["refresh_seconds"] = json!(0),
        |d| {
            d["revocation"].as_object_mut().unwrap().remove("uri");
        },
        |d| d["step_up_defaults"] = json!({}),
        |d| d["step_up_defaults"] = json!({"acr_values": []}),
        |d| d["step_up_defaults"]["acr_values"] = json!(["urn mfa"]),
        |d| d["rules"][1]["id"] = json!("a b"),
        |d| d["rules"][1]["id"] = json!(""),
        |d| d["rules"][1]["methods"] = json!(["get"]),
        |d| d["rules"][1]["methods"] = json!([]),
        |d| d["rules"][1]["path"] = json!("fhir"),
        |d| d["rules"][1]["scopes"] = json!(["a b"]),
        |d| d["rules"][1]["step_up"] = json!("strong"),
        |d| d["rules"][1]["step_up"] = json!(7),
        |d| d["rules"][1]["step_up"] = json!({"amr": ["otp"]}),
        |d| d["rules"][0]["scopes"] = json!(["read"]),
        |d| d["rules"][0]["step_up"] = json!("default"),
        |d| d["rules"][0]["sensitive"] = json!(true),
        |d| d["rules"][0]["max_token_age_seconds"] = json!(60),
        |d| {
            d["rules"][2].as_object_mut().unwrap().remove("introspect");
        },
        |d| d["rules"][1]["max_token_age_seconds"] = json!(-5),
        |d| d["rules"] = json!({"0": {}}),
    ];
    let v = validator();
    for (i, edit) in cases.iter().enumerate() {
        let mut doc = full();
        edit(&mut doc);
        assert!(load(&doc).is_err(), "case {i}: the parser loads {doc}");
        assert!(!v.is_valid(&doc), "case {i}: the schema accepts {doc}");
    }
}
