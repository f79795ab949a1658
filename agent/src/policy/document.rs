//! Policy documents: JSON text → typed, validated statements.
//!
//! Everything a statement can say is checked here, once, so that evaluation never meets
//! a surprise: the `Version`, the `Effect`, exactly one of `Principal`/`NotPrincipal` (required
//! in key policies, forbidden in identity policies), `Action`/`NotAction`,
//! `Resource`/`NotResource` and every `Condition` operator and value. A bad document yields a
//! [`PolicyError`] that names the statement and the problem, e.g.
//! `Statement[2] (Sid "AllowUse"): Effect must be "Allow" or "Deny", not "Allw"`; statements
//! are numbered from 0 in document order.
//!
//! Where AWS KMS accepts a statement that can never take effect (a key policy statement
//! without `Action` or `Resource` is stored and silently ignored), this parser refuses it,
//! as the KMS console does: a policy that says something it does not mean is an error.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value};

/// AWS KMS's key policy size limit (the service model allows 131072 characters on the wire,
/// but KMS refuses key policies over 32 KiB with `LimitExceededException`).
pub const KEY_POLICY_MAX_BYTES: usize = 32 * 1024;

/// The size limit for identity policies from the agent's configuration (the wire limit of
/// the service model's `PolicyType`).
pub const IDENTITY_POLICY_MAX_BYTES: usize = 131_072;

/// What a policy is attached to, which decides what its statements may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// A key policy (resource-based): every statement names its principals.
    Key,
    /// An identity policy (attached to a user, group or role): no statement names principals.
    Identity,
}

/// Which exception a [`PolicyError`] becomes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyErrorKind {
    /// `MalformedPolicyDocumentException`.
    Malformed,
    /// `LimitExceededException` (the document is too large).
    LimitExceeded,
}

/// Why a policy document was refused: what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub kind: PolicyErrorKind,
    pub message: String,
}

impl PolicyError {
    pub(crate) fn malformed(message: impl Into<String>) -> PolicyError {
        PolicyError { kind: PolicyErrorKind::Malformed, message: message.into() }
    }

    /// The AWS exception name this error maps to.
    pub fn exception_name(&self) -> &'static str {
        match self.kind {
            PolicyErrorKind::Malformed => "MalformedPolicyDocumentException",
            PolicyErrorKind::LimitExceeded => "LimitExceededException",
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

/// The policy language version. Policy variables (`${aws:username}`) are substituted only
/// under 2012-10-17; under 2008-10-17 (the default when `Version` is absent) they are
/// literal text, as in AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyVersion {
    V2008_10_17,
    V2012_10_17,
}

/// A parsed, validated policy document.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub version: PolicyVersion,
    pub id: Option<String>,
    /// A name for messages (an identity policy's name in the configuration).
    pub name: Option<String>,
    pub statements: Vec<Statement>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// One statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// Position in the document, from 0.
    pub index: usize,
    pub sid: Option<String>,
    pub effect: Effect,
    /// `None` in identity policies.
    pub principal: Option<PrincipalElement>,
    pub action: ActionElement,
    pub resource: ResourceElement,
    /// All must hold (AND); see [`Condition`].
    pub conditions: Vec<Condition>,
}

impl Statement {
    /// `Statement[2] (Sid "AllowUse")`, for messages.
    pub fn describe(&self) -> String {
        describe_statement(self.index, self.sid.as_deref())
    }
}

