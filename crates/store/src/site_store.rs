//! [`SiteStore`]: the facade a manager node calls. It opens storage, runs the Raft node,
//! bootstraps and changes membership, proposes commands, serves linearizable reads, and
//! reports metrics. Every wait is bounded: a node without a reachable leader answers
//! `Unavailable` instead of hanging.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError,
    RaftError,
};
use openraft::{ChangeMembers, RaftMetrics, ServerState};
use tandem_core::state::{Command, CommandOutcome, SiteState};
use tokio::sync::watch;

use crate::batching::{Coalescer, GroupCommit, GroupCommitError, SubmitFn};
use crate::config::{StorageKind, StoreConfig, Transport};
use crate::error::{InitError, MembershipError, OpenError, ProposeError, ReadError, ShutdownError};
use crate::metrics::StoreMetrics;
use crate::network::{FaultInjector, GrpcNetwork, RaftGrpc};
use crate::storage::state_machine::{SharedSm, read_sm};
use crate::storage::{
    BackendError, LogStore, MemoryBackend, RaftBackend, SledBackend, SmSnapshot, StateMachineStore,
};
use crate::types::{NodeId, NodeInfo, Proposal, Raft, TypeConfig, encode_command};

/// What openraft answers to a leadership confirmation (the read index, or why not).
type LeadershipCheck = Result<
    Option<openraft::LogId<NodeId>>,
    RaftError<NodeId, CheckIsLeaderError<NodeId, NodeInfo>>,
>;

/// Pause before another leadership confirmation after one that missed its quorum.
const QUORUM_RETRY: Duration = Duration::from_millis(20);

type FlushFn = Box<dyn Fn() -> BoxFuture<'static, Result<(), BackendError>> + Send + Sync>;

/// Why a batch of proposals was not applied (shared by every command of the batch).
#[derive(Debug, Clone)]
enum WriteFailure {
    Forward(ForwardToLeader<NodeId, NodeInfo>),
    Timeout(Duration),
    Stopped(String),
}

struct Inner {
    id: NodeId,
    config: StoreConfig,
    raft: Raft,
    sm: SharedSm,
    faults: FaultInjector,
    flush: FlushFn,
    /// Commands proposed concurrently share log entries.
    proposals: GroupCommit<(Command, Vec<u8>), (u64, CommandOutcome), WriteFailure>,
    /// Concurrent linearizable reads share leadership confirmations.
    read_index: Coalescer<Result<Option<u64>, ReadError>>,
}

/// One node of the site configuration store. Cloning shares the node.
#[derive(Clone)]
pub struct SiteStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for SiteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteStore")
            .field("node_id", &self.inner.id)
            .field("raft_addr", &self.inner.config.raft_addr)
            .finish()
    }
}

/// Outcome of a leader lookup before submitting work.
enum Leader {
    Me,
    Other(NodeId, NodeInfo),
}

/// A "forward to the leader" answer, or why there is none.
enum Forward {
    To(NodeId, NodeInfo),
    Nowhere(String),
}

