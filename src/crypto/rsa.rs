//! RS256/384/512 and PS256/384/512 verification, fast enough for the wasm build.
//!
//! jwt-compact's own RSA backend (the `rsa` crate on num-bigint-dig) spends about
//! 600 µs on one RS256 check inside Envoy's V8; this one about 85 µs. Verifying
//! needs only `s^e mod n` for a small public exponent, so this module computes
//! it with Montgomery multiplication on `u32` limbs: wasm has a native
//! 32×32→64-bit multiply (`i64.mul` on zero-extended operands) but nothing
//! wider, so 32-bit limbs are its natural word. Key, signature and message are
//! all public, so nothing here needs to run in constant time.
//!
//! Padding checks follow RFC 8017: EMSA-PKCS1-v1_5 by re-encoding and comparing
//! (§8.2.2; only the DigestInfo with the explicit NULL), and EMSA-PSS-VERIFY
//! (§9.1.2) with MGF1 on the message's hash function and a salt exactly as long
//! as the hash, which RFC 7518 §3.5 requires for PS*.

use std::borrow::Cow;
use std::fmt;

use jwt_compact::{Algorithm, AlgorithmSignature};
use sha2::digest::Digest;
use sha2::{Sha256, Sha384, Sha512};

/// Smallest modulus accepted (RFC 7518 §3.3, NIST SP 800-131A).
const MIN_MODULUS_BITS: usize = 2048;
/// Largest modulus accepted; bounds what one signature check can cost.
const MAX_MODULUS_BITS: usize = 8192;
/// Largest public exponent accepted, as in the `rsa` crate. The work per check
/// grows with the exponent's length, and real keys use 65537 (or 3).
const MAX_EXPONENT: u64 = (1 << 33) - 1;

/// Why RSA key material was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsaKeyError {
    /// The modulus has fewer than 2048 bits (its bit length).
    ModulusTooSmall(usize),
    /// The modulus has more than 8192 bits (its bit length).
    ModulusTooLarge(usize),
    /// An even modulus is no RSA modulus (and Montgomery reduction needs it odd).
    EvenModulus,
    /// The public exponent is zero, one or even.
    BadExponent,
    /// The public exponent is above 2^33 - 1.
    ExponentTooLarge,
}

impl fmt::Display for RsaKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RsaKeyError::ModulusTooSmall(bits) => {
                write!(f, "RSA modulus of {bits} bits (< {MIN_MODULUS_BITS})")
            }
            RsaKeyError::ModulusTooLarge(bits) => {
                write!(f, "RSA modulus of {bits} bits (> {MAX_MODULUS_BITS})")
            }
            RsaKeyError::EvenModulus => f.write_str("even RSA modulus"),
            RsaKeyError::BadExponent => f.write_str("RSA public exponent is not odd and > 1"),
            RsaKeyError::ExponentTooLarge => f.write_str("RSA public exponent above 2^33 - 1"),
        }
    }
}

impl std::error::Error for RsaKeyError {}

/// The hash of an RS*/PS* algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsaHash {
    Sha256,
    Sha384,
    Sha512,
}

impl RsaHash {
    /// DER of the DigestInfo that precedes the hash in EMSA-PKCS1-v1_5
    /// (RFC 8017 §9.2, note 1), with the NULL parameters.
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            RsaHash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            RsaHash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            RsaHash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }
}

/// The padding of an RS* (PKCS#1 v1.5) or PS* (PSS) algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsaPadding {
    Pkcs1v15,
    Pss,
}

/// An RSA public key prepared for fast verification: modulus of 2048 to 8192
/// bits, odd; exponent odd, > 1 and at most 2^33 - 1; Montgomery constants
/// computed once here rather than per signature.
#[derive(Clone, PartialEq, Eq)]
pub struct RsaVerifyingKey {
    /// The modulus as little-endian `u32` limbs; the top limb is not zero.
    n: Vec<u32>,
    /// -n⁻¹ mod 2³², the per-limb Montgomery reduction factor.
    n0_inv: u32,
    /// R² mod n, R = 2^(32·limbs): one Montgomery product with it enters Montgomery form.
    r2: Vec<u32>,
    e: u64,
    bits: usize,
}

impl fmt::Debug for RsaVerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaVerifyingKey")
            .field("bits", &self.bits)
            .field("e", &self.e)
            .finish_non_exhaustive()
    }
}

impl RsaVerifyingKey {
    /// From the big-endian bytes of the JWK `n` and `e` (already base64url-decoded).
    ///
    /// Leading zero bytes are ignored: RFC 7518 forbids them, but some issuers
    /// emit a DER-style 0x00 before a modulus whose top bit is set.
    pub fn from_components(n: &[u8], e: &[u8]) -> Result<Self, RsaKeyError> {
        let n = strip_leading_zeros(n);
        let bits = bit_length(n);
        if bits < MIN_MODULUS_BITS {
            return Err(RsaKeyError::ModulusTooSmall(bits));
        }
        if bits > MAX_MODULUS_BITS {
            return Err(RsaKeyError::ModulusTooLarge(bits));
        }
        if n.last().is_none_or(|low| low & 1 == 0) {
            return Err(RsaKeyError::EvenModulus);
        }
        let e = strip_leading_zeros(e);
        if e.len() > 8 {
            return Err(RsaKeyError::ExponentTooLarge);
        }
        let e = e.iter().fold(0_u64, |acc, &b| (acc << 8) | u64::from(b));
        if e > MAX_EXPONENT {
            return Err(RsaKeyError::ExponentTooLarge);
        }
        if e < 3 || e & 1 == 0 {
            return Err(RsaKeyError::BadExponent);
        }
        // e < 2^33 <= 2^2047 <= n, so "e < n" needs no comparison of its own.

        let limbs = bits.div_ceil(32);
        let n = limbs_from_be(n, limbs);
        let n0_inv = n.first().map_or(0, |&low| neg_inv_u32(low));
        let mut key = RsaVerifyingKey {
            n,
            n0_inv,
            r2: Vec::new(),
            e,
            bits,
        };
        key.r2 = key.compute_r2();
        Ok(key)
    }

    /// The modulus length in bits.
    pub fn modulus_bits(&self) -> usize {
        self.bits
    }

    /// The modulus length in bytes, which is also every signature's length.
    fn modulus_len(&self) -> usize {
        self.bits.div_ceil(8)
    }

