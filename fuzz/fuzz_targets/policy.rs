//! Policy loading (`Policy::from_json`).
//!
//! Input: the filter's JSON configuration document.
//!
//! Oracles (what a loaded `Policy` promises request handling): at least one
//! provider, each found by its issuer and with an algorithm; unique rule ids
//! and no rule hidden by an earlier one; bounded clock skew, a positive
//! lifetime; identity headers lower-case and distinct.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use phi_guard::config::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = Policy::from_json(data) else {
        return;
    };
    assert!(!policy.providers.is_empty());
    for (i, p) in policy.providers.iter().enumerate() {
        assert_eq!(
            policy.provider_for_issuer(&p.issuer).map(|(at, _)| at),
            Some(i)
        );
        assert!(!p.algorithms.is_empty() && !p.audiences.is_empty());
        assert!(!p.jwks.authority.is_empty() && p.jwks.path.starts_with('/'));
        assert!((1..=60_000).contains(&p.jwks.timeout_ms));
    }
    assert!(policy.clock_skew <= 300 && policy.max_token_lifetime > 0);
    let ids: HashSet<&str> = policy.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), policy.rules.len());
    for (i, earlier) in policy.rules.iter().enumerate() {
        for later in policy.rules.iter().skip(i + 1) {
            assert!(!earlier.shadows(later), "{} hides {}", earlier.id, later.id);
        }
    }
    let headers: HashSet<&str> = policy
        .claims_to_headers
        .iter()
        .map(|(_, h)| h.as_str())
        .collect();
    assert_eq!(headers.len(), policy.claims_to_headers.len());
    assert!(headers
        .iter()
        .all(|h| !h.is_empty() && h.bytes().all(|b| !b.is_ascii_uppercase())));
});
