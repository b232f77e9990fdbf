//! Three-node clusters on loopback: election, replication, linearizable reads, restarts.

mod common;

use common::{Cluster, cmd, has};
use tandem_store::{ProposeError, ReadError, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_and_converge() {
    let c = Cluster::start(3, false).await;
    let leader = c.wait_leader(&c.ids()).await;
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");

    // Proposals through the leader and, after a redirect, through a follower.
    for i in 0..20 {
        c.put(i).await;
    }
    match c.node(follower).propose(cmd(100)).await {
        Err(ProposeError::ForwardToLeader {
            leader_id,
            leader: info,
        }) => {
            assert_eq!(leader_id, leader);
            assert_eq!(info, c.node(leader).node_info());
        }
        other => panic!("follower must redirect, got {other:?}"),
    }
    c.propose_via(follower, cmd(100))
        .await
        .expect("committed")
        .expect("applied");

    // A domain error is a replicated outcome, not a failure.
    let dup = c.propose_via(leader, cmd(100)).await.expect("committed");
    assert!(dup.is_err(), "creating an existing host is a domain error");

    let dump = c.wait_converged(&c.ids()).await;
    assert!((0..20).all(|i| has(&dump, i)) && has(&dump, 100));
    assert_eq!(dump.state.hosts.len(), 21);

    // Linearizable reads: the leader serves, followers redirect.
    let n = c.node(leader).read(|s| s.hosts.len()).await.expect("read");
    assert_eq!(n, 21);
    match c.node(follower).read(|s| s.hosts.len()).await {
        Err(ReadError::ForwardToLeader { leader_id, .. }) => assert_eq!(leader_id, leader),
        other => panic!("follower must redirect reads, got {other:?}"),
    }
    // Read index protocol: a follower serves once it has applied the leader's read index.
    let index = c.node(leader).read_index().await.expect("read index");
    let n = c
        .node(follower)
        .read_at(index, |s| s.hosts.len())
        .await
        .expect("read at index");
    assert_eq!(n, 21);

    let m = c.node(leader).metrics();
    assert_eq!(m.role, Role::Leader);
    assert_eq!(m.voters.len(), 3);
    assert_eq!(m.nodes.len(), 3);
    assert_eq!(m.leader, Some(c.node(leader).node_info()));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_all_sled_nodes_restores_the_same_state() {
    let mut c = Cluster::start(3, true).await;
    for i in 0..30 {
        c.put(i).await;
    }
    let before = c.wait_converged(&c.ids()).await;
    let term_before = c.node(1).metrics().term;

    let mut configs = Vec::new();
    for id in c.ids() {
        configs.push(c.stop_node(id).await);
    }
    for config in configs {
        c.restart_node(config).await;
    }
    // Restarted nodes are initialized already: bootstrapping again is a no-op.
    for id in c.ids() {
        assert!(c.node(id).is_initialized().await);
        c.node(id)
            .initialize(c.members())
            .await
            .expect("initialize is idempotent");
    }
    let leader = c.wait_leader(&c.ids()).await;
    assert!(c.node(leader).metrics().term >= term_before);

    // Every node restored every acknowledged write; the new leader's blank entry moves
    // last_applied on, so compare the site state, then keep writing.
    let after = c.wait_converged(&c.ids()).await;
    assert_eq!(after.state, before.state);
    assert!(after.last_applied >= before.last_applied);
    c.put(30).await;
    let dump = c.wait_converged(&c.ids()).await;
    assert!((0..=30).all(|i| has(&dump, i)));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_follower_cannot_commit_majority_continues_and_it_catches_up() {
    let c = Cluster::start(3, true).await;
    for i in 0..5 {
        c.put(i).await;
    }
    let leader = c.wait_leader(&c.ids()).await;
    let cut = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");
    let majority: Vec<_> = c.ids().into_iter().filter(|id| *id != cut).collect();
    c.faults.isolate(cut, c.ids());

    // The cut node loses its leader, then can neither write nor read.
    c.node(cut)
        .wait_for(common::WAIT, "leader lost", |m| m.leader_id.is_none())
        .await
        .expect("cut node notices it has no leader");
    match c.node(cut).propose(cmd(50)).await {
        Err(ProposeError::Unavailable { .. } | ProposeError::Timeout(_)) => {}
        other => panic!("a cut node must not commit, got {other:?}"),
    }
    match c.node(cut).read(|s| s.hosts.len()).await {
        Err(ReadError::Unavailable { .. }) => {}
        other => panic!("a cut node must not serve reads, got {other:?}"),
    }

    // The majority goes on.
    for i in 5..25 {
        c.propose_via(majority[0], cmd(i))
            .await
            .expect("majority commits")
            .expect("applied");
    }
    let majority_dump = c.wait_converged(&majority).await;
    assert!(
        !has(&c.node(cut).dump(), 24),
        "the cut node saw nothing new"
    );
    assert!(
        !has(&majority_dump, 50),
        "the failed proposal was never applied"
    );

    // Healed, it catches up and holds exactly the majority's state.
    c.faults.heal(cut);
    let dump = c.wait_converged(&c.ids()).await;
    assert!((0..25).all(|i| has(&dump, i)));
    assert!(!has(&dump, 50));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_cannot_commit_and_a_new_leader_keeps_acknowledged_writes() {
    let c = Cluster::start(3, true).await;
    for i in 0..10 {
        c.put(i).await;
    }
    let old = c.wait_leader(&c.ids()).await;
    let rest: Vec<_> = c.ids().into_iter().filter(|id| *id != old).collect();
    c.faults.isolate(old, c.ids());

    // The old leader still believes it leads, but cannot commit or confirm reads.
    match c.node(old).propose(cmd(77)).await {
        Err(ProposeError::Timeout(_) | ProposeError::Unavailable { .. }) => {}
        Err(ProposeError::ForwardToLeader { .. }) => {}
        other => panic!("an isolated leader must not commit, got {other:?}"),
    }
    match c.node(old).read(|s| s.hosts.len()).await {
        Err(ReadError::Unavailable { .. } | ReadError::ForwardToLeader { .. }) => {}
        other => panic!("an isolated leader must not serve reads, got {other:?}"),
    }

    // The other two elect a new leader that holds every acknowledged write.
    let new = c.wait_leader(&rest).await;
    assert_ne!(new, old);
    for i in 10..20 {
        c.propose_via(new, cmd(i))
            .await
            .expect("new leader commits")
            .expect("applied");
    }
    let dump = c.wait_converged(&rest).await;
    assert!((0..20).all(|i| has(&dump, i)));

    // Healed, the old leader steps down and converges; its uncommitted proposal is gone.
    c.faults.heal(old);
    let dump = c.wait_converged(&c.ids()).await;
    assert!((0..20).all(|i| has(&dump, i)));
    assert!(
        !has(&dump, 77),
        "the isolated leader's proposal never committed"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_shutdown_elects_a_new_leader_and_keeps_acknowledged_writes() {
    let mut c = Cluster::start(3, true).await;
    for i in 0..10 {
        c.put(i).await;
    }
    let old = c.wait_leader(&c.ids()).await;
    let old_store = c.node(old).clone();
    let old_config = c.stop_node(old).await;
    // A stopped node answers at once, and never with success.
    match old_store.propose(cmd(99)).await {
        Err(ProposeError::Unavailable { .. } | ProposeError::Stopped(_)) => {}
        other => panic!("a stopped node must refuse, got {other:?}"),
    }
    // Its storage is released once the last handle is gone.
    drop(old_store);
    let new = c.wait_leader(&c.ids()).await;
    assert_ne!(new, old);
    for i in 10..20 {
        c.put(i).await;
    }
    // The old leader comes back as a follower and catches up.
    c.restart_node(old_config).await;
    let dump = c.wait_converged(&c.ids()).await;
    assert!((0..20).all(|i| has(&dump, i)));
    assert!(!has(&dump, 99));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_misaddressed_raft_rpcs_are_refused_and_the_node_keeps_serving() {
    use tandem_proto::v1::RaftRpcRequest;
    use tandem_proto::v1::raft_client::RaftClient;

    let c = Cluster::start(1, false).await;
    let addr = c.node(1).node_info().raft_addr;
    let mut client = RaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let garbage = RaftRpcRequest {
        from: 9,
        to: 1,
        payload: vec![0xff; 16],
    };
    let status = client.vote(garbage).await.expect_err("garbage refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let misaddressed = RaftRpcRequest {
        from: 9,
        to: 2,
        payload: Vec::new(),
    };
    let status = client
        .append_entries(misaddressed)
        .await
        .expect_err("wrong node refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    c.faults.cut_link(9, 1);
    let cut = RaftRpcRequest {
        from: 9,
        to: 1,
        payload: Vec::new(),
    };
    let status = client.vote(cut).await.expect_err("cut peer refused");
    assert_eq!(status.code(), tonic::Code::Unavailable);

    c.put(1).await;
    assert!(has(&c.wait_converged(&[1]).await, 1));
    c.shutdown().await;
}
