//! Documents fetched by HTTP callout and shared by every VM of this Envoy: a
//! provider's JWKS, the revocation list. What a document holds is the
//! worker's business; this fetches, shares, refreshes and lets it go stale.
//!
//! One VM fetches (a lease under `phi_guard.lease.<doc>` in shared data,
//! `<held until> <attempt started>` in ms, which also spaces retries
//! across VMs),
//! checks the body through the worker, and publishes it under
//! `phi_guard.doc.<doc>` as `<version>\n<body>`, then the version alone
//! under `phi_guard.ver.<doc>`; a version is `<fetched_at ms>:<sha-256 prefix>`,
//! the time its fetch started. Every VM
//! reads the version on its timer, and the document only when its content
//! changed: a large list is copied and parsed once per change, not once per
//! tick or per refresh.

use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType};
use sha2::{Digest, Sha256};

use crate::config::FetchSource;
use crate::fetch::{CacheClock, WaitEnds};

use super::abi;

/// Timer period while a request waits for a fetch to be dispatched.
pub const KICK: Duration = Duration::from_millis(1);

/// How often a VM with nothing waiting looks for a newer shared copy.
const SYNC_EVERY_MS: u64 = 100;

/// One document's state in this VM.
pub struct Document {
    /// Its name in shared data and the log (`jwks.<provider>`, `revocation`).
    pub name: String,
    /// Largest body accepted.
    max_bytes: usize,
    pub clock: CacheClock,
    /// Content hash of what this VM holds (its own fetch or a peer's).
    hash: Option<String>,
    /// When an in-flight fetch is given up on (a safety net: its callback
    /// should always come, but a lost one must not hold the document back).
    in_flight_until_ms: u64,
    /// A request asked for a fetch (`true`: on demand, e.g. an unknown
    /// `kid`); the root context dispatches it on the next tick.
    wanted: Option<bool>,
}

/// A body that arrived: from this VM's callout, or a peer's shared copy.
pub struct Arrival {
    pub doc: usize,
    pub body: Vec<u8>,
    /// When the fetch that brought it started (ms).
    pub fetched_at: u64,
    /// Its content hash.
    hash: String,
    /// A peer's copy, already in shared data.
    from_peer: bool,
}

impl Arrival {
    /// Whether this VM already holds this very content: only its age changes.
    pub fn unchanged(&self, fetcher: &Fetcher) -> bool {
        fetcher
            .docs
            .get(self.doc)
            .is_some_and(|d| d.hash.as_deref() == Some(self.hash.as_str()))
    }
}

/// What one callout response came to.
pub enum Response {
    /// Not one of ours.
    Unknown,
    /// A body for the worker to check, then [`Fetcher::accept`] or [`Fetcher::reject`].
    Body(Arrival),
    /// The fetch failed; already recorded.
    Failed { doc: usize, why: String },
}

/// Every document of this VM, and its callouts.
pub struct Fetcher {
    pub docs: Vec<Document>,
    /// Callout token -> document, and when its fetch started (ms).
    callouts: Vec<(u32, usize, u64)>,
    /// Callouts are dispatched only from the root context's own callbacks:
    /// Envoy cancels a context's callouts when it ends, and the SDK hands a
    /// response to the context that was running at dispatch, or drops it if
    /// that context is gone. A request's stream may end (client gone) before
    /// the document arrives, and it must still land.
    root_context_id: u32,
    /// The timer runs at [`KICK`] until the root's next tick.
    pub kicked: bool,
    last_sync_ms: u64,
}

fn shared(kind: &str, doc: &str) -> String {
    format!("phi_guard.{kind}.{doc}")
}

/// A lease: held until (ms), and when its fetch started (s), if written so.
fn read_lease(v: &[u8]) -> (u64, Option<u64>) {
    let text = std::str::from_utf8(v).unwrap_or("");
    let mut parts = text.split(' ');
    let until = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (until, parts.next().and_then(|p| p.parse().ok()))
}

