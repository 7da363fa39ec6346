//! One request's decision: path safety, rule (or, under a FHIR base path no
//! rule matches, the FHIR model), transport, token, revocation, forbidden
//! claims, sender binding, introspection, token age, scopes (or the FHIR
//! model's SMART grant), step-up — in that order, each a value the host
//! turns into an answer.

use std::rc::Rc;

use crate::answer::{Challenge, Reason, StepUpFailure};
use crate::binding::{self, Binding, Presented, ProofRules, Scheme};
use crate::budget::VerificationBudget;
use crate::config::{ForbiddenClaimsAction, ForwardedClaim, Policy, Rule, StepUp, TlsVersion};
use crate::fetch::Freshness;
use crate::fhir::{self, Body, FhirRequest, Refusal, Routed, Seen};
use crate::introspection::{self, IntrospectionCache, Outcome, TokenKey};
use crate::jwks::KeySet;
use crate::revocation::RevocationList;
use crate::rules::{query_has_access_token, scopes_satisfied, SafePath};
use crate::token::{self, TokenCache, Unverified, VerifiedToken};

/// What the host read from the request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Envoy's `:path`, query included.
    pub path: &'a str,
    /// Every `Authorization` header value.
    pub authorization: &'a [&'a str],
    /// The downstream address (Envoy's `source.address`), for the verification budget.
    pub source: Option<&'a str>,
    /// Envoy's `connection.tls_version` (`TLSv1.3`); `None` over plaintext.
    pub tls_version: Option<&'a str>,
    /// `x-forwarded-proto`, taken only with `transport.trusted_forwarded_proto`.
    pub forwarded_proto: Option<&'a str>,
    /// `:scheme` and `:authority`: the URL a DPoP proof names.
    pub scheme: &'a str,
    pub authority: &'a str,
    /// Every `DPoP` header value.
    pub dpop: &'a [&'a str],
    /// The body, as far as read: only a FHIR `_search` ever asks for it.
    pub body: Body<'a>,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone)]
pub enum Verdict {
    Allow {
        rule: usize,
        /// The verified token (`None` on a public rule).
        token: Option<Rc<VerifiedToken>>,
        /// How the client proved it holds what the token is bound to.
        binding: Option<Binding>,
    },
    Deny {
        reason: Reason,
        rule: Option<usize>,
        /// Set once the token verified, so the audit can name who was refused.
        token: Option<Rc<VerifiedToken>>,
    },
    /// A fetch may bring what the decision lacks; ask again after it.
    Wait(WaitFor),
    /// A FHIR `_search` whose form body must be read: every check that does
    /// not need it passed, and the token holds a search scope it could
    /// grant. Envoy cannot hold a request's headers while a wasm filter
    /// reads its body, so the host sends them on as for an allow (`rule`,
    /// `token`: identity headers set, token removed), holds the body whole,
    /// and asks again with it; a refusal then resets the upstream request
    /// before its body, and so before the search.
    NeedBody {
        rule: usize,
        token: Option<Rc<VerifiedToken>>,
    },
}

/// What a waiting request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// A provider's keys are missing or lack the token's `kid`.
    Keys { provider: usize, unknown_kid: bool },
    /// The first revocation list.
    Revocations,
    /// The authorization server's answer about the token with SHA-256 `key`
    /// (an `introspect` rule).
    Introspection { provider: usize, key: TokenKey },
}

/// The revocation list as the worker holds it.
#[derive(Debug, Clone, Copy)]
pub enum Revocations<'a> {
    /// No `revocation` block: nothing is revoked early.
    Off,
    /// Within `refresh_seconds + max_stale_seconds` of its fetch.
    Fresh(&'a RevocationList),
    /// Older than that: still applied, but sensitive rules fail closed.
    Stale(&'a RevocationList),
    /// None yet; the first fetch may still bring one.
    Pending,
    /// None, and fetching it failed.
    Unavailable,
}

impl<'a> Revocations<'a> {
    /// The list a worker holds (if any) at the given freshness of its document.
    pub fn held(freshness: Freshness, list: Option<&'a RevocationList>) -> Revocations<'a> {
        match (freshness, list) {
            (Freshness::Usable, Some(list)) => Revocations::Fresh(list),
            (_, Some(list)) => Revocations::Stale(list),
            (Freshness::Pending, None) => Revocations::Pending,
            (_, None) => Revocations::Unavailable,
        }
    }

    /// Whether a decision made with this is without a list in force.
    pub fn stale(&self) -> bool {
        !matches!(self, Revocations::Off | Revocations::Fresh(_))
    }
}

/// What the worker knows when it decides: fetched documents.
#[derive(Clone, Copy)]
pub struct Facts<'a> {
    /// A provider's usable keys, if any.
    pub keys: &'a dyn Fn(usize) -> Option<&'a KeySet>,
    pub revocations: Revocations<'a>,
    /// SHA-256 of the client certificate (hex), read when a token needs it.
    pub peer_cert: &'a dyn Fn() -> Option<String>,
    /// Records a DPoP proof's `jti` digest until a time; `false` if seen before.
    pub dpop_first_use: &'a dyn Fn(&[u8; 32], i64) -> bool,
}

/// What the worker remembers from request to request.
#[derive(Debug, Default)]
pub struct State {
    pub cache: TokenCache,
    pub budget: VerificationBudget,
    /// Introspection answers, by provider (empty for one without an
    /// introspection block). The host puts them in as they arrive.
    pub introspection: Vec<IntrospectionCache>,
}

impl State {
    /// The state `policy` asks for.
    pub fn new(policy: &Policy) -> State {
        State {
            cache: TokenCache::new(policy.verified_token_cache_size),
            budget: VerificationBudget::new(policy.verification_budget),
            introspection: policy
                .providers
                .iter()
                .map(|p| {
                    IntrospectionCache::new(p.introspection.as_ref().map_or(0, |i| i.cache_size))
                })
                .collect(),
        }
    }
}

/// What the decision saw besides its verdict: counters the host turns into
/// stats, and what the audit record shows of a FHIR request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// Whether the verified-token cache answered (`None`: not consulted).
    pub token_cache_hit: Option<bool>,
    /// Decided without a revocation list in force (set by the host, which
    /// knows how fresh its list is).
    pub revocation_stale: bool,
    /// Whether a kept introspection answer was found (`None`: not asked).
    pub introspection_cache_hit: Option<bool>,
    /// A request under the FHIR base path, as the FHIR model read it.
    pub fhir: Option<Seen>,
}

/// Decides `req` at Unix time `now`.
///
/// With `may_wait`, what a fetch may still bring (keys, a `kid`, the first
/// revocation list, an introspection answer) yields [`Verdict::Wait`];
/// without, its absence is final (503 or 401). A token not in the state's
/// cache is checked within its source's verification budget.
///
/// A token that is not JWS compact (three dot-separated parts) is opaque:
/// on an `introspect` rule with a provider to ask it is known by the
/// introspection answer alone; anywhere else it is malformed. A JWT is
/// introspected only once every JWT check and revocation passed.
pub fn decide(
    policy: &Policy,
    facts: &Facts<'_>,
    state: &mut State,
    req: &Request<'_>,
    now: i64,
    may_wait: bool,
    trace: &mut Trace,
) -> Verdict {
    let deny = |reason, rule, token| Verdict::Deny {
        reason,
        rule,
        token,
    };
    let path = match SafePath::parse(req.path) {
        Ok(p) => p,
        Err(_) => return deny(Reason::BadPath, None, None),
    };
    let (index, rule, fhir_request) = match route(policy, req, &path, trace) {
        Ok(routed) => routed,
        Err(verdict) => return verdict,
    };
    if rule.public {
        return Verdict::Allow {
            rule: index,
            token: None,
            binding: None,
        };
    }
    // Before the token is even read: over plaintext it may have been seen.
    if !transport_ok(policy, rule, req) {
        return deny(Reason::InsecureTransport, Some(index), None);
    }
    let credentials = match token::extract_credentials(req.authorization) {
        Ok(c) => c,
        Err(reason) => return deny(reason, Some(index), None),
    };
    let Some((scheme, raw)) = credentials else {
        return deny(Reason::MissingToken, Some(index), None);
    };
    // A token in the query as well as the header: two credentials, read neither.
    if query_has_access_token(req.path) {
        return deny(Reason::InvalidRequest, Some(index), None);
    }

    if !token::is_jws_compact(raw) {
        let Some(provider) = rule.introspect.and_then(|i| i.opaque) else {
            return deny(Reason::Malformed, Some(index), None);
        };
        let verified = match introspected(state, provider, raw, now, may_wait, trace) {
            Ok(t) => t,
            Err(Held::Wait(wait)) => return Verdict::Wait(wait),
            Err(Held::Deny(reason)) => return deny(reason, Some(index), None),
        };
        let held = Presentation { scheme, raw };
        return revoked_or_authorized(
            policy, facts, req, rule, index, verified, now, may_wait, held,
        );
    }

    let (cache, budget, keys) = (&mut state.cache, &mut state.budget, facts.keys);
    let verified = match cache.get(raw) {
        Some(hit) => {
            trace.token_cache_hit = Some(true);
            if let Err(reason) = token::check_times(policy, hit.exp, hit.nbf, hit.iat, now) {
                return deny(reason, Some(index), None);
            }
            // A verification is worth what the keys behind it are: once they
            // are past max_stale_seconds, a cached token is refused like any other.
            if keys(hit.provider).is_none() {
                if may_wait {
                    return Verdict::Wait(WaitFor::Keys {
                        provider: hit.provider,
                        unknown_kid: false,
                    });
                }
                return deny(Reason::KeysUnavailable, Some(index), None);
            }
            hit
        }
        None => {
            trace.token_cache_hit = Some(false);
            let budget_left = !budget.exhausted(req.source, now);
            match token::verify_within_budget(policy, keys, raw, now, budget_left) {
                Ok(v) => {
                    let v = Rc::new(v);
                    cache.insert(raw, Rc::clone(&v));
                    v
                }
                Err(Unverified::Refused(reason)) => {
                    if reason == Reason::InvalidSignature {
                        budget.charge(req.source, now);
                    }
                    return deny(reason, Some(index), None);
                }
                Err(Unverified::NoKeys { provider }) if may_wait => {
                    return Verdict::Wait(WaitFor::Keys {
                        provider,
                        unknown_kid: false,
                    })
                }
                Err(Unverified::UnknownKid { provider }) if may_wait => {
                    return Verdict::Wait(WaitFor::Keys {
                        provider,
                        unknown_kid: true,
                    })
                }
                Err(Unverified::NoKeys { .. }) => {
                    return deny(Reason::KeysUnavailable, Some(index), None)
                }
                Err(Unverified::UnknownKid { .. }) => {
                    return deny(Reason::UnknownKey, Some(index), None)
                }
            }
        }
    };
    match check_revocation(facts.revocations, rule, &verified, may_wait) {
        Ok(()) => {}
        Err(RevocationCheck::Wait) => return Verdict::Wait(WaitFor::Revocations),
        Err(RevocationCheck::Deny(reason)) => return deny(reason, Some(index), Some(verified)),
    }
    let bound = match possession(policy, facts, req, rule, &verified, scheme, raw, now) {
        Ok(b) => b,
        Err(reason) => return deny(reason, Some(index), Some(verified)),
    };
    if let Some(introspect) = rule.introspect {
        // The rule trusts only providers that can be asked (the one it names).
        let askable = introspect.provider.is_none_or(|p| p == verified.provider)
            && policy
                .providers
                .get(verified.provider)
                .is_some_and(|p| p.introspection.is_some());
        if !askable {
            return deny(Reason::UnknownIssuer, Some(index), Some(verified));
        }
        // Only whether it is active: identity and scopes stay the JWT's.
        match introspected(state, verified.provider, raw, now, may_wait, trace) {
            Ok(_) => {}
            Err(Held::Wait(wait)) => return Verdict::Wait(wait),
            Err(Held::Deny(reason)) => return deny(reason, Some(index), Some(verified)),
        }
    }
    if let Some(request) = &fhir_request {
        if request.form_pending {
            return form_needed(policy, request, index, verified, trace);
        }
        if let Err(refused) = smart_granted(policy, request, index, &verified, trace) {
            return refused;
        }
    }
    authorized(policy, rule, index, verified, now, bound)
}

