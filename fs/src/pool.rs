//! Data keys made ahead of need. Every new file gets its own data key from the agent, and
//! with the agent's audit trail synced before each reply that round trip is most of what
//! creating a small file costs. The pool keeps keys generated in the background, so that a
//! creation takes one at once and the agent's work overlaps the filesystem's; and it asks
//! for them in batches (`Kmsfs.GenerateDataKeys`, up to [`BATCH`] files' keys in one
//! request), so that the agent's request handling, audit record and audit sync are paid
//! once per batch rather than once per file.
//!
//! - Demand-driven: an idle mount asks for nothing. The first creation finds the pool empty
//!   (a miss), generates its own key as before, and asks the pool to hold some; each later
//!   miss doubles how many, up to [`MAX_TARGET`]. After [`IDLE`] without a creation the
//!   workers stop refilling.
//! - Each key is generated for its own file ID, chosen beforehand, since the encryption
//!   context names it: a pooled key is usable for exactly one file.
//! - Revocation: [`KeyPool::clear`] (the KMS key was disabled, or key events may have been
//!   missed) drops every pooled key, and the results of generations already in flight are
//!   dropped when they arrive. A generation that fails (a disabled key, an unreachable
//!   agent) stops the refilling until the next miss, which reports the failure to its caller.
//! - Freshness: a key older than [`MAX_AGE`] is discarded, never used.
//! - The audit trail records each batch when it is made, naming every file ID in it; keys
//!   still in the pool at unmount are never used (at most [`MAX_TARGET`] of them).
//!
//! Keys are zeroized when dropped, like those of the data-key cache.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kmsfs_common::format::block::FileId;
use kmsfs_common::format::header::DataKey;

use crate::volume::VolError;

/// How many keys the pool holds after its first miss.
pub const MIN_TARGET: usize = 16;
/// The most keys the pool holds.
pub const MAX_TARGET: usize = 256;
/// Pooled keys older than this are discarded.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// Without a creation for this long, the workers stop refilling.
pub const IDLE: Duration = Duration::from_secs(60);
/// The most keys asked for in one request.
pub const BATCH: usize = 64;
/// Batches in flight at once: two, so that one is made while the other's answer is read.
pub const WORKERS: usize = 2;

/// A data key just generated for the file `file_id`.
pub struct FreshKey {
    pub file_id: FileId,
    pub data: DataKey,
    /// The data key wrapped by the KMS key, for the file's header.
    pub wrapped: Vec<u8>,
    /// The KMS key that wrapped it.
    pub kms_key_arn: String,
    /// Which of the volume's KMS keys it was asked for: the volume counts its moves to
    /// another key ([`crate::volume::Volume::reload`]), and a key made before the latest is
    /// not used.
    pub generation: u64,
    made: Instant,
}

impl FreshKey {
    pub fn new(file_id: FileId, data: DataKey, wrapped: Vec<u8>, kms_key_arn: String) -> FreshKey {
        FreshKey { file_id, data, wrapped, kms_key_arn, generation: 0, made: Instant::now() }
    }

    pub fn with_generation(mut self, generation: u64) -> FreshKey {
        self.generation = generation;
        self
    }
}

/// Makes data keys, each for a new file ID: `Kmsfs.GenerateDataKeys` for that many.
pub type Generate = dyn Fn(usize) -> Result<Vec<FreshKey>, VolError> + Send + Sync;

/// Counters shown by `kmsfs status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub ready: usize,
    pub target: usize,
    pub hits: u64,
    pub misses: u64,
    pub discarded: u64,
}

struct State {
    ready: VecDeque<FreshKey>,
    target: usize,
    in_flight: usize,
    /// Bumped by every `clear`: generations started before it are dropped on arrival.
    epoch: u64,
    last_demand: Instant,
    workers_started: bool,
    closed: bool,
    hits: u64,
    misses: u64,
    discarded: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    generate: Box<Generate>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct KeyPool {
    shared: Arc<Shared>,
    workers: usize,
}

impl KeyPool {
    /// A pool filled by `workers` threads calling `generate`; they start at the first miss.
    pub fn new(generate: Box<Generate>, workers: usize) -> KeyPool {
        let state = State {
            ready: VecDeque::new(),
            target: 0,
            in_flight: 0,
            epoch: 0,
            last_demand: Instant::now(),
            workers_started: false,
            closed: false,
            hits: 0,
            misses: 0,
            discarded: 0,
        };
        KeyPool { shared: Arc::new(Shared { state: Mutex::new(state), wake: Condvar::new(), generate }), workers }
    }

    /// A key for a new file: a pooled one, or one generated now.
    pub fn take(&self) -> Result<FreshKey, VolError> {
        {
            let mut state = self.shared.lock();
            state.last_demand = Instant::now();
            discard_stale(&mut state);
            if let Some(key) = state.ready.pop_front() {
                state.hits += 1;
                let due = next_batch(&state).is_some();
                drop(state);
                if due {
                    self.shared.wake.notify_all();
                }
                return Ok(key);
            }
            state.misses += 1;
            state.target = (state.target * 2).clamp(MIN_TARGET, MAX_TARGET);
            if !state.workers_started && self.workers > 0 {
                state.workers_started = true;
                self.start_workers();
            }
        }
        self.shared.wake.notify_all();
        let mut keys = (self.shared.generate)(1)?;
        keys.pop().ok_or_else(|| VolError::Io(std::io::Error::other("the agent made no data key")))
    }