fn describe_statement(index: usize, sid: Option<&str>) -> String {
    match sid {
        Some(sid) if !sid.is_empty() => format!("Statement[{index}] (Sid {sid:?})"),
        _ => format!("Statement[{index}]"),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PrincipalElement {
    Principal(Principals),
    NotPrincipal(Principals),
}

/// The principals a `Principal` or `NotPrincipal` element names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Principals {
    /// `"*"` or `{"AWS": "*"}`: everyone.
    pub any: bool,
    /// Accounts, from `"111122223333"` or `arn:aws:iam::111122223333:root`.
    pub accounts: Vec<String>,
    /// Other AWS principal ARNs (users, roles), compared exactly.
    pub arns: Vec<String>,
    /// `Service`, `Federated` and `CanonicalUser` principals: accepted, never a local caller.
    pub foreign: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ActionElement {
    Action(Vec<String>),
    NotAction(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResourceElement {
    Resource(Vec<String>),
    NotResource(Vec<String>),
}

/// One condition: an operator applied to one condition key with one or more values. The
/// values are alternatives (OR); a statement's conditions must all hold (AND).
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub operator: Operator,
    /// The key as written; looked up case-insensitively.
    pub key: String,
    pub values: Vec<String>,
}

/// A condition operator: `[ForAnyValue:|ForAllValues:]<Base>[IfExists]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operator {
    pub set: SetQualifier,
    pub base: BaseOperator,
    pub if_exists: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetQualifier {
    None,
    ForAnyValue,
    ForAllValues,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseOperator {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    NumericEquals,
    NumericNotEquals,
    NumericLessThan,
    NumericLessThanEquals,
    NumericGreaterThan,
    NumericGreaterThanEquals,
    DateEquals,
    DateNotEquals,
    DateLessThan,
    DateLessThanEquals,
    DateGreaterThan,
    DateGreaterThanEquals,
    Bool,
    Null,
    ArnEquals,
    ArnLike,
    ArnNotEquals,
    ArnNotLike,
}

/// What a condition's values are compared as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    String,
    Numeric,
    Date,
    Bool,
    Null,
    Arn,
}

impl BaseOperator {
    const ALL: [BaseOperator; 24] = [
        BaseOperator::StringEquals,
        BaseOperator::StringNotEquals,
        BaseOperator::StringEqualsIgnoreCase,
        BaseOperator::StringNotEqualsIgnoreCase,
        BaseOperator::StringLike,
        BaseOperator::StringNotLike,
        BaseOperator::NumericEquals,
        BaseOperator::NumericNotEquals,
        BaseOperator::NumericLessThan,
        BaseOperator::NumericLessThanEquals,
        BaseOperator::NumericGreaterThan,
        BaseOperator::NumericGreaterThanEquals,
        BaseOperator::DateEquals,
        BaseOperator::DateNotEquals,
        BaseOperator::DateLessThan,
        BaseOperator::DateLessThanEquals,
        BaseOperator::DateGreaterThan,
        BaseOperator::DateGreaterThanEquals,
        BaseOperator::Bool,
        BaseOperator::Null,
        BaseOperator::ArnEquals,
        BaseOperator::ArnLike,
        BaseOperator::ArnNotEquals,
        BaseOperator::ArnNotLike,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BaseOperator::StringEquals => "StringEquals",
            BaseOperator::StringNotEquals => "StringNotEquals",
            BaseOperator::StringEqualsIgnoreCase => "StringEqualsIgnoreCase",
            BaseOperator::StringNotEqualsIgnoreCase => "StringNotEqualsIgnoreCase",
            BaseOperator::StringLike => "StringLike",
            BaseOperator::StringNotLike => "StringNotLike",
            BaseOperator::NumericEquals => "NumericEquals",
            BaseOperator::NumericNotEquals => "NumericNotEquals",
            BaseOperator::NumericLessThan => "NumericLessThan",
            BaseOperator::NumericLessThanEquals => "NumericLessThanEquals",
            BaseOperator::NumericGreaterThan => "NumericGreaterThan",
            BaseOperator::NumericGreaterThanEquals => "NumericGreaterThanEquals",
            BaseOperator::DateEquals => "DateEquals",
            BaseOperator::DateNotEquals => "DateNotEquals",
            BaseOperator::DateLessThan => "DateLessThan",
            BaseOperator::DateLessThanEquals => "DateLessThanEquals",
            BaseOperator::DateGreaterThan => "DateGreaterThan",
            BaseOperator::DateGreaterThanEquals => "DateGreaterThanEquals",
            BaseOperator::Bool => "Bool",
            BaseOperator::Null => "Null",
            BaseOperator::ArnEquals => "ArnEquals",
            BaseOperator::ArnLike => "ArnLike",
            BaseOperator::ArnNotEquals => "ArnNotEquals",
            BaseOperator::ArnNotLike => "ArnNotLike",
        }
    }

    fn from_name(name: &str) -> Option<BaseOperator> {
        BaseOperator::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Negated operators match when no policy value matches (so several values act as NOR),
    /// and match when the key is absent.
    pub fn is_negated(self) -> bool {
        matches!(
            self,
            BaseOperator::StringNotEquals
                | BaseOperator::StringNotEqualsIgnoreCase
                | BaseOperator::StringNotLike
                | BaseOperator::NumericNotEquals
                | BaseOperator::DateNotEquals
                | BaseOperator::ArnNotEquals
                | BaseOperator::ArnNotLike
        )
    }

    pub fn value_type(self) -> ValueType {
        use BaseOperator::*;
        match self {
            StringEquals
            | StringNotEquals
            | StringEqualsIgnoreCase
            | StringNotEqualsIgnoreCase
            | StringLike
            | StringNotLike => ValueType::String,
            NumericEquals
            | NumericNotEquals
            | NumericLessThan
            | NumericLessThanEquals
            | NumericGreaterThan
            | NumericGreaterThanEquals => ValueType::Numeric,
            DateEquals
            | DateNotEquals
            | DateLessThan
            | DateLessThanEquals
            | DateGreaterThan
            | DateGreaterThanEquals => ValueType::Date,
            Bool => ValueType::Bool,
            Null => ValueType::Null,
            ArnEquals | ArnLike | ArnNotEquals | ArnNotLike => ValueType::Arn,
        }
    }
}

impl Operator {
    /// Parses `ForAnyValue:StringLikeIfExists` and the like; `None` if it is not an operator.
    pub fn parse(text: &str) -> Option<Operator> {
        let (set, rest) = if let Some(rest) = text.strip_prefix("ForAnyValue:") {
            (SetQualifier::ForAnyValue, rest)
        } else if let Some(rest) = text.strip_prefix("ForAllValues:") {
            (SetQualifier::ForAllValues, rest)
        } else {
            (SetQualifier::None, text)
        };
        if let Some(base) = BaseOperator::from_name(rest) {
            return Some(Operator { set, base, if_exists: false });
        }
        let base = BaseOperator::from_name(rest.strip_suffix("IfExists")?)?;
        // "NullIfExists" would be a contradiction: Null is itself the existence test.
        (base != BaseOperator::Null).then_some(Operator { set, base, if_exists: true })
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.set {
            SetQualifier::None => {}
            SetQualifier::ForAnyValue => f.write_str("ForAnyValue:")?,
            SetQualifier::ForAllValues => f.write_str("ForAllValues:")?,
        }
        f.write_str(self.base.name())?;
        if self.if_exists {
            f.write_str("IfExists")?;
        }
        Ok(())
    }
}

impl Policy {
    /// Parses and validates a key policy (`CreateKey`, `PutKeyPolicy`).
    pub fn parse_key_policy(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, PolicyKind::Key)
    }

    /// Parses and validates an identity policy from the agent's configuration.
    pub fn parse_identity_policy(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, PolicyKind::Identity)
    }

    /// Names the policy in decision reasons (e.g. the configuration entry it came from).
    pub fn with_name(mut self, name: impl Into<String>) -> Policy {
        self.name = Some(name.into());
        self
    }

    pub fn parse(text: &str, kind: PolicyKind) -> Result<Policy, PolicyError> {
        let limit = match kind {
            PolicyKind::Key => KEY_POLICY_MAX_BYTES,
            PolicyKind::Identity => IDENTITY_POLICY_MAX_BYTES,
        };
        if text.len() > limit {
            return Err(PolicyError {
                kind: PolicyErrorKind::LimitExceeded,
                message: format!("The policy document is {} bytes; the limit is {limit} bytes", text.len()),
            });
        }
        if text.trim().is_empty() {
            return Err(PolicyError::malformed("The policy document is empty"));
        }
        if kind == PolicyKind::Key {
            // Key policies may hold printable ASCII and Latin-1, tab, LF and CR only.
            if let Some((at, c)) =
                text.char_indices().find(|&(_, c)| !matches!(c, '\t' | '\n' | '\r' | ' '..='~' | '\u{a0}'..='\u{ff}'))
            {
                return Err(PolicyError::malformed(format!(
                    "The policy document contains a character not allowed in key policies ({:?} at byte {at}); \
                     only printable ASCII and Latin-1 characters, tab, line feed and carriage return are allowed",
                    c
                )));
            }
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| PolicyError::malformed(format!("The policy document is not valid JSON: {e}")))?;
        let Value::Object(top) = value else {
            return Err(PolicyError::malformed("The policy document must be a JSON object"));
        };
        for key in top.keys() {
            if !matches!(key.as_str(), "Version" | "Id" | "Statement") {
                return Err(PolicyError::malformed(format!(
                    "Unknown top-level element {key:?}; expected Version, Id and Statement"
                )));
            }
        }
        let version = match top.get("Version") {
            None => PolicyVersion::V2008_10_17,
            Some(Value::String(v)) if v == "2012-10-17" => PolicyVersion::V2012_10_17,
            Some(Value::String(v)) if v == "2008-10-17" => PolicyVersion::V2008_10_17,
            Some(other) => {
                return Err(PolicyError::malformed(format!(
                    "Version must be \"2012-10-17\" or \"2008-10-17\", not {other}"
                )))
            }
        };
        let id = match top.get("Id") {
            None => None,
            Some(Value::String(id)) => Some(id.clone()),
            Some(_) => return Err(PolicyError::malformed("Id must be a string")),
        };
        let raw_statements: Vec<&Value> = match top.get("Statement") {
            None => return Err(PolicyError::malformed("The policy document has no Statement")),
            Some(Value::Array(list)) => list.iter().collect(),
            Some(one @ Value::Object(_)) => vec![one],
            Some(_) => return Err(PolicyError::malformed("Statement must be an object or a list of objects")),
        };
        if raw_statements.is_empty() {
            return Err(PolicyError::malformed("Statement must contain at least one statement"));
        }
        let mut sids = BTreeSet::new();
        let mut statements = Vec::with_capacity(raw_statements.len());
        for (index, raw) in raw_statements.into_iter().enumerate() {
            let statement = parse_statement(index, raw, kind)?;
            if let Some(sid) = statement.sid.as_deref().filter(|s| !s.is_empty()) {
                if !sids.insert(sid.to_owned()) {
                    return Err(PolicyError::malformed(format!(
                        "{}: Sid {sid:?} is used by more than one statement; statement IDs must be unique",
                        statement.describe()
                    )));
                }
            }
            statements.push(statement);
        }
        Ok(Policy { kind, version, id, name: None, statements })
    }

    /// How the policy is named in decision reasons.
    pub fn describe(&self) -> String {
        let what = match self.kind {
            PolicyKind::Key => "the key policy",
            PolicyKind::Identity => "identity policy",
        };
        match (&self.name, &self.id) {
            (Some(name), _) => format!("{what} {name:?}"),
            (None, Some(id)) if self.kind == PolicyKind::Identity => format!("{what} (Id {id:?})"),
            _ => what.to_owned(),
        }
    }
}

fn parse_statement(index: usize, raw: &Value, kind: PolicyKind) -> Result<Statement, PolicyError> {
    let Value::Object(obj) = raw else {
        return Err(PolicyError::malformed(format!("Statement[{index}]: a statement must be a JSON object")));
    };
    let sid = match obj.get("Sid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(PolicyError::malformed(format!("Statement[{index}]: Sid must be a string"))),
    };
    let at = describe_statement(index, sid.as_deref());
    let err = |message: String| PolicyError::malformed(format!("{at}: {message}"));

    if let (Some(sid), PolicyKind::Identity) = (&sid, kind) {
        // IAM allows only ASCII letters and digits in an identity policy's Sid (key
        // policies may also use spaces and more).
        if !sid.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(err("Sid in an identity policy may contain only ASCII letters and digits".into()));
        }
    }
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "Sid"
                | "Effect"
                | "Principal"
                | "NotPrincipal"
                | "Action"
                | "NotAction"
                | "Resource"
                | "NotResource"
                | "Condition"
        ) {
            return Err(err(format!("unknown element {key:?}")));
        }
    }

    let effect = match obj.get("Effect") {
        None => return Err(err("Effect is missing; it must be \"Allow\" or \"Deny\"".into())),
        Some(Value::String(e)) if e == "Allow" => Effect::Allow,
        Some(Value::String(e)) if e == "Deny" => Effect::Deny,
        Some(other) => return Err(err(format!("Effect must be \"Allow\" or \"Deny\", not {other}"))),
    };

    let principal = match (obj.get("Principal"), obj.get("NotPrincipal"), kind) {
        (Some(_), Some(_), _) => return Err(err("has both Principal and NotPrincipal; use one".into())),
        (None, None, PolicyKind::Key) => {
            return Err(err("Principal is missing; every key policy statement must name its principals".into()))
        }
        (None, None, PolicyKind::Identity) => None,
        (Some(_), None, PolicyKind::Identity) | (None, Some(_), PolicyKind::Identity) => return Err(err(
            "an identity policy cannot contain Principal or NotPrincipal; it applies to the identity it is attached to"
                .into(),
        )),
        (Some(p), None, PolicyKind::Key) => {
            Some(PrincipalElement::Principal(parse_principals(p, "Principal").map_err(err)?))
        }
        (None, Some(p), PolicyKind::Key) => {
            if effect == Effect::Allow {
                return Err(err("NotPrincipal is supported only with \"Effect\": \"Deny\"".into()));
            }
            Some(PrincipalElement::NotPrincipal(parse_principals(p, "NotPrincipal").map_err(err)?))
        }
    };

    let action = match (obj.get("Action"), obj.get("NotAction")) {
        (Some(_), Some(_)) => return Err(err("has both Action and NotAction; use one".into())),
        (None, None) => return Err(err("Action is missing; a statement needs Action or NotAction".into())),
        (Some(a), None) => ActionElement::Action(parse_actions(a, "Action").map_err(err)?),
        (None, Some(a)) => ActionElement::NotAction(parse_actions(a, "NotAction").map_err(err)?),
    };

    let resource = match (obj.get("Resource"), obj.get("NotResource")) {
        (Some(_), Some(_)) => return Err(err("has both Resource and NotResource; use one".into())),
        (None, None) => return Err(err("Resource is missing; a statement needs Resource or NotResource".into())),
        (Some(r), None) => ResourceElement::Resource(parse_resources(r, "Resource").map_err(err)?),
        (None, Some(r)) => ResourceElement::NotResource(parse_resources(r, "NotResource").map_err(err)?),
    };

    let conditions = match obj.get("Condition") {
        None => Vec::new(),
        Some(Value::Object(block)) => parse_conditions(block).map_err(err)?,
        Some(_) => return Err(err("Condition must be an object of operators".into())),
    };

    Ok(Statement { index, sid, effect, principal, action, resource, conditions })
}

