//! The per-request context: read the request, ask the core, answer or
//! continue, and write the audit record into filter state for the access log.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::answer::{self, Reason};
use crate::audit::{self, AuditRecord};
use crate::binding::Binding;
use crate::config::Policy;
use crate::decision::{self, Request, Trace, Verdict, WaitFor};
use crate::fhir::{self, Body};
use crate::outcome;
use crate::pairs;
use crate::token::{self, VerifiedToken};

use super::abi;
use super::metrics;
use super::worker::{now_ms, Awaited, Waiter, Worker};

/// Filter-state name the access log reads as `%FILTER_STATE(wasm.phi_guard.audit:PLAIN)%`.
const AUDIT_PROPERTY: &str = "phi_guard.audit";

/// What a request needs while it is decided, possibly across waits for
/// documents (keys, the first revocation list) and an introspection answer.
#[derive(Default)]
pub struct Pending {
    /// The client sent a header named like one of the identity headers.
    spoofed: bool,
    method: String,
    path: String,
    authorization: Vec<String>,
    request_id: Option<String>,
    /// Envoy's `source.address`: the verification budget's key and the record's `source`.
    source: Option<String>,
    /// Envoy's `connection.tls_version`; `None` over plaintext.
    tls: Option<String>,
    /// `:scheme`, `:authority`, `x-forwarded-proto` and every `DPoP` header:
    /// what transport and sender-binding checks read.
    scheme: String,
    authority: String,
    forwarded_proto: Option<String>,
    dpop: Vec<String>,
    /// How the client proved possession of its token's key or certificate.
    binding: Option<Binding>,
    record: Option<AuditRecord>,
    sealed: bool,
    paused: bool,
    /// Paused for keys at least once (counted as a key-cache miss then).
    waited: bool,
    /// Paused for an introspection answer (counted as a miss then).
    waited_for_answer: bool,
    /// What this request waited for; each is waited for once.
    waited_on: Vec<Awaited>,
    /// The DPoP proof this request already had accepted: deciding it again
    /// (after a wait, or with its body) is not a replay.
    dpop_accepted: Cell<Option<[u8; 32]>>,
    /// The request's `content-type`, for a FHIR `_search` form body.
    content_type: Option<String>,
    body: BodyRead,
    /// Paused until the whole body is here: the core asked for it.
    awaiting_body: bool,
    /// The headers went on ahead of the body the core asked for (with the
    /// identity headers set): its caches were counted then.
    headers_sent: bool,
}

/// What was read of the request body: only ever a FHIR `_search`'s, which
/// the core asks for ([`Verdict::NeedBody`]).
#[derive(Default)]
enum BodyRead {
    #[default]
    Unread,
    Read(Vec<u8>),
    /// Over `fhir::MAX_SEARCH_BODY`: the rest is not waited for.
    TooLarge,
    /// The host did not hand it over, or trailers followed it.
    Unreadable,
}

pub struct Filter {
    context_id: u32,
    /// `None` when the policy failed to load: every request is refused.
    worker: Option<Rc<RefCell<Worker>>>,
    pending: Rc<RefCell<Pending>>,
}

impl Filter {
    pub fn new(context_id: u32, worker: Option<Rc<RefCell<Worker>>>) -> Filter {
        Filter {
            context_id,
            worker,
            pending: Rc::new(RefCell::new(Pending::default())),
        }
    }
}

