//! The defaults: AWS's default key policy, and the default identity policy of key
//! administrators.
//!
//! A key created without a policy gets AWS's default key policy verbatim: the account
//! principal (`arn:aws:iam::<account>:root`) is allowed `kms:*`, which delegates every
//! decision about the key to identity policies.
//!
//! The default identity policies follow the "key administrators" statement of the policy
//! the AWS console writes: root (uid 0) and members of the `kmsadmin` group may create,
//! describe, enable, disable, tag, schedule the deletion of and otherwise manage keys, and
//! create, list, retire and revoke grants — but no cryptographic operation (Encrypt,
//! Decrypt, ReEncrypt*, GenerateDataKey*, Sign, Verify, GenerateMac, ...). Nobody can use a
//! key until a policy or grant says so. As in AWS, administration is not a cryptographic
//! barrier: an administrator can put a key policy or create a grant that lets someone
//! (themselves included) use the key, and the audit trail records that.

use super::document::Policy;
use super::eval::Caller;

/// Members of this group administer keys by default.
pub const KEY_ADMIN_GROUP: &str = "kmsadmin";

/// The `Id` of AWS's default key policy.
pub const DEFAULT_KEY_POLICY_ID: &str = "key-default-1";

/// AWS's default key policy for `account`, as `GetKeyPolicy` returns it.
pub fn default_key_policy(account: &str) -> String {
    format!(
        r#"{{
  "Version" : "2012-10-17",
  "Id" : "{DEFAULT_KEY_POLICY_ID}",
  "Statement" : [ {{
    "Sid" : "Enable IAM User Permissions",
    "Effect" : "Allow",
    "Principal" : {{
      "AWS" : "arn:aws:iam::{account}:root"
    }},
    "Action" : "kms:*",
    "Resource" : "*"
  }} ]
}}"#
    )
}

/// The key administrators' identity policy: the actions of the console's "Allow access for
/// Key Administrators" statement (with `kms:ImportKeyMaterial`, which the console adds for
/// keys of imported material), plus `kms:RetireGrant`.
pub const KEY_ADMINISTRATOR_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Id": "kmsd-key-administrators",
  "Statement": [
    {
      "Sid": "AllowKeyAdministration",
      "Effect": "Allow",
      "Action": [
        "kms:Create*",
        "kms:Describe*",
        "kms:Enable*",
        "kms:List*",
        "kms:Put*",
        "kms:Update*",
        "kms:Revoke*",
        "kms:Disable*",
        "kms:Get*",
        "kms:Delete*",
        "kms:TagResource",
        "kms:UntagResource",
        "kms:ScheduleKeyDeletion",
        "kms:CancelKeyDeletion",
        "kms:RotateKeyOnDemand",
        "kms:ImportKeyMaterial",
        "kms:RetireGrant"
      ],
      "Resource": "*"
    }
  ]
}"#;

/// [`KEY_ADMINISTRATOR_POLICY`], parsed.
pub fn key_administrator_policy() -> Policy {
    // A constant document, checked by this module's tests.
    Policy::parse_identity_policy(KEY_ADMINISTRATOR_POLICY)
        .expect("the built-in key administrator policy is valid")
        .with_name(KEY_ADMIN_GROUP)
}

/// Whether the defaults make `caller` a key administrator: uid 0, or a member of
/// [`KEY_ADMIN_GROUP`].
pub fn is_default_key_administrator(caller: &Caller) -> bool {
    caller.uid == 0 || caller.in_group(KEY_ADMIN_GROUP)
}

/// The identity policies the defaults attach to `caller`.
pub fn default_identity_policies(caller: &Caller) -> Vec<Policy> {
    if is_default_key_administrator(caller) {
        vec![key_administrator_policy()]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::document::{Effect, PrincipalElement};

    #[test]
    fn default_key_policy_is_aws_s() {
        let policy = Policy::parse_key_policy(&default_key_policy("111122223333")).unwrap();
        assert_eq!(policy.id.as_deref(), Some("key-default-1"));
        assert_eq!(policy.statements.len(), 1);
        let s = &policy.statements[0];
        assert_eq!(s.sid.as_deref(), Some("Enable IAM User Permissions"));
        assert_eq!(s.effect, Effect::Allow);
        let Some(PrincipalElement::Principal(p)) = &s.principal else { panic!("no Principal") };
        assert_eq!(p.accounts, vec!["111122223333".to_owned()]);
        let v: serde_json::Value = serde_json::from_str(&default_key_policy("111122223333")).unwrap();
        assert_eq!(v["Statement"][0]["Principal"]["AWS"], "arn:aws:iam::111122223333:root");
        assert_eq!(v["Statement"][0]["Action"], "kms:*");
    }

    #[test]
    fn administrator_policy_parses() {
        assert_eq!(key_administrator_policy().statements.len(), 1);
    }
}