/// A string or a non-empty list of strings.
fn string_list(value: &Value, element: &str) -> Result<Vec<String>, String> {
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if items.is_empty() => Err(format!("{element} is an empty list")),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("{element} must contain only strings, found {other}")),
            })
            .collect(),
        other => Err(format!("{element} must be a string or a list of strings, found {other}")),
    }
}

fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_principals(value: &Value, element: &str) -> Result<Principals, String> {
    let mut out = Principals::default();
    let map = match value {
        Value::String(s) if s == "*" => {
            out.any = true;
            return Ok(out);
        }
        Value::Object(map) if !map.is_empty() => map,
        _ => {
            return Err(format!(
                "{element} must be \"*\" or an object such as {{\"AWS\": \"arn:aws:iam::111122223333:user/alice\"}}"
            ))
        }
    };
    for (kind, ids) in map {
        let ids = string_list(ids, &format!("{element}.{kind}"))?;
        match kind.as_str() {
            "AWS" => {
                for id in ids {
                    if id == "*" {
                        out.any = true;
                    } else if is_account_id(&id) {
                        out.accounts.push(id);
                    } else if let Some(account) = id
                        .strip_prefix("arn:aws:iam::")
                        .and_then(|r| r.strip_suffix(":root"))
                        .filter(|a| is_account_id(a))
                    {
                        out.accounts.push(account.to_owned());
                    } else if id.contains('*') || id.contains('?') {
                        return Err(format!(
                            "{element}.AWS {id:?}: a principal cannot contain wildcards; use \"*\" with a condition on aws:PrincipalArn"
                        ));
                    } else if principal_arn_is_valid(&id) {
                        out.arns.push(id);
                    } else {
                        return Err(format!(
                            "{element}.AWS {id:?} is not a principal: expected \"*\", a 12-digit account ID or an ARN such as arn:aws:iam::111122223333:user/alice"
                        ));
                    }
                }
            }
            "Service" | "Federated" | "CanonicalUser" => {
                if ids.iter().any(|id| id.is_empty()) {
                    return Err(format!("{element}.{kind} contains an empty value"));
                }
                out.foreign.extend(ids);
            }
            other => {
                return Err(format!(
                    "{element} has unknown principal type {other:?}; expected AWS, Service, Federated or CanonicalUser"
                ))
            }
        }
    }
    Ok(out)
}

