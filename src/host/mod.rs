//! The only module that names `proxy_wasm`: Envoy's contexts, calling the pure
//! core. Root: configuration, timer, JWKS callouts, shared data. Http: read the
//! request, ask the core, answer or continue, write the audit record.

mod headers;
mod http;
mod metrics;
mod root;
mod worker;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    // Also installs a panic hook that logs the panic before the VM aborts.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
}}
