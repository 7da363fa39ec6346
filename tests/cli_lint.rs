//! `phi-guard lint` as CI runs it: one fixture per finding in `tests/lint/`
//! (a bad config and the exact code, field and line it must be reported
//! at), the clean fixtures and the shipped configs passing
//! `--deny-warnings`, exit codes, and `--format json` parsed.

// Helpers outside #[test] fns are test code too.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Exit code, stdout, stderr of `phi-guard lint ARGS`, run from the repo root.
fn lint(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi-guard"))
        .arg("lint")
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// (severity, code, line, field) of a finding.
type Got = (String, String, Option<u64>, String);

/// Every finding, from `--format json`.
fn findings(args: &[&str]) -> (i32, Vec<Got>) {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let (code, out, err) = lint(&all);
    let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let list = json
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let l = &f["location"];
            assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()), "{f}");
            assert_eq!(l["file"], Value::from(args[args.len() - 1]), "{f}");
            (
                f["severity"].as_str().unwrap().to_owned(),
                f["code"].as_str().unwrap().to_owned(),
                l["line"].as_u64(),
                l["field"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (code, list)
}

/// A one-finding want built at run time, kept for the whole test.
fn one(
    severity: &'static str,
    code: &'static str,
    line: Option<u64>,
    field: &'static str,
) -> Want<'static> {
    Box::leak(Box::new([(severity, code, line, field)]))
}

