//! The `phi-guard audit verify` command: exit codes on intact, damaged,
//! incomplete (held against checkpoints) and misused input.

// Helpers outside #[test] fns are test code too.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::process::Command;

use phi_guard::audit::{patient_fingerprint, rfc3339_millis, AuditChain, AuditRecord};

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
    let (code, _, err) = run_out(args, env);
    (code, err)
}

/// Exit code, stdout, stderr.
fn run_out(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phi-guard"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// 2026-01-01T00:00:00Z in milliseconds.
const T: u64 = 1_767_225_600_000;

/// Two VMs' chains interleaved in an access log (vm1 and vm2, `n` records
/// each, 10 s apart), and Envoy's log with a checkpoint of each after every
/// second record, amid Envoy's other lines.
fn two_vms(n: u64) -> (Vec<String>, Vec<String>) {
    let mut chains = [
        AuditChain::new("vm1".into(), None),
        AuditChain::new("vm2".into(), None),
    ];
    let mut access = Vec::new();
    let mut envoy = vec!["[2026-01-01 00:00:00.000][1][info][main] [source/server/server.cc:1000] starting main dispatch loop".to_string()];
    for i in 0..n {
        for chain in &mut chains {
            let mut r = AuditRecord {
                ts: rfc3339_millis((T + i * 10_000) * 1_000_000),
                decision: "allow".into(),
                reason: "ok".into(),
                method: "GET".into(),
                ..Default::default()
            };
            r.set_path(&format!("/x/{i}"));
            access
                .push(serde_json::json!({"status": 200, "audit": chain.seal(&mut r)}).to_string());
        }
        if i % 2 == 1 {
            for chain in &chains {
                let cp = chain.checkpoint(T + i * 10_000 + 5_000).unwrap();
                envoy.push(format!("[2026-01-01 00:00:00.000][17][info][wasm] [source/extensions/common/wasm/context.cc:1151] wasm log phi_guard phi_guard: {}", cp.line()));
            }
        }
    }
    (access, envoy)
}

fn vm_of(line: &str) -> String {
    let outer: serde_json::Value = serde_json::from_str(line).unwrap();
    let inner: serde_json::Value = serde_json::from_str(outer["audit"].as_str().unwrap()).unwrap();
    inner["vm"].as_str().unwrap().to_owned()
}

/// `audit verify <access> --checkpoints <envoy> [extra]`: exit code, stdout, stderr.
fn verify_against(
    name: &str,
    access: &[String],
    envoy: &[String],
    extra: &[&str],
) -> (i32, String, String) {
    let a = write_log(&format!("{name}-access"), access);
    let e = write_log(&format!("{name}-envoy"), envoy);
    let mut args = vec![
        "audit",
        "verify",
        a.to_str().unwrap(),
        "--checkpoints",
        e.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_out(&args, &[])
}

#[test]
fn complete_log_exits_zero_counting_checkpoints() {
    let (access, envoy) = two_vms(4);
    let (code, out, err) = verify_against("complete", &access, &envoy, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: 8 records from 2 workers"), "{out}");
    assert!(
        out.contains("ok: 4 checkpoints matched (0 from before the log)"),
        "{out}"
    );
    assert_eq!(err, "");
}

#[test]
fn tail_cut_exits_one_and_names_the_chain() {
    let (mut access, envoy) = two_vms(4);
    // vm1's last record (seq 4, which its last checkpoint names).
    let last_vm1 = access.iter().rposition(|l| vm_of(l) == "vm1").unwrap();
    access.remove(last_vm1);
    let (code, _, err) = verify_against("tail", &access, &envoy, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("tail cut: vm vm1: records end at seq 3"),
        "{err}"
    );
    assert!(!err.contains("vm vm2"), "{err}");
    assert!(
        err.contains("incomplete: 1 problem against the checkpoints"),
        "{err}"
    );
    // Without the checkpoints the same log looks intact: the gap is theirs to find.
    let path = write_log("tail-alone", &access);
    assert_eq!(run(&["audit", "verify", path.to_str().unwrap()], &[]).0, 0);
}

#[test]
fn whole_chain_removed_exits_one_and_names_it() {
    let (mut access, envoy) = two_vms(4);
    access.retain(|l| vm_of(l) != "vm2");
    let (code, _, err) = verify_against("chain", &access, &envoy, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("chain missing: vm vm2: no records"), "{err}");
    let path = write_log("chain-alone", &access);
    assert_eq!(run(&["audit", "verify", path.to_str().unwrap()], &[]).0, 0);
}

#[test]
fn rotated_log_passes_only_with_start_anywhere() {
    let (access, envoy) = two_vms(4);
    // The first two records of each chain are in an earlier file.
    let rotated = &access[4..];
    let (code, _, err) = verify_against("rotated", rotated, &envoy, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("starts at seq 3, not 1"), "{err}");
    let (code, out, err) = verify_against("rotated", rotated, &envoy, &["--start-anywhere"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok: 2 checkpoints matched (2 from before the log)"),
        "{out}"
    );
    // A rotated log is still held to its checkpoints.
    let cut = &access[4..access.len() - 2];
    let (code, _, err) = verify_against("rotated-cut", cut, &envoy, &["--start-anywhere"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("tail cut: vm vm1") && err.contains("tail cut: vm vm2"),
        "{err}"
    );
}

#[test]
fn checkpoint_that_differs_exits_one() {
    let (access, mut envoy) = two_vms(4);
    let at = envoy
        .iter()
        .position(|l| l.contains(r#""vm":"vm2","seq":2,"#))
        .unwrap();
    let chain = envoy[at].split(r#""chain":""#).nth(1).unwrap()[..64].to_owned();
    envoy[at] = envoy[at].replace(&chain, &"0".repeat(64));
    let (code, _, err) = verify_against("differs", &access, &envoy, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("line {}: chain differs: vm vm2", at + 1)),
        "{err}"
    );
}

#[test]
fn unreadable_checkpoint_lines_are_a_warning() {
    let (access, mut envoy) = two_vms(4);
    envoy.push("[2026-01-01 00:00:00.000][17][info][wasm] wasm log phi_guard phi_guard: phi-guard audit checkpoint {\"vm\":".into());
    let (code, out, err) = verify_against("unreadable", &access, &envoy, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: 4 checkpoints matched"), "{out}");
    assert!(
        err.contains(&format!(
            "warning: 1 lines name a checkpoint but hold none that can be read (first: line {})",
            envoy.len()
        )),
        "{err}"
    );
    // No checkpoint at all (Envoy's wasm log above info): intact, with a warning per chain.
    let (code, out, err) = verify_against("none", &access, &envoy[..1], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: 0 checkpoints matched"), "{out}");
    assert!(
        err.contains("vm vm1: no checkpoint vouches")
            && err.contains("vm vm2: no checkpoint vouches"),
        "{err}"
    );
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
    let log = write_log("misuse", &records(None));
    let log = log.to_str().unwrap();
    assert_eq!(run(&["audit", "verify", log, "--checkpoints"], &[]).0, 2);
    assert_eq!(
        run(
            &[
                "audit",
                "verify",
                log,
                "--checkpoints",
                "/nonexistent/envoy.log"
            ],
            &[]
        )
        .0,
        2
    );
    assert_eq!(
        run(
            &[
                "audit",
                "verify",
                log,
                "--checkpoints",
                log,
                "--checkpoints",
                log
            ],
            &[]
        )
        .0,
        2
    );
    // The checkpoints are read first, but a missing access log is still a usage error.
    assert_eq!(
        run(
            &["audit", "verify", "/nonexistent/file", "--checkpoints", log],
            &[]
        )
        .0,
        2
    );
}

#[test]
fn patient_fp_fingerprints_ids_from_stdin_under_the_key() {
    use std::io::Write;
    use std::process::Stdio;
    let run_with = |input: &str, env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_phi-guard"));
        cmd.args(["audit", "patient-fp", "--key-env", "PHI_GUARD_CLI_FP_KEY"])
            .env_remove("PHI_GUARD_CLI_FP_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let written = child.stdin.take().unwrap().write_all(input.as_bytes());
        // A usage error exits before reading stdin: the pipe may be closed
        // by then (a race the no-key case below lost once in CI).
        if let Err(e) = written {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
        )
    };
    let key = [("PHI_GUARD_CLI_FP_KEY", "the-audit-key")];
    let (code, out) = run_with("123\n\n  pt-9 \n", &key);
    assert_eq!(code, 0);
    let want = format!(
        "{}\n{}\n",
        patient_fingerprint(b"the-audit-key", "123"),
        patient_fingerprint(b"the-audit-key", "pt-9")
    );
    assert_eq!(out, want);
    // The chain's sealer writes the same value.
    let chain = AuditChain::new("v".into(), Some(b"the-audit-key".to_vec()));
    assert_eq!(
        chain.patient_fp("123").unwrap(),
        out.lines().next().unwrap()
    );
    // No key: a usage error, and nothing written.
    assert_eq!(run_with("123\n", &[]), (2, String::new()));
    let (code, _) = run(&["audit", "patient-fp"], &[]);
    assert_eq!(code, 2);
}
