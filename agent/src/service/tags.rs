//! Tags: TagResource, UntagResource and ListResourceTags, and the tag rules CreateKey
//! shares (no `aws:` prefix, no duplicate keys in one request, at most 50 per key).

use std::collections::BTreeMap;

use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::wire::{paginate, parse, with_page_info};
use crate::agent::{Agent, Change};
use crate::policy::eval::Caller;
use crate::store::KeyState;

/// AWS's quota of tags per KMS key.
pub const MAX_TAGS_PER_KEY: usize = 50;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Tag {
    tag_key: String,
    tag_value: String,
}

/// Checks `tags` against the rules and the quota given the key's `existing` tags, and
/// returns them as a map.
pub fn validate_new_tags(
    existing: &BTreeMap<String, String>,
    tags: Vec<Tag>,
) -> Result<BTreeMap<String, String>, KmsError> {
    let mut out = BTreeMap::new();
    for tag in tags {
        if tag.tag_key.to_ascii_lowercase().starts_with("aws:") {
            return Err(KmsError::new(
                ErrorKind::TagException,
                format!("Tag key '{}' uses the reserved prefix 'aws:'", tag.tag_key),
            ));
        }
        if out.insert(tag.tag_key.clone(), tag.tag_value).is_some() {
            return Err(KmsError::new(ErrorKind::TagException, format!("Duplicate tag key '{}'", tag.tag_key)));
        }
    }
    let total = existing.len() + out.keys().filter(|k| !existing.contains_key(*k)).count();
    if total > MAX_TAGS_PER_KEY {
        return Err(KmsError::new(
            ErrorKind::LimitExceededException,
            format!("A KMS key can have at most {MAX_TAGS_PER_KEY} tags; this request would give it {total}"),
        ));
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TagResourceRequest {
    key_id: String,
    tags: Vec<Tag>,
}

fn not_pending(agent: &Agent, state: KeyState, id: &kmsfs_common::ids::KeyId) -> Result<(), KmsError> {
    if state.is_pending_deletion() {
        return Err(KmsError::invalid_state(format!("{} is pending deletion.", agent.key_arn(id))));
    }
    Ok(())
}

pub fn tag_resource(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: TagResourceRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "TagResource", &key, |c| c)?;
    let id = key.row.id;
    agent.mutate(|store| {
        let current = agent.key(&id).ok_or_else(|| KmsError::not_found("Key does not exist"))?;
        not_pending(agent, current.row.state, &id)?;
        let tags = validate_new_tags(&current.tags, req.tags)?;
        store.put_tags(&id, &tags)?;
        let mut record = (*current).clone();
        record.tags.extend(tags);
        Ok(((), vec![Change::Key(record)]))
    })?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UntagResourceRequest {
    key_id: String,
    tag_keys: Vec<String>,
}

pub fn untag_resource(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: UntagResourceRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "UntagResource", &key, |c| c)?;
    let id = key.row.id;
    agent.mutate(|store| {
        let current = agent.key(&id).ok_or_else(|| KmsError::not_found("Key does not exist"))?;
        not_pending(agent, current.row.state, &id)?;
        store.delete_tags(&id, &req.tag_keys)?;
        let mut record = (*current).clone();
        for k in &req.tag_keys {
            record.tags.remove(k);
        }
        Ok(((), vec![Change::Key(record)]))
    })?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListResourceTagsRequest {
    key_id: String,
    limit: Option<i64>,
    marker: Option<String>,
}

pub fn list_resource_tags(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ListResourceTagsRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "ListResourceTags", &key, |c| c)?;
    let tags: Vec<(String, String)> = key.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let (page, next) = paginate(tags, |(k, _)| k.clone(), req.limit, 50, 50, req.marker.as_deref())?;
    let tags: Vec<Value> = page.into_iter().map(|(k, v)| json!({ "TagKey": k, "TagValue": v })).collect();
    Ok(with_page_info(json!({ "Tags": tags }), next))
}
