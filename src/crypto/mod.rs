//! Signature algorithms and verifying keys. The verifier picks the algorithm
//! from the key it found (RFC 8725 §3.1), never from the token alone.

mod ecdsa;
pub mod rsa;

use std::fmt;

use jwt_compact::alg::Ed25519;
use jwt_compact::{Algorithm, AlgorithmSignature};

pub use self::rsa::{FastRsa, RsaVerifyingKey};
pub use ecdsa::{Es256, Es384};

type P256Key = <Es256 as Algorithm>::VerifyingKey;
type P384Key = <Es384 as Algorithm>::VerifyingKey;
type Ed25519Key = <Ed25519 as Algorithm>::VerifyingKey;

/// The JWS algorithms phi-guard accepts. `none` and every HMAC are absent on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

/// Which kind of key an algorithm needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Alg {
    /// Every supported algorithm, in a stable order.
    pub const ALL: [Alg; 9] = [
        Alg::Rs256,
        Alg::Rs384,
        Alg::Rs512,
        Alg::Ps256,
        Alg::Ps384,
        Alg::Ps512,
        Alg::Es256,
        Alg::Es384,
        Alg::EdDsa,
    ];

    /// Parses a JOSE `alg` name (case-sensitive, as RFC 7518 defines them).
    pub fn from_name(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|alg| alg.name() == name)
    }

    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
        }
    }

    /// The key kind this algorithm verifies with.
    pub fn key_kind(self) -> KeyKind {
        match self {
            Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512 => {
                KeyKind::Rsa
            }
            Alg::Es256 => KeyKind::P256,
            Alg::Es384 => KeyKind::P384,
            Alg::EdDsa => KeyKind::Ed25519,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A public key ready to verify signatures.
#[derive(Clone, Debug)]
pub enum PublicKey {
    Rsa(Box<RsaVerifyingKey>),
    P256(Box<P256Key>),
    P384(Box<P384Key>),
    Ed25519(Box<Ed25519Key>),
}

/// Why key material could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    RsaTooSmall(usize),
    RsaMalformed,
    BadPoint,
    BadLength,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::RsaTooSmall(bits) => write!(f, "RSA modulus of {bits} bits (< 2048)"),
            KeyError::RsaMalformed => f.write_str("malformed RSA key"),
            KeyError::BadPoint => f.write_str("point not on the curve"),
            KeyError::BadLength => f.write_str("wrong key length"),
        }
    }
}

impl PublicKey {
    /// An RSA key from the big-endian modulus and exponent.
    pub fn rsa(n: &[u8], e: &[u8]) -> Result<PublicKey, KeyError> {
        RsaVerifyingKey::from_components(n, e)
            .map(|key| PublicKey::Rsa(Box::new(key)))
            .map_err(|e| match e {
                self::rsa::RsaKeyError::ModulusTooSmall(bits) => KeyError::RsaTooSmall(bits),
                _ => KeyError::RsaMalformed,
            })
    }

    /// An EC key from its affine coordinates; the curve decides the coordinate length.
    pub fn ec(kind: KeyKind, x: &[u8], y: &[u8]) -> Result<PublicKey, KeyError> {
        let len = match kind {
            KeyKind::P256 => 32,
            KeyKind::P384 => 48,
            KeyKind::Rsa | KeyKind::Ed25519 => return Err(KeyError::BadLength),
        };
        if x.len() != len || y.len() != len {
            return Err(KeyError::BadLength);
        }
        let mut sec1 = Vec::with_capacity(1 + 2 * len);
        sec1.push(0x04);
        sec1.extend_from_slice(x);
        sec1.extend_from_slice(y);
        match kind {
            KeyKind::P256 => P256Key::from_sec1_bytes(&sec1)
                .map(|k| PublicKey::P256(Box::new(k)))
                .map_err(|_| KeyError::BadPoint),
            _ => P384Key::from_sec1_bytes(&sec1)
                .map(|k| PublicKey::P384(Box::new(k)))
                .map_err(|_| KeyError::BadPoint),
        }
    }

    /// An Ed25519 key from its 32 bytes.
    pub fn ed25519(x: &[u8]) -> Result<PublicKey, KeyError> {
        if x.len() != 32 {
            return Err(KeyError::BadLength);
        }
        Ed25519Key::from_slice(x)
            .map(|k| PublicKey::Ed25519(Box::new(k)))
            .map_err(|_| KeyError::BadPoint)
    }

