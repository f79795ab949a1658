//! Symmetric key material and the AEAD the agent seals ciphertext blobs with.
//!
//! Blobs use XAES-256-GCM (C2SP's specification): AES-256-GCM under a key derived from the
//! master key and the first 12 bytes of a random 24-byte nonce. Plain AES-GCM with random
//! 96-bit nonces allows only about 2^32 messages per key before a nonce collision becomes
//! likely — a day of GenerateDataKey at 50,000/s. The derived key lifts that bound out of
//! reach while keeping AES-GCM's speed, much as AWS KMS derives a key per encryption.

use aes_gcm::aead::array::Array;
use aes_gcm::aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes_gcm::aes::Aes256;
use aes_gcm::{AeadInOut, Aes256Gcm};
use zeroize::{Zeroize, Zeroizing};

/// Length of a 256-bit key.
pub const KEY_LEN: usize = 32;
/// Length of an XAES-256-GCM nonce.
pub const XAES_NONCE_LEN: usize = 24;
/// Length of a GCM tag.
pub const TAG_LEN: usize = 16;

/// Raw 256-bit key bytes, zeroized on drop and never printed.
#[derive(Clone, Zeroize, zeroize::ZeroizeOnDrop)]
pub struct KeyBytes([u8; KEY_LEN]);

