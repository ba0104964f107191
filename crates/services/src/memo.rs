//! Two kinds of per-process memory that spare the hot paths a read
//! (every instance is listed in docs/operations.md):
//! - [`PositionedMemo`]: a value read from the store, kept with the stream
//!   position it holds at, and valid while the stream record shows no
//!   position since that could change it (so it is never stale, on any
//!   number of processes);
//! - [`Throttle`]: "looked at this less than so long ago", for checks
//!   that may be a second late.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;

use weft_store::{Store, StreamKey};

/// Entries a memo holds at most; past that it starts again empty (a bound
/// on memory, not an eviction policy: a miss only costs a read).
const MAX_ENTRIES: usize = 100_000;

/// Values keyed by `K`, each with the position it was read at.
pub(crate) struct PositionedMemo<K, V> {
    entries: parking_lot::Mutex<HashMap<K, (i64, V)>>,
}

impl<K, V> Default for PositionedMemo<K, V> {
    fn default() -> Self {
        Self {
            entries: Default::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> PositionedMemo<K, V> {
    /// The value for `key`: from memory when no position since it was
    /// read matches `changes` (a key of the stream that could change it),
    /// else from `read`, remembered with the position read at.
    pub(crate) async fn get_or_read<Fut>(
        &self,
        store: &dyn Store,
        key: &K,
        mut changes: impl FnMut(&StreamKey) -> bool,
        read: impl FnOnce() -> Fut,
    ) -> weft_core::Result<V>
    where
        Fut: Future<Output = weft_core::Result<V>>,
    {
        let memo = self.entries.lock().get(key).cloned();
        if let Some((checked, value)) = memo {
            let now = store.current_position();
            if store.any_change(checked, now, &mut changes) == Some(false) {
                // Still true at `now`: the next look starts there.
                if let Some(entry) = self.entries.lock().get_mut(key)
                    && entry.0 == checked
                {
                    entry.0 = now;
                }
                return Ok(value);
            }
        }
        // Positions up to this one are committed: a change written after
        // it shows in the stream record at the next look.
        let read_at = store.current_position();
        let value = read().await?;
        let mut entries = self.entries.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key.clone(), (read_at, value.clone()));
        Ok(value)
    }
}

/// When each key was last looked at, and with what (`T`: a look with
/// something else is not the same look).
pub(crate) struct Throttle<T> {
    seen: parking_lot::Mutex<HashMap<String, (u64, T)>>,
}

impl<T> Default for Throttle<T> {
    fn default() -> Self {
        Self {
            seen: Default::default(),
        }
    }
}

impl<T: PartialEq> Throttle<T> {
    /// Whether `key` was looked at with `with` less than `within` ms
    /// before `now`; if not, notes that it is looked at now.
    pub(crate) fn seen_lately(&self, key: &str, with: T, now: u64, within: u64) -> bool {
        let mut seen = self.seen.lock();
        if let Some((at, how)) = seen.get(key)
            && *how == with
            && now.saturating_sub(*at) < within
        {
            return true;
        }
        if seen.len() >= MAX_ENTRIES {
            seen.clear();
        }
        seen.insert(key.to_owned(), (now, with));
        false
    }

    /// Forgets `key`: its next look is not skipped.
    pub(crate) fn forget(&self, key: &str) {
        self.seen.lock().remove(key);
    }
}
