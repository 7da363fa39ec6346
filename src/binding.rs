//! Sender-constrained tokens: a token bound to a client certificate (RFC 8705
//! §3, `cnf.x5t#S256`) or to a DPoP key (RFC 9449, `cnf.jkt`) works only for
//! the client that holds that certificate or key. A leaked bearer token
//! works for anyone; a leaked bound one for no one else.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_compact::UntrustedToken;
use serde::Deserialize;

use crate::answer::Reason;
use crate::crypto::{self, Alg};
use crate::jwks;
use crate::token::sha256;

/// The `cnf` claim's members phi-guard understands (RFC 7800).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Cnf {
    /// SHA-256 of the client certificate (DER), base64url.
    #[serde(rename = "x5t#S256", default)]
    pub x5t_s256: Option<String>,
    /// RFC 7638 SHA-256 thumbprint of the DPoP key, base64url.
    #[serde(default)]
    pub jkt: Option<String>,
}

/// How a request proved it holds what its token is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    Mtls,
    Dpop,
}

impl Binding {
    /// The audit record's `binding`.
    pub fn code(self) -> &'static str {
        match self {
            Binding::Mtls => "mtls",
            Binding::Dpop => "dpop",
        }
    }
}

/// The `Authorization` scheme the token came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Bearer,
    Dpop,
}

/// What a request offers as proof of possession.
pub struct Presented<'a> {
    pub scheme: Scheme,
    /// Every `DPoP` header value.
    pub dpop: &'a [&'a str],
    /// The request as the client addressed it: `:method`, `:scheme`,
    /// `:authority` and `:path` (query included; ignored here).
    pub method: &'a str,
    pub url_scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// The access token itself (its hash is the proof's `ath`).
    pub token: &'a str,
    /// SHA-256 of the client certificate, lower-case hex, from Envoy's
    /// `connection.sha256_peer_certificate_digest`; asked for only when a
    /// token is certificate-bound.
    pub peer_cert: &'a dyn Fn() -> Option<String>,
}

/// The rules a DPoP proof is held to.
pub struct ProofRules<'a> {
    /// Asymmetric algorithms the proof may use (the provider's allow-list).
    pub algorithms: &'a [Alg],
    pub max_age_seconds: u64,
    pub clock_skew: u64,
    pub now: i64,
    /// Records a proof's `jti` (a digest of it) until `until`; `false` if it
    /// was seen before: a replay. Shared by every worker of the Envoy.
    pub first_use: &'a dyn Fn(&[u8; 32], i64) -> bool,
}

/// A DPoP proof's first use, once per request: `accepted` holds the proof
/// this request already had accepted, so deciding the same request again
/// (after a wait, or with its body) is not a replay; `record` asks the
/// shared replay store for any other proof.
pub fn first_use_once(
    accepted: &std::cell::Cell<Option<[u8; 32]>>,
    digest: &[u8; 32],
    record: impl FnOnce() -> bool,
) -> bool {
    if accepted.get().as_ref() == Some(digest) {
        return true;
    }
    let first = record();
    if first {
        accepted.set(Some(*digest));
    }
    first
}

/// Checks that `presented` proves possession of what `cnf` binds the token
/// to; a bearer token (no binding) passes unless the rule demands one.
pub fn check(
    cnf: Option<&Cnf>,
    presented: &Presented<'_>,
    rules: &ProofRules<'_>,
    require_binding: bool,
) -> Result<Option<Binding>, Reason> {
    let cnf = cnf.filter(|c| c.jkt.is_some() || c.x5t_s256.is_some());
    let Some(cnf) = cnf else {
        // RFC 9449 §7.1: the DPoP scheme is for DPoP-bound tokens only.
        if presented.scheme == Scheme::Dpop {
            return Err(Reason::CnfMismatch);
        }
        return if require_binding {
            Err(Reason::SenderConstraintRequired)
        } else {
            Ok(None)
        };
    };
    if let Some(jkt) = &cnf.jkt {
        // A DPoP-bound token sent as a bearer token is refused (RFC 9449 §7.2).
        if presented.scheme != Scheme::Dpop {
            return Err(Reason::CnfMismatch);
        }
        check_proof(jkt, presented, rules)?;
        return Ok(Some(Binding::Dpop));
    }
    if presented.scheme == Scheme::Dpop {
        return Err(Reason::CnfMismatch);
    }
    if let Some(x5t) = &cnf.x5t_s256 {
        let want = URL_SAFE_NO_PAD
            .decode(x5t.trim_end_matches('='))
            .map_err(|_| Reason::CnfMismatch)?;
        let got = (presented.peer_cert)().and_then(|hex| decode_hex(&hex));
        if got.as_deref() != Some(want.as_slice()) || want.len() != 32 {
            return Err(Reason::CnfMismatch);
        }
        return Ok(Some(Binding::Mtls));
    }
    Err(Reason::CnfMismatch)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            let pair = hex.get(i..i + 2)?;
            if !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
}

