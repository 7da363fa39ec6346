//! What a verdict comes to, for any host adapter: the reason, rule and token
//! it names, the request headers to change on allow, and the audit record of
//! the decision. Both adapters (proxy-wasm in `host/`, the dynamic module in
//! `native/`) call these, so they differ only in how they talk to Envoy.

use std::rc::Rc;

use crate::answer::Reason;
use crate::audit::{self, AuditRecord};
use crate::binding::Binding;
use crate::config::{Policy, Rule};
use crate::decision::{self, Request, Verdict, WaitFor};
use crate::fhir;
use crate::token::{self, VerifiedToken};

/// The reason, rule and token of a final verdict. A `Wait` only gets here
/// if the core asked to wait when told it may not: it is then refused as
/// what it waited for being unavailable.
pub fn settle(verdict: &Verdict) -> (Reason, Option<usize>, Option<Rc<VerifiedToken>>) {
    match verdict {
        Verdict::Allow { rule, token, .. } => (Reason::Ok, Some(*rule), token.clone()),
        Verdict::Deny {
            reason,
            rule,
            token,
        } => (*reason, *rule, token.clone()),
        Verdict::Wait(WaitFor::Keys { .. }) => (Reason::KeysUnavailable, None, None),
        Verdict::Wait(WaitFor::Revocations) => (Reason::RevocationUnavailable, None, None),
        Verdict::Wait(WaitFor::Introspection { .. }) => {
            (Reason::IntrospectionUnavailable, None, None)
        }
        // A host that reads no body (the native module) refuses the search
        // rather than judge it on its query alone.
        Verdict::NeedBody { rule, token } => (Reason::BadFhirRequest, Some(*rule), token.clone()),
    }
}

/// Whether request header `name` is one of the identity headers phi-guard
/// sets: a client must never be able to set one.
pub fn is_identity_header(policy: &Policy, name: &[u8]) -> bool {
    policy
        .claims_to_headers
        .iter()
        .any(|(_, h)| h.as_bytes() == name)
}

/// The request headers to change on allow, in order (`None` removes): the
/// identity headers a client sent (`spoofed`) are dropped, ours added, and
/// the token removed unless it is forwarded (never on a public rule, which
/// ignores any token).
pub fn header_edits<'p>(
    policy: &'p Policy,
    rule: &Rule,
    token: Option<&VerifiedToken>,
    spoofed: bool,
    had_authorization: bool,
) -> Vec<(&'p str, Option<String>)> {
    let mut edits: Vec<(&'p str, Option<String>)> = Vec::new();
    if spoofed {
        for (_, header) in &policy.claims_to_headers {
            edits.push((header.as_str(), None));
        }
    }
    for (header, value) in decision::forwarded_headers(policy, rule, token) {
        edits.push((header, Some(value)));
    }
    if (!policy.forward_token || rule.public) && had_authorization {
        edits.push(("authorization", None));
    }
    edits
}

/// What the host saw of a request, for its audit record.
pub struct Seen<'a> {
    pub req: Request<'a>,
    /// `x-request-id`, if it is UTF-8.
    pub request_id: Option<&'a str>,
    /// The connection's TLS version, if any.
    pub tls: Option<String>,
    /// How the client proved possession of a bound token, if it did.
    pub binding: Option<Binding>,
    /// What the FHIR model saw of the request, if it is under the base path.
    pub fhir: Option<&'a fhir::Seen>,
    /// The launch patient's keyed fingerprint: never the id itself.
    pub patient_fp: Option<String>,
}

/// The audit record of a decision, before the status and chain are known.
pub fn draft(
    seen: Seen<'_>,
    reason: Reason,
    rule: Option<&Rule>,
    token: Option<&VerifiedToken>,
    policy: &Policy,
    now_ms: u64,
) -> AuditRecord {
    let Seen {
        req,
        request_id,
        tls,
        binding,
        fhir,
        patient_fp,
    } = seen;
    let token_fp = match (token, rule) {
        (Some(t), _) => Some(t.fingerprint.clone()),
        // A public rule ignores any token, so the record does not name one;
        // one sent over plaintext may have been seen, and is not named either.
        (None, Some(r)) if r.public => None,
        (None, _) if reason == Reason::InsecureTransport => None,
        (None, _) => token::extract_credentials(req.authorization)
            .ok()
            .flatten()
            .map(|(_, t)| token::fingerprint(t)),
    };
    let mut r = AuditRecord {
        ts: audit::rfc3339_millis(now_ms.saturating_mul(1_000_000)),
        request_id: request_id.map(str::to_owned),
        decision: if reason == Reason::Ok {
            "allow"
        } else {
            "deny"
        }
        .to_string(),
        reason: reason.code().to_string(),
        step_up: match reason {
            Reason::StepUpRequired(f) => Some(f.code().to_string()),
            _ => None,
        },
        rule: rule.map(|r| r.id.clone()),
        method: req.method.to_string(),
        path: String::new(),
        status: 0,
        iss: token
            .and_then(|t| policy.providers.get(t.provider))
            .map(|p| p.issuer.clone()),
        sub: token.and_then(|t| t.sub.clone()),
        client_id: token.and_then(|t| t.client_id.clone().or_else(|| t.azp.clone())),
        jti: token.and_then(|t| t.jti.clone()),
        token_fp,
        scopes_granted: token
            .map(|t| t.scopes.iter().map(str::to_owned).collect())
            .unwrap_or_default(),
        // A rule's scopes, or the narrowest SMART scopes the FHIR model judged.
        scopes_required: rule
            .into_iter()
            .flat_map(|r| r.scopes.iter().chain(&r.scopes_any))
            .chain(fhir.into_iter().flat_map(|s| &s.scopes))
            .cloned()
            .collect(),
        acr: token.and_then(|t| t.acr.clone()),
        amr: token.map(|t| t.amr.clone()).unwrap_or_default(),
        source: req.source.map(str::to_owned),
        // Always there: "none" says plaintext as plainly as a version says TLS.
        tls: Some(tls.unwrap_or_else(|| "none".to_string())),
        binding: binding.map(|b| b.code().to_string()),
        phi_claims: token.map(|t| t.phi_claims.clone()).unwrap_or_default(),
        fhir_interaction: fhir.map(|s| s.interaction.code().to_string()),
        fhir_type: fhir.and_then(|s| s.kind.clone()),
        patient_fp,
        vm: String::new(),
        seq: 0,
        chain: String::new(),
    };
    r.set_path(req.path);
    r
}
