//! Per-VM state (one VM per Envoy worker, plus the main thread's): the policy,
//! each provider's keys and fetch bookkeeping, the verified-token cache, the
//! requests waiting for keys, stats, the audit chain and its checkpoints.
//!
//! Keys are shared between workers through proxy-wasm shared data: whoever
//! fetches publishes `<fetched_at>\n<document>` under `phi_guard.jwks.<name>`,
//! and a lease under `phi_guard.jwks_lease.<name>` keeps the fetch to one VM.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType};

use crate::answer::Reason;
use crate::audit::{AuditChain, CheckpointSchedule};
use crate::config::Policy;
use crate::decision::{self, Request, Trace, Verdict};
use crate::jwks::{Availability, CacheClock, KeySet, MAX_JWKS_BYTES};
use crate::token::TokenCache;

use super::abi;
use super::http::{self, Pending};
use super::metrics::{self, Metrics};

/// One provider's keys in this VM.
#[derive(Default)]
pub struct ProviderKeys {
    pub clock: CacheClock,
    pub keys: Option<Rc<KeySet>>,
    /// CAS of the shared-data entry the keys came from.
    shared_cas: Option<u32>,
    /// SHA-256 of the document the keys came from.
    doc_digest: Option<[u8; 32]>,
    /// When an in-flight fetch is given up on (a safety net: its callback
    /// should always come, but a lost one must not hold the keys back).
    in_flight_until_ms: u64,
    /// A request asked for a fetch (`true`: for an unknown `kid`); the root
    /// context dispatches it on the next tick.
    fetch_wanted: Option<bool>,
}

/// Timer period while a request waits for a fetch to be dispatched.
const KICK: Duration = Duration::from_millis(1);

/// A paused request waiting for a provider's keys.
pub struct Waiter {
    pub context_id: u32,
    pub provider: usize,
    pub deadline_ms: u64,
    pub pending: Weak<RefCell<Pending>>,
}

/// Everything one VM keeps.
pub struct Worker {
    pub policy: Rc<Policy>,
    pub providers: Vec<ProviderKeys>,
    pub cache: TokenCache,
    pub waiters: Vec<Waiter>,
    /// Callout token -> provider.
    callouts: Vec<(u32, usize)>,
    pub metrics: Metrics,
    pub chain: AuditChain,
    /// When the chain's head next goes to Envoy's log.
    checkpoints: CheckpointSchedule,
    last_sync_ms: u64,
    /// Callouts are dispatched only from the root context's own callbacks:
    /// Envoy cancels a context's callouts when it ends, and the SDK hands a
    /// response to the context that was running at dispatch, or drops it if
    /// that context is gone. A request's stream may end (client gone) before
    /// the JWKS arrives, and the keys must still land.
    root_context_id: u32,
    /// The timer runs at [`KICK`] until the root's next tick.
    pub kicked: bool,
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

fn shared_key(kind: &str, provider: &str) -> String {
    format!("phi_guard.{kind}.{provider}")
}

impl Worker {
    pub fn new(policy: Rc<Policy>, chain: AuditChain, root_context_id: u32) -> Worker {
        let providers = policy
            .providers
            .iter()
            .map(|_| ProviderKeys::default())
            .collect();
        Worker {
            cache: TokenCache::new(policy.verified_token_cache_size),
            checkpoints: CheckpointSchedule::new(policy.audit_checkpoint_seconds),
            policy,
            providers,
            waiters: Vec::new(),
            callouts: Vec::new(),
            metrics: Metrics::define(),
            chain,
            last_sync_ms: 0,
            root_context_id,
            kicked: false,
            served: false,
        }
    }

    /// Decides a request with the keys this VM holds.
    pub fn decide(&mut self, req: &Request<'_>, now_ms: u64, may_wait: bool) -> (Verdict, Trace) {
        self.served = true;
        let now = secs(now_ms);
        let mut trace = Trace::default();
        let policy = Rc::clone(&self.policy);
        let providers = &self.providers;
        let src = |i: usize| policy.providers.get(i).map(|p| &p.jwks);
        let keys = |i: usize| -> Option<&KeySet> {
            let p = providers.get(i)?;
            let src = src(i)?;
            match p.clock.availability(src, now) {
                Availability::Usable => p.keys.as_deref(),
                Availability::Missing => None,
            }
        };
        let now_i = i64::try_from(now).unwrap_or(i64::MAX);
        let verdict = decision::decide(
            &policy,
            &keys,
            &mut self.cache,
            req,
            now_i,
            may_wait,
            &mut trace,
        );
        (verdict, trace)
    }

