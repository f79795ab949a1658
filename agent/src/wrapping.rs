//! The cryptography of importing key material (BYOK), all through aws-lc-rs: constant-time
//! RSA from AWS-LC (the RustCrypto `rsa` crate has an unfixed timing advisory,
//! RUSTSEC-2023-0071).
//!
//! GetParametersForImport hands out the public half of a fresh RSA wrapping key
//! ([`WrappingKey::public_key_der`]: a DER SubjectPublicKeyInfo with the `rsaEncryption`
//! OID, byte for byte the form AWS returns as `PublicKey`); the private half travels sealed
//! in the import token ([`WrappingKey::to_pkcs8`], [`WrappingKey::from_pkcs8`]). The user
//! wraps their material for that public key with one of AWS's algorithms, and
//! ImportKeyMaterial unwraps it ([`WrappingKey::unwrap`]). The wire formats of
//! `EncryptedKeyMaterial`:
//!
//! - `RSAES_OAEP_SHA_1`, `RSAES_OAEP_SHA_256`: `RSA-OAEP(material)`, with MGF1 of the same
//!   hash and no label: exactly one modulus long.
//! - `RSA_AES_KEY_WRAP_SHA_1`, `RSA_AES_KEY_WRAP_SHA_256`: `RSA-OAEP(K) ‖ KWP_K(material)`,
//!   where `K` is an ephemeral 256-bit AES key, the RSA-OAEP part (that hash, MGF1 of it, no
//!   label) is exactly one modulus long, and `KWP` is AES key wrap with padding (RFC 5649).
//!   This is what AWS's documentation has users run: `openssl pkeyutl -encrypt -pkeyopt
//!   rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256` for
//!   `K`, then `openssl enc -id-aes256-wrap-pad` for the material, concatenated.
//!
//! AWS no longer accepts `RSAES_PKCS1_V1_5`; `SM2PKE` and the `SM2` wrapping key spec exist
//! only in AWS's China regions. None of them parses here: the caller answers
//! UnsupportedOperationException.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_256};
use aws_lc_rs::rsa::{
    KeySize, OaepAlgorithm, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256,
};
use zeroize::Zeroizing;

/// The ephemeral AES key of the `RSA_AES_KEY_WRAP_*` algorithms: AES-256, as AWS requires.
const EPHEMERAL_AES_KEY_LEN: usize = 32;

/// The shortest RFC 5649 ciphertext: one 8-byte integrity block and one 8-byte data block.
const MIN_KWP_LEN: usize = 16;

/// The RSA wrapping key's size, with AWS's `WrappingKeySpec` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrappingKeySpec {
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl WrappingKeySpec {
    /// AWS's name (`RSA_2048`, `RSA_3072`, `RSA_4096`); `None` for any other, `SM2` included.
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

    fn key_size(self) -> KeySize {
        match self {
            WrappingKeySpec::Rsa2048 => KeySize::Rsa2048,
            WrappingKeySpec::Rsa3072 => KeySize::Rsa3072,
            WrappingKeySpec::Rsa4096 => KeySize::Rsa4096,
        }
    }

    fn from_bits(bits: usize) -> Option<WrappingKeySpec> {
        match bits {
            2048 => Some(WrappingKeySpec::Rsa2048),
            3072 => Some(WrappingKeySpec::Rsa3072),
            4096 => Some(WrappingKeySpec::Rsa4096),
            _ => None,
        }
    }
}

/// How the material is wrapped, with AWS's `WrappingAlgorithm` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrappingAlgorithm {
    RsaesOaepSha1,
    RsaesOaepSha256,
    RsaAesKeyWrapSha1,
    RsaAesKeyWrapSha256,
}

impl WrappingAlgorithm {
    /// AWS's name; `None` for any other, the retired `RSAES_PKCS1_V1_5` and the China-only
    /// `SM2PKE` included.
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