/// The credentials as presented: their scheme and the token.
struct Presentation<'a> {
    scheme: Scheme,
    raw: &'a str,
}

/// The rule a request lands on: the first explicit rule whose method and
/// path match; else, under a `fhir` block's base path, the FHIR model's
/// (with the FHIR request it judges once a token verified). A FHIR request
/// is also described for the record, whichever decides it.
fn route<'p>(
    policy: &'p Policy,
    req: &Request<'_>,
    path: &SafePath,
    trace: &mut Trace,
) -> Result<Landing<'p>, Verdict> {
    let no_rule = || Verdict::Deny {
        reason: Reason::NoRule,
        rule: None,
        token: None,
    };
    let explicit = policy
        .rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.match_request(req.method, path).is_match());
    let Some(f) = &policy.fhir else {
        return explicit.map(|(i, r)| (i, r, None)).ok_or_else(no_rule);
    };
    if let Some((i, r)) = explicit {
        trace.fhir = fhir::describe(f, req.method, path, req.path);
        return Ok((i, r, None));
    }
    let refused = |reason| Verdict::Deny {
        reason,
        rule: Some(policy.fhir_rule(false)),
        token: None,
    };
    let (index, request) =
        match fhir::route(f, req.method, path, req.path, req.body, &mut trace.fhir) {
            Routed::Outside | Routed::Refused(Refusal::Unrecognised) => return Err(no_rule()),
            Routed::Refused(Refusal::BadRequest) => return Err(refused(Reason::BadFhirRequest)),
            Routed::Refused(Refusal::BodyTooLarge) => return Err(refused(Reason::BodyTooLarge)),
            Routed::Public => (policy.fhir_rule(true), None),
            Routed::Protected(r) => (policy.fhir_rule(false), Some(r)),
        };
    let rule = policy.rule(index).ok_or_else(no_rule)?;
    Ok((index, rule, request))
}

/// A `_search` whose form is not read yet: worth reading when the token
/// holds a scope that could grant the search; refused now otherwise.
fn form_needed(
    policy: &Policy,
    request: &FhirRequest,
    index: usize,
    verified: Rc<VerifiedToken>,
    trace: &mut Trace,
) -> Verdict {
    let worth_reading = policy
        .fhir
        .as_ref()
        .is_some_and(|f| fhir::may_search(f, request, verified.scopes.iter()));
    if worth_reading {
        return Verdict::NeedBody {
            rule: index,
            token: Some(verified),
        };
    }
    // Refused whatever the form holds; named as the query alone reads.
    match smart_granted(policy, request, index, &verified, trace) {
        Err(refused) => refused,
        Ok(()) => Verdict::Deny {
            reason: Reason::InsufficientScope,
            rule: Some(index),
            token: Some(verified),
        },
    }
}

/// Where [`route`] lands a request: the rule's index, the rule, and the
/// FHIR request when the FHIR model decides it.
type Landing<'p> = (usize, &'p Rule, Option<FhirRequest>);

/// The FHIR model's grant: the token's SMART scopes (and launch patient)
/// against the request, in place of a rule's scopes. The narrowest scopes
/// that allow it go to the record, and to the challenge of a refusal.
fn smart_granted(
    policy: &Policy,
    request: &FhirRequest,
    index: usize,
    verified: &Rc<VerifiedToken>,
    trace: &mut Trace,
) -> Result<(), Verdict> {
    let Some(f) = &policy.fhir else {
        return Ok(());
    };
    let judged = fhir::judge(
        f,
        request,
        verified.scopes.iter(),
        verified.patient.as_deref(),
    );
    if let Some(seen) = trace.fhir.as_mut() {
        seen.scopes = judged.scopes;
    }
    if judged.allowed {
        return Ok(());
    }
    Err(Verdict::Deny {
        reason: Reason::InsufficientScope,
        rule: Some(index),
        token: Some(Rc::clone(verified)),
    })
}

/// Revocation, forbidden claims and sender binding, then the per-rule
/// checks, for a token known by its introspection answer.
#[allow(clippy::too_many_arguments)] // The decision's own inputs, passed on.
fn revoked_or_authorized(
    policy: &Policy,
    facts: &Facts<'_>,
    req: &Request<'_>,
    rule: &Rule,
    index: usize,
    verified: Rc<VerifiedToken>,
    now: i64,
    may_wait: bool,
    held: Presentation<'_>,
) -> Verdict {
    match check_revocation(facts.revocations, rule, &verified, may_wait) {
        Ok(()) => match possession(
            policy,
            facts,
            req,
            rule,
            &verified,
            held.scheme,
            held.raw,
            now,
        ) {
            Ok(bound) => authorized(policy, rule, index, verified, now, bound),
            Err(reason) => Verdict::Deny {
                reason,
                rule: Some(index),
                token: Some(verified),
            },
        },
        Err(RevocationCheck::Wait) => Verdict::Wait(WaitFor::Revocations),
        Err(RevocationCheck::Deny(reason)) => Verdict::Deny {
            reason,
            rule: Some(index),
            token: Some(verified),
        },
    }
}

/// Forbidden claims, then proof that the client holds what the token is
/// bound to (or a refusal where the rule wants a bound token).
#[allow(clippy::too_many_arguments)] // The decision's own inputs, passed on.
fn possession(
    policy: &Policy,
    facts: &Facts<'_>,
    req: &Request<'_>,
    rule: &Rule,
    verified: &VerifiedToken,
    scheme: Scheme,
    raw: &str,
    now: i64,
) -> Result<Option<Binding>, Reason> {
    if !verified.phi_claims.is_empty()
        && policy.forbidden_claims_action == ForbiddenClaimsAction::Reject
    {
        return Err(Reason::PhiInToken);
    }
    let presented = Presented {
        scheme,
        dpop: req.dpop,
        method: req.method,
        url_scheme: req.scheme,
        authority: req.authority,
        path: req.path,
        token: raw,
        peer_cert: facts.peer_cert,
    };
    let proof_rules = ProofRules {
        algorithms: policy
            .providers
            .get(verified.provider)
            .map_or(&[], |p| p.algorithms.as_slice()),
        max_age_seconds: policy.dpop_max_age,
        clock_skew: policy.clock_skew,
        now,
        first_use: facts.dpop_first_use,
    };
    binding::check(
        verified.cnf.as_ref(),
        &presented,
        &proof_rules,
        rule.require_sender_constraint,
    )
}

/// The verdict of the per-rule checks on a token that passed the others.
fn authorized(
    policy: &Policy,
    rule: &Rule,
    index: usize,
    verified: Rc<VerifiedToken>,
    now: i64,
    binding: Option<Binding>,
) -> Verdict {
    match authorize(policy, rule, &verified, now) {
        Ok(()) => Verdict::Allow {
            rule: index,
            token: Some(verified),
            binding,
        },
        Err(reason) => Verdict::Deny {
            reason,
            rule: Some(index),
            token: Some(verified),
        },
    }
}

/// Why a token has no introspection answer to go on.
enum Held {
    Wait(WaitFor),
    Deny(Reason),
}

/// The kept introspection answer about `raw` at `provider`: the token as
/// the answer describes it, a refusal, or none yet (wait for the callout,
/// or 503 when waiting is over).
fn introspected(
    state: &mut State,
    provider: usize,
    raw: &str,
    now: i64,
    may_wait: bool,
    trace: &mut Trace,
) -> Result<Rc<VerifiedToken>, Held> {
    let key = introspection::key(raw);
    let kept = state
        .introspection
        .get_mut(provider)
        .and_then(|cache| cache.get(&key, now));
    trace.introspection_cache_hit = Some(kept.is_some());
    match kept {
        Some(Outcome::Active(t)) => Ok(t),
        Some(Outcome::Inactive) => Err(Held::Deny(Reason::Inactive)),
        Some(Outcome::Refused(reason)) => Err(Held::Deny(reason)),
        None if may_wait => Err(Held::Wait(WaitFor::Introspection { provider, key })),
        None => Err(Held::Deny(Reason::IntrospectionUnavailable)),
    }
}

