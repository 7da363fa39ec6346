use super::*;
use crate::testkit::*;

fn rules() -> Vec<Value> {
    vec![
        json!({"id": "health", "path": "/healthz", "public": true}),
        json!({"id": "export", "methods": ["GET"], "path": "/fhir/Patient/$export", "scopes": ["export:bulk"],
               "step_up": {"acr_values": ["urn:mfa"], "max_age_seconds": 300}}),
        json!({"id": "patient-read", "methods": ["GET"], "path": "/fhir/Patient/{id}", "scopes": ["read:patient-profile"]}),
        json!({"id": "lab-delete", "methods": ["DELETE"], "path": "/labs/{id}", "scopes": ["delete:lab-results"],
               "max_token_age_seconds": 300}),
    ]
}

fn jwks(kit: &Kit) -> String {
    json!({"keys": kit.signers().iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

fn input(method: &str, path: &str, credential: Credential) -> Input {
    Input {
        method: method.into(),
        path: path.into(),
        credential,
        headers: vec![],
        now: NOW,
        revocation: None,
        introspection: None,
        tls: Some("TLSv1.3".into()),
    }
}

fn claims(kit: &Kit, edit: &dyn Fn(&mut Value)) -> Value {
    let mut c = kit.claims();
    edit(&mut c);
    c
}

type Edit = fn(&mut Value);

/// (method, path, claims edit, status, reason, WWW-Authenticate).
type Case = (
    &'static str,
    &'static str,
    Option<Edit>,
    Option<u32>,
    &'static str,
    Option<&'static str>,
);

/// The README's answers table.
fn cases() -> Vec<Case> {
    vec![
        ("GET", "/healthz", None, None, "ok", None),
        ("GET", "/fhir/Patient/7?x=1", Some(|_| {}), None, "ok", None),
        ("GET", "/fhir/Patient/7", None, Some(401), "missing_token", Some("Bearer realm=\"phi-guard\"")),
        ("GET", "/fhir/Patient/7", Some(|c| c["scope"] = json!("read:other")), Some(403), "insufficient_scope",
            Some("Bearer error=\"insufficient_scope\", scope=\"read:patient-profile\"")),
        ("GET", "/fhir/Patient/7", Some(|c| c["exp"] = json!(NOW - 100)), Some(401), "expired", Some("Bearer error=\"invalid_token\"")),
        ("GET", "/fhir/Patient/7", Some(|c| c["aud"] = json!("other")), Some(401), "wrong_audience", Some("Bearer error=\"invalid_token\"")),
        ("GET", "/fhir/Patient/7", Some(|c| c["iss"] = json!("https://evil")), Some(401), "unknown_issuer", Some("Bearer error=\"invalid_token\"")),
        ("GET", "/fhir/Patient/$export", Some(|c| c["scope"] = json!("export:bulk")), Some(401), "step_up_required",
            Some("Bearer error=\"insufficient_user_authentication\", error_description=\"A different authentication level is required\", acr_values=\"urn:mfa\", max_age=300")),
        ("GET", "/fhir/Patient/$export", Some(|c| { c["scope"] = json!("export:bulk"); c["acr"] = json!("urn:mfa"); c["auth_time"] = json!(NOW - 10); }), None, "ok", None),
        ("DELETE", "/labs/1", Some(|c| { c["scope"] = json!("delete:lab-results"); c["iat"] = json!(NOW - 400); }), Some(401), "token_too_old", Some("Bearer error=\"invalid_token\"")),
        ("POST", "/fhir/Patient/7", Some(|_| {}), Some(403), "no_rule", None),
        ("GET", "/fhir/Patient/%2e%2e/x", Some(|_| {}), Some(400), "bad_path", None),
    ]
}

#[test]
fn answers_follow_the_readme_with_a_token_or_claims_alike() {
    let kit = Kit::new();
    let policy = kit.policy(&rules());
    for (method, path, edit, status, reason, www) in cases() {
        let mut inputs = vec![];
        match edit {
            None => inputs.push(input(method, path, Credential::None)),
            Some(edit) => {
                let c = claims(&kit, &edit);
                let token = kit.es256.sign(&c, &[]);
                inputs.push(input(
                    method,
                    path,
                    Credential::Token {
                        token,
                        jwks: Some(jwks(&kit)),
                    },
                ));
                inputs.push(input(
                    method,
                    path,
                    Credential::Claims(c.as_object().unwrap().clone()),
                ));
            }
        }
        for i in inputs {
            let e = explain(&policy, &i).unwrap();
            let what = format!("{method} {path} {:?}", i.credential);
            assert_eq!(
                (e.status, e.reason, e.www_authenticate.as_deref()),
                (status, reason, www),
                "{what}"
            );
            assert_eq!(
                e.decision,
                if status.is_none() { "allow" } else { "deny" },
                "{what}"
            );
            if matches!(i.credential, Credential::Claims(_)) {
                assert!(e.signature.starts_with("NOT CHECKED"), "{}", e.signature);
            }
        }
    }
}

#[test]
fn every_rule_tried_and_why() {
    let kit = Kit::new();
    let policy = kit.policy(&rules());
    let c = claims(&kit, &|_| {});
    let e = explain(
        &policy,
        &input(
            "GET",
            "/fhir/Patient/7",
            Credential::Claims(c.as_object().unwrap().clone()),
        ),
    )
    .unwrap();
    let walk: Vec<(&str, &str)> = e.rules.iter().map(|r| (r.id.as_str(), r.outcome)).collect();
    assert_eq!(
        walk,
        [
            ("health", "no match"),
            ("export", "no match"),
            ("patient-read", "matched"),
            ("lab-delete", "not tried")
        ]
    );
    assert_eq!(
        e.rules[0].why,
        "segment 1 is \"fhir\", not \"healthz\" as in /healthz"
    );
    assert!(
        e.rules[1]
            .why
            .contains("segment 3 is \"7\", not \"$export\""),
        "{}",
        e.rules[1].why
    );
    let r = e.rule.as_ref().unwrap();
    assert_eq!(
        (r.id.as_str(), r.scopes.as_slice()),
        ("patient-read", &["read:patient-profile".to_owned()][..])
    );
    assert_eq!(e.token.as_ref().unwrap()["sub"], json!("user-1"));
    // The identity headers the filter would set.
    assert_eq!(e.token_forwarded, Some(false));

    let e = explain(&policy, &input("PUT", "/labs/1", Credential::None)).unwrap();
    assert_eq!(e.reason, "no_rule");
    assert!(e.rules.iter().all(|r| r.outcome == "no match"));
    assert!(
        e.rules[3]
            .why
            .starts_with("method PUT is not one of DELETE"),
        "{}",
        e.rules[3].why
    );

    let e = explain(&policy, &input("GET", "/a/../b", Credential::None)).unwrap();
    assert_eq!(
        (e.path_safety.safe, e.path_safety.problem),
        (false, Some("dot_segment"))
    );
    assert!(e.rules.iter().all(|r| r.outcome == "not tried"));
    let text = render(&e);
    assert!(
        text.contains("REFUSED (dot_segment)") && text.contains("DENY 400"),
        "{text}"
    );
}

#[test]
fn waits_are_told_then_decided_without() {
    let kit = Kit::new();
    let policy = kit.policy(&rules());
    let token = kit.es256.sign(&kit.claims(), &[]);
    let e = explain(
        &policy,
        &input(
            "GET",
            "/fhir/Patient/7",
            Credential::Token { token, jwks: None },
        ),
    )
    .unwrap();
    assert!(
        e.waits_for
            .as_deref()
            .unwrap()
            .contains("keys of provider \"idp\""),
        "{:?}",
        e.waits_for
    );
    assert_eq!((e.status, e.reason), (Some(503), "keys_unavailable"));
}

#[test]
fn revocation_list_is_applied() {
    let kit = Kit::new();
    let policy = kit.policy_with(|d| {
        d["rules"] = json!(rules());
        d["revocation"] = json!({"uri": "https://lists/r", "cluster": "lists"});
    });
    let c = claims(&kit, &|_| {});
    let mut i = input(
        "GET",
        "/fhir/Patient/7",
        Credential::Claims(c.as_object().unwrap().clone()),
    );
    let e = explain(&policy, &i).unwrap();
    assert_eq!(e.reason, "ok");
    assert!(
        e.notes.iter().any(|n| n.contains("no --revocation")),
        "{:?}",
        e.notes
    );
    i.revocation = Some(json!({"sub": ["user-1"]}).to_string());
    let e = explain(&policy, &i).unwrap();
    assert_eq!((e.status, e.reason), (Some(401), "revoked"));
    i.revocation = Some("{\"subs\": []}".into());
    assert!(explain(&policy, &i).is_err());
}

#[test]
fn claims_are_signed_with_an_algorithm_the_provider_allows() {
    let kit = Kit::new();
    for alg in ["RS256", "PS384", "ES256", "ES384", "EdDSA"] {
        let policy = kit.policy_with(|d| {
            d["rules"] = json!(rules());
            d["providers"][0]["algorithms"] = json!([alg]);
        });
        let c = claims(&kit, &|_| {});
        let e = explain(
            &policy,
            &input(
                "GET",
                "/fhir/Patient/7",
                Credential::Claims(c.as_object().unwrap().clone()),
            ),
        )
        .unwrap();
        assert_eq!(e.reason, "ok", "{alg}");
        assert!(e.signature.contains(alg), "{alg}: {}", e.signature);
    }
}

#[test]
fn a_bad_key_set_is_an_input_error() {
    let kit = Kit::new();
    let policy = kit.policy(&rules());
    let token = kit.es256.sign(&kit.claims(), &[]);
    let i = input(
        "GET",
        "/fhir/Patient/7",
        Credential::Token {
            token,
            jwks: Some("{\"keys\": 7}".into()),
        },
    );
    assert!(explain(&policy, &i).unwrap_err().contains("--jwks"));
}