    /// The RSA-OAEP parameters: the hash and MGF1 of the same hash.
    fn oaep(self) -> &'static OaepAlgorithm {
        match self {
            WrappingAlgorithm::RsaesOaepSha1 | WrappingAlgorithm::RsaAesKeyWrapSha1 => &OAEP_SHA1_MGF1SHA1,
            WrappingAlgorithm::RsaesOaepSha256 | WrappingAlgorithm::RsaAesKeyWrapSha256 => &OAEP_SHA256_MGF1SHA256,
        }
    }

    /// Whether the RSA part carries an ephemeral AES key rather than the material.
    fn is_hybrid(self) -> bool {
        matches!(self, WrappingAlgorithm::RsaAesKeyWrapSha1 | WrappingAlgorithm::RsaAesKeyWrapSha256)
    }
}

/// Wrapped material that does not unwrap with this key and algorithm. It says nothing more,
/// by design: which step failed is no business of the sender's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnwrapError;

impl fmt::Display for UnwrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the wrapped key material does not decrypt with this wrapping key and algorithm")
    }
}

impl std::error::Error for UnwrapError {}

/// An RSA wrapping key pair. Its private half leaves the agent only sealed in an import
/// token; `Debug` shows the spec alone.
pub struct WrappingKey {
    spec: WrappingKeySpec,
    oaep: OaepPrivateDecryptingKey,
    /// The private key as PKCS#8 v1 DER, kept since the token needs it and marshalling it
    /// again could fail (out of memory) where this cannot.
    pkcs8: Zeroizing<Vec<u8>>,
    /// DER SubjectPublicKeyInfo.
    public_der: Vec<u8>,
}

impl WrappingKey {
    /// A fresh key pair of `spec`'s size (RSA-4096 takes a second or more).
    pub fn generate(spec: WrappingKeySpec) -> Result<WrappingKey, String> {
        let private = PrivateDecryptingKey::generate(spec.key_size())
            .map_err(|_| format!("cannot generate an {} wrapping key", spec.as_str()))?;
        let pkcs8 = private
            .as_der()
            .map(|der| Zeroizing::new(der.as_ref().to_vec()))
            .map_err(|_| format!("cannot encode the {} wrapping key", spec.as_str()))?;
        WrappingKey::new(spec, private, pkcs8)
    }

    /// The key [`to_pkcs8`](Self::to_pkcs8) gave. Only RSA keys of a wrapping key spec's size
    /// are accepted.
    pub fn from_pkcs8(der: &[u8]) -> Result<WrappingKey, String> {
        let private = PrivateDecryptingKey::from_pkcs8(der)
            .map_err(|e| format!("the wrapping key is not a PKCS#8 RSA private key: {e}"))?;
        let bits = private.key_size_bits();
        let spec = WrappingKeySpec::from_bits(bits)
            .ok_or_else(|| format!("the wrapping key is RSA-{bits}, not one of RSA_2048, RSA_3072, RSA_4096"))?;
        WrappingKey::new(spec, private, Zeroizing::new(der.to_vec()))
    }

    fn new(
        spec: WrappingKeySpec,
        private: PrivateDecryptingKey,
        pkcs8: Zeroizing<Vec<u8>>,
    ) -> Result<WrappingKey, String> {
        let public_der = private
            .public_key()
            .as_der()
            .map(|der| der.as_ref().to_vec())
            .map_err(|_| format!("cannot encode the {} wrapping key's public key", spec.as_str()))?;
        let oaep = OaepPrivateDecryptingKey::new(private)
            .map_err(|_| format!("the {} wrapping key cannot decrypt RSA-OAEP", spec.as_str()))?;
        Ok(WrappingKey { spec, oaep, pkcs8, public_der })
    }

    /// The private key as PKCS#8 v1 DER, in memory wiped on drop.
    pub fn to_pkcs8(&self) -> Zeroizing<Vec<u8>> {
        self.pkcs8.clone()
    }

    pub fn spec(&self) -> WrappingKeySpec {
        self.spec
    }

