//! The FHIR table (`tests/fhir_table.json`): requests — method, path and
//! query, form body, the token's scopes and launch patient — under the
//! shipped policy with a `fhir` block, and what `decide` must make of each:
//! the reason, the rule, the scopes a refusal names, and what the record
//! shows (interaction, compartment patient). The end-to-end tests run the
//! rows marked `e2e` through the real Envoy.
//!
//! A `_search` is decided the way the host does it: first without its
//! form body, which the core asks for once the token could be granted the
//! search, then with it.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::Policy;
use crate::decision::{challenge, decide, Facts, Request, Revocations, State, Trace, Verdict};
use crate::fhir::{Body, MAX_SEARCH_BODY};
use crate::testkit::{Kit, NOW};

const TABLE: &str = include_str!("../../tests/fhir_table.json");

#[derive(Deserialize)]
struct Table {
    policies: BTreeMap<String, Value>,
    rows: Vec<Row>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Row {
    policy: String,
    method: String,
    path: String,
    /// The form body (or any body: only a `_search` reads it).
    form: Option<String>,
    content_type: Option<String>,
    /// The form body padded with `&pad=aaa…` to this many bytes.
    pad_to: Option<usize>,
    /// `false`: no Authorization header.
    #[serde(default = "yes")]
    token: bool,
    /// A literal bearer token instead of a signed one.
    bearer: Option<String>,
    #[serde(default)]
    scopes: String,
    /// The `patient` claim.
    launch: Option<String>,
    /// More claims.
    #[serde(default)]
    claims: serde_json::Map<String, Value>,
    /// The reason code (`ok` for an allow).
    want: String,
    /// The challenge's `scope` on `insufficient_scope`.
    scope: Option<String>,
    /// The rule the verdict names (`-`: none).
    rule: Option<String>,
    /// The record's `fhir_interaction` (`-`: none).
    interaction: Option<String>,
    /// The compartment's patient (`-`: none).
    patient: Option<String>,
    #[serde(default)]
    e2e: bool,
    /// Whether the core asks for the form body (a `_search` it decides).
    reads_body: Option<bool>,
    why: String,
}

fn yes() -> bool {
    true
}

/// The shipped policy (`envoy/envoy.yaml`) with `patch`'s members in place of its own.
pub fn policy(patch: &Value) -> Policy {
    let yaml = include_str!("../../envoy/envoy.yaml");
    let start = yaml.find("value: |").unwrap() + "value: |".len();
    let end = yaml[start..].find("vm_config:").unwrap() + start;
    let mut doc: Value = serde_json::from_str(&yaml[start..end]).unwrap();
    for (k, v) in patch.as_object().unwrap() {
        doc[k] = v.clone();
    }
    Policy::from_json(doc.to_string().as_bytes()).unwrap()
}

impl Row {
    fn body(&self) -> Option<Vec<u8>> {
        let mut body = self.form.clone()?;
        if let Some(n) = self.pad_to {
            body.push_str("&pad=");
            while body.len() < n {
                body.push('a');
            }
        }
        Some(body.into_bytes())
    }

