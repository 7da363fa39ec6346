//! `phi-guard explain`: what the filter would answer one request, and why.
//!
//! The verdict is [`decision::decide`]'s own, run on the real [`Facts`] and
//! [`State`]; the answer is [`answer::deny`] with [`decision::challenge`],
//! exactly as the host sends it. What explain adds is only the telling:
//! path safety ([`SafePath::parse`]), every rule tried in order with why it
//! did or did not match ([`Rule::match_request`], the matcher `decide`
//! itself uses), the winning rule's requirements and the verified token.
//!
//! With `--claims` there is no real token to verify. The claims are signed
//! with a throwaway key made for this run, of an algorithm the claims'
//! provider allows, and that key alone is put in the provider's key set, so
//! the token goes through the filter's whole verification (header, issuer,
//! times, lifetime, audience, key selection, signature, cache) and only
//! "who signed it" is assumed; the output says the signature was not
//! checked. No path in the library builds a verified token without a
//! signature check.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};

use crate::answer::{self, Reason};
use crate::config::{Policy, Rule};
use crate::crypto::Alg;
use crate::decision::{self, Facts, Request, Revocations, State, Trace, Verdict, WaitFor};
use crate::fhir::Body;
use crate::introspection::{self, Introspection};
use crate::jwks::KeySet;
use crate::revocation::RevocationList;
use crate::rules::{PathMismatch, SafePath};
use crate::token::VerifiedToken;

/// The credential of the request.
#[derive(Debug, Clone)]
pub enum Credential {
    None,
    /// A real token; its signature is checked against `jwks` (a JWKS
    /// document), or, without one, the filter would wait for keys.
    Token {
        token: String,
        jwks: Option<String>,
    },
    /// Claims to sign with a throwaway key (signature not checked).
    Claims(serde_json::Map<String, Value>),
}

/// One request to explain.
#[derive(Debug, Clone)]
pub struct Input {
    pub method: String,
    /// `:path`, query included.
    pub path: String,
    pub credential: Credential,
    /// Other request headers, as (name, value); `authorization` ones count.
    pub headers: Vec<(String, String)>,
    /// Unix seconds.
    pub now: i64,
    /// A revocation list document (`--revocation`).
    pub revocation: Option<String>,
    /// An RFC 7662 answer for the token (`--introspection`).
    pub introspection: Option<String>,
    /// The connection's TLS version as Envoy would name it (`TLSv1.3`);
    /// `None` for plaintext (`--tls none`).
    pub tls: Option<String>,
}

/// The path-safety verdict.
#[derive(Debug, Clone, Serialize)]
pub struct PathVerdict {
    pub safe: bool,
    /// The path decoded once, as rules see it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoded: Option<String>,
    /// Why it was refused (the audit's `bad_path` detail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<&'static str>,
}

/// One rule, as the request met it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleTried {
    pub index: usize,
    pub id: String,
    /// `matched`, `no match` or `not tried`.
    pub outcome: &'static str,
    pub why: String,
}

/// What the winning rule asks of a request.
#[derive(Debug, Clone, Serialize)]
pub struct Requirements {
    pub id: String,
    pub methods: Option<Vec<String>>,
    pub path: String,
    pub public: bool,
    pub scopes: Vec<String>,
    pub scopes_any: Vec<String>,
    pub max_token_age_seconds: Option<u64>,
    pub step_up: Option<Value>,
    pub sensitive: bool,
    pub introspect: bool,
}

/// What explain says.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub method: String,
    pub path: String,
    /// Unix seconds the request was decided at.
    pub at: i64,
    /// How the token's signature was treated.
    pub signature: String,
    pub path_safety: PathVerdict,
    pub rules: Vec<RuleTried>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Requirements>,
    /// The token as verified (absent when it did not verify or none was needed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Value>,
    /// What the filter would pause for first (then decide without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waits_for: Option<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The status the filter sends; absent on allow (the upstream answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub www_authenticate: Option<String>,
    /// The audit record's `reason`.
    pub reason: &'static str,
    /// The audit record's `step_up` (`acr`, `amr`, `age`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_up: Option<&'static str>,
    /// On allow: identity headers set upstream.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub forwarded_headers: BTreeMap<String, String>,
    /// On allow: whether `Authorization` reaches the upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_forwarded: Option<bool>,
    pub notes: Vec<String>,
}

