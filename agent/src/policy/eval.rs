//! The request side of evaluation: who is calling ([`Caller`]), for what
//! ([`RequestContext`]: action, resource, condition keys), and whether one statement's
//! `Action`, `Resource` and `Condition` match it. Principals are matched in `decide`.
//!
//! Condition semantics, as AWS documents them:
//! - a key's name is looked up case-insensitively; values compare case-sensitively except
//!   under the `...IgnoreCase` operators (and `Bool`, whose values are `true`/`false`);
//! - several values for one key are alternatives (OR); for negated operators
//!   (`StringNotEquals`, `ArnNotLike`, ...) the condition holds when the request value matches
//!   none of them (NOR);
//! - a key absent from the request fails a positive operator and satisfies a negated one;
//!   `...IfExists` makes an absent key satisfy any operator;
//! - `ForAnyValue:` holds if some request value satisfies the operator (false when the key is
//!   absent or empty); `ForAllValues:` holds if every request value does (true when the key is
//!   absent or empty — pair it with `Null` to require the key);
//! - a multi-valued key without a set qualifier behaves as `ForAnyValue:` for positive
//!   operators and as "no request value matches" for negated ones;
//! - `Null: true` holds when the key is absent (or empty), `Null: false` when present.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::document::{
    ActionElement, BaseOperator, Condition, PolicyVersion, ResourceElement, SetQualifier, Statement, ValueType,
};

/// Condition keys the agent puts in a request context. Names are matched
/// case-insensitively; these constants are the canonical spellings.
pub mod keys {
    /// The caller's principal ARNs: the user, the role of its systemd unit if it has one, and
    /// the `role/tls/<identity>` of its client certificate if it has one (multi-valued, so
    /// `StringEquals`/`ArnEquals` match any).
    pub const PRINCIPAL_ARN: &str = "aws:PrincipalArn";
    /// The caller's Unix user name.
    pub const USERNAME: &str = "aws:username";
    /// The account of the caller (the agent's configured account).
    pub const PRINCIPAL_ACCOUNT: &str = "aws:PrincipalAccount";
    /// The request time, ISO 8601 UTC (set with [`super::RequestContext::with_current_time`]).
    pub const CURRENT_TIME: &str = "aws:CurrentTime";
    /// The request time in epoch seconds.
    pub const EPOCH_TIME: &str = "aws:EpochTime";
    /// The account of the caller.
    pub const CALLER_ACCOUNT: &str = "kms:CallerAccount";
    /// Prefix of the per-pair encryption context keys: `kms:EncryptionContext:<key>`.
    pub const ENCRYPTION_CONTEXT_PREFIX: &str = "kms:EncryptionContext:";
    /// The keys of the request's encryption context (multi-valued; absent if none).
    pub const ENCRYPTION_CONTEXT_KEYS: &str = "kms:EncryptionContextKeys";
    pub const KEY_ORIGIN: &str = "kms:KeyOrigin";
    pub const KEY_SPEC: &str = "kms:KeySpec";
    pub const KEY_USAGE: &str = "kms:KeyUsage";
    pub const ENCRYPTION_ALGORITHM: &str = "kms:EncryptionAlgorithm";
    /// Sign and Verify: the signing algorithm and `RAW` or `DIGEST`.
    pub const SIGNING_ALGORITHM: &str = "kms:SigningAlgorithm";
    pub const MESSAGE_TYPE: &str = "kms:MessageType";
    /// GenerateMac and VerifyMac: the MAC algorithm.
    pub const MAC_ALGORITHM: &str = "kms:MacAlgorithm";
    /// GenerateDataKeyPair(WithoutPlaintext): the key pair's spec.
    pub const DATA_KEY_PAIR_SPEC: &str = "kms:DataKeyPairSpec";
    /// DeriveSharedSecret: `ECDH`.
    pub const KEY_AGREEMENT_ALGORITHM: &str = "kms:KeyAgreementAlgorithm";
    /// The alias the request named the key by (`alias/...`), if it did.
    pub const REQUEST_ALIAS: &str = "kms:RequestAlias";
    /// Every alias of the key (multi-valued).
    pub const RESOURCE_ALIASES: &str = "kms:ResourceAliases";
    /// CreateGrant: the operations of the grant being created (multi-valued).
    pub const GRANT_OPERATIONS: &str = "kms:GrantOperations";
    pub const GRANTEE_PRINCIPAL: &str = "kms:GranteePrincipal";
    pub const RETIRING_PRINCIPAL: &str = "kms:RetiringPrincipal";
    /// CreateGrant: `EncryptionContextEquals` and/or `EncryptionContextSubset`.
    pub const GRANT_CONSTRAINT_TYPE: &str = "kms:GrantConstraintType";
    /// Never true locally: no AWS service creates grants here.
    pub const GRANT_IS_FOR_AWS_RESOURCE: &str = "kms:GrantIsForAWSResource";
    pub const BYPASS_POLICY_LOCKOUT_SAFETY_CHECK: &str = "kms:BypassPolicyLockoutSafetyCheck";
    pub const SCHEDULE_KEY_DELETION_PENDING_WINDOW_IN_DAYS: &str = "kms:ScheduleKeyDeletionPendingWindowInDays";
    pub const ROTATION_PERIOD_IN_DAYS: &str = "kms:RotationPeriodInDays";
    /// ImportKeyMaterial: `KEY_MATERIAL_EXPIRES` or `KEY_MATERIAL_DOES_NOT_EXPIRE`.
    pub const EXPIRATION_MODEL: &str = "kms:ExpirationModel";
    /// ImportKeyMaterial: the material's expiry, in seconds since the epoch (Numeric/Date).
    pub const VALID_TO: &str = "kms:ValidTo";
    /// GetParametersForImport: the wrapping algorithm and the RSA wrapping key's spec.
    pub const WRAPPING_ALGORITHM: &str = "kms:WrappingAlgorithm";
    pub const WRAPPING_KEY_SPEC: &str = "kms:WrappingKeySpec";
    /// Never present locally (no AWS service calls the agent): use `...IfExists`.
    pub const VIA_SERVICE: &str = "kms:ViaService";
    /// The caller's uid (decimal).
    pub const UID: &str = "kmsd:Uid";
    /// The caller's primary and supplementary gids (decimal, multi-valued).
    pub const GIDS: &str = "kmsd:Gids";
    /// The names of the caller's groups (multi-valued).
    pub const GROUPS: &str = "kmsd:Groups";
    /// The caller's systemd system unit, e.g. `nginx.service` (absent outside a unit).
    pub const UNIT: &str = "kmsd:Unit";
    /// The caller's executable, an absolute path (absent if unknown).
    pub const EXECUTABLE: &str = "kmsd:Executable";
}

