//! `phi-guard lint`: a policy and the Envoy or Istio settings around it,
//! checked before deployment.
//!
//! Errors are what the filter itself refuses at load (through the very
//! parser it runs, [`Policy::from_json`], so with its messages) and what
//! loads but leaves PHI exposed; warnings are what a reviewer should look at
//! twice. Checks of the policy read the raw JSON document, so they also see
//! fields a newer build may add and still report when the parser refuses
//! the document.
//!
//! Codes are stable (CI keys on them); the README lists them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, Policy};
use crate::policy_file::{
    self, get, index, key, type_of, Document, FoundPolicy, Kind, Setting, ROUTER_TYPE,
};
use crate::rules::{is_wildcard, PathTemplate, SafePath};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// Where a finding is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: String,
    /// 1-based line in the file, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Where the policy sits in the file (an envoy.yaml's filter
    /// `configuration.value`, a WasmPlugin's `spec.pluginConfig`); absent for
    /// a bare policy and for findings about Envoy or Istio settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The field, spelled as config errors spell it: within the policy
    /// (`rules[3].scopes[0]`), else within the file's document.
    pub field: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// One thing lint found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: &'static str,
    pub location: Location,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.location;
        write!(f, "{}", l.file)?;
        if let Some(line) = l.line {
            write!(f, ":{line}")?;
        }
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, ": {severity}[{}]: ", self.code)?;
        if !l.field.is_empty() {
            write!(f, "`{}`", l.field)?;
        }
        match (&l.rule, &l.provider) {
            (Some(r), _) => write!(f, " (rule {r:?})")?,
            (None, Some(p)) => write!(f, " (provider {p:?})")?,
            _ => {}
        }
        if !l.field.is_empty() || l.rule.is_some() || l.provider.is_some() {
            f.write_str(": ")?;
        }
        f.write_str(&self.message)
    }
}

/// A scope catalogue (`--scopes catalogue.json`): the scopes a deployment
/// defines, reviewed and versioned beside the policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub scopes: Vec<CatalogueScope>,
}

/// One defined scope.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueScope {
    pub name: String,
    pub description: String,
    pub sensitivity: Sensitivity,
}

/// How much harm a token with the scope can do; `high` scopes need
/// `max_token_age_seconds` on every rule that requires them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    Low,
    Moderate,
    High,
}

impl Catalogue {
    /// Parses a catalogue file, refusing unknown fields, empty names and
    /// scopes defined twice.
    pub fn from_json(text: &str) -> Result<Catalogue, String> {
        let c: Catalogue = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut seen = BTreeSet::new();
        for s in &c.scopes {
            if s.name.is_empty() || s.name.contains(' ') {
                return Err(format!("scope name {:?} is not a scope", s.name));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(format!("scope {:?} is defined twice", s.name));
            }
        }
        Ok(c)
    }

    fn get(&self, name: &str) -> Option<&CatalogueScope> {
        self.scopes.iter().find(|s| s.name == name)
    }
}

/// What lint is told beyond the files.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Path prefixes serving PHI (`--phi-prefix /fhir`): a public rule under
    /// one is a warning, and bulk-export requests under one must meet a
    /// step-up rule.
    pub phi_prefixes: Vec<String>,
    pub catalogue: Option<Catalogue>,
    /// Path templates that must not be served without step-up (`--high-risk`).
    pub high_risk: Vec<PathTemplate>,
}

/// Longest token lifetime not warned about.
const MAX_LIFETIME_SECONDS: u64 = 3600;
/// Longest `max_stale_seconds` not warned about.
const MAX_STALE_SECONDS: u64 = 24 * 3600;

