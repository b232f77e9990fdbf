//! One manager node's view of its Raft cluster: proposes commands (forwarding to the leader
//! when this node is not it), serves linearizable reads on any node (read index from the
//! leader, then wait until applied locally), and changes membership.

use std::collections::BTreeSet;

use tandem_core::state::{Applied, Command, CommandOutcome, SiteState};
use tandem_proto::v1;
use tandem_proto::v1::manager_internal_client::ManagerInternalClient;
use tandem_store::{MembershipError, NodeId, NodeInfo, ProposeError, ReadError, SiteStore};

use crate::error::{ApiError, ApiResult};
use crate::net::Connector;

/// Forwards of one command at most: the first from the node that received it, then one
/// more from a node that stopped leading meanwhile.
const MAX_FORWARD_HOPS: u32 = 2;

/// How long a linearizable read waits for a leader that stopped answering to be replaced:
/// a few election timeouts (at most 1 s each).
const LEADER_CHANGE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(4);

/// Between a read's attempts to reach the leader while it waits for the next one.
const LEADER_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A node of the cluster as shown by `ClusterService`.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: u64,
    pub api: String,
    pub raft: String,
    pub voter: bool,
}

/// The cluster as seen from this node.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub leader_api: Option<String>,
    pub term: u64,
    pub last_log_index: u64,
    pub last_applied: u64,
    pub state: String,
    pub nodes: Vec<NodeView>,
}

/// This manager's handle on the replicated store.
pub struct ManagerNode {
    store: SiteStore,
    connector: Connector,
    /// Where this node serves its site's members and paired sites (advertised).
    internal_addr: String,
}

impl ManagerNode {
    pub fn new(store: SiteStore, connector: Connector, internal_addr: String) -> Self {
        Self {
            store,
            connector,
            internal_addr,
        }
    }

    pub fn store(&self) -> &SiteStore {
        &self.store
    }

    /// The seam every outbound connection of this node goes through.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Internal addresses of every member, this node's first: where paired sites call
    /// (the internal listener serves the site's members and its paired sites, never
    /// operators).
    pub fn peer_endpoints(&self) -> Vec<String> {
        let m = self.store.metrics();
        let mut out = vec![self.internal_addr.clone()];
        out.extend(
            m.nodes
                .values()
                .map(|n| n.raft_addr.clone())
                .filter(|a| *a != self.internal_addr),
        );
        out
    }

    fn leader_api(
        &self,
        leader: &NodeInfo,
    ) -> ApiResult<ManagerInternalClient<tonic::transport::Channel>> {
        // The manager-internal service is on the internal (Raft) listener, never on the
        // operator's port.
        Ok(ManagerInternalClient::new(
            self.connector.own_site(&leader.raft_addr)?,
        ))
    }

    /// Proposes a command forwarded by another node as `json` (and decoded from it), after
    /// `hops` forwards: on the leader the log entry is made of these bytes; a node that is
    /// no longer the leader forwards it once more to the leader it knows.
    pub async fn propose_forwarded(
        &self,
        cmd: Command,
        json: Vec<u8>,
        hops: u32,
    ) -> ApiResult<(u64, CommandOutcome)> {
        match self.store.check_leader().await {
            Ok(()) => {}
            Err(ProposeError::ForwardToLeader { leader_id, leader }) => {
                if hops >= MAX_FORWARD_HOPS {
                    return Err(ApiError::unavailable(format!(
                        "this node is not the leader (node {leader_id} is) and the command was \
                         forwarded {hops} times already"
                    )));
                }
                return self.forward(&leader, json, hops + 1).await;
            }
            Err(e) => return Err(ApiError::unavailable(e)),
        }
        match self.store.propose_encoded(cmd, json).await {
            Ok(outcome) => Ok(outcome),
            Err(ProposeError::ForwardToLeader { leader_id, .. }) => Err(ApiError::unavailable(
                format!("this node stopped leading (node {leader_id} leads now)"),
            )),
            Err(ProposeError::Encode(e)) => Err(ApiError::internal(e)),
            Err(e) => Err(ApiError::unavailable(e)),
        }
    }

    /// Proposes a command wherever the leader is; domain errors come back as such.
    pub async fn propose(&self, cmd: Command) -> ApiResult<Applied> {
        self.propose_indexed(cmd).await.map(|(_, applied)| applied)
    }

    /// Proposes through the leader; also answers the log index the command was applied at,
    /// for [`ManagerNode::read_after`].
    pub async fn propose_indexed(&self, cmd: Command) -> ApiResult<(u64, Applied)> {
        let (index, outcome) = match self.store.propose_indexed(cmd.clone()).await {
            Ok(applied) => applied,
            Err(ProposeError::ForwardToLeader { leader, .. }) => {
                let json = serde_json::to_vec(&cmd).map_err(ApiError::internal)?;
                self.forward(&leader, json, 1).await?
            }
            Err(ProposeError::Encode(e)) => return Err(ApiError::internal(e)),
            Err(e) => return Err(ApiError::unavailable(e)),
        };
        Ok((index, outcome.map_err(ApiError::Domain)?))
    }