/// Gives the lease of `doc` up, keeping when its fetch started.
fn release(doc: &str) {
    let key = shared("lease", doc);
    let started = abi::shared_data(&key)
        .ok()
        .and_then(|(v, _)| v)
        .and_then(|v| read_lease(&v).1)
        .map_or_else(String::new, |at| format!(" {at}"));
    let _ = abi::set_shared_data(&key, format!("0{started}").as_bytes(), None);
}

/// The first 8 bytes of the body's SHA-256, in hex.
fn content_hash(body: &[u8]) -> String {
    Sha256::digest(body)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A shared version, `<fetched_at>:<content hash>`.
fn parse_version(v: &[u8]) -> Option<(u64, &str)> {
    let v = std::str::from_utf8(v).ok()?;
    let (at, hash) = v.split_once(':')?;
    Some((at.parse().ok()?, hash))
}

impl Fetcher {
    /// Documents by `(name, largest body)`, in the worker's order.
    pub fn new(docs: Vec<(String, usize)>, root_context_id: u32) -> Fetcher {
        Fetcher {
            docs: docs
                .into_iter()
                .map(|(name, max_bytes)| Document {
                    name,
                    max_bytes,
                    clock: CacheClock::default(),
                    hash: None,
                    in_flight_until_ms: 0,
                    wanted: None,
                })
                .collect(),
            callouts: Vec::new(),
            root_context_id,
            kicked: false,
            last_sync_ms: 0,
        }
    }

    /// Makes sure `doc` is on its way; what ends the request's wait, or
    /// `None` when it may not wait (the on-demand rate limit), so it is
    /// decided now. A fetch the root then cannot start decides its waiters
    /// on that tick.
    pub fn want(
        &mut self,
        doc: usize,
        src: &FetchSource,
        on_demand: bool,
        now_ms: u64,
    ) -> Option<WaitEnds> {
        let d = self.docs.get_mut(doc)?;
        let wish = d.clock.want(src, now_ms, on_demand)?;
        if let Some(on_demand) = wish.fetch {
            // Asked for from a request's context: the root dispatches it (see
            // `root_context_id`) on a tick brought forward to now, or after
            // the fetch under way.
            d.wanted = Some(d.wanted == Some(true) || on_demand);
            self.kick();
        }
        Some(wish.ends)
    }

    /// Whether a fetch asked for has yet to start: the root's timer keeps
    /// running at [`KICK`] until it has.
    pub fn wants_pending(&self) -> bool {
        self.docs.iter().any(|d| d.wanted.is_some())
    }

    /// Whether a wait on `doc` that `ends` so has its answer.
    pub fn answers(&self, doc: usize, ends: WaitEnds) -> bool {
        self.docs.get(doc).is_none_or(|d| d.clock.answers(ends))
    }

    /// Brings the root's next tick forward to now, where the callouts
    /// requests asked for are dispatched (documents and introspection alike).
    pub fn kick(&mut self) {
        if !self.kicked {
            self.kicked = abi::set_tick_period(KICK).is_ok();
        }
    }

    /// Starts a fetch if this VM wins the lease; `true` if a fetch is running
    /// anywhere (here or in the lease holder), or another VM tried one within
    /// `retry_seconds` (scheduled fetches only): one attempt per retry
    /// interval for the whole Envoy, not one per VM.
    pub fn start(&mut self, doc: usize, src: &FetchSource, now_ms: u64, on_demand: bool) -> bool {
        let Some(d) = self.docs.get_mut(doc) else {
            return false;
        };
        let lease_key = shared("lease", &d.name);
        let lease_ms = src.timeout_ms.saturating_add(500);
        let (lease, cas) = abi::shared_data(&lease_key).unwrap_or((None, None));
        let (held_until, attempted) = lease.as_deref().map_or((0, None), read_lease);
        if held_until > now_ms && !d.clock.in_flight {
            // Another VM is fetching; its result arrives through shared data.
            // For an unknown kid, only if that fetch started after it was
            // asked for; else this VM fetches once the lease is given up.
            let serves = attempted
                .is_some_and(|at| d.clock.last_kid_refetch.is_none_or(|asked| at >= asked));
            if on_demand && !serves {
                d.wanted = Some(true);
                return true;
            }
            if let Some(at) = attempted {
                d.clock.last_attempt = Some(at);
            }
            return true;
        }
        if let Some(at) = attempted {
            if !on_demand
                && !d.clock.in_flight
                && now_ms < at.saturating_add(src.retry_seconds.saturating_mul(1000))
            {
                d.clock.last_attempt = Some(at);
                return true;
            }
        }
        // A peer published a newer copy since this VM last looked (it writes
        // the version before it gives the lease up): the next sync takes it.
        if !on_demand {
            let newer = abi::shared_data(&shared("ver", &d.name))
                .ok()
                .and_then(|(v, _)| v)
                .and_then(|v| parse_version(&v).map(|(at, _)| at))
                .is_some_and(|at| d.clock.fetched_at.is_none_or(|mine| at > mine));
            if newer {
                return true;
            }
        }
        let until = format!("{} {}", now_ms.saturating_add(lease_ms), now_ms);
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
        d.clock.started(now_ms);
        match abi::dispatch_http_call(&src.cluster, headers, None, timeout) {
            Ok(token) => {
                d.in_flight_until_ms = now_ms.saturating_add(lease_ms);
                self.callouts.push((token, doc, now_ms));
                true
            }
            Err(status) => {
                log::warn!(
                    "{}: fetch could not be dispatched through cluster {} (host status {})",
                    d.name,
                    src.cluster,
                    status.0
                );
                d.clock.finished(None);
                release(&d.name);
                false
            }
        }
    }

    /// Reads the response to callout `token`.
    pub fn on_response(&mut self, token: u32, body_size: usize) -> Response {
        let Some(at) = self.callouts.iter().position(|(t, _, _)| *t == token) else {
            return Response::Unknown;
        };
        let (_, doc, started) = self.callouts.swap_remove(at);
        let Some(d) = self.docs.get(doc) else {
            return Response::Unknown;
        };
        match read_callout(body_size, d.max_bytes) {
            Ok(body) => Response::Body(Arrival {
                doc,
                hash: content_hash(&body),
                body,
                fetched_at: started,
                from_peer: false,
            }),
            Err(why) => {
                self.reject(doc);
                Response::Failed { doc, why }
            }
        }
    }

    /// The worker took `a`: this VM holds it now, and its own fetch
    /// publishes it for the others.
    pub fn accept(&mut self, a: Arrival) {
        let Some(d) = self.docs.get_mut(a.doc) else {
            return;
        };
        if a.from_peer {
            // Our own fetch, if one runs, may still answer.
            let in_flight = d.clock.in_flight;
            d.clock.finished(Some(a.fetched_at));
            d.clock.in_flight = in_flight;
        } else {
            let version = format!("{}:{}", a.fetched_at, a.hash);
            // The same content as the shared copy: only the version moves on.
            let shared_same = abi::shared_data(&shared("ver", &d.name))
                .ok()
                .and_then(|(v, _)| v)
                .is_some_and(|v| parse_version(&v).is_some_and(|(_, h)| h == a.hash));
            if !shared_same {
                let mut value = version.clone().into_bytes();
                value.push(b'\n');
                value.extend_from_slice(&a.body);
                let _ = abi::set_shared_data(&shared("doc", &d.name), &value, None);
            }
            let _ = abi::set_shared_data(&shared("ver", &d.name), version.as_bytes(), None);
            d.clock.finished(Some(a.fetched_at));
            // Released after publishing, so no VM starts a fetch the result already answers.
            release(&d.name);
        }
        d.hash = Some(a.hash);
    }

    /// This VM's fetch of `doc` failed, or brought a body the worker refused.
    pub fn reject(&mut self, doc: usize) {
        if let Some(d) = self.docs.get_mut(doc) {
            d.clock.finished(None);
            release(&d.name);
        }
    }

    /// A newer copy of `doc` another VM published, if there is one. When
    /// only its age changed (same content), this VM's copy is made as young
    /// and nothing is returned.
    pub fn peer_copy(&mut self, doc: usize) -> Option<Arrival> {
        let d = self.docs.get_mut(doc)?;
        let (version, _) = abi::shared_data(&shared("ver", &d.name)).ok()?;
        let version = version?;
        let (fetched_at, hash) = parse_version(&version)?;
        let mine = d.clock.fetched_at;
        if d.hash.as_deref() == Some(hash) {
            if mine.is_none_or(|mine| mine < fetched_at) {
                let in_flight = d.clock.in_flight;
                d.clock.finished(Some(fetched_at));
                d.clock.in_flight = in_flight;
            }
            return None;
        }
        if mine.is_some_and(|mine| mine > fetched_at) {
            return None;
        }
        let (value, _) = abi::shared_data(&shared("doc", &d.name)).ok()?;
        let value = value?;
        let split = value.iter().position(|b| *b == b'\n')?;
        let (doc_at, doc_hash) = parse_version(value.get(..split)?)?;
        // The version may have moved on since the document was written with
        // the same content; otherwise the document's own header names it.
        let fetched_at = if doc_hash == hash {
            fetched_at.max(doc_at)
        } else {
            doc_at
        };
        if mine.is_some_and(|mine| mine > fetched_at) {
            return None;
        }
        Some(Arrival {
            doc,
            body: value.get(split + 1..)?.to_vec(),
            fetched_at,
            hash: doc_hash.to_string(),
            from_peer: true,
        })
    }

    /// Whether peers' copies should be looked at now: every tick while a
    /// request waits or a document is missing, else every [`SYNC_EVERY_MS`].
    /// Before any scheduled fetch, so a peer's fresh copy spares one.
    pub fn sync_due(&mut self, now_ms: u64, waiting: bool) -> bool {
        let due = waiting
            || self.docs.iter().any(|d| d.clock.fetched_at.is_none())
            || now_ms.saturating_sub(self.last_sync_ms) >= SYNC_EVERY_MS;
        if due {
            self.last_sync_ms = now_ms;
        }
        due
    }

    /// The timer: fetches asked for, scheduled fetches, lost callouts.
    /// Returns the documents whose waiters should be decided again (no
    /// fetch could be started for them, or a lost one was given up on).
    pub fn tick<'p>(
        &mut self,
        now_ms: u64,
        src: &dyn Fn(usize) -> Option<&'p FetchSource>,
    ) -> Vec<usize> {
        let now = now_ms;
        let mut ready = Vec::new();
        for i in 0..self.docs.len() {
            // One fetch at a time: one asked for while another runs follows it.
            let wanted = self
                .docs
                .get_mut(i)
                .filter(|d| !d.clock.in_flight)
                .and_then(|d| d.wanted.take());
            if let (Some(on_demand), Some(s)) = (wanted, src(i)) {
                if !self.start(i, s, now_ms, on_demand) {
                    ready.push(i);
                }
            }
        }
        for i in 0..self.docs.len() {
            let Some(s) = src(i) else { continue };
            let Some(d) = self.docs.get_mut(i) else {
                continue;
            };
            if d.clock.in_flight && now_ms > d.in_flight_until_ms {
                d.clock.finished(None);
                self.callouts.retain(|(_, doc, _)| *doc != i);
                ready.push(i);
            }
            if d.clock.fetch_due(s, now) {
                self.start(i, s, now_ms, false);
            }
        }
        ready
    }
}

/// The body of the callout being answered, if it is a 200 of at most `max`
/// bytes; otherwise why not, for the log. Every read returns an error rather
/// than panicking: a callout that failed (reset, body over Envoy's buffer
/// limit, timeout) has no response headers, and the host says so with a
/// status the SDK's readers abort the VM on. Introspection reads its
/// answers with it too.
pub(super) fn read_callout(body_size: usize, max: usize) -> Result<Vec<u8>, String> {
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
