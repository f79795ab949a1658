//! Keys of the other kinds AWS KMS has: RSA, elliptic-curve and Edwards signing keys, and
//! HMAC keys. Which spec allows which usage and algorithms follows AWS's tables; every
//! operation runs in aws-lc-rs (constant time, FIPS-capable).
//!
//! The private key (PKCS#8 DER) or the HMAC key is kept sealed by the root of trust
//! ([`crate::rot::RootOfTrust::seal_secret`]) and parsed once, when the key loads. HMAC keys
//! are zeroized and locked in RAM like symmetric material; an asymmetric private key lives
//! in aws-lc's own allocation, which aws-lc cleanses when it frees it but which kmsd cannot
//! `mlock` (the process-wide protections still apply: no core dumps, not dumpable). The DER
//! bytes pass only through zeroizing buffers.

use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{
    KeySize, OaepAlgorithm, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey};
use aws_lc_rs::{agreement, hmac};
use kmsfs_common::{ErrorKind, KmsError};
use zeroize::Zeroizing;

/// What AWS allows a key spec: its usages and, per usage, its algorithms.
pub struct SpecInfo {
    pub usages: &'static [&'static str],
    pub signing: &'static [&'static str],
    pub encryption: &'static [&'static str],
    pub mac: &'static [&'static str],
    pub key_agreement: &'static [&'static str],
}

const RSA_SIGNING: &[&str] = &[
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
];
const RSA_ENCRYPTION: &[&str] = &["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"];
const ECC_NIST_USAGES: &[&str] = &["SIGN_VERIFY", "KEY_AGREEMENT"];

/// The key specs kmsd supports (SM2 is for AWS's China regions; ML-DSA waits for aws-lc-rs's
/// stable API), with AWS's rules. `None` for a spec outside the model or not supported.
pub fn spec_info(spec: &str) -> Option<SpecInfo> {
    let none: &'static [&'static str] = &[];
    let info =
        |usages, signing, encryption, mac, key_agreement| SpecInfo { usages, signing, encryption, mac, key_agreement };
    Some(match spec {
        "SYMMETRIC_DEFAULT" => info(&["ENCRYPT_DECRYPT"], none, &["SYMMETRIC_DEFAULT"], none, none),
        "RSA_2048" | "RSA_3072" | "RSA_4096" => {
            info(&["ENCRYPT_DECRYPT", "SIGN_VERIFY"], RSA_SIGNING, RSA_ENCRYPTION, none, none)
        }
        "ECC_NIST_P256" => info(ECC_NIST_USAGES, &["ECDSA_SHA_256"], none, none, &["ECDH"]),
        "ECC_NIST_P384" => info(ECC_NIST_USAGES, &["ECDSA_SHA_384"], none, none, &["ECDH"]),
        "ECC_NIST_P521" => info(ECC_NIST_USAGES, &["ECDSA_SHA_512"], none, none, &["ECDH"]),
        "ECC_SECG_P256K1" => info(&["SIGN_VERIFY"], &["ECDSA_SHA_256"], none, none, none),
        // aws-lc-rs has no Ed25519ph, so ED25519_PH_SHA_512 is not offered.
        "ECC_NIST_EDWARDS25519" => info(&["SIGN_VERIFY"], &["ED25519_SHA_512"], none, none, none),
        "HMAC_224" => info(&["GENERATE_VERIFY_MAC"], none, none, &["HMAC_SHA_224"], none),
        "HMAC_256" => info(&["GENERATE_VERIFY_MAC"], none, none, &["HMAC_SHA_256"], none),
        "HMAC_384" => info(&["GENERATE_VERIFY_MAC"], none, none, &["HMAC_SHA_384"], none),
        "HMAC_512" => info(&["GENERATE_VERIFY_MAC"], none, none, &["HMAC_SHA_512"], none),
        _ => return None,
    })
}

impl SpecInfo {
    /// The algorithms of `usage` this spec offers, as DescribeKey lists them.
    pub fn algorithms(&self, usage: &str) -> Algorithms {
        let pick = |list: &'static [&'static str], wanted| if usage == wanted { list } else { &[] };
        Algorithms {
            signing: pick(self.signing, "SIGN_VERIFY"),
            encryption: pick(self.encryption, "ENCRYPT_DECRYPT"),
            mac: pick(self.mac, "GENERATE_VERIFY_MAC"),
            key_agreement: pick(self.key_agreement, "KEY_AGREEMENT"),
        }
    }
}

