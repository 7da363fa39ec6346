//! ES256 and ES384 (ECDSA on P-256 with SHA-256, on P-384 with SHA-384; RFC
//! 7518 §3.4), verification only.
//!
//! The field and group arithmetic are RustCrypto's 0.14 curves (`p256`,
//! `p384`); what is ours is the order of the additions. A verification
//! computes `u1·G + u2·Q`. The curve crates do it with one interleaved wNAF
//! pass: a doubling per bit of the scalar and an addition every few bits.
//! Here both `G` and the public key `Q` get a fixed-base table instead: for
//! every `W`-bit window `i` of a scalar, the affine points `j·2^(W·i)·P`,
//! `j = 1..=2^(W-1)`. A scalar in signed `W`-bit digits is then one mixed
//! addition per nonzero digit and no doubling at all. A key's table is
//! built on its first verification and kept with the key (a key set lives
//! until the JWKS's content changes); `G`'s once per VM.
//!
//! Everything here is public (key, message, signature), so variable time is
//! fine, as it is in the curve crates' own verification. The differential
//! tests (`crypto::differential`, and `tests` below against the curve
//! crates' own verification) and Wycheproof's vectors hold it to the
//! reference.

use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};

use jwt_compact::{Algorithm, AlgorithmSignature};

/// Bits per window of the fixed-base tables. One verification is at most
/// `2·(⌈bits/W⌉+1)` mixed additions; a table is `(⌈bits/W⌉+1)·2^(W-1)` affine
/// points built with as many additions. At 5, P-256: 106 additions, 848
/// points (61 KiB); P-384: 156 and 1,248 (127 KiB). At 4 a check takes 18%
/// more instructions, at 6 11% fewer for a table twice as large and as slow
/// to build.
const W: usize = 5;
/// Table entries per window: the digits' largest magnitude.
const HALF: usize = 1 << (W - 1);

/// Signed `W`-bit digits of a big-endian number of `bits` bits, least
/// significant first, each in `-HALF..=HALF`; `out` needs `⌈bits/W⌉+1`.
fn signed_digits(be: &[u8], out: &mut [i8]) {
    let bit = |i: usize| -> u32 {
        let byte = be.len().checked_sub(1 + i / 8).and_then(|at| be.get(at));
        byte.map_or(0, |b| u32::from((b >> (i % 8)) & 1))
    };
    let mut carry = 0u32;
    for (window, digit) in out.iter_mut().enumerate() {
        let mut v = carry;
        for b in 0..W {
            v += bit(window * W + b) << b;
        }
        // v is in 0..=2^W; above HALF it becomes v - 2^W, carried on.
        carry = u32::from(v as usize > HALF);
        let signed = v as i32 - ((carry as i32) << W);
        *digit = signed as i8;
    }
}

