//! Why a request was decided as it was, and the one mapping from that reason
//! to what the client sees: status and `WWW-Authenticate` (RFC 6750, RFC 9470).
//! The precise reason goes to the audit record; the wire answer stays generic.

use std::fmt::Write as _;

/// Which step-up requirement a token failed (RFC 9470).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepUpFailure {
    Acr,
    Amr,
    Age,
}

impl StepUpFailure {
    /// Stable code for the audit record.
    pub fn code(self) -> &'static str {
        match self {
            StepUpFailure::Acr => "acr",
            StepUpFailure::Amr => "amr",
            StepUpFailure::Age => "age",
        }
    }
}

/// Every reason for a decision. Codes are stable: dashboards and alerts key on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Ok,
    BadPath,
    NoRule,
    MissingToken,
    InvalidRequest,
    Malformed,
    AlgNotAllowed,
    BadType,
    UnsupportedCrit,
    UnknownIssuer,
    WrongAudience,
    MissingExp,
    Expired,
    NotYetValid,
    LifetimeTooLong,
    UnknownKey,
    InvalidSignature,
    TokenTooOld,
    InsufficientScope,
    StepUpRequired(StepUpFailure),
    Revoked,
    /// A protected rule over plaintext or a TLS older than required.
    InsecureTransport,
    /// The token is bound (`cnf`) to a certificate or key the request does
    /// not prove it holds, or is sent with the wrong scheme for its binding.
    CnfMismatch,
    /// The rule wants a sender-constrained token; this one is bearer-only.
    SenderConstraintRequired,
    /// A DPoP proof missing, malformed, mis-signed, stale, or for another request.
    InvalidDpopProof,
    /// A DPoP proof already used.
    DpopReplay,
    /// The token carries a forbidden (PHI) claim and the policy rejects such tokens.
    PhiInToken,
    /// The authorization server says the token is not active (RFC 7662).
    Inactive,
    /// The source used up its budget of failed signature checks this second;
    /// the token was refused without one.
    VerificationRateLimited,
    KeysUnavailable,
    /// A sensitive rule, and no revocation list in force (unreachable past
    /// `max_stale_seconds`, or never fetched).
    RevocationUnavailable,
    /// An `introspect` rule, and the introspection endpoint gave no usable
    /// answer (down, slow past `timeout_ms`, not 200, not an RFC 7662 response).
    IntrospectionUnavailable,
    /// The client went away while its request waited for keys; nothing was
    /// forwarded and no answer was sent.
    ClientClosed,
    /// A FHIR request whose search parameters or `_search` form body do not
    /// read one way only (malformed encoding, a `;`, another content type).
    BadFhirRequest,
    /// A FHIR `_search` form body over the 16 KiB the filter reads.
    BodyTooLarge,
}

