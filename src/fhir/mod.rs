//! The FHIR model (issue #17): with a `fhir` block, a request under
//! `base_path` that no explicit rule matches is read as a FHIR REST
//! interaction ([`request`]) and allowed when the token's SMART scopes
//! ([`smart`]) grant it, within the launch patient's compartment for
//! `patient/` scopes ([`grant`]). Metadata and the SMART configuration are
//! public; anything unrecognised is refused.
//!
//! [`route`] reads the request and [`judge`] weighs a verified token
//! against it; `decision` joins them into the order of checks. A `_search`
//! form body is read last, once the token passed every check that does not
//! need it and [`may_search`] says its scopes could grant the search.

pub mod grant;
pub mod r4;
pub mod request;
pub mod smart;

pub use grant::{compartment, judge, may_search, Judgement};
pub use request::{FhirRequest, Interaction, MAX_SEARCH_BODY};

use crate::config::Fhir;
use crate::rules::SafePath;
use request::{classify, parse_form, parse_params, query, Classified};

/// The request body, as far as the host read it. Only a FHIR `_search`
/// the FHIR model decides ever needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Body<'a> {
    /// Not read; the core asks for it where it needs it.
    #[default]
    Unread,
    /// The whole body, with the request's `content-type`.
    Read {
        content_type: Option<&'a str>,
        bytes: &'a [u8],
    },
    /// Longer than [`MAX_SEARCH_BODY`]: not read.
    TooLarge,
    /// The host could not read it (or it came with trailers).
    Unreadable,
}

/// What the FHIR model saw of a request under the base path: the audit
/// record's `fhir_interaction`, `fhir_type` and `patient_fp`, and the
/// scopes a refusal names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub interaction: Interaction,
    pub kind: Option<String>,
    /// The patient whose compartment the request provably stays within.
    pub patient: Option<String>,
    /// The narrowest SMART scopes that allow it (set when a token was judged).
    pub scopes: Vec<String>,
}

/// Why the FHIR model refused a request before any token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No interaction the model knows, or `smart` is off (403).
    Unrecognised,
    /// Parameters or form body that do not read one way only (400).
    BadRequest,
    /// A `_search` form body over [`MAX_SEARCH_BODY`] (413).
    BodyTooLarge,
}

/// The FHIR model's reading of a request no explicit rule matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// Not under `base_path`.
    Outside,
    Refused(Refusal),
    /// Anyone may read it (`metadata`, `.well-known/smart-configuration`).
    Public,
    /// A token must grant it ([`judge`]).
    Protected(FhirRequest),
}

/// Reads `method` on `path` (Envoy's `raw_path`, query included) with the
/// body as far as read; `seen` gets what the record shows of it.
pub fn route(
    fhir: &Fhir,
    method: &str,
    path: &SafePath,
    raw_path: &str,
    body: Body<'_>,
    seen: &mut Option<Seen>,
) -> Routed {
    let mut r = match classify(&fhir.base, method, path) {
        Classified::Outside => return Routed::Outside,
        Classified::Unrecognised => return Routed::Refused(Refusal::Unrecognised),
        Classified::Request(r) => r,
    };
    *seen = Some(Seen {
        interaction: r.interaction,
        kind: r.kind.clone(),
        patient: None,
        scopes: Vec::new(),
    });
    if r.interaction.is_public() {
        return Routed::Public;
    }
    if !fhir.smart {
        return Routed::Refused(Refusal::Unrecognised);
    }
    if parse_params(query(raw_path), &mut r.params).is_err() {
        return Routed::Refused(Refusal::BadRequest);
    }
    if r.form_body {
        let read = match body {
            // Read once a token could be granted the search (`decision`).
            Body::Unread => {
                r.form_pending = true;
                Ok(())
            }
            Body::TooLarge => return Routed::Refused(Refusal::BodyTooLarge),
            Body::Unreadable => return Routed::Refused(Refusal::BadRequest),
            Body::Read { bytes, .. } if bytes.len() > MAX_SEARCH_BODY => {
                return Routed::Refused(Refusal::BodyTooLarge)
            }
            Body::Read {
                content_type,
                bytes,
            } => parse_form(content_type, bytes, &mut r.params),
        };
        if read.is_err() {
            return Routed::Refused(Refusal::BadRequest);
        }
    }
    // A conditional write with no search would change every resource of its type.
    let conditional = matches!(
        r.interaction,
        Interaction::UpdateConditional
            | Interaction::PatchConditional
            | Interaction::DeleteConditional
    );
    if conditional && r.params.is_empty() {
        return Routed::Refused(Refusal::Unrecognised);
    }
    if let Some(s) = seen.as_mut() {
        s.patient = compartment(&r).map(str::to_string);
    }
    Routed::Protected(r)
}

