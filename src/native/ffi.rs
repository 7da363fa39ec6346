//! The FFI boundary with Envoy's dynamic-module ABI: the only file of the
//! native adapter with `unsafe` code.
//!
//! Declared by hand from `source/extensions/dynamic_modules/abi/abi.h` in
//! Envoy's repository (the HTTP-filter part, ABI "v0.2.0" as Envoy 1.40.0
//! reports it; see docs/native-module.md for how it was matched). Only what
//! phi-guard uses is declared. Envoy exports the callbacks from its own
//! binary; the module exports the event hooks, each of which hands its
//! arguments, made safe, to `super::filter` or `super::shared` inside
//! [`guard`], so no panic unwinds into Envoy.
//!
//! Every C enum is passed as its `int` value (`u32` here), never as a Rust
//! enum: a value Envoy adds later would otherwise be undefined behaviour.
#![allow(unsafe_code)] // The boundary itself; each block states why it is sound.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{null, null_mut};
use std::sync::Arc;

use super::filter::Filter;
use super::shared::Shared;

/// The ABI version this module was written against (Envoy 1.40.0's
/// `ENVOY_DYNAMIC_MODULES_ABI_VERSION`). Envoy only logs a mismatch.
const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// A buffer Envoy owns (`envoy_dynamic_module_type_envoy_buffer`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

/// A buffer the module owns (`envoy_dynamic_module_type_module_buffer`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

/// A header the module owns (`envoy_dynamic_module_type_module_http_header`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// A header Envoy owns (`envoy_dynamic_module_type_envoy_http_header`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }
}

impl ModuleHttpHeader {
    fn of(name: &str, value: &str) -> ModuleHttpHeader {
        ModuleHttpHeader {
            key_ptr: name.as_ptr().cast(),
            key_length: name.len(),
            value_ptr: value.as_ptr().cast(),
            value_length: value.len(),
        }
    }
}

// envoy_dynamic_module_type_http_header_type
const REQUEST_HEADER: u32 = 0;
// envoy_dynamic_module_type_log_level
const LOG_DEBUG: u32 = 1;
const LOG_INFO: u32 = 2;
const LOG_WARN: u32 = 3;
const LOG_ERROR: u32 = 4;
// envoy_dynamic_module_type_on_http_filter_request_headers_status
const HEADERS_CONTINUE: u32 = 0;
const HEADERS_STOP_ITERATION: u32 = 1;
// The other status enums: 0 is Continue for each.
const CONTINUE: u32 = 0;
// envoy_dynamic_module_type_http_callout_init_result / _result
const CALLOUT_INIT_SUCCESS: u32 = 0;
const CALLOUT_SUCCESS: u32 = 0;
// envoy_dynamic_module_type_metrics_result
const METRICS_SUCCESS: u32 = 0;
// envoy_dynamic_module_type_attribute_id
const ATTR_RESPONSE_CODE: u32 = 15;
const ATTR_SOURCE_ADDRESS: u32 = 24;
const ATTR_CONNECTION_TLS_VERSION: u32 = 31;
const ATTR_CONNECTION_SHA256_PEER_CERTIFICATE_DIGEST: u32 = 38;

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;
    fn envoy_dynamic_module_callback_get_concurrency() -> u32;

    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: *mut c_void,
        header_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        header_type: u32,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status_code: u32,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: *mut c_void,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: *mut c_void,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: *mut c_void,
        attribute_id: u32,
        result: *mut u64,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: *mut c_void) -> u32;

    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: *mut c_void,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);

    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: *mut c_void,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
}

// ---------------------------------------------------------------------------
// Safe handles
// ---------------------------------------------------------------------------

/// Envoy's per-stream filter (`DynamicModuleHttpFilter*`), valid for the
/// duration of the event hook it was passed to: a `Stream` is only ever made
/// inside a hook and never stored.
pub struct Stream {
    ptr: *mut c_void,
}

/// Envoy's filter configuration (`DynamicModuleHttpFilterConfig*`). Valid
/// until `on_http_filter_config_destroy`, which drops the [`Shared`] holding
/// it. Callouts and config-level stats are only made on the main thread (in
/// config hooks), as the ABI wants.
#[derive(Clone, Copy)]
pub struct Config {
    ptr: *mut c_void,
}

// SAFETY: the pointer is only used on the main thread, in config hooks; the
// worker threads carry it without calling through it.
unsafe impl Send for Config {}
// SAFETY: as above.
unsafe impl Sync for Config {}

