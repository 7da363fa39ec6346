//! Token introspection (RFC 7662): the request phi-guard POSTs, the answer it
//! reads, what that answer means for a provider's token, and the per-worker
//! cache of answers. The host sends and receives (`host/introspect.rs`);
//! `decision` asks the cache.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::rc::Rc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use crate::answer::Reason;
use crate::config::Policy;
use crate::rules::GrantedScopes;
use crate::token::{self, OneOrMany, VerifiedToken};

/// Largest answer accepted; a real one is a few hundred bytes.
pub const MAX_INTROSPECTION_BYTES: usize = 64 * 1024;

/// What a cached answer is found by: the token's SHA-256, so the cache holds
/// no token.
pub type TokenKey = [u8; 32];

/// The cache key of `token`.
pub fn key(token: &str) -> TokenKey {
    token::sha256(token.as_bytes())
}

/// `application/x-www-form-urlencoded` (WHATWG URL §5.2, as RFC 6749
/// Appendix B asks): letters, digits and `*-._` as they are, a space as `+`,
/// every other byte of the UTF-8 as `%XX`.
pub fn form_urlencode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The body of an introspection request (RFC 7662 §2.1).
pub fn form_body(token: &str) -> String {
    format!(
        "token={}&token_type_hint=access_token",
        form_urlencode(token)
    )
}

/// The `Authorization` value for HTTP Basic client authentication (RFC 6749
/// §2.3.1): client id and secret each form-urlencoded, joined by `:`, base64.
pub fn basic_authorization(client_id: &str, client_secret: &str) -> String {
    let pair = format!(
        "{}:{}",
        form_urlencode(client_id),
        form_urlencode(client_secret)
    );
    format!("Basic {}", STANDARD.encode(pair))
}

/// Why an answer was not a usable introspection response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntrospectionError {
    TooLarge(usize),
    Invalid(String),
}

impl fmt::Display for IntrospectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntrospectionError::TooLarge(n) => write!(
                f,
                "answer of {n} bytes is over the {MAX_INTROSPECTION_BYTES}-byte limit"
            ),
            IntrospectionError::Invalid(e) => {
                write!(f, "answer is not an introspection response: {e}")
            }
        }
    }
}

/// RFC 7519 NumericDate: seconds, possibly with a fraction (dropped).
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let n: Option<serde_json::Number> = Option::deserialize(d)?;
    Ok(n.and_then(|n| {
        n.as_i64()
            // Saturates; a date past i64 seconds is as good as never.
            .or_else(|| n.as_f64().map(|f| f.floor() as i64))
    }))
}

/// `active` alone: an inactive answer needs nothing else (RFC 7662 §2.2).
#[derive(Deserialize)]
struct RawActive {
    active: bool,
}

/// The members of an active answer phi-guard reads: RFC 7662 §2.2's, and
/// `acr`, `amr`, `auth_time` for step-up rules. Each present one must have
/// its type, or the answer is garbage.
#[derive(Deserialize)]
struct RawAnswer {
    scope: Option<String>,
    client_id: Option<String>,
    username: Option<String>,
    token_type: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<i64>,
    sub: Option<String>,
    aud: Option<OneOrMany>,
    iss: Option<String>,
    jti: Option<String>,
    acr: Option<String>,
    amr: Option<Vec<String>>,
    #[serde(default, deserialize_with = "numeric_date")]
    auth_time: Option<i64>,
    /// Everything else; read only for the configured roles claim.
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

/// What the authorization server said about an active token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claims {
    pub scope: Option<String>,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub token_type: Option<String>,
    pub exp: Option<i64>,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    pub sub: Option<String>,
    /// `None` when the answer has no `aud`.
    pub aud: Option<Vec<String>>,
    pub iss: Option<String>,
    pub jti: Option<String>,
    pub acr: Option<String>,
    pub amr: Vec<String>,
    pub auth_time: Option<i64>,
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A parsed introspection response.
#[derive(Debug, Clone, PartialEq)]
pub enum Introspection {
    Inactive,
    Active(Box<Claims>),
}

impl Introspection {
    /// Parses an answer: a JSON object of at most
    /// [`MAX_INTROSPECTION_BYTES`] with a boolean `active`; an active one's
    /// members of their RFC 7662 types. Anything else is refused.
    pub fn parse(body: &[u8]) -> Result<Introspection, IntrospectionError> {
        if body.len() > MAX_INTROSPECTION_BYTES {
            return Err(IntrospectionError::TooLarge(body.len()));
        }
        // serde would also read a struct from an array; the answer is an object.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(IntrospectionError::Invalid("not a JSON object".into()));
        }
        let invalid = |e: serde_json::Error| IntrospectionError::Invalid(e.to_string());
        let RawActive { active } = serde_json::from_slice(body).map_err(invalid)?;
        if !active {
            return Ok(Introspection::Inactive);
        }
        let raw: RawAnswer = serde_json::from_slice(body).map_err(invalid)?;
        Ok(Introspection::Active(Box::new(Claims {
            scope: raw.scope,
            client_id: raw.client_id,
            username: raw.username,
            token_type: raw.token_type,
            exp: raw.exp,
            iat: raw.iat,
            nbf: raw.nbf,
            sub: raw.sub,
            aud: raw.aud.map(|a| a.iter().map(str::to_owned).collect()),
            iss: raw.iss,
            jti: raw.jti,
            acr: raw.acr,
            amr: raw.amr.unwrap_or_default(),
            auth_time: raw.auth_time,
            other: raw.other,
        })))
    }
}