// Callouts (documents, introspection) are dispatched and answered in the root context only.
impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(worker) = self.worker.clone() else {
            let _ = abi::send_response(
                503,
                &[("content-type", "text/plain")],
                b"service unavailable\n",
            );
            return Action::Pause;
        };
        let mut w = worker.borrow_mut();
        let mut p = self.pending.borrow_mut();
        let headers = abi::header_pairs(MapType::HttpRequestHeaders).unwrap_or_default();
        let trust_xfp = w.policy.transport.trusted_forwarded_proto;
        let Pending {
            method,
            path,
            authorization,
            request_id,
            spoofed,
            scheme,
            authority,
            forwarded_proto,
            dpop,
            content_type,
            ..
        } = &mut *p;
        // Values may hold any byte but NUL/CR/LF; lossy text is safe here: a
        // replacement character fails the token and the path checks.
        let text = pairs::text;
        for (name, value) in pairs::iter(&headers) {
            match name {
                b":method" => *method = text(value),
                b":path" => *path = text(value),
                b"authorization" => authorization.push(text(value)),
                b"x-request-id" => *request_id = String::from_utf8(value.to_vec()).ok(),
                b":scheme" => *scheme = text(value),
                b":authority" => *authority = text(value),
                b"dpop" => dpop.push(text(value)),
                b"x-forwarded-proto" if trust_xfp => *forwarded_proto = Some(text(value)),
                b"content-type" => *content_type = Some(text(value)),
                other => *spoofed |= outcome::is_identity_header(&w.policy, other),
            }
        }
        if end_of_stream {
            p.body = BodyRead::Read(Vec::new());
        }
        p.source = property_string(&["source", "address"]);
        p.tls = property_string(&["connection", "tls_version"]);
        decide_or_park(&mut w, &mut p, self.context_id, &self.pending, now_ms())
    }

    /// Reads the body the core asked for (a FHIR `_search`'s form), held
    /// whole up to `fhir::MAX_SEARCH_BODY`, then decides again. Other bodies
    /// pass: a request paused on its headers gets none until it goes on.
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(worker) = self.worker.clone() else {
            return Action::Pause;
        };
        let mut w = worker.borrow_mut();
        let mut p = self.pending.borrow_mut();
        if !p.awaiting_body {
            return if p.paused {
                Action::Pause
            } else {
                Action::Continue
            };
        }
        if body_size > fhir::MAX_SEARCH_BODY {
            p.body = BodyRead::TooLarge;
        } else if !end_of_stream {
            return Action::Pause;
        } else {
            p.body = match abi::buffer(BufferType::HttpRequestBody, 0, body_size) {
                Ok(bytes) => BodyRead::Read(bytes.unwrap_or_default()),
                Err(_) => BodyRead::Unreadable,
            };
        }
        p.awaiting_body = false;
        decide_or_park(&mut w, &mut p, self.context_id, &self.pending, now_ms())
    }

    /// Trailers after a body the core waits for: a form never has them.
    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        let Some(worker) = self.worker.clone() else {
            return Action::Pause;
        };
        let mut w = worker.borrow_mut();
        let mut p = self.pending.borrow_mut();
        if !p.awaiting_body {
            return if p.paused {
                Action::Pause
            } else {
                Action::Continue
            };
        }
        p.body = BodyRead::Unreadable;
        p.awaiting_body = false;
        decide_or_park(&mut w, &mut p, self.context_id, &self.pending, now_ms())
    }

    fn on_log(&mut self) {
        // Sealed here, not at the response headers: Envoy writes access-log
        // lines in the order streams end, and a chain must be written in the
        // order it was sealed, or `audit verify` sees records swapped.
        self.record_abandoned();
        let status = abi::property(&["response", "code"])
            .ok()
            .flatten()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes)
            .and_then(|c| u16::try_from(c).ok());
        self.seal(status);
    }
}

impl Filter {
    /// A request still waiting (for keys, a list, an introspection answer)
    /// when its stream ends (the client went away) is audited too: denied,
    /// nothing forwarded.
    fn record_abandoned(&mut self) {
        let (Some(worker), mut p) = (&self.worker, self.pending.borrow_mut()) else {
            return;
        };
        if p.record.is_some() || !p.paused {
            return;
        }
        p.paused = false;
        let w = worker.borrow();
        w.metrics.decision(Reason::ClientClosed);
        let record = draft(
            &p,
            Reason::ClientClosed,
            None,
            None,
            (None, None),
            &w.policy,
            now_ms(),
        );
        p.record = Some(record);
    }

    /// Completes the record with the response status, chains it, and hands
    /// it to the access log. Once per request.
    fn seal(&mut self, status: Option<u16>) {
        let mut guard = self.pending.borrow_mut();
        let p = &mut *guard;
        if p.sealed {
            return;
        }
        let (Some(record), Some(worker)) = (p.record.as_mut(), &self.worker) else {
            return;
        };
        if let Some(status) = status {
            record.status = status;
        }
        p.sealed = true;
        let line = worker.borrow_mut().chain.seal(record);
        let _ = abi::set_property(&[AUDIT_PROPERTY], line.as_bytes());
    }
}

