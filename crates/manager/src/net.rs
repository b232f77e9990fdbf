//! The one seam for outbound connections (to peer sites and to sibling managers), and the
//! one for inbound listeners, so TLS and link emulation can be inserted in one place.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{ApiError, ApiResult};

/// Opens gRPC channels to other nodes.
#[derive(Debug, Clone)]
pub struct Connector {
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Default for Connector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl Connector {
    fn endpoint(&self, addr: &str) -> ApiResult<Endpoint> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        Ok(Endpoint::from_shared(uri)
            .map_err(|e| {
                ApiError::Domain(tandem_core::DomainError::invalid("endpoint", e.to_string()))
            })?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .tcp_nodelay(true))
    }

    /// A lazily connecting channel to one address.
    pub fn lazy(&self, addr: &str) -> ApiResult<Channel> {
        Ok(self.endpoint(addr)?.connect_lazy())
    }

    /// A channel to the first of `addrs` that accepts a connection.
    pub async fn first_reachable(&self, addrs: &[String]) -> ApiResult<Channel> {
        let mut errors = Vec::new();
        for a in addrs {
            match self.endpoint(a)?.connect().await {
                Ok(ch) => return Ok(ch),
                Err(e) => errors.push(format!("{a}: {e}")),
            }
        }
        Err(ApiError::unavailable(format!(
            "no peer manager reachable ({})",
            errors.join("; ")
        )))
    }
}

/// Binds a listener: the one place inbound sockets are made (TLS will wrap it here).
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