    /// The public key as DER SubjectPublicKeyInfo: GetParametersForImport's `PublicKey`.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.public_der.clone()
    }

    /// The key material in `wrapped` (see the module's documentation for the formats),
    /// in memory wiped on drop.
    pub fn unwrap(&self, algorithm: WrappingAlgorithm, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
        let modulus_len = self.oaep.key_size_bytes();
        let (rsa_part, kwp_part) = wrapped.split_at_checked(modulus_len).ok_or(UnwrapError)?;
        // The hybrids carry a key wrap after the RSA part; RSAES_OAEP_* are the RSA part alone.
        if algorithm.is_hybrid() == kwp_part.is_empty() {
            return Err(UnwrapError);
        }
        let mut decrypted = Zeroizing::new(vec![0u8; self.oaep.min_output_size()]);
        let len = self.oaep.decrypt(algorithm.oaep(), rsa_part, &mut decrypted, None).map_err(|_| UnwrapError)?.len();
        decrypted.truncate(len);
        if !algorithm.is_hybrid() {
            return Ok(decrypted);
        }
        if decrypted.len() != EPHEMERAL_AES_KEY_LEN || kwp_part.len() < MIN_KWP_LEN {
            return Err(UnwrapError);
        }
        let kek = AesKek::new(&AES_256, &decrypted).map_err(|_| UnwrapError)?;
        let mut material = Zeroizing::new(vec![0u8; kwp_part.len()]);
        let len = kek.unwrap_with_padding(kwp_part, &mut material).map_err(|_| UnwrapError)?.len();
        material.truncate(len);
        Ok(material)
    }
}

impl fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappingKey").field("spec", &self.spec.as_str()).finish_non_exhaustive()
    }
}

