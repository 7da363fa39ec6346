//! The `lint`, `explain` and `schema` subcommands of the `phi-guard`
//! binary: arguments in, text and an exit code out, so the binary only
//! dispatches and tests can run them without a process.

use std::io::Write;

use crate::config::Policy;
use crate::explain::{self, Credential, Input};
use crate::lint::{self, Catalogue, Options};
use crate::rules::PathTemplate;

/// Usage of the subcommands here.
pub const USAGE: &str = "\
       phi-guard lint [--format human|json] [--deny-warnings] [--phi-prefix PREFIX]...
                      [--scopes CATALOGUE.json] [--high-risk TEMPLATE]... FILE...
       phi-guard explain --config FILE [--policy N] --method M --path P
                      [--token JWT [--jwks FILE] | --claims JSON|@FILE] [--header 'name: value']...
                      [--at RFC3339|UNIX-SECONDS] [--revocation FILE] [--introspection FILE]
                      [--tls TLSv1.2|TLSv1.3|none] [--format human|json]
       phi-guard schema

  lint           check policies (bare JSON, envoy.yaml, Istio WasmPlugin and mesh
                 config) before deployment; exit 1 on errors (and on warnings with
                 --deny-warnings), 2 on a usage error
  explain        what the filter would answer a request, and why: path safety, every
                 rule tried, the rule's requirements, decision, status, WWW-Authenticate
                 and audit reason (--claims: signature NOT checked; say so)
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

/// `phi-guard explain …`
pub fn explain_main(args: &[&str], out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match explain_run(args, out, err) {
        Ok(code) | Err(code) => code,
    }
}

fn read(path: &str, err: &mut dyn Write) -> Result<String, u8> {
    std::fs::read_to_string(path).map_err(|e| usage(err, &format!("cannot read {path}: {e}")))
}

/// The policy in `file` (the `which`-th one found), as the filter loads it.
pub fn load_policy(file: &str, text: &str, which: usize) -> Result<(Policy, usize), String> {
    let docs = crate::policy_file::read_documents(text).map_err(|e| {
        format!(
            "{file}:{}: not YAML or JSON: {}",
            e.line.unwrap_or(0),
            e.problem
        )
    })?;
    let found = crate::policy_file::find_policies(&docs);
    let count = found.len();
    let p = found
        .get(which)
        .ok_or_else(|| format!("{file}: no phi-guard policy number {which} (found {count})"))?;
    if let Some(problem) = &p.problem {
        return Err(format!("{file}: {problem}"));
    }
    let policy = Policy::from_json(p.json.as_bytes()).map_err(|e| format!("{file}: {e}"))?;
    Ok((policy, count))
}

fn explain_run(args: &[&str], out: &mut dyn Write, err: &mut dyn Write) -> Result<u8, u8> {
    let mut config = None;
    let mut which = 0usize;
    let (mut method, mut path) = (None, None);
    let (mut token, mut jwks, mut claims) = (None, None, None);
    let mut headers = Vec::new();
    let mut at = None;
    let (mut revocation, mut introspection) = (None, None);
    // As the shipped listener would see it; `--tls none` for plaintext.
    let mut tls = Some("TLSv1.3".to_owned());
    let mut json = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match *arg {
            "--config" => config = Some(value(&mut rest, arg, err)?),
            "--policy" => {
                let n = value(&mut rest, arg, err)?;
                which = n
                    .parse()
                    .map_err(|_| usage(err, &format!("--policy {n:?}: a number from 0")))?;
            }
            "--method" => method = Some(value(&mut rest, arg, err)?),
            "--path" => path = Some(value(&mut rest, arg, err)?),
            "--token" => token = Some(value(&mut rest, arg, err)?),
            "--jwks" => jwks = Some(read(value(&mut rest, arg, err)?, err)?),
            "--claims" => {
                let c = value(&mut rest, arg, err)?;
                let text = match c.strip_prefix('@') {
                    Some(file) => read(file, err)?,
                    None => c.to_owned(),
                };
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| usage(err, &format!("--claims is not JSON: {e}")))?;
                match v {
                    serde_json::Value::Object(m) => claims = Some(m),
                    _ => return Err(usage(err, "--claims must be a JSON object")),
                }
            }
            "--header" => {
                let h = value(&mut rest, arg, err)?;
                let (name, v) = h
                    .split_once(':')
                    .ok_or_else(|| usage(err, &format!("--header {h:?}: want 'name: value'")))?;
                headers.push((name.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
            "--at" => {
                let t = value(&mut rest, arg, err)?;
                let secs = match t.parse::<i64>() {
                    Ok(s) => s,
                    Err(_) => crate::audit::parse_rfc3339_millis(t)
                        .and_then(|ms| i64::try_from(ms / 1000).ok())
                        .ok_or_else(|| {
                            usage(err, &format!("--at {t:?}: want RFC 3339 UTC (2026-01-31T12:00:00Z) or Unix seconds"))
                        })?,
                };
                at = Some(secs);
            }
            "--revocation" => revocation = Some(read(value(&mut rest, arg, err)?, err)?),
            "--tls" => {
                tls = match value(&mut rest, arg, err)? {
                    "none" => None,
                    v => Some(v.to_owned()),
                }
            }
            "--introspection" => introspection = Some(read(value(&mut rest, arg, err)?, err)?),
            "--format" => match value(&mut rest, arg, err)? {
                "json" => json = true,
                "human" => json = false,
                other => return Err(usage(err, &format!("unknown format {other:?}"))),
            },
            "--help" | "-h" => {
                let _ = write!(out, "usage: {}", USAGE.trim_start());
                return Ok(OK);
            }
            other => return Err(usage(err, &format!("unexpected argument {other:?}"))),
        }
    }
    let (Some(config), Some(method), Some(path)) = (config, method, path) else {
        return Err(usage(err, "explain needs --config, --method and --path"));
    };
    let credential = match (token, jwks, claims) {
        (Some(_), _, Some(_)) => return Err(usage(err, "--token or --claims, not both")),
        (None, Some(_), _) => return Err(usage(err, "--jwks goes with --token")),
        (Some(t), jwks, None) => Credential::Token {
            token: t.to_owned(),
            jwks,
        },
        (None, None, Some(c)) => Credential::Claims(c),
        (None, None, None) => Credential::None,
    };
    let text = read(config, err)?;
    let (policy, count) = load_policy(config, &text, which).map_err(|e| {
        let _ = writeln!(err, "phi-guard: {e}");
        FAILED
    })?;
    let now = match at {
        Some(s) => s,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
    };
    let input = Input {
        method: method.to_owned(),
        path: path.to_owned(),
        credential,
        headers,
        now,
        revocation,
        introspection,
        tls,
    };
    let mut e = explain::explain(&policy, &input).map_err(|e| usage(err, &e))?;
    if count > 1 {
        e.notes.push(format!(
            "{config} holds {count} phi-guard policies; this is number {which} (--policy N picks another)"
        ));
    }
    if json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&e).unwrap_or_default()
        );
    } else {
        let _ = write!(out, "{}", explain::render(&e));
    }
    Ok(OK)
}

/// `phi-guard schema`: the policy's JSON Schema.
pub fn schema_main(args: &[&str], out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    if let Some(a) = args.first() {
        return usage(err, &format!("schema takes no arguments ({a:?})"));
    }
    let _ = write!(out, "{}", crate::schema::text());
    OK
}