    /// R² mod n, found without division: first R mod n by doubling, then the
    /// Montgomery form of 2^(32·limbs) by square-and-double.
    fn compute_r2(&self) -> Vec<u32> {
        let limbs = self.n.len();
        let mut scratch = Scratch::new(limbs);
        // 2^(bits-1) < n because n is odd (so no power of two); doubling it
        // 32·limbs - bits + 1 times gives R mod n, the Montgomery form of 1.
        let mut x = vec![0_u32; limbs];
        let top = self.bits - 1;
        if let Some(limb) = x.get_mut(top / 32) {
            *limb = 1 << (top % 32);
        }
        for _ in top..32 * limbs {
            self.double_mod(&mut x);
        }
        // Montgomery form of 2^k is 2^k·R; squaring it gives that of 2^(2k),
        // doubling that of 2^(k+1). Walk the bits of 32·limbs from the top.
        let exp = 32 * limbs;
        let top_bit = usize::BITS - 1 - exp.leading_zeros();
        self.double_mod(&mut x);
        let mut y = vec![0_u32; limbs];
        for bit in (0..top_bit).rev() {
            self.mont_mul(&x, &x, &mut y, &mut scratch);
            std::mem::swap(&mut x, &mut y);
            if (exp >> bit) & 1 == 1 {
                self.double_mod(&mut x);
            }
        }
        x
    }

    /// `x = 2x mod n`, for `x < n`.
    fn double_mod(&self, x: &mut [u32]) {
        let mut carry = 0_u32;
        for limb in x.iter_mut() {
            let next = *limb >> 31;
            *limb = (*limb << 1) | carry;
            carry = next;
        }
        if carry == 1 || !less_than(x, &self.n) {
            // The true value is below 2n, so one subtraction suffices and the
            // borrow out cancels the carry.
            sub_assign(x, &self.n);
        }
    }

    /// `s^e mod n` for `s < n`, as limbs.
    fn public_op(&self, s: &[u32]) -> Vec<u32> {
        let limbs = self.n.len();
        let mut scratch = Scratch::new(limbs);
        let mut s_mont = vec![0_u32; limbs];
        self.mont_mul(s, &self.r2, &mut s_mont, &mut scratch);

        let mut x = s_mont.clone();
        let mut y = vec![0_u32; limbs];
        // Left to right over the bits below e's top one. The lowest bit (e is
        // odd, so it is set) is left for the end.
        let top_bit = 63 - self.e.leading_zeros();
        for bit in (1..top_bit).rev() {
            self.mont_mul(&x, &x, &mut y, &mut scratch);
            if (self.e >> bit) & 1 == 1 {
                self.mont_mul(&y, &s_mont, &mut x, &mut scratch);
            } else {
                std::mem::swap(&mut x, &mut y);
            }
        }
        self.mont_mul(&x, &x, &mut y, &mut scratch);
        // Multiplying by the plain `s` applies e's lowest bit and leaves
        // Montgomery form in one step: (x·R)·s·R⁻¹ = x·s.
        self.mont_mul(&y, s, &mut x, &mut scratch);
        x
    }

    /// `out = a·b·R⁻¹ mod n`, for `a, b < n` (`a == b` squares).
    ///
    /// CIOS (coarsely integrated operand scanning): for each limb `b_i`,
    /// `t = (t + a·b_i + m·n) / 2^32` with `m` chosen to make the division
    /// exact. Two limbs of `b` are handled per pass over `a` and `n`, so each
    /// limb loaded and each limb stored serves four products rather than two;
    /// that is what makes it faster than one limb per pass under V8.
    fn mont_mul(&self, a: &[u32], b: &[u32], out: &mut [u32], scratch: &mut Scratch) {
        let Scratch { t, u } = scratch;
        t.fill(0);
        let mut pairs = b.chunks_exact(2);
        for pair in &mut pairs {
            if let [b0, b1] = pair {
                self.mont_rows2(a, *b0, *b1, t, u);
                std::mem::swap(t, u);
            }
        }
        for &bi in pairs.remainder() {
            self.mont_row(a, bi, t, u);
            std::mem::swap(t, u);
        }
        self.reduce_into(t, out);
    }

    /// One CIOS step: `u = (t + a·bi + m·n) / 2^32`. `t` and `u` have
    /// `limbs + 1` limbs and stay below 2n.
    fn mont_row(&self, a: &[u32], bi: u32, t: &[u32], u: &mut [u32]) {
        let (Some((&a0, a_hi)), Some((&n0, n_hi)), Some((&t0, t_hi))) =
            (a.split_first(), self.n.split_first(), t.split_first())
        else {
            return;
        };
        let bi = u64::from(bi);
        let p = u64::from(t0) + u64::from(a0) * bi;
        let m = u64::from((p as u32).wrapping_mul(self.n0_inv));
        let q = u64::from(p as u32) + m * u64::from(n0);
        let (mut c1, mut c2) = (p >> 32, q >> 32);
        // Each sum fits in u64: (2^32-1) + (2^32-1)² + (2^32-1) = 2^64 - 1.
        for (((&tj, &aj), &nj), uj) in t_hi.iter().zip(a_hi).zip(n_hi).zip(u.iter_mut()) {
            let p = u64::from(tj) + u64::from(aj) * bi + c1;
            c1 = p >> 32;
            let q = u64::from(p as u32) + m * u64::from(nj) + c2;
            c2 = q >> 32;
            *uj = q as u32;
        }
        let top = u64::from(t.last().copied().unwrap_or(0)) + c1 + c2;
        if let [.., lo, hi] = u {
            *lo = top as u32;
            *hi = (top >> 32) as u32;
        }
    }

    /// Two CIOS steps in one pass: `r = (t + a·b0 + m0·n) / 2^32`, then
    /// `u = (r + a·b1 + m1·n) / 2^32`. The second step runs one limb behind
    /// the first, taking each limb of `r` as soon as it is made.
    fn mont_rows2(&self, a: &[u32], b0: u32, b1: u32, t: &[u32], u: &mut [u32]) {
        let (Some(&[a0, a1]), Some(&[n0, n1]), Some(&[t0, t1])) = (
            a.first_chunk::<2>(),
            self.n.first_chunk::<2>(),
            t.first_chunk::<2>(),
        ) else {
            return;
        };
        let (Some(a_rest), Some(n_rest), Some(t_rest)) = (a.get(2..), self.n.get(2..), t.get(2..))
        else {
            return;
        };
        let (b0, b1) = (u64::from(b0), u64::from(b1));
        let wide = |x: u32| u64::from(x);

        // First step, limbs 0 and 1; r0 is its first output limb.
        let p = wide(t0) + wide(a0) * b0;
        let m0 = wide((p as u32).wrapping_mul(self.n0_inv));
        let q = wide(p as u32) + m0 * wide(n0);
        let (mut c1, mut c2) = (p >> 32, q >> 32);
        let p = wide(t1) + wide(a1) * b0 + c1;
        c1 = p >> 32;
        let q = wide(p as u32) + m0 * wide(n1) + c2;
        c2 = q >> 32;
        let r0 = q as u32;
        // Second step, limb 0.
        let p = wide(r0) + wide(a0) * b1;
        let m1 = wide((p as u32).wrapping_mul(self.n0_inv));
        let q = wide(p as u32) + m1 * wide(n0);
        let (mut d1, mut d2) = (p >> 32, q >> 32);

        // Limb j of the first step and limb j-1 of the second.
        let (mut a_prev, mut n_prev) = (a1, n1);
        for (((&tj, &aj), &nj), uj) in t_rest.iter().zip(a_rest).zip(n_rest).zip(u.iter_mut()) {
            let p = wide(tj) + wide(aj) * b0 + c1;
            c1 = p >> 32;
            let q = wide(p as u32) + m0 * wide(nj) + c2;
            c2 = q >> 32;
            let p = (q & 0xffff_ffff) + wide(a_prev) * b1 + d1;
            d1 = p >> 32;
            let q = wide(p as u32) + m1 * wide(n_prev) + d2;
            d2 = q >> 32;
            *uj = q as u32;
            (a_prev, n_prev) = (aj, nj);
        }

        // The first step's top limbs, then the second step's last limb and top.
        let top = u64::from(t.last().copied().unwrap_or(0)) + c1 + c2;
        let p = (top & 0xffff_ffff) + wide(a_prev) * b1 + d1;
        let q = wide(p as u32) + m1 * wide(n_prev) + d2;
        let top = (top >> 32) + (p >> 32) + (q >> 32);
        if let [.., last, lo, hi] = u {
            *last = q as u32;
            *lo = top as u32;
            *hi = (top >> 32) as u32;
        }
    }

