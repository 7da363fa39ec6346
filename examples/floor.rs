//! What any proxy-wasm filter costs in Envoy before it does its own work:
//! the floor under the wasm filter's figures (`make bench-floor`).
//!
//! Built for wasm32-wasip1 (`cargo build --release --target wasm32-wasip1
//! --example floor`), loaded by Envoy like phi-guard, in one of two modes
//! given as the plugin configuration:
//!
//! - `empty`: every callback returns at once (the SDK's defaults). What is
//!   left is Envoy creating a context per stream and calling into the VM.
//! - `twin N`: the host calls phi-guard makes on a cached, allowed request,
//!   in the same order and with data of the same size, and nothing else:
//!   the request's header map, `source.address`, `connection.tls_version`,
//!   the clock, two counters, the token removed and four identity headers
//!   set; at the end of the stream `response.code` and an N-byte record
//!   written as filter state for the access log. No token is read, no
//!   decision made, no record built or sealed. `twin N GROUP*K` makes one
//!   group of calls K times over, to price it: `pairs`, `source`, `tls`,
//!   `time`, `counters`, `remove`, `set`, `code`, `record`.
//!
//! phi-guard's cost over `twin` is its core running in V8; `twin` over
//! `empty` is the host calls; `empty` over Envoy without a filter is the VM.

// A measuring tool: it declares the raw host calls itself (it cannot link
// phi-guard's `host::abi`, which would bring phi-guard's own entry point).
#![allow(unsafe_code)]

