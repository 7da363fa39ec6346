//! Shared fixtures for the unit tests: keys made in the test, a JWKS for them,
//! a policy, and hand-built JWS tokens (so headers can be anything).

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_compact::alg::{Ed25519, Es256, Rsa, RsaPrivateKey};
use jwt_compact::{Algorithm, AlgorithmSignature};
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};

use crate::config::Policy;
use crate::crypto::Alg;
use crate::jwks::KeySet;

/// The fixed clock of every unit test.
pub const NOW: i64 = 1_790_000_000;
pub const ISS: &str = "https://idp.example.org";
pub const AUD: &str = "https://fhir.example.org";

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum SigningKey {
    Rsa(RsaPrivateKey),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Ed25519(ed25519_compact::KeyPair),
}

/// A signing key with its `kid` and the algorithm it signs with.
pub struct Signer {
    pub alg: &'static str,
    pub kid: String,
    key: SigningKey,
}

fn rsa_key(slot: usize) -> RsaPrivateKey {
    static KEYS: OnceLock<Vec<RsaPrivateKey>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        (0..3)
            .map(|_| RsaPrivateKey::new(&mut rng, 2048).unwrap())
            .collect()
    });
    keys[slot].clone()
}

impl Signer {
    /// An RSA signer with test key number `slot` (0..3).
    pub fn rsa(alg: &'static str, kid: &str, slot: usize) -> Signer {
        Signer {
            alg,
            kid: kid.into(),
            key: SigningKey::Rsa(rsa_key(slot)),
        }
    }

    pub fn es256(kid: &str, seed: u8) -> Signer {
        let key = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
        Signer {
            alg: "ES256",
            kid: kid.into(),
            key: SigningKey::P256(key),
        }
    }

    pub fn es384(kid: &str, seed: u8) -> Signer {
        let key = p384::ecdsa::SigningKey::from_slice(&[seed; 48]).unwrap();
        Signer {
            alg: "ES384",
            kid: kid.into(),
            key: SigningKey::P384(key),
        }
    }

    pub fn ed25519(kid: &str, seed: u8) -> Signer {
        let pair = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([seed; 32]));
        Signer {
            alg: "EdDSA",
            kid: kid.into(),
            key: SigningKey::Ed25519(pair),
        }
    }

    /// The public JWK, with `alg` bound.
    pub fn jwk(&self) -> Value {
        match &self.key {
            SigningKey::Rsa(k) => json!({"kty": "RSA", "kid": self.kid, "alg": self.alg,
                "n": b64(&k.n().to_bytes_be()), "e": b64(&k.e().to_bytes_be())}),
            SigningKey::P256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "alg": self.alg,
                    "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            SigningKey::P384(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-384", "kid": self.kid, "alg": self.alg,
                    "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            SigningKey::Ed25519(k) => json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid,
                "alg": self.alg, "x": b64(k.pk.as_ref())}),
        }
    }

    /// A token with header {alg, kid, typ: at+jwt} plus `header` overrides.
    pub fn sign(&self, claims: &Value, header: &[(&str, Value)]) -> String {
        let mut h = json!({"alg": self.alg, "kid": self.kid, "typ": "at+jwt"});
        for (k, v) in header {
            h[*k] = v.clone();
        }
        self.sign_raw(&h, &claims.to_string())
    }

    /// Signs with this key but states (and uses) another algorithm of its family.
    pub fn sign_as(&self, alg: &str, claims: &Value) -> String {
        let h = json!({"alg": alg, "kid": self.kid, "typ": "at+jwt"});
        let signed = format!(
            "{}.{}",
            b64(h.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let SigningKey::Rsa(k) = &self.key else {
            panic!("sign_as is for RSA")
        };
        let alg: Rsa = alg.parse().unwrap();
        let sig = alg.sign(k, signed.as_bytes());
        format!("{signed}.{}", b64(&sig.as_bytes()))
    }

    pub fn sign_raw(&self, header: &Value, body: &str) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(body.as_bytes())
        );
        let m = signed.as_bytes();
        let sig: Vec<u8> = match &self.key {
            SigningKey::Rsa(k) => {
                let alg: Rsa = self.alg.parse().unwrap();
                alg.sign(k, m).as_bytes().to_vec()
            }
            SigningKey::P256(k) => Es256.sign(k, m).as_bytes().to_vec(),
            SigningKey::P384(k) => {
                use p384::ecdsa::signature::Signer as _;
                let sig: p384::ecdsa::Signature = k.sign(m);
                sig.to_bytes().to_vec()
            }
            SigningKey::Ed25519(k) => Ed25519.sign(&k.sk, m).as_bytes().to_vec(),
        };
        format!("{signed}.{}", b64(&sig))
    }
}