/// Lints one file's text; `file` names it in findings.
pub fn lint_text(file: &str, text: &str, opts: &Options) -> Vec<Finding> {
    let mut out = Out {
        file,
        findings: Vec::new(),
    };
    let docs = match policy_file::read_documents(text) {
        Ok(d) => d,
        Err(e) => {
            out.push(
                Severity::Error,
                "syntax",
                Location {
                    line: e.line,
                    ..out.at("")
                },
                format!("not YAML or JSON: {}", e.problem),
            );
            return out.findings;
        }
    };
    let policies = policy_file::find_policies(&docs);
    let mut anything = !policies.is_empty();
    for found in &policies {
        lint_policy(&mut out, found, opts);
    }
    for (d, doc) in docs.iter().enumerate() {
        match policy_file::kind_of(&doc.value) {
            Kind::Envoy => {
                let mine: Vec<&FoundPolicy> = policies.iter().filter(|p| p.document == d).collect();
                if mine.is_empty() {
                    out.push(
                        Severity::Error,
                        "no-filter",
                        out.at(""),
                        "an Envoy config with no phi-guard wasm filter (root_id phi_guard) in any listener's http_filters".into(),
                    );
                }
                lint_envoy(&mut out, doc, &mine);
            }
            Kind::WasmPlugin => lint_wasm_plugin(&mut out, doc),
            Kind::MeshConfig => {
                anything = true;
                lint_mesh_config(&mut out, doc);
            }
            Kind::Policy | Kind::Other => {}
        }
    }
    if !anything
        && docs
            .iter()
            .all(|d| policy_file::kind_of(&d.value) != Kind::Envoy)
    {
        out.push(
            Severity::Error,
            "nothing-to-lint",
            out.at(""),
            "no phi-guard policy, Envoy config, WasmPlugin or mesh config found".into(),
        );
    }
    out.findings.sort_by(|a, b| {
        (a.location.line, a.severity, a.code).cmp(&(b.location.line, b.severity, b.code))
    });
    out.findings
}

/// Findings as collected for one file.
struct Out<'f> {
    file: &'f str,
    findings: Vec<Finding>,
}

impl Out<'_> {
    fn at(&self, field: &str) -> Location {
        Location {
            file: self.file.to_owned(),
            line: None,
            policy: None,
            field: field.to_owned(),
            rule: None,
            provider: None,
        }
    }

    fn push(
        &mut self,
        severity: Severity,
        code: &'static str,
        location: Location,
        message: String,
    ) {
        self.findings.push(Finding {
            severity,
            code,
            location,
            message,
        });
    }
}

// ---------------------------------------------------------------------------
// The policy

/// Collects one policy's findings, located in its file.
struct PolicyOut<'a, 'f> {
    out: &'a mut Out<'f>,
    found: &'a FoundPolicy,
    doc: &'a Value,
}

impl PolicyOut<'_, '_> {
    fn push(&mut self, severity: Severity, code: &'static str, field: &str, message: String) {
        let rule = rule_of(self.doc, field);
        let provider = provider_of(self.doc, field);
        let location = Location {
            file: self.out.file.to_owned(),
            line: self.found.lines.of(field),
            policy: (!self.found.at.is_empty()).then(|| self.found.at.clone()),
            field: field.to_owned(),
            rule,
            provider,
        };
        self.out.push(severity, code, location, message);
    }

    fn error(&mut self, code: &'static str, field: &str, message: String) {
        self.push(Severity::Error, code, field, message);
    }

    fn warn(&mut self, code: &'static str, field: &str, message: String) {
        self.push(Severity::Warning, code, field, message);
    }
}

/// The id of the rule a field is in (`rules[3].scopes` → rule 3's id).
fn rule_of(doc: &Value, field: &str) -> Option<String> {
    let i = item_index(field, "rules[")?;
    get(doc, &index("rules", i))?
        .get("id")?
        .as_str()
        .map(str::to_owned)
}

/// The name of the provider a field is in.
fn provider_of(doc: &Value, field: &str) -> Option<String> {
    let i = item_index(field, "providers[")?;
    get(doc, &index("providers", i))?
        .get("name")?
        .as_str()
        .map(str::to_owned)
}

