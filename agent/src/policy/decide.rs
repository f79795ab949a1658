//! The decision: key policy + identity policies + grants → allow or deny, as AWS KMS decides.
//!
//! 1. An explicit `Deny` that applies — in the key policy or in any of the caller's identity
//!    policies — denies, whatever else allows.
//! 2. Otherwise the request is allowed if the key policy allows the caller directly (a
//!    `Principal` naming one of the caller's ARNs, or `"*"`); or if the key policy allows
//!    the account principal (`arn:aws:iam::<account>:root` or `"<account>"`) for this very
//!    action, resource and conditions — it delegates to the account — and one of the
//!    caller's identity policies allows; or if a grant allows: its grantee is one of the
//!    caller's ARNs (or the account principal, which again delegates to the identity
//!    policies), the action is one of its operations, and its encryption context
//!    constraints hold.
//! 3. Otherwise it is denied: no allow means deny.
//!
//! An identity policy alone never opens a key: the key policy must delegate. A key policy
//! `Deny` naming the account principal applies to every principal of that account.
//!
//! `NotPrincipal` (only with `Deny`) applies to every caller except one whose every identity
//! is listed. As AWS evaluates the account first and then the principal, a local caller's
//! identities are its account, its user ARN and, inside a unit, its role ARN: listing only
//! `user/alice` does not exempt alice (list the account too), and a caller inside a unit is
//! exempt only if its role is listed as well.

use std::collections::BTreeMap;

use super::document::{Effect, Policy, PolicyVersion, PrincipalElement, Principals, Statement};
use super::eval::{statement_matches, RequestContext};

/// The outcome, with a reason for logs and `AccessDeniedException` messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
    /// Why a denied request was denied, for the advice on what would allow it.
    pub refusal: Option<Refusal>,
}

/// Which of the documents would have to change for a denied request to be allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// An explicit `Deny` applies: in the named identity policy, or in the key policy (`None`).
    ExplicitDeny { identity_policy: Option<String> },
    /// One of the caller's identity policies allows, but the key policy neither allows the
    /// caller nor delegates the action to the account.
    KeyPolicyCloses,
    /// Nothing allows. `key_delegates`: the key policy delegates the action to the account,
    /// so that an identity policy of the caller's would allow it.
    NothingAllows { key_delegates: bool },
    /// On no key: no identity policy of the caller's allows.
    NoIdentityPolicy,
}

impl Decision {
    fn allow(reason: String) -> Decision {
        Decision { allowed: true, reason, refusal: None }
    }

    fn deny(reason: String, refusal: Refusal) -> Decision {
        Decision { allowed: false, reason, refusal: Some(refusal) }
    }
}

/// A grant, as the evaluator needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantView {
    pub grant_id: String,
    /// The grantee's ARN (a user or role, or an account's `...:root`).
    pub grantee_principal: String,
    /// Grant operations, as AWS names them: `Decrypt`, `ReEncryptFrom`, `DescribeKey`, ...
    pub operations: Vec<String>,
    pub constraints: Option<GrantConstraints>,
}

/// A grant's encryption context constraints. Keys compare case-insensitively and values
/// case-sensitively, as AWS documents for grant constraints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantConstraints {
    /// The request's context must contain these pairs (and may contain more).
    pub encryption_context_subset: Option<BTreeMap<String, String>>,
    /// The request's context must be exactly these pairs.
    pub encryption_context_equals: Option<BTreeMap<String, String>>,
}

/// Grant operations whose requests carry an encryption context; constraints apply only to
/// them ("Grant constraints are not applied to operations that do not support an
/// encryption context", AWS's GrantConstraints reference).
pub const OPERATIONS_WITH_ENCRYPTION_CONTEXT: [&str; 8] = [
    "Encrypt",
    "Decrypt",
    "ReEncryptFrom",
    "ReEncryptTo",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
];

/// How a key policy statement's principals relate to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrincipalMatch {
    /// Names one of the caller's ARNs, or `"*"`.
    Direct,
    /// Names the caller's account: delegation to identity policies (for Allow).
    Account,
    None,
}