/// What the record shows of a request an explicit rule decides: its
/// interaction, type and (from its path and query, never a body) the
/// patient compartment it stays within. `None` outside `base_path`.
pub fn describe(fhir: &Fhir, method: &str, path: &SafePath, raw_path: &str) -> Option<Seen> {
    let Classified::Request(mut r) = classify(&fhir.base, method, path) else {
        return None;
    };
    // Unreadable parameters prove no compartment; the rule decides anyway.
    let patient = match parse_params(query(raw_path), &mut r.params) {
        Ok(()) => compartment(&r).map(str::to_string),
        Err(_) => None,
    };
    Some(Seen {
        interaction: r.interaction,
        kind: r.kind,
        patient,
        scopes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fhir(smart: bool) -> Fhir {
        let doc = serde_json::json!({
            "providers": [{"name": "idp", "issuer": "i", "audiences": ["a"],
                "jwks": {"uri": "http://idp/k", "cluster": "idp"}}],
            "fhir": {"base_path": "/fhir", "smart": smart}
        });
        crate::config::Policy::from_json(doc.to_string().as_bytes())
            .unwrap()
            .fhir
            .unwrap()
    }

    fn routed(f: &Fhir, method: &str, path: &str, body: Body<'_>) -> (Routed, Option<Seen>) {
        let mut seen = None;
        let safe = SafePath::parse(path).unwrap();
        (route(f, method, &safe, path, body, &mut seen), seen)
    }

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    #[test]
    fn search_bodies_are_asked_for_bounded_and_typed() {
        let f = fhir(true);
        let path = "/fhir/Observation/_search?code=x";
        // Unread: the query's parameters, the form still to come.
        let Routed::Protected(r) = routed(&f, "POST", path, Body::Unread).0 else {
            panic!("unread form")
        };
        assert!(r.form_pending && r.params.len() == 1);
        let body = |bytes: &'static [u8], content_type| Body::Read {
            content_type,
            bytes,
        };
        let (r, seen) = routed(&f, "POST", path, body(b"patient=7&category=lab", FORM));
        let Routed::Protected(r) = r else {
            panic!("{r:?}")
        };
        assert!(!r.form_pending);
        let params: Vec<(&str, &str)> = r
            .params
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            params,
            [("code", "x"), ("patient", "7"), ("category", "lab")]
        );
        // The body's parameters prove the compartment as the query's would.
        assert_eq!(seen.unwrap().patient.as_deref(), Some("7"));
        for (body, want) in [
            (Body::TooLarge, Refusal::BodyTooLarge),
            (Body::Unreadable, Refusal::BadRequest),
            (
                body(b"patient=7", Some("application/json")),
                Refusal::BadRequest,
            ),
            (body(b"patient=7", None), Refusal::BadRequest),
            (body(b"patient=%zz", FORM), Refusal::BadRequest),
            (body(b"patient=7;x=1", FORM), Refusal::BadRequest),
        ] {
            assert_eq!(
                routed(&f, "POST", path, body).0,
                Routed::Refused(want),
                "{body:?}"
            );
        }
        let big = vec![b'a'; MAX_SEARCH_BODY + 1];
        let b = Body::Read {
            content_type: FORM,
            bytes: &big,
        };
        assert_eq!(
            routed(&f, "POST", path, b).0,
            Routed::Refused(Refusal::BodyTooLarge)
        );
        // Only _search reads a body: a create's is never asked for.
        assert!(matches!(
            routed(&f, "POST", "/fhir/Observation", Body::Unread).0,
            Routed::Protected(_)
        ));
        assert!(matches!(
            routed(&f, "GET", "/fhir/Observation?patient=7", Body::Unread).0,
            Routed::Protected(_)
        ));
    }

    #[test]
    fn public_unrecognised_and_outside() {
        let f = fhir(true);
        let (r, seen) = routed(&f, "GET", "/fhir/metadata?mode=full;x", Body::Unread);
        assert_eq!(r, Routed::Public);
        assert_eq!(seen.map(|s| s.interaction), Some(Interaction::Capabilities));
        assert_eq!(
            routed(
                &f,
                "GET",
                "/fhir/.well-known/smart-configuration",
                Body::Unread
            )
            .0,
            Routed::Public
        );
        let (r, seen) = routed(&f, "POST", "/fhir", Body::Unread);
        assert_eq!((r, seen), (Routed::Refused(Refusal::Unrecognised), None));
        assert_eq!(
            routed(&f, "GET", "/other/Patient/1", Body::Unread).0,
            Routed::Outside
        );
        assert_eq!(
            routed(&f, "GET", "/fhir/Observation?a=%zz", Body::Unread).0,
            Routed::Refused(Refusal::BadRequest)
        );
        // A conditional write must say what it changes.
        for m in ["PUT", "PATCH", "DELETE"] {
            assert_eq!(
                routed(&f, m, "/fhir/Observation", Body::Unread).0,
                Routed::Refused(Refusal::Unrecognised),
                "{m}"
            );
            assert!(
                matches!(
                    routed(&f, m, "/fhir/Observation?identifier=a", Body::Unread).0,
                    Routed::Protected(_)
                ),
                "{m}"
            );
        }
        // `smart` off: only the public endpoints.
        let off = fhir(false);
        assert_eq!(
            routed(&off, "GET", "/fhir/metadata", Body::Unread).0,
            Routed::Public
        );
        let (r, seen) = routed(&off, "GET", "/fhir/Patient/7", Body::Unread);
        assert_eq!(r, Routed::Refused(Refusal::Unrecognised));
        assert_eq!(seen.map(|s| s.interaction), Some(Interaction::Read));
    }

    #[test]
    fn describe_reads_the_request_line_for_the_record() {
        let f = fhir(true);
        let d = |m: &str, p: &str| describe(&f, m, &SafePath::parse(p).unwrap(), p);
        let s = d("GET", "/fhir/Patient/7").unwrap();
        assert_eq!(
            (s.interaction, s.kind.as_deref(), s.patient.as_deref()),
            (Interaction::Read, Some("Patient"), Some("7"))
        );
        assert_eq!(
            d("GET", "/fhir/Observation?patient=7")
                .unwrap()
                .patient
                .as_deref(),
            Some("7")
        );
        assert_eq!(
            d("GET", "/fhir/Observation?patient=7;x").unwrap().patient,
            None
        );
        // The body is never read for the record.
        assert_eq!(
            d("POST", "/fhir/Observation/_search").unwrap().patient,
            None
        );
        assert_eq!(
            d("GET", "/fhir/$export").unwrap().interaction,
            Interaction::Operation
        );
        assert_eq!(d("POST", "/fhir"), None);
        assert_eq!(d("GET", "/elsewhere"), None);
    }
}

#[cfg(test)]
mod table;
