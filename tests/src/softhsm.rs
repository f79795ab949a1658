//! A SoftHSM2 token per test (being written).