fn run(w: &mut Worker, p: &Pending, now: u64, may_wait: bool) -> (Verdict, Trace) {
    let auth: Vec<&str> = p.authorization.iter().map(String::as_str).collect();
    let dpop: Vec<&str> = p.dpop.iter().map(String::as_str).collect();
    let req = Request {
        method: &p.method,
        path: &p.path,
        authorization: &auth,
        source: p.source.as_deref(),
        tls_version: p.tls.as_deref(),
        forwarded_proto: p.forwarded_proto.as_deref(),
        scheme: &p.scheme,
        authority: &p.authority,
        dpop: &dpop,
        body: match &p.body {
            BodyRead::Unread => Body::Unread,
            BodyRead::Read(bytes) => Body::Read {
                content_type: p.content_type.as_deref(),
                bytes,
            },
            BodyRead::TooLarge => Body::TooLarge,
            BodyRead::Unreadable => Body::Unreadable,
        },
    };
    w.decide(&req, &p.dpop_accepted, now, may_wait)
}

/// Decides the request, or parks it on a document a fetch may bring or on an
/// introspection answer (each at most once per request; its deadline is
/// that callout's `timeout_ms`). `Continue` when allowed; `Pause` when
/// parked or answered.
fn decide_or_park(
    w: &mut Worker,
    p: &mut Pending,
    context_id: u32,
    pending: &Rc<RefCell<Pending>>,
    now: u64,
) -> Action {
    let (mut verdict, mut trace) = run(w, p, now, true);
    if let Verdict::Wait(wait) = verdict {
        // Another VM may have published it already.
        if let Some(Awaited::Doc(doc)) = w.awaited(wait) {
            if w.sync_peer(doc) {
                (verdict, trace) = run(w, p, now, true);
            }
        }
    }
    if let Verdict::Wait(wait) = verdict {
        if let Some(on) = w.awaited(wait).filter(|a| !p.waited_on.contains(a)) {
            match wait {
                WaitFor::Keys { .. } if !p.waited => {
                    metrics::bump(w.metrics.key_cache_miss);
                    p.waited = true;
                }
                WaitFor::Introspection { .. } if !p.waited_for_answer => {
                    metrics::bump(w.metrics.introspection_cache_miss);
                    p.waited_for_answer = true;
                }
                _ => {}
            }
            let auth: Vec<&str> = p.authorization.iter().map(String::as_str).collect();
            let bearer = token::extract_bearer(&auth).ok().flatten();
            if let Some(ends) = w.want(wait, bearer, now) {
                p.waited_on.push(on);
                let deadline = now.saturating_add(w.timeout_ms(on)).saturating_add(100);
                w.waiters.push(Waiter {
                    context_id,
                    on,
                    ends,
                    deadline_ms: deadline,
                    pending: Rc::downgrade(pending),
                });
                p.paused = true;
                return Action::Pause;
            }
        }
        (verdict, trace) = run(w, p, now, false);
    }
    if let Verdict::NeedBody { rule, token } = &verdict {
        // Envoy holds no headers while a wasm filter reads the body: they go
        // on now, as for an allow, and on_http_request_body holds the body
        // whole and decides again; a refusal then resets the upstream request.
        let policy = Rc::clone(&w.policy);
        if let Some(rule) = policy.rule(*rule) {
            forward(p, &policy, rule, token.as_deref());
        }
        w.count_caches(&trace, &verdict, p.waited, p.waited_for_answer);
        p.headers_sent = true;
        p.awaiting_body = true;
        p.paused = true;
        return Action::Continue;
    }
    p.paused = false;
    if !p.headers_sent {
        w.count_caches(&trace, &verdict, p.waited, p.waited_for_answer);
    }
    apply(w, p, verdict, &trace, now)
}

/// Called by the root, with this request's context made effective, once
/// what it waited for arrived or the wait timed out: decide (or wait for
/// another document) and answer or let it go on.
pub fn finish_waiting(worker: &Rc<RefCell<Worker>>, waiter: &Waiter, now: u64) {
    let Some(pending) = waiter.pending.upgrade() else {
        return;
    };
    let mut w = worker.borrow_mut();
    let mut p = pending.borrow_mut();
    if !p.paused {
        return;
    }
    if decide_or_park(&mut w, &mut p, waiter.context_id, &pending, now) == Action::Continue {
        let _ = abi::resume_request();
    }
}

