//! The `phi-guard` command line, built on the same core as the filter.
//!
//! `phi-guard audit verify <access-log> [--checkpoints ENVOY-LOG] [--key-env NAME] [--start-anywhere]`
//! checks the audit chains in an Envoy access log, and with `--checkpoints`
//! that no chain ends before the heads its VM wrote to Envoy's log: exit 0
//! when intact and complete, 1 with the first damaged line or every chain
//! that falls short of its checkpoints, 2 on a usage error.
//!
//! `phi-guard audit report <access-log>… [filters] [--format text|csv|json]`
//! verifies the chains, then reports who did what (see `phi_guard::report`).
//! `phi-guard audit patient-fp --key-env NAME` reads patient ids, one per
//! line, and writes each one's `patient_fp` under the audit key, so that an
//! investigation can find a patient's records without the log naming them.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::process::ExitCode;

use phi_guard::audit;

const USAGE: &str = "\
usage: phi-guard audit verify <access-log> [--checkpoints ENVOY-LOG] [--key-env NAME] [--start-anywhere]
       phi-guard audit report <access-log>... [--since T] [--until T] [--subject S] [--client C]
                              [--rule R] [--format text|csv|json] [--key-env NAME] [--start-anywhere]
       phi-guard audit patient-fp --key-env NAME < patient-ids
       phi-guard lint|explain|schema ...   (policy as code: below)

  audit verify   check the tamper-evident audit chains in an Envoy access log
                 (one JSON record per line, raw or in the line's \"audit\" field)
  --checkpoints ENVOY-LOG
                 hold the access log to the chain heads each VM wrote to Envoy's
                 own log (audit.checkpoint_seconds): name every chain whose
                 records end before its last checkpoint, every checkpointed
                 chain with no records, and every record whose chain value
                 differs from its checkpoint's
  --key-env NAME read the audit HMAC key from environment variable NAME
                 (the filter's audit.hmac_key_env)
  --start-anywhere
                 accept a log that starts mid-chain (rotated); its first record is
                 trusted, and checkpoints from before it are not held against it

  audit report   verify the chains (saying whether they are intact, or the first
                 problem), then report per subject and client: requests allowed
                 per rule and denied per reason, escalation attempts, bulk exports
                 started, the busiest sources. Files are read in the order given,
                 oldest first (rotated files: access.log.2.gz access.log.1 access.log);
                 gzip files are read as such; - is standard input. Exit 0 when the
                 chains are intact, 1 when not (the report is printed all the same)
  --since T, --until T
                 records at or after T, before T (2026-01-31 or 2026-01-31T08:00:00Z)
  --subject S, --client C, --rule R
                 records of that subject (sub), client (client_id) or rule only
  audit patient-fp
                 read FHIR patient ids, one per line, from standard input and
                 write each one's patient_fp (the audit record's keyed
                 fingerprint) under the audit key in NAME
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["--help" | "-h" | "help"] => {
            print!("{USAGE}\n{}", phi_guard::cli::USAGE);
            ExitCode::SUCCESS
        }
        ["audit", "verify", rest @ ..] => audit_verify(rest),
        ["audit", "report", rest @ ..] => {
            let code = phi_guard::report::run(rest, &mut std::io::stdout(), &mut std::io::stderr());
            if code == 2 {
                eprintln!("\n{USAGE}");
            }
            ExitCode::from(code)
        }
        ["lint", rest @ ..] => policy_command(phi_guard::cli::lint_main, rest),
        ["explain", rest @ ..] => policy_command(phi_guard::cli::explain_main, rest),
        ["schema", rest @ ..] => policy_command(phi_guard::cli::schema_main, rest),
        ["audit", "patient-fp", rest @ ..] => audit_patient_fp(rest),
        _ => usage_error("unknown command"),
    }
}

/// A subcommand that lives in `phi_guard::cli` (lint, explain, schema).
fn policy_command(
    run: fn(&[&str], &mut dyn std::io::Write, &mut dyn std::io::Write) -> u8,
    args: &[&str],
) -> ExitCode {
    ExitCode::from(run(args, &mut std::io::stdout(), &mut std::io::stderr()))
}

fn usage_error(problem: &str) -> ExitCode {
    eprintln!("phi-guard: {problem}\n\n{USAGE}");
    ExitCode::from(2)
}

