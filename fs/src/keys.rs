//! Data keys for the filesystem: a bounded cache of unwrapped keys, the agent calls that
//! fill it, and the watcher that empties it when the agent says a KMS key was disabled.
//!
//! Open files do not hold their data key: every read and write fetches it from the
//! cache, so dropping a KMS key's entries cuts off even files that are open. A miss asks
//! the agent to Decrypt the wrapped key, which fails while the KMS key is disabled.

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmsfs_common::client::{AgentClient, ClientError, KeyEventStream};
use lru::LruCache;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Counters shown by `kmsfs status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub capacity: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub revocations: u64,
}

struct Entry<V> {
    value: Arc<V>,
    /// Shared between the entries of one KMS key: a volume has one or a few.
    kms_key_arn: Arc<str>,
    inserted: Instant,
}

/// An LRU cache of unwrapped keys bounded by count and by age. Values are shared with
/// callers only for the duration of one operation; they are zeroized by their own `Drop`
/// once the cache and the last caller let go.
pub struct KeyCache<K: Hash + Eq, V> {
    entries: Mutex<LruCache<K, Entry<V>>>,
    arns: Mutex<Vec<Arc<str>>>,
    max_age: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    revocations: AtomicU64,
}

impl<K: Hash + Eq + Clone, V> KeyCache<K, V> {
    pub fn new(capacity: NonZeroUsize, max_age: Duration) -> KeyCache<K, V> {
        KeyCache {
            entries: Mutex::new(LruCache::new(capacity)),
            arns: Mutex::new(Vec::new()),
            max_age,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            revocations: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<K, Entry<V>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached value for `key`, unless absent or older than the age bound.
    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        let mut entries = self.lock();
        let fresh = match entries.get(key) {
            Some(entry) if entry.inserted.elapsed() <= self.max_age => Some(entry.value.clone()),
            Some(_) => {
                entries.pop(key);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => None,
        };
        let counter = if fresh.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        fresh
    }

    /// Caches `value`, unwrapped by the KMS key `kms_key_arn`.
    pub fn insert(&self, key: K, kms_key_arn: &str, value: Arc<V>) {
        let kms_key_arn = {
            let mut arns = self.arns.lock().unwrap_or_else(|p| p.into_inner());
            match arns.iter().find(|a| ***a == *kms_key_arn) {
                Some(shared) => shared.clone(),
                None => {
                    let shared: Arc<str> = Arc::from(kms_key_arn);
                    arns.push(shared.clone());
                    shared
                }
            }
        };
        let entry = Entry { value, kms_key_arn, inserted: Instant::now() };
        if let Some((evicted, _)) = self.lock().push(key.clone(), entry) {
            if evicted != key {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Drops every value unwrapped by `kms_key_arn`; returns how many.
    pub fn revoke(&self, kms_key_arn: &str) -> usize {
        let mut entries = self.lock();
        let doomed: Vec<K> =
            entries.iter().filter(|(_, e)| *e.kms_key_arn == *kms_key_arn).map(|(k, _)| k.clone()).collect();
        for k in &doomed {
            entries.pop(k);
        }
        self.revocations.fetch_add(doomed.len() as u64, Ordering::Relaxed);
        doomed.len()
    }

    /// Drops everything.
    pub fn clear(&self) {
        let mut entries = self.lock();
        self.revocations.fetch_add(entries.len() as u64, Ordering::Relaxed);
        entries.clear();
    }

    pub fn stats(&self) -> CacheStats {
        let entries = self.lock();
        CacheStats {
            entries: entries.len(),
            capacity: entries.cap().get(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            revocations: self.revocations.load(Ordering::Relaxed),
        }
    }
}

/// Connections to the agent, opened on demand and reused. A connection that fails is
/// dropped, so a restarted agent is reached again by the next call.
pub struct AgentPool {
    socket: PathBuf,
    idle: Mutex<Vec<AgentClient>>,
}

impl AgentPool {
    pub fn new(socket: &Path) -> AgentPool {
        AgentPool { socket: socket.to_path_buf(), idle: Mutex::new(Vec::new()) }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Calls `action` on a pooled connection.
    pub fn call(&self, action: &str, request: &Value) -> Result<Value, ClientError> {
        self.with_client(|client| client.call(action, request))
    }

    /// Calls `action`, whose answer carries secrets, on a pooled connection
    /// ([`AgentClient::call_secret`]).
    pub fn call_secret<T: DeserializeOwned>(&self, action: &str, request: &Value) -> Result<T, ClientError> {
        self.with_client(|client| client.call_secret(action, request))
    }

    /// Runs `exchange` on an idle connection (or a new one), and keeps the connection for
    /// the next call unless it failed.
    fn with_client<T>(
        &self,
        exchange: impl FnOnce(&mut AgentClient) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut client = match pooled {
            Some(c) => c,
            None => AgentClient::connect(&self.socket)?,
        };
        let result = exchange(&mut client);
        if !matches!(result, Err(ClientError::Io(_) | ClientError::Connect { .. } | ClientError::Protocol(_))) {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(client);
        }
        result
    }
}

/// Follows the agent's key events for as long as the process lives, calling `revoke`
/// with a KMS key ARN whenever that key stops being usable, and `revoke_all` whenever
/// events may have been missed (the stream lagged, or it was lost and is back).
///
/// Losing the stream because the agent went away revokes nothing by itself: while no
/// agent answers, no key can change state, and files whose keys are cached stay readable
/// (a stopped or restarting agent is no reason to cut users off). Whatever happened in
/// the meantime is unknown once the stream is back, so then every key is dropped. An
/// agent that answers but refuses the stream is not trusted to be quiet: keys go at once.
pub fn watch_key_events(
    socket: PathBuf,
    revoke: impl Fn(&str) + Send + 'static,
    revoke_all: impl Fn() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("kmsfs-key-events".into())
        .spawn(move || {
            let mut connected_once = false;
            loop {
                match KeyEventStream::subscribe(&socket, Some(Duration::from_secs(30))) {
                    Ok(mut stream) => {
                        if connected_once {
                            // Whatever happened while we were away is unknown.
                            revoke_all();
                        }
                        connected_once = true;
                        follow(&mut stream, &revoke, &revoke_all);
                        tracing::warn!("lost the agent's key event stream; reconnecting");
                    }
                    Err(e @ ClientError::Connect { .. }) => tracing::debug!("cannot subscribe to key events: {e}"),
                    Err(e) => {
                        tracing::warn!("cannot subscribe to key events: {e}; dropping every data key");
                        revoke_all();
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the key event thread: {e}"))
}

fn follow(stream: &mut KeyEventStream, revoke: &impl Fn(&str), revoke_all: &impl Fn()) {
    while let Ok(Some(event)) = stream.next_event() {
        match event["Event"].as_str() {
            Some("KeyStateChanged") if event["KeyState"] != "Enabled" => {
                if let Some(arn) = event["KeyArn"].as_str() {
                    tracing::info!(key = arn, state = %event["KeyState"], "KMS key no longer usable: dropping its data keys");
                    revoke(arn);
                }
            }
            Some("Lagged") => revoke_all(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(cap: usize, age: Duration) -> KeyCache<u32, String> {
        KeyCache::new(NonZeroUsize::new(cap).unwrap(), age)
    }

    #[test]
    fn bounded_by_count_least_recently_used_first() {
        let c = cache(2, Duration::from_secs(60));
        c.insert(1, "k", Arc::new("one".into()));
        c.insert(2, "k", Arc::new("two".into()));
        assert!(c.get(&1).is_some()); // 1 is now most recent
        c.insert(3, "k", Arc::new("three".into()));
        assert!(c.get(&2).is_none(), "2 was least recently used");
        assert!(c.get(&1).is_some() && c.get(&3).is_some());
        let s = c.stats();
        assert_eq!((s.entries, s.capacity, s.evictions), (2, 2, 1));
        assert_eq!((s.hits, s.misses), (3, 1));
    }

    #[test]
    fn bounded_by_age() {
        let c = cache(10, Duration::from_millis(30));
        c.insert(1, "k", Arc::new("one".into()));
        assert!(c.get(&1).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get(&1).is_none());
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn revocation_drops_only_that_kms_keys_entries() {
        let c = cache(10, Duration::from_secs(60));
        c.insert(1, "arn:a", Arc::new("a1".into()));
        c.insert(2, "arn:a", Arc::new("a2".into()));
        c.insert(3, "arn:b", Arc::new("b1".into()));
        assert_eq!(c.revoke("arn:a"), 2);
        assert!(c.get(&1).is_none() && c.get(&2).is_none());
        assert!(c.get(&3).is_some());
        c.clear();
        assert!(c.get(&3).is_none());
        assert_eq!(c.stats().revocations, 3);
    }
}
