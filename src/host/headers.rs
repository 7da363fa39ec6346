//! The request's headers, read in one host call as bytes.
//!
//! Not the SDK's `get_http_request_headers`: it turns every name and value
//! into a `String` and panics on a value that is not UTF-8 (obs-text is legal
//! in HTTP), which aborted the VM: every later request was answered 503. This
//! also spares two allocations per header.
#![allow(unsafe_code)] // The raw ABI imports below; nothing else here.

use std::ptr::null_mut;

use proxy_wasm::types::MapType;

/// proxy-wasm's `WasmResult::Ok`; read as a plain integer, since an enum
/// holding a value the host invents would be undefined behaviour.
const OK: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

/// The request's header map in the wire format of [`crate::pairs`]; empty if
/// the host has none to give.
pub fn request() -> Vec<u8> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and a length into the two locals.
    let status =
        unsafe { proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) };
    if status != OK || data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host allocated `size` bytes through the SDK's
    // `proxy_on_memory_allocate` (a `Vec<u8>` of exactly that capacity,
    // forgotten) and hands them over; the SDK frees them the same way.
    unsafe { Vec::from_raw_parts(data, size, size) }
}
