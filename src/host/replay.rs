//! DPoP proofs seen, shared by every worker of this Envoy, so a proof works
//! once within its lifetime whichever worker gets it (RFC 9449 §11.1).
//!
//! 4096 buckets in shared data (`phi_guard.dpop.<n>`), chosen by the proof
//! `jti`'s digest; each holds `<16 hex digits of the digest> <until>` lines,
//! pruned of expired ones whenever it is written, and is updated with CAS so
//! two workers cannot both take the same proof. A bucket holds at most 256
//! live proofs (a million a proof lifetime in all); past that, and when the
//! store cannot be written, a proof is refused rather than forgotten.

use super::abi;

const BUCKETS: u16 = 4096;
const PER_BUCKET: usize = 256;
const TRIES: usize = 8;

/// Records the proof whose `jti` digest is `digest` until `until` (Unix
/// seconds); `false` if it was recorded before (a replay) or cannot be.
pub fn first_use(digest: &[u8; 32], until: i64, now: i64) -> bool {
    let [a, b, rest @ ..] = digest;
    let bucket = u16::from_be_bytes([*a, *b]) % BUCKETS;
    let key = format!("phi_guard.dpop.{bucket}");
    let id: String = rest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    for _ in 0..TRIES {
        let (value, cas) = match abi::shared_data(&key) {
            Ok(v) => v,
            Err(_) => return false,
        };
        if cas.is_none() {
            // Created empty first, so that every later write can be a CAS.
            let _ = abi::set_shared_data(&key, b"", None);
            continue;
        }
        let text = String::from_utf8_lossy(value.as_deref().unwrap_or_default()).into_owned();
        let mut live: Vec<(&str, i64)> = text
            .lines()
            .filter_map(|line| {
                let (seen, at) = line.split_once(' ')?;
                Some((seen, at.parse::<i64>().ok()?))
            })
            .filter(|(_, at)| *at >= now)
            .collect();
        if live.iter().any(|(seen, _)| *seen == id) {
            return false;
        }
        if live.len() >= PER_BUCKET {
            log::warn!("DPoP replay store full in one bucket: proof refused");
            return false;
        }
        live.push((&id, until));
        let mut out = String::with_capacity(live.len() * 28);
        for (seen, at) in &live {
            out.push_str(seen);
            out.push(' ');
            out.push_str(&at.to_string());
            out.push('\n');
        }
        if abi::set_shared_data(&key, out.as_bytes(), cas).is_ok() {
            return true;
        }
        // Another worker wrote the bucket meanwhile: read it again.
    }
    false
}
