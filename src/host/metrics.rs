//! Envoy stats from the filter. Envoy shows them with a `wasmcustom.` prefix,
//! e.g. `wasmcustom.phi_guard.allowed`; every worker's VM defines the same
//! names, so Envoy sums them.

use proxy_wasm::types::MetricType;

use super::abi;

use crate::answer::Reason;

/// Metric ids of this VM; a metric that could not be defined is skipped.
#[derive(Debug, Default)]
pub struct Metrics {
    allowed: Option<u32>,
    denied: Vec<(&'static str, Option<u32>)>,
    pub jwks_fetch_ok: Option<u32>,
    pub jwks_fetch_failed: Option<u32>,
    pub revocation_fetch_ok: Option<u32>,
    pub revocation_fetch_failed: Option<u32>,
    pub revocation_entries: Option<u32>,
    pub revocation_age_seconds: Option<u32>,
    /// Requests decided while the revocation list was stale or missing.
    pub revocation_stale: Option<u32>,
    /// Introspection answers: active, inactive, or none usable.
    pub introspection_active: Option<u32>,
    pub introspection_inactive: Option<u32>,
    pub introspection_failed: Option<u32>,
    pub introspection_cache_hit: Option<u32>,
    pub introspection_cache_miss: Option<u32>,
    pub key_cache_hit: Option<u32>,
    pub key_cache_miss: Option<u32>,
    pub token_cache_hit: Option<u32>,
    pub token_cache_miss: Option<u32>,
    pub step_up_challenges: Option<u32>,
    /// Allowed tokens that carried a forbidden claim (`forbidden_claims_action: audit`).
    pub phi_flagged: Option<u32>,
    pub key_age_seconds: Option<u32>,
    pub token_cache_entries: Option<u32>,
    pub token_cache_bytes: Option<u32>,
}

fn counter(name: &str) -> Option<u32> {
    abi::define_metric(MetricType::Counter, name).ok()
}

fn gauge(name: &str) -> Option<u32> {
    abi::define_metric(MetricType::Gauge, name).ok()
}

impl Metrics {
    /// Defines every metric (idempotent on Envoy's side).
    pub fn define() -> Metrics {
        let mut denied: Vec<(&'static str, Option<u32>)> = Vec::new();
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
            introspection_active: counter("phi_guard.introspection.active"),
            introspection_inactive: counter("phi_guard.introspection.inactive"),
            introspection_failed: counter("phi_guard.introspection.failed"),
            introspection_cache_hit: counter("phi_guard.introspection_cache.hit"),
            introspection_cache_miss: counter("phi_guard.introspection_cache.miss"),
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
    pub fn decision(&self, reason: Reason) {
        if reason == Reason::Ok {
            bump(self.allowed);
            return;
        }
        if matches!(reason, Reason::StepUpRequired(_)) {
            bump(self.step_up_challenges);
        }
        let code = reason.code();
        if let Some((_, id)) = self.denied.iter().find(|(c, _)| *c == code) {
            bump(*id);
        }
    }
}

/// Adds one to a counter.
pub fn bump(id: Option<u32>) {
    if let Some(id) = id {
        let _ = abi::increment_metric(id, 1);
    }
}

/// Sets a gauge.
pub fn set(id: Option<u32>, value: u64) {
    if let Some(id) = id {
        let _ = abi::record_metric(id, value);
    }
}
