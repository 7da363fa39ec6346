//! The revocation list: tokens, subjects and clients whose tokens must stop
//! working before their `exp`. Fetched and shared like a JWKS (`fetch`,
//! `host/fetcher.rs`); here it is parsed, bounded and asked.
//!
//! ```json
//! {"jti": ["…"], "sub": ["…"], "client_id": ["…"],
//!  "revoked_before": {"sub": {"<sub>": 1767225600}, "client_id": {"<id>": 1767225600}}}
//! ```
//! Every member is optional; any other member refuses the list (a typo such
//! as `"jtis"` must not quietly revoke nothing).

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::token::VerifiedToken;

/// Largest list accepted.
pub const MAX_REVOCATION_BYTES: usize = 8 * 1024 * 1024;
/// Most entries accepted, all members together.
pub const MAX_REVOCATION_ENTRIES: usize = 200_000;

/// Why a list was refused as a whole (the previous one stays in force).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationError {
    TooLarge(usize),
    TooManyEntries(usize),
    Invalid(String),
}

impl fmt::Display for RevocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RevocationError::TooLarge(n) => write!(
                f,
                "revocation list of {n} bytes is over the {MAX_REVOCATION_BYTES}-byte limit"
            ),
            RevocationError::TooManyEntries(n) => write!(
                f,
                "revocation list of {n} entries is over the {MAX_REVOCATION_ENTRIES}-entry limit"
            ),
            RevocationError::Invalid(e) => write!(f, "revocation list is not valid: {e}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawList {
    #[serde(default)]
    jti: Vec<String>,
    #[serde(default)]
    sub: Vec<String>,
    #[serde(default)]
    client_id: Vec<String>,
    #[serde(default)]
    revoked_before: RawBefore,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBefore {
    #[serde(default)]
    sub: HashMap<String, i64>,
    #[serde(default)]
    client_id: HashMap<String, i64>,
}

/// A parsed list.
#[derive(Debug, Default)]
pub struct RevocationList {
    jti: HashSet<String>,
    sub: HashSet<String>,
    client_id: HashSet<String>,
    sub_before: HashMap<String, i64>,
    client_before: HashMap<String, i64>,
    /// Names this list's content (from its SHA-256; never 0), so a token
    /// found clean by it need not be looked up again while it is in force.
    version: u64,
}

impl RevocationList {
    /// Parses a list, refusing it whole if it is over the bounds or malformed.
    pub fn parse(doc: &[u8]) -> Result<RevocationList, RevocationError> {
        if doc.len() > MAX_REVOCATION_BYTES {
            return Err(RevocationError::TooLarge(doc.len()));
        }
        // serde would also read a struct from an array; the list is an object.
        if doc.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(RevocationError::Invalid("not a JSON object".into()));
        }
        let raw: RawList =
            serde_json::from_slice(doc).map_err(|e| RevocationError::Invalid(e.to_string()))?;
        let entries = raw.jti.len()
            + raw.sub.len()
            + raw.client_id.len()
            + raw.revoked_before.sub.len()
            + raw.revoked_before.client_id.len();
        if entries > MAX_REVOCATION_ENTRIES {
            return Err(RevocationError::TooManyEntries(entries));
        }
        let digest = Sha256::digest(doc);
        let mut first = [0u8; 8];
        first.copy_from_slice(digest.get(..8).unwrap_or(&[1; 8]));
        Ok(RevocationList {
            jti: raw.jti.into_iter().collect(),
            sub: raw.sub.into_iter().collect(),
            client_id: raw.client_id.into_iter().collect(),
            sub_before: raw.revoked_before.sub,
            client_before: raw.revoked_before.client_id,
            version: u64::from_le_bytes(first) | 1,
        })
    }

    /// Entries in the list, all members together.
    pub fn len(&self) -> usize {
        self.jti.len()
            + self.sub.len()
            + self.client_id.len()
            + self.sub_before.len()
            + self.client_before.len()
    }

    /// Whether the list revokes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the list revokes `t`: its `jti`, `sub` or client (`client_id`,
    /// else `azp`) is listed, or it was issued before its subject's or
    /// client's `revoked_before` time. A token with neither `iat` nor `nbf`
    /// cannot show it came after such a time, and counts as revoked by it.
    pub fn revokes(&self, t: &VerifiedToken) -> bool {
        if t.revocation_checked.get() == self.version {
            return false;
        }
        let listed = |set: &HashSet<String>, v: &Option<String>| {
            v.as_ref().is_some_and(|v| set.contains(v.as_str()))
        };
        let issued = t.iat.or(t.nbf);
        let before = |map: &HashMap<String, i64>, v: &Option<String>| {
            v.as_ref()
                .and_then(|v| map.get(v.as_str()))
                .is_some_and(|cutoff| issued.is_none_or(|at| at < *cutoff))
        };
        let client = if t.client_id.is_some() {
            &t.client_id
        } else {
            &t.azp
        };
        let revoked = listed(&self.jti, &t.jti)
            || listed(&self.sub, &t.sub)
            || listed(&self.client_id, client)
            || before(&self.sub_before, &t.sub)
            || before(&self.client_before, client);
        if !revoked {
            t.revocation_checked.set(self.version);
        }
        revoked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn token(sub: &str, client: &str, jti: &str, iat: Option<i64>) -> VerifiedToken {
        VerifiedToken {
            sub: Some(sub.into()),
            client_id: Some(client.into()),
            jti: Some(jti.into()),
            iat,
            exp: 2_000,
            ..VerifiedToken::default()
        }
    }

    fn list(doc: serde_json::Value) -> RevocationList {
        RevocationList::parse(doc.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn each_member_revokes_what_it_names() {
        let l = list(json!({
            "jti": ["j-bad"], "sub": ["u-gone"], "client_id": ["c-leaked"],
            "revoked_before": {"sub": {"u-left": 1000}, "client_id": {"c-rotated": 1500}}
        }));
        assert_eq!(l.len(), 5);
        let table = [
            (token("u", "c", "j", Some(900)), false),
            (token("u", "c", "j-bad", Some(900)), true),
            (token("u-gone", "c", "j", Some(900)), true),
            (token("u", "c-leaked", "j", Some(900)), true),
            // Issued before the subject left: dead; after: fine.
            (token("u-left", "c", "j", Some(999)), true),
            (token("u-left", "c", "j", Some(1000)), false),
            (token("u", "c-rotated", "j", Some(1499)), true),
            (token("u", "c-rotated", "j", Some(1500)), false),
            // No issue time to show it came later: revoked.
            (token("u-left", "c", "j", None), true),
        ];
        for (i, (t, want)) in table.iter().enumerate() {
            assert_eq!(l.revokes(t), *want, "case {i}");
        }
        // nbf stands in for a missing iat.
        let mut t = token("u-left", "c", "j", None);
        t.nbf = Some(1001);
        assert!(!l.revokes(&t));
        // The client is azp when there is no client_id.
        let mut t = token("u", "c", "j", Some(900));
        t.client_id = None;
        t.azp = Some("c-leaked".into());
        assert!(l.revokes(&t));
    }

    #[test]
    fn a_clean_token_is_remembered_per_list() {
        let a = list(json!({"sub": ["u-gone"]}));
        let t = token("u", "c", "j", Some(1));
        assert!(!a.revokes(&t));
        assert_eq!(t.revocation_checked.get(), a.version);
        // A new list asks again.
        let b = list(json!({"sub": ["u"]}));
        assert_ne!(a.version, b.version);
        assert!(b.revokes(&t));
        assert!(b.revokes(&t), "a revoked token stays revoked");
    }

    #[test]
    fn bad_lists_are_refused_whole() {
        assert!(list(json!({})).is_empty());
        for bad in [
            &b"not json"[..],
            b"[]",
            br#"{"jtis": ["x"]}"#,
            br#"{"jti": "x"}"#,
            br#"{"revoked_before": {"sub": {"u": "yesterday"}}}"#,
            br#"{"revoked_before": {"iss": {}}}"#,
        ] {
            assert!(
                matches!(RevocationList::parse(bad), Err(RevocationError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let many: Vec<String> = (0..=MAX_REVOCATION_ENTRIES)
            .map(|i| i.to_string())
            .collect();
        let doc = json!({ "jti": many }).to_string();
        assert_eq!(
            RevocationList::parse(doc.as_bytes()).unwrap_err(),
            RevocationError::TooManyEntries(MAX_REVOCATION_ENTRIES + 1)
        );
        let big = vec![b' '; MAX_REVOCATION_BYTES + 1];
        assert_eq!(
            RevocationList::parse(&big).unwrap_err(),
            RevocationError::TooLarge(MAX_REVOCATION_BYTES + 1)
        );
    }
}