/// A token from raw parts, unsigned or with the given (base64url) signature.
pub fn raw_token(header: &Value, body: &str, sig_b64: &str) -> String {
    format!(
        "{}.{}.{sig_b64}",
        b64(header.to_string().as_bytes()),
        b64(body.as_bytes())
    )
}

/// An HS256 token keyed with `secret` (the HMAC-confusion attack).
pub fn hs256_token(header: &Value, body: &str, secret: Vec<u8>) -> String {
    use sha2::{Digest, Sha256};
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(body.as_bytes())
    );
    let mut key = secret;
    if key.len() > 64 {
        key = Sha256::digest(&key).to_vec();
    }
    key.resize(64, 0);
    let ipad: Vec<u8> = key.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = key.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(signed.as_bytes())
        .finalize();
    let mac = Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize();
    format!("{signed}.{}", b64(&mac))
}

/// The token with one bit of its signature flipped.
pub fn flip_last_sig_char(token: &str) -> String {
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    bytes[0] ^= 1;
    format!("{signed}.{}", b64(&bytes))
}

/// One key per algorithm family, their key set, and a policy trusting them.
pub struct Kit {
    pub rs256: Signer,
    pub ps256: Signer,
    pub es256: Signer,
    pub es384: Signer,
    pub eddsa: Signer,
    pub keys: KeySet,
}

impl Kit {
    pub fn new() -> Kit {
        let kit_signers = [
            Signer::rsa("RS256", "rs-1", 0),
            Signer::rsa("PS256", "ps-1", 1),
            Signer::es256("es-1", 1),
            Signer::es384("es384-1", 2),
            Signer::ed25519("ed-1", 3),
        ];
        let jwks = json!({"keys": kit_signers.iter().map(Signer::jwk).collect::<Vec<_>>()});
        let keys = KeySet::parse(jwks.to_string().as_bytes(), &Alg::ALL).unwrap();
        let [rs256, ps256, es256, es384, eddsa] = kit_signers;
        Kit {
            rs256,
            ps256,
            es256,
            es384,
            eddsa,
            keys,
        }
    }

    pub fn signers(&self) -> [&Signer; 5] {
        [
            &self.rs256,
            &self.ps256,
            &self.es256,
            &self.es384,
            &self.eddsa,
        ]
    }

    /// The RSA public key's SPKI DER: the classic HS256-confusion secret.
    pub fn rs256_public_der(&self) -> Vec<u8> {
        use rsa::pkcs8::EncodePublicKey;
        let SigningKey::Rsa(k) = &self.rs256.key else {
            panic!("rs256 is an RSA key")
        };
        k.to_public_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    /// Valid claims at NOW: iss, aud, sub, scope, iat, exp.
    pub fn claims(&self) -> Value {
        json!({"iss": ISS, "aud": AUD, "sub": "user-1", "client_id": "app-1",
            "jti": "j-1", "scope": "read:patient-profile", "iat": NOW - 10, "exp": NOW + 600})
    }

    /// The test policy document with `rules` (JSON values).
    pub fn policy_json(&self, rules: &[Value]) -> Value {
        json!({
            "providers": [{
                "name": "idp", "issuer": ISS, "audiences": [AUD],
                "algorithms": ["RS256", "PS256", "ES256", "ES384", "EdDSA"],
                "jwks": {"uri": "http://idp/jwks", "cluster": "idp"}
            }],
            "rules": rules,
        })
    }

    pub fn policy(&self, rules: &[Value]) -> Policy {
        Policy::from_json(self.policy_json(rules).to_string().as_bytes()).unwrap()
    }

    pub fn policy_with(&self, edit: impl FnOnce(&mut Value)) -> Policy {
        let mut doc = self.policy_json(&[]);
        edit(&mut doc);
        Policy::from_json(doc.to_string().as_bytes()).unwrap()
    }
}