/// One curve's verification: its key type, `G`'s table and `verify`.
macro_rules! fixed_base_ecdsa {
    ($module:ident, $curve:ident, $hash:ty, $bytes:literal) => {
        pub mod $module {
            use super::*;
            use sha2::Digest;
            use $curve::elliptic_curve::group::Group;
            use $curve::elliptic_curve::ops::Reduce;
            use $curve::elliptic_curve::point::{AffineCoordinates, BatchNormalize};
            use $curve::{AffinePoint, FieldBytes, ProjectivePoint, Scalar};

            /// Windows of a scalar: one more than its bits need, for the last carry.
            pub(super) const WINDOWS: usize = ($bytes * 8usize).div_ceil(W) + 1;

            /// `j·2^(W·i)·P` for window `i` and `j = 1..=HALF`, at `i·HALF + j - 1`.
            pub(super) struct Table(Vec<AffinePoint>);

            impl Table {
                pub(super) fn new(p: ProjectivePoint) -> Table {
                    let mut points = Vec::with_capacity(WINDOWS * HALF);
                    let mut base = p;
                    for _ in 0..WINDOWS {
                        let mut multiple = base;
                        points.push(multiple);
                        for _ in 1..HALF {
                            multiple += base;
                            points.push(multiple);
                        }
                        // 2^W·base = 2·(HALF·base).
                        base = multiple.double();
                    }
                    // One field inversion for all of them.
                    Table(
                        <ProjectivePoint as BatchNormalize<[ProjectivePoint]>>::batch_normalize(
                            &points,
                        ),
                    )
                }

                /// Adds `k·P` to `acc`; `None` only if the table is short (it never is).
                pub(super) fn add_multiple(
                    &self,
                    acc: &mut ProjectivePoint,
                    k: &Scalar,
                ) -> Option<()> {
                    let mut digits = [0i8; WINDOWS];
                    signed_digits(&k.to_bytes(), &mut digits);
                    for (window, &d) in digits.iter().enumerate() {
                        if d == 0 {
                            continue;
                        }
                        let at = window * HALF + usize::from(d.unsigned_abs()) - 1;
                        let point = self.0.get(at)?;
                        if d > 0 {
                            *acc += point;
                        } else {
                            *acc += -*point;
                        }
                    }
                    Some(())
                }
            }

            /// The generator's table, built on the first verification in this VM.
            pub(super) fn generator() -> &'static Table {
                static TABLE: OnceLock<Table> = OnceLock::new();
                TABLE.get_or_init(|| Table::new(ProjectivePoint::GENERATOR))
            }

            /// A public key and its table (built on its first verification,
            /// shared by its clones).
            #[derive(Clone)]
            pub struct VerifyingKey {
                point: AffinePoint,
                table: Arc<OnceLock<Table>>,
            }

            impl fmt::Debug for VerifyingKey {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.debug_struct("VerifyingKey")
                        .field("point", &self.point)
                        .field("table", &self.table.get().is_some())
                        .finish()
                }
            }

            impl VerifyingKey {
                /// A SEC1 point on the curve, not the identity.
                pub fn from_sec1_bytes(sec1: &[u8]) -> Result<Self, ()> {
                    let key = $curve::ecdsa::VerifyingKey::from_sec1_bytes(sec1).map_err(|_| ())?;
                    Ok(VerifyingKey {
                        point: *key.as_affine(),
                        table: Arc::default(),
                    })
                }

                pub(super) fn table(&self) -> &Table {
                    self.table.get_or_init(|| Table::new(self.point.into()))
                }
            }

            /// SEC1 4.1.4 with `r` and `s` in [1, n-1] (the signature type
            /// checks that) and either `s` (JWS does not ask for low `s`).
            pub fn verify(key: &VerifyingKey, msg: &[u8], sig: &$curve::ecdsa::Signature) -> bool {
                let (r, s) = sig.split_scalars();
                // The digest is as long as the order: no truncation, one reduction.
                let mut digest = FieldBytes::default();
                for (to, from) in digest.iter_mut().zip(<$hash>::digest(msg)) {
                    *to = from;
                }
                let z = <Scalar as Reduce<FieldBytes>>::reduce(&digest);
                // s is nonzero, so it has an inverse; fail closed regardless.
                let Some(s_inv) = Option::<Scalar>::from(s.invert_vartime()) else {
                    return false;
                };
                let u1 = z * s_inv;
                let u2 = *r * s_inv;
                let mut sum = ProjectivePoint::IDENTITY;
                if generator().add_multiple(&mut sum, &u1).is_none()
                    || key.table().add_multiple(&mut sum, &u2).is_none()
                {
                    return false;
                }
                let sum = sum.to_affine();
                if bool::from(sum.is_identity()) {
                    return false;
                }
                *r == <Scalar as Reduce<FieldBytes>>::reduce(&sum.x())
            }
        }
    };
}

fixed_base_ecdsa!(p256, p256_verify, sha2::Sha256, 32);
fixed_base_ecdsa!(p384, p384_verify, sha2::Sha384, 48);

