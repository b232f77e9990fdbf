//! [`Connector`]: the one place where the Raft network opens connections, so TLS, a link
//! emulator or an address rewrite can be inserted without touching the Raft code.

use std::fmt;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::types::NodeId;

/// Opening a channel failed before any IO (a malformed address or TLS setup).
#[derive(Debug, thiserror::Error)]
#[error("cannot open a channel to node {target} at {addr:?}: {source}")]
pub struct ConnectError {
    /// The node the channel was for.
    pub target: NodeId,
    /// The address given.
    pub addr: String,
    /// Why.
    #[source]
    pub source: tonic::transport::Error,
}

/// Opens gRPC channels to peers. Implementations must not block; channels should connect
/// lazily and reconnect by themselves.
pub trait Connector: Send + Sync + 'static + fmt::Debug {
    /// A channel to node `target`, whose Raft listener is at `addr` (`host:port`).
    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, ConnectError>;
}

/// Plain TCP (h2c) with lazy connection, connect timeout, TCP keepalive and no Nagle delay.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    /// Limit on establishing a TCP connection.
    pub connect_timeout: Duration,
    /// TCP keepalive probe interval.
    pub tcp_keepalive: Option<Duration>,
}

impl Default for TcpConnector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            tcp_keepalive: Some(Duration::from_secs(10)),
        }
    }
}

impl TcpConnector {
    /// The endpoint this connector would use for `addr`; a custom connector can start from it
    /// (for example to add TLS) and call `connect_lazy` itself.
    pub fn endpoint(&self, target: NodeId, addr: &str) -> Result<Endpoint, ConnectError> {
        let endpoint =
            Endpoint::from_shared(format!("http://{addr}")).map_err(|source| ConnectError {
                target,
                addr: addr.to_string(),
                source,
            })?;
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_keepalive(self.tcp_keepalive)
            .tcp_nodelay(true))
    }
}

impl Connector for TcpConnector {
    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, ConnectError> {
        Ok(self.endpoint(target, addr)?.connect_lazy())
    }
}

/// Mutual TLS over [`TcpConnector`]'s endpoints: this node presents its certificate and
/// accepts only peers whose certificate its site's CA issued.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    pub base: TcpConnector,
    /// Read at each connection, so a renewed certificate is presented from then on.
    pub tls: tandem_tls::LiveTls,
}

impl Connector for TlsConnector {
    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, ConnectError> {
        let dial = tandem_tls::dial::TlsDial::live(self.tls.clone())
            .with_keepalive(self.base.tcp_keepalive);
        Ok(self
            .base
            .endpoint(target, addr)?
            .connect_with_connector_lazy(dial))
    }
}
