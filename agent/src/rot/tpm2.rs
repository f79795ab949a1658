//! The `tpm2` root of trust (being written).
