//! Keeps every host call in `src/host/abi.rs`, where it returns an error
//! instead of panicking (issue #12). The SDK's own helpers panic on any host
//! status they do not expect, and a panic aborts the VM: every later request
//! is answered 503 until Envoy restarts. A text check, so it runs natively
//! although `src/host` only builds for wasm32.

// Helpers outside #[test] fns are test code too.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

/// Methods of proxy-wasm 0.2's `Context`/`RootContext`/`HttpContext` traits
/// whose default bodies call `hostcalls` (read from the SDK's `traits.rs`;
/// review when the SDK is upgraded).
const SDK_HELPERS: &[&str] = &[
    "add_http_request_header",
    "add_http_request_header_bytes",
    "add_http_request_trailer",
    "add_http_request_trailer_bytes",
    "add_http_response_header",
    "add_http_response_header_bytes",
    "add_http_response_trailer",
    "add_http_response_trailer_bytes",
    "cancel_grpc_call",
    "cancel_grpc_stream",
    "close_downstream",
    "close_grpc_stream",
    "close_upstream",
    "dequeue_shared_queue",
    "dispatch_grpc_call",
    "dispatch_http_call",
    "done",
    "enqueue_shared_queue",
    "get_current_time",
    "get_downstream_data",
    "get_grpc_call_response_body",
    "get_grpc_status",
    "get_grpc_stream_initial_metadata",
    "get_grpc_stream_initial_metadata_value",
    "get_grpc_stream_message",
    "get_grpc_stream_trailing_metadata",
    "get_grpc_stream_trailing_metadata_value",
    "get_http_call_response_body",
    "get_http_call_response_header",
    "get_http_call_response_header_bytes",
    "get_http_call_response_headers",
    "get_http_call_response_headers_bytes",
    "get_http_call_response_trailer",
    "get_http_call_response_trailer_bytes",
    "get_http_call_response_trailers",
    "get_http_call_response_trailers_bytes",
    "get_http_request_body",
    "get_http_request_header",
    "get_http_request_header_bytes",
    "get_http_request_headers",
    "get_http_request_headers_bytes",
    "get_http_request_trailer",
    "get_http_request_trailer_bytes",
    "get_http_request_trailers",
    "get_http_request_trailers_bytes",
    "get_http_response_body",
    "get_http_response_header",
    "get_http_response_header_bytes",
    "get_http_response_headers",
    "get_http_response_headers_bytes",
    "get_http_response_trailer",
    "get_http_response_trailer_bytes",
    "get_http_response_trailers",
    "get_http_response_trailers_bytes",
    "get_plugin_configuration",
    "get_property",
    "get_shared_data",
    "get_upstream_data",
    "get_vm_configuration",
    "open_grpc_stream",
    "register_shared_queue",
    "remove_http_request_header",
    "remove_http_request_trailer",
    "remove_http_response_header",
    "remove_http_response_trailer",
    "remove_shared_data",
    "reset_http_request",
    "reset_http_response",
    "resolve_shared_queue",
    "resume_downstream",
    "resume_http_request",
    "resume_http_response",
    "resume_upstream",
    "send_grpc_response",
    "send_grpc_stream_message",
    "send_http_response",
    "set_downstream_data",
    "set_http_request_body",
    "set_http_request_header",
    "set_http_request_header_bytes",
    "set_http_request_headers",
    "set_http_request_headers_bytes",
    "set_http_request_trailer",
    "set_http_request_trailer_bytes",
    "set_http_request_trailers",
    "set_http_request_trailers_bytes",
    "set_http_response_body",
    "set_http_response_header",
    "set_http_response_header_bytes",
    "set_http_response_headers",
    "set_http_response_headers_bytes",
    "set_http_response_trailer",
    "set_http_response_trailer_bytes",
    "set_http_response_trailers",
    "set_http_response_trailers_bytes",
    "set_property",
    "set_shared_data",
    "set_tick_period",
    "set_upstream_data",
];

fn host_sources() -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/host");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "src/host not found from {}",
        dir.display()
    );
    files
}

fn is_abi(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "abi.rs")
}

/// Code lines only: `//` comments may name what they avoid.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
}

#[test]
fn only_abi_names_the_sdk_hostcalls_and_only_for_dispatch() {
    for (path, text) in host_sources() {
        for (n, line) in code_lines(&text) {
            if !line.contains("hostcalls") {
                continue;
            }
            assert!(
                is_abi(&path) && line.contains("proxy_wasm::hostcalls::dispatch_http_call("),
                "{}:{n}: host calls go through abi.rs: {line}",
                path.display()
            );
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).unwrap();
            assert!(
                !code_lines(&text).any(|(_, l)| l.contains("proxy_wasm")),
                "{} names proxy_wasm outside src/host",
                path.display()
            );
        }
    }
}

#[test]
fn no_sdk_trait_helper_is_called() {
    for (path, text) in host_sources() {
        for (n, line) in code_lines(&text) {
            for name in SDK_HELPERS {
                let call = format!(".{name}(");
                assert!(
                    !line.contains(&call),
                    "{}:{n}: `{name}` is an SDK helper that panics on an unexpected host status; use abi.rs",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn raw_imports_live_in_abi_only() {
    for (path, text) in host_sources() {
        let imports = text.contains("extern \"C\"") || text.contains("wasm_import_module");
        assert!(
            !imports || is_abi(&path),
            "{} declares host imports",
            path.display()
        );
    }
}

/// The check itself can fail: a line that calls an SDK helper is caught.
#[test]
fn the_checks_catch_what_they_forbid() {
    let bad = "        let doc = self.get_plugin_configuration().unwrap_or_default();";
    assert!(SDK_HELPERS.iter().any(|n| bad.contains(&format!(".{n}("))));
    let (_, line) = code_lines("x(); // hostcalls::get_buffer").next().unwrap();
    assert!(!line.contains("hostcalls"));
}
