//! The audit record of one decision, its tamper-evident chain, and the
//! verifier the `phi-guard audit verify` command runs. Never the token, the
//! query string, a body, or claims beyond the identifiers named here.

use std::collections::HashMap;
use std::fmt;
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest string kept in a record field; a hostile token cannot bloat the log.
const MAX_FIELD: usize = 256;
/// Most items kept in a list field.
const MAX_ITEMS: usize = 64;

/// One decision. Field order is the serialised order, and part of the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub ts: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub decision: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_up: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_fp: Option<String>,
    #[serde(default)]
    pub scopes_granted: Vec<String>,
    #[serde(default)]
    pub scopes_required: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    #[serde(default)]
    pub amr: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    pub vm: String,
    pub seq: u64,
    pub chain: String,
}

impl AuditRecord {
    /// Sets the path, dropping any query string or fragment.
    pub fn set_path(&mut self, raw: &str) {
        let path = raw.split(['?', '#']).next().unwrap_or_default();
        self.path = clip(path);
    }

    /// Bounds every field, so the record stays small whatever the token held.
    fn bound(&mut self) {
        for s in [
            &mut self.ts,
            &mut self.decision,
            &mut self.reason,
            &mut self.method,
            &mut self.path,
            &mut self.vm,
        ] {
            clip_in_place(s);
        }
        for s in [
            &mut self.request_id,
            &mut self.step_up,
            &mut self.rule,
            &mut self.iss,
            &mut self.sub,
            &mut self.client_id,
            &mut self.jti,
            &mut self.token_fp,
            &mut self.acr,
            &mut self.source,
            &mut self.tls,
        ]
        .into_iter()
        .flatten()
        {
            clip_in_place(s);
        }
        for list in [
            &mut self.scopes_granted,
            &mut self.scopes_required,
            &mut self.amr,
        ] {
            list.truncate(MAX_ITEMS);
            list.iter_mut().for_each(clip_in_place);
        }
    }
}

fn clip_in_place(s: &mut String) {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn clip(s: &str) -> String {
    let mut s = s.to_owned();
    clip_in_place(&mut s);
    s
}

/// Lower-case hex (not `write!` per byte: that is slow in wasm).
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for nibble in bytes.iter().flat_map(|b| [b >> 4, b & 0xf]) {
        s.extend(char::from_digit(u32::from(nibble), 16));
    }
    s
}

/// RFC 3339 UTC time with milliseconds, from nanoseconds since the Unix epoch.
pub fn rfc3339_millis(unix_nanos: u64) -> String {
    let millis = (unix_nanos / 1_000_000) % 1000;
    let secs = unix_nanos / 1_000_000_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        let digest = Sha256::digest(key);
        for (b, k) in block.iter_mut().zip(digest.iter()) {
            *b = *k;
        }
    } else {
        for (b, k) in block.iter_mut().zip(key.iter()) {
            *b = *k;
        }
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The chain link: `H(previous link || canonical bytes)`, where the canonical
/// bytes are the record's compact JSON with `chain` empty, and H is SHA-256 or,
/// with a key, HMAC-SHA256 (so whoever can edit the log cannot recompute it).
fn link(key: Option<&[u8]>, prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    match key {
        Some(k) => hmac_sha256(k, &[prev, canonical]),
        None => Sha256::new()
            .chain_update(prev)
            .chain_update(canonical)
            .finalize()
            .into(),
    }
}

fn canonical(record: &AuditRecord) -> Vec<u8> {
    let mut r = record.clone();
    r.chain = String::new();
    serde_json::to_vec(&r).unwrap_or_default()
}

/// One VM's chain of records.
#[derive(Debug)]
pub struct AuditChain {
    vm: String,
    seq: u64,
    prev: [u8; 32],
    key: Option<Vec<u8>>,
}

impl AuditChain {
    /// A new chain for VM `vm`, keyed when `key` is given.
    pub fn new(vm: String, key: Option<Vec<u8>>) -> AuditChain {
        AuditChain {
            vm,
            seq: 0,
            prev: [0; 32],
            key,
        }
    }

    /// Numbers and links `record`, and returns its JSON line.
    pub fn seal(&mut self, record: &mut AuditRecord) -> String {
        record.bound();
        self.seq += 1;
        record.vm.clone_from(&self.vm);
        record.seq = self.seq;
        record.chain = String::new();
        let mut line = serde_json::to_string(record).unwrap_or_default();
        let next = link(self.key.as_deref(), &self.prev, line.as_bytes());
        self.prev = next;
        record.chain = hex(&next);
        // `chain` is the last field: splice the value in rather than serialise twice.
        match line.strip_suffix("\"\"}") {
            Some(head) if line.ends_with("\"chain\":\"\"}") => {
                let mut out = String::with_capacity(line.len() + 64);
                out.push_str(head);
                out.push('"');
                out.push_str(&record.chain);
                out.push_str("\"}");
                line = out;
            }
            _ => line = serde_json::to_string(record).unwrap_or_default(),
        }
        line
    }
}

// ---------------------------------------------------------------------------
// Verification

/// What is wrong with a log, and where (1-based line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    pub line: usize,
    pub kind: Problem,
    pub detail: String,
}

