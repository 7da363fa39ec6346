//! A request under the FHIR base path read as a FHIR REST interaction (FHIR
//! R4, http.html): which interaction, on which resource type and instance,
//! with which search parameters. What is not one of these is unrecognised,
//! and the FHIR model refuses it.
//!
//! Only the request line is read, and for `POST [type]/_search` (and
//! `POST [base]/_search`) a form body of at most [`MAX_SEARCH_BODY`] bytes,
//! whose parameters count as query parameters.

use crate::rules::SafePath;

/// The largest `_search` form body read; a larger one is refused unread (413).
pub const MAX_SEARCH_BODY: usize = 16 * 1024;
/// More parameters than this in a query or form body: refused (400).
pub const MAX_PARAMS: usize = 256;

/// A FHIR REST interaction. Codes follow FHIR's restful-interaction codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// `GET [type]/[id]`
    Read,
    /// `GET [type]/[id]/_history/[vid]`
    Vread,
    /// `PUT [type]/[id]`
    Update,
    /// `PUT [type]?[search]`
    UpdateConditional,
    /// `PATCH [type]/[id]`
    Patch,
    /// `PATCH [type]?[search]`
    PatchConditional,
    /// `DELETE [type]/[id]`
    Delete,
    /// `DELETE [type]?[search]`
    DeleteConditional,
    /// `POST [type]`
    Create,
    /// `GET [type]?…`, `POST [type]/_search`
    SearchType,
    /// `GET [base]?…`, `POST [base]/_search`
    SearchSystem,
    /// `GET [compartment]/[id]/[type]?…`
    SearchCompartment,
    /// `GET [type]/[id]/_history`
    HistoryInstance,
    /// `GET [type]/_history`
    HistoryType,
    /// `GET [base]/_history`
    HistorySystem,
    /// `GET [base]/metadata`: public.
    Capabilities,
    /// `GET [base]/.well-known/smart-configuration`: public.
    SmartConfiguration,
    /// `[base]/$op`, `[type]/$op`, `[type]/[id]/$op`
    Operation,
}

impl Interaction {
    /// The code in the audit record's `fhir_interaction`.
    pub fn code(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::Update => "update",
            Interaction::UpdateConditional => "update-conditional",
            Interaction::Patch => "patch",
            Interaction::PatchConditional => "patch-conditional",
            Interaction::Delete => "delete",
            Interaction::DeleteConditional => "delete-conditional",
            Interaction::Create => "create",
            Interaction::SearchType => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::SearchCompartment => "search-compartment",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::Capabilities => "capabilities",
            Interaction::SmartConfiguration => "smart-configuration",
            Interaction::Operation => "operation",
        }
    }

    /// Anyone may ask for it, without a token.
    pub fn is_public(self) -> bool {
        matches!(
            self,
            Interaction::Capabilities | Interaction::SmartConfiguration
        )
    }

    /// A search whose parameters select what comes back, so that a
    /// query-constrained scope can hold them to its constraints.
    pub fn is_search(self) -> bool {
        matches!(
            self,
            Interaction::SearchType | Interaction::SearchCompartment
        )
    }
}

/// A request under the base path, as FHIR reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirRequest {
    pub interaction: Interaction,
    /// The resource type; `None` at system level.
    pub kind: Option<String>,
    /// The instance, for instance-level interactions.
    pub id: Option<String>,
    /// A compartment search's compartment: (its type, its id).
    pub compartment: Option<(String, String)>,
    /// An operation's name, `$` included.
    pub operation: Option<String>,
    /// The search parameters, decoded once: the query's, then the body's.
    pub params: Vec<(String, String)>,
    /// `POST …/_search`: more parameters lie in the form body.
    pub form_body: bool,
    /// The form body is not read yet: `params` hold the query's only.
    pub form_pending: bool,
    /// An operation invoked by `POST`: its parameters may lie in a
    /// `Parameters` body, which is not read, as well as in the query.
    pub unread_params: bool,
}

