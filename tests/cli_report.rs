//! The `phi-guard audit report` command on a generated log of known content:
//! 71 records from two workers, rotated into three files (the oldest
//! gzip-compressed), with every number the report gives asserted.

// Helpers outside #[test] fns are test code too.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use flate2::write::GzEncoder;
use phi_guard::audit::{rfc3339_millis, AuditChain, AuditRecord};
use serde_json::{json, Value};

/// 2026-01-01T00:00:00Z in milliseconds; record `i` is sealed `i` seconds later.
const T0: u64 = 1_767_225_600_000;

/// (count, subject/client, decision reason, rule, path, source), in log order.
type Block = (
    usize,
    Option<(&'static str, &'static str)>,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);
const CONTENT: [Block; 10] = [
    (
        40,
        Some(("ann", "ward-app")),
        "ok",
        "patient-read",
        "/fhir/Patient/1",
        "10.0.0.1:4100",
    ),
    (
        3,
        Some(("ann", "ward-app")),
        "insufficient_scope",
        "lab-delete",
        "/labs/1",
        "10.0.0.1:4101",
    ),
    (
        12,
        Some(("bob", "lab-robot")),
        "ok",
        "lab-delete",
        "/labs/2",
        "10.0.0.2:4200",
    ),
    (
        2,
        Some(("bob", "lab-robot")),
        "step_up_required",
        "bulk-export",
        "/fhir/$export",
        "10.0.0.2:4201",
    ),
    (
        1,
        Some(("bob", "lab-robot")),
        "ok",
        "bulk-export",
        "/fhir/$export",
        "10.0.0.2:4202",
    ),
    (
        1,
        Some(("cat", "portal")),
        "revoked",
        "patient-read",
        "/fhir/Patient/3",
        "10.0.0.3:4300",
    ),
    (
        2,
        Some(("cat", "portal")),
        "token_too_old",
        "lab-delete",
        "/labs/3",
        "10.0.0.3:4301",
    ),
    (
        5,
        None,
        "missing_token",
        "patient-read",
        "/fhir/Patient/1",
        "10.0.0.1:4102",
    ),
    (
        4,
        None,
        "invalid_signature",
        "patient-read",
        "/fhir/Patient/1",
        "[2001:db8::9]:4400",
    ),
    (
        1,
        None,
        "unknown_key",
        "patient-read",
        "/fhir/Patient/1",
        "[2001:db8::9]:4401",
    ),
];

/// The access-log lines: records alternate between workers `vm-a` and `vm-b`.
fn log_lines() -> Vec<String> {
    let mut chains = [
        AuditChain::new("vm-a".into(), None),
        AuditChain::new("vm-b".into(), None),
    ];
    let mut lines = Vec::new();
    for (count, who, reason, rule, path, source) in CONTENT {
        for _ in 0..count {
            let i = lines.len() as u64;
            let mut r = AuditRecord {
                ts: rfc3339_millis((T0 + i * 1000) * 1_000_000),
                decision: if reason == "ok" { "allow" } else { "deny" }.into(),
                reason: reason.into(),
                rule: Some(rule.into()),
                method: "GET".into(),
                status: if reason == "ok" { 200 } else { 403 },
                sub: who.map(|w| w.0.to_string()),
                client_id: who.map(|w| w.1.to_string()),
                source: Some(source.into()),
                ..AuditRecord::default()
            };
            r.set_path(path);
            let line = chains[(i % 2) as usize].seal(&mut r);
            lines.push(json!({"time": "x", "status": r.status, "audit": line}).to_string());
        }
    }
    assert_eq!(lines.len(), 71);
    lines
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-guard-report-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// access.log.2.gz (records 0–29), access.log.1 (30–59, and two lines Envoy
/// answered itself, with no record), access.log (60–70): as logrotate leaves them.
fn rotated(lines: &[String], tag: &str) -> [PathBuf; 3] {
    let d = dir();
    let paths = [
        d.join(format!("{tag}-access.log.2.gz")),
        d.join(format!("{tag}-access.log.1")),
        d.join(format!("{tag}-access.log")),
    ];
    let text = |ls: &[String]| ls.join("\n") + "\n";
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text(&lines[..30]).as_bytes()).unwrap();
    std::fs::write(&paths[0], gz.finish().unwrap()).unwrap();
    let mut middle = lines[30..60].to_vec();
    let envoy_answered = json!({"time": "x", "status": 400, "audit": "-"}).to_string();
    middle.insert(10, envoy_answered.clone());
    middle.insert(20, envoy_answered);
    std::fs::write(&paths[1], text(&middle)).unwrap();
    std::fs::write(&paths[2], text(&lines[60..])).unwrap();
    paths
}

