//! The audit record of one decision, its tamper-evident chain, the
//! checkpoints that vouch for a chain's length, and the verifier the
//! `phi-guard audit verify` command runs. Never the token, the query string,
//! a body, or claims beyond the identifiers named here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::answer::Reason;
use crate::binding::Binding;
use crate::config::{Policy, Rule};
use crate::token::{self, VerifiedToken};

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
    /// How the client proved possession of a bound token: `mtls` or `dpop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
    /// Names (never values) of forbidden claims the token carried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phi_claims: Vec<String>,
    /// The FHIR interaction (`read`, `search-type`, …) of a request under
    /// the FHIR base path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_interaction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_type: Option<String>,
    /// [`patient_fingerprint`] of the patient whose compartment the request
    /// provably stays within: never the id itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_fp: Option<String>,
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
            &mut self.binding,
            &mut self.fhir_interaction,
            &mut self.fhir_type,
            &mut self.patient_fp,
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
            &mut self.phi_claims,
        ] {
            list.truncate(MAX_ITEMS);
            list.iter_mut().for_each(clip_in_place);
        }
    }
}

/// What the host read of a request that its audit record names.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    pub request_id: Option<&'a str>,
    pub method: &'a str,
    /// Envoy's `:path`, query included (the record keeps none).
    pub path: &'a str,
    /// Every `Authorization` header value: a refused token is named by its fingerprint.
    pub authorization: &'a [String],
    pub source: Option<&'a str>,
    /// `None` over plaintext.
    pub tls: Option<&'a str>,
    pub binding: Option<Binding>,
    /// What the FHIR model saw of a request under its base path.
    pub fhir: Option<&'a crate::fhir::Seen>,
    /// The launch patient's keyed fingerprint ([`AuditChain::patient_fp`]).
    pub patient_fp: Option<&'a str>,
}

/// The audit record of a decision, before the status and chain are known.
pub fn draft(
    seen: &Request<'_>,
    reason: Reason,
    rule: Option<&Rule>,
    token: Option<&VerifiedToken>,
    policy: &Policy,
    now_ms: u64,
) -> AuditRecord {
    let token_fp = match (token, rule) {
        (Some(t), _) => Some(t.fingerprint.clone()),
        // A public rule ignores any token, so the record does not name one;
        // one sent over plaintext may have been seen, and is not named either.
        (None, Some(r)) if r.public => None,
        (None, _) if reason == Reason::InsecureTransport => None,
        (None, _) => {
            let auth: Vec<&str> = seen.authorization.iter().map(String::as_str).collect();
            token::extract_credentials(&auth)
                .ok()
                .flatten()
                .map(|(_, t)| token::fingerprint(t))
        }
    };
    let mut r = AuditRecord {
        ts: rfc3339_millis(now_ms.saturating_mul(1_000_000)),
        request_id: seen.request_id.map(str::to_owned),
        decision: if reason == Reason::Ok {
            "allow"
        } else {
            "deny"
        }
        .to_string(),
        reason: reason.code().to_string(),
        step_up: match reason {
            Reason::StepUpRequired(f) => Some(f.code().to_string()),
            _ => None,
        },
        rule: rule.map(|r| r.id.clone()),
        method: seen.method.to_owned(),
        path: String::new(),
        status: 0,
        iss: token
            .and_then(|t| policy.providers.get(t.provider))
            .map(|p| p.issuer.clone()),
        sub: token.and_then(|t| t.sub.clone()),
        client_id: token.and_then(|t| t.client_id.clone().or_else(|| t.azp.clone())),
        jti: token.and_then(|t| t.jti.clone()),
        token_fp,
        scopes_granted: token
            .map(|t| t.scopes.iter().map(str::to_owned).collect())
            .unwrap_or_default(),
        // A rule's scopes, or the narrowest SMART scopes the FHIR model judged.
        scopes_required: rule
            .into_iter()
            .flat_map(|r| r.scopes.iter().chain(&r.scopes_any))
            .chain(seen.fhir.into_iter().flat_map(|s| &s.scopes))
            .cloned()
            .collect(),
        acr: token.and_then(|t| t.acr.clone()),
        amr: token.map(|t| t.amr.clone()).unwrap_or_default(),
        source: seen.source.map(str::to_owned),
        // Always there: "none" says plaintext as plainly as a version says TLS.
        tls: Some(seen.tls.unwrap_or("none").to_owned()),
        binding: seen.binding.map(|b| b.code().to_string()),
        phi_claims: token.map(|t| t.phi_claims.clone()).unwrap_or_default(),
        fhir_interaction: seen.fhir.map(|s| s.interaction.code().to_string()),
        fhir_type: seen.fhir.and_then(|s| s.kind.clone()),
        patient_fp: seen.patient_fp.map(str::to_owned),
        vm: String::new(),
        seq: 0,
        chain: String::new(),
    };
    r.set_path(seen.path);
    r
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

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time
/// (`2026-01-01T00:00:00.123Z`, as [`rfc3339_millis`] writes; any fraction).
pub fn parse_rfc3339_millis(ts: &str) -> Option<u64> {
    let num = |at: usize, len: usize| -> Option<u32> {
        let digits = ts.get(at..at + len)?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let seps = [(4, "-"), (7, "-"), (10, "T"), (13, ":"), (16, ":")];
    if seps
        .iter()
        .any(|(at, sep)| ts.get(*at..at + 1) != Some(*sep))
    {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, s) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let fraction = ts.get(19..)?.strip_suffix('Z')?;
    let millis = match fraction.strip_prefix('.') {
        None if fraction.is_empty() => 0,
        None => return None,
        Some(digits)
            if (1..=9).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{:0<3}", digits.get(..digits.len().min(3))?)
                .parse::<u64>()
                .ok()?
        }
        Some(_) => return None,
    };
    let days = u64::try_from(days_from_civil(i64::from(y), mo, d)).ok()?;
    let secs = days * 86_400 + u64::from(h) * 3600 + u64::from(mi) * 60 + u64::from(s);
    Some(secs * 1000 + millis)
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

/// What keys patient fingerprints, derived from the audit key so that the
/// chain's key and this one never meet the same input.
fn patient_key(audit_key: &[u8]) -> [u8; 32] {
    hmac_sha256(audit_key, &[b"phi-guard patient_fp v1"])
}

/// The record's `patient_fp` for patient id `id`: the first 16 hex digits
/// of HMAC-SHA256 keyed (through a derived key) by the audit key, so that
/// whoever holds the key can find a patient's records and nobody else can
/// tell whose they are — patient ids are few and guessable, and a plain
/// hash of one is the id in clear.
pub fn patient_fingerprint(audit_key: &[u8], id: &str) -> String {
    hex(hmac_sha256(&patient_key(audit_key), &[id.as_bytes()])
        .get(..8)
        .unwrap_or_default())
}

fn canonical(record: &AuditRecord) -> Vec<u8> {
    let mut r = record.clone();
    r.chain = String::new();
    serde_json::to_vec(&r).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The record's bytes, written by hand
//
// The sealer writes each record with `write_json`, not serde: it is the one
// fixed-shape document on the request path, and writing it directly into
// one buffer sized for the line takes 1,900 fewer instructions per record
// than serde_json plus the splice (examples/hotpath `seal`, callgrind:
// 42,048 -> 40,144; the rest of the seal is SHA-256). Its bytes are what
// the chain covers, so they must be exactly serde_json's compact form of
// `AuditRecord`, which the verifier (`canonical`) recomputes; the tests
// hold the two equal on arbitrary records.

/// Appends `s` as a JSON string the way serde_json writes it: `"` and `\`
/// escaped, the short escapes for \b \t \n \f \r, `\u00xx` (lower-case
/// hex) for the other control characters, everything else as it is.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut from = 0;
    for (at, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        // `at` is an ASCII byte, so both slices end on char boundaries.
        out.push_str(s.get(from..at).unwrap_or_default());
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.extend(
                [b >> 4, b & 0xf]
                    .iter()
                    .filter_map(|&d| HEX.get(usize::from(d)).map(|&c| char::from(c))),
            );
        } else {
            out.push_str(escape);
        }
        from = at + 1;
    }
    out.push_str(s.get(from..).unwrap_or_default());
    out.push('"');
}

fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            // n % 10 < 10: the cast cannot truncate.
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    out.extend(digits.iter().skip(at).map(|&d| char::from(d)));
}

