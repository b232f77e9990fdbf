//! Raft RPCs over gRPC (`tandem.v1.Raft`): the client side openraft uses to reach peers
//! ([`RaftNetworkFactory`](openraft::RaftNetworkFactory) impl [`GrpcNetwork`]), the server
//! side a manager mounts on its Raft listener ([`RaftGrpc`]), the one connection seam
//! ([`Connector`]) and the fault layer for tests ([`FaultInjector`]).
//!
//! openraft's requests and responses travel as [`crate::codec`] bytes; the reply carries the
//! `Result` of the remote call, so a remote Raft error stays a `RemoteError` and never looks
//! like a network failure.

mod client;
mod connector;
mod faults;
mod server;

pub use client::{GrpcNetwork, PeerClient};
pub use connector::{ConnectError, Connector, TcpConnector, TlsConnector};
pub use faults::FaultInjector;
pub use server::RaftGrpc;

/// Largest gRPC message accepted or sent on the Raft service (a snapshot chunk is 3 MiB by
/// default; a batch of entries can be larger than tonic's 4 MiB default).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
