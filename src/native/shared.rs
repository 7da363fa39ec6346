//! The filter configuration, shared by every worker thread: the policy, the
//! fetched documents (each provider's JWKS, the revocation list), the audit
//! chains, stats ids, and the requests waiting for a document.
//!
//! A dynamic module runs in Envoy's process, so the documents are shared as
//! plain memory: the main thread fetches each one (HTTP callouts from the
//! filter config, `config_http_callout`), checks it, and publishes an
//! immutable [`Snapshot`] that workers pick up by an atomic generation check;
//! no shared-data copies and no per-worker parsing. A timer thread posts a
//! tick to the main thread every [`TICK`] (the ABI has schedulers, not
//! timers); requests waiting for a document are woken on their own worker by
//! a per-stream scheduler.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::audit::{AuditChain, CheckpointSchedule};
use crate::config::{FetchSource, Policy};
use crate::fetch::{CacheClock, Freshness, WaitEnds};
use crate::jwks::{KeySet, MAX_JWKS_BYTES};
use crate::revocation::{RevocationList, MAX_REVOCATION_BYTES};

use super::ffi::{self, Config, Scheduler};
use super::metrics::{self, Metrics};

/// How often the main thread's tick runs: waiting requests are decided within
/// this of their deadline; scheduled fetches start within it of being due.
const TICK: Duration = Duration::from_millis(100);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Takes a lock even if a panic poisoned it: what it guards is replaced
/// whole, never left half-written, by every writer here.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What workers decide with: the documents as last published.
#[derive(Default)]
pub struct Snapshot {
    /// Each provider's keys, by provider index.
    pub keys: Vec<Option<Arc<KeySet>>>,
    /// Bumped when a provider's keys change (the token cache forgets it).
    pub key_versions: Vec<u64>,
    pub revocations: Option<Arc<RevocationList>>,
    /// Each document's clock (providers, then the revocation list).
    pub clocks: Vec<CacheClock>,
}

/// One fetched document, as the main thread keeps it.
struct Doc {
    name: String,
    max_bytes: usize,
    clock: CacheClock,
    /// Content hash of what is held: the same body again only ages it.
    hash: Option<[u8; 32]>,
    /// A request asked for a fetch (started on the next tick, or after
    /// the one under way).
    wanted: bool,
    /// The callout under way, and when it is given up on.
    callout: Option<(u64, u64)>,
}

/// A paused request waiting for a document.
struct Waiter {
    doc: usize,
    /// What ends the wait besides the deadline.
    ends: WaitEnds,
    deadline_ms: u64,
    wake: Arc<Scheduler>,
}

/// What only the main thread changes (and workers, briefly, to ask).
struct Docs {
    docs: Vec<Doc>,
    keys: Vec<Option<Arc<KeySet>>>,
    key_versions: Vec<u64>,
    revocations: Option<Arc<RevocationList>>,
    waiters: Vec<Waiter>,
    revocation_freshness: Option<Freshness>,
}

/// One worker's audit chain and when it next vouches for its head.
pub struct Chain {
    pub chain: AuditChain,
    checkpoints: CheckpointSchedule,
}

/// Whether a request's wish for a document was taken.
pub enum Want {
    /// Parked: a fetch is under way or asked for; its scheduler will wake it.
    Parked,
    /// No fetch may be had (the unknown-`kid` rate limit): decide now.
    Refused,
    /// A newer snapshot is out: decide again with it.
    Changed,
}