/// A scheduler (filter or config): commits are safe from any thread (the
/// ABI says so); deleted exactly once, on drop.
pub struct Scheduler {
    ptr: *mut c_void,
    config: bool,
}

// SAFETY: `scheduler_commit` is documented as callable from any thread and a
// no-op once the filter is gone; delete happens once, from the owner's drop.
unsafe impl Send for Scheduler {}
// SAFETY: as above: commit takes no lock on the module side.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    /// Posts `event` to the thread the scheduler belongs to.
    pub fn commit(&self, event: u64) {
        if self.ptr.is_null() {
            return;
        }
        // SAFETY: a live scheduler made by `*_scheduler_new` (deleted only in drop).
        unsafe {
            if self.config {
                envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.ptr, event)
            } else {
                envoy_dynamic_module_callback_http_filter_scheduler_commit(self.ptr, event)
            }
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        // SAFETY: made by `*_scheduler_new`, deleted once here.
        unsafe {
            if self.config {
                envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.ptr)
            } else {
                envoy_dynamic_module_callback_http_filter_scheduler_delete(self.ptr)
            }
        }
    }
}

/// Copies an Envoy-owned buffer.
///
/// # Safety
/// `ptr` must point to `len` readable bytes (or be null), valid for the call.
unsafe fn copy(ptr: *const c_char, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the caller vouches for ptr/len; the bytes are copied at once.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) }.to_vec()
}

impl Stream {
    /// Every request header, as (name, value) bytes, in order.
    pub fn request_headers(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        // SAFETY: live filter pointer (see `Stream`); plain query.
        let n = unsafe {
            envoy_dynamic_module_callback_http_get_headers_size(self.ptr, REQUEST_HEADER)
        };
        if n == 0 {
            return Vec::new();
        }
        let mut raw = vec![
            EnvoyHttpHeader {
                key_ptr: null(),
                key_length: 0,
                value_ptr: null(),
                value_length: 0,
            };
            n
        ];
        // SAFETY: `raw` has room for the `n` headers Envoy just counted; it
        // fills key/value pointers into its own header map, valid until the
        // hook returns or a header is set; they are copied right away.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_headers(
                self.ptr,
                REQUEST_HEADER,
                raw.as_mut_ptr(),
            )
        };
        if !ok {
            return Vec::new();
        }
        raw.iter()
            .map(|h| {
                // SAFETY: pointers/lengths from Envoy's header map, still valid (see above).
                unsafe {
                    (
                        copy(h.key_ptr, h.key_length),
                        copy(h.value_ptr, h.value_length),
                    )
                }
            })
            .collect()
    }

    /// Sets request header `name` to `value`, or removes it (`None`).
    pub fn set_request_header(&self, name: &str, value: Option<&str>) {
        let value = match value {
            Some(v) => ModuleBuffer::of(v.as_bytes()),
            None => ModuleBuffer {
                ptr: null(),
                length: 0,
            },
        };
        // SAFETY: live filter pointer; both buffers point into borrowed strings
        // that outlive the call (Envoy copies them); a null value removes.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                value,
            );
        }
    }

    /// Answers the request locally.
    pub fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let mut raw: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(k, v)| ModuleHttpHeader::of(k, v))
            .collect();
        let details = b"phi_guard";
        // SAFETY: live filter pointer; `raw` and every buffer it points to
        // outlive the call, and Envoy copies them into the local reply.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                status,
                raw.as_mut_ptr(),
                raw.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details),
            );
        }
    }

    /// Puts `value` into the stream's filter state under `key` (a string the
    /// access log's `%FILTER_STATE(key:PLAIN)%` prints).
    pub fn set_filter_state(&self, key: &str, value: &[u8]) -> bool {
        // SAFETY: live filter pointer; borrowed buffers, copied by Envoy.
        unsafe {
            envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.ptr,
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    fn attribute_string(&self, id: u32) -> Option<String> {
        let mut out = EnvoyBuffer {
            ptr: null(),
            length: 0,
        };
        // SAFETY: live filter pointer; `out` is a valid place for the result.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(self.ptr, id, &mut out)
        };
        if !ok {
            return None;
        }
        // SAFETY: Envoy's buffer, valid for this hook; copied at once.
        let bytes = unsafe { copy(out.ptr, out.length) };
        String::from_utf8(bytes).ok()
    }

    /// `source.address` (`ip:port`).
    pub fn source_address(&self) -> Option<String> {
        self.attribute_string(ATTR_SOURCE_ADDRESS)
    }

    /// `connection.tls_version`, on a TLS connection.
    pub fn tls_version(&self) -> Option<String> {
        self.attribute_string(ATTR_CONNECTION_TLS_VERSION)
            .filter(|v| !v.is_empty())
    }

    /// `connection.sha256_peer_certificate_digest` (hex), with a client certificate.
    pub fn peer_certificate_sha256(&self) -> Option<String> {
        self.attribute_string(ATTR_CONNECTION_SHA256_PEER_CERTIFICATE_DIGEST)
            .filter(|v| !v.is_empty())
    }

    /// `response.code`, once there is one.
    pub fn response_code(&self) -> Option<u16> {
        let mut code = 0u64;
        // SAFETY: live filter pointer; `code` is a valid place for the result.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_int(
                self.ptr,
                ATTR_RESPONSE_CODE,
                &mut code,
            )
        };
        if ok {
            u16::try_from(code).ok()
        } else {
            None
        }
    }

    /// Lets a request this filter stopped go on.
    pub fn continue_decoding(&self) {
        // SAFETY: live filter pointer, on its worker thread (a hook).
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.ptr) }
    }

    /// The index of the worker thread this stream runs on.
    pub fn worker_index(&self) -> usize {
        // SAFETY: live filter pointer; plain query.
        let i = unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(self.ptr) };
        usize::try_from(i).unwrap_or(0)
    }

    /// A scheduler that brings `on_http_filter_scheduled` to this stream's
    /// worker from any thread (deleted when dropped).
    pub fn scheduler(&self) -> Scheduler {
        Scheduler {
            // SAFETY: live filter pointer; ownership of the result is ours.
            ptr: unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.ptr) },
            config: false,
        }
    }

    /// Adds `n` to counter `id`.
    pub fn increment(&self, id: usize, n: u64) {
        // SAFETY: live filter pointer; no labels (null, 0), as defined.
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                self.ptr,
                id,
                null_mut(),
                0,
                n,
            )
        };
    }

    /// Sets gauge `id`.
    pub fn set_gauge(&self, id: usize, value: u64) {
        // SAFETY: live filter pointer; no labels (null, 0), as defined.
        unsafe {
            envoy_dynamic_module_callback_http_filter_set_gauge(self.ptr, id, null_mut(), 0, value)
        };
    }
}

