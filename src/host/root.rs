//! The root context: loads the policy (refusing a bad one, so the plugin does
//! not start), drives the timer (fetches, waiting requests, audit
//! checkpoints) and receives callouts (fetched documents, introspection
//! answers).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use crate::audit::AuditChain;
use crate::config::Policy;
use crate::introspection;

use super::abi;
use super::http::{self, Filter};
use super::worker::{now_ms, Awaited, Waiter, Worker};

/// How often the timer runs: waiting requests are decided within this of their deadline.
const TICK: Duration = Duration::from_millis(100);

pub struct Root {
    context_id: u32,
    worker: Option<Rc<RefCell<Worker>>>,
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        Root {
            context_id,
            worker: None,
        }
    }

    /// Decides again at `now`, each in its own context, the requests
    /// waiting for `ready` (a document or an introspection answer arrived,
    /// or its callout ended) and the `expired` ones. The root is the one
    /// owner of waiting requests: it parks and wakes them. `now` is the time
    /// the answer was taken at, so the requests find it kept.
    fn wake(
        &self,
        worker: &Rc<RefCell<Worker>>,
        ready: &[Awaited],
        expired: Vec<Waiter>,
        now: u64,
    ) {
        let mut waiters = expired;
        {
            let mut w = worker.borrow_mut();
            for on in ready {
                waiters.extend(w.take_waiters(*on));
            }
        }
        if waiters.is_empty() {
            return;
        }
        for waiter in &waiters {
            if abi::set_effective_context(waiter.context_id).is_ok() {
                http::finish_waiting(worker, waiter, now);
            }
        }
        let _ = abi::set_effective_context(self.context_id);
    }
}

/// A per-VM id for the audit chain. Envoy gives workers no stable name, so
/// each VM takes the next number from a counter in shared data (unique within
/// this Envoy), prefixed by its start time (unique across restarts).
fn vm_id() -> String {
    const KEY: &str = "phi_guard.vm_counter";
    let start = now_ms();
    for _ in 0..16 {
        let (value, cas) = abi::shared_data(KEY).unwrap_or((None, None));
        let n = value
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        if abi::set_shared_data(KEY, n.to_string().as_bytes(), cas).is_ok() {
            return format!("{start:x}-{n}");
        }
    }
    format!("{start:x}-x")
}

/// The audit HMAC key, if the policy names one. A named but unset variable
/// is a configuration error: falling back to a plain SHA-256 chain would
/// quietly let anyone who can edit the log recompute it.
fn audit_key(policy: &Policy) -> Result<Option<Vec<u8>>, String> {
    let Some(name) = policy.audit_hmac_key_env.as_deref() else {
        return Ok(None);
    };
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(Some(v.into_bytes())),
        _ => Err(format!(
            "invalid configuration at `audit.hmac_key_env`: environment variable {name} is not set for the VM (pass it with vm_config.environment_variables)"
        )),
    }
}

/// Each provider's introspection `Authorization: Basic` value, made from
/// the client secret in the VM's environment (never in the policy, never
/// logged). A named but unset or empty variable refuses the plugin start,
/// as `audit.hmac_key_env` does: without a secret every introspect rule
/// would answer 503.
fn introspection_credentials(policy: &Policy) -> Result<Vec<Option<String>>, String> {
    policy
        .providers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let Some(endpoint) = &p.introspection else {
                return Ok(None);
            };
            match std::env::var(&endpoint.client_secret_env) {
                Ok(secret) if !secret.is_empty() => Ok(Some(introspection::basic_authorization(
                    &endpoint.client_id,
                    &secret,
                ))),
                _ => Err(format!(
                    "invalid configuration at `providers[{i}].introspection.client_secret_env`: environment variable {} is not set for the VM (pass it with vm_config.environment_variables)",
                    endpoint.client_secret_env
                )),
            }
        })
        .collect()
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let now = now_ms();
        let done = worker.borrow_mut().on_callout(token_id, body_size, now);
        if let Some(on) = done {
            self.wake(&worker, &[on], Vec::new(), now);
        }
    }

    /// The plugin stops (Envoy shuts down or drops the config): the chain's
    /// last records get a checkpoint now rather than never.
    fn on_done(&mut self) -> bool {
        if let Some(Ok(mut worker)) = self.worker.as_ref().map(|w| w.try_borrow_mut()) {
            worker.checkpoint(now_ms(), true);
        }
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let doc = match abi::buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(doc) => doc.unwrap_or_default(),
            Err(e) => {
                log::error!(
                    "the plugin configuration could not be read (host status {})",
                    e.0
                );
                return false;
            }
        };
        let policy = match Policy::from_json(&doc) {
            Ok(p) => Rc::new(p),
            Err(e) => {
                // Envoy refuses to start the plugin; with fail-closed, nothing gets through.
                log::error!("{e}");
                return false;
            }
        };
        // Weakening is spelled out: said at every start, not only in the config.
        if let Some(warning) = policy.plaintext_warning() {
            log::warn!("{warning}");
        }
        let key = match audit_key(&policy) {
            Ok(key) => key,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        if policy.fhir.is_some() && key.is_none() {
            // A fingerprint nobody holds the key to could not be looked up,
            // and an unkeyed hash of a patient id is the id in clear.
            log::warn!("fhir: no audit.hmac_key_env, so audit records carry no patient_fp");
        }
        let credentials = match introspection_credentials(&policy) {
            Ok(credentials) => credentials,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        let chain = AuditChain::new(vm_id(), key);
        let worker = Rc::new(RefCell::new(Worker::new(
            policy,
            chain,
            credentials,
            self.context_id,
        )));
        // The first fetch happens on the first tick: during on_configure the
        // main thread's cluster manager may not be ready to take a callout.
        self.worker = Some(worker);
        let _ = abi::set_tick_period(TICK);
        true
    }

    fn on_tick(&mut self) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let now = now_ms();
        let (ready, expired) = worker.borrow_mut().tick(now);
        self.wake(&worker, &ready, expired, now);
        let mut w = worker.borrow_mut();
        w.checkpoint(now, false);
        // A fetch asked for may wait for another VM's lease: keep looking.
        if w.fetcher.kicked && !w.fetcher.wants_pending() {
            w.fetcher.kicked = false;
            let _ = abi::set_tick_period(TICK);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never None: the SDK would abort the VM. Without a policy the filter refuses all.
        Some(Box::new(Filter::new(context_id, self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