/// Writes `,"name":` (every field but the first, `ts`).
fn push_key(out: &mut String, name: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
}

fn push_field(out: &mut String, name: &str, value: &str) {
    push_key(out, name);
    push_json_str(out, value);
}

fn push_opt(out: &mut String, name: &str, value: Option<&String>) {
    if let Some(v) = value {
        push_field(out, name, v);
    }
}

fn push_list(out: &mut String, name: &str, items: &[String]) {
    push_key(out, name);
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, item);
    }
    out.push(']');
}

impl AuditRecord {
    /// Appends the record as serde_json writes it (compact, field order and
    /// skipped fields as the derive says): the bytes the chain covers.
    pub fn write_json(&self, out: &mut String) {
        out.push_str("{\"ts\":");
        push_json_str(out, &self.ts);
        push_opt(out, "request_id", self.request_id.as_ref());
        push_field(out, "decision", &self.decision);
        push_field(out, "reason", &self.reason);
        push_opt(out, "step_up", self.step_up.as_ref());
        push_opt(out, "rule", self.rule.as_ref());
        push_field(out, "method", &self.method);
        push_field(out, "path", &self.path);
        push_key(out, "status");
        push_u64(out, u64::from(self.status));
        push_opt(out, "iss", self.iss.as_ref());
        push_opt(out, "sub", self.sub.as_ref());
        push_opt(out, "client_id", self.client_id.as_ref());
        push_opt(out, "jti", self.jti.as_ref());
        push_opt(out, "token_fp", self.token_fp.as_ref());
        push_list(out, "scopes_granted", &self.scopes_granted);
        push_list(out, "scopes_required", &self.scopes_required);
        push_opt(out, "acr", self.acr.as_ref());
        push_list(out, "amr", &self.amr);
        push_opt(out, "source", self.source.as_ref());
        push_opt(out, "tls", self.tls.as_ref());
        push_opt(out, "binding", self.binding.as_ref());
        if !self.phi_claims.is_empty() {
            push_list(out, "phi_claims", &self.phi_claims);
        }
        push_opt(out, "fhir_interaction", self.fhir_interaction.as_ref());
        push_opt(out, "fhir_type", self.fhir_type.as_ref());
        push_opt(out, "patient_fp", self.patient_fp.as_ref());
        push_field(out, "vm", &self.vm);
        push_key(out, "seq");
        push_u64(out, self.seq);
        push_field(out, "chain", &self.chain);
        out.push('}');
    }
}

/// One VM's chain of records.
#[derive(Debug)]
pub struct AuditChain {
    vm: String,
    seq: u64,
    prev: [u8; 32],
    key: Option<Vec<u8>>,
    /// Derived from `key` once: what keys `patient_fp`.
    patient_key: Option<[u8; 32]>,
}

impl AuditChain {
    /// A new chain for VM `vm`, keyed when `key` is given.
    pub fn new(vm: String, key: Option<Vec<u8>>) -> AuditChain {
        AuditChain {
            vm,
            seq: 0,
            prev: [0; 32],
            patient_key: key.as_deref().map(patient_key),
            key,
        }
    }

    /// [`patient_fingerprint`] under this chain's key; none for an unkeyed
    /// chain (no `audit.hmac_key_env`), which can key nothing.
    pub fn patient_fp(&self, id: &str) -> Option<String> {
        let key = self.patient_key.as_ref()?;
        Some(hex(hmac_sha256(key, &[id.as_bytes()])
            .get(..8)
            .unwrap_or_default()))
    }

    /// The VM this chain belongs to.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// The last record's `seq` (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The last record's `chain` value (all zeros before the first).
    pub fn head(&self) -> String {
        hex(&self.prev)
    }

    /// The chain's head as a checkpoint taken at `unix_ms`; none before the first record.
    pub fn checkpoint(&self, unix_ms: u64) -> Option<Checkpoint> {
        (self.seq > 0).then(|| Checkpoint {
            vm: self.vm.clone(),
            seq: self.seq,
            chain: self.head(),
            ts: rfc3339_millis(unix_ms.saturating_mul(1_000_000)),
        })
    }

    /// Numbers and links `record`, and returns its JSON line.
    pub fn seal(&mut self, record: &mut AuditRecord) -> String {
        record.bound();
        self.seq += 1;
        record.vm.clone_from(&self.vm);
        record.seq = self.seq;
        record.chain = String::new();
        // Room for the chain value spliced in below, so the line is written once.
        let mut line = String::with_capacity(1024);
        record.write_json(&mut line);
        let next = link(self.key.as_deref(), &self.prev, line.as_bytes());
        self.prev = next;
        record.chain = hex(&next);
        // `chain` is the last field and written empty (`"chain":""}`): put
        // its value between the quotes.
        line.truncate(line.len().saturating_sub(2));
        line.push_str(&record.chain);
        line.push_str("\"}");
        line
    }
}

// ---------------------------------------------------------------------------
// Checkpoints

/// What a checkpoint line in Envoy's log starts with, after Envoy's own prefix.
pub const CHECKPOINT_MARKER: &str = "phi-guard audit checkpoint ";

/// A VM's chain head at a moment, written to Envoy's log (kept apart from the
/// access log): the VM's records reach at least `seq`, and the record at
/// `seq` carries `chain`. Nothing else: no token, claim or request detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub vm: String,
    pub seq: u64,
    pub chain: String,
    /// When it was taken, RFC 3339 UTC with milliseconds.
    pub ts: String,
}

impl Checkpoint {
    /// The log line: the marker, then the checkpoint as one JSON object.
    pub fn line(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{CHECKPOINT_MARKER}{json}")
    }

    /// The checkpoint on one line of Envoy's log, whatever Envoy put before it
    /// (`[time][thread][info][wasm] [file:line] wasm log phi_guard phi_guard: `):
    /// `None` when the line names no checkpoint, `Err` when it names one that
    /// cannot be read. The JSON must run to the end of the line, so text that
    /// merely contains the marker (a request header in an access-log line,
    /// where quotes come escaped) is not taken for a checkpoint.
    pub fn find(line: &str) -> Option<Result<Checkpoint, String>> {
        let at = line.find(CHECKPOINT_MARKER)?;
        let json = line.get(at + CHECKPOINT_MARKER.len()..)?.trim_end();
        Some(
            serde_json::from_str::<Checkpoint>(json)
                .map_err(|e| e.to_string())
                .and_then(|c| c.checked().map(|()| c)),
        )
    }

    fn checked(&self) -> Result<(), String> {
        if self.vm.is_empty() || self.vm.len() > MAX_FIELD {
            return Err("vm is empty or too long".into());
        }
        if self.seq == 0 {
            return Err("seq 0 (a chain with no records has no checkpoint)".into());
        }
        if decode_hex(&self.chain).is_none() {
            return Err("chain is not 64 hex digits".into());
        }
        if parse_rfc3339_millis(&self.ts).is_none() {
            return Err("ts is not an RFC 3339 UTC time".into());
        }
        Ok(())
    }
}

/// When a VM writes its next checkpoint: once its chain has moved on since the
/// last one, at most once per period. The first record is checkpointed on the
/// first call after it, so a VM's records are vouched for within a period.
#[derive(Debug)]
pub struct CheckpointSchedule {
    every_ms: u64,
    last_ms: Option<u64>,
    last_seq: u64,
}

impl CheckpointSchedule {
    /// A checkpoint every `every_seconds` while the chain moves.
    pub fn new(every_seconds: u64) -> CheckpointSchedule {
        CheckpointSchedule {
            every_ms: every_seconds.saturating_mul(1000),
            last_ms: None,
            last_seq: 0,
        }
    }

