use super::*;
use serde_json::json;

fn base() -> Value {
    json!({
        "providers": [{"name": "idp", "issuer": "https://idp.example.org",
            "audiences": ["https://fhir.example.org"],
            "jwks": {"uri": "https://idp.example.org/jwks.json", "cluster": "idp"}}],
        "rules": [
            {"id": "health", "path": "/healthz", "public": true},
            // Before patient-read, which would otherwise decide GET /fhir/Patient/$export.
            {"id": "export", "methods": ["GET"], "path": "/fhir/Patient/$export", "scopes": ["export:bulk"],
             "step_up": {"acr_values": ["urn:mfa"]}},
            {"id": "patient-read", "methods": ["GET"], "path": "/fhir/Patient/{id}", "scopes": ["read:patient"]}
        ]
    })
}

fn opts() -> Options {
    Options {
        phi_prefixes: vec!["/fhir".into()],
        ..Options::default()
    }
}

fn lint(doc: &Value, opts: &Options) -> Vec<(Severity, &'static str, String)> {
    lint_text("p.json", &serde_json::to_string_pretty(doc).unwrap(), opts)
        .into_iter()
        .map(|f| (f.severity, f.code, f.location.field))
        .collect()
}

#[test]
fn the_base_is_clean() {
    assert_eq!(lint(&base(), &opts()), []);
}

#[test]
fn each_policy_finding_alone() {
    use Severity::{Error as E, Warning as W};
    type Edit = fn(&mut Value);
    let cases: Vec<(Edit, Severity, &str, &str)> = vec![
        (
            |d| d["rules"][2]["scopes"] = json!(["patient/*.read"]),
            E,
            "wildcard-scope",
            "rules[2].scopes[0]",
        ),
        (
            |d| d["rules"][2]["scopes"] = json!(["read:all"]),
            E,
            "wildcard-scope",
            "rules[2].scopes[0]",
        ),
        (
            |d| d["rules"][2]["scopes_any"] = json!(["x", "all"]),
            E,
            "wildcard-scope",
            "rules[2].scopes_any[1]",
        ),
        (
            |d| {
                d["rules"][2].as_object_mut().unwrap().remove("scopes");
            },
            E,
            "rule-without-scopes",
            "rules[2]",
        ),
        (
            |d| {
                d["rules"].as_array_mut().unwrap().insert(1, json!({"id": "x", "methods": ["GET"], "path": "/fhir/$export", "scopes": ["export"]}))
            },
            E,
            "export-without-step-up",
            "rules[1]",
        ),
        (
            |d| {
                d["rules"].as_array_mut().unwrap().insert(1, json!({"id": "x", "methods": ["GET"], "path": "/fhir/bulkstatus/{job}", "scopes": ["export"]}))
            },
            E,
            "export-without-step-up",
            "rules[1]",
        ),
        // A catch-all meets bulk export first.
        (
            |d| {
                d["rules"].as_array_mut().unwrap().push(json!({"id": "all", "methods": ["GET"], "path": "/fhir/{rest=**}", "scopes": ["read"]}))
            },
            E,
            "export-without-step-up",
            "rules[3]",
        ),
        (
            |d| d["providers"][0]["audiences"] = json!([]),
            E,
            "provider-without-audiences",
            "providers[0].audiences",
        ),
        (
            |d| d["providers"][0]["jwks"]["uri"] = json!("http://idp.example.org/jwks.json"),
            E,
            "plain-http-uri",
            "providers[0].jwks.uri",
        ),
        (
            |d| d["revocation"] = json!({"uri": "http://10.0.0.8/revoked", "cluster": "lists"}),
            E,
            "plain-http-uri",
            "revocation.uri",
        ),
        (
            |d| d["forward_token"] = json!(true),
            E,
            "forward-token-without-reason",
            "forward_token",
        ),
        (
            |d| d["max_token_lifetime_seconds"] = json!(7200),
            W,
            "token-lifetime",
            "max_token_lifetime_seconds",
        ),
        (
            |d| d["providers"][0]["jwks"]["max_stale_seconds"] = json!(86401),
            W,
            "max-stale",
            "providers[0].jwks.max_stale_seconds",
        ),
        (
            |d| {
                d["rules"].as_array_mut().unwrap().push(json!({"id": "meta", "methods": ["GET"], "path": "/fhir/metadata", "public": true}))
            },
            W,
            "public-phi-rule",
            "rules[3].public",
        ),
        (
            |d| d["rules"][2]["methods"] = json!(["GET", "PATCH"]),
            W,
            "write-without-token-age",
            "rules[2]",
        ),
        (
            |d| {
                d["rules"][2].as_object_mut().unwrap().remove("methods");
            },
            W,
            "write-without-token-age",
            "rules[2]",
        ),
        (
            |d| d["transport"] = json!({"require_tls": false}),
            W,
            "tls-not-required",
            "transport.require_tls",
        ),
        (
            |d| d["rules"][2]["require_tls"] = json!(false),
            W,
            "tls-not-required",
            "rules[2].require_tls",
        ),
        (
            |d| d["rules"][2]["sensitive"] = json!(true),
            W,
            "sensitive-without-revocation",
            "rules[2].sensitive",
        ),
        (
            |d| d["deny_wildcard_scopes"] = json!(false),
            W,
            "wildcard-scopes-granted",
            "deny_wildcard_scopes",
        ),
        (
            |d| d["insecure_skip_everything"] = json!(true),
            W,
            "insecure-option",
            "insecure_skip_everything",
        ),
        (
            |d| {
                d["roles_claim"] = json!("roles");
                d["role_scopes"] = json!({"nurse": ["read:patient", "write:chart"]});
            },
            W,
            "unused-scope",
            "role_scopes.nurse[1]",
        ),
    ];
    for (edit, severity, code, field) in cases {
        let mut doc = base();
        edit(&mut doc);
        let got = lint(&doc, &opts());
        // Fields this build does not know are also refused by the parser.
        let got: Vec<_> = got
            .into_iter()
            .filter(|(_, c, _)| *c != "invalid-policy")
            .collect();
        assert_eq!(got, [(severity, code, field.to_owned())], "{doc}");
    }
}

