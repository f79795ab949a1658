//! The policy test matrix: AWS's documented key policy examples, each as a group (a key
//! policy, the callers' identity policies, the key's grants) with rows (caller, action,
//! resource, condition keys, encryption context, time → allowed or not). Then malformed
//! documents, each with the words its error must contain; then the lockout check.
//!
//! In the JSON, `$A` stands for the account (111122223333), `$K` for the key's ARN.

use std::collections::BTreeMap;

use super::decide::{authorize, authorize_without_key, GrantConstraints, GrantView};
use super::defaults::{default_identity_policies, default_key_policy};
use super::document::{Policy, PolicyErrorKind, PolicyKind};
use super::eval::{Caller, RequestContext};
use super::lockout::check_lockout;

const ACCOUNT: &str = "111122223333";
const KEY: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const OTHER_KEY: &str = "arn:aws:kms:eu-west-1:111122223333:key/0987dcba-09fe-87dc-65ba-ab0987654321";
/// 2025-06-01T00:00:00Z.
const NOW: i64 = 1_748_736_000;
const ALLOW: bool = true;
const DENY: bool = false;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// alice (uid 1000), no unit.
    Alice,
    /// alice inside `backup.service`.
    AliceInUnit,
    /// bob (uid 1001), group `developers`.
    Bob,
    /// carol (uid 1002), group `kmsadmin`.
    Carol,
    /// root (uid 0).
    Root,
    /// www-data (uid 33) inside `nginx.service`, executable /usr/sbin/nginx.
    Nginx,
    /// www-data outside any unit.
    WwwData,
    /// mallory (uid 1666), nobody in particular.
    Mallory,
    /// dave of account 444455556666.
    Dave,
}
use Who::*;

fn caller(who: Who) -> Caller {
    let mut c = match who {
        Alice | AliceInUnit => Caller::user(ACCOUNT, "alice", 1000),
        Bob => Caller::user(ACCOUNT, "bob", 1001),
        Carol => Caller::user(ACCOUNT, "carol", 1002),
        Root => Caller::user(ACCOUNT, "root", 0),
        Nginx | WwwData => Caller::user(ACCOUNT, "www-data", 33),
        Mallory => Caller::user(ACCOUNT, "mallory", 1666),
        Dave => Caller::user("444455556666", "dave", 1003),
    };
    c.gids = vec![c.uid];
    c.groups = vec![c.user.clone()];
    match who {
        AliceInUnit => c.unit = Some("backup.service".into()),
        Bob => {
            c.gids.push(2000);
            c.groups.push("developers".into());
        }
        Carol => {
            c.gids.push(2001);
            c.groups.push("kmsadmin".into());
        }
        Nginx => {
            c.unit = Some("nginx.service".into());
            c.executable = Some("/usr/sbin/nginx".into());
        }
        _ => {}
    }
    c
}

type Pairs = &'static [(&'static str, &'static str)];

#[derive(Debug, Clone, Copy)]
struct Row {
    who: Who,
    action: &'static str,
    resource: &'static str,
    keys: &'static [(&'static str, &'static [&'static str])],
    ec: Option<Pairs>,
    time: Option<i64>,
    allow: bool,
}

const fn r(who: Who, action: &'static str, allow: bool) -> Row {
    Row { who, action, resource: KEY, keys: &[], ec: None, time: Some(NOW), allow }
}

impl Row {
    const fn ec(self, ec: Pairs) -> Row {
        Row { ec: Some(ec), ..self }
    }
    const fn keys(self, keys: &'static [(&'static str, &'static [&'static str])]) -> Row {
        Row { keys, ..self }
    }
    const fn on(self, resource: &'static str) -> Row {
        Row { resource, ..self }
    }
    const fn at(self, time: Option<i64>) -> Row {
        Row { time, ..self }
    }
}

struct Grant {
    id: &'static str,
    grantee: &'static str,
    operations: &'static [&'static str],
    subset: Option<Pairs>,
    equals: Option<Pairs>,
}

struct Group {
    name: &'static str,
    /// `None`: decide with [`authorize_without_key`] (actions on no key).
    key_policy: Option<&'static str>,
    /// Identity policies by caller.
    identity: &'static [(Who, &'static str)],
    /// Also attach the default identity policies (kmsadmin, root).
    defaults: bool,
    grants: &'static [Grant],
    rows: &'static [Row],
}

const DEFAULT_POLICY: &str = "DEFAULT";

fn fill(text: &str) -> String {
    text.replace("$A", ACCOUNT).replace("$K", KEY)
}

fn pairs(p: Pairs) -> BTreeMap<String, String> {
    p.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

// ---------------------------------------------------------------------------------------
// Identity policies used by several groups.

const ID_ALICE_ENCRYPT_DECRYPT: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
  "Action":["kms:Encrypt","kms:Decrypt"],"Resource":"$K"}]}"#;
const ID_BOB_ALL_BUT_DECRYPT: &str = r#"{"Version":"2012-10-17","Statement":[
  {"Sid":"AllowAll","Effect":"Allow","Action":"kms:*","Resource":"*"},
  {"Sid":"DenyDecrypt","Effect":"Deny","Action":"kms:Decrypt","Resource":"*"}]}"#;
const ID_NGINX_DATA_KEYS: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
  "Action":"kms:GenerateDataKey*","Resource":"arn:aws:kms:*:$A:key/*"}]}"#;
const ID_ALL: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*"}]}"#;
const ID_DECRYPT: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*"}]}"#;

// The policy the AWS console writes: separate statements for administrators, users and
// grants for AWS services (without the account statement, so nothing is delegated).
const CONSOLE_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Id": "key-consolepolicy-3",
  "Statement": [
    {"Sid": "Allow access for Key Administrators", "Effect": "Allow",
     "Principal": {"AWS": "arn:aws:iam::$A:user/carol"},
     "Action": ["kms:Create*","kms:Describe*","kms:Enable*","kms:List*","kms:Put*","kms:Update*",
                "kms:Revoke*","kms:Disable*","kms:Get*","kms:Delete*","kms:TagResource",
                "kms:UntagResource","kms:ScheduleKeyDeletion","kms:CancelKeyDeletion","kms:RotateKeyOnDemand"],
     "Resource": "*"},
    {"Sid": "Allow use of the key", "Effect": "Allow",
     "Principal": {"AWS": ["arn:aws:iam::$A:role/nginx.service", "arn:aws:iam::$A:user/alice"]},
     "Action": ["kms:Encrypt","kms:Decrypt","kms:ReEncrypt*","kms:GenerateDataKey*","kms:DescribeKey"],
     "Resource": "*"},
    {"Sid": "Allow attachment of persistent resources", "Effect": "Allow",
     "Principal": {"AWS": ["arn:aws:iam::$A:role/nginx.service", "arn:aws:iam::$A:user/alice"]},
     "Action": ["kms:CreateGrant","kms:ListGrants","kms:RevokeGrant"],
     "Resource": "*",
     "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}}}
  ]
}"#;

const ALICE_ONLY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
  "Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:*","Resource":"*"}]}"#;

