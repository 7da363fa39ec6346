//! The filter configuration: `Raw*` serde types exactly as the user writes
//! them (unknown fields refused), compiled once into a [`Policy`] that request
//! handling can trust. Every error names the field it is about.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;

use crate::crypto::Alg;
use crate::rules::PathTemplate;

/// A configuration error: the JSON path of the offending field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration at `{}`: {}",
            self.field, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

// ---------------------------------------------------------------------------
// Raw, as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    providers: Vec<RawProvider>,
    #[serde(default = "defaults::clock_skew")]
    clock_skew_seconds: u64,
    #[serde(default = "defaults::max_lifetime")]
    max_token_lifetime_seconds: u64,
    #[serde(default)]
    forward_token: bool,
    #[serde(default = "defaults::yes")]
    deny_wildcard_scopes: bool,
    #[serde(default = "defaults::token_cache")]
    verified_token_cache_size: usize,
    #[serde(default = "defaults::realm")]
    realm: String,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    issuer: String,
    audiences: Vec<String>,
    #[serde(default = "defaults::algorithms")]
    algorithms: Vec<String>,
    #[serde(default = "defaults::token_types")]
    token_types: Vec<String>,
    jwks: RawJwks,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwks {
    uri: String,
    cluster: String,
    #[serde(default = "defaults::timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "defaults::cache_seconds")]
    cache_seconds: u64,
    #[serde(default = "defaults::max_stale")]
    max_stale_seconds: u64,
    #[serde(default = "defaults::min_refetch")]
    min_refetch_seconds: u64,
    #[serde(default = "defaults::retry")]
    retry_seconds: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    #[serde(default)]
    methods: Option<Vec<String>>,
    path: String,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    scopes_any: Vec<String>,
    #[serde(default)]
    max_token_age_seconds: Option<u64>,
}

mod defaults {
    pub fn clock_skew() -> u64 {
        60
    }
    pub fn max_lifetime() -> u64 {
        3600
    }
    pub fn yes() -> bool {
        true
    }
    pub fn token_cache() -> usize {
        10_000
    }
    pub fn realm() -> String {
        "phi-guard".into()
    }
    pub fn algorithms() -> Vec<String> {
        ["RS256", "PS256", "ES256", "EdDSA"]
            .map(String::from)
            .to_vec()
    }
    pub fn token_types() -> Vec<String> {
        ["at+jwt", "JWT"].map(String::from).to_vec()
    }
    pub fn timeout_ms() -> u64 {
        2000
    }
    pub fn cache_seconds() -> u64 {
        300
    }
    pub fn max_stale() -> u64 {
        3600
    }
    pub fn min_refetch() -> u64 {
        30
    }
    pub fn retry() -> u64 {
        1
    }
}

// ---------------------------------------------------------------------------
// Compiled, as served.

/// A validated, ready-to-serve policy.
#[derive(Debug)]
pub struct Policy {
    pub providers: Vec<Provider>,
    pub clock_skew: u64,
    pub max_token_lifetime: u64,
    pub forward_token: bool,
    pub deny_wildcard_scopes: bool,
    pub verified_token_cache_size: usize,
    pub realm: String,
    pub rules: Vec<Rule>,
}

/// One trusted token issuer.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Alg>,
    /// Accepted header `typ` values, lower-cased; empty means not checked.
    pub token_types: Vec<String>,
    pub jwks: JwksSource,
}

/// Where and how often a provider's keys are fetched.
#[derive(Debug)]
pub struct JwksSource {
    pub uri: String,
    /// `:authority` and `:path` of the callout, split from `uri`.
    pub authority: String,
    pub path: String,
    pub cluster: String,
    pub timeout_ms: u64,
    pub cache_seconds: u64,
    pub max_stale_seconds: u64,
    pub min_refetch_seconds: u64,
    pub retry_seconds: u64,
}

