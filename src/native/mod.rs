//! The second host adapter: the same core as an Envoy dynamic module
//! (`envoy.filters.http.dynamic_modules`), a native shared library Envoy
//! loads in-process through a C ABI. The only module that names that ABI;
//! `ffi` is the only file with `unsafe` code.

mod ffi;
mod filter;
mod shared;