/// The caller, as the kernel identified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The agent's account ID (12 digits).
    pub account: String,
    /// The Unix user name (or the uid in decimal if it has none).
    pub user: String,
    pub uid: u32,
    /// Primary and supplementary gids.
    pub gids: Vec<u32>,
    /// Names of the caller's groups.
    pub groups: Vec<String>,
    /// The systemd system unit the caller runs in.
    pub unit: Option<String>,
    pub executable: Option<String>,
    /// The identity of the verified client certificate of the caller's mutual-TLS
    /// connection, if any (`crate::tls::certificate_identity`).
    pub tls_client: Option<String>,
}

impl Caller {
    /// A caller with just a user name and uid (no groups, unit or executable).
    pub fn user(account: &str, user: &str, uid: u32) -> Caller {
        Caller {
            account: account.to_owned(),
            user: user.to_owned(),
            uid,
            gids: Vec::new(),
            groups: Vec::new(),
            unit: None,
            executable: None,
            tls_client: None,
        }
    }

    /// `arn:aws:iam::<account>:user/<user>`.
    pub fn user_arn(&self) -> String {
        format!("arn:aws:iam::{}:user/{}", self.account, self.user)
    }

    /// `arn:aws:iam::<account>:role/<unit>` for a caller inside a systemd unit.
    pub fn role_arn(&self) -> Option<String> {
        self.unit.as_ref().map(|unit| format!("arn:aws:iam::{}:role/{unit}", self.account))
    }

    /// `arn:aws:iam::<account>:role/tls/<identity>` (an IAM role with path `/tls/`) for a
    /// caller whose connection presented a client certificate.
    pub fn tls_role_arn(&self) -> Option<String> {
        self.tls_client.as_ref().map(|identity| Caller::tls_role_arn_of(&self.account, identity))
    }

    /// The role of client certificate identity `identity` in `account`.
    pub fn tls_role_arn_of(account: &str, identity: &str) -> String {
        format!("arn:aws:iam::{account}:role/tls/{identity}")
    }