    /// `out = t mod n` for `t < 2n` given as `limbs + 1` limbs.
    fn reduce_into(&self, t: &[u32], out: &mut [u32]) {
        for (o, &tj) in out.iter_mut().zip(t) {
            *o = tj;
        }
        let overflow = t.last().is_some_and(|&top| top != 0);
        if overflow || !less_than(out, &self.n) {
            sub_assign(out, &self.n);
        }
    }
}

/// Buffers for one exponentiation, allocated once per verification.
struct Scratch {
    /// Running Montgomery product, `limbs + 1` limbs.
    t: Vec<u32>,
    /// The next value of `t`, swapped with it after each step.
    u: Vec<u32>,
}

impl Scratch {
    fn new(limbs: usize) -> Self {
        Scratch {
            t: vec![0; limbs + 1],
            u: vec![0; limbs + 1],
        }
    }
}

/// -x⁻¹ mod 2³² for odd `x`.
fn neg_inv_u32(x: u32) -> u32 {
    // x·x ≡ 1 (mod 8) for odd x, so x is its own inverse to 3 bits; each
    // Newton step doubles that: 6, 12, 24, 48 ≥ 32.
    let mut inv = x;
    for _ in 0..4 {
        inv = inv.wrapping_mul(2_u32.wrapping_sub(x.wrapping_mul(inv)));
    }
    inv.wrapping_neg()
}

/// `a < b`, for little-endian limbs of equal length.
fn less_than(a: &[u32], b: &[u32]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x < y;
        }
    }
    false
}

