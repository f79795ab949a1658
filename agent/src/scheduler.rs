//! The scheduler: what the agent does on its own when the (lifecycle) clock says so —
//! automatic key rotation, the destruction of keys whose deletion window has ended, and the
//! expiry of imported key material. It runs once at start (catching up on whatever fell due
//! while kmsd was down) and then whenever the next date comes, at least every minute.
//!
//! Each action is one durable transaction, followed by one audit record of AWS's shape for
//! events the service performs itself (`eventType: AwsServiceEvent`, `RotateKey`,
//! `DeleteKey`, `DeleteExpiredKeyMaterial`). Destroying a key removes every version of its
//! material, its aliases, grants and tags in one transaction, then scrubs the database files
//! ([`crate::store::Store::destroy_key`]): a kill at any point leaves the key either intact
//! and still pending deletion, or gone.

use std::sync::Arc;
use std::time::Duration;

use kmsfs_common::ids::KeyId;
use kmsfs_common::KmsError;
use serde_json::{json, Map, Value};

use crate::agent::{Agent, Change, KeyRecord, Material};
use crate::audit::AuditLog;
use crate::service::rotation::{self, RotationType};
use crate::store::KeyState;

/// The longest the scheduler sleeps, so that usage is saved and dates are re-read often.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Something the scheduler did, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEvent {
    /// AWS's CloudTrail event name.
    pub name: &'static str,
    pub key_id: KeyId,
    /// The key material the event concerns (`keyMaterialId` in `additionalEventData`).
    pub material_id: Option<String>,
    pub time_ms: i64,
}

/// What one pass did, and how many due actions failed (retried at a later pass).
pub struct Pass {
    pub events: Vec<ServiceEvent>,
    pub failed: usize,
}

/// How long after a failed action the scheduler tries again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// Performs everything due at the agent's clock's now; returns what was done. An action
/// that fails is logged and retried at a later pass.
pub fn run_due(agent: &Agent) -> Pass {
    let now = agent.now_ms();
    let mut done = Vec::new();
    let mut failed = 0;
    for key in agent.keys_sorted() {
        let outcome = match due(&key, now) {
            Some(Due::Deletion) => destroy(agent, &key.row.id),
            Some(Due::Rotation) => rotation::rotate(agent, &key.row.id, RotationType::Automatic).map(|r| {
                tracing::info!(key_id = %r.row.id, version = r.row.current_version, "rotated key (automatic)");
                vec![event(agent, "RotateKey", &r.row.id, r.current().ok().map(|m| m.material_id().to_string()))]
            }),
            Some(Due::Expiry) => expire_material(agent, &key.row.id),
            None => Ok(Vec::new()),
        };
        match outcome {
            Ok(events) => done.extend(events),
            Err(e) => {
                failed += 1;
                tracing::error!(key_id = %key.row.id, "scheduled action failed, retrying later: {}", e.message);
            }
        }
    }
    if let Err(e) = agent.save_usage() {
        tracing::warn!("cannot save key usage: {}", e.message);
    }
    failed += crate::service::replicas::retry_pending(agent);
    Pass { events: done, failed }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Deletion,
    Rotation,
    Expiry,
}

/// The next thing the scheduler has to do to `key`, and when (in the agent's clock). A key
/// pending deletion waits only for its destruction; an enabled key for its next rotation
/// or the expiry of imported material, whichever comes first.
fn next_action(key: &KeyRecord) -> Option<(Due, i64)> {
    let row = &key.row;
    if row.state.is_pending_deletion() {
        return row.deletion_ms.map(|at| (Due::Deletion, at));
    }
    let rotation = (row.state == KeyState::Enabled).then_some(row.next_rotation_ms).flatten();
    let expiry = key.materials.values().filter(|m| m.key.is_some()).filter_map(|m| m.row.valid_to_ms).min();
    let actions = [rotation.map(|at| (Due::Rotation, at)), expiry.map(|at| (Due::Expiry, at))];
    actions.into_iter().flatten().min_by_key(|(_, at)| *at)
}

/// What is due for `key` at `now`, if anything.
fn due(key: &KeyRecord, now: i64) -> Option<Due> {
    next_action(key).filter(|(_, at)| *at <= now).map(|(due, _)| due)
}

/// The next date anything falls due, in the agent's clock.
fn next_due(agent: &Agent) -> Option<i64> {
    agent.keys_sorted().iter().filter_map(|key| next_action(key)).map(|(_, at)| at).min()
}

/// Destroys key `id` if it is still pending deletion and due.
fn destroy(agent: &Agent, id: &KeyId) -> Result<Vec<ServiceEvent>, KmsError> {
    agent.mutate(|store| {
        let Some(key) = agent.key(id) else { return Ok((Vec::new(), Vec::new())) };
        if !matches!(due(&key, agent.now_ms()), Some(Due::Deletion)) {
            return Ok((Vec::new(), Vec::new()));
        }
        destroy_token_objects(agent, &key);
        // A replica's primary learns that it is gone (right after this pass, or later).
        let primary = key.row.multi_region.as_ref().map(|m| m.primary.as_str()).filter(|p| *p != agent.scope.region);
        store.destroy_key(id, primary)?;
        tracing::info!(key_id = %id, "deletion window ended: key and its material destroyed");
        Ok((vec![event(agent, "DeleteKey", id, None)], vec![Change::KeyDestroyed(*id)]))
    })
}