fn match_principals(principals: &Principals, ctx: &RequestContext) -> PrincipalMatch {
    let caller = &ctx.caller;
    if principals.any || caller.principal_arns().iter().any(|arn| principals.arns.contains(arn)) {
        PrincipalMatch::Direct
    } else if principals.accounts.contains(&caller.account) {
        PrincipalMatch::Account
    } else {
        PrincipalMatch::None
    }
}

/// Whether a NotPrincipal element exempts the caller: every one of its identities (account,
/// user, role) must be listed.
fn exempted_by(principals: &Principals, ctx: &RequestContext) -> bool {
    principals.any
        || (principals.accounts.contains(&ctx.caller.account)
            && ctx.caller.principal_arns().iter().all(|arn| principals.arns.contains(arn)))
}

/// A statement of the key policy that matches the request: how it names the caller.
fn key_statement_match(statement: &Statement, ctx: &RequestContext, version: PolicyVersion) -> PrincipalMatch {
    let principal = match &statement.principal {
        Some(PrincipalElement::Principal(p)) => match_principals(p, ctx),
        Some(PrincipalElement::NotPrincipal(p)) => {
            if exempted_by(p, ctx) {
                PrincipalMatch::None
            } else {
                PrincipalMatch::Direct
            }
        }
        None => PrincipalMatch::None,
    };
    if principal == PrincipalMatch::None || !statement_matches(statement, ctx, version) {
        return PrincipalMatch::None;
    }
    principal
}

/// Where an explicit Deny was found: its description, and the identity policy's name (`None`
/// for the key policy).
struct DenyAt {
    at: String,
    identity_policy: Option<String>,
}

#[derive(Default)]
struct Tally {
    deny: Option<DenyAt>,
    key_direct: Option<String>,
    key_delegates: Option<String>,
    identity: Option<String>,
}

fn tally(key_policy: Option<&Policy>, identity_policies: &[&Policy], ctx: &RequestContext) -> Tally {
    let mut t = Tally::default();
    let at = |policy: &Policy, statement: &Statement| format!("{}, {}", policy.describe(), statement.describe());
    if let Some(policy) = key_policy {
        for statement in &policy.statements {
            let m = key_statement_match(statement, ctx, policy.version);
            match (statement.effect, m) {
                (_, PrincipalMatch::None) => {}
                (Effect::Deny, _) => {
                    t.deny.get_or_insert_with(|| DenyAt { at: at(policy, statement), identity_policy: None });
                }
                (Effect::Allow, PrincipalMatch::Direct) => {
                    t.key_direct.get_or_insert_with(|| at(policy, statement));
                }
                (Effect::Allow, PrincipalMatch::Account) => {
                    t.key_delegates.get_or_insert_with(|| at(policy, statement));
                }
            }
        }
    }
    for policy in identity_policies {
        for statement in &policy.statements {
            // A principal element in an identity policy is refused at parse time; a key policy
            // passed here by mistake is ignored rather than read as an identity policy.
            if statement.principal.is_some() || !statement_matches(statement, ctx, policy.version) {
                continue;
            }
            match statement.effect {
                Effect::Deny => {
                    t.deny.get_or_insert_with(|| DenyAt {
                        at: at(policy, statement),
                        identity_policy: policy.name.clone(),
                    });
                }
                Effect::Allow => {
                    t.identity.get_or_insert_with(|| at(policy, statement));
                }
            }
        }
    }
    t
}

