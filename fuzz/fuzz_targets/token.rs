//! Bearer extraction and full token verification against the fixed key set
//! (RSA, P-256, P-384, Ed25519), feeding the verified-token cache.
//!
//! Input: text, one `Authorization` value per line, decided in order against
//! one cache of two tokens (so hits, misses and eviction all happen). A line
//! with no bearer token is verified as a bare token, so mutations that break
//! the scheme still reach the verifier. A line starting with `{` is a token
//! written as `header JSON <TAB> claims JSON <TAB> signature`: the target
//! base64url-encodes the two JSON parts, so mutations reach the header and
//! claim checks directly instead of through base64.
//!
//! Oracles: only a token whose header and payload the generator signed
//! verifies; a verified token is in time, of a provider with keys, and found
//! in the cache right after it is inserted; the cache never outgrows its
//! capacity and empties when its provider's keys change.
#![no_main]

use std::rc::Rc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use phi_guard::token::{check_times, extract_bearer, fingerprint, verify, TokenCache, Unverified};
use phi_guard_fuzz::{fixture, NOW};

const CAPACITY: usize = 2;

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let policy = &f.all_algorithms;
    // Provider 0 has the fixture keys; provider 1 never has any.
    let keys = |p: usize| (p == 0).then_some(&f.keys);
    let text = String::from_utf8_lossy(data);
    let mut cache = TokenCache::new(CAPACITY);
    for line in text.split('\n') {
        let built;
        let line = if line.starts_with('{') {
            built = from_json_parts(line);
            built.as_str()
        } else {
            line
        };
        let token = match extract_bearer(&[line]) {
            Ok(Some(token)) => token,
            Ok(None) | Err(_) => line,
        };
        if let Some(hit) = cache.get(token) {
            assert_eq!(hit.fingerprint, fingerprint(token));
            assert!(check_times(policy, hit.exp, hit.nbf, hit.iat, NOW).is_ok());
            continue;
        }
        match verify(policy, &keys, token, NOW) {
            Ok(v) => {
                assert!(
                    f.signed_by_generator(token),
                    "a token nobody signed verified: {token:?}"
                );
                assert_eq!(v.provider, 0);
                assert_eq!(v.fingerprint, fingerprint(token));
                assert!(check_times(policy, v.exp, v.nbf, v.iat, NOW).is_ok());
                cache.insert(token, Rc::new(v));
                assert!(cache.get(token).is_some(), "just inserted, not found");
                assert!(cache.len() <= CAPACITY);
            }
            Err(Unverified::NoKeys { provider }) => assert_eq!(provider, 1),
            Err(Unverified::UnknownKid { provider }) => assert_eq!(provider, 0),
            Err(Unverified::Refused(_)) => {}
        }
    }
    assert!(cache.is_empty() == (cache.approx_bytes() == 0));
    cache.forget_provider(0);
    assert!(cache.is_empty());
    assert_eq!(cache.approx_bytes(), 0);
});

/// `header <TAB> claims <TAB> signature` as a compact JWS.
fn from_json_parts(line: &str) -> String {
    let mut parts = line.splitn(3, '\t');
    let header = URL_SAFE_NO_PAD.encode(parts.next().unwrap_or(""));
    let claims = URL_SAFE_NO_PAD.encode(parts.next().unwrap_or(""));
    format!("{header}.{claims}.{}", parts.next().unwrap_or(""))
}