fn item_index(field: &str, prefix: &str) -> Option<usize> {
    field.strip_prefix(prefix)?.split(']').next()?.parse().ok()
}

fn lint_policy(out: &mut Out<'_>, found: &FoundPolicy, opts: &Options) {
    let null = Value::Null;
    let doc = found.value.as_ref().unwrap_or(&null);
    let mut p = PolicyOut { out, found, doc };
    if let Some(problem) = &found.problem {
        p.error("invalid-policy", "", problem.clone());
        return;
    }
    let parsed = Policy::from_json(found.json.as_bytes());
    let before = p.out.findings.len();
    if doc.is_object() {
        check_raw(&mut p, doc, opts);
    }
    match &parsed {
        Ok(policy) => check_parsed(&mut p, policy, opts),
        Err(e) => {
            // A finding of its own already names this field: say it once.
            let said = p
                .out
                .findings
                .get(before..)
                .unwrap_or_default()
                .iter()
                .any(|f| f.severity == Severity::Error && f.location.field == e.field);
            if !said {
                let field = if e.field == "(document)" {
                    ""
                } else {
                    &e.field
                };
                let message = load_error_message(e);
                p.error("invalid-policy", field, message);
            }
        }
    }
}

/// The filter's own words for a policy it refuses.
fn load_error_message(e: &ConfigError) -> String {
    format!("the filter refuses this policy at load: {e}")
}

/// Every field of the raw document, by spelled path, with its value.
fn walk<'v>(field: String, v: &'v Value, out: &mut Vec<(String, &'v Value)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let f = key(&field, k);
                out.push((f.clone(), x));
                walk(f, x, out);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                let f = index(&field, i);
                out.push((f.clone(), x));
                walk(f, x, out);
            }
        }
        _ => {}
    }
}

fn as_array(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn strings(v: Option<&Value>) -> Vec<&str> {
    as_array(v).iter().filter_map(Value::as_str).collect()
}

/// Whether a `uri` is plain `http://` to a host other than loopback.
fn plain_http_off_host(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    let host = host.to_ascii_lowercase();
    let loopback = host == "localhost"
        || host.ends_with(".localhost")
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback());
    !loopback
}

/// Whether a rule's path is a FHIR bulk-data one: `$export` (kick-off),
/// or a literal segment naming bulk data (status and output URLs such as
/// `/fhir/bulkstatus/{job}`, `/bulk-files/**`), or a configured high-risk path.
fn is_bulk(template: &PathTemplate, high_risk: &[PathTemplate]) -> bool {
    template
        .literals()
        .any(|l| l.eq_ignore_ascii_case("$export") || l.to_ascii_lowercase().contains("bulk"))
        || high_risk.iter().any(|h| h.overlaps(template))
}

/// Templates for "anything under `prefix`".
fn prefix_templates(prefix: &str) -> Vec<PathTemplate> {
    let p = prefix.trim_end_matches('/');
    [p.to_owned(), format!("{p}/**")]
        .iter()
        .filter_map(|t| PathTemplate::parse(t).ok())
        .collect()
}

