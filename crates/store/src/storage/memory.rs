//! In-memory [`RaftBackend`]: for tests and single-process labs. Cloning shares the data, so a
//! node can be "restarted" on the same memory within one process.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BackendError, MetaKey, RaftBackend};

#[derive(Debug, Default)]
struct Inner {
    meta: HashMap<MetaKey, Vec<u8>>,
    log: BTreeMap<u64, Vec<u8>>,
}

/// Storage held in process memory; lost when the last clone is dropped.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than the panic itself; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftBackend for MemoryBackend {
    fn get_meta(&self, key: MetaKey) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self.lock().meta.get(&key).cloned())
    }

    fn put_meta(&self, key: MetaKey, value: Vec<u8>) -> Result<(), BackendError> {
        self.lock().meta.insert(key, value);
        Ok(())
    }

    fn append_entries(&self, entries: Vec<(u64, Vec<u8>)>) -> Result<(), BackendError> {
        self.lock().log.extend(entries);
        Ok(())
    }

    fn read_entries(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<Vec<(u64, Vec<u8>)>, BackendError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        Ok(self
            .lock()
            .log
            .range((start, end))
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn last_entry(&self) -> Result<Option<(u64, Vec<u8>)>, BackendError> {
        Ok(self
            .lock()
            .log
            .last_key_value()
            .map(|(k, v)| (*k, v.clone())))
    }

    fn remove_entries_from(&self, index: u64) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let _removed = inner.log.split_off(&index);
        Ok(())
    }

    fn remove_entries_through(&self, index: u64) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let kept = match index.checked_add(1) {
            Some(next) => inner.log.split_off(&next),
            None => BTreeMap::new(),
        };
        inner.log = kept;
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// `BTreeMap::range` panics on an empty or inverted range; callers may legitimately ask for
/// one (openraft reads `start..end` with `start == end`).
pub(super) fn range_is_empty(start: Bound<u64>, end: Bound<u64>) -> bool {
    let lo = match start {
        Bound::Included(s) => Some(s),
        Bound::Excluded(s) => s.checked_add(1),
        Bound::Unbounded => Some(0),
    };
    let Some(lo) = lo else { return true };
    match end {
        Bound::Included(e) => lo > e,
        Bound::Excluded(e) => lo >= e,
        Bound::Unbounded => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_ranges_do_not_panic() {
        let m = MemoryBackend::new();
        m.append_entries(vec![(1, vec![1]), (2, vec![2]), (3, vec![3])])
            .unwrap();
        assert!(
            m.read_entries(Bound::Included(2), Bound::Excluded(2))
                .unwrap()
                .is_empty()
        );
        assert!(
            m.read_entries(Bound::Included(3), Bound::Excluded(1))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            m.read_entries(Bound::Included(2), Bound::Unbounded)
                .unwrap()
                .len(),
            2
        );
        m.remove_entries_through(1).unwrap();
        m.remove_entries_from(3).unwrap();
        assert_eq!(
            m.read_entries(Bound::Unbounded, Bound::Unbounded).unwrap(),
            vec![(2, vec![2])]
        );
    }
}
