//! Whether a token's SMART scopes allow a FHIR request, what the request
//! provably stays within (a patient's compartment), and which scopes to
//! name when they do not.
//!
//! A request needs one or more (type, letters) grants: the interaction's
//! own, one per `_type` of a system search or export, one per type an
//! `_include` or `_revinclude` brings back. Each need is met by the scopes
//! of one context; `patient/` scopes meet it only for the launch patient's
//! compartment (with `patient_compartment`), and never for bulk export, for
//! resources included from elsewhere, or for an operation phi-guard does
//! not know.

use super::r4;
use super::request::{is_id, is_type, FhirRequest, Interaction};
use super::smart::{Context, Letters, SmartScope};
use crate::config::Fhir;

/// One grant a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Need {
    /// The type; `None`: every type (`*`).
    kind: Option<String>,
    letters: Letters,
    /// A search the request's parameters select: query-constrained scopes apply.
    searched: bool,
    /// A `patient/` scope may meet it (the compartment permitting).
    patient: bool,
    /// Only a `system/` scope may meet it (bulk export).
    system_only: bool,
}

impl Need {
    fn on(kind: Option<&str>, letters: Letters) -> Need {
        Need {
            kind: kind.map(str::to_string),
            letters,
            searched: false,
            patient: true,
            system_only: false,
        }
    }
}

/// The outcome of [`judge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub allowed: bool,
    /// The narrowest SMART scopes that allow the request, in v2 form: one
    /// per need, each of the narrowest context that could meet it.
    pub scopes: Vec<String>,
}

/// Whether `granted` (the token's scopes, after the wildcard policy) allow
/// `r`, for a token whose launch patient is `launch`.
pub fn judge<'g>(
    fhir: &Fhir,
    r: &FhirRequest,
    granted: impl Iterator<Item = &'g str>,
    launch: Option<&str>,
) -> Judgement {
    let scopes: Vec<SmartScope> = granted
        .filter_map(|s| SmartScope::parse(s, fhir.smart_v1))
        .collect();
    // An id that is no FHIR id names no compartment.
    let launch = launch.filter(|p| is_id(p));
    let in_compartment =
        !fhir.patient_compartment || (launch.is_some() && compartment(r) == launch);
    let may = |need: &Need, context: Context| match context {
        Context::Patient => need.patient && !need.system_only && in_compartment,
        Context::User => !need.system_only,
        Context::System => true,
    };
    let mut allowed = true;
    let mut names: Vec<String> = Vec::new();
    for need in needs(r) {
        let met = Context::ALL.iter().any(|&context| {
            may(&need, context) && letters(&scopes, context, &need, r).contains(need.letters)
        });
        allowed &= met;
        let narrowest = Context::ALL
            .into_iter()
            .find(|&c| may(&need, c))
            .unwrap_or(Context::System);
        let name = SmartScope::name(narrowest, need.kind.as_deref(), need.letters);
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Judgement {
        allowed,
        scopes: names,
    }
}

/// Whether `granted` hold any scope that could grant a search on `r`'s
/// type (any type for a system search, whose form may hold `_type`), in
/// any context, constrained or not: only then is a `_search` form body
/// worth reading.
pub fn may_search<'g>(
    fhir: &Fhir,
    r: &FhirRequest,
    granted: impl Iterator<Item = &'g str>,
) -> bool {
    granted
        .filter_map(|s| SmartScope::parse(s, fhir.smart_v1))
        .any(|s| {
            s.letters.contains(Letters::S)
                && (r.kind.is_none() || s.kind.is_none() || s.kind == r.kind)
        })
}