#[test]
fn parser_refusals_are_errors_with_the_filters_message() {
    let mut doc = base();
    doc["clock_skew_seconds"] = json!(301);
    let f = lint_text("p.json", &doc.to_string(), &opts());
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        (f[0].code, f[0].location.field.as_str()),
        ("invalid-policy", "clock_skew_seconds")
    );
    let e = Policy::from_json(doc.to_string().as_bytes()).unwrap_err();
    assert!(f[0].message.ends_with(&e.to_string()), "{}", f[0].message);
    // A finding of its own stands for the parser's error at the same field.
    let mut doc = base();
    doc["rules"][2]["id"] = json!("health");
    let f = lint(&doc, &opts());
    assert_eq!(
        f,
        [(
            Severity::Error,
            "duplicate-rule-id",
            "rules[2].id".to_owned()
        )]
    );
    // Broken JSON.
    let f = lint_text("p.json", "{\"providers\": [", &opts());
    assert_eq!(f[0].code, "syntax");
}

#[test]
fn catalogue_checks() {
    let catalogue = Catalogue::from_json(
        r#"{"scopes": [
            {"name": "read:patient", "description": "Read a patient's record", "sensitivity": "high"},
            {"name": "export:bulk", "description": "Bulk export", "sensitivity": "moderate"},
            {"name": "retired:thing", "description": "Nothing uses it", "sensitivity": "low"}]}"#,
    )
    .unwrap();
    let o = Options {
        catalogue: Some(catalogue),
        ..opts()
    };
    let mut doc = base();
    doc["rules"].as_array_mut().unwrap().push(json!(
        {"id": "lab", "methods": ["GET"], "path": "/labs/{id}", "scopes": ["read:lab"], "max_token_age_seconds": 60}));
    let got = lint(&doc, &o);
    assert_eq!(
        got,
        [
            (Severity::Warning, "unused-scope", "rules".to_owned()),
            (
                Severity::Warning,
                "sensitive-scope-without-token-age",
                "rules[2].scopes[0]".to_owned()
            ),
            (
                Severity::Warning,
                "undeclared-scope",
                "rules[3].scopes[0]".to_owned()
            ),
        ]
    );
    assert!(Catalogue::from_json(
        r#"{"scopes": [{"name": "a", "description": "", "sensitivity": "extreme"}]}"#
    )
    .is_err());
    assert!(Catalogue::from_json(r#"{"scopes": [{"name": "a", "description": "", "sensitivity": "low"}, {"name": "a", "description": "", "sensitivity": "low"}]}"#).is_err());
}

#[test]
fn leaky_formats() {
    for bad in [
        "%REQ(:PATH)%",
        "x %REQ(:path)% y",
        "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "%REQ(Authorization)%",
        "%REQ_WITHOUT_QUERY(authorization)%",
        "%PATH%",
        "%PATH(WQ:ORIG)%",
    ] {
        assert!(leaky_command(bad).is_some(), "{bad}");
    }
    for ok in [
        "%REQ_WITHOUT_QUERY(:PATH)%",
        "%REQ(:METHOD)% %REQ(X-REQUEST-ID)%",
        "%FILTER_STATE(wasm.phi_guard.audit:PLAIN)%",
        "100%",
        "%PATH(NQ)%",
    ] {
        assert_eq!(leaky_command(ok), None, "{ok}");
    }
}

#[test]
fn plain_http_hosts() {
    for (uri, bad) in [
        ("http://127.0.0.1:10002/jwks", false),
        ("http://localhost/jwks", false),
        ("http://[::1]:8080/jwks", false),
        ("https://idp.example.org/jwks", false),
        ("http://idp.example.org/jwks", true),
        ("http://10.1.2.3/jwks", true),
        ("http://127.0.0.1.evil.example/jwks", true),
    ] {
        assert_eq!(plain_http_off_host(uri), bad, "{uri}");
    }
}

#[test]
fn human_lines_name_file_line_code_field_and_rule() {
    let mut doc = base();
    doc["rules"][2]["scopes"] = json!(["*"]);
    let text = serde_json::to_string_pretty(&doc).unwrap();
    let f = lint_text("policy.json", &text, &opts());
    let line = text.lines().position(|l| l.contains("\"*\"")).unwrap() + 1;
    assert_eq!(
        f[0].to_string(),
        format!("policy.json:{line}: error[wildcard-scope]: `rules[2].scopes[0]` (rule \"patient-read\"): \"*\" is a wildcard or `all` scope: name the one permission this rule needs")
    );
    assert!(fails(&f, false));
    let json: Value = serde_json::from_str(&to_json(&f)).unwrap();
    assert_eq!(json[0]["location"]["line"], json!(line));
    assert_eq!(json[0]["location"]["rule"], json!("patient-read"));
    assert_eq!(json[0]["severity"], json!("error"));
}
