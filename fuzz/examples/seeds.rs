//! Writes fuzz/fixtures/ and every seed corpus under fuzz/corpus/.
//!
//! Run from the repository root with `make fuzz-seeds`. Deterministic: keys
//! come from fixed seeds and PSS salts from a seeded generator, so a rerun
//! rewrites the same bytes, and `git status` shows only what a change to this
//! file changed. Each corpus directory is emptied first: a seed that matters
//! (a crash found by fuzzing, say) is added here, not by hand.

use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use phi_guard::audit::{rfc3339_millis, AuditChain, AuditRecord};
use phi_guard_fuzz::{ALL_ALGORITHMS_POLICY, AUD, AUDIT_KEY, ISS, NOW, OTHER_ISS};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer as _};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use sha2::{Sha256, Sha384, Sha512};

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum Key {
    Rsa(Box<RsaPrivateKey>),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Ed25519(ed25519_compact::KeyPair),
}

/// A fixture key: its `kid`, the JWK `alg` it is bound to (if any), the key.
struct Signer {
    kid: &'static str,
    bound: Option<&'static str>,
    key: Key,
}

impl Signer {
    fn jwk(&self) -> Value {
        let mut jwk = match &self.key {
            Key::Rsa(k) => json!({"kty": "RSA", "n": b64(&k.n().to_bytes_be()),
                                  "e": b64(&k.e().to_bytes_be())}),
            Key::P256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "x": b64(p.x().expect("x")),
                       "y": b64(p.y().expect("y"))})
            }
            Key::P384(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-384", "x": b64(p.x().expect("x")),
                       "y": b64(p.y().expect("y"))})
            }
            Key::Ed25519(k) => json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.pk.as_ref())}),
        };
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        if let Some(alg) = self.bound {
            jwk["alg"] = json!(alg);
        }
        jwk
    }

    /// Signs `header.payload` as `alg` (which must suit the key).
    fn sign(&self, alg: &str, signing_input: &[u8], rng: &mut StdRng) -> Vec<u8> {
        use rsa::{pkcs1v15, pss};
        match (&self.key, alg) {
            (Key::Rsa(k), "RS256") => pkcs1v15::SigningKey::<Sha256>::new((**k).clone())
                .sign(signing_input)
                .to_vec(),
            (Key::Rsa(k), "RS384") => pkcs1v15::SigningKey::<Sha384>::new((**k).clone())
                .sign(signing_input)
                .to_vec(),
            (Key::Rsa(k), "RS512") => pkcs1v15::SigningKey::<Sha512>::new((**k).clone())
                .sign(signing_input)
                .to_vec(),
            // The salt is as long as the hash, as RFC 7518 §3.5 requires.
            (Key::Rsa(k), "PS256") => pss::SigningKey::<Sha256>::new((**k).clone())
                .sign_with_rng(rng, signing_input)
                .to_vec(),
            (Key::Rsa(k), "PS384") => pss::SigningKey::<Sha384>::new((**k).clone())
                .sign_with_rng(rng, signing_input)
                .to_vec(),
            (Key::Rsa(k), "PS512") => pss::SigningKey::<Sha512>::new((**k).clone())
                .sign_with_rng(rng, signing_input)
                .to_vec(),
            (Key::P256(k), "ES256") => {
                let sig: p256::ecdsa::Signature = k.sign(signing_input);
                sig.to_bytes().to_vec()
            }
            (Key::P384(k), "ES384") => {
                let sig: p384::ecdsa::Signature = k.sign(signing_input);
                sig.to_bytes().to_vec()
            }
            (Key::Ed25519(k), "EdDSA") => k.sk.sign(signing_input, None).to_vec(),
            _ => panic!("{} cannot sign {alg}", self.kid),
        }
    }
}

fn rsa_key(seed: u64, bits: usize) -> Key {
    let mut rng = StdRng::seed_from_u64(seed);
    Key::Rsa(Box::new(
        RsaPrivateKey::new(&mut rng, bits).expect("RSA key generation"),
    ))
}

/// The fixture keys: RSA 2048 bound to RS256, RSA 3072 unbound (any RS*/PS*),
/// P-256, P-384 and Ed25519, each bound to its algorithm.
fn signers() -> Vec<Signer> {
    vec![
        Signer {
            kid: "rs-1",
            bound: Some("RS256"),
            key: rsa_key(1, 2048),
        },
        Signer {
            kid: "ps-1",
            bound: None,
            key: rsa_key(2, 3072),
        },
        Signer {
            kid: "es-1",
            bound: Some("ES256"),
            key: Key::P256(p256::ecdsa::SigningKey::from_slice(&[3; 32]).expect("P-256 key")),
        },
        Signer {
            kid: "es384-1",
            bound: Some("ES384"),
            key: Key::P384(p384::ecdsa::SigningKey::from_slice(&[4; 48]).expect("P-384 key")),
        },
        Signer {
            kid: "ed-1",
            bound: Some("EdDSA"),
            key: Key::Ed25519(ed25519_compact::KeyPair::from_seed(
                ed25519_compact::Seed::new([5; 32]),
            )),
        },
    ]
}