fn report(files: &[&PathBuf], extra: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phi-guard"));
    cmd.args(["audit", "report"]).args(files).args(extra);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_report(files: &[&PathBuf], extra: &[&str]) -> (i32, Value) {
    let mut args = extra.to_vec();
    args.extend(["--format", "json"]);
    let (code, out, err) = report(files, &args);
    (
        code,
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}")),
    )
}

fn t(seconds: u64) -> String {
    rfc3339_millis((T0 + seconds * 1000) * 1_000_000)
}

#[test]
fn the_report_of_a_known_log_rotated_and_gzipped() {
    let [old, mid, new] = rotated(&log_lines(), "known");
    let (code, r) = json_report(&[&old, &mid, &new], &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(
        r["chains"],
        json!({"intact": true, "records": 71, "workers": 2, "skipped_lines": 2,
               "oversized_lines": 0, "problems": 0, "first_problem": null})
    );
    assert_eq!(r["records_reported"], 71);
    assert_eq!(
        r["access"],
        json!([
            {"subject": null, "client": null, "allowed": {},
             "denied": {"invalid_signature": 4, "missing_token": 5, "unknown_key": 1}},
            {"subject": "ann", "client": "ward-app", "allowed": {"patient-read": 40},
             "denied": {"insufficient_scope": 3}},
            {"subject": "bob", "client": "lab-robot", "allowed": {"bulk-export": 1, "lab-delete": 12},
             "denied": {"step_up_required": 2}},
            {"subject": "cat", "client": "portal", "allowed": {},
             "denied": {"revoked": 1, "token_too_old": 2}},
        ])
    );
    let esc =
        |reason: &str, who: Option<(&str, &str)>, rule: &str, n: u64, first: u64, last: u64| {
            json!({"reason": reason, "subject": who.map(|w| w.0), "client": who.map(|w| w.1),
               "rule": rule, "attempts": n, "first": t(first), "last": t(last)})
        };
    assert_eq!(
        r["escalations"],
        json!([
            esc(
                "insufficient_scope",
                Some(("ann", "ward-app")),
                "lab-delete",
                3,
                40,
                42
            ),
            esc("invalid_signature", None, "patient-read", 4, 66, 69),
            esc(
                "revoked",
                Some(("cat", "portal")),
                "patient-read",
                1,
                58,
                58
            ),
            esc(
                "step_up_required",
                Some(("bob", "lab-robot")),
                "bulk-export",
                2,
                55,
                56
            ),
            esc(
                "token_too_old",
                Some(("cat", "portal")),
                "lab-delete",
                2,
                59,
                60
            ),
            esc("unknown_key", None, "patient-read", 1, 70, 70),
        ])
    );
    assert_eq!(
        r["exports"],
        json!([{"subject": "bob", "client": "lab-robot", "path": "/fhir/$export",
                "exports": 1, "first": t(57), "last": t(57)}])
    );
    let src = |s: &str, n: u64, denied: u64, esc: u64| json!({"source": s, "requests": n, "denied": denied, "escalations": esc, "over": 0});
    assert_eq!(
        r["sources"],
        json!({"exact": true, "top": [
            src("10.0.0.1", 48, 8, 3),
            src("10.0.0.2", 15, 2, 2),
            src("2001:db8::9", 5, 5, 5),
            src("10.0.0.3", 3, 3, 3),
        ]})
    );
}

#[test]
fn filters_narrow_what_is_reported_but_every_chain_is_verified() {
    let [old, mid, new] = rotated(&log_lines(), "filters");
    let files = [&old, &mid, &new];
    for (filter, reported) in [
        (&["--client", "lab-robot"][..], 15),
        (&["--subject", "ann"], 43),
        (&["--rule", "lab-delete"], 17),
        // Records 60–70: `--since` includes its time, `--until` excludes it.
        (&["--since", "2026-01-01T00:01:00Z"], 11),
        (&["--until", "2026-01-01T00:01:00Z"], 60),
        (
            &[
                "--since",
                "2026-01-01T00:00:40Z",
                "--until",
                "2026-01-01T00:00:43Z",
            ],
            3,
        ),
        (&["--subject", "cat", "--rule", "lab-delete"], 2),
        (&["--since", "2026-01-02"], 0),
    ] {
        let (code, r) = json_report(&files, filter);
        assert_eq!(code, 0);
        assert_eq!(r["records_reported"], reported, "{filter:?}");
        assert_eq!(r["chains"]["records"], 71, "{filter:?}");
    }
    let (_, r) = json_report(&files, &["--client", "lab-robot"]);
    assert_eq!(r["escalations"].as_array().unwrap().len(), 1);
    assert_eq!(
        r["sources"]["top"],
        json!([{"source": "10.0.0.2", "requests": 15, "denied": 2, "escalations": 2, "over": 0}])
    );
}

#[test]
fn text_and_csv() {
    let [old, mid, new] = rotated(&log_lines(), "formats");
    let (code, text, _) = report(&[&old, &mid, &new], &[]);
    assert_eq!(code, 0);
    for want in [
        "chains: intact: 71 records from 2 workers (2 other lines skipped)",
        "records reported: 71 of 71",
        "  ann      ward-app   allowed   patient-read        40",
        "  insufficient_scope  ann      ward-app   lab-delete    3         2026-01-01T00:00:40.000Z  2026-01-01T00:00:42.000Z",
        "  bob      lab-robot  /fhir/$export  1        2026-01-01T00:00:57.000Z  2026-01-01T00:00:57.000Z",
        "  10.0.0.1     48        8       3            0",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let (code, csv, _) = report(&[&old, &mid, &new], &["--format", "csv"]);
    assert_eq!(code, 0);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "section,subject,client,rule,reason,path,source,count,denied,escalations,over,first,last,detail");
    let count = |section: &str| {
        rows.iter()
            .filter(|r| r.starts_with(&format!("{section},")))
            .count()
    };
    // Per identity: 3 (rule, allowed) and 7 (reason, denied) rows; 6 escalations, 1 export, 4 sources.
    assert_eq!(
        [
            count("chains"),
            count("allowed"),
            count("denied"),
            count("escalation"),
            count("export"),
            count("source")
        ],
        [1, 3, 7, 6, 1, 4]
    );
    assert!(
        rows.contains(&"allowed,bob,lab-robot,lab-delete,,,,12,,,,,,"),
        "{csv}"
    );
    assert!(rows.contains(&"escalation,,,patient-read,invalid_signature,,,4,,,,2026-01-01T00:01:06.000Z,2026-01-01T00:01:09.000Z,"), "{csv}");
}

#[test]
fn damage_is_reported_first_and_the_report_still_follows() {
    let mut lines = log_lines();
    // Record 45 (the 16th line of access.log.1 once the two Envoy lines are in): edited.
    lines[45] = lines[45].replace("/labs/2", "/labs/20");
    let [old, mid, new] = rotated(&lines, "damaged");
    let (code, r) = json_report(&[&old, &mid, &new], &[]);
    assert_eq!(code, 1);
    assert_eq!(r["chains"]["intact"], false);
    assert_eq!(r["chains"]["problems"], 1);
    let first = &r["chains"]["first_problem"];
    assert_eq!(first["file"], mid.to_str().unwrap());
    assert_eq!(first["line"], 17);
    assert!(
        first["problem"]
            .as_str()
            .unwrap()
            .starts_with("line 17: edited: vm vm-b seq 23"),
        "{first}"
    );
    assert_eq!(
        r["access"][2]["allowed"]["lab-delete"], 12,
        "the report goes on"
    );
    let (code, text, _) = report(&[&old, &mid, &new], &[]);
    assert_eq!(code, 1);
    assert!(
        text.contains("chains: NOT INTACT: 1 problem in 71 records; first: "),
        "{text}"
    );

    // Files in the wrong order: the chains say so; the counts stay.
    let lines = log_lines();
    let [old, mid, new] = rotated(&lines, "order");
    let (code, r) = json_report(&[&new, &mid, &old], &[]);
    assert_eq!(code, 1);
    assert!(
        r["chains"]["first_problem"]["problem"]
            .as_str()
            .unwrap()
            .contains("starts at seq"),
        "{r}"
    );
    assert_eq!(r["records_reported"], 71);
    // The oldest file gone: the rest starts mid-chain, which --start-anywhere accepts.
    let (code, r) = json_report(&[&mid, &new], &[]);
    assert_eq!((code, &r["chains"]["records"]), (1, &json!(41)));
    let (code, r) = json_report(&[&mid, &new], &["--start-anywhere"]);
    assert_eq!((code, &r["chains"]["intact"]), (0, &json!(true)));
}

#[test]
fn usage_errors_exit_2() {
    let [old, _, _] = rotated(&log_lines(), "usage");
    for args in [
        &["--format", "xml"][..],
        &["--since", "last tuesday"],
        &["--key-env", "PHI_GUARD_REPORT_TEST_UNSET"],
    ] {
        let (code, _, err) = report(&[&old], args);
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    let (code, _, err) = report(&[], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("which access-log files?"), "{err}");
    let missing = dir().join("no-such.log");
    let (code, _, err) = report(&[&missing], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot open"), "{err}");
}