    /// Counts a request's final decision in the cache stats, once: a request
    /// that waited for keys is decided more than once.
    pub fn count_caches(&self, trace: Trace, verdict: &Verdict, waited: bool) {
        match trace.token_cache_hit {
            Some(true) => metrics::bump(self.metrics.token_cache_hit),
            Some(false) => {
                metrics::bump(self.metrics.token_cache_miss);
                let keys_missing = matches!(
                    verdict,
                    Verdict::Wait { .. }
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
    }

    /// Makes sure keys for `provider` are on their way; `false` when no fetch
    /// may be had (unknown-kid rate limit), so the request is decided now. A
    /// fetch the root then cannot start decides its waiters on that tick.
    pub fn want_keys(&mut self, provider: usize, unknown_kid: bool, now_ms: u64) -> bool {
        let now = secs(now_ms);
        let Some(src) = self.policy.providers.get(provider).map(|p| &p.jwks) else {
            return false;
        };
        let Some(state) = self.providers.get(provider) else {
            return false;
        };
        if unknown_kid && !state.clock.kid_refetch_allowed(src, now) {
            return false;
        }
        if state.clock.in_flight {
            if unknown_kid {
                // The running fetch counts as this kid's refetch.
                if let Some(s) = self.providers.get_mut(provider) {
                    s.clock.last_kid_refetch = Some(now);
                }
            }
            return true;
        }
        // Asked for from a request's context: the root dispatches it (see
        // `root_context_id`) on a tick brought forward to now.
        if let Some(s) = self.providers.get_mut(provider) {
            s.fetch_wanted = Some(s.fetch_wanted == Some(true) || unknown_kid);
        }
        if !self.kicked {
            self.kicked = abi::set_tick_period(KICK).is_ok();
        }
        true
    }

    /// Starts a fetch if this VM wins the lease; `true` if a fetch is running
    /// anywhere (here or in the lease holder).
    pub fn start_fetch(&mut self, provider: usize, now_ms: u64, for_unknown_kid: bool) -> bool {
        let policy = Rc::clone(&self.policy);
        let Some(p) = policy.providers.get(provider) else {
            return false;
        };
        let src = &p.jwks;
        let lease_key = shared_key("jwks_lease", &p.name);
        let lease_ms = src.timeout_ms.saturating_add(500);
        let (lease, cas) = abi::shared_data(&lease_key).unwrap_or((None, None));
        let held_until = lease
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let Some(state) = self.providers.get_mut(provider) else {
            return false;
        };
        if held_until > now_ms && !state.clock.in_flight {
            // Another VM is fetching; its result arrives through shared data.
            if for_unknown_kid {
                state.clock.last_kid_refetch = Some(secs(now_ms));
            }
            return true;
        }
        let until = now_ms.saturating_add(lease_ms).to_string();
        if abi::set_shared_data(&lease_key, until.as_bytes(), cas).is_err() {
            // Lost the race for the lease: someone else fetches.
            return true;
        }
        let headers = vec![
            (":method", "GET"),
            (":path", src.path.as_str()),
            (":authority", src.authority.as_str()),
            ("accept", "application/json"),
        ];
        let timeout = Duration::from_millis(src.timeout_ms);
        // Only root callbacks get here (see `root_context_id`); made sure of anyway.
        let _ = abi::set_effective_context(self.root_context_id);
        match abi::dispatch_http_call(&src.cluster, headers, timeout) {
            Ok(token) => {
                state.clock.started(secs(now_ms), for_unknown_kid);
                state.in_flight_until_ms = now_ms.saturating_add(lease_ms);
                self.callouts.push((token, provider));
                true
            }
            Err(status) => {
                log::warn!(
                    "JWKS fetch for provider {} could not be dispatched through cluster {} (host status {})",
                    p.name,
                    src.cluster,
                    status.0
                );
                state.clock.started(secs(now_ms), for_unknown_kid);
                state.clock.finished(None);
                let _ = abi::set_shared_data(&lease_key, b"0", None);
                metrics::bump(self.metrics.jwks_fetch_failed);
                false
            }
        }
    }

    /// Whether `token` is one of our JWKS callouts; handles its response and
    /// returns the provider whose waiters can now be decided.
    pub fn on_fetch_response(
        &mut self,
        token: u32,
        body_size: usize,
        now_ms: u64,
    ) -> Option<usize> {
        let at = self.callouts.iter().position(|(t, _)| *t == token)?;
        let (_, provider) = self.callouts.swap_remove(at);
        let policy = Rc::clone(&self.policy);
        let p = policy.providers.get(provider)?;
        let doc = read_callout(body_size, MAX_JWKS_BYTES).and_then(|body| {
            KeySet::parse(&body, &p.algorithms)
                .map(|k| (body, k))
                .map_err(|e| e.to_string())
        });
        let lease_key = shared_key("jwks_lease", &p.name);
        match doc {
            Ok((body, keys)) => {
                let fetched_at = secs(now_ms);
                log::info!(
                    "provider {}: {} keys loaded from {}",
                    p.name,
                    keys.len(),
                    p.jwks.uri
                );
                let mut shared = fetched_at.to_string().into_bytes();
                shared.push(b'\n');
                shared.extend_from_slice(&body);
                let key = shared_key("jwks", &p.name);
                let _ = abi::set_shared_data(&key, &shared, None);
                let cas = abi::shared_data(&key).ok().and_then(|(_, cas)| cas);
                self.install(provider, keys, &body, fetched_at, cas);
                metrics::bump(self.metrics.jwks_fetch_ok);
            }
            Err(problem) => {
                log::error!(
                    "provider {}: JWKS refused, keeping previous keys: {problem}",
                    p.name
                );
                if let Some(state) = self.providers.get_mut(provider) {
                    state.clock.finished(None);
                }
                metrics::bump(self.metrics.jwks_fetch_failed);
            }
        }
        // Released after publishing, so no VM starts a fetch the result already answers.
        let _ = abi::set_shared_data(&lease_key, b"0", None);
        Some(provider)
    }

    fn install(
        &mut self,
        provider: usize,
        keys: KeySet,
        doc: &[u8],
        fetched_at: u64,
        cas: Option<u32>,
    ) {
        let digest = crate::token::sha256(doc);
        let mut changed = true;
        if let Some(state) = self.providers.get_mut(provider) {
            changed = state.doc_digest != Some(digest);
            state.keys = Some(Rc::new(keys));
            state.doc_digest = Some(digest);
            state.clock.finished(Some(fetched_at));
            state.shared_cas = cas;
        }
        // Tokens were verified against the old set; a removed key must not live
        // on in the cache. An unchanged document keeps the cache warm.
        if changed {
            self.cache.forget_provider(provider);
        }
    }

    /// Picks up keys another VM published. Returns whether new keys arrived.
    pub fn sync_shared(&mut self, provider: usize, _now_ms: u64) -> bool {
        let policy = Rc::clone(&self.policy);
        let Some(p) = policy.providers.get(provider) else {
            return false;
        };
        let Ok((Some(value), cas)) = abi::shared_data(&shared_key("jwks", &p.name)) else {
            return false;
        };
        if cas.is_some()
            && self
                .providers
                .get(provider)
                .is_some_and(|s| s.shared_cas == cas)
        {
            return false;
        }
        let Some(split) = value.iter().position(|b| *b == b'\n') else {
            return false;
        };
        let fetched_at = value
            .get(..split)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok());
        let (Some(fetched_at), Some(body)) = (fetched_at, value.get(split + 1..)) else {
            return false;
        };
        if self
            .providers
            .get(provider)
            .and_then(|s| s.clock.fetched_at)
            .is_some_and(|mine| mine > fetched_at)
        {
            return false;
        }
        match KeySet::parse(body, &p.algorithms) {
            Ok(keys) => {
                let in_flight = self
                    .providers
                    .get(provider)
                    .is_some_and(|s| s.clock.in_flight);
                self.install(provider, keys, body, fetched_at, cas);
                if in_flight {
                    // Our own fetch may still answer; keep waiting for it.
                    if let Some(s) = self.providers.get_mut(provider) {
                        s.clock.in_flight = true;
                    }
                }
                true
            }
            Err(_) => false,
        }
    }

    /// The timer: fetches requests asked for, shared keys, scheduled fetches,
    /// lost callouts, gauges.
    /// Returns the providers whose waiters should be decided again, and the
    /// waiters whose deadline passed.
    pub fn tick(&mut self, now_ms: u64) -> (Vec<usize>, Vec<Waiter>) {
        let now = secs(now_ms);
        let mut ready = Vec::new();
        let sync_all = !self.waiters.is_empty()
            || self.providers.iter().any(|p| p.keys.is_none())
            || now_ms.saturating_sub(self.last_sync_ms) >= 1000;
        if sync_all {
            self.last_sync_ms = now_ms;
        }
        for i in 0..self.providers.len() {
            let wanted = self
                .providers
                .get_mut(i)
                .and_then(|s| s.fetch_wanted.take());
            // No fetch to be had (rate limit, dispatch refused): its waiters are decided now.
            if let Some(for_unknown_kid) = wanted {
                if !self.start_fetch(i, now_ms, for_unknown_kid) {
                    ready.push(i);
                }
            }
        }
        let mut oldest = 0;
        for i in 0..self.providers.len() {
            if sync_all && self.sync_shared(i, now_ms) {
                ready.push(i);
            }
            let Some(src) = self.policy.providers.get(i).map(|p| &p.jwks) else {
                continue;
            };
            if let Some(state) = self.providers.get_mut(i) {
                if state.clock.in_flight && now_ms > state.in_flight_until_ms {
                    state.clock.finished(None);
                    self.callouts.retain(|(_, p)| *p != i);
                    ready.push(i);
                }
                if let Some(at) = state.clock.fetched_at {
                    oldest = oldest.max(now.saturating_sub(at));
                }
                if state.clock.fetch_due(src, now) {
                    self.start_fetch(i, now_ms, false);
                }
            }
        }
        metrics::set(self.metrics.key_age_seconds, oldest);
        // Every VM writes the same gauge names and the last writer wins: the
        // main thread's VM, which never serves a request, must not zero them.
        if self.served {
            metrics::set(self.metrics.token_cache_entries, self.cache.len() as u64);
            metrics::set(
                self.metrics.token_cache_bytes,
                self.cache.approx_bytes() as u64,
            );
        }
        let (expired, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.deadline_ms <= now_ms);
        self.waiters = waiting;
        (ready, expired)
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

    /// Takes the waiters of `provider` out of the list.
    pub fn take_waiters(&mut self, provider: usize) -> Vec<Waiter> {
        let (mine, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.provider == provider);
        self.waiters = rest;
        mine
    }
}

/// The body of the callout being answered, if it is a 200 of at most `max`
/// bytes; otherwise why not, for the log. Every read returns an error rather
/// than panicking: a callout that failed (reset, body over Envoy's buffer
/// limit, timeout) has no response headers, and the host says so with a
/// status the SDK's readers abort the VM on.
fn read_callout(body_size: usize, max: usize) -> Result<Vec<u8>, String> {
    let status = match abi::header(MapType::HttpCallResponseHeaders, ":status") {
        Ok(Some(status)) => status,
        Ok(None) | Err(_) => {
            // Envoy's reason, e.g. "reset" (also for a body over its buffer limit).
            let why = abi::last_status()
                .ok()
                .map(|(_, m)| printable(&m))
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "no response".to_string());
            return Err(format!("fetch failed: {why}"));
        }
    };
    if status != b"200" {
        // A redirect is not followed: the configured URI is the one trusted.
        return Err(format!("endpoint answered HTTP {}", printable(&status)));
    }
    if body_size > max {
        return Err(format!(
            "document of {body_size} bytes is over the {max}-byte limit"
        ));
    }
    match abi::buffer(BufferType::HttpCallResponseBody, 0, body_size) {
        Ok(Some(body)) if body.len() <= max => Ok(body),
        Ok(Some(body)) => Err(format!(
            "document of {} bytes is over the {max}-byte limit",
            body.len()
        )),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(format!("body could not be read (host status {})", e.0)),
    }
}

/// At most 64 characters of host-supplied text, control characters replaced:
/// it goes into Envoy's log.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A callout answered (in the root context, which dispatched it): take the keys,
/// then decide the requests that waited for them.
pub fn on_callout(worker: &Rc<RefCell<Worker>>, token: u32, body_size: usize) {
    let now = now_ms();
    let done = worker.borrow_mut().on_fetch_response(token, body_size, now);
    if let Some(provider) = done {
        let waiters = worker.borrow_mut().take_waiters(provider);
        wake(worker, waiters, now);
    }
}

/// Decides the given waiters again, for good, each in its own context.
pub fn wake(worker: &Rc<RefCell<Worker>>, waiters: Vec<Waiter>, now_ms: u64) {
    for w in waiters {
        let Some(pending) = w.pending.upgrade() else {
            continue;
        };
        if abi::set_effective_context(w.context_id).is_err() {
            continue;
        }
        http::finish_waiting(worker, &pending, now_ms);
    }
}