/// Destroys what a key's stored material refers to outside the database (objects in a
/// PKCS#11 token), before the rows go. As in AWS, a key in a custom key store that is not
/// connected is deleted anyway, leaving its objects in the token: they are logged, to be
/// destroyed by hand.
fn destroy_token_objects(agent: &Agent, key: &KeyRecord) {
    let root = agent.root_for(&key.row);
    for m in key.materials.values() {
        let Some(stored) = &m.row.stored else { continue };
        let outcome = match &root {
            Ok(root) => root.destroy(&key.row.id, m.row.version, stored),
            Err(e) => Err(e.clone()),
        };
        if let Err(e) = outcome {
            tracing::warn!(key_id = %key.row.id, version = m.row.version, "the key's material could not be destroyed in its token and is left there: {}", e.message);
        }
    }
}

/// Deletes imported material whose `ValidTo` has passed; the key becomes PendingImport if
/// its current material went (unless it is pending deletion, which stays).
fn expire_material(agent: &Agent, id: &KeyId) -> Result<Vec<ServiceEvent>, KmsError> {
    agent.mutate(|store| {
        let Some(key) = agent.key(id) else { return Ok((Vec::new(), Vec::new())) };
        let now = agent.now_ms();
        let mut record = (*key).clone();
        let mut events = Vec::new();
        for m in record.materials.values_mut() {
            if m.usable() && m.row.valid_to_ms.is_some_and(|v| v <= now) {
                m.clear();
                events.push(event(agent, "DeleteExpiredKeyMaterial", id, Some(m.row.material_id.clone())));
            }
        }
        if events.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if !record.current().is_ok_and(Material::usable) && !record.row.state.is_pending_deletion() {
            record.row.state = KeyState::PendingImport;
        }
        let changed: Vec<_> =
            record.materials.values().filter(|m| m.key.is_none() && m.row.imported).map(|m| &m.row).collect();
        store.update_key_and_materials(&record.row, &changed)?;
        // The freed pages held the wrapped material: leave nothing of it in the files.
        store.scrub()?;
        tracing::info!(key_id = %id, expired = events.len(), "imported key material expired and was deleted");
        Ok((events, vec![Change::Key(record)]))
    })
}

fn event(agent: &Agent, name: &'static str, key_id: &KeyId, material_id: Option<String>) -> ServiceEvent {
    ServiceEvent { name, key_id: *key_id, material_id, time_ms: agent.now_ms() }
}

/// The CloudTrail-shaped record of a service event (without `sequence` and `previousHash`,
/// which the writer adds). Its time is the system clock's, as every audit record's is.
pub fn audit_record(agent: &Agent, e: &ServiceEvent) -> Map<String, Value> {
    let arn = agent.key_arn(&e.key_id);
    let account = &agent.scope.account;
    let mut additional = json!({ "keyId": e.key_id.to_string() });
    if let Some(material) = &e.material_id {
        additional["keyMaterialId"] = json!(material);
    }
    let record = json!({
        "eventVersion": kmsfs_common::audit::EVENT_VERSION,
        "userIdentity": { "accountId": account, "invokedBy": "kms.amazonaws.com" },
        "eventTime": kmsfs_common::audit::event_time(kmsfs_common::time::now_millis()),
        "eventSource": "kms.amazonaws.com",
        "eventName": e.name,
        "awsRegion": agent.scope.region,
        "sourceIPAddress": "kms.amazonaws.com",
        "userAgent": "kms.amazonaws.com",
        "requestParameters": null,
        "responseElements": null,
        "additionalEventData": additional,
        "eventID": uuid::Uuid::new_v4().to_string(),
        "readOnly": false,
        "resources": [{ "accountId": account, "type": "AWS::KMS::Key", "ARN": arn }],
        "eventType": "AwsServiceEvent",
        "eventCategory": "Management",
        "recipientAccountId": account,
    });
    match record {
        Value::Object(o) => o,
        _ => Map::new(),
    }
}

/// Runs one pass on the blocking pool and records its events; returns whether every due
/// action succeeded.
pub async fn pass(agent: &Arc<Agent>, audit: Option<&Arc<AuditLog>>) -> bool {
    let worker = agent.clone();
    let Pass { events, failed } = match tokio::task::spawn_blocking(move || run_due(&worker)).await {
        Ok(pass) => pass,
        Err(e) => {
            tracing::error!("the scheduler's pass failed: {e}");
            return false;
        }
    };
    if let Some(audit) = audit {
        for e in &events {
            // The action is committed: a record that cannot be written is logged loudly
            // (the writer refuses further requests until it can write again).
            if let Err(err) = audit.append(audit_record(agent, e), false, true).await {
                tracing::error!(event = e.name, key_id = %e.key_id, "{}", err.message);
            }
        }
    }
    failed == 0
}

/// The scheduler's loop, after the first pass at start: sleeps until the next date falls
/// due (at most [`MAX_SLEEP`]), then runs a pass.
pub async fn run(agent: Arc<Agent>, audit: Option<Arc<AuditLog>>, mut succeeded: bool) {
    loop {
        let wait = next_due(&agent).map_or(MAX_SLEEP, |at| {
            Duration::from_millis((at - agent.now_ms()).clamp(0, MAX_SLEEP.as_millis() as i64) as u64)
        });
        // A failed action (still due, or a replica to synchronize) is retried after a while,
        // not in a loop.
        let (floor, wait) = match succeeded {
            true => (Duration::from_millis(200), wait),
            false => (RETRY_AFTER_FAILURE, wait.min(RETRY_AFTER_FAILURE)),
        };
        tokio::select! {
            () = tokio::time::sleep(wait.max(floor)) => {}
            // A replica could not be reached during a request: try it again soon.
            () = agent.wake_scheduler.notified() => tokio::time::sleep(floor).await,
        }
        succeeded = pass(&agent, audit.as_ref()).await;
    }
}