impl Reason {
    /// The stable audit code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::BadPath => "bad_path",
            Reason::NoRule => "no_rule",
            Reason::MissingToken => "missing_token",
            Reason::InvalidRequest => "invalid_request",
            Reason::Malformed => "malformed_token",
            Reason::AlgNotAllowed => "alg_not_allowed",
            Reason::BadType => "bad_token_type",
            Reason::UnsupportedCrit => "unsupported_crit",
            Reason::UnknownIssuer => "unknown_issuer",
            Reason::WrongAudience => "wrong_audience",
            Reason::MissingExp => "missing_exp",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::LifetimeTooLong => "lifetime_too_long",
            Reason::UnknownKey => "unknown_key",
            Reason::InvalidSignature => "invalid_signature",
            Reason::TokenTooOld => "token_too_old",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::StepUpRequired(_) => "step_up_required",
            Reason::Revoked => "revoked",
            Reason::InsecureTransport => "insecure_transport",
            Reason::CnfMismatch => "cnf_mismatch",
            Reason::SenderConstraintRequired => "sender_constraint_required",
            Reason::InvalidDpopProof => "invalid_dpop_proof",
            Reason::DpopReplay => "dpop_replay",
            Reason::PhiInToken => "phi_in_token",
            Reason::Inactive => "inactive",
            Reason::VerificationRateLimited => "verification_rate_limited",
            Reason::KeysUnavailable => "keys_unavailable",
            Reason::RevocationUnavailable => "revocation_unavailable",
            Reason::IntrospectionUnavailable => "introspection_unavailable",
            Reason::ClientClosed => "client_closed",
            Reason::BadFhirRequest => "bad_fhir_request",
            Reason::BodyTooLarge => "body_too_large",
        }
    }

    /// Every reason, for stats registration and tests.
    pub const ALL: [Reason; 37] = [
        Reason::Ok,
        Reason::BadPath,
        Reason::NoRule,
        Reason::MissingToken,
        Reason::InvalidRequest,
        Reason::Malformed,
        Reason::AlgNotAllowed,
        Reason::BadType,
        Reason::UnsupportedCrit,
        Reason::UnknownIssuer,
        Reason::WrongAudience,
        Reason::MissingExp,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::LifetimeTooLong,
        Reason::UnknownKey,
        Reason::InvalidSignature,
        Reason::TokenTooOld,
        Reason::InsufficientScope,
        Reason::StepUpRequired(StepUpFailure::Acr),
        Reason::StepUpRequired(StepUpFailure::Amr),
        Reason::StepUpRequired(StepUpFailure::Age),
        Reason::Revoked,
        Reason::InsecureTransport,
        Reason::CnfMismatch,
        Reason::SenderConstraintRequired,
        Reason::InvalidDpopProof,
        Reason::DpopReplay,
        Reason::PhiInToken,
        Reason::Inactive,
        Reason::VerificationRateLimited,
        Reason::KeysUnavailable,
        Reason::RevocationUnavailable,
        Reason::IntrospectionUnavailable,
        Reason::ClientClosed,
        Reason::BadFhirRequest,
        Reason::BodyTooLarge,
    ];
}

/// What the rule asked for, needed to word a challenge.
#[derive(Debug, Clone, Copy, Default)]
pub struct Challenge<'a> {
    /// The rule's required scopes (`scopes`, else `scopes_any`).
    pub scopes: &'a [String],
    pub acr_values: &'a [String],
    pub max_age: Option<u64>,
    /// The request used the DPoP scheme or its token is DPoP-bound: token
    /// errors are DPoP challenges naming these algorithms (RFC 9449 §7.1).
    pub dpop_algs: Option<&'a str>,
}

/// A refusal as sent: status, optional `WWW-Authenticate`, short generic body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u32,
    pub www_authenticate: Option<String>,
    pub body: &'static str,
}