/// The `kid` of the throwaway key.
const THROWAWAY_KID: &str = "phi-guard-explain-throwaway";

/// Explains `input` under `policy`; an error is a problem with the input
/// (a key set or list that cannot be read, claims that cannot be signed).
pub fn explain(policy: &Policy, input: &Input) -> Result<Explanation, String> {
    let mut notes = Vec::new();
    let mut authorization: Vec<String> = input
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.clone())
        .collect();
    let mut keys: Vec<Option<KeySet>> = policy.providers.iter().map(|_| None).collect();
    let (signature, token) = match &input.credential {
        Credential::None => ("no token given".to_owned(), None),
        Credential::Token { token, jwks } => {
            match jwks {
                Some(doc) => {
                    for (slot, p) in keys.iter_mut().zip(&policy.providers) {
                        let set = KeySet::parse(doc.as_bytes(), &p.algorithms).map_err(|e| {
                            format!("--jwks is not a key set the filter would use for provider {:?}: {e}", p.name)
                        })?;
                        *slot = Some(set);
                    }
                }
                None => notes.push(
                    "no --jwks: the filter would wait for the provider's keys, then answer 503 without them".into(),
                ),
            }
            (
                "checked against the --jwks key set".to_owned(),
                Some(token.clone()),
            )
        }
        Credential::Claims(claims) => {
            let iss = claims.get("iss").and_then(Value::as_str);
            let provider = iss.and_then(|i| policy.provider_for_issuer(i));
            let allowed: &[Alg] = provider.map_or(&[Alg::EdDsa], |(_, p)| &p.algorithms);
            let typ = provider
                .and_then(|(_, p)| p.token_types.first().cloned())
                .unwrap_or_else(|| "at+jwt".into());
            let (token, jwk, alg) = throwaway::sign(allowed, &typ, &Value::Object(claims.clone()))?;
            if let Some((i, p)) = provider {
                let doc = json!({"keys": [jwk]}).to_string();
                let set = KeySet::parse(doc.as_bytes(), &p.algorithms)
                    .map_err(|e| format!("throwaway key refused: {e}"))?;
                if let Some(slot) = keys.get_mut(i) {
                    *slot = Some(set);
                }
            }
            (
                format!("NOT CHECKED: --claims were signed here with a throwaway {} key that only this run trusts; every other check ran as in the filter", alg.name()),
                Some(token),
            )
        }
    };
    if let Some(t) = &token {
        authorization.push(format!("Bearer {t}"));
    }
    let list = match &input.revocation {
        Some(doc) => Some(
            RevocationList::parse(doc.as_bytes())
                .map_err(|e| format!("--revocation is not a list the filter would use: {e}"))?,
        ),
        None if policy.revocation.is_some() => {
            notes.push("no --revocation: the list is taken as fresh and empty".into());
            Some(RevocationList::parse(b"{}").map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let revocations = match &list {
        Some(l) => Revocations::Fresh(l),
        None => Revocations::Off,
    };
    let keys_of = |i: usize| keys.get(i).and_then(Option::as_ref);
    // No client certificate, and every DPoP proof is new: explain judges one request.
    let facts = Facts {
        keys: &keys_of,
        revocations,
        peer_cert: &|| None,
        dpop_first_use: &|_, _| true,
    };
    let auth: Vec<&str> = authorization.iter().map(String::as_str).collect();
    let header = |name: &str| {
        input
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let dpop: Vec<&str> = input
        .headers
        .iter()
        .filter(|(n, _)| n == "dpop")
        .map(|(_, v)| v.as_str())
        .collect();
    let req = Request {
        method: &input.method,
        path: &input.path,
        authorization: &auth,
        source: None,
        tls_version: input.tls.as_deref(),
        forwarded_proto: header("x-forwarded-proto"),
        scheme: if input.tls.is_some() { "https" } else { "http" },
        authority: header(":authority")
            .or(header("host"))
            .unwrap_or("localhost"),
        dpop: &dpop,
        // explain reads no body: a FHIR `_search` form is reported as asked for.
        body: Body::Unread,
    };
    let state = || -> Result<State, String> {
        let mut state = State::new(policy);
        if let (Some(answer), Some(t)) = (&input.introspection, &token) {
            let parsed = Introspection::parse(answer.as_bytes()).map_err(|e| {
                format!("--introspection is not an answer the filter would use: {e}")
            })?;
            for (i, p) in policy.providers.iter().enumerate() {
                let (Some(endpoint), Some(cache)) =
                    (&p.introspection, state.introspection.get_mut(i))
                else {
                    continue;
                };
                let outcome = introspection::judge(&parsed, policy, i, t, input.now);
                cache.insert(
                    introspection::key(t),
                    outcome,
                    input.now,
                    endpoint.cache_seconds,
                );
            }
        }
        Ok(state)
    };
    // First as a request that may still wait for a fetch, then, if it
    // would wait, as one whose wait is over with nothing brought.
    let mut trace = Trace::default();
    let mut verdict = decision::decide(
        policy,
        &facts,
        &mut state()?,
        &req,
        input.now,
        true,
        &mut trace,
    );
    let mut waits_for = None;
    if let Verdict::Wait(w) = verdict {
        waits_for = Some(describe_wait(policy, w));
        verdict = decision::decide(policy, &facts, &mut state()?, &req, input.now, false, {
            trace = Trace::default();
            &mut trace
        });
    }

    let path_safety = match SafePath::parse(&input.path) {
        Ok(p) => PathVerdict {
            safe: true,
            decoded: Some(p.decoded().to_owned()),
            problem: None,
        },
        Err(e) => PathVerdict {
            safe: false,
            decoded: None,
            problem: Some(e.code()),
        },
    };
    let (winner, token_seen) = match &verdict {
        Verdict::Allow { rule, token, .. } => (Some(*rule), token.clone()),
        Verdict::Deny { rule, token, .. } => (*rule, token.clone()),
        Verdict::NeedBody { rule, token } => (Some(*rule), token.clone()),
        Verdict::Wait(_) => (None, None),
    };
    let rules = rules_tried(policy, &input.method, &input.path, winner, &mut notes);
    let rule = winner.and_then(|i| policy.rule(i));

    let mut out = Explanation {
        method: input.method.clone(),
        path: input.path.clone(),
        at: input.now,
        signature,
        path_safety,
        rules,
        rule: rule.map(requirements),
        token: token_seen.as_deref().map(|t| token_facts(policy, t)),
        waits_for,
        decision: "deny",
        status: None,
        www_authenticate: None,
        reason: "ok",
        step_up: None,
        forwarded_headers: BTreeMap::new(),
        token_forwarded: None,
        notes,
    };
    match &verdict {
        Verdict::Allow { rule: i, token, .. } => {
            out.decision = "allow";
            if let Some(r) = policy.rule(*i) {
                for (h, v) in decision::forwarded_headers(policy, r, token.as_deref()) {
                    out.forwarded_headers.insert(h.to_owned(), v);
                }
                out.token_forwarded =
                    Some(policy.forward_token && !r.public && !authorization.is_empty());
                let spoofed: Vec<&str> = input
                    .headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .filter(|n| {
                        policy
                            .claims_to_headers
                            .iter()
                            .any(|(_, h)| h.eq_ignore_ascii_case(n))
                    })
                    .collect();
                if !spoofed.is_empty() {
                    out.notes.push(format!(
                        "the client's own {} removed before the identity headers are set",
                        spoofed.join(", ")
                    ));
                }
            }
        }
        Verdict::Deny {
            reason,
            rule,
            token: denied,
        } => {
            let r = rule.and_then(|i| policy.rule(i));
            let dpop = decision::is_dpop(&req, *reason, denied.as_deref());
            let algs = dpop.then_some(policy.dpop_algs.as_str());
            let a = answer::deny(
                *reason,
                &policy.realm,
                decision::challenge(r, algs, trace.fhir.as_ref()),
            );
            out.status = Some(a.status);
            out.www_authenticate = a.www_authenticate;
            out.reason = reason.code();
            if let Reason::StepUpRequired(f) = reason {
                out.step_up = Some(f.code());
            }
        }
        Verdict::Wait(_) => {
            out.notes
                .push("decide still waits without a fetch: nothing to tell".into());
        }
        Verdict::NeedBody { .. } => {
            out.decision = "read body";
            out.notes.push(
                "the FHIR _search form body decides: the filter reads it (up to 16 KiB) and decides again; explain reads no body".into(),
            );
        }
    }
    Ok(out)
}

fn describe_wait(policy: &Policy, w: WaitFor) -> String {
    let name = |i: usize| {
        policy
            .providers
            .get(i)
            .map_or("?", |p| p.name.as_str())
            .to_owned()
    };
    match w {
        WaitFor::Keys {
            provider,
            unknown_kid: false,
        } => {
            format!("the keys of provider {:?} (JWKS fetch)", name(provider))
        }
        WaitFor::Keys {
            provider,
            unknown_kid: true,
        } => format!(
            "a refetch of provider {:?}'s JWKS (no key has the token's kid)",
            name(provider)
        ),
        WaitFor::Revocations => "the first revocation list".into(),
        WaitFor::Introspection { provider, .. } => format!(
            "the introspection answer from provider {:?} (give one with --introspection)",
            name(provider)
        ),
    }
}

/// Every rule, as `decide` met them: tried in order until the first match.
fn rules_tried(
    policy: &Policy,
    method: &str,
    path: &str,
    winner: Option<usize>,
    notes: &mut Vec<String>,
) -> Vec<RuleTried> {
    let safe = SafePath::parse(path).ok();
    let mut matched_first = None;
    let out = policy
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let tried = |outcome, why: String| RuleTried {
                index: i,
                id: r.id.clone(),
                outcome,
                why,
            };
            let Some(p) = &safe else {
                return tried("not tried", "the path was refused first".into());
            };
            if matched_first.is_some() {
                return tried(
                    "not tried",
                    "an earlier rule matched (first match wins)".into(),
                );
            }
            let m = r.match_request(method, p);
            if m.is_match() {
                matched_first = Some(i);
                return tried(
                    "matched",
                    format!("{method} is allowed and the path matches {}", r.path),
                );
            }
            let mut why = Vec::new();
            if !m.method {
                why.push(format!(
                    "method {method} is not one of {}",
                    r.methods.as_deref().unwrap_or_default().join(", ")
                ));
            }
            if let Some(miss) = m.path {
                why.push(path_why(r, p, miss));
            }
            tried("no match", why.join("; "))
        })
        .collect();
    if safe.is_some() && matched_first != winner && winner.is_some() {
        notes.push(format!(
            "explain's rule walk ({matched_first:?}) disagrees with the decision's rule ({winner:?}): report this"
        ));
    }
    out
}

fn path_why(r: &Rule, p: &SafePath, miss: PathMismatch) -> String {
    let seg = |at: usize| p.segments().nth(at).unwrap_or("").to_owned();
    let t = r.path.as_str();
    match miss {
        PathMismatch::TooShort { at } => format!("the path ends before segment {} of {t}", at + 1),
        PathMismatch::TooLong { at } => {
            format!(
                "the path goes on past {t} (segment {}: {:?})",
                at + 1,
                seg(at)
            )
        }
        PathMismatch::EmptySegment { at } => {
            format!("segment {} is empty where {t} wants a value", at + 1)
        }
        PathMismatch::Literal { at } => format!(
            "segment {} is {:?}, not {:?} as in {t}",
            at + 1,
            seg(at),
            r.path.literal_at(at).unwrap_or("")
        ),
    }
}

fn requirements(r: &Rule) -> Requirements {
    Requirements {
        id: r.id.clone(),
        methods: r.methods.clone(),
        path: r.path.as_str().to_owned(),
        public: r.public,
        scopes: r.scopes.clone(),
        scopes_any: r.scopes_any.clone(),
        max_token_age_seconds: r.max_token_age,
        step_up: r.step_up.as_ref().map(|s| {
            json!({"acr_values": s.acr_values, "amr_any": s.amr_any, "max_age_seconds": s.max_age})
        }),
        sensitive: r.sensitive,
        introspect: r.introspect.is_some(),
    }
}

fn token_facts(policy: &Policy, t: &VerifiedToken) -> Value {
    json!({
        "provider": policy.providers.get(t.provider).map(|p| p.name.clone()),
        "sub": t.sub, "client_id": t.client_id, "azp": t.azp, "jti": t.jti,
        "scopes_granted": t.scopes.iter().collect::<Vec<_>>(),
        "acr": t.acr, "amr": t.amr, "auth_time": t.auth_time,
        "iat": t.iat, "nbf": t.nbf, "exp": t.exp,
        "token_fp": t.fingerprint,
    })
}

/// Explanation as people read it.
pub fn render(e: &Explanation) -> String {
    let mut s = String::new();
    let mut line = |text: String| {
        s.push_str(&text);
        s.push('\n');
    };
    let at = u64::try_from(e.at).map_or_else(
        |_| e.at.to_string(),
        |s| crate::audit::rfc3339_millis(s.saturating_mul(1_000_000_000)),
    );
    line(format!("request:   {} {}  (at {at})", e.method, e.path));
    line(format!("signature: {}", e.signature));
    match (&e.path_safety.decoded, e.path_safety.problem) {
        (Some(d), _) => line(format!("path:      safe; rules see {d}")),
        (None, p) => line(format!(
            "path:      REFUSED ({}) before any rule is tried",
            p.unwrap_or("?")
        )),
    }
    line("rules:".into());
    for r in &e.rules {
        line(format!(
            "  [{}] {:<24} {:<9}  {}",
            r.index, r.id, r.outcome, r.why
        ));
    }
    if let Some(r) = &e.rule {
        line(format!("rule {:?} requires:", r.id));
        if r.public {
            line("  nothing: public (no token needed; any token is ignored)".into());
        }
        if !r.scopes.is_empty() {
            line(format!("  scopes (all):   {}", r.scopes.join(" ")));
        }
        if !r.scopes_any.is_empty() {
            line(format!("  scopes (any):   {}", r.scopes_any.join(" ")));
        }
        if let Some(age) = r.max_token_age_seconds {
            line(format!("  token age:      iat at most {age} s old"));
        }
        if let Some(su) = &r.step_up {
            line(format!("  step-up:        {su}"));
        }
        if r.sensitive {
            line("  sensitive:      fails closed without a fresh revocation list".into());
        }
        if r.introspect {
            line("  introspect:     the authorization server must say the token is active".into());
        }
    }
    if let Some(Value::Object(t)) = &e.token {
        let shown: Vec<String> = t
            .iter()
            .filter(|(_, v)| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                )
            })
            .collect();
        line(format!("token:     {}", shown.join(" ")));
    }
    if let Some(w) = &e.waits_for {
        line(format!("waits for: {w}; decided without it below"));
    }
    match e.decision {
        "allow" => {
            line("decision:  ALLOW (forwarded; the upstream answers)".into());
            for (h, v) in &e.forwarded_headers {
                line(format!("  header {h}: {v}"));
            }
            if let Some(f) = e.token_forwarded {
                line(format!(
                    "  Authorization {}",
                    if f {
                        "forwarded (forward_token)"
                    } else {
                        "removed"
                    }
                ));
            }
        }
        _ => {
            line(format!(
                "decision:  DENY {}",
                e.status.map_or(String::new(), |s| s.to_string())
            ));
            if let Some(w) = &e.www_authenticate {
                line(format!("  WWW-Authenticate: {w}"));
            }
        }
    }
    line(format!(
        "audit:     reason {}{}",
        e.reason,
        e.step_up
            .map_or(String::new(), |s| format!(" (step_up {s})"))
    ));
    for n in &e.notes {
        line(format!("note:      {n}"));
    }
    s
}

