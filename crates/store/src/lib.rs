//! Site configuration store: the Raft-replicated configuration of one site.
//!
//! - [`types`]: the openraft type configuration (node id, [`NodeInfo`], command wrappers);
//! - [`storage`]: the narrow [`storage::RaftBackend`] trait, sled and in-memory backends, and
//!   the openraft log and state machine built on it;
//! - [`network`]: Raft RPCs over tonic, the [`network::Connector`] seam and the
//!   [`network::FaultInjector`] for tests;
//! - [`SiteStore`]: the facade a manager node calls (open, initialize, propose, read,
//!   membership, metrics, shutdown).

mod batching;
pub mod codec;
pub mod config;
pub mod error;
pub mod metrics;
pub mod network;
mod site_store;
pub mod storage;
pub mod types;

pub use config::{StorageKind, StoreConfig, Transport};
pub use error::{InitError, MembershipError, OpenError, ProposeError, ReadError, ShutdownError};
pub use metrics::{Role, StoreMetrics};
pub use network::{Connector, FaultInjector, RaftGrpc, TcpConnector, TlsConnector};
pub use site_store::SiteStore;
pub use storage::SmSnapshot;
pub use types::{NodeId, NodeInfo};