fn audit_verify(args: &[&str]) -> ExitCode {
    let mut file = None;
    let mut checkpoints_file = None;
    let mut key_env = None;
    let mut start_anywhere = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match *arg {
            "--key-env" => match rest.next() {
                Some(name) => key_env = Some(*name),
                None => return usage_error("--key-env needs a variable name"),
            },
            "--checkpoints" => match rest.next() {
                Some(_) if checkpoints_file.is_some() => {
                    return usage_error("one --checkpoints file, please")
                }
                Some(path) => checkpoints_file = Some(*path),
                None => return usage_error("--checkpoints needs Envoy's log file"),
            },
            "--start-anywhere" => start_anywhere = true,
            flag if flag.starts_with("--") => {
                return usage_error(&format!("unknown option {flag}"))
            }
            path if file.is_none() => file = Some(path),
            _ => return usage_error("one access-log file, please"),
        }
    }
    let Some(path) = file else {
        return usage_error("which access-log file?");
    };
    let key = match key_env {
        None => None,
        Some(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Some(v.into_bytes()),
            _ => return usage_error(&format!("environment variable {name} is not set")),
        },
    };
    let checkpoints = match checkpoints_file.map(read_checkpoints).transpose() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let reader = match open(path) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let Some((cp_path, checkpoints)) = checkpoints_file.zip(checkpoints) else {
        return match audit::verify_log(reader, key.as_deref(), start_anywhere) {
            Ok(s) => {
                print_ok(&s);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{path}: {e}");
                ExitCode::from(1)
            }
        };
    };
    if let (Some(first), n) = (checkpoints.unreadable.first(), checkpoints.unreadable.len()) {
        eprintln!("{cp_path}: warning: {n} lines name a checkpoint but hold none that can be read (first: line {first}); ignored");
    }
    let (summary, complete) = match audit::verify_log_with_checkpoints(
        reader,
        key.as_deref(),
        start_anywhere,
        &checkpoints,
    ) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::from(1);
        }
    };
    for vm in &complete.unvouched {
        eprintln!("{cp_path}: warning: vm {vm}: no checkpoint vouches for its records (written within the last audit.checkpoint_seconds, or Envoy's wasm log is not at info)");
    }
    if !complete.gaps.is_empty() {
        for gap in &complete.gaps {
            eprintln!("{cp_path}: {gap}");
        }
        let n = complete.gaps.len();
        let s = if n == 1 { "" } else { "s" };
        eprintln!("{path}: incomplete: {n} problem{s} against the checkpoints in {cp_path}");
        return ExitCode::from(1);
    }
    print_ok(&summary);
    println!(
        "ok: {} checkpoints matched ({} from before the log)",
        complete.matched, complete.before_log
    );
    ExitCode::SUCCESS
}

/// Each patient id on standard input, as its `patient_fp`.
fn audit_patient_fp(args: &[&str]) -> ExitCode {
    let ["--key-env", name] = args else {
        return usage_error("audit patient-fp needs --key-env NAME");
    };
    let key = match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => return usage_error(&format!("environment variable {name} is not set")),
    };
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else {
            eprintln!("phi-guard: standard input is not text");
            return ExitCode::from(2);
        };
        let id = line.trim();
        if !id.is_empty() {
            println!("{}", audit::patient_fingerprint(key.as_bytes(), id));
        }
    }
    ExitCode::SUCCESS
}

fn print_ok(s: &audit::VerifySummary) {
    println!(
        "ok: {} records from {} workers ({} other lines skipped)",
        s.records, s.vms, s.skipped_lines
    );
}

/// A file to read, or exit 2 saying why not.
fn open(path: &str) -> Result<BufReader<File>, ExitCode> {
    File::open(path).map(BufReader::new).map_err(|e| {
        eprintln!("phi-guard: cannot open {path}: {e}");
        ExitCode::from(2)
    })
}

/// The checkpoints in Envoy's log at `path`.
fn read_checkpoints(path: &str) -> Result<audit::Checkpoints, ExitCode> {
    audit::Checkpoints::read(open(path)?).map_err(|e| {
        eprintln!("{path}: {e}");
        ExitCode::from(1)
    })
}
