//! Server side of the Raft network: [`RaftGrpc`] decodes a request, hands it to the local
//! `openraft::Raft`, and encodes the `Result` back. Requests from a peer cut off by the
//! [`FaultInjector`] are refused with `UNAVAILABLE`; requests meant for another node id with
//! `FAILED_PRECONDITION`.

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_proto::v1::raft_server::{Raft as RaftService, RaftServer};
use tandem_proto::v1::{RaftRpcReply, RaftRpcRequest};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::{FaultInjector, MAX_MESSAGE_BYTES};
use crate::codec;
use crate::types::{NodeId, Raft};

/// The `tandem.v1.Raft` service of one node.
#[derive(Clone)]
pub struct RaftGrpc {
    id: NodeId,
    raft: Raft,
    faults: FaultInjector,
}

impl std::fmt::Debug for RaftGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftGrpc").field("id", &self.id).finish()
    }
}

impl RaftGrpc {
    /// The service of node `id`, serving `raft`.
    pub fn new(id: NodeId, raft: Raft, faults: FaultInjector) -> Self {
        Self { id, raft, faults }
    }

    /// The tonic service to mount on the node's Raft listener.
    pub fn into_server(self) -> RaftServer<RaftGrpc> {
        RaftServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Serves only this service on a bound listener until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let id = self.id;
        let addr = listener.local_addr().ok();
        tracing::info!(node = id, ?addr, "raft grpc server listening");
        let result = tonic::transport::Server::builder()
            .add_service(self.into_server())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await;
        tracing::info!(node = id, "raft grpc server stopped");
        result
    }

    fn admit<T: DeserializeOwned>(&self, request: Request<RaftRpcRequest>) -> Result<T, Status> {
        let req = request.into_inner();
        if req.to != self.id {
            return Err(Status::failed_precondition(format!(
                "this is raft node {}, not {}",
                self.id, req.to
            )));
        }
        if self.faults.is_cut(req.from, self.id) {
            return Err(Status::unavailable(format!(
                "link {} -> {} cut by fault injector",
                req.from, self.id
            )));
        }
        codec::decode(&req.payload)
            .map_err(|e| Status::invalid_argument(format!("undecodable raft request: {e}")))
    }
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftRpcReply>, Status> {
    let payload = codec::encode(result)
        .map_err(|e| Status::internal(format!("cannot encode raft reply: {e}")))?;
    Ok(Response::new(RaftRpcReply { payload }))
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        request: Request<RaftRpcRequest>,
    ) -> Result<Response<RaftRpcReply>, Status> {
        let rpc = self.admit(request)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: Request<RaftRpcRequest>,
    ) -> Result<Response<RaftRpcReply>, Status> {
        let rpc = self.admit(request)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRpcRequest>,
    ) -> Result<Response<RaftRpcReply>, Status> {
        let rpc = self.admit(request)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
