//! Bearer extraction (RFC 6750 §2.1) and one token's checks, in Envoy
//! jwt_authn's order: parse, header, issuer, time, audience, key, signature.
//! An `UntrustedToken` becomes a [`VerifiedToken`] only here.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use jwt_compact::{Claims, UntrustedToken};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::answer::Reason;
use crate::binding::{Cnf, Scheme};
use crate::config::{Policy, Provider};
use crate::crypto::{self, Alg};
use crate::jwks::{KeyMiss, KeySet};
use crate::rules::GrantedScopes;

/// Largest `Authorization` header value accepted.
pub const MAX_AUTHORIZATION_BYTES: usize = 8 * 1024;

/// The bearer token of a request, if it carries exactly one.
///
/// `values` are all `Authorization` header values. Another scheme (Basic,
/// say) is no bearer token. Two headers, a header over 8 KiB, or a
/// credential with a space in it are refused as `invalid_request`: a request
/// that could be read two ways is not read at all.
pub fn extract_bearer<'a>(values: &[&'a str]) -> Result<Option<&'a str>, Reason> {
    Ok(extract_credentials(values)?
        .filter(|(scheme, _)| *scheme == Scheme::Bearer)
        .map(|(_, token)| token))
}

/// The access token of a request and its scheme: `Bearer` (RFC 6750) or
/// `DPoP` (RFC 9449 §7.1), read as [`extract_bearer`] reads a bearer token.
pub fn extract_credentials<'a>(values: &[&'a str]) -> Result<Option<(Scheme, &'a str)>, Reason> {
    let value = match values {
        [] => return Ok(None),
        [one] => *one,
        _ => return Err(Reason::InvalidRequest),
    };
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(Reason::InvalidRequest);
    }
    // Byte-wise: `str` pattern methods decode UTF-8 char by char, slow in wasm
    // on a kilobyte token. Every byte tested is ASCII, so splits stay on
    // char boundaries.
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let value = value.trim_matches([' ', '\t']);
    let Some(at) = value.bytes().position(|b| blank(&b)) else {
        return Ok(None);
    };
    let (scheme, rest) = value.split_at(at);
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else {
        return Ok(None);
    };
    let token = rest.trim_start_matches([' ', '\t']);
    if token.is_empty() {
        return Ok(None);
    }
    if token.bytes().any(|b| blank(&b) || b == b',') {
        return Err(Reason::InvalidRequest);
    }
    Ok(Some((scheme, token)))
}

/// Whether `token` has the shape of a JWS in compact serialisation: three
/// dot-separated parts. Anything else is opaque (a JWE has five).
pub fn is_jws_compact(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// SHA-256 of any bytes (tells whether a JWKS document changed).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A short fingerprint of a token (first 16 hex digits of its SHA-256), to
/// correlate audit records of one token without ever logging it.
pub fn fingerprint(token: &str) -> String {
    crate::audit::hex(
        Sha256::digest(token.as_bytes())
            .get(..8)
            .unwrap_or_default(),
    )
}

/// What phi-guard keeps of a token whose signature and issuer checked out:
/// only what later checks and the audit record need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifiedToken {
    pub provider: usize,
    pub sub: Option<String>,
    pub client_id: Option<String>,
    pub azp: Option<String>,
    pub jti: Option<String>,
    pub acr: Option<String>,
    pub amr: Vec<String>,
    pub auth_time: Option<i64>,
    pub exp: i64,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
    pub scopes: GrantedScopes,
    /// The SMART launch patient: the claim the policy's `fhir.launch_claim`
    /// names, when it holds a FHIR id.
    pub patient: Option<String>,
    /// [`fingerprint`] of the token, computed once: SHA-256 costs about 5 µs
    /// per token in V8, too much to pay again on every cache hit.
    pub fingerprint: String,
    /// The version of the revocation list that last found this token
    /// clean (0: none): a cached token is not looked up again until the
    /// list changes.
    pub revocation_checked: std::cell::Cell<u64>,
    /// What the token is bound to (RFC 8705, RFC 9449), if anything.
    pub cnf: Option<Cnf>,
    /// Names (never values) of the forbidden claims it carries.
    pub phi_claims: Vec<String>,
}

