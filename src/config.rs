//! The filter configuration: `Raw*` serde types exactly as the user writes
//! them (unknown fields refused), compiled once into a [`Policy`] that request
//! handling can trust. Every error names the field it is about.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;

use crate::crypto::Alg;
use crate::rules::{PathMismatch, PathTemplate, SafePath};

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
    /// Why the token must reach the upstream; for reviewers (`phi-guard lint`
    /// refuses `forward_token` without one).
    #[serde(default)]
    forward_token_reason: Option<String>,
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
    fhir: Option<RawFhir>,
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
struct RawFhir {
    base_path: String,
    #[serde(default = "defaults::yes")]
    smart: bool,
    #[serde(default)]
    smart_v1: bool,
    #[serde(default = "defaults::yes")]
    patient_compartment: bool,
    #[serde(default = "defaults::launch_claim")]
    launch_claim: String,
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
enum RawStepUpRef {
    Named(String),
    Inline(RawStepUp),
}

// By hand rather than `#[serde(untagged)]`, which reports any error inside
// an inline step-up as "did not match any variant", naming no field.
impl<'de> Deserialize<'de> for RawStepUpRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = RawStepUpRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"default\" or a step-up object")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawStepUpRef, E> {
                Ok(RawStepUpRef::Named(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawStepUpRef, A::Error> {
                RawStepUp::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawStepUpRef::Inline)
            }
        }
        d.deserialize_any(Either)
    }
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
    #[serde(default)]
    introspection: Option<RawIntrospection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntrospection {
    uri: String,
    cluster: String,
    client_id: String,
    client_secret_env: String,
    #[serde(default = "defaults::timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "defaults::introspection_cache_seconds")]
    cache_seconds: u64,
    #[serde(default = "defaults::token_cache")]
    cache_size: usize,
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
    #[serde(default)]
    introspect: bool,
    #[serde(default)]
    provider: Option<String>,
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
    pub fn introspection_cache_seconds() -> u64 {
        30
    }
    pub fn launch_claim() -> String {
        "patient".into()
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
    /// A FHIR server under `base_path`, if the policy has a `fhir` block.
    pub fhir: Option<Fhir>,
}

/// The `fhir` block: requests under `base_path` that no rule matches are
/// decided by the FHIR model (`crate::fhir`) instead of the default 403.
#[derive(Debug)]
pub struct Fhir {
    pub base_path: String,
    /// `base_path`'s segments (none for `/`).
    pub base: Vec<String>,
    /// SMART App Launch scopes grant access; without, the model grants nothing.
    pub smart: bool,
    /// SMART v1 scopes (`read`, `write`, `*`) count as their v2 equivalents.
    pub smart_v1: bool,
    /// `patient/` scopes reach only the launch patient's compartment.
    pub patient_compartment: bool,
    /// The token claim holding the launch patient's id.
    pub launch_claim: String,
    /// What FHIR decisions are recorded under: [`FHIR_RULE_ID`] (a token is
    /// needed) and [`FHIR_PUBLIC_RULE_ID`] (`metadata`, SMART configuration).
    pub rules: [Rule; 2],
}

/// The rule id of requests the FHIR model decides.
pub const FHIR_RULE_ID: &str = "fhir";
/// The rule id of the FHIR endpoints anyone may read.
pub const FHIR_PUBLIC_RULE_ID: &str = "fhir-public";

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
    /// Where its tokens are introspected (RFC 7662), if anywhere.
    pub introspection: Option<IntrospectionEndpoint>,
}

/// A provider's token introspection endpoint (RFC 7662) and how its answers
/// are kept.
#[derive(Debug)]
pub struct IntrospectionEndpoint {
    pub uri: String,
    /// `:authority` and `:path` of the callout, split from `uri`.
    pub authority: String,
    pub path: String,
    pub cluster: String,
    /// phi-guard's client id at the authorization server.
    pub client_id: String,
    /// The environment variable holding the client secret: the host reads it
    /// at start, so the secret is never part of the policy.
    pub client_secret_env: String,
    /// Callout timeout; also how long a request waits for the answer.
    pub timeout_ms: u64,
    /// How long an answer is kept (an active one never past its `exp`).
    pub cache_seconds: u64,
    /// Answers kept per worker, at most.
    pub cache_size: usize,
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
    /// Set on an `introspect` rule: a token is also asked about at the
    /// authorization server before it is allowed.
    pub introspect: Option<Introspect>,
}

/// Which provider an `introspect` rule's tokens are introspected at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Introspect {
    /// The rule's `provider`: only that provider's tokens are accepted.
    pub provider: Option<usize>,
    /// Where an opaque (non-JWT) token is introspected: the named provider,
    /// else the only provider with an introspection block. `None` (several
    /// have one and the rule names none): opaque tokens are refused.
    pub opaque: Option<usize>,
}

/// Whether a rule applies to a request: its method and its path, each
/// answered (so `phi-guard explain` can say why a rule did not match).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleMatch {
    /// The rule allows the request's method.
    pub method: bool,
    /// Why the path does not match the rule's template (`None`: it does).
    pub path: Option<PathMismatch>,
}

impl RuleMatch {
    /// Both method and path match: the rule applies.
    pub fn is_match(&self) -> bool {
        self.method && self.path.is_none()
    }
}

