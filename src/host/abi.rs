//! Every host call phi-guard makes, declared from the proxy-wasm ABI (0.2.1)
//! with the host's status read as a plain number and returned as an error.
//!
//! Not the SDK's `proxy_wasm::hostcalls`: those panic on any status they do
//! not expect, and a panic aborts the VM, so every later request is answered
//! 503 until Envoy restarts. Envoy does answer with such statuses: a JWKS
//! callout that fails (connection reset, body over the async client's buffer
//! limit) comes back with no response headers, and reading its `:status`
//! returns `BadArgument`, which the SDK's `get_map_value_bytes` panicked on.
//! The status is declared `u32`, not the SDK's `Status` enum: a value the
//! enum lacks would be undefined behaviour before any `match` could see it.
//!
//! One SDK call remains, [`dispatch_http_call`], and it is safe by what Envoy
//! returns (see there). `tests/host_calls.rs` keeps every other host call in
//! this file.
#![allow(unsafe_code)] // The raw imports; each call states why it is sound.

use std::ptr::{null, null_mut};
use std::time::Duration;

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

/// A status other than `Ok` from the host, as the number it sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostError(pub u32);

/// The result of a host call.
pub type HostResult<T> = Result<T, HostError>;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

/// proxy-wasm's `StreamType::HttpRequest`, for `proxy_continue_stream`.
const STREAM_HTTP_REQUEST: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

fn status(code: u32) -> HostResult<()> {
    if code == OK {
        Ok(())
    } else {
        Err(HostError(code))
    }
}

/// Takes ownership of bytes the host handed over.
///
/// # Safety
/// `data` is null or was allocated by the host through the SDK's
/// `proxy_on_memory_allocate` (a `Vec<u8>` of capacity `size`, forgotten)
/// and written with `size` bytes; nothing else owns it.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller's contract is exactly `from_raw_parts`'s.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// A call that hands back bytes: `Ok(None)` when the host has none (`NotFound`).
fn bytes_out(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> HostResult<Option<Vec<u8>>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let code = call(&mut data, &mut size);
    match code {
        // SAFETY: on `Ok` the host wrote a pointer it allocated through
        // `proxy_on_memory_allocate` and its length (ABI 0.2.1), or null.
        OK => Ok(Some(unsafe { take(data, size) })),
        NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

/// Writes a message to Envoy's log.
pub fn log(level: LogLevel, message: &str) -> HostResult<()> {
    // SAFETY: the pointer and length describe a live `&str`.
    status(unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) })
}

/// The host's wall clock, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> HostResult<u64> {
    let mut t: u64 = 0;
    // SAFETY: the host writes one u64 into a local.
    status(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

/// How often the root context's `on_tick` runs.
pub fn set_tick_period(period: Duration) -> HostResult<()> {
    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: plain integer argument.
    status(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Up to `max_size` bytes of a host buffer from `start`; `None` if there is none.
pub fn buffer(kind: BufferType, start: usize, max_size: usize) -> HostResult<Option<Vec<u8>>> {
    // SAFETY: the two out-pointers are locals of `bytes_out`.
    bytes_out(|data, size| unsafe {
        proxy_get_buffer_bytes(kind as u32, start, max_size, data, size)
    })
}

/// A whole header map in the wire format of [`crate::pairs`].
pub fn header_pairs(map: MapType) -> HostResult<Vec<u8>> {
    // SAFETY: the two out-pointers are locals of `bytes_out`.
    let pairs =
        bytes_out(|data, size| unsafe { proxy_get_header_map_pairs(map as u32, data, size) })?;
    Ok(pairs.unwrap_or_default())
}

/// One header's value as bytes (obs-text is legal); `None` if absent.
pub fn header(map: MapType, name: &str) -> HostResult<Option<Vec<u8>>> {
    // SAFETY: `name` is a live `&str`; the out-pointers are locals of `bytes_out`.
    bytes_out(|data, size| unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), data, size)
    })
}

