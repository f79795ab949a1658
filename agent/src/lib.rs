//! `kmsd`, the key management agent: AWS KMS's API on a Unix socket, keys sealed by a
//! root of trust, metadata in SQLite.
//!
//! - [`server`]: HTTP/1.1 transport, caller identity, request limits.
//! - [`service`]: the API's actions, validated against AWS's service model.
//! - [`agent`]: in-memory keys and aliases over the [`store`].
//! - [`rot`]: roots of trust: the embedded `file` backend, a TPM 2.0 (`tpm2`), a PKCS#11
//!   token (`pkcs11`), and `rot::setup`, which records a state directory's choice.
//! - [`key_stores`]: custom key stores (AWS's CloudHSM type) backed by PKCS#11 tokens.
//! - [`scheduler`]: automatic rotation, deletion when the window ends, expiry of imported
//!   material.
//! - [`sys`]: memory locking, process hardening and peer pidfds (the crate's only `unsafe`).
//! - [`daemon`]: start-up: configuration, listening sockets, systemd integration.
//! - [`asymmetric`]: signing and HMAC keys (aws-lc-rs).
//! - [`wrapping`]: RSA wrapping keys for importing key material (BYOK).
//! - [`sigv4`], [`access_keys`]: the TCP listener's callers, by AWS Signature Version 4.
//! - [`tls`]: TLS on the TCP listener: certificates, keys, client certificate identities.

pub mod access_keys;
pub mod agent;
pub mod asymmetric;
pub mod audit;
pub mod authz;
pub mod daemon;
pub mod identity;
pub mod key_stores;
pub mod peers;
pub mod policy;
pub mod rot;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod sigv4;
pub mod store;
pub mod sys;
pub mod tls;
pub mod wrapping;
