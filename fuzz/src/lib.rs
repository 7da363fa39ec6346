//! What the fuzz targets and the seed generator share: one clock, the issuer
//! and audience, the fixed key set and the tokens signed with it, and the
//! policies the targets decide with.
//!
//! `fixtures/` is written by `examples/seeds.rs` (`make fuzz-seeds`) together
//! with the seed corpora, so keys, tokens and seeds always agree. The targets
//! hold only public keys: a token verifies in a target only if the generator
//! signed it, which is what [`Fixture::signed_by_generator`] checks.

use std::collections::HashSet;
use std::sync::OnceLock;

use phi_guard::config::Policy;
use phi_guard::crypto::Alg;
use phi_guard::jwks::KeySet;

/// The fixed clock of every target (the unit tests' `NOW`).
pub const NOW: i64 = 1_790_000_000;
/// The issuer and audience of the fixture tokens (also those of the shipped policy).
pub const ISS: &str = "https://idp.example.org";
pub const AUD: &str = "https://fhir.example.org";
/// A second trusted issuer whose keys are never available (the "no keys" path).
pub const OTHER_ISS: &str = "https://other.example.org";
/// The HMAC key of the keyed audit chains in the seeds and the audit target.
pub const AUDIT_KEY: &[u8] = b"phi-guard fuzz audit key";

/// The public keys (JWKS) the token and decide targets verify with.
pub const JWKS: &str = include_str!("../fixtures/jwks.json");
/// The policy shipped in envoy/envoy.yaml, extracted by the generator.
pub const SHIPPED_POLICY: &str = include_str!("../fixtures/shipped-policy.json");
/// `name token` per line: every token the generator signed with the fixed keys.
const TOKENS: &str = include_str!("../fixtures/tokens.txt");

/// The token target's policy: every algorithm, roles, and a second provider
/// that takes untyped ES256 tokens but never has keys.
pub const ALL_ALGORITHMS_POLICY: &str = r#"{
  "providers": [
    {"name": "idp", "issuer": "https://idp.example.org",
     "audiences": ["https://fhir.example.org", "https://labs.example.org"],
     "algorithms": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"],
     "jwks": {"uri": "https://idp.example.org/jwks", "cluster": "idp"}},
    {"name": "other", "issuer": "https://other.example.org",
     "audiences": ["https://fhir.example.org"], "algorithms": ["ES256"], "token_types": [],
     "jwks": {"uri": "https://other.example.org/jwks", "cluster": "other"}}
  ],
  "roles_claim": "roles",
  "role_scopes": {"clinician": ["read:labs"], "admin": ["x:all", "admin:users"]}
}"#;

/// Everything a target needs, built once per process.
pub struct Fixture {
    pub keys: KeySet,
    pub all_algorithms: Policy,
    pub shipped: Policy,
    tokens: Vec<(&'static str, &'static str)>,
    /// The signing input (`header.payload`) of every token in `tokens`.
    signed: HashSet<&'static str>,
}

impl Fixture {
    /// The fixture token called `name` (see fixtures/tokens.txt).
    pub fn token(&self, name: &str) -> Option<&'static str> {
        // A linear scan: libFuzzer's comparison tracing then learns the names.
        self.tokens
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    }

    /// Every fixture token, with its name.
    pub fn tokens(&self) -> &[(&'static str, &'static str)] {
        &self.tokens
    }

    /// Whether `token`'s header and payload are bytes the generator signed.
    /// A token that verifies must pass this; anything else is a forgery.
    pub fn signed_by_generator(&self, token: &str) -> bool {
        token
            .rsplit_once('.')
            .is_some_and(|(signed, _)| self.signed.contains(signed))
    }
}

/// The process-wide fixture.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let keys = KeySet::parse(JWKS.as_bytes(), &Alg::ALL).expect("fixtures/jwks.json parses");
        let all_algorithms =
            Policy::from_json(ALL_ALGORITHMS_POLICY.as_bytes()).expect("token policy loads");
        let shipped = Policy::from_json(SHIPPED_POLICY.as_bytes()).expect("shipped policy loads");
        let tokens: Vec<(&str, &str)> = TOKENS
            .lines()
            .filter_map(|line| line.split_once(' '))
            .collect();
        assert!(!tokens.is_empty(), "fixtures/tokens.txt is empty");
        let signed = tokens
            .iter()
            .filter_map(|(_, t)| t.rsplit_once('.').map(|(s, _)| s))
            .collect();
        Fixture {
            keys,
            all_algorithms,
            shipped,
            tokens,
            signed,
        }
    })
}