/// `a -= b` modulo 2^(32·len), for little-endian limbs of equal length.
fn sub_assign(a: &mut [u32], b: &[u32]) {
    let mut borrow = false;
    for (x, &y) in a.iter_mut().zip(b) {
        let (d, b1) = x.overflowing_sub(y);
        let (d, b2) = d.overflowing_sub(u32::from(borrow));
        *x = d;
        borrow = b1 || b2;
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    bytes.get(first..).unwrap_or_default()
}

/// Bit length of a big-endian number without leading zero bytes.
fn bit_length(be: &[u8]) -> usize {
    match be.first() {
        None => 0,
        Some(top) => (be.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
    }
}

/// Big-endian bytes to `limbs` little-endian limbs; bytes beyond them are dropped.
fn limbs_from_be(bytes: &[u8], limbs: usize) -> Vec<u32> {
    let mut out = vec![0_u32; limbs];
    for (limb, chunk) in out.iter_mut().zip(bytes.rchunks(4)) {
        *limb = chunk.iter().fold(0, |acc, &b| (acc << 8) | u32::from(b));
    }
    out
}

/// Little-endian limbs to `len` big-endian bytes (I2OSP); the value must fit.
fn limbs_to_be(limbs: &[u32], len: usize) -> Vec<u8> {
    let mut out = vec![0_u8; len];
    for (chunk, limb) in out.rchunks_mut(4).zip(limbs) {
        for (dst, src) in chunk.iter_mut().rev().zip(limb.to_be_bytes().iter().rev()) {
            *dst = *src;
        }
    }
    out
}

/// Verifies `signature` (exactly the modulus length) over `message` (the JWS
/// signing input, hashed here) with the given padding and hash.
pub fn verify(
    key: &RsaVerifyingKey,
    padding: RsaPadding,
    hash: RsaHash,
    message: &[u8],
    signature: &[u8],
) -> bool {
    // RFC 8017 §8.2.2 step 1 / §8.1.2 step 1: the length is the modulus's.
    let len = key.modulus_len();
    if signature.len() != len {
        return false;
    }
    // RSAVP1 (§5.2.2) takes only representatives below n; anything else would
    // make a second encoding of the same signature.
    let s = limbs_from_be(signature, key.n.len());
    if !less_than(&s, &key.n) {
        return false;
    }
    let em = limbs_to_be(&key.public_op(&s), len);
    match hash {
        RsaHash::Sha256 => check_encoding::<Sha256>(key, padding, hash, message, &em),
        RsaHash::Sha384 => check_encoding::<Sha384>(key, padding, hash, message, &em),
        RsaHash::Sha512 => check_encoding::<Sha512>(key, padding, hash, message, &em),
    }
}

fn check_encoding<D: Digest>(
    key: &RsaVerifyingKey,
    padding: RsaPadding,
    hash: RsaHash,
    message: &[u8],
    em: &[u8],
) -> bool {
    let m_hash = D::digest(message);
    match padding {
        RsaPadding::Pkcs1v15 => pkcs1v15_matches(em, hash.digest_info_prefix(), &m_hash),
        RsaPadding::Pss => pss_matches::<D>(em, key.bits, &m_hash),
    }
}

/// EMSA-PKCS1-v1_5 (RFC 8017 §9.2): `em` must equal
/// `0x00 0x01 0xff… 0x00 DigestInfo H` with at least 8 bytes of 0xff.
fn pkcs1v15_matches(em: &[u8], prefix: &[u8], m_hash: &[u8]) -> bool {
    let Some(ps_len) = em.len().checked_sub(prefix.len() + m_hash.len() + 3) else {
        return false;
    };
    if ps_len < 8 {
        return false;
    }
    let expected = [0x00, 0x01]
        .into_iter()
        .chain(std::iter::repeat_n(0xff, ps_len))
        .chain([0x00])
        .chain(prefix.iter().copied())
        .chain(m_hash.iter().copied());
    em.iter().copied().eq(expected)
}

/// EMSA-PSS-VERIFY (RFC 8017 §9.1.2) with MGF1 over `D` and a salt of the
/// hash's length. `em_full` is the modulus-length encoding of `s^e mod n`.
fn pss_matches<D: Digest>(em_full: &[u8], mod_bits: usize, m_hash: &[u8]) -> bool {
    let h_len = <D as Digest>::output_size();
    let s_len = h_len;
    let em_bits = mod_bits - 1;
    let em_len = em_bits.div_ceil(8);
    // §8.1.2 step 2c: I2OSP(m, emLen). When emLen is one byte short of the
    // modulus (modBits ≡ 1 mod 8), that byte must be zero.
    let Some((high, em)) = em_full
        .len()
        .checked_sub(em_len)
        .and_then(|extra| em_full.split_at_checked(extra))
    else {
        return false;
    };
    if high.iter().any(|&b| b != 0) {
        return false;
    }
    // Step 3.
    if em_len < h_len + s_len + 2 {
        return false;
    }
    // Step 4: the 0xbc trailer.
    let Some((&0xbc, rest)) = em.split_last() else {
        return false;
    };
    // Step 5.
    let Some((masked_db, h)) = rest.split_at_checked(em_len - h_len - 1) else {
        return false;
    };
    // Step 6: the leftmost 8·emLen - emBits bits must be zero.
    let kept_bits = 0xff_u8 >> (8 * em_len - em_bits);
    if masked_db.first().is_none_or(|&b| b & !kept_bits != 0) {
        return false;
    }
    // Steps 7–9.
    let mut db = masked_db.to_vec();
    mgf1_xor::<D>(&mut db, h);
    if let Some(first) = db.first_mut() {
        *first &= kept_bits;
    }
    // Step 10: zero padding, then the 0x01 separator.
    let Some((padding, rest)) = db.split_at_checked(em_len - h_len - s_len - 2) else {
        return false;
    };
    if padding.iter().any(|&b| b != 0) {
        return false;
    }
    let Some((&0x01, salt)) = rest.split_first() else {
        return false;
    };
    // Steps 11–14.
    let h2 = D::new()
        .chain_update([0_u8; 8])
        .chain_update(m_hash)
        .chain_update(salt)
        .finalize();
    *h2 == *h
}

/// XORs MGF1(seed) (RFC 8017 §B.2.1) into `out`.
fn mgf1_xor<D: Digest>(out: &mut [u8], seed: &[u8]) {
    for (counter, chunk) in (0_u32..).zip(out.chunks_mut(<D as Digest>::output_size())) {
        let mask = D::new()
            .chain_update(seed)
            .chain_update(counter.to_be_bytes())
            .finalize();
        for (o, m) in chunk.iter_mut().zip(mask.iter()) {
            *o ^= m;
        }
    }
}

/// RS256..PS512 for jwt-compact, verified by this module; verification only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastRsa {
    padding: RsaPadding,
    hash: RsaHash,
}

impl FastRsa {
    /// The algorithm with this padding and hash.
    pub const fn new(padding: RsaPadding, hash: RsaHash) -> Self {
        FastRsa { padding, hash }
    }

    /// RSASSA-PKCS1-v1_5 with SHA-256.
    pub const fn rs256() -> Self {
        Self::new(RsaPadding::Pkcs1v15, RsaHash::Sha256)
    }

    /// RSASSA-PKCS1-v1_5 with SHA-384.
    pub const fn rs384() -> Self {
        Self::new(RsaPadding::Pkcs1v15, RsaHash::Sha384)
    }

    /// RSASSA-PKCS1-v1_5 with SHA-512.
    pub const fn rs512() -> Self {
        Self::new(RsaPadding::Pkcs1v15, RsaHash::Sha512)
    }

    /// RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt.
    pub const fn ps256() -> Self {
        Self::new(RsaPadding::Pss, RsaHash::Sha256)
    }

    /// RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt.
    pub const fn ps384() -> Self {
        Self::new(RsaPadding::Pss, RsaHash::Sha384)
    }

    /// RSASSA-PSS with SHA-512, MGF1-SHA-512 and a 64-byte salt.
    pub const fn ps512() -> Self {
        Self::new(RsaPadding::Pss, RsaHash::Sha512)
    }

    /// The JOSE `alg` name.
    pub const fn alg_name(self) -> &'static str {
        match (self.padding, self.hash) {
            (RsaPadding::Pkcs1v15, RsaHash::Sha256) => "RS256",
            (RsaPadding::Pkcs1v15, RsaHash::Sha384) => "RS384",
            (RsaPadding::Pkcs1v15, RsaHash::Sha512) => "RS512",
            (RsaPadding::Pss, RsaHash::Sha256) => "PS256",
            (RsaPadding::Pss, RsaHash::Sha384) => "PS384",
            (RsaPadding::Pss, RsaHash::Sha512) => "PS512",
        }
    }
}

/// An RSA signature as carried in the token; its length is checked against
/// the key's at verification, so it is variable here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastRsaSignature(Vec<u8>);

impl AlgorithmSignature for FastRsaSignature {
    fn try_from_slice(slice: &[u8]) -> anyhow::Result<Self> {
        if slice.len() > MAX_MODULUS_BITS / 8 {
            return Err(anyhow::anyhow!(
                "RSA signature longer than any accepted modulus"
            ));
        }
        Ok(FastRsaSignature(slice.to_vec()))
    }

    fn as_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0)
    }
}

/// The filter never signs; an uninhabited key type makes `sign` impossible to call.
#[derive(Debug)]
pub enum NoSigning {}

impl Algorithm for FastRsa {
    type SigningKey = NoSigning;
    type VerifyingKey = RsaVerifyingKey;
    type Signature = FastRsaSignature;

