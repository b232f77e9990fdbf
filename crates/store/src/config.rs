//! [`StoreConfig`]: what a manager node tells the store at open, and [`Transport`]: how it
//! reaches its peers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::network::{Connector, FaultInjector, TcpConnector};
use crate::types::{NodeId, NodeInfo};

/// Where the Raft log, vote and snapshots live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageKind {
    /// A sled database in this directory (created if missing).
    Sled {
        /// The directory.
        dir: PathBuf,
    },
    /// Process memory; everything is lost at exit.
    Memory,
}

/// Configuration of one store node.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// This node's Raft id; stable for the node's life.
    pub node_id: NodeId,
    /// This node's Raft gRPC address (`host:port`), as peers reach it.
    pub raft_addr: String,
    /// This node's API address (`host:port`), as clients reach it.
    pub api_addr: String,
    /// Where to keep state.
    pub storage: StorageKind,
    /// Name of the Raft cluster (for logs).
    pub cluster_name: String,
    /// Leader heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max: Duration,
    /// Timeout of one snapshot chunk RPC.
    pub install_snapshot_timeout: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log below the last snapshot (so lagging followers can catch up
    /// from the log instead of a snapshot).
    pub max_in_snapshot_log_to_keep: u64,
    /// How long `propose` waits for an outcome.
    pub propose_timeout: Duration,
    /// How long reads (and proposals, before submitting) wait for a leader to be known and
    /// confirmed before answering `Unavailable`.
    pub read_timeout: Duration,
    /// How long membership changes may take (a blocking learner add waits for catch-up).
    pub membership_timeout: Duration,
}

impl StoreConfig {
    /// A configuration with production timings: heartbeat 100 ms, elections after
    /// 500–1000 ms of silence, snapshots every 10000 entries keeping 1000 entries behind.
    pub fn new(
        node_id: NodeId,
        raft_addr: impl Into<String>,
        api_addr: impl Into<String>,
        storage: StorageKind,
    ) -> Self {
        Self {
            node_id,
            raft_addr: raft_addr.into(),
            api_addr: api_addr.into(),
            storage,
            cluster_name: "tandem".to_string(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(500),
            election_timeout_max: Duration::from_millis(1000),
            install_snapshot_timeout: Duration::from_secs(5),
            snapshot_logs_since_last: 10_000,
            max_in_snapshot_log_to_keep: 1000,
            propose_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(2),
            membership_timeout: Duration::from_secs(30),
        }
    }

    /// Short timings for in-process tests: heartbeat 50 ms, elections after 200–400 ms.
    pub fn with_test_timings(mut self) -> Self {
        self.heartbeat_interval = Duration::from_millis(50);
        self.election_timeout_min = Duration::from_millis(200);
        self.election_timeout_max = Duration::from_millis(400);
        self.propose_timeout = Duration::from_secs(3);
        self.read_timeout = Duration::from_secs(2);
        self.membership_timeout = Duration::from_secs(10);
        self
    }

    /// This node's addresses as recorded in the membership.
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo::new(self.raft_addr.clone(), self.api_addr.clone())
    }

    pub(crate) fn raft_config(&self) -> Result<openraft::Config, String> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        openraft::Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(self.install_snapshot_timeout),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: self.max_in_snapshot_log_to_keep,
            // With batched proposals (`crate::batching`) an entry holds up to 512 KiB of
            // commands: this keeps one AppendEntries RPC well under the transport's limit.
            max_payload_entries: 64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }
}

/// How a node reaches its peers: the connector that opens channels, and the fault layer
/// (tests share one [`FaultInjector`] among all nodes; production leaves it empty).
#[derive(Debug, Clone)]
pub struct Transport {
    /// Opens channels to peers.
    pub connector: Arc<dyn Connector>,
    /// Cut links (tests only).
    pub faults: FaultInjector,
}

impl Default for Transport {
    fn default() -> Self {
        Self {
            connector: Arc::new(TcpConnector::default()),
            faults: FaultInjector::new(),
        }
    }
}