/// A throwaway signing key, made per run.
mod throwaway {
    use super::*;
    use rsa::rand_core::{OsRng, RngCore};
    use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer};
    use rsa::traits::PublicKeyParts;
    use sha2::{Sha256, Sha384, Sha512};

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs `claims` with a fresh key of the first algorithm in `allowed`
    /// (fastest families first): the token, the public JWK, the algorithm.
    pub fn sign(
        allowed: &[Alg],
        typ: &str,
        claims: &Value,
    ) -> Result<(String, Value, Alg), String> {
        let order = [
            Alg::EdDsa,
            Alg::Es256,
            Alg::Es384,
            Alg::Rs256,
            Alg::Rs384,
            Alg::Rs512,
            Alg::Ps256,
            Alg::Ps384,
            Alg::Ps512,
        ];
        let alg = order
            .into_iter()
            .find(|a| allowed.contains(a))
            .ok_or("the provider allows no algorithm explain can sign with")?;
        let header = json!({"alg": alg.name(), "kid": THROWAWAY_KID, "typ": typ});
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let m = signed.as_bytes();
        let mut seed = [0u8; 48];
        OsRng.fill_bytes(&mut seed);
        let kid = THROWAWAY_KID;
        let name = alg.name();
        let (sig, jwk): (Vec<u8>, Value) = match alg {
            Alg::EdDsa => {
                let mut s32 = [0u8; 32];
                s32.copy_from_slice(seed.get(..32).unwrap_or(&[0; 32]));
                let pair = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(s32));
                (
                    pair.sk.sign(m, None).to_vec(),
                    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": name, "x": b64(pair.pk.as_ref())}),
                )
            }
            Alg::Es256 => {
                let k = p256::ecdsa::SigningKey::random(&mut OsRng);
                let sig: p256::ecdsa::Signature = k.sign(m);
                let p = k.verifying_key().to_encoded_point(false);
                let (x, y) = (p.x().ok_or("no x")?, p.y().ok_or("no y")?);
                (
                    sig.to_bytes().to_vec(),
                    json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": name, "x": b64(x), "y": b64(y)}),
                )
            }
            Alg::Es384 => {
                let k = p384::ecdsa::SigningKey::random(&mut OsRng);
                let sig: p384::ecdsa::Signature = k.sign(m);
                let p = k.verifying_key().to_encoded_point(false);
                let (x, y) = (p.x().ok_or("no x")?, p.y().ok_or("no y")?);
                (
                    sig.to_bytes().to_vec(),
                    json!({"kty": "EC", "crv": "P-384", "kid": kid, "alg": name, "x": b64(x), "y": b64(y)}),
                )
            }
            _ => {
                let key = rsa::RsaPrivateKey::new(&mut OsRng, 2048).map_err(|e| e.to_string())?;
                let sig = match alg {
                    Alg::Rs256 => rsa::pkcs1v15::SigningKey::<Sha256>::new(key.clone())
                        .sign(m)
                        .to_vec(),
                    Alg::Rs384 => rsa::pkcs1v15::SigningKey::<Sha384>::new(key.clone())
                        .sign(m)
                        .to_vec(),
                    Alg::Rs512 => rsa::pkcs1v15::SigningKey::<Sha512>::new(key.clone())
                        .sign(m)
                        .to_vec(),
                    Alg::Ps256 => rsa::pss::BlindedSigningKey::<Sha256>::new(key.clone())
                        .sign_with_rng(&mut OsRng, m)
                        .to_vec(),
                    Alg::Ps384 => rsa::pss::BlindedSigningKey::<Sha384>::new(key.clone())
                        .sign_with_rng(&mut OsRng, m)
                        .to_vec(),
                    _ => rsa::pss::BlindedSigningKey::<Sha512>::new(key.clone())
                        .sign_with_rng(&mut OsRng, m)
                        .to_vec(),
                };
                (
                    sig,
                    json!({"kty": "RSA", "kid": kid, "alg": name,
                        "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())}),
                )
            }
        };
        Ok((format!("{signed}.{}", b64(&sig)), jwk, alg))
    }
}

#[cfg(test)]
mod tests;