/// A key's algorithms for its usage.
pub struct Algorithms {
    pub signing: &'static [&'static str],
    pub encryption: &'static [&'static str],
    pub mac: &'static [&'static str],
    pub key_agreement: &'static [&'static str],
}

fn internal(what: &str) -> KmsError {
    KmsError::internal(format!("cannot {what}"))
}

fn invalid_usage(message: String) -> KmsError {
    KmsError::new(ErrorKind::InvalidKeyUsageException, message)
}

/// The private half of an asymmetric key, or an HMAC key.
pub enum PrivateKey {
    Rsa(RsaKeyPair),
    /// An RSA key of usage ENCRYPT_DECRYPT (RSAES_OAEP), with its public half and that
    /// half's DER SubjectPublicKeyInfo.
    RsaEncryption(OaepPrivateDecryptingKey, OaepPublicEncryptingKey, Vec<u8>),
    Ecdsa(EcdsaKeyPair, &'static signature::EcdsaVerificationAlgorithm),
    Ed25519(Ed25519KeyPair),
    /// A NIST-curve key of usage KEY_AGREEMENT (ECDH), with its DER SubjectPublicKeyInfo.
    Ecdh(agreement::PrivateKey, Vec<u8>),
    Hmac(Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

/// The aws-lc-rs signing and verification algorithms of an ECC spec.
fn ecdsa_algorithms(
    spec: &str,
) -> Option<(&'static signature::EcdsaSigningAlgorithm, &'static signature::EcdsaVerificationAlgorithm)> {
    Some(match spec {
        "ECC_NIST_P256" => (&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &signature::ECDSA_P256_SHA256_ASN1),
        "ECC_NIST_P384" => (&signature::ECDSA_P384_SHA384_ASN1_SIGNING, &signature::ECDSA_P384_SHA384_ASN1),
        "ECC_NIST_P521" => (&signature::ECDSA_P521_SHA512_ASN1_SIGNING, &signature::ECDSA_P521_SHA512_ASN1),
        "ECC_SECG_P256K1" => (&signature::ECDSA_P256K1_SHA256_ASN1_SIGNING, &signature::ECDSA_P256K1_SHA256_ASN1),
        _ => return None,
    })
}

/// The aws-lc-rs ECDH algorithm of a NIST curve spec.
fn ecdh_algorithm(spec: &str) -> Option<&'static agreement::Algorithm> {
    Some(match spec {
        "ECC_NIST_P256" => &agreement::ECDH_P256,
        "ECC_NIST_P384" => &agreement::ECDH_P384,
        "ECC_NIST_P521" => &agreement::ECDH_P521,
        _ => return None,
    })
}

/// The length of a generated HMAC key of `spec`, and the longest AWS lets one import.
fn hmac_lengths(spec: &str) -> Option<(usize, usize)> {
    Some(match spec {
        "HMAC_224" => (28, 64),
        "HMAC_256" => (32, 64),
        "HMAC_384" => (48, 128),
        "HMAC_512" => (64, 128),
        _ => return None,
    })
}

impl PrivateKey {
    /// A new key of `spec` for `usage`, and the bytes to seal (PKCS#8 DER, or the HMAC key).
    pub fn generate(spec: &str, usage: &str) -> Result<(PrivateKey, Zeroizing<Vec<u8>>), KmsError> {
        let bytes = if let (Some(algorithm), "KEY_AGREEMENT") = (ecdh_algorithm(spec), usage) {
            let key = agreement::PrivateKey::generate(algorithm).map_err(|_| internal("generate an ECDH key"))?;
            let der: aws_lc_rs::encoding::Pkcs8V1Der = key.as_der().map_err(|_| internal("encode an ECDH key"))?;
            Zeroizing::new(der.as_ref().to_vec())
        } else if let Some((len, _)) = hmac_lengths(spec) {
            let mut key = Zeroizing::new(vec![0u8; len]);
            kmsfs_common::aead::random_bytes(&mut key);
            key
        } else if let Some((signing, _)) = ecdsa_algorithms(spec) {
            let pair = EcdsaKeyPair::generate(signing).map_err(|_| internal("generate an ECC key"))?;
            Zeroizing::new(pair.to_pkcs8v1().map_err(|_| internal("encode an ECC key"))?.as_ref().to_vec())
        } else {
            match spec {
                "ECC_NIST_EDWARDS25519" => {
                    let pair = Ed25519KeyPair::generate().map_err(|_| internal("generate an Ed25519 key"))?;
                    // PKCS#8 v1 (RFC 5208, no public key inside), which every library reads.
                    Zeroizing::new(pair.to_pkcs8v1().map_err(|_| internal("encode an Ed25519 key"))?.as_ref().to_vec())
                }
                "RSA_2048" | "RSA_3072" | "RSA_4096" => {
                    let size = match spec {
                        "RSA_2048" => KeySize::Rsa2048,
                        "RSA_3072" => KeySize::Rsa3072,
                        _ => KeySize::Rsa4096,
                    };
                    let pair = RsaKeyPair::generate(size).map_err(|_| internal("generate an RSA key"))?;
                    let der: aws_lc_rs::encoding::Pkcs8V1Der =
                        pair.as_der().map_err(|_| internal("encode an RSA key"))?;
                    Zeroizing::new(der.as_ref().to_vec())
                }
                _ => return Err(KmsError::internal(format!("no key generation for {spec}"))),
            }
        };
        Ok((PrivateKey::from_stored(spec, usage, &bytes)?, bytes))
    }

    /// The key of `spec` and `usage` from the bytes `generate` returned.
    pub fn from_stored(spec: &str, usage: &str, bytes: &[u8]) -> Result<PrivateKey, KmsError> {
        let damaged = || KmsError::internal(format!("the stored {spec} key does not parse"));
        if let Some((min, max)) = hmac_lengths(spec) {
            if !(min..=max).contains(&bytes.len()) {
                return Err(damaged());
            }
            let key = Zeroizing::new(bytes.to_vec());
            crate::sys::lock(&key[..]);
            return Ok(PrivateKey::Hmac(key));
        }
        if let (Some(algorithm), "KEY_AGREEMENT") = (ecdh_algorithm(spec), usage) {
            let key = agreement::PrivateKey::from_private_key_der(algorithm, bytes).map_err(|_| damaged())?;
            let public = key.compute_public_key().map_err(|_| damaged())?;
            let spki = public.as_der().map_err(|_| damaged())?.as_ref().to_vec();
            return Ok(PrivateKey::Ecdh(key, spki));
        }
        if let Some((signing, verification)) = ecdsa_algorithms(spec) {
            let pair = EcdsaKeyPair::from_pkcs8(signing, bytes).map_err(|_| damaged())?;
            return Ok(PrivateKey::Ecdsa(pair, verification));
        }
        match spec {
            "ECC_NIST_EDWARDS25519" => {
                {
                    // v1 carries no public key to check the private one against: it is derived.
                    Ok(PrivateKey::Ed25519(Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes).map_err(|_| damaged())?))
                }
            }
            "RSA_2048" | "RSA_3072" | "RSA_4096" if usage == "ENCRYPT_DECRYPT" => {
                let key = PrivateDecryptingKey::from_pkcs8(bytes).map_err(|_| damaged())?;
                let public = key.public_key();
                let spki = public.as_der().map_err(|_| damaged())?.as_ref().to_vec();
                Ok(PrivateKey::RsaEncryption(
                    OaepPrivateDecryptingKey::new(key).map_err(|_| damaged())?,
                    OaepPublicEncryptingKey::new(public).map_err(|_| damaged())?,
                    spki,
                ))
            }
            "RSA_2048" | "RSA_3072" | "RSA_4096" => {
                Ok(PrivateKey::Rsa(RsaKeyPair::from_pkcs8(bytes).map_err(|_| damaged())?))
            }
            _ => Err(damaged()),
        }
    }

    /// The public key as a DER SubjectPublicKeyInfo (GetPublicKey); `None` for HMAC keys.
    pub fn public_key_der(&self) -> Result<Option<Vec<u8>>, KmsError> {
        let failed = |_| internal("encode the public key");
        Ok(Some(match self {
            PrivateKey::Rsa(pair) => pair.public_key().as_der().map_err(failed)?.as_ref().to_vec(),
            PrivateKey::RsaEncryption(_, _, spki) | PrivateKey::Ecdh(_, spki) => spki.clone(),
            PrivateKey::Ecdsa(pair, _) => pair.public_key().as_der().map_err(failed)?.as_ref().to_vec(),
            PrivateKey::Ed25519(pair) => pair.public_key().as_der().map_err(failed)?.as_ref().to_vec(),
            PrivateKey::Hmac(_) => return Ok(None),
        }))
    }

    /// Signs `message` (RAW) or the digest `message` (DIGEST) with `algorithm`, which the
    /// caller has checked the key offers.
    pub fn sign(&self, algorithm: &str, message_type: MessageType, message: &[u8]) -> Result<Vec<u8>, KmsError> {
        let rng = SystemRandom::new();
        let failed = |_| internal("sign");
        match self {
            PrivateKey::Rsa(pair) => {
                let (encoding, hash) = rsa_encoding(algorithm)?;
                let mut sig = vec![0u8; pair.public_modulus_len()];
                match message_type {
                    MessageType::Raw => pair.sign(encoding.0, &rng, message, &mut sig).map_err(failed)?,
                    MessageType::Digest => {
                        pair.sign_digest(encoding.0, &import_digest(message, hash)?, &mut sig).map_err(failed)?
                    }
                }
                Ok(sig)
            }
            PrivateKey::Ecdsa(pair, _) => {
                let sig = match message_type {
                    MessageType::Raw => pair.sign(&rng, message).map_err(failed)?,
                    MessageType::Digest => {
                        pair.sign_digest(&import_digest(message, ecdsa_hash(algorithm)?)?).map_err(failed)?
                    }
                };
                Ok(sig.as_ref().to_vec())
            }
            PrivateKey::Ed25519(pair) => match message_type {
                MessageType::Raw => Ok(pair.sign(message).as_ref().to_vec()),
                MessageType::Digest => Err(KmsError::validation(
                    "ED25519_SHA_512 signs RAW messages only (the DIGEST form would be ED25519_PH_SHA_512)",
                )),
            },
            PrivateKey::Hmac(_) | PrivateKey::RsaEncryption(..) | PrivateKey::Ecdh(..) => {
                Err(invalid_usage("this key does not sign".into()))
            }
        }
    }

    /// Whether `signature` is a valid signature of `message` (or of the digest `message`).
    pub fn verify(
        &self,
        algorithm: &str,
        message_type: MessageType,
        message: &[u8],
        signature: &[u8],
    ) -> Result<bool, KmsError> {
        Ok(match self {
            PrivateKey::Rsa(pair) => {
                let (encoding, hash) = rsa_encoding(algorithm)?;
                let key = UnparsedPublicKey::new(encoding.1, pair.public_key().as_ref());
                match message_type {
                    MessageType::Raw => key.verify(message, signature).is_ok(),
                    MessageType::Digest => key.verify_digest(&import_digest(message, hash)?, signature).is_ok(),
                }
            }
            PrivateKey::Ecdsa(pair, verification) => {
                let key = UnparsedPublicKey::new(*verification, pair.public_key().as_ref());
                match message_type {
                    MessageType::Raw => key.verify(message, signature).is_ok(),
                    MessageType::Digest => {
                        key.verify_digest(&import_digest(message, ecdsa_hash(algorithm)?)?, signature).is_ok()
                    }
                }
            }
            PrivateKey::Ed25519(pair) => match message_type {
                MessageType::Raw => UnparsedPublicKey::new(&signature::ED25519, pair.public_key().as_ref())
                    .verify(message, signature)
                    .is_ok(),
                MessageType::Digest => {
                    return Err(KmsError::validation("ED25519_SHA_512 verifies RAW messages only"));
                }
            },
            PrivateKey::Hmac(_) | PrivateKey::RsaEncryption(..) | PrivateKey::Ecdh(..) => {
                return Err(invalid_usage("this key does not verify signatures".into()))
            }
        })
    }

    /// The HMAC of `message`.
    pub fn mac(&self, algorithm: &str, message: &[u8]) -> Result<Vec<u8>, KmsError> {
        let PrivateKey::Hmac(key) = self else {
            return Err(invalid_usage("only HMAC keys generate MACs".into()));
        };
        let algorithm = match algorithm {
            "HMAC_SHA_224" => hmac::HMAC_SHA224,
            "HMAC_SHA_256" => hmac::HMAC_SHA256,
            "HMAC_SHA_384" => hmac::HMAC_SHA384,
            "HMAC_SHA_512" => hmac::HMAC_SHA512,
            other => return Err(invalid_usage(format!("{other} is not an HMAC algorithm"))),
        };
        Ok(hmac::sign(&hmac::Key::new(algorithm, key), message).as_ref().to_vec())
    }

    /// Whether `mac` is the HMAC of `message`, compared in constant time.
    pub fn verify_mac(&self, algorithm: &str, message: &[u8], mac: &[u8]) -> Result<bool, KmsError> {
        let expected = self.mac(algorithm, message)?;
        Ok(expected.len() == mac.len() && aws_lc_rs::constant_time::verify_slices_are_equal(&expected, mac).is_ok())
    }
}

impl PrivateKey {
    /// ECDH with the peer's public key (DER SubjectPublicKeyInfo, on the same curve): the raw
    /// shared secret (the x-coordinate), as AWS returns it.
    pub fn derive_shared_secret(&self, peer_public_key: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let PrivateKey::Ecdh(key, _) = self else {
            return Err(invalid_usage("this key does not agree keys".into()));
        };
        let peer = agreement::UnparsedPublicKey::new(key.algorithm(), peer_public_key);
        let refused =
            || KmsError::validation("PublicKey is not a DER SubjectPublicKeyInfo of a public key on the key's curve");
        agreement::agree(key, peer, refused(), |secret| Ok(Zeroizing::new(secret.to_vec())))
    }
}

/// The aws-lc-rs OAEP parameters of an RSAES algorithm (MGF1 with the same hash, as AWS).
fn oaep(algorithm: &str) -> Result<&'static OaepAlgorithm, KmsError> {
    match algorithm {
        "RSAES_OAEP_SHA_1" => Ok(&OAEP_SHA1_MGF1SHA1),
        "RSAES_OAEP_SHA_256" => Ok(&OAEP_SHA256_MGF1SHA256),
        other => Err(invalid_usage(format!("{other} is not an RSA encryption algorithm"))),
    }
}