/// Kinds of damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The record's chain does not follow from its bytes and its predecessor.
    Edited,
    /// A sequence number was skipped: a record is gone.
    Missing,
    /// A sequence number went back or repeated.
    Reordered,
    /// A line that holds a record which cannot be read.
    Malformed,
    /// The log could not be read.
    Io,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Problem::Edited => "edited",
            Problem::Missing => "missing",
            Problem::Reordered => "reordered",
            Problem::Malformed => "malformed",
            Problem::Io => "unreadable",
        };
        write!(f, "line {}: {kind}: {}", self.line, self.detail)
    }
}

/// An intact log's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifySummary {
    pub records: usize,
    pub vms: usize,
    pub skipped_lines: usize,
}

/// Finds the record on a line: the line itself, or a field holding it as an
/// object or as a JSON string (Envoy's `%FILTER_STATE(...:PLAIN)%`).
fn find_record(line: &str) -> Option<Result<AuditRecord, String>> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let obj = value.as_object()?;
    let is_record = |o: &serde_json::Map<String, serde_json::Value>| {
        o.contains_key("seq") && o.contains_key("chain")
    };
    if is_record(obj) {
        return Some(serde_json::from_value(value.clone()).map_err(|e| e.to_string()));
    }
    for field in obj.values() {
        let inner = match field {
            serde_json::Value::Object(_) => field.clone(),
            serde_json::Value::String(s) if s.starts_with('{') => match serde_json::from_str(s) {
                Ok(v) => v,
                Err(_) => continue,
            },
            _ => continue,
        };
        if inner.as_object().is_some_and(is_record) {
            return Some(serde_json::from_value(inner).map_err(|e| e.to_string()));
        }
    }
    None
}

