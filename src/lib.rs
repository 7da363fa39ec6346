//! phi-guard: an Envoy HTTP filter (proxy-wasm) that verifies OAuth 2.0 / OIDC
//! JWT access tokens and enforces least-privilege rules in front of PHI APIs.
//!
//! The crate is a pure core that decides and a thin host adapter that talks to
//! Envoy. Only `host` names `proxy_wasm`; everything else takes the time as an
//! argument and is tested natively.

pub mod answer;
pub mod audit;
pub mod binding;
pub mod budget;
#[cfg(not(target_arch = "wasm32"))]
pub mod cli;
pub mod config;
pub mod crypto;
pub mod decision;
#[cfg(not(target_arch = "wasm32"))]
pub mod explain;
pub mod fetch;
pub mod fhir;
pub mod introspection;
pub mod jwks;
#[cfg(not(target_arch = "wasm32"))]
pub mod lint;
pub mod outcome;
pub mod pairs;
// The command line's own rooms (audit report, lint, explain): native only,
// so the .wasm carries none of them nor their gzip and YAML parsers.
#[cfg(not(target_arch = "wasm32"))]
pub mod policy_file;
#[cfg(not(target_arch = "wasm32"))]
pub mod report;
pub mod revocation;
pub mod rules;
#[cfg(not(target_arch = "wasm32"))]
pub mod schema;
pub mod token;

#[cfg(test)]
mod testkit;

#[cfg(target_arch = "wasm32")]
mod host;

#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
mod native;