/// Carries out a verdict on the current request and drafts its audit record.
fn apply(w: &mut Worker, p: &mut Pending, verdict: Verdict, trace: &Trace, now_ms: u64) -> Action {
    let policy = Rc::clone(&w.policy);
    if let Verdict::Allow { binding, .. } = &verdict {
        p.binding = *binding;
    }
    let (reason, rule, token) = outcome::settle(&verdict);
    w.metrics.decision(reason);
    let rule_ref = rule.and_then(|i| policy.rule(i));
    // The patient is named in the record only by its keyed fingerprint.
    let patient_fp = trace
        .fhir
        .as_ref()
        .and_then(|f| f.patient.as_deref())
        .and_then(|id| w.chain.patient_fp(id));
    p.record = Some(draft(
        p,
        reason,
        rule_ref,
        token.as_deref(),
        (trace.fhir.as_ref(), patient_fp),
        &policy,
        now_ms,
    ));
    if reason == Reason::Ok {
        if token.as_ref().is_some_and(|t| !t.phi_claims.is_empty()) {
            metrics::bump(w.metrics.phi_flagged);
        }
        if let Some(rule) = rule_ref.filter(|_| !p.headers_sent) {
            forward(p, &policy, rule, token.as_deref());
        }
        return Action::Continue;
    }
    let dpop = {
        let auth: Vec<&str> = p.authorization.iter().map(String::as_str).collect();
        let req = Request {
            method: &p.method,
            path: &p.path,
            authorization: &auth,
            source: None,
            tls_version: None,
            forwarded_proto: None,
            scheme: &p.scheme,
            authority: &p.authority,
            dpop: &[],
            body: Body::Unread,
        };
        decision::is_dpop(&req, reason, token.as_deref())
    };
    let algs = dpop.then_some(policy.dpop_algs.as_str());
    let answer = answer::deny(
        reason,
        &policy.realm,
        decision::challenge(rule_ref, algs, trace.fhir.as_ref()),
    );
    let mut headers = vec![
        ("content-type", "text/plain"),
        ("cache-control", "no-store"),
    ];
    if let Some(www) = answer.www_authenticate.as_deref() {
        headers.push(("www-authenticate", www));
    }
    let _ = abi::send_response(answer.status, &headers, answer.body.as_bytes());
    if let Some(record) = p.record.as_mut() {
        record.status = u16::try_from(answer.status).unwrap_or(0);
    }
    Action::Pause
}

/// Sets the request headers the upstream sees on allow (see
/// [`outcome::header_edits`]). One host call per header: each costs a
/// fraction of rewriting the whole map (measured).
fn forward(
    p: &Pending,
    policy: &Policy,
    rule: &crate::config::Rule,
    token: Option<&VerifiedToken>,
) {
    let edits = outcome::header_edits(policy, rule, token, p.spoofed, !p.authorization.is_empty());
    for (name, value) in edits {
        let _ = match value {
            Some(v) => abi::set_header(MapType::HttpRequestHeaders, name, &v),
            None => abi::remove_header(MapType::HttpRequestHeaders, name),
        };
    }
}

fn property_string(path: &[&str]) -> Option<String> {
    abi::property(path)
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
}

/// The audit record of a decision, before the status and chain are known.
fn draft(
    p: &Pending,
    reason: Reason,
    rule: Option<&crate::config::Rule>,
    token: Option<&VerifiedToken>,
    fhir: (Option<&fhir::Seen>, Option<String>),
    policy: &Policy,
    now_ms: u64,
) -> AuditRecord {
    let seen = audit::Request {
        request_id: p.request_id.as_deref(),
        method: &p.method,
        path: &p.path,
        authorization: &p.authorization,
        source: p.source.as_deref(),
        tls: p.tls.as_deref(),
        binding: p.binding,
        fhir: fhir.0,
        patient_fp: fhir.1.as_deref(),
    };
    audit::draft(&seen, reason, rule, token, policy, now_ms)
}