fn check_raw(p: &mut PolicyOut<'_, '_>, doc: &Value, opts: &Options) {
    let rules = as_array(doc.get("rules"));
    let has_revocation = doc.get("revocation").is_some_and(|r| !r.is_null());
    let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
    let mut used_scopes: BTreeSet<&str> = BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        let at = index("rules", i);
        let f = |name: &str| key(&at, name);
        let public = r.get("public").and_then(Value::as_bool).unwrap_or(false);
        if let Some(id) = r.get("id").and_then(Value::as_str) {
            if let Some(first) = ids.get(id) {
                p.error(
                    "duplicate-rule-id",
                    &f("id"),
                    format!("rule id {id:?} is already used by rules[{first}]; ids name rules in the audit record and stats"),
                );
            } else {
                ids.insert(id, i);
            }
        }
        let mut required: Vec<(String, &str)> = Vec::new();
        for list in ["scopes", "scopes_any"] {
            for (j, s) in as_array(r.get(list)).iter().enumerate() {
                if let Some(s) = s.as_str() {
                    required.push((index(&f(list), j), s));
                    used_scopes.insert(s);
                }
            }
        }
        for (field, s) in &required {
            if is_wildcard(s) {
                p.error(
                    "wildcard-scope",
                    field,
                    format!("{s:?} is a wildcard or `all` scope: name the one permission this rule needs"),
                );
            }
        }
        let max_age = r.get("max_token_age_seconds").is_some_and(|v| !v.is_null());
        if !public && required.is_empty() {
            p.error(
                "rule-without-scopes",
                &at,
                "a protected rule with no scopes (and so no roles, which grant scopes) lets any valid token through: require `scopes` or `scopes_any`".into(),
            );
        }
        let template = r
            .get("path")
            .and_then(Value::as_str)
            .and_then(|t| PathTemplate::parse(t).ok());
        if let Some(t) = &template {
            let step_up = r.get("step_up").is_some_and(|v| !v.is_null());
            if is_bulk(t, &opts.high_risk) && (public || !step_up) {
                p.error(
                    "export-without-step-up",
                    &at,
                    format!(
                        "{} is a bulk-export or high-risk path{}: it needs `step_up` (RFC 9470)",
                        t.as_str(),
                        if public {
                            " and must not be public"
                        } else {
                            ""
                        }
                    ),
                );
            }
            if public {
                if let Some(prefix) = opts
                    .phi_prefixes
                    .iter()
                    .find(|pre| prefix_templates(pre).iter().any(|x| x.overlaps(t)))
                {
                    p.warn(
                        "public-phi-rule",
                        &f("public"),
                        format!("public rule on {} serves paths under the PHI prefix {prefix} without a token", t.as_str()),
                    );
                }
            }
        }
        let methods = r.get("methods").filter(|m| !m.is_null());
        let writes = match methods {
            None => true,
            Some(m) => strings(Some(m))
                .iter()
                .any(|m| matches!(*m, "DELETE" | "PUT" | "PATCH")),
        };
        if !public && writes && !max_age {
            p.warn(
                "write-without-token-age",
                &at,
                format!(
                    "{} changes data and takes a token of any age (up to its lifetime): set `max_token_age_seconds`",
                    if methods.is_none() { "a rule for any method (DELETE, PUT, PATCH included)" } else { "a DELETE/PUT/PATCH rule" }
                ),
            );
        }
        if r.get("require_tls") == Some(&Value::Bool(false)) {
            p.warn(
                "tls-not-required",
                &f("require_tls"),
                "`require_tls: false` lets tokens and PHI cross this rule in plaintext".into(),
            );
        }
        if r.get("sensitive") == Some(&Value::Bool(true)) && !has_revocation {
            p.warn(
                "sensitive-without-revocation",
                &f("sensitive"),
                "`sensitive` fails closed on a stale revocation list, but there is no `revocation` block: every request to it is answered 503".into(),
            );
        }
        if let Some(c) = &opts.catalogue {
            for (field, s) in &required {
                match c.get(s) {
                    None => p.warn(
                        "undeclared-scope",
                        field,
                        format!("{s:?} is not in the scope catalogue: define it (name, description, sensitivity) or fix the typo"),
                    ),
                    Some(def) if def.sensitivity == Sensitivity::High && !max_age && !public => {
                        p.warn(
                            "sensitive-scope-without-token-age",
                            field,
                            format!("{s:?} is a high-sensitivity scope: set `max_token_age_seconds` on the rule"),
                        )
                    }
                    Some(_) => {}
                }
            }
        }
    }

    for (i, prov) in as_array(doc.get("providers")).iter().enumerate() {
        let at = index("providers", i);
        let audiences = prov.get("audiences");
        let good = audiences.and_then(Value::as_array).is_some_and(|a| {
            !a.is_empty() && a.iter().all(|x| x.as_str().is_some_and(|s| !s.is_empty()))
        });
        if !good {
            p.error(
                "provider-without-audiences",
                &key(&at, "audiences"),
                "a provider needs `audiences`: without one, a token minted for any other API would pass".into(),
            );
        }
        for block in ["jwks", "introspection"] {
            let field = key(&key(&at, block), "uri");
            if let Some(uri) = get(doc, &field).and_then(Value::as_str) {
                if plain_http_off_host(uri) {
                    p.error(
                        "plain-http-uri",
                        &field,
                        format!("{uri} is plain http to another host: use https (the cluster's TLS), or anyone on the path can change the {block} answer"),
                    );
                }
            }
        }
        let stale = key(&key(&at, "jwks"), "max_stale_seconds");
        check_stale(p, doc, &stale);
    }
    if let Some(uri) = doc.pointer("/revocation/uri").and_then(Value::as_str) {
        if plain_http_off_host(uri) {
            p.error(
                "plain-http-uri",
                "revocation.uri",
                format!("{uri} is plain http to another host: use https, or anyone on the path can unrevoke tokens"),
            );
        }
    }
    check_stale(p, doc, "revocation.max_stale_seconds");

    if doc.get("forward_token") == Some(&Value::Bool(true))
        && doc
            .get("forward_token_reason")
            .and_then(Value::as_str)
            .is_none_or(|r| r.trim().is_empty())
    {
        p.error(
            "forward-token-without-reason",
            "forward_token",
            "`forward_token: true` sends the bearer token upstream: say why in `forward_token_reason`".into(),
        );
    }
    if let Some(n) = doc
        .get("max_token_lifetime_seconds")
        .and_then(Value::as_u64)
    {
        if n > MAX_LIFETIME_SECONDS {
            p.warn(
                "token-lifetime",
                "max_token_lifetime_seconds",
                format!(
                    "tokens living {n} s (over 1 h) are accepted: a stolen one works that long"
                ),
            );
        }
    }
    if doc.pointer("/transport/require_tls") == Some(&Value::Bool(false)) {
        p.warn(
            "tls-not-required",
            "transport.require_tls",
            "`require_tls: false` lets tokens and PHI cross in plaintext".into(),
        );
    }
    if doc.get("deny_wildcard_scopes") == Some(&Value::Bool(false)) {
        p.warn(
            "wildcard-scopes-granted",
            "deny_wildcard_scopes",
            "granted scopes such as `*` or `read:all` are kept: a token holding one satisfies a rule that names that exact string".into(),
        );
    }
    let mut fields = Vec::new();
    walk(String::new(), doc, &mut fields);
    for (field, v) in fields {
        let name = field.rsplit('.').next().unwrap_or(&field);
        let on = match v {
            Value::Bool(b) => *b,
            Value::Null => false,
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if name.starts_with("insecure_") && on {
            p.warn(
                "insecure-option",
                &field,
                format!("`{name}` weakens a check on purpose: keep it out of production"),
            );
        }
    }

    // Scopes defined but required by no rule.
    for (role, scopes) in doc
        .get("role_scopes")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        for (j, s) in as_array(Some(scopes)).iter().enumerate() {
            if let Some(s) = s.as_str().filter(|s| !used_scopes.contains(s)) {
                p.warn(
                    "unused-scope",
                    &index(&key("role_scopes", role), j),
                    format!("role {role:?} grants {s:?}, which no rule requires"),
                );
            }
        }
    }
    if let Some(c) = &opts.catalogue {
        for s in &c.scopes {
            if !used_scopes.contains(s.name.as_str()) {
                p.warn(
                    "unused-scope",
                    "rules",
                    format!("catalogue scope {:?} is required by no rule: retire it or protect something with it", s.name),
                );
            }
        }
    }
}

