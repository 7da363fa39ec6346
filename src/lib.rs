//! phi-guard: an Envoy HTTP filter (proxy-wasm) that verifies OAuth 2.0 / OIDC
//! JWT access tokens and enforces least-privilege rules in front of PHI APIs.
//!
//! The crate is a pure core that decides and a thin host adapter that talks to
//! Envoy. Only `host` names `proxy_wasm`; everything else takes the time as an
//! argument and is tested natively.

pub mod answer;
pub mod audit;
pub mod budget;
pub mod config;
pub mod crypto;
pub mod decision;
pub mod fetch;
pub mod fhir;
pub mod introspection;
pub mod jwks;
pub mod pairs;
pub mod revocation;
pub mod rules;
pub mod token;

#[cfg(test)]
mod testkit;

#[cfg(target_arch = "wasm32")]
mod host;
