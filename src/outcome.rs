//! What a verdict comes to, for any host adapter: the reason, rule and token
//! it names and the request headers to change on allow (its audit record is
//! [`crate::audit::draft`]'s). Both adapters (proxy-wasm in `host/`, the dynamic module in
//! `native/`) call these, so they differ only in how they talk to Envoy.

use std::rc::Rc;

use crate::answer::Reason;
use crate::config::{Policy, Rule};
use crate::decision::{self, Verdict, WaitFor};
use crate::token::VerifiedToken;

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
