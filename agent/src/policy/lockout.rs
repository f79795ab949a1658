//! The policy lockout safety check: a key policy set by `CreateKey` or `PutKeyPolicy` must
//! still let the caller call `PutKeyPolicy` on the key, or the key could become
//! unmanageable. The request is refused unless it sets `BypassPolicyLockoutSafetyCheck`.

use super::decide::authorize;
use super::document::{Policy, PolicyError};
use super::eval::RequestContext;

/// AWS's message when the check fails (a `MalformedPolicyDocumentException`).
pub const LOCKOUT_MESSAGE: &str = "The new key policy will not allow you to update the key policy in the future.";

/// Checks that under `proposed` the caller of `ctx` (the `CreateKey`/`PutKeyPolicy` request,
/// whose resource is the key's ARN) would be allowed `kms:PutKeyPolicy`, counting its
/// identity policies (through the account delegation) but no grants, which cannot give
/// `PutKeyPolicy`. Passes without looking when `bypass` is set.
pub fn check_lockout(
    proposed: &Policy,
    identity_policies: &[&Policy],
    ctx: &RequestContext,
    bypass: bool,
) -> Result<(), PolicyError> {
    if bypass {
        return Ok(());
    }
    let decision = authorize(proposed, identity_policies, &[], &ctx.for_action("kms:PutKeyPolicy"));
    if decision.allowed {
        Ok(())
    } else {
        Err(PolicyError::malformed(format!("{LOCKOUT_MESSAGE} ({})", decision.reason)))
    }
}