    fn authorization(&self, kit: &Kit) -> Vec<String> {
        if !self.token {
            return Vec::new();
        }
        if let Some(b) = &self.bearer {
            return vec![format!("Bearer {b}")];
        }
        let mut c = kit.claims();
        c["scope"] = self.scopes.clone().into();
        if let Some(p) = &self.launch {
            c["patient"] = p.clone().into();
        }
        for (k, v) in &self.claims {
            c[k] = v.clone();
        }
        vec![format!("Bearer {}", kit.es256.sign(&c, &[]))]
    }
}

/// Decides a row; what came of it, as the table spells it.
fn run(kit: &Kit, policy: &Policy, row: &Row) -> Outcome {
    let auth = row.authorization(kit);
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let bytes = row.body().unwrap_or_default();
    let content_type = row
        .content_type
        .as_deref()
        .or(Some("application/x-www-form-urlencoded"))
        .filter(|_| row.form.is_some());
    // As the host has it: a request without a body ends with its headers.
    let mut req = Request {
        method: &row.method,
        path: &row.path,
        authorization: &auth,
        source: None,
        tls_version: Some("TLSv1.3"),
        forwarded_proto: None,
        scheme: "https",
        authority: "fhir.example.org",
        dpop: &[],
        body: if row.form.is_some() {
            Body::Unread
        } else {
            Body::Read {
                content_type: None,
                bytes: &[],
            }
        },
    };
    let facts = Facts {
        keys: &|_| Some(&kit.keys),
        revocations: Revocations::Off,
        peer_cert: &|| None,
        dpop_first_use: &|_, _| true,
    };
    let mut state = State::new(policy);
    let mut trace = Trace::default();
    let mut verdict = decide(policy, &facts, &mut state, &req, NOW, false, &mut trace);
    let mut asked_for_body = false;
    if let Verdict::NeedBody { .. } = verdict {
        asked_for_body = true;
        req.body = if bytes.len() > MAX_SEARCH_BODY {
            Body::TooLarge
        } else {
            Body::Read {
                content_type,
                bytes: &bytes,
            }
        };
        trace = Trace::default();
        verdict = decide(policy, &facts, &mut state, &req, NOW, false, &mut trace);
    }
    let (reason, rule) = match &verdict {
        Verdict::Allow { rule, .. } => ("ok".to_string(), Some(*rule)),
        Verdict::Deny { reason, rule, .. } => (reason.code().to_string(), *rule),
        Verdict::Wait(w) => (format!("wait {w:?}"), None),
        Verdict::NeedBody { .. } => ("asks for the body twice".into(), None),
    };
    let rule = rule.and_then(|i| policy.rule(i));
    let scope = match &verdict {
        Verdict::Deny { .. } => Some(challenge(rule, None, trace.fhir.as_ref()).scopes.join(" ")),
        _ => None,
    };
    Outcome {
        reason,
        rule: rule.map_or("-".into(), |r| r.id.clone()),
        scope,
        interaction: trace
            .fhir
            .as_ref()
            .map_or("-".into(), |f| f.interaction.code().to_string()),
        patient: trace
            .fhir
            .as_ref()
            .and_then(|f| f.patient.clone())
            .unwrap_or_else(|| "-".into()),
        asked_for_body,
    }
}

#[derive(Debug)]
struct Outcome {
    reason: String,
    rule: String,
    scope: Option<String>,
    interaction: String,
    patient: String,
    asked_for_body: bool,
}

fn table() -> Table {
    serde_json::from_str(TABLE).unwrap()
}

#[test]
fn the_fhir_table() {
    let table = table();
    let kit = Kit::new();
    let policies: BTreeMap<&str, Policy> = table
        .policies
        .iter()
        .map(|(name, patch)| (name.as_str(), policy(patch)))
        .collect();
    let mut wrong = Vec::new();
    for (i, row) in table.rows.iter().enumerate() {
        let Some(policy) = policies.get(row.policy.as_str()) else {
            panic!("row {i}: no policy {:?}", row.policy)
        };
        let got = run(&kit, policy, row);
        let mut problems = Vec::new();
        if got.reason != row.want {
            problems.push(format!("reason {} (want {})", got.reason, row.want));
        }
        if row.want == "insufficient_scope" && got.scope != row.scope {
            problems.push(format!("scope {:?} (want {:?})", got.scope, row.scope));
        }
        for (what, want, got) in [
            ("rule", &row.rule, &got.rule),
            ("interaction", &row.interaction, &got.interaction),
            ("patient", &row.patient, &got.patient),
        ] {
            if want.as_ref().is_some_and(|w| w != got) {
                problems.push(format!(
                    "{what} {got} (want {})",
                    want.as_deref().unwrap_or("")
                ));
            }
        }
        // Only a FHIR _search the model decides reads a body.
        let search_body = row
            .path
            .split('?')
            .next()
            .is_some_and(|p| p.ends_with("/_search"));
        if got.asked_for_body && !search_body {
            problems.push("asked for the body".into());
        }
        if !problems.is_empty() {
            wrong.push(format!(
                "row {i} {} {} [{}] ({}): {}",
                row.method,
                row.path,
                row.scopes,
                row.why,
                problems.join("; ")
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} rows wrong:\n{}",
        wrong.len(),
        table.rows.len(),
        wrong.join("\n")
    );
}

/// The table covers what issue #17 asks for: every interaction, v1 and v2,
/// constraints, wildcards, compartments, the specification's examples.
#[test]
fn the_table_covers_every_interaction_and_outcome() {
    let table = table();
    let kit = Kit::new();
    let mut interactions = std::collections::BTreeSet::new();
    let mut reasons = std::collections::BTreeSet::new();
    for row in &table.rows {
        let policy = policy(&table.policies[&row.policy]);
        let got = run(&kit, &policy, row);
        interactions.insert(got.interaction);
        reasons.insert(got.reason);
    }
    for code in [
        "read",
        "vread",
        "update",
        "update-conditional",
        "patch",
        "patch-conditional",
        "delete",
        "delete-conditional",
        "create",
        "search-type",
        "search-system",
        "search-compartment",
        "history-instance",
        "history-type",
        "history-system",
        "capabilities",
        "smart-configuration",
        "operation",
    ] {
        assert!(interactions.contains(code), "no row for {code}");
    }
    for reason in [
        "ok",
        "insufficient_scope",
        "no_rule",
        "missing_token",
        "bad_fhir_request",
        "body_too_large",
        "malformed_token",
    ] {
        assert!(reasons.contains(reason), "no row decided {reason}");
    }
    let count = |pred: &dyn Fn(&Row) -> bool| table.rows.iter().filter(|r| pred(r)).count();
    assert!(count(&|r| r.policy == "v1") >= 5);
    assert!(count(&|r| r.scopes.contains('*')) >= 6);
    assert!(count(&|r| r.scopes.contains('?')) >= 10);
    assert!(count(&|r| r.why.starts_with("spec:")) >= 20);
    assert!(count(&|r| r.e2e) >= 25);
    assert!(count(&|r| r.reads_body == Some(true)) >= 5);
    assert!(count(&|r| r.reads_body == Some(false)) >= 2);
    assert!(table.rows.iter().all(|r| !r.why.is_empty()));
}

/// The README's FHIR example (section "FHIR servers"): its policy loads,
/// and each request in its table is answered as the table says.
#[test]
fn the_readme_example_answers_as_it_says() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("## FHIR servers").unwrap()..];
    let json = &section[section.find("```json\n").unwrap() + 8..];
    let doc: Value = serde_json::from_str(&json[..json.find("```").unwrap()]).unwrap();
    let policy = Policy::from_json(doc.to_string().as_bytes()).unwrap();
    let scopes = "launch/patient openid fhirUser patient/Observation.rs patient/Patient.r";
    assert!(section.contains(&format!("`\"scope\": \"{scopes}\"`")));
    assert!(section.contains("and `\"patient\": \"123\"`"));
    let table = &section[section.find("| request | answer |").unwrap()..];
    let kit = Kit::new();
    let mut checked = 0;
    for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (requests, answer) = (cells[1], cells[2]);
        let mut rows: Vec<serde_json::Map<String, Value>> = Vec::new();
        for (i, quoted) in requests.split('`').enumerate().filter(|(i, _)| i % 2 == 1) {
            match quoted.split_once(' ') {
                Some((method, path)) if method.bytes().all(|b| b.is_ascii_uppercase()) => {
                    let mut row = serde_json::Map::new();
                    row.insert("method".into(), method.into());
                    row.insert("path".into(), path.into());
                    rows.push(row);
                }
                // `with form `…``: the previous request's form body.
                _ if i > 0 => {
                    rows.last_mut()
                        .unwrap()
                        .insert("form".into(), quoted.into());
                }
                _ => panic!("{line}: a form before any request"),
            }
        }
        let status: u16 = answer
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let scope = answer
            .split("scope=\"")
            .nth(1)
            .map(|s| s.split('"').next().unwrap());
        let want = match (status, scope) {
            (200, _) => "ok",
            (403, Some(_)) => "insufficient_scope",
            (403, None) => "no_rule",
            other => panic!("{other:?}"),
        };
        for mut row in rows {
            row.insert("policy".into(), "readme".into());
            row.insert("scopes".into(), scopes.into());
            row.insert("launch".into(), "123".into());
            row.insert("token".into(), (!answer.contains("no token needed")).into());
            row.insert("want".into(), want.into());
            row.insert("why".into(), line.into());
            let row: Row = serde_json::from_value(Value::Object(row)).unwrap();
            let got = run(&kit, &policy, &row);
            assert_eq!(got.reason, want, "{line}: {} {}", row.method, row.path);
            if let Some(scope) = scope {
                assert_eq!(got.scope.as_deref(), Some(scope), "{line}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 11);
}