    /// The kind of this key.
    pub fn kind(&self) -> KeyKind {
        match self {
            PublicKey::Rsa(_) => KeyKind::Rsa,
            PublicKey::P256(_) => KeyKind::P256,
            PublicKey::P384(_) => KeyKind::P384,
            PublicKey::Ed25519(_) => KeyKind::Ed25519,
        }
    }
}

/// Checks `signature` over `signed` (the token up to its last `.`) with
/// `alg` and `key`. A key of another kind never verifies.
pub fn verify_signature(alg: Alg, key: &PublicKey, signed: &[u8], signature: &[u8]) -> bool {
    fn check<A: Algorithm>(alg: &A, key: &A::VerifyingKey, signed: &[u8], sig: &[u8]) -> bool {
        if A::Signature::LENGTH.is_some_and(|len| len.get() != sig.len()) {
            return false;
        }
        A::Signature::try_from_slice(sig).is_ok_and(|sig| alg.verify_signature(&sig, key, signed))
    }
    match (alg, key) {
        (Alg::Rs256, PublicKey::Rsa(k)) => check(&FastRsa::rs256(), k, signed, signature),
        (Alg::Rs384, PublicKey::Rsa(k)) => check(&FastRsa::rs384(), k, signed, signature),
        (Alg::Rs512, PublicKey::Rsa(k)) => check(&FastRsa::rs512(), k, signed, signature),
        (Alg::Ps256, PublicKey::Rsa(k)) => check(&FastRsa::ps256(), k, signed, signature),
        (Alg::Ps384, PublicKey::Rsa(k)) => check(&FastRsa::ps384(), k, signed, signature),
        (Alg::Ps512, PublicKey::Rsa(k)) => check(&FastRsa::ps512(), k, signed, signature),
        (Alg::Es256, PublicKey::P256(k)) => check(&Es256, k, signed, signature),
        (Alg::Es384, PublicKey::P384(k)) => check(&Es384, k, signed, signature),
        (Alg::EdDsa, PublicKey::Ed25519(k)) => check(&Ed25519, k, signed, signature),
        _ => false,
    }
}

/// ES256 and ES384 against a reference: RustCrypto's 0.13 line (what
/// jwt-compact verified with before `ecdsa.rs`), for random keys, messages and
/// signatures, valid and with one bit flipped in the message or signature
/// (which can land on an `r` or `s` out of range). The two must agree on
/// every one.
#[cfg(test)]
mod differential {
    use super::*;
    use proptest::prelude::*;

    /// A key's coordinates, a signature, and the reference's verifier.
    type Signed = (Vec<u8>, Vec<u8>, Vec<u8>, Box<dyn Fn(&[u8], &[u8]) -> bool>);