/// Maps a denial reason to the answer the client gets (DESIGN.md §3).
pub fn deny(reason: Reason, realm: &str, challenge: Challenge<'_>) -> Answer {
    let (status, www, body) = match reason {
        Reason::BadPath | Reason::BadFhirRequest => (400, None, "bad request\n"),
        Reason::BodyTooLarge => (413, None, "payload too large\n"),
        Reason::NoRule => (403, None, "forbidden\n"),
        Reason::InsecureTransport => (403, None, "forbidden\n"),
        Reason::InvalidDpopProof | Reason::DpopReplay => (
            401,
            Some(dpop_challenge(
                "invalid_dpop_proof",
                challenge.dpop_algs.unwrap_or(""),
            )),
            "invalid proof\n",
        ),
        Reason::MissingToken => (
            401,
            Some(format!("Bearer realm=\"{realm}\"")),
            "authentication required\n",
        ),
        Reason::InvalidRequest => (
            400,
            Some("Bearer error=\"invalid_request\"".to_string()),
            "bad request\n",
        ),
        Reason::InsufficientScope => {
            let mut www = String::from("Bearer error=\"insufficient_scope\"");
            if !challenge.scopes.is_empty() {
                // Config guarantees scope tokens hold no quote or backslash.
                let _ = write!(www, ", scope=\"{}\"", challenge.scopes.join(" "));
            }
            (403, Some(www), "insufficient scope\n")
        }
        Reason::StepUpRequired(_) => {
            let mut www = String::from(
                "Bearer error=\"insufficient_user_authentication\", \
                 error_description=\"A different authentication level is required\"",
            );
            if !challenge.acr_values.is_empty() {
                let _ = write!(www, ", acr_values=\"{}\"", challenge.acr_values.join(" "));
            }
            if let Some(max_age) = challenge.max_age {
                let _ = write!(www, ", max_age={max_age}");
            }
            (401, Some(www), "stronger authentication required\n")
        }
        // ClientClosed is never sent; were it, it would be this.
        Reason::KeysUnavailable
        | Reason::RevocationUnavailable
        | Reason::IntrospectionUnavailable
        | Reason::ClientClosed => (503, None, "service unavailable\n"),
        Reason::Ok => (500, None, "internal error\n"),
        Reason::Malformed
        | Reason::AlgNotAllowed
        | Reason::BadType
        | Reason::UnsupportedCrit
        | Reason::UnknownIssuer
        | Reason::WrongAudience
        | Reason::MissingExp
        | Reason::Expired
        | Reason::NotYetValid
        | Reason::LifetimeTooLong
        | Reason::UnknownKey
        | Reason::InvalidSignature
        | Reason::TokenTooOld
        | Reason::Revoked
        | Reason::CnfMismatch
        | Reason::SenderConstraintRequired
        | Reason::PhiInToken
        | Reason::Inactive
        | Reason::VerificationRateLimited => (
            401,
            Some(match challenge.dpop_algs {
                Some(algs) => dpop_challenge("invalid_token", algs),
                None => "Bearer error=\"invalid_token\"".to_string(),
            }),
            "invalid token\n",
        ),
    };
    Answer {
        status,
        www_authenticate: www,
        body,
    }
}

