//! The per-request filter: read the request, ask the core, answer or
//! continue, and write the audit record into filter state for the access
//! log. What the core remembers between requests (the verified-token cache,
//! the verification budget) is per worker thread, as in the wasm filter's
//! per-VM state; the documents come from the shared [`Snapshot`].

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use crate::answer::{self, Reason};
use crate::audit::{self, AuditRecord};
use crate::binding::{self, Binding};
use crate::decision::{self, Facts, Request, Revocations, State, Trace, Verdict, WaitFor};
use crate::fetch::Freshness;
use crate::fhir::Body;
use crate::jwks::KeySet;
use crate::outcome;
use crate::token;

use super::ffi::{Scheduler, Stream};
use super::metrics;
use super::replay;
use super::shared::{lock, now_ms, Shared, Snapshot, Want};

/// Filter-state key the access log reads. The wasm filter's property
/// `phi_guard.audit` is stored by Envoy as `wasm.phi_guard.audit`; the module
/// uses that very key, so the same `%FILTER_STATE(wasm.phi_guard.audit:PLAIN)%`
/// access-log format serves both builds.
const AUDIT_KEY: &str = "wasm.phi_guard.audit";

/// How often a worker refreshes its token-cache gauges, at most.
const GAUGE_EVERY_MS: u64 = 1000;

/// What one worker thread keeps for one filter config.
pub struct Local {
    state: State,
    snapshot: Arc<Snapshot>,
    generation: u64,
    /// The key versions the token cache was filled under.
    key_versions: Vec<u64>,
    last_gauges_ms: u64,
}

/// A config's id, the config (to drop entries of configs gone), its state.
type Entry = (u64, std::sync::Weak<Shared>, Rc<RefCell<Local>>);

