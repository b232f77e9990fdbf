//! Client side of the Raft network: [`GrpcNetwork`] hands openraft one [`PeerClient`] per
//! target, over channels opened by the [`Connector`] and cached per target address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, RPCTypes};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_proto::v1::RaftRpcRequest;
use tandem_proto::v1::raft_client::RaftClient;
use tonic::Code;
use tonic::transport::Channel;

use super::{Connector, FaultInjector, MAX_MESSAGE_BYTES};
use crate::codec;
use crate::types::{NodeId, NodeInfo, TypeConfig};

type Client = RaftClient<Channel>;

/// openraft's network factory: one per Raft node.
#[derive(Debug, Clone)]
pub struct GrpcNetwork {
    id: NodeId,
    connector: Arc<dyn Connector>,
    faults: FaultInjector,
    channels: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
}

impl GrpcNetwork {
    /// The network of node `id`.
    pub fn new(id: NodeId, connector: Arc<dyn Connector>, faults: FaultInjector) -> Self {
        Self {
            id,
            connector,
            faults,
            channels: Arc::default(),
        }
    }

    fn client(&self, target: NodeId, addr: &str) -> Result<Client, AnyError> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channel = match channels.get(&target) {
            Some((cached, channel)) if cached == addr => channel.clone(),
            _ => {
                let channel = self
                    .connector
                    .channel(target, addr)
                    .map_err(|e| AnyError::new(&e))?;
                channels.insert(target, (addr.to_string(), channel.clone()));
                channel
            }
        };
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        let client = self.client(target, &node.raft_addr);
        if let Err(e) = &client {
            tracing::warn!(target, addr = %node.raft_addr, error = %e, "cannot open raft channel");
        }
        PeerClient {
            from: self.id,
            target,
            node: node.clone(),
            client,
            faults: self.faults.clone(),
        }
    }
}

/// The connection from one node to one peer, as openraft uses it.
#[derive(Debug)]
pub struct PeerClient {
    from: NodeId,
    target: NodeId,
    node: NodeInfo,
    client: Result<Client, AnyError>,
    faults: FaultInjector,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.faults.is_cut(self.from, self.target) {
            let e = AnyError::error(format!(
                "link {} -> {} cut by fault injector",
                self.from, self.target
            ));
            return Err(RPCError::Unreachable(Unreachable::from(e)));
        }
        let mut client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::from(e.clone()))),
        };
        let payload = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRpcRequest {
            from: self.from,
            to: self.target,
            payload,
        };
        let ttl = option.hard_ttl();
        let mut request = tonic::Request::new(request);
        request.set_timeout(ttl);
        let sent = tokio::time::timeout(ttl, async {
            match kind {
                RPCTypes::AppendEntries => client.append_entries(request).await,
                RPCTypes::Vote => client.vote(request).await,
                RPCTypes::InstallSnapshot => client.install_snapshot(request).await,
            }
        })
        .await;
        let timeout = || {
            RPCError::Timeout(Timeout {
                action: kind,
                id: self.from,
                target: self.target,
                timeout: ttl,
            })
        };
        let reply = match sent {
            Err(_elapsed) => return Err(timeout()),
            Ok(Err(status)) => {
                tracing::debug!(target = self.target, rpc = %kind, code = ?status.code(), message = status.message(), "raft rpc failed");
                return Err(match status.code() {
                    Code::Unavailable | Code::Cancelled => {
                        RPCError::Unreachable(Unreachable::new(&status))
                    }
                    Code::DeadlineExceeded => timeout(),
                    _ => RPCError::Network(NetworkError::new(&status)),
                });
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(RPCTypes::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(RPCTypes::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(RPCTypes::Vote, &rpc, &option).await
    }
}