/// The header members phi-guard reads besides `alg`, `kid` and `typ`.
#[derive(Deserialize, Clone, Debug, Default)]
struct HeaderExt {
    crit: Option<serde::de::IgnoredAny>,
}

/// A string or an array of strings (`aud`, `scp`).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, many): (Option<&str>, &[String]) = match self {
            OneOrMany::One(s) => (Some(s.as_str()), &[]),
            OneOrMany::Many(v) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter().map(String::as_str))
    }
}

/// The claims phi-guard reads. `exp`, `nbf`, `iat` are jwt-compact's.
#[derive(Deserialize, Debug)]
struct RawClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<OneOrMany>,
    scope: Option<String>,
    scp: Option<OneOrMany>,
    client_id: Option<String>,
    azp: Option<String>,
    jti: Option<String>,
    acr: Option<String>,
    amr: Option<Vec<String>>,
    auth_time: Option<i64>,
    cnf: Option<Cnf>,
    /// Everything else; read only for the configured roles claim and the
    /// names of forbidden claims.
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

/// Why a token could not be verified right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unverified {
    /// Refused for good.
    Refused(Reason),
    /// The provider has no usable keys: wait for a fetch, or answer 503.
    NoKeys { provider: usize },
    /// No key has the token's `kid`: a refetch may bring it.
    UnknownKid { provider: usize },
}

impl From<Reason> for Unverified {
    fn from(r: Reason) -> Self {
        Unverified::Refused(r)
    }
}

/// Verifies `token` against the policy's providers, at Unix time `now`.
///
/// `keys(provider)` gives the provider's usable keys, if any.
pub fn verify<'k>(
    policy: &Policy,
    keys: &dyn Fn(usize) -> Option<&'k KeySet>,
    token: &str,
    now: i64,
) -> Result<VerifiedToken, Unverified> {
    verify_within_budget(policy, keys, token, now, true)
}

