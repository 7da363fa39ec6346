//! Writes an access log of sealed audit records for measuring `audit report`
//! (`make bench-report`): `gen_audit_log <MiB> <path>`. Four workers'
//! chains interleaved, 5,000 subjects over 40 clients, 3,000 sources, the
//! shipped policy's rules, a day of traffic; about 85 % allowed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::process::ExitCode;

use phi_guard::audit::{rfc3339_millis, AuditChain, AuditRecord};

const RULES: [(&str, &str, &str); 5] = [
    ("patient-read", "GET", "/fhir/Patient/"),
    ("billing-update", "PUT", "/billing/"),
    ("lab-delete", "DELETE", "/labs/"),
    ("bulk-export", "GET", "/fhir/$export"),
    ("bulk-status", "GET", "/fhir/bulkstatus/"),
];
const DENIALS: [&str; 8] = [
    "insufficient_scope",
    "expired",
    "missing_token",
    "step_up_required",
    "invalid_signature",
    "token_too_old",
    "unknown_key",
    "revoked",
];

/// A small deterministic generator (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mib), Some(path)) = (
        args.first().and_then(|a| a.parse::<u64>().ok()),
        args.get(1),
    ) else {
        eprintln!("usage: gen_audit_log <MiB> <path>");
        return ExitCode::from(2);
    };
    let Ok(file) = File::create(path) else {
        eprintln!("cannot create {path}");
        return ExitCode::from(2);
    };
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut chains: Vec<AuditChain> = (0..4)
        .map(|i| AuditChain::new(format!("19c1f00d00{i}-{i}"), None))
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start_ms: u64 = 1_767_225_600_000;
    let (mut written, mut records) = (0u64, 0u64);
    while written < mib << 20 {
        let ms = start_ms + records * 86_400_000 / 2_000_000;
        let (rule, method, prefix) = RULES
            .get(usize::try_from(rng.below(RULES.len() as u64)).unwrap_or(0))
            .copied()
            .unwrap_or(("patient-read", "GET", "/fhir/Patient/"));
        let denied = rng.below(100) < 15;
        let reason = if denied {
            DENIALS
                .get(usize::try_from(rng.below(DENIALS.len() as u64)).unwrap_or(0))
                .copied()
                .unwrap_or("expired")
        } else {
            "ok"
        };
        let verified = !matches!(
            reason,
            "missing_token" | "invalid_signature" | "unknown_key" | "expired"
        );
        let subject = rng.below(5000);
        let mut r = AuditRecord {
            ts: rfc3339_millis(ms * 1_000_000),
            request_id: Some(format!("{:016x}{:016x}", rng.next(), rng.next())),
            decision: if denied { "deny" } else { "allow" }.into(),
            reason: reason.into(),
            rule: Some(rule.into()),
            method: method.into(),
            status: if denied { 403 } else { 200 },
            iss: verified.then(|| "https://idp.example.org".into()),
            sub: verified.then(|| format!("user-{subject}")),
            client_id: verified.then(|| format!("app-{}", subject % 40)),
            jti: verified.then(|| format!("{:016x}", rng.next())),
            token_fp: Some(format!("{:016x}", rng.next())),
            scopes_granted: vec!["read:patient-profile".into(), "update:billing".into()],
            scopes_required: vec!["read:patient-profile".into()],
            source: Some(format!(
                "10.{}.{}.{}:{}",
                rng.below(4),
                rng.below(30),
                rng.below(25),
                30000 + rng.below(30000)
            )),
            tls: Some("TLSv1.3".into()),
            ..AuditRecord::default()
        };
        let req_path = if prefix.ends_with('/') {
            format!("{prefix}{}", rng.below(100_000))
        } else {
            prefix.to_string()
        };
        r.set_path(&req_path);
        let worker = usize::try_from(rng.below(4)).unwrap_or(0);
        let Some(chain) = chains.get_mut(worker) else {
            continue;
        };
        let audit = chain.seal(&mut r);
        let line = serde_json::json!({
            "time": r.ts, "request_id": r.request_id, "method": method, "path": req_path,
            "status": r.status, "flags": "-", "duration_ms": 1, "audit": audit,
        })
        .to_string();
        if writeln!(out, "{line}").is_err() {
            eprintln!("cannot write {path}");
            return ExitCode::from(1);
        }
        written += line.len() as u64 + 1;
        records += 1;
    }
    if out.flush().is_err() {
        return ExitCode::from(1);
    }
    println!("{records} records, {written} bytes in {path}");
    ExitCode::SUCCESS
}