    /// Every principal the caller carries, user first.
    pub fn principal_arns(&self) -> Vec<String> {
        let mut arns = vec![self.user_arn()];
        arns.extend(self.role_arn());
        arns.extend(self.tls_role_arn());
        arns
    }

    /// `arn:aws:iam::<account>:root`: the account principal of key policies.
    pub fn account_root_arn(&self) -> String {
        format!("arn:aws:iam::{}:root", self.account)
    }

    /// How the caller is named in reasons: its user ARN, and its roles (of its unit, of its
    /// client certificate).
    pub fn describe(&self) -> String {
        let roles: Vec<String> = self.role_arn().into_iter().chain(self.tls_role_arn()).collect();
        match roles.is_empty() {
            true => self.user_arn(),
            false => format!("{} (as {})", self.user_arn(), roles.join(", ")),
        }
    }

    /// Whether the caller belongs to the group with this name.
    pub fn in_group(&self, name: &str) -> bool {
        self.groups.iter().any(|g| g == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The key as first spelled (for debugging and listing).
    name: String,
    values: Vec<String>,
}

/// One request to authorize: the action (`kms:Encrypt`), the resource (the key's ARN, or
/// `*` for actions on no key such as `kms:CreateKey`), the caller, and its condition keys.
///
/// The caller's own keys are computed once per caller and shared (`base`); each request
/// adds only its own (`keys`), which may also override or remove a caller key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    pub action: String,
    pub resource: String,
    pub caller: Arc<Caller>,
    /// The caller's condition keys by lower-cased name.
    base: Arc<BTreeMap<String, Entry>>,
    /// This request's condition keys by lower-cased name; `None` removes a caller key.
    keys: BTreeMap<String, Option<Entry>>,
    encryption_context: Option<BTreeMap<String, String>>,
}

/// The condition keys a caller brings to every request.
fn caller_keys(c: &Caller) -> BTreeMap<String, Entry> {
    let mut map = BTreeMap::new();
    let mut set = |key: &str, values: Vec<String>| {
        map.insert(key.to_ascii_lowercase(), Entry { name: key.to_owned(), values });
    };
    set(keys::PRINCIPAL_ARN, c.principal_arns());
    set(keys::USERNAME, vec![c.user.clone()]);
    set(keys::PRINCIPAL_ACCOUNT, vec![c.account.clone()]);
    set(keys::CALLER_ACCOUNT, vec![c.account.clone()]);
    set(keys::UID, vec![c.uid.to_string()]);
    set(keys::GIDS, c.gids.iter().map(u32::to_string).collect());
    set(keys::GROUPS, c.groups.clone());
    if let Some(unit) = &c.unit {
        set(keys::UNIT, vec![unit.clone()]);
    }
    if let Some(exe) = &c.executable {
        set(keys::EXECUTABLE, vec![exe.clone()]);
    }
    map
}

type SharedCaller = (Arc<Caller>, Arc<BTreeMap<String, Entry>>);

/// The shared caller and its keys: a request's caller is almost always one of the few
/// this thread served last, so they are kept in a small per-thread cache.
fn shared_caller(caller: &Caller) -> SharedCaller {
    const CAPACITY: usize = 16;
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<SharedCaller>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(hit) = cache.iter().find(|(c, _)| **c == *caller) {
            return hit.clone();
        }
        let entry = (Arc::new(caller.clone()), Arc::new(caller_keys(caller)));
        if cache.len() == CAPACITY {
            cache.remove(0);
        }
        cache.push(entry.clone());
        entry
    })
}

impl RequestContext {
    /// A context for `action` on `resource` by `caller`, with the caller's keys set:
    /// `aws:PrincipalArn`, `aws:username`, `aws:PrincipalAccount`, `kms:CallerAccount`,
    /// `kmsd:Uid`, `kmsd:Gids`, `kmsd:Groups`, `kmsd:Unit`, `kmsd:Executable`.
    pub fn new(action: impl Into<String>, resource: impl Into<String>, caller: Caller) -> RequestContext {
        RequestContext::for_caller(action, resource, &caller)
    }

    /// [`RequestContext::new`] for a borrowed caller, sharing its keys with its other
    /// requests.
    pub fn for_caller(action: impl Into<String>, resource: impl Into<String>, caller: &Caller) -> RequestContext {
        let (caller, base) = shared_caller(caller);
        RequestContext {
            action: action.into(),
            resource: resource.into(),
            caller,
            base,
            keys: BTreeMap::new(),
            encryption_context: None,
        }
    }