/// `arn:<partition>:<iam|sts>::<account>:<resource>` with a non-empty resource.
fn principal_arn_is_valid(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && !parts[1].is_empty()
        && matches!(parts[2], "iam" | "sts")
        && parts[3].is_empty()
        && is_account_id(parts[4])
        && !parts[5].is_empty()
}

fn parse_actions(value: &Value, element: &str) -> Result<Vec<String>, String> {
    let actions = string_list(value, element)?;
    for action in &actions {
        if action == "*" {
            continue;
        }
        let valid = match action.split_once(':') {
            Some((service, name)) => {
                !service.is_empty()
                    && service.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'*' || b == b'?')
            }
            None => false,
        };
        if !valid {
            return Err(format!(
                "{element} {action:?} is not an action: expected \"*\" or \"<service>:<name>\", e.g. \"kms:Encrypt\" or \"kms:Generate*\""
            ));
        }
    }
    Ok(actions)
}

fn parse_resources(value: &Value, element: &str) -> Result<Vec<String>, String> {
    let resources = string_list(value, element)?;
    for resource in &resources {
        let valid = resource == "*" || (resource.starts_with("arn:") && resource.splitn(6, ':').count() == 6);
        if !valid {
            return Err(format!(
                "{element} {resource:?} is not a resource: expected \"*\" or an ARN such as arn:aws:kms:us-east-1:111122223333:key/*"
            ));
        }
    }
    Ok(resources)
}