impl PrivateKey {
    /// RSAES-OAEP encryption to this key's public half. A plaintext longer than the key and
    /// hash allow (190 bytes for RSA_2048 with SHA-256, 214 with SHA-1) is a ValidationException.
    pub fn encrypt(&self, algorithm: &str, plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
        let PrivateKey::RsaEncryption(_, public, _) = self else {
            return Err(invalid_usage("this key does not encrypt".into()));
        };
        let oaep = oaep(algorithm)?;
        let max = public.max_plaintext_size(oaep);
        if plaintext.len() > max {
            return Err(KmsError::validation(format!(
                "the plaintext is {} bytes; {algorithm} under a {}-bit key encrypts at most {max}",
                plaintext.len(),
                public.key_size_bits()
            )));
        }
        let mut out = vec![0u8; public.ciphertext_size()];
        let len = public.encrypt(oaep, plaintext, &mut out, None).map_err(|_| internal("encrypt"))?.len();
        out.truncate(len);
        Ok(out)
    }

    /// RSAES-OAEP decryption; a ciphertext that does not decrypt is InvalidCiphertextException.
    pub fn decrypt(&self, algorithm: &str, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let PrivateKey::RsaEncryption(key, _, _) = self else {
            return Err(invalid_usage("this key does not decrypt".into()));
        };
        let oaep = oaep(algorithm)?;
        let mut out = Zeroizing::new(vec![0u8; key.min_output_size()]);
        let len = key.decrypt(oaep, ciphertext, &mut out, None).map_err(|_| KmsError::invalid_ciphertext())?.len();
        out.truncate(len);
        Ok(out)
    }
}

