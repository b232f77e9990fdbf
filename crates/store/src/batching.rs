//! Amortizing Raft round trips over concurrent callers: [`GroupCommit`] packs the commands
//! that queue up while earlier log entries are in flight into one entry, and [`Coalescer`]
//! lets reads that arrive while a leadership confirmation is in flight share the next one.
//!
//! Both are generic over the operation they drive so that their ordering rules are tested
//! without a Raft cluster.

use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Commands per log entry, at most.
pub(crate) const MAX_BATCH_COMMANDS: usize = 128;
/// Encoded bytes of the commands of one log entry, at most (a single larger command still
/// goes alone). With openraft's `max_payload_entries` this bounds an AppendEntries RPC.
pub(crate) const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Log entries of batched commands in flight at once. While they commit, new commands
/// queue and leave together in the next entry.
const MAX_IN_FLIGHT: usize = 2;
/// Commands waiting for a batch, at most; callers wait for room beyond that.
const QUEUE: usize = 4096;

/// Submits one batch of items and answers one result per item, in order, or one error for
/// the whole batch.
pub(crate) type SubmitFn<I, O, E> =
    Arc<dyn Fn(Vec<I>) -> BoxFuture<'static, Result<Vec<O>, E>> + Send + Sync>;

struct Pending<I, O, E> {
    item: I,
    bytes: usize,
    reply: oneshot::Sender<Result<O, E>>,
}

/// Handle of a group-commit task: items submitted concurrently travel in shared batches, in
/// submission order. The task ends when the last handle is dropped.
pub(crate) struct GroupCommit<I, O, E> {
    queue: mpsc::Sender<Pending<I, O, E>>,
}

impl<I, O, E> Clone for GroupCommit<I, O, E> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

/// Why an item got no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GroupCommitError<E> {
    /// The batch failed as a whole.
    Batch(E),
    /// The task is gone (the store is shutting down) or answered the wrong number of results.
    Stopped(String),
}

impl<I, O, E> GroupCommit<I, O, E>
where
    I: Send + 'static,
    O: Send + 'static,
    E: Clone + Send + 'static,
{
    /// Starts the task that calls `submit` with each batch.
    pub(crate) fn start(submit: SubmitFn<I, O, E>) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(run_group_commit(submit, pending));
        Self { queue }
    }

    /// Submits `item` (about `bytes` big once encoded) and waits for its result.
    pub(crate) async fn submit(&self, item: I, bytes: usize) -> Result<O, GroupCommitError<E>> {
        let (reply, result) = oneshot::channel();
        self.queue
            .send(Pending { item, bytes, reply })
            .await
            .map_err(|_| GroupCommitError::Stopped("group commit stopped".into()))?;
        match result.await {
            Ok(r) => r.map_err(GroupCommitError::Batch),
            Err(_) => Err(GroupCommitError::Stopped(
                "batch dropped without a result".into(),
            )),
        }
    }
}