/// Sets a header, replacing any values it had.
pub fn set_header(map: MapType, name: &str, value: &str) -> HostResult<()> {
    // SAFETY: both pointers and lengths describe live `&str`s.
    status(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes every value of a header.
pub fn remove_header(map: MapType, name: &str) -> HostResult<()> {
    // SAFETY: the pointer and length describe a live `&str`.
    status(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// A property path as the host reads it: the segments joined by NUL.
fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

/// A property of the stream (`["source", "address"]`); `None` if absent.
pub fn property(path: &[&str]) -> HostResult<Option<Vec<u8>>> {
    let path = property_path(path);
    // SAFETY: `path` is a live buffer; the out-pointers are locals of `bytes_out`.
    bytes_out(|data, size| unsafe { proxy_get_property(path.as_ptr(), path.len(), data, size) })
}

/// Sets a property; one of the filter's own is filter state the access log can read.
pub fn set_property(path: &[&str], value: &[u8]) -> HostResult<()> {
    let path = property_path(path);
    // SAFETY: both buffers are live for the call.
    status(unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) })
}

/// A shared-data entry and its CAS; `(None, None)` if the key is unknown.
pub fn shared_data(key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
    let mut cas: u32 = 0;
    let value = bytes_out(|data, size| {
        // SAFETY: `key` is a live `&str`; the out-pointers are locals here and in `bytes_out`.
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), data, size, &mut cas) }
    })?;
    Ok((value, (cas != 0).then_some(cas)))
}

/// Stores a shared-data entry; with `cas`, only if nobody wrote it since
/// (an error otherwise, `CasMismatch`).
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()> {
    // SAFETY: both buffers are live for the call.
    status(unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    })
}

/// Lets the effective context's paused request go on.
pub fn resume_request() -> HostResult<()> {
    // SAFETY: plain integer argument.
    status(unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) })
}

/// Answers the effective context's request locally.
pub fn send_response(status_code: u32, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
    let headers = crate::pairs::encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    // SAFETY: all buffers are live for the call; no details string (null, 0).
    status(unsafe {
        proxy_send_local_response(
            status_code,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// The status code and message the host gave the last failed operation,
/// e.g. a callout reset (`"reset"`).
pub fn last_status() -> HostResult<(u32, Vec<u8>)> {
    let mut code: u32 = 0;
    let message = bytes_out(|data, size| {
        // SAFETY: the out-pointers are locals here and in `bytes_out`.
        unsafe { proxy_get_status(&mut code, data, size) }
    })?;
    Ok((code, message.unwrap_or_default()))
}

/// Makes `context_id` the one later calls act on.
pub fn set_effective_context(context_id: u32) -> HostResult<()> {
    // SAFETY: plain integer argument.
    status(unsafe { proxy_set_effective_context(context_id) })
}

/// Defines (or finds) a metric by name; its id.
pub fn define_metric(kind: MetricType, name: &str) -> HostResult<u32> {
    let mut id: u32 = 0;
    // SAFETY: `name` is a live `&str`; the host writes one u32 into a local.
    status(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Adds to a counter.
pub fn increment_metric(id: u32, by: i64) -> HostResult<()> {
    // SAFETY: plain integer arguments.
    status(unsafe { proxy_increment_metric(id, by) })
}

/// Sets a gauge.
pub fn record_metric(id: u32, value: u64) -> HostResult<()> {
    // SAFETY: plain integer arguments.
    status(unsafe { proxy_record_metric(id, value) })
}

/// Starts an HTTP callout through `cluster`; its token.
///
/// The one SDK host call left, because the SDK's dispatcher must learn the
/// token to route the response back to the root context (its
/// `on_http_call_response` refuses tokens it did not register). It panics
/// only on a status other than `Ok`, `BadArgument` and `InternalFailure`,
/// and those three are all Envoy's `httpCall` returns (unknown cluster or
/// missing `:path`/`:method`/`:authority`: `BadArgument`; no request
/// created: `InternalFailure`); the ABI layer adds `InvalidMemoryAccess`
/// only for pointers outside the VM's memory, which slices cannot be.
/// Callout responses, failed ones included, are read through this module.
/// `body` is sent as the request body (a POST's form, say); `None` sends none.
pub fn dispatch_http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> HostResult<u32> {
    proxy_wasm::hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout)
        .map_err(|s| HostError(s as u32))
}

/// The `log` crate's backend: Envoy's log, never panicking (the SDK's logger
/// unwraps the status of every line it writes).
pub struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        let _ = log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Routes `log` to Envoy at `level` and has a panic (there should be none)
/// logged before the VM aborts.
pub fn install_logger(level: log::LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        std::panic::set_hook(Box::new(|info| {
            let _ = log(LogLevel::Critical, &info.to_string());
        }));
    }
    log::set_max_level(level);
}