/// Whether the request arrived over TLS recent enough for `rule`: Envoy's
/// `connection.tls_version`, or (trusted, behind a terminating balancer)
/// `x-forwarded-proto: https`, which says nothing of the version.
fn transport_ok(policy: &Policy, rule: &Rule, req: &Request<'_>) -> bool {
    let t = &policy.transport;
    if !rule.require_tls.unwrap_or(t.require_tls) {
        return true;
    }
    if let Some(version) = req.tls_version {
        return TlsVersion::parse(version).is_some_and(|v| v >= t.min_tls_version);
    }
    t.trusted_forwarded_proto
        && req
            .forwarded_proto
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// Whether a refusal is answered with a DPoP challenge (RFC 9449 §7.1): the
/// request used the DPoP scheme, its token is DPoP-bound, or its proof failed.
pub fn is_dpop(req: &Request<'_>, reason: Reason, token: Option<&VerifiedToken>) -> bool {
    matches!(reason, Reason::InvalidDpopProof | Reason::DpopReplay)
        || token.is_some_and(|t| t.cnf.as_ref().is_some_and(|c| c.jkt.is_some()))
        || matches!(
            token::extract_credentials(req.authorization),
            Ok(Some((Scheme::Dpop, _)))
        )
}

enum RevocationCheck {
    Wait,
    Deny(Reason),
}

/// The revocation list, as fresh as the rule needs it: a sensitive rule
/// fails closed without a list in force; others go on with the last list,
/// or none.
fn check_revocation(
    revocations: Revocations<'_>,
    rule: &Rule,
    t: &VerifiedToken,
    may_wait: bool,
) -> Result<(), RevocationCheck> {
    let list = match revocations {
        Revocations::Off => return Ok(()),
        Revocations::Fresh(list) => list,
        Revocations::Pending if may_wait => return Err(RevocationCheck::Wait),
        Revocations::Stale(_) | Revocations::Pending | Revocations::Unavailable
            if rule.sensitive =>
        {
            return Err(RevocationCheck::Deny(Reason::RevocationUnavailable))
        }
        Revocations::Stale(list) => list,
        Revocations::Pending | Revocations::Unavailable => return Ok(()),
    };
    if list.revokes(t) {
        return Err(RevocationCheck::Deny(Reason::Revoked));
    }
    Ok(())
}

/// The per-rule checks on a verified token: age, scopes, step-up.
fn authorize(policy: &Policy, rule: &Rule, t: &VerifiedToken, now: i64) -> Result<(), Reason> {
    let skew = i64::try_from(policy.clock_skew).unwrap_or(i64::MAX);
    let fresh = |at: Option<i64>, max_age: u64| {
        let max_age = i64::try_from(max_age).unwrap_or(i64::MAX);
        at.is_some_and(|at| {
            now.saturating_sub(at) <= max_age.saturating_add(skew) && at <= now.saturating_add(skew)
        })
    };
    if let Some(max_age) = rule.max_token_age {
        if !fresh(t.iat, max_age) {
            return Err(Reason::TokenTooOld);
        }
    }
    if !scopes_satisfied(&t.scopes, &rule.scopes, &rule.scopes_any) {
        return Err(Reason::InsufficientScope);
    }
    if let Some(step_up) = &rule.step_up {
        check_step_up(step_up, t, &fresh).map_err(Reason::StepUpRequired)?;
    }
    Ok(())
}

/// RFC 9470: the token's `acr`, `amr` and `auth_time` against the rule.
fn check_step_up(
    s: &StepUp,
    t: &VerifiedToken,
    fresh: &dyn Fn(Option<i64>, u64) -> bool,
) -> Result<(), StepUpFailure> {
    if !s.acr_values.is_empty() && !t.acr.as_ref().is_some_and(|a| s.acr_values.contains(a)) {
        return Err(StepUpFailure::Acr);
    }
    if !s.amr_any.is_empty() && !t.amr.iter().any(|m| s.amr_any.contains(m)) {
        return Err(StepUpFailure::Amr);
    }
    if let Some(max_age) = s.max_age {
        if !fresh(t.auth_time, max_age) {
            return Err(StepUpFailure::Age);
        }
    }
    Ok(())
}

/// What a challenge for `rule` must name: `dpop_algs` when the request is a
/// DPoP one (its scheme, its token's binding, or the refusal itself); for the
/// FHIR model's decisions (`fhir` holds the scopes it judged), the narrowest
/// SMART scopes.
pub fn challenge<'a>(
    rule: Option<&'a Rule>,
    dpop_algs: Option<&'a str>,
    fhir: Option<&'a Seen>,
) -> Challenge<'a> {
    let judged = fhir.map(|f| f.scopes.as_slice()).filter(|s| !s.is_empty());
    match rule {
        None => Challenge {
            dpop_algs,
            ..Challenge::default()
        },
        Some(r) => Challenge {
            dpop_algs,
            scopes: if let Some(judged) = judged {
                judged
            } else if r.scopes.is_empty() {
                &r.scopes_any
            } else {
                &r.scopes
            },
            acr_values: r.step_up.as_ref().map_or(&[], |s| s.acr_values.as_slice()),
            max_age: r.step_up.as_ref().and_then(|s| s.max_age),
        },
    }
}