    /// Our verdict and the reference's for one (key seed, message, flip).
    fn both(alg: Alg, seed: [u8; 48], msg: &[u8], flip: Option<usize>) -> (bool, bool) {
        let mut msg = msg.to_vec();
        // The same steps on either curve crate of the 0.13 line.
        macro_rules! signed {
            ($curve:ident, $seed:expr) => {{
                use $curve::ecdsa::signature::{Signer, Verifier};
                let sk = $curve::ecdsa::SigningKey::from_slice($seed).unwrap();
                let vk = *sk.verifying_key();
                let sig: $curve::ecdsa::Signature = sk.sign(&msg);
                let point = vk.to_encoded_point(false);
                let reference = move |m: &[u8], s: &[u8]| {
                    $curve::ecdsa::Signature::from_slice(s).is_ok_and(|s| vk.verify(m, &s).is_ok())
                };
                let signed: Signed = (
                    point.x().unwrap().to_vec(),
                    point.y().unwrap().to_vec(),
                    sig.to_bytes().to_vec(),
                    Box::new(reference),
                );
                signed
            }};
        }
        let (x, y, mut sig, reference) = match alg {
            Alg::Es256 => signed!(p256, &seed[..32]),
            _ => signed!(p384, &seed),
        };
        match flip {
            Some(bit) if bit % 2 == 0 && !msg.is_empty() => {
                let at = (bit / 2) % (msg.len() * 8);
                msg[at / 8] ^= 1 << (at % 8);
            }
            Some(bit) => {
                let at = (bit / 2) % (sig.len() * 8);
                sig[at / 8] ^= 1 << (at % 8);
            }
            None => {}
        }
        let key = PublicKey::ec(alg.key_kind(), &x, &y).unwrap();
        (
            verify_signature(alg, &key, &msg, &sig),
            reference(&msg, &sig),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn ecdsa_agrees_with_the_reference(
            p384 in any::<bool>(),
            seed in proptest::array::uniform32(1u8..),
            tail in proptest::array::uniform16(any::<u8>()),
            msg in proptest::collection::vec(any::<u8>(), 0..300),
            flip in proptest::option::of(0usize..10_000),
        ) {
            let alg = if p384 { Alg::Es384 } else { Alg::Es256 };
            let mut key = [0u8; 48];
            key[..32].copy_from_slice(&seed);
            key[32..].copy_from_slice(&tail);
            let (ours, reference) = both(alg, key, &msg, flip);
            prop_assert_eq!(ours, reference, "{} flip {:?}", alg, flip);
            if flip.is_none() {
                prop_assert!(ours, "a valid signature must verify");
            }
        }
    }
}

/// Project Wycheproof's ECDSA (P-256/SHA-256, P-384/SHA-384, raw r||s as JWS
/// has it) and Ed25519 vectors, read from the folder beside the repository
/// (as the RSA ones are in `rsa.rs`). Each public key goes through a JWKS
/// document, as the IdP's would: `valid` must verify, `invalid` must not.
#[cfg(test)]
mod wycheproof {
    use super::*;
    use crate::jwks::KeySet;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::{json, Value};
    use std::path::PathBuf;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The group's public key as a JWK, from the raw key bytes (some groups carry no JWK).
    fn jwk(alg: Alg, key: &Value) -> Value {
        match alg {
            Alg::EdDsa => json!({"kty": "OKP", "crv": "Ed25519", "kid": "w",
                "x": b64(&unhex(key["pk"].as_str().unwrap()))}),
            _ => {
                let point = unhex(key["uncompressed"].as_str().unwrap());
                assert_eq!(point[0], 4, "uncompressed point");
                let (x, y) = point[1..].split_at((point.len() - 1) / 2);
                let crv = if alg == Alg::Es256 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "kid": "w", "x": b64(x), "y": b64(y)})
            }
        }
    }

    fn run(file: &str, alg: Alg) -> (usize, usize) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/vectors/wycheproof")
            .join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let doc: Value = serde_json::from_str(&text).unwrap();
        let (mut valid, mut invalid) = (0, 0);
        for group in doc["testGroups"].as_array().unwrap() {
            let jwks = json!({"keys": [jwk(alg, &group["publicKey"])]}).to_string();
            let set = KeySet::parse(jwks.as_bytes(), &[alg])
                .unwrap_or_else(|e| panic!("{file}: key refused: {e}"));
            let keys = set.select(Some("w"), alg).unwrap();
            let [key] = keys.as_slice() else {
                panic!("{file}: one key")
            };
            for case in group["tests"].as_array().unwrap() {
                let msg = unhex(case["msg"].as_str().unwrap());
                let sig = unhex(case["sig"].as_str().unwrap());
                let ours = verify_signature(alg, &key.key, &msg, &sig);
                let id = case["tcId"].as_u64().unwrap();
                let comment = case["comment"].as_str().unwrap_or("");
                match case["result"].as_str().unwrap() {
                    "valid" => {
                        assert!(ours, "{file} #{id} ({comment}) must verify");
                        valid += 1;
                    }
                    "invalid" => {
                        assert!(!ours, "{file} #{id} ({comment}) must be refused");
                        invalid += 1;
                    }
                    other => panic!("{file} #{id}: result {other}"),
                }
            }
        }
        println!("{file}: {valid} valid, {invalid} invalid");
        (valid, invalid)
    }

    #[test]
    fn ecdsa_p256_sha256() {
        let (valid, invalid) = run("ecdsa_secp256r1_sha256_p1363_test.json", Alg::Es256);
        assert!(
            valid > 100 && invalid > 50,
            "{valid} valid, {invalid} invalid"
        );
    }

    #[test]
    fn ecdsa_p384_sha384() {
        let (valid, invalid) = run("ecdsa_secp384r1_sha384_p1363_test.json", Alg::Es384);
        assert!(
            valid > 100 && invalid > 50,
            "{valid} valid, {invalid} invalid"
        );
    }

    #[test]
    fn ed25519() {
        let (valid, invalid) = run("ed25519_test.json", Alg::EdDsa);
        assert!(
            valid > 50 && invalid > 50,
            "{valid} valid, {invalid} invalid"
        );
    }
}