impl Config {
    /// A scheduler that brings `on_http_filter_config_scheduled` to the main thread.
    pub fn scheduler(&self) -> Scheduler {
        Scheduler {
            // SAFETY: live config pointer (main thread, in a config hook).
            ptr: unsafe {
                envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.ptr)
            },
            config: true,
        }
    }

    /// Starts an HTTP callout through `cluster`; its id, or `None` if Envoy
    /// refused it (unknown cluster, no healthy host, ...).
    pub fn callout(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        let mut raw: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(k, v)| ModuleHttpHeader::of(k, v))
            .collect();
        let mut id = 0u64;
        // SAFETY: live config pointer, on the main thread (config hooks
        // only); every buffer outlives the call and Envoy copies them.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.ptr,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                raw.as_mut_ptr(),
                raw.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        if result == CALLOUT_INIT_SUCCESS {
            Ok(id)
        } else {
            Err(result)
        }
    }

    /// Defines a counter (or gauge) named `name`; its id.
    pub fn define(&self, name: &str, gauge: bool) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: live config pointer, main thread (config_new); no labels.
        let result = unsafe {
            if gauge {
                envoy_dynamic_module_callback_http_filter_config_define_gauge(
                    self.ptr,
                    ModuleBuffer::of(name.as_bytes()),
                    null_mut(),
                    0,
                    &mut id,
                )
            } else {
                envoy_dynamic_module_callback_http_filter_config_define_counter(
                    self.ptr,
                    ModuleBuffer::of(name.as_bytes()),
                    null_mut(),
                    0,
                    &mut id,
                )
            }
        };
        (result == METRICS_SUCCESS).then_some(id)
    }

    /// Adds `n` to counter `id` (main thread).
    pub fn increment(&self, id: usize, n: u64) {
        // SAFETY: live config pointer, main thread; no labels.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.ptr,
                id,
                null_mut(),
                0,
                n,
            )
        };
    }

    /// Sets gauge `id` (main thread).
    pub fn set_gauge(&self, id: usize, value: u64) {
        // SAFETY: live config pointer, main thread; no labels.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_set_gauge(
                self.ptr,
                id,
                null_mut(),
                0,
                value,
            )
        };
    }
}

