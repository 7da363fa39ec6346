//! Per-VM state (one VM per Envoy worker, plus the main thread's): the
//! policy, what the fetched documents hold (each provider's keys, the
//! revocation list), what the core remembers between requests (token cache,
//! verification budget, introspection answers), the requests waiting on a
//! fetch or an answer, stats, the audit chain and its checkpoints. Fetching
//! and sharing the documents is `fetcher`'s; asking about tokens is
//! `introspect`'s.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use crate::answer::Reason;
use crate::audit::{AuditChain, CheckpointSchedule};
use crate::binding;
use crate::config::{FetchSource, Policy};
use crate::decision::{self, Facts, Request, Revocations, State, Trace, Verdict, WaitFor};
use crate::fetch::{Freshness, WaitEnds};
use crate::introspection::{self, Introspection, TokenKey};
use crate::jwks::{KeySet, MAX_JWKS_BYTES};
use crate::revocation::{RevocationList, MAX_REVOCATION_BYTES};

use super::abi;
use super::fetcher::{Arrival, Fetcher, Response};
use super::http::Pending;
use super::introspect::{Answered, Introspector};
use super::metrics::{self, Metrics};
use super::replay;

/// What a paused request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    /// A fetched document (see [`Worker::awaited`]).
    Doc(usize),
    /// A provider's introspection answer about the token with SHA-256 `key`.
    Introspection { provider: usize, key: TokenKey },
}

/// A paused request waiting for a document or an introspection answer.
pub struct Waiter {
    pub context_id: u32,
    pub on: Awaited,
    /// For a document: what ends the wait besides the deadline.
    pub ends: WaitEnds,
    pub deadline_ms: u64,
    pub pending: Weak<RefCell<Pending>>,
}

/// Everything one VM keeps.
pub struct Worker {
    pub policy: Rc<Policy>,
    /// Documents: each provider's JWKS (by provider index), then the
    /// revocation list if the policy has one.
    pub fetcher: Fetcher,
    pub introspector: Introspector,
    keys: Vec<Option<Rc<KeySet>>>,
    revocations: Option<Rc<RevocationList>>,
    /// The list's freshness when last looked at, to log changes once.
    revocation_freshness: Option<Freshness>,
    pub state: State,
    pub waiters: Vec<Waiter>,
    pub metrics: Metrics,
    pub chain: AuditChain,
    /// When the chain's head next goes to Envoy's log.
    checkpoints: CheckpointSchedule,
    /// Has decided a request (worker VMs only; not the main thread's).
    served: bool,
}

/// Milliseconds since the Unix epoch, from the host clock.
pub fn now_ms() -> u64 {
    abi::now_nanos().map_or(0, |ns| ns / 1_000_000)
}

fn secs(ms: u64) -> u64 {
    ms / 1000
}

impl Worker {
    /// `credentials`: each provider's introspection `Authorization` value,
    /// if it introspects (made at start from the secret in the environment).
    pub fn new(
        policy: Rc<Policy>,
        chain: AuditChain,
        credentials: Vec<Option<String>>,
        root_context_id: u32,
    ) -> Worker {
        let mut docs: Vec<(String, usize)> = policy
            .providers
            .iter()
            .map(|p| (format!("jwks.{}", p.name), MAX_JWKS_BYTES))
            .collect();
        if policy.revocation.is_some() {
            docs.push(("revocation".to_string(), MAX_REVOCATION_BYTES));
        }
        Worker {
            fetcher: Fetcher::new(docs, root_context_id),
            introspector: Introspector::new(credentials, root_context_id),
            keys: policy.providers.iter().map(|_| None).collect(),
            revocations: None,
            revocation_freshness: None,
            state: State::new(&policy),
            checkpoints: CheckpointSchedule::new(policy.audit_checkpoint_seconds),
            policy,
            waiters: Vec::new(),
            metrics: Metrics::define(),
            chain,
            served: false,
        }
    }

