//! The `pkcs11` root of trust (being written).