    /// Drops every pooled key, and those being generated, and stops refilling until the
    /// next miss: the KMS key may no longer be used.
    pub fn clear(&self) {
        let mut state = self.shared.lock();
        let dropped = state.ready.len() as u64;
        state.ready.clear();
        state.discarded += dropped;
        state.epoch += 1;
        state.target = 0;
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.shared.lock();
        PoolStats {
            ready: state.ready.len(),
            target: state.target,
            hits: state.hits,
            misses: state.misses,
            discarded: state.discarded,
        }
    }

    fn start_workers(&self) {
        for i in 0..self.workers {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new().name(format!("kmsfs-keypool-{i}")).spawn(move || refill(&shared));
            if let Err(e) = spawned {
                // Creations still work, each waiting for its own key.
                tracing::warn!("cannot start a key pool worker: {e}");
            }
        }
    }
}

impl Drop for KeyPool {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        state.ready.clear();
        drop(state);
        self.shared.wake.notify_all();
    }
}

fn discard_stale(state: &mut State) {
    while state.ready.front().is_some_and(|k| k.made.elapsed() > MAX_AGE) {
        state.ready.pop_front();
        state.discarded += 1;
    }
}

/// How many keys to ask for now, if a batch is due: only once a full batch (or half the
/// target, while it is small) is missing, so that every request brings many keys.
fn next_batch(state: &State) -> Option<usize> {
    let missing = state.target.saturating_sub(state.ready.len() + state.in_flight);
    (missing > 0 && missing >= BATCH.min(state.target / 2)).then(|| missing.min(BATCH))
}

/// One worker: generates keys, a batch at a time, while the pool holds fewer than its target.
fn refill(shared: &Shared) {
    loop {
        let (epoch, count) = {
            let mut state = shared.lock();
            loop {
                if state.closed {
                    return;
                }
                discard_stale(&mut state);
                if let Some(count) = next_batch(&state).filter(|_| state.last_demand.elapsed() < IDLE) {
                    state.in_flight += count;
                    break (state.epoch, count);
                }
                state = match shared.wake.wait_timeout(state, Duration::from_secs(10)) {
                    Ok((state, _)) => state,
                    Err(p) => p.into_inner().0,
                };
            }
        };
        let result = (shared.generate)(count);
        let mut state = shared.lock();
        state.in_flight -= count;
        match result {
            Ok(keys) if state.epoch == epoch && !state.closed => state.ready.extend(keys),
            // Cleared meanwhile: the keys may belong to a disabled KMS key.
            Ok(keys) => state.discarded += keys.len() as u64,
            Err(e) => {
                if state.target > 0 {
                    tracing::warn!(
                        "cannot generate data keys ahead of need: {e}; new files will ask the agent themselves"
                    );
                }
                state.target = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// A pool whose "agent" counts its calls and can be told to refuse.
    fn pool(workers: usize) -> (KeyPool, Arc<AtomicU64>, Arc<AtomicBool>) {
        let calls = Arc::new(AtomicU64::new(0));
        let refuse = Arc::new(AtomicBool::new(false));
        let (c, r) = (calls.clone(), refuse.clone());
        let generate = Box::new(move |count| {
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            if r.load(Ordering::SeqCst) {
                return Err(VolError::Io(std::io::Error::other("refused")));
            }
            Ok((0..count)
                .map(|_| FreshKey::new(FileId::random(), DataKey::random(), vec![1, 2, 3], "arn:k".into()))
                .collect())
        });
        (KeyPool::new(generate, workers), calls, refuse)
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn idle_until_the_first_miss_then_filled_and_served() {
        let (pool, calls, _) = pool(2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), 0, "an idle pool asks for nothing");
        pool.take().unwrap();
        wait_until("the pool holds its target", || pool.stats().ready == MIN_TARGET);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the miss's own key, then the target in one batch");
        let ids: std::collections::HashSet<_> = (0..MIN_TARGET).map(|_| pool.take().unwrap().file_id).collect();
        assert_eq!(ids.len(), MIN_TARGET, "every key is for its own file");
        let s = pool.stats();
        assert_eq!((s.hits, s.misses), (MIN_TARGET as u64, 1));
    }

    #[test]
    fn misses_grow_the_target_up_to_its_bound() {
        let (pool, _, _) = pool(0); // no workers: every take misses
        for _ in 0..20 {
            pool.take().unwrap();
        }
        assert_eq!(pool.stats().target, MAX_TARGET);
    }

    #[test]
    fn clearing_drops_pooled_keys_and_stops_refilling() {
        let (pool, calls, refuse) = pool(2);
        pool.take().unwrap();
        wait_until("the pool is filled", || pool.stats().ready == MIN_TARGET);
        pool.clear();
        let s = pool.stats();
        assert_eq!((s.ready, s.target), (0, 0));
        assert!(s.discarded >= MIN_TARGET as u64);
        let before = calls.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert!(calls.load(Ordering::SeqCst) <= before + 2, "refilling went on after clear");

        // A refusing agent: the miss reports it, and the workers give up until the next one.
        refuse.store(true, Ordering::SeqCst);
        assert!(pool.take().is_err());
        wait_until("the workers give up", || pool.stats().target == 0);
        assert_eq!(pool.stats().ready, 0);
        refuse.store(false, Ordering::SeqCst);
        pool.take().unwrap();
        wait_until("refilling resumes after the next miss", || pool.stats().ready > 0);
    }
}
