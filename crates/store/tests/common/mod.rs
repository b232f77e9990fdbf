//! In-process cluster harness: real tonic servers on loopback port 0, one shared
//! `FaultInjector`, sled or memory storage.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use tandem_core::ids::HostId;
use tandem_core::inventory::Host;
use tandem_core::state::{Command, CommandOutcome};
use tandem_store::{
    FaultInjector, NodeId, NodeInfo, ProposeError, Role, SiteStore, SmSnapshot, StorageKind,
    StoreConfig, Transport,
};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Generous bound on every wait in these tests (never a timing assertion).
pub const WAIT: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The i-th test command: creates host `h{i}`.
pub fn cmd(i: u64) -> Command {
    Command::PutHost {
        host: Host {
            id: HostId::minted(format!("h{i}")),
            name: format!("host-{i}"),
            vra_address: format!("10.0.0.{}:4000", i % 250 + 1),
            peer_vra_address: String::new(),
        },
        create: true,
    }
}

/// Whether the state holds the host of `cmd(i)`.
pub fn has(dump: &SmSnapshot, i: u64) -> bool {
    dump.state
        .hosts
        .contains_key(&HostId::minted(format!("h{i}")))
}

pub struct TestNode {
    pub store: SiteStore,
    pub config: StoreConfig,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl TestNode {
    pub fn id(&self) -> NodeId {
        self.store.node_id()
    }

    /// Stops the node: Raft, storage flush, then its gRPC server. Returns its config.
    pub async fn stop(mut self) -> StoreConfig {
        self.store.shutdown().await.expect("clean shutdown");
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
        self.config
    }
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, TestNode>,
    pub faults: FaultInjector,
    pub sled: bool,
    pub dir: TempDir,
    /// Adjusts every node's config before it opens.
    pub tune: fn(&mut StoreConfig),
}

impl Cluster {
    /// A cluster with no nodes yet.
    pub fn empty(sled: bool) -> Self {
        init_tracing();
        Self {
            nodes: BTreeMap::new(),
            faults: FaultInjector::new(),
            sled,
            dir: TempDir::new().expect("temp dir"),
            tune: |_| {},
        }
    }

    /// `n` nodes (ids 1..=n), initialized as voters, with a leader elected.
    pub async fn start(n: u64, sled: bool) -> Self {
        Self::start_tuned(n, sled, |_| {}).await
    }

    /// Like `start`, with every node's config adjusted by `tune`.
    pub async fn start_tuned(n: u64, sled: bool, tune: fn(&mut StoreConfig)) -> Self {
        let mut c = Self::empty(sled);
        c.tune = tune;
        for id in 1..=n {
            c.add_node(id).await;
        }
        let members = c.members();
        c.node(1).initialize(members).await.expect("initialize");
        c.wait_leader(&c.ids()).await;
        c
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&self, id: NodeId) -> &SiteStore {
        &self.nodes[&id].store
    }

    pub fn members(&self) -> BTreeMap<NodeId, NodeInfo> {
        self.nodes
            .iter()
            .map(|(id, n)| (*id, n.store.node_info()))
            .collect()
    }

    pub fn config_for(&self, id: NodeId, raft_addr: String) -> StoreConfig {
        let storage = if self.sled {
            StorageKind::Sled {
                dir: self.data_dir(id),
            }
        } else {
            StorageKind::Memory
        };
        let mut config = StoreConfig::new(id, raft_addr, format!("api-of-node-{id}:1"), storage)
            .with_test_timings();
        config.snapshot_logs_since_last = 1000;
        config.max_in_snapshot_log_to_keep = 100;
        (self.tune)(&mut config);
        config
    }

    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// Starts a fresh node on a new loopback port (not yet a member).
    pub async fn add_node(&mut self, id: NodeId) -> NodeInfo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let config = self.config_for(id, addr);
        self.launch(config, listener).await;
        self.node(id).node_info()
    }