    /// The checkpoint to write at `now_ms`, if one is due.
    pub fn due(&mut self, chain: &AuditChain, now_ms: u64) -> Option<Checkpoint> {
        let period_over = self
            .last_ms
            .is_none_or(|last| now_ms.saturating_sub(last) >= self.every_ms);
        if period_over {
            self.take(chain, now_ms)
        } else {
            None
        }
    }

    /// The checkpoint to write as the VM stops, if the chain moved since the last.
    pub fn last(&mut self, chain: &AuditChain, now_ms: u64) -> Option<Checkpoint> {
        self.take(chain, now_ms)
    }

    fn take(&mut self, chain: &AuditChain, now_ms: u64) -> Option<Checkpoint> {
        if chain.seq() <= self.last_seq {
            return None;
        }
        self.last_ms = Some(now_ms);
        self.last_seq = chain.seq();
        chain.checkpoint(now_ms)
    }
}

/// One checkpoint found in Envoy's log.
#[derive(Debug, Clone)]
struct Found {
    /// 1-based line in the checkpoint log.
    line: usize,
    checkpoint: Checkpoint,
    ts_ms: u64,
}

/// The checkpoints of an Envoy log, and the lines that named one unreadably.
#[derive(Debug, Clone, Default)]
pub struct Checkpoints {
    found: Vec<Found>,
    /// Lines (1-based) holding the marker but no readable checkpoint: ignored,
    /// since anything that puts the marker into Envoy's log could make them.
    pub unreadable: Vec<usize>,
}

impl Checkpoints {
    /// Reads every checkpoint in an Envoy log; other lines are skipped, and
    /// bytes that are not UTF-8 are no reason to stop.
    pub fn read(mut reader: impl BufRead) -> Result<Checkpoints, VerifyError> {
        let mut out = Checkpoints::default();
        let mut buf = Vec::new();
        for n in 1.. {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(VerifyError {
                        line: n,
                        kind: Problem::Io,
                        detail: e.to_string(),
                    })
                }
            }
            match Checkpoint::find(&String::from_utf8_lossy(&buf)) {
                None => {}
                Some(Ok(checkpoint)) => {
                    let ts_ms = parse_rfc3339_millis(&checkpoint.ts).unwrap_or(0);
                    out.found.push(Found {
                        line: n,
                        checkpoint,
                        ts_ms,
                    });
                }
                Some(Err(_)) => out.unreadable.push(n),
            }
        }
        Ok(out)
    }

    /// How many checkpoints were read.
    pub fn len(&self) -> usize {
        self.found.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// The `seq`s whose chain values the verifier must keep, per VM.
    fn wanted(&self) -> HashMap<String, HashSet<u64>> {
        let mut wanted: HashMap<String, HashSet<u64>> = HashMap::new();
        for f in &self.found {
            wanted
                .entry(f.checkpoint.vm.clone())
                .or_default()
                .insert(f.checkpoint.seq);
        }
        wanted
    }
}

/// How a log falls short of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// The chain's records end before its last checkpoint.
    TailCut,
    /// A checkpointed chain has no records at all.
    ChainMissing,
    /// The record at a checkpoint's `seq` carries another chain value.
    ChainDiffers,
}

/// A checkpoint the access log does not live up to; `line` is the
/// checkpoint's (1-based) in the checkpoint log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub line: usize,
    pub kind: Shortfall,
    pub vm: String,
    pub detail: String,
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Shortfall::TailCut => "tail cut",
            Shortfall::ChainMissing => "chain missing",
            Shortfall::ChainDiffers => "chain differs",
        };
        write!(
            f,
            "line {}: {kind}: vm {}: {}",
            self.line, self.vm, self.detail
        )
    }
}

/// What the checkpoints say of a log whose chains are intact.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completeness {
    /// Checkpoints whose record is in the log with the same chain value.
    pub matched: usize,
    /// Checkpoints from before the log began (a rotated log, `start_anywhere`).
    pub before_log: usize,
    /// Chains with records that no checkpoint vouches for yet (written within
    /// the last period, or Envoy's `wasm` log is not at info).
    pub unvouched: Vec<String>,
    /// Everything the log falls short of, in checkpoint-log order.
    pub gaps: Vec<Gap>,
}

/// In a rotated log, how long after the log's first record a checkpoint must
/// be for a chain absent from the log to be held to it: a request in flight
/// across the rotation (decided before it, logged after) makes the first
/// record older than the rotation by up to its duration.
pub const ROTATION_SLACK_MS: u64 = 60_000;

/// Holds what `verify_log` saw of each chain against the checkpoints.
///
/// A chain with records: every checkpoint at or above its first record's
/// `seq` must match the record at that `seq` (`ChainDiffers` otherwise), and
/// its highest checkpoint must not lie beyond its last record (`TailCut`).
/// Checkpoints below its first record are `before_log` (only a rotated log,
/// read with `start_anywhere`, starts above seq 1).
///
/// A checkpointed chain without records is `ChainMissing`, except in a rotated
/// log: there it may wholly lie in an earlier file, so it is missing only if
/// the checkpoints prove it had records sealed after this log began — a
/// checkpoint written at least [`ROTATION_SLACK_MS`] after the log's earliest
/// record, followed by one with a higher `seq`. Otherwise its checkpoints are
/// `before_log`.
fn check_checkpoints(
    seen: &HashMap<String, ChainSeen>,
    log_start_ms: Option<u64>,
    checkpoints: &Checkpoints,
    start_anywhere: bool,
) -> Completeness {
    let mut out = Completeness::default();
    let mut by_vm: BTreeMap<&str, Vec<&Found>> = BTreeMap::new();
    for f in &checkpoints.found {
        by_vm.entry(f.checkpoint.vm.as_str()).or_default().push(f);
    }
    let mut vouched: HashSet<&str> = HashSet::new();
    for (vm, mut cps) in by_vm {
        cps.sort_by_key(|f| (f.checkpoint.seq, f.line));
        let Some(highest) = cps.last() else {
            continue;
        };
        let gap = |f: &Found, kind, detail| Gap {
            line: f.line,
            kind,
            vm: vm.to_string(),
            detail,
        };
        let Some(chain) = seen.get(vm) else {
            let after_start = |f: &Found| {
                log_start_ms.is_some_and(|t0| f.ts_ms >= t0.saturating_add(ROTATION_SLACK_MS))
            };
            let proven = cps.iter().any(|early| {
                after_start(early)
                    && cps
                        .iter()
                        .any(|later| later.checkpoint.seq > early.checkpoint.seq)
            });
            if !start_anywhere || proven {
                out.gaps.push(gap(
                    highest,
                    Shortfall::ChainMissing,
                    format!(
                        "no records, but the checkpoint at {} says the chain reached seq {}",
                        highest.checkpoint.ts, highest.checkpoint.seq
                    ),
                ));
            } else {
                out.before_log += cps.len();
            }
            continue;
        };
        for f in &cps {
            let cp = &f.checkpoint;
            if cp.seq < chain.first {
                out.before_log += 1;
                continue;
            }
            if cp.seq > chain.last {
                continue;
            }
            match chain.at.get(&cp.seq).map(|c| hex(c)) {
                Some(c) if c == cp.chain => {
                    out.matched += 1;
                    vouched.insert(vm);
                }
                found => out.gaps.push(gap(
                    f,
                    Shortfall::ChainDiffers,
                    format!(
                        "the record at seq {} has chain {}, the checkpoint at {} says {}",
                        cp.seq,
                        found.as_deref().map_or("(none)", short),
                        cp.ts,
                        short(&cp.chain)
                    ),
                )),
            }
        }
        if highest.checkpoint.seq > chain.last {
            out.gaps.push(gap(
                highest,
                Shortfall::TailCut,
                format!(
                    "records end at seq {}, but the checkpoint at {} says the chain reached seq {}",
                    chain.last, highest.checkpoint.ts, highest.checkpoint.seq
                ),
            ));
        }
    }
    let mut unvouched: Vec<String> = seen
        .keys()
        .filter(|vm| !vouched.contains(vm.as_str()))
        .cloned()
        .collect();
    unvouched.sort();
    out.unvouched = unvouched;
    out.gaps.sort_by_key(|g| g.line);
    out
}