/// Envoy's worker count (main thread only, e.g. in `config_new`).
pub fn concurrency() -> usize {
    // SAFETY: called from config_new, on the main thread, as the ABI requires.
    let n = unsafe { envoy_dynamic_module_callback_get_concurrency() };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// `log` crate lines into Envoy's log, under `[dynamic_modules]`.
struct EnvoyLogger;

fn level_of(level: log::Level) -> u32 {
    match level {
        log::Level::Error => LOG_ERROR,
        log::Level::Warn => LOG_WARN,
        log::Level::Info => LOG_INFO,
        log::Level::Debug | log::Level::Trace => LOG_DEBUG,
    }
}

impl log::Log for EnvoyLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // SAFETY: a plain query, callable from any thread.
        unsafe { envoy_dynamic_module_callback_log_enabled(level_of(metadata.level())) }
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!("phi_guard: {}", record.args());
        // SAFETY: a borrowed buffer Envoy copies into its log; any thread.
        unsafe {
            envoy_dynamic_module_callback_log(
                level_of(record.level()),
                ModuleBuffer::of(line.as_bytes()),
            )
        };
    }

    fn flush(&self) {}
}

static LOGGER: EnvoyLogger = EnvoyLogger;

// ---------------------------------------------------------------------------
// The edge: every hook runs its body under `guard`
// ---------------------------------------------------------------------------

/// Runs `f`, turning a panic into `fallback`: nothing unwinds into Envoy.
/// (The native profile builds with `panic = "unwind"` for this.)
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            log::error!("internal error (panic) caught at the module boundary; failing closed");
            fallback
        }
    }
}

/// The module's filter config, by the pointer Envoy holds.
///
/// # Safety
/// `ptr` must come from `config_new` (an `Arc::into_raw`) and not yet be
/// destroyed: Envoy guarantees it for every hook it passes it to.
unsafe fn shared<'a>(ptr: *const c_void) -> Option<&'a Shared> {
    // SAFETY: per the function's contract.
    unsafe { ptr.cast::<Shared>().as_ref() }
}