    /// The revocation list's document, if the policy has one.
    fn revocation_doc(&self) -> Option<usize> {
        self.policy
            .revocation
            .as_ref()
            .map(|_| self.policy.providers.len())
    }

    /// Where document `doc` comes from.
    fn source(policy: &Policy, doc: usize) -> Option<&FetchSource> {
        match policy.providers.get(doc) {
            Some(p) => Some(&p.jwks),
            None if doc == policy.providers.len() => policy.revocation.as_ref(),
            None => None,
        }
    }

    /// What a request told to wait for `wait` waits for.
    pub fn awaited(&self, wait: WaitFor) -> Option<Awaited> {
        match wait {
            WaitFor::Keys { provider, .. } => Some(Awaited::Doc(provider)),
            WaitFor::Revocations => self.revocation_doc().map(Awaited::Doc),
            WaitFor::Introspection { provider, key } => {
                Some(Awaited::Introspection { provider, key })
            }
        }
    }

    /// How long a request waits for `on`, at most.
    pub fn timeout_ms(&self, on: Awaited) -> u64 {
        match on {
            Awaited::Doc(doc) => Self::source(&self.policy, doc).map_or(0, |s| s.timeout_ms),
            Awaited::Introspection { provider, .. } => self
                .policy
                .providers
                .get(provider)
                .and_then(|p| p.introspection.as_ref())
                .map_or(0, |i| i.timeout_ms),
        }
    }