    fn set(&mut self, key: &str, values: Vec<String>) {
        self.keys.insert(key.to_ascii_lowercase(), Some(Entry { name: key.to_owned(), values }));
    }

    /// Sets a single-valued condition key (replacing any earlier value).
    pub fn with(mut self, key: &str, value: impl Into<String>) -> RequestContext {
        self.set(key, vec![value.into()]);
        self
    }

    /// Sets a multi-valued condition key; an empty list is the same as an absent key.
    pub fn with_values<I, S>(mut self, key: &str, values: I) -> RequestContext
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.set(key, values.into_iter().map(Into::into).collect());
        self
    }

    /// Removes a condition key.
    pub fn without(mut self, key: &str) -> RequestContext {
        self.keys.insert(key.to_ascii_lowercase(), None);
        self
    }

    /// Sets the request's encryption context: `kms:EncryptionContext:<key>` for each pair
    /// and `kms:EncryptionContextKeys`; grants' constraints are checked against it. An
    /// empty context sets no keys, as in AWS.
    pub fn with_encryption_context(mut self, context: &BTreeMap<String, String>) -> RequestContext {
        let prefix = keys::ENCRYPTION_CONTEXT_PREFIX.to_ascii_lowercase();
        self.keys.retain(|k, _| !k.starts_with(&prefix));
        self.keys.remove(&keys::ENCRYPTION_CONTEXT_KEYS.to_ascii_lowercase());
        for (k, v) in context {
            // Pairs whose keys differ only by case share one condition key, multi-valued.
            let name = format!("{}{k}", keys::ENCRYPTION_CONTEXT_PREFIX);
            let slot = self.keys.entry(name.to_ascii_lowercase()).or_insert(None);
            slot.get_or_insert_with(|| Entry { name, values: Vec::new() }).values.push(v.clone());
        }
        if !context.is_empty() {
            self.set(keys::ENCRYPTION_CONTEXT_KEYS, context.keys().cloned().collect());
        }
        self.encryption_context = Some(context.clone());
        self
    }

    /// Sets `aws:CurrentTime` and `aws:EpochTime` (the evaluator reads no clock).
    pub fn with_current_time(self, epoch_seconds: i64) -> RequestContext {
        // Every request carries the time; formatting it once per second per thread keeps
        // that off the hot path.
        thread_local! {
            static LAST: std::cell::RefCell<(i64, String, String)> = const { std::cell::RefCell::new((i64::MIN, String::new(), String::new())) };
        }
        let (date, epoch) = LAST.with(|last| {
            let mut last = last.borrow_mut();
            if last.0 != epoch_seconds {
                *last = (epoch_seconds, format_date(epoch_seconds), epoch_seconds.to_string());
            }
            (last.1.clone(), last.2.clone())
        });
        self.with(keys::CURRENT_TIME, date).with(keys::EPOCH_TIME, epoch)
    }

    /// Returns a copy of this context for another action.
    pub fn for_action(&self, action: &str) -> RequestContext {
        RequestContext { action: action.to_owned(), ..self.clone() }
    }

    /// The values of a condition key (case-insensitive name); `None` if absent or empty.
    pub fn get(&self, key: &str) -> Option<&[String]> {
        let name = key.to_ascii_lowercase();
        let entry = match self.keys.get(&name) {
            Some(overridden) => overridden.as_ref(),
            None => self.base.get(&name),
        };
        entry.map(|e| e.values.as_slice()).filter(|v| !v.is_empty())
    }

    /// The request's encryption context, if one was set.
    pub fn encryption_context(&self) -> Option<&BTreeMap<String, String>> {
        self.encryption_context.as_ref()
    }

    /// The keys set, with their values (canonical spelling as first set).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[String])> {
        let caller = self.base.iter().filter(|(k, _)| !self.keys.contains_key(*k)).map(|(_, e)| e);
        caller.chain(self.keys.values().flatten()).map(|e| (e.name.as_str(), e.values.as_slice()))
    }
}

// ---------------------------------------------------------------------------------------
// Wildcard patterns.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `*`: any run of characters, possibly empty.
    Star,
    /// `?`: any one character.
    One,
}