/// The first 16 hex digits of a chain value, for messages.
fn short(chain: &str) -> &str {
    chain.get(..16).unwrap_or(chain)
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

/// The access-log field the record is read from (see `envoy/envoy.yaml`).
pub const RECORD_FIELD: &str = "audit";

/// Finds the record on a line: the line itself, or its [`RECORD_FIELD`]
/// holding it as an object or as a JSON string (Envoy's
/// `%FILTER_STATE(...:PLAIN)%`). Only that field: where Envoy answered a
/// request itself the field is `-`, and a client-controlled one
/// (`x-request-id`, say) must not be able to supply a record instead.
pub fn find_record(line: &str) -> Option<Result<AuditRecord, String>> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let obj = value.as_object()?;
    let is_record = |o: &serde_json::Map<String, serde_json::Value>| {
        o.contains_key("seq") && o.contains_key("chain")
    };
    if is_record(obj) {
        return Some(serde_json::from_value(value.clone()).map_err(|e| e.to_string()));
    }
    let inner = match obj.get(RECORD_FIELD)? {
        field @ serde_json::Value::Object(_) => field.clone(),
        serde_json::Value::String(s) if s.starts_with('{') => serde_json::from_str(s).ok()?,
        _ => return None,
    };
    if inner.as_object().is_some_and(is_record) {
        return Some(serde_json::from_value(inner).map_err(|e| e.to_string()));
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
    verify_chains(reader, key, start_anywhere, &HashMap::new()).map(|seen| seen.summary)
}

/// [`verify_log`], then the intact log held against the checkpoints of
/// Envoy's log (see [`Completeness`]): a damaged chain is the error, as there;
/// a log that falls short of its checkpoints has `gaps`.
pub fn verify_log_with_checkpoints(
    reader: impl BufRead,
    key: Option<&[u8]>,
    start_anywhere: bool,
    checkpoints: &Checkpoints,
) -> Result<(VerifySummary, Completeness), VerifyError> {
    let seen = verify_chains(reader, key, start_anywhere, &checkpoints.wanted())?;
    let completeness =
        check_checkpoints(&seen.chains, seen.earliest_ms, checkpoints, start_anywhere);
    Ok((seen.summary, completeness))
}

/// What the log showed of one chain.
#[derive(Debug, Default)]
struct ChainSeen {
    first: u64,
    last: u64,
    prev: [u8; 32],
    /// Chain values at the `seq`s a checkpoint names.
    at: HashMap<u64, [u8; 32]>,
}

/// What the log showed: totals, each chain, and its earliest record's time.
struct Seen {
    summary: VerifySummary,
    chains: HashMap<String, ChainSeen>,
    earliest_ms: Option<u64>,
}

/// Checks chains one record at a time, in log order: what [`verify_log`]
/// runs, and what a reader that takes a log in once (`audit report`) uses.
/// After a problem it takes up the chain from the record it was found at
/// (that record's `seq` and `chain`), so it can go on checking what follows.
#[derive(Debug)]
pub struct ChainVerifier {
    key: Option<Vec<u8>>,
    start_anywhere: bool,
    wanted: HashMap<String, HashSet<u64>>,
    chains: HashMap<String, ChainSeen>,
    earliest_ms: Option<u64>,
    records: usize,
}

impl ChainVerifier {
    /// A verifier for chains keyed with `key` (HMAC) or not; with
    /// `start_anywhere`, a chain may begin at any `seq` (a rotated log).
    pub fn new(key: Option<&[u8]>, start_anywhere: bool) -> ChainVerifier {
        ChainVerifier {
            key: key.map(<[u8]>::to_vec),
            start_anywhere,
            wanted: HashMap::new(),
            chains: HashMap::new(),
            earliest_ms: None,
            records: 0,
        }
    }

    /// Records checked so far, damaged ones included.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Chains (VMs) seen so far.
    pub fn vms(&self) -> usize {
        self.chains.len()
    }

    /// Checks `record`, found on (1-based) line `line`, against what came
    /// before it in its VM's chain.
    pub fn check(&mut self, line: usize, record: &AuditRecord) -> Result<(), VerifyError> {
        let err = |kind, detail: String| VerifyError { line, kind, detail };
        let claimed = decode_hex(&record.chain)
            .ok_or_else(|| err(Problem::Malformed, "chain is not 64 hex digits".into()))?;
        let key = self.key.as_deref();
        let bytes = canonical(record);
        let (vm, seq) = (&record.vm, record.seq);
        let problem = match self.chains.get(vm) {
            None if seq == 1 || self.start_anywhere => {
                (seq == 1 && link(key, &[0; 32], &bytes) != claimed).then(|| {
                    err(
                        Problem::Edited,
                        format!("vm {vm} seq 1 does not match its chain"),
                    )
                })
            }
            None => Some(err(
                Problem::Missing,
                format!("vm {vm} starts at seq {seq}, not 1"),
            )),
            Some(seen) if seq <= seen.last => Some(err(
                Problem::Reordered,
                format!("vm {vm} seq {seq} after {}", seen.last),
            )),
            Some(seen) if seq > seen.last + 1 => Some(err(
                Problem::Missing,
                format!("vm {vm} seq {seq} after {}", seen.last),
            )),
            Some(seen) => (link(key, &seen.prev, &bytes) != claimed).then(|| {
                err(
                    Problem::Edited,
                    format!("vm {vm} seq {seq} does not match its chain"),
                )
            }),
        };
        if let Some(ms) = parse_rfc3339_millis(&record.ts) {
            self.earliest_ms = Some(self.earliest_ms.map_or(ms, |e| e.min(ms)));
        }
        let keep = self.wanted.get(vm).is_some_and(|seqs| seqs.contains(&seq));
        let seen = self.chains.entry(vm.clone()).or_insert_with(|| ChainSeen {
            first: seq,
            ..ChainSeen::default()
        });
        seen.last = seq;
        seen.prev = claimed;
        if keep {
            seen.at.insert(seq, claimed);
        }
        self.records += 1;
        problem.map_or(Ok(()), Err)
    }
}

fn verify_chains(
    reader: impl BufRead,
    key: Option<&[u8]>,
    start_anywhere: bool,
    wanted: &HashMap<String, HashSet<u64>>,
) -> Result<Seen, VerifyError> {
    let mut verifier = ChainVerifier::new(key, start_anywhere);
    verifier.wanted.clone_from(wanted);
    let mut skipped = 0;
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| VerifyError {
            line: n,
            kind: Problem::Io,
            detail: e.to_string(),
        })?;
        match find_record(&line) {
            None => skipped += 1,
            Some(Err(e)) => {
                return Err(VerifyError {
                    line: n,
                    kind: Problem::Malformed,
                    detail: e,
                })
            }
            Some(Ok(record)) => verifier.check(n, &record)?,
        }
    }
    Ok(Seen {
        summary: VerifySummary {
            records: verifier.records,
            vms: verifier.chains.len(),
            skipped_lines: skipped,
        },
        chains: verifier.chains,
        earliest_ms: verifier.earliest_ms,
    })
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    // Digit by digit: `u8::from_str_radix` also takes a sign ("+f" for "0f").
    let digit = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        let [hi, lo] = pair else {
            return None;
        };
        *o = digit(*hi)? << 4 | digit(*lo)?;
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

    /// The record-by-record verifier names each damaged record once and
    /// takes the chain up again from it, so what follows checks clean.
    #[test]
    fn verifier_goes_on_after_a_problem() {
        let records: Vec<AuditRecord> = log(None)
            .iter()
            .map(|l| find_record(l).unwrap().unwrap())
            .collect();
        let problems = |records: &[AuditRecord]| {
            let mut v = ChainVerifier::new(None, false);
            let found: Vec<(usize, Problem)> = records
                .iter()
                .enumerate()
                .filter_map(|(i, r)| v.check(i + 1, r).err().map(|e| (e.line, e.kind)))
                .collect();
            (found, v.records(), v.vms())
        };
        assert_eq!(problems(&records), (vec![], 6, 2));
        // Edited: vm a's second record (line 3).
        let mut edited = records.clone();
        edited[2].path = "/elsewhere".into();
        assert_eq!(problems(&edited), (vec![(3, Problem::Edited)], 6, 2));
        // Missing: vm b's second record gone; its third follows a gap.
        let mut cut = records.clone();
        cut.remove(3);
        assert_eq!(problems(&cut), (vec![(5, Problem::Missing)], 5, 2));
        // Replayed: vm a's first record again at the end.
        let mut replayed = records.clone();
        replayed.push(records[0].clone());
        assert_eq!(problems(&replayed), (vec![(7, Problem::Reordered)], 7, 2));
        // A chain value that is not hex is malformed, and not taken up.
        let mut garbled = records;
        garbled[1].chain = "zz".into();
        assert_eq!(
            problems(&garbled),
            (vec![(2, Problem::Malformed), (4, Problem::Missing)], 5, 2)
        );
    }

    /// Envoy answered a request itself (`audit` is `-`): a record a client
    /// put in another field (its `x-request-id`) is not read, so it can
    /// neither pass for a chain nor break an intact one.
    #[test]
    fn records_come_only_from_the_audit_field() {
        let lines = log(None);
        let mut forger = AuditChain::new("forged".into(), None);
        let fake = forger.seal(&mut rec("/p/x"));
        let injected =
            serde_json::json!({"time": "x", "request_id": fake, "audit": "-"}).to_string();
        let mut with = lines.clone();
        with.insert(2, injected.clone());
        let s = check(&with, None).unwrap();
        assert_eq!((s.records, s.vms, s.skipped_lines), (6, 2, 1));
        // Named after a real chain, it would have broken it.
        let mut a = AuditChain::new("a".into(), None);
        let fake_a = a.seal(&mut rec("/evil"));
        let injected =
            serde_json::json!({"time": "x", "request_id": fake_a, "audit": "-"}).to_string();
        let mut with = lines;
        with.push(injected);
        assert!(check(&with, None).is_ok());
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
    fn chain_is_64_hex_digits_and_nothing_else() {
        // Each pair was read as a number, sign allowed, so "+d" passed for
        // "0d" and a chain text the sealer never wrote verified (the
        // audit_verify fuzz target's re-sealing oracle fails on such a log).
        let zeros = "0".repeat(62);
        let mut first_0d = [0; 32];
        first_0d[0] = 0x0d;
        assert_eq!(decode_hex(&format!("0d{zeros}")), Some(first_0d));
        assert_eq!(decode_hex(&format!("0D{zeros}")), Some(first_0d));
        for bad in ["+d", "-0", " d", "0x", "g0", "é"] {
            assert_eq!(decode_hex(&format!("{bad}{zeros}")), None, "{bad}");
        }
        // The same in a keyed log: the first pair starting with 0 gets a sign.
        let lines = log(Some(b"secret"));
        let (n, chain, at) = lines
            .iter()
            .enumerate()
            .find_map(|(n, l)| {
                let chain = find_record(l)?.ok()?.chain;
                let at = (0..64).step_by(2).find(|&i| chain.as_bytes()[i] == b'0')?;
                Some((n, chain, at))
            })
            .expect("some pair starts with 0");
        let mut signed = lines.clone();
        let forged = format!("{}+{}", &chain[..at], &chain[at + 1..]);
        signed[n] = lines[n].replace(&chain, &forged);
        let e = check(&signed, Some(b"secret")).unwrap_err();
        assert_eq!((e.line, e.kind), (n + 1, Problem::Malformed));
    }

    #[test]
    fn fhir_fields_are_optional_chained_and_keyed() {
        // Without them a record's bytes are what they were before them.
        let line = AuditChain::new("v".into(), None).seal(&mut rec("/p"));
        assert!(
            !line.contains("fhir") && !line.contains("patient"),
            "{line}"
        );
        // Field by field, in order: the keys of the top-level object.
        let fields = |l: &str| -> Vec<String> {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            keys.sort_by_key(|k| l.find(&format!("\"{k}\":")).unwrap());
            keys
        };
        assert_eq!(
            fields(&line),
            [
                "ts",
                "decision",
                "reason",
                "method",
                "path",
                "status",
                "scopes_granted",
                "scopes_required",
                "amr",
                "vm",
                "seq",
                "chain"
            ]
        );
        // With them: after `tls`, before `vm`, and part of the chain.
        let chain = AuditChain::new("v".into(), Some(b"k".to_vec()));
        let fp = chain.patient_fp("123").unwrap();
        let mut r = rec("/fhir/Observation");
        r.tls = Some("TLSv1.3".into());
        r.fhir_interaction = Some("search-type".into());
        r.fhir_type = Some("Observation".into());
        r.patient_fp = Some(fp.clone());
        let mut chain = chain;
        let sealed = chain.seal(&mut r);
        let f = fields(&sealed);
        let at = |k: &str| f.iter().position(|x| x == k).unwrap();
        assert!(at("tls") < at("fhir_interaction"));
        assert!(at("fhir_interaction") < at("fhir_type") && at("fhir_type") < at("patient_fp"));
        assert!(at("patient_fp") < at("vm"));
        assert!(
            !sealed.contains("\"123\""),
            "the patient id itself: {sealed}"
        );
        let lines = [serde_json::json!({"audit": sealed}).to_string()];
        assert!(check(&lines, Some(b"k")).is_ok());
        let edited = [lines[0].replace(&fp, "0000000000000000")];
        assert_eq!(
            check(&edited, Some(b"k")).unwrap_err().kind,
            Problem::Edited
        );
    }

    #[test]
    fn patient_fingerprints_are_keyed() {
        let fp = patient_fingerprint(b"k", "123");
        assert_eq!(fp.len(), 16);
        assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
        // Stable for a key (every VM, every restart) ...
        assert_eq!(patient_fingerprint(b"k", "123"), fp);
        assert_eq!(
            AuditChain::new("a".into(), Some(b"k".to_vec())).patient_fp("123"),
            Some(fp.clone())
        );
        assert_eq!(
            AuditChain::new("b".into(), Some(b"k".to_vec())).patient_fp("123"),
            Some(fp.clone())
        );
        // ... but another key, another patient or a plain hash differ.
        assert_ne!(patient_fingerprint(b"k2", "123"), fp);
        assert_ne!(patient_fingerprint(b"k", "124"), fp);
        let plain = hex(&Sha256::digest(b"123")[..8]);
        assert_ne!(plain, fp);
        // Not the chain's own HMAC of the id under the same key.
        assert_ne!(hex(&hmac_sha256(b"k", &[b"123"])[..8]), fp);
        // The derivation, spelled out (the e2e tests recompute it in Python).
        let derived = hmac_sha256(b"k", &[b"phi-guard patient_fp v1"]);
        assert_eq!(hex(&hmac_sha256(&derived, &[b"123"])[..8]), fp);
        // An unkeyed chain writes none.
        assert_eq!(AuditChain::new("c".into(), None).patient_fp("123"), None);
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

/// Checkpoints: the line Envoy's log carries, the schedule, and the log held
/// against them (tail cut, chain removed, rotated, chain rewritten).
#[cfg(test)]
mod checkpoint_tests {
    use super::*;

    /// 2026-01-01T00:00:00Z.
    const T: u64 = 1_767_225_600_000;

    fn envoy_line(text: &str) -> String {
        format!("[2026-01-01 00:00:00.000][17][info][wasm] [source/extensions/common/wasm/context.cc:1192] wasm log phi_guard phi_guard: {text}")
    }

    /// Two VMs, `a` serving `pairs` requests and `b` the first `b_pairs` of
    /// them, interleaved, 10 s apart; after each pair both VMs are asked for a
    /// checkpoint (40 s period), so they are taken at seq 1, 3, 5, ...
    /// at T+20 s, T+60 s, T+100 s, ... Envoy's log holds them amid noise.
    struct Run {
        access: Vec<String>,
        envoy: Vec<String>,
    }

    fn run(pairs: u64, b_pairs: u64) -> Run {
        run_with(pairs, b_pairs, None)
    }

    /// [`run`], with `a`'s request of pair `in_flight` decided at T (so
    /// long-running that it is logged among the requests of its pair).
    fn run_with(pairs: u64, b_pairs: u64, in_flight: Option<u64>) -> Run {
        let mut chains = [
            AuditChain::new("a".into(), None),
            AuditChain::new("b".into(), None),
        ];
        let mut schedules = [CheckpointSchedule::new(40), CheckpointSchedule::new(40)];
        let mut access = Vec::new();
        let mut envoy = vec![
            "[2026-01-01 00:00:00.000][1][info][main] [source/server/server.cc:1000] starting main dispatch loop".to_string(),
        ];
        for i in 0..pairs {
            for (j, chain) in chains.iter_mut().enumerate() {
                if j == 1 && i >= b_pairs {
                    continue;
                }
                let decided = if j == 0 && in_flight == Some(i) {
                    T
                } else {
                    T + (20 * i + 10 * j as u64) * 1000
                };
                let mut r = AuditRecord {
                    ts: rfc3339_millis(decided * 1_000_000),
                    decision: "allow".into(),
                    reason: "ok".into(),
                    method: "GET".into(),
                    path: format!("/p/{i}"),
                    ..AuditRecord::default()
                };
                let line = chain.seal(&mut r);
                access.push(serde_json::json!({"time": "x", "audit": line}).to_string());
                // Envoy's log also gets the stdout access log in some setups.
                envoy.push(serde_json::json!({"time": "x", "audit": line}).to_string());
            }
            let now = T + 20 * (i + 1) * 1000;
            for (chain, schedule) in chains.iter().zip(schedules.iter_mut()) {
                if let Some(cp) = schedule.due(chain, now) {
                    envoy.push(envoy_line(&cp.line()));
                }
            }
            envoy.push(format!("[2026-01-01 00:00:00.000][17][info][wasm] [source/extensions/common/wasm/context.cc:1192] wasm log phi_guard phi_guard: provider idp: 2 keys loaded ({i})"));
        }
        Run { access, envoy }
    }

    fn standard() -> Run {
        run(8, 8)
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        Damaged(Problem),
        Checked {
            matched: usize,
            before_log: usize,
            gaps: Vec<(Shortfall, &'static str)>,
        },
    }

    fn ok(matched: usize, before_log: usize, gaps: &[(Shortfall, &'static str)]) -> Want {
        Want::Checked {
            matched,
            before_log,
            gaps: gaps.to_vec(),
        }
    }

    fn outcome(run: &Run, start_anywhere: bool) -> (Want, Option<Completeness>) {
        let checkpoints = Checkpoints::read(run.envoy.join("\n").as_bytes()).unwrap();
        let access = run.access.join("\n");
        match verify_log_with_checkpoints(access.as_bytes(), None, start_anywhere, &checkpoints) {
            Err(e) => (Want::Damaged(e.kind), None),
            Ok((_, c)) => (
                Want::Checked {
                    matched: c.matched,
                    before_log: c.before_log,
                    gaps: c
                        .gaps
                        .iter()
                        .map(|g| (g.kind, if g.vm == "a" { "a" } else { "b" }))
                        .collect(),
                },
                Some(c),
            ),
        }
    }

    fn drop_vm(lines: &mut Vec<String>, vm: &str, from_seq: u64) {
        lines.retain(|l| {
            let r = find_record(l).unwrap().unwrap();
            r.vm != vm || r.seq < from_seq
        });
    }

    fn edit_checkpoint(run: &mut Run, vm: &str, seq: u64, edit: &dyn Fn(&mut Checkpoint)) {
        let line = run
            .envoy
            .iter_mut()
            .find(|l| l.contains(&format!(r#"{{"vm":"{vm}","seq":{seq},"#)))
            .unwrap();
        let mut cp = Checkpoint::find(line).unwrap().unwrap();
        edit(&mut cp);
        *line = envoy_line(&cp.line());
    }

    use Shortfall::{ChainDiffers, ChainMissing, TailCut};

    #[test]
    fn logs_held_against_their_checkpoints() {
        type Edit = &'static dyn Fn(&mut Run);
        /// Name, the run, what is done to its logs, `start_anywhere`, the verdict.
        type Case = (&'static str, fn() -> Run, Edit, bool, Want);
        let cases: Vec<Case> = vec![
            ("intact", standard, &|_| {}, false, ok(8, 0, &[])),
            (
                "intact, start anywhere",
                standard,
                &|_| {},
                true,
                ok(8, 0, &[]),
            ),
            // The limit: records after the last checkpoint are vouched for by none.
            (
                "cut after the last checkpoint",
                standard,
                &|r| drop_vm(&mut r.access, "a", 8),
                false,
                ok(8, 0, &[]),
            ),
            (
                "tail cut",
                standard,
                &|r| drop_vm(&mut r.access, "a", 6),
                false,
                ok(7, 0, &[(TailCut, "a")]),
            ),
            (
                "tail cut, start anywhere",
                standard,
                &|r| drop_vm(&mut r.access, "a", 2),
                true,
                ok(5, 0, &[(TailCut, "a")]),
            ),
            (
                "whole chain removed",
                standard,
                &|r| drop_vm(&mut r.access, "b", 1),
                false,
                ok(4, 0, &[(ChainMissing, "b")]),
            ),
            (
                "everything removed",
                standard,
                &|r| r.access.clear(),
                false,
                ok(0, 0, &[(ChainMissing, "a"), (ChainMissing, "b")]),
            ),
            // A rotated log: the head is in an earlier file.
            (
                "rotated",
                standard,
                &|r| drop(r.access.drain(..6)),
                false,
                Want::Damaged(Problem::Missing),
            ),
            (
                "rotated, start anywhere",
                standard,
                &|r| drop(r.access.drain(..6)),
                true,
                ok(4, 4, &[]),
            ),
            (
                "rotated and tail cut, start anywhere",
                standard,
                &|r| {
                    r.access.drain(..6);
                    drop_vm(&mut r.access, "a", 7);
                },
                true,
                ok(3, 4, &[(TailCut, "a")]),
            ),
            // b served only before the rotation: its chain is wholly in the earlier file.
            (
                "chain wholly before the rotation",
                || run(8, 2),
                &|r| drop(r.access.drain(..6)),
                true,
                ok(2, 4, &[]),
            ),
            // The same, but the new file's first record was decided 80 s before
            // it was logged (in flight across the rotation): the log seems to
            // begin at T, before b's checkpoints at T+20 s (seq 1) and T+60 s
            // (seq 3), which must not be taken to prove b's records are gone.
            (
                "chain wholly before the rotation, request in flight across it",
                || run_with(8, 3, Some(4)),
                &|r| drop(r.access.drain(..7)),
                true,
                ok(2, 4, &[]),
            ),
            // b served long after the rotation, and its records since are gone:
            // its checkpoint at T+140 s (seq 7) is 80 s after the log's first
            // record (T+60 s) and a later one says seq 9.
            (
                "chain removed after the rotation, start anywhere",
                || run(12, 12),
                &|r| {
                    r.access.drain(..6);
                    drop_vm(&mut r.access, "b", 1);
                },
                true,
                ok(4, 2, &[(ChainMissing, "b")]),
            ),
            (
                "checkpoint chain differs",
                standard,
                &|r| edit_checkpoint(r, "a", 3, &|c| c.chain = "0".repeat(64)),
                false,
                ok(7, 0, &[(ChainDiffers, "a")]),
            ),
            (
                // Without a key anyone can write a consistent chain from scratch;
                // the checkpoints still know the real one.
                "unkeyed chain rewritten",
                standard,
                &|r| {
                    let mut forged = AuditChain::new("a".into(), None);
                    for line in r.access.iter_mut() {
                        let mut rec = find_record(line).unwrap().unwrap();
                        if rec.vm == "a" {
                            if rec.seq == 2 {
                                rec.path = "/elsewhere".into();
                            }
                            *line = serde_json::json!({"audit": forged.seal(&mut rec)}).to_string();
                        }
                    }
                },
                false,
                ok(
                    5,
                    0,
                    &[
                        (ChainDiffers, "a"),
                        (ChainDiffers, "a"),
                        (ChainDiffers, "a"),
                    ],
                ),
            ),
        ];
        let mut wrong = Vec::new();
        for (name, make, edit, start_anywhere, want) in cases {
            let mut r = make();
            edit(&mut r);
            let got = outcome(&r, start_anywhere).0;
            if got != want {
                wrong.push(format!("{name}: got {got:?}, want {want:?}"));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }

    #[test]
    fn rotated_log_needs_start_anywhere_for_a_chain_wholly_before_it() {
        let mut r = run(8, 2);
        r.access.drain(..6);
        assert_eq!(outcome(&r, false).0, Want::Damaged(Problem::Missing));
        // Without the rotation, b's two records are there and checkpointed.
        assert_eq!(outcome(&run(8, 2), false).0, ok(6, 0, &[]));
    }

    #[test]
    fn gaps_name_the_chain_and_the_checkpoint_line() {
        let mut r = standard();
        drop_vm(&mut r.access, "a", 6);
        drop_vm(&mut r.access, "b", 1);
        let (_, c) = outcome(&r, false);
        let gaps: Vec<String> = c.unwrap().gaps.iter().map(ToString::to_string).collect();
        let line_of = |vm: &str, seq: u64| {
            1 + r
                .envoy
                .iter()
                .position(|l| l.contains(&format!(r#"{{"vm":"{vm}","seq":{seq},"#)))
                .unwrap()
        };
        assert_eq!(
            gaps,
            [
                format!("line {}: tail cut: vm a: records end at seq 5, but the checkpoint at 2026-01-01T00:02:20.000Z says the chain reached seq 7", line_of("a", 7)),
                format!("line {}: chain missing: vm b: no records, but the checkpoint at 2026-01-01T00:02:20.000Z says the chain reached seq 7", line_of("b", 7)),
            ]
        );
    }

    #[test]
    fn unvouched_chains_are_named() {
        // No checkpoint at all (Envoy's wasm log not at info): intact, nothing vouched for.
        let mut r = standard();
        r.envoy.retain(|l| !l.contains(CHECKPOINT_MARKER));
        let (want, c) = outcome(&r, false);
        assert_eq!(want, ok(0, 0, &[]));
        assert_eq!(c.unwrap().unvouched, ["a", "b"]);
        let (_, c) = outcome(&standard(), false);
        assert!(c.unwrap().unvouched.is_empty());
    }

    #[test]
    fn checkpoint_lines_are_found_amid_envoy_noise() {
        let cp = Checkpoint {
            vm: "18c0ffee-2".into(),
            seq: 42,
            chain: "ab".repeat(32),
            ts: "2026-01-01T00:00:10.250Z".into(),
        };
        let line = cp.line();
        assert_eq!(
            line,
            format!(
                r#"phi-guard audit checkpoint {{"vm":"18c0ffee-2","seq":42,"chain":"{}","ts":"2026-01-01T00:00:10.250Z"}}"#,
                "ab".repeat(32)
            )
        );
        assert_eq!(Checkpoint::find(&line), Some(Ok(cp.clone())));
        assert_eq!(Checkpoint::find(&envoy_line(&line)), Some(Ok(cp.clone())));
        assert_eq!(
            Checkpoint::find(&format!("{}\r\n", envoy_line(&line))),
            Some(Ok(cp.clone()))
        );
        for noise in [
            "",
            "[2026-01-01 00:00:00.000][1][info][main] [source/server/server.cc:1000] starting main dispatch loop",
            &envoy_line("provider idp: 2 keys loaded"),
            r#"{"time":"x","audit":"{\"vm\":\"a\",\"seq\":1,\"chain\":\"00\"}"}"#,
        ] {
            assert_eq!(Checkpoint::find(noise), None, "{noise}");
        }
        // Lines that name a checkpoint but hold none that can be read.
        let json = serde_json::to_value(&cp).unwrap();
        let with = |field: &str, value: serde_json::Value| {
            let mut v = json.clone();
            v[field] = value;
            envoy_line(&format!("{CHECKPOINT_MARKER}{v}"))
        };
        for bad in [
            envoy_line(CHECKPOINT_MARKER),
            envoy_line(&format!("{line} trailing")),
            envoy_line(&line.replace("}", ",\"extra\":1}")),
            with("seq", 0.into()),
            with("seq", "42".into()),
            with("vm", "".into()),
            with("chain", "ab".into()),
            with("chain", "zz".repeat(32).into()),
            with("ts", "yesterday".into()),
            with("ts", "2026-01-01 00:00:10Z".into()),
            // The marker inside an access-log line (a request header, say): quotes come escaped.
            serde_json::json!({"request_id": line}).to_string(),
        ] {
            assert!(matches!(Checkpoint::find(&bad), Some(Err(_))), "{bad}");
        }
    }

    #[test]
    fn unreadable_checkpoint_lines_are_counted_and_ignored() {
        let mut r = standard();
        r.envoy
            .insert(3, envoy_line(&format!("{CHECKPOINT_MARKER}{{\"vm\":")));
        r.envoy
            .push(envoy_line(&format!("{CHECKPOINT_MARKER}not json")));
        let checkpoints = Checkpoints::read(r.envoy.join("\n").as_bytes()).unwrap();
        assert_eq!(checkpoints.unreadable, [4, r.envoy.len()]);
        assert_eq!(checkpoints.len(), 8);
        assert_eq!(outcome(&r, false).0, ok(8, 0, &[]));
        // Bytes that are not UTF-8 in Envoy's log are no reason to stop reading it.
        let mut raw = b"\xff\xfe garbage\n".to_vec();
        raw.extend_from_slice(standard().envoy.join("\n").as_bytes());
        assert_eq!(Checkpoints::read(raw.as_slice()).unwrap().len(), 8);
    }

    #[test]
    fn schedule_checkpoints_a_moving_chain_once_a_period() {
        let mut chain = AuditChain::new("v".into(), None);
        let mut s = CheckpointSchedule::new(10);
        let seal = |chain: &mut AuditChain| {
            chain.seal(&mut AuditRecord::default());
        };
        // Nothing to vouch for before the first record.
        assert_eq!(s.due(&chain, T), None);
        assert_eq!(s.last(&chain, T), None);
        seal(&mut chain);
        // The first record is checkpointed at once.
        let first = s.due(&chain, T + 100).unwrap();
        assert_eq!((first.vm.as_str(), first.seq), ("v", 1));
        assert_eq!(first.chain, chain.head());
        assert_eq!(first.ts, "2026-01-01T00:00:00.100Z");
        seal(&mut chain);
        // Then at most once a period...
        assert_eq!(s.due(&chain, T + 9_999), None);
        assert_eq!(s.due(&chain, T + 10_100).map(|c| c.seq), Some(2));
        // ...and only when the chain moved.
        assert_eq!(s.due(&chain, T + 60_000), None);
        seal(&mut chain);
        assert_eq!(s.due(&chain, T + 60_001).map(|c| c.seq), Some(3));
        // As the VM stops: whatever moved since the last, period or not.
        seal(&mut chain);
        assert_eq!(s.last(&chain, T + 60_002).map(|c| c.seq), Some(4));
        assert_eq!(s.last(&chain, T + 60_003), None);
        assert_eq!(chain.vm(), "v");
        assert_eq!(chain.seq(), 4);
    }

    proptest::proptest! {
        /// Any cut of a chain's tail that reaches a checkpointed record is
        /// reported, naming that chain and no other; a cut past every
        /// checkpoint is the documented limit and goes unseen.
        #[test]
        fn every_cut_reaching_a_checkpoint_is_reported(
            pairs in 1u64..12,
            vm in proptest::sample::select(vec!["a", "b"]),
            from in 1u64..13,
            start_anywhere in proptest::bool::ANY,
        ) {
            let mut r = run(pairs, pairs);
            drop_vm(&mut r.access, vm, from);
            let checkpoints = Checkpoints::read(r.envoy.join("\n").as_bytes()).unwrap();
            let highest = checkpoints.found
                .iter().filter(|f| f.checkpoint.vm == vm).map(|f| f.checkpoint.seq).max().unwrap();
            let (want, _) = outcome(&r, start_anywhere);
            let Want::Checked { gaps, .. } = want else {
                panic!("chains are intact: {want:?}");
            };
            let named: Vec<_> = gaps.iter().filter(|(_, v)| *v == vm).cloned().collect();
            proptest::prop_assert_eq!(gaps.len(), named.len(), "only the cut chain is named");
            if from == 1 && start_anywhere {
                // A whole chain gone from a rotated log: the rotation rule's
                // own cases are in the table above.
            } else if from <= highest {
                let kind = if from == 1 { ChainMissing } else { TailCut };
                proptest::prop_assert_eq!(named, vec![(kind, vm)]);
            } else {
                proptest::prop_assert!(named.is_empty());
            }
        }
    }

    #[test]
    fn rfc3339_round_trip() {
        for ms in [
            0,
            1,
            999,
            86_399_999,
            951_782_400_000,
            T,
            T + 123,
            4_102_444_800_000,
        ] {
            let ts = rfc3339_millis(ms * 1_000_000);
            assert_eq!(parse_rfc3339_millis(&ts), Some(ms), "{ts}");
        }
        assert_eq!(parse_rfc3339_millis("2026-01-01T00:00:00Z"), Some(T));
        assert_eq!(
            parse_rfc3339_millis("2026-01-01T00:00:00.5Z"),
            Some(T + 500)
        );
        assert_eq!(
            parse_rfc3339_millis("2026-01-01T00:00:00.123456789Z"),
            Some(T + 123)
        );
        for bad in [
            "",
            "2026-01-01",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+01:00",
            "2026-13-01T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00.1234567890Z",
            "+026-01-01T00:00:00Z",
            "2026-01-01T00:00:00.-1Z",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_rfc3339_millis(bad), None, "{bad}");
        }
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

    fn checkpoint_line() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,80}",
            (any::<u64>(), "[a-f0-9]{0,64}", "[ -~]{0,12}", "[0-9:TZ.-]{0,26}").prop_map(|(seq, chain, vm, ts)| format!(
                r#"[x][1][info][wasm] wasm log p p: {CHECKPOINT_MARKER}{{"vm":"{vm}","seq":{seq},"chain":"{chain}","ts":"{ts}"}}"#
            )),
            ("[a-c]", 1u64..4, 0u64..200_000).prop_map(|(vm, seq, ms)| Checkpoint {
                vm,
                seq,
                chain: "0".repeat(64),
                ts: rfc3339_millis(ms * 1_000_000),
            }.line()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn hostile_checkpoint_logs_are_answered(
            lines in prop::collection::vec(line(), 0..6),
            marks in prop::collection::vec(checkpoint_line(), 0..6),
            anywhere in any::<bool>(),
        ) {
            let checkpoints = Checkpoints::read(marks.join("\n").as_bytes()).unwrap();
            let text = lines.join("\n");
            if let Ok((summary, c)) = verify_log_with_checkpoints(text.as_bytes(), None, anywhere, &checkpoints) {
                // A checkpoint is matched, from before the log, or part of a gap.
                prop_assert!(c.matched + c.before_log <= checkpoints.len());
                prop_assert!(c.gaps.len() <= checkpoints.len());
                prop_assert!(c.unvouched.len() <= summary.vms);
            }
        }

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

/// The hand-written writer against serde_json, the verifier's reference:
/// the same bytes for any record, so every sealed chain still verifies.
#[cfg(test)]
mod writer {
    use super::*;
    use proptest::prelude::*;

    fn serde_form(r: &AuditRecord) -> String {
        serde_json::to_string(r).unwrap()
    }

    fn written(r: &AuditRecord) -> String {
        let mut out = String::new();
        r.write_json(&mut out);
        out
    }

    #[test]
    fn every_escape_and_field_shape() {
        let every_control: String = (0u8..0x20).map(char::from).collect();
        let nasty = format!("{every_control}\"\\/\u{7f}é\u{2028}😀 ok");
        let full = AuditRecord {
            ts: rfc3339_millis(1_790_000_000_123_000_000),
            request_id: Some(nasty.clone()),
            decision: "deny".into(),
            reason: "step_up_required".into(),
            step_up: Some("acr".into()),
            rule: Some("bulk-export".into()),
            method: "GET".into(),
            path: nasty.clone(),
            status: 65535,
            iss: Some("https://idp.example.org".into()),
            sub: Some(nasty.clone()),
            client_id: Some(String::new()),
            jti: Some("j".into()),
            token_fp: Some("0123456789abcdef".into()),
            scopes_granted: vec!["a".into(), nasty.clone(), String::new()],
            scopes_required: vec![],
            acr: Some("urn:x".into()),
            amr: vec!["pwd".into()],
            source: Some("[::1]:443".into()),
            tls: Some("TLSv1.3".into()),
            binding: Some("dpop".into()),
            phi_claims: vec!["ssn".into()],
            fhir_interaction: Some("search-type".into()),
            fhir_type: Some("Observation".into()),
            patient_fp: Some("0123456789abcdef".into()),
            vm: "vm".into(),
            seq: u64::MAX,
            chain: "ff".into(),
        };
        assert_eq!(written(&full), serde_form(&full));
        let empty = AuditRecord::default();
        assert_eq!(written(&empty), serde_form(&empty));
    }

    #[test]
    fn sealed_lines_are_the_serde_form() {
        let mut chain = AuditChain::new("vm-1".into(), None);
        for i in 0..3u16 {
            let mut r = AuditRecord {
                ts: rfc3339_millis(0),
                decision: "allow".into(),
                status: 200 + i,
                ..AuditRecord::default()
            };
            let line = chain.seal(&mut r);
            assert_eq!(line, serde_form(&r));
        }
    }

    fn text() -> impl Strategy<Value = String> {
        // Control characters, quotes and backslashes, multi-byte text.
        prop_oneof![
            any::<String>(),
            "[\\x00-\\x1f\"\\\\a-z\u{e9}\u{1f600}]{0,12}"
        ]
    }

    fn opt() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(text())
    }

    fn list() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(text(), 0..4)
    }

    fn record() -> impl Strategy<Value = AuditRecord> {
        let head = (text(), opt(), text(), text(), opt(), opt(), text(), text());
        let token = (
            any::<u16>(),
            opt(),
            opt(),
            opt(),
            opt(),
            opt(),
            list(),
            list(),
        );
        let tail = (
            opt(),
            list(),
            opt(),
            opt(),
            opt(),
            list(),
            text(),
            any::<u64>(),
        );
        let fhir = (opt(), opt(), opt());
        (head, token, tail, fhir, text()).prop_map(|(h, t, e, f, chain)| AuditRecord {
            ts: h.0,
            request_id: h.1,
            decision: h.2,
            reason: h.3,
            step_up: h.4,
            rule: h.5,
            method: h.6,
            path: h.7,
            status: t.0,
            iss: t.1,
            sub: t.2,
            client_id: t.3,
            jti: t.4,
            token_fp: t.5,
            scopes_granted: t.6,
            scopes_required: t.7,
            acr: e.0,
            amr: e.1,
            source: e.2,
            tls: e.3,
            binding: e.4,
            phi_claims: e.5,
            fhir_interaction: f.0,
            fhir_type: f.1,
            patient_fp: f.2,
            vm: e.6,
            seq: e.7,
            chain,
        })
    }

    proptest! {
        #[test]
        fn same_bytes_as_serde(r in record()) {
            prop_assert_eq!(written(&r), serde_form(&r));
        }

        #[test]
        fn sealed_records_verify(records in proptest::collection::vec(record(), 1..5)) {
            let mut chain = AuditChain::new("vm".into(), Some(b"k".to_vec()));
            let lines: Vec<String> = records
                .into_iter()
                .map(|mut r| chain.seal(&mut r))
                .collect();
            prop_assert!(verify_log(lines.join("\n").as_bytes(), Some(b"k"), false).is_ok());
        }
    }
}
