//! The FHIR model (issue #17): with a `fhir` block, a request under
//! `base_path` that no explicit rule matches is read as a FHIR REST
//! interaction ([`request`]) and allowed when the token's SMART scopes
//! ([`smart`]) grant it.

pub mod r4;
pub mod request;
pub mod smart;