pub struct Shared {
    pub policy: Arc<Policy>,
    pub metrics: Metrics,
    /// One audit chain per worker thread, by Envoy's worker index.
    pub chains: Vec<Mutex<Chain>>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Bumped (after the snapshot is replaced) on every publish.
    pub generation: AtomicU64,
    docs: Mutex<Docs>,
    /// Brings `on_main_tick` to the main thread; `None` once stopped.
    tick: Mutex<Option<Arc<Scheduler>>>,
    ticker: Mutex<Option<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
    /// Distinguishes this config from a later one in worker-local state.
    pub id: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The audit HMAC key, if the policy names one. A named but unset variable
/// is a configuration error (as in the wasm filter, whose VM gets it passed).
fn audit_key(policy: &Policy) -> Result<Option<Vec<u8>>, String> {
    let Some(name) = policy.audit_hmac_key_env.as_deref() else {
        return Ok(None);
    };
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(Some(v.into_bytes())),
        _ => Err(format!(
            "invalid configuration at `audit.hmac_key_env`: environment variable {name} is not set in Envoy's environment"
        )),
    }
}

impl Shared {
    /// Loads the policy (the same JSON and errors as the wasm filter) and
    /// starts the tick. On the main thread, in `config_new`.
    pub fn new(config: Config, _name: &[u8], doc: &[u8]) -> Result<Arc<Shared>, String> {
        let policy = Policy::from_json(doc).map_err(|e| e.to_string())?;
        if let Some(warning) = policy.plaintext_warning() {
            log::warn!("{warning}");
        }
        if policy.fhir.is_some() && policy.audit_hmac_key_env.is_none() {
            log::warn!("fhir: no audit.hmac_key_env, so audit records carry no patient_fp");
        }
        if policy.fhir.is_some() {
            // Fails closed: the search is refused, never judged on its query alone.
            log::warn!("the native module reads no request body: a FHIR _search whose form body would decide it is answered 400 bad_fhir_request (use GET, or the wasm filter)");
        }
        if let Some(i) = policy
            .providers
            .iter()
            .position(|p| p.introspection.is_some())
        {
            return Err(format!(
                "invalid configuration at `providers[{i}].introspection`: token introspection is not supported by the native module yet (use the wasm filter)"
            ));
        }
        let key = audit_key(&policy)?;
        let start = now_ms();
        let workers = ffi::concurrency();
        let chains = (0..workers)
            .map(|i| {
                Mutex::new(Chain {
                    chain: AuditChain::new(format!("{start:x}-{}", i + 1), key.clone()),
                    checkpoints: CheckpointSchedule::new(policy.audit_checkpoint_seconds),
                })
            })
            .collect();
        let mut docs: Vec<Doc> = policy
            .providers
            .iter()
            .map(|p| Doc::new(format!("jwks.{}", p.name), MAX_JWKS_BYTES))
            .collect();
        if policy.revocation.is_some() {
            docs.push(Doc::new("revocation".to_string(), MAX_REVOCATION_BYTES));
        }
        let providers = policy.providers.len();
        let scheduler = Arc::new(config.scheduler());
        let stopping = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (scheduler, stopping) = (Arc::clone(&scheduler), Arc::clone(&stopping));
            std::thread::Builder::new()
                .name("phi-guard-tick".into())
                .spawn(move || {
                    while !stopping.load(Ordering::Acquire) {
                        scheduler.commit(0);
                        std::thread::sleep(TICK);
                    }
                })
                .map_err(|e| format!("the timer thread could not be started: {e}"))?
        };
        let shared = Shared {
            metrics: Metrics::define(&config),
            chains,
            snapshot: RwLock::new(Arc::new(Snapshot {
                keys: vec![None; providers],
                key_versions: vec![0; providers],
                revocations: None,
                clocks: docs.iter().map(|d| d.clock.clone()).collect(),
            })),
            generation: AtomicU64::new(0),
            docs: Mutex::new(Docs {
                docs,
                keys: vec![None; providers],
                key_versions: vec![0; providers],
                revocations: None,
                waiters: Vec::new(),
                revocation_freshness: None,
            }),
            tick: Mutex::new(Some(scheduler)),
            ticker: Mutex::new(Some(ticker)),
            stopping,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            policy: Arc::new(policy),
        };
        Ok(Arc::new(shared))
    }

    /// The config is being destroyed (main thread): the timer stops before
    /// its scheduler is deleted, and every chain's last records get a
    /// checkpoint now rather than never.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(t) = lock(&self.ticker).take() {
            let _ = t.join();
        }
        lock(&self.tick).take();
        let now = now_ms();
        for c in &self.chains {
            let mut c = lock(c);
            let Chain { chain, checkpoints } = &mut *c;
            if let Some(cp) = checkpoints.last(chain, now) {
                log::info!("{}", cp.line());
            }
        }
        // Waiting requests are woken to be decided (their streams end anyway).
        let waiters = std::mem::take(&mut lock(&self.docs).waiters);
        for w in waiters {
            w.wake.commit(0);
        }
    }

    /// The documents as last published, if newer than `generation`.
    pub fn snapshot(&self) -> (Arc<Snapshot>, u64) {
        // Read the generation first: a publish between the two reads only
        // makes the caller look again next time.
        let generation = self.generation.load(Ordering::Acquire);
        let snap = self
            .snapshot
            .read()
            .map_or_else(|e| Arc::clone(&e.into_inner()), |s| Arc::clone(&s));
        (snap, generation)
    }

    /// Where document `doc` comes from.
    pub fn source(&self, doc: usize) -> Option<&FetchSource> {
        match self.policy.providers.get(doc) {
            Some(p) => Some(&p.jwks),
            None if doc == self.policy.providers.len() => self.policy.revocation.as_ref(),
            None => None,
        }
    }

    /// The revocation list's document, if the policy has one.
    pub fn revocation_doc(&self) -> Option<usize> {
        self.policy
            .revocation
            .as_ref()
            .map(|_| self.policy.providers.len())
    }

    /// A request (on a worker) wants `doc`: parks it until the document
    /// arrives, its fetch fails, or `deadline_ms`. `seen` is the generation
    /// the request decided with.
    pub fn want(
        &self,
        doc: usize,
        on_demand: bool,
        now: u64,
        deadline_ms: u64,
        seen: u64,
        wake: &Arc<Scheduler>,
    ) -> Want {
        let Some(src) = self.source(doc) else {
            return Want::Refused;
        };
        {
            let mut docs = lock(&self.docs);
            if self.generation.load(Ordering::Acquire) != seen {
                return Want::Changed;
            }
            let Some(d) = docs.docs.get_mut(doc) else {
                return Want::Refused;
            };
            let Some(wish) = d.clock.want(src, now, on_demand) else {
                return Want::Refused;
            };
            d.wanted |= wish.fetch.is_some();
            docs.waiters.push(Waiter {
                doc,
                ends: wish.ends,
                deadline_ms,
                wake: Arc::clone(wake),
            });
        }
        // Brings the main thread's tick forward: the fetch starts now.
        if let Some(tick) = lock(&self.tick).as_ref() {
            tick.commit(1);
        }
        Want::Parked
    }

    /// The main thread's tick (timer or a request's wish): fetches asked for
    /// and due, lost callouts, deadlines, gauges, audit checkpoints.
    pub fn on_main_tick(&self, config: Config) {
        let now = now_ms();
        let mut changed = false;
        let mut ready: Vec<usize> = Vec::new();
        {
            let mut docs = lock(&self.docs);
            for i in 0..docs.docs.len() {
                let Some(src) = self.source(i) else { continue };
                let Some(d) = docs.docs.get_mut(i) else {
                    continue;
                };
                // One fetch at a time: one asked for while another runs follows it.
                if !d.clock.in_flight && std::mem::take(&mut d.wanted) {
                    changed = true;
                    if !d.start(i, src, &config, now) {
                        ready.push(i);
                    }
                }
                if let Some((_, until)) = d.callout {
                    if now > until {
                        // A callout whose answer never came: given up on.
                        d.callout = None;
                        d.clock.finished(None);
                        changed = true;
                        ready.push(i);
                    }
                }
                if d.clock.fetch_due(src, now) {
                    changed = true;
                    d.start(i, src, &config, now);
                }
            }
            let mut expired = Vec::new();
            let Docs {
                docs: all, waiters, ..
            } = &mut *docs;
            waiters.retain(|w| {
                let answered = ready.contains(&w.doc)
                    && all.get(w.doc).is_none_or(|d| d.clock.answers(w.ends));
                let due = w.deadline_ms <= now || answered;
                if due {
                    expired.push(Arc::clone(&w.wake));
                }
                !due
            });
            for wake in expired {
                wake.commit(0);
            }
            self.gauges(&mut docs, &config, now);
            if changed {
                self.publish(&docs);
            }
        }
        for c in &self.chains {
            let mut c = lock(c);
            let Chain { chain, checkpoints } = &mut *c;
            if let Some(cp) = checkpoints.due(chain, now) {
                log::info!("{}", cp.line());
            }
        }
    }

    /// A callout the main thread started answered (or failed).
    pub fn on_callout_done(
        &self,
        config: Config,
        id: u64,
        ok: bool,
        status: Option<Vec<u8>>,
        body: Vec<u8>,
    ) {
        let now = now_ms();
        let mut docs = lock(&self.docs);
        let Some(i) = docs
            .docs
            .iter()
            .position(|d| d.callout.is_some_and(|(c, _)| c == id))
        else {
            return;
        };
        let taken = self.take(&mut docs, i, ok, status.as_deref(), &body, now);
        let revocation = Some(i) == self.revocation_doc();
        let (good, bad) = if revocation {
            (
                self.metrics.revocation_fetch_ok,
                self.metrics.revocation_fetch_failed,
            )
        } else {
            (self.metrics.jwks_fetch_ok, self.metrics.jwks_fetch_failed)
        };
        let mut follow_up = false;
        if let Some(d) = docs.docs.get_mut(i) {
            d.callout = None;
            follow_up = d.wanted;
            match &taken {
                // One fetch at a time: the last attempt is this callout's start.
                Ok(()) => d.clock.finished(Some(d.clock.last_attempt.unwrap_or(now))),
                Err(why) => {
                    log::error!("{}: refused, keeping what was held: {why}", d.name);
                    d.clock.finished(None);
                }
            }
        }
        metrics::bump_main(&config, if taken.is_ok() { good } else { bad });
        self.publish(&docs);
        // Every request waiting for it is decided again, on its own worker
        // (for an unknown kid, only once a fetch started after it ended).
        let mut woken = Vec::new();
        let Docs {
            docs: all, waiters, ..
        } = &mut *docs;
        let clock = all.get(i).map(|d| &d.clock);
        waiters.retain(|w| {
            if w.doc == i && clock.is_none_or(|c| c.answers(w.ends)) {
                woken.push(Arc::clone(&w.wake));
                false
            } else {
                true
            }
        });
        drop(docs);
        for wake in woken {
            wake.commit(0);
        }
        if follow_up {
            // A refetch asked for while this fetch ran starts now.
            if let Some(tick) = lock(&self.tick).as_ref() {
                tick.commit(1);
            }
        }
    }

    /// Checks a response for document `i` and, if good, holds it.
    fn take(
        &self,
        docs: &mut Docs,
        i: usize,
        ok: bool,
        status: Option<&[u8]>,
        body: &[u8],
        _now: u64,
    ) -> Result<(), String> {
        if !ok {
            return Err("fetch failed: reset".to_string());
        }
        match status {
            Some(b"200") => {}
            Some(s) => {
                // A redirect is not followed: the configured URI is the one trusted.
                return Err(format!("endpoint answered HTTP {}", printable(s)));
            }
            None => return Err("fetch failed: no response".to_string()),
        }
        let Some(d) = docs.docs.get_mut(i) else {
            return Err("unknown document".to_string());
        };
        if body.len() > d.max_bytes {
            return Err(format!(
                "document of {} bytes is over the {}-byte limit",
                body.len(),
                d.max_bytes
            ));
        }
        let hash: [u8; 32] = Sha256::digest(body).into();
        if d.hash == Some(hash) {
            // The same content again: only its age changes.
            return Ok(());
        }
        if let Some(p) = self.policy.providers.get(i) {
            let keys = KeySet::parse(body, &p.algorithms).map_err(|e| e.to_string())?;
            log::info!(
                "provider {}: {} keys loaded from {}",
                p.name,
                keys.len(),
                p.jwks.uri
            );
            if let Some(slot) = docs.keys.get_mut(i) {
                *slot = Some(Arc::new(keys));
            }
            if let Some(v) = docs.key_versions.get_mut(i) {
                *v = v.wrapping_add(1);
            }
        } else if Some(i) == self.revocation_doc() {
            let list = RevocationList::parse(body).map_err(|e| e.to_string())?;
            log::info!("revocation list loaded: {} entries", list.len());
            docs.revocations = Some(Arc::new(list));
        }
        if let Some(d) = docs.docs.get_mut(i) {
            d.hash = Some(hash);
        }
        Ok(())
    }

    /// Publishes what `docs` holds for the workers.
    fn publish(&self, docs: &Docs) {
        let snap = Arc::new(Snapshot {
            keys: docs.keys.clone(),
            key_versions: docs.key_versions.clone(),
            revocations: docs.revocations.clone(),
            clocks: docs.docs.iter().map(|d| d.clock.clone()).collect(),
        });
        match self.snapshot.write() {
            Ok(mut s) => *s = snap,
            Err(e) => *e.into_inner() = snap,
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn gauges(&self, docs: &mut Docs, config: &Config, now: u64) {
        let providers = self.policy.providers.len();
        let secs = |at: u64| now.saturating_sub(at) / 1000;
        let key_age = docs
            .docs
            .iter()
            .take(providers)
            .filter_map(|d| d.clock.fetched_at)
            .map(secs)
            .max()
            .unwrap_or(0);
        metrics::set_main(config, self.metrics.key_age_seconds, key_age);
        let Some(i) = self.revocation_doc() else {
            return;
        };
        let d = docs.docs.get(i);
        let age = d.and_then(|d| d.clock.fetched_at).map_or(0, secs);
        metrics::set_main(config, self.metrics.revocation_age_seconds, age);
        let entries = docs.revocations.as_ref().map_or(0, |l| l.len());
        metrics::set_main(config, self.metrics.revocation_entries, entries as u64);
        let freshness = d
            .zip(self.source(i))
            .map(|(d, s)| d.clock.freshness(s, now));
        if freshness != docs.revocation_freshness && freshness != Some(Freshness::Pending) {
            match freshness {
                Some(Freshness::Usable) if docs.revocation_freshness.is_some() => {
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
            docs.revocation_freshness = freshness;
        }
    }
}

impl Doc {
    fn new(name: String, max_bytes: usize) -> Doc {
        Doc {
            name,
            max_bytes,
            clock: CacheClock::default(),
            hash: None,
            wanted: false,
            callout: None,
        }
    }

    /// Starts a fetch (main thread); `false` if Envoy refused the callout.
    fn start(&mut self, _i: usize, src: &FetchSource, config: &Config, now: u64) -> bool {
        let headers = [
            (":method", "GET"),
            (":path", src.path.as_str()),
            (":authority", src.authority.as_str()),
            ("accept", "application/json"),
        ];
        self.clock.started(now);
        match config.callout(&src.cluster, &headers, b"", src.timeout_ms) {
            Ok(id) => {
                let until = now.saturating_add(src.timeout_ms).saturating_add(500);
                self.callout = Some((id, until));
                true
            }
            Err(code) => {
                log::warn!(
                    "{}: fetch could not be dispatched through cluster {} (callout result {code})",
                    self.name,
                    src.cluster
                );
                self.clock.finished(None);
                false
            }
        }
    }
}

/// At most 64 characters of upstream-supplied text, control characters
/// replaced: it goes into Envoy's log.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
