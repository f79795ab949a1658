//! The cryptography of importing key material (BYOK), all through aws-lc-rs (constant-time
//! RSA; the RustCrypto `rsa` crate has an unfixed timing advisory, RUSTSEC-2023-0071).
//!
//! GetParametersForImport hands out the public half of an RSA wrapping key
//! ([`WrappingKey::public_key_der`], a DER SubjectPublicKeyInfo, as AWS returns it); the user
//! wraps their material with it by one of AWS's algorithms, and ImportKeyMaterial unwraps
//! it ([`WrappingKey::unwrap`]):
//!
//! - `RSAES_OAEP_SHA_1`, `RSAES_OAEP_SHA_256`: the material itself, RSA-OAEP with MGF1 of the
//!   same hash and no label.
//! - `RSA_AES_KEY_WRAP_SHA_1`, `RSA_AES_KEY_WRAP_SHA_256`: an ephemeral 256-bit AES key
//!   encrypted with RSA-OAEP (that hash), exactly one modulus long, followed by the material
//!   wrapped under that AES key with AES key wrap with padding (RFC 5649, `openssl enc
//!   -id-aes256-wrap-pad`).
//!
//! AWS no longer accepts `RSAES_PKCS1_V1_5`; `SM2PKE` and the `SM2` key spec exist only in
//! AWS's China regions. Neither parses here.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_256};
use aws_lc_rs::rsa::{
    KeySize, OaepAlgorithm, OaepPrivateDecryptingKey, PrivateDecryptingKey, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256,
};
use zeroize::Zeroizing;

/// The RSA wrapping key's size, with AWS's `WrappingKeySpec` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrappingKeySpec {
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl WrappingKeySpec {
    pub fn parse(name: &str) -> Option<WrappingKeySpec> {
        match name {
            "RSA_2048" => Some(WrappingKeySpec::Rsa2048),
            "RSA_3072" => Some(WrappingKeySpec::Rsa3072),
            "RSA_4096" => Some(WrappingKeySpec::Rsa4096),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WrappingKeySpec::Rsa2048 => "RSA_2048",
            WrappingKeySpec::Rsa3072 => "RSA_3072",
            WrappingKeySpec::Rsa4096 => "RSA_4096",
        }
    }

    fn size(self) -> KeySize {
        match self {
            WrappingKeySpec::Rsa2048 => KeySize::Rsa2048,
            WrappingKeySpec::Rsa3072 => KeySize::Rsa3072,
            WrappingKeySpec::Rsa4096 => KeySize::Rsa4096,
        }
    }
}

/// How the material is wrapped, with AWS's `AlgorithmSpec` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrappingAlgorithm {
    RsaesOaepSha1,
    RsaesOaepSha256,
    RsaAesKeyWrapSha1,
    RsaAesKeyWrapSha256,
}

impl WrappingAlgorithm {
    pub fn parse(name: &str) -> Option<WrappingAlgorithm> {
        match name {
            "RSAES_OAEP_SHA_1" => Some(WrappingAlgorithm::RsaesOaepSha1),
            "RSAES_OAEP_SHA_256" => Some(WrappingAlgorithm::RsaesOaepSha256),
            "RSA_AES_KEY_WRAP_SHA_1" => Some(WrappingAlgorithm::RsaAesKeyWrapSha1),
            "RSA_AES_KEY_WRAP_SHA_256" => Some(WrappingAlgorithm::RsaAesKeyWrapSha256),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WrappingAlgorithm::RsaesOaepSha1 => "RSAES_OAEP_SHA_1",
            WrappingAlgorithm::RsaesOaepSha256 => "RSAES_OAEP_SHA_256",
            WrappingAlgorithm::RsaAesKeyWrapSha1 => "RSA_AES_KEY_WRAP_SHA_1",
            WrappingAlgorithm::RsaAesKeyWrapSha256 => "RSA_AES_KEY_WRAP_SHA_256",
        }
    }

    fn oaep(self) -> &'static OaepAlgorithm {
        match self {
            WrappingAlgorithm::RsaesOaepSha1 | WrappingAlgorithm::RsaAesKeyWrapSha1 => &OAEP_SHA1_MGF1SHA1,
            WrappingAlgorithm::RsaesOaepSha256 | WrappingAlgorithm::RsaAesKeyWrapSha256 => &OAEP_SHA256_MGF1SHA256,
        }
    }

    fn uses_aes_key_wrap(self) -> bool {
        matches!(self, WrappingAlgorithm::RsaAesKeyWrapSha1 | WrappingAlgorithm::RsaAesKeyWrapSha256)
    }
}

/// Wrapped material that does not unwrap under this key and algorithm. It says nothing
/// more, by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnwrapError;

/// An RSA wrapping key pair. Its private half never leaves the agent but sealed in an
/// import token; no `Debug` of it.
pub struct WrappingKey {
    private: PrivateDecryptingKey,
}

/// The largest material unwrapped (RSA private keys, when asymmetric import comes).
const MAX_MATERIAL: usize = 8192;

impl WrappingKey {
    pub fn generate(spec: WrappingKeySpec) -> Result<WrappingKey, String> {
        let private = PrivateDecryptingKey::generate(spec.size())
            .map_err(|_| format!("cannot generate an {} wrapping key", spec.as_str()))?;
        Ok(WrappingKey { private })
    }