/// [`verify`], except that a token that gets as far as its signature is
/// refused with `VerificationRateLimited`, unchecked, when `budget_left` is
/// false: every cheaper check still runs and keeps its precise reason.
pub fn verify_within_budget<'k>(
    policy: &Policy,
    keys: &dyn Fn(usize) -> Option<&'k KeySet>,
    token: &str,
    now: i64,
    budget_left: bool,
) -> Result<VerifiedToken, Unverified> {
    let untrusted: UntrustedToken<'_, HeaderExt> =
        UntrustedToken::try_from(token).map_err(|_| Reason::Malformed)?;
    let header = untrusted.header();
    if header.other_fields.crit.is_some() {
        // phi-guard understands no extension, so any `crit` is unknown (RFC 7515 §4.1.11).
        return Err(Reason::UnsupportedCrit.into());
    }
    let alg = Alg::from_name(untrusted.algorithm()).ok_or(Reason::AlgNotAllowed)?;
    let claims: Claims<RawClaims> = untrusted
        .deserialize_claims_unchecked()
        .map_err(|_| Reason::Malformed)?;
    let iss = claims.custom.iss.as_deref().ok_or(Reason::UnknownIssuer)?;
    let (index, provider) = policy
        .provider_for_issuer(iss)
        .ok_or(Reason::UnknownIssuer)?;
    if !provider.algorithms.contains(&alg) {
        return Err(Reason::AlgNotAllowed.into());
    }
    check_type(provider, header.token_type.as_deref())?;

    let exp = claims.expiration.ok_or(Reason::MissingExp)?.timestamp();
    let nbf = claims.not_before.map(|t| t.timestamp());
    let iat = claims.issued_at.map(|t| t.timestamp());
    check_times(policy, exp, nbf, iat, now)?;
    let start = iat.or(nbf).unwrap_or(now);
    if exp.saturating_sub(start) > to_i64(policy.max_token_lifetime) {
        return Err(Reason::LifetimeTooLong.into());
    }
    let audience_ok = claims.custom.aud.as_ref().is_some_and(|aud| {
        aud.iter()
            .any(|a| provider.audiences.iter().any(|x| x == a))
    });
    if !audience_ok {
        return Err(Reason::WrongAudience.into());
    }

    let set = keys(index).ok_or(Unverified::NoKeys { provider: index })?;
    let candidates = set
        .select(header.key_id.as_deref(), alg)
        .map_err(|miss| match miss {
            KeyMiss::UnknownKid if header.key_id.is_some() => {
                Unverified::UnknownKid { provider: index }
            }
            KeyMiss::UnknownKid => Unverified::Refused(Reason::UnknownKey),
            KeyMiss::AlgMismatch => Unverified::Refused(Reason::AlgNotAllowed),
        })?;
    if !budget_left {
        return Err(Reason::VerificationRateLimited.into());
    }
    let signed = token.rsplit_once('.').map_or("", |(signed, _)| signed);
    let signature = untrusted.signature_bytes();
    if !candidates
        .iter()
        .any(|k| crypto::verify_signature(alg, &k.key, signed.as_bytes(), signature))
    {
        return Err(Reason::InvalidSignature.into());
    }

    let c = claims.custom;
    let roles = role_scopes(policy, &c.other);
    let phi_claims = policy
        .forbidden_claims
        .iter()
        .filter(|name| c.other.contains_key(name.as_str()))
        .cloned()
        .collect();
    let scp: Vec<String> = c
        .scp
        .as_ref()
        .map_or_else(Vec::new, |s| s.iter().map(str::to_owned).collect());
    Ok(VerifiedToken {
        provider: index,
        scopes: GrantedScopes::new(
            c.scope.as_deref(),
            &scp,
            &roles,
            policy.deny_wildcard_scopes,
        ),
        patient: launch_patient(policy, &c.other),
        sub: c.sub,
        client_id: c.client_id,
        azp: c.azp,
        jti: c.jti,
        acr: c.acr,
        amr: c.amr.unwrap_or_default(),
        auth_time: c.auth_time,
        exp,
        nbf,
        iat,
        fingerprint: fingerprint(token),
        revocation_checked: Default::default(),
        cnf: c.cnf,
        phi_claims,
    })
}

