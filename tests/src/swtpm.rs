//! A software TPM 2.0 (swtpm) per test (being written).
