//! One request's work inside phi-guard, without Envoy, for measurements that
//! a busy machine does not blur: instruction counts natively
//! (`valgrind --tool=callgrind`) and V8 timings of the same code built for
//! wasm32-wasip1 and run by node's WASI (`bench/hotpath.sh` does both).
//!
//! ```text
//! cargo run --release --example hotpath -- MODE [ITERATIONS]
//! ```
//!
//! MODE is `cached` (a cached, allowed request as the host handles it: read
//! the header block Envoy hands over, decide, the identity headers, draft,
//! seal and write the audit record), one of its parts (`headers`, `decide`,
//! `forward`, `draft`, `seal`), or `verify-ALG` (one signature check, every
//! cache off; ALG one of rs256 ps256 es256 es384 eddsa), or `keys-ALG` (a
//! fresh key set parsed from the JWKS, then its first check of an ALG
//! signature: what a new key costs before it is warm). `cached+revocation`
//! and `decide+revocation` are the same with a 100,000-entry revocation list
//! checked, as `make bench` has it (its cost is the difference). It prints the
//! nanoseconds per iteration; under callgrind, run it with 0 and with N
//! iterations and divide the difference in instructions by N.
//!
//! Keys, tokens and the policy are the fuzz fixtures' (`fuzz/fixtures/`):
//! the shipped policy, plaintext allowed as in `make bench`.

// A measuring tool, not product code: a broken fixture should stop it loudly.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;
use std::rc::Rc;
use std::time::Instant;

use phi_guard::answer::Reason;
use phi_guard::audit::{self, AuditChain};
use phi_guard::config::Policy;
use phi_guard::decision::{self, Facts, Request, Revocations, State, Trace, Verdict};
use phi_guard::fhir::Body;
use phi_guard::jwks::KeySet;
use phi_guard::pairs;
use phi_guard::revocation::RevocationList;
use phi_guard::token;

const NOW: i64 = 1_790_000_000;
const JWKS: &str = include_str!("../fuzz/fixtures/jwks.json");
const POLICY: &str = include_str!("../fuzz/fixtures/shipped-policy.json");
const TOKENS: &str = include_str!("../fuzz/fixtures/tokens.txt");
const PATH: &str = "/fhir/Patient/1";

fn token(name: &str) -> &'static str {
    TOKENS
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(n, _)| *n == name)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no fixture token {name}"))
}

fn policy() -> Policy {
    let mut doc: serde_json::Value = serde_json::from_str(POLICY).unwrap();
    doc["transport"] = serde_json::json!({"require_tls": false});
    doc["providers"][0]["algorithms"] =
        serde_json::json!(["RS256", "PS256", "ES256", "ES384", "EdDSA"]);
    Policy::from_json(doc.to_string().as_bytes()).unwrap()
}