    /// The private key as PKCS#8 DER, in memory that is wiped on drop.
    pub fn to_pkcs8(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.private.as_der().map(|der| der.as_ref().to_vec()).unwrap_or_default())
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<WrappingKey, String> {
        let private = PrivateDecryptingKey::from_pkcs8(der).map_err(|e| format!("not an RSA private key: {e}"))?;
        Ok(WrappingKey { private })
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.private.public_key().as_der().map(|der| der.as_ref().to_vec()).unwrap_or_default()
    }

    /// Unwraps material wrapped by `algorithm` for this key.
    pub fn unwrap(&self, algorithm: WrappingAlgorithm, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
        let oaep = OaepPrivateDecryptingKey::new(self.private.clone()).map_err(|_| UnwrapError)?;
        let modulus = oaep.key_size_bytes();
        let (rsa_part, aes_part) = if algorithm.uses_aes_key_wrap() {
            wrapped.split_at_checked(modulus).ok_or(UnwrapError)?
        } else {
            (wrapped, &[][..])
        };
        if rsa_part.len() != modulus {
            return Err(UnwrapError);
        }
        let mut out = Zeroizing::new(vec![0u8; oaep.min_output_size()]);
        let len = oaep.decrypt(algorithm.oaep(), rsa_part, &mut out, None).map_err(|_| UnwrapError)?.len();
        out.truncate(len);
        if !algorithm.uses_aes_key_wrap() {
            return Ok(out);
        }
        if out.len() != 32 || aes_part.len() < 16 || aes_part.len() > MAX_MATERIAL + 16 {
            return Err(UnwrapError);
        }
        let kek = AesKek::new(&AES_256, &out).map_err(|_| UnwrapError)?;
        let mut material = Zeroizing::new(vec![0u8; aes_part.len()]);
        let len = kek.unwrap_with_padding(aes_part, &mut material).map_err(|_| UnwrapError)?.len();
        material.truncate(len);
        Ok(material)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey};

    /// What a user does with the public key: the test side, through aws-lc-rs's public API.
    fn wrap(public_der: &[u8], algorithm: WrappingAlgorithm, material: &[u8]) -> Vec<u8> {
        let public = OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(public_der).unwrap()).unwrap();
        let rsa = |plaintext: &[u8]| {
            let mut out = vec![0u8; public.ciphertext_size()];
            public.encrypt(algorithm.oaep(), plaintext, &mut out, None).unwrap().to_vec()
        };
        if !algorithm.uses_aes_key_wrap() {
            return rsa(material);
        }
        let aes = [7u8; 32];
        let mut wrapped = vec![0u8; material.len() + 16];
        let len = AesKek::new(&AES_256, &aes).unwrap().wrap_with_padding(material, &mut wrapped).unwrap().len();
        wrapped.truncate(len);
        let mut out = rsa(&aes);
        out.extend_from_slice(&wrapped);
        out
    }

    #[test]
    fn every_algorithm_round_trips_and_rejects_what_is_not_its_own() {
        let key = WrappingKey::generate(WrappingKeySpec::Rsa2048).unwrap();
        let again = WrappingKey::from_pkcs8(&key.to_pkcs8()).unwrap();
        let other = WrappingKey::generate(WrappingKeySpec::Rsa2048).unwrap();
        let material = [42u8; 32];
        for name in ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256"] {
            let algorithm = WrappingAlgorithm::parse(name).unwrap();
            assert_eq!(algorithm.as_str(), name);
            let wrapped = wrap(&key.public_key_der(), algorithm, &material);
            assert_eq!(&again.unwrap(algorithm, &wrapped).unwrap()[..], &material, "{name}");
            assert_eq!(other.unwrap(algorithm, &wrapped), Err(UnwrapError), "{name}: another key");
            let mut tampered = wrapped.clone();
            *tampered.last_mut().unwrap() ^= 1;
            assert!(key.unwrap(algorithm, &tampered).is_err(), "{name}: tampered");
            assert!(key.unwrap(algorithm, &wrapped[..wrapped.len() - 1]).is_err(), "{name}: truncated");
            assert!(key.unwrap(algorithm, &[]).is_err(), "{name}: empty");
        }
        let sha1 = wrap(&key.public_key_der(), WrappingAlgorithm::RsaesOaepSha1, &material);
        assert!(key.unwrap(WrappingAlgorithm::RsaesOaepSha256, &sha1).is_err(), "the hash is part of the algorithm");
        assert_eq!(WrappingAlgorithm::parse("RSAES_PKCS1_V1_5"), None);
        assert_eq!(WrappingKeySpec::parse("SM2"), None);
        assert!(WrappingKey::from_pkcs8(b"not a key").is_err());
    }

    #[test]
    fn larger_wrapping_keys() {
        for spec in [WrappingKeySpec::Rsa3072, WrappingKeySpec::Rsa4096] {
            let key = WrappingKey::generate(spec).unwrap();
            let der = key.public_key_der();
            assert_eq!(
                PublicEncryptingKey::from_der(&der).unwrap().key_size_bits(),
                match spec {
                    WrappingKeySpec::Rsa3072 => 3072,
                    _ => 4096,
                }
            );
            let wrapped = wrap(&der, WrappingAlgorithm::RsaAesKeyWrapSha256, &[1u8; 32]);
            assert_eq!(&key.unwrap(WrappingAlgorithm::RsaAesKeyWrapSha256, &wrapped).unwrap()[..], &[1u8; 32]);
        }
    }
}
