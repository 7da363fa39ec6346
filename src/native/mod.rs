//! The second host adapter: the same core as an Envoy dynamic module
//! (`envoy.filters.http.dynamic_modules`), a native shared library Envoy
//! loads in-process through a C ABI. The only module that names that ABI;
//! `ffi` is the only file with `unsafe` code. Shared: configuration,
//! documents, timer, callouts, audit chains. Filter: read the request,
//! ask the core, answer or continue, write the audit record.

mod ffi;
mod filter;
mod metrics;
mod replay;
mod shared;
