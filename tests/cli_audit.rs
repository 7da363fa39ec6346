//! The `phi-guard audit verify` command: exit codes on intact, damaged and misused input.

// Helpers outside #[test] fns are test code too.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use phi_guard::audit::{AuditChain, AuditRecord};

fn write_log(name: &str, lines: &[String]) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("phi-guard-cli-{}-{name}.log", std::process::id()));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn records(key: Option<&[u8]>) -> Vec<String> {
    let mut chain = AuditChain::new("vm1".into(), key.map(<[u8]>::to_vec));
    (0..4)
        .map(|i| {
            let mut r = AuditRecord {
                decision: "deny".into(),
                reason: "no_rule".into(),
                method: "GET".into(),
                ..Default::default()
            };
            r.set_path(&format!("/x/{i}?secret=1"));
            serde_json::json!({"status": 403, "audit": chain.seal(&mut r)}).to_string()
        })
        .collect()
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phi-guard"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn intact_log_exits_zero() {
    let path = write_log("ok", &records(None));
    assert_eq!(run(&["audit", "verify", path.to_str().unwrap()], &[]).0, 0);
}

#[test]
fn damage_exits_one_and_names_the_line() {
    let mut lines = records(None);
    lines.remove(1);
    let path = write_log("gap", &lines);
    let (code, err) = run(&["audit", "verify", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn keyed_log_needs_the_key() {
    let path = write_log("keyed", &records(Some(b"k3y")));
    let p = path.to_str().unwrap();
    assert_eq!(
        run(
            &["audit", "verify", p, "--key-env", "PG_KEY"],
            &[("PG_KEY", "k3y")]
        )
        .0,
        0
    );
    assert_eq!(
        run(
            &["audit", "verify", p, "--key-env", "PG_KEY"],
            &[("PG_KEY", "nope")]
        )
        .0,
        1
    );
    assert_eq!(run(&["audit", "verify", p], &[]).0, 1);
}

#[test]
fn misuse_exits_two() {
    assert_eq!(run(&[], &[]).0, 2);
    assert_eq!(run(&["audit", "verify"], &[]).0, 2);
    assert_eq!(run(&["audit", "verify", "/nonexistent/file"], &[]).0, 2);
    assert_eq!(
        run(&["audit", "verify", "x", "--key-env", "PG_UNSET_VAR"], &[]).0,
        2
    );
    assert_eq!(run(&["--help"], &[]).0, 0);
}