fn parse_conditions(block: &Map<String, Value>) -> Result<Vec<Condition>, String> {
    let mut out = Vec::new();
    for (op_name, keys) in block {
        let operator = Operator::parse(op_name).ok_or_else(|| {
            format!(
                "Condition operator {op_name:?} is not supported; expected e.g. StringEquals, StringLike, NumericLessThan, \
                 DateGreaterThan, Bool, Null, ArnLike, optionally with an IfExists suffix and a ForAnyValue: or ForAllValues: prefix"
            )
        })?;
        let Value::Object(keys) = keys else {
            return Err(format!("Condition {op_name}: must be an object of condition keys to values"));
        };
        if keys.is_empty() {
            return Err(format!("Condition {op_name}: names no condition keys"));
        }
        let mut seen = BTreeSet::new();
        for (key, raw) in keys {
            if key.is_empty() || key.chars().any(char::is_whitespace) {
                return Err(format!("Condition {op_name}: {key:?} is not a condition key"));
            }
            if !seen.insert(key.to_ascii_lowercase()) {
                return Err(format!(
                    "Condition {op_name}: condition key {key:?} appears twice (condition key names are case-insensitive)"
                ));
            }
            let values = condition_values(raw).map_err(|m| format!("Condition {op_name} {key:?}: {m}"))?;
            for v in &values {
                check_value(operator.base, v).map_err(|m| format!("Condition {op_name} {key:?}: {m}"))?;
            }
            out.push(Condition { operator, key: key.clone(), values });
        }
    }
    Ok(out)
}