async fn run_group_commit<I, O, E>(
    submit: SubmitFn<I, O, E>,
    mut pending: mpsc::Receiver<Pending<I, O, E>>,
) where
    I: Send + 'static,
    O: Send + 'static,
    E: Clone + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = pending.recv().await {
        // Wait for a slot before draining, so that everything that arrives meanwhile joins.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match pending.try_recv() {
                Ok(next) => {
                    bytes += next.bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<I>, Vec<_>) =
            batch.into_iter().map(|p| (p.item, p.reply)).unzip();
        // Batches in flight together hold commands of concurrent callers only (a caller waits
        // for its result before it submits again), so their relative order in the log is free.
        let write = submit(items);
        tokio::spawn(async move {
            let result = write.await;
            drop(slot);
            match result {
                Ok(outcomes) if outcomes.len() == replies.len() => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                // A wrong count drops the replies: callers see `Stopped`.
                Ok(_) => {}
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Coalesces concurrent calls of one operation: a call waits for a run that started after it
/// was made and shares that run's result. Calls made while a run is in flight share the next
/// run, which starts as soon as the current one ends.
pub(crate) struct Coalescer<T> {
    state: Arc<Mutex<CoalescerState<T>>>,
}

impl<T> Clone for Coalescer<T> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
        }
    }
}

struct CoalescerState<T> {
    running: bool,
    waiting: Vec<oneshot::Sender<T>>,
}

impl<T: Clone + Send + 'static> Coalescer<T> {
    pub(crate) fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(CoalescerState {
                running: false,
                waiting: Vec::new(),
            })),
        }
    }

    /// Joins the next run of `op` (starting it if none is in flight). `None` if the run was
    /// dropped (runtime shutting down).
    pub(crate) async fn call<F, Fut>(&self, op: F) -> Option<T>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = self.state.lock().expect("coalescer poisoned");
            state.waiting.push(tx);
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            let state = self.state.clone();
            tokio::spawn(async move {
                loop {
                    let waiters = {
                        let mut s = state.lock().expect("coalescer poisoned");
                        if s.waiting.is_empty() {
                            s.running = false;
                            return;
                        }
                        std::mem::take(&mut s.waiting)
                    };
                    let result = op().await;
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            });
        }
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_items_share_batches_and_keep_their_results() {
        let batches = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let seen = batches.clone();
        let submit: SubmitFn<u32, u32, String> = Arc::new(move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.clone());
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(items.iter().map(|i| i * 10).collect())
            })
        });
        let gc = GroupCommit::start(submit);
        let calls: Vec<_> = (0..50u32)
            .map(|i| {
                let gc = gc.clone();
                tokio::spawn(async move { (i, gc.submit(i, 100).await) })
            })
            .collect();
        for call in calls {
            let (i, r) = call.await.unwrap();
            assert_eq!(r, Ok(i * 10));
        }
        let batches = batches.lock().unwrap();
        let total: usize = batches.iter().map(Vec::len).sum();
        assert_eq!(total, 50);
        assert!(
            batches.len() < 50,
            "50 concurrent items went in {} batches",
            batches.len()
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_items_and_the_next_batch_still_runs() {
        let fail_next = Arc::new(AtomicUsize::new(1));
        let f = fail_next.clone();
        let submit: SubmitFn<u32, u32, String> = Arc::new(move |items: Vec<u32>| {
            let fail = f.fetch_sub(1, Ordering::SeqCst) == 1;
            Box::pin(async move {
                if fail {
                    Err("no leader".to_string())
                } else {
                    Ok(items)
                }
            })
        });
        let gc = GroupCommit::start(submit);
        assert_eq!(
            gc.submit(1, 1).await,
            Err(GroupCommitError::Batch("no leader".into()))
        );
        assert_eq!(gc.submit(2, 1).await, Ok(2));
    }

    #[tokio::test]
    async fn a_batch_with_the_wrong_number_of_results_answers_stopped() {
        let submit: SubmitFn<u32, u32, String> =
            Arc::new(|_items: Vec<u32>| Box::pin(async { Ok(Vec::new()) }));
        let gc = GroupCommit::start(submit);
        assert!(matches!(
            gc.submit(1, 1).await,
            Err(GroupCommitError::Stopped(_))
        ));
    }

    #[tokio::test]
    async fn a_call_never_shares_a_run_that_started_before_it() {
        let runs = Arc::new(AtomicUsize::new(0));
        let c = Coalescer::new();
        let op = {
            let runs = runs.clone();
            move || {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    n
                }
            }
        };
        let first = tokio::spawn({
            let (c, op) = (c.clone(), op.clone());
            async move { c.call(op).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Run 1 is in flight: these two must share run 2.
        let late: Vec<_> = (0..2)
            .map(|_| {
                let (c, op) = (c.clone(), op.clone());
                tokio::spawn(async move { c.call(op).await })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Some(1));
        for l in late {
            assert_eq!(l.await.unwrap(), Some(2));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // Idle again: a new call starts a new run.
        assert_eq!(c.call(op).await, Some(3));
    }
}