    /// Decides a request with the documents this VM holds.
    /// `dpop_accepted` is the request's own DPoP proof once accepted: the
    /// same request decided again (after a wait, or with its body) is not
    /// replaying it.
    pub fn decide(
        &mut self,
        req: &Request<'_>,
        dpop_accepted: &Cell<Option<[u8; 32]>>,
        now_ms: u64,
        may_wait: bool,
    ) -> (Verdict, Trace) {
        self.served = true;
        let now = secs(now_ms);
        let mut trace = Trace::default();
        let policy = Rc::clone(&self.policy);
        let (docs, keys) = (&self.fetcher.docs, &self.keys);
        let usable = |doc: usize| {
            let src = Self::source(&policy, doc);
            docs.get(doc)
                .zip(src)
                .is_some_and(|(d, s)| d.clock.usable(s, now_ms))
        };
        let key_set = |i: usize| -> Option<&KeySet> {
            if usable(i) {
                keys.get(i)?.as_deref()
            } else {
                None
            }
        };
        let revocations = match (self.revocation_doc(), self.revocations.as_deref()) {
            (None, _) => Revocations::Off,
            (Some(doc), list) => {
                let freshness = docs
                    .get(doc)
                    .zip(Self::source(&policy, doc))
                    .map_or(Freshness::Failed, |(d, s)| d.clock.freshness(s, now_ms));
                Revocations::held(freshness, list)
            }
        };
        if revocations.stale() {
            trace.revocation_stale = true;
        }
        let now_i = i64::try_from(now).unwrap_or(i64::MAX);
        // Read only for a certificate-bound token: a host call costs about a microsecond.
        let peer_cert = || {
            abi::property(&["connection", "sha256_peer_certificate_digest"])
                .ok()
                .flatten()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let first_use = |digest: &[u8; 32], until: i64| {
            binding::first_use_once(dpop_accepted, digest, || {
                replay::first_use(digest, until, now_i)
            })
        };
        let facts = Facts {
            keys: &key_set,
            revocations,
            peer_cert: &peer_cert,
            dpop_first_use: &first_use,
        };
        let verdict = decision::decide(
            &policy,
            &facts,
            &mut self.state,
            req,
            now_i,
            may_wait,
            &mut trace,
        );
        (verdict, trace)
    }

    /// Counts a request's final decision in the cache stats, once: a request
    /// that waited for keys or an introspection answer is decided more than
    /// once (and counted as a miss when it started waiting).
    pub fn count_caches(
        &self,
        trace: &Trace,
        verdict: &Verdict,
        waited: bool,
        waited_for_answer: bool,
    ) {
        match trace.introspection_cache_hit {
            Some(true) if !waited_for_answer => metrics::bump(self.metrics.introspection_cache_hit),
            Some(false) if !waited_for_answer => {
                metrics::bump(self.metrics.introspection_cache_miss)
            }
            _ => {}
        }
        match trace.token_cache_hit {
            Some(true) => metrics::bump(self.metrics.token_cache_hit),
            Some(false) => {
                metrics::bump(self.metrics.token_cache_miss);
                let keys_missing = matches!(
                    verdict,
                    Verdict::Wait(WaitFor::Keys { .. })
                        | Verdict::Deny {
                            reason: Reason::KeysUnavailable | Reason::UnknownKey,
                            ..
                        }
                );
                // A request that waited was counted as a key-cache miss then.
                if !waited && !keys_missing {
                    metrics::bump(self.metrics.key_cache_hit);
                }
            }
            None => {}
        }
        let decided = !matches!(verdict, Verdict::Wait(_));
        if decided && trace.revocation_stale && self.revocation_doc().is_some() {
            metrics::bump(self.metrics.revocation_stale);
        }
    }

    /// Makes sure what `wait` needs is on its way, and says what ends the
    /// wait; `None` when it cannot be had (the unknown-kid rate limit, too
    /// many queries), so the request is decided now. `bearer` is the
    /// request's token, which an introspection query sends.
    pub fn want(&mut self, wait: WaitFor, bearer: Option<&str>, now_ms: u64) -> Option<WaitEnds> {
        if let WaitFor::Introspection { provider, key } = wait {
            let asked = bearer.is_some_and(|token| self.introspector.want(provider, key, token));
            if asked {
                // Dispatched by the root (see `Introspector`), on a tick brought forward.
                self.fetcher.kick();
            }
            return asked.then_some(WaitEnds::NextNews);
        }
        let Some(Awaited::Doc(doc)) = self.awaited(wait) else {
            return None;
        };
        let src = Self::source(&self.policy, doc)?;
        let on_demand = matches!(
            wait,
            WaitFor::Keys {
                unknown_kid: true,
                ..
            }
        );
        self.fetcher.want(doc, src, on_demand, now_ms)
    }

    /// Checks a body that arrived for `a.doc` and, if good, holds it.
    fn take(&mut self, a: Arrival) -> Result<(), String> {
        if a.unchanged(&self.fetcher) {
            // The same content again: only its age changes.
            self.fetcher.accept(a);
            return Ok(());
        }
        let policy = Rc::clone(&self.policy);
        if let Some(p) = policy.providers.get(a.doc) {
            let keys = KeySet::parse(&a.body, &p.algorithms).map_err(|e| e.to_string())?;
            log::info!(
                "provider {}: {} keys loaded from {}",
                p.name,
                keys.len(),
                p.jwks.uri
            );
            if let Some(slot) = self.keys.get_mut(a.doc) {
                *slot = Some(Rc::new(keys));
            }
            // Tokens were verified against the old set; a removed key must
            // not live on in the cache.
            self.state.cache.forget_provider(a.doc);
        } else if Some(a.doc) == self.revocation_doc() {
            let list = RevocationList::parse(&a.body).map_err(|e| e.to_string())?;
            log::info!("revocation list loaded: {} entries", list.len());
            self.revocations = Some(Rc::new(list));
        }
        self.fetcher.accept(a);
        Ok(())
    }

    /// Picks up a newer copy of `doc` another VM published; whether one
    /// arrived (the same content fetched later counts: it answers a wait
    /// for a fetch started after a key was asked for).
    pub fn sync_peer(&mut self, doc: usize) -> bool {
        let before = self.fetcher.docs.get(doc).and_then(|d| d.clock.fetched_at);
        let Some(a) = self.fetcher.peer_copy(doc) else {
            let after = self.fetcher.docs.get(doc).and_then(|d| d.clock.fetched_at);
            return after != before;
        };
        let name = self.doc_name(doc);
        match self.take(a) {
            Ok(()) => true,
            Err(problem) => {
                log::error!("{name}: shared copy refused: {problem}");
                false
            }
        }
    }

    fn doc_name(&self, doc: usize) -> String {
        self.fetcher
            .docs
            .get(doc)
            .map_or_else(String::new, |d| d.name.clone())
    }

    fn count_fetch(&self, doc: usize, ok: bool) {
        let (good, bad) = if Some(doc) == self.revocation_doc() {
            (
                self.metrics.revocation_fetch_ok,
                self.metrics.revocation_fetch_failed,
            )
        } else {
            (self.metrics.jwks_fetch_ok, self.metrics.jwks_fetch_failed)
        };
        metrics::bump(if ok { good } else { bad });
    }

    /// Judges and keeps an introspection answer (nothing is kept for a
    /// failed query), counts and logs it; returns what its waiters waited for.
    fn settle(&mut self, a: Answered, now_ms: u64) -> Awaited {
        let on = Awaited::Introspection {
            provider: a.provider,
            key: a.key,
        };
        let policy = Rc::clone(&self.policy);
        let Some(provider) = policy.providers.get(a.provider) else {
            return on;
        };
        let answer = a
            .body
            .and_then(|body| Introspection::parse(&body).map_err(|e| e.to_string()));
        let failing = self.introspector.failing.get_mut(a.provider);
        match answer {
            Ok(answer) => {
                metrics::bump(match answer {
                    Introspection::Active(_) => self.metrics.introspection_active,
                    Introspection::Inactive => self.metrics.introspection_inactive,
                });
                if let Some(failing) = failing.filter(|f| **f) {
                    *failing = false;
                    log::info!("provider {}: introspection answers again", provider.name);
                }
                let now = i64::try_from(secs(now_ms)).unwrap_or(i64::MAX);
                let outcome = introspection::judge(&answer, &policy, a.provider, &a.token, now);
                let cache_seconds = provider
                    .introspection
                    .as_ref()
                    .map_or(0, |i| i.cache_seconds);
                if let Some(cache) = self.state.introspection.get_mut(a.provider) {
                    cache.insert(a.key, outcome, now, cache_seconds);
                }
            }
            Err(why) => {
                metrics::bump(self.metrics.introspection_failed);
                // Logged when it starts failing, not once per request.
                if let Some(failing) = failing.filter(|f| !**f) {
                    *failing = true;
                    log::error!(
                        "provider {}: introspection failed, introspect rules answer 503 until it answers again: {why}",
                        provider.name
                    );
                }
            }
        }
        on
    }

    /// A callout answered: an introspection answer, or a document to take.
    /// Returns what the requests that can now be decided waited for.
    pub fn on_callout(&mut self, token: u32, body_size: usize, now_ms: u64) -> Option<Awaited> {
        if let Some(answered) = self.introspector.on_response(token, body_size) {
            return Some(self.settle(answered, now_ms));
        }
        let doc = self.on_document(token, body_size)?;
        Some(Awaited::Doc(doc))
    }

    /// A document's callout answered: take it. Returns the document.
    fn on_document(&mut self, token: u32, body_size: usize) -> Option<usize> {
        match self.fetcher.on_response(token, body_size) {
            Response::Unknown => None,
            Response::Failed { doc, why } => {
                log::error!(
                    "{}: refused, keeping what was held: {why}",
                    self.doc_name(doc)
                );
                self.count_fetch(doc, false);
                Some(doc)
            }
            Response::Body(a) => {
                let doc = a.doc;
                match self.take(a) {
                    Ok(()) => self.count_fetch(doc, true),
                    Err(problem) => {
                        log::error!(
                            "{}: refused, keeping what was held: {problem}",
                            self.doc_name(doc)
                        );
                        self.fetcher.reject(doc);
                        self.count_fetch(doc, false);
                    }
                }
                Some(doc)
            }
        }
    }

    /// The timer: fetches, introspection queries, peers' copies, lost
    /// callouts, gauges. Returns what the requests that should be decided
    /// again waited for, and the waiters whose deadline passed.
    pub fn tick(&mut self, now_ms: u64) -> (Vec<Awaited>, Vec<Waiter>) {
        let policy = Rc::clone(&self.policy);
        let src = |doc: usize| Self::source(&policy, doc);
        let mut ready: Vec<Awaited> = Vec::new();
        for answered in self.introspector.tick(&policy, now_ms) {
            let on = self.settle(answered, now_ms);
            ready.push(on);
        }
        if self.fetcher.sync_due(now_ms, !self.waiters.is_empty()) {
            for doc in 0..self.fetcher.docs.len() {
                if self.sync_peer(doc) {
                    ready.push(Awaited::Doc(doc));
                }
            }
        }
        ready.extend(
            self.fetcher
                .tick(now_ms, &src)
                .into_iter()
                .map(Awaited::Doc),
        );
        self.gauges(now_ms);
        let (expired, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.deadline_ms <= now_ms);
        self.waiters = waiting;
        (ready, expired)
    }

    fn gauges(&mut self, now_ms: u64) {
        let providers = self.policy.providers.len();
        let key_age = self
            .fetcher
            .docs
            .iter()
            .take(providers)
            .filter_map(|d| d.clock.fetched_at)
            .map(|at| secs(now_ms.saturating_sub(at)))
            .max()
            .unwrap_or(0);
        metrics::set(self.metrics.key_age_seconds, key_age);
        if let Some(doc) = self.revocation_doc() {
            let d = self.fetcher.docs.get(doc);
            let age = d
                .and_then(|d| d.clock.fetched_at)
                .map_or(0, |at| secs(now_ms.saturating_sub(at)));
            metrics::set(self.metrics.revocation_age_seconds, age);
            let entries = self.revocations.as_ref().map_or(0, |l| l.len());
            metrics::set(self.metrics.revocation_entries, entries as u64);
            let freshness = d
                .zip(Self::source(&self.policy, doc))
                .map(|(d, s)| d.clock.freshness(s, now_ms));
            if self.served && freshness != self.revocation_freshness {
                match freshness {
                    Some(Freshness::Usable) if self.revocation_freshness.is_some() => {
                        log::info!("revocation list in force again")
                    }
                    Some(Freshness::Stale) => log::error!(
                        "revocation list unreachable past max_stale_seconds: sensitive rules answer 503, others use the last list"
                    ),
                    Some(Freshness::Failed) => log::error!(
                        "no revocation list could be fetched: sensitive rules answer 503, others serve without one"
                    ),
                    _ => {}
                }
                self.revocation_freshness = freshness;
            }
        }
        // Every VM writes the same gauge names and the last writer wins: the
        // main thread's VM, which never serves a request, must not zero them.
        if self.served {
            metrics::set(
                self.metrics.token_cache_entries,
                self.state.cache.len() as u64,
            );
            metrics::set(
                self.metrics.token_cache_bytes,
                self.state.cache.approx_bytes() as u64,
            );
        }
    }

    /// Writes the audit chain's head to Envoy's log (info) when one is due,
    /// or, with `stopping`, whatever the chain did since the last. A VM that
    /// decided nothing (the main thread's) has nothing to vouch for.
    pub fn checkpoint(&mut self, now_ms: u64, stopping: bool) {
        let due = if stopping {
            self.checkpoints.last(&self.chain, now_ms)
        } else {
            self.checkpoints.due(&self.chain, now_ms)
        };
        if let Some(checkpoint) = due {
            log::info!("{}", checkpoint.line());
        }
    }

    /// Takes the waiters of `on` out of the list.
    pub fn take_waiters(&mut self, on: Awaited) -> Vec<Waiter> {
        let fetcher = &self.fetcher;
        let answered = |w: &Waiter| match w.on {
            Awaited::Doc(doc) => fetcher.answers(doc, w.ends),
            Awaited::Introspection { .. } => true,
        };
        let (mine, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.on == on && answered(w));
        self.waiters = rest;
        mine
    }
}
