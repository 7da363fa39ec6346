//! SMART App Launch scopes for FHIR resources (scopes-and-launch-context):
//! `patient|user|system/<Type|*>.<cruds>[?param=value&…]` in v2, and with
//! `smart_v1` the v1 `read`, `write`, `*` as their v2 equivalents.
//!
//! Anything else — `launch`, `launch/patient`, `openid`, `fhirUser`,
//! `offline_access`, a context other than the three, letters out of order —
//! is not a resource scope and grants no data. Wildcard scopes are already
//! gone while `deny_wildcard_scopes` is on (`rules::GrantedScopes`); here
//! `*` as a type means every type, and `*` as a context means nothing.

use std::fmt;

use super::request::{decode, is_param_name, is_type};

/// Whose data a scope reaches, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    /// The launch patient's.
    Patient,
    /// What the signed-in user may see.
    User,
    /// What the client system is allowed (backend services).
    System,
}

impl Context {
    pub const ALL: [Context; 3] = [Context::Patient, Context::User, Context::System];

    pub fn name(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }
}

/// A set of interactions, by their letters in `cruds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Letters(u8);

impl Letters {
    pub const C: Letters = Letters(1);
    pub const R: Letters = Letters(2);
    pub const U: Letters = Letters(4);
    pub const D: Letters = Letters(8);
    pub const S: Letters = Letters(16);
    pub const NONE: Letters = Letters(0);
    pub const ALL: Letters = Letters(31);
    const ORDER: [(u8, char); 5] = [(1, 'c'), (2, 'r'), (4, 'u'), (8, 'd'), (16, 's')];

    /// v2 letters: a non-empty subsequence of `cruds`, in that order.
    pub fn parse_v2(s: &str) -> Option<Letters> {
        let mut order = Self::ORDER.iter();
        let mut set = 0u8;
        for c in s.chars() {
            // Each letter must come after the previous one in `cruds`.
            let (bit, _) = order.find(|(_, l)| *l == c)?;
            set |= bit;
        }
        (set != 0).then_some(Letters(set))
    }

    pub fn union(self, other: Letters) -> Letters {
        Letters(self.0 | other.0)
    }

    pub fn intersect(self, other: Letters) -> Letters {
        Letters(self.0 & other.0)
    }

    pub fn contains(self, other: Letters) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Letters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (bit, letter) in Self::ORDER {
            if self.0 & bit != 0 {
                write!(f, "{letter}")?;
            }
        }
        Ok(())
    }
}

/// A resource scope a token holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartScope {
    pub context: Context,
    /// The resource type; `None` for `*`, every type.
    pub kind: Option<String>,
    pub letters: Letters,
    /// v2 `?param=value&…`: grants only searches that carry each of them
    /// (names as written, values percent-decoded once).
    pub constraints: Vec<(String, String)>,
}