/// Condition values: a string, number or boolean, or a non-empty list of them (AWS accepts
/// JSON numbers and booleans and compares their text).
fn condition_values(raw: &Value) -> Result<Vec<String>, String> {
    fn scalar(v: &Value) -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!("values must be strings, numbers or booleans, found {other}")),
        }
    }
    match raw {
        Value::Array(items) if items.is_empty() => Err("has an empty list of values".into()),
        Value::Array(items) => items.iter().map(scalar).collect(),
        other => Ok(vec![scalar(other)?]),
    }
}

/// Literal values must be meaningful for their operator (values holding a policy variable
/// are checked when substituted).
fn check_value(op: BaseOperator, value: &str) -> Result<(), String> {
    if value.contains("${") {
        return Ok(());
    }
    match op.value_type() {
        ValueType::Numeric if super::eval::parse_number(value).is_none() => {
            Err(format!("{value:?} is not a number ({} compares numbers)", op.name()))
        }
        ValueType::Date if super::eval::parse_date(value).is_none() => Err(format!(
            "{value:?} is not a date ({} compares ISO 8601 dates such as 2025-01-31T12:00:00Z, or epoch seconds)",
            op.name()
        )),
        ValueType::Bool | ValueType::Null
            if !value.eq_ignore_ascii_case("true") && !value.eq_ignore_ascii_case("false") =>
        {
            Err(format!("{value:?} is not \"true\" or \"false\""))
        }
        _ => Ok(()),
    }
}