/// Header members of a DPoP proof besides `alg` and `typ`.
#[derive(Deserialize, Clone, Debug, Default)]
struct ProofHeader {
    jwk: Option<serde_json::Value>,
}

#[derive(Deserialize, Debug)]
struct ProofClaims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    ath: Option<String>,
}

/// Longest DPoP proof read (a proof with an RSA key is about 1.5 KiB).
const MAX_PROOF_BYTES: usize = 8 * 1024;

/// RFC 9449 §4.3, for a proof sent with an access token to a resource.
fn check_proof(jkt: &str, p: &Presented<'_>, rules: &ProofRules<'_>) -> Result<(), Reason> {
    let bad = Reason::InvalidDpopProof;
    // Exactly one DPoP header, holding a JWT.
    let [proof] = p.dpop else {
        return Err(bad);
    };
    if proof.len() > MAX_PROOF_BYTES {
        return Err(bad);
    }
    let untrusted: UntrustedToken<'_, ProofHeader> =
        UntrustedToken::try_from(*proof).map_err(|_| bad)?;
    let header = untrusted.header();
    if !header
        .token_type
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("dpop+jwt"))
    {
        return Err(bad);
    }
    // Asymmetric, on the allow-list (never `none` or HMAC: `Alg` has neither).
    let alg = Alg::from_name(untrusted.algorithm()).ok_or(bad)?;
    if !rules.algorithms.contains(&alg) {
        return Err(bad);
    }
    let jwk = header.other_fields.jwk.as_ref().ok_or(bad)?;
    let (key, thumbprint) = jwks::client_key(jwk).map_err(|_| bad)?;
    if key.kind() != alg.key_kind() {
        return Err(bad);
    }
    let signed = proof.rsplit_once('.').map_or("", |(signed, _)| signed);
    if !crypto::verify_signature(alg, &key, signed.as_bytes(), untrusted.signature_bytes()) {
        return Err(bad);
    }
    let claims = untrusted
        .deserialize_claims_unchecked::<ProofClaims>()
        .map_err(|_| bad)?;
    let iat = claims.issued_at.ok_or(bad)?.timestamp();
    let c = claims.custom;
    let jti = c.jti.filter(|j| !j.is_empty()).ok_or(bad)?;
    if c.htm.as_deref() != Some(p.method) {
        return Err(bad);
    }
    if !htu_matches(c.htu.as_deref().ok_or(bad)?, p) {
        return Err(bad);
    }
    let skew = i64::try_from(rules.clock_skew).unwrap_or(i64::MAX);
    let max_age = i64::try_from(rules.max_age_seconds).unwrap_or(i64::MAX);
    if iat > rules.now.saturating_add(skew)
        || rules.now.saturating_sub(iat) > max_age.saturating_add(skew)
    {
        return Err(bad);
    }
    let ath = URL_SAFE_NO_PAD.encode(sha256(p.token.as_bytes()));
    if c.ath.as_deref() != Some(ath.as_str()) {
        return Err(bad);
    }
    // The key the token is bound to, after the proof showed it holds it.
    if thumbprint != jkt.trim_end_matches('=') {
        return Err(Reason::CnfMismatch);
    }
    // Replays last checked: a proof is spent only once it is otherwise good.
    let until = iat.saturating_add(max_age).saturating_add(skew);
    if !(rules.first_use)(&sha256(jti.as_bytes()), until) {
        return Err(Reason::DpopReplay);
    }
    Ok(())
}