/// Checks every chain in an access log. With `start_anywhere`, a chain may
/// begin at any `seq` (a rotated log) and its first record is trusted as the anchor.
pub fn verify_log(
    reader: impl BufRead,
    key: Option<&[u8]>,
    start_anywhere: bool,
) -> Result<VerifySummary, VerifyError> {
    let mut chains: HashMap<String, (u64, [u8; 32])> = HashMap::new();
    let mut records = 0;
    let mut skipped = 0;
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| VerifyError {
            line: n,
            kind: Problem::Io,
            detail: e.to_string(),
        })?;
        let record = match find_record(&line) {
            None => {
                skipped += 1;
                continue;
            }
            Some(Err(e)) => {
                return Err(VerifyError {
                    line: n,
                    kind: Problem::Malformed,
                    detail: e,
                })
            }
            Some(Ok(r)) => r,
        };
        let claimed = decode_hex(&record.chain).ok_or_else(|| VerifyError {
            line: n,
            kind: Problem::Malformed,
            detail: "chain is not 64 hex digits".into(),
        })?;
        let bytes = canonical(&record);
        let err = |kind, detail: String| VerifyError {
            line: n,
            kind,
            detail,
        };
        match chains.get(&record.vm).copied() {
            None if record.seq == 1 || start_anywhere => {
                if record.seq == 1 && link(key, &[0; 32], &bytes) != claimed {
                    return Err(err(
                        Problem::Edited,
                        format!("vm {} seq 1 does not match its chain", record.vm),
                    ));
                }
            }
            None => {
                return Err(err(
                    Problem::Missing,
                    format!("vm {} starts at seq {}, not 1", record.vm, record.seq),
                ));
            }
            Some((last, prev)) => {
                if record.seq <= last {
                    return Err(err(
                        Problem::Reordered,
                        format!("vm {} seq {} after {last}", record.vm, record.seq),
                    ));
                }
                if record.seq > last + 1 {
                    return Err(err(
                        Problem::Missing,
                        format!("vm {} seq {} after {last}", record.vm, record.seq),
                    ));
                }
                if link(key, &prev, &bytes) != claimed {
                    return Err(err(
                        Problem::Edited,
                        format!(
                            "vm {} seq {} does not match its chain",
                            record.vm, record.seq
                        ),
                    ));
                }
            }
        }
        chains.insert(record.vm.clone(), (record.seq, claimed));
        records += 1;
    }
    Ok(VerifySummary {
        records,
        vms: chains.len(),
        skipped_lines: skipped,
    })
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str) -> AuditRecord {
        let mut r = AuditRecord {
            ts: rfc3339_millis(0),
            decision: "allow".into(),
            reason: "ok".into(),
            method: "GET".into(),
            ..AuditRecord::default()
        };
        r.set_path(path);
        r
    }

    fn log(key: Option<&[u8]>) -> Vec<String> {
        let mut a = AuditChain::new("a".into(), key.map(<[u8]>::to_vec));
        let mut b = AuditChain::new("b".into(), key.map(<[u8]>::to_vec));
        (0..6)
            .map(|i| {
                let chain = if i % 2 == 0 { &mut a } else { &mut b };
                let line = chain.seal(&mut rec(&format!("/p/{i}")));
                // The shipped access log holds the record as a string field.
                serde_json::json!({"time": "x", "audit": line}).to_string()
            })
            .collect()
    }

    fn check(lines: &[String], key: Option<&[u8]>) -> Result<VerifySummary, VerifyError> {
        verify_log(lines.join("\n").as_bytes(), key, false)
    }

    #[test]
    fn time_format() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_709_164_800_123_000_000),
            "2024-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339_millis(1_795_392_000_000_000_000),
            "2026-11-23T00:00:00.000Z"
        );
    }

    #[test]
    fn hmac_rfc4231() {
        let h = |k: &[u8], d: &[u8]| hex(&hmac_sha256(k, &[d]));
        assert_eq!(
            h(&[0x0b; 20], b"Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            h(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            h(&[0xaa; 20], &[0xdd; 50]),
            "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"
        );
        assert_eq!(
            h(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn intact_logs_verify() {
        let lines = log(None);
        assert_eq!(
            check(&lines, None),
            Ok(VerifySummary {
                records: 6,
                vms: 2,
                skipped_lines: 0
            })
        );
        let mut with_noise = lines.clone();
        with_noise.insert(2, "[info] envoy started".into());
        with_noise.insert(0, String::new());
        assert_eq!(check(&with_noise, None).unwrap().skipped_lines, 2);
        // Raw record lines work too.
        let raw: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["audit"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert!(check(&raw, None).is_ok());
    }

    #[test]
    fn damage_is_found_and_located() {
        let lines = log(None);
        let mut edited = lines.clone();
        edited[3] = edited[3].replace("/p/3", "/p/9");
        let e = check(&edited, None).unwrap_err();
        assert_eq!((e.line, e.kind), (4, Problem::Edited));
        let mut deleted = lines.clone();
        deleted.remove(2);
        let e = check(&deleted, None).unwrap_err();
        assert_eq!((e.line, e.kind), (4, Problem::Missing));
        let mut swapped = lines.clone();
        swapped.swap(1, 3);
        let e = check(&swapped, None).unwrap_err();
        assert_eq!((e.line, e.kind), (2, Problem::Missing));
        let mut swapped = lines.clone();
        swapped.swap(2, 4);
        assert!(check(&swapped, None).is_err());
        let mut dup = lines.clone();
        dup.insert(3, lines[2].clone());
        let e = check(&dup, None).unwrap_err();
        assert_eq!((e.line, e.kind), (4, Problem::Reordered));
        let mut broken = lines.clone();
        broken[0] = broken[0].replace("\\\"seq\\\":1", "\\\"seq\\\":\\\"x\\\"");
        assert_eq!(check(&broken, None).unwrap_err().kind, Problem::Malformed);
        // Dropping the head of the log is only accepted when asked.
        let tail = &lines[2..];
        assert_eq!(check(tail, None).unwrap_err().kind, Problem::Missing);
        assert!(verify_log(tail.join("\n").as_bytes(), None, true).is_ok());
    }

    #[test]
    fn keyed_chain_needs_the_key() {
        let lines = log(Some(b"secret"));
        assert!(check(&lines, Some(b"secret")).is_ok());
        assert_eq!(
            check(&lines, Some(b"other")).unwrap_err().kind,
            Problem::Edited
        );
        assert_eq!(check(&lines, None).unwrap_err().kind, Problem::Edited);
    }

    #[test]
    fn records_hold_no_query_and_are_bounded() {
        let mut r = rec("/fhir/Patient/1?name=Jane&access_token=abc#frag");
        assert_eq!(r.path, "/fhir/Patient/1");
        r.sub = Some("é".repeat(400));
        r.amr = vec!["x".into(); 100];
        let line = AuditChain::new("v".into(), None).seal(&mut r);
        assert!(!line.contains("Jane") && !line.contains("abc"));
        assert!(r.sub.as_ref().unwrap().len() <= MAX_FIELD);
        assert_eq!(r.amr.len(), MAX_ITEMS);
    }
}

/// Hostile logs, generated: verification answers (no panic) and never calls
/// a forged record intact.
#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,80}",
            (any::<u64>(), "[a-f0-9]{0,64}", "[ -~]{0,12}").prop_map(|(seq, chain, vm)| format!(
                r#"{{"ts":"2026-01-01T00:00:00.000Z","decision":"allow","reason":"ok","method":"GET","path":"/","status":200,"vm":"{vm}","seq":{seq},"chain":"{chain}"}}"#
            )),
            "[ -~]{0,40}".prop_map(|s| format!(r#"{{"audit":"{s}"}}"#)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn hostile_logs_are_answered(lines in prop::collection::vec(line(), 0..6), anywhere in any::<bool>()) {
            let text = lines.join("\n");
            let result = verify_log(text.as_bytes(), None, anywhere);
            // From the start of a chain (not a rotated log, whose first record
            // is trusted), only lines that hold no record can pass.
            if let (Ok(summary), false) = (result, anywhere) {
                prop_assert_eq!(summary.records, 0, "{}", text);
            }
        }
    }
}

/// Forged logs built from real ones: records sealed by two VMs' chains,
/// interleaved as Envoy writes them, then edited, cut, duplicated, swapped,
/// moved to the other VM or re-chained by a forger without the key. A model
/// says what `verify_log` must answer: intact exactly when every VM's records
/// are, in order, a prefix of what that VM sealed (cutting a chain's tail
/// cannot be seen); otherwise refused at the first record that is not.
#[cfg(test)]
mod forged {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use serde_json::{json, Value};

    const KEY: &[u8] = b"the real audit key";

    /// A real log: `vms[i]` picks the VM of record `i`.
    fn real_log(vms: &[bool], keyed: bool) -> Vec<String> {
        let key = keyed.then(|| KEY.to_vec());
        let mut a = AuditChain::new("vm-a".into(), key.clone());
        let mut b = AuditChain::new("vm-b".into(), key);
        vms.iter()
            .enumerate()
            .map(|(i, on_b)| {
                let mut r = AuditRecord {
                    ts: rfc3339_millis(1_790_000_000_000_000_000 + i as u64 * 1_000_000),
                    request_id: Some(format!("req-{i}")),
                    decision: if i % 3 == 0 { "deny" } else { "allow" }.into(),
                    reason: if i % 3 == 0 { "expired" } else { "ok" }.into(),
                    method: "GET".into(),
                    status: if i % 3 == 0 { 401 } else { 200 },
                    sub: (i % 2 == 0).then(|| format!("user-{i}")),
                    scopes_granted: vec!["read:patient-profile".into()],
                    ..AuditRecord::default()
                };
                r.set_path(&format!("/fhir/Patient/{i}"));
                let line = if *on_b {
                    b.seal(&mut r)
                } else {
                    a.seal(&mut r)
                };
                json!({"time": "x", "audit": line}).to_string()
            })
            .collect()
    }

    fn record(line: &str) -> Option<Value> {
        let outer: Value = serde_json::from_str(line).ok()?;
        serde_json::from_str(outer.get("audit")?.as_str()?).ok()
    }

    fn with_record(line: &str, edit: impl FnOnce(&mut Value)) -> String {
        let mut rec = record(line).unwrap();
        edit(&mut rec);
        json!({"time": "x", "audit": rec.to_string()}).to_string()
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Status,
        Path,
        Sub,
        SeqUp,
        SeqDown,
        SeqText,
        OtherVm,
        ChainNibble,
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Changed in place, chain left as it was.
        Edit(prop::sample::Index, Edit),
        /// Changed, then this VM's chain recomputed from there on by someone
        /// without the key (keyed logs only): plain SHA-256, or HMAC under a guess.
        Rechain(prop::sample::Index, Edit, bool),
        Delete(prop::sample::Index),
        Duplicate(prop::sample::Index),
        Swap(prop::sample::Index, prop::sample::Index),
        Noise(prop::sample::Index),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop::sample::select(vec![
            Edit::Status,
            Edit::Path,
            Edit::Sub,
            Edit::SeqUp,
            Edit::SeqDown,
            Edit::SeqText,
            Edit::OtherVm,
            Edit::ChainNibble,
        ])
    }

    fn op() -> impl Strategy<Value = Op> {
        let i = any::<prop::sample::Index>;
        prop_oneof![
            3 => (i(), edit()).prop_map(|(i, e)| Op::Edit(i, e)),
            2 => (i(), edit(), any::<bool>()).prop_map(|(i, e, h)| Op::Rechain(i, e, h)),
            2 => i().prop_map(Op::Delete),
            1 => i().prop_map(Op::Duplicate),
            2 => (i(), i()).prop_map(|(a, b)| Op::Swap(a, b)),
            1 => i().prop_map(Op::Noise),
        ]
    }

    fn apply_edit(line: &str, e: &Edit) -> String {
        with_record(line, |r| match e {
            Edit::Status => r["status"] = json!(r["status"].as_u64().unwrap_or(0) ^ 0x10),
            Edit::Path => r["path"] = json!("/fhir/Patient/other"),
            Edit::Sub => r["sub"] = json!("someone-else"),
            // An earlier edit may have made seq text: counted from 0 then.
            Edit::SeqUp => r["seq"] = json!(r["seq"].as_u64().unwrap_or(0) + 1),
            Edit::SeqDown => r["seq"] = json!(r["seq"].as_u64().unwrap_or(1).saturating_sub(1)),
            Edit::SeqText => r["seq"] = json!("1"),
            Edit::OtherVm => r["vm"] = json!(if r["vm"] == "vm-a" { "vm-b" } else { "vm-a" }),
            Edit::ChainNibble => {
                let mut c = r["chain"].as_str().unwrap_or_default().to_owned();
                let flipped = if c.ends_with('0') { '1' } else { '0' };
                c.pop();
                c.push(flipped);
                r["chain"] = json!(c);
            }
        })
    }

    /// Recomputes the chain of `vm`'s records from line `from` on, as a
    /// forger without the key would: the link before `from` is taken from the log.
    fn rechain(lines: &mut [String], from: usize, hmac_guess: bool) {
        let Some(vm) = record(&lines[from]).and_then(|r| r["vm"].as_str().map(str::to_owned))
        else {
            return;
        };
        let mut prev = [0u8; 32];
        for line in &lines[..from] {
            if let Some(r) = record(line).filter(|r| r["vm"] == vm.as_str()) {
                prev = decode_hex(r["chain"].as_str().unwrap_or("")).unwrap_or([0; 32]);
            }
        }
        for line in &mut lines[from..] {
            let Some(mut r) = record(line).filter(|r| r["vm"] == vm.as_str()) else {
                continue;
            };
            let Ok(mut parsed) = serde_json::from_value::<AuditRecord>(r.clone()) else {
                return;
            };
            let key: Option<&[u8]> = hmac_guess.then_some(b"a guessed key".as_slice());
            let next = link(key, &prev, &canonical(&parsed));
            parsed.chain = hex(&next);
            r["chain"] = json!(parsed.chain);
            prev = next;
            *line = json!({"time": "x", "audit": r.to_string()}).to_string();
        }
    }

    fn forge(mut lines: Vec<String>, ops: &[Op], keyed: bool) -> Vec<String> {
        for op in ops {
            let n = lines.len();
            if n == 0 {
                break;
            }
            match op {
                Op::Edit(i, e) => {
                    let i = i.index(n);
                    if record(&lines[i]).is_some() {
                        lines[i] = apply_edit(&lines[i], e);
                    }
                }
                Op::Rechain(i, e, hmac_guess) => {
                    let i = i.index(n);
                    if keyed && record(&lines[i]).is_some() && !matches!(e, Edit::SeqText) {
                        lines[i] = apply_edit(&lines[i], e);
                        rechain(&mut lines, i, *hmac_guess);
                    }
                }
                Op::Delete(i) => {
                    lines.remove(i.index(n));
                }
                Op::Duplicate(i) => {
                    let i = i.index(n);
                    let copy = lines[i].clone();
                    lines.insert(i + 1, copy);
                }
                Op::Swap(a, b) => lines.swap(a.index(n), b.index(n)),
                Op::Noise(i) => lines.insert(i.index(n), "[info] envoy: noise".into()),
            }
        }
        lines
    }

    /// The model: the 1-based line of the first record that is not the next
    /// one its VM sealed, and what the README calls it there (`None`: every
    /// VM's records are a prefix of its own). Seen from that VM's last good
    /// record: a `seq` not after it is reordered, one past the next is
    /// missing (a chain's first record must be `seq` 1), an unreadable
    /// record is malformed, and any other difference is an edit.
    fn first_forged_line(original: &[String], forged: &[String]) -> Option<(usize, Problem)> {
        let sealed = |vm: &str| -> Vec<Value> {
            original
                .iter()
                .filter_map(|l| record(l))
                .filter(|r| r["vm"] == vm)
                .collect()
        };
        let (a, b) = (sealed("vm-a"), sealed("vm-b"));
        let (mut next_a, mut next_b) = (0u64, 0u64);
        for (i, line) in forged.iter().enumerate() {
            let Ok(outer) = serde_json::from_str::<Value>(line) else {
                continue; // not JSON: not a record line
            };
            let Some(rec) = record(line) else {
                assert!(
                    outer.get("audit").is_none(),
                    "every forged line with a record parses"
                );
                continue;
            };
            let (mine, next) = match rec["vm"].as_str() {
                Some("vm-a") => (&a, &mut next_a),
                Some("vm-b") => (&b, &mut next_b),
                other => panic!("no forgery makes vm {other:?}"),
            };
            if mine.get(*next as usize) == Some(&rec) {
                *next += 1;
                continue;
            }
            let problem = match rec["seq"].as_u64() {
                None => Problem::Malformed,
                Some(seq) if *next == 0 && seq != 1 => Problem::Missing,
                Some(seq) if *next > 0 && seq <= *next => Problem::Reordered,
                Some(seq) if seq > *next + 1 => Problem::Missing,
                Some(_) => Problem::Edited,
            };
            return Some((i + 1, problem));
        }
        None
    }

    type Case = (Vec<bool>, bool, Vec<Op>);

    fn case() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec(any::<bool>(), 1..10),
            any::<bool>(),
            prop::collection::vec(op(), 0..4),
        )
    }

    fn check(
        vms: &[bool],
        keyed: bool,
        ops: &[Op],
    ) -> Result<Result<VerifySummary, VerifyError>, TestCaseError> {
        let original = real_log(vms, keyed);
        let forged = forge(original.clone(), ops, keyed);
        let key = keyed.then_some(KEY);
        let got = verify_log(forged.join("\n").as_bytes(), key, false);
        match (first_forged_line(&original, &forged), &got) {
            (None, Ok(summary)) => {
                let records = forged.iter().filter(|l| record(l).is_some()).count();
                prop_assert_eq!(summary.records, records);
            }
            (Some((line, kind)), Err(e)) => {
                prop_assert_eq!(
                    (e.line, e.kind),
                    (line, kind),
                    "{}\n{}",
                    e,
                    forged.join("\n")
                )
            }
            (want, got) => {
                return Err(TestCaseError::fail(format!(
                    "want {want:?}, got {got:?} for\n{}",
                    forged.join("\n")
                )))
            }
        }
        Ok(got)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn forged_logs_are_found_where_they_were_forged((vms, keyed, ops) in case()) {
            let _verdict = check(&vms, keyed, &ops)?;
        }
    }

    #[test]
    fn generator_reaches_intact_and_every_kind_of_damage() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut counts = std::collections::HashMap::new();
        for _ in 0..1500 {
            let (vms, keyed, ops) = case().new_tree(&mut runner).unwrap().current();
            let name = match check(&vms, keyed, &ops).unwrap() {
                Ok(_) => "intact",
                Err(e) => match e.kind {
                    Problem::Edited if ops.iter().any(|o| matches!(o, Op::Rechain(..))) => {
                        "rechained"
                    }
                    Problem::Edited => "edited",
                    Problem::Missing => "missing",
                    Problem::Reordered => "reordered",
                    Problem::Malformed => "malformed",
                    Problem::Io => "io",
                },
            };
            *counts.entry(name).or_insert(0) += 1;
        }
        for name in [
            "intact",
            "edited",
            "rechained",
            "missing",
            "reordered",
            "malformed",
        ] {
            let n = counts.get(name).copied().unwrap_or(0);
            assert!(n >= 20, "{name}: {n} of 1500: {counts:?}");
        }
    }

    /// Why the key matters: without one, a forger who re-chains is not seen.
    #[test]
    fn an_unkeyed_chain_can_be_recomputed_a_keyed_one_cannot() {
        for keyed in [false, true] {
            let original = real_log(&[false, true, false, false], keyed);
            let mut forged = original.clone();
            forged[2] = apply_edit(&forged[2], &Edit::Status);
            rechain(&mut forged, 2, false);
            let got = verify_log(forged.join("\n").as_bytes(), keyed.then_some(KEY), false);
            assert_eq!(got.is_ok(), !keyed, "{got:?}");
        }
    }
}
