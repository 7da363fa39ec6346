//! Envoy stats from the module: the wasm filter's names (`phi_guard.allowed`,
//! `phi_guard.denied.<reason>`, ...), defined once on the filter config and
//! shared by every worker (Envoy's counters are atomic and summed already).

use crate::answer::Reason;

use super::ffi::{Config, Stream};

/// Metric ids of this filter config; one that could not be defined is skipped.
#[derive(Debug, Default)]
pub struct Metrics {
    allowed: Option<usize>,
    denied: Vec<(&'static str, Option<usize>)>,
    pub jwks_fetch_ok: Option<usize>,
    pub jwks_fetch_failed: Option<usize>,
    pub revocation_fetch_ok: Option<usize>,
    pub revocation_fetch_failed: Option<usize>,
    pub revocation_entries: Option<usize>,
    pub revocation_age_seconds: Option<usize>,
    pub revocation_stale: Option<usize>,
    pub key_cache_hit: Option<usize>,
    pub key_cache_miss: Option<usize>,
    pub token_cache_hit: Option<usize>,
    pub token_cache_miss: Option<usize>,
    step_up_challenges: Option<usize>,
    /// Allowed tokens carrying a forbidden claim (`forbidden_claims_action: audit`).
    pub phi_flagged: Option<usize>,
    pub key_age_seconds: Option<usize>,
    pub token_cache_entries: Option<usize>,
    pub token_cache_bytes: Option<usize>,
}

impl Metrics {
    /// Defines every metric (main thread, at config load).
    pub fn define(config: &Config) -> Metrics {
        let counter = |name: &str| config.define(name, false);
        let gauge = |name: &str| config.define(name, true);
        let mut denied: Vec<(&'static str, Option<usize>)> = Vec::new();
        for reason in Reason::ALL {
            let code = reason.code();
            if reason != Reason::Ok && !denied.iter().any(|(c, _)| *c == code) {
                denied.push((code, counter(&format!("phi_guard.denied.{code}"))));
            }
        }
        Metrics {
            allowed: counter("phi_guard.allowed"),
            denied,
            jwks_fetch_ok: counter("phi_guard.jwks_fetch.ok"),
            jwks_fetch_failed: counter("phi_guard.jwks_fetch.failed"),
            revocation_fetch_ok: counter("phi_guard.revocation_fetch.ok"),
            revocation_fetch_failed: counter("phi_guard.revocation_fetch.failed"),
            revocation_entries: gauge("phi_guard.revocation.entries"),
            revocation_age_seconds: gauge("phi_guard.revocation.age_seconds"),
            revocation_stale: counter("phi_guard.revocation.stale_decisions"),
            key_cache_hit: counter("phi_guard.key_cache.hit"),
            key_cache_miss: counter("phi_guard.key_cache.miss"),
            token_cache_hit: counter("phi_guard.token_cache.hit"),
            token_cache_miss: counter("phi_guard.token_cache.miss"),
            step_up_challenges: counter("phi_guard.step_up_challenges"),
            phi_flagged: counter("phi_guard.phi_in_token.flagged"),
            key_age_seconds: gauge("phi_guard.jwks_key_age_seconds"),
            token_cache_entries: gauge("phi_guard.token_cache.entries"),
            token_cache_bytes: gauge("phi_guard.token_cache.bytes"),
        }
    }

    /// Counts one decision.
    pub fn decision(&self, stream: &Stream, reason: Reason) {
        if reason == Reason::Ok {
            bump(stream, self.allowed);
            return;
        }
        if matches!(reason, Reason::StepUpRequired(_)) {
            bump(stream, self.step_up_challenges);
        }
        let code = reason.code();
        if let Some((_, id)) = self.denied.iter().find(|(c, _)| *c == code) {
            bump(stream, *id);
        }
    }
}

/// Adds one to a counter, from a request.
pub fn bump(stream: &Stream, id: Option<usize>) {
    if let Some(id) = id {
        stream.increment(id, 1);
    }
}

/// Adds one to a counter, from the main thread.
pub fn bump_main(config: &Config, id: Option<usize>) {
    if let Some(id) = id {
        config.increment(id, 1);
    }
}

/// Sets a gauge, from the main thread.
pub fn set_main(config: &Config, id: Option<usize>, value: u64) {
    if let Some(id) = id {
        config.set_gauge(id, value);
    }
}
