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
    #[serde(default = "defaults::verification_budget")]
    verification_budget: u32,
    #[serde(default = "defaults::realm")]
    realm: String,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    claims_to_headers: BTreeMap<String, String>,
    #[serde(default)]
    roles_claim: Option<String>,
    #[serde(default)]
    role_scopes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    step_up_defaults: Option<RawStepUp>,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    revocation: Option<RawRevocation>,
    #[serde(default)]
    transport: RawTransport,
    #[serde(default)]
    dpop: RawDpop,
    #[serde(default = "defaults::forbidden_claims")]
    forbidden_claims: Vec<String>,
    #[serde(default)]
    forbidden_claims_action: ForbiddenClaimsAction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransport {
    #[serde(default = "defaults::yes")]
    require_tls: bool,
    #[serde(default = "defaults::min_tls")]
    min_tls_version: String,
    #[serde(default)]
    trusted_forwarded_proto: bool,
}

impl Default for RawTransport {
    fn default() -> Self {
        RawTransport {
            require_tls: true,
            min_tls_version: defaults::min_tls(),
            trusted_forwarded_proto: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDpop {
    #[serde(default = "defaults::dpop_max_age")]
    max_age_seconds: u64,
}

impl Default for RawDpop {
    fn default() -> Self {
        RawDpop {
            max_age_seconds: defaults::dpop_max_age(),
        }
    }
}

/// What a token carrying a forbidden claim gets.
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ForbiddenClaimsAction {
    /// 401 `invalid_token`, reason `phi_in_token`.
    #[default]
    Reject,
    /// Allowed, the claim named in the audit record and counted.
    Audit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
    uri: String,
    cluster: String,
    #[serde(default = "defaults::revocation_refresh")]
    refresh_seconds: u64,
    #[serde(default = "defaults::timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "defaults::revocation_max_stale")]
    max_stale_seconds: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default)]
    hmac_key_env: Option<String>,
    #[serde(default = "defaults::checkpoint_seconds")]
    checkpoint_seconds: u64,
}

impl Default for RawAudit {
    fn default() -> RawAudit {
        RawAudit {
            hmac_key_env: None,
            checkpoint_seconds: defaults::checkpoint_seconds(),
        }
    }
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawStepUp {
    #[serde(default)]
    acr_values: Vec<String>,
    #[serde(default)]
    amr_any: Vec<String>,
    #[serde(default)]
    max_age_seconds: Option<u64>,
}

/// A rule's `step_up`: inline, or `"default"` for `step_up_defaults`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawStepUpRef {
    Named(String),
    Inline(RawStepUp),
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
    #[serde(default)]
    step_up: Option<RawStepUpRef>,
    #[serde(default)]
    sensitive: bool,
    #[serde(default)]
    require_tls: Option<bool>,
    #[serde(default)]
    require_sender_constraint: bool,
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
    pub fn verification_budget() -> u32 {
        20
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
    pub fn min_tls() -> String {
        "TLSv1.2".into()
    }
    pub fn dpop_max_age() -> u64 {
        60
    }
    /// OIDC standard claims that identify a person (OpenID Connect Core §5.1).
    pub fn forbidden_claims() -> Vec<String> {
        [
            "name",
            "given_name",
            "family_name",
            "middle_name",
            "nickname",
            "birthdate",
            "address",
            "phone_number",
            "email",
            "gender",
            "picture",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn revocation_refresh() -> u64 {
        5
    }
    pub fn revocation_max_stale() -> u64 {
        300
    }
    pub fn checkpoint_seconds() -> u64 {
        10
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
    /// Failed signature checks allowed per source per second (0: no limit).
    pub verification_budget: u32,
    pub realm: String,
    pub rules: Vec<Rule>,
    /// What to forward upstream on allow, as (what, header name).
    pub claims_to_headers: Vec<(ForwardedClaim, String)>,
    /// The claim holding roles, and the scopes each role adds.
    pub roles_claim: Option<String>,
    pub role_scopes: BTreeMap<String, Vec<String>>,
    /// Environment variable holding the audit HMAC key, if any.
    pub audit_hmac_key_env: Option<String>,
    /// Where the revocation list comes from, if one is used.
    pub revocation: Option<FetchSource>,
    pub transport: Transport,
    /// How old a DPoP proof may be.
    pub dpop_max_age: u64,
    /// Every provider's algorithms, space-separated: a DPoP challenge's `algs`.
    pub dpop_algs: String,
    /// Claims that must not be in a token (PHI, identity data).
    pub forbidden_claims: Vec<String>,
    pub forbidden_claims_action: ForbiddenClaimsAction,
    /// How often each VM writes its audit chain's head to Envoy's log.
    pub audit_checkpoint_seconds: u64,
}

/// Something the filter can forward to the upstream as a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedClaim {
    Sub,
    Iss,
    ClientId,
    Azp,
    Jti,
    Acr,
    /// The granted scopes, space-separated.
    Scopes,
    /// The id of the rule that allowed the request.
    Rule,
}

impl ForwardedClaim {
    const NAMES: [(&'static str, ForwardedClaim); 8] = [
        ("sub", ForwardedClaim::Sub),
        ("iss", ForwardedClaim::Iss),
        ("client_id", ForwardedClaim::ClientId),
        ("azp", ForwardedClaim::Azp),
        ("jti", ForwardedClaim::Jti),
        ("acr", ForwardedClaim::Acr),
        ("scopes", ForwardedClaim::Scopes),
        ("rule", ForwardedClaim::Rule),
    ];
}

/// Step-up requirements of a rule (RFC 9470); an empty part is not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepUp {
    pub acr_values: Vec<String>,
    pub amr_any: Vec<String>,
    pub max_age: Option<u64>,
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
    pub jwks: FetchSource,
}

/// Where and how often a document (a JWKS, the revocation list) is fetched.
#[derive(Debug)]
pub struct FetchSource {
    pub uri: String,
    /// `:authority` and `:path` of the callout, split from `uri`.
    pub authority: String,
    pub path: String,
    pub cluster: String,
    pub timeout_ms: u64,
    /// How often it is fetched again (a JWKS's `cache_seconds`).
    pub refresh_seconds: u64,
    /// How long the last good one serves after that when fetches fail.
    pub max_stale_seconds: u64,
    /// At most one on-demand refetch per this many seconds.
    pub min_refetch_seconds: u64,
    /// Retry interval while none is held.
    pub retry_seconds: u64,
}

/// TLS versions, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_0,
    V1_1,
    V1_2,
    V1_3,
}

impl TlsVersion {
    /// Parses Envoy's `connection.tls_version` (`TLSv1.2`, …), which is also
    /// how `min_tls_version` is written.
    pub fn parse(name: &str) -> Option<TlsVersion> {
        match name {
            "TLSv1" | "TLSv1.0" => Some(TlsVersion::V1_0),
            "TLSv1.1" => Some(TlsVersion::V1_1),
            "TLSv1.2" => Some(TlsVersion::V1_2),
            "TLSv1.3" => Some(TlsVersion::V1_3),
            _ => None,
        }
    }
}

/// What a protected request must have arrived over.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    pub require_tls: bool,
    pub min_tls_version: TlsVersion,
    /// Takes `x-forwarded-proto: https` as TLS (a terminating balancer in front).
    pub trusted_forwarded_proto: bool,
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
    pub step_up: Option<StepUp>,
    /// Fails closed (503) when the revocation list is older than it may be.
    pub sensitive: bool,
    /// Overrides `transport.require_tls` for this rule.
    pub require_tls: Option<bool>,
    /// Only mTLS- or DPoP-bound tokens.
    pub require_sender_constraint: bool,
}

impl Rule {
    /// Whether this rule applies to `method`.
    pub fn allows_method(&self, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == method))
    }

