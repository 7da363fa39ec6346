//! The `phi-guard` command line, built on the same core as the filter.
//!
//! `phi-guard audit verify <access-log> [--key-env NAME] [--start-anywhere]`
//! checks the audit chains in an Envoy access log: exit 0 when intact, 1 with
//! the first damaged line, 2 on a usage error.

use std::fs::File;
use std::io::BufReader;
use std::process::ExitCode;

use phi_guard::audit;

const USAGE: &str = "\
usage: phi-guard audit verify <access-log> [--key-env NAME] [--start-anywhere]

  audit verify   check the tamper-evident audit chains in an Envoy access log
                 (one JSON record per line, raw or inside a field such as \"audit\")
  --key-env NAME read the audit HMAC key from environment variable NAME
                 (the filter's audit.hmac_key_env)
  --start-anywhere
                 accept a log that starts mid-chain (rotated); its first record is trusted
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["--help" | "-h" | "help"] => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["audit", "verify", rest @ ..] => audit_verify(rest),
        _ => usage_error("unknown command"),
    }
}

fn usage_error(problem: &str) -> ExitCode {
    eprintln!("phi-guard: {problem}\n\n{USAGE}");
    ExitCode::from(2)
}

fn audit_verify(args: &[&str]) -> ExitCode {
    let mut file = None;
    let mut key_env = None;
    let mut start_anywhere = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match *arg {
            "--key-env" => match rest.next() {
                Some(name) => key_env = Some(*name),
                None => return usage_error("--key-env needs a variable name"),
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
    let reader = match File::open(path) {
        Ok(f) => BufReader::new(f),
        Err(e) => {
            eprintln!("phi-guard: cannot open {path}: {e}");
            return ExitCode::from(2);
        }
    };
    match audit::verify_log(reader, key.as_deref(), start_anywhere) {
        Ok(s) => {
            println!(
                "ok: {} records from {} workers ({} other lines skipped)",
                s.records, s.vms, s.skipped_lines
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{path}: {e}");
            ExitCode::from(1)
        }
    }
}
