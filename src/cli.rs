//! The `lint`, `explain` and `schema` subcommands of the `phi-guard`
//! binary: arguments in, text and an exit code out, so the binary only
//! dispatches and tests can run them without a process.

use std::io::Write;

use crate::lint::{self, Catalogue, Options};
use crate::rules::PathTemplate;

/// Usage of the subcommands here.
pub const USAGE: &str = "\
       phi-guard lint [--format human|json] [--deny-warnings] [--phi-prefix PREFIX]...
                      [--scopes CATALOGUE.json] [--high-risk TEMPLATE]... FILE...
       phi-guard explain --config FILE --method M --path P
                      [--token JWT --jwks FILE | --claims JSON] [--header 'name: value']...
                      [--at RFC3339] [--revocation FILE] [--format human|json]
       phi-guard schema

  lint           check policies (bare JSON, envoy.yaml, Istio WasmPlugin and mesh
                 config) before deployment; exit 1 on errors (and on warnings with
                 --deny-warnings), 2 on a usage error
  explain        what the filter would answer a request, and why
  schema         print the policy's JSON Schema (envoy/phi-guard.schema.json)
";

/// Exit codes.
pub const OK: u8 = 0;
pub const FAILED: u8 = 1;
pub const USAGE_ERROR: u8 = 2;

fn usage(err: &mut dyn Write, problem: &str) -> u8 {
    let _ = writeln!(err, "phi-guard: {problem}\n\nusage: {}", USAGE.trim_start());
    USAGE_ERROR
}

/// The value after a flag.
fn value<'a>(
    rest: &mut std::slice::Iter<'_, &'a str>,
    flag: &str,
    err: &mut dyn Write,
) -> Result<&'a str, u8> {
    rest.next()
        .copied()
        .ok_or_else(|| usage(err, &format!("{flag} needs a value")))
}

/// `phi-guard lint …`
pub fn lint_main(args: &[&str], out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match lint_run(args, out, err) {
        Ok(code) | Err(code) => code,
    }
}

fn lint_run(args: &[&str], out: &mut dyn Write, err: &mut dyn Write) -> Result<u8, u8> {
    let mut files = Vec::new();
    let mut json = false;
    let mut deny_warnings = false;
    let mut opts = Options::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match *arg {
            "--format" => match value(&mut rest, "--format", err)? {
                "json" => json = true,
                "human" => json = false,
                other => return Err(usage(err, &format!("unknown format {other:?}"))),
            },
            "--deny-warnings" => deny_warnings = true,
            "--phi-prefix" => {
                let p = value(&mut rest, "--phi-prefix", err)?;
                if PathTemplate::parse(p).is_err() || p.contains(['{', '*']) {
                    return Err(usage(
                        err,
                        &format!("--phi-prefix {p:?} is not a literal path"),
                    ));
                }
                opts.phi_prefixes.push(p.to_owned());
            }
            "--high-risk" => {
                let t = value(&mut rest, "--high-risk", err)?;
                let template = PathTemplate::parse(t)
                    .map_err(|e| usage(err, &format!("--high-risk {t:?}: {e}")))?;
                opts.high_risk.push(template);
            }
            "--scopes" => {
                let path = value(&mut rest, "--scopes", err)?;
                let text = std::fs::read_to_string(path)
                    .map_err(|e| usage(err, &format!("cannot read {path}: {e}")))?;
                let c = Catalogue::from_json(&text)
                    .map_err(|e| usage(err, &format!("{path}: not a scope catalogue: {e}")))?;
                opts.catalogue = Some(c);
            }
            "--help" | "-h" => {
                let _ = write!(out, "usage: {}", USAGE.trim_start());
                return Ok(OK);
            }
            flag if flag.starts_with("--") => {
                return Err(usage(err, &format!("unknown option {flag}")))
            }
            file => files.push(file),
        }
    }
    if files.is_empty() {
        return Err(usage(err, "which files?"));
    }
    let mut findings = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| usage(err, &format!("cannot read {file}: {e}")))?;
        findings.extend(lint::lint_text(file, &text, &opts));
    }
    if json {
        let _ = writeln!(out, "{}", lint::to_json(&findings));
    } else {
        for f in &findings {
            let _ = writeln!(out, "{f}");
        }
        let errors = findings
            .iter()
            .filter(|f| f.severity == lint::Severity::Error)
            .count();
        let warnings = findings.len() - errors;
        let _ = writeln!(
            err,
            "{errors} error{}, {warnings} warning{} in {} file{}",
            if errors == 1 { "" } else { "s" },
            if warnings == 1 { "" } else { "s" },
            files.len(),
            if files.len() == 1 { "" } else { "s" },
        );
    }
    Ok(if lint::fails(&findings, deny_warnings) {
        FAILED
    } else {
        OK
    })
}