static GROUPS: &[Group] = &[
    Group {
        name: "default key policy: identity policies decide",
        key_policy: Some(DEFAULT_POLICY),
        identity: &[
            (Alice, ID_ALICE_ENCRYPT_DECRYPT),
            (Bob, ID_BOB_ALL_BUT_DECRYPT),
            (Nginx, ID_NGINX_DATA_KEYS),
            (WwwData, ID_NGINX_DATA_KEYS),
        ],
        defaults: true,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Decrypt", ALLOW),
            r(Alice, "kms:GenerateDataKey", DENY),
            r(Alice, "kms:DescribeKey", DENY),
            r(Alice, "kms:Encrypt", DENY).on(OTHER_KEY),
            r(Bob, "kms:Encrypt", ALLOW),
            r(Bob, "kms:Decrypt", DENY),
            r(Bob, "kms:ScheduleKeyDeletion", ALLOW),
            r(Bob, "kms:Encrypt", ALLOW).on(OTHER_KEY),
            r(Mallory, "kms:Encrypt", DENY),
            r(Mallory, "kms:DescribeKey", DENY),
            r(Nginx, "kms:GenerateDataKey", ALLOW),
            r(Nginx, "kms:GenerateDataKeyWithoutPlaintext", ALLOW),
            r(Nginx, "kms:Decrypt", DENY),
            r(Nginx, "kms:GenerateDataKey", DENY).on("arn:aws:kms:eu-west-1:444455556666:key/abc"),
            // The kmsadmin default: administration, never cryptography.
            r(Root, "kms:DescribeKey", ALLOW),
            r(Root, "kms:PutKeyPolicy", ALLOW),
            r(Root, "kms:Encrypt", DENY),
            r(Root, "kms:Decrypt", DENY),
            r(Carol, "kms:CreateGrant", ALLOW),
            r(Carol, "kms:ListGrants", ALLOW),
            r(Carol, "kms:RetireGrant", ALLOW),
            r(Carol, "kms:RevokeGrant", ALLOW),
            r(Carol, "kms:ScheduleKeyDeletion", ALLOW),
            r(Carol, "kms:CancelKeyDeletion", ALLOW),
            r(Carol, "kms:DisableKey", ALLOW),
            r(Carol, "kms:EnableKeyRotation", ALLOW),
            r(Carol, "kms:TagResource", ALLOW),
            r(Carol, "kms:GetKeyPolicy", ALLOW),
            r(Carol, "kms:UpdateKeyDescription", ALLOW),
            r(Carol, "kms:Decrypt", DENY),
            r(Carol, "kms:Encrypt", DENY),
            r(Carol, "kms:GenerateDataKey", DENY),
            r(Carol, "kms:GenerateDataKeyPair", DENY),
            r(Carol, "kms:ReEncryptFrom", DENY),
            r(Carol, "kms:Sign", DENY),
            r(Carol, "kms:GenerateMac", DENY),
            r(Bob, "kms:DisableKey", ALLOW),
        ],
    },
    Group {
        name: "console policy: key administrators vs key users, no delegation",
        key_policy: Some(CONSOLE_POLICY),
        identity: &[(Bob, ID_ALL), (Alice, ID_ALL)],
        defaults: true,
        grants: &[],
        rows: &[
            r(Carol, "kms:DescribeKey", ALLOW),
            r(Carol, "kms:PutKeyPolicy", ALLOW),
            r(Carol, "kms:ScheduleKeyDeletion", ALLOW),
            r(Carol, "kms:Encrypt", DENY),
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Decrypt", ALLOW),
            r(Alice, "kms:ReEncryptFrom", ALLOW),
            r(Alice, "kms:ReEncryptTo", ALLOW),
            r(Alice, "kms:GenerateDataKeyPairWithoutPlaintext", ALLOW),
            r(Alice, "kms:DescribeKey", ALLOW),
            // alice's identity policy allows kms:*, but the key policy does not delegate.
            r(Alice, "kms:DisableKey", DENY),
            r(Alice, "kms:ScheduleKeyDeletion", DENY),
            r(Alice, "kms:CreateGrant", DENY),
            r(Alice, "kms:CreateGrant", ALLOW).keys(&[("kms:GrantIsForAWSResource", &["true"])]),
            r(Alice, "kms:CreateGrant", DENY).keys(&[("kms:GrantIsForAWSResource", &["false"])]),
            r(Nginx, "kms:Encrypt", ALLOW),
            r(Nginx, "kms:GenerateDataKey", ALLOW),
            r(Nginx, "kms:PutKeyPolicy", DENY),
            r(WwwData, "kms:Encrypt", DENY),
            r(AliceInUnit, "kms:Decrypt", ALLOW),
            r(Bob, "kms:Encrypt", DENY),
            r(Bob, "kms:DescribeKey", DENY),
            r(Root, "kms:DescribeKey", DENY),
            r(Mallory, "kms:Decrypt", DENY),
        ],
    },
    Group {
        name: "delegation to the account root for some actions only; another account",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"DelegateUse","Effect":"Allow","Principal":{"AWS":"$A"},
               "Action":["kms:Encrypt","kms:Decrypt"],"Resource":"*"},
              {"Sid":"ExternalDecrypt","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::444455556666:root"},
               "Action":"kms:Decrypt","Resource":"*"}]}"#,
        ),
        identity: &[(Alice, ID_ALL), (Dave, ID_ALL), (Bob, ID_DECRYPT)],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Decrypt", ALLOW),
            r(Alice, "kms:DescribeKey", DENY),
            r(Alice, "kms:ScheduleKeyDeletion", DENY),
            r(Bob, "kms:Decrypt", ALLOW),
            r(Bob, "kms:Encrypt", DENY),
            r(Mallory, "kms:Encrypt", DENY),
            r(Dave, "kms:Decrypt", ALLOW),
            r(Dave, "kms:Encrypt", DENY),
        ],
    },
    Group {
        name: "kms:EncryptionContext:Department must be IT",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
              "Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":["kms:Encrypt","kms:Decrypt"],"Resource":"*",
              "Condition":{"StringEquals":{"kms:EncryptionContext:Department":"IT"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("Department", "IT")]),
            r(Alice, "kms:Decrypt", ALLOW).ec(&[("Department", "IT"), ("Project", "Alpha")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("Department", "HR")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("Department", "it")]),
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("department", "IT")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[]),
            r(Alice, "kms:Encrypt", DENY),
            r(Bob, "kms:Encrypt", DENY).ec(&[("Department", "IT")]),
        ],
    },
    Group {
        name: "ForAllValues:StringEquals on kms:EncryptionContextKeys (allowed keys only)",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
              "Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Encrypt","Resource":"*",
              "Condition":{"ForAllValues:StringEquals":{"kms:EncryptionContextKeys":["Department","Project"]}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("Department", "IT")]),
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("Department", "IT"), ("Project", "Alpha")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("Department", "IT"), ("Owner", "alice")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("department", "IT")]),
            // ForAllValues on an absent key is true: no context passes.
            r(Alice, "kms:Encrypt", ALLOW).ec(&[]),
        ],
    },
    Group {
        name: "ForAllValues plus Null false: a context is required, with allowed keys only",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
              "Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Encrypt","Resource":"*",
              "Condition":{"ForAllValues:StringEquals":{"kms:EncryptionContextKeys":["Department","Project"]},
                           "Null":{"kms:EncryptionContextKeys":"false"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", DENY).ec(&[]),
            r(Alice, "kms:Encrypt", DENY),
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("Project", "Alpha")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("Other", "x")]),
        ],
    },
    Group {
        name: "StringEqualsIfExists on an encryption context pair",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
              "Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":["kms:Encrypt","kms:GenerateDataKey*"],
              "Resource":"*","Condition":{"StringEqualsIfExists":{"kms:EncryptionContext:AppName":"ExampleApp"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("AppName", "ExampleApp")]),
            r(Alice, "kms:GenerateDataKey", ALLOW).ec(&[("Other", "x")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("AppName", "OtherApp")]),
        ],
    },
    Group {
        name: "ForAnyValue:StringEquals on kms:EncryptionContextKeys; Deny without context (Null true)",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"AllowWithPurpose","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},
               "Action":["kms:Encrypt","kms:Decrypt"],"Resource":"*",
               "Condition":{"ForAnyValue:StringEquals":{"kms:EncryptionContextKeys":"Purpose"}}},
              {"Sid":"RequireContext","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*",
               "Condition":{"Null":{"kms:EncryptionContextKeys":"true"}}},
              {"Sid":"AllowBobDecrypt","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/bob"},
               "Action":"kms:Decrypt","Resource":"*"}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("Purpose", "backup"), ("Host", "db1")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("Host", "db1")]),
            r(Alice, "kms:Encrypt", DENY),
            r(Bob, "kms:Decrypt", DENY),
            r(Bob, "kms:Decrypt", DENY).ec(&[]),
            r(Bob, "kms:Decrypt", ALLOW).ec(&[("Host", "db1")]),
        ],
    },
    Group {
        name: "policy variables and IgnoreCase on encryption context values",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"OwnData","Effect":"Allow","Principal":"*","Action":"kms:Decrypt","Resource":"*",
               "Condition":{"StringEquals":{"kms:EncryptionContext:owner":"${aws:username}","kms:CallerAccount":"$A"}}},
              {"Sid":"DeptIgnoreCase","Effect":"Allow","Principal":"*","Action":"kms:Encrypt","Resource":"*",
               "Condition":{"StringEqualsIgnoreCase":{"kms:EncryptionContext:Department":"it"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Decrypt", ALLOW).ec(&[("owner", "alice")]),
            r(Alice, "kms:Decrypt", DENY).ec(&[("owner", "bob")]),
            r(Bob, "kms:Decrypt", ALLOW).ec(&[("owner", "bob")]),
            r(Dave, "kms:Decrypt", DENY).ec(&[("owner", "dave")]),
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("Department", "IT")]),
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("Department", "It")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("Department", "HR")]),
        ],
    },
    Group {
        name: "policy variables are literal under Version 2008-10-17",
        key_policy: Some(
            r#"{"Version":"2008-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:Decrypt",
              "Resource":"*","Condition":{"StringEquals":{"kms:EncryptionContext:owner":"${aws:username}"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Decrypt", DENY).ec(&[("owner", "alice")]),
            r(Alice, "kms:Decrypt", ALLOW).ec(&[("owner", "${aws:username}")]),
        ],
    },
    Group {
        name: "explicit Deny in the key policy beats its Allow and grants",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"AliceAll","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:*","Resource":"*"},
              {"Sid":"Delegate","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:root"},"Action":"kms:*","Resource":"*"},
              {"Sid":"NoDecryptForAlice","Effect":"Deny","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Decrypt","Resource":"*"},
              {"Sid":"NobodyDeletes","Effect":"Deny","Principal":"*","Action":"kms:ScheduleKeyDeletion","Resource":"*"},
              {"Sid":"AccountNoSign","Effect":"Deny","Principal":{"AWS":"$A"},"Action":"kms:Sign","Resource":"*"}]}"#,
        ),
        identity: &[(Bob, ID_ALL)],
        defaults: true,
        grants: &[Grant {
            id: "grant-alice-decrypt",
            grantee: "arn:aws:iam::$A:user/alice",
            operations: &["Decrypt", "Sign"],
            subset: None,
            equals: None,
        }],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Decrypt", DENY),
            r(Alice, "kms:ScheduleKeyDeletion", DENY),
            r(Alice, "kms:Sign", DENY),
            r(Alice, "kms:Verify", ALLOW),
            r(Root, "kms:ScheduleKeyDeletion", DENY),
            r(Root, "kms:DisableKey", ALLOW),
            r(Bob, "kms:Decrypt", ALLOW),
            r(Bob, "kms:Sign", DENY),
            r(Dave, "kms:Sign", DENY),
        ],
    },
    Group {
        name: "explicit Deny in an identity policy beats the key policy's Allow",
        key_policy: Some(ALICE_ONLY),
        identity: &[(
            Alice,
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":["kms:Decrypt","kms:ReEncrypt*"],"Resource":"*",
               "Condition":{"StringNotEquals":{"kms:EncryptionContext:Department":"IT"}}}]}"#,
        )],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Decrypt", DENY),
            r(Alice, "kms:Decrypt", DENY).ec(&[("Department", "HR")]),
            r(Alice, "kms:Decrypt", ALLOW).ec(&[("Department", "IT")]),
            r(Alice, "kms:ReEncryptFrom", DENY),
        ],
    },
    Group {
        name: "NotPrincipal with Deny: every identity of the caller must be listed",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"Everyone","Effect":"Allow","Principal":"*","Action":["kms:Encrypt","kms:Decrypt"],"Resource":"*"},
              {"Sid":"OnlyAliceDecrypts","Effect":"Deny",
               "NotPrincipal":{"AWS":["arn:aws:iam::$A:root","arn:aws:iam::$A:user/alice","arn:aws:iam::$A:role/nginx.service","arn:aws:iam::$A:user/www-data"]},
               "Action":"kms:Decrypt","Resource":"*"},
              {"Sid":"UserOnlyIsNotEnough","Effect":"Deny","NotPrincipal":{"AWS":"arn:aws:iam::$A:user/bob"},
               "Action":"kms:Encrypt","Resource":"*","Condition":{"StringEquals":{"kms:EncryptionContext:t":"x"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Decrypt", ALLOW),
            r(Bob, "kms:Decrypt", DENY),
            r(Bob, "kms:Encrypt", ALLOW),
            r(AliceInUnit, "kms:Decrypt", DENY),
            r(Nginx, "kms:Decrypt", ALLOW),
            r(WwwData, "kms:Decrypt", ALLOW),
            r(Dave, "kms:Decrypt", DENY),
            r(Bob, "kms:Encrypt", DENY).ec(&[("t", "x")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("t", "x")]),
        ],
    },
    Group {
        name: "NotAction and NotResource",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"AllButDangerous","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},
               "NotAction":["kms:Decrypt","kms:ScheduleKeyDeletion","kms:Put*"],"Resource":"*"},
              {"Sid":"Delegate","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:root"},"Action":"kms:*","Resource":"*"},
              {"Sid":"BobOnlyDescribe","Effect":"Deny","Principal":{"AWS":"arn:aws:iam::$A:user/bob"},
               "NotAction":"kms:DescribeKey","Resource":"*"}]}"#,
        ),
        identity: &[
            (Bob, ID_ALL),
            (
                Mallory,
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:Encrypt",
                   "NotResource":"arn:aws:kms:eu-west-1:$A:key/0987dcba-09fe-87dc-65ba-ab0987654321"}]}"#,
            ),
        ],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:DescribeKey", ALLOW),
            r(Alice, "kms:Decrypt", DENY),
            r(Alice, "kms:ScheduleKeyDeletion", DENY),
            r(Alice, "kms:PutKeyPolicy", DENY),
            r(Bob, "kms:DescribeKey", ALLOW),
            r(Bob, "kms:Encrypt", DENY),
            r(Mallory, "kms:Encrypt", ALLOW),
            r(Mallory, "kms:Encrypt", DENY).on(OTHER_KEY),
        ],
    },
    Group {
        name: "kms:CallerAccount with kms:ViaService (absent locally)",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"ViaEbsOnly","Effect":"Allow","Principal":{"AWS":"*"},"Action":["kms:Encrypt","kms:Decrypt"],
               "Resource":"*","Condition":{"StringEquals":{"kms:CallerAccount":"$A","kms:ViaService":"ec2.us-west-2.amazonaws.com"}}},
              {"Sid":"ViaEbsIfAny","Effect":"Allow","Principal":{"AWS":"*"},"Action":"kms:GenerateDataKey",
               "Resource":"*","Condition":{"StringEquals":{"kms:CallerAccount":"$A"},
                 "StringEqualsIfExists":{"kms:ViaService":"ec2.us-west-2.amazonaws.com"}}},
              {"Sid":"DescribeNotVia","Effect":"Allow","Principal":"*","Action":"kms:DescribeKey","Resource":"*",
               "Condition":{"StringNotEquals":{"kms:ViaService":"s3.amazonaws.com"}}},
              {"Sid":"DenyUnlessVia","Effect":"Deny","Principal":"*","Action":"kms:ReEncrypt*","Resource":"*",
               "Condition":{"StringNotEqualsIfExists":{"kms:ViaService":"ec2.us-west-2.amazonaws.com"}}},
              {"Sid":"AllowReEncrypt","Effect":"Allow","Principal":"*","Action":"kms:ReEncrypt*","Resource":"*"}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", DENY),
            r(Alice, "kms:Encrypt", ALLOW).keys(&[("kms:ViaService", &["ec2.us-west-2.amazonaws.com"])]),
            r(Alice, "kms:GenerateDataKey", ALLOW),
            r(Alice, "kms:GenerateDataKey", DENY).keys(&[("kms:ViaService", &["s3.amazonaws.com"])]),
            r(Dave, "kms:GenerateDataKey", DENY),
            r(Alice, "kms:DescribeKey", ALLOW),
            r(Alice, "kms:DescribeKey", DENY).keys(&[("kms:ViaService", &["s3.amazonaws.com"])]),
            r(Alice, "kms:ReEncryptFrom", DENY),
            r(Alice, "kms:ReEncryptTo", ALLOW).keys(&[("kms:ViaService", &["ec2.us-west-2.amazonaws.com"])]),
        ],
    },
    Group {
        name: "aws:CurrentTime with DateLessThan / DateGreaterThan",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"UntilNewYear","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Encrypt",
               "Resource":"*","Condition":{"DateLessThan":{"aws:CurrentTime":"2026-01-01T00:00:00Z"}}},
              {"Sid":"AfterEpoch","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Decrypt",
               "Resource":"*","Condition":{"DateGreaterThan":{"aws:CurrentTime":"1748000000"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Encrypt", DENY).at(Some(1_767_225_600)),
            r(Alice, "kms:Encrypt", ALLOW).at(Some(1_767_225_599)),
            r(Alice, "kms:Encrypt", DENY).at(None),
            r(Alice, "kms:Decrypt", ALLOW),
            r(Alice, "kms:Decrypt", DENY).at(Some(1_700_000_000)),
        ],
    },
    Group {
        name: "kms:RequestAlias and kms:ResourceAliases",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"FinanceAliases","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Decrypt",
               "Resource":"*","Condition":{"ForAnyValue:StringLike":{"kms:ResourceAliases":"alias/finance-*"}}},
              {"Sid":"ByAliasOnly","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Encrypt",
               "Resource":"*","Condition":{"StringEquals":{"kms:RequestAlias":["alias/app","alias/app-v2"]}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Decrypt", ALLOW).keys(&[("kms:ResourceAliases", &["alias/hr", "alias/finance-2025"])]),
            r(Alice, "kms:Decrypt", DENY).keys(&[("kms:ResourceAliases", &["alias/hr"])]),
            r(Alice, "kms:Decrypt", DENY),
            r(Alice, "kms:Encrypt", ALLOW).keys(&[("kms:RequestAlias", &["alias/app"])]),
            r(Alice, "kms:Encrypt", ALLOW).keys(&[("kms:RequestAlias", &["alias/app-v2"])]),
            r(Alice, "kms:Encrypt", DENY).keys(&[("kms:RequestAlias", &["alias/other"])]),
            r(Alice, "kms:Encrypt", DENY),
        ],
    },
    Group {
        name: "grants, with and without encryption context constraints",
        key_policy: Some(DEFAULT_POLICY),
        identity: &[(Bob, ID_DECRYPT)],
        defaults: false,
        grants: &[
            Grant {
                id: "g-alice",
                grantee: "arn:aws:iam::$A:user/alice",
                operations: &["Encrypt", "Decrypt", "DescribeKey"],
                subset: None,
                equals: None,
            },
            Grant {
                id: "g-nginx-subset",
                grantee: "arn:aws:iam::$A:role/nginx.service",
                operations: &["GenerateDataKey", "DescribeKey"],
                subset: Some(&[("app", "web")]),
                equals: None,
            },
            Grant {
                id: "g-nginx-equals",
                grantee: "arn:aws:iam::$A:role/nginx.service",
                operations: &["Decrypt"],
                subset: None,
                equals: Some(&[("tenant", "a")]),
            },
            Grant {
                id: "g-account",
                grantee: "arn:aws:iam::$A:root",
                operations: &["Decrypt"],
                subset: None,
                equals: None,
            },
        ],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Decrypt", ALLOW).ec(&[("any", "thing")]),
            r(Alice, "kms:GenerateDataKey", DENY),
            r(Alice, "kms:ReEncryptFrom", DENY),
            r(Mallory, "kms:Encrypt", DENY),
            r(Nginx, "kms:GenerateDataKey", ALLOW).ec(&[("app", "web"), ("x", "y")]),
            r(Nginx, "kms:GenerateDataKey", ALLOW).ec(&[("APP", "web")]),
            r(Nginx, "kms:GenerateDataKey", DENY).ec(&[("app", "WEB")]),
            r(Nginx, "kms:GenerateDataKey", DENY).ec(&[("app", "db")]),
            r(Nginx, "kms:GenerateDataKey", DENY),
            r(Nginx, "kms:DescribeKey", ALLOW),
            r(Nginx, "kms:Decrypt", ALLOW).ec(&[("tenant", "a")]),
            r(Nginx, "kms:Decrypt", DENY).ec(&[("tenant", "a"), ("x", "y")]),
            r(Nginx, "kms:Decrypt", DENY).ec(&[("tenant", "b")]),
            r(WwwData, "kms:GenerateDataKey", DENY).ec(&[("app", "web")]),
            // A grant to the account delegates to identity policies.
            r(Bob, "kms:Decrypt", ALLOW),
            r(Mallory, "kms:Decrypt", DENY),
        ],
    },
    Group {
        name: "grants cannot override a key policy Deny; the account grant needs no key delegation",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"Carol","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/carol"},"Action":"kms:*","Resource":"*"},
              {"Sid":"NoDecryptWithoutContext","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*",
               "Condition":{"Null":{"kms:EncryptionContextKeys":"true"}}}]}"#,
        ),
        identity: &[(Bob, ID_DECRYPT)],
        defaults: false,
        grants: &[
            Grant {
                id: "g-alice",
                grantee: "arn:aws:iam::$A:user/alice",
                operations: &["Decrypt"],
                subset: None,
                equals: None,
            },
            Grant {
                id: "g-account",
                grantee: "arn:aws:iam::$A:root",
                operations: &["Decrypt"],
                subset: None,
                equals: None,
            },
        ],
        rows: &[
            r(Alice, "kms:Decrypt", DENY),
            r(Alice, "kms:Decrypt", ALLOW).ec(&[("k", "v")]),
            r(Bob, "kms:Decrypt", ALLOW).ec(&[("k", "v")]),
            r(Bob, "kms:Encrypt", DENY),
        ],
    },
    Group {
        name: "case-insensitive condition key names and action names",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"UpperKeys","Effect":"Allow","Principal":"*","Action":"KMS:encrypt","Resource":"*",
               "Condition":{"StringEquals":{"KMS:CALLERACCOUNT":"$A","Kms:EncryptionContext:DEPARTMENT":"IT","AWS:USERNAME":"alice"}}},
              {"Sid":"UnitKey","Effect":"Allow","Principal":"*","Action":"kms:Decrypt","Resource":"*",
               "Condition":{"StringEquals":{"KMSD:UNIT":"nginx.service"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("Department", "IT")]),
            r(Alice, "kms:Encrypt", ALLOW).ec(&[("department", "IT")]),
            r(Alice, "kms:Encrypt", DENY).ec(&[("Department", "it")]),
            r(Bob, "kms:Encrypt", DENY).ec(&[("Department", "IT")]),
            r(Nginx, "kms:Decrypt", ALLOW),
            r(WwwData, "kms:Decrypt", DENY),
        ],
    },
    Group {
        name: "local condition keys: uid, groups, unit, executable, principal ARN",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"SystemUsers","Effect":"Allow","Principal":"*","Action":"kms:DescribeKey","Resource":"*",
               "Condition":{"NumericLessThan":{"kmsd:Uid":"1000"}}},
              {"Sid":"Developers","Effect":"Allow","Principal":"*","Action":"kms:Encrypt","Resource":"*",
               "Condition":{"ForAnyValue:StringEquals":{"kmsd:Groups":"developers"}}},
              {"Sid":"NginxBinary","Effect":"Allow","Principal":"*","Action":"kms:Decrypt","Resource":"*",
               "Condition":{"StringLike":{"kmsd:Executable":"/usr/sbin/*"},"StringEquals":{"kmsd:Unit":"nginx.service"}}},
              {"Sid":"AnyServiceRole","Effect":"Allow","Principal":"*","Action":"kms:GenerateDataKey","Resource":"*",
               "Condition":{"ArnLike":{"aws:PrincipalArn":"arn:aws:iam::$A:role/*.service"}}},
              {"Sid":"NotInUnit","Effect":"Allow","Principal":"*","Action":"kms:Verify","Resource":"*",
               "Condition":{"Null":{"kmsd:Unit":"true"}}},
              {"Sid":"Gid","Effect":"Allow","Principal":"*","Action":"kms:Sign","Resource":"*",
               "Condition":{"ForAnyValue:NumericEquals":{"kmsd:Gids":"2001"}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Root, "kms:DescribeKey", ALLOW),
            r(Nginx, "kms:DescribeKey", ALLOW),
            r(Alice, "kms:DescribeKey", DENY),
            r(Bob, "kms:Encrypt", ALLOW),
            r(Alice, "kms:Encrypt", DENY),
            r(Nginx, "kms:Decrypt", ALLOW),
            r(WwwData, "kms:Decrypt", DENY),
            r(Nginx, "kms:GenerateDataKey", ALLOW),
            r(AliceInUnit, "kms:GenerateDataKey", ALLOW),
            r(Alice, "kms:GenerateDataKey", DENY),
            r(Alice, "kms:Verify", ALLOW),
            r(AliceInUnit, "kms:Verify", DENY),
            r(Carol, "kms:Sign", ALLOW),
            r(Bob, "kms:Sign", DENY),
        ],
    },
    Group {
        name: "request parameters: grants, deletion window, rotation period, key properties, bypass",
        key_policy: Some(
            r#"{"Version":"2012-10-17","Statement":[
              {"Sid":"GrantsForDecryptOnly","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/carol"},"Action":"kms:CreateGrant",
               "Resource":"*","Condition":{"ForAllValues:StringEquals":{"kms:GrantOperations":["Decrypt","Encrypt"]},
                 "Null":{"kms:GrantOperations":"false"},
                 "StringLike":{"kms:GranteePrincipal":"arn:aws:iam::$A:role/*"},
                 "StringEqualsIfExists":{"kms:RetiringPrincipal":"arn:aws:iam::$A:user/carol"},
                 "ForAnyValue:StringEquals":{"kms:GrantConstraintType":["EncryptionContextEquals","EncryptionContextSubset"]}}},
              {"Sid":"LongWindow","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/carol"},"Action":"kms:ScheduleKeyDeletion",
               "Resource":"*","Condition":{"NumericGreaterThanEquals":{"kms:ScheduleKeyDeletionPendingWindowInDays":"30"}}},
              {"Sid":"YearlyRotation","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/carol"},"Action":"kms:EnableKeyRotation",
               "Resource":"*","Condition":{"NumericLessThanEquals":{"kms:RotationPeriodInDays":365}}},
              {"Sid":"SymmetricOnly","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Encrypt",
               "Resource":"*","Condition":{"StringEquals":{"kms:KeySpec":"SYMMETRIC_DEFAULT","kms:KeyUsage":"ENCRYPT_DECRYPT","kms:KeyOrigin":"AWS_KMS"}}},
              {"Sid":"OaepOnly","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:Decrypt",
               "Resource":"*","Condition":{"StringEquals":{"kms:EncryptionAlgorithm":"RSAES_OAEP_SHA_256"}}},
              {"Sid":"PutPolicy","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/carol"},"Action":"kms:PutKeyPolicy","Resource":"*"},
              {"Sid":"NeverBypass","Effect":"Deny","Principal":"*","Action":"kms:PutKeyPolicy","Resource":"*",
               "Condition":{"Bool":{"kms:BypassPolicyLockoutSafetyCheck":true}}}]}"#,
        ),
        identity: &[],
        defaults: false,
        grants: &[],
        rows: &[
            r(Carol, "kms:CreateGrant", ALLOW).keys(&[
                ("kms:GrantOperations", &["Decrypt"]),
                ("kms:GranteePrincipal", &["arn:aws:iam::111122223333:role/nginx.service"]),
                ("kms:GrantConstraintType", &["EncryptionContextSubset"]),
            ]),
            r(Carol, "kms:CreateGrant", DENY).keys(&[
                ("kms:GrantOperations", &["Decrypt", "CreateGrant"]),
                ("kms:GranteePrincipal", &["arn:aws:iam::111122223333:role/nginx.service"]),
                ("kms:GrantConstraintType", &["EncryptionContextSubset"]),
            ]),
            r(Carol, "kms:CreateGrant", DENY).keys(&[
                ("kms:GrantOperations", &["Decrypt"]),
                ("kms:GranteePrincipal", &["arn:aws:iam::111122223333:user/mallory"]),
                ("kms:GrantConstraintType", &["EncryptionContextSubset"]),
            ]),
            r(Carol, "kms:CreateGrant", DENY).keys(&[
                ("kms:GrantOperations", &["Decrypt"]),
                ("kms:GranteePrincipal", &["arn:aws:iam::111122223333:role/nginx.service"]),
            ]),
            r(Carol, "kms:CreateGrant", DENY).keys(&[
                ("kms:GrantOperations", &["Encrypt"]),
                ("kms:GranteePrincipal", &["arn:aws:iam::111122223333:role/nginx.service"]),
                ("kms:RetiringPrincipal", &["arn:aws:iam::111122223333:user/mallory"]),
                ("kms:GrantConstraintType", &["EncryptionContextEquals"]),
            ]),
            r(Carol, "kms:CreateGrant", DENY).keys(&[
                ("kms:GranteePrincipal", &["arn:aws:iam::111122223333:role/nginx.service"]),
                ("kms:GrantConstraintType", &["EncryptionContextEquals"]),
            ]),
            r(Carol, "kms:ScheduleKeyDeletion", ALLOW).keys(&[("kms:ScheduleKeyDeletionPendingWindowInDays", &["30"])]),
            r(Carol, "kms:ScheduleKeyDeletion", DENY).keys(&[("kms:ScheduleKeyDeletionPendingWindowInDays", &["7"])]),
            r(Carol, "kms:EnableKeyRotation", ALLOW).keys(&[("kms:RotationPeriodInDays", &["365"])]),
            r(Carol, "kms:EnableKeyRotation", DENY).keys(&[("kms:RotationPeriodInDays", &["400"])]),
            r(Alice, "kms:Encrypt", ALLOW).keys(&[
                ("kms:KeySpec", &["SYMMETRIC_DEFAULT"]),
                ("kms:KeyUsage", &["ENCRYPT_DECRYPT"]),
                ("kms:KeyOrigin", &["AWS_KMS"]),
            ]),
            r(Alice, "kms:Encrypt", DENY).keys(&[
                ("kms:KeySpec", &["RSA_2048"]),
                ("kms:KeyUsage", &["ENCRYPT_DECRYPT"]),
                ("kms:KeyOrigin", &["AWS_KMS"]),
            ]),
            r(Alice, "kms:Encrypt", DENY).keys(&[
                ("kms:KeySpec", &["SYMMETRIC_DEFAULT"]),
                ("kms:KeyUsage", &["ENCRYPT_DECRYPT"]),
                ("kms:KeyOrigin", &["EXTERNAL"]),
            ]),
            r(Alice, "kms:Decrypt", ALLOW).keys(&[("kms:EncryptionAlgorithm", &["RSAES_OAEP_SHA_256"])]),
            r(Alice, "kms:Decrypt", DENY).keys(&[("kms:EncryptionAlgorithm", &["RSAES_OAEP_SHA_1"])]),
            r(Carol, "kms:PutKeyPolicy", ALLOW).keys(&[("kms:BypassPolicyLockoutSafetyCheck", &["false"])]),
            r(Carol, "kms:PutKeyPolicy", DENY).keys(&[("kms:BypassPolicyLockoutSafetyCheck", &["true"])]),
            r(Carol, "kms:PutKeyPolicy", ALLOW),
        ],
    },
    Group {
        name: "actions on no key: identity policies only (CreateKey, ListKeys)",
        key_policy: None,
        identity: &[
            (Bob, ID_DECRYPT),
            (
                Alice,
                r#"{"Version":"2012-10-17","Statement":[
                  {"Effect":"Allow","Action":["kms:CreateKey","kms:List*"],"Resource":"*"},
                  {"Effect":"Deny","Action":"kms:CreateKey","Resource":"*","Condition":{"StringNotEquals":{"kms:KeySpec":"SYMMETRIC_DEFAULT"}}}]}"#,
            ),
        ],
        defaults: true,
        grants: &[],
        rows: &[
            r(Carol, "kms:CreateKey", ALLOW).on("*"),
            r(Root, "kms:ListKeys", ALLOW).on("*"),
            r(Carol, "kms:GenerateRandom", DENY).on("*"),
            r(Mallory, "kms:CreateKey", DENY).on("*"),
            r(Bob, "kms:CreateKey", DENY).on("*"),
            r(Alice, "kms:CreateKey", ALLOW).on("*").keys(&[("kms:KeySpec", &["SYMMETRIC_DEFAULT"])]),
            r(Alice, "kms:CreateKey", DENY).on("*").keys(&[("kms:KeySpec", &["RSA_4096"])]),
            r(Alice, "kms:ListAliases", ALLOW).on("*"),
        ],
    },
];