impl Rule {
    /// Whether this rule applies to `method`.
    pub fn allows_method(&self, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == method))
    }

    /// Whether this rule applies to a request with `method` and `path`, and
    /// if not, why: the matcher [`crate::decision::decide`] tries rules with.
    pub fn match_request(&self, method: &str, path: &SafePath) -> RuleMatch {
        RuleMatch {
            method: self.allows_method(method),
            path: self.path.mismatch(path),
        }
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
/// An introspection answer kept longer would keep a token the authorization
/// server revoked usable longer than most tokens live.
const MAX_INTROSPECTION_CACHE_SECONDS: u64 = 3600;

impl Policy {
    /// Parses and validates the filter configuration document.
    pub fn from_json(doc: &[u8]) -> Result<Policy, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(doc);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| serde_error(e.path(), e.inner()))?;
        de.end().map_err(|e| err("(document)", e.to_string()))?;
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
        if raw
            .forward_token_reason
            .as_deref()
            .is_some_and(|r| r.trim().is_empty())
        {
            return Err(err("forward_token_reason", "must not be empty"));
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
            let rule = compile_rule(r, &at, defaults.as_ref(), &providers)?;
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
            if !is_env_name(name) {
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
                || raw.roles_claim.as_deref() == Some(claim.as_str())
                || raw.fhir.as_ref().is_some_and(|f| f.launch_claim == *claim);
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
        let fhir = match raw.fhir {
            None => None,
            Some(f) => Some(compile_fhir(f, &rules)?),
        };
        Ok(Policy {
            fhir,
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

    /// The rule a verdict names by index: an explicit rule, or just past
    /// them the FHIR model's (protected, then public).
    pub fn rule(&self, index: usize) -> Option<&Rule> {
        match index.checked_sub(self.rules.len()) {
            None => self.rules.get(index),
            Some(k) => self.fhir.as_ref()?.rules.get(k),
        }
    }

    /// The index [`Policy::rule`] gives the FHIR model's rule (`public`: the
    /// one that needs no token).
    pub fn fhir_rule(&self, public: bool) -> usize {
        self.rules.len() + usize::from(public)
    }

    /// Said at every start when some protected rule takes plaintext:
    /// weakening is spelled out, not only in the config.
    pub fn plaintext_warning(&self) -> Option<String> {
        let rules: Vec<&str> = self
            .rules
            .iter()
            .filter(|r| !r.public && !r.require_tls.unwrap_or(self.transport.require_tls))
            .map(|r| r.id.as_str())
            .collect();
        (!rules.is_empty()).then(|| {
            format!(
                "require_tls is false for rules {}: their tokens are accepted over plaintext, where anyone on the path can read and replay them",
                rules.join(", ")
            )
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

/// An environment variable name: letters, digits, `_`.
fn is_env_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks a callout's endpoint and splits its URI into the callout's
/// `:authority` and `:path`; `at(field)` names a field in errors.
fn compile_endpoint(
    uri: &str,
    cluster: &str,
    timeout_ms: u64,
    at: &dyn Fn(&str) -> String,
) -> Result<(String, String), ConfigError> {
    let (authority, path) = split_http_uri(uri).ok_or_else(|| {
        err(
            at("uri"),
            "must be an absolute http:// or https:// URI with a host",
        )
    })?;
    if cluster.is_empty() {
        return Err(err(at("cluster"), "must name an Envoy cluster"));
    }
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(err(
            at("timeout_ms"),
            format!("must be 1..={MAX_TIMEOUT_MS}"),
        ));
    }
    Ok((authority, path))
}

/// Checks a fetched document's source and splits its URI into the callout's
/// `:authority` and `:path`; `at(field)` names a field in errors.
fn compile_source(
    mut s: FetchSource,
    at: &dyn Fn(&str) -> String,
) -> Result<FetchSource, ConfigError> {
    let (authority, path) = compile_endpoint(&s.uri, &s.cluster, s.timeout_ms, at)?;
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

/// A type or shape error at `path`, spelled like the semantic ones
/// (`providers[0].jwks.timeout_ms`). A missing or unknown field is reported
/// by serde at the object holding it; the error names the field itself.
fn serde_error(path: &serde_path_to_error::Path, e: &serde_json::Error) -> ConfigError {
    let problem = e.to_string();
    let mut field = path.to_string();
    if field == "." {
        field.clear();
    }
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| problem.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    match named {
        Some(name) if !field.ends_with(name) => {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(name);
        }
        _ => {}
    }
    if field.is_empty() {
        field.push_str("(document)");
    }
    err(field, problem)
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
    let introspection = match p.introspection {
        None => None,
        Some(i) => Some(compile_introspection(i, &|f| {
            at(&format!("introspection.{f}"))
        })?),
    };
    Ok(Provider {
        name: p.name,
        issuer: p.issuer,
        audiences: p.audiences,
        algorithms,
        token_types,
        jwks,
        introspection,
    })
}

fn compile_introspection(
    i: RawIntrospection,
    at: &dyn Fn(&str) -> String,
) -> Result<IntrospectionEndpoint, ConfigError> {
    let (authority, path) = compile_endpoint(&i.uri, &i.cluster, i.timeout_ms, at)?;
    if i.client_id.is_empty() {
        return Err(err(at("client_id"), "must not be empty"));
    }
    if !is_env_name(&i.client_secret_env) {
        return Err(err(
            at("client_secret_env"),
            "must be an environment variable name (the secret itself never goes in the policy)",
        ));
    }
    if i.cache_seconds == 0 || i.cache_seconds > MAX_INTROSPECTION_CACHE_SECONDS {
        return Err(err(
            at("cache_seconds"),
            format!("must be 1..={MAX_INTROSPECTION_CACHE_SECONDS}"),
        ));
    }
    if i.cache_size == 0 || i.cache_size > MAX_TOKEN_CACHE {
        return Err(err(
            at("cache_size"),
            format!(
                "must be 1..={MAX_TOKEN_CACHE} (a request that waited is decided from the cache)"
            ),
        ));
    }
    Ok(IntrospectionEndpoint {
        uri: i.uri,
        authority,
        path,
        cluster: i.cluster,
        client_id: i.client_id,
        client_secret_env: i.client_secret_env,
        timeout_ms: i.timeout_ms,
        cache_seconds: i.cache_seconds,
        cache_size: i.cache_size,
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
    providers: &[Provider],
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
            || r.require_sender_constraint
            || r.introspect)
    {
        return Err(err(
            at("public"),
            "a public rule cannot require scopes, token age, step-up or a bound token, nor be sensitive or introspect",
        ));
    }
    let introspect = compile_introspect(r.introspect, r.provider.as_deref(), providers, at)?;
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
        introspect,
    })
}

/// A rule's `introspect` and `provider`: an introspect rule needs a provider
/// that introspects, and only an introspect rule names one.
fn compile_introspect(
    introspect: bool,
    provider: Option<&str>,
    providers: &[Provider],
    at: &dyn Fn(&str) -> String,
) -> Result<Option<Introspect>, ConfigError> {
    let named = match provider {
        None => None,
        Some(_) if !introspect => {
            return Err(err(
                at("provider"),
                "only a rule with \"introspect\": true names a provider",
            ))
        }
        Some(name) => {
            let (i, p) = providers
                .iter()
                .enumerate()
                .find(|(_, p)| p.name == name)
                .ok_or_else(|| err(at("provider"), format!("no provider is named {name:?}")))?;
            if p.introspection.is_none() {
                return Err(err(
                    at("provider"),
                    format!("provider {name:?} has no introspection block"),
                ));
            }
            Some(i)
        }
    };
    if !introspect {
        return Ok(None);
    }
    let mut introspecting = providers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.introspection.is_some())
        .map(|(i, _)| i);
    let first = introspecting.next();
    if first.is_none() {
        return Err(err(
            at("introspect"),
            "no provider has an introspection block",
        ));
    }
    let only = if introspecting.next().is_none() {
        first
    } else {
        None
    };
    Ok(Some(Introspect {
        provider: named,
        opaque: named.or(only),
    }))
}

/// Claims phi-guard reads for something else: a launch patient cannot come from them.
const CLAIMS_READ: [&str; 14] = [
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "scope",
    "scp",
    "client_id",
    "azp",
    "jti",
    "acr",
    "amr",
    "auth_time",
];

/// The `fhir` block. `rules` are the explicit ones, which may not take the
/// FHIR model's rule ids.
fn compile_fhir(f: RawFhir, rules: &[Rule]) -> Result<Fhir, ConfigError> {
    let base = fhir_base(&f.base_path).ok_or_else(|| {
        err(
            "fhir.base_path",
            "must be `/` or `/` followed by segments of letters, digits, `-`, `.`, `_`, `~` (no trailing `/`), e.g. \"/fhir\" or \"/api/fhir/r4\"",
        )
    })?;
    if f.launch_claim.is_empty()
        || f.launch_claim.len() > 64
        || CLAIMS_READ.contains(&f.launch_claim.as_str())
    {
        return Err(err(
            "fhir.launch_claim",
            "must name the token claim holding the launch patient's id (1 to 64 bytes, not a claim phi-guard reads otherwise)",
        ));
    }
    for (i, rule) in rules.iter().enumerate() {
        if rule.id == FHIR_RULE_ID || rule.id == FHIR_PUBLIC_RULE_ID {
            return Err(err(
                format!("rules[{i}].id"),
                format!(
                    "{:?} is the FHIR model's rule id while the policy has a fhir block",
                    rule.id
                ),
            ));
        }
    }
    let template = if base.is_empty() {
        "/**".to_string()
    } else {
        format!("{}/**", f.base_path)
    };
    let rule = |id: &str, public: bool| -> Result<Rule, ConfigError> {
        Ok(Rule {
            id: id.into(),
            methods: None,
            path: PathTemplate::parse(&template).map_err(|e| err("fhir.base_path", e))?,
            public,
            scopes: Vec::new(),
            scopes_any: Vec::new(),
            max_token_age: None,
            step_up: None,
            sensitive: false,
            introspect: None,
            require_tls: None,
            require_sender_constraint: false,
        })
    };
    Ok(Fhir {
        rules: [rule(FHIR_RULE_ID, false)?, rule(FHIR_PUBLIC_RULE_ID, true)?],
        base,
        base_path: f.base_path,
        smart: f.smart,
        smart_v1: f.smart_v1,
        patient_compartment: f.patient_compartment,
        launch_claim: f.launch_claim,
    })
}

/// `base_path`'s segments: `/` has none; otherwise plain segments, none
/// empty, none a dot segment, no trailing `/`.
fn fhir_base(path: &str) -> Option<Vec<String>> {
    if path == "/" {
        return Some(Vec::new());
    }
    let rest = path.strip_prefix('/')?;
    rest.split('/')
        .map(|seg| {
            let plain = !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
            plain.then(|| seg.to_string())
        })
        .collect()
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
            // Type and shape errors name their field too, not "(document)".
            (
                &|d| d["providers"][0]["jwks"]["timeout_ms"] = json!("2000"),
                "providers[0].jwks.timeout_ms",
            ),
            (
                &|d| d["rules"][0]["step_up"] = json!({"max_age_seconds": -1}),
                "rules[0].step_up.max_age_seconds",
            ),
            (
                &|d| d["rules"][0]["step_up"] = json!({"amr": ["otp"]}),
                "rules[0].step_up.amr",
            ),
            (&|d| d["rules"][0]["step_up"] = json!(7), "rules[0].step_up"),
            (
                &|d| d["providers"][0]["jwks"] = json!({"uri": "https://idp/keys"}),
                "providers[0].jwks.cluster",
            ),
            (
                &|d| d["rules"][0]["scope"] = json!(["read"]),
                "rules[0].scope",
            ),
        ];
        for (edit, field) in cases {
            let mut doc = base();
            edit(&mut doc);
            let e = load(&doc).unwrap_err();
            assert_eq!(e.field, field, "{doc}: {e}");
        }
        assert!(Policy::from_json(b"not json").is_err());
        let trailing = format!("{} x", base());
        assert_eq!(
            Policy::from_json(trailing.as_bytes()).unwrap_err().field,
            "(document)"
        );
    }

    #[test]
    fn forward_token_reason_is_documentation_and_not_empty() {
        let mut doc = base();
        doc["forward_token"] = json!(true);
        doc["forward_token_reason"] = json!("the upstream FHIR server checks the token again");
        assert!(load(&doc).unwrap().forward_token);
        for bad in [json!(""), json!("  ")] {
            doc["forward_token_reason"] = bad;
            assert_eq!(load(&doc).unwrap_err().field, "forward_token_reason");
        }
        doc["forward_token_reason"] = json!(7);
        assert_eq!(load(&doc).unwrap_err().field, "forward_token_reason");
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

    fn introspecting(name: &str, issuer: &str) -> Value {
        json!({"name": name, "issuer": issuer, "audiences": ["api"],
            "jwks": {"uri": "https://idp/keys", "cluster": "idp"},
            "introspection": {"uri": "https://as.example.org/introspect?v=1", "cluster": "as",
                "client_id": "phi-guard", "client_secret_env": "AS_SECRET"}})
    }

    #[test]
    fn introspection_block_defaults_and_rules() {
        let mut doc = base();
        doc["providers"][0]["introspection"] = introspecting("x", "y")["introspection"].clone();
        doc["rules"][0]["introspect"] = json!(true);
        let p = load(&doc).unwrap();
        let i = p.providers[0].introspection.as_ref().unwrap();
        assert_eq!(
            (i.authority.as_str(), i.path.as_str(), i.cluster.as_str()),
            ("as.example.org", "/introspect?v=1", "as")
        );
        assert_eq!(
            (i.client_id.as_str(), i.client_secret_env.as_str()),
            ("phi-guard", "AS_SECRET")
        );
        assert_eq!(
            (i.timeout_ms, i.cache_seconds, i.cache_size),
            (2000, 30, 10_000)
        );
        // The only introspecting provider takes opaque tokens.
        assert_eq!(
            p.rules[0].introspect,
            Some(Introspect {
                provider: None,
                opaque: Some(0)
            })
        );
        assert!(load(&base()).unwrap().rules[0].introspect.is_none());

        // Two introspecting providers: a rule naming neither takes no opaque tokens.
        let mut doc = base();
        doc["providers"] = json!([
            base()["providers"][0],
            introspecting("a", "https://a"),
            introspecting("b", "https://b")
        ]);
        doc["rules"] = json!([
            {"id": "any", "path": "/any", "introspect": true},
            {"id": "named", "path": "/named", "introspect": true, "provider": "b"},
        ]);
        let p = load(&doc).unwrap();
        assert_eq!(
            p.rules[0].introspect,
            Some(Introspect {
                provider: None,
                opaque: None
            })
        );
        assert_eq!(
            p.rules[1].introspect,
            Some(Introspect {
                provider: Some(2),
                opaque: Some(2)
            })
        );
    }

    #[test]
    fn introspection_errors_name_the_field() {
        let with_block = |edit: &dyn Fn(&mut Value)| {
            let mut doc = base();
            doc["providers"][0]["introspection"] = introspecting("x", "y")["introspection"].clone();
            edit(&mut doc["providers"][0]["introspection"]);
            load(&doc)
        };
        let at = |f: &str| format!("providers[0].introspection.{f}");
        type Edit<'a> = &'a dyn Fn(&mut Value);
        let cases: Vec<(Edit, String)> = vec![
            (
                &|i| i["uri"] = json!("as.example.org/introspect"),
                at("uri"),
            ),
            (&|i| i["cluster"] = json!(""), at("cluster")),
            (&|i| i["timeout_ms"] = json!(0), at("timeout_ms")),
            (&|i| i["timeout_ms"] = json!(60_001), at("timeout_ms")),
            (&|i| i["client_id"] = json!(""), at("client_id")),
            (
                &|i| i["client_secret_env"] = json!(""),
                at("client_secret_env"),
            ),
            (
                &|i| i["client_secret_env"] = json!("AS SECRET"),
                at("client_secret_env"),
            ),
            (&|i| i["cache_seconds"] = json!(0), at("cache_seconds")),
            (&|i| i["cache_seconds"] = json!(3601), at("cache_seconds")),
            (&|i| i["cache_size"] = json!(0), at("cache_size")),
            (&|i| i["cache_size"] = json!(1_000_001), at("cache_size")),
        ];
        for (edit, field) in cases {
            let e = with_block(edit).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        assert!(with_block(&|i| i["cache_size"] = json!(1_000_000)).is_ok());
        // Required members and unknown ones are named in the message.
        for (edit, name) in [
            (
                &(|i: &mut Value| {
                    i.as_object_mut().unwrap().remove("client_secret_env");
                }) as Edit,
                "client_secret_env",
            ),
            (
                &|i: &mut Value| {
                    i.as_object_mut().unwrap().remove("client_id");
                },
                "client_id",
            ),
            (
                &|i: &mut Value| i["client_secret"] = json!("s3cret"),
                "client_secret",
            ),
        ] {
            let e = with_block(edit).unwrap_err();
            assert!(e.to_string().contains(name), "{e} should name {name}");
        }

        // Rules.
        let rule = |r: Value, introspects: bool| {
            let mut doc = base();
            if introspects {
                doc["providers"][0]["introspection"] =
                    introspecting("x", "y")["introspection"].clone();
            }
            doc["rules"][0] = r;
            load(&doc)
        };
        let cases = [
            (
                json!({"id": "r", "path": "/a", "introspect": true}),
                false,
                "rules[0].introspect",
            ),
            (
                json!({"id": "r", "path": "/a", "introspect": true, "provider": "nobody"}),
                true,
                "rules[0].provider",
            ),
            (
                json!({"id": "r", "path": "/a", "introspect": true, "provider": "idp"}),
                false,
                "rules[0].provider",
            ),
            (
                json!({"id": "r", "path": "/a", "provider": "idp"}),
                true,
                "rules[0].provider",
            ),
            (
                json!({"id": "r", "path": "/a", "public": true, "introspect": true}),
                true,
                "rules[0].public",
            ),
        ];
        for (r, introspects, field) in cases {
            let e = rule(r.clone(), introspects).unwrap_err();
            assert_eq!(e.field, field, "{r}: {e}");
        }
        assert!(rule(
            json!({"id": "r", "path": "/a", "introspect": true, "provider": "idp"}),
            true
        )
        .is_ok());
    }

    #[test]
    fn fhir_block_defaults_and_rules() {
        let p = load(&base()).unwrap();
        assert!(p.fhir.is_none());
        assert_eq!(p.rule(0).map(|r| r.id.as_str()), Some("r"));
        assert!(p.rule(1).is_none(), "no fhir block: nothing past the rules");

        let mut doc = base();
        doc["fhir"] = json!({"base_path": "/fhir"});
        let p = load(&doc).unwrap();
        let f = p.fhir.as_ref().unwrap();
        assert_eq!(f.base, ["fhir"]);
        assert!(f.smart && !f.smart_v1 && f.patient_compartment);
        assert_eq!(f.launch_claim, "patient");
        // The FHIR model's rules come right after the explicit ones.
        assert_eq!(p.fhir_rule(false), 1);
        assert_eq!(
            p.rule(p.fhir_rule(false))
                .map(|r| (r.id.as_str(), r.public)),
            Some(("fhir", false))
        );
        assert_eq!(
            p.rule(p.fhir_rule(true)).map(|r| (r.id.as_str(), r.public)),
            Some(("fhir-public", true))
        );
        assert!(p.rule(3).is_none());

        doc["fhir"] = json!({"base_path": "/api/fhir-r4", "smart": false, "smart_v1": true,
            "patient_compartment": false, "launch_claim": "launch_patient"});
        let p = load(&doc).unwrap();
        let f = p.fhir.as_ref().unwrap();
        assert_eq!(f.base, ["api", "fhir-r4"]);
        assert!(!f.smart && f.smart_v1 && !f.patient_compartment);
        assert_eq!(f.launch_claim, "launch_patient");

        doc["fhir"] = json!({"base_path": "/"});
        assert!(load(&doc).unwrap().fhir.unwrap().base.is_empty());
    }

    #[test]
    fn fhir_errors_name_the_field() {
        let with = |fhir: Value, rules: Option<Value>| {
            let mut doc = base();
            doc["fhir"] = fhir;
            if let Some(r) = rules {
                doc["rules"] = r;
            }
            load(&doc).map(|_| ()).map_err(|e| e.field)
        };
        for bad in [
            "",
            "fhir",
            "/fhir/",
            "//fhir",
            "/fhir/../x",
            "/fhir/./x",
            "/fh%20ir",
            "/{id}",
            "/fhir/**",
        ] {
            assert_eq!(
                with(json!({"base_path": bad}), None),
                Err("fhir.base_path".into()),
                "{bad}"
            );
        }
        assert_eq!(with(json!({}), None), Err("fhir.base_path".into()));
        for claim in ["", "sub", "scope", "iss", &"x".repeat(65)] {
            assert_eq!(
                with(json!({"base_path": "/fhir", "launch_claim": claim}), None),
                Err("fhir.launch_claim".into()),
                "{claim}"
            );
        }
        assert_eq!(
            with(json!({"base_path": "/fhir", "smart": "yes"}), None),
            Err("fhir.smart".into())
        );
        assert_eq!(
            with(json!({"base_path": "/fhir", "extra": 1}), None),
            Err("fhir.extra".into())
        );
        for id in ["fhir", "fhir-public"] {
            assert_eq!(
                with(
                    json!({"base_path": "/fhir"}),
                    Some(json!([{"id": "ok", "path": "/a"}, {"id": id, "path": "/b"}]))
                ),
                Err("rules[1].id".into()),
                "{id}"
            );
        }
        // Without a fhir block those ids are anyone's.
        let mut doc = base();
        doc["rules"] = json!([{"id": "fhir", "path": "/b"}]);
        assert!(load(&doc).is_ok());
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

/// Valid policies changed structurally — a field dropped, retyped or set to
/// another value, an unknown field added, a rule or provider duplicated —
/// against what the README promises: a change that leaves a valid policy
/// loads with exactly the document's values and the README's defaults for
/// what it leaves out; any other change is refused with an error naming the
/// field it is about.
#[cfg(test)]
mod structural {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// Every optional field set away from its default, so a dropped one shows.
    fn base() -> Value {
        json!({
            "providers": [{"name": "idp", "issuer": "https://idp", "audiences": ["api", "api2"],
                "algorithms": ["RS256", "ES384"], "token_types": ["at+jwt"],
                "jwks": {"uri": "https://idp/keys", "cluster": "idp", "timeout_ms": 2500,
                         "cache_seconds": 120, "max_stale_seconds": 600, "min_refetch_seconds": 10,
                         "retry_seconds": 2}}],
            "clock_skew_seconds": 30,
            "max_token_lifetime_seconds": 1800,
            "forward_token": true,
            "deny_wildcard_scopes": false,
            "verified_token_cache_size": 50,
            "realm": "r",
            "claims_to_headers": {"sub": "x-phi-subject", "scopes": "x-phi-scopes"},
            "roles_claim": "roles",
            "role_scopes": {"clinician": ["read"]},
            "step_up_defaults": {"acr_values": ["urn:mfa"], "max_age_seconds": 300},
            "audit": {"hmac_key_env": "KEY"},
            "rules": [
                {"id": "h", "path": "/healthz", "public": true},
                {"id": "e", "methods": ["GET"], "path": "/fhir/$export", "scopes": ["export:bulk"], "step_up": "default"},
                {"id": "r", "methods": ["GET"], "path": "/fhir/Patient/{id}", "scopes": ["read"], "max_token_age_seconds": 600},
                {"id": "f", "path": "/files/{rest=**}", "scopes_any": ["a", "b"]},
                {"id": "s", "methods": ["POST"], "path": "/sign/{id}", "scopes": ["sign"],
                 "step_up": {"amr_any": ["otp"], "max_age_seconds": 60}}
            ]
        })
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Seg {
        Key(&'static str),
        At(usize),
    }

    type Path = Vec<Seg>;

    /// The path as errors spell it: `providers[0].jwks.uri`.
    fn spelled(path: &[Seg]) -> String {
        let mut out = String::new();
        for seg in path {
            match seg {
                Seg::Key(k) if out.is_empty() => out.push_str(k),
                Seg::Key(k) => out.push_str(&format!(".{k}")),
                Seg::At(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    fn at<'v>(doc: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
        path.iter().try_fold(doc, |v, seg| match seg {
            Seg::Key(k) => v.get_mut(*k),
            Seg::At(i) => v.get_mut(*i),
        })
    }

    /// What each field is, by name: a value of the wrong type, and whether it must be there.
    fn field_kind(name: &str) -> (Value, bool) {
        let required = matches!(
            name,
            "providers"
                | "name"
                | "issuer"
                | "audiences"
                | "jwks"
                | "uri"
                | "cluster"
                | "id"
                | "path"
        );
        let wrong = match name {
            "providers" | "rules" => json!({"0": {}}),
            "jwks" | "step_up_defaults" | "audit" => json!("x"),
            "claims_to_headers" | "role_scopes" => json!(["sub"]),
            "step_up" => json!(7),
            "forward_token" | "deny_wildcard_scopes" | "public" => json!("true"),
            "audiences" | "algorithms" | "token_types" | "methods" | "scopes" | "scopes_any"
            | "acr_values" | "amr_any" => json!("x"),
            "name" | "issuer" | "uri" | "cluster" | "realm" | "roles_claim" | "hmac_key_env"
            | "id" | "path" => json!(7),
            _ => json!("7"), // the numbers
        };
        (wrong, required)
    }

    /// Every field of the base document.
    fn fields() -> Vec<Path> {
        let doc = base();
        let mut out = Vec::new();
        let mut add = |prefix: Path, v: &Value| {
            for k in v.as_object().unwrap().keys() {
                let name: &'static str = Box::leak(k.clone().into_boxed_str());
                let mut p = prefix.clone();
                p.push(Seg::Key(name));
                out.push(p);
            }
        };
        add(vec![], &doc);
        let provider = vec![Seg::Key("providers"), Seg::At(0)];
        add(provider.clone(), &doc["providers"][0]);
        add(
            [provider, vec![Seg::Key("jwks")]].concat(),
            &doc["providers"][0]["jwks"],
        );
        for (i, rule) in doc["rules"].as_array().unwrap().iter().enumerate() {
            add(vec![Seg::Key("rules"), Seg::At(i)], rule);
        }
        add(vec![Seg::Key("step_up_defaults")], &doc["step_up_defaults"]);
        add(vec![Seg::Key("audit")], &doc["audit"]);
        add(
            vec![Seg::Key("rules"), Seg::At(4), Seg::Key("step_up")],
            &doc["rules"][4]["step_up"],
        );
        out
    }

    #[derive(Debug, Clone)]
    enum Change {
        Drop(Path),
        Retype(Path),
        Set(Path, Value),
        Unknown(Path),
        DuplicateRule(usize),
        DuplicateProvider,
    }

    /// What the loader must answer: the field an error names, or a policy.
    #[derive(Debug, Clone, PartialEq)]
    enum Want {
        Loads,
        Refused(String),
    }

    fn last(path: &[Seg]) -> &'static str {
        match path.last() {
            Some(Seg::Key(k)) => k,
            _ => "",
        }
    }

    /// Applies `change` and says what must come of it.
    fn apply(doc: &mut Value, change: &Change) -> Want {
        match change {
            Change::Drop(path) => {
                let (parent, name) = (&path[..path.len() - 1], last(path));
                at(doc, parent)
                    .and_then(|v| v.as_object_mut())
                    .unwrap()
                    .remove(name);
                if field_kind(name).1 {
                    return Want::Refused(spelled(path));
                }
                // Optional alone, but another field needs it.
                match spelled(path).as_str() {
                    "roles_claim" => Want::Refused("roles_claim".into()),
                    "role_scopes" => Want::Refused("role_scopes".into()),
                    "step_up_defaults" => Want::Refused("rules[1].step_up".into()),
                    _ => Want::Loads,
                }
            }
            Change::Retype(path) => {
                *at(doc, path).unwrap() = field_kind(last(path)).0;
                Want::Refused(spelled(path))
            }
            Change::Set(path, value) => {
                *at(doc, path).unwrap() = value.clone();
                match (spelled(path).as_str(), value.as_u64()) {
                    // README: clock skew at most 300.
                    ("clock_skew_seconds", Some(s)) if s > 300 => {
                        Want::Refused("clock_skew_seconds".into())
                    }
                    _ => Want::Loads,
                }
            }
            Change::Unknown(path) => {
                at(doc, path)
                    .and_then(|v| v.as_object_mut())
                    .unwrap()
                    .insert("bogus_field".into(), json!(1));
                let mut field = path.clone();
                field.push(Seg::Key("bogus_field"));
                Want::Refused(spelled(&field))
            }
            Change::DuplicateRule(i) => {
                let rules = doc["rules"].as_array_mut().unwrap();
                let copy = rules[*i].clone();
                rules.insert(i + 1, copy);
                Want::Refused(format!("rules[{}].id", i + 1))
            }
            Change::DuplicateProvider => {
                let providers = doc["providers"].as_array_mut().unwrap();
                let copy = providers[0].clone();
                providers.push(copy);
                Want::Refused("providers[1].name".into())
            }
        }
    }

    /// The document as the README says it is read: every field left out
    /// takes the README's default ("Configuration reference").
    fn effective(doc: &Value) -> Value {
        let or = |v: &Value, key: &str, default: Value| match v.get(key) {
            Some(x) => x.clone(),
            None => default,
        };
        let dedup = |v: Value| {
            let mut seen = Vec::new();
            for x in v.as_array().unwrap() {
                if !seen.contains(x) {
                    seen.push(x.clone());
                }
            }
            Value::from(seen)
        };
        let lower = |v: Value| {
            Value::from(
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_ascii_lowercase())
                    .collect::<Vec<_>>(),
            )
        };
        let step_up = |s: &Value| {
            json!({"acr_values": or(s, "acr_values", json!([])), "amr_any": or(s, "amr_any", json!([])),
                   "max_age_seconds": or(s, "max_age_seconds", Value::Null)})
        };
        let providers: Vec<Value> = doc["providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let j = &p["jwks"];
                json!({
                    "name": p["name"], "issuer": p["issuer"], "audiences": p["audiences"],
                    "algorithms": dedup(or(p, "algorithms", json!(["RS256", "PS256", "ES256", "EdDSA"]))),
                    "token_types": lower(or(p, "token_types", json!(["at+jwt", "JWT"]))),
                    "jwks": {"uri": j["uri"], "cluster": j["cluster"],
                        "timeout_ms": or(j, "timeout_ms", json!(2000)),
                        "cache_seconds": or(j, "cache_seconds", json!(300)),
                        "max_stale_seconds": or(j, "max_stale_seconds", json!(3600)),
                        "min_refetch_seconds": or(j, "min_refetch_seconds", json!(30)),
                        "retry_seconds": or(j, "retry_seconds", json!(1))}
                })
            })
            .collect();
        let rules: Vec<Value> = or(doc, "rules", json!([]))
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let step = match r.get("step_up") {
                    None => Value::Null,
                    Some(Value::String(_)) => step_up(&doc["step_up_defaults"]),
                    Some(inline) => step_up(inline),
                };
                json!({
                    "id": r["id"], "methods": or(r, "methods", Value::Null), "path": r["path"],
                    "public": or(r, "public", json!(false)), "scopes": or(r, "scopes", json!([])),
                    "scopes_any": or(r, "scopes_any", json!([])),
                    "max_token_age_seconds": or(r, "max_token_age_seconds", Value::Null),
                    "step_up": step,
                })
            })
            .collect();
        json!({
            "providers": providers,
            "clock_skew_seconds": or(doc, "clock_skew_seconds", json!(60)),
            "max_token_lifetime_seconds": or(doc, "max_token_lifetime_seconds", json!(3600)),
            "forward_token": or(doc, "forward_token", json!(false)),
            "deny_wildcard_scopes": or(doc, "deny_wildcard_scopes", json!(true)),
            "verified_token_cache_size": or(doc, "verified_token_cache_size", json!(10000)),
            "realm": or(doc, "realm", json!("phi-guard")),
            "claims_to_headers": or(doc, "claims_to_headers", json!({})),
            "roles_claim": or(doc, "roles_claim", Value::Null),
            "role_scopes": or(doc, "role_scopes", json!({})),
            "hmac_key_env": doc.get("audit").map_or(Value::Null, |a| or(a, "hmac_key_env", Value::Null)),
            "rules": rules,
        })
    }

    /// The loaded policy in the shape of [`effective`].
    fn summary(p: &Policy) -> Value {
        let claim_name = |c: &ForwardedClaim| {
            ForwardedClaim::NAMES
                .iter()
                .find(|(_, w)| w == c)
                .map(|(n, _)| *n)
                .unwrap()
        };
        json!({
            "providers": p.providers.iter().map(|p| json!({
                "name": p.name, "issuer": p.issuer, "audiences": p.audiences,
                "algorithms": p.algorithms.iter().map(|a| a.name()).collect::<Vec<_>>(),
                "token_types": p.token_types,
                "jwks": {"uri": p.jwks.uri, "cluster": p.jwks.cluster, "timeout_ms": p.jwks.timeout_ms,
                    "cache_seconds": p.jwks.refresh_seconds, "max_stale_seconds": p.jwks.max_stale_seconds,
                    "min_refetch_seconds": p.jwks.min_refetch_seconds, "retry_seconds": p.jwks.retry_seconds},
            })).collect::<Vec<_>>(),
            "clock_skew_seconds": p.clock_skew,
            "max_token_lifetime_seconds": p.max_token_lifetime,
            "forward_token": p.forward_token,
            "deny_wildcard_scopes": p.deny_wildcard_scopes,
            "verified_token_cache_size": p.verified_token_cache_size,
            "realm": p.realm,
            "claims_to_headers": p.claims_to_headers.iter()
                .map(|(c, h)| (claim_name(c).to_owned(), json!(h)))
                .collect::<serde_json::Map<_, _>>(),
            "roles_claim": p.roles_claim,
            "role_scopes": p.role_scopes,
            "hmac_key_env": p.audit_hmac_key_env,
            "rules": p.rules.iter().map(|r| json!({
                "id": r.id, "methods": r.methods, "path": r.path.as_str(), "public": r.public,
                "scopes": r.scopes, "scopes_any": r.scopes_any,
                "max_token_age_seconds": r.max_token_age,
                "step_up": r.step_up.as_ref().map(|s| json!({"acr_values": s.acr_values,
                    "amr_any": s.amr_any, "max_age_seconds": s.max_age})),
            })).collect::<Vec<_>>(),
        })
    }

    /// Loads the changed document and holds the answer to `want`.
    fn check(doc: &Value, want: &Want) -> Result<(), String> {
        match (Policy::from_json(doc.to_string().as_bytes()), want) {
            (Ok(p), Want::Loads) => {
                let (got, wanted) = (summary(&p), effective(doc));
                if got == wanted {
                    Ok(())
                } else {
                    Err(format!(
                        "loaded as\n{got}\nbut the README reads it as\n{wanted}"
                    ))
                }
            }
            (Err(e), Want::Refused(field)) => {
                // The error is about that field: at it, or at the object
                // holding it with the field named (serde's missing/unknown field).
                let (parent, name) = match field.rsplit_once('.') {
                    Some((parent, name)) => (parent, name),
                    None => ("", field.as_str()),
                };
                let names_it = e.field == *field
                    || (e.field == parent && e.problem.contains(&format!("`{name}`")));
                if names_it {
                    Ok(())
                } else {
                    Err(format!("refused, but not naming `{field}`: {e}"))
                }
            }
            (Ok(_), Want::Refused(field)) => Err(format!("loaded; want it refused at `{field}`")),
            (Err(e), Want::Loads) => Err(format!("refused ({e}); want it loaded")),
        }
    }

    fn every_change() -> Vec<Change> {
        let mut out = Vec::new();
        for path in fields() {
            out.push(Change::Drop(path.clone()));
            out.push(Change::Retype(path));
        }
        for object in [
            vec![],
            vec![Seg::Key("providers"), Seg::At(0)],
            vec![Seg::Key("providers"), Seg::At(0), Seg::Key("jwks")],
            vec![Seg::Key("step_up_defaults")],
            vec![Seg::Key("audit")],
            vec![Seg::Key("rules"), Seg::At(4), Seg::Key("step_up")],
        ] {
            out.push(Change::Unknown(object));
        }
        for i in 0..5 {
            out.push(Change::Unknown(vec![Seg::Key("rules"), Seg::At(i)]));
            out.push(Change::DuplicateRule(i));
        }
        out.push(Change::DuplicateProvider);
        out.extend(harmless_sets());
        let skew = vec![Seg::Key("clock_skew_seconds")];
        out.push(Change::Set(skew.clone(), json!(300)));
        out.push(Change::Set(skew, json!(301)));
        out
    }

    /// Other valid values.
    fn harmless_sets() -> Vec<Change> {
        let p = |segs: &[Seg]| segs.to_vec();
        vec![
            Change::Set(p(&[Seg::Key("verified_token_cache_size")]), json!(0)),
            Change::Set(
                p(&[Seg::Key("providers"), Seg::At(0), Seg::Key("algorithms")]),
                json!(["ES384", "RS256", "ES384"]),
            ),
            Change::Set(
                p(&[Seg::Key("providers"), Seg::At(0), Seg::Key("token_types")]),
                json!(["AT+JWT", "application/jwt"]),
            ),
            Change::Set(
                p(&[Seg::Key("providers"), Seg::At(0), Seg::Key("token_types")]),
                json!([]),
            ),
            Change::Set(
                p(&[Seg::Key("rules"), Seg::At(2), Seg::Key("methods")]),
                json!(["GET", "HEAD"]),
            ),
        ]
    }

    #[test]
    fn the_base_loads_as_written() {
        check(&base(), &Want::Loads).unwrap();
    }

    /// Each change alone, every one of them.
    #[test]
    fn every_single_change_is_answered_as_promised() {
        let (mut loads, mut refused, mut wrong) = (0, 0, Vec::new());
        for change in every_change() {
            let mut doc = base();
            let want = apply(&mut doc, &change);
            match &want {
                Want::Loads => loads += 1,
                Want::Refused(_) => refused += 1,
            }
            if let Err(e) = check(&doc, &want) {
                wrong.push(format!("{change:?}: {e}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} wrong:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
        // Both ways are taken, many times.
        assert!(
            loads >= 30 && refused >= 60,
            "{loads} loaded, {refused} refused"
        );
    }

    /// Drops of optional fields that need nothing else and other valid values.
    fn harmless() -> Vec<Change> {
        let needed_elsewhere = ["roles_claim", "role_scopes", "step_up_defaults"];
        let mut out: Vec<Change> = fields()
            .into_iter()
            .filter(|p| {
                let name = last(p);
                !field_kind(name).1
                    && !needed_elsewhere.contains(&name)
                    // Both parts of a step-up gone leave it asking nothing: refused.
                    && !matches!(name, "acr_values" | "amr_any" | "max_age_seconds")
            })
            .map(Change::Drop)
            .collect();
        out.extend(harmless_sets());
        out
    }

    fn touches(change: &Change, path: &str) -> bool {
        let p = match change {
            Change::Drop(p) | Change::Retype(p) | Change::Set(p, _) | Change::Unknown(p) => {
                spelled(p)
            }
            Change::DuplicateRule(_) => "rules".into(),
            Change::DuplicateProvider => "providers".into(),
        };
        // The rule that uses step_up_defaults depends on it.
        let also = (path == "step_up_defaults").then_some("rules[1].step_up");
        [Some(path), also]
            .into_iter()
            .flatten()
            .any(|path| path.starts_with(&p) || p.starts_with(path))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Several harmless changes together still load as the README reads them;
        /// add one harmful change and it is the one the error names.
        #[test]
        fn changes_together_are_answered_as_promised(
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
            harmful in prop::option::of(any::<prop::sample::Index>()),
        ) {
            let all = every_change();
            let bad: Vec<&Change> = all
                .iter()
                .filter(|c| {
                    let mut d = base();
                    matches!(apply(&mut d, c), Want::Refused(_))
                })
                .collect();
            let harmful = harmful.map(|i| bad[i.index(bad.len())].clone());
            let mut doc = base();
            let mut want = Want::Loads;
            let target = harmful.as_ref().map(|h| match h {
                Change::Drop(p) | Change::Retype(p) | Change::Set(p, _) | Change::Unknown(p) => spelled(p),
                Change::DuplicateRule(_) => "rules".into(),
                Change::DuplicateProvider => "providers".into(),
            });
            let ok = harmless();
            for i in picks {
                let change = &ok[i.index(ok.len())];
                if target.as_deref().is_some_and(|t| touches(change, t)) {
                    continue;
                }
                // A field dropped before: nothing left to drop or set.
                if let Change::Drop(p) | Change::Set(p, _) = change {
                    if at(&mut doc, p).is_none() {
                        continue;
                    }
                }
                prop_assert_eq!(apply(&mut doc, change), Want::Loads);
            }
            if let Some(h) = &harmful {
                want = apply(&mut doc, h);
            }
            if let Err(e) = check(&doc, &want) {
                return Err(TestCaseError::fail(format!("{harmful:?}: {e}")));
            }
        }
    }
}