/// `htu` names the request's URL, query and fragment aside (RFC 9449 §4.3),
/// after syntax-based normalisation (RFC 3986 §6.2.2): scheme and host in
/// any case, a default port written or not.
fn htu_matches(htu: &str, p: &Presented<'_>) -> bool {
    let htu = htu.split(['?', '#']).next().unwrap_or("");
    let Some((scheme, rest)) = htu.split_once("://") else {
        return false;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let request_path = p.path.split(['?', '#']).next().unwrap_or("");
    scheme.eq_ignore_ascii_case(p.url_scheme)
        && normal_authority(authority, scheme) == normal_authority(p.authority, p.url_scheme)
        && path == request_path
}

/// Lower-case host, the scheme's default port dropped.
fn normal_authority(authority: &str, scheme: &str) -> String {
    let lower = authority.to_ascii_lowercase();
    let default = if scheme.eq_ignore_ascii_case("https") {
        ":443"
    } else if scheme.eq_ignore_ascii_case("http") {
        ":80"
    } else {
        return lower;
    };
    lower
        .strip_suffix(default)
        .map_or(lower.clone(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Signer;
    use serde_json::{json, Value};
    use std::cell::RefCell;
    use std::collections::HashSet;

    const NOW: i64 = 1_700_000_000;
    const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln";

    fn presented<'a>(
        scheme: Scheme,
        dpop: &'a [&'a str],
        cert: &'a dyn Fn() -> Option<String>,
    ) -> Presented<'a> {
        Presented {
            scheme,
            dpop,
            method: "GET",
            url_scheme: "https",
            authority: "fhir.example.org",
            path: "/fhir/Patient/7?_elements=id",
            token: TOKEN,
            peer_cert: cert,
        }
    }

    /// A DPoP proof from `signer`, with `edit` applied to its claims.
    fn proof(signer: &Signer, edit: impl FnOnce(&mut Value)) -> String {
        let mut claims = json!({
            "jti": format!("jti-{}", rand::random::<u64>()),
            "htm": "GET",
            "htu": "https://fhir.example.org/fhir/Patient/7",
            "iat": NOW,
            "ath": URL_SAFE_NO_PAD.encode(sha256(TOKEN.as_bytes())),
        });
        edit(&mut claims);
        signer.sign(
            &claims,
            &[("typ", json!("dpop+jwt")), ("jwk", signer.jwk())],
        )
    }

    struct Seen(RefCell<HashSet<[u8; 32]>>);

    impl Seen {
        fn new() -> Seen {
            Seen(RefCell::new(HashSet::new()))
        }
        fn first_use(&self) -> impl Fn(&[u8; 32], i64) -> bool + '_ {
            |jti, _| self.0.borrow_mut().insert(*jti)
        }
    }

    fn rules<'a>(first_use: &'a dyn Fn(&[u8; 32], i64) -> bool) -> ProofRules<'a> {
        ProofRules {
            algorithms: &[Alg::Es256, Alg::Rs256, Alg::EdDsa],
            max_age_seconds: 60,
            clock_skew: 5,
            now: NOW,
            first_use,
        }
    }

    fn jkt(signer: &Signer) -> Cnf {
        let (_, thumbprint) = jwks::client_key(&signer.jwk()).unwrap();
        Cnf {
            jkt: Some(thumbprint),
            x5t_s256: None,
        }
    }

    #[test]
    fn rfc7638_thumbprint_of_the_rfc_example_key() {
        let jwk = json!({"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        let (_, t) = jwks::client_key(&jwk).unwrap();
        assert_eq!(t, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        let mut private = jwk.clone();
        private["d"] = json!("AQAB");
        assert!(jwks::client_key(&private).is_err());
    }

    #[test]
    fn a_valid_proof_binds_once_and_never_twice() {
        let signer = Signer::es256("dpop", 7);
        let cnf = jkt(&signer);
        let seen = Seen::new();
        let first = seen.first_use();
        let no_cert = || None;
        let p = proof(&signer, |_| {});
        let dpop = [p.as_str()];
        let r = rules(&first);
        assert_eq!(
            check(
                Some(&cnf),
                &presented(Scheme::Dpop, &dpop, &no_cert),
                &r,
                false
            ),
            Ok(Some(Binding::Dpop))
        );
        assert_eq!(
            check(
                Some(&cnf),
                &presented(Scheme::Dpop, &dpop, &no_cert),
                &r,
                false
            ),
            Err(Reason::DpopReplay)
        );
    }

    #[test]
    fn every_broken_proof_is_refused() {
        let signer = Signer::es256("dpop", 7);
        let other = Signer::es256("other", 8);
        let cnf = jkt(&signer);
        let seen = Seen::new();
        let first = seen.first_use();
        let r = rules(&first);
        let no_cert = || None;
        let hs256 = {
            // An HMAC proof keyed with the public key: never acceptable.
            let good = proof(&signer, |_| {});
            let (_, rest) = good.split_once('.').unwrap();
            let head = URL_SAFE_NO_PAD.encode(
                json!({"alg": "HS256", "typ": "dpop+jwt", "jwk": signer.jwk()}).to_string(),
            );
            format!("{head}.{rest}")
        };
        let none = {
            let good = proof(&signer, |_| {});
            let mut parts = good.split('.');
            let _ = parts.next();
            let body = parts.next().unwrap();
            let head = URL_SAFE_NO_PAD
                .encode(json!({"alg": "none", "typ": "dpop+jwt", "jwk": signer.jwk()}).to_string());
            format!("{head}.{body}.")
        };
        let wrong_typ = signer.sign(
            &json!({"jti": "x", "htm": "GET", "htu": "https://fhir.example.org/fhir/Patient/7", "iat": NOW,
                    "ath": URL_SAFE_NO_PAD.encode(sha256(TOKEN.as_bytes()))}),
            &[("typ", json!("JWT")), ("jwk", signer.jwk())],
        );
        let cases: Vec<(&str, String, Reason)> = vec![
            (
                "wrong htm",
                proof(&signer, |c| c["htm"] = json!("POST")),
                Reason::InvalidDpopProof,
            ),
            (
                "wrong htu",
                proof(&signer, |c| {
                    c["htu"] = json!("https://fhir.example.org/fhir/Patient/8")
                }),
                Reason::InvalidDpopProof,
            ),
            (
                "other host",
                proof(&signer, |c| {
                    c["htu"] = json!("https://evil.example.org/fhir/Patient/7")
                }),
                Reason::InvalidDpopProof,
            ),
            (
                "http",
                proof(&signer, |c| {
                    c["htu"] = json!("http://fhir.example.org/fhir/Patient/7")
                }),
                Reason::InvalidDpopProof,
            ),
            (
                "wrong ath",
                proof(&signer, |c| c["ath"] = json!("AAAA")),
                Reason::InvalidDpopProof,
            ),
            (
                "no ath",
                proof(&signer, |c| {
                    c.as_object_mut().unwrap().remove("ath");
                }),
                Reason::InvalidDpopProof,
            ),
            (
                "no jti",
                proof(&signer, |c| {
                    c.as_object_mut().unwrap().remove("jti");
                }),
                Reason::InvalidDpopProof,
            ),
            (
                "stale iat",
                proof(&signer, |c| c["iat"] = json!(NOW - 66)),
                Reason::InvalidDpopProof,
            ),
            (
                "future iat",
                proof(&signer, |c| c["iat"] = json!(NOW + 6)),
                Reason::InvalidDpopProof,
            ),
            ("other key", proof(&other, |_| {}), Reason::CnfMismatch),
            ("hs256", hs256, Reason::InvalidDpopProof),
            ("none", none, Reason::InvalidDpopProof),
            ("typ", wrong_typ, Reason::InvalidDpopProof),
            ("garbage", "not.a.jwt".into(), Reason::InvalidDpopProof),
        ];
        for (name, p, want) in cases {
            let dpop = [p.as_str()];
            assert_eq!(
                check(
                    Some(&cnf),
                    &presented(Scheme::Dpop, &dpop, &no_cert),
                    &r,
                    false
                ),
                Err(want),
                "{name}"
            );
        }
        // A signature that does not verify.
        let good = proof(&signer, |_| {});
        let forged = format!("{}AA", good.trim_end_matches(|c| c != '.'));
        let dpop = [forged.as_str()];
        assert_eq!(
            check(
                Some(&cnf),
                &presented(Scheme::Dpop, &dpop, &no_cert),
                &r,
                false
            ),
            Err(Reason::InvalidDpopProof)
        );
        // No proof, two proofs, or the Bearer scheme for a DPoP-bound token.
        let p = proof(&signer, |_| {});
        for dpop in [vec![], vec![p.as_str(), p.as_str()]] {
            assert_eq!(
                check(
                    Some(&cnf),
                    &presented(Scheme::Dpop, &dpop, &no_cert),
                    &r,
                    false
                ),
                Err(Reason::InvalidDpopProof)
            );
        }
        let dpop = [p.as_str()];
        assert_eq!(
            check(
                Some(&cnf),
                &presented(Scheme::Bearer, &dpop, &no_cert),
                &r,
                false
            ),
            Err(Reason::CnfMismatch)
        );
        // The algorithm must be on the provider's list.
        let ed = Signer::ed25519("ed", 3);
        let ed_cnf = jkt(&ed);
        let p = proof(&ed, |_| {});
        let dpop = [p.as_str()];
        let only_es = ProofRules {
            algorithms: &[Alg::Es256],
            ..rules(&first)
        };
        assert_eq!(
            check(
                Some(&ed_cnf),
                &presented(Scheme::Dpop, &dpop, &no_cert),
                &only_es,
                false
            ),
            Err(Reason::InvalidDpopProof)
        );
        assert_eq!(
            check(
                Some(&ed_cnf),
                &presented(Scheme::Dpop, &dpop, &no_cert),
                &r,
                false
            ),
            Ok(Some(Binding::Dpop))
        );
    }

    #[test]
    fn htu_is_compared_after_normalisation() {
        let no_cert = || None;
        let p = presented(Scheme::Dpop, &[], &no_cert);
        for (htu, ok) in [
            ("https://fhir.example.org/fhir/Patient/7", true),
            ("HTTPS://FHIR.example.ORG/fhir/Patient/7", true),
            ("https://fhir.example.org:443/fhir/Patient/7", true),
            ("https://fhir.example.org/fhir/Patient/7?x=1#f", true),
            ("https://fhir.example.org:8443/fhir/Patient/7", false),
            ("https://fhir.example.org/FHIR/Patient/7", false),
            ("https://fhir.example.org/fhir/Patient/7/", false),
            ("fhir.example.org/fhir/Patient/7", false),
        ] {
            assert_eq!(htu_matches(htu, &p), ok, "{htu}");
        }
    }

    #[test]
    fn certificate_bound_tokens_need_that_certificate() {
        let digest = sha256(b"the client certificate's DER");
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let cnf = Cnf {
            x5t_s256: Some(URL_SAFE_NO_PAD.encode(digest)),
            jkt: None,
        };
        let seen = Seen::new();
        let first = seen.first_use();
        let r = rules(&first);
        let right = || Some(hex.clone());
        let upper = || Some(hex.to_ascii_uppercase());
        let wrong = || Some("00".repeat(32));
        let none = || None;
        assert_eq!(
            check(
                Some(&cnf),
                &presented(Scheme::Bearer, &[], &right),
                &r,
                false
            ),
            Ok(Some(Binding::Mtls))
        );
        assert_eq!(
            check(
                Some(&cnf),
                &presented(Scheme::Bearer, &[], &upper),
                &r,
                false
            ),
            Ok(Some(Binding::Mtls))
        );
        assert_eq!(
            check(
                Some(&cnf),
                &presented(Scheme::Bearer, &[], &wrong),
                &r,
                false
            ),
            Err(Reason::CnfMismatch)
        );
        assert_eq!(
            check(
                Some(&cnf),
                &presented(Scheme::Bearer, &[], &none),
                &r,
                false
            ),
            Err(Reason::CnfMismatch)
        );
        // A bearer token where the rule wants a binding; the DPoP scheme for an unbound token.
        assert_eq!(
            check(None, &presented(Scheme::Bearer, &[], &none), &r, true),
            Err(Reason::SenderConstraintRequired)
        );
        assert_eq!(
            check(None, &presented(Scheme::Bearer, &[], &none), &r, false),
            Ok(None)
        );
        assert_eq!(
            check(None, &presented(Scheme::Dpop, &[], &none), &r, false),
            Err(Reason::CnfMismatch)
        );
        assert_eq!(
            check(
                Some(&Cnf::default()),
                &presented(Scheme::Bearer, &[], &none),
                &r,
                true
            ),
            Err(Reason::SenderConstraintRequired)
        );
    }

    #[test]
    fn a_proof_is_first_used_once_per_request_not_once_per_decision() {
        let mine = std::cell::Cell::new(None);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(first_use_once(&mine, &a, || true));
        // The same request decided again: the store is not asked.
        assert!(first_use_once(&mine, &a, || panic!("asked again")));
        // Another proof, seen before by the store: a replay.
        assert!(!first_use_once(&mine, &b, || false));
        assert_eq!(mine.get(), Some(a));
        // A fresh request with a proof the store has seen: a replay.
        assert!(!first_use_once(&std::cell::Cell::new(None), &a, || false));
    }
}