/// The letters `context`'s scopes grant for `need`: unconstrained scopes
/// on its type (or `*`) all theirs; a query-constrained one only `s`, and
/// only for a search whose parameters carry each constraint.
fn letters(scopes: &[SmartScope], context: Context, need: &Need, r: &FhirRequest) -> Letters {
    scopes
        .iter()
        .filter(|s| s.context == context)
        .filter(|s| s.kind.is_none() || s.kind == need.kind)
        .fold(Letters::NONE, |acc, s| {
            let own = if s.constraints.is_empty() {
                s.letters
            } else if need.searched && s.constraints.iter().all(|(n, v)| carries(r, n, v)) {
                s.letters.intersect(Letters::S)
            } else {
                Letters::NONE
            };
            acc.union(own)
        })
}

/// The request carries parameter `name` with `value`, and no other value
/// for it (a server that keeps the last one would otherwise see another).
fn carries(r: &FhirRequest, name: &str, value: &str) -> bool {
    let mut values = r.values(name).peekable();
    values.peek().is_some() && values.all(|v| v == value)
}

/// The grants `r` needs.
fn needs(r: &FhirRequest) -> Vec<Need> {
    use Interaction::*;
    let kind = r.kind.as_deref();
    let mut out = match r.interaction {
        Read | Vread | HistoryInstance => vec![Need::on(kind, Letters::R)],
        Update | Patch => vec![Need::on(kind, Letters::U)],
        // A conditional write searches first: it needs the search too.
        UpdateConditional | PatchConditional => vec![Need::on(kind, Letters::U.union(Letters::S))],
        Delete => vec![Need::on(kind, Letters::D)],
        DeleteConditional => vec![Need::on(kind, Letters::D.union(Letters::S))],
        Create => vec![Need::on(kind, Letters::C)],
        SearchType | SearchCompartment => vec![Need {
            searched: true,
            ..Need::on(kind, Letters::S)
        }],
        HistoryType => vec![Need::on(kind, Letters::S)],
        SearchSystem | HistorySystem => per_type(r, Letters::S),
        // Public; never judged.
        Capabilities | SmartConfiguration => Vec::new(),
        Operation => operation(r),
    };
    if matches!(r.interaction, SearchType | SearchCompartment | SearchSystem) {
        out.extend(included(r));
    }
    out
}