impl FhirRequest {
    fn new(interaction: Interaction) -> FhirRequest {
        FhirRequest {
            interaction,
            kind: None,
            id: None,
            compartment: None,
            operation: None,
            params: Vec::new(),
            form_body: false,
            form_pending: false,
            unread_params: false,
        }
    }

    fn on(mut self, kind: &str) -> FhirRequest {
        self.kind = Some(kind.to_string());
        self
    }

    fn at(mut self, id: &str) -> FhirRequest {
        self.id = Some(id.to_string());
        self
    }

    fn operation(mut self, name: &str, method: &str) -> FhirRequest {
        self.operation = Some(name.to_string());
        self.unread_params = method == "POST";
        self
    }

    /// The values of every parameter named exactly `name`.
    pub fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.params
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Where a request stands with respect to the FHIR base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Not under the base path.
    Outside,
    /// Under it, but no interaction this model knows (refused).
    Unrecognised,
    /// A FHIR interaction; `params` hold the query's parameters only.
    Request(FhirRequest),
}

/// Why parameters could not be read one way only (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadParams {
    /// A `;` anywhere: some servers split parameters on it.
    Semicolon,
    /// A `%` not followed by two hex digits, or bytes that are not UTF-8.
    BadEncoding,
    /// A parameter name with characters no FHIR parameter has.
    BadName,
    TooMany,
    /// A form body whose content type is not `application/x-www-form-urlencoded` (UTF-8).
    ContentType,
}

/// Reads `method` on `path` under the FHIR base `base` (`params` stay
/// empty: the query is read by [`parse_params`]).
pub fn classify(base: &[String], method: &str, path: &SafePath) -> Classified {
    let mut segments = path.segments();
    for b in base {
        if segments.next() != Some(b.as_str()) {
            return Classified::Outside;
        }
    }
    let mut rest: Vec<&str> = segments.collect();
    if base.is_empty() && rest == [""] {
        rest.clear();
    }
    match interaction(method, &rest) {
        Some(r) => Classified::Request(r),
        None => Classified::Unrecognised,
    }
}

/// The interaction `method` on the segments after the base path.
fn interaction(method: &str, rest: &[&str]) -> Option<FhirRequest> {
    use Interaction::*;
    let read = method == "GET" || method == "HEAD";
    let r = FhirRequest::new;
    let req = match (method, rest) {
        (_, []) if read => r(SearchSystem),
        (_, ["metadata"]) if read => r(Capabilities),
        (_, [".well-known", "smart-configuration"]) if read => r(SmartConfiguration),
        (_, ["_history"]) if read => r(HistorySystem),
        ("POST", ["_search"]) => FhirRequest {
            form_body: true,
            ..r(SearchSystem)
        },
        ("GET" | "HEAD" | "POST", [op]) if is_operation(op) => r(Operation).operation(op, method),
        (_, [kind, ..]) if !is_type(kind) => return None,
        (_, [kind]) if read => r(SearchType).on(kind),
        ("POST", [kind]) => r(Create).on(kind),
        ("PUT", [kind]) => r(UpdateConditional).on(kind),
        ("PATCH", [kind]) => r(PatchConditional).on(kind),
        ("DELETE", [kind]) => r(DeleteConditional).on(kind),
        ("POST", [kind, "_search"]) => FhirRequest {
            form_body: true,
            ..r(SearchType).on(kind)
        },
        (_, [kind, "_history"]) if read => r(HistoryType).on(kind),
        ("GET" | "HEAD" | "POST", [kind, op]) if is_operation(op) => {
            r(Operation).on(kind).operation(op, method)
        }
        (_, [_, id, ..]) if !is_id(id) => return None,
        (_, [kind, id]) if read => r(Read).on(kind).at(id),
        ("PUT", [kind, id]) => r(Update).on(kind).at(id),
        ("PATCH", [kind, id]) => r(Patch).on(kind).at(id),
        ("DELETE", [kind, id]) => r(Delete).on(kind).at(id),
        (_, [kind, id, "_history"]) if read => r(HistoryInstance).on(kind).at(id),
        (_, [kind, id, "_history", vid]) if read && is_id(vid) => r(Vread).on(kind).at(id),
        ("GET" | "HEAD" | "POST", [kind, id, op]) if is_operation(op) => {
            r(Operation).on(kind).at(id).operation(op, method)
        }
        (_, [compartment, id, kind]) if read && is_compartment(compartment) && is_type(kind) => {
            FhirRequest {
                compartment: Some((compartment.to_string(), id.to_string())),
                ..r(SearchCompartment).on(kind)
            }
        }
        _ => return None,
    };
    Some(req)
}