/// Decides a request on a key: see the module documentation. `identity_policies` are the
/// caller's own (its user's, its groups', its role's); `grants` are the key's grants.
pub fn authorize(
    key_policy: &Policy,
    identity_policies: &[&Policy],
    grants: &[GrantView],
    ctx: &RequestContext,
) -> Decision {
    let t = tally(Some(key_policy), identity_policies, ctx);
    let who = ctx.caller.describe();
    if let Some(deny) = t.deny {
        return explicitly_denied(&who, ctx, deny);
    }
    if let Some(at) = t.key_direct {
        return Decision::allow(format!("allowed by {at}"));
    }
    if let (Some(delegation), Some(at)) = (&t.key_delegates, &t.identity) {
        return Decision::allow(format!("allowed by {at} (the key policy delegates to the account: {delegation})"));
    }
    if let Some(grant) = grants.iter().find(|g| grant_allows(g, t.identity.is_some(), ctx)) {
        return Decision::allow(format!("allowed by grant {}", grant.grant_id));
    }
    let (detail, refusal) = match (&t.key_delegates, &t.identity) {
        (None, Some(at)) => (
            format!(
                "{at} allows it, but the key policy neither allows the caller nor delegates {} to the account ({})",
                ctx.action,
                ctx.caller.account_root_arn()
            ),
            Refusal::KeyPolicyCloses,
        ),
        (delegates, _) => (
            "no statement in the key policy, the caller's identity policies or the key's grants allows it".to_owned(),
            Refusal::NothingAllows { key_delegates: delegates.is_some() },
        ),
    };
    Decision::deny(format!("{who} is not authorized to perform {} on {}: {detail}", ctx.action, ctx.resource), refusal)
}

fn explicitly_denied(who: &str, ctx: &RequestContext, deny: DenyAt) -> Decision {
    Decision::deny(
        format!("{who} is not authorized to perform {}: explicitly denied by {}", ctx.action, deny.at),
        Refusal::ExplicitDeny { identity_policy: deny.identity_policy },
    )
}

/// Decides a request on no particular key (`kms:CreateKey`, `kms:ListKeys`,
/// `kms:ListAliases`, `kms:GenerateRandom`, ...): only identity policies apply, as in AWS.
/// The context's resource should be `*`.
pub fn authorize_without_key(identity_policies: &[&Policy], ctx: &RequestContext) -> Decision {
    let t = tally(None, identity_policies, ctx);
    let who = ctx.caller.describe();
    if let Some(deny) = t.deny {
        return explicitly_denied(&who, ctx, deny);
    }
    match t.identity {
        Some(at) => Decision::allow(format!("allowed by {at}")),
        None => Decision::deny(
            format!("{who} is not authorized to perform {}: no identity policy of the caller allows it", ctx.action),
            Refusal::NoIdentityPolicy,
        ),
    }
}

fn grant_allows(grant: &GrantView, identity_allows: bool, ctx: &RequestContext) -> bool {
    let caller = &ctx.caller;
    let grantee_matches = caller.principal_arns().contains(&grant.grantee_principal)
        // A grant to the account delegates to the account's identity policies.
        || (grant.grantee_principal == caller.account_root_arn() && identity_allows);
    let Some(operation) = ctx.action.strip_prefix("kms:").or_else(|| ctx.action.strip_prefix("KMS:")) else {
        return false;
    };
    grantee_matches
        && grant.operations.iter().any(|op| op.eq_ignore_ascii_case(operation))
        && constraints_hold(grant.constraints.as_ref(), operation, ctx)
}

fn constraints_hold(constraints: Option<&GrantConstraints>, operation: &str, ctx: &RequestContext) -> bool {
    let Some(constraints) = constraints else { return true };
    if !OPERATIONS_WITH_ENCRYPTION_CONTEXT.iter().any(|op| op.eq_ignore_ascii_case(operation)) {
        return true;
    }
    let empty = BTreeMap::new();
    let request = ctx.encryption_context().unwrap_or(&empty);
    let has_pair = |k: &String, v: &String| request.iter().any(|(rk, rv)| rk.eq_ignore_ascii_case(k) && rv == v);
    let subset_ok =
        constraints.encryption_context_subset.as_ref().is_none_or(|subset| subset.iter().all(|(k, v)| has_pair(k, v)));
    let equals_ok = constraints.encryption_context_equals.as_ref().is_none_or(|equals| {
        equals.len() == request.len()
            && equals.iter().all(|(k, v)| has_pair(k, v))
            && request.iter().all(|(rk, rv)| equals.iter().any(|(k, v)| k.eq_ignore_ascii_case(rk) && v == rv))
    });
    subset_ok && equals_ok
}