fn check_stale(p: &mut PolicyOut<'_, '_>, doc: &Value, field: &str) {
    if let Some(n) = get(doc, field).and_then(Value::as_u64) {
        if n > MAX_STALE_SECONDS {
            p.warn(
                "max-stale",
                field,
                format!("{n} s (over 24 h): documents this old keep serving when fetches fail, so a removed key or a revocation goes unnoticed that long"),
            );
        }
    }
}

/// Checks that need the policy as the filter serves it: which rule a
/// bulk-export request under each PHI prefix meets first.
fn check_parsed(p: &mut PolicyOut<'_, '_>, policy: &Policy, opts: &Options) {
    let already: BTreeSet<String> = p
        .out
        .findings
        .iter()
        .filter(|f| f.code == "export-without-step-up")
        .map(|f| f.location.field.clone())
        .collect();
    let mut reported = BTreeSet::new();
    for prefix in &opts.phi_prefixes {
        let base = prefix.trim_end_matches('/');
        for sample in ["$export", "Patient/$export", "Group/example/$export"] {
            let raw = format!("{base}/{sample}");
            let Ok(path) = SafePath::parse(&raw) else {
                continue;
            };
            let first = policy
                .rules
                .iter()
                .enumerate()
                .find(|(_, r)| r.match_request("GET", &path).is_match());
            let Some((i, rule)) = first else {
                continue;
            };
            let field = index("rules", i);
            if (rule.public || rule.step_up.is_none())
                && !already.contains(&field)
                && reported.insert(field.clone())
            {
                p.error(
                    "export-without-step-up",
                    &field,
                    format!("GET {raw} (bulk export) is decided by this rule, which has no step_up: put a step-up rule for it first"),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Envoy

/// HTTP filters that act on identity (headers, metadata) and so must come
/// after phi-guard, which sets it.
const TRUSTS_IDENTITY: [&str; 8] = [
    "envoy.extensions.filters.http.rbac.v3.RBAC",
    "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
    "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
    "envoy.extensions.filters.http.lua.v3.Lua",
    "envoy.extensions.filters.http.header_to_metadata.v3.Config",
    "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
    "envoy.extensions.filters.http.composite.v3.Composite",
    "envoy.extensions.filters.http.set_metadata.v3.Config",
];

fn at_doc(out: &Out<'_>, doc: &Document, field: &str) -> Location {
    Location {
        line: doc.lines.of(field),
        ..out.at(field)
    }
}

fn lint_envoy(out: &mut Out<'_>, doc: &Document, policies: &[&FoundPolicy]) {
    let mut seen_hcm = BTreeSet::new();
    for found in policies {
        let Setting::Envoy {
            listener,
            hcm,
            filter,
        } = &found.setting
        else {
            continue;
        };
        // The wasm plugin's own settings.
        let config_field = key(&key(filter, "typed_config"), "config");
        let fp_field = key(&config_field, "failure_policy");
        let fp = get(&doc.value, &fp_field).and_then(Value::as_str);
        if !matches!(fp, Some("FAIL_CLOSED" | "FAIL_RELOAD")) {
            let field = if fp.is_some() {
                &fp_field
            } else {
                &config_field
            };
            out.push(
                Severity::Error,
                "failure-policy",
                at_doc(out, doc, field),
                format!(
                    "failure_policy is {}: a VM that fails to load or crashes must refuse traffic (FAIL_CLOSED, or FAIL_RELOAD)",
                    fp.unwrap_or("not set")
                ),
            );
        }
        let fail_open = key(&config_field, "fail_open");
        if get(&doc.value, &fail_open) == Some(&Value::Bool(true)) {
            out.push(
                Severity::Error,
                "failure-policy",
                at_doc(out, doc, &fail_open),
                "fail_open: true passes traffic through a VM that failed".into(),
            );
        }
        // Filter order.
        let filters_field = key(hcm, "http_filters");
        let filters = as_array(get(&doc.value, &filters_field));
        let me = item_index(filter.strip_prefix(&filters_field).unwrap_or(""), "[").unwrap_or(0);
        for (i, f) in filters.iter().enumerate().take(me) {
            let t = type_of(f.get("typed_config").unwrap_or(&Value::Null));
            let name = f.get("name").and_then(Value::as_str).unwrap_or(t);
            if t == ROUTER_TYPE || TRUSTS_IDENTITY.contains(&t) {
                out.push(
                    Severity::Error,
                    "filter-order",
                    at_doc(out, doc, filter),
                    format!(
                        "phi-guard comes after {name} ({}): it must run before the router and before any filter that trusts identity",
                        index(&filters_field, i)
                    ),
                );
            }
        }
        if !seen_hcm.insert(hcm.clone()) {
            continue;
        }
        // The connection manager around it.
        let h = get(&doc.value, hcm).unwrap_or(&Value::Null);
        for (name, want, why) in [
            (
                "normalize_path",
                Value::Bool(true),
                "resolves `.`/`..` before rules are matched",
            ),
            (
                "merge_slashes",
                Value::Bool(true),
                "merges `//` before rules are matched",
            ),
            (
                "path_with_escaped_slashes_action",
                Value::String("REJECT_REQUEST".into()),
                "refuses %2F and %5C before the filter",
            ),
        ] {
            if h.get(name) != Some(&want) {
                let field = key(hcm, name);
                out.push(
                    Severity::Error,
                    "no-path-normalisation",
                    at_doc(out, doc, if h.get(name).is_some() { &field } else { hcm }),
                    format!("set `{name}: {want}` on the connection manager: it {why}, so the filter and the upstream read the same path"),
                );
            }
        }
        let mut logs: Vec<(String, &Value)> = Vec::new();
        for owner in [hcm.as_str(), listener.as_str()] {
            let f = key(owner, "access_log");
            for (i, log) in as_array(get(&doc.value, &f)).iter().enumerate() {
                logs.push((index(&f, i), log));
            }
        }
        let mut audit = false;
        for (field, log) in &logs {
            audit |= mentions_audit(log);
            for (f, problem) in leaks(field, log) {
                out.push(
                    Severity::Error,
                    "access-log-leaks",
                    at_doc(out, doc, &f),
                    problem,
                );
            }
        }
        if !audit {
            out.push(
                Severity::Error,
                "no-audit-log",
                at_doc(out, doc, hcm),
                "no access log prints the audit record: add %FILTER_STATE(wasm.phi_guard.audit:PLAIN)% to one".into(),
            );
        }
    }
}

fn mentions_audit(v: &Value) -> bool {
    let mut fields = Vec::new();
    walk(String::new(), v, &mut fields);
    fields
        .iter()
        .any(|(_, x)| x.as_str().is_some_and(|s| s.contains("phi_guard.audit")))
}

/// Where an access-log entry prints the query string or the token.
fn leaks(field: &str, log: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    walk(field.to_owned(), log, &mut fields);
    for (f, v) in &fields {
        if let Some(problem) = v.as_str().and_then(leaky_command) {
            out.push((f.clone(), problem));
        }
    }
    // Envoy's default format prints %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%.
    let tc = log.get("typed_config").unwrap_or(&Value::Null);
    let logs_text = matches!(
        type_of(tc),
        "envoy.extensions.access_loggers.file.v3.FileAccessLog"
            | "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
            | "envoy.extensions.access_loggers.stream.v3.StderrAccessLog"
    );
    let has_format = ["log_format", "format", "json_format", "typed_json_format"]
        .iter()
        .any(|k| tc.get(*k).is_some());
    if logs_text && !has_format {
        out.push((
            field.to_owned(),
            "no log_format: Envoy's default format prints %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%, query string included".into(),
        ));
    }
    out
}

/// Why a format string leaks, if it does: the path with its query (which
/// may carry PHI or a token), or the `Authorization` header.
pub fn leaky_command(format: &str) -> Option<String> {
    let mut rest = format;
    while let Some(start) = rest.find('%') {
        let after = rest.get(start + 1..).unwrap_or("");
        let Some(end) = after.find('%') else {
            break;
        };
        let command = after.get(..end).unwrap_or("");
        rest = after.get(end + 1..).unwrap_or("");
        let (op, args) = match command.split_once('(') {
            Some((op, a)) => (op, a.split(')').next().unwrap_or("")),
            None => (command, ""),
        };
        let headers: Vec<String> = args
            .split('?')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        let names_token = headers
            .iter()
            .any(|h| h == "authorization" || h == "proxy-authorization");
        match op {
            "REQ" | "REQ_WITHOUT_QUERY" | "TRAILER" if names_token => {
                return Some(format!("%{command}% prints the bearer token"))
            }
            "REQ" if headers.iter().any(|h| h == ":path") => {
                return Some(format!(
                    "%{command}% prints the query string, which may carry PHI or a token: use %REQ_WITHOUT_QUERY(:PATH)%"
                ))
            }
            "PATH" if !args.contains("NQ") => {
                return Some(format!(
                    "%{command}% prints the query string: use %PATH(NQ)% or %REQ_WITHOUT_QUERY(:PATH)%"
                ))
            }
            _ => {}
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Istio

fn lint_wasm_plugin(out: &mut Out<'_>, doc: &Document) {
    let v = &doc.value;
    if let Some(fs) = v.pointer("/spec/failStrategy").and_then(Value::as_str) {
        if !matches!(fs, "FAIL_CLOSE" | "FAIL_RELOAD") {
            out.push(
                Severity::Error,
                "failure-policy",
                at_doc(out, doc, "spec.failStrategy"),
                format!("failStrategy {fs}: a module that cannot be fetched or crashes must refuse traffic (FAIL_CLOSE)"),
            );
        }
    }
    let phase = v.pointer("/spec/phase").and_then(Value::as_str);
    if phase != Some("AUTHN") {
        out.push(
            Severity::Error,
            "filter-order",
            at_doc(out, doc, if phase.is_some() { "spec.phase" } else { "spec" }),
            format!(
                "phase {}: phi-guard must run in AUTHN, ahead of Istio's own authentication and authorization filters",
                phase.unwrap_or("not set (just before the router)")
            ),
        );
    }
}

fn lint_mesh_config(out: &mut Out<'_>, doc: &Document) {
    let (base, mesh) = match doc.value.pointer("/spec/meshConfig") {
        Some(m) => ("spec.meshConfig", m),
        None => (
            "meshConfig",
            doc.value.get("meshConfig").unwrap_or(&Value::Null),
        ),
    };
    let providers_field = key(base, "extensionProviders");
    let mut audit = false;
    for (i, provider) in as_array(mesh.get("extensionProviders")).iter().enumerate() {
        let field = index(&providers_field, i);
        audit |= mentions_audit(provider);
        let mut fields = Vec::new();
        walk(field.clone(), provider, &mut fields);
        for (f, v) in &fields {
            if let Some(problem) = v.as_str().and_then(leaky_command) {
                out.push(
                    Severity::Error,
                    "access-log-leaks",
                    at_doc(out, doc, f),
                    problem,
                );
            }
        }
    }
    if !audit {
        out.push(
            Severity::Error,
            "no-audit-log",
            at_doc(out, doc, &providers_field),
            "no access-log provider prints the audit record: add %FILTER_STATE(wasm.phi_guard.audit:PLAIN)% to one".into(),
        );
    }
}

/// The findings as `--format json` prints them: an array, one object per finding.
pub fn to_json(findings: &[Finding]) -> String {
    serde_json::to_string_pretty(findings).unwrap_or_else(|_| "[]".into())
}

/// Whether findings fail the run: any error, or any warning with `deny_warnings`.
pub fn fails(findings: &[Finding], deny_warnings: bool) -> bool {
    findings
        .iter()
        .any(|f| f.severity == Severity::Error || deny_warnings)
}

#[cfg(test)]
mod tests;