impl SmartScope {
    /// Reads `scope` as a SMART resource scope; `v1` also accepts SMART v1
    /// (`read` = `rs`, `write` = `cud`, `*` = `cruds`). `None`: not one,
    /// it grants no FHIR data.
    pub fn parse(scope: &str, v1: bool) -> Option<SmartScope> {
        let (context, rest) = scope.split_once('/')?;
        let context = match context {
            "patient" => Context::Patient,
            "user" => Context::User,
            "system" => Context::System,
            _ => return None,
        };
        let (resource, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (kind, letters) = resource.split_once('.')?;
        let kind = match kind {
            "*" => None,
            k if is_type(k) => Some(k.to_string()),
            _ => return None,
        };
        let v2 = Letters::parse_v2(letters);
        let letters = match (v2, letters) {
            (Some(l), _) => l,
            (None, "read") if v1 => Letters::R.union(Letters::S),
            (None, "write") if v1 => Letters::C.union(Letters::U).union(Letters::D),
            (None, "*") if v1 => Letters::ALL,
            _ => return None,
        };
        let constraints = match query {
            None => Vec::new(),
            // v1 had no constraints: `read?x=1` is neither.
            Some(_) if v2.is_none() => return None,
            Some(q) => constraints(q)?,
        };
        Some(SmartScope {
            context,
            kind,
            letters,
            constraints,
        })
    }

    /// Written back in v2 form (`patient/Observation.rs?…`).
    pub fn name(context: Context, kind: Option<&str>, letters: Letters) -> String {
        format!("{}/{}.{letters}", context.name(), kind.unwrap_or("*"))
    }
}

/// `param=value&…`: every part a parameter with a value, each decoded once.
fn constraints(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .map(|part| {
            let (name, value) = part.split_once('=')?;
            let value = decode(value, false).ok()?;
            (is_param_name(name) && !value.is_empty()).then(|| (name.to_string(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letters(s: &str) -> Letters {
        Letters::parse_v2(s).unwrap()
    }

    #[test]
    fn v2_letters_are_a_subsequence_of_cruds() {
        for ok in ["c", "r", "s", "rs", "cu", "cud", "cruds", "crs", "ds"] {
            assert_eq!(letters(ok).to_string(), ok);
        }
        // Out of order, repeated, unknown, empty: not a v2 scope (the
        // specification's `.dus` example, and `.read` read as `.rd`).
        for bad in [
            "", "sr", "dus", "rr", "read", "write", "x", "cruds ", "crudss", "*",
        ] {
            assert_eq!(Letters::parse_v2(bad), None, "{bad}");
        }
        assert!(letters("rs").contains(Letters::R) && !letters("rs").contains(letters("us")));
        assert_eq!(Letters::R.union(Letters::S), letters("rs"));
        assert_eq!(letters("cruds").intersect(Letters::S), Letters::S);
    }

    #[test]
    fn scopes_are_read_as_smart_says() {
        let p = |s: &str| SmartScope::parse(s, false);
        let got = p("patient/Observation.rs").unwrap();
        assert_eq!(
            (got.context, got.kind.as_deref(), got.letters),
            (Context::Patient, Some("Observation"), letters("rs"))
        );
        assert!(got.constraints.is_empty());
        let got = p("system/*.cruds").unwrap();
        assert_eq!(
            (got.context, got.kind, got.letters),
            (Context::System, None, Letters::ALL)
        );
        assert_eq!(p("user/Appointment.cruds").unwrap().context, Context::User);
        // Not resource scopes: no data.
        for none in [
            "launch",
            "launch/patient",
            "launch/encounter",
            "openid",
            "fhirUser",
            "profile",
            "offline_access",
            "online_access",
            "read:patient-profile",
            "*/*.cruds",
            "*/Observation.rs",
            "Patient/Observation.rs",
            "patient/observation.rs",
            "patient/Observation",
            "patient/Observation.",
            "patient/Observation.sr",
            "patient/Observation.dus",
            "patient/.rs",
            "patient/Obs.1.rs",
            "patient/Observation.rs?",
            "patient/Observation.rs?category",
            "patient/Observation.rs?=x",
            "patient/Observation.rs?category=",
            "patient/Observation.rs?a=1&",
            "patient/Observation.rs?a=%zz",
        ] {
            assert_eq!(p(none), None, "{none}");
        }
    }

    #[test]
    fn v1_only_with_smart_v1() {
        for (v1, v2) in [("read", "rs"), ("write", "cud"), ("*", "cruds")] {
            let scope = format!("user/Observation.{v1}");
            assert_eq!(
                SmartScope::parse(&scope, false),
                None,
                "{scope} without smart_v1"
            );
            let got = SmartScope::parse(&scope, true).unwrap();
            assert_eq!(got.letters, letters(v2), "{scope}");
        }
        // v2 stays v2 with smart_v1 on; v1 had no constraints.
        assert_eq!(
            SmartScope::parse("patient/Observation.rs", true)
                .unwrap()
                .letters,
            letters("rs")
        );
        assert_eq!(
            SmartScope::parse("patient/Observation.read?category=x", true),
            None
        );
        let all = SmartScope::parse("user/*.*", true).unwrap();
        assert_eq!((all.kind, all.letters), (None, Letters::ALL));
    }

    #[test]
    fn constraints_are_decoded_once() {
        // The specification's example.
        let s = SmartScope::parse(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
            false,
        )
        .unwrap();
        assert_eq!(
            s.constraints,
            [(
                "category".to_string(),
                "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".to_string()
            )]
        );
        let s = SmartScope::parse("user/Observation.s?category=a%7Cb&status=final", false).unwrap();
        assert_eq!(
            s.constraints,
            [
                ("category".into(), "a|b".into()),
                ("status".into(), "final".into())
            ]
        );
        // `+` in a scope is a plus sign, not a space.
        let s = SmartScope::parse("user/Observation.s?code=a+b", false).unwrap();
        assert_eq!(s.constraints, [("code".to_string(), "a+b".to_string())]);
    }

    #[test]
    fn names_in_v2_form() {
        assert_eq!(
            SmartScope::name(Context::Patient, Some("Observation"), letters("rs")),
            "patient/Observation.rs"
        );
        assert_eq!(
            SmartScope::name(Context::User, None, Letters::S),
            "user/*.s"
        );
    }
}