/// One access rule.
#[derive(Debug)]
pub struct Rule {
    pub id: String,
    /// Upper-case methods; `None` matches any.
    pub methods: Option<Vec<String>>,
    pub path: PathTemplate,
    pub public: bool,
    pub scopes: Vec<String>,
    pub scopes_any: Vec<String>,
    pub max_token_age: Option<u64>,
}

impl Rule {
    /// Whether this rule applies to `method`.
    pub fn allows_method(&self, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == method))
    }
}

/// Upper bounds that keep a typo from becoming a hole or a hang.
const MAX_SKEW: u64 = 300;
const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_TOKEN_CACHE: usize = 1_000_000;

impl Policy {
    /// Parses and validates the filter configuration document.
    pub fn from_json(doc: &[u8]) -> Result<Policy, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(doc).map_err(|e| {
            // serde names the unknown or missing field in its message.
            err("(document)", e.to_string())
        })?;
        Policy::compile(raw)
    }

    fn compile(raw: RawConfig) -> Result<Policy, ConfigError> {
        if raw.providers.is_empty() {
            return Err(err("providers", "at least one provider is required"));
        }
        let mut names = HashSet::new();
        let mut issuers = HashSet::new();
        let mut providers = Vec::with_capacity(raw.providers.len());
        for (i, p) in raw.providers.into_iter().enumerate() {
            let at = |f: &str| format!("providers[{i}].{f}");
            let provider = compile_provider(p, &at)?;
            if !names.insert(provider.name.clone()) {
                return Err(err(at("name"), "duplicate provider name"));
            }
            if !issuers.insert(provider.issuer.clone()) {
                return Err(err(at("issuer"), "two providers share this issuer"));
            }
            providers.push(provider);
        }
        if raw.clock_skew_seconds > MAX_SKEW {
            return Err(err("clock_skew_seconds", format!("at most {MAX_SKEW}")));
        }
        if raw.max_token_lifetime_seconds == 0 {
            return Err(err("max_token_lifetime_seconds", "must be positive"));
        }
        if raw.verified_token_cache_size > MAX_TOKEN_CACHE {
            return Err(err(
                "verified_token_cache_size",
                format!("at most {MAX_TOKEN_CACHE}"),
            ));
        }
        if raw.realm.is_empty() || !raw.realm.chars().all(is_quoted_string_safe) {
            return Err(err(
                "realm",
                "must be non-empty printable ASCII without quotes or backslashes",
            ));
        }
        let mut ids = HashSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            let rule = compile_rule(r, &at)?;
            if !ids.insert(rule.id.clone()) {
                return Err(err(at("id"), "duplicate rule id"));
            }
            rules.push(rule);
        }
        Ok(Policy {
            providers,
            clock_skew: raw.clock_skew_seconds,
            max_token_lifetime: raw.max_token_lifetime_seconds,
            forward_token: raw.forward_token,
            deny_wildcard_scopes: raw.deny_wildcard_scopes,
            verified_token_cache_size: raw.verified_token_cache_size,
            realm: raw.realm,
            rules,
        })
    }

    /// The provider whose `issuer` is exactly `iss`.
    pub fn provider_for_issuer(&self, iss: &str) -> Option<(usize, &Provider)> {
        self.providers
            .iter()
            .enumerate()
            .find(|(_, p)| p.issuer == iss)
    }
}