/// The identity headers to add upstream on allow, per `claims_to_headers`.
/// A value that is not plain visible ASCII is left out rather than mangled.
pub fn forwarded_headers<'p>(
    policy: &'p Policy,
    rule: &Rule,
    token: Option<&VerifiedToken>,
) -> Vec<(&'p str, String)> {
    let mut out = Vec::with_capacity(policy.claims_to_headers.len());
    for (what, header) in &policy.claims_to_headers {
        let value = match (what, token) {
            (ForwardedClaim::Rule, _) => Some(rule.id.clone()),
            (_, None) => None,
            (ForwardedClaim::Sub, Some(t)) => t.sub.clone(),
            (ForwardedClaim::Iss, Some(t)) => {
                policy.providers.get(t.provider).map(|p| p.issuer.clone())
            }
            (ForwardedClaim::ClientId, Some(t)) => t.client_id.clone(),
            (ForwardedClaim::Azp, Some(t)) => t.azp.clone(),
            (ForwardedClaim::Jti, Some(t)) => t.jti.clone(),
            (ForwardedClaim::Acr, Some(t)) => t.acr.clone(),
            (ForwardedClaim::Scopes, Some(t)) => {
                Some(t.scopes.iter().collect::<Vec<_>>().join(" "))
            }
        };
        if let Some(v) =
            value.filter(|v| !v.is_empty() && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
        {
            out.push((header.as_str(), v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer;
    use crate::testkit::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::json;

    struct Case<'a> {
        method: &'a str,
        path: &'a str,
        auth: Vec<String>,
    }

    fn run(policy: &Policy, kit: &Kit, c: Case<'_>, now: i64) -> Verdict {
        let auth: Vec<&str> = c.auth.iter().map(String::as_str).collect();
        let req = Request {
            method: c.method,
            path: c.path,
            authorization: &auth,
            source: None,
            tls_version: Some("TLSv1.3"),
            forwarded_proto: None,
            scheme: "https",
            authority: "fhir.example.org",
            dpop: &[],
            body: Body::Unread,
        };
        decide(
            policy,
            &Facts {
                keys: &|_| Some(&kit.keys),
                revocations: Revocations::Off,
                peer_cert: &|| None,
                dpop_first_use: &|_, _| true,
            },
            &mut State {
                cache: TokenCache::new(0),
                budget: VerificationBudget::new(0),
                introspection: Vec::new(),
            },
            &req,
            now,
            true,
            &mut Trace::default(),
        )
    }

    fn reason(v: &Verdict) -> Option<Reason> {
        match v {
            Verdict::Deny { reason, .. } => Some(*reason),
            Verdict::Allow { .. } => Some(Reason::Ok),
            Verdict::Wait(_) | Verdict::NeedBody { .. } => None,
        }
    }

    fn rules() -> Vec<serde_json::Value> {
        vec![
            json!({"id": "health", "path": "/healthz", "public": true}),
            json!({"id": "patient-read", "methods": ["GET"], "path": "/fhir/Patient/{id}", "scopes": ["read:patient-profile"]}),
            json!({"id": "billing", "methods": ["PUT", "PATCH"], "path": "/billing/{account}", "scopes": ["update:billing"]}),
            json!({"id": "lab-delete", "methods": ["DELETE"], "path": "/labs/{id}", "scopes": ["delete:lab-results"], "max_token_age_seconds": 300}),
            json!({"id": "any-of", "path": "/docs/{rest=**}", "scopes_any": ["docs:read", "docs:admin"]}),
            json!({"id": "export", "methods": ["GET"], "path": "/fhir/$export", "scopes": ["export:bulk"],
                   "step_up": {"acr_values": ["urn:mfa", "urn:hw"], "amr_any": ["otp", "hwk"], "max_age_seconds": 300}}),
        ]
    }

    #[test]
    fn rule_table() {
        let kit = Kit::new();
        let policy = kit.policy(&rules());
        let tok = |scope: &str| {
            let mut c = kit.claims();
            c["scope"] = scope.into();
            vec![format!("Bearer {}", kit.es256.sign(&c, &[]))]
        };
        let table: Vec<(&str, &str, Vec<String>, Reason)> = vec![
            ("GET", "/healthz", vec![], Reason::Ok),
            ("GET", "/healthz", vec!["Bearer garbage".into()], Reason::Ok),
            (
                "GET",
                "/fhir/Patient/1",
                tok("read:patient-profile"),
                Reason::Ok,
            ),
            (
                "GET",
                "/fhir/Patient/1?x=1",
                tok("read:patient-profile"),
                Reason::Ok,
            ),
            ("GET", "/fhir/Patient/1", vec![], Reason::MissingToken),
            (
                "GET",
                "/fhir/Patient/1?access_token=abc",
                vec![],
                Reason::MissingToken,
            ),
            (
                "GET",
                "/fhir/Patient/1?access_token=abc",
                tok("read:patient-profile"),
                Reason::InvalidRequest,
            ),
            (
                "GET",
                "/fhir/Patient/1",
                tok("read:other"),
                Reason::InsufficientScope,
            ),
            (
                "GET",
                "/fhir/Patient/1",
                tok("read:*"),
                Reason::InsufficientScope,
            ),
            (
                "POST",
                "/fhir/Patient/1",
                tok("read:patient-profile"),
                Reason::NoRule,
            ),
            (
                "GET",
                "/fhir/Patient/1/x",
                tok("read:patient-profile"),
                Reason::NoRule,
            ),
            (
                "GET",
                "/unknown",
                tok("read:patient-profile"),
                Reason::NoRule,
            ),
            (
                "GET",
                "/fhir/Patient/%2e%2e/x",
                tok("read:patient-profile"),
                Reason::BadPath,
            ),
            (
                "GET",
                "/fhir/Patient/a%2Fb",
                tok("read:patient-profile"),
                Reason::BadPath,
            ),
            (
                "GET",
                "/fhir//Patient/1",
                tok("read:patient-profile"),
                Reason::BadPath,
            ),
            ("PATCH", "/billing/9", tok("update:billing"), Reason::Ok),
            (
                "PATCH",
                "/billing/9",
                tok("update:billing:all"),
                Reason::InsufficientScope,
            ),
            ("GET", "/docs/a/b", tok("docs:admin"), Reason::Ok),
            (
                "GET",
                "/docs/a/b",
                tok("docs:write"),
                Reason::InsufficientScope,
            ),
        ];
        for (method, path, auth, want) in table {
            let got = run(&policy, &kit, Case { method, path, auth }, NOW);
            assert_eq!(reason(&got), Some(want), "{method} {path}");
        }
    }

    #[test]
    fn token_age_and_step_up() {
        let kit = Kit::new();
        let policy = kit.policy(&rules());
        let go = |method, path, edit: &dyn Fn(&mut serde_json::Value), now| {
            let mut c = kit.claims();
            edit(&mut c);
            let auth = vec![format!("Bearer {}", kit.eddsa.sign(&c, &[]))];
            reason(&run(&policy, &kit, Case { method, path, auth }, now))
        };
        let lab = |iat: i64| {
            move |c: &mut serde_json::Value| {
                c["scope"] = "delete:lab-results".into();
                c["iat"] = iat.into();
                c["exp"] = (iat + 900).into();
            }
        };
        // max_token_age 300, skew 60.
        assert_eq!(
            go("DELETE", "/labs/1", &lab(NOW - 360), NOW),
            Some(Reason::Ok)
        );
        assert_eq!(
            go("DELETE", "/labs/1", &lab(NOW - 361), NOW),
            Some(Reason::TokenTooOld)
        );
        let no_iat = |c: &mut serde_json::Value| {
            c["scope"] = "delete:lab-results".into();
            c.as_object_mut().unwrap().remove("iat");
        };
        assert_eq!(
            go("DELETE", "/labs/1", &no_iat, NOW),
            Some(Reason::TokenTooOld)
        );

        let export = |acr: Option<&str>, amr: &[&str], auth_time: Option<i64>, scope: &str| {
            let (acr, amr, scope) = (
                acr.map(str::to_owned),
                amr.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                scope.to_owned(),
            );
            move |c: &mut serde_json::Value| {
                c["scope"] = scope.clone().into();
                if let Some(a) = &acr {
                    c["acr"] = a.clone().into();
                }
                c["amr"] = json!(amr);
                if let Some(t) = auth_time {
                    c["auth_time"] = t.into();
                }
            }
        };
        let s = |f| Some(Reason::StepUpRequired(f));
        let ok_time = Some(NOW - 100);
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(Some("urn:hw"), &["otp"], ok_time, "export:bulk"),
                NOW
            ),
            Some(Reason::Ok)
        );
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(None, &["otp"], ok_time, "export:bulk"),
                NOW
            ),
            s(StepUpFailure::Acr)
        );
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(Some("urn:pwd"), &["otp"], ok_time, "export:bulk"),
                NOW
            ),
            s(StepUpFailure::Acr)
        );
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(Some("urn:mfa"), &["pwd"], ok_time, "export:bulk"),
                NOW
            ),
            s(StepUpFailure::Amr)
        );
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(Some("urn:mfa"), &["hwk"], None, "export:bulk"),
                NOW
            ),
            s(StepUpFailure::Age)
        );
        // max_age 300 plus 60 s skew: exactly at the boundary passes, one second more fails.
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(Some("urn:mfa"), &["hwk"], Some(NOW - 360), "export:bulk"),
                NOW
            ),
            Some(Reason::Ok)
        );
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(Some("urn:mfa"), &["hwk"], Some(NOW - 361), "export:bulk"),
                NOW
            ),
            s(StepUpFailure::Age)
        );
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(Some("urn:mfa"), &["hwk"], Some(NOW + 61), "export:bulk"),
                NOW
            ),
            s(StepUpFailure::Age)
        );
        // Scope is checked before step-up.
        assert_eq!(
            go(
                "GET",
                "/fhir/$export",
                &export(None, &[], None, "read:patient-profile"),
                NOW
            ),
            Some(Reason::InsufficientScope)
        );
    }

    #[test]
    fn step_up_parts_are_optional_and_default_is_shared() {
        let kit = Kit::new();
        let policy = kit.policy_with(|p| {
            p["step_up_defaults"] = json!({"acr_values": ["urn:mfa"]});
            p["rules"] = json!([
                {"id": "a", "path": "/a", "step_up": "default"},
                {"id": "b", "path": "/b", "step_up": {"max_age_seconds": 10}},
            ]);
        });
        let go = |path, acr: Option<&str>, auth_time: Option<i64>| {
            let mut c = kit.claims();
            if let Some(a) = acr {
                c["acr"] = a.into();
            }
            if let Some(t) = auth_time {
                c["auth_time"] = t.into();
            }
            let auth = vec![format!("Bearer {}", kit.es384.sign(&c, &[]))];
            reason(&run(
                &policy,
                &kit,
                Case {
                    method: "GET",
                    path,
                    auth,
                },
                NOW,
            ))
        };
        assert_eq!(go("/a", Some("urn:mfa"), None), Some(Reason::Ok));
        assert_eq!(
            go("/a", Some("urn:x"), Some(NOW)),
            Some(Reason::StepUpRequired(StepUpFailure::Acr))
        );
        assert_eq!(go("/b", None, Some(NOW - 5)), Some(Reason::Ok));
        assert_eq!(
            go("/b", None, Some(NOW - 100)),
            Some(Reason::StepUpRequired(StepUpFailure::Age))
        );
    }

    /// One request through `decide` with every transport and binding input
    /// spelled out; the reason it gets (`Ok` for allow).
    struct Wire<'a> {
        path: &'a str,
        auth: String,
        tls: Option<&'a str>,
        xfp: Option<&'a str>,
        dpop: Vec<String>,
        cert: Option<String>,
    }

    impl<'a> Wire<'a> {
        fn new(path: &'a str, auth: String) -> Wire<'a> {
            Wire {
                path,
                auth,
                tls: Some("TLSv1.3"),
                xfp: None,
                dpop: vec![],
                cert: None,
            }
        }

        fn ask(
            &self,
            policy: &Policy,
            kit: &Kit,
            state: &mut State,
            seen: &dyn Fn(&[u8; 32], i64) -> bool,
        ) -> Option<Reason> {
            let auth = [self.auth.as_str()];
            let dpop: Vec<&str> = self.dpop.iter().map(String::as_str).collect();
            let req = Request {
                method: "GET",
                path: self.path,
                authorization: if self.auth.is_empty() { &[] } else { &auth },
                source: None,
                tls_version: self.tls,
                forwarded_proto: self.xfp,
                scheme: "https",
                authority: "fhir.example.org",
                dpop: &dpop,
                body: Body::Unread,
            };
            let cert = || self.cert.clone();
            let keys = |_: usize| Some(&kit.keys);
            let facts = Facts {
                keys: &keys,
                revocations: Revocations::Off,
                peer_cert: &cert,
                dpop_first_use: seen,
            };
            reason(&decide(
                policy,
                &facts,
                state,
                &req,
                NOW,
                false,
                &mut Trace::default(),
            ))
        }
    }

    #[test]
    fn transport_is_checked_before_the_token() {
        let kit = Kit::new();
        let good = format!("Bearer {}", kit.es256.sign(&kit.claims(), &[]));
        let policy_for = |transport: serde_json::Value| {
            kit.policy_with(|d| {
                d["rules"] = json!(rules());
                d["rules"][1]["require_tls"] = json!(false);
                d["rules"].as_array_mut().unwrap().push(json!({"id": "docs-tls", "path": "/tls/{x}", "scopes": ["read:patient-profile"], "require_tls": true}));
                d["transport"] = transport;
            })
        };
        let default = policy_for(json!({}));
        let strict = policy_for(json!({"min_tls_version": "TLSv1.3"}));
        let relaxed = policy_for(json!({"require_tls": false}));
        let behind_lb = policy_for(json!({"trusted_forwarded_proto": true}));
        let mut state = State::default();
        let yes = |_: &[u8; 32], _: i64| true;
        let ok = Some(Reason::Ok);
        let insecure = Some(Reason::InsecureTransport);
        let case = |path: &'static str,
                    tls: Option<&'static str>,
                    xfp: Option<&'static str>,
                    auth: &str| Wire {
            tls,
            xfp,
            ..Wire::new(path, auth.to_string())
        };
        for (policy, wire, want) in [
            (
                &default,
                case("/docs/a", Some("TLSv1.3"), None, &good),
                Some(Reason::InsufficientScope),
            ),
            (&default, case("/tls/a", Some("TLSv1.2"), None, &good), ok),
            (
                &default,
                case("/tls/a", Some("TLSv1.1"), None, &good),
                insecure,
            ),
            (&default, case("/tls/a", None, None, &good), insecure),
            // No token needed to be refused: it is not even read.
            (&default, case("/tls/a", None, None, ""), insecure),
            (
                &default,
                case("/tls/a", None, None, "Bearer garbage"),
                insecure,
            ),
            (
                &default,
                case("/tls/a", Some("bogus"), None, &good),
                insecure,
            ),
            (
                &default,
                case("/tls/a", None, Some("https"), &good),
                insecure,
            ),
            (
                &strict,
                case("/tls/a", Some("TLSv1.2"), None, &good),
                insecure,
            ),
            (&strict, case("/tls/a", Some("TLSv1.3"), None, &good), ok),
            // A rule may relax it (rule 1 is patient-read), or demand it where the policy does not.
            (&default, case("/fhir/Patient/1", None, None, &good), ok),
            (
                &relaxed,
                case("/labs/1", None, None, &good),
                Some(Reason::NoRule),
            ),
            (&relaxed, case("/tls/a", None, None, &good), insecure),
            // Public rules are exempt.
            (&default, case("/healthz", None, None, ""), ok),
            // x-forwarded-proto only when trusted, and only "https".
            (&behind_lb, case("/tls/a", None, Some("https"), &good), ok),
            (&behind_lb, case("/tls/a", None, Some("HTTPS"), &good), ok),
            (
                &behind_lb,
                case("/tls/a", None, Some("http"), &good),
                insecure,
            ),
            (
                &behind_lb,
                case("/tls/a", Some("TLSv1.1"), Some("https"), &good),
                insecure,
            ),
        ] {
            assert_eq!(
                wire.ask(policy, &kit, &mut state, &yes),
                want,
                "{} {:?} {:?}",
                wire.path,
                wire.tls,
                wire.xfp
            );
        }
    }

    #[test]
    fn forbidden_claims_are_refused_or_flagged() {
        let kit = Kit::new();
        let mut claims = kit.claims();
        claims["email"] = json!("jane@example.org");
        claims["mrn"] = json!("12345");
        let token = format!("Bearer {}", kit.es256.sign(&claims, &[]));
        let clean = format!("Bearer {}", kit.es256.sign(&kit.claims(), &[]));
        let yes = |_: &[u8; 32], _: i64| true;
        let reject = kit.policy(&rules());
        let mut state = State::default();
        let wire = Wire::new("/fhir/Patient/1", token.clone());
        assert_eq!(
            wire.ask(&reject, &kit, &mut state, &yes),
            Some(Reason::PhiInToken)
        );
        // From the cache too.
        assert_eq!(
            wire.ask(&reject, &kit, &mut state, &yes),
            Some(Reason::PhiInToken)
        );
        assert_eq!(
            Wire::new("/fhir/Patient/1", clean).ask(&reject, &kit, &mut state, &yes),
            Some(Reason::Ok)
        );
        let audit = kit.policy_with(|d| {
            d["rules"] = json!(rules());
            d["forbidden_claims_action"] = json!("audit");
            d["forbidden_claims"] = json!(["email", "mrn", "ssn"]);
        });
        let mut state = State::default();
        assert_eq!(wire.ask(&audit, &kit, &mut state, &yes), Some(Reason::Ok));
        let names = {
            let auth = [token.as_str()];
            let req = Request {
                method: "GET",
                path: "/fhir/Patient/1",
                authorization: &auth,
                source: None,
                tls_version: Some("TLSv1.3"),
                forwarded_proto: None,
                scheme: "https",
                authority: "fhir.example.org",
                dpop: &[],
                body: Body::Unread,
            };
            let keys = |_: usize| Some(&kit.keys);
            let facts = Facts {
                keys: &keys,
                revocations: Revocations::Off,
                peer_cert: &|| None,
                dpop_first_use: &yes,
            };
            match decide(
                &audit,
                &facts,
                &mut state,
                &req,
                NOW,
                false,
                &mut Trace::default(),
            ) {
                Verdict::Allow { token: Some(t), .. } => t.phi_claims.clone(),
                v => panic!("{v:?}"),
            }
        };
        assert_eq!(names, ["email", "mrn"]);
    }

    #[test]
    fn sender_constrained_tokens_through_the_decision() {
        let kit = Kit::new();
        let holder = Signer::es256("holder", 11);
        let (_, jkt) = crate::jwks::client_key(&holder.jwk()).unwrap();
        let mut claims = kit.claims();
        claims["cnf"] = json!({ "jkt": jkt });
        let bound = kit.rs256.sign(&claims, &[]);
        let bearer = kit.rs256.sign(&kit.claims(), &[]);
        let policy = kit.policy_with(|d| {
            d["rules"] = json!(rules());
            d["rules"][1]["require_sender_constraint"] = json!(true);
        });
        let seen = std::cell::RefCell::new(std::collections::HashSet::new());
        let first = |jti: &[u8; 32], _: i64| seen.borrow_mut().insert(*jti);
        let proof = |n: u32| {
            holder.sign(
                &json!({"jti": format!("p{n}"), "htm": "GET", "htu": "https://fhir.example.org/fhir/Patient/1",
                        "iat": NOW, "ath": URL_SAFE_NO_PAD.encode(crate::token::sha256(bound.as_bytes()))}),
                &[("typ", json!("dpop+jwt")), ("jwk", holder.jwk())],
            )
        };
        let mut state = State::default();
        let dpop = |n: u32| Wire {
            dpop: vec![proof(n)],
            ..Wire::new("/fhir/Patient/1", format!("DPoP {bound}"))
        };
        assert_eq!(
            dpop(1).ask(&policy, &kit, &mut state, &first),
            Some(Reason::Ok)
        );
        // Cached now, and still held to a fresh proof each time.
        assert_eq!(
            dpop(1).ask(&policy, &kit, &mut state, &first),
            Some(Reason::DpopReplay)
        );
        assert_eq!(
            dpop(2).ask(&policy, &kit, &mut state, &first),
            Some(Reason::Ok)
        );
        let no_proof = Wire::new("/fhir/Patient/1", format!("DPoP {bound}"));
        assert_eq!(
            no_proof.ask(&policy, &kit, &mut state, &first),
            Some(Reason::InvalidDpopProof)
        );
        let as_bearer = Wire {
            dpop: vec![proof(3)],
            ..Wire::new("/fhir/Patient/1", format!("Bearer {bound}"))
        };
        assert_eq!(
            as_bearer.ask(&policy, &kit, &mut state, &first),
            Some(Reason::CnfMismatch)
        );
        // A bearer token where the rule demands a bound one.
        let plain = Wire::new("/fhir/Patient/1", format!("Bearer {bearer}"));
        assert_eq!(
            plain.ask(&policy, &kit, &mut state, &first),
            Some(Reason::SenderConstraintRequired)
        );
        // Refusals over the DPoP scheme are DPoP challenges naming the algorithms.
        let www = answer::deny(
            Reason::InvalidDpopProof,
            "r",
            challenge(None, Some(&policy.dpop_algs), None),
        )
        .www_authenticate
        .unwrap();
        assert_eq!(
            www,
            "DPoP error=\"invalid_dpop_proof\", algs=\"RS256 PS256 ES256 ES384 EdDSA\""
        );
    }

    /// A source's failed signatures use up its budget; then its uncached
    /// tokens, good ones too, are refused unchecked, while cached tokens,
    /// other sources, cheaper refusals and the next second are unaffected.
    #[test]
    fn verification_budget_per_source() {
        let kit = Kit::new();
        let policy = kit.policy(&rules());
        let mut state = State {
            cache: TokenCache::new(100),
            budget: VerificationBudget::new(3),
            introspection: Vec::new(),
        };
        let keys = |_: usize| Some(&kit.keys);
        let mut ask = |token: &str, source: &str, now: i64| {
            let auth = format!("Bearer {token}");
            let auth = [auth.as_str()];
            let req = Request {
                method: "GET",
                path: "/fhir/Patient/1",
                authorization: &auth,
                source: Some(source),
                tls_version: Some("TLSv1.3"),
                forwarded_proto: None,
                scheme: "https",
                authority: "fhir.example.org",
                dpop: &[],
                body: Body::Unread,
            };
            let v = decide(
                &policy,
                &Facts {
                    keys: &keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                now,
                false,
                &mut Trace::default(),
            );
            reason(&v)
        };
        let good = |n: u64| {
            let mut c = kit.claims();
            c["jti"] = format!("good-{n}").into();
            kit.es256.sign(&c, &[])
        };
        let forged = |n: u64| {
            let mut c = kit.claims();
            c["jti"] = format!("forged-{n}").into();
            let t = kit.es256.sign(&c, &[]);
            let (signed, _) = t.rsplit_once('.').unwrap();
            let other = Signer::es256(&kit.es256.kid, 9).sign(&c, &[]);
            format!("{signed}.{}", other.rsplit_once('.').unwrap().1)
        };
        let (a, b) = ("203.0.113.7:4000", "198.51.100.2:4000");
        let cached = good(0);
        assert_eq!(ask(&cached, a, NOW), Some(Reason::Ok));
        for n in 0..3 {
            assert_eq!(ask(&forged(n), a, NOW), Some(Reason::InvalidSignature));
        }
        assert_eq!(
            ask(&forged(3), a, NOW),
            Some(Reason::VerificationRateLimited)
        );
        // Refused unchecked, however good.
        assert_eq!(ask(&good(1), a, NOW), Some(Reason::VerificationRateLimited));
        // Another port of the same address is the same source.
        assert_eq!(
            ask(&good(1), "203.0.113.7:9", NOW),
            Some(Reason::VerificationRateLimited)
        );
        // Cached tokens need no check; cheaper refusals keep their reason.
        assert_eq!(ask(&cached, a, NOW), Some(Reason::Ok));
        let mut wrong_aud = kit.claims();
        wrong_aud["aud"] = "https://elsewhere.example".into();
        assert_eq!(
            ask(&kit.es256.sign(&wrong_aud, &[]), a, NOW),
            Some(Reason::WrongAudience)
        );
        // Other sources are not held to a's budget.
        assert_eq!(ask(&good(2), b, NOW), Some(Reason::Ok));
        assert_eq!(ask(&forged(4), b, NOW), Some(Reason::InvalidSignature));
        // The next second, a starts afresh.
        assert_eq!(ask(&good(1), a, NOW + 1), Some(Reason::Ok));
        assert_eq!(ask(&forged(5), a, NOW + 1), Some(Reason::InvalidSignature));

        // Off: forged tokens are all checked, and all fail as forged.
        let mut off = State::default();
        for n in 10..60 {
            let auth = format!("Bearer {}", forged(n));
            let auth = [auth.as_str()];
            let req = Request {
                method: "GET",
                path: "/fhir/Patient/1",
                authorization: &auth,
                source: Some(a),
                tls_version: Some("TLSv1.3"),
                forwarded_proto: None,
                scheme: "https",
                authority: "fhir.example.org",
                dpop: &[],
                body: Body::Unread,
            };
            let v = decide(
                &policy,
                &Facts {
                    keys: &keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut off,
                &req,
                NOW,
                false,
                &mut Trace::default(),
            );
            assert_eq!(reason(&v), Some(Reason::InvalidSignature));
        }
    }

    /// The list applies to every token, cached ones too; how fresh it must
    /// be depends on the rule: sensitive ones fail closed without a list in
    /// force, others go on with the last list, or none.
    #[test]
    fn revocation_by_freshness_and_rule() {
        let kit = Kit::new();
        let mut rules = rules();
        rules.push(
            json!({"id": "lab-read", "methods": ["GET"], "path": "/labs/{id}",
            "scopes": ["read:patient-profile"], "sensitive": true}),
        );
        let policy = kit.policy(&rules);
        let revoked_list = RevocationList::parse(br#"{"sub": ["user-gone"]}"#).unwrap();
        let keys = |_: usize| Some(&kit.keys);
        let mut state = State {
            cache: TokenCache::new(10),
            budget: VerificationBudget::new(0),
            introspection: Vec::new(),
        };
        let gone = {
            let mut c = kit.claims();
            c["sub"] = "user-gone".into();
            format!("Bearer {}", kit.rs256.sign(&c, &[]))
        };
        let fine = format!("Bearer {}", kit.rs256.sign(&kit.claims(), &[]));
        let mut ask = |token: &str, path: &str, revocations, may_wait| {
            let auth = [token];
            let req = Request {
                method: "GET",
                path,
                authorization: &auth,
                source: None,
                tls_version: Some("TLSv1.3"),
                forwarded_proto: None,
                scheme: "https",
                authority: "fhir.example.org",
                dpop: &[],
                body: Body::Unread,
            };
            let facts = Facts {
                keys: &keys,
                revocations,
                peer_cert: &|| None,
                dpop_first_use: &|_, _| true,
            };
            let v = decide(
                &policy,
                &facts,
                &mut state,
                &req,
                NOW,
                may_wait,
                &mut Trace::default(),
            );
            match v {
                Verdict::Wait(w) => Err(w),
                v => Ok(reason(&v)),
            }
        };
        use Revocations::*;
        let ok = Ok(Some(Reason::Ok));
        let revoked = Ok(Some(Reason::Revoked));
        let closed = Ok(Some(Reason::RevocationUnavailable));
        let (normal, sensitive) = ("/fhir/Patient/1", "/labs/1");
        // Twice each: the second time the token comes from the cache.
        for _ in 0..2 {
            for (revocations, path, token, may_wait, want) in [
                (Off, normal, &gone, true, ok),
                (Fresh(&revoked_list), normal, &gone, true, revoked),
                (Fresh(&revoked_list), sensitive, &gone, true, revoked),
                (Fresh(&revoked_list), normal, &fine, true, ok),
                (Fresh(&revoked_list), sensitive, &fine, true, ok),
                (Stale(&revoked_list), normal, &gone, true, revoked),
                (Stale(&revoked_list), normal, &fine, true, ok),
                (Stale(&revoked_list), sensitive, &fine, true, closed),
                (Unavailable, normal, &gone, true, ok),
                (Unavailable, sensitive, &fine, true, closed),
                (Pending, normal, &fine, false, ok),
                (Pending, sensitive, &fine, false, closed),
            ] {
                assert_eq!(ask(token, path, revocations, may_wait), want, "{path}");
            }
            assert_eq!(ask(&fine, normal, Pending, true), Err(WaitFor::Revocations));
        }
    }

    /// An `introspect` rule: a JWT that passed every other check is asked
    /// about (wait, then the kept answer decides); an opaque token is known
    /// by the answer alone, and only there.
    #[test]
    fn introspect_rules() {
        let kit = Kit::new();
        let introspection = json!({"uri": "http://as/introspect", "cluster": "as",
            "client_id": "phi-guard", "client_secret_env": "AS_SECRET"});
        let policy = kit.policy_with(|p| {
            p["providers"][0]["introspection"] = introspection.clone();
            p["rules"] = json!([
                {"id": "read", "methods": ["GET"], "path": "/fhir/Patient/{id}", "scopes": ["read:patient-profile"]},
                {"id": "labs", "methods": ["GET"], "path": "/labs/{id}", "scopes": ["read:patient-profile"], "introspect": true},
            ]);
            p["revocation"] = json!({"uri": "http://lists/revoked", "cluster": "lists"});
        });
        let list = RevocationList::parse(br#"{"sub": ["user-gone"]}"#).unwrap();
        let keys = |_: usize| Some(&kit.keys);
        let mut state = State::new(&policy);
        let ask = |state: &mut State, token: &str, path: &str, may_wait: bool| {
            let auth = format!("Bearer {token}");
            let auth = [auth.as_str()];
            let req = Request {
                method: "GET",
                path,
                authorization: &auth,
                source: None,
                tls_version: Some("TLSv1.3"),
                forwarded_proto: None,
                scheme: "https",
                authority: "fhir.example.org",
                dpop: &[],
                body: Body::Unread,
            };
            let facts = Facts {
                keys: &keys,
                revocations: Revocations::Fresh(&list),
                peer_cert: &|| None,
                dpop_first_use: &|_, _| true,
            };
            let mut trace = Trace::default();
            let v = decide(&policy, &facts, state, &req, NOW, may_wait, &mut trace);
            (v, trace.introspection_cache_hit)
        };
        let answer = |state: &mut State, token: &str, doc: serde_json::Value| {
            let parsed = introspection::Introspection::parse(doc.to_string().as_bytes()).unwrap();
            let outcome = introspection::judge(&parsed, &policy, 0, token, NOW);
            state.introspection[0].insert(introspection::key(token), outcome, NOW, 30);
        };
        let reason_of = |(v, _): &(Verdict, Option<bool>)| reason(v);
        let (normal, labs) = ("/fhir/Patient/1", "/labs/1");

        // A JWT: verified, then asked about.
        let jwt = kit.rs256.sign(&kit.claims(), &[]);
        assert_eq!(
            reason_of(&ask(&mut state, &jwt, normal, true)),
            Some(Reason::Ok)
        );
        let (v, hit) = ask(&mut state, &jwt, labs, true);
        assert!(
            matches!(v, Verdict::Wait(WaitFor::Introspection { provider: 0, key }) if key == introspection::key(&jwt)),
            "{v:?}"
        );
        assert_eq!(hit, Some(false));
        let (v, hit) = ask(&mut state, &jwt, labs, false);
        assert_eq!(
            (reason(&v), hit),
            (Some(Reason::IntrospectionUnavailable), Some(false))
        );
        assert!(
            matches!(v, Verdict::Deny { token: Some(_), .. }),
            "the audit names the token"
        );
        answer(
            &mut state,
            &jwt,
            json!({"active": true, "sub": "someone-else", "scope": "x"}),
        );
        let (v, hit) = ask(&mut state, &jwt, labs, true);
        assert_eq!(hit, Some(true));
        let Verdict::Allow { token: Some(t), .. } = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            t.sub.as_deref(),
            Some("user-1"),
            "a JWT keeps its own identity"
        );
        // Inactive, or refused on the answer's claims.
        let mut c = kit.claims();
        c["jti"] = "j-inactive".into();
        let inactive = kit.es256.sign(&c, &[]);
        answer(&mut state, &inactive, json!({"active": false}));
        assert_eq!(
            reason_of(&ask(&mut state, &inactive, labs, true)),
            Some(Reason::Inactive)
        );
        assert_eq!(
            reason_of(&ask(&mut state, &inactive, normal, true)),
            Some(Reason::Ok)
        );
        c["jti"] = "j-aud".into();
        let aud = kit.es256.sign(&c, &[]);
        answer(
            &mut state,
            &aud,
            json!({"active": true, "aud": "https://elsewhere"}),
        );
        assert_eq!(
            reason_of(&ask(&mut state, &aud, labs, true)),
            Some(Reason::WrongAudience)
        );
        // A JWT failing its own checks, or revoked, is never asked about.
        let mut expired = kit.claims();
        expired["exp"] = (NOW - 100).into();
        expired["iat"] = (NOW - 200).into();
        for (token, want) in [
            (kit.rs256.sign(&expired, &[]), Reason::Expired),
            (
                flip_last_sig_char(&kit.rs256.sign(&kit.claims(), &[])),
                Reason::InvalidSignature,
            ),
            ("a.b.c".to_string(), Reason::Malformed),
        ] {
            let (v, hit) = ask(&mut state, &token, labs, true);
            assert_eq!((reason(&v), hit), (Some(want), None), "{token}");
        }
        let mut gone = kit.claims();
        gone["sub"] = "user-gone".into();
        let gone = kit.rs256.sign(&gone, &[]);
        let (v, hit) = ask(&mut state, &gone, labs, true);
        assert_eq!((reason(&v), hit), (Some(Reason::Revoked), None));

        // An opaque token: malformed except on an introspect rule.
        let opaque = "2YotnFZFEjr1zCsicMWpAA";
        assert_eq!(
            reason_of(&ask(&mut state, opaque, normal, true)),
            Some(Reason::Malformed)
        );
        let (v, _) = ask(&mut state, opaque, labs, true);
        assert!(
            matches!(v, Verdict::Wait(WaitFor::Introspection { provider: 0, .. })),
            "{v:?}"
        );
        assert_eq!(
            reason_of(&ask(&mut state, opaque, labs, false)),
            Some(Reason::IntrospectionUnavailable)
        );
        answer(
            &mut state,
            opaque,
            json!({"active": true, "sub": "nurse-7", "client_id": "ward-app",
            "scope": "read:patient-profile", "exp": NOW + 300, "iss": ISS, "aud": AUD}),
        );
        let (v, _) = ask(&mut state, opaque, labs, true);
        let Verdict::Allow { token: Some(t), .. } = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            (t.sub.as_deref(), t.client_id.as_deref()),
            (Some("nurse-7"), Some("ward-app"))
        );
        assert_eq!(t.fingerprint, token::fingerprint(opaque));
        for (token, doc, want) in [
            (
                "opaque-narrow",
                json!({"active": true, "scope": "read:other"}),
                Reason::InsufficientScope,
            ),
            (
                "opaque-inactive",
                json!({"active": false}),
                Reason::Inactive,
            ),
            (
                "opaque-gone",
                json!({"active": true, "sub": "user-gone", "scope": "read:patient-profile"}),
                Reason::Revoked,
            ),
            (
                "opaque-expired",
                json!({"active": true, "exp": NOW - 61}),
                Reason::Expired,
            ),
            (
                "opaque-aud",
                json!({"active": true, "aud": ["x"]}),
                Reason::WrongAudience,
            ),
            (
                "opaque.jwe.has.five-parts",
                json!({"active": true, "scope": "read:patient-profile"}),
                Reason::Ok,
            ),
        ] {
            answer(&mut state, token, doc);
            assert_eq!(
                reason_of(&ask(&mut state, token, labs, true)),
                Some(want),
                "{token}"
            );
        }
    }

    /// With two introspecting providers an opaque token needs the rule to
    /// name one; a rule naming one, or a provider that cannot be asked,
    /// refuses other providers' JWTs.
    #[test]
    fn introspect_rules_and_providers() {
        let kit = Kit::new();
        let introspection = json!({"uri": "http://as/introspect", "cluster": "as",
            "client_id": "phi-guard", "client_secret_env": "AS_SECRET"});
        let provider = |name: &str, iss: &str, introspects: bool| {
            let mut p = json!({"name": name, "issuer": iss, "audiences": [AUD],
                "algorithms": ["RS256", "ES256"], "jwks": {"uri": "http://idp/jwks", "cluster": "idp"}});
            if introspects {
                p["introspection"] = introspection.clone();
            }
            p
        };
        let policy = kit.policy_with(|p| {
            p["providers"] = json!([
                provider("idp", ISS, true),
                provider("other", "https://other.example", true),
                provider("plain", "https://plain.example", false),
            ]);
            p["rules"] = json!([
                {"id": "any", "path": "/any", "introspect": true},
                {"id": "named", "path": "/named", "introspect": true, "provider": "other"},
            ]);
        });
        let keys = |_: usize| Some(&kit.keys);
        let mut state = State::new(&policy);
        let mut ask = |token: &str, path: &str| {
            let auth = format!("Bearer {token}");
            let auth = [auth.as_str()];
            let req = Request {
                method: "GET",
                path,
                authorization: &auth,
                source: None,
                tls_version: Some("TLSv1.3"),
                forwarded_proto: None,
                scheme: "https",
                authority: "fhir.example.org",
                dpop: &[],
                body: Body::Unread,
            };
            let facts = Facts {
                keys: &keys,
                revocations: Revocations::Off,
                peer_cert: &|| None,
                dpop_first_use: &|_, _| true,
            };
            decide(
                &policy,
                &facts,
                &mut state,
                &req,
                NOW,
                true,
                &mut Trace::default(),
            )
        };
        let opaque = "opaque-token";
        assert_eq!(reason(&ask(opaque, "/any")), Some(Reason::Malformed));
        assert!(matches!(
            ask(opaque, "/named"),
            Verdict::Wait(WaitFor::Introspection { provider: 1, .. })
        ));
        let from = |iss: &str| {
            let mut c = kit.claims();
            c["iss"] = iss.into();
            kit.rs256.sign(&c, &[])
        };
        assert!(matches!(
            ask(&from(ISS), "/any"),
            Verdict::Wait(WaitFor::Introspection { provider: 0, .. })
        ));
        assert!(matches!(
            ask(&from("https://other.example"), "/any"),
            Verdict::Wait(WaitFor::Introspection { provider: 1, .. })
        ));
        assert_eq!(
            reason(&ask(&from(ISS), "/named")),
            Some(Reason::UnknownIssuer)
        );
        assert_eq!(
            reason(&ask(&from("https://plain.example"), "/any")),
            Some(Reason::UnknownIssuer)
        );
    }

    #[test]
    fn waiting_and_cache() {
        let kit = Kit::new();
        let policy = kit.policy(&rules());
        let token = format!("Bearer {}", kit.rs256.sign(&kit.claims(), &[]));
        let auth = [token.as_str()];
        let req = Request {
            method: "GET",
            path: "/fhir/Patient/1",
            authorization: &auth,
            source: None,
            tls_version: Some("TLSv1.3"),
            forwarded_proto: None,
            scheme: "https",
            authority: "fhir.example.org",
            dpop: &[],
            body: Body::Unread,
        };
        let mut state = State {
            cache: TokenCache::new(10),
            budget: VerificationBudget::new(0),
            introspection: Vec::new(),
        };
        let mut trace = Trace::default();
        let no_keys = |_: usize| None;
        assert!(matches!(
            decide(
                &policy,
                &Facts {
                    keys: &no_keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                NOW,
                true,
                &mut trace
            ),
            Verdict::Wait(WaitFor::Keys {
                provider: 0,
                unknown_kid: false
            })
        ));
        let v = decide(
            &policy,
            &Facts {
                keys: &no_keys,
                revocations: Revocations::Off,
                peer_cert: &|| None,
                dpop_first_use: &|_, _| true,
            },
            &mut state,
            &req,
            NOW,
            false,
            &mut trace,
        );
        assert_eq!(reason(&v), Some(Reason::KeysUnavailable));
        let keys = |_: usize| Some(&kit.keys);
        assert_eq!(
            reason(&decide(
                &policy,
                &Facts {
                    keys: &keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                NOW,
                true,
                &mut trace
            )),
            Some(Reason::Ok)
        );
        assert_eq!(trace.token_cache_hit, Some(false));
        // A hit still needs the provider's keys to be usable (README: past
        // max_stale_seconds requests get 503) ...
        assert!(matches!(
            decide(
                &policy,
                &Facts {
                    keys: &no_keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                NOW,
                true,
                &mut trace
            ),
            Verdict::Wait(WaitFor::Keys {
                provider: 0,
                unknown_kid: false
            })
        ));
        assert_eq!(trace.token_cache_hit, Some(true));
        assert_eq!(
            reason(&decide(
                &policy,
                &Facts {
                    keys: &no_keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                NOW,
                false,
                &mut trace
            )),
            Some(Reason::KeysUnavailable)
        );
        // ... is answered from the cache with them, and still ages.
        assert_eq!(
            reason(&decide(
                &policy,
                &Facts {
                    keys: &keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                NOW,
                true,
                &mut trace
            )),
            Some(Reason::Ok)
        );
        assert_eq!(trace.token_cache_hit, Some(true));
        assert_eq!(
            reason(&decide(
                &policy,
                &Facts {
                    keys: &keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                NOW + 661,
                true,
                &mut trace
            )),
            Some(Reason::Expired)
        );
        // Unknown kid.
        let t = format!(
            "Bearer {}",
            kit.rs256.sign(&kit.claims(), &[("kid", "new".into())])
        );
        let auth = [t.as_str()];
        let req = Request {
            authorization: &auth,
            ..req
        };
        assert!(matches!(
            decide(
                &policy,
                &Facts {
                    keys: &keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                NOW,
                true,
                &mut trace
            ),
            Verdict::Wait(WaitFor::Keys {
                provider: 0,
                unknown_kid: true
            })
        ));
        assert_eq!(
            reason(&decide(
                &policy,
                &Facts {
                    keys: &keys,
                    revocations: Revocations::Off,
                    peer_cert: &|| None,
                    dpop_first_use: &|_, _| true,
                },
                &mut state,
                &req,
                NOW,
                false,
                &mut trace
            )),
            Some(Reason::UnknownKey)
        );
    }

    #[test]
    fn forwarding_and_challenges() {
        let kit = Kit::new();
        let policy = kit.policy_with(|p| {
            p["claims_to_headers"] = json!({"sub": "x-phi-subject", "scopes": "x-phi-scopes", "rule": "x-phi-rule", "acr": "x-phi-acr"});
            p["rules"] = json!(rules());
        });
        let mut c = kit.claims();
        c["sub"] = "evil\r\nx: y".into();
        let v =
            token::verify(&policy, &|_| Some(&kit.keys), &kit.es256.sign(&c, &[]), NOW).unwrap();
        let rule = &policy.rules[1];
        let got = forwarded_headers(&policy, rule, Some(&v));
        assert_eq!(
            got,
            vec![
                ("x-phi-rule", "patient-read".to_string()),
                ("x-phi-scopes", "read:patient-profile".to_string())
            ]
        );
        let ch = challenge(Some(&policy.rules[5]), None, None);
        assert_eq!(ch.scopes, ["export:bulk"]);
        assert_eq!(ch.acr_values, ["urn:mfa", "urn:hw"]);
        assert_eq!(ch.max_age, Some(300));
        assert_eq!(
            challenge(Some(&policy.rules[4]), None, None).scopes,
            ["docs:read", "docs:admin"]
        );
    }
}

/// Hostile input, generated: whatever arrives, `decide` answers (no panic),
/// and only the exact tokens the IdP signed get through.
#[cfg(test)]
mod hostile {
    use super::*;
    use crate::testkit::*;
    use proptest::prelude::*;
    use serde_json::json;
    use std::sync::OnceLock;

    struct Fixture {
        kit: Kit,
        policy: Policy,
        /// One valid token per key family.
        tokens: Vec<String>,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let kit = Kit::new();
            let policy = kit.policy(&[
                json!({"id": "open", "path": "/public/**", "public": true}),
                json!({"id": "read", "path": "/fhir/Patient/{id}", "scopes": ["read:patient-profile"]}),
            ]);
            let tokens = kit.signers().iter().map(|s| s.sign(&kit.claims(), &[])).collect();
            Fixture {
                kit,
                policy,
                tokens,
            }
        })
    }

    fn verdict(method: &str, path: &str, auth: &[&str]) -> Verdict {
        let f = fixture();
        let req = Request {
            method,
            path,
            authorization: auth,
            source: None,
            tls_version: Some("TLSv1.3"),
            forwarded_proto: None,
            scheme: "https",
            authority: "fhir.example.org",
            dpop: &[],
            body: Body::Unread,
        };
        decide(
            &f.policy,
            &Facts {
                keys: &|_| Some(&f.kit.keys),
                revocations: Revocations::Off,
                peer_cert: &|| None,
                dpop_first_use: &|_, _| true,
            },
            &mut State {
                cache: TokenCache::new(0),
                budget: VerificationBudget::new(0),
                introspection: Vec::new(),
            },
            &req,
            NOW,
            false,
            &mut Trace::default(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Each token still gets through unchanged (guards the test itself);
        /// with one to three bytes replaced (read as the host reads a header:
        /// lossy UTF-8) it never does.
        #[test]
        fn a_changed_token_never_gets_through(
            family in 0usize..5,
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let f = fixture();
            let token = f.tokens.get(family).cloned().unwrap_or_default();
            let ok = format!("Bearer {token}");
            let allowed = |v: &Verdict| matches!(v, Verdict::Allow { token: Some(_), .. });
            prop_assert!(allowed(&verdict("GET", "/fhir/Patient/1", &[ok.as_str()])));
            let mut bytes = token.clone().into_bytes();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                if let Some(b) = bytes.get_mut(i) {
                    *b = byte;
                }
            }
            let changed = String::from_utf8_lossy(&bytes).into_owned();
            prop_assume!(changed != token);
            let header = format!("Bearer {changed}");
            let v = verdict("GET", "/fhir/Patient/1", &[header.as_str()]);
            prop_assert!(!allowed(&v), "changed token allowed: {changed}");
        }

        /// Arbitrary methods, paths and Authorization values: always an
        /// answer, never an allow on the protected rule.
        #[test]
        fn arbitrary_requests_are_answered(
            method in "[A-Z]{0,8}|\\PC{0,8}",
            path in "/[ -~]{0,60}|\\PC{0,40}",
            auth in prop::collection::vec("\\PC{0,200}|[Bb]earer [A-Za-z0-9._~+/=-]{0,300}", 0..3),
        ) {
            let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
            let v = verdict(&method, &path, &auth);
            if let Verdict::Allow { rule, .. } = v {
                prop_assert_eq!(rule, 0, "only the public rule may allow without a real token");
            }
        }
    }
}

/// Requests made from the policy's own rules and tokens the IdP signed,
/// checked against a model of README "What a request goes through" (path
/// safety, rule, token, verification, token age, scopes, step-up). The
/// generator is made to reach every outcome, allow included, and counts them.
#[cfg(test)]
mod modelled {
    use super::*;
    use crate::testkit::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use serde_json::json;
    use std::sync::OnceLock;

    const READ: &str = "read:patient-profile";
    const BILL: &str = "update:billing";
    const LAB: &str = "delete:lab-results";
    const DOCS: &str = "docs:read";
    const EXPORT: &str = "export:bulk";

    fn rules() -> Vec<serde_json::Value> {
        vec![
            json!({"id": "health", "path": "/healthz", "public": true}),
            json!({"id": "export", "methods": ["GET"], "path": "/fhir/$export", "scopes": [EXPORT],
                   "step_up": {"acr_values": ["urn:mfa"], "amr_any": ["otp", "hwk"], "max_age_seconds": 300}}),
            json!({"id": "patient-read", "methods": ["GET"], "path": "/fhir/Patient/{id}", "scopes": [READ]}),
            json!({"id": "billing", "methods": ["PUT", "PATCH"], "path": "/billing/{account}", "scopes": [BILL]}),
            json!({"id": "lab-delete", "methods": ["DELETE"], "path": "/labs/{id}", "scopes": [LAB],
                   "max_token_age_seconds": 300}),
            json!({"id": "docs", "path": "/docs/{rest=**}", "scopes_any": [DOCS, "docs:admin"]}),
        ]
    }

    /// What a signed token says, for the model.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Age {
        Fresh,
        Old,
        NoIat,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum StepUp {
        None,
        Done,
        WrongAcr,
        WrongAmr,
        StaleAuth,
    }

    /// A token as sent, and the one thing wrong with it, if any.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Defect {
        None,
        Expired,
        WrongAudience,
        Tampered,
        UnknownKid,
        AlgNone,
        Garbage,
    }

    const SCOPE_SETS: [&[&str]; 7] = [
        &[],
        &[READ],
        &[BILL],
        &[LAB],
        &[DOCS],
        &[EXPORT],
        &[READ, BILL, LAB, DOCS, EXPORT],
    ];
    const AGES: [Age; 3] = [Age::Fresh, Age::Old, Age::NoIat];
    const STEP_UPS: [StepUp; 5] = [
        StepUp::None,
        StepUp::Done,
        StepUp::WrongAcr,
        StepUp::WrongAmr,
        StepUp::StaleAuth,
    ];

    struct Signed {
        token: String,
        scopes: &'static [&'static str],
        age: Age,
        step_up: StepUp,
        defect: Defect,
    }

    struct Fixture {
        kit: Kit,
        policy: Policy,
        tokens: Vec<Signed>,
    }

    fn claims(kit: &Kit, scopes: &[&str], age: Age, step_up: StepUp) -> serde_json::Value {
        let mut c = kit.claims();
        c["scope"] = scopes.join(" ").into();
        match age {
            Age::Fresh => {}
            Age::Old => {
                c["iat"] = (NOW - 400).into();
                c["exp"] = (NOW + 300).into();
            }
            Age::NoIat => {
                c.as_object_mut().unwrap().remove("iat");
            }
        }
        let (acr, amr, auth_time) = match step_up {
            StepUp::None => return c,
            StepUp::Done => ("urn:mfa", "otp", NOW - 100),
            StepUp::WrongAcr => ("urn:pwd", "otp", NOW - 100),
            StepUp::WrongAmr => ("urn:mfa", "pwd", NOW - 100),
            StepUp::StaleAuth => ("urn:mfa", "hwk", NOW - 400),
        };
        c["acr"] = acr.into();
        c["amr"] = json!([amr]);
        c["auth_time"] = auth_time.into();
        c
    }

    /// Every combination of scopes, age and step-up, signed by two families;
    /// then tokens wrong in one way each.
    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let kit = Kit::new();
            let policy = kit.policy(&rules());
            let mut tokens = Vec::new();
            for (i, scopes) in SCOPE_SETS.iter().enumerate() {
                for age in AGES {
                    for step_up in STEP_UPS {
                        let signer = if i % 2 == 0 { &kit.eddsa } else { &kit.rs256 };
                        let token = signer.sign(&claims(&kit, scopes, age, step_up), &[]);
                        tokens.push(Signed {
                            token,
                            scopes,
                            age,
                            step_up,
                            defect: Defect::None,
                        });
                    }
                }
            }
            let all = SCOPE_SETS[6];
            // Several copies each, so that each defect is drawn often enough.
            let mut bad = |defect, token: String| {
                for _ in 0..6 {
                    tokens.push(Signed {
                        token: token.clone(),
                        scopes: all,
                        age: Age::Fresh,
                        step_up: StepUp::Done,
                        defect,
                    });
                }
            };
            let good = claims(&kit, all, Age::Fresh, StepUp::Done);
            let mut expired = good.clone();
            expired["iat"] = (NOW - 800).into();
            expired["exp"] = (NOW - 100).into();
            bad(Defect::Expired, kit.eddsa.sign(&expired, &[]));
            let mut other_aud = good.clone();
            other_aud["aud"] = "https://other.example.org".into();
            bad(Defect::WrongAudience, kit.rs256.sign(&other_aud, &[]));
            bad(
                Defect::Tampered,
                flip_last_sig_char(&kit.eddsa.sign(&good, &[])),
            );
            bad(
                Defect::UnknownKid,
                kit.eddsa.sign(&good, &[("kid", "nobody".into())]),
            );
            bad(
                Defect::AlgNone,
                raw_token(
                    &json!({"alg": "none", "kid": kit.rs256.kid}),
                    &good.to_string(),
                    "",
                ),
            );
            bad(Defect::Garbage, "e30.bm90IGpzb24.c2ln".into());
            Fixture {
                kit,
                policy,
                tokens,
            }
        })
    }

    /// How a request is made from a rule.
    #[derive(Debug, Clone)]
    struct Case {
        /// Index into `rules()`, or past it for a path no rule has.
        rule: usize,
        /// The rule's own method, or one it does not list.
        wrong_method: bool,
        segments: Vec<String>,
        /// Made ambiguous: a `..` encoded, an encoded `/`, an empty segment.
        unsafe_part: Option<&'static str>,
        /// An extra segment after the template's last.
        extra: bool,
        query: Option<&'static str>,
        auth: Auth,
    }

    #[derive(Debug, Clone)]
    enum Auth {
        None,
        Bearer(usize),
        Two(usize),
        Basic,
        WithSpace,
    }

    fn case() -> impl Strategy<Value = Case> {
        let n = fixture().tokens.len();
        let auth = prop_oneof![
            1 => Just(Auth::None),
            8 => (0..n).prop_map(Auth::Bearer),
            1 => (0..n).prop_map(Auth::Two),
            1 => Just(Auth::Basic),
            1 => Just(Auth::WithSpace),
        ];
        (
            // The step-up rule three times over: it has the most ways to end.
            prop::sample::select(vec![0usize, 1, 1, 1, 2, 3, 4, 5, 6]),
            prop::bool::weighted(0.1),
            prop::collection::vec("[a-z0-9]{1,6}", 1..4),
            prop::option::weighted(0.08, prop::sample::select(vec!["%2e%2e", "a%2Fb", ""])),
            prop::bool::weighted(0.08),
            prop::option::weighted(0.2, prop::sample::select(vec!["x=1", "access_token=abc"])),
            auth,
        )
            .prop_map(
                |(rule, wrong_method, segments, unsafe_part, extra, query, auth)| Case {
                    rule,
                    wrong_method,
                    segments,
                    unsafe_part,
                    extra,
                    query,
                    auth,
                },
            )
    }

    /// The request a case makes: method, path with query, Authorization values.
    fn request(c: &Case) -> (String, String, Vec<String>) {
        let seg = |i: usize| c.segments[i % c.segments.len()].clone();
        let (methods, mut segs): (&[&str], Vec<String>) = match c.rule {
            0 => (&["GET", "HEAD"], vec!["healthz".into()]),
            1 => (&["GET"], vec!["fhir".into(), "$export".into()]),
            2 => (&["GET"], vec!["fhir".into(), "Patient".into(), seg(0)]),
            3 => (&["PUT", "PATCH"], vec!["billing".into(), seg(0)]),
            4 => (&["DELETE"], vec!["labs".into(), seg(0)]),
            5 => (
                &["GET", "POST"],
                [vec!["docs".to_string()], c.segments.clone()].concat(),
            ),
            _ => (
                &["GET"],
                [vec!["nothing".to_string()], c.segments.clone()].concat(),
            ),
        };
        let method = if c.wrong_method {
            "POST"
        } else {
            methods[seg(1).len() % methods.len()]
        };
        if c.extra {
            segs.push(seg(2));
        }
        if let Some(part) = c.unsafe_part {
            // First, so "" is an empty segment ("//x"), not a trailing slash.
            segs.insert(0, part.into());
        }
        let mut path = format!("/{}", segs.join("/"));
        if let Some(q) = c.query {
            path = format!("{path}?{q}");
        }
        let tokens = &fixture().tokens;
        let auth = match &c.auth {
            Auth::None => vec![],
            Auth::Bearer(i) => vec![format!("Bearer {}", tokens[*i].token)],
            Auth::Two(i) => vec![format!("Bearer {}", tokens[*i].token); 2],
            Auth::Basic => vec!["Basic dXNlcjpwdw==".into()],
            Auth::WithSpace => vec!["Bearer a b".into()],
        };
        (method.to_owned(), path, auth)
    }

    /// The model: which rule (by id), then what the README says of the request.
    fn expect(c: &Case, method: &str) -> (Reason, Option<&'static str>) {
        if c.unsafe_part.is_some() {
            return (Reason::BadPath, None);
        }
        // Which rule the path and method land on (first match wins; these never overlap).
        let rule = match (c.rule, c.extra) {
            (0, false) => Some("health"),
            (1, false) if method == "GET" => Some("export"),
            (2, false) if method == "GET" => Some("patient-read"),
            (3, false) if ["PUT", "PATCH"].contains(&method) => Some("billing"),
            (4, false) if method == "DELETE" => Some("lab-delete"),
            (5, _) => Some("docs"),
            _ => None,
        };
        let Some(rule) = rule else {
            return (Reason::NoRule, None);
        };
        if rule == "health" {
            return (Reason::Ok, Some(rule));
        }
        let token = match &c.auth {
            Auth::None | Auth::Basic => return (Reason::MissingToken, Some(rule)),
            Auth::Two(_) | Auth::WithSpace => return (Reason::InvalidRequest, Some(rule)),
            Auth::Bearer(i) => &fixture().tokens[*i],
        };
        if c.query == Some("access_token=abc") {
            return (Reason::InvalidRequest, Some(rule));
        }
        let refused = match token.defect {
            Defect::None => None,
            Defect::Expired => Some(Reason::Expired),
            Defect::WrongAudience => Some(Reason::WrongAudience),
            Defect::Tampered => Some(Reason::InvalidSignature),
            Defect::UnknownKid => Some(Reason::UnknownKey),
            Defect::AlgNone => Some(Reason::AlgNotAllowed),
            Defect::Garbage => Some(Reason::Malformed),
        };
        if let Some(reason) = refused {
            return (reason, Some(rule));
        }
        let has = |s: &str| token.scopes.contains(&s);
        let outcome = match rule {
            "lab-delete" if token.age != Age::Fresh => Reason::TokenTooOld,
            "patient-read" if !has(READ) => Reason::InsufficientScope,
            "billing" if !has(BILL) => Reason::InsufficientScope,
            "lab-delete" if !has(LAB) => Reason::InsufficientScope,
            "docs" if !has(DOCS) => Reason::InsufficientScope,
            "export" if !has(EXPORT) => Reason::InsufficientScope,
            "export" => match token.step_up {
                StepUp::None | StepUp::WrongAcr => Reason::StepUpRequired(StepUpFailure::Acr),
                StepUp::WrongAmr => Reason::StepUpRequired(StepUpFailure::Amr),
                StepUp::StaleAuth => Reason::StepUpRequired(StepUpFailure::Age),
                StepUp::Done => Reason::Ok,
            },
            _ => Reason::Ok,
        };
        (outcome, Some(rule))
    }

    /// Runs a case through `decide` and the model; the outcome, for counting.
    fn check(c: &Case) -> Result<(Reason, Option<&'static str>), TestCaseError> {
        let f = fixture();
        let (method, path, auth) = request(c);
        let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
        let req = Request {
            method: &method,
            path: &path,
            authorization: &auth,
            source: None,
            tls_version: Some("TLSv1.3"),
            forwarded_proto: None,
            scheme: "https",
            authority: "fhir.example.org",
            dpop: &[],
            body: Body::Unread,
        };
        let verdict = decide(
            &f.policy,
            &Facts {
                keys: &|_| Some(&f.kit.keys),
                revocations: Revocations::Off,
                peer_cert: &|| None,
                dpop_first_use: &|_, _| true,
            },
            &mut State::default(),
            &req,
            NOW,
            false,
            &mut Trace::default(),
        );
        let rule_id =
            |i: &Option<usize>| i.and_then(|i| f.policy.rules.get(i)).map(|r| r.id.as_str());
        let got = match &verdict {
            Verdict::Allow { rule, .. } => (Reason::Ok, rule_id(&Some(*rule))),
            Verdict::Deny { reason, rule, .. } => (*reason, rule_id(rule)),
            Verdict::Wait(_) | Verdict::NeedBody { .. } => {
                return Err(TestCaseError::fail("asked to wait when it may not"))
            }
        };
        let want = expect(c, &method);
        prop_assert_eq!(got, (want.0, want.1), "{} {} {:?}", method, path, auth);
        Ok(want)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn requests_from_the_policy_are_decided_as_the_readme_says(c in case()) {
            check(&c)?;
        }
    }

    #[test]
    fn generator_reaches_allow_and_every_deny_family() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for _ in 0..3000 {
            let c = case().new_tree(&mut runner).unwrap().current();
            let (reason, rule) = check(&c).unwrap();
            let name = match (reason, rule) {
                (Reason::Ok, Some("health")) => "allow public".to_string(),
                (Reason::Ok, Some(rule)) => format!("allow {rule}"),
                (Reason::StepUpRequired(f), _) => format!("step_up_required {}", f.code()),
                (reason, _) => reason.code().to_string(),
            };
            *counts.entry(name).or_default() += 1;
        }
        let mut want: Vec<String> = ["patient-read", "billing", "lab-delete", "docs", "export"]
            .iter()
            .map(|r| format!("allow {r}"))
            .collect();
        want.push("allow public".into());
        for reason in [
            Reason::BadPath,
            Reason::NoRule,
            Reason::MissingToken,
            Reason::InvalidRequest,
            Reason::Malformed,
            Reason::AlgNotAllowed,
            Reason::WrongAudience,
            Reason::Expired,
            Reason::UnknownKey,
            Reason::InvalidSignature,
            Reason::TokenTooOld,
            Reason::InsufficientScope,
        ] {
            want.push(reason.code().into());
        }
        for part in ["acr", "amr", "age"] {
            want.push(format!("step_up_required {part}"));
        }
        for name in want {
            let n = counts.get(&name).copied().unwrap_or(0);
            assert!(n >= 10, "{name}: reached {n} times in 3000: {counts:?}");
        }
    }
}