/// Valid claims at NOW for the shipped policy's `patient-read` rule.
fn base_claims() -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": "user-1", "client_id": "app-1", "jti": "j-1",
           "scope": "read:patient-profile", "iat": NOW - 10, "exp": NOW + 600})
}

/// `changes` applied to `base`: a `null` value removes the member.
fn edited(base: Value, changes: &Value) -> Value {
    let mut out = base;
    if let (Some(out), Some(changes)) = (out.as_object_mut(), changes.as_object()) {
        for (k, v) in changes {
            if v.is_null() {
                out.remove(k);
            } else {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// One fixture token: signed by `kid` as `alg`, with header and claim edits.
struct TokenSpec {
    name: &'static str,
    kid: &'static str,
    alg: &'static str,
    header: Value,
    claims: Value,
}

fn spec(name: &'static str, kid: &'static str, alg: &'static str, claims: Value) -> TokenSpec {
    TokenSpec {
        name,
        kid,
        alg,
        header: json!({}),
        claims,
    }
}

fn token_specs() -> Vec<TokenSpec> {
    let mfa = "urn:example:loa:mfa";
    let mut specs = vec![
        // One per algorithm the fixture keys can sign.
        spec("rs256", "rs-1", "RS256", json!({})),
        spec("rs384", "ps-1", "RS384", json!({})),
        spec("rs512", "ps-1", "RS512", json!({})),
        spec("ps256", "ps-1", "PS256", json!({})),
        spec("ps384", "ps-1", "PS384", json!({})),
        spec("ps512", "ps-1", "PS512", json!({})),
        spec("es256", "es-1", "ES256", json!({})),
        spec("es384", "es384-1", "ES384", json!({})),
        spec("eddsa", "ed-1", "EdDSA", json!({})),
        // The shipped rules' branches.
        spec(
            "export-mfa",
            "es-1",
            "ES256",
            json!({"scope": "export:bulk", "acr": mfa, "amr": ["pwd", "mfa"], "auth_time": NOW - 60}),
        ),
        spec(
            "export-no-acr",
            "rs-1",
            "RS256",
            json!({"scope": "export:bulk"}),
        ),
        spec(
            "export-old-auth",
            "ed-1",
            "EdDSA",
            json!({"scope": "export:bulk", "acr": mfa, "auth_time": NOW - 1000}),
        ),
        spec(
            "billing",
            "ed-1",
            "EdDSA",
            json!({"scope": null, "scp": ["update:billing"], "aud": ["https://x.example.org", AUD]}),
        ),
        spec(
            "lab-fresh",
            "es-1",
            "ES256",
            json!({"scope": "delete:lab-results"}),
        ),
        spec(
            "lab-old",
            "es-1",
            "ES256",
            json!({"scope": "delete:lab-results", "iat": NOW - 1000}),
        ),
        spec(
            "wildcard",
            "rs-1",
            "RS256",
            json!({"scope": "* read:all patient/*.* export:bulk"}),
        ),
        spec(
            "roles",
            "ps-1",
            "PS256",
            json!({"scope": "openid", "roles": ["clinician", "nurse", "admin"]}),
        ),
        spec(
            "scp-string",
            "es384-1",
            "ES384",
            json!({"scope": null, "scp": "read:patient-profile", "azp": "app-2", "client_id": null}),
        ),
        spec(
            "long-claims",
            "ed-1",
            "EdDSA",
            json!({"sub": "s".repeat(300), "jti": "j-\u{e9}\u{2028}\u{1f600}-".repeat(40),
                   "amr": (0..70).map(|i| format!("m{i}")).collect::<Vec<_>>()}),
        ),
        // Refused for one claim each, correctly signed.
        spec(
            "expired",
            "rs-1",
            "RS256",
            json!({"iat": NOW - 700, "exp": NOW - 120}),
        ),
        spec(
            "not-yet-valid",
            "es-1",
            "ES256",
            json!({"nbf": NOW + 600, "exp": NOW + 1200}),
        ),
        spec(
            "iat-future",
            "es-1",
            "ES256",
            json!({"iat": NOW + 600, "exp": NOW + 1200}),
        ),
        spec("no-exp", "ed-1", "EdDSA", json!({"exp": null})),
        spec(
            "lifetime-too-long",
            "rs-1",
            "RS256",
            json!({"exp": NOW + 3700}),
        ),
        spec(
            "wrong-aud",
            "es-1",
            "ES256",
            json!({"aud": "https://evil.example.org"}),
        ),
        spec("no-aud", "es-1", "ES256", json!({"aud": null})),
        spec(
            "unknown-iss",
            "es-1",
            "ES256",
            json!({"iss": "https://evil.example.org"}),
        ),
        spec("no-iss", "es-1", "ES256", json!({"iss": null})),
        spec("other-iss", "es-1", "ES256", json!({"iss": OTHER_ISS})),
        spec("exp-string", "es-1", "ES256", json!({"exp": "soon"})),
    ];
    let with_header = |name, kid, alg, header: Value| TokenSpec {
        name,
        kid,
        alg,
        header,
        claims: json!({}),
    };
    specs.extend([
        with_header("typ-jwt", "es-1", "ES256", json!({"typ": "JWT"})),
        with_header(
            "typ-app",
            "ed-1",
            "EdDSA",
            json!({"typ": "application/AT+JWT"}),
        ),
        with_header("typ-id", "es-1", "ES256", json!({"typ": "id+jwt"})),
        with_header("no-typ", "es-1", "ES256", json!({"typ": null})),
        with_header("crit", "es-1", "ES256", json!({"crit": ["exp"]})),
        with_header("no-kid-es256", "es-1", "ES256", json!({"kid": null})),
        with_header("no-kid-rs256", "rs-1", "RS256", json!({"kid": null})),
        with_header("unknown-kid", "es-1", "ES256", json!({"kid": "nobody"})),
        // rs-1 is bound to RS256: the key refuses PS256 whatever the signature.
        with_header("ps256-on-rs256-key", "rs-1", "PS256", json!({})),
        // An ES256 token naming the RSA key.
        with_header("es256-rsa-kid", "es-1", "ES256", json!({"kid": "rs-1"})),
    ]);
    specs
}

fn sign_token(signers: &[Signer], spec: &TokenSpec, rng: &mut StdRng) -> String {
    let signer = signers
        .iter()
        .find(|s| s.kid == spec.kid)
        .expect("known kid");
    let header = edited(
        json!({"alg": spec.alg, "kid": spec.kid, "typ": "at+jwt"}),
        &spec.header,
    );
    let claims = edited(base_claims(), &spec.claims);
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = signer.sign(spec.alg, signing_input.as_bytes(), rng);
    format!("{signing_input}.{}", b64(&sig))
}

/// The policy from envoy/envoy.yaml: the block scalar after `value: |`.
fn shipped_policy(envoy_yaml: &str) -> String {
    let mut lines = envoy_yaml.lines();
    let start = lines
        .by_ref()
        .find(|l| l.trim() == "value: |")
        .expect("envoy.yaml holds the policy as `value: |`");
    let outer = start.len() - start.trim_start().len();
    let block: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .collect();
    let indent = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut text: String = block
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    serde_json::from_str::<Value>(&text).expect("the shipped policy is JSON");
    text
}

/// Writes the seeds of one target, after emptying its directory.
struct Corpus {
    dir: PathBuf,
    count: usize,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Corpus {
        let dir = root.join("corpus").join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("empty corpus dir");
        }
        fs::create_dir_all(&dir).expect("create corpus dir");
        Corpus { dir, count: 0 }
    }

    fn add(&mut self, name: &str, bytes: impl AsRef<[u8]>) {
        let path = self.dir.join(name);
        assert!(!path.exists(), "two seeds named {name}");
        fs::write(path, bytes).expect("write seed");
        self.count += 1;
    }
}

fn token_corpus(root: &Path, tokens: &[(String, String)], rng: &mut StdRng) -> usize {
    let mut c = Corpus::new(root, "token");
    let get = |name: &str| {
        tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .expect("fixture token")
    };
    for (name, token) in tokens {
        c.add(name, format!("Bearer {token}"));
    }
    // The same tokens as JSON parts, which the target encodes: they still verify.
    for name in [
        "rs256",
        "ps384",
        "es256",
        "es384",
        "eddsa",
        "export-mfa",
        "roles",
        "billing",
    ] {
        let token = get(name);
        let mut parts = token.split('.');
        let mut json_part = || {
            let bytes = URL_SAFE_NO_PAD
                .decode(parts.next().expect("part"))
                .expect("base64");
            String::from_utf8(bytes).expect("JSON")
        };
        let (header, claims) = (json_part(), json_part());
        let sig = parts.next().expect("signature");
        c.add(
            &format!("json-{name}"),
            format!("{header}\t{claims}\t{sig}"),
        );
    }
    // Several tokens through one cache of two: hits, misses and eviction.
    c.add(
        "cache-round-robin",
        [
            "es256", "rs256", "es256", "eddsa", "rs256", "es256", "ps256",
        ]
        .map(|n| format!("Bearer {}", get(n)))
        .join("\n"),
    );
    let es = get("es256");
    c.add("scheme-case-and-tabs", format!("bEaReR\t \t{es}  "));
    c.add("raw-token-no-scheme", es.clone());
    c.add("two-credentials", format!("Bearer {es},Bearer {es}"));
    c.add("space-in-token", format!("Bearer {es} x"));
    c.add("basic", "Basic dXNlcjpwdw==");
    c.add("bearer-empty", "Bearer ");
    c.add("oversized", format!("Bearer {}", "A".repeat(8300)));
    // Forgeries: the oracle in the target is that none of these verifies.
    let (signed, sig) = es.rsplit_once('.').expect("three parts");
    let (header, body) = signed.split_once('.').expect("three parts");
    let mut flipped = URL_SAFE_NO_PAD.decode(sig).expect("base64 signature");
    flipped[0] ^= 1;
    c.add(
        "flipped-signature",
        format!("Bearer {signed}.{}", b64(&flipped)),
    );
    c.add("no-signature", format!("Bearer {signed}."));
    c.add("four-parts", format!("Bearer {es}.{sig}"));
    let none = b64(br#"{"alg":"none","kid":"es-1","typ":"at+jwt"}"#);
    c.add("alg-none", format!("Bearer {none}.{body}."));
    // HS256 keyed with the RSA key's JWK `n`: the classic confusion.
    let hs = b64(br#"{"alg":"HS256","kid":"rs-1","typ":"at+jwt"}"#);
    let mut mac = [0u8; 32];
    rng.fill_bytes(&mut mac);
    c.add("alg-hs256", format!("Bearer {hs}.{body}.{}", b64(&mac)));
    let rs = get("rs256");
    let (_, rs_sig) = rs.rsplit_once('.').expect("three parts");
    c.add("signature-swapped", format!("Bearer {signed}.{rs_sig}"));
    c.add("header-only", format!("Bearer {header}"));
    c.add("not-base64", "Bearer \u{e9}.\u{e9}.\u{e9}");
    c.add("json-junk", format!("Bearer {}.e30.", b64(b"[]")));
    c.count
}

fn jwks_corpus(root: &Path, jwks: &Value, rng: &mut StdRng) -> usize {
    let mut c = Corpus::new(root, "jwks");
    let keys = jwks["keys"].as_array().expect("keys").clone();
    let doc = |keys: Vec<Value>| json!({ "keys": keys }).to_string();
    c.add("fixture", jwks.to_string());
    c.add(
        "fixture-pretty",
        serde_json::to_string_pretty(jwks).expect("json"),
    );
    for k in &keys {
        c.add(
            &format!("one-{}", k["kid"].as_str().expect("kid")),
            doc(vec![k.clone()]),
        );
    }
    let rsa = keys[0].clone();
    let ed = keys[4].clone();
    let with = |k: &Value, changes: Value| edited(k.clone(), &changes);
    let padded = format!("{}==", rsa["e"].as_str().expect("e"));
    c.add("rsa-padded-e", doc(vec![with(&rsa, json!({"e": padded}))]));
    let n = URL_SAFE_NO_PAD
        .decode(rsa["n"].as_str().expect("n"))
        .expect("n");
    let mut zero_n = vec![0u8];
    zero_n.extend(&n);
    c.add(
        "rsa-leading-zero",
        doc(vec![with(&rsa, json!({"n": b64(&zero_n)}))]),
    );
    // Moduli that need not be real keys: the verifier takes any odd one in range.
    let modulus = |bits: usize, rng: &mut StdRng| {
        let mut bytes = vec![0u8; bits.div_ceil(8)];
        rng.fill_bytes(&mut bytes);
        let top = bits % 8;
        bytes[0] = if top == 0 {
            bytes[0] | 0x80
        } else {
            (bytes[0] | 1 << (top - 1)) & ((1 << top) - 1)
        };
        *bytes.last_mut().expect("bytes") |= 1;
        b64(&bytes)
    };
    for (name, bits, e) in [
        ("rsa-random-2048-e3", 2048, vec![3u8]),
        ("rsa-random-2049", 2049, vec![1, 0, 1]),
        ("rsa-random-4096", 4096, vec![1, 0, 1]),
        ("rsa-random-8192", 8192, vec![1, 0, 1]),
        ("rsa-random-8193", 8193, vec![1, 0, 1]),
        ("rsa-random-2047", 2047, vec![1, 0, 1]),
        ("rsa-e-2pow33-plus-1", 2048, vec![2, 0, 0, 0, 1]),
        ("rsa-e-even", 2048, vec![1, 0, 0]),
        ("rsa-e-one", 2048, vec![1]),
    ] {
        let n = modulus(bits, rng);
        c.add(
            name,
            doc(vec![
                json!({"kty": "RSA", "kid": name, "n": n, "e": b64(&e)}),
            ]),
        );
    }
    let even = {
        let mut n = n.clone();
        *n.last_mut().expect("n") &= 0xfe;
        b64(&n)
    };
    c.add("rsa-even", doc(vec![with(&rsa, json!({"n": even}))]));
    c.add(
        "rsa-1024",
        doc(vec![with(&rsa, json!({"n": b64(&n[..128])}))]),
    );
    c.add("private-key", doc(vec![with(&ed, json!({"d": "AAAA"}))]));
    c.add(
        "encryption-key",
        doc(vec![with(&ed, json!({"use": "enc"})), rsa.clone()]),
    );
    c.add(
        "skipped-kinds",
        doc(vec![
            json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h", "alg": "HS256"}),
            json!({"kty": "OKP", "crv": "X25519", "x": b64(&[9; 32])}),
            json!({"kty": "EC", "crv": "secp256k1", "x": b64(&[1; 32]), "y": b64(&[2; 32])}),
            json!({"kty": "EC", "crv": "P-521", "x": b64(&[1; 66]), "y": b64(&[2; 66])}),
            ed.clone(),
        ]),
    );
    c.add("misbound", doc(vec![with(&ed, json!({"alg": "RS256"}))]));
    c.add(
        "unknown-alg",
        doc(vec![with(&rsa, json!({"alg": "RSA-OAEP"})), ed.clone()]),
    );
    c.add("no-kty", doc(vec![with(&ed, json!({"kty": null}))]));
    c.add(
        "ec-off-curve",
        doc(vec![
            json!({"kty": "EC", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[2; 32])}),
        ]),
    );
    c.add(
        "ec-short",
        doc(vec![with(&keys[2], json!({"x": b64(&[1; 31])}))]),
    );
    c.add(
        "duplicate-kids",
        doc(vec![
            with(&rsa, json!({"kid": "k"})),
            with(&keys[2], json!({"kid": "k"})),
            with(&ed, json!({"kid": "k", "alg": null})),
        ]),
    );
    c.add(
        "too-many-keys",
        doc((0..65)
            .map(|i| with(&ed, json!({"kid": format!("e{i}")})))
            .collect()),
    );
    c.add("empty-set", doc(vec![]));
    c.add("not-a-set", r#"{"keys": 3}"#);
    c.add("html", "<html><body>502 Bad Gateway</body></html>");
    c.count
}

fn path_corpus(root: &Path, shipped: &Value) -> usize {
    let mut c = Corpus::new(root, "path");
    let templates: Vec<String> = shipped["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["path"].as_str().expect("path").to_owned())
        .chain(
            [
                "/",
                "/**",
                "/*",
                "/fhir/",
                "/files/{path=**}",
                "/a/{x=b/*}/c",
                "/{a}/{b}/{c}/{d}/{e}",
                "/caf%C3%A9/%24x",
                "/%2541",
                "/a;b/(c)/~d",
            ]
            .map(String::from),
        )
        .collect();
    // Each with a path that matches it, as the first seeds.
    let paths = [
        "/healthz",
        "/fhir/$export",
        "/fhir/Patient/$export",
        "/fhir/Group/g1/$export",
        "/fhir/bulkstatus/job-1",
        "/fhir/bulkfiles/a/b.ndjson",
        "/fhir/Patient/123",
        "/billing/acct-9",
        "/labs/7",
        "/",
        "/x/y/",
        "/x",
        "/fhir/",
        "/files/",
        "/a/b/q/c",
        "/1/2/3/4/5",
        "/caf%C3%A9/$x",
        "/%2541",
        "/a;b/(c)/~d",
    ];
    for (i, template) in templates.iter().enumerate() {
        let other = &templates[(i + 1) % templates.len()];
        let path = paths.get(i).copied().unwrap_or("/");
        c.add(
            &format!("template-{i:02}"),
            format!("{template}\n{other}\n{path}"),
        );
    }
    // Paths that must be refused or that only look dangerous.
    let tricky = [
        "/a%2Fb",
        "/a%252Fb",
        "/a%25%32%66b",
        "/a%5cb",
        "/a\\b",
        "/a/../b",
        "/a/%2e%2E/b",
        "/public/..;/admin",
        "/a/%252e%252e/b",
        "/a%00b",
        "/a%0d%0aX-Injected:1",
        "/a%C2%85b",
        "/a%",
        "/%C0%AF",
        "/a//b",
        "a/b",
        "/fhir/%24export",
        "/fhir/Patient/123?_format=json&access_token=x#frag",
        "/a?%61ccess_token=x",
        "/a/.../b",
        "/\u{e9}/\u{fffd}",
    ];
    for (i, path) in tricky.iter().enumerate() {
        let a = &templates[i % templates.len()];
        let b = &templates[(i + 3) % templates.len()];
        c.add(&format!("tricky-{i:02}"), format!("{a}\n{b}\n{path}"));
    }
    // Templates the config refuses.
    for (i, bad) in [
        "/fhir/{id}.json",
        "/**/x",
        "/a/{x}/{x}",
        "/a/{1x}",
        "/a//b",
        "/a/%2F",
        "/a/..",
        "/{a=}",
        "/a*b",
        "fhir",
    ]
    .iter()
    .enumerate()
    {
        c.add(&format!("bad-template-{i:02}"), format!("{bad}\n/**\n/a"));
    }
    c.count
}

fn policy_corpus(root: &Path, shipped: &str) -> usize {
    let mut c = Corpus::new(root, "policy");
    c.add("shipped", shipped);
    c.add("all-algorithms", ALL_ALGORITHMS_POLICY);
    let base: Value = serde_json::from_str(shipped).expect("json");
    let with = |changes: Value| edited(base.clone(), &changes).to_string();
    let rules = base["rules"].as_array().expect("rules").clone();
    let mut swapped = rules.clone();
    // The old bug: the patient read rule first hides the Patient $export rule.
    let read = swapped
        .iter()
        .position(|r| r["id"] == "patient-read")
        .expect("rule");
    let moved = swapped.remove(read);
    swapped.insert(0, moved);
    c.add("shadowed-rule", with(json!({ "rules": swapped })));
    c.add(
        "design-example",
        r#"{"providers":[{"name":"hospital-idp","issuer":"https://idp.example.org",
"audiences":["https://fhir.example.org"],"algorithms":["RS256","PS256","ES256","EdDSA"],
"jwks":{"uri":"https://idp.example.org/.well-known/jwks.json","cluster":"idp_jwks",
"timeout_ms":2000,"cache_seconds":300,"max_stale_seconds":3600}}],
"clock_skew_seconds":60,"max_token_lifetime_seconds":3600,"forward_token":false,
"deny_wildcard_scopes":true,"rules":[
{"id":"health","path":"/healthz","public":true},
{"id":"patient-read","methods":["GET"],"path":"/fhir/Patient/{id}","scopes":["read:patient-profile"]},
{"id":"billing-update","methods":["PUT","PATCH"],"path":"/billing/{account}","scopes":["update:billing"]},
{"id":"lab-delete","methods":["DELETE"],"path":"/labs/{id}","scopes":["delete:lab-results"],"max_token_age_seconds":300},
{"id":"bulk-export","methods":["GET"],"path":"/fhir/$export","scopes":["export:bulk"],
 "step_up":{"acr_values":["urn:example:loa:mfa"],"max_age_seconds":300}}]}"#,
    );
    c.add(
        "everything",
        with(json!({
            "realm": "hospital", "forward_token": true, "deny_wildcard_scopes": false,
            "verified_token_cache_size": 0, "clock_skew_seconds": 300,
            "claims_to_headers": {"sub": "x-phi-subject", "iss": "x-phi-iss", "azp": "x-phi-azp",
                                  "jti": "x-phi-jti", "acr": "x-phi-acr", "rule": "x-phi-rule"},
            "roles_claim": "roles", "role_scopes": {"clinician": ["read:labs"]},
            "audit": {"hmac_key_env": "PHI_GUARD_AUDIT_KEY"},
            "rules": [
                {"id": "files", "path": "/files/{path=**}", "scopes_any": ["a", "b"]},
                {"id": "any", "methods": ["POST"], "path": "/*/{x=a/*}",
                 "step_up": {"amr_any": ["hwk"], "max_age_seconds": 60}},
                {"id": "root", "path": "/"}
            ]
        })),
    );
    for (name, changes) in [
        ("unknown-field", json!({"rulez": []})),
        ("no-providers", json!({"providers": []})),
        ("skew-too-large", json!({"clock_skew_seconds": 301})),
        ("zero-lifetime", json!({"max_token_lifetime_seconds": 0})),
        ("bad-realm", json!({"realm": "a\"b"})),
        ("roles-without-scopes", json!({"roles_claim": "roles"})),
        (
            "reserved-header",
            json!({"claims_to_headers": {"sub": "Authorization"}}),
        ),
        ("bad-hmac-env", json!({"audit": {"hmac_key_env": "A-B"}})),
        (
            "bad-template",
            json!({"rules": [{"id": "x", "path": "/fhir/{id}.json"}]}),
        ),
        (
            "duplicate-id",
            json!({"rules": [{"id": "x", "path": "/a"}, {"id": "x", "path": "/b"}]}),
        ),
        (
            "public-with-scopes",
            json!({"rules": [{"id": "x", "path": "/a", "public": true, "scopes": ["s"]}]}),
        ),
        (
            "step-up-unknown-name",
            json!({"rules": [{"id": "x", "path": "/a", "step_up": "strong"}]}),
        ),
        (
            "lower-case-method",
            json!({"rules": [{"id": "x", "path": "/a", "methods": ["get"]}]}),
        ),
        (
            "bad-scope",
            json!({"rules": [{"id": "x", "path": "/a", "scopes": ["a b"]}]}),
        ),
    ] {
        c.add(name, with(changes));
    }
    let mut provider = base["providers"][0].clone();
    provider["jwks"]["uri"] = json!("ftp://idp");
    c.add("bad-jwks-uri", with(json!({ "providers": [provider] })));
    let mut provider = base["providers"][0].clone();
    provider["algorithms"] = json!(["HS256"]);
    c.add(
        "hmac-algorithm",
        with(json!({ "providers": [provider.clone()] })),
    );
    let p = base["providers"][0].clone();
    c.add(
        "duplicate-provider",
        with(json!({ "providers": [p.clone(), p] })),
    );
    c.add("not-json", "providers: []");
    c.count
}

/// A record as the filter drafts one, before sealing.
fn record(i: u64, decision: &str, reason: &str, path: &str, status: u16) -> AuditRecord {
    AuditRecord {
        ts: rfc3339_millis((NOW as u64 + i) * 1_000_000_000 + 123_000_000),
        request_id: Some(format!("5e7c2b9a-0000-4000-8000-{i:012}")),
        decision: decision.into(),
        reason: reason.into(),
        rule: Some("patient-read".into()),
        method: "GET".into(),
        path: path.into(),
        status,
        iss: Some(ISS.into()),
        sub: Some("user-1".into()),
        client_id: Some("app-1".into()),
        jti: Some(format!("j-{i}")),
        token_fp: Some("e3b98a4da31a127d".into()),
        scopes_granted: vec!["read:patient-profile".into()],
        scopes_required: vec!["read:patient-profile".into()],
        source: Some("127.0.0.1:50000".into()),
        tls: Some("TLSv1.3".into()),
        ..AuditRecord::default()
    }
}

/// The record inside an Envoy access-log line, as envoy/envoy.yaml writes it.
fn envoy_line(i: u64, sealed: &str, r: &AuditRecord) -> String {
    json!({
        "time": r.ts, "request_id": r.request_id, "method": r.method, "path": r.path,
        "status": r.status, "flags": "-", "duration_ms": i % 7, "audit": sealed,
    })
    .to_string()
}

fn audit_corpus(root: &Path) -> usize {
    let mut c = Corpus::new(root, "audit_verify");
    let requests = [
        ("allow", "ok", "/fhir/Patient/1", 200),
        ("deny", "insufficient_scope", "/fhir/Patient/2", 403),
        ("deny", "expired", "/fhir/Patient/3", 401),
        ("deny", "bad_path", "/fhir/Patient/%2e%2e", 400),
    ];
    let chain = |vm: &str, key: Option<&[u8]>, envelope: bool| -> Vec<String> {
        let mut chain = AuditChain::new(vm.into(), key.map(<[u8]>::to_vec));
        requests
            .iter()
            .enumerate()
            .map(|(i, (d, reason, path, status))| {
                let mut r = record(i as u64, d, reason, path, *status);
                let sealed = chain.seal(&mut r);
                if envelope {
                    envoy_line(i as u64, &sealed, &r)
                } else {
                    sealed
                }
            })
            .collect()
    };
    let plain = chain("vm-1", None, true);
    let keyed_a = chain("vm-a", Some(AUDIT_KEY), true);
    let keyed_b = chain("vm-b", Some(AUDIT_KEY), true);
    c.add("envoy-log", plain.join("\n") + "\n");
    let interleaved: Vec<String> = keyed_a
        .iter()
        .zip(&keyed_b)
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    c.add("envoy-log-keyed-two-vms", interleaved.join("\n") + "\n");
    c.add("raw-records", chain("vm-raw", None, false).join("\n"));
    let as_object: Vec<String> = chain("vm-obj", Some(AUDIT_KEY), false)
        .iter()
        .map(|l| format!(r#"{{"audit":{l},"status":200}}"#))
        .collect();
    c.add("record-as-object-keyed", as_object.join("\n"));
    let mut with_noise = vec![
        "[2026-09-21 10:00:00.000][1][info][main] starting main dispatch loop".to_string(),
        r#"{"time":"x","method":"GET","path":"/a%2Fb","status":400,"audit":"-"}"#.to_string(),
    ];
    with_noise.extend(plain.iter().cloned());
    with_noise.push(String::new());
    c.add("with-envoy-noise", with_noise.join("\n"));
    c.add("rotated", plain[2..].join("\n"));
    let mut missing = plain.clone();
    missing.remove(2);
    c.add("record-missing", missing.join("\n"));
    let mut reordered = plain.clone();
    reordered.swap(1, 2);
    c.add("reordered", reordered.join("\n"));
    let edited_path = plain[1].replace("Patient/2", "Patient/9");
    let mut edited_log = plain.clone();
    edited_log[1] = edited_path;
    c.add("edited", edited_log.join("\n"));
    c.add(
        "bad-chain-hex",
        plain[0].replace("\\\"chain\\\":\\\"", "\\\"chain\\\":\\\"zz"),
    );
    let mut not_utf8 = plain[0].clone().into_bytes();
    not_utf8.extend(b"\n\xff\xfe\n");
    c.add("not-utf8", not_utf8);
    c.add("empty", "");
    c.count
}

fn decide_corpus(root: &Path) -> usize {
    let mut c = Corpus::new(root, "decide");
    // First line: METHOD PATH, prefixed by `!` (no keys) and/or `?` (may wait);
    // then one Authorization value per line, `$name` standing for a fixture token.
    for (name, text) in [
        ("health", "GET /healthz"),
        ("health-with-token", "GET /healthz\nBearer $rs256"),
        ("patient-read-rs256", "GET /fhir/Patient/123\nBearer $rs256"),
        (
            "patient-read-ps256",
            "GET /fhir/Patient/123?_format=json\nBearer $ps256",
        ),
        (
            "patient-read-es256",
            "GET /fhir/Patient/%24123\nbearer $es256",
        ),
        ("patient-read-eddsa", "GET /fhir/Patient/123\nBearer $eddsa"),
        ("patient-read-es384", "GET /fhir/Patient/123\nBearer $es384"),
        (
            "patient-read-wildcard",
            "GET /fhir/Patient/1\nBearer $wildcard",
        ),
        (
            "patient-read-scp",
            "GET /fhir/Patient/1\nBearer $scp-string",
        ),
        (
            "patient-read-long",
            "GET /fhir/Patient/1\nBearer $long-claims",
        ),
        ("export-mfa", "GET /fhir/$export\nBearer $export-mfa"),
        ("export-encoded", "GET /fhir/%24export\nBearer $export-mfa"),
        ("export-no-acr", "GET /fhir/$export\nBearer $export-no-acr"),
        (
            "export-old-auth",
            "GET /fhir/Patient/$export\nBearer $export-old-auth",
        ),
        (
            "export-group",
            "GET /fhir/Group/g-1/$export\nBearer $export-mfa",
        ),
        (
            "bulk-files",
            "GET /fhir/bulkfiles/a/b/c.ndjson\nBearer $export-mfa",
        ),
        (
            "bulk-status-delete",
            "DELETE /fhir/bulkstatus/j1\nBearer $export-mfa",
        ),
        ("billing", "PATCH /billing/acct-1\nBearer $billing"),
        (
            "billing-wrong-method",
            "GET /billing/acct-1\nBearer $billing",
        ),
        ("lab-delete-fresh", "DELETE /labs/9\nBearer $lab-fresh"),
        ("lab-delete-old", "DELETE /labs/9\nBearer $lab-old"),
        ("no-token", "GET /fhir/Patient/1"),
        ("basic", "GET /fhir/Patient/1\nBasic dXNlcjpwdw=="),
        (
            "two-headers",
            "GET /fhir/Patient/1\nBearer $rs256\nBearer $es256",
        ),
        (
            "query-token-too",
            "GET /fhir/Patient/1?access_token=x\nBearer $rs256",
        ),
        ("bad-path", "GET /fhir/Patient/%2e%2e/admin\nBearer $rs256"),
        ("no-rule", "GET /admin\nBearer $rs256"),
        ("expired", "GET /fhir/Patient/1\nBearer $expired"),
        ("unknown-placeholder", "GET /fhir/Patient/1\nBearer $rs256x"),
        (
            "unknown-kid-wait",
            "?GET /fhir/Patient/1\nBearer $unknown-kid",
        ),
        (
            "unknown-kid-final",
            "GET /fhir/Patient/1\nBearer $unknown-kid",
        ),
        ("no-keys-wait", "!?GET /fhir/Patient/1\nBearer $es256"),
        ("no-keys-final", "!GET /fhir/Patient/1\nBearer $es256"),
        ("other-issuer", "GET /fhir/Patient/1\nBearer $other-iss"),
    ] {
        c.add(name, text);
    }
    c.count
}

fn revocation_corpus(root: &Path) -> usize {
    let mut c = Corpus::new(root, "revocation");
    c.add("empty", "{}");
    c.add(
        "every-member",
        json!({"jti": ["jti-1", "jti-2"], "sub": ["user-gone"], "client_id": ["app-leaked"],
               "revoked_before": {"sub": {"user-left": 1_767_225_600},
                                  "client_id": {"app-rotated": 1_767_225_600}}})
        .to_string(),
    );
    c.add(
        "only-before",
        json!({"revoked_before": {"sub": {"u": -1}}}).to_string(),
    );
    c.add(
        "unicode",
        json!({"sub": ["\u{e9}l\u{e8}ve", ""], "jti": ["\u{0}"]}).to_string(),
    );
    let many: Vec<String> = (0..500).map(|i| format!("jti-{i}")).collect();
    c.add("many", json!({ "jti": many }).to_string());
    c.add("misspelt", r#"{"jtis": ["x"]}"#);
    c.add("array", "[]");
    c.add("wrong-type", r#"{"jti": "x"}"#);
    c.add("truncated", r#"{"sub": ["a", "#);
    c.count
}

fn main() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut rng = StdRng::seed_from_u64(12);
    let signers = signers();
    let jwks = json!({"keys": signers.iter().map(Signer::jwk).collect::<Vec<_>>()});
    let tokens: Vec<(String, String)> = token_specs()
        .iter()
        .map(|s| (s.name.to_owned(), sign_token(&signers, s, &mut rng)))
        .collect();
    let envoy_yaml =
        fs::read_to_string(fuzz.join("../envoy/envoy.yaml")).expect("read envoy/envoy.yaml");
    let shipped = shipped_policy(&envoy_yaml);

    let fixtures = fuzz.join("fixtures");
    fs::create_dir_all(&fixtures).expect("fixtures dir");
    fs::write(
        fixtures.join("jwks.json"),
        serde_json::to_string_pretty(&jwks).expect("json") + "\n",
    )
    .expect("write jwks");
    let lines: String = tokens.iter().map(|(n, t)| format!("{n} {t}\n")).collect();
    fs::write(fixtures.join("tokens.txt"), lines).expect("write tokens");
    fs::write(fixtures.join("shipped-policy.json"), &shipped).expect("write policy");

    let shipped_value: Value = serde_json::from_str(&shipped).expect("json");
    let counts = [
        ("token", token_corpus(fuzz, &tokens, &mut rng)),
        ("jwks", jwks_corpus(fuzz, &jwks, &mut rng)),
        ("path", path_corpus(fuzz, &shipped_value)),
        ("policy", policy_corpus(fuzz, &shipped)),
        ("audit_verify", audit_corpus(fuzz)),
        ("decide", decide_corpus(fuzz)),
        ("revocation", revocation_corpus(fuzz)),
    ];
    for (target, n) in counts {
        println!("corpus/{target}: {n} seeds");
    }
}
