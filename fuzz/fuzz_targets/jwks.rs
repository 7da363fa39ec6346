//! JWKS parsing (`KeySet::parse`) with every algorithm allowed, then key
//! selection and one signature check per key.
//!
//! Input: the JWKS document's bytes.
//!
//! Oracles (what `jwks.rs` promises): an over-long document is refused as too
//! large; a parsed set holds 1..=MAX_KEYS keys, each reachable by some
//! algorithm; selection only ever yields keys of the algorithm's kind whose
//! JWK `alg` binding allows it, and by `kid` only keys with that `kid`.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use phi_guard::crypto::{verify_signature, Alg, PublicKey};
use phi_guard::jwks::{Jwk, JwksError, KeySet, MAX_JWKS_BYTES, MAX_KEYS};

/// Signature checks per input: an 8192-bit modulus costs about a millisecond.
const MAX_CHECKS: usize = 8;

fuzz_target!(|data: &[u8]| {
    let parsed = KeySet::parse(data, &Alg::ALL);
    if data.len() > MAX_JWKS_BYTES {
        assert!(matches!(parsed, Err(JwksError::TooLarge(_))));
    }
    let Ok(set) = parsed else {
        return;
    };
    assert!(!set.is_empty() && set.len() <= MAX_KEYS);
    let mut seen: HashSet<*const Jwk> = HashSet::new();
    for alg in Alg::ALL {
        let Ok(keys) = set.select(None, alg) else {
            continue;
        };
        for key in keys {
            assert_eq!(key.key.kind(), alg.key_kind());
            assert!(key.alg.is_none_or(|bound| bound == alg));
            if let Some(kid) = key.kid.as_deref() {
                let named = set
                    .select(Some(kid), alg)
                    .expect("a key is found by its kid");
                assert!(named.iter().all(|k| k.kid.as_deref() == Some(kid)));
                assert!(named.iter().any(|k| std::ptr::eq(*k, key)));
            }
            if seen.insert(key) && seen.len() <= MAX_CHECKS {
                // The fuzzer chose the key, so it may well make a signature
                // that verifies: only that the check answers is asserted.
                let sig = signature_for(&key.key, data);
                let _ = verify_signature(alg, &key.key, b"header.payload", &sig);
            }
        }
    }
    assert_eq!(seen.len(), set.len(), "a key no algorithm can select");
});

/// A signature of the key's length made from the input, below any modulus.
fn signature_for(key: &PublicKey, data: &[u8]) -> Vec<u8> {
    let len = match key {
        PublicKey::Rsa(k) => k.modulus_bits().div_ceil(8),
        PublicKey::P256(_) | PublicKey::Ed25519(_) => 64,
        PublicKey::P384(_) => 96,
    };
    let mut sig: Vec<u8> = data.iter().copied().cycle().take(len).collect();
    sig.resize(len, 1);
    if let Some(first) = sig.first_mut() {
        *first = 0;
    }
    sig
}
