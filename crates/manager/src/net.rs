//! The one seam for outbound connections (to peer sites and to sibling managers), and the
//! one for inbound listeners, so TLS and link emulation can be inserted in one place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{ApiError, ApiResult};

/// Opens gRPC channels to other nodes, and keeps one per address: a channel multiplexes
/// any number of calls over one HTTP/2 connection and reconnects by itself.
#[derive(Debug, Clone)]
pub struct Connector {
    connect_timeout: Duration,
    request_timeout: Duration,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// This node's certificate, for its own site's members and VRAs (None: `--insecure`).
    own: Option<tandem_tls::TlsConfig>,
}

impl Default for Connector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            channels: Arc::default(),
            own: None,
        }
    }
}

impl Connector {
    /// Dials the site's other members and its VRAs over mutual TLS with this node's
    /// certificate.
    pub fn with_site_tls(mut self, tls: Option<tandem_tls::TlsConfig>) -> Self {
        self.own = tls;
        self
    }

    /// The channel to a node of this site (another member's internal listener, a VRA's
    /// control listener): mutual TLS unless the node runs `--insecure`.
    pub fn own_site(&self, addr: &str) -> ApiResult<Channel> {
        let Some(tls) = &self.own else {
            return self.lazy(addr);
        };
        let key = format!("tls {addr}");
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(ch) = channels.get(&key) {
            return Ok(ch.clone());
        }
        let ch = self
            .endpoint(addr)?
            .connect_with_connector_lazy(tandem_tls::dial::TlsDial::new(tls.client()));
        if channels.len() >= 256 {
            channels.clear();
        }
        channels.insert(key, ch.clone());
        Ok(ch)
    }

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

    /// The channel to one address, connecting lazily on first use.
    pub fn lazy(&self, addr: &str) -> ApiResult<Channel> {
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let ch = self.endpoint(addr)?.connect_lazy();
        // Bounded: peers and sibling managers are few, but addresses can change over time.
        if channels.len() >= 256 {
            channels.clear();
        }
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
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

pub use tandem_proto::transport::incoming;