/// What an answer means for a request with that token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `"active": false`.
    Inactive,
    /// Active, but refused on its claims (wrong issuer or audience, expired,
    /// not yet valid).
    Refused(Reason),
    /// Active, and its claims fit the provider: the token as the answer
    /// describes it (what an opaque token is known by).
    Active(Rc<VerifiedToken>),
}

/// Judges provider `provider`'s answer about `token` at Unix time `now`, in
/// the order a JWT is checked: issuer (`iss`, if present, is the provider's),
/// time (`exp`, if present, not passed; `nbf`, `iat` not ahead; clock skew
/// allowed), audience (`aud`, if present, holds one of the provider's).
/// Scopes go through the same policy as a JWT's.
pub fn judge(
    answer: &Introspection,
    policy: &Policy,
    provider: usize,
    token: &str,
    now: i64,
) -> Outcome {
    let Introspection::Active(c) = answer else {
        return Outcome::Inactive;
    };
    let Some(p) = policy.providers.get(provider) else {
        return Outcome::Refused(Reason::UnknownIssuer);
    };
    if c.iss.as_ref().is_some_and(|iss| *iss != p.issuer) {
        return Outcome::Refused(Reason::UnknownIssuer);
    }
    // No `exp`: the server vouches for the token until it says otherwise.
    let exp = c.exp.unwrap_or(i64::MAX);
    if let Err(reason) = token::check_times(policy, exp, c.nbf, c.iat, now) {
        return Outcome::Refused(reason);
    }
    if let Some(aud) = &c.aud {
        if !aud.iter().any(|a| p.audiences.contains(a)) {
            return Outcome::Refused(Reason::WrongAudience);
        }
    }
    let roles = token::role_scopes(policy, &c.other);
    Outcome::Active(Rc::new(VerifiedToken {
        provider,
        sub: c.sub.clone(),
        client_id: c.client_id.clone(),
        azp: None,
        jti: c.jti.clone(),
        acr: c.acr.clone(),
        amr: c.amr.clone(),
        auth_time: c.auth_time,
        exp,
        nbf: c.nbf,
        iat: c.iat,
        scopes: GrantedScopes::new(c.scope.as_deref(), &[], &roles, policy.deny_wildcard_scopes),
        patient: token::launch_patient(policy, &c.other),
        fingerprint: token::fingerprint(token),
        revocation_checked: Default::default(),
        // RFC 8705 §3.2, RFC 9449 §6.2: an answer may say what the token is bound to.
        cnf: c
            .other
            .get("cnf")
            .and_then(|v| serde_json::from_value(v.clone()).ok()),
        phi_claims: policy
            .forbidden_claims
            .iter()
            .filter(|name| c.other.contains_key(name.as_str()))
            .cloned()
            .collect(),
    }))
}

// ---------------------------------------------------------------------------
// The cache of answers

/// One provider's answers, per worker, bounded.
///
/// An active answer is kept `cache_seconds`, never past the token's `exp`;
/// inactive answers and refusals `cache_seconds`, except "not yet valid",
/// which time lifts. Every entry lives at least until the next second, so
/// the requests that waited for an answer are decided from it. When full, the oldest entry goes (first in, first
/// out: entries live about equally long, so that is about the one nearest
/// its end).
#[derive(Debug, Default)]
pub struct IntrospectionCache {
    capacity: usize,
    entries: HashMap<TokenKey, Entry>,
    /// Keys in insertion order, with the insertion's number; a key answered
    /// again leaves a stale record behind, skipped and swept out.
    order: VecDeque<(TokenKey, u64)>,
    inserted: u64,
}