impl KeyBytes {
    pub fn from_array(bytes: [u8; KEY_LEN]) -> KeyBytes {
        KeyBytes(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<KeyBytes> {
        let array: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(KeyBytes(array))
    }

    /// Fresh key bytes from the operating system's CSPRNG.
    pub fn random() -> KeyBytes {
        let mut bytes = [0u8; KEY_LEN];
        random_bytes(&mut bytes);
        KeyBytes(bytes)
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBytes(<redacted>)")
    }
}

/// Fills `buf` from the OS CSPRNG. Failure of the kernel's RNG leaves nothing safe to do.
pub fn random_bytes(buf: &mut [u8]) {
    #[allow(clippy::expect_used)]
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

/// The AEAD failed: wrong key, wrong AAD, or tampered data. Deliberately carries nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

/// An XAES-256-GCM key: the AES-256 block cipher of the master key and the CMAC subkey
/// K1, both computed once so that each message costs only the derivation of its key.
pub struct XaesKey {
    cipher: Aes256,
    k1: Zeroizing<[u8; 16]>,
}

impl XaesKey {
    pub fn new(key: &KeyBytes) -> XaesKey {
        let cipher = Aes256::new(&Array::from(*key.expose()));
        let mut l = Array::from([0u8; 16]);
        cipher.encrypt_block(&mut l);
        // K1 = L << 1, folding the carry back with the GF(2^128) polynomial (0x87).
        let mut k1 = Zeroizing::new([0u8; 16]);
        let carry = l[0] >> 7;
        for i in 0..16 {
            let next = if i + 1 < 16 { l[i + 1] >> 7 } else { 0 };
            k1[i] = (l[i] << 1) | next;
        }
        k1[15] ^= 0x87 & 0u8.wrapping_sub(carry);
        l.zeroize();
        XaesKey { cipher, k1 }
    }

    fn derive(&self, nonce: &[u8; XAES_NONCE_LEN]) -> Aes256Gcm {
        let mut derived = Zeroizing::new([0u8; KEY_LEN]);
        for (half, counter) in [(0usize, 1u8), (1, 2)] {
            let mut block = Array::from([0u8; 16]);
            block[..4].copy_from_slice(&[0, counter, b'X', 0]);
            block[4..].copy_from_slice(&nonce[..12]);
            for (b, k) in block.iter_mut().zip(self.k1.iter()) {
                *b ^= k;
            }
            self.cipher.encrypt_block(&mut block);
            derived[half * 16..half * 16 + 16].copy_from_slice(&block);
            block.zeroize();
        }
        Aes256Gcm::new(&Array::from(*derived))
    }

    /// Encrypts `buf` in place under `nonce`, returning the tag.
    pub fn seal_in_place(&self, nonce: &[u8; XAES_NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let gcm = self.derive(nonce);
        let gcm_nonce = Array::try_from(&nonce[12..]).unwrap_or_default();
        match gcm.encrypt_inout_detached(&gcm_nonce, aad, buf.into()) {
            Ok(tag) => tag.into(),
            // Only reachable for messages over 64 GiB, which callers never pass.
            Err(_) => unreachable!("AES-GCM message length limit exceeded"),
        }
    }

    /// Seals `plaintext` under a fresh random nonce, self-contained:
    /// nonce (24) ‖ ciphertext ‖ tag (16).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; XAES_NONCE_LEN];
        random_bytes(&mut nonce);
        let mut out = Vec::with_capacity(XAES_NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self.seal_in_place(&nonce, aad, &mut out[XAES_NONCE_LEN..]);
        out.extend_from_slice(&tag);
        out
    }

    /// Opens what [`XaesKey::seal`] made with the same `aad`, into a zeroizing buffer.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, AeadError> {
        if sealed.len() < XAES_NONCE_LEN + TAG_LEN {
            return Err(AeadError);
        }
        let (nonce, rest) = sealed.split_at(XAES_NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce: &[u8; XAES_NONCE_LEN] = nonce.try_into().map_err(|_| AeadError)?;
        let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| AeadError)?;
        let mut plaintext = Zeroizing::new(ciphertext.to_vec());
        self.open_in_place(nonce, aad, &mut plaintext, tag)?;
        Ok(plaintext)
    }

    /// Decrypts `buf` in place if `tag` authenticates it with `aad`.
    pub fn open_in_place(
        &self,
        nonce: &[u8; XAES_NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        let gcm = self.derive(nonce);
        let gcm_nonce = Array::try_from(&nonce[12..]).unwrap_or_default();
        gcm.decrypt_inout_detached(&gcm_nonce, aad, buf.into(), &Array::from(*tag)).map_err(|_| AeadError)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sealed_messages_carry_their_nonce_and_bind_the_aad() {
        let key = XaesKey::new(&KeyBytes::random());
        let sealed = key.seal(b"aad", b"secret");
        assert_eq!(sealed.len(), XAES_NONCE_LEN + 6 + TAG_LEN);
        assert_ne!(sealed, key.seal(b"aad", b"secret"));
        assert_eq!(&key.open(b"aad", &sealed).unwrap()[..], b"secret");
        assert!(key.open(b"other", &sealed).is_err());
        assert!(key.open(b"aad", &sealed[..sealed.len() - 1]).is_err());
        assert!(key.open(b"aad", &sealed[..XAES_NONCE_LEN + TAG_LEN - 1]).is_err());
        assert!(XaesKey::new(&KeyBytes::random()).open(b"aad", &sealed).is_err());
    }

    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The two test vectors of the C2SP XAES-256-GCM specification.
    #[test]
    fn xaes_matches_the_specification_vectors() {
        let nonce: [u8; 24] = *b"ABCDEFGHIJKLMNOPQRSTUVWX";
        for (key_byte, aad, expected) in [
            (0x01u8, &b""[..], "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"),
            (0x03u8, &b"c2sp.org/XAES-256-GCM"[..], "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d"),
        ] {
            let key = XaesKey::new(&KeyBytes::from_array([key_byte; 32]));
            let mut buf = b"XAES-256-GCM".to_vec();
            let tag = key.seal_in_place(&nonce, aad, &mut buf);
            buf.extend_from_slice(&tag);
            assert_eq!(hex(&buf), expected);
            let (ct, tag) = buf.split_at_mut(12);
            let tag: [u8; 16] = tag.try_into().unwrap();
            key.open_in_place(&nonce, aad, ct, &tag).unwrap();
            assert_eq!(ct, b"XAES-256-GCM");
        }
    }

    #[test]
    fn wrong_aad_or_key_fails() {
        let key = XaesKey::new(&KeyBytes::random());
        let nonce = [7u8; 24];
        let mut buf = b"secret".to_vec();
        let tag = key.seal_in_place(&nonce, b"aad", &mut buf);
        let mut copy = buf.clone();
        assert_eq!(key.open_in_place(&nonce, b"aaD", &mut copy, &tag), Err(AeadError));
        let other = XaesKey::new(&KeyBytes::random());
        let mut copy = buf.clone();
        assert_eq!(other.open_in_place(&nonce, b"aad", &mut copy, &tag), Err(AeadError));
    }

    #[test]
    fn key_bytes_do_not_print() {
        assert_eq!(format!("{:?}", KeyBytes::from_array([9; 32])), "KeyBytes(<redacted>)");
    }
}