type Want<'a> = &'a [(&'a str, &'a str, Option<u64>, &'a str)];

const E: &str = "error";
const W: &str = "warning";
const HCM: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";

#[test]
fn each_finding_has_its_fixture() {
    let catalogue = ["--scopes", "tests/lint/catalogue.json"];
    // &'static, so the table below can hold them in constant slices.
    let at_hcm = |f: &str| -> &'static str { Box::leak(format!("{HCM}{f}").into_boxed_str()) };
    let failure_policy = at_hcm(".http_filters[0].typed_config.config.failure_policy");
    let leak = at_hcm(".access_log[0].typed_config.log_format.json_format.path");
    let second_filter = at_hcm(".http_filters[1]");
    let cases: Vec<(&str, &[&str], Want)> = vec![
        ("clean.json", &[], &[]),
        ("envoy-clean.yaml", &[], &[]),
        ("wasmplugin-clean.yaml", &[], &[]),
        (
            "invalid-policy.json",
            &[],
            &[(E, "invalid-policy", Some(48), "clock_skew_seconds")],
        ),
        (
            "wildcard-scope.json",
            &[],
            &[(E, "wildcard-scope", Some(44), "rules[2].scopes[0]")],
        ),
        // Inside envoy.yaml's `value: |` block: the line of the scope itself.
        (
            "envoy-wildcard.yaml",
            &[],
            &[(E, "wildcard-scope", Some(78), "rules[2].scopes[0]")],
        ),
        (
            "wasmplugin-wildcard.yaml",
            &[],
            &[(E, "wildcard-scope", Some(18), "rules[2].scopes[0]")],
        ),
        (
            "rule-without-scopes.json",
            &[],
            &[(E, "rule-without-scopes", Some(37), "rules[2]")],
        ),
        (
            "export-without-step-up.json",
            &[],
            &[(E, "export-without-step-up", Some(21), "rules[1]")],
        ),
        (
            "duplicate-rule-id.json",
            &[],
            &[(E, "duplicate-rule-id", Some(38), "rules[2].id")],
        ),
        (
            "provider-without-audiences.json",
            &[],
            &[(
                E,
                "provider-without-audiences",
                Some(6),
                "providers[0].audiences",
            )],
        ),
        (
            "plain-http-uri.json",
            &[],
            &[(E, "plain-http-uri", Some(10), "providers[0].jwks.uri")],
        ),
        (
            "forward-token-without-reason.json",
            &[],
            &[(E, "forward-token-without-reason", Some(48), "forward_token")],
        ),
        (
            "token-lifetime.json",
            &[],
            &[(W, "token-lifetime", Some(48), "max_token_lifetime_seconds")],
        ),
        (
            "max-stale.json",
            &[],
            &[(
                W,
                "max-stale",
                Some(12),
                "providers[0].jwks.max_stale_seconds",
            )],
        ),
        (
            "public-phi-rule.json",
            &[],
            &[(W, "public-phi-rule", Some(53), "rules[3].public")],
        ),
        (
            "write-without-token-age.json",
            &[],
            &[(W, "write-without-token-age", Some(47), "rules[3]")],
        ),
        // Also refused by the parser until `transport` lands (see
        // `transport_is_refused_only_until_the_parser_knows_it`).
        (
            "tls-not-required.json",
            &[],
            &[(W, "tls-not-required", Some(49), "transport.require_tls")],
        ),
        (
            "sensitive-without-revocation.json",
            &[],
            &[(
                W,
                "sensitive-without-revocation",
                Some(46),
                "rules[2].sensitive",
            )],
        ),
        (
            "wildcard-scopes-granted.json",
            &[],
            &[(
                W,
                "wildcard-scopes-granted",
                Some(48),
                "deny_wildcard_scopes",
            )],
        ),
        (
            "insecure-option.json",
            &[],
            &[
                (
                    E,
                    "invalid-policy",
                    Some(48),
                    "insecure_accept_any_audience",
                ),
                (
                    W,
                    "insecure-option",
                    Some(48),
                    "insecure_accept_any_audience",
                ),
            ],
        ),
        (
            "unused-scope.json",
            &[],
            &[(W, "unused-scope", Some(52), "role_scopes.nurse[1]")],
        ),
        (
            "clean.json",
            &["--scopes", "tests/lint/unused-catalogue.json"],
            &[(W, "unused-scope", Some(15), "rules")],
        ),
        (
            "undeclared-scope.json",
            &catalogue,
            &[
                // The catalogue's read:patient is now required by no rule.
                (W, "unused-scope", Some(15), "rules"),
                (W, "undeclared-scope", Some(44), "rules[2].scopes[0]"),
            ],
        ),
        (
            "sensitive-scope-without-token-age.json",
            &catalogue,
            &[(
                W,
                "sensitive-scope-without-token-age",
                Some(28),
                "rules[1].scopes[0]",
            )],
        ),
        (
            "failure-policy.yaml",
            &[],
            one(E, "failure-policy", Some(31), failure_policy),
        ),
        (
            "no-path-normalisation.yaml",
            &[],
            &[(E, "no-path-normalisation", Some(9), HCM)],
        ),
        (
            "access-log-leaks.yaml",
            &[],
            one(E, "access-log-leaks", Some(20), leak),
        ),
        (
            "no-audit-log.yaml",
            &[],
            &[(E, "no-audit-log", Some(9), HCM)],
        ),
        (
            "filter-order.yaml",
            &[],
            one(E, "filter-order", Some(29), second_filter),
        ),
        ("no-filter.yaml", &[], &[(E, "no-filter", None, "")]),
        ("syntax.yaml", &[], &[(E, "syntax", Some(4), "")]),
        (
            "nothing-to-lint.yaml",
            &[],
            &[(E, "nothing-to-lint", None, "")],
        ),
        (
            "wasmplugin-fail-open.yaml",
            &[],
            &[(E, "failure-policy", Some(7), "spec.failStrategy")],
        ),
        (
            "wasmplugin-phase.yaml",
            &[],
            &[(E, "filter-order", Some(6), "spec.phase")],
        ),
        (
            "mesh-config-leak.yaml",
            &[],
            &[(
                E,
                "access-log-leaks",
                Some(11),
                "spec.meshConfig.extensionProviders[0].envoyFileAccessLog.logFormat.labels.path",
            )],
        ),
    ];
    let mut codes = std::collections::BTreeSet::new();
    for (fixture, extra, want) in cases {
        let file = format!("tests/lint/{fixture}");
        let mut args = vec!["--phi-prefix", "/fhir"];
        args.extend_from_slice(extra);
        args.push(&file);
        let (code, mut got) = findings(&args);
        let errors = got.iter().any(|(s, ..)| s == E);
        assert_eq!(code, i32::from(errors), "{fixture}: exit code");
        // Until the parser knows `transport`, it refuses it too.
        got.retain(|(_, c, _, f)| !(c == "invalid-policy" && f == "transport"));
        let want: Vec<_> = want
            .iter()
            .map(|(s, c, l, f)| (s.to_string(), c.to_string(), *l, f.to_string()))
            .collect();
        assert_eq!(got, want, "{fixture}");
        codes.extend(want.into_iter().map(|(_, c, ..)| c));
    }
    // Every code lint can report has a fixture.
    for code in [
        "invalid-policy",
        "wildcard-scope",
        "rule-without-scopes",
        "export-without-step-up",
        "duplicate-rule-id",
        "provider-without-audiences",
        "plain-http-uri",
        "forward-token-without-reason",
        "failure-policy",
        "no-path-normalisation",
        "access-log-leaks",
        "no-audit-log",
        "filter-order",
        "no-filter",
        "syntax",
        "nothing-to-lint",
        "token-lifetime",
        "max-stale",
        "public-phi-rule",
        "write-without-token-age",
        "tls-not-required",
        "unused-scope",
        "undeclared-scope",
        "sensitive-scope-without-token-age",
        "sensitive-without-revocation",
        "wildcard-scopes-granted",
        "insecure-option",
    ] {
        assert!(codes.contains(code), "no fixture for {code}");
    }
}

#[test]
fn transport_is_refused_only_until_the_parser_knows_it() {
    let (_, got) = findings(&["tests/lint/tls-not-required.json"]);
    let refused = phi_guard::config::Policy::from_json(
        std::fs::read(format!("{ROOT}/tests/lint/tls-not-required.json"))
            .unwrap()
            .as_slice(),
    )
    .is_err();
    let said = got
        .iter()
        .any(|(_, c, _, f)| c == "invalid-policy" && f == "transport");
    assert_eq!(said, refused, "{got:?}");
}

#[test]
fn the_shipped_configs_are_clean_with_warnings_denied() {
    // What `make lint-policy` runs.
    let (code, out, err) = lint(&[
        "--deny-warnings",
        "--phi-prefix",
        "/fhir",
        "--scopes",
        "envoy/scopes.json",
        "envoy/envoy.yaml",
        "envoy/istio/wasmplugin.yaml",
        "envoy/istio/mesh-config-snippet.yaml",
    ]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert!(err.contains("0 errors, 0 warnings in 3 files"), "{err}");
    let makefile = std::fs::read_to_string(format!("{ROOT}/Makefile")).unwrap();
    for file in [
        "envoy/envoy.yaml",
        "envoy/istio/wasmplugin.yaml",
        "envoy/istio/mesh-config-snippet.yaml",
        "envoy/scopes.json",
    ] {
        assert!(
            makefile.contains(file),
            "make lint-policy does not lint {file}"
        );
    }
}

#[test]
fn warnings_fail_only_when_denied_and_usage_errors_exit_2() {
    let file = "tests/lint/token-lifetime.json";
    let (code, out, _) = lint(&[file]);
    assert_eq!(code, 0);
    assert!(out.contains("warning[token-lifetime]"), "{out}");
    assert_eq!(lint(&["--deny-warnings", file]).0, 1);
    for bad in [
        vec![],
        vec!["--format", "xml", file],
        vec!["--bogus", file],
        vec!["tests/lint/no-such-file.json"],
        vec!["--scopes", "tests/lint/clean.json", file],
        vec!["--phi-prefix", "/fhir/{id}", file],
        vec!["--high-risk", "no-slash", file],
    ] {
        let (code, _, err) = lint(&bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(err.contains("usage:"), "{err}");
    }
}

#[test]
fn high_risk_paths_need_step_up() {
    let file = "tests/lint/clean.json";
    let (code, got) = findings(&["--high-risk", "/fhir/Patient/{id}", file]);
    assert_eq!(code, 1);
    assert_eq!(
        got,
        [(
            E.to_owned(),
            "export-without-step-up".to_owned(),
            Some(37),
            "rules[2]".to_owned()
        )]
    );
}

#[test]
fn several_files_and_human_output() {
    let (code, out, err) = lint(&[
        "tests/lint/clean.json",
        "tests/lint/wildcard-scope.json",
        "tests/lint/token-lifetime.json",
    ]);
    assert_eq!(code, 1);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("tests/lint/wildcard-scope.json:44: error[wildcard-scope]: `rules[2].scopes[0]` (rule \"patient-read\"): "), "{out}");
    assert!(
        lines[1].starts_with("tests/lint/token-lifetime.json:48: warning[token-lifetime]: "),
        "{out}"
    );
    assert!(err.contains("1 error, 1 warning in 3 files"), "{err}");
}