/// The module's per-stream filter, by the pointer Envoy holds.
///
/// # Safety
/// `ptr` must come from `filter_new` (a `Box::into_raw`) and not yet be
/// destroyed; Envoy calls a stream's hooks on its one worker thread, never
/// two at once, so the `&mut` is unique.
unsafe fn filter<'a>(ptr: *const c_void) -> Option<&'a mut Filter> {
    // SAFETY: per the function's contract.
    unsafe { ptr.cast::<Filter>().cast_mut().as_mut() }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guard(null(), || {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Info);
        ABI_VERSION.as_ptr().cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: *mut c_void,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard(null(), || {
        // SAFETY: Envoy's buffers, valid for this hook; copied.
        let (name, doc) = unsafe { (copy(name.ptr, name.length), copy(config.ptr, config.length)) };
        let handle = Config { ptr: config_envoy };
        match Shared::new(handle, &name, &doc) {
            Ok(shared) => Arc::into_raw(shared).cast(),
            Err(e) => {
                log::error!("{e}");
                null()
            }
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guard((), || {
        if config.is_null() {
            return;
        }
        // SAFETY: made by `Arc::into_raw` in config_new; Envoy destroys it once.
        let shared = unsafe { Arc::from_raw(config.cast::<Shared>()) };
        shared.stop();
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    config_envoy: *mut c_void,
    config: *const c_void,
    _event_id: u64,
) {
    guard((), || {
        // SAFETY: a live config (Envoy's contract for this hook).
        if let Some(s) = unsafe { shared(config) } {
            s.on_main_tick(Config { ptr: config_envoy });
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    config_envoy: *mut c_void,
    config: *const c_void,
    callout_id: u64,
    result: u32,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    guard((), || {
        // SAFETY: a live config (Envoy's contract for this hook).
        let Some(s) = (unsafe { shared(config) }) else {
            return;
        };
        let mut status = None;
        let mut body = Vec::new();
        if result == CALLOUT_SUCCESS {
            let heads: &[EnvoyHttpHeader] = if headers.is_null() {
                &[]
            } else {
                // SAFETY: Envoy's array of `headers_size` headers, valid for this hook.
                unsafe { std::slice::from_raw_parts(headers, headers_size) }
            };
            for h in heads {
                // SAFETY: Envoy's buffers, valid for this hook; copied.
                let key = unsafe { copy(h.key_ptr, h.key_length) };
                if key == b":status" {
                    // SAFETY: as above.
                    status = Some(unsafe { copy(h.value_ptr, h.value_length) });
                }
            }
            let chunks: &[EnvoyBuffer] = if body_chunks.is_null() {
                &[]
            } else {
                // SAFETY: Envoy's array of `body_chunks_size` buffers, valid for this hook.
                unsafe { std::slice::from_raw_parts(body_chunks, body_chunks_size) }
            };
            for c in chunks {
                // SAFETY: Envoy's buffer, valid for this hook; copied.
                body.extend_from_slice(&unsafe { copy(c.ptr, c.length) });
            }
        }
        s.on_callout_done(
            Config { ptr: config_envoy },
            callout_id,
            result == CALLOUT_SUCCESS,
            status,
            body,
        );
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    filter_envoy: *mut c_void,
) -> *const c_void {
    guard(null(), || {
        if config.is_null() {
            return null();
        }
        // SAFETY: the config came from `Arc::into_raw` in config_new and is
        // live for this hook; the filter takes one more strong count of it.
        let arc = unsafe {
            Arc::increment_strong_count(config.cast::<Shared>());
            Arc::from_raw(config.cast::<Shared>())
        };
        let stream = Stream { ptr: filter_envoy };
        Box::into_raw(Box::new(Filter::new(arc, &stream)))
            .cast_const()
            .cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: *mut c_void,
    filter_module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    let stream = Stream { ptr: filter_envoy };
    let status = guard(None, || {
        // SAFETY: a live filter of this stream (Envoy's contract).
        let f = unsafe { filter(filter_module) }?;
        Some(if f.on_request_headers(&stream) {
            HEADERS_CONTINUE
        } else {
            HEADERS_STOP_ITERATION
        })
    });
    match status {
        Some(s) => s,
        None => {
            // Fail closed: a panic (or a filter that failed to be made)
            // never lets the request through.
            guard((), || {
                stream.send_response(
                    503,
                    &[("content-type", "text/plain")],
                    b"service unavailable\n",
                )
            });
            HEADERS_STOP_ITERATION
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter_envoy: *mut c_void,
    filter_module: *const c_void,
    event_id: u64,
) {
    let stream = Stream { ptr: filter_envoy };
    let ok = guard(false, || {
        // SAFETY: a live filter of this stream (Envoy's contract).
        if let Some(f) = unsafe { filter(filter_module) } {
            f.on_scheduled(&stream, event_id);
        }
        true
    });
    if !ok {
        guard((), || {
            stream.send_response(
                503,
                &[("content-type", "text/plain")],
                b"service unavailable\n",
            )
        });
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter_envoy: *mut c_void,
    filter_module: *const c_void,
) {
    guard((), || {
        // SAFETY: a live filter of this stream (Envoy's contract).
        if let Some(f) = unsafe { filter(filter_module) } {
            f.on_stream_complete(&Stream { ptr: filter_envoy });
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_module: *const c_void) {
    guard((), || {
        if filter_module.is_null() {
            return;
        }
        // SAFETY: made by `Box::into_raw` in filter_new; destroyed once.
        drop(unsafe { Box::from_raw(filter_module.cast::<Filter>().cast_mut()) });
    })
}

// Hooks phi-guard has no use for; Envoy may look every one of them up.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _f: *mut c_void,
    _m: *const c_void,
    _eos: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _f: *mut c_void,
    _m: *const c_void,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _f: *mut c_void,
    _m: *const c_void,
    _eos: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _f: *mut c_void,
    _m: *const c_void,
    _eos: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _f: *mut c_void,
    _m: *const c_void,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _f: *mut c_void,
    _m: *const c_void,
    _code: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _f: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _result: u32,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body: *mut EnvoyBuffer,
    _body_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _f: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _f: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _data: *const EnvoyBuffer,
    _count: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _f: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _f: *mut c_void,
    _m: *const c_void,
    _id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _f: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _c: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _c: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _data: *const EnvoyBuffer,
    _count: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _c: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _c: *mut c_void,
    _m: *const c_void,
    _id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _c: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _f: *mut c_void,
    _m: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _f: *mut c_void,
    _m: *const c_void,
) {
}

/// phi-guard has no per-route configuration: refusing one makes a route
/// that tries to set it fail at load rather than be quietly ignored.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    null()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    _config: *const c_void,
) {
}