    /// Starts a node from `config` on an already bound listener.
    pub async fn launch(&mut self, config: StoreConfig, listener: TcpListener) {
        let transport = Transport {
            faults: self.faults.clone(),
            ..Transport::default()
        };
        let store = SiteStore::open(config.clone(), transport)
            .await
            .expect("open store");
        let (stop, stopped) = oneshot::channel::<()>();
        let grpc = store.grpc();
        let server = tokio::spawn(async move {
            grpc.serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("raft server");
        });
        self.nodes.insert(
            config.node_id,
            TestNode {
                store,
                config,
                stop: Some(stop),
                server: Some(server),
            },
        );
    }

    /// Stops node `id` cleanly and returns its config (for a restart).
    pub async fn stop_node(&mut self, id: NodeId) -> StoreConfig {
        let node = self.nodes.remove(&id).expect("node exists");
        node.stop().await
    }

    /// Restarts a stopped node on its old address and storage.
    pub async fn restart_node(&mut self, config: StoreConfig) {
        let listener = TcpListener::bind(&config.raft_addr)
            .await
            .expect("rebind raft address");
        self.launch(config, listener).await;
    }

    /// Waits until the given nodes agree on one leader among them; returns it.
    pub async fn wait_leader(&self, among: &[NodeId]) -> NodeId {
        let deadline = Instant::now() + WAIT;
        loop {
            let leaders: BTreeSet<Option<NodeId>> = among
                .iter()
                .map(|id| self.node(*id).metrics().leader_id)
                .collect();
            if let [Some(l)] = leaders.iter().copied().collect::<Vec<_>>()[..]
                && among.contains(&l)
                && self.node(l).metrics().role == Role::Leader
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes through `via`, following leader redirects and retrying while no leader is
    /// available, until `WAIT` runs out. A `Timeout` is returned as is (unknown outcome).
    pub async fn propose_via(
        &self,
        via: NodeId,
        cmd: Command,
    ) -> Result<CommandOutcome, ProposeError> {
        let deadline = Instant::now() + WAIT;
        let mut target = via;
        loop {
            match self.node(target).propose(cmd.clone()).await {
                Err(ProposeError::ForwardToLeader { leader_id, .. })
                    if self.nodes.contains_key(&leader_id) && Instant::now() < deadline =>
                {
                    target = leader_id;
                }
                Err(ProposeError::Unavailable { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    target = via;
                }
                other => return other,
            }
        }
    }

    /// Proposes `cmd(i)` through any node, requiring success.
    pub async fn put(&self, i: u64) {
        let via = *self.nodes.keys().next().expect("a node");
        let outcome = self
            .propose_via(via, cmd(i))
            .await
            .expect("proposal committed");
        outcome.expect("command applied without a domain error");
    }

    /// Waits until the given nodes have applied the same entries and hold equal state;
    /// returns the common dump.
    pub async fn wait_converged(&self, among: &[NodeId]) -> SmSnapshot {
        let deadline = Instant::now() + WAIT;
        loop {
            let dumps: Vec<SmSnapshot> = among.iter().map(|id| self.node(*id).dump()).collect();
            let logs: BTreeSet<Option<u64>> = among
                .iter()
                .map(|id| self.node(*id).metrics().last_log_index)
                .collect();
            let applied_all = logs.len() == 1
                && dumps
                    .iter()
                    .all(|d| d.last_applied.map(|l| l.index) == *logs.first().expect("one"));
            if applied_all && dumps.windows(2).all(|w| w[0] == w[1]) {
                return dumps.into_iter().next().expect("a node");
            }
            assert!(
                Instant::now() < deadline,
                "nodes {among:?} did not converge: applied {:?}, logs {logs:?}",
                dumps.iter().map(|d| d.last_applied).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        let ids = self.ids();
        for id in ids {
            self.stop_node(id).await;
        }
    }
}