/// Compiles a pattern: `*` and `?` are wildcards if `wildcards`, and `${key}` policy
/// variables are substituted from `ctx` if `variables`. Substituted text and the escapes
/// `${*}`, `${?}`, `${$}` are literal. `None` if a variable cannot be resolved (the key is
/// absent or multi-valued and no default is given), which AWS treats as no match.
fn compile(pattern: &str, wildcards: bool, variables: Option<&RequestContext>) -> Option<Vec<Token>> {
    let mut out = Vec::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        if let (Some(ctx), true) = (variables, rest.starts_with("${")) {
            if let Some(end) = rest.find('}') {
                let inner = &rest[2..end];
                rest = &rest[end + 1..];
                match inner {
                    "*" | "?" | "$" => out.extend(inner.chars().map(Token::Char)),
                    _ => {
                        let (key, default) = match inner.split_once(',') {
                            Some((key, default)) => {
                                let default = default.trim();
                                let default =
                                    default.strip_prefix('\'').and_then(|d| d.strip_suffix('\'')).unwrap_or(default);
                                (key.trim(), Some(default))
                            }
                            None => (inner.trim(), None),
                        };
                        let value = match ctx.get(key) {
                            Some([one]) => one.as_str(),
                            _ => default?,
                        };
                        out.extend(value.chars().map(Token::Char));
                    }
                }
                continue;
            }
        }
        out.push(match c {
            '*' if wildcards => Token::Star,
            '?' if wildcards => Token::One,
            c => Token::Char(c),
        });
        rest = &rest[c.len_utf8()..];
    }
    Some(out)
}

/// Matches `text` against compiled tokens.
fn matches_tokens(tokens: &[Token], text: &str, ignore_case: bool) -> bool {
    let text: Vec<char> = text.chars().collect();
    let token = |t: &Token| match t {
        Token::Star => Glob::Star,
        Token::One => Glob::One,
        Token::Char(c) => Glob::Char(*c),
    };
    let eq = |a: char, b: char| if ignore_case { a.to_lowercase().eq(b.to_lowercase()) } else { a == b };
    glob(tokens, &text, token, eq)
}

/// Whether `text` matches `pattern` with `*`/`?` wildcards.
pub fn wildcard_match(pattern: &str, text: &str, ignore_case: bool) -> bool {
    if pattern.is_ascii() && text.is_ascii() {
        return ascii_glob(pattern.as_bytes(), text.as_bytes(), ignore_case);
    }
    compile(pattern, true, None).is_some_and(|tokens| matches_tokens(&tokens, text, ignore_case))
}

/// [`glob`] on ASCII pattern and text, without allocating: every request matches each
/// statement's actions and resources, so this is the evaluator's hot path.
fn ascii_glob(pattern: &[u8], text: &[u8], ignore_case: bool) -> bool {
    let byte = |b: &u8| match b {
        b'*' => Glob::Star,
        b'?' => Glob::One,
        c => Glob::Char(*c),
    };
    let eq = |a: u8, b: u8| if ignore_case { a.eq_ignore_ascii_case(&b) } else { a == b };
    glob(pattern, text, byte, eq)
}

/// One pattern element, as [`glob`] sees it.
enum Glob<C> {
    Star,
    One,
    Char(C),
}

/// Wildcard matching with backtracking on the last `*` only, so that hostile patterns
/// cannot make it exponential.
fn glob<P, C: Copy>(pattern: &[P], text: &[C], kind: impl Fn(&P) -> Glob<C>, eq: impl Fn(C, C) -> bool) -> bool {
    let (mut t, mut p) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p).map(&kind) {
            Some(Glob::Star) => {
                star = Some((p, t));
                p += 1;
            }
            Some(Glob::One) => {
                p += 1;
                t += 1;
            }
            Some(Glob::Char(c)) if eq(c, text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|x| matches!(kind(x), Glob::Star))
}

// ---------------------------------------------------------------------------------------
// Value parsing.

/// A condition number: an integer or decimal.
pub fn parse_number(text: &str) -> Option<f64> {
    let t = text.trim();
    let ok = !t.is_empty()
        && t.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        && t.bytes().any(|b| b.is_ascii_digit());
    ok.then(|| t.parse::<f64>().ok()).flatten().filter(|n| n.is_finite())
}