/// One ECDSA algorithm over one curve: `$alg` and its signature type.
macro_rules! ecdsa_algorithm {
    ($alg:ident, $sig:ident, $curve:ident, $module:ident, $name:literal, $len:literal) => {
        #[doc = concat!("The `", $name, "` algorithm; verification only.")]
        #[derive(Debug, Default, Clone, Copy)]
        pub struct $alg;

        #[doc = concat!("A raw `r || s` signature (RFC 7518 §3.4), ", $len, " bytes; `r` and `s` in [1, n-1].")]
        #[derive(Debug, Clone)]
        pub struct $sig($curve::ecdsa::Signature);

        impl AlgorithmSignature for $sig {
            const LENGTH: Option<NonZeroUsize> = NonZeroUsize::new($len);

            fn try_from_slice(slice: &[u8]) -> anyhow::Result<Self> {
                $curve::ecdsa::Signature::from_slice(slice)
                    .map($sig)
                    .map_err(|e| anyhow::anyhow!(e))
            }

            fn as_bytes(&self) -> Cow<'_, [u8]> {
                Cow::Owned(self.0.to_bytes().to_vec())
            }
        }

        impl Algorithm for $alg {
            type SigningKey = super::rsa::NoSigning;
            type VerifyingKey = $module::VerifyingKey;
            type Signature = $sig;

            fn name(&self) -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn sign(&self, signing_key: &Self::SigningKey, _message: &[u8]) -> Self::Signature {
                match *signing_key {}
            }

            fn verify_signature(
                &self,
                sig: &Self::Signature,
                key: &Self::VerifyingKey,
                msg: &[u8],
            ) -> bool {
                $module::verify(key, msg, &sig.0)
            }
        }
    };
}

ecdsa_algorithm!(Es256, Es256Signature, p256_verify, p256, "ES256", 64);
ecdsa_algorithm!(Es384, Es384Signature, p384_verify, p384, "ES384", 96);

#[cfg(test)]
mod tests {
    use super::*;
    // The 0.13 line signs (the verifying crates above are 0.14).
    use ::p256 as p256_sign;
    use ::p384 as p384_sign;
    use rand::{Rng, SeedableRng};

