//! Access control in the agent: the caller's identity policies (from the configuration
//! directory, reloaded on SIGHUP) and the decision for each request, by the evaluator in
//! [`crate::policy`].
//!
//! Identity policies live in `<config>/policies/{users,groups,roles}/<name>.json`, one
//! policy document per file, attached to the Unix user, the Unix group or the systemd
//! system unit (role) the file is named after; `roles/tls/<identity>.json` is attached to
//! the role `role/tls/<identity>` of a mutual-TLS client certificate. On top of them the
//! defaults apply: root and members of `kmsadmin` administer keys (no cryptographic use);
//! and a per-user agent (one not running as root) lets its own user do everything — it is
//! that user's keyring.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use kmsfs_common::{ErrorKind, KmsError};

use crate::identity::Identity;
use crate::policy::decide::{authorize, authorize_without_key, Decision, GrantConstraints, GrantView, Refusal};
use crate::policy::eval::{Caller, RequestContext};
use crate::policy::{defaults, Policy};
use crate::store::GrantRow;

/// The identity policies of every user, group and role, as loaded.
#[derive(Default)]
pub struct IdentityPolicies {
    users: HashMap<String, Vec<Arc<Policy>>>,
    groups: HashMap<String, Vec<Arc<Policy>>>,
    roles: HashMap<String, Vec<Arc<Policy>>>,
    /// The roles of client certificates, `roles/tls/<identity>.json`.
    tls_roles: HashMap<String, Vec<Arc<Policy>>>,
    files: usize,
}

impl IdentityPolicies {
    /// Loads `<dir>/policies/{users,groups,roles,roles/tls}/*.json`. Every file must be a valid
    /// identity policy: one bad file fails the whole load (naming the file and the problem),
    /// so that a typo never silently drops a Deny.
    pub fn load(dir: &Path) -> Result<IdentityPolicies, String> {
        let mut loaded = IdentityPolicies::default();
        for (kind, map) in [
            ("users", &mut loaded.users),
            ("groups", &mut loaded.groups),
            ("roles", &mut loaded.roles),
            ("roles/tls", &mut loaded.tls_roles),
        ] {
            let sub = dir.join("policies").join(kind);
            let entries = match std::fs::read_dir(&sub) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", sub.display())),
            };
            let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths {
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
                let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let policy = Policy::parse_identity_policy(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .with_name(format!("{kind}/{name}"));
                map.entry(name).or_default().push(Arc::new(policy));
                loaded.files += 1;
            }
        }
        Ok(loaded)
    }
}

/// The agent's access control state.
pub struct Authz {
    config_dir: Option<PathBuf>,
    policies: RwLock<Arc<IdentityPolicies>>,
    /// The uid of a per-user agent's owner (None for the system agent, run as root).
    owner: Option<u32>,
    owner_policy: Arc<Policy>,
    admin_policy: Arc<Policy>,
}

