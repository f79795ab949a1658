//! Access control as AWS KMS decides it: key policies, identity policies and grants.
//!
//! Pure and I/O-free: documents are parsed and validated by [`document`], requests are
//! described by [`eval::RequestContext`], and [`authorize`] decides. The server builds the
//! context from the caller's kernel identity and the request; the store keeps the policy
//! texts and grants.
//!
//! - [`document`]: policy JSON → validated statements; [`PolicyError`] says what and where.
//! - [`eval`]: the caller, the request context and its condition keys; matching of actions,
//!   resources and conditions.
//! - [`decide`]: the decision (explicit deny wins; the key policy allows directly or
//!   delegates to the account; or a grant allows).
//! - [`lockout`]: the policy lockout safety check.
//! - [`defaults`]: AWS's default key policy and the default key administrators.
//!
//! # Why not `iam-rs`
//!
//! `iam-rs` 0.8.0 (MIT, a generic IAM evaluator) was tried against this module's cases
//! before writing it. It got `NotPrincipal`, `...IfExists`, `ForAllValues` on an absent or
//! empty key and case-insensitive condition key names right, but:
//! - it has no notion of KMS's combination: given a key policy that names only
//!   `user/bob` and an identity policy of alice allowing `kms:Decrypt`, its union of the two
//!   allows alice — AWS KMS denies, because the key policy does not delegate to the account;
//!   that combination (and grants) would have to be written here anyway;
//! - its errors for a bad document are serde's ("data did not match any variant of untagged
//!   enum OneOrMany at line 1 column 110") for both an unknown condition operator and a bad
//!   `Effect`: they neither name the statement nor the problem, which
//!   `MalformedPolicyDocumentException` must;
//! - a request has exactly one principal, where a kmsd caller carries a user and a role;
//! - it pulls in `chrono` and `ipnet` for what is a few hundred lines here.
//!
//! So this is a focused evaluator of our own; the full semantics it implements are in
//! `README.md` beside this file.

pub mod decide;
pub mod defaults;
pub mod document;
pub mod eval;
pub mod lockout;

#[cfg(test)]
mod matrix;

pub use decide::{authorize, authorize_without_key, Decision, GrantConstraints, GrantView, Refusal};
pub use defaults::{default_identity_policies, default_key_policy, key_administrator_policy, KEY_ADMIN_GROUP};
pub use document::{Policy, PolicyError, PolicyErrorKind, PolicyKind};
pub use eval::{keys, Caller, RequestContext};
pub use lockout::{check_lockout, LOCKOUT_MESSAGE};