#[cfg(target_arch = "wasm32")]
mod filter {
    use std::ptr::null_mut;

    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{ContextType, MapType, MetricType};

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
        fn proxy_get_property(
            path: *const u8,
            len: usize,
            data: *mut *mut u8,
            size: *mut usize,
        ) -> u32;
        fn proxy_set_property(path: *const u8, len: usize, value: *const u8, size: usize) -> u32;
        fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
        fn proxy_increment_metric(id: u32, by: i64) -> u32;
        fn proxy_replace_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
        ) -> u32;
        fn proxy_remove_header_map_value(map: u32, key: *const u8, key_len: usize) -> u32;
    }

    /// Takes what a host call handed back, as phi-guard does, and drops it.
    fn read(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> usize {
        let (mut data, mut size) = (null_mut::<u8>(), 0usize);
        if call(&mut data, &mut size) != 0 || data.is_null() {
            return 0;
        }
        // SAFETY: the host allocated `size` bytes through the SDK's
        // `proxy_on_memory_allocate` (a forgotten Vec) and hands them over.
        let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
        std::hint::black_box(bytes).len()
    }

    fn property(path: &[u8]) -> usize {
        // SAFETY: `path` is live; the out-pointers are `read`'s locals.
        read(|d, s| unsafe { proxy_get_property(path.as_ptr(), path.len(), d, s) })
    }

    fn set_header(name: &str, value: &str) {
        let map = MapType::HttpRequestHeaders as u32;
        // SAFETY: both slices are live for the call.
        unsafe {
            proxy_replace_header_map_value(
                map,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        };
    }

    #[derive(Clone, Copy)]
    enum Mode {
        Empty,
        Twin,
    }

    /// How many times each group of calls is made per request (once unless
    /// the configuration says `GROUP*K`).
    #[derive(Clone, Copy)]
    struct Times {
        pairs: usize,
        source: usize,
        tls: usize,
        time: usize,
        counters: usize,
        remove: usize,
        set: usize,
        code: usize,
        record: usize,
    }

    impl Times {
        const ONCE: Times = Times {
            pairs: 1,
            source: 1,
            tls: 1,
            time: 1,
            counters: 1,
            remove: 1,
            set: 1,
            code: 1,
            record: 1,
        };

        /// `GROUP*K` words over `ONCE`; `None` for any other word, so that a
        /// typo measures nothing rather than the wrong thing.
        fn parse<'a>(words: impl Iterator<Item = &'a str>) -> Option<Times> {
            let mut times = Times::ONCE;
            for word in words {
                let (group, k) = word.split_once('*')?;
                let k = k.parse().ok()?;
                *match group {
                    "pairs" => &mut times.pairs,
                    "source" => &mut times.source,
                    "tls" => &mut times.tls,
                    "time" => &mut times.time,
                    "counters" => &mut times.counters,
                    "remove" => &mut times.remove,
                    "set" => &mut times.set,
                    "code" => &mut times.code,
                    "record" => &mut times.record,
                    _ => return None,
                } = k;
            }
            Some(times)
        }
    }

    struct Root {
        mode: Mode,
        record: std::rc::Rc<[u8]>,
        counters: [u32; 2],
        times: Times,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = self.get_plugin_configuration().unwrap_or_default();
            let config = String::from_utf8_lossy(&config);
            let mut words = config.split_whitespace();
            match (words.next(), words.next().map(str::parse::<usize>)) {
                (Some("empty"), None) if words.next().is_none() => self.mode = Mode::Empty,
                (Some("twin"), Some(Ok(n))) => {
                    let Some(times) = Times::parse(words) else {
                        return false;
                    };
                    self.mode = Mode::Twin;
                    self.times = times;
                    // A JSON string the access log prints as it is.
                    let line = format!("\"{}\"", "x".repeat(n.saturating_sub(2)));
                    self.record = line.into_bytes().into();
                }
                _ => return false,
            }
            for (id, name) in self
                .counters
                .iter_mut()
                .zip(["floor.token_cache.hit", "floor.allowed"])
            {
                *id = proxy_wasm::hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0);
            }
            true
        }

        fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
            Some(match self.mode {
                Mode::Empty => Box::new(Empty),
                Mode::Twin => Box::new(Twin {
                    record: self.record.clone(),
                    counters: self.counters,
                    times: self.times,
                }),
            })
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Empty;
    impl Context for Empty {}
    impl HttpContext for Empty {}

    struct Twin {
        record: std::rc::Rc<[u8]>,
        counters: [u32; 2],
        times: Times,
    }

    impl Context for Twin {}

    impl HttpContext for Twin {
        fn on_http_request_headers(
            &mut self,
            _headers: usize,
            _end: bool,
        ) -> proxy_wasm::types::Action {
            let map = MapType::HttpRequestHeaders as u32;
            for _ in 0..self.times.pairs {
                // SAFETY: the out-pointers are `read`'s locals.
                read(|d, s| unsafe { proxy_get_header_map_pairs(map, d, s) });
            }
            for _ in 0..self.times.source {
                property(b"source\0address");
            }
            for _ in 0..self.times.tls {
                property(b"connection\0tls_version");
            }
            for _ in 0..self.times.time {
                let mut now = 0u64;
                // SAFETY: the host writes one u64 into a local.
                unsafe { proxy_get_current_time_nanoseconds(&mut now) };
                std::hint::black_box(now);
            }
            for _ in 0..self.times.counters {
                for id in self.counters {
                    // SAFETY: plain integers.
                    unsafe { proxy_increment_metric(id, 1) };
                }
            }
            for _ in 0..self.times.remove {
                let name = "authorization";
                // SAFETY: `name` is live for the call.
                unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) };
            }
            for _ in 0..self.times.set {
                set_header("x-phi-subject", "patient-app-7f3a9c");
                set_header("x-phi-client-id", "smart-client-0042");
                set_header("x-phi-scopes", "patient/Patient.read openid");
                set_header("x-phi-rule", "patient-read");
            }
            proxy_wasm::types::Action::Continue
        }

        fn on_log(&mut self) {
            for _ in 0..self.times.code {
                property(b"response\0code");
            }
            let path = b"phi_guard.audit";
            for _ in 0..self.times.record {
                // SAFETY: both slices are live for the call.
                unsafe {
                    proxy_set_property(
                        path.as_ptr(),
                        path.len(),
                        self.record.as_ptr(),
                        self.record.len(),
                    )
                };
            }
        }
    }

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| Box::new(Root {
            mode: Mode::Empty,
            record: std::rc::Rc::from(Vec::new()),
            counters: [0; 2],
            times: Times::ONCE,
        }));
    }}
}