/// A condition date, as epoch milliseconds: ISO 8601 (`2025-01-31`, `2025-01-31T12:00:00Z`,
/// with optional fractional seconds and a `Z` or `±hh:mm` offset) or epoch seconds.
pub fn parse_date(text: &str) -> Option<i64> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'-') && !t[1..].contains('-') {
        return t.parse::<i64>().ok()?.checked_mul(1000);
    }
    let b = t.as_bytes();
    let num = |s: &str| -> Option<i64> { s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok()).flatten() };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (num(t.get(0..4)?)?, num(t.get(5..7)?)?, num(t.get(8..10)?)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let mut millis = days_from_civil(year, month, day) * 86_400_000;
    let rest = &t[10..];
    if rest.is_empty() {
        return Some(millis);
    }
    let rest = rest.strip_prefix('T').or_else(|| rest.strip_prefix('t'))?;
    if rest.len() < 5 || rest.as_bytes()[2] != b':' {
        return None;
    }
    let (hour, minute) = (num(rest.get(0..2)?)?, num(rest.get(3..5)?)?);
    let mut rest = &rest[5..];
    let mut second = 0;
    let mut fraction_ms = 0;
    if let Some(r) = rest.strip_prefix(':') {
        second = num(r.get(0..2)?)?;
        rest = &r[2..];
        if let Some(r) = rest.strip_prefix('.') {
            let digits = r.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            let frac = &r[..digits];
            fraction_ms = num(&format!("{:0<3}", &frac[..frac.len().min(3)]))?;
            rest = &r[digits..];
        }
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    millis += ((hour * 60 + minute) * 60 + second) * 1000 + fraction_ms;
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let r = &rest[1..];
            let (h, m) = match r.len() {
                5 if r.as_bytes()[2] == b':' => (num(r.get(0..2)?)?, num(r.get(3..5)?)?),
                4 => (num(r.get(0..2)?)?, num(r.get(2..4)?)?),
                _ => return None,
            };
            sign * (h * 60 + m)
        }
    };
    Some(millis - offset_minutes * 60_000)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Epoch seconds → `YYYY-MM-DDThh:mm:ssZ`.