/// One need per type the request's `_type` lists, or one for every type
/// when it lists none (or one that is not a type).
fn per_type(r: &FhirRequest, letters: Letters) -> Vec<Need> {
    let mut kinds: Vec<&str> = Vec::new();
    for value in r.values("_type") {
        for kind in value.split(',') {
            if !is_type(kind) {
                return vec![Need::on(None, letters)];
            }
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
    }
    if kinds.is_empty() {
        return vec![Need::on(None, letters)];
    }
    kinds
        .into_iter()
        .map(|k| Need::on(Some(k), letters))
        .collect()
}

/// What an operation needs: bulk `$export` reads every type it exports, by
/// `system/` scopes only; `Patient/[id]/$everything` reads the patient's
/// record; any other operation may do anything to its type, so it needs
/// every interaction there (never from `patient/` scopes: what it touches
/// cannot be told from the request). Invoked by `POST`, an operation's
/// `_type` may lie in its unread body: every type.
fn operation(r: &FhirRequest) -> Vec<Need> {
    let kind = r.kind.as_deref();
    let per_type = |r: &FhirRequest, letters| {
        if r.unread_params {
            vec![Need::on(None, letters)]
        } else {
            per_type(r, letters)
        }
    };
    match (r.operation.as_deref(), kind, r.id.as_deref()) {
        (Some("$export"), None | Some("Patient"), None)
        | (Some("$export"), Some("Group"), Some(_)) => per_type(r, Letters::R)
            .into_iter()
            .map(|n| Need {
                system_only: true,
                patient: false,
                ..n
            })
            .collect(),
        (Some("$everything"), Some("Patient"), Some(_)) => {
            let mut out = vec![Need::on(Some("Patient"), Letters::R)];
            for n in per_type(r, Letters::R) {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
            out
        }
        _ => vec![Need {
            patient: false,
            ..Need::on(kind, Letters::ALL)
        }],
    }
}

/// What `_include` and `_revinclude` (any modifier) bring back: searched
/// (`s`) on the type they name, never from `patient/` scopes (included
/// resources may lie outside the compartment). `_include=Src:param` names
/// no target type: every type.
fn included(r: &FhirRequest) -> Vec<Need> {
    let mut out: Vec<Need> = Vec::new();
    for (name, value) in &r.params {
        let parts: Vec<&str> = value.split(':').collect();
        let kind = match name.split(':').next() {
            Some("_include") => match parts.as_slice() {
                [_, _, target] if is_type(target) => Some(*target),
                _ => None,
            },
            Some("_revinclude") => match parts.as_slice() {
                [source, _] | [source, _, _] if is_type(source) => Some(*source),
                _ => None,
            },
            _ => continue,
        };
        let need = Need {
            patient: false,
            ..Need::on(kind, Letters::S)
        };
        if !out.contains(&need) {
            out.push(need);
        }
    }
    out
}

/// The patient whose compartment `r` provably stays within, from the
/// request line alone: `Patient/[id]` itself (read, history, writes,
/// operations on it), the compartment search `Patient/[id]/[type]`, or a
/// search (or conditional write) whose parameters name that patient.
/// Never from a resource body: a read by id of another type, a create, an
/// update of another type prove nothing.
pub fn compartment(r: &FhirRequest) -> Option<&str> {
    use Interaction::*;
    let kind = r.kind.as_deref()?;
    match r.interaction {
        Read | Vread | HistoryInstance | Update | Patch | Delete | Operation
            if kind == "Patient" =>
        {
            r.id.as_deref()
        }
        SearchCompartment => match &r.compartment {
            Some((c, id)) if c == "Patient" => Some(id.as_str()),
            _ => None,
        },
        SearchType | UpdateConditional | PatchConditional | DeleteConditional => {
            by_params(kind, &r.params)
        }
        _ => None,
    }
}

/// The patient that `kind`'s search parameters confine a search to:
/// `patient=[id]` or `patient=Patient/[id]` where `kind` has a `patient`
/// parameter, `subject=Patient/[id]` or `subject:Patient=[id]` where its
/// `subject` may name a Patient, `_id=[id]` on Patient. Every parameter
/// named `patient` or `subject` (with a modifier or chain too) must be one
/// of these, all for the same patient: a bare `subject=[id]` may as well
/// name a Group with that id, and a list, a chain or another modifier
/// reaches beyond one patient.
fn by_params<'r>(kind: &str, params: &'r [(String, String)]) -> Option<&'r str> {
    let mut found: Option<&str> = None;
    for (name, value) in params {
        let root = name.split([':', '.']).next().unwrap_or(name);
        let id = match (name.as_str(), root) {
            ("_id", _) if kind == "Patient" => value.as_str(),
            (_, "patient") | (_, "subject") => match name.as_str() {
                "patient" if r4::has_patient_param(kind) => {
                    value.strip_prefix("Patient/").unwrap_or(value)
                }
                "subject" if r4::has_subject_param(kind) => value.strip_prefix("Patient/")?,
                "subject:Patient" if r4::has_subject_param(kind) => value.as_str(),
                _ => return None,
            },
            (_, "_id") if kind == "Patient" => return None,
            _ => continue,
        };
        if !is_id(id) || found.is_some_and(|f| f != id) {
            return None;
        }
        found = Some(id);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::request::{classify, parse_params, Classified};
    use crate::rules::SafePath;

    fn fhir(v1: bool, compartment: bool) -> Fhir {
        let doc = serde_json::json!({
            "providers": [{"name": "idp", "issuer": "i", "audiences": ["a"],
                "jwks": {"uri": "http://idp/k", "cluster": "idp"}}],
            "fhir": {"base_path": "/fhir", "smart_v1": v1, "patient_compartment": compartment}
        });
        crate::config::Policy::from_json(doc.to_string().as_bytes())
            .unwrap()
            .fhir
            .unwrap()
    }

    fn req(method: &str, path: &str) -> FhirRequest {
        let safe = SafePath::parse(path).unwrap();
        let Classified::Request(mut r) = classify(&["fhir".into()], method, &safe) else {
            panic!("{method} {path}")
        };
        parse_params(crate::fhir::request::query(path), &mut r.params).unwrap();
        r
    }

    fn judged(method: &str, path: &str, scopes: &str, launch: Option<&str>) -> Judgement {
        judge(
            &fhir(false, true),
            &req(method, path),
            scopes.split(' '),
            launch,
        )
    }

    #[test]
    fn compartment_is_proven_from_the_request_line_only() {
        let c = |m: &str, p: &str| compartment(&req(m, p)).map(str::to_string);
        let p7 = Some("7".to_string());
        for (m, p) in [
            ("GET", "/fhir/Patient/7"),
            ("GET", "/fhir/Patient/7/_history/2"),
            ("GET", "/fhir/Patient/7/_history"),
            ("PUT", "/fhir/Patient/7"),
            ("PATCH", "/fhir/Patient/7"),
            ("DELETE", "/fhir/Patient/7"),
            ("GET", "/fhir/Patient/7/$everything"),
            ("GET", "/fhir/Patient/7/Observation?code=x"),
            ("GET", "/fhir/Observation?patient=7"),
            ("GET", "/fhir/Observation?patient=Patient/7&code=x"),
            ("GET", "/fhir/Observation?subject=Patient/7"),
            ("GET", "/fhir/Observation?subject:Patient=7"),
            ("GET", "/fhir/Observation?patient=7&subject=Patient/7"),
            ("GET", "/fhir/Observation?patient=7&patient=Patient/7"),
            ("GET", "/fhir/AdverseEvent?subject=Patient/7"),
            ("GET", "/fhir/Patient?_id=7&name=x"),
            ("PUT", "/fhir/Observation?patient=7&identifier=a"),
            ("DELETE", "/fhir/Condition?patient=7&code=x"),
        ] {
            assert_eq!(c(m, p), p7, "{m} {p}");
        }
        for (m, p) in [
            // Other resources by id: what they are about is in their body.
            ("GET", "/fhir/Observation/1"),
            ("PUT", "/fhir/Observation/1"),
            ("POST", "/fhir/Observation"),
            ("GET", "/fhir/Observation"),
            ("GET", "/fhir/Observation?code=x"),
            ("GET", "/fhir/Observation/_history"),
            ("GET", "/fhir?patient=7"),
            ("GET", "/fhir/Encounter/7/Observation"),
            // A bare subject id may name a Group, Device or Location.
            ("GET", "/fhir/Observation?subject=7"),
            ("GET", "/fhir/Observation?patient=7,8"),
            ("GET", "/fhir/Observation?patient=7&patient=8"),
            ("GET", "/fhir/Observation?patient=7&subject=Patient/8"),
            ("GET", "/fhir/Observation?patient:missing=true"),
            ("GET", "/fhir/Observation?patient=7&patient:missing=true"),
            ("GET", "/fhir/Observation?patient.name=x"),
            ("GET", "/fhir/Observation?patient=7&subject.name=x"),
            (
                "GET",
                "/fhir/Observation?patient=http://other/fhir/Patient/7",
            ),
            ("GET", "/fhir/Observation?patient=Group/7"),
            ("GET", "/fhir/Observation?subject=Group/7"),
            ("GET", "/fhir/Observation?patient="),
            // No such parameter on the type: a lenient server ignores it.
            ("GET", "/fhir/Practitioner?patient=7"),
            ("GET", "/fhir/Medication?patient=7"),
            ("GET", "/fhir/Patient?patient=7"),
            ("GET", "/fhir/SupplyRequest?patient=7"),
            ("GET", "/fhir/Condition?subject:Group=7"),
            ("GET", "/fhir/Patient?_id=7,8"),
            ("GET", "/fhir/Patient?_id=7&_id:not=8"),
            ("GET", "/fhir/Patient/$export"),
            ("GET", "/fhir/Patient"),
        ] {
            assert_eq!(c(m, p), None, "{m} {p}");
        }
    }

    #[test]
    fn needs_and_the_narrowest_scopes() {
        let named = |m: &str, p: &str, launch: Option<&str>| judged(m, p, "", launch).scopes;
        let l = Some("7");
        for (m, p, launch, want) in [
            (
                "GET",
                "/fhir/Observation?patient=7",
                l,
                vec!["patient/Observation.s"],
            ),
            (
                "GET",
                "/fhir/Observation?patient=8",
                l,
                vec!["user/Observation.s"],
            ),
            (
                "GET",
                "/fhir/Observation?patient=7",
                None,
                vec!["user/Observation.s"],
            ),
            ("GET", "/fhir/Observation/1", l, vec!["user/Observation.r"]),
            ("GET", "/fhir/Patient/7", l, vec!["patient/Patient.r"]),
            (
                "GET",
                "/fhir/Patient/7/_history/1",
                l,
                vec!["patient/Patient.r"],
            ),
            ("PUT", "/fhir/Patient/7", l, vec!["patient/Patient.u"]),
            (
                "PUT",
                "/fhir/Observation?patient=7",
                l,
                vec!["patient/Observation.us"],
            ),
            (
                "PATCH",
                "/fhir/Observation?patient=7",
                l,
                vec!["patient/Observation.us"],
            ),
            (
                "DELETE",
                "/fhir/Observation?patient=7",
                l,
                vec!["patient/Observation.ds"],
            ),
            (
                "DELETE",
                "/fhir/Observation/1",
                l,
                vec!["user/Observation.d"],
            ),
            ("POST", "/fhir/Observation", l, vec!["user/Observation.c"]),
            (
                "GET",
                "/fhir/Observation/_history",
                l,
                vec!["user/Observation.s"],
            ),
            (
                "GET",
                "/fhir?_type=Observation,Condition",
                l,
                vec!["user/Observation.s", "user/Condition.s"],
            ),
            (
                "GET",
                "/fhir?_type=Observation&_type=Observation",
                l,
                vec!["user/Observation.s"],
            ),
            ("GET", "/fhir?code=x", l, vec!["user/*.s"]),
            ("GET", "/fhir?_type=Observation,bad", l, vec!["user/*.s"]),
            ("GET", "/fhir/_history", l, vec!["user/*.s"]),
            ("GET", "/fhir/$export", l, vec!["system/*.r"]),
            (
                "GET",
                "/fhir/$export?_type=Patient,Observation",
                l,
                vec!["system/Patient.r", "system/Observation.r"],
            ),
            (
                "GET",
                "/fhir/Patient/$export?_type=Observation",
                l,
                vec!["system/Observation.r"],
            ),
            (
                "GET",
                "/fhir/Group/g/$export?_type=Observation",
                l,
                vec!["system/Observation.r"],
            ),
            (
                "GET",
                "/fhir/Patient/7/$everything",
                l,
                vec!["patient/Patient.r", "patient/*.r"],
            ),
            (
                "GET",
                "/fhir/Patient/7/$everything?_type=Observation",
                l,
                vec!["patient/Patient.r", "patient/Observation.r"],
            ),
            (
                "POST",
                "/fhir/Observation/$validate",
                l,
                vec!["user/Observation.cruds"],
            ),
            (
                "GET",
                "/fhir/Patient/7/$summary",
                l,
                vec!["user/Patient.cruds"],
            ),
            ("POST", "/fhir/$reindex", l, vec!["user/*.cruds"]),
            (
                "GET",
                "/fhir/Observation?patient=7&_include=Observation:performer:Practitioner",
                l,
                vec!["patient/Observation.s", "user/Practitioner.s"],
            ),
            (
                "GET",
                "/fhir/Observation?patient=7&_revinclude:iterate=Provenance:target",
                l,
                vec!["patient/Observation.s", "user/Provenance.s"],
            ),
            (
                "GET",
                "/fhir/Observation?patient=7&_include=Observation:performer",
                l,
                vec!["patient/Observation.s", "user/*.s"],
            ),
            (
                "GET",
                "/fhir/Observation?patient=7&_include=*",
                l,
                vec!["patient/Observation.s", "user/*.s"],
            ),
            (
                "GET",
                "/fhir/Patient/7/Condition",
                l,
                vec!["patient/Condition.s"],
            ),
            (
                "GET",
                "/fhir/Patient/8/Condition",
                l,
                vec!["user/Condition.s"],
            ),
        ] {
            assert_eq!(named(m, p, launch), want, "{m} {p}");
        }
        // Without the compartment rule, patient/ is always the narrowest but for export.
        let loose = fhir(false, false);
        for (m, p, want) in [
            ("GET", "/fhir/Observation/1", "patient/Observation.r"),
            ("POST", "/fhir/Observation", "patient/Observation.c"),
            (
                "GET",
                "/fhir/$export?_type=Observation",
                "system/Observation.r",
            ),
        ] {
            assert_eq!(
                judge(&loose, &req(m, p), std::iter::empty(), None).scopes,
                [want],
                "{m} {p}"
            );
        }
    }

    #[test]
    fn a_search_body_is_worth_reading_only_with_a_search_scope() {
        let f = fhir(false, true);
        let r = req("POST", "/fhir/Observation/_search");
        let may = |scopes: &str| may_search(&f, &r, scopes.split(' '));
        for yes in [
            "patient/Observation.rs",
            "user/Observation.s",
            "system/*.s",
            "patient/Observation.s?category=x",
        ] {
            assert!(may(yes), "{yes}");
        }
        for no in [
            "",
            "patient/Observation.r",
            "user/Condition.s",
            "launch openid",
            "user/Observation.cud",
        ] {
            assert!(!may(no), "{no}");
        }
        // A system search's form may name any type.
        let system = req("POST", "/fhir/_search");
        assert!(may_search(&f, &system, ["user/Condition.s"].into_iter()));
        assert!(!may_search(&f, &system, ["user/Condition.r"].into_iter()));
    }

    #[test]
    fn letters_combine_across_scopes_of_one_context() {
        let ok = |m: &str, p: &str, scopes: &str| judged(m, p, scopes, Some("7")).allowed;
        assert!(ok(
            "PUT",
            "/fhir/Observation?patient=7",
            "patient/Observation.u patient/Observation.s"
        ));
        assert!(ok(
            "PUT",
            "/fhir/Observation?patient=7",
            "patient/Observation.cruds"
        ));
        assert!(!ok(
            "PUT",
            "/fhir/Observation?patient=7",
            "patient/Observation.u"
        ));
        // Not across contexts: one context's scopes must meet a need whole.
        assert!(!ok(
            "PUT",
            "/fhir/Observation?patient=7",
            "patient/Observation.u user/Observation.s"
        ));
        assert!(ok(
            "PUT",
            "/fhir/Observation?patient=7",
            "user/Observation.us"
        ));
        // Each need on its own: the search by patient/, the include by user/.
        assert!(ok(
            "GET",
            "/fhir/Observation?patient=7&_revinclude=Provenance:target",
            "patient/Observation.s user/Provenance.s"
        ));
        assert!(!ok(
            "GET",
            "/fhir/Observation?patient=7&_revinclude=Provenance:target",
            "patient/Observation.s patient/Provenance.s"
        ));
    }
}
