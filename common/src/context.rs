//! The encryption context: a string map bound to a ciphertext as additional authenticated
//! data. AWS's rule is exact match — same keys, same values, case-sensitive, order-free —
//! which a canonical encoding gives for free: pairs sorted by key, each length-prefixed.

use std::collections::BTreeMap;

/// An encryption context. `BTreeMap` keeps pairs sorted by key bytes, which is the order
/// the canonical encoding uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(pub BTreeMap<String, String>);

impl EncryptionContext {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The canonical encoding bound as AAD:
    /// `u32 pair count ‖ (u32 key length ‖ key ‖ u32 value length ‖ value)*`, big-endian,
    /// pairs in ascending byte order of their keys. Length prefixes make the encoding
    /// injective: no two different contexts encode to the same bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let size: usize = self.0.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(4 + size);
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

impl<const N: usize> From<[(&str, &str); N]> for EncryptionContext {
    fn from(pairs: [(&str, &str); N]) -> Self {
        EncryptionContext(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_free_and_exact() {
        let a = EncryptionContext::from([("b", "2"), ("a", "1")]);
        let b = EncryptionContext::from([("a", "1"), ("b", "2")]);
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        for other in [
            EncryptionContext::from([("a", "1")]),
            EncryptionContext::from([("a", "1"), ("b", "2"), ("c", "3")]),
            EncryptionContext::from([("A", "1"), ("b", "2")]),
            EncryptionContext::from([("a", "1"), ("b", "20")]),
            EncryptionContext::default(),
        ] {
            assert_ne!(a.canonical_bytes(), other.canonical_bytes(), "{other:?}");
        }
    }

    #[test]
    fn length_prefixes_prevent_boundary_shifts() {
        let a = EncryptionContext::from([("ab", "c")]);
        let b = EncryptionContext::from([("a", "bc")]);
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(EncryptionContext::default().canonical_bytes(), vec![0, 0, 0, 0]);
    }
}
