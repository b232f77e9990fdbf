//! Membership changes under load, and snapshot + purge + catch-up of a new learner.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Cluster, WAIT, cmd, has};
use tandem_store::{MembershipError, NodeId, ProposeError, SiteStore};
use tokio::time::Instant;

type Stores = Arc<Mutex<BTreeMap<NodeId, SiteStore>>>;

/// Proposes `cmd(i)` for i = 1000, 1001, ... until stopped, following redirects through
/// whatever nodes are in `stores`; returns the acknowledged indices.
async fn writer(stores: Stores, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<u64>>>) {
    let mut i = 1000;
    let mut target: Option<NodeId> = None;
    while !stop.load(Ordering::SeqCst) {
        let store = {
            let stores = stores.lock().expect("stores");
            let id = target
                .filter(|t| stores.contains_key(t))
                .or_else(|| stores.keys().next().copied());
            id.and_then(|id| stores.get(&id).cloned())
        };
        let Some(store) = store else { break };
        match store.propose(cmd(i)).await {
            Ok(outcome) => {
                outcome.expect("applied");
                acked.lock().expect("acked").push(i);
                i += 1;
            }
            Err(ProposeError::ForwardToLeader { leader_id, .. }) => target = Some(leader_id),
            Err(ProposeError::Timeout(_)) => {
                // Unknown outcome: never reuse this command.
                i += 1;
                target = None;
            }
            Err(_) => {
                target = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn wait_for_progress(acked: &Arc<Mutex<Vec<u64>>>, more: usize) {
    let start = acked.lock().expect("acked").len();
    let deadline = Instant::now() + WAIT;
    while acked.lock().expect("acked").len() < start + more {
        assert!(Instant::now() < deadline, "writes stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a membership call on the current leader, following redirects.
async fn on_leader<F, Fut>(c: &Cluster, f: F)
where
    F: Fn(SiteStore) -> Fut,
    Fut: Future<Output = Result<(), MembershipError>>,
{
    let deadline = Instant::now() + WAIT;
    let mut target = *c.nodes.keys().next().expect("a node");
    loop {
        match f(c.node(target).clone()).await {
            Ok(()) => return,
            Err(MembershipError::ForwardToLeader { leader_id, .. }) => target = leader_id,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "membership change retried");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("membership change failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_from_one_to_three_and_shrink_back_to_one_while_writing() {
    let mut c = Cluster::start(1, true).await;
    let stores: Stores = Arc::new(Mutex::new(BTreeMap::from([(1, c.node(1).clone())])));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writes = tokio::spawn(writer(stores.clone(), stop.clone(), acked.clone()));
    wait_for_progress(&acked, 5).await;

    // Grow: two learners catch up, then all three become voters.
    for id in [2, 3] {
        let info = c.add_node(id).await;
        stores
            .lock()
            .expect("stores")
            .insert(id, c.node(id).clone());
        on_leader(&c, |s| {
            let info = info.clone();
            async move { s.add_learner(id, info, true).await }
        })
        .await;
        wait_for_progress(&acked, 5).await;
    }
    on_leader(&c, |s| async move {
        s.change_membership(BTreeSet::from([1, 2, 3]), false).await
    })
    .await;
    wait_for_progress(&acked, 5).await;
    let m = c.node(1).metrics();
    assert_eq!(m.voters, BTreeSet::from([1, 2, 3]));
    assert!(m.learners.is_empty());

    // Shrink to node 3 alone: node 1 (the leader so far) hands over.
    on_leader(&c, |s| async move {
        s.change_membership(BTreeSet::from([3]), false).await
    })
    .await;
    let leader = c.wait_leader(&[3]).await;
    assert_eq!(leader, 3);
    stores.lock().expect("stores").retain(|id, _| *id == 3);
    wait_for_progress(&acked, 5).await;
    let m = c.node(3).metrics();
    assert_eq!(m.voters, BTreeSet::from([3]));
    assert_eq!(m.nodes.keys().copied().collect::<Vec<_>>(), vec![3]);

    stop.store(true, Ordering::SeqCst);
    writes.await.expect("writer");
    for id in [1, 2] {
        c.stop_node(id).await;
    }
    let dump = c.wait_converged(&[3]).await;
    let acked = acked.lock().expect("acked").clone();
    assert!(acked.len() >= 25);
    for i in acked {
        assert!(has(&dump, i), "acknowledged write {i} lost");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_purge_then_a_new_learner_catches_up_from_the_snapshot() {
    let mut c = Cluster::start_tuned(3, true, |config| {
        config.snapshot_logs_since_last = 40;
        config.max_in_snapshot_log_to_keep = 0;
    })
    .await;
    for i in 0..100 {
        c.put(i).await;
    }
    let leader = c.wait_leader(&c.ids()).await;
    // The purge follows the slowest follower (a log entry goes only once every node has
    // it), so on a loaded machine it may come in steps: wait for the one past 40.
    c.node(leader)
        .wait_for(WAIT, "snapshot and purge", |m| {
            m.snapshot_index.is_some() && m.purged_index >= Some(40)
        })
        .await
        .expect("leader snapshots and purges");
    // A manual snapshot covers everything applied so far.
    let index = c.node(leader).snapshot().await.expect("snapshot");
    assert!(index >= 100);
    // Compaction: the log below the snapshot is gone, so the log stays short.
    let m = c
        .node(leader)
        .wait_for(WAIT, "log purged up to the snapshot", |m| {
            m.purged_index >= Some(index)
        })
        .await
        .expect("purged");
    let kept = m.last_log_index.unwrap_or(0) - m.purged_index.unwrap_or(0);
    assert!(kept <= 5, "log not compacted: {m:?}");

    // Node 4 joins after the log it would need is gone: it must install the snapshot.
    let info = c.add_node(4).await;
    c.node(leader)
        .add_learner(4, info, true)
        .await
        .expect("learner added");
    c.put(100).await;
    let dump = c.wait_converged(&c.ids()).await;
    assert!((0..=100).all(|i| has(&dump, i)));
    let m4 = c.node(4).metrics();
    assert!(
        m4.snapshot_index >= Some(index),
        "node 4 installed the leader's snapshot: {m4:?}"
    );
    assert!(m4.learners.contains(&4));

    // Restarting the learner restores it from its snapshot plus the log after it.
    let config = c.stop_node(4).await;
    c.restart_node(config).await;
    c.put(101).await;
    let dump = c.wait_converged(&c.ids()).await;
    assert!((0..=101).all(|i| has(&dump, i)));
    c.shutdown().await;
}