/// Wraps `material` for the holder of the RSA public key `public_der` (DER
/// SubjectPublicKeyInfo) with `algorithm`, in the formats of the module's documentation:
/// what a user does with GetParametersForImport's public key, and what kmsd does to send a
/// replica its key material. (tests/python/wrap_key_material.py is an independent
/// implementation the import tests use.)
pub fn wrap(public_der: &[u8], algorithm: WrappingAlgorithm, material: &[u8]) -> Result<Vec<u8>, String> {
    let not_rsa = |_| "the wrapping key is not an RSA public key (DER SubjectPublicKeyInfo)".to_string();
    let public = OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(public_der).map_err(not_rsa)?)
        .map_err(|_| "the wrapping key cannot encrypt RSA-OAEP".to_string())?;
    let rsa = |plaintext: &[u8]| -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; public.ciphertext_size()];
        let len = public
            .encrypt(algorithm.oaep(), plaintext, &mut out, None)
            .map_err(|_| format!("{} cannot wrap {} bytes with this key", algorithm.as_str(), plaintext.len()))?
            .len();
        out.truncate(len);
        Ok(out)
    };
    if !algorithm.is_hybrid() {
        return rsa(material);
    }
    let mut aes_key = Zeroizing::new([0u8; EPHEMERAL_AES_KEY_LEN]);
    kmsfs_common::aead::random_bytes(&mut aes_key[..]);
    let kek = AesKek::new(&AES_256, &aes_key[..]).map_err(|_| "cannot make an AES key wrap key".to_string())?;
    let mut kwp = vec![0u8; material.len() + 15];
    let len = kek.wrap_with_padding(material, &mut kwp).map_err(|_| "AES key wrap failed".to_string())?.len();
    kwp.truncate(len);
    let mut out = rsa(&aes_key[..])?;
    out.extend_from_slice(&kwp);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALGORITHMS: [WrappingAlgorithm; 4] = [
        WrappingAlgorithm::RsaesOaepSha1,
        WrappingAlgorithm::RsaesOaepSha256,
        WrappingAlgorithm::RsaAesKeyWrapSha1,
        WrappingAlgorithm::RsaAesKeyWrapSha256,
    ];

    fn random(len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        aws_lc_rs::rand::fill(&mut bytes).unwrap();
        bytes
    }

    fn wrap(public_der: &[u8], algorithm: WrappingAlgorithm, material: &[u8]) -> Vec<u8> {
        super::wrap(public_der, algorithm, material).unwrap()
    }

    #[test]
    fn names_are_aws_names_and_retired_or_china_only_ones_do_not_parse() {
        for algorithm in ALGORITHMS {
            assert_eq!(WrappingAlgorithm::parse(algorithm.as_str()), Some(algorithm));
        }
        for spec in [WrappingKeySpec::Rsa2048, WrappingKeySpec::Rsa3072, WrappingKeySpec::Rsa4096] {
            assert_eq!(WrappingKeySpec::parse(spec.as_str()), Some(spec));
        }
        for name in ["RSAES_PKCS1_V1_5", "SM2PKE", "rsaes_oaep_sha_256", "RSAES_OAEP_SHA_384", ""] {
            assert_eq!(WrappingAlgorithm::parse(name), None, "{name}");
        }
        for name in ["SM2", "RSA_1024", "RSA_8192", "rsa_2048", ""] {
            assert_eq!(WrappingKeySpec::parse(name), None, "{name}");
        }
    }

    #[test]
    fn every_algorithm_unwraps_what_was_wrapped_for_an_rsa_2048_key() {
        let key = WrappingKey::generate(WrappingKeySpec::Rsa2048).unwrap();
        assert_eq!(key.spec(), WrappingKeySpec::Rsa2048);
        for algorithm in ALGORITHMS {
            let material = random(32);
            let wrapped = wrap(&key.public_key_der(), algorithm, &material);
            assert_eq!(&key.unwrap(algorithm, &wrapped).unwrap()[..], &material[..], "{}", algorithm.as_str());
        }
        // Key wrap with padding: lengths that are not a multiple of 8, one block, a large key.
        for len in [1, 8, 31, 33, 1217] {
            let material = random(len);
            let wrapped = wrap(&key.public_key_der(), WrappingAlgorithm::RsaAesKeyWrapSha256, &material);
            assert_eq!(&key.unwrap(WrappingAlgorithm::RsaAesKeyWrapSha256, &wrapped).unwrap()[..], &material[..]);
        }
    }

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let key = WrappingKey::generate(WrappingKeySpec::Rsa2048).unwrap();
        let again = WrappingKey::from_pkcs8(&key.to_pkcs8()).unwrap();
        assert_eq!(again.spec(), WrappingKeySpec::Rsa2048);
        assert_eq!(again.public_key_der(), key.public_key_der());
        let material = random(32);
        for algorithm in ALGORITHMS {
            let wrapped = wrap(&key.public_key_der(), algorithm, &material);
            assert_eq!(&again.unwrap(algorithm, &wrapped).unwrap()[..], &material[..], "{}", algorithm.as_str());
        }

        let pkcs8 = key.to_pkcs8();
        assert!(WrappingKey::from_pkcs8(&pkcs8[..pkcs8.len() - 1]).is_err(), "truncated");
        assert!(WrappingKey::from_pkcs8(b"not a key").is_err());
        assert!(WrappingKey::from_pkcs8(&[]).is_err());
        let ed25519 =
            aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
        assert!(WrappingKey::from_pkcs8(ed25519.as_ref()).is_err(), "not RSA");
        assert_eq!(format!("{key:?}"), "WrappingKey { spec: \"RSA_2048\", .. }");
    }

    #[test]
    fn what_was_not_wrapped_for_this_key_and_algorithm_does_not_unwrap() {
        let key = WrappingKey::generate(WrappingKeySpec::Rsa2048).unwrap();
        let other = WrappingKey::generate(WrappingKeySpec::Rsa2048).unwrap();
        let modulus_len = 256;
        for algorithm in ALGORITHMS {
            let name = algorithm.as_str();
            let wrapped = wrap(&key.public_key_der(), algorithm, &random(32));
            assert_eq!(other.unwrap(algorithm, &wrapped), Err(UnwrapError), "{name}: another key");

            let mut failures = vec![
                (wrapped[..wrapped.len() - 1].to_vec(), "truncated by a byte"),
                (wrapped[..wrapped.len() - 8].to_vec(), "truncated by a block"),
                (wrapped[..modulus_len - 1].to_vec(), "shorter than the modulus"),
                (Vec::new(), "empty"),
                ([&wrapped[..], &[0]].concat(), "a byte more"),
            ];
            for at in [0, modulus_len / 2, modulus_len - 1, wrapped.len() - 1] {
                let mut tampered = wrapped.clone();
                tampered[at] ^= 0x01;
                failures.push((tampered, "a bit flipped"));
            }
            if algorithm.is_hybrid() {
                failures.push((wrapped[..modulus_len].to_vec(), "the RSA part alone"));
                failures.push(([&wrapped[..modulus_len], &wrapped[..8]].concat(), "a one-block key wrap"));
            }
            for (bad, what) in &failures {
                assert_eq!(key.unwrap(algorithm, bad), Err(UnwrapError), "{name}: {what}");
            }
            for wrong in ALGORITHMS.into_iter().filter(|&a| a != algorithm) {
                assert_eq!(key.unwrap(wrong, &wrapped), Err(UnwrapError), "{name} unwrapped as {}", wrong.as_str());
            }
        }
        // A hybrid whose RSA part holds a key of the wrong size: AWS's format is AES-256 only.
        let public =
            OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(&key.public_key_der()).unwrap()).unwrap();
        let mut rsa = vec![0u8; public.ciphertext_size()];
        public.encrypt(&OAEP_SHA256_MGF1SHA256, &random(16), &mut rsa, None).unwrap();
        let aes128_kwp = random(40);
        assert_eq!(key.unwrap(WrappingAlgorithm::RsaAesKeyWrapSha256, &[rsa, aes128_kwp].concat()), Err(UnwrapError));
        assert!(!UnwrapError.to_string().is_empty());
    }

    #[test]
    fn the_public_key_is_an_rsa_subject_public_key_info() {
        let key = WrappingKey::generate(WrappingKeySpec::Rsa2048).unwrap();
        let der = key.public_key_der();
        // SEQUENCE, long form length of two bytes, covering the rest.
        assert_eq!(&der[..2], &[0x30, 0x82]);
        assert_eq!(usize::from(u16::from_be_bytes([der[2], der[3]])), der.len() - 4);
        // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }, then the BIT STRING.
        let rsa_encryption = [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
        assert_eq!(&der[4..19], &rsa_encryption);
        assert_eq!(der[19], 0x03);
        let public = PublicEncryptingKey::from_der(&der).unwrap();
        assert_eq!(public.key_size_bits(), 2048);
        assert_eq!(public.as_der().unwrap().as_ref(), &der[..]);
    }

    #[test]
    fn rsa_3072_and_rsa_4096_wrapping_keys() {
        for (spec, bits, algorithm) in [
            (WrappingKeySpec::Rsa3072, 3072, WrappingAlgorithm::RsaAesKeyWrapSha256),
            (WrappingKeySpec::Rsa4096, 4096, WrappingAlgorithm::RsaesOaepSha256),
        ] {
            let key = WrappingKey::from_pkcs8(&WrappingKey::generate(spec).unwrap().to_pkcs8()).unwrap();
            assert_eq!(key.spec(), spec);
            let der = key.public_key_der();
            assert_eq!(PublicEncryptingKey::from_der(&der).unwrap().key_size_bits(), bits);
            let material = random(32);
            let wrapped = wrap(&der, algorithm, &material);
            assert_eq!(wrapped.len(), bits / 8 + if algorithm.is_hybrid() { 40 } else { 0 });
            assert_eq!(&key.unwrap(algorithm, &wrapped).unwrap()[..], &material[..], "{}", spec.as_str());
        }
    }
}