    fn name(&self) -> Cow<'static, str> {
        Cow::Borrowed(self.alg_name())
    }

    fn sign(&self, signing_key: &Self::SigningKey, _message: &[u8]) -> Self::Signature {
        match *signing_key {}
    }

    fn verify_signature(
        &self,
        signature: &Self::Signature,
        verifying_key: &Self::VerifyingKey,
        message: &[u8],
    ) -> bool {
        verify(
            verifying_key,
            self.padding,
            self.hash,
            message,
            &signature.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::str::FromStr;
    use std::sync::OnceLock;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jwt_compact::alg::{Rsa, RsaPrivateKey, RsaPublicKey, RsaSignature};
    use jwt_compact::{AlgorithmExt, Claims, Header, UntrustedToken};
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};
    use rsa::traits::{PrivateKeyParts, PublicKeyParts};
    use rsa::{BigUint, Pkcs1v15Sign, Pss};
    use serde_json::Value;

    use super::*;

    const ALL: [FastRsa; 6] = [
        FastRsa::rs256(),
        FastRsa::rs384(),
        FastRsa::rs512(),
        FastRsa::ps256(),
        FastRsa::ps384(),
        FastRsa::ps512(),
    ];

    fn hex(s: &str) -> Vec<u8> {
        assert!(s.len() % 2 == 0, "odd hex length");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Keys from the `rsa` crate, made once per size and shared by the tests
    /// (key generation is the slow part). Two with e = 65537, one with e = 3.
    fn keys(bits: usize) -> &'static [RsaPrivateKey] {
        static K2048: OnceLock<Vec<RsaPrivateKey>> = OnceLock::new();
        static K3072: OnceLock<Vec<RsaPrivateKey>> = OnceLock::new();
        static K4096: OnceLock<Vec<RsaPrivateKey>> = OnceLock::new();
        let cell = match bits {
            2048 => &K2048,
            3072 => &K3072,
            4096 => &K4096,
            _ => panic!("no test keys of {bits} bits"),
        };
        cell.get_or_init(|| {
            let mut rng = StdRng::seed_from_u64(bits as u64);
            [65537_u32, 65537, 3]
                .iter()
                .map(|&e| RsaPrivateKey::new_with_exp(&mut rng, bits, &BigUint::from(e)).unwrap())
                .collect()
        })
    }

    fn fast_key(pk: &RsaPublicKey) -> RsaVerifyingKey {
        RsaVerifyingKey::from_components(&pk.n().to_bytes_be(), &pk.e().to_bytes_be()).unwrap()
    }

    fn sign(sk: &RsaPrivateKey, alg: FastRsa, msg: &[u8], rng: &mut StdRng) -> Vec<u8> {
        match (alg.padding, alg.hash) {
            (RsaPadding::Pkcs1v15, RsaHash::Sha256) => {
                sk.sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(msg))
            }
            (RsaPadding::Pkcs1v15, RsaHash::Sha384) => {
                sk.sign(Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(msg))
            }
            (RsaPadding::Pkcs1v15, RsaHash::Sha512) => {
                sk.sign(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(msg))
            }
            (RsaPadding::Pss, RsaHash::Sha256) => {
                sk.sign_with_rng(rng, Pss::new_with_salt::<Sha256>(32), &Sha256::digest(msg))
            }
            (RsaPadding::Pss, RsaHash::Sha384) => {
                sk.sign_with_rng(rng, Pss::new_with_salt::<Sha384>(48), &Sha384::digest(msg))
            }
            (RsaPadding::Pss, RsaHash::Sha512) => {
                sk.sign_with_rng(rng, Pss::new_with_salt::<Sha512>(64), &Sha512::digest(msg))
            }
        }
        .unwrap()
    }

    /// The verdict of jwt-compact's own backend, the one this module replaces.
    fn old_verify(alg: FastRsa, pk: &RsaPublicKey, msg: &[u8], sig: &[u8]) -> bool {
        let old = Rsa::from_str(alg.alg_name()).unwrap();
        RsaSignature::try_from_slice(sig).is_ok_and(|sig| old.verify_signature(&sig, pk, msg))
    }

    fn be_fixed(x: &BigUint, len: usize) -> Option<Vec<u8>> {
        let bytes = x.to_bytes_be();
        let pad = len.checked_sub(bytes.len())?;
        let mut out = vec![0; pad];
        out.extend_from_slice(&bytes);
        Some(out)
    }

    /// Multiplies the differential tests' signature counts: `RSA_DIFF_SCALE=10`
    /// for a longer run (the default makes about 4,300 cases).
    fn scale() -> usize {
        std::env::var("RSA_DIFF_SCALE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1)
    }

    #[derive(Default, Debug)]
    struct Tally {
        cases: usize,
        accepted: usize,
        /// PS* signatures s + n: the old backend accepts them, this one does not.
        old_accepts_non_canonical: usize,
    }

    /// Random messages and algorithms per key; each signature is checked as
    /// made and in corrupted forms, by both backends, and the verdicts compared.
    fn differential(bits: usize, sigs_per_key: usize) {
        let mut rng = StdRng::seed_from_u64(0x5eed + bits as u64);
        let mut tally = Tally::default();
        for sk in keys(bits) {
            let pk = sk.to_public_key();
            let key = fast_key(&pk);
            let k = key.modulus_len();
            assert_eq!(key.modulus_bits(), bits);
            let n = pk.n().clone();
            let mut check = |alg: FastRsa, msg: &[u8], sig: &[u8], expect: Option<bool>| {
                let ours = verify(&key, alg.padding, alg.hash, msg, sig);
                let old = old_verify(alg, &pk, msg, sig);
                tally.cases += 1;
                tally.accepted += usize::from(ours);
                if let Some(expect) = expect {
                    assert_eq!(ours, expect, "{} {bits} sig {}", alg.alg_name(), hexs(sig));
                }
                let non_canonical = sig.len() == k && BigUint::from_bytes_be(sig) >= n;
                if non_canonical && alg.padding == RsaPadding::Pss && old && !ours {
                    tally.old_accepts_non_canonical += 1;
                } else {
                    assert_eq!(ours, old, "{} {bits} sig {}", alg.alg_name(), hexs(sig));
                }
            };
            for _ in 0..sigs_per_key * scale() {
                let alg = ALL[rng.gen_range(0..ALL.len())];
                let mut msg = vec![0_u8; rng.gen_range(0..400)];
                rng.fill_bytes(&mut msg);
                let sig = sign(sk, alg, &msg, &mut rng);
                assert_eq!(sig.len(), k);

                check(alg, &msg, &sig, Some(true));
                // The same signature under every other algorithm: wrong hash, wrong padding.
                for other in ALL.iter().filter(|&&other| other != alg) {
                    check(*other, &msg, &sig, Some(false));
                }
                // Another message.
                let mut other_msg = msg.clone();
                match other_msg.len() {
                    0 => other_msg.push(0),
                    len => other_msg[rng.gen_range(0..len)] ^= 1 << rng.gen_range(0..8),
                }
                check(alg, &other_msg, &sig, Some(false));
                // Flipped bits anywhere in the signature.
                for _ in 0..3 {
                    let mut bad = sig.clone();
                    bad[rng.gen_range(0..k)] ^= 1 << rng.gen_range(0..8);
                    check(alg, &msg, &bad, Some(false));
                }
                // Wrong lengths: one byte short, and a leading zero added.
                check(alg, &msg, &sig[1..], Some(false));
                check(alg, &msg, &[&[0][..], &sig[..]].concat(), Some(false));
                // Edge values of s: 0, 1, n - 1, n, s + n (when it fits), random.
                let zero = vec![0_u8; k];
                check(alg, &msg, &zero, Some(false));
                let mut one = zero.clone();
                one[k - 1] = 1;
                check(alg, &msg, &one, Some(false));
                check(alg, &msg, &be_fixed(&(&n - 1_u32), k).unwrap(), Some(false));
                check(alg, &msg, &be_fixed(&n, k).unwrap(), Some(false));
                if let Some(shifted) = be_fixed(&(BigUint::from_bytes_be(&sig) + &n), k) {
                    check(alg, &msg, &shifted, Some(false));
                }
                let mut random = vec![0_u8; k];
                rng.fill_bytes(&mut random);
                check(alg, &msg, &random, Some(false));
            }
        }
        println!("differential {bits}: {tally:?}");
        // 17 cases per signature, 18 when s + n still fits in the modulus length.
        assert!(tally.cases >= 17 * sigs_per_key * scale() * keys(bits).len());
    }

    fn hexs(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn differential_2048() {
        differential(2048, 50);
    }

    #[test]
    fn differential_3072() {
        differential(3072, 20);
    }

    #[test]
    fn differential_4096() {
        differential(4096, 12);
    }

    /// The arithmetic alone, against num-bigint-dig's modpow, on odd moduli of
    /// awkward lengths (not multiples of 32 or 8) up to 8192 bits.
    #[test]
    fn public_op_matches_modpow() {
        let mut rng = StdRng::seed_from_u64(42);
        let sizes: [usize; 13] = [
            2048, 2049, 2055, 2081, 2111, 3071, 3072, 4095, 4096, 4097, 6007, 8191, 8192,
        ];
        let mut cases = 0;
        for (round, &bits) in sizes.iter().cycle().take(3 * sizes.len()).enumerate() {
            let len = bits.div_ceil(8);
            let mut n = vec![0_u8; len];
            rng.fill_bytes(&mut n);
            n[0] &= 0xff >> (8 * len - bits);
            n[0] |= 0x80 >> (8 * len - bits);
            n[len - 1] |= 1;
            // Also a modulus just above a power of two, whose R mod n is large.
            if round % 5 == 4 {
                n[1..len - 1].fill(0);
            }
            let e: u64 = match round % 3 {
                0 => 65537,
                1 => 3,
                _ => rng.gen_range(1_u64..1 << 32) * 2 + 1,
            };
            let key = RsaVerifyingKey::from_components(&n, &e.to_be_bytes()).unwrap();
            assert_eq!(key.modulus_bits(), bits);
            let big_n = BigUint::from_bytes_be(&n);
            let r = BigUint::from(1_u32) << (32 * key.n.len());
            let r2 = limbs_to_be(&key.r2, len);
            assert_eq!(
                BigUint::from_bytes_be(&r2),
                (&r * &r) % &big_n,
                "R² for {bits} bits"
            );
            for i in 0..4 {
                let s = match i {
                    0 => BigUint::from(2_u32),
                    1 => &big_n - 1_u32,
                    _ => {
                        let mut s = vec![0_u8; len];
                        rng.fill_bytes(&mut s);
                        BigUint::from_bytes_be(&s) % &big_n
                    }
                };
                let s_bytes = be_fixed(&s, len).unwrap();
                let got = key.public_op(&limbs_from_be(&s_bytes, key.n.len()));
                let want = s.modpow(&BigUint::from(e), &big_n);
                assert_eq!(
                    limbs_to_be(&got, len),
                    be_fixed(&want, len).unwrap(),
                    "{bits} bits, e {e}"
                );
                cases += 1;
            }
        }
        println!("public_op_matches_modpow: {cases} cases");
    }

    #[test]
    fn key_checks() {
        let mut n2048 = vec![0xff_u8; 256];
        n2048[0] = 0xc5;
        let e = [1, 0, 1];
        let ok = RsaVerifyingKey::from_components(&n2048, &e).unwrap();
        assert_eq!(ok.modulus_bits(), 2048);
        // Leading zero bytes are ignored, on n and on e.
        let padded = [&[0, 0][..], &n2048].concat();
        assert_eq!(
            RsaVerifyingKey::from_components(&padded, &[0, 1, 0, 1]).unwrap(),
            ok
        );

        let small = vec![0xff_u8; 255];
        let mut even = n2048.clone();
        even[255] = 0xfe;
        let mut big = vec![0xff_u8; 1025];
        big[0] = 1;
        let cases: &[(&[u8], &[u8], RsaKeyError)] = &[
            (&small, &e, RsaKeyError::ModulusTooSmall(2040)),
            (&[0, 0x7f, 0xff], &e, RsaKeyError::ModulusTooSmall(15)),
            (&[], &e, RsaKeyError::ModulusTooSmall(0)),
            (&[0; 300], &e, RsaKeyError::ModulusTooSmall(0)),
            (&big, &e, RsaKeyError::ModulusTooLarge(8193)),
            (&even, &e, RsaKeyError::EvenModulus),
            (&n2048, &[], RsaKeyError::BadExponent),
            (&n2048, &[0], RsaKeyError::BadExponent),
            (&n2048, &[1], RsaKeyError::BadExponent),
            (&n2048, &[0, 0, 1], RsaKeyError::BadExponent),
            (&n2048, &[2], RsaKeyError::BadExponent),
            (&n2048, &[1, 0, 0], RsaKeyError::BadExponent),
            (&n2048, &[2, 0, 0, 0, 1], RsaKeyError::ExponentTooLarge),
            (&n2048, &[1; 9], RsaKeyError::ExponentTooLarge),
            (&n2048, &n2048, RsaKeyError::ExponentTooLarge),
        ];
        for (n, e, want) in cases {
            assert_eq!(
                RsaVerifyingKey::from_components(n, e),
                Err(*want),
                "n {n:?} e {e:?}"
            );
        }
        // The largest accepted exponent and modulus.
        assert!(RsaVerifyingKey::from_components(&n2048, &[1, 0xff, 0xff, 0xff, 0xff]).is_ok());
        let mut n8192 = vec![0xff_u8; 1024];
        n8192[0] = 0x80;
        assert_eq!(
            RsaVerifyingKey::from_components(&n8192, &[3]).map(|k| k.modulus_bits()),
            Ok(8192)
        );
    }

    #[test]
    fn neg_inv_is_inverse() {
        for x in [1_u32, 3, 5, 0xffff_ffff, 0x8000_0001, 0x1234_5677] {
            assert_eq!(x.wrapping_mul(neg_inv_u32(x)), u32::MAX, "{x:#x}");
        }
    }

    #[test]
    fn limb_conversions_round_trip() {
        let bytes: Vec<u8> = (1..=13).collect();
        let limbs = limbs_from_be(&bytes, 4);
        assert_eq!(limbs, [0x0a0b_0c0d, 0x0607_0809, 0x0203_0405, 0x01]);
        assert_eq!(limbs_to_be(&limbs, 13), bytes);
        assert_eq!(limbs_to_be(&limbs, 15), [&[0, 0][..], &bytes].concat());
    }

    /// Builds a PSS encoding (RFC 8017 §9.1.1) with hooks to break it: `tweak`
    /// edits DB before masking, and the mask comes from `M`, not necessarily `D`.
    fn pss_encode<D: Digest, M: Digest>(
        m_hash: &[u8],
        salt: &[u8],
        em_bits: usize,
        tweak: impl FnOnce(&mut Vec<u8>),
    ) -> Vec<u8> {
        let em_len = em_bits.div_ceil(8);
        let h_len = <D as Digest>::output_size();
        let h = D::new()
            .chain_update([0_u8; 8])
            .chain_update(m_hash)
            .chain_update(salt)
            .finalize()
            .to_vec();
        let mut db = vec![0_u8; em_len - salt.len() - h_len - 2];
        db.push(0x01);
        db.extend_from_slice(salt);
        tweak(&mut db);
        mgf1_xor::<M>(&mut db, &h);
        db[0] &= 0xff >> (8 * em_len - em_bits);
        [db, h, vec![0xbc]].concat()
    }

    /// PSS is strict: trailer, top bits, zero padding, separator, salt length
    /// and MGF hash are all checked, through a real key and in the padding alone.
    #[test]
    fn pss_is_strict() {
        let sk = &keys(2048)[0];
        let pk = sk.to_public_key();
        let key = fast_key(&pk);
        let msg = b"eyJhbGciOiJQUzI1NiJ9.eyJzdWIiOiJwYXRpZW50In0";
        let m_hash = Sha256::digest(msg);
        let salt = [0x5a_u8; 32];
        // "Signs" an arbitrary encoding with the private exponent.
        let raw_sign = |em: &[u8]| {
            let s = BigUint::from_bytes_be(em).modpow(sk.d(), pk.n());
            be_fixed(&s, 256).unwrap()
        };
        let good = pss_encode::<Sha256, Sha256>(&m_hash, &salt, 2047, |_| {});
        let sig = raw_sign(&good);
        assert!(verify(&key, RsaPadding::Pss, RsaHash::Sha256, msg, &sig));
        assert!(old_verify(FastRsa::ps256(), &pk, msg, &sig));

        let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut em = good.clone();
        em[255] = 0xbd;
        bad.push(("trailer", em));
        let mut em = good.clone();
        em[0] |= 0x80;
        bad.push(("leftmost bit", em));
        bad.push((
            "non-zero padding",
            pss_encode::<Sha256, Sha256>(&m_hash, &salt, 2047, |db| db[10] = 1),
        ));
        bad.push((
            "separator 0x02",
            pss_encode::<Sha256, Sha256>(&m_hash, &salt, 2047, |db| {
                let at = db.len() - 33;
                db[at] = 0x02;
            }),
        ));
        bad.push((
            "separator moved",
            pss_encode::<Sha256, Sha256>(&m_hash, &salt, 2047, |db| {
                let at = db.len() - 33;
                db[at] = 0;
                db[at - 1] = 1;
            }),
        ));
        bad.push((
            "salt of 0",
            pss_encode::<Sha256, Sha256>(&m_hash, &[], 2047, |_| {}),
        ));
        bad.push((
            "salt of 20",
            pss_encode::<Sha256, Sha256>(&m_hash, &[7; 20], 2047, |_| {}),
        ));
        bad.push((
            "salt of 64",
            pss_encode::<Sha256, Sha256>(&m_hash, &[7; 64], 2047, |_| {}),
        ));
        bad.push((
            "MGF1-SHA-384",
            pss_encode::<Sha256, Sha384>(&m_hash, &salt, 2047, |_| {}),
        ));
        bad.push((
            "other message",
            pss_encode::<Sha256, Sha256>(&Sha256::digest(b"x"), &salt, 2047, |_| {}),
        ));
        for (what, em) in &bad {
            let sig = raw_sign(em);
            assert!(
                !verify(&key, RsaPadding::Pss, RsaHash::Sha256, msg, &sig),
                "{what}"
            );
            assert!(
                !old_verify(FastRsa::ps256(), &pk, msg, &sig),
                "old backend: {what}"
            );
        }

        // modBits ≡ 1 (mod 8): EM is one byte shorter than the modulus, and
        // the byte above it must be zero.
        let em = pss_encode::<Sha256, Sha256>(&m_hash, &salt, 2048, |_| {});
        assert_eq!(em.len(), 256);
        assert!(pss_matches::<Sha256>(
            &[&[0][..], &em].concat(),
            2049,
            &m_hash
        ));
        assert!(!pss_matches::<Sha256>(
            &[&[1][..], &em].concat(),
            2049,
            &m_hash
        ));
        // Every bit of EM's first byte is used then; a 2048-bit modulus leaves one unused.
        let mut top = em.clone();
        top[0] |= 0x80;
        assert!(!pss_matches::<Sha256>(&top, 2048, &m_hash));
        assert!(!pss_matches::<Sha256>(&[], 2048, &m_hash));
    }

    #[test]
    fn pkcs1v15_encoding_is_exact() {
        let m_hash = Sha256::digest(b"abc");
        let prefix = RsaHash::Sha256.digest_info_prefix();
        let encode = |ps_len: usize, block_type: u8| {
            [
                vec![0x00, block_type],
                vec![0xff; ps_len],
                vec![0x00],
                prefix.to_vec(),
                m_hash.to_vec(),
            ]
            .concat()
        };
        assert!(pkcs1v15_matches(&encode(202, 1), prefix, &m_hash));
        assert!(pkcs1v15_matches(&encode(8, 1), prefix, &m_hash));
        assert!(
            !pkcs1v15_matches(&encode(7, 1), prefix, &m_hash),
            "padding under 8 bytes"
        );
        assert!(
            !pkcs1v15_matches(&encode(202, 2), prefix, &m_hash),
            "block type 2"
        );
        assert!(!pkcs1v15_matches(&[], prefix, &m_hash));
        let mut em = encode(202, 1);
        em[100] = 0xfe;
        assert!(!pkcs1v15_matches(&em, prefix, &m_hash), "padding byte");
        let sha384_prefix = RsaHash::Sha384.digest_info_prefix();
        assert!(
            !pkcs1v15_matches(&encode(202, 1), sha384_prefix, &m_hash),
            "prefix"
        );
    }

    #[derive(Default, Debug, PartialEq, Eq)]
    struct WycheproofCounts {
        valid: usize,
        invalid: usize,
        acceptable: usize,
        keys_refused: usize,
        /// Cases where jwt-compact's backend gives another verdict than this one.
        old_backend_differs: usize,
    }

    /// Project Wycheproof's RSA vectors, read from the folder beside the repository.
    /// `valid` must verify and `invalid` must not. `acceptable` cases (all of
    /// them a DigestInfo without its NULL, "MissingNull") are refused: RFC 8017
    /// §9.2 defines the encoding with the NULL, and re-encoding compares exactly.
    #[test]
    fn wycheproof() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/wycheproof");
        let files = [
            ("rsa_signature_2048_sha256_test.json", RsaPadding::Pkcs1v15),
            ("rsa_signature_2048_sha384_test.json", RsaPadding::Pkcs1v15),
            ("rsa_signature_2048_sha512_test.json", RsaPadding::Pkcs1v15),
            ("rsa_signature_3072_sha256_test.json", RsaPadding::Pkcs1v15),
            ("rsa_signature_4096_sha256_test.json", RsaPadding::Pkcs1v15),
            ("rsa_pss_2048_sha256_mgf1_32_test.json", RsaPadding::Pss),
        ];
        let mut total = WycheproofCounts::default();
        for (file, padding) in files {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let doc: Value = serde_json::from_str(&text).unwrap();
            let mut counts = WycheproofCounts::default();
            for group in doc["testGroups"].as_array().unwrap() {
                let hash = match group["sha"].as_str().unwrap() {
                    "SHA-256" => RsaHash::Sha256,
                    "SHA-384" => RsaHash::Sha384,
                    "SHA-512" => RsaHash::Sha512,
                    other => panic!("{file}: hash {other}"),
                };
                if padding == RsaPadding::Pss {
                    // PS* fixes MGF1 to the message hash and the salt to its length.
                    assert_eq!(group["mgf"], "MGF1");
                    assert_eq!(group["mgfSha"], group["sha"]);
                    assert_eq!(group["sLen"].as_u64(), Some(32));
                }
                let n = hex(group["publicKey"]["modulus"].as_str().unwrap());
                let e = hex(group["publicKey"]["publicExponent"].as_str().unwrap());
                let key = RsaVerifyingKey::from_components(&n, &e);
                let bits = group["keySize"].as_u64().unwrap() as usize;
                if bits < MIN_MODULUS_BITS {
                    assert_eq!(key, Err(RsaKeyError::ModulusTooSmall(bits)), "{file}");
                    counts.keys_refused += 1;
                    continue;
                }
                let key = key.unwrap();
                assert_eq!(key.modulus_bits(), bits);
                let old_key =
                    RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
                        .unwrap();
                let alg = FastRsa::new(padding, hash);
                for case in group["tests"].as_array().unwrap() {
                    let msg = hex(case["msg"].as_str().unwrap());
                    let sig = hex(case["sig"].as_str().unwrap());
                    let ours = verify(&key, padding, hash, &msg, &sig);
                    let id = case["tcId"].as_u64().unwrap();
                    let comment = case["comment"].as_str().unwrap_or("");
                    match case["result"].as_str().unwrap() {
                        "valid" => {
                            assert!(ours, "{file} #{id} ({comment}) must verify");
                            counts.valid += 1;
                        }
                        "invalid" => {
                            assert!(!ours, "{file} #{id} ({comment}) must be refused");
                            counts.invalid += 1;
                        }
                        "acceptable" => {
                            assert!(!ours, "{file} #{id} ({comment}): strict encoding");
                            counts.acceptable += 1;
                        }
                        other => panic!("{file} #{id}: result {other}"),
                    }
                    if ours != old_verify(alg, &old_key, &msg, &sig) {
                        println!("{file} #{id} ({comment}): old backend says {}", !ours);
                        counts.old_backend_differs += 1;
                    }
                }
            }
            println!("{file}: {counts:?}");
            assert!(counts.valid > 0 && counts.invalid > 0, "{file}: no cases");
            total.valid += counts.valid;
            total.invalid += counts.invalid;
            total.acceptable += counts.acceptable;
            total.keys_refused += counts.keys_refused;
            total.old_backend_differs += counts.old_backend_differs;
        }
        println!("wycheproof total: {total:?}");
    }

    /// Tokens signed by jwt-compact's own RSA algorithms validate through
    /// `FastRsa` of the same name, and only that one.
    #[test]
    fn jwt_compact_round_trip() {
        let sk = &keys(2048)[1];
        let key = fast_key(&sk.to_public_key());
        let claims = Claims::new(serde_json::json!({"sub": "patient-7", "scope": "read"}));
        for alg in ALL {
            assert_eq!(alg.name(), alg.alg_name());
            assert_eq!(FastRsaSignature::LENGTH, None);
            let old = Rsa::from_str(alg.alg_name()).unwrap();
            let token = old.token(&Header::empty(), &claims, sk).unwrap();
            let token = UntrustedToken::new(&token).unwrap();
            for other in ALL {
                let checked = other.validator::<Value>(&key).validate(&token);
                assert_eq!(
                    checked.is_ok(),
                    other == alg,
                    "{} token, {}",
                    alg.alg_name(),
                    other.alg_name()
                );
                if let Ok(checked) = checked {
                    assert_eq!(checked.claims().custom["sub"], "patient-7");
                }
            }
        }
        assert!(FastRsaSignature::try_from_slice(&[0; 1025]).is_err());
        assert!(FastRsaSignature::try_from_slice(&[0; 1024]).is_ok());
    }

    /// RFC 7515 Appendix A.2: the RS256 example JWS, with the RFC's key.
    #[test]
    fn rfc7515_a2_rs256() {
        let n = concat!(
            "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddx",
            "HmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMs",
            "D1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSH",
            "SXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdV",
            "MTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8",
            "NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
        );
        let jws = concat!(
            "eyJhbGciOiJSUzI1NiJ9",
            ".",
            "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFt",
            "cGxlLmNvbS9pc19yb290Ijp0cnVlfQ",
            ".",
            "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7",
            "AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4",
            "BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K",
            "0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqv",
            "hJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrB",
            "p0igcN_IoypGlUPQGe77Rw",
        );
        let key = RsaVerifyingKey::from_components(&URL_SAFE_NO_PAD.decode(n).unwrap(), &[1, 0, 1])
            .unwrap();
        assert_eq!(key.modulus_bits(), 2048);
        let (signing_input, sig) = jws.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        // The RFC also lists the signature as octets; check both ends against them.
        assert_eq!(sig[..4], [112, 46, 33, 137]);
        assert_eq!(sig.len(), 256);
        assert_eq!(sig[253..], [238, 251, 71]);
        let input = signing_input.as_bytes();
        assert!(verify(
            &key,
            RsaPadding::Pkcs1v15,
            RsaHash::Sha256,
            input,
            &sig
        ));
        assert!(!verify(&key, RsaPadding::Pss, RsaHash::Sha256, input, &sig));
        assert!(!verify(
            &key,
            RsaPadding::Pkcs1v15,
            RsaHash::Sha384,
            input,
            &sig
        ));
        assert!(!verify(
            &key,
            RsaPadding::Pkcs1v15,
            RsaHash::Sha256,
            &input[1..],
            &sig
        ));

        // And through jwt-compact, as the filter uses it.
        let token = UntrustedToken::new(jws).unwrap();
        let checked = FastRsa::rs256()
            .validator::<Value>(&key)
            .validate(&token)
            .unwrap();
        assert_eq!(checked.claims().custom["iss"], "joe");
        assert!(FastRsa::ps256()
            .validator::<Value>(&key)
            .validate(&token)
            .is_err());
    }
}
