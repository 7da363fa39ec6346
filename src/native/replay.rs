//! DPoP proofs seen, shared by every worker thread of this Envoy (the
//! module lives in one process: a mutex-guarded map, where the wasm filter
//! needs shared data), so a proof works once within its lifetime whichever
//! worker gets it (RFC 9449 §11.1).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// At most this many live proofs; past that a proof is refused rather than
/// forgotten (the wasm filter's shared-data store holds about as many).
const MAX_PROOFS: usize = 1 << 20;

fn store() -> &'static Mutex<HashMap<[u8; 32], i64>> {
    static STORE: OnceLock<Mutex<HashMap<[u8; 32], i64>>> = OnceLock::new();
    STORE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Records the proof whose `jti` digest is `digest` until `until` (Unix
/// seconds); `false` if it was recorded before (a replay) or cannot be.
pub fn first_use(digest: &[u8; 32], until: i64, now: i64) -> bool {
    let Ok(mut seen) = store().lock() else {
        return false;
    };
    if seen.get(digest).is_some_and(|at| *at >= now) {
        return false;
    }
    if seen.len() >= MAX_PROOFS {
        seen.retain(|_, at| *at >= now);
        if seen.len() >= MAX_PROOFS {
            return false;
        }
    }
    seen.insert(*digest, until);
    true
}