/// `DPoP error="…", algs="…"` (RFC 9449 §7.1); no `algs` when none is known.
fn dpop_challenge(error: &str, algs: &str) -> String {
    if algs.is_empty() {
        format!("DPoP error=\"{error}\"")
    } else {
        format!("DPoP error=\"{error}\", algs=\"{algs}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_the_contract() {
        let none = Challenge::default();
        let a = deny(Reason::MissingToken, "phi-guard", none);
        assert_eq!(
            (a.status, a.www_authenticate.as_deref()),
            (401, Some("Bearer realm=\"phi-guard\""))
        );
        for r in [
            Reason::Expired,
            Reason::InvalidSignature,
            Reason::UnknownKey,
            Reason::TokenTooOld,
            Reason::Inactive,
        ] {
            let a = deny(r, "x", none);
            assert_eq!(
                (a.status, a.www_authenticate.as_deref()),
                (401, Some("Bearer error=\"invalid_token\""))
            );
        }
        let scopes = vec!["a:b".to_string(), "c".to_string()];
        let a = deny(
            Reason::InsufficientScope,
            "x",
            Challenge {
                scopes: &scopes,
                ..none
            },
        );
        assert_eq!(a.status, 403);
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some("Bearer error=\"insufficient_scope\", scope=\"a:b c\"")
        );
        let acr = vec!["urn:mfa".to_string(), "urn:hw".to_string()];
        let a = deny(
            Reason::StepUpRequired(StepUpFailure::Age),
            "x",
            Challenge {
                acr_values: &acr,
                max_age: Some(300),
                ..none
            },
        );
        assert_eq!(a.status, 401);
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some(
                "Bearer error=\"insufficient_user_authentication\", error_description=\"A different authentication level is required\", acr_values=\"urn:mfa urn:hw\", max_age=300"
            )
        );
        assert_eq!(deny(Reason::NoRule, "x", none).status, 403);
        assert_eq!(deny(Reason::BadPath, "x", none).status, 400);
        assert_eq!(deny(Reason::KeysUnavailable, "x", none).status, 503);
        let a = deny(Reason::IntrospectionUnavailable, "x", none);
        assert_eq!((a.status, a.www_authenticate), (503, None));
        assert_eq!(deny(Reason::InvalidRequest, "x", none).status, 400);
        let a = deny(Reason::BadFhirRequest, "x", none);
        assert_eq!((a.status, a.www_authenticate), (400, None));
        let a = deny(Reason::BodyTooLarge, "x", none);
        assert_eq!((a.status, a.www_authenticate), (413, None));
    }

    /// The reason codes README.md lists ("Audit record"), read at test time:
    /// the contract users key dashboards on, not this file's own list.
    fn readme_reason_codes() -> Vec<String> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let start = readme
            .find("Reason codes:")
            .expect("README lists reason codes");
        let rest = &readme[start..];
        let paragraph = &rest[..rest.find("\n\n").unwrap_or(rest.len())];
        // Parenthesised remarks explain a code; they name none.
        let mut depth = 0usize;
        let text: String = paragraph
            .chars()
            .filter(|c| {
                match c {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    _ => return depth == 0,
                }
                false
            })
            .collect();
        text.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// A distinct number per variant. The match is exhaustive, so a new
    /// variant does not compile until it is placed here (and so in the checks below).
    fn ordinal(r: Reason) -> usize {
        match r {
            Reason::Ok => 0,
            Reason::BadPath => 1,
            Reason::NoRule => 2,
            Reason::MissingToken => 3,
            Reason::InvalidRequest => 4,
            Reason::Malformed => 5,
            Reason::AlgNotAllowed => 6,
            Reason::BadType => 7,
            Reason::UnsupportedCrit => 8,
            Reason::UnknownIssuer => 9,
            Reason::WrongAudience => 10,
            Reason::MissingExp => 11,
            Reason::Expired => 12,
            Reason::NotYetValid => 13,
            Reason::LifetimeTooLong => 14,
            Reason::UnknownKey => 15,
            Reason::InvalidSignature => 16,
            Reason::TokenTooOld => 17,
            Reason::InsufficientScope => 18,
            Reason::StepUpRequired(_) => 19,
            Reason::Revoked => 20,
            Reason::KeysUnavailable => 21,
            Reason::ClientClosed => 22,
            Reason::VerificationRateLimited => 23,
            Reason::RevocationUnavailable => 24,
            Reason::Inactive => 25,
            Reason::IntrospectionUnavailable => 26,
            Reason::InsecureTransport => 27,
            Reason::CnfMismatch => 28,
            Reason::SenderConstraintRequired => 29,
            Reason::InvalidDpopProof => 30,
            Reason::DpopReplay => 31,
            Reason::PhiInToken => 32,
            Reason::BadFhirRequest => 33,
            Reason::BodyTooLarge => 34,
        }
    }

    #[test]
    fn reason_codes_are_the_readmes() {
        let readme = readme_reason_codes();
        let mut unique = readme.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            readme.len(),
            "a code twice in README: {readme:?}"
        );
        assert!(readme.len() > 20, "README list not found whole: {readme:?}");
        // Reason::ALL (what stats are registered from) holds every variant ...
        let mut seen: Vec<usize> = Reason::ALL.iter().map(|r| ordinal(*r)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, (0..=34).collect::<Vec<_>>());
        // ... and the codes they give are exactly the README's.
        let mut ours: Vec<String> = Reason::ALL.iter().map(|r| r.code().to_owned()).collect();
        ours.sort_unstable();
        ours.dedup();
        assert_eq!(ours, unique, "codes differ from README.md's list");
    }

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        let n = codes.len();
        codes.dedup();
        // The three step-up variants share one code.
        assert_eq!(codes.len(), n - 2);
    }
}
