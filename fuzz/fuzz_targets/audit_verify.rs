//! The audit-log verifier (`audit::verify_log`, the `phi-guard audit verify`
//! command) over arbitrary logs, and the sealer it checks.
//!
//! Input: an access log, any bytes, one record (or anything else) per line.
//!
//! Oracles: the verifier answers (no panic) with and without the HMAC key,
//! from the start and mid-chain; an intact log's counts add up to its lines.
//! With the key and from the start, a record is called intact only if
//! sealing the same records afresh gives the same chain values: no record
//! the sealer did not make gets through. And whatever the fields hold (each
//! input line becomes the text of one record), what the sealer writes, raw or
//! inside an Envoy access-log line, verifies.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use phi_guard::audit::{verify_log, AuditChain, AuditRecord};
use phi_guard_fuzz::AUDIT_KEY;
use serde_json::{json, Value};

/// Records sealed per input for the round trip.
const MAX_ROUND_TRIP: usize = 16;

fuzz_target!(|data: &[u8]| {
    for key in [None, Some(AUDIT_KEY)] {
        for start_anywhere in [false, true] {
            let Ok(summary) = verify_log(data, key, start_anywhere) else {
                continue;
            };
            let text = std::str::from_utf8(data).expect("an intact log is UTF-8");
            let lines = text.lines().count();
            assert_eq!(summary.records + summary.skipped_lines, lines);
            assert!(summary.vms <= summary.records);
            if key.is_some() && !start_anywhere {
                assert_resealed(text);
            }
        }
    }
    round_trip(&String::from_utf8_lossy(data));
});

/// Every record in `text` is what a keyed chain per VM seals from it.
fn assert_resealed(text: &str) {
    let mut chains: HashMap<String, AuditChain> = HashMap::new();
    for record in text.lines().filter_map(find_record) {
        let chain = chains
            .entry(record.vm.clone())
            .or_insert_with(|| AuditChain::new(record.vm.clone(), Some(AUDIT_KEY.to_vec())));
        let mut fresh = record.clone();
        chain.seal(&mut fresh);
        assert!(
            fresh.chain.eq_ignore_ascii_case(&record.chain),
            "record accepted that the sealer did not make: {record:?}"
        );
    }
}

/// The record on a line, found as the verifier documents it: the line itself,
/// or its `audit` field holding one as an object or as a JSON string.
fn find_record(line: &str) -> Option<AuditRecord> {
    let value: Value = serde_json::from_str(line).ok()?;
    let is_record = |v: &Value| {
        v.as_object()
            .is_some_and(|o| o.contains_key("seq") && o.contains_key("chain"))
    };
    if is_record(&value) {
        return serde_json::from_value(value).ok();
    }
    let field = value.as_object()?.get(phi_guard::audit::RECORD_FIELD)?;
    let inner = match field {
        Value::String(s) if s.starts_with('{') => serde_json::from_str(s).ok()?,
        Value::Object(_) => field.clone(),
        _ => return None,
    };
    is_record(&inner).then(|| serde_json::from_value(inner).ok())?
}

/// Seals one record per input line (its text in every string field), writes
/// them raw and as Envoy lines, and verifies the result.
fn round_trip(text: &str) {
    for key in [None, Some(AUDIT_KEY)] {
        let mut chain = AuditChain::new("vm-fuzz".into(), key.map(<[u8]>::to_vec));
        let mut log = String::new();
        let mut n = 0;
        for (i, line) in text.lines().take(MAX_ROUND_TRIP).enumerate() {
            let mut r = AuditRecord {
                ts: line.into(),
                request_id: Some(line.into()),
                decision: line.into(),
                reason: line.into(),
                method: line.into(),
                status: u16::try_from(i).unwrap_or(0),
                sub: Some(line.into()),
                jti: Some(line.into()),
                acr: Some(line.into()),
                amr: line.split(' ').map(String::from).collect(),
                scopes_granted: line.split(' ').map(String::from).collect(),
                ..AuditRecord::default()
            };
            r.set_path(line);
            let sealed = chain.seal(&mut r);
            if i % 2 == 0 {
                log.push_str(&sealed);
            } else {
                let envelope = json!({"method": line, "path": line, "request_id": line,
                                      "audit": sealed});
                log.push_str(&envelope.to_string());
            }
            log.push('\n');
            n += 1;
        }
        let summary = verify_log(log.as_bytes(), key, false)
            .unwrap_or_else(|e| panic!("a sealed log fails: {e}\n{log}"));
        assert_eq!((summary.records, summary.skipped_lines), (n, 0));
    }
}
