//! ES384 (ECDSA on P-384 with SHA-384), which jwt-compact does not provide.

use std::borrow::Cow;
use std::num::NonZeroUsize;

use jwt_compact::{Algorithm, AlgorithmSignature};
use p384::ecdsa::signature::Verifier;
use p384::ecdsa::{Signature, VerifyingKey};

/// The `ES384` algorithm; verification only.
#[derive(Debug, Default, Clone, Copy)]
pub struct Es384;

/// A raw `r || s` signature (RFC 7518 §3.4), 96 bytes.
#[derive(Debug, Clone)]
pub struct Es384Signature(Signature);

impl AlgorithmSignature for Es384Signature {
    const LENGTH: Option<NonZeroUsize> = NonZeroUsize::new(96);

    fn try_from_slice(slice: &[u8]) -> anyhow::Result<Self> {
        Signature::from_slice(slice)
            .map(Es384Signature)
            .map_err(|e| anyhow::anyhow!(e))
    }

    fn as_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.to_bytes().to_vec())
    }
}

impl Algorithm for Es384 {
    type SigningKey = super::rsa::NoSigning;
    type VerifyingKey = VerifyingKey;
    type Signature = Es384Signature;

    fn name(&self) -> Cow<'static, str> {
        Cow::Borrowed("ES384")
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
        key.verify(msg, &sig.0).is_ok()
    }
}