fn grant_views(group: &Group) -> Vec<GrantView> {
    group
        .grants
        .iter()
        .map(|g| GrantView {
            grant_id: g.id.to_owned(),
            grantee_principal: fill(g.grantee),
            operations: g.operations.iter().map(|s| (*s).to_owned()).collect(),
            constraints: (g.subset.is_some() || g.equals.is_some()).then(|| GrantConstraints {
                encryption_context_subset: g.subset.map(pairs),
                encryption_context_equals: g.equals.map(pairs),
            }),
        })
        .collect()
}

fn context(row: &Row) -> RequestContext {
    let mut ctx = RequestContext::new(row.action, row.resource, caller(row.who));
    if let Some(t) = row.time {
        ctx = ctx.with_current_time(t);
    }
    for (key, values) in row.keys {
        ctx = ctx.with_values(key, values.iter().copied());
    }
    if let Some(ec) = row.ec {
        ctx = ctx.with_encryption_context(&pairs(ec));
    }
    ctx
}

#[test]
fn authorization_matrix() {
    let mut failures = Vec::new();
    let mut count = 0;
    for group in GROUPS {
        let key_policy = group.key_policy.map(|text| {
            let text = if text == DEFAULT_POLICY { default_key_policy(ACCOUNT) } else { fill(text) };
            Policy::parse_key_policy(&text).unwrap_or_else(|e| panic!("{}: key policy: {e}", group.name))
        });
        let identity: Vec<(Who, Policy)> = group
            .identity
            .iter()
            .map(|(who, text)| {
                let policy = Policy::parse_identity_policy(&fill(text))
                    .unwrap_or_else(|e| panic!("{}: identity policy of {who:?}: {e}", group.name));
                (*who, policy)
            })
            .collect();
        let grants = grant_views(group);
        for (i, row) in group.rows.iter().enumerate() {
            count += 1;
            let ctx = context(row);
            let defaults = if group.defaults { default_identity_policies(&ctx.caller) } else { Vec::new() };
            let mine: Vec<&Policy> =
                identity.iter().filter(|(who, _)| *who == row.who).map(|(_, p)| p).chain(defaults.iter()).collect();
            let decision = match &key_policy {
                Some(kp) => authorize(kp, &mine, &grants, &ctx),
                None => authorize_without_key(&mine, &ctx),
            };
            if decision.allowed != row.allow {
                failures.push(format!(
                    "{} / row {i}: {:?} {} on {} ec={:?} keys={:?}: expected {}, got {} ({})",
                    group.name,
                    row.who,
                    row.action,
                    row.resource,
                    row.ec,
                    row.keys,
                    if row.allow { "allow" } else { "deny" },
                    if decision.allowed { "allow" } else { "deny" },
                    decision.reason
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {count} cases failed:\n{}", failures.len(), failures.join("\n"));
    assert!(count >= 150, "the matrix has {count} authorization cases");
}

#[test]
fn reasons_name_the_statement() {
    let kp = Policy::parse_key_policy(&fill(
        r#"{"Version":"2012-10-17","Statement":[
          {"Sid":"All","Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"},
          {"Sid":"NoDecrypt","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*"}]}"#,
    ))
    .unwrap();
    let ctx = RequestContext::new("kms:Decrypt", KEY, caller(Alice));
    let d = authorize(&kp, &[], &[], &ctx);
    assert!(!d.allowed);
    assert!(d.reason.contains("Statement[1] (Sid \"NoDecrypt\")"), "{}", d.reason);
    assert!(d.reason.contains("user/alice"), "{}", d.reason);
    let d = authorize(&kp, &[], &[], &ctx.for_action("kms:Encrypt"));
    assert!(d.allowed && d.reason.contains("Sid \"All\""), "{}", d.reason);

    // Identity allows, key policy does not delegate: the reason says so.
    let kp = Policy::parse_key_policy(&fill(ALICE_ONLY)).unwrap();
    let id = Policy::parse_identity_policy(ID_ALL).unwrap().with_name("developers");
    let d = authorize(&kp, &[&id], &[], &RequestContext::new("kms:Encrypt", KEY, caller(Bob)));
    assert!(!d.allowed);
    assert!(d.reason.contains("identity policy \"developers\""), "{}", d.reason);
    assert!(d.reason.contains("nor delegates"), "{}", d.reason);
    let d = authorize(&kp, &[], &[], &RequestContext::new("kms:Encrypt", KEY, caller(Mallory)));
    assert!(d.reason.contains("no statement"), "{}", d.reason);
}

// ---------------------------------------------------------------------------------------
// Malformed documents: (what, kind, document, words the message must contain).

static MALFORMED: &[(&str, PolicyKind, &str, &[&str])] = &[
    ("not JSON", PolicyKind::Key, "{", &["not valid JSON"]),
    ("empty", PolicyKind::Key, "  ", &["empty"]),
    ("not an object", PolicyKind::Key, "[]", &["JSON object"]),
    (
        "bad version",
        PolicyKind::Key,
        r#"{"Version":"2012-10-18","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}]}"#,
        &["Version", "2012-10-17", "2012-10-18"],
    ),
    ("no statement", PolicyKind::Key, r#"{"Version":"2012-10-17"}"#, &["no Statement"]),
    ("empty statement list", PolicyKind::Key, r#"{"Version":"2012-10-17","Statement":[]}"#, &["at least one"]),
    (
        "unknown top-level element",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statment":[]}"#,
        &["Unknown top-level element", "Statment"],
    ),
    (
        "bad effect",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"},
           {"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"},
           {"Sid":"AllowUse","Effect":"Allw","Principal":"*","Action":"kms:*","Resource":"*"}]}"#,
        &["Statement[2] (Sid \"AllowUse\")", "Effect must be \"Allow\" or \"Deny\"", "Allw"],
    ),
    (
        "missing effect",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":{"Principal":"*","Action":"kms:*","Resource":"*"}}"#,
        &["Statement[0]", "Effect is missing"],
    ),
    (
        "key policy without principal",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Sid":"S","Effect":"Allow","Action":"kms:*","Resource":"*"}]}"#,
        &["Statement[0] (Sid \"S\")", "Principal is missing"],
    ),
    (
        "both Principal and NotPrincipal",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Principal":"*","NotPrincipal":{"AWS":"111122223333"},"Action":"kms:*","Resource":"*"}]}"#,
        &["Statement[0]", "both Principal and NotPrincipal"],
    ),
    (
        "NotPrincipal with Allow",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","NotPrincipal":{"AWS":"111122223333"},"Action":"kms:*","Resource":"*"}]}"#,
        &["NotPrincipal", "Deny"],
    ),
    (
        "identity policy with principal",
        PolicyKind::Identity,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}]}"#,
        &["Statement[0]", "identity policy cannot contain Principal"],
    ),
    (
        "principal with a wildcard",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:user/*"},"Action":"kms:*","Resource":"*"}]}"#,
        &["Statement[0]", "wildcards", "user/*"],
    ),
    (
        "principal that is not an ARN",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"alice"},"Action":"kms:*","Resource":"*"}]}"#,
        &["Statement[0]", "\"alice\" is not a principal"],
    ),
    (
        "unknown principal type",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Unix":"alice"},"Action":"kms:*","Resource":"*"}]}"#,
        &["unknown principal type", "Unix"],
    ),
    (
        "principal as a bare string",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"alice","Action":"kms:*","Resource":"*"}]}"#,
        &["Principal must be \"*\" or an object"],
    ),
    (
        "missing action",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Sid":"NoAction","Effect":"Allow","Principal":"*","Resource":"*"}]}"#,
        &["Statement[0] (Sid \"NoAction\")", "Action is missing"],
    ),
    (
        "both Action and NotAction",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","NotAction":"kms:Decrypt","Resource":"*"}]}"#,
        &["both Action and NotAction"],
    ),
    (
        "action without a service",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"Encrypt","Resource":"*"}]}"#,
        &["Action \"Encrypt\" is not an action"],
    ),
    (
        "action list with a number",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":["kms:Encrypt",7],"Resource":"*"}]}"#,
        &["Action must contain only strings"],
    ),
    (
        "empty action list",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":[],"Resource":"*"}]}"#,
        &["Action is an empty list"],
    ),
    (
        "missing resource",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*"}]}"#,
        &["Resource is missing"],
    ),
    (
        "resource that is not an ARN",
        PolicyKind::Identity,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"key/1234"}]}"#,
        &["Resource \"key/1234\" is not a resource"],
    ),
    (
        "unknown condition operator",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Sid":"C","Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{"StringEqualz":{"kms:CallerAccount":"111122223333"}}}]}"#,
        &["Statement[0] (Sid \"C\")", "Condition operator \"StringEqualz\" is not supported"],
    ),
    (
        "NullIfExists",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{"NullIfExists":{"kms:CallerAccount":"true"}}}]}"#,
        &["NullIfExists"],
    ),
    (
        "numeric condition with a word",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{"NumericLessThan":{"kms:RotationPeriodInDays":"a year"}}}]}"#,
        &["NumericLessThan", "kms:RotationPeriodInDays", "\"a year\" is not a number"],
    ),
    (
        "date condition with a bad date",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{"DateLessThan":{"aws:CurrentTime":"2025-02-30"}}}]}"#,
        &["\"2025-02-30\" is not a date"],
    ),
    (
        "bool condition with maybe",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{"Bool":{"kms:GrantIsForAWSResource":"maybe"}}}]}"#,
        &["\"maybe\" is not \"true\" or \"false\""],
    ),
    (
        "condition with an empty value list",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{"StringEquals":{"kms:CallerAccount":[]}}}]}"#,
        &["kms:CallerAccount", "empty list of values"],
    ),
    (
        "condition value that is an object",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{"StringEquals":{"kms:CallerAccount":{"a":1}}}}]}"#,
        &["values must be strings, numbers or booleans"],
    ),
    (
        "condition key twice in different case",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{"StringEquals":{"kms:CallerAccount":"1","KMS:CALLERACCOUNT":"2"}}}]}"#,
        &["appears twice"],
    ),
    (
        "duplicate Sid",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Sid":"A","Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"},
            {"Sid":"A","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*"}]}"#,
        &["Statement[1] (Sid \"A\")", "unique"],
    ),
    (
        "unknown statement element",
        PolicyKind::Key,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Conditions":{}}]}"#,
        &["Statement[0]", "unknown element \"Conditions\""],
    ),
    (
        "identity policy Sid with spaces",
        PolicyKind::Identity,
        r#"{"Version":"2012-10-17","Statement":[{"Sid":"Allow use","Effect":"Allow","Action":"kms:*","Resource":"*"}]}"#,
        &["Sid in an identity policy"],
    ),
    (
        "key policy with a character outside Latin-1",
        PolicyKind::Key,
        "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Sid\":\"\u{263a}\",\"Effect\":\"Allow\",\"Principal\":\"*\",\"Action\":\"kms:*\",\"Resource\":\"*\"}]}",
        &["character not allowed"],
    ),
];

#[test]
fn malformed_documents_say_what_and_where() {
    let mut failures = Vec::new();
    for (what, kind, text, words) in MALFORMED {
        match Policy::parse(text, *kind) {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(e) => {
                assert_eq!(e.exception_name(), "MalformedPolicyDocumentException", "{what}");
                for word in *words {
                    if !e.message.contains(word) {
                        failures.push(format!("{what}: message {:?} lacks {word:?}", e.message));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn oversized_key_policy_is_limit_exceeded() {
    let padding = " ".repeat(32 * 1024);
    let text = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}}]}}{padding}"#
    );
    let e = Policy::parse_key_policy(&text).unwrap_err();
    assert_eq!(e.kind, PolicyErrorKind::LimitExceeded);
    assert_eq!(e.exception_name(), "LimitExceededException");
    assert!(e.message.contains("32768"), "{}", e.message);
    // The same document within the limit parses; identity policies have the larger limit.
    assert!(Policy::parse_key_policy(text.trim_end()).is_ok());
}

#[test]
fn accepted_shapes() {
    // Single statement object, no Version (2008-10-17), string lists, numbers and booleans
    // as condition values, Service principals, account-ID principals, key policy Sids with
    // spaces, the ForAnyValue/ForAllValues/IfExists forms.
    let text = r#"{"Id":"x","Statement":{"Sid":"Allow use of the key","Effect":"Allow",
      "Principal":{"AWS":["111122223333","arn:aws:iam::111122223333:role/a.service"],"Service":"ec2.amazonaws.com"},
      "Action":"kms:*","Resource":["*"],
      "Condition":{"NumericLessThanEquals":{"kms:RotationPeriodInDays":365},"Bool":{"kms:GrantIsForAWSResource":true},
                   "ForAllValues:StringLikeIfExists":{"kms:EncryptionContextKeys":["a*","b?"]}}}}"#;
    let p = Policy::parse_key_policy(text).unwrap();
    assert_eq!(p.version, super::document::PolicyVersion::V2008_10_17);
    assert_eq!(p.statements[0].conditions.len(), 3);
    // A Service principal never matches a local caller.
    let text = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},
      "Action":"kms:*","Resource":"*"}]}"#;
    let p = Policy::parse_key_policy(text).unwrap();
    assert!(!authorize(&p, &[], &[], &RequestContext::new("kms:Encrypt", KEY, caller(Root))).allowed);
}

// ---------------------------------------------------------------------------------------
// Lockout safety check.

#[test]
fn lockout_check() {
    let admin = super::defaults::key_administrator_policy();
    let carol = RequestContext::new("kms:PutKeyPolicy", KEY, caller(Carol));
    let alice = RequestContext::new("kms:CreateKey", KEY, caller(Alice));
    let default = Policy::parse_key_policy(&default_key_policy(ACCOUNT)).unwrap();
    let alice_only = Policy::parse_key_policy(&fill(ALICE_ONLY)).unwrap();
    let console = Policy::parse_key_policy(&fill(CONSOLE_POLICY)).unwrap();
    let users_only = Policy::parse_key_policy(&fill(
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},
          "Action":["kms:Encrypt","kms:Decrypt"],"Resource":"*"}]}"#,
    ))
    .unwrap();

    // The default policy keeps an administrator in (through delegation).
    assert!(check_lockout(&default, &[&admin], &carol, false).is_ok());
    // ...but not a caller whose identity policies do not allow PutKeyPolicy.
    let e = check_lockout(&default, &[], &carol, false).unwrap_err();
    assert!(e.message.starts_with(super::lockout::LOCKOUT_MESSAGE), "{}", e.message);
    assert_eq!(e.exception_name(), "MalformedPolicyDocumentException");
    // A policy naming only alice locks carol out, not alice.
    assert!(check_lockout(&alice_only, &[&admin], &carol, false).is_err());
    assert!(check_lockout(&alice_only, &[], &alice, false).is_ok());
    // The console policy names carol as administrator (Put*).
    assert!(check_lockout(&console, &[], &carol, false).is_ok());
    // Encrypt/Decrypt only: alice would lock herself out, unless she bypasses the check.
    assert!(check_lockout(&users_only, &[], &alice, false).is_err());
    assert!(check_lockout(&users_only, &[], &alice, true).is_ok());
    // An explicit Deny of PutKeyPolicy counts.
    let deny_put = Policy::parse_key_policy(&fill(
        r#"{"Version":"2012-10-17","Statement":[
          {"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::$A:user/alice"},"Action":"kms:*","Resource":"*"},
          {"Effect":"Deny","Principal":"*","Action":"kms:PutKeyPolicy","Resource":"*"}]}"#,
    ))
    .unwrap();
    assert!(check_lockout(&deny_put, &[], &alice, false).is_err());
}

// ---------------------------------------------------------------------------------------
// Each operator on its own: (operator, policy values, request values of the key or None
// if absent, holds?). The key is `test:Key`; a request looks it up as `TEST:KEY`.

type OperatorCase = (&'static str, &'static [&'static str], Option<&'static [&'static str]>, bool);

static OPERATORS: &[OperatorCase] = &[
    ("StringEquals", &["a"], Some(&["a"]), true),
    ("StringEquals", &["a"], Some(&["A"]), false),
    ("StringEquals", &["a", "b"], Some(&["b"]), true),
    ("StringEquals", &["a"], None, false),
    ("StringEquals", &["a*"], Some(&["abc"]), false),
    ("StringNotEquals", &["a"], Some(&["b"]), true),
    ("StringNotEquals", &["a", "b"], Some(&["b"]), false),
    ("StringNotEquals", &["a"], None, true),
    ("StringEqualsIgnoreCase", &["ABC"], Some(&["abc"]), true),
    ("StringEqualsIgnoreCase", &["ABC"], Some(&["abd"]), false),
    ("StringNotEqualsIgnoreCase", &["ABC"], Some(&["abc"]), false),
    ("StringNotEqualsIgnoreCase", &["ABC"], Some(&["xyz"]), true),
    ("StringLike", &["alias/app-*"], Some(&["alias/app-web"]), true),
    ("StringLike", &["alias/app-?"], Some(&["alias/app-1"]), true),
    ("StringLike", &["alias/app-?"], Some(&["alias/app-10"]), false),
    ("StringLike", &["Alias/*"], Some(&["alias/x"]), false),
    ("StringNotLike", &["alias/app-*"], Some(&["alias/db"]), true),
    ("StringNotLike", &["alias/app-*"], Some(&["alias/app-web"]), false),
    ("StringNotLike", &["x"], None, true),
    ("NumericEquals", &["30"], Some(&["30"]), true),
    ("NumericEquals", &["30"], Some(&["30.0"]), true),
    ("NumericEquals", &["30"], Some(&["31"]), false),
    ("NumericEquals", &["30"], Some(&["thirty"]), false),
    ("NumericNotEquals", &["7", "30"], Some(&["14"]), true),
    ("NumericNotEquals", &["7", "30"], Some(&["30"]), false),
    ("NumericLessThan", &["10"], Some(&["9"]), true),
    ("NumericLessThan", &["10"], Some(&["10"]), false),
    ("NumericLessThanEquals", &["10"], Some(&["10"]), true),
    ("NumericGreaterThan", &["10"], Some(&["10"]), false),
    ("NumericGreaterThan", &["10"], Some(&["10.5"]), true),
    ("NumericGreaterThanEquals", &["-1"], Some(&["-1"]), true),
    ("NumericGreaterThanEquals", &["10"], None, false),
    ("DateEquals", &["2025-06-01T00:00:00Z"], Some(&["1748736000"]), true),
    ("DateEquals", &["2025-06-01T02:00:00+02:00"], Some(&["2025-06-01T00:00:00Z"]), true),
    ("DateNotEquals", &["2025-06-01"], Some(&["2025-06-02"]), true),
    ("DateNotEquals", &["2025-06-01"], Some(&["2025-06-01T00:00:00Z"]), false),
    ("DateLessThan", &["2025-06-01"], Some(&["2025-05-31T23:59:59Z"]), true),
    ("DateLessThan", &["2025-06-01"], Some(&["2025-06-01T00:00:00Z"]), false),
    ("DateLessThanEquals", &["2025-06-01"], Some(&["2025-06-01T00:00:00.000Z"]), true),
    ("DateGreaterThan", &["1748736000"], Some(&["2025-06-01T00:00:01Z"]), true),
    ("DateGreaterThanEquals", &["2025-06-01"], Some(&["2025-05-31"]), false),
    ("DateGreaterThan", &["2025-06-01"], Some(&["not a date"]), false),
    ("Bool", &["true"], Some(&["true"]), true),
    ("Bool", &["true"], Some(&["TRUE"]), true),
    ("Bool", &["true"], Some(&["false"]), false),
    ("Bool", &["false"], None, false),
    ("Null", &["true"], None, true),
    ("Null", &["true"], Some(&["x"]), false),
    ("Null", &["false"], Some(&["x"]), true),
    ("Null", &["false"], None, false),
    ("Null", &["false"], Some(&[]), false),
    (
        "ArnEquals",
        &["arn:aws:iam::111122223333:role/nginx.service"],
        Some(&["arn:aws:iam::111122223333:role/nginx.service"]),
        true,
    ),
    ("ArnEquals", &["arn:aws:iam::*:role/*"], Some(&["arn:aws:iam::111122223333:role/x"]), true),
    ("ArnLike", &["arn:aws:iam::111122223333:user/*"], Some(&["arn:aws:iam::111122223333:role/x"]), false),
    ("ArnLike", &["arn:aws:kms:*:111122223333:key/*"], Some(&["arn:aws:kms:eu-west-1:111122223333:key/k"]), true),
    // `*` in one part does not swallow the colons between parts.
    ("ArnLike", &["arn:aws:*:key/*"], Some(&["arn:aws:kms:eu-west-1:111122223333:key/k"]), false),
    ("ArnLike", &["arn:aws:iam::111122223333:user/*"], Some(&["alice"]), false),
    ("ArnNotEquals", &["arn:aws:iam::111122223333:user/alice"], Some(&["arn:aws:iam::111122223333:user/bob"]), true),
    ("ArnNotLike", &["arn:aws:iam::111122223333:user/*"], Some(&["arn:aws:iam::111122223333:user/bob"]), false),
    ("ArnNotLike", &["arn:aws:iam::111122223333:user/*"], None, true),
    // IfExists: an absent key satisfies any operator; a present one is compared.
    ("StringEqualsIfExists", &["a"], None, true),
    ("StringEqualsIfExists", &["a"], Some(&["b"]), false),
    ("StringNotEqualsIfExists", &["a"], Some(&["a"]), false),
    ("NumericLessThanIfExists", &["5"], None, true),
    ("DateLessThanIfExists", &["2025-01-01"], Some(&["2026-01-01"]), false),
    ("BoolIfExists", &["false"], None, true),
    ("ArnLikeIfExists", &["arn:aws:iam::*:root"], None, true),
    // Set qualifiers.
    ("ForAnyValue:StringEquals", &["a"], Some(&["x", "a"]), true),
    ("ForAnyValue:StringEquals", &["a"], Some(&["x", "y"]), false),
    ("ForAnyValue:StringEquals", &["a"], None, false),
    ("ForAnyValue:StringEqualsIfExists", &["a"], None, true),
    ("ForAnyValue:StringNotEquals", &["a"], Some(&["a", "b"]), true),
    ("ForAnyValue:StringNotEquals", &["a"], Some(&["a"]), false),
    ("ForAnyValue:StringLike", &["alias/finance-*"], Some(&["alias/hr", "alias/finance-1"]), true),
    ("ForAllValues:StringEquals", &["a", "b"], Some(&["a", "b"]), true),
    ("ForAllValues:StringEquals", &["a", "b"], Some(&["a", "c"]), false),
    ("ForAllValues:StringEquals", &["a"], None, true),
    ("ForAllValues:StringEquals", &["a"], Some(&[]), true),
    ("ForAllValues:StringNotEquals", &["a", "b"], Some(&["c", "d"]), true),
    ("ForAllValues:StringNotEquals", &["a", "b"], Some(&["c", "a"]), false),
    ("ForAllValues:StringLike", &["Created*"], Some(&["CreatedBy", "CreatedAt"]), true),
    ("ForAllValues:NumericLessThan", &["10"], Some(&["1", "9"]), true),
    ("ForAllValues:NumericLessThan", &["10"], Some(&["1", "10"]), false),
    // A multi-valued key without a qualifier: any value for positive operators, none for
    // negated ones.
    ("StringEquals", &["a"], Some(&["x", "a"]), true),
    ("StringNotEquals", &["a"], Some(&["x", "a"]), false),
    ("StringNotEquals", &["a"], Some(&["x", "y"]), true),
];

#[test]
fn each_operator() {
    use super::document::{Condition, Operator, PolicyVersion};
    use super::eval::condition_holds;
    let mut failures = Vec::new();
    for (i, (op, values, request, expected)) in OPERATORS.iter().enumerate() {
        let condition = Condition {
            operator: Operator::parse(op).unwrap_or_else(|| panic!("{op} does not parse")),
            key: "test:Key".into(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        };
        let mut ctx = RequestContext::new("kms:Encrypt", KEY, caller(Alice));
        if let Some(request) = request {
            ctx = ctx.with_values("TEST:KEY", request.iter().copied());
        }
        if condition_holds(&condition, &ctx, PolicyVersion::V2012_10_17) != *expected {
            failures.push(format!("[{i}] {op} {values:?} vs {request:?}: expected {expected}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn operator_names() {
    use super::document::Operator;
    for name in ["StringEquals", "ForAllValues:ArnNotLikeIfExists", "ForAnyValue:DateGreaterThanEquals", "Null"] {
        assert_eq!(Operator::parse(name).map(|o| o.to_string()).as_deref(), Some(name));
    }
    for name in ["NullIfExists", "stringequals", "ForSomeValues:StringEquals", "StringEqualsIfExistsIfExists", ""] {
        assert!(Operator::parse(name).is_none(), "{name}");
    }
}