/// The request headers Envoy hands the filter for a `wrk` request, in the
/// host's wire format: what wrk sends plus what Envoy adds.
fn header_block(bearer: &str) -> Vec<u8> {
    let auth = format!("Bearer {bearer}");
    let headers: Vec<(&str, &str)> = vec![
        (":authority", "127.0.0.1:10000"),
        (":path", PATH),
        (":method", "GET"),
        (":scheme", "http"),
        ("authorization", &auth),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"),
    ];
    pairs::encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

/// What `host/http.rs` keeps of the request headers.
#[derive(Default)]
struct Read {
    method: String,
    path: String,
    authorization: Vec<String>,
    request_id: Option<String>,
    scheme: String,
    authority: String,
    spoofed: bool,
}

/// The header loop of `on_http_request_headers`.
fn read_headers(policy: &Policy, block: &[u8]) -> Read {
    let mut r = Read::default();
    let text = pairs::text;
    for (name, value) in pairs::iter(block) {
        match name {
            b":method" => r.method = text(value),
            b":path" => r.path = text(value),
            b"authorization" => r.authorization.push(text(value)),
            b"x-request-id" => r.request_id = String::from_utf8(value.to_vec()).ok(),
            b":scheme" => r.scheme = text(value),
            b":authority" => r.authority = text(value),
            other => {
                r.spoofed |= policy
                    .claims_to_headers
                    .iter()
                    .any(|(_, h)| h.as_bytes() == other)
            }
        }
    }
    r
}

struct World {
    policy: Rc<Policy>,
    keys: KeySet,
    state: State,
    chain: AuditChain,
    revocations: Option<RevocationList>,
}

/// A list of `n` entries, none of them the fixture tokens: half `jti`s,
/// half subjects, as `make bench` builds it.
fn revocation_list(n: usize) -> RevocationList {
    let doc = serde_json::json!({
        "jti": (0..n / 2).map(|i| format!("revoked-{i}")).collect::<Vec<_>>(),
        "sub": (0..n - n / 2).map(|i| format!("gone-{i}")).collect::<Vec<_>>(),
    });
    RevocationList::parse(doc.to_string().as_bytes()).unwrap()
}

impl World {
    fn new(cache: bool, revocations: Option<RevocationList>) -> World {
        let policy = policy();
        let algs = policy.providers[0].algorithms.clone();
        let keys = KeySet::parse(JWKS.as_bytes(), &algs).unwrap();
        let mut state = State::new(&policy);
        if !cache {
            state.cache = token::TokenCache::new(0);
        }
        World {
            policy: Rc::new(policy),
            keys,
            state,
            chain: AuditChain::new("1a228c02866-4".into(), None),
            revocations,
        }
    }

    fn decide(&mut self, r: &Read) -> Verdict {
        let keys = &self.keys;
        let key_set = |_: usize| Some(keys);
        let no_cert = || None;
        let first_use = |_: &[u8; 32], _: i64| true;
        let facts = Facts {
            keys: &key_set,
            revocations: self
                .revocations
                .as_ref()
                .map_or(Revocations::Off, Revocations::Fresh),
            peer_cert: &no_cert,
            dpop_first_use: &first_use,
        };
        let auth: Vec<&str> = r.authorization.iter().map(String::as_str).collect();
        let req = Request {
            method: &r.method,
            path: &r.path,
            authorization: &auth,
            source: Some("127.0.0.1:54321"),
            tls_version: None,
            forwarded_proto: None,
            scheme: &r.scheme,
            authority: &r.authority,
            dpop: &[],
            body: Body::Unread,
        };
        let mut trace = Trace::default();
        decision::decide(
            &self.policy,
            &facts,
            &mut self.state,
            &req,
            NOW,
            true,
            &mut trace,
        )
    }
}

fn allowed(v: &Verdict) -> (usize, Rc<token::VerifiedToken>) {
    match v {
        Verdict::Allow {
            rule,
            token: Some(t),
            ..
        } => (*rule, Rc::clone(t)),
        other => panic!("not allowed: {other:?}"),
    }
}

fn draft(w: &World, r: &Read, rule: usize, t: &token::VerifiedToken) -> audit::AuditRecord {
    let seen = audit::Request {
        request_id: r.request_id.as_deref(),
        method: &r.method,
        path: &r.path,
        authorization: &r.authorization,
        source: Some("127.0.0.1:54321"),
        tls: None,
        binding: None,
        fhir: None,
        patient_fp: None,
    };
    let ms = u64::try_from(NOW).unwrap() * 1000 + 123;
    audit::draft(
        &seen,
        Reason::Ok,
        w.policy.rules.get(rule),
        Some(t),
        &w.policy,
        ms,
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let arg = args.next().unwrap_or_else(|| "cached".into());
    let (mode, revocations) = match arg.strip_suffix("+revocation") {
        Some(mode) => (mode.to_string(), Some(revocation_list(100_000))),
        None => (arg.clone(), None),
    };
    let n: u64 = args.next().map_or(10_000, |s| s.parse().unwrap());
    let bearer = match mode.strip_prefix("verify-").or(mode.strip_prefix("keys-")) {
        Some(alg) => token(alg),
        None => token("rs256"),
    };
    let block = header_block(bearer);
    let cold = mode.starts_with("verify-") || mode.starts_with("keys-");
    let mut w = World::new(!cold, revocations);
    // Warm: the token is cached and every lazy table built.
    let read = read_headers(&w.policy, &block);
    let (rule_at, verified) = allowed(&w.decide(&read));
    let mut record = draft(&w, &read, rule_at, &verified);

    let start = Instant::now();
    for _ in 0..n {
        match mode.as_str() {
            "cached" => {
                let r = read_headers(&w.policy, black_box(&block));
                let v = w.decide(&r);
                let (rule_at, t) = allowed(&v);
                let rule = w.policy.rules.get(rule_at).unwrap();
                black_box(decision::forwarded_headers(&w.policy, rule, Some(&t)));
                let mut rec = draft(&w, &r, rule_at, &t);
                rec.status = 200;
                black_box(w.chain.seal(&mut rec));
            }
            "headers" => {
                black_box(read_headers(&w.policy, black_box(&block)));
            }
            "decide" => {
                black_box(w.decide(black_box(&read)));
            }
            "forward" => {
                let rule = w.policy.rules.get(rule_at).unwrap();
                black_box(decision::forwarded_headers(
                    &w.policy,
                    rule,
                    Some(&verified),
                ));
            }
            "draft" => {
                black_box(draft(&w, black_box(&read), rule_at, &verified));
            }
            "seal" => {
                record.status = 200;
                black_box(w.chain.seal(black_box(&mut record)));
            }
            m if m.starts_with("verify-") => {
                let keys = &w.keys;
                let v = token::verify(&w.policy, &|_| Some(keys), black_box(bearer), NOW);
                assert!(v.is_ok(), "{m}: {:?}", v.err());
            }
            m if m.starts_with("keys-") => {
                let algs = &w.policy.providers[0].algorithms;
                let keys = KeySet::parse(black_box(JWKS.as_bytes()), algs).unwrap();
                let v = token::verify(&w.policy, &|_| Some(&keys), black_box(bearer), NOW);
                assert!(v.is_ok(), "{m}: {:?}", v.err());
            }
            other => panic!("unknown mode {other}"),
        }
    }
    let took = start.elapsed();
    let per = if n == 0 {
        0.0
    } else {
        took.as_nanos() as f64 / n as f64
    };
    println!("{arg}: {n} iterations, {per:.0} ns each");
}
