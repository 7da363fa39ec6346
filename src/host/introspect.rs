//! Introspection callouts (RFC 7662): queries, not shared documents. A
//! request asks about its token; the root dispatches the POST on its next
//! tick (from its own context, as the fetcher does, so the answer lands even
//! if the client left); the answer, or the lack of one, goes to the worker,
//! which judges and keeps it and wakes the requests that wait for it.
//!
//! One callout per token in flight: requests with the same token share it.
//! The client secret lives only in the `Authorization` values made at start;
//! neither it nor a token is ever logged.

use std::time::Duration;

use crate::config::Policy;
use crate::introspection::{self, TokenKey, MAX_INTROSPECTION_BYTES};

use super::abi;
use super::fetcher::read_callout;

/// Queries queued or in flight per VM, at most: past it a request is
/// decided without waiting (503), so a flood of distinct tokens cannot pile
/// up callouts (Envoy's default circuit breaker allows as many requests).
const MAX_QUERIES: usize = 1024;

/// A lost callout is given up on this long after its timeout.
const GRACE_MS: u64 = 500;

/// One token to ask a provider about.
struct Query {
    provider: usize,
    key: TokenKey,
    token: String,
}

struct InFlight {
    callout: u32,
    query: Query,
    given_up_at_ms: u64,
}

/// What came of a query: the body of a 200, or why there is none.
pub struct Answered {
    pub provider: usize,
    pub key: TokenKey,
    /// The token asked about, for the answer's fingerprint. Never logged.
    pub token: String,
    pub body: Result<Vec<u8>, String>,
}

impl Answered {
    fn failed(q: Query, why: String) -> Answered {
        Answered {
            provider: q.provider,
            key: q.key,
            token: q.token,
            body: Err(why),
        }
    }
}

/// This VM's introspection queries.
pub struct Introspector {
    /// Per provider: its `Authorization: Basic` value, made at start.
    credentials: Vec<Option<String>>,
    /// Asked for by requests; the root dispatches them on its next tick.
    queued: Vec<Query>,
    in_flight: Vec<InFlight>,
    /// Per provider: the last query failed (logged once, until one succeeds).
    pub failing: Vec<bool>,
    root_context_id: u32,
}

impl Introspector {
    /// `credentials`: each provider's `Authorization` value, if it introspects.
    pub fn new(credentials: Vec<Option<String>>, root_context_id: u32) -> Introspector {
        Introspector {
            failing: credentials.iter().map(|_| false).collect(),
            credentials,
            queued: Vec::new(),
            in_flight: Vec::new(),
            root_context_id,
        }
    }

    fn asked(&self, provider: usize, key: &TokenKey) -> bool {
        let same = |q: &Query| q.provider == provider && q.key == *key;
        self.queued.iter().any(same) || self.in_flight.iter().any(|f| same(&f.query))
    }

    /// Makes sure `provider` is asked about `token` (SHA-256 `key`); `false`
    /// when it cannot be (no credentials, too many queries), so the request
    /// is decided now.
    pub fn want(&mut self, provider: usize, key: TokenKey, token: &str) -> bool {
        if self.asked(provider, &key) {
            return true;
        }
        if self.credentials.get(provider).is_none_or(|c| c.is_none())
            || self.queued.len() + self.in_flight.len() >= MAX_QUERIES
        {
            return false;
        }
        self.queued.push(Query {
            provider,
            key,
            token: token.to_string(),
        });
        true
    }

    /// The root's tick: dispatches the queued queries; those that cannot be
    /// dispatched, and lost ones, are answered as failed.
    pub fn tick(&mut self, policy: &Policy, now_ms: u64) -> Vec<Answered> {
        let mut done = Vec::new();
        for q in std::mem::take(&mut self.queued) {
            let endpoint = policy
                .providers
                .get(q.provider)
                .and_then(|p| p.introspection.as_ref());
            let auth = self.credentials.get(q.provider).and_then(Option::as_deref);
            let (Some(endpoint), Some(auth)) = (endpoint, auth) else {
                done.push(Answered::failed(q, "not configured".to_string()));
                continue;
            };
            let body = introspection::form_body(&q.token);
            let length = body.len().to_string();
            let headers = vec![
                (":method", "POST"),
                (":path", endpoint.path.as_str()),
                (":authority", endpoint.authority.as_str()),
                ("content-type", "application/x-www-form-urlencoded"),
                ("content-length", length.as_str()),
                ("accept", "application/json"),
                ("authorization", auth),
            ];
            // Only root callbacks get here; made sure of anyway.
            let _ = abi::set_effective_context(self.root_context_id);
            let timeout = Duration::from_millis(endpoint.timeout_ms);
            match abi::dispatch_http_call(
                &endpoint.cluster,
                headers,
                Some(body.as_bytes()),
                timeout,
            ) {
                Ok(callout) => self.in_flight.push(InFlight {
                    callout,
                    query: q,
                    given_up_at_ms: now_ms
                        .saturating_add(endpoint.timeout_ms)
                        .saturating_add(GRACE_MS),
                }),
                Err(status) => done.push(Answered::failed(
                    q,
                    format!(
                        "callout could not be dispatched through cluster {} (host status {})",
                        endpoint.cluster, status.0
                    ),
                )),
            }
        }
        let (lost, live): (Vec<InFlight>, Vec<InFlight>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|f| f.given_up_at_ms < now_ms);
        self.in_flight = live;
        done.extend(
            lost.into_iter()
                .map(|f| Answered::failed(f.query, "no answer came back".to_string())),
        );
        done
    }

    /// Reads the answer to `callout`, if it is one of ours.
    pub fn on_response(&mut self, callout: u32, body_size: usize) -> Option<Answered> {
        let at = self.in_flight.iter().position(|f| f.callout == callout)?;
        let f = self.in_flight.swap_remove(at);
        Some(Answered {
            provider: f.query.provider,
            key: f.query.key,
            token: f.query.token,
            body: read_callout(body_size, MAX_INTROSPECTION_BYTES),
        })
    }
}
