//! The revocation list (`RevocationList::parse`) and its question
//! (`revokes`), asked of tokens built from the input.
//!
//! Input: the list's bytes.
//!
//! Oracles (what `revocation.rs` promises): a list over the byte bound is
//! refused as too large; a parsed list holds at most the entry bound; a token
//! whose `jti`, `sub` or client the list names is revoked, whatever else it
//! carries; asking twice (the second time through the remembered version)
//! gives the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_guard::revocation::{
    RevocationError, RevocationList, MAX_REVOCATION_BYTES, MAX_REVOCATION_ENTRIES,
};
use phi_guard::token::VerifiedToken;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let parsed = RevocationList::parse(data);
    if data.len() > MAX_REVOCATION_BYTES {
        assert!(matches!(parsed, Err(RevocationError::TooLarge(_))));
    }
    let Ok(list) = parsed else {
        return;
    };
    assert!(list.len() <= MAX_REVOCATION_ENTRIES);
    // Every string the document lists names a token the list must revoke.
    let doc: Value = serde_json::from_slice(data).expect("parsed lists are JSON");
    for (member, field) in [("jti", 0), ("sub", 1), ("client_id", 2)] {
        let names = doc
            .get(member)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for name in names.iter().filter_map(Value::as_str).take(8) {
            let mut t = VerifiedToken {
                iat: Some(1),
                exp: 2,
                ..VerifiedToken::default()
            };
            let slot = match field {
                0 => &mut t.jti,
                1 => &mut t.sub,
                _ => &mut t.client_id,
            };
            *slot = Some(name.to_owned());
            assert!(list.revokes(&t), "{member} {name:?} listed but not revoked");
            assert!(list.revokes(&t), "asked again");
        }
    }
    let clean = VerifiedToken {
        sub: Some("\u{1}not-listed".into()),
        iat: Some(i64::MAX),
        exp: i64::MAX,
        ..VerifiedToken::default()
    };
    let first = list.revokes(&clean);
    assert_eq!(
        first,
        list.revokes(&clean),
        "the remembered version changed the answer"
    );
});