fn format_date(epoch_seconds: i64) -> String {
    let days = epoch_seconds.div_euclid(86_400);
    let secs = epoch_seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

// ---------------------------------------------------------------------------------------
// Statements and conditions.

/// Whether the statement's `Action`/`NotAction` covers the request's action. Action names
/// are case-insensitive.
pub fn action_matches(statement: &Statement, action: &str) -> bool {
    match &statement.action {
        ActionElement::Action(list) => list.iter().any(|p| wildcard_match(p, action, true)),
        ActionElement::NotAction(list) => !list.iter().any(|p| wildcard_match(p, action, true)),
    }
}

/// Whether the statement's `Resource`/`NotResource` covers the request's resource.
pub fn resource_matches(statement: &Statement, ctx: &RequestContext, version: PolicyVersion) -> bool {
    let vars = (version == PolicyVersion::V2012_10_17).then_some(ctx);
    let hit = |list: &[String]| {
        list.iter().any(|p| match vars {
            Some(_) if p.contains("${") => {
                compile(p, true, vars).is_some_and(|tokens| matches_tokens(&tokens, &ctx.resource, false))
            }
            _ => wildcard_match(p, &ctx.resource, false),
        })
    };
    match &statement.resource {
        ResourceElement::Resource(list) => hit(list),
        ResourceElement::NotResource(list) => !hit(list),
    }
}

/// Whether every condition of the statement holds.
pub fn conditions_hold(statement: &Statement, ctx: &RequestContext, version: PolicyVersion) -> bool {
    statement.conditions.iter().all(|c| condition_holds(c, ctx, version))
}

/// Whether the statement matches the request's action, resource and conditions (its
/// principals are the caller's business: see `decide`).
pub fn statement_matches(statement: &Statement, ctx: &RequestContext, version: PolicyVersion) -> bool {
    action_matches(statement, &ctx.action)
        && resource_matches(statement, ctx, version)
        && conditions_hold(statement, ctx, version)
}

/// Evaluates one condition against the request.
pub fn condition_holds(condition: &Condition, ctx: &RequestContext, version: PolicyVersion) -> bool {
    let op = condition.operator;
    let present = ctx.get(&condition.key);
    if op.base == BaseOperator::Null {
        return condition.values.iter().any(|v| v.eq_ignore_ascii_case("true") == present.is_none());
    }
    let Some(request_values) = present else {
        return match op.set {
            _ if op.if_exists => true,
            SetQualifier::ForAllValues => true,
            SetQualifier::ForAnyValue => false,
            SetQualifier::None => op.base.is_negated(),
        };
    };
    let vars = (version == PolicyVersion::V2012_10_17).then_some(ctx);
    // Whether one request value matches one of the policy values, positively.
    let positive = |value: &str| condition.values.iter().any(|pv| value_matches(op.base, pv, value, vars));
    // Whether one request value satisfies the operator (negation included).
    let satisfies = |value: &str| positive(value) != op.base.is_negated();
    match op.set {
        SetQualifier::ForAnyValue => request_values.iter().any(|v| satisfies(v)),
        SetQualifier::ForAllValues => request_values.iter().all(|v| satisfies(v)),
        SetQualifier::None => request_values.iter().any(|v| positive(v)) != op.base.is_negated(),
    }
}

/// Whether a request value matches a policy value under the positive form of `op`.
fn value_matches(op: BaseOperator, policy_value: &str, value: &str, vars: Option<&RequestContext>) -> bool {
    use BaseOperator::*;
    let substitute = |wildcards: bool| compile(policy_value, wildcards, vars);
    let literal = || substitute(false).map(|tokens| tokens.iter().map(token_char).collect::<String>());
    match op.value_type() {
        ValueType::String => match op {
            StringEquals | StringNotEquals => literal().is_some_and(|p| p == value),
            StringEqualsIgnoreCase | StringNotEqualsIgnoreCase => {
                literal().is_some_and(|p| p.to_lowercase() == value.to_lowercase())
            }
            _ => substitute(true).is_some_and(|tokens| matches_tokens(&tokens, value, false)),
        },
        ValueType::Numeric => {
            let (Some(p), Some(v)) = (literal().as_deref().and_then(parse_number), parse_number(value)) else {
                return false;
            };
            match op {
                NumericEquals | NumericNotEquals => v == p,
                NumericLessThan => v < p,
                NumericLessThanEquals => v <= p,
                NumericGreaterThan => v > p,
                _ => v >= p,
            }
        }
        ValueType::Date => {
            let (Some(p), Some(v)) = (literal().as_deref().and_then(parse_date), parse_date(value)) else {
                return false;
            };
            match op {
                DateEquals | DateNotEquals => v == p,
                DateLessThan => v < p,
                DateLessThanEquals => v <= p,
                DateGreaterThan => v > p,
                _ => v >= p,
            }
        }
        ValueType::Bool => literal().is_some_and(|p| p.eq_ignore_ascii_case(value)),
        ValueType::Null => false,
        ValueType::Arn => arn_matches(policy_value, value, vars),
    }
}

fn token_char(token: &Token) -> char {
    match token {
        Token::Char(c) => *c,
        Token::Star => '*',
        Token::One => '?',
    }
}

/// ArnEquals/ArnLike (identical in AWS): each of the six colon-separated parts matched on
/// its own, with wildcards that do not cross a colon between parts.
fn arn_matches(pattern: &str, value: &str, vars: Option<&RequestContext>) -> bool {
    let pattern_parts: Vec<&str> = pattern.splitn(6, ':').collect();
    let value_parts: Vec<&str> = value.splitn(6, ':').collect();
    pattern_parts.len() == 6
        && value_parts.len() == 6
        && pattern_parts
            .iter()
            .zip(&value_parts)
            .all(|(p, v)| compile(p, true, vars).is_some_and(|tokens| matches_tokens(&tokens, v, false)))
}

#[cfg(test)]
mod glob_tests {
    use super::*;

    /// The ASCII fast path agrees with the general matcher on a grid of patterns and texts.
    #[test]
    fn ascii_glob_agrees_with_the_token_matcher() {
        let patterns = ["*", "kms:*", "kms:Gen*Key", "kms:?ncrypt", "KMS:ENCRYPT", "a*b*c", "*?", "", "x", "**a"];
        let texts = ["", "kms:Encrypt", "kms:GenerateDataKey", "kms:Decrypt", "abc", "aXbYc", "ab", "a", "x"];
        for p in patterns {
            for t in texts {
                for ic in [false, true] {
                    let general = compile(p, true, None).is_some_and(|tokens| matches_tokens(&tokens, t, ic));
                    assert_eq!(ascii_glob(p.as_bytes(), t.as_bytes(), ic), general, "{p:?} ~ {t:?} (ignore case {ic})");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("kms:Generate*", "kms:GenerateDataKey", false));
        assert!(wildcard_match("kms:generate*", "kms:GenerateDataKey", true));
        assert!(!wildcard_match("kms:generate*", "kms:GenerateDataKey", false));
        assert!(wildcard_match("*", "", false));
        assert!(wildcard_match("a?c", "abc", false));
        assert!(!wildcard_match("a?c", "ac", false));
        assert!(wildcard_match("*a*b*c*", "xxaxxbxxcxx", false));
        assert!(!wildcard_match("*a*b*c", "xxaxxbxxcxx", false));
        assert!(wildcard_match("alias/app-*", "alias/app-web", false));
        // A pathological pattern stays fast.
        let text = "a".repeat(5000);
        assert!(!wildcard_match(&format!("{}b", "*a".repeat(50)), &text, false));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("30"), Some(30.0));
        assert_eq!(parse_number("-1.5"), Some(-1.5));
        assert_eq!(parse_number("seven"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("inf"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("86400"), Some(86_400_000));
        assert_eq!(parse_date("2024-02-29T12:30:15.250Z"), Some(1_709_209_815_250));
        assert_eq!(parse_date("2024-02-29T14:30:15.25+02:00"), parse_date("2024-02-29T12:30:15.250Z"));
        assert_eq!(parse_date("2023-02-29"), None);
        assert_eq!(parse_date("2024-13-01"), None);
        assert_eq!(parse_date("yesterday"), None);
        assert_eq!(parse_date("2024-01-01T25:00:00Z"), None);
        assert_eq!(format_date(1_709_209_815), "2024-02-29T12:30:15Z");
        assert_eq!(format_date(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn hostile_values_never_panic() {
        for text in [
            "",
            "-",
            "é",
            "2024-01-01Té",
            "2024-01-01T12:0é",
            "2024-01-01T12:00:0é",
            "2024-01-01T12:00:00.é",
            "2024-01-01T12:00+é1",
            "2024-01-01T12:00+1é",
            "2024-01-01T12:00+aé",
            "2024-01-01T12:00:00.Z",
            "9999999999999999999",
            "-9223372036854775808",
            "2024-é1-01",
            "${",
            "${}",
            "${aws:username",
        ] {
            let _ = parse_date(text);
            let _ = parse_number(text);
            let ctx = RequestContext::new("kms:Encrypt", "*", Caller::user("111122223333", "é", 1));
            let _ = compile(text, true, Some(&ctx));
        }
    }

    #[test]
    fn variables_substitute_literally() {
        let caller = Caller::user("111122223333", "a*", 1000);
        let ctx = RequestContext::new("kms:Encrypt", "*", caller);
        let tokens = compile("x-${aws:username}-${*}", true, Some(&ctx)).unwrap();
        assert!(matches_tokens(&tokens, "x-a*-*", false));
        assert!(!matches_tokens(&tokens, "x-abc-*", false), "substituted * is literal");
        assert!(compile("${kms:Nope}", true, Some(&ctx)).is_none());
        let tokens = compile("${kms:Nope, 'dflt'}", true, Some(&ctx)).unwrap();
        assert!(matches_tokens(&tokens, "dflt", false));
    }

    #[test]
    fn a_client_certificate_adds_a_tls_role() {
        let mut caller = Caller::user("111122223333", "alice", 1000);
        caller.tls_client = Some("host-b".into());
        assert_eq!(
            caller.principal_arns(),
            ["arn:aws:iam::111122223333:user/alice", "arn:aws:iam::111122223333:role/tls/host-b"]
        );
        assert_eq!(
            caller.describe(),
            "arn:aws:iam::111122223333:user/alice (as arn:aws:iam::111122223333:role/tls/host-b)"
        );
        let ctx = RequestContext::new("kms:Encrypt", "*", caller);
        assert_eq!(ctx.get(keys::PRINCIPAL_ARN).map(<[String]>::len), Some(2));
    }

    #[test]
    fn context_keys_are_case_insensitive_and_empty_is_absent() {
        let ctx = RequestContext::new("kms:Encrypt", "*", Caller::user("111122223333", "alice", 1000))
            .with("kms:KeySpec", "SYMMETRIC_DEFAULT")
            .with_values::<_, String>("kms:ResourceAliases", []);
        assert_eq!(ctx.get("KMS:KEYSPEC"), Some(&["SYMMETRIC_DEFAULT".to_owned()][..]));
        assert_eq!(ctx.get("kms:ResourceAliases"), None);
        assert_eq!(ctx.get("kmsd:unit"), None);
        assert_eq!(ctx.get("kmsd:uid"), Some(&["1000".to_owned()][..]));
    }
}