    /// Sends a command (its JSON) to the node believed to lead, as forward number `hops`.
    async fn forward(
        &self,
        leader: &NodeInfo,
        json: Vec<u8>,
        hops: u32,
    ) -> ApiResult<(u64, CommandOutcome)> {
        let reply = self
            .leader_api(leader)?
            .propose(v1::ProposeRequest {
                command_json: json,
                hops,
            })
            .await
            .map_err(|s| ApiError::unavailable(format!("forwarding to leader: {}", s.message())))?
            .into_inner();
        let outcome = serde_json::from_slice::<CommandOutcome>(&reply.outcome_json)
            .map_err(ApiError::internal)?;
        Ok((reply.applied_index, outcome))
    }

    /// Runs `f` on this node's state once it has applied `index` (from
    /// [`ManagerNode::propose_indexed`]): the caller sees its own write without another
    /// round trip to the leader.
    pub async fn read_after<T>(&self, index: u64, f: impl FnOnce(&SiteState) -> T) -> ApiResult<T> {
        self.store
            .read_at(Some(index), f)
            .await
            .map_err(ApiError::unavailable)
    }

    /// The leader's side of a follower read: confirms leadership, returns the index a
    /// reader must have applied.
    pub async fn leader_read_index(&self) -> ApiResult<u64> {
        self.store
            .read_index()
            .await
            .map(|i| i.unwrap_or(0))
            .map_err(|e| match e {
                ReadError::ForwardToLeader { leader_id, .. } => ApiError::unavailable(format!(
                    "this node is not the leader (node {leader_id} is)"
                )),
                other => ApiError::unavailable(other),
            })
    }

    /// A linearizable read of the state on any node.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SiteState) -> T + Send + 'static,
    ) -> ApiResult<T> {
        // A leader that just died refuses the forwarded call until the survivors elect
        // the next one (an election timeout or two): the reader waits for it rather than
        // failing an operator's `vpg get` issued in that second.
        let patience = tokio::time::Instant::now() + LEADER_CHANGE_PATIENCE;
        let index = loop {
            match self.store.read_index().await {
                Ok(index) => break index.unwrap_or(0),
                Err(ReadError::ForwardToLeader { leader, .. }) => {
                    match self
                        .leader_api(&leader)?
                        .read_index(v1::ReadIndexRequest {})
                        .await
                    {
                        Ok(reply) => break reply.into_inner().index,
                        Err(s)
                            if s.code() == tonic::Code::Unavailable
                                && tokio::time::Instant::now() < patience =>
                        {
                            tokio::time::sleep(LEADER_RETRY_PAUSE).await;
                        }
                        Err(s) => {
                            return Err(ApiError::unavailable(format!(
                                "read index from leader: {}",
                                s.message()
                            )));
                        }
                    }
                }
                Err(e) => return Err(ApiError::unavailable(e)),
            }
        };
        self.store
            .read_at(Some(index), f)
            .await
            .map_err(ApiError::unavailable)
    }

    /// Reads this node's applied state without a round trip: possibly stale, for figures
    /// that decorate an answer whose write this node has already seen applied.
    pub fn read_local<T>(&self, f: impl FnOnce(&SiteState) -> T) -> T {
        self.store.read_local(f)
    }

    pub fn cluster_view(&self) -> ClusterView {
        let m = self.store.metrics();
        ClusterView {
            node_id: m.node_id,
            leader_id: m.leader_id,
            leader_api: m.leader.as_ref().map(|l| l.api_addr.clone()),
            term: m.term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied_index.unwrap_or(0),
            state: format!("{:?}", m.role),
            nodes: m
                .nodes
                .iter()
                .map(|(id, n)| NodeView {
                    id: *id,
                    api: n.api_addr.clone(),
                    raft: n.raft_addr.clone(),
                    voter: m.voters.contains(id),
                })
                .collect(),
        }
    }

    fn membership_error(e: MembershipError) -> ApiError {
        match e {
            MembershipError::ForwardToLeader { leader, .. } => ApiError::unavailable(format!(
                "membership changes go to the leader at {}",
                leader.api_addr
            )),
            MembershipError::Rejected(m) => {
                ApiError::Domain(tandem_core::DomainError::precondition(m))
            }
            other => ApiError::unavailable(other),
        }
    }

    /// Adds a node as a learner (waiting until it caught up), then makes it a voter.
    pub async fn add_node(
        &self,
        id: NodeId,
        api: String,
        raft: String,
        voter: bool,
    ) -> ApiResult<()> {
        self.store
            .add_learner(id, NodeInfo::new(raft, api), true)
            .await
            .map_err(Self::membership_error)?;
        if voter {
            self.promote(id).await?;
        }
        Ok(())
    }

    pub async fn promote(&self, id: NodeId) -> ApiResult<()> {
        let m = self.store.metrics();
        if !m.nodes.contains_key(&id) {
            return Err(tandem_core::DomainError::not_found("node", id).into());
        }
        let mut voters: BTreeSet<NodeId> = m.voters.clone();
        voters.insert(id);
        self.store
            .change_membership(voters, false)
            .await
            .map_err(Self::membership_error)
    }

    pub async fn remove(&self, id: NodeId) -> ApiResult<()> {
        let m = self.store.metrics();
        if !m.nodes.contains_key(&id) {
            return Err(tandem_core::DomainError::not_found("node", id).into());
        }
        if m.voters.len() == 1 && m.voters.contains(&id) {
            return Err(
                tandem_core::DomainError::precondition("cannot remove the last voter").into(),
            );
        }
        self.store
            .remove_node(id)
            .await
            .map_err(Self::membership_error)
    }
}