/// Sign's and Verify's `MessageType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Raw,
    Digest,
}

/// The aws-lc-rs RSA encodings (signing, verification) and hash of an RSA algorithm.
type RsaAlgorithms = (&'static dyn signature::RsaEncoding, &'static dyn signature::VerificationAlgorithm);

fn rsa_encoding(algorithm: &str) -> Result<(RsaAlgorithms, &'static digest::Algorithm), KmsError> {
    Ok(match algorithm {
        "RSASSA_PSS_SHA_256" => ((&signature::RSA_PSS_SHA256, &signature::RSA_PSS_2048_8192_SHA256), &digest::SHA256),
        "RSASSA_PSS_SHA_384" => ((&signature::RSA_PSS_SHA384, &signature::RSA_PSS_2048_8192_SHA384), &digest::SHA384),
        "RSASSA_PSS_SHA_512" => ((&signature::RSA_PSS_SHA512, &signature::RSA_PSS_2048_8192_SHA512), &digest::SHA512),
        "RSASSA_PKCS1_V1_5_SHA_256" => {
            ((&signature::RSA_PKCS1_SHA256, &signature::RSA_PKCS1_2048_8192_SHA256), &digest::SHA256)
        }
        "RSASSA_PKCS1_V1_5_SHA_384" => {
            ((&signature::RSA_PKCS1_SHA384, &signature::RSA_PKCS1_2048_8192_SHA384), &digest::SHA384)
        }
        "RSASSA_PKCS1_V1_5_SHA_512" => {
            ((&signature::RSA_PKCS1_SHA512, &signature::RSA_PKCS1_2048_8192_SHA512), &digest::SHA512)
        }
        other => return Err(invalid_usage(format!("{other} is not an RSA signing algorithm"))),
    })
}