fn check_type(provider: &Provider, typ: Option<&str>) -> Result<(), Reason> {
    if provider.token_types.is_empty() {
        return Ok(());
    }
    // RFC 9068 §4: compare without the optional "application/" prefix, any case.
    let typ = typ.ok_or(Reason::BadType)?.to_ascii_lowercase();
    let typ = typ.strip_prefix("application/").unwrap_or(&typ);
    if provider.token_types.iter().any(|t| t == typ) {
        Ok(())
    } else {
        Err(Reason::BadType)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `exp`, `nbf` and `iat` against `now`, with the configured clock skew.
/// Run again on every cache hit, since a cached token ages.
pub fn check_times(
    policy: &Policy,
    exp: i64,
    nbf: Option<i64>,
    iat: Option<i64>,
    now: i64,
) -> Result<(), Reason> {
    let skew = to_i64(policy.clock_skew);
    if now > exp.saturating_add(skew) {
        return Err(Reason::Expired);
    }
    let future = |t: Option<i64>| t.is_some_and(|t| t > now.saturating_add(skew));
    if future(nbf) || future(iat) {
        return Err(Reason::NotYetValid);
    }
    Ok(())
}

/// The scopes the configured roles add; a role not in `role_scopes` adds nothing.
pub(crate) fn role_scopes(
    policy: &Policy,
    other: &BTreeMap<String, serde_json::Value>,
) -> Vec<String> {
    let Some(claim) = policy.roles_claim.as_deref() else {
        return Vec::new();
    };
    let roles: Vec<&str> = match other.get(claim) {
        Some(serde_json::Value::String(s)) => s.split(' ').collect(),
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    roles
        .into_iter()
        .filter_map(|r| policy.role_scopes.get(r))
        .flatten()
        .cloned()
        .collect()
}

/// The launch patient a token names in the claim `fhir.launch_claim`
/// (none without a `fhir` block, or when the claim is not a FHIR id).
pub(crate) fn launch_patient(
    policy: &Policy,
    other: &BTreeMap<String, serde_json::Value>,
) -> Option<String> {
    let claim = &policy.fhir.as_ref()?.launch_claim;
    match other.get(claim) {
        Some(serde_json::Value::String(id)) if crate::fhir::request::is_id(id) => Some(id.clone()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Verified-token cache

/// Verified tokens, bounded, per worker.
///
/// Keyed by the token's exact bytes, as Envoy's jwt_authn cache is: a hit
/// needs a byte-for-byte equal token, and looking it up costs a SipHash
/// rather than the ~5 µs a SHA-256 of the token takes in V8. Memory per
/// entry is the token's length plus its [`VerifiedToken`].
///
/// Eviction is CLOCK (second chance), an O(1) approximation of LRU: a hit
/// marks its slot; when the cache is full the hand sweeps the slots,
/// unmarking marked ones, and evicts the first unmarked one. Unlike a
/// two-generation scheme it holds `capacity` tokens even when they are used
/// round robin, which is how many clients share one gateway.
#[derive(Debug, Default)]
pub struct TokenCache {
    capacity: usize,
    /// Token -> its slot.
    index: HashMap<Rc<str>, usize>,
    slots: Vec<Slot>,
    hand: usize,
    /// [`entry_bytes`] summed over the slots.
    bytes: usize,
}

#[derive(Debug)]
struct Slot {
    token: Rc<str>,
    verified: Rc<VerifiedToken>,
    used: bool,
}

/// About what one entry costs: the token, the claims kept, the table slot.
fn entry_bytes(token_len: usize, v: &VerifiedToken) -> usize {
    let strings = [&v.sub, &v.client_id, &v.azp, &v.jti, &v.acr, &v.patient]
        .into_iter()
        .flatten()
        .chain(&v.amr)
        .map(String::len)
        .sum::<usize>();
    let scopes = v.scopes.iter().map(|s| s.len() + 24).sum::<usize>();
    token_len
        + strings
        + scopes
        + v.fingerprint.len()
        + std::mem::size_of::<VerifiedToken>()
        + std::mem::size_of::<Slot>()
        + 64
}

impl TokenCache {
    /// A cache of at most `capacity` tokens; `0` caches nothing.
    pub fn new(capacity: usize) -> Self {
        TokenCache {
            capacity,
            ..TokenCache::default()
        }
    }

    /// The verified token for `token`, if cached. The caller checks its
    /// times again: a cached token ages.
    pub fn get(&mut self, token: &str) -> Option<Rc<VerifiedToken>> {
        let at = *self.index.get(token)?;
        let slot = self.slots.get_mut(at)?;
        slot.used = true;
        Some(Rc::clone(&slot.verified))
    }

    /// Remembers a verified token, evicting one if full.
    pub fn insert(&mut self, token: &str, verified: Rc<VerifiedToken>) {
        if self.capacity == 0 {
            return;
        }
        let bytes = entry_bytes(token.len(), &verified);
        if let Some(slot) = self.index.get(token).and_then(|&at| self.slots.get_mut(at)) {
            self.bytes = self.bytes + bytes - entry_bytes(token.len(), &slot.verified);
            slot.verified = verified;
            slot.used = true;
            return;
        }
        let token: Rc<str> = Rc::from(token);
        let fresh = Slot {
            token: Rc::clone(&token),
            verified,
            used: false,
        };
        self.bytes += bytes;
        if self.slots.len() < self.capacity {
            self.index.insert(token, self.slots.len());
            self.slots.push(fresh);
            return;
        }
        // Two sweeps at most: the first unmarks every slot it passes.
        for _ in 0..2 * self.slots.len() {
            let at = self.hand;
            self.hand = (at + 1) % self.slots.len();
            let Some(slot) = self.slots.get_mut(at) else {
                break;
            };
            if slot.used {
                slot.used = false;
                continue;
            }
            let old = std::mem::replace(slot, fresh);
            self.index.remove(&old.token);
            self.bytes = self
                .bytes
                .saturating_sub(entry_bytes(old.token.len(), &old.verified));
            self.index.insert(token, at);
            return;
        }
    }

    /// Forgets every token of `provider` (its key set changed).
    pub fn forget_provider(&mut self, provider: usize) {
        self.slots.retain(|s| s.verified.provider != provider);
        self.index = self
            .slots
            .iter()
            .enumerate()
            .map(|(at, s)| (Rc::clone(&s.token), at))
            .collect();
        self.bytes = self
            .slots
            .iter()
            .map(|s| entry_bytes(s.token.len(), &s.verified))
            .sum();
        self.hand = 0;
    }

    /// How many tokens are held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// About how much memory the entries take (tokens, claims, table slots).
    pub fn approx_bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    #[test]
    fn bearer_extraction() {
        assert_eq!(extract_bearer(&[]), Ok(None));
        assert_eq!(extract_bearer(&["Bearer abc"]), Ok(Some("abc")));
        assert_eq!(extract_bearer(&["bEaReR   abc  "]), Ok(Some("abc")));
        assert_eq!(extract_bearer(&["Basic dXNlcjpwdw=="]), Ok(None));
        assert_eq!(extract_bearer(&["Bearer"]), Ok(None));
        assert_eq!(extract_bearer(&["Bearer "]), Ok(None));
        assert_eq!(extract_bearer(&["Bearerabc"]), Ok(None));
        assert_eq!(
            extract_bearer(&["Bearer a", "Bearer b"]),
            Err(Reason::InvalidRequest)
        );
        assert_eq!(extract_bearer(&["Bearer a b"]), Err(Reason::InvalidRequest));
        assert_eq!(
            extract_bearer(&["Bearer a,Bearer b"]),
            Err(Reason::InvalidRequest)
        );
        let big = format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION_BYTES));
        assert_eq!(extract_bearer(&[big.as_str()]), Err(Reason::InvalidRequest));
    }

    #[test]
    fn every_family_verifies() {
        let kit = Kit::new();
        let policy = kit.policy(&[]);
        for signer in kit.signers() {
            let token = signer.sign(&kit.claims(), &[]);
            let v = verify(&policy, &|_| Some(&kit.keys), &token, NOW)
                .unwrap_or_else(|e| panic!("{}: {e:?}", signer.alg));
            assert_eq!(v.sub.as_deref(), Some("user-1"));
            assert!(v.scopes.has("read:patient-profile"));
        }
    }

    #[test]
    fn each_claim_rule_refuses() {
        let kit = Kit::new();
        let policy = kit.policy(&[]);
        let keys = |_: usize| Some(&kit.keys);
        let rs = &kit.rs256;
        let check = |claims: serde_json::Value, header: &[(&str, serde_json::Value)]| {
            verify(&policy, &keys, &rs.sign(&claims, header), NOW)
        };
        let with = |k: &str, v: serde_json::Value| {
            let mut c = kit.claims();
            c[k] = v;
            c
        };
        let without = |k: &str| {
            let mut c = kit.claims();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        let refused = |r| Err(Unverified::Refused(r));
        assert_eq!(
            check(with("iss", "https://evil".into()), &[]),
            refused(Reason::UnknownIssuer)
        );
        assert_eq!(check(without("iss"), &[]), refused(Reason::UnknownIssuer));
        assert_eq!(
            check(with("aud", "other".into()), &[]),
            refused(Reason::WrongAudience)
        );
        assert_eq!(check(without("aud"), &[]), refused(Reason::WrongAudience));
        assert!(check(with("aud", serde_json::json!(["x", AUD])), &[]).is_ok());
        assert_eq!(check(without("exp"), &[]), refused(Reason::MissingExp));
        // Expiry and not-before, at the skew boundary (60 s).
        assert!(check(with("exp", (NOW - 60).into()), &[]).is_ok());
        assert_eq!(
            check(with("exp", (NOW - 61).into()), &[]),
            refused(Reason::Expired)
        );
        assert!(check(with("nbf", (NOW + 60).into()), &[]).is_ok());
        assert_eq!(
            check(with("nbf", (NOW + 61).into()), &[]),
            refused(Reason::NotYetValid)
        );
        assert_eq!(
            check(with("iat", (NOW + 61).into()), &[]),
            refused(Reason::NotYetValid)
        );
        // Lifetime: exp - iat at most 3600.
        let mut long = kit.claims();
        long["iat"] = NOW.into();
        long["exp"] = (NOW + 3601).into();
        assert_eq!(check(long, &[]), refused(Reason::LifetimeTooLong));
        assert_eq!(
            check(with("exp", "soon".into()), &[]),
            refused(Reason::Malformed)
        );
        // Header rules.
        assert_eq!(
            check(kit.claims(), &[("typ", "id+jwt".into())]),
            refused(Reason::BadType)
        );
        assert!(check(kit.claims(), &[("typ", "application/AT+JWT".into())]).is_ok());
        assert!(check(kit.claims(), &[("typ", "JWT".into())]).is_ok());
        assert_eq!(
            check(kit.claims(), &[("crit", serde_json::json!(["exp"]))]),
            refused(Reason::UnsupportedCrit)
        );
        assert_eq!(
            check(kit.claims(), &[("kid", "nobody".into())]),
            Err(Unverified::UnknownKid { provider: 0 })
        );
        assert_eq!(
            verify(&policy, &|_| None, &rs.sign(&kit.claims(), &[]), NOW),
            Err(Unverified::NoKeys { provider: 0 })
        );
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        let kit = Kit::new();
        let policy = kit.policy(&[]);
        let keys = |_: usize| Some(&kit.keys);
        let refused = |r| Err(Unverified::Refused(r));
        let body = kit.claims().to_string();
        // alg none, with and without a signature.
        for sig in ["", "c2ln"] {
            let t = raw_token(
                &serde_json::json!({"alg": "none", "kid": kit.rs256.kid}),
                &body,
                sig,
            );
            assert_eq!(
                verify(&policy, &keys, &t, NOW),
                refused(Reason::AlgNotAllowed)
            );
        }
        // HS256 keyed with the RSA public key's bytes.
        let t = hs256_token(
            &serde_json::json!({"alg": "HS256", "kid": kit.rs256.kid, "typ": "at+jwt"}),
            &body,
            kit.rs256_public_der(),
        );
        assert_eq!(
            verify(&policy, &keys, &t, NOW),
            refused(Reason::AlgNotAllowed)
        );
        // An RS256 key (bound by JWK alg) asked to verify PS256.
        let t = kit.rs256.sign_as("PS256", &kit.claims());
        assert_eq!(
            verify(&policy, &keys, &t, NOW),
            refused(Reason::AlgNotAllowed)
        );
        // An ES256 token with the RSA key's kid.
        let t = kit
            .es256
            .sign(&kit.claims(), &[("kid", kit.rs256.kid.clone().into())]);
        assert_eq!(
            verify(&policy, &keys, &t, NOW),
            refused(Reason::AlgNotAllowed)
        );
        // Not on the provider's allow-list.
        let narrow =
            kit.policy_with(|p| p["providers"][0]["algorithms"] = serde_json::json!(["ES256"]));
        let t = kit.rs256.sign(&kit.claims(), &[]);
        assert_eq!(
            verify(&narrow, &keys, &t, NOW),
            refused(Reason::AlgNotAllowed)
        );
        // A flipped signature bit.
        let t = flip_last_sig_char(&kit.es256.sign(&kit.claims(), &[]));
        assert_eq!(
            verify(&policy, &keys, &t, NOW),
            refused(Reason::InvalidSignature)
        );
        // Signed by another key under a known kid.
        let other = Signer::rsa("RS256", &kit.rs256.kid, 2);
        assert_eq!(
            verify(&policy, &keys, &other.sign(&kit.claims(), &[]), NOW),
            refused(Reason::InvalidSignature)
        );
        for junk in [
            "",
            "a.b",
            "a.b.c",
            "e30.e30.",
            "....",
            "\u{e9}.\u{e9}.\u{e9}",
        ] {
            assert!(
                matches!(
                    verify(&policy, &keys, junk, NOW),
                    Err(Unverified::Refused(_))
                ),
                "{junk}"
            );
        }
    }

    #[test]
    fn scopes_and_roles() {
        let kit = Kit::new();
        let policy = kit.policy_with(|p| {
            p["roles_claim"] = "roles".into();
            p["role_scopes"] = serde_json::json!({"clinician": ["read:labs"], "admin": ["x:all"]});
        });
        let keys = |_: usize| Some(&kit.keys);
        let mut claims = kit.claims();
        claims["scope"] = "a b read:all *".into();
        claims["scp"] = serde_json::json!(["c"]);
        claims["roles"] = serde_json::json!(["clinician", "nurse", "admin"]);
        let v = verify(&policy, &keys, &kit.es256.sign(&claims, &[]), NOW).unwrap();
        let got: Vec<&str> = v.scopes.iter().collect();
        assert_eq!(got, ["a", "b", "c", "read:labs"]);
    }

    #[test]
    fn launch_patient_from_the_fhir_launch_claim() {
        let kit = Kit::new();
        let keys = |_: usize| Some(&kit.keys);
        let fhir = |claim: Option<&str>| {
            kit.policy_with(|p| {
                let mut f = serde_json::json!({"base_path": "/fhir"});
                if let Some(c) = claim {
                    f["launch_claim"] = c.into();
                }
                p["fhir"] = f;
            })
        };
        let patient = |policy: &Policy, claims: &[(&str, serde_json::Value)]| {
            let mut c = kit.claims();
            for (k, v) in claims {
                c[*k] = v.clone();
            }
            verify(policy, &keys, &kit.es256.sign(&c, &[]), NOW)
                .unwrap()
                .patient
        };
        let default = fhir(None);
        assert_eq!(
            patient(&default, &[("patient", "123".into())]).as_deref(),
            Some("123")
        );
        assert_eq!(patient(&default, &[]), None);
        // Not a FHIR id: no patient (a reference, a number, a list, junk).
        for bad in [
            serde_json::json!("Patient/123"),
            serde_json::json!(123),
            serde_json::json!(["123"]),
            serde_json::json!(""),
            serde_json::json!("a b"),
        ] {
            assert_eq!(
                patient(&default, &[("patient", bad.clone())]),
                None,
                "{bad}"
            );
        }
        let named = fhir(Some("launch_patient"));
        let both = [("patient", "1".into()), ("launch_patient", "2".into())];
        assert_eq!(patient(&named, &both).as_deref(), Some("2"));
        // Without a fhir block no claim is a launch patient.
        assert_eq!(patient(&kit.policy(&[]), &both), None);
    }

    #[test]
    fn fingerprint_is_a_sha256_prefix() {
        assert_eq!(fingerprint("t"), "e3b98a4da31a127d");
    }

    /// A verified token to fill caches with.
    fn verified_es256() -> Rc<VerifiedToken> {
        let kit = Kit::new();
        let token = kit.es256.sign(&kit.claims(), &[]);
        Rc::new(verify(&kit.policy(&[]), &|_| Some(&kit.keys), &token, NOW).unwrap())
    }

    #[test]
    fn cache_is_bounded_and_keeps_recent_entries() {
        let v = verified_es256();
        let mut cache = TokenCache::new(4);
        let d = |i: u8| format!("token-{i}");
        for i in 0..4 {
            cache.insert(&d(i), Rc::clone(&v));
        }
        assert!(cache.len() <= 4);
        for round in 0..50u8 {
            assert!(
                cache.get(&d(0)).is_some(),
                "a hot entry survives (round {round})"
            );
            cache.insert(&d(100 + round), Rc::clone(&v));
            assert!(cache.len() <= 4);
        }
        assert!(cache.get(&d(1)).is_none());
        cache.forget_provider(0);
        assert!(cache.is_empty());
        assert_eq!(cache.approx_bytes(), 0);
        let mut off = TokenCache::new(0);
        off.insert(&d(1), v);
        assert!(off.is_empty());
    }

    /// `approx_bytes` (the token_cache.bytes gauge) against what the cache
    /// holds, measured from outside: never less than the bytes it keeps,
    /// one more byte per byte of token, the same per entry, freed on eviction
    /// and when the provider is forgotten.
    #[test]
    fn cache_bytes_follow_what_it_holds() {
        let v = verified_es256();
        let kept: usize = [&v.sub, &v.client_id, &v.azp, &v.jti, &v.acr]
            .into_iter()
            .flatten()
            .chain(&v.amr)
            .map(String::len)
            .sum::<usize>()
            + v.scopes.iter().map(str::len).sum::<usize>()
            + v.fingerprint.len();
        let token = |len: usize, i: usize| format!("{i:04}{}", "t".repeat(len - 4));
        let one = |len: usize| {
            let mut c = TokenCache::new(8);
            c.insert(&token(len, 0), Rc::clone(&v));
            c.approx_bytes()
        };
        let entry = one(600);
        // The token and the claims kept are in it; the rest is bounded overhead.
        assert!(entry >= 600 + kept, "{entry} < {}", 600 + kept);
        assert!(
            entry <= 600 + kept + 1024,
            "{entry}: more than 1 KiB overhead"
        );
        assert_eq!(
            one(700),
            entry + 100,
            "a longer token costs its extra bytes"
        );
        let mut cache = TokenCache::new(4);
        for i in 0..4 {
            cache.insert(&token(600, i), Rc::clone(&v));
            assert_eq!(cache.approx_bytes(), (i + 1) * entry);
        }
        // The same token again replaces its entry.
        cache.insert(&token(600, 2), Rc::clone(&v));
        assert_eq!(cache.approx_bytes(), 4 * entry);
        // Full: a newcomer evicts one; a longer one adds only its extra bytes.
        cache.insert(&token(650, 9), Rc::clone(&v));
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.approx_bytes(), 4 * entry + 50);
        cache.forget_provider(1);
        assert_eq!(
            cache.approx_bytes(),
            4 * entry + 50,
            "another provider's tokens stay"
        );
        cache.forget_provider(0);
        assert_eq!((cache.len(), cache.approx_bytes()), (0, 0));
        let mut off = TokenCache::new(0);
        off.insert(&token(600, 0), Rc::clone(&v));
        assert_eq!(off.approx_bytes(), 0);
    }

    #[test]
    fn cache_holds_capacity_tokens_used_round_robin() {
        let v = verified_es256();
        let mut cache = TokenCache::new(100);
        let d = |i: usize| format!("token-{i}");
        for i in 0..100 {
            cache.insert(&d(i), Rc::clone(&v));
        }
        for round in 0..3 {
            for i in 0..100 {
                assert!(cache.get(&d(i)).is_some(), "token {i}, round {round}");
            }
        }
        // Full: a newcomer evicts exactly one, and is then found.
        cache.insert("newcomer", Rc::clone(&v));
        assert_eq!(cache.len(), 100);
        assert!(cache.get("newcomer").is_some());
        assert_eq!((0..100).filter(|&i| cache.get(&d(i)).is_none()).count(), 1);
    }
}