    /// Whether this rule, placed first, would match every request `later` matches.
    pub fn shadows(&self, later: &Rule) -> bool {
        let methods = match (&self.methods, &later.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|m| mine.contains(m)),
        };
        methods && self.path.covers(&later.path)
    }
}

/// Upper bounds that keep a typo from becoming a hole or a hang.
const MAX_SKEW: u64 = 300;
const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_TOKEN_CACHE: usize = 1_000_000;
/// A DPoP proof older than ten minutes is no proof of anything recent.
const MAX_DPOP_AGE: u64 = 600;
/// Claims the decision reads: forbidding one would forbid every token.
const NEEDED_CLAIMS: [&str; 15] = [
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    "scope",
    "scp",
    "client_id",
    "azp",
    "acr",
    "amr",
    "auth_time",
    "cnf",
];
/// More failures a second than a worker can check at all would bound nothing.
const MAX_VERIFICATION_BUDGET: u32 = 100_000;
/// An hour: a longer gap leaves too long a tail that no checkpoint vouches for.
const MAX_CHECKPOINT_SECONDS: u64 = 3600;

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
        if raw.verification_budget > MAX_VERIFICATION_BUDGET {
            return Err(err(
                "verification_budget",
                format!("at most {MAX_VERIFICATION_BUDGET} (0 turns it off)"),
            ));
        }
        if raw.realm.is_empty() || !raw.realm.chars().all(is_quoted_string_safe) {
            return Err(err(
                "realm",
                "must be non-empty printable ASCII without quotes or backslashes",
            ));
        }
        let defaults = match &raw.step_up_defaults {
            None => None,
            Some(d) => Some(compile_step_up(d.clone(), "step_up_defaults")?),
        };
        let mut ids = HashSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            let rule = compile_rule(r, &at, defaults.as_ref())?;
            if !ids.insert(rule.id.clone()) {
                return Err(err(at("id"), "duplicate rule id"));
            }
            // First match wins, so a rule an earlier one fully covers is dead
            // and, worse, its requests get the earlier rule's (weaker) checks.
            if let Some((j, earlier)) = rules
                .iter()
                .enumerate()
                .find(|(_, e): &(usize, &Rule)| e.shadows(&rule))
            {
                return Err(err(
                    at("path"),
                    format!(
                        "never reached: rules[{j}] ({:?}) comes first and matches every request this rule would; put the more specific rule first",
                        earlier.id
                    ),
                ));
            }
            rules.push(rule);
        }
        let mut claims_to_headers = Vec::with_capacity(raw.claims_to_headers.len());
        let mut header_names = HashSet::new();
        for (claim, header) in raw.claims_to_headers {
            let at = format!("claims_to_headers.{claim}");
            let what = ForwardedClaim::NAMES
                .iter()
                .find(|(name, _)| *name == claim)
                .map(|(_, w)| *w)
                .ok_or_else(|| {
                    err(
                        &at,
                        "unknown claim (one of sub, iss, client_id, azp, jti, acr, scopes, rule)",
                    )
                })?;
            let header = header.to_ascii_lowercase();
            if !is_forwardable_header(&header) {
                return Err(err(&at, format!("{header:?} cannot carry identity (use a custom name such as x-phi-subject)")));
            }
            if !header_names.insert(header.clone()) {
                return Err(err(&at, "two claims forwarded in the same header"));
            }
            claims_to_headers.push((what, header));
        }
        if let Some(claim) = &raw.roles_claim {
            if claim.is_empty() {
                return Err(err("roles_claim", "must not be empty"));
            }
            if raw.role_scopes.is_empty() {
                return Err(err(
                    "role_scopes",
                    "roles_claim needs role_scopes (role -> scopes)",
                ));
            }
        } else if !raw.role_scopes.is_empty() {
            return Err(err(
                "roles_claim",
                "role_scopes needs roles_claim (the claim holding roles)",
            ));
        }
        for (role, scopes) in &raw.role_scopes {
            if let Some(bad) = scopes.iter().find(|s| !is_scope_token(s)) {
                return Err(err(
                    format!("role_scopes.{role}"),
                    format!("{bad:?} is not a valid scope"),
                ));
            }
        }
        if let Some(name) = &raw.audit.hmac_key_env {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(err(
                    "audit.hmac_key_env",
                    "must be an environment variable name",
                ));
            }
        }
        let revocation = match raw.revocation {
            None => None,
            Some(r) => Some(compile_source(
                FetchSource {
                    uri: r.uri,
                    authority: String::new(),
                    path: String::new(),
                    cluster: r.cluster,
                    timeout_ms: r.timeout_ms,
                    refresh_seconds: r.refresh_seconds,
                    max_stale_seconds: r.max_stale_seconds,
                    // Nothing asks for a list on demand; retries as a JWKS does.
                    min_refetch_seconds: r.refresh_seconds,
                    retry_seconds: 1,
                },
                &|f| format!("revocation.{f}"),
            )?),
        };
        // No 0 = off: switching off the completeness check would be a quiet
        // weakening, and a checkpoint costs one log line per VM per period.
        if !(1..=MAX_CHECKPOINT_SECONDS).contains(&raw.audit.checkpoint_seconds) {
            return Err(err(
                "audit.checkpoint_seconds",
                format!("must be 1..={MAX_CHECKPOINT_SECONDS}"),
            ));
        }
        let min_tls_version = match TlsVersion::parse(&raw.transport.min_tls_version) {
            Some(v @ (TlsVersion::V1_2 | TlsVersion::V1_3)) => v,
            _ => {
                return Err(err(
                    "transport.min_tls_version",
                    "must be \"TLSv1.2\" or \"TLSv1.3\"",
                ))
            }
        };
        if !(1..=MAX_DPOP_AGE).contains(&raw.dpop.max_age_seconds) {
            return Err(err(
                "dpop.max_age_seconds",
                format!("must be 1..={MAX_DPOP_AGE}"),
            ));
        }
        for (i, claim) in raw.forbidden_claims.iter().enumerate() {
            let needed = NEEDED_CLAIMS.contains(&claim.as_str())
                || raw.roles_claim.as_deref() == Some(claim.as_str());
            if claim.is_empty() || needed {
                return Err(err(
                    format!("forbidden_claims[{i}]"),
                    format!("{claim:?} is a claim phi-guard needs to decide"),
                ));
            }
        }
        let dpop_algs = Alg::ALL
            .into_iter()
            .filter(|a| providers.iter().any(|p| p.algorithms.contains(a)))
            .map(Alg::name)
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Policy {
            revocation,
            transport: Transport {
                require_tls: raw.transport.require_tls,
                min_tls_version,
                trusted_forwarded_proto: raw.transport.trusted_forwarded_proto,
            },
            dpop_max_age: raw.dpop.max_age_seconds,
            dpop_algs,
            forbidden_claims: raw.forbidden_claims,
            forbidden_claims_action: raw.forbidden_claims_action,
            claims_to_headers,
            audit_checkpoint_seconds: raw.audit.checkpoint_seconds,
            roles_claim: raw.roles_claim,
            role_scopes: raw.role_scopes,
            audit_hmac_key_env: raw.audit.hmac_key_env,
            providers,
            clock_skew: raw.clock_skew_seconds,
            max_token_lifetime: raw.max_token_lifetime_seconds,
            forward_token: raw.forward_token,
            deny_wildcard_scopes: raw.deny_wildcard_scopes,
            verified_token_cache_size: raw.verified_token_cache_size,
            verification_budget: raw.verification_budget,
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

/// Checks a fetched document's source and splits its URI into the callout's
/// `:authority` and `:path`; `at(field)` names a field in errors.
fn compile_source(
    mut s: FetchSource,
    at: &dyn Fn(&str) -> String,
) -> Result<FetchSource, ConfigError> {
    let (authority, path) = split_http_uri(&s.uri).ok_or_else(|| {
        err(
            at("uri"),
            "must be an absolute http:// or https:// URI with a host",
        )
    })?;
    if s.cluster.is_empty() {
        return Err(err(at("cluster"), "must name an Envoy cluster"));
    }
    if s.timeout_ms == 0 || s.timeout_ms > MAX_TIMEOUT_MS {
        return Err(err(
            at("timeout_ms"),
            format!("must be 1..={MAX_TIMEOUT_MS}"),
        ));
    }
    if s.refresh_seconds == 0 {
        return Err(err(at("refresh_seconds"), "must be positive"));
    }
    if s.retry_seconds == 0 {
        return Err(err(at("retry_seconds"), "must be positive"));
    }
    s.authority = authority;
    s.path = path;
    Ok(s)
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
    let jwks = compile_source(
        FetchSource {
            uri: j.uri,
            authority: String::new(),
            path: String::new(),
            cluster: j.cluster,
            timeout_ms: j.timeout_ms,
            refresh_seconds: j.cache_seconds,
            max_stale_seconds: j.max_stale_seconds,
            min_refetch_seconds: j.min_refetch_seconds,
            retry_seconds: j.retry_seconds,
        },
        &|f| {
            at(&format!(
                "jwks.{}",
                if f == "refresh_seconds" {
                    "cache_seconds"
                } else {
                    f
                }
            ))
        },
    )?;
    Ok(Provider {
        name: p.name,
        issuer: p.issuer,
        audiences: p.audiences,
        algorithms,
        token_types,
        jwks,
    })
}

fn compile_step_up(raw: RawStepUp, at: &str) -> Result<StepUp, ConfigError> {
    for (field, list) in [("acr_values", &raw.acr_values), ("amr_any", &raw.amr_any)] {
        if let Some(bad) = list
            .iter()
            .find(|v| v.is_empty() || !v.chars().all(|c| is_quoted_string_safe(c) && c != ' '))
        {
            return Err(err(format!("{at}.{field}"), format!("{bad:?}: values are non-empty printable ASCII without spaces, quotes or backslashes")));
        }
    }
    if raw.acr_values.is_empty() && raw.amr_any.is_empty() && raw.max_age_seconds.is_none() {
        return Err(err(
            at,
            "set at least one of acr_values, amr_any, max_age_seconds",
        ));
    }
    Ok(StepUp {
        acr_values: raw.acr_values,
        amr_any: raw.amr_any,
        max_age: raw.max_age_seconds,
    })
}

/// Header names a client could otherwise use to smuggle identity are ours to set;
/// names Envoy or HTTP give meaning to are not.
fn is_forwardable_header(name: &str) -> bool {
    const RESERVED: [&str; 10] = [
        "authorization",
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "cookie",
        "x-request-id",
    ];
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !RESERVED.contains(&name)
        && !name.starts_with("x-envoy-")
}

fn compile_rule(
    r: RawRule,
    at: &dyn Fn(&str) -> String,
    step_up_defaults: Option<&StepUp>,
) -> Result<Rule, ConfigError> {
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
        && (!r.scopes.is_empty()
            || !r.scopes_any.is_empty()
            || r.max_token_age_seconds.is_some()
            || r.step_up.is_some()
            || r.sensitive
            || r.require_sender_constraint)
    {
        return Err(err(
            at("public"),
            "a public rule cannot require scopes, token age, step-up or a bound token, nor be sensitive",
        ));
    }
    let step_up = match r.step_up {
        None => None,
        Some(RawStepUpRef::Named(name)) if name == "default" => match step_up_defaults {
            Some(d) => Some(d.clone()),
            None => {
                return Err(err(
                    at("step_up"),
                    "\"default\" needs a top-level step_up_defaults",
                ))
            }
        },
        Some(RawStepUpRef::Named(name)) => {
            return Err(err(
                at("step_up"),
                format!("{name:?}: only \"default\" or an object is allowed"),
            ))
        }
        Some(RawStepUpRef::Inline(raw)) => Some(compile_step_up(raw, &at("step_up"))?),
    };
    Ok(Rule {
        id: r.id,
        methods,
        path,
        public: r.public,
        scopes: r.scopes,
        scopes_any: r.scopes_any,
        max_token_age: r.max_token_age_seconds,
        step_up,
        sensitive: r.sensitive,
        require_tls: r.require_tls,
        require_sender_constraint: r.require_sender_constraint,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn base() -> Value {
        json!({
            "providers": [{"name": "idp", "issuer": "https://idp", "audiences": ["api"],
                "jwks": {"uri": "https://idp.example.org:8443/keys?x=1", "cluster": "idp"}}],
            "rules": [{"id": "r", "path": "/a/{id}", "scopes": ["read"]}]
        })
    }

    fn load(doc: &Value) -> Result<Policy, ConfigError> {
        Policy::from_json(doc.to_string().as_bytes())
    }

    #[test]
    fn defaults_and_uri_split() {
        let p = load(&base()).unwrap();
        assert_eq!(
            (p.clock_skew, p.max_token_lifetime, p.forward_token),
            (60, 3600, false)
        );
        assert!(p.deny_wildcard_scopes);
        assert_eq!(p.verified_token_cache_size, 10_000);
        let prov = &p.providers[0];
        assert_eq!(
            prov.algorithms,
            [Alg::Rs256, Alg::Ps256, Alg::Es256, Alg::EdDsa]
        );
        assert_eq!(prov.token_types, ["at+jwt", "jwt"]);
        assert_eq!(prov.jwks.authority, "idp.example.org:8443");
        assert_eq!(prov.jwks.path, "/keys?x=1");
        assert_eq!(prov.jwks.timeout_ms, 2000);
        assert_eq!(p.audit_checkpoint_seconds, 10);
    }

    #[test]
    fn checkpoint_seconds_range() {
        let with = |audit: Value| {
            let mut doc = base();
            doc["audit"] = audit;
            load(&doc)
        };
        for (audit, want) in [
            (json!({}), Ok(10)),
            (json!({"hmac_key_env": "K"}), Ok(10)),
            (json!({"checkpoint_seconds": 1}), Ok(1)),
            (json!({"checkpoint_seconds": 3600}), Ok(3600)),
            (json!({"checkpoint_seconds": 0}), Err("must be 1..=3600")),
            (json!({"checkpoint_seconds": 3601}), Err("must be 1..=3600")),
        ] {
            let got = with(audit.clone()).map(|p| p.audit_checkpoint_seconds);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{audit}"),
                (Err(e), Err(problem)) => {
                    assert_eq!(e.field, "audit.checkpoint_seconds", "{audit}");
                    assert_eq!(
                        e.to_string(),
                        format!("invalid configuration at `audit.checkpoint_seconds`: {problem}")
                    );
                }
                (got, want) => panic!("{audit}: got {got:?}, want {want:?}"),
            }
        }
        // Not a whole number of seconds: refused.
        for bad in [json!(-1), json!(2.5), json!("10"), json!(null)] {
            assert!(with(json!({"checkpoint_seconds": bad})).is_err());
        }
    }

    #[test]
    fn shipped_envoy_policy_loads() {
        let yaml =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/envoy/envoy.yaml"))
                .unwrap();
        let start = yaml.find("value: |").unwrap() + "value: |".len();
        let end = yaml[start..].find("vm_config:").unwrap() + start;
        let p = Policy::from_json(&yaml.as_bytes()[start..end]).unwrap();
        assert!(p.rules.iter().any(|r| r.step_up.is_some()));
    }

    #[test]
    fn errors_name_the_field() {
        type Edit<'a> = &'a dyn Fn(&mut Value);
        let cases: Vec<(Edit, &str)> = vec![
            (&|d| d["providers"] = json!([]), "providers"),
            (
                &|d| d["providers"][0]["algorithms"] = json!(["HS256"]),
                "providers[0].algorithms",
            ),
            (
                &|d| d["providers"][0]["algorithms"] = json!(["none"]),
                "providers[0].algorithms",
            ),
            (
                &|d| d["providers"][0]["audiences"] = json!([]),
                "providers[0].audiences",
            ),
            (
                &|d| d["providers"][0]["jwks"]["uri"] = json!("ftp://x/y"),
                "providers[0].jwks.uri",
            ),
            (
                &|d| d["providers"][0]["jwks"]["timeout_ms"] = json!(0),
                "providers[0].jwks.timeout_ms",
            ),
            (
                &|d| d["providers"][0]["jwks"]["cache_seconds"] = json!(0),
                "providers[0].jwks.cache_seconds",
            ),
            (
                &|d| d["clock_skew_seconds"] = json!(301),
                "clock_skew_seconds",
            ),
            (&|d| d["realm"] = json!("a\"b"), "realm"),
            (
                &|d| d["rules"][0]["path"] = json!("no-slash"),
                "rules[0].path",
            ),
            (
                &|d| d["rules"][0]["methods"] = json!(["get"]),
                "rules[0].methods",
            ),
            (
                &|d| d["rules"][0]["scopes"] = json!(["a b"]),
                "rules[0].scopes",
            ),
            (
                &|d| d["rules"][0]["public"] = json!(true),
                "rules[0].public",
            ),
            (
                &|d| d["rules"][0]["step_up"] = json!("default"),
                "rules[0].step_up",
            ),
            (
                &|d| d["rules"][0]["step_up"] = json!({}),
                "rules[0].step_up",
            ),
            (
                &|d| d["rules"][0]["step_up"] = json!({"acr_values": ["a\"b"]}),
                "rules[0].step_up.acr_values",
            ),
            (
                &|d| d["rules"] = json!([{"id": "r", "path": "/a"}, {"id": "r", "path": "/b"}]),
                "rules[1].id",
            ),
            (
                &|d| d["claims_to_headers"] = json!({"email": "x-email"}),
                "claims_to_headers.email",
            ),
            (
                &|d| d["claims_to_headers"] = json!({"sub": "authorization"}),
                "claims_to_headers.sub",
            ),
            (
                &|d| d["claims_to_headers"] = json!({"sub": "x-a", "jti": "X-A"}),
                "claims_to_headers.sub",
            ),
            (&|d| d["roles_claim"] = json!("roles"), "role_scopes"),
            (&|d| d["role_scopes"] = json!({"a": ["b"]}), "roles_claim"),
            (
                &|d| d["audit"] = json!({"hmac_key_env": "A B"}),
                "audit.hmac_key_env",
            ),
            (
                &|d| d["audit"] = json!({"checkpoint_seconds": 0}),
                "audit.checkpoint_seconds",
            ),
        ];
        for (edit, field) in cases {
            let mut doc = base();
            edit(&mut doc);
            let e = load(&doc).unwrap_err();
            assert_eq!(e.field, field, "{doc}: {e}");
        }
        // Unknown fields and wrong types are refused, naming the field in the message.
        let mut doc = base();
        doc["rules"][0]["scope"] = json!(["read"]);
        let e = load(&doc).unwrap_err();
        assert!(e.problem.contains("scope"), "{e}");
        assert!(Policy::from_json(b"not json").is_err());
    }

    #[test]
    fn revocation_block_and_sensitive_rules() {
        let p = load(&base()).unwrap();
        assert!(p.revocation.is_none() && !p.rules[0].sensitive);
        let mut doc = base();
        doc["revocation"] =
            json!({"uri": "https://lists.example.org/revoked?v=2", "cluster": "lists"});
        doc["rules"][0]["sensitive"] = json!(true);
        let p = load(&doc).unwrap();
        let r = p.revocation.as_ref().unwrap();
        assert_eq!(
            (r.authority.as_str(), r.path.as_str(), r.cluster.as_str()),
            ("lists.example.org", "/revoked?v=2", "lists")
        );
        assert_eq!(
            (r.refresh_seconds, r.timeout_ms, r.max_stale_seconds),
            (5, 2000, 300)
        );
        assert!(p.rules[0].sensitive);
        // A sensitive rule without a revocation block loads (lint warns).
        let mut doc = base();
        doc["rules"][0]["sensitive"] = json!(true);
        assert!(load(&doc).is_ok());
        for (edit, field) in [
            (
                json!({"uri": "ftp://x/y", "cluster": "c"}),
                "revocation.uri",
            ),
            (
                json!({"uri": "https://x/y", "cluster": ""}),
                "revocation.cluster",
            ),
            (
                json!({"uri": "https://x/y", "cluster": "c", "refresh_seconds": 0}),
                "revocation.refresh_seconds",
            ),
            (
                json!({"uri": "https://x/y", "cluster": "c", "timeout_ms": 0}),
                "revocation.timeout_ms",
            ),
            (
                json!({"uri": "https://x/y", "cluster": "c", "refresh": 5}),
                "refresh",
            ),
            (json!({"cluster": "c"}), "uri"),
        ] {
            let mut doc = base();
            doc["revocation"] = edit;
            let e = load(&doc).unwrap_err();
            assert!(e.to_string().contains(field), "{e} should name {field}");
        }
        let mut doc = base();
        doc["rules"][0] = json!({"id": "r", "path": "/a/{id}", "public": true, "sensitive": true});
        assert_eq!(load(&doc).unwrap_err().field, "rules[0].public");
    }

    #[test]
    fn verification_budget_defaults_to_20_and_is_bounded() {
        assert_eq!(load(&base()).unwrap().verification_budget, 20);
        let with = |v: Value| {
            let mut doc = base();
            doc["verification_budget"] = v;
            load(&doc)
        };
        assert_eq!(with(json!(0)).unwrap().verification_budget, 0);
        assert_eq!(with(json!(100_000)).unwrap().verification_budget, 100_000);
        let e = with(json!(100_001)).unwrap_err();
        assert_eq!(e.field, "verification_budget", "{e}");
        for bad in [json!(-1), json!(1.5), json!("20"), json!(null)] {
            assert!(with(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rule_hidden_by_an_earlier_one_is_refused() {
        let with_rules = |rules: Value| {
            let mut doc = base();
            doc["rules"] = rules;
            load(&doc)
        };
        let read = json!({"id": "read", "methods": ["GET"], "path": "/fhir/Patient/{id}", "scopes": ["r"]});
        let export = json!({"id": "export", "methods": ["GET"], "path": "/fhir/Patient/$export", "scopes": ["x"]});
        let e = with_rules(json!([read, export])).unwrap_err();
        assert_eq!(e.field, "rules[1].path", "{e}");
        assert!(
            e.problem.contains("rules[0]") && e.problem.contains("read"),
            "{e}"
        );
        // The specific rule first is the intended order.
        assert!(with_rules(json!([export, read])).is_ok());
        // Disjoint or narrower methods leave the later rule reachable.
        let delete = json!({"id": "del", "methods": ["DELETE", "GET"], "path": "/fhir/Patient/$export", "scopes": ["x"]});
        assert!(with_rules(json!([read, delete])).is_ok());
        let any = json!({"id": "any", "path": "/fhir/{rest=**}", "scopes": ["r"]});
        assert!(with_rules(json!([any, export])).is_err());
        assert!(with_rules(json!([export, any])).is_ok());
        // `{id}` never matches an empty segment, so it does not hide a trailing `/`.
        let slash =
            json!({"id": "slash", "methods": ["GET"], "path": "/fhir/Patient/", "scopes": ["r"]});
        assert!(with_rules(json!([read, slash])).is_ok());
        let deeper = json!({"id": "deeper", "methods": ["GET"], "path": "/fhir/Patient/{id}/_history", "scopes": ["r"]});
        assert!(with_rules(json!([read, deeper])).is_ok());
    }

    #[test]
    fn step_up_default_is_resolved() {
        let mut doc = base();
        doc["step_up_defaults"] = json!({"acr_values": ["urn:mfa"], "max_age_seconds": 60});
        doc["rules"][0]["step_up"] = json!("default");
        let p = load(&doc).unwrap();
        assert_eq!(
            p.rules[0].step_up,
            Some(StepUp {
                acr_values: vec!["urn:mfa".into()],
                amr_any: vec![],
                max_age: Some(60)
            })
        );
    }
}

/// Hostile policy documents, generated: loading answers (no panic).
#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;

    const SHIPPED_LIKE: &str = r#"{"providers":[{"name":"idp","issuer":"https://idp","audiences":["api"],
        "algorithms":["RS256","ES256"],"jwks":{"uri":"https://idp/keys","cluster":"idp","timeout_ms":2000}}],
        "claims_to_headers":{"sub":"x-phi-subject","scopes":"x-phi-scopes"},
        "step_up_defaults":{"acr_values":["urn:mfa"],"max_age_seconds":300},
        "rules":[{"id":"h","path":"/healthz","public":true},
                 {"id":"e","methods":["GET"],"path":"/fhir/$export","scopes":["export:bulk"],"step_up":"default"},
                 {"id":"r","methods":["GET"],"path":"/fhir/Patient/{id}","scopes":["read"],"max_token_age_seconds":600},
                 {"id":"f","path":"/files/{rest=**}","scopes_any":["a","b"]}]}"#;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// One to four bytes of a valid policy replaced.
        #[test]
        fn edited_policies_are_answered(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..5),
        ) {
            prop_assert!(Policy::from_json(SHIPPED_LIKE.as_bytes()).is_ok());
            let mut doc = SHIPPED_LIKE.as_bytes().to_vec();
            for (at, byte) in edits {
                let i = at.index(doc.len());
                if let Some(b) = doc.get_mut(i) {
                    *b = byte;
                }
            }
            let _ = Policy::from_json(&doc);
        }
    }
}