    /// Scalars where digit recoding has its edges: zero, one, the order's
    /// neighbours, single bits, every digit at `HALF` or just above (so
    /// every window carries), all ones, and random ones.
    fn edge_scalars(bytes: usize, order_minus_one: &[u8], seed: u64) -> Vec<Vec<u8>> {
        let mut out = vec![vec![0; bytes], order_minus_one.to_vec()];
        let mut one = vec![0; bytes];
        one[bytes - 1] = 1;
        out.push(one);
        for bit in [
            1,
            W - 1,
            W,
            W + 1,
            8 * bytes - W - 1,
            8 * bytes - 2,
            8 * bytes - 1,
        ] {
            let mut k = vec![0; bytes];
            k[bytes - 1 - bit / 8] = 1 << (bit % 8);
            out.push(k);
        }
        // Each W-bit window equal to `v`: a repeating bit pattern.
        for v in [HALF - 1, HALF, HALF + 1, (1 << W) - 1] {
            let mut k = vec![0u8; bytes];
            for i in 0..8 * bytes {
                if (v >> (i % W)) & 1 == 1 {
                    k[bytes - 1 - i / 8] |= 1 << (i % 8);
                }
            }
            out.push(k);
        }
        out.push(vec![0xff; bytes]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..64 {
            out.push((0..bytes).map(|_| rng.gen()).collect());
        }
        out
    }

    /// The signed digits add back up to the scalar and stay in range.
    #[test]
    fn signed_digits_recompose() {
        for k in edge_scalars(32, &[0xfe; 32], 1) {
            let mut digits = [0i8; 53];
            signed_digits(&k, &mut digits);
            assert!(digits.iter().all(|d| d.unsigned_abs() as usize <= HALF));
            // Recompose in base 2^W, most significant digit first, into bytes.
            let mut acc = vec![0i64; 64];
            for (i, &d) in digits.iter().enumerate() {
                let bit = i * W;
                acc[bit / 8] += i64::from(d) << (bit % 8);
            }
            let mut carry = 0i64;
            let mut back = Vec::new();
            for a in acc {
                let v = a + carry;
                back.push(v.rem_euclid(256) as u8);
                carry = v.div_euclid(256);
            }
            assert_eq!(carry, 0);
            let mut be: Vec<u8> = back.into_iter().rev().collect();
            let be = be.split_off(be.len() - 32);
            assert_eq!(be, k, "{digits:?}");
        }
    }

    /// The fixed-base multiple agrees with the curve crate's own scalar
    /// multiplication, for the generator and for a random point.
    macro_rules! table_agrees {
        ($name:ident, $module:ident, $curve:ident, $bytes:literal) => {
            #[test]
            fn $name() {
                use $curve::elliptic_curve::ops::Reduce;
                use $curve::{FieldBytes, ProjectivePoint, Scalar};
                let minus_one = (Scalar::ZERO - Scalar::ONE).to_bytes().to_vec();
                let mut rng = rand::rngs::StdRng::seed_from_u64(7);
                let random: Vec<u8> = (0..$bytes).map(|_| rng.gen()).collect();
                let random = <Scalar as Reduce<FieldBytes>>::reduce(
                    &FieldBytes::try_from(&random[..]).unwrap(),
                );
                let point = ProjectivePoint::GENERATOR * random;
                let tables = [
                    (ProjectivePoint::GENERATOR, $module::generator()),
                    (point, &$module::Table::new(point)),
                ];
                for k in edge_scalars($bytes, &minus_one, 2) {
                    let k = <Scalar as Reduce<FieldBytes>>::reduce(
                        &FieldBytes::try_from(&k[..]).unwrap(),
                    );
                    for (base, table) in &tables {
                        let mut sum = ProjectivePoint::IDENTITY;
                        table.add_multiple(&mut sum, &k).unwrap();
                        assert_eq!(sum, *base * k);
                    }
                }
            }
        };
    }
    table_agrees!(
        p256_table_agrees_with_scalar_multiplication,
        p256,
        p256_verify,
        32
    );
    table_agrees!(
        p384_table_agrees_with_scalar_multiplication,
        p384,
        p384_verify,
        48
    );

    /// Against the curve crates' own verification (0.14, interleaved wNAF):
    /// random keys and messages, the signature as signed, with `s`
    /// negated (the high-`s` twin, valid too), and with `r` or `s` or the
    /// message changed.
    macro_rules! verify_agrees {
        ($name:ident, $module:ident, $curve:ident, $reference:ident, $len:literal) => {
            #[test]
            fn $name() {
                use $curve::ecdsa::signature::Verifier as _;
                use $reference::ecdsa::signature::Signer;
                let mut rng = rand::rngs::StdRng::seed_from_u64(11);
                for round in 0..48 {
                    let sk = $reference::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
                    let sec1 = sk.verifying_key().to_encoded_point(false);
                    let ours = $module::VerifyingKey::from_sec1_bytes(sec1.as_bytes()).unwrap();
                    let theirs =
                        $curve::ecdsa::VerifyingKey::from_sec1_bytes(sec1.as_bytes()).unwrap();
                    let msg: Vec<u8> = (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect();
                    let sig: $reference::ecdsa::Signature = sk.sign(&msg);
                    let raw = sig.to_bytes().to_vec();
                    let s = $curve::ecdsa::Signature::from_slice(&raw).unwrap();
                    let high_s = $curve::ecdsa::Signature::from_scalars(s.r(), -*s.s()).unwrap();
                    let mut bent = raw.clone();
                    bent[rng.gen_range(0..$len)] ^= 1 << rng.gen_range(0..8);
                    let mut other = msg.clone();
                    other.push(round as u8);
                    let mut cases = vec![(msg.clone(), high_s), (other, s)];
                    if let Ok(bent) = $curve::ecdsa::Signature::from_slice(&bent) {
                        cases.push((msg.clone(), bent));
                    }
                    assert!($module::verify(&ours, &msg, &s));
                    for (m, sig) in cases {
                        assert_eq!(
                            $module::verify(&ours, &m, &sig),
                            theirs.verify(&m, &sig).is_ok(),
                            "round {round}"
                        );
                    }
                }
            }
        };
    }
    verify_agrees!(
        p256_verify_agrees_with_the_curve_crate,
        p256,
        p256_verify,
        p256_sign,
        64
    );
    verify_agrees!(
        p384_verify_agrees_with_the_curve_crate,
        p384,
        p384_verify,
        p384_sign,
        96
    );
}