#[derive(Debug)]
struct Entry {
    outcome: Outcome,
    /// Usable while `now < until`.
    until: i64,
    number: u64,
}

impl IntrospectionCache {
    /// A cache of at most `capacity` answers; `0` keeps none.
    pub fn new(capacity: usize) -> IntrospectionCache {
        IntrospectionCache {
            capacity,
            ..IntrospectionCache::default()
        }
    }

    /// The answer for `key`, if one is kept and still usable at `now`.
    pub fn get(&mut self, key: &TokenKey, now: i64) -> Option<Outcome> {
        let entry = self.entries.get(key)?;
        if now < entry.until {
            return Some(entry.outcome.clone());
        }
        self.entries.remove(key);
        None
    }

    /// Keeps the answer `outcome` for `key`, got at `now`.
    pub fn insert(&mut self, key: TokenKey, outcome: Outcome, now: i64, cache_seconds: u64) {
        if self.capacity == 0 {
            return;
        }
        let kept = now.saturating_add(i64::try_from(cache_seconds).unwrap_or(i64::MAX));
        let until = match &outcome {
            // An answer whose `exp` is already past (within the clock skew)
            // still decides the requests that waited for it.
            Outcome::Active(t) => kept.min(t.exp.max(now.saturating_add(1))),
            Outcome::Refused(Reason::NotYetValid) => kept.min(now.saturating_add(1)),
            Outcome::Inactive | Outcome::Refused(_) => kept,
        };
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= self.capacity {
                let Some((old, number)) = self.order.pop_front() else {
                    break;
                };
                if self.entries.get(&old).is_some_and(|e| e.number == number) {
                    self.entries.remove(&old);
                }
            }
        }
        self.inserted += 1;
        let number = self.inserted;
        self.entries.insert(
            key,
            Entry {
                outcome,
                until,
                number,
            },
        );
        self.order.push_back((key, number));
        if self.order.len() > self.capacity.saturating_mul(2).saturating_add(16) {
            let entries = &self.entries;
            self.order
                .retain(|(k, n)| entries.get(k).is_some_and(|e| e.number == *n));
        }
    }

    /// How many answers are kept (usable or not yet swept out).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No answer is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use serde_json::json;

    #[test]
    fn form_encoding_and_basic_credentials() {
        assert_eq!(form_urlencode("aZ09*-._"), "aZ09*-._");
        assert_eq!(
            form_urlencode("a b:c%d/e+f~g=h&i\u{fc}"),
            "a+b%3Ac%25d%2Fe%2Bf%7Eg%3Dh%26i%C3%BC"
        );
        assert_eq!(
            form_body("eyJ.a+b/c=="),
            "token=eyJ.a%2Bb%2Fc%3D%3D&token_type_hint=access_token"
        );
        // RFC 6749 §2.3.1's own example.
        assert_eq!(
            basic_authorization("s6BhdRkqt3", "gX1fBat3bV"),
            "Basic czZCaGRSa3F0MzpnWDFmQmF0M2JW"
        );
        // Reserved characters are encoded before base64, so a `:` in the id
        // cannot move the split and a `%` cannot be read as an escape.
        let value = basic_authorization("my app:1", "s3:cr%t+/ü");
        let decoded = STANDARD
            .decode(value.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "my+app%3A1:s3%3Acr%25t%2B%2F%C3%BC"
        );
    }

    fn parse(v: serde_json::Value) -> Result<Introspection, IntrospectionError> {
        Introspection::parse(v.to_string().as_bytes())
    }

    #[test]
    fn answers_are_parsed_strictly() {
        assert_eq!(parse(json!({"active": false})), Ok(Introspection::Inactive));
        // An inactive answer needs nothing else, whatever else it holds.
        assert_eq!(
            parse(json!({"active": false, "exp": "never", "scope": 7})),
            Ok(Introspection::Inactive)
        );
        let Ok(Introspection::Active(c)) = parse(json!({
            "active": true, "scope": "a b", "client_id": "app", "username": "jdoe",
            "token_type": "Bearer", "exp": 2000, "iat": 1000.9, "nbf": 1000, "sub": "u",
            "aud": "api", "iss": "https://as", "jti": "j", "acr": "urn:mfa", "amr": ["otp"],
            "auth_time": 999, "ext": {"anything": [1]}
        })) else {
            panic!("active answer refused")
        };
        assert_eq!(c.scope.as_deref(), Some("a b"));
        assert_eq!(
            (c.exp, c.iat, c.nbf, c.auth_time),
            (Some(2000), Some(1000), Some(1000), Some(999))
        );
        assert_eq!(c.aud, Some(vec!["api".to_string()]));
        assert_eq!(
            (
                c.username.as_deref(),
                c.token_type.as_deref(),
                c.amr.as_slice()
            ),
            (Some("jdoe"), Some("Bearer"), &["otp".to_string()][..])
        );
        let Ok(Introspection::Active(c)) = parse(json!({"active": true, "aud": ["x", "api"]}))
        else {
            panic!()
        };
        assert_eq!(c.aud, Some(vec!["x".to_string(), "api".to_string()]));
        assert_eq!(c.exp, None);

        for bad in [
            &b""[..],
            b"not json",
            b"<html>502</html>",
            b"[]",
            b"null",
            br#"[{"active": true}]"#,
            br#"{}"#,
            br#"{"active": "true"}"#,
            br#"{"active": 1}"#,
            br#"{"active": null}"#,
            br#"{"active": true, "active": false}"#,
            br#"{"active": true, "exp": "soon"}"#,
            br#"{"active": true, "scope": ["a"]}"#,
            br#"{"active": true, "aud": 5}"#,
            br#"{"active": true, "sub": {"x": 1}}"#,
            br#"{"active": true"#,
        ] {
            assert!(
                matches!(
                    Introspection::parse(bad),
                    Err(IntrospectionError::Invalid(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut big = br#"{"active": true, "x": ""#.to_vec();
        big.resize(MAX_INTROSPECTION_BYTES + 1, b'x');
        assert_eq!(
            Introspection::parse(&big),
            Err(IntrospectionError::TooLarge(MAX_INTROSPECTION_BYTES + 1))
        );
    }

    fn judged(answer: serde_json::Value) -> Outcome {
        let kit = Kit::new();
        let policy = kit.policy_with(|p| {
            p["roles_claim"] = "roles".into();
            p["role_scopes"] = json!({"nurse": ["read:vitals"]});
        });
        judge(&parse(answer).unwrap(), &policy, 0, "opaque-token", NOW)
    }

    #[test]
    fn an_answer_names_the_launch_patient_too() {
        let kit = Kit::new();
        let policy = kit.policy_with(|p| p["fhir"] = json!({"base_path": "/fhir"}));
        let answer =
            parse(json!({"active": true, "scope": "patient/Observation.rs", "patient": "p-9"}));
        let Outcome::Active(t) = judge(&answer.unwrap(), &policy, 0, "opaque", NOW) else {
            panic!("refused")
        };
        assert_eq!(t.patient.as_deref(), Some("p-9"));
        let answer = parse(json!({"active": true, "patient": "p-9"})).unwrap();
        let Outcome::Active(t) = judge(&answer, &kit.policy(&[]), 0, "opaque", NOW) else {
            panic!("refused")
        };
        assert_eq!(t.patient, None, "no fhir block, no launch patient");
    }

    #[test]
    fn answers_are_judged_against_the_provider() {
        assert_eq!(judged(json!({"active": false})), Outcome::Inactive);
        let Outcome::Active(t) = judged(json!({
            "active": true, "iss": ISS, "aud": ["other", AUD], "exp": NOW + 60, "iat": NOW - 5,
            "sub": "u-1", "client_id": "app-1", "jti": "j-1",
            "scope": "read:patient-profile read:all * bad\"scope", "roles": ["nurse", "admin"]
        })) else {
            panic!("refused")
        };
        assert_eq!(t.provider, 0);
        assert_eq!(
            (t.sub.as_deref(), t.client_id.as_deref()),
            (Some("u-1"), Some("app-1"))
        );
        assert_eq!((t.exp, t.iat), (NOW + 60, Some(NOW - 5)));
        // The wildcard policy applies; roles add only what they map to.
        assert_eq!(
            t.scopes.iter().collect::<Vec<_>>(),
            ["read:patient-profile", "read:vitals"]
        );
        assert_eq!(t.fingerprint, token::fingerprint("opaque-token"));
        // Nothing but `active`: no issuer, audience or expiry to refuse.
        let Outcome::Active(t) = judged(json!({"active": true})) else {
            panic!("refused")
        };
        assert_eq!(t.exp, i64::MAX);
        assert!(t.scopes.is_empty());

        let refused = |r| Outcome::Refused(r);
        assert_eq!(
            judged(json!({"active": true, "iss": "https://elsewhere"})),
            refused(Reason::UnknownIssuer)
        );
        assert_eq!(
            judged(json!({"active": true, "aud": "https://other.example"})),
            refused(Reason::WrongAudience)
        );
        assert_eq!(
            judged(json!({"active": true, "aud": []})),
            refused(Reason::WrongAudience)
        );
        // exp with the 60 s clock skew.
        assert!(matches!(
            judged(json!({"active": true, "exp": NOW - 60})),
            Outcome::Active(_)
        ));
        assert_eq!(
            judged(json!({"active": true, "exp": NOW - 61})),
            refused(Reason::Expired)
        );
        assert_eq!(
            judged(json!({"active": true, "nbf": NOW + 61})),
            refused(Reason::NotYetValid)
        );
        // Issuer first, then time, then audience, as for a JWT.
        assert_eq!(
            judged(json!({"active": true, "iss": "x", "exp": 1, "aud": "y"})),
            refused(Reason::UnknownIssuer)
        );
        assert_eq!(
            judged(json!({"active": true, "exp": 1, "aud": "y"})),
            refused(Reason::Expired)
        );
    }

    fn active(exp: i64) -> Outcome {
        Outcome::Active(Rc::new(VerifiedToken {
            exp,
            ..VerifiedToken::default()
        }))
    }

    #[test]
    fn cache_keeps_answers_for_cache_seconds_never_past_exp() {
        let mut c = IntrospectionCache::new(10);
        let (a, b, d, e) = (key("a"), key("b"), key("d"), key("e"));
        c.insert(a, active(NOW + 1000), NOW, 30);
        c.insert(b, active(NOW + 5), NOW, 30);
        c.insert(d, Outcome::Inactive, NOW, 30);
        c.insert(e, Outcome::Refused(Reason::WrongAudience), NOW, 30);
        for k in [&a, &b, &d, &e] {
            assert!(c.get(k, NOW).is_some());
        }
        assert_eq!(c.get(&d, NOW + 29), Some(Outcome::Inactive));
        assert_eq!(c.get(&d, NOW + 30), None, "inactive: cache_seconds");
        assert_eq!(c.get(&e, NOW + 30), None);
        // Time lifts "not yet valid": it decides only the waiting requests.
        c.insert(e, Outcome::Refused(Reason::NotYetValid), NOW, 30);
        assert!(c.get(&e, NOW).is_some());
        assert_eq!(c.get(&e, NOW + 1), None);
        assert!(c.get(&b, NOW + 4).is_some());
        assert_eq!(c.get(&b, NOW + 5), None, "never past exp");
        assert!(c.get(&a, NOW + 29).is_some());
        assert_eq!(c.get(&a, NOW + 30), None, "at most cache_seconds");
        assert_eq!(c.get(&key("never"), NOW), None);
        // An exp already past (within the skew) still serves this second.
        c.insert(a, active(NOW - 10), NOW, 30);
        assert!(c.get(&a, NOW).is_some());
        assert_eq!(c.get(&a, NOW + 1), None);
        let mut off = IntrospectionCache::new(0);
        off.insert(a, Outcome::Inactive, NOW, 30);
        assert!(off.is_empty());
    }

    #[test]
    fn cache_is_bounded_first_in_first_out() {
        let mut c = IntrospectionCache::new(3);
        let k = |i: u32| key(&i.to_string());
        for i in 0..3 {
            c.insert(k(i), Outcome::Inactive, NOW, 30);
        }
        // Answered again: one entry, and it counts as new.
        c.insert(k(0), active(NOW + 100), NOW, 30);
        assert_eq!(c.len(), 3);
        c.insert(k(3), Outcome::Inactive, NOW, 30);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&k(1), NOW), None, "the oldest went");
        assert!(c.get(&k(0), NOW).is_some() && c.get(&k(3), NOW).is_some());
        // Many answers later the bound holds, and so does the order's.
        for i in 0..1000 {
            c.insert(k(i % 5), Outcome::Inactive, NOW, 30);
            assert!(c.len() <= 3 && c.order.len() <= 3 * 2 + 16 + 1);
        }
        for i in 0..1000 {
            c.insert(k(1000 + i), Outcome::Inactive, NOW, 30);
        }
        assert_eq!(c.len(), 3);
        assert!(c.get(&k(1999), NOW).is_some());
    }
}