const OWNER_POLICY: &str = r#"{"Version": "2012-10-17", "Id": "kmsd-agent-owner",
  "Statement": [{"Sid": "PerUserAgentOwner", "Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}"#;

impl Authz {
    /// Access control from `config_dir` (which may not exist: then only the defaults apply).
    pub fn load(config_dir: Option<PathBuf>, owner_uid: u32) -> Result<Authz, String> {
        let policies = match &config_dir {
            Some(dir) => IdentityPolicies::load(dir)?,
            None => IdentityPolicies::default(),
        };
        #[allow(clippy::expect_used)] // a constant document
        let owner_policy =
            Policy::parse_identity_policy(OWNER_POLICY).expect("valid").with_name("per-user agent owner");
        tracing::info!(files = policies.files, "identity policies loaded");
        Ok(Authz {
            config_dir,
            policies: RwLock::new(Arc::new(policies)),
            owner: (owner_uid != 0).then_some(owner_uid),
            owner_policy: Arc::new(owner_policy),
            admin_policy: Arc::new(defaults::key_administrator_policy()),
        })
    }

    /// Reloads the identity policies; on error the previous ones stay in force.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(dir) = &self.config_dir else { return Ok(0) };
        let fresh = IdentityPolicies::load(dir)?;
        let files = fresh.files;
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(files)
    }

    /// The evaluator's view of a caller.
    pub fn caller(identity: &Identity, account: &str) -> Caller {
        Caller {
            account: account.to_string(),
            user: identity.user.clone(),
            uid: identity.uid,
            gids: identity.groups.clone(),
            groups: identity.group_names.clone(),
            unit: identity.unit.clone(),
            executable: identity.executable.as_ref().map(|p| p.display().to_string()),
            tls_client: None,
        }
    }

    /// The identity policies attached to `caller`: its user's, its groups', its roles' (unit
    /// and client certificate), and the defaults'.
    fn policies_for(&self, caller: &Caller) -> Vec<Arc<Policy>> {
        let loaded = self.policies.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out: Vec<Arc<Policy>> = Vec::new();
        out.extend(loaded.users.get(&caller.user).into_iter().flatten().cloned());
        for group in &caller.groups {
            out.extend(loaded.groups.get(group).into_iter().flatten().cloned());
        }
        if let Some(unit) = &caller.unit {
            out.extend(loaded.roles.get(unit).into_iter().flatten().cloned());
        }
        if let Some(identity) = &caller.tls_client {
            out.extend(loaded.tls_roles.get(identity).into_iter().flatten().cloned());
        }
        if defaults::is_default_key_administrator(caller) {
            out.push(self.admin_policy.clone());
        }
        if self.owner == Some(caller.uid) {
            out.push(self.owner_policy.clone());
        }
        out
    }

    /// Decides `ctx` on a key with `key_policy` and `grants`.
    pub fn check_key(&self, key_policy: &Policy, grants: &[GrantRow], ctx: RequestContext) -> Result<(), KmsError> {
        let policies = self.policies_for(&ctx.caller);
        let refs: Vec<&Policy> = policies.iter().map(Arc::as_ref).collect();
        let views: Vec<GrantView> = grants.iter().map(grant_view).collect();
        let decision = authorize(key_policy, &refs, &views, &ctx);
        if decision.allowed {
            return Ok(());
        }
        tracing::info!(action = %ctx.action, resource = %ctx.resource, "denied: {}", decision.reason);
        Err(self.denied(decision, &ctx))
    }

    /// Decides `ctx` on no key (CreateKey, ListKeys, ListAliases, GenerateRandom, ...).
    pub fn check_account(&self, ctx: RequestContext) -> Result<(), KmsError> {
        let policies = self.policies_for(&ctx.caller);
        let refs: Vec<&Policy> = policies.iter().map(Arc::as_ref).collect();
        let decision = authorize_without_key(&refs, &ctx);
        if decision.allowed {
            return Ok(());
        }
        tracing::info!(action = %ctx.action, "denied: {}", decision.reason);
        Err(self.denied(decision, &ctx))
    }

    /// The `AccessDeniedException` of a denial: why, then what would allow it, naming the
    /// policy files of this agent's configuration or the key policy to change.
    fn denied(&self, decision: Decision, ctx: &RequestContext) -> KmsError {
        let advice = decision.refusal.map(|refusal| self.advice(&refusal, ctx)).unwrap_or_default();
        KmsError::new(ErrorKind::AccessDeniedException, format!("{}.{advice}", decision.reason))
    }

    /// What would allow a request refused for `refusal`, as a sentence or two that start with
    /// a space.
    fn advice(&self, refusal: &Refusal, ctx: &RequestContext) -> String {
        let caller = &ctx.caller;
        let action = &ctx.action;
        let operation = action.strip_prefix("kms:").unwrap_or(action);
        let key = &ctx.resource;
        let reload = "then reload kmsd (`systemctl reload kmsd`, or SIGHUP)";
        let key_policy = format!(
            "a key administrator can change the key policy of {key} to allow {} (`kmsctl get-key-policy --key-id \
             {key} --policy-name default --output text`, edited, then `kmsctl put-key-policy`)",
            caller.user_arn()
        );
        let grant =
            crate::service::model::model().enumeration("GrantOperation").iter().any(|o| o == operation).then(|| {
                format!(
                "; or grant it: `kmsctl create-grant --key-id {key} --grantee-principal {} --operations {operation}`",
                caller.user_arn()
            )
            });
        match refusal {
            Refusal::ExplicitDeny { identity_policy: Some(name) } => {
                format!(" To allow it, remove or narrow that statement in {}; {reload}", self.policy_file(name))
            }
            Refusal::ExplicitDeny { identity_policy: None } => format!(
                " To allow it, a key administrator must remove or narrow that statement of the key policy of {key} \
                 (`kmsctl get-key-policy --key-id {key} --policy-name default --output text`, then `kmsctl \
                 put-key-policy`)"
            ),
            Refusal::KeyPolicyCloses => format!(" To allow it, {key_policy}{}", grant.unwrap_or_default()),
            Refusal::NothingAllows { key_delegates: true } => format!(
                " To allow it, add a statement allowing {action} on {key} (or on every key: Resource \"*\") to {}; \
                 {reload}{}",
                self.identity_policy_files(caller),
                grant.unwrap_or_default()
            ),
            Refusal::NothingAllows { key_delegates: false } => format!(
                " The key policy does not delegate {action} to the account ({}), so no identity policy can allow it. \
                 To allow it, {key_policy}{}",
                caller.account_root_arn(),
                grant.unwrap_or_default()
            ),
            Refusal::NoIdentityPolicy => format!(
                " To allow it, add a statement allowing {action} (Resource \"*\") to {}; {reload}",
                self.identity_policy_files(caller)
            ),
        }
    }

    /// The file of the identity policy named `name` (`users/alice`, `roles/tls/host-c`...).
    fn policy_file(&self, name: &str) -> String {
        match &self.config_dir {
            Some(dir) => dir.join("policies").join(format!("{name}.json")).display().to_string(),
            None => format!("policies/{name}.json in kmsd's configuration directory"),
        }
    }

    /// The identity policy files that would apply to `caller`: its user's, its unit's, its
    /// client certificate's, then its groups'.
    fn identity_policy_files(&self, caller: &Caller) -> String {
        let mut files = vec![self.policy_file(&format!("users/{}", caller.user))];
        if let Some(unit) = &caller.unit {
            files.push(format!("roles/{unit}.json beside it (for its unit's role/{unit})"));
        }
        if let Some(identity) = &caller.tls_client {
            files.push(format!("roles/tls/{identity}.json beside it (for its certificate's role/tls/{identity})"));
        }
        match caller.groups.as_slice() {
            [] => {}
            [group] => files.push(format!("groups/{group}.json beside it (for its group {group})")),
            groups => files.push(format!("groups/GROUP.json beside it for one of its groups ({})", groups.join(", "))),
        }
        files.join(", or ")
    }
}

impl Authz {
    /// The policy lockout safety check: would `ctx`'s caller still be allowed
    /// PutKeyPolicy under `proposed`?
    pub fn check_lockout(&self, proposed: &Policy, ctx: &RequestContext) -> Result<(), KmsError> {
        let policies = self.policies_for(&ctx.caller);
        let refs: Vec<&Policy> = policies.iter().map(Arc::as_ref).collect();
        crate::policy::check_lockout(proposed, &refs, ctx, false).map_err(|e| {
            // What would let the caller keep managing the key, as for a denial of PutKeyPolicy.
            let put = ctx.for_action("kms:PutKeyPolicy");
            let advice =
                authorize(proposed, &refs, &[], &put).refusal.map(|r| self.advice(&r, &put)).unwrap_or_default();
            KmsError::new(
                ErrorKind::MalformedPolicyDocumentException,
                format!(
                    "{e}.{advice}; or, if the key is meant to be managed by others only, set \
                     BypassPolicyLockoutSafetyCheck (kmsctl --bypass-policy-lockout-safety-check)"
                ),
            )
        })
    }
}

/// A stored grant as the evaluator sees it.
fn grant_view(g: &GrantRow) -> GrantView {
    let context = |name: &str| {
        g.constraints.as_ref().and_then(|c| c.get(name)).and_then(|m| serde_json::from_value(m.clone()).ok())
    };
    let constraints = g.constraints.as_ref().map(|_| GrantConstraints {
        encryption_context_subset: context("EncryptionContextSubset"),
        encryption_context_equals: context("EncryptionContextEquals"),
    });
    GrantView {
        grant_id: g.grant_id.clone(),
        grantee_principal: g.grantee.clone(),
        operations: g.operations.clone(),
        constraints,
    }
}

/// A request context for `action` by `caller`, on `resource`, at the current time.
pub fn context(action: &str, resource: &str, caller: &Caller) -> RequestContext {
    RequestContext::for_caller(format!("kms:{action}"), resource, caller)
        .with_current_time(kmsfs_common::time::now_millis() / 1000)
}

pub use crate::policy::eval::keys as condition_keys;