/// The compartments FHIR R4 defines (compartmentdefinition.html).
fn is_compartment(s: &str) -> bool {
    matches!(
        s,
        "Patient" | "Encounter" | "RelatedPerson" | "Practitioner" | "Device"
    )
}

/// A resource type name: `[A-Z][A-Za-z]*`, at most 64 bytes.
pub fn is_type(s: &str) -> bool {
    let mut bytes = s.bytes();
    s.len() <= 64
        && bytes.next().is_some_and(|b| b.is_ascii_uppercase())
        && bytes.all(|b| b.is_ascii_alphabetic())
}

/// A FHIR id: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// An operation's name: `$` and a name of letters, digits, `-`, `_`.
fn is_operation(s: &str) -> bool {
    s.strip_prefix('$').is_some_and(|name| {
        let mut bytes = name.bytes();
        name.len() <= 64
            && bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The query string of Envoy's `:path`, without a fragment.
pub fn query(raw_path: &str) -> &str {
    raw_path
        .split_once('?')
        .map_or("", |(_, q)| q.split('#').next().unwrap_or(q))
}

/// Adds the parameters of `query` (`application/x-www-form-urlencoded`
/// syntax, as FHIR search uses it) to `out`.
///
/// Names and values are percent-decoded once, `+` read as a space. A `;`
/// anywhere is refused rather than guessed at (some servers split on it),
/// as is a name with characters no FHIR parameter has (letters, digits,
/// `_`, `-`, `.`, `:`): a decoded name must mean to the upstream what it
/// means here.
pub fn parse_params(query: &str, out: &mut Vec<(String, String)>) -> Result<(), BadParams> {
    if query.contains(';') {
        return Err(BadParams::Semicolon);
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if out.len() >= MAX_PARAMS {
            return Err(BadParams::TooMany);
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name, true)?;
        if !is_param_name(&name) {
            return Err(BadParams::BadName);
        }
        out.push((name, decode(value, true)?));
    }
    Ok(())
}

/// Adds the parameters of a `_search` form body to `out`: its content type
/// must be `application/x-www-form-urlencoded` (with at most a UTF-8
/// `charset`); an empty body has none and needs none.
pub fn parse_form(
    content_type: Option<&str>,
    body: &[u8],
    out: &mut Vec<(String, String)>,
) -> Result<(), BadParams> {
    if body.is_empty() {
        return Ok(());
    }
    let Some(content_type) = content_type else {
        return Err(BadParams::ContentType);
    };
    let mut parts = content_type.split(';').map(str::trim);
    let essence = parts.next().unwrap_or_default();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(BadParams::ContentType);
    }
    for part in parts {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let value = value.trim_matches('"');
        if !name.trim().eq_ignore_ascii_case("charset") || !value.eq_ignore_ascii_case("utf-8") {
            return Err(BadParams::ContentType);
        }
    }
    let text = std::str::from_utf8(body).map_err(|_| BadParams::BadEncoding)?;
    parse_params(text.trim_end_matches(['\r', '\n']), out)
}

/// A search parameter's name, modifiers and chains included: letters,
/// digits, `_`, `-`, `.`, `:`.
pub fn is_param_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
}

/// Percent-decodes once (`+` as a space with `plus_is_space`, as forms
/// write it); malformed escapes and bytes that are not UTF-8 are refused.
pub fn decode(s: &str, plus_is_space: bool) -> Result<String, BadParams> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let hi = bytes.next().and_then(hex);
                let lo = bytes.next().and_then(hex);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(BadParams::BadEncoding),
                }
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| BadParams::BadEncoding)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Interaction::*;

    fn base() -> Vec<String> {
        vec!["fhir".to_string()]
    }

    fn classified(method: &str, path: &str) -> Option<FhirRequest> {
        match classify(&base(), method, &SafePath::parse(path).unwrap()) {
            Classified::Request(r) => Some(r),
            Classified::Unrecognised => None,
            Classified::Outside => panic!("{path} is under the base"),
        }
    }

    /// (method, path, interaction, type, id, operation)
    type Row<'a> = (
        &'a str,
        &'a str,
        Interaction,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
    );

    #[test]
    fn every_interaction_is_recognised() {
        let table: &[Row] = &[
            (
                "GET",
                "/fhir/Patient/123",
                Read,
                Some("Patient"),
                Some("123"),
                None,
            ),
            (
                "HEAD",
                "/fhir/Patient/123",
                Read,
                Some("Patient"),
                Some("123"),
                None,
            ),
            (
                "GET",
                "/fhir/Observation/a.b-9/_history/2",
                Vread,
                Some("Observation"),
                Some("a.b-9"),
                None,
            ),
            (
                "PUT",
                "/fhir/Observation/1",
                Update,
                Some("Observation"),
                Some("1"),
                None,
            ),
            (
                "PUT",
                "/fhir/Observation",
                UpdateConditional,
                Some("Observation"),
                None,
                None,
            ),
            (
                "PATCH",
                "/fhir/Observation/1",
                Patch,
                Some("Observation"),
                Some("1"),
                None,
            ),
            (
                "PATCH",
                "/fhir/Observation",
                PatchConditional,
                Some("Observation"),
                None,
                None,
            ),
            (
                "DELETE",
                "/fhir/Observation/1",
                Delete,
                Some("Observation"),
                Some("1"),
                None,
            ),
            (
                "DELETE",
                "/fhir/Observation",
                DeleteConditional,
                Some("Observation"),
                None,
                None,
            ),
            (
                "POST",
                "/fhir/Observation",
                Create,
                Some("Observation"),
                None,
                None,
            ),
            (
                "GET",
                "/fhir/Observation",
                SearchType,
                Some("Observation"),
                None,
                None,
            ),
            (
                "POST",
                "/fhir/Observation/_search",
                SearchType,
                Some("Observation"),
                None,
                None,
            ),
            ("GET", "/fhir", SearchSystem, None, None, None),
            ("POST", "/fhir/_search", SearchSystem, None, None, None),
            (
                "GET",
                "/fhir/Patient/7/Observation",
                SearchCompartment,
                Some("Observation"),
                None,
                None,
            ),
            (
                "GET",
                "/fhir/Observation/1/_history",
                HistoryInstance,
                Some("Observation"),
                Some("1"),
                None,
            ),
            (
                "GET",
                "/fhir/Observation/_history",
                HistoryType,
                Some("Observation"),
                None,
                None,
            ),
            ("GET", "/fhir/_history", HistorySystem, None, None, None),
            ("GET", "/fhir/metadata", Capabilities, None, None, None),
            ("HEAD", "/fhir/metadata", Capabilities, None, None, None),
            (
                "GET",
                "/fhir/.well-known/smart-configuration",
                SmartConfiguration,
                None,
                None,
                None,
            ),
            (
                "GET",
                "/fhir/$export",
                Operation,
                None,
                None,
                Some("$export"),
            ),
            (
                "POST",
                "/fhir/%24export",
                Operation,
                None,
                None,
                Some("$export"),
            ),
            (
                "GET",
                "/fhir/Patient/$export",
                Operation,
                Some("Patient"),
                None,
                Some("$export"),
            ),
            (
                "GET",
                "/fhir/Group/g1/$export",
                Operation,
                Some("Group"),
                Some("g1"),
                Some("$export"),
            ),
            (
                "POST",
                "/fhir/Observation/$validate",
                Operation,
                Some("Observation"),
                None,
                Some("$validate"),
            ),
            (
                "GET",
                "/fhir/Patient/1/$everything",
                Operation,
                Some("Patient"),
                Some("1"),
                Some("$everything"),
            ),
        ];
        for (method, path, interaction, kind, id, op) in table {
            let r = classified(method, path).unwrap_or_else(|| panic!("{method} {path}"));
            assert_eq!(
                (
                    r.interaction,
                    r.kind.as_deref(),
                    r.id.as_deref(),
                    r.operation.as_deref()
                ),
                (*interaction, *kind, *id, *op),
                "{method} {path}"
            );
            assert_eq!(r.form_body, path.ends_with("_search"), "{path}");
        }
        let c = classified("GET", "/fhir/Patient/7/Observation").unwrap();
        assert_eq!(c.compartment, Some(("Patient".into(), "7".into())));
        let c = classified("GET", "/fhir/Encounter/e/Observation").unwrap();
        assert_eq!(c.compartment, Some(("Encounter".into(), "e".into())));
    }

    #[test]
    fn anything_else_under_the_base_is_unrecognised() {
        for (method, path) in [
            // Batch and transaction bundles: their requests lie in the body.
            ("POST", "/fhir"),
            ("PUT", "/fhir"),
            ("OPTIONS", "/fhir/metadata"),
            ("POST", "/fhir/metadata"),
            ("DELETE", "/fhir/.well-known/smart-configuration"),
            ("GET", "/fhir/"),
            ("GET", "/fhir/patient/1"),
            ("GET", "/fhir/Patient1/1"),
            ("GET", "/fhir/Patient/1/"),
            ("GET", "/fhir/Patient/has%20space"),
            ("GET", "/fhir/Patient/has_underscore"),
            ("GET", &format!("/fhir/Patient/{}", "a".repeat(65))),
            ("POST", "/fhir/Patient/1"),
            ("GET", "/fhir/Observation/_search"),
            ("PUT", "/fhir/Observation/_history"),
            ("GET", "/fhir/Observation/1/_history/"),
            ("GET", "/fhir/Observation/1/_history/2/x"),
            ("GET", "/fhir/Observation/1/_history/2%203"),
            ("PUT", "/fhir/Observation/$validate"),
            ("DELETE", "/fhir/Patient/1/$everything"),
            ("GET", "/fhir/$"),
            ("GET", "/fhir/$1x"),
            ("GET", "/fhir/Observation/1/x/y"),
            ("GET", "/fhir/Group/1/Observation"),
            ("POST", "/fhir/Patient/1/Observation"),
            ("GET", "/fhir/Patient/1/observation"),
            ("GET", "/fhir/a/b/c/d/e"),
        ] {
            assert_eq!(classified(method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn only_paths_under_the_base_are_fhir() {
        let safe = |p: &str| SafePath::parse(p).unwrap();
        for path in ["/fhirx/Patient/1", "/other", "/", "/Fhir/Patient/1"] {
            assert_eq!(
                classify(&base(), "GET", &safe(path)),
                Classified::Outside,
                "{path}"
            );
        }
        let deep = vec!["api".to_string(), "r4".to_string()];
        assert!(matches!(
            classify(&deep, "GET", &safe("/api/r4/Patient/1")),
            Classified::Request(_)
        ));
        assert_eq!(
            classify(&deep, "GET", &safe("/api/Patient/1")),
            Classified::Outside
        );
        // A server at the root: every path is under it.
        for (path, want) in [
            ("/", SearchSystem),
            ("/Patient/1", Read),
            ("/metadata", Capabilities),
        ] {
            match classify(&[], "GET", &safe(path)) {
                Classified::Request(r) => assert_eq!(r.interaction, want, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn params_decode_once_and_refuse_what_reads_two_ways() {
        let parse = |q: &str| {
            let mut out = Vec::new();
            parse_params(q, &mut out).map(|()| out)
        };
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(parse(""), Ok(vec![]));
        assert_eq!(
            parse("patient=123&&code=a+b&category=http%3A%2F%2Fx%7Clab&_count"),
            Ok(pairs(&[
                ("patient", "123"),
                ("code", "a b"),
                ("category", "http://x|lab"),
                ("_count", "")
            ]))
        );
        assert_eq!(
            parse("subject:Patient=1&_has:Observation:patient:code=x&subject.name=a%2Bb"),
            Ok(pairs(&[
                ("subject:Patient", "1"),
                ("_has:Observation:patient:code", "x"),
                ("subject.name", "a+b")
            ]))
        );
        // Decoded once: %2541 is the text %41.
        assert_eq!(parse("name=%2541"), Ok(pairs(&[("name", "%41")])));
        assert_eq!(parse("%70atient=1"), Ok(pairs(&[("patient", "1")])));
        assert_eq!(parse("patient=1;_id=2"), Err(BadParams::Semicolon));
        assert_eq!(parse("patient=%3B"), Ok(pairs(&[("patient", ";")])));
        assert_eq!(parse("patient=%zz"), Err(BadParams::BadEncoding));
        assert_eq!(parse("patient=%e9"), Err(BadParams::BadEncoding));
        assert_eq!(parse("patient=1%"), Err(BadParams::BadEncoding));
        for bad in ["=1", "pat%20ient=1", "pat*ient=1", "a%26b=1", "%3D=1"] {
            assert_eq!(parse(bad), Err(BadParams::BadName), "{bad}");
        }
        let many = vec!["a=1"; MAX_PARAMS].join("&");
        assert!(parse(&many).is_ok());
        assert_eq!(parse(&format!("{many}&b=2")), Err(BadParams::TooMany));
    }

    #[test]
    fn form_bodies_need_their_content_type() {
        let form = |ct: Option<&str>, body: &[u8]| {
            let mut out = vec![("q".to_string(), "1".to_string())];
            parse_form(ct, body, &mut out).map(|()| out.len())
        };
        let ct = Some("application/x-www-form-urlencoded");
        assert_eq!(form(ct, b"patient=1&code=2"), Ok(3));
        assert_eq!(form(ct, b"patient=1\r\n"), Ok(2));
        assert_eq!(
            form(
                Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"),
                b"a=1"
            ),
            Ok(2)
        );
        assert_eq!(
            form(
                Some("application/x-www-form-urlencoded;charset=\"utf-8\""),
                b"a=1"
            ),
            Ok(2)
        );
        // No body: nothing to read, whatever the type.
        assert_eq!(form(None, b""), Ok(1));
        assert_eq!(form(Some("application/json"), b""), Ok(1));
        for bad in [
            None,
            Some("application/json"),
            Some("text/plain"),
            Some("multipart/form-data; boundary=x"),
            Some("application/x-www-form-urlencoded; charset=latin1"),
            Some("application/x-www-form-urlencodedx"),
        ] {
            assert_eq!(form(bad, b"a=1"), Err(BadParams::ContentType), "{bad:?}");
        }
        assert_eq!(form(ct, b"a=\xff"), Err(BadParams::BadEncoding));
        assert_eq!(form(ct, b"a=1;b=2"), Err(BadParams::Semicolon));
    }

    #[test]
    fn ids_types_and_queries() {
        assert!(is_type("Observation") && is_type("A"));
        assert!(!is_type("observation") && !is_type("Obs1") && !is_type("") && !is_type("$x"));
        assert!(!is_type(&format!("A{}", "a".repeat(64))));
        assert!(is_id("a-B.9") && is_id(&"1".repeat(64)));
        assert!(
            !is_id("")
                && !is_id("a b")
                && !is_id("a_b")
                && !is_id("Patient/1")
                && !is_id(&"1".repeat(65))
        );
        assert_eq!(query("/fhir/Patient?x=1&y=2"), "x=1&y=2");
        assert_eq!(query("/fhir/Patient?x=1#frag"), "x=1");
        assert_eq!(query("/fhir/Patient?a=?b"), "a=?b");
        assert_eq!(query("/fhir/Patient"), "");
    }
}