fn compile_provider(p: RawProvider, at: &dyn Fn(&str) -> String) -> Result<Provider, ConfigError> {
    if p.name.is_empty() {
        return Err(err(at("name"), "must not be empty"));
    }
    if p.issuer.is_empty() {
        return Err(err(at("issuer"), "must not be empty"));
    }
    if p.audiences.is_empty() || p.audiences.iter().any(String::is_empty) {
        return Err(err(
            at("audiences"),
            "at least one non-empty audience is required",
        ));
    }
    if p.algorithms.is_empty() {
        return Err(err(at("algorithms"), "at least one algorithm is required"));
    }
    let mut algorithms = Vec::with_capacity(p.algorithms.len());
    for name in &p.algorithms {
        match Alg::from_name(name) {
            Some(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
            Some(_) => {}
            None => {
                return Err(err(
                    at("algorithms"),
                    format!(
                        "unsupported algorithm {name:?} (allowed: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
                    ),
                ))
            }
        }
    }
    let token_types = p
        .token_types
        .iter()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    let j = p.jwks;
    let (authority, path) = split_http_uri(&j.uri).ok_or_else(|| {
        err(
            at("jwks.uri"),
            "must be an absolute http:// or https:// URI with a host",
        )
    })?;
    if j.cluster.is_empty() {
        return Err(err(at("jwks.cluster"), "must name an Envoy cluster"));
    }
    if j.timeout_ms == 0 || j.timeout_ms > MAX_TIMEOUT_MS {
        return Err(err(
            at("jwks.timeout_ms"),
            format!("must be 1..={MAX_TIMEOUT_MS}"),
        ));
    }
    if j.cache_seconds == 0 {
        return Err(err(at("jwks.cache_seconds"), "must be positive"));
    }
    if j.retry_seconds == 0 {
        return Err(err(at("jwks.retry_seconds"), "must be positive"));
    }
    Ok(Provider {
        name: p.name,
        issuer: p.issuer,
        audiences: p.audiences,
        algorithms,
        token_types,
        jwks: JwksSource {
            authority,
            path,
            uri: j.uri,
            cluster: j.cluster,
            timeout_ms: j.timeout_ms,
            cache_seconds: j.cache_seconds,
            max_stale_seconds: j.max_stale_seconds,
            min_refetch_seconds: j.min_refetch_seconds,
            retry_seconds: j.retry_seconds,
        },
    })
}

fn compile_rule(r: RawRule, at: &dyn Fn(&str) -> String) -> Result<Rule, ConfigError> {
    if r.id.is_empty()
        || !r
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(err(
            at("id"),
            "must be non-empty ASCII letters, digits, '-', '_', '.', ':'",
        ));
    }
    let methods = match r.methods {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(err(at("methods"), "omit the field to match any method"))
        }
        Some(list) => {
            for m in &list {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(err(
                        at("methods"),
                        format!("{m:?} is not an upper-case HTTP method"),
                    ));
                }
            }
            Some(list)
        }
    };
    let path = PathTemplate::parse(&r.path).map_err(|e| err(at("path"), e))?;
    for (field, list) in [("scopes", &r.scopes), ("scopes_any", &r.scopes_any)] {
        if let Some(bad) = list.iter().find(|s| !is_scope_token(s)) {
            return Err(err(
                at(field),
                format!("{bad:?} is not a valid scope (RFC 6749 §3.3)"),
            ));
        }
    }
    if r.public
        && (!r.scopes.is_empty() || !r.scopes_any.is_empty() || r.max_token_age_seconds.is_some())
    {
        return Err(err(
            at("public"),
            "a public rule cannot require scopes or token age",
        ));
    }
    Ok(Rule {
        id: r.id,
        methods,
        path,
        public: r.public,
        scopes: r.scopes,
        scopes_any: r.scopes_any,
        max_token_age: r.max_token_age_seconds,
    })
}

/// RFC 6749 scope-token characters; also keeps scopes safe inside a quoted header value.
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

fn is_quoted_string_safe(c: char) -> bool {
    c.is_ascii() && !c.is_ascii_control() && c != '"' && c != '\\'
}

/// Splits `http(s)://authority/path` into the callout's `:authority` and `:path`.
fn split_http_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i)?, rest.get(i..)?),
        None => (rest, "/"),
    };
    if authority.is_empty()
        || authority.contains('@')
        || authority.chars().any(|c| c.is_whitespace())
    {
        return None;
    }
    Some((authority.to_string(), path.to_string()))
}

/// For `BTreeMap`-based fields added later; keeps ordering deterministic.
#[allow(dead_code)]
type Map<V> = BTreeMap<String, V>;