fn ecdsa_hash(algorithm: &str) -> Result<&'static digest::Algorithm, KmsError> {
    Ok(match algorithm {
        "ECDSA_SHA_256" => &digest::SHA256,
        "ECDSA_SHA_384" => &digest::SHA384,
        "ECDSA_SHA_512" => &digest::SHA512,
        other => return Err(invalid_usage(format!("{other} is not an ECDSA algorithm"))),
    })
}

/// A DIGEST message: it must be exactly as long as the algorithm's hash.
fn import_digest(bytes: &[u8], algorithm: &'static digest::Algorithm) -> Result<Digest, KmsError> {
    if bytes.len() != algorithm.output_len() {
        return Err(KmsError::validation(format!(
            "a DIGEST message for this signing algorithm must be {} bytes long, not {}",
            algorithm.output_len(),
            bytes.len()
        )));
    }
    Digest::import_less_safe(bytes, algorithm).map_err(|_| KmsError::validation("the digest is not valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signing_spec_signs_and_verifies_each_of_its_algorithms() {
        for spec in
            ["RSA_2048", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521", "ECC_SECG_P256K1", "ECC_NIST_EDWARDS25519"]
        {
            let (key, stored) = PrivateKey::generate(spec, "SIGN_VERIFY").unwrap();
            let again = PrivateKey::from_stored(spec, "SIGN_VERIFY", &stored).unwrap();
            assert!(key.public_key_der().unwrap().unwrap().len() > 32);
            for algorithm in spec_info(spec).unwrap().signing {
                let sig = key.sign(algorithm, MessageType::Raw, b"message").unwrap();
                assert!(again.verify(algorithm, MessageType::Raw, b"message", &sig).unwrap(), "{spec} {algorithm}");
                assert!(!again.verify(algorithm, MessageType::Raw, b"messagf", &sig).unwrap(), "{spec} {algorithm}");
                if spec == "ECC_NIST_EDWARDS25519" {
                    continue;
                }
                let hash = match *algorithm {
                    a if a.ends_with("256") => &digest::SHA256,
                    a if a.ends_with("384") => &digest::SHA384,
                    _ => &digest::SHA512,
                };
                let digest = digest::digest(hash, b"message");
                let sig = key.sign(algorithm, MessageType::Digest, digest.as_ref()).unwrap();
                assert!(key.verify(algorithm, MessageType::Raw, b"message", &sig).unwrap(), "{spec} {algorithm}");
                assert!(key.sign(algorithm, MessageType::Digest, &digest.as_ref()[1..]).is_err());
            }
        }
    }

    #[test]
    fn hmac_keys_mac_at_their_length_and_verify_in_constant_time() {
        for (spec, algorithm, len) in
            [("HMAC_224", "HMAC_SHA_224", 28), ("HMAC_256", "HMAC_SHA_256", 32), ("HMAC_512", "HMAC_SHA_512", 64)]
        {
            let (key, stored) = PrivateKey::generate(spec, "GENERATE_VERIFY_MAC").unwrap();
            assert_eq!(stored.len(), len);
            let mac = key.mac(algorithm, b"m").unwrap();
            assert_eq!(mac.len(), len);
            assert!(key.verify_mac(algorithm, b"m", &mac).unwrap());
            assert!(!key.verify_mac(algorithm, b"n", &mac).unwrap());
            assert!(!key.verify_mac(algorithm, b"m", &mac[1..]).unwrap());
            assert!(key.public_key_der().unwrap().is_none());
        }
        assert!(PrivateKey::from_stored("HMAC_256", "GENERATE_VERIFY_MAC", &[0u8; 31]).is_err());
        assert!(PrivateKey::from_stored("HMAC_256", "GENERATE_VERIFY_MAC", &[0u8; 64]).is_ok());
        assert!(PrivateKey::from_stored("HMAC_256", "GENERATE_VERIFY_MAC", &[0u8; 65]).is_err());
    }

    #[test]
    fn ecdh_keys_agree_with_each_other_and_refuse_other_curves() {
        let (_, stored) = PrivateKey::generate("ECC_NIST_P256", "KEY_AGREEMENT").unwrap();
        let a = PrivateKey::from_stored("ECC_NIST_P256", "KEY_AGREEMENT", &stored).unwrap();
        let (b, _) = PrivateKey::generate("ECC_NIST_P256", "KEY_AGREEMENT").unwrap();
        let ab = a.derive_shared_secret(&b.public_key_der().unwrap().unwrap()).unwrap();
        let ba = b.derive_shared_secret(&a.public_key_der().unwrap().unwrap()).unwrap();
        assert_eq!((ab.len(), &ab[..]), (32, &ba[..]));
        let (other_curve, _) = PrivateKey::generate("ECC_NIST_P384", "KEY_AGREEMENT").unwrap();
        assert!(a.derive_shared_secret(&other_curve.public_key_der().unwrap().unwrap()).is_err());
        assert!(a.derive_shared_secret(b"not a key").is_err());
        assert!(a.sign("ECDSA_SHA_256", MessageType::Raw, b"m").is_err());
    }

    #[test]
    fn rsa_encryption_keys_round_trip_within_the_oaep_limits() {
        let (key, stored) = PrivateKey::generate("RSA_2048", "ENCRYPT_DECRYPT").unwrap();
        let key_again = PrivateKey::from_stored("RSA_2048", "ENCRYPT_DECRYPT", &stored).unwrap();
        for (algorithm, max) in [("RSAES_OAEP_SHA_1", 214), ("RSAES_OAEP_SHA_256", 190)] {
            let sealed = key.encrypt(algorithm, &vec![9u8; max]).unwrap();
            assert_eq!(sealed.len(), 256);
            assert_eq!(&key_again.decrypt(algorithm, &sealed).unwrap()[..], &vec![9u8; max][..]);
            assert!(key.encrypt(algorithm, &vec![9u8; max + 1]).is_err());
            let mut tampered = sealed.clone();
            tampered[10] ^= 1;
            assert_eq!(key.decrypt(algorithm, &tampered).unwrap_err().kind, ErrorKind::InvalidCiphertextException);
        }
        let sealed = key.encrypt("RSAES_OAEP_SHA_1", b"x").unwrap();
        assert!(key.decrypt("RSAES_OAEP_SHA_256", &sealed).is_err());
        assert!(key.sign("RSASSA_PSS_SHA_256", MessageType::Raw, b"m").is_err());
    }
}
