//! The FHIR model (issue #17): with a `fhir` block, a request under
//! `base_path` that no explicit rule matches is read as a FHIR REST
//! interaction ([`request`]).

pub mod r4;
pub mod request;