impl SiteStore {
    /// Opens the node's storage (per `config.storage`) and starts its Raft node. Serve
    /// [`SiteStore::grpc`] on the Raft listener, then [`SiteStore::initialize`] on a new
    /// cluster.
    pub async fn open(config: StoreConfig, transport: Transport) -> Result<Self, OpenError> {
        match config.storage.clone() {
            StorageKind::Sled { dir } => {
                let backend = tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&dir).map_err(|source| OpenError::Io {
                        dir: dir.display().to_string(),
                        source,
                    })?;
                    Ok::<_, OpenError>(SledBackend::open(&dir)?)
                })
                .await
                .map_err(|e| OpenError::Storage(format!("opening sled panicked: {e}")))??;
                Self::open_with_backend(config, backend, transport).await
            }
            StorageKind::Memory => {
                Self::open_with_backend(config, MemoryBackend::new(), transport).await
            }
        }
    }

    /// Starts the Raft node on any backend (`config.storage` is ignored).
    pub async fn open_with_backend<B: RaftBackend>(
        config: StoreConfig,
        backend: B,
        transport: Transport,
    ) -> Result<Self, OpenError> {
        let raft_config = Arc::new(config.raft_config().map_err(OpenError::Config)?);
        let backend = Arc::new(backend);
        let log = LogStore::open(backend.clone()).map_err(|e| OpenError::Storage(e.to_string()))?;
        let sm = StateMachineStore::open(backend.clone())
            .map_err(|e| OpenError::Storage(e.to_string()))?;
        let shared = sm.shared();
        let network = GrpcNetwork::new(
            config.node_id,
            transport.connector.clone(),
            transport.faults.clone(),
        );
        let raft = Raft::new(config.node_id, raft_config, network, log, sm)
            .await
            .map_err(|e| OpenError::Storage(e.to_string()))?;
        let proposals = GroupCommit::start(submit_batches(
            raft.clone(),
            config.node_id,
            config.propose_timeout,
        ));
        let flush: FlushFn = Box::new(move || {
            let backend = backend.clone();
            Box::pin(async move { backend.flush().await })
        });
        tracing::info!(
            node = config.node_id,
            raft_addr = %config.raft_addr,
            api_addr = %config.api_addr,
            "store node started"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                id: config.node_id,
                config,
                raft,
                sm: shared,
                faults: transport.faults,
                flush,
                proposals,
                read_index: Coalescer::new(),
            }),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.id
    }

    /// This node's addresses.
    pub fn node_info(&self) -> NodeInfo {
        self.inner.config.node_info()
    }

    /// The configuration the node was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The Raft gRPC service to mount on this node's Raft listener.
    pub fn grpc(&self) -> RaftGrpc {
        RaftGrpc::new(
            self.inner.id,
            self.inner.raft.clone(),
            self.inner.faults.clone(),
        )
    }

    /// The underlying openraft handle, for what the facade does not cover.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Bootstraps a new cluster with `members` as voters. Idempotent: a node that is already
    /// initialized (restarted, or joined by another member) returns `Ok`. Call it on one node,
    /// or on every initial member with the same `members`.
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), InitError> {
        let raft = &self.inner.raft;
        if raft
            .is_initialized()
            .await
            .map_err(|e| InitError::Stopped(e.to_string()))?
        {
            tracing::info!(node = self.inner.id, "already initialized");
            return Ok(());
        }
        match raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(node = self.inner.id, "cluster initialized");
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                tracing::info!(node = self.inner.id, reason = %e, "already initialized");
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
                Err(InitError::NotInMembers(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(InitError::Stopped(e.to_string())),
        }
    }

    /// Whether the node is part of a cluster (initialized, or joined by a leader).
    pub async fn is_initialized(&self) -> bool {
        self.inner.raft.is_initialized().await.unwrap_or(false)
    }

    /// Proposes a command and returns its replicated outcome (a domain error is an `Ok`
    /// outcome: it was replicated and applied as a no-op on every node).
    ///
    /// `ForwardToLeader` and `Unavailable` mean the command was not applied; `Timeout` and
    /// `Stopped` mean its fate is unknown.
    pub async fn propose(&self, cmd: Command) -> Result<CommandOutcome, ProposeError> {
        self.propose_indexed(cmd).await.map(|(_, outcome)| outcome)
    }

    /// [`SiteStore::propose`], also answering the log index the command was applied at: a
    /// node that waits to have applied it ([`SiteStore::read_at`]) reads its own write.
    pub async fn propose_indexed(
        &self,
        cmd: Command,
    ) -> Result<(u64, CommandOutcome), ProposeError> {
        self.check_leader().await?;
        // Encoded once here: the batcher bounds the bytes of a log entry with it, and the
        // entry is made of these bytes.
        let encoded = encode_command(&cmd).map_err(|e| ProposeError::Encode(e.to_string()))?;
        self.propose_encoded(cmd, encoded).await
    }

    /// Ok on the leader; where to go otherwise (checked before a command is encoded or
    /// submitted, so that a follower hands it on at once).
    pub async fn check_leader(&self) -> Result<(), ProposeError> {
        match self.leader().await {
            Ok(Leader::Me) => Ok(()),
            Ok(Leader::Other(leader_id, leader)) => {
                Err(ProposeError::ForwardToLeader { leader_id, leader })
            }
            Err(reason) => Err(ProposeError::Unavailable { reason }),
        }
    }

    /// [`SiteStore::propose_indexed`] of a command that comes with its JSON encoding (a
    /// command forwarded by another node, decoded from exactly these bytes): the log entry
    /// is made of them, so every node decodes the same command. For callers that made
    /// [`SiteStore::check_leader`] first; a node that is not the leader refuses it with
    /// `ForwardToLeader` all the same.
    pub async fn propose_encoded(
        &self,
        cmd: Command,
        encoded: Vec<u8>,
    ) -> Result<(u64, CommandOutcome), ProposeError> {
        let bytes = encoded.len();
        match self.inner.proposals.submit((cmd, encoded), bytes).await {
            Ok(applied) => Ok(applied),
            Err(GroupCommitError::Batch(WriteFailure::Forward(f))) => Err(match self.forward(f) {
                Forward::To(leader_id, leader) => {
                    ProposeError::ForwardToLeader { leader_id, leader }
                }
                Forward::Nowhere(reason) => ProposeError::Unavailable { reason },
            }),
            Err(GroupCommitError::Batch(WriteFailure::Timeout(limit))) => {
                Err(ProposeError::Timeout(limit))
            }
            Err(
                GroupCommitError::Batch(WriteFailure::Stopped(reason))
                | GroupCommitError::Stopped(reason),
            ) => Err(ProposeError::Stopped(reason)),
        }
    }

    /// Runs `f` on the site state, linearizably: leadership is confirmed by a quorum and the
    /// local state machine has applied everything committed before the call. Only the leader
    /// serves it; other nodes answer `ForwardToLeader`.
    pub async fn read<T>(&self, f: impl FnOnce(&SiteState) -> T) -> Result<T, ReadError> {
        match self.leader().await {
            Ok(Leader::Me) => {}
            Ok(Leader::Other(leader_id, leader)) => {
                return Err(ReadError::ForwardToLeader { leader_id, leader });
            }
            Err(reason) => return Err(ReadError::Unavailable { reason }),
        }
        self.confirm_read_index().await?;
        Ok(f(&read_sm(&self.inner.sm).state))
    }

    /// On the leader: confirms leadership with a quorum and returns the log index a
    /// follower must have applied before serving a linearizable read locally
    /// ([`SiteStore::read_at`]).
    pub async fn read_index(&self) -> Result<Option<u64>, ReadError> {
        match self.leader().await {
            Ok(Leader::Me) => {}
            Ok(Leader::Other(leader_id, leader)) => {
                return Err(ReadError::ForwardToLeader { leader_id, leader });
            }
            Err(reason) => return Err(ReadError::Unavailable { reason }),
        }
        self.confirm_read_index().await
    }

    /// Runs `f` on the local state once it has applied `index` (from the leader's
    /// [`SiteStore::read_index`]); `Unavailable` if it does not get there in time.
    pub async fn read_at<T>(
        &self,
        index: Option<u64>,
        f: impl FnOnce(&SiteState) -> T,
    ) -> Result<T, ReadError> {
        if let Some(index) = index {
            self.inner
                .raft
                .wait(Some(self.inner.config.read_timeout))
                .applied_index_at_least(Some(index), "read_at")
                .await
                .map_err(|e| ReadError::Unavailable {
                    reason: e.to_string(),
                })?;
        }
        Ok(f(&read_sm(&self.inner.sm).state))
    }

    /// Runs `f` on this node's state as applied so far: possibly stale, never blocks. For
    /// dumps, diagnostics and leader-local controllers that tolerate staleness.
    pub fn read_local<T>(&self, f: impl FnOnce(&SiteState) -> T) -> T {
        f(&read_sm(&self.inner.sm).state)
    }

    /// A full copy of this node's state machine (state, last applied log id, membership),
    /// for comparing nodes in tests.
    pub fn dump(&self) -> SmSnapshot {
        read_sm(&self.inner.sm).clone()
    }

    /// Confirms leadership with a quorum and waits until the read index is applied, sharing
    /// the confirmation with reads that arrived while none was in flight.
    async fn confirm_read_index(&self) -> Result<Option<u64>, ReadError> {
        let store = self.clone();
        self.inner
            .read_index
            .call(move || {
                let store = store.clone();
                async move { store.confirm_read_index_now().await }
            })
            .await
            .unwrap_or_else(|| Err(ReadError::Stopped("read confirmation dropped".into())))
    }

    async fn confirm_read_index_now(&self) -> Result<Option<u64>, ReadError> {
        let limit = self.inner.config.read_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let confirmed = match tokio::time::timeout_at(
                deadline,
                self.inner.raft.ensure_linearizable(),
            )
            .await
            {
                Err(_elapsed) => {
                    return Err(ReadError::Unavailable {
                        reason: format!("leadership not confirmed within {limit:?}"),
                    });
                }
                Ok(r) => r,
            };
            // A heartbeat round that missed its quorum (a follower slow to answer on a busy
            // machine), or a leadership change with no new leader known yet, is tried again
            // until the read's time is up: only a node that stays without a reachable leader
            // answers UNAVAILABLE.
            let transient = match &confirmed {
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => true,
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    matches!(self.forward(f.clone()), Forward::Nowhere(_))
                }
                _ => false,
            };
            if transient && tokio::time::Instant::now() + QUORUM_RETRY < deadline {
                tracing::debug!(
                    node = self.inner.id,
                    "read index not confirmed yet; retrying"
                );
                tokio::time::sleep(QUORUM_RETRY).await;
                continue;
            }
            return self.read_index_outcome(confirmed);
        }
    }

    fn read_index_outcome(&self, confirmed: LeadershipCheck) -> Result<Option<u64>, ReadError> {
        match confirmed {
            Ok(read_log_id) => Ok(read_log_id.map(|l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(match self.forward(f) {
                    Forward::To(leader_id, leader) => {
                        ReadError::ForwardToLeader { leader_id, leader }
                    }
                    Forward::Nowhere(reason) => ReadError::Unavailable { reason },
                })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(ReadError::Unavailable {
                    reason: e.to_string(),
                })
            }
            Err(RaftError::Fatal(e)) => Err(ReadError::Stopped(e.to_string())),
        }
    }

    /// Adds `id` as a non-voting member. With `blocking`, returns once it has caught up.
    pub async fn add_learner(
        &self,
        id: NodeId,
        node: NodeInfo,
        blocking: bool,
    ) -> Result<(), MembershipError> {
        tracing::info!(node = self.inner.id, learner = id, addr = %node, blocking, "add learner");
        let raft = self.inner.raft.clone();
        self.membership_call(async move { raft.add_learner(id, node, blocking).await })
            .await
    }

    /// Makes `voters` the voting members (each must already be a member). With `retain`,
    /// removed voters stay as learners; without, they leave the cluster.
    pub async fn change_membership(
        &self,
        voters: BTreeSet<NodeId>,
        retain: bool,
    ) -> Result<(), MembershipError> {
        tracing::info!(node = self.inner.id, ?voters, retain, "change membership");
        let raft = self.inner.raft.clone();
        self.membership_call(async move { raft.change_membership(voters, retain).await })
            .await
    }

    /// Removes `id` from the cluster, whether voter or learner; `Ok` if it is not a member.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), MembershipError> {
        let metrics = self.metrics();
        let change = if metrics.voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if metrics.learners.contains(&id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Ok(());
        };
        tracing::info!(node = self.inner.id, removed = id, "remove node");
        let raft = self.inner.raft.clone();
        self.membership_call(async move { raft.change_membership(change, false).await })
            .await
    }

    async fn membership_call(
        &self,
        call: impl Future<
            Output = Result<
                openraft::raft::ClientWriteResponse<TypeConfig>,
                RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>,
            >,
        >,
    ) -> Result<(), MembershipError> {
        match self.leader().await {
            Ok(Leader::Me) => {}
            Ok(Leader::Other(leader_id, leader)) => {
                return Err(MembershipError::ForwardToLeader { leader_id, leader });
            }
            Err(reason) => return Err(MembershipError::Unavailable { reason }),
        }
        let limit = self.inner.config.membership_timeout;
        match tokio::time::timeout(limit, call).await {
            Err(_elapsed) => Err(MembershipError::Timeout(limit)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(match self.forward(f) {
                    Forward::To(leader_id, leader) => {
                        MembershipError::ForwardToLeader { leader_id, leader }
                    }
                    Forward::Nowhere(reason) => MembershipError::Unavailable { reason },
                })
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(MembershipError::Rejected(match e {
                    ChangeMembershipError::InProgress(e) => e.to_string(),
                    ChangeMembershipError::EmptyMembership(e) => e.to_string(),
                    ChangeMembershipError::LearnerNotFound(e) => e.to_string(),
                }))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(MembershipError::Stopped(e.to_string())),
        }
    }

    /// This node's current view of the cluster.
    pub fn metrics(&self) -> StoreMetrics {
        StoreMetrics::from(&*self.inner.raft.metrics().borrow())
    }

    /// A receiver that changes whenever the Raft metrics change (leadership, applied index,
    /// membership); for controllers that start and stop with leadership.
    pub fn watch_metrics(&self) -> watch::Receiver<RaftMetrics<NodeId, NodeInfo>> {
        self.inner.raft.metrics()
    }

    /// Waits until `pred` holds for this node's metrics, up to `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&StoreMetrics) -> bool + Send,
    ) -> Result<StoreMetrics, ReadError> {
        self.inner
            .raft
            .wait(Some(timeout))
            .metrics(move |m| pred(&StoreMetrics::from(m)), what)
            .await
            .map(|m| StoreMetrics::from(&m))
            .map_err(|e| ReadError::Unavailable {
                reason: e.to_string(),
            })
    }

    /// Builds a snapshot now (then purges the log per the config) and waits until it exists.
    pub async fn snapshot(&self) -> Result<u64, ReadError> {
        let want = self.metrics().last_applied_index;
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ReadError::Stopped(e.to_string()))?;
        let m = self
            .wait_for(
                self.inner.config.membership_timeout,
                "snapshot built",
                |m| m.snapshot_index >= want,
            )
            .await?;
        Ok(m.snapshot_index.unwrap_or_default())
    }

    /// Stops the Raft node and flushes storage. Serve no more RPCs afterwards (stop the Raft
    /// listener). Dropping every clone of the store then releases the storage.
    pub async fn shutdown(&self) -> Result<(), ShutdownError> {
        let stopped = self.inner.raft.shutdown().await;
        let flushed = (self.inner.flush)().await;
        tracing::info!(node = self.inner.id, "store node stopped");
        stopped.map_err(|e| ShutdownError(format!("raft task: {e}")))?;
        flushed.map_err(|e| ShutdownError(format!("flush: {e}")))
    }

    /// Waits briefly for a leader to be known; `Err` with the reason if none appears.
    async fn leader(&self) -> Result<Leader, String> {
        let limit = self.inner.config.read_timeout;
        let metrics = self
            .inner
            .raft
            .wait(Some(limit))
            .metrics(
                |m| {
                    m.current_leader.is_some()
                        || m.running_state.is_err()
                        || m.state == ServerState::Shutdown
                },
                "leader known",
            )
            .await
            .map_err(|e| format!("no leader known within {limit:?}: {e}"))?;
        if let Err(e) = &metrics.running_state {
            return Err(format!("raft node stopped: {e}"));
        }
        if metrics.state == ServerState::Shutdown {
            return Err("raft node shut down".to_string());
        }
        match metrics.current_leader {
            Some(id) if id == self.inner.id => Ok(Leader::Me),
            Some(id) => match metrics.membership_config.membership().get_node(&id) {
                Some(node) => Ok(Leader::Other(id, node.clone())),
                None => Err(format!("leader {id} is not in the membership")),
            },
            None => Err("no leader known".to_string()),
        }
    }

    fn forward(&self, f: ForwardToLeader<NodeId, NodeInfo>) -> Forward {
        match (f.leader_id, f.leader_node) {
            (Some(id), Some(node)) if id != self.inner.id => Forward::To(id, node),
            (Some(id), None) if id != self.inner.id => match self.metrics().nodes.get(&id) {
                Some(node) => Forward::To(id, node.clone()),
                None => Forward::Nowhere(format!("leader {id} has no known address")),
            },
            _ => Forward::Nowhere("leadership is changing".to_string()),
        }
    }
}

/// Proposes each batch as one log entry, bounded by `limit`.
fn submit_batches(
    raft: Raft,
    node: NodeId,
    limit: Duration,
) -> SubmitFn<(Command, Vec<u8>), (u64, CommandOutcome), WriteFailure> {
    Arc::new(move |cmds: Vec<(Command, Vec<u8>)>| {
        let raft = raft.clone();
        Box::pin(async move {
            let written =
                match tokio::time::timeout(limit, raft.client_write(Proposal::from_encoded(cmds)))
                    .await
                {
                    Err(_elapsed) => {
                        tracing::warn!(node, timeout = ?limit, "proposal timed out");
                        return Err(WriteFailure::Timeout(limit));
                    }
                    Ok(r) => r,
                };
            match written {
                Ok(resp) => {
                    let index = resp.log_id.index;
                    Ok(resp.data.0.into_iter().map(|o| (index, o)).collect())
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    Err(WriteFailure::Forward(f))
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    Err(WriteFailure::Stopped(format!("unexpected: {e}")))
                }
                Err(RaftError::Fatal(e)) => Err(WriteFailure::Stopped(e.to_string())),
            }
        })
    })
}
