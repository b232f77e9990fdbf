//! Per-volume range locks: writes to overlapping ranges of one volume are applied to the
//! image and entered into the replication buffer one at a time, so that the journal sees
//! overlapping writes in the same order as the source image. Writes to disjoint ranges
//! proceed in parallel.

use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

/// The ranges of one volume currently being written.
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: Mutex<u64>,
    released: Notify,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Waits until `[offset, offset + len)` overlaps no held range, then holds it.
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let end = offset.saturating_add(len.max(1));
        let id = {
            let mut n = self.next_id.lock().unwrap_or_else(PoisonError::into_inner);
            *n += 1;
            *n
        };
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            {
                let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                if !held.iter().any(|&(s, e, _)| s < end && offset < e) {
                    held.push((offset, end, id));
                    return RangeGuard { locks: self, id };
                }
                // Registered before the lock is released, so no release is missed.
                notified.as_mut().enable();
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.retain(|&(_, _, id)| id != self.id);
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0, 100).await;
        // Disjoint: granted at once.
        let b = locks.lock(100, 100).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(50, 10).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "overlapping range must wait");
        drop(b);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "still overlaps the first range");
        drop(a);
        waiter.await.expect("granted after release");
    }
}