thread_local! {
    /// Per worker thread: each live filter config's [`Local`], by config id.
    static LOCALS: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// This thread's state for `shared`, made on first use; entries of configs
/// that are gone are dropped then too.
fn local_for(shared: &Arc<Shared>) -> Rc<RefCell<Local>> {
    LOCALS.with(|cell| {
        let mut locals = cell.borrow_mut();
        if let Some((_, _, l)) = locals.iter().find(|(id, _, _)| *id == shared.id) {
            return Rc::clone(l);
        }
        locals.retain(|(_, w, _)| w.strong_count() > 0);
        let (snapshot, generation) = shared.snapshot();
        let local = Rc::new(RefCell::new(Local {
            state: State::new(&shared.policy),
            key_versions: snapshot.key_versions.clone(),
            snapshot,
            generation,
            last_gauges_ms: 0,
        }));
        locals.push((shared.id, Arc::downgrade(shared), Rc::clone(&local)));
        local
    })
}

pub struct Filter {
    shared: Arc<Shared>,
    local: Rc<RefCell<Local>>,
    worker: usize,
    spoofed: bool,
    method: String,
    path: String,
    authorization: Vec<String>,
    request_id: Option<String>,
    source: Option<String>,
    tls: Option<String>,
    /// `:scheme`, `:authority`, `x-forwarded-proto` (when trusted) and every
    /// `DPoP` header: what transport and sender-binding checks read.
    scheme: String,
    authority: String,
    forwarded_proto: Option<String>,
    dpop: Vec<String>,
    binding: Option<Binding>,
    /// The DPoP proof this request already had accepted: deciding it again
    /// after a wait is not a replay.
    dpop_accepted: Cell<Option<[u8; 32]>>,
    record: Option<AuditRecord>,
    sealed: bool,
    paused: bool,
    /// Paused for keys at least once (counted as a key-cache miss then).
    waited: bool,
    /// The documents this request waited for; each is waited for once.
    waited_on: Vec<usize>,
    wake: Option<Arc<Scheduler>>,
}

impl Filter {
    pub fn new(shared: Arc<Shared>, stream: &Stream) -> Filter {
        let local = local_for(&shared);
        let worker = stream.worker_index() % shared.chains.len().max(1);
        Filter {
            shared,
            local,
            worker,
            spoofed: false,
            method: String::new(),
            path: String::new(),
            authorization: Vec::new(),
            request_id: None,
            source: None,
            tls: None,
            scheme: String::new(),
            authority: String::new(),
            forwarded_proto: None,
            dpop: Vec::new(),
            binding: None,
            dpop_accepted: Cell::new(None),
            record: None,
            sealed: false,
            paused: false,
            waited: false,
            waited_on: Vec::new(),
            wake: None,
        }
    }

    /// `true`: let the request go on; `false`: stopped (answered or parked).
    pub fn on_request_headers(&mut self, stream: &Stream) -> bool {
        // Values may hold any byte but NUL/CR/LF; lossy text is safe here: a
        // replacement character fails the token and the path checks.
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        let trust_xfp = self.shared.policy.transport.trusted_forwarded_proto;
        for (name, value) in stream.request_headers() {
            match name.as_slice() {
                b":method" => self.method = text(&value),
                b":path" => self.path = text(&value),
                b"authorization" => self.authorization.push(text(&value)),
                b"x-request-id" => self.request_id = String::from_utf8(value).ok(),
                b":scheme" => self.scheme = text(&value),
                b":authority" => self.authority = text(&value),
                b"dpop" => self.dpop.push(text(&value)),
                b"x-forwarded-proto" if trust_xfp => self.forwarded_proto = Some(text(&value)),
                other => self.spoofed |= outcome::is_identity_header(&self.shared.policy, other),
            }
        }
        self.source = stream.source_address();
        self.tls = stream.tls_version();
        self.decide_or_park(stream, now_ms())
    }

    /// A document this request waited for arrived, its fetch ended, or the
    /// wait timed out: decide again, then answer or let the request go on.
    pub fn on_scheduled(&mut self, stream: &Stream, _event: u64) {
        if !self.paused {
            return;
        }
        if self.decide_or_park(stream, now_ms()) {
            stream.continue_decoding();
        }
    }

    /// The stream is done, just before the access log: a request still
    /// waiting (the client went away) is audited too; the record gets the
    /// response status, is chained, and goes into filter state.
    pub fn on_stream_complete(&mut self, stream: &Stream) {
        if self.record.is_none() && self.paused {
            self.paused = false;
            self.shared.metrics.decision(stream, Reason::ClientClosed);
            self.record = Some(self.draft(Reason::ClientClosed, None, None, None, now_ms()));
        }
        if self.sealed {
            return;
        }
        let Some(record) = self.record.as_mut() else {
            return;
        };
        if let Some(status) = stream.response_code() {
            record.status = status;
        }
        self.sealed = true;
        let Some(chain) = self.shared.chains.get(self.worker) else {
            return;
        };
        let line = lock(chain).chain.seal(record);
        stream.set_filter_state(AUDIT_KEY, line.as_bytes());
    }

    fn run(
        &self,
        stream: &Stream,
        local: &mut Local,
        now: u64,
        may_wait: bool,
    ) -> (Verdict, Trace) {
        let shared = &self.shared;
        if shared.generation.load(std::sync::atomic::Ordering::Acquire) != local.generation {
            let (snapshot, generation) = shared.snapshot();
            for (i, (mine, now_v)) in local
                .key_versions
                .iter_mut()
                .zip(&snapshot.key_versions)
                .enumerate()
            {
                if mine != now_v {
                    // Tokens were verified against the old set; a removed
                    // key must not live on in the cache.
                    local.state.cache.forget_provider(i);
                    *mine = *now_v;
                }
            }
            local.snapshot = snapshot;
            local.generation = generation;
        }
        let snap = Arc::clone(&local.snapshot);
        let usable = |doc: usize| {
            snap.clocks
                .get(doc)
                .zip(shared.source(doc))
                .is_some_and(|(c, s)| c.usable(s, now))
        };
        let key_set = |i: usize| -> Option<&KeySet> {
            if usable(i) {
                snap.keys.get(i)?.as_deref()
            } else {
                None
            }
        };
        let revocations = match shared.revocation_doc() {
            None => Revocations::Off,
            Some(doc) => {
                let freshness = snap
                    .clocks
                    .get(doc)
                    .zip(shared.source(doc))
                    .map_or(Freshness::Failed, |(c, s)| c.freshness(s, now));
                Revocations::held(freshness, snap.revocations.as_deref())
            }
        };
        let mut trace = Trace {
            revocation_stale: revocations.stale(),
            ..Trace::default()
        };
        let now_s = i64::try_from(now / 1000).unwrap_or(i64::MAX);
        // Read only for a certificate-bound token.
        let peer_cert = || stream.peer_certificate_sha256();
        let first_use = |digest: &[u8; 32], until: i64| {
            binding::first_use_once(&self.dpop_accepted, digest, || {
                replay::first_use(digest, until, now_s)
            })
        };
        let facts = Facts {
            keys: &key_set,
            revocations,
            peer_cert: &peer_cert,
            dpop_first_use: &first_use,
        };
        let auth: Vec<&str> = self.authorization.iter().map(String::as_str).collect();
        let dpop: Vec<&str> = self.dpop.iter().map(String::as_str).collect();
        let req = self.request(&auth, &dpop);
        let verdict = decision::decide(
            &shared.policy,
            &facts,
            &mut local.state,
            &req,
            now_s,
            may_wait,
            &mut trace,
        );
        (verdict, trace)
    }

    /// Decides the request, or parks it on a document a fetch may bring
    /// (each at most once per request, until that fetch's `timeout_ms`).
    fn decide_or_park(&mut self, stream: &Stream, now: u64) -> bool {
        let local = Rc::clone(&self.local);
        let mut local = local.borrow_mut();
        let (mut verdict, mut trace) = self.run(stream, &mut local, now, true);
        // At most twice: a newer snapshot seen while asking is decided with once.
        for _ in 0..2 {
            let Verdict::Wait(wait) = verdict else { break };
            let (doc, on_demand) = match wait {
                WaitFor::Keys {
                    provider,
                    unknown_kid,
                } => (Some(provider), unknown_kid),
                WaitFor::Revocations => (self.shared.revocation_doc(), false),
                // Refused at load (see `Shared::new`); decided as unavailable.
                WaitFor::Introspection { .. } => (None, false),
            };
            let Some(doc) = doc.filter(|d| !self.waited_on.contains(d)) else {
                break;
            };
            if matches!(wait, WaitFor::Keys { .. }) && !self.waited {
                metrics::bump(stream, self.shared.metrics.key_cache_miss);
                self.waited = true;
            }
            let timeout = self.shared.source(doc).map_or(0, |s| s.timeout_ms);
            let deadline = now.saturating_add(timeout).saturating_add(100);
            let wake = Arc::clone(
                self.wake
                    .get_or_insert_with(|| Arc::new(stream.scheduler())),
            );
            match self
                .shared
                .want(doc, on_demand, now, deadline, local.generation, &wake)
            {
                Want::Parked => {
                    self.waited_on.push(doc);
                    self.paused = true;
                    return false;
                }
                Want::Refused => break,
                Want::Changed => (verdict, trace) = self.run(stream, &mut local, now, true),
            }
        }
        if matches!(verdict, Verdict::Wait(_)) {
            (verdict, trace) = self.run(stream, &mut local, now, false);
        }
        self.paused = false;
        self.count(stream, &mut local, &trace, &verdict, now);
        drop(local);
        self.apply(stream, verdict, &trace, now)
    }

    /// Counts a request's final decision in the cache stats, once.
    fn count(
        &self,
        stream: &Stream,
        local: &mut Local,
        trace: &Trace,
        verdict: &Verdict,
        now: u64,
    ) {
        let m = &self.shared.metrics;
        match trace.token_cache_hit {
            Some(true) => metrics::bump(stream, m.token_cache_hit),
            Some(false) => {
                metrics::bump(stream, m.token_cache_miss);
                let keys_missing = matches!(
                    verdict,
                    Verdict::Deny {
                        reason: Reason::KeysUnavailable | Reason::UnknownKey,
                        ..
                    }
                );
                // A request that waited was counted as a key-cache miss then.
                if !self.waited && !keys_missing {
                    metrics::bump(stream, m.key_cache_hit);
                }
            }
            None => {}
        }
        if trace.revocation_stale && self.shared.revocation_doc().is_some() {
            metrics::bump(stream, m.revocation_stale);
        }
        if now.saturating_sub(local.last_gauges_ms) >= GAUGE_EVERY_MS {
            local.last_gauges_ms = now;
            if let Some(id) = m.token_cache_entries {
                stream.set_gauge(id, local.state.cache.len() as u64);
            }
            if let Some(id) = m.token_cache_bytes {
                stream.set_gauge(id, local.state.cache.approx_bytes() as u64);
            }
        }
    }

    /// Carries out a verdict and drafts its audit record; `true` to continue.
    fn apply(&mut self, stream: &Stream, verdict: Verdict, trace: &Trace, now: u64) -> bool {
        let policy = Arc::clone(&self.shared.policy);
        if let Verdict::Allow { binding, .. } = &verdict {
            self.binding = *binding;
        }
        // The module reads no body: a FHIR `_search` whose form decides is
        // refused as a request it cannot judge (see `Shared::new`).
        let (reason, rule, token) = outcome::settle(&verdict);
        self.shared.metrics.decision(stream, reason);
        let rule_ref = rule.and_then(|i| policy.rule(i));
        self.record = Some(self.draft(reason, rule_ref, token.as_deref(), Some(trace), now));
        if reason == Reason::Ok {
            if token.as_ref().is_some_and(|t| !t.phi_claims.is_empty()) {
                metrics::bump(stream, self.shared.metrics.phi_flagged);
            }
            if let Some(rule) = rule_ref {
                let edits = outcome::header_edits(
                    &policy,
                    rule,
                    token.as_deref(),
                    self.spoofed,
                    !self.authorization.is_empty(),
                );
                for (name, value) in edits {
                    stream.set_request_header(name, value.as_deref());
                }
            }
            return true;
        }
        let dpop = {
            let auth: Vec<&str> = self.authorization.iter().map(String::as_str).collect();
            decision::is_dpop(&self.request(&auth, &[]), reason, token.as_deref())
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
        stream.send_response(answer.status, &headers, answer.body.as_bytes());
        if let Some(record) = self.record.as_mut() {
            record.status = u16::try_from(answer.status).unwrap_or(0);
        }
        false
    }

    fn draft(
        &self,
        reason: Reason,
        rule: Option<&crate::config::Rule>,
        token: Option<&token::VerifiedToken>,
        trace: Option<&Trace>,
        now: u64,
    ) -> AuditRecord {
        let patient_fp = trace
            .and_then(|t| t.fhir.as_ref()?.patient.as_deref())
            .zip(self.shared.chains.get(self.worker))
            .and_then(|(id, c)| lock(c).chain.patient_fp(id));
        let seen = audit::Request {
            request_id: self.request_id.as_deref(),
            method: &self.method,
            path: &self.path,
            authorization: &self.authorization,
            source: self.source.as_deref(),
            tls: self.tls.as_deref(),
            binding: self.binding,
            fhir: trace.and_then(|t| t.fhir.as_ref()),
            // The patient is named in the record only by its keyed fingerprint.
            patient_fp: patient_fp.as_deref(),
        };
        audit::draft(&seen, reason, rule, token, &self.shared.policy, now)
    }

    /// The request as the core reads it.
    fn request<'a>(&'a self, auth: &'a [&'a str], dpop: &'a [&'a str]) -> Request<'a> {
        Request {
            method: &self.method,
            path: &self.path,
            authorization: auth,
            source: self.source.as_deref(),
            tls_version: self.tls.as_deref(),
            forwarded_proto: self.forwarded_proto.as_deref(),
            scheme: &self.scheme,
            authority: &self.authority,
            dpop,
            body: Body::Unread,
        }
    }
}
