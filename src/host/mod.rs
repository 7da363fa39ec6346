//! The only module that names `proxy_wasm`: Envoy's contexts, calling the pure
//! core. Root: configuration, timer, callouts (fetched documents,
//! introspection), shared data. Http: read the request, ask the core, answer
//! or continue, write the audit record.

mod abi;
mod fetcher;
mod http;
mod introspect;
mod metrics;
mod replay;
mod root;
mod worker;

proxy_wasm::main! {{
    // Our logger, not the SDK's: it unwraps the status of every line it writes.
    abi::install_logger(log::LevelFilter::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
}}
