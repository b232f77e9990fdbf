//! The one seam for outbound connections (to peer sites and to sibling managers), and the
//! one for inbound listeners, so TLS and link emulation can be inserted in one place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use tandem_core::pairing::PeerSite;

use crate::error::{ApiError, ApiResult};

/// What the channel cache's keys for paired sites start with.
const PEER_KEY: &str = "peer ";

/// What names a paired site's channels in the cache: a hash of its CA certificate.
pub(crate) fn peer_key(ca_pem: &str) -> String {
    tandem_tls::cert::fingerprint(ca_pem.as_bytes())
}

/// Whether a cached channel is to a node of this site or to a site in `paired`.
fn still_paired(key: &str, paired: &std::collections::HashSet<String>) -> bool {
    key.strip_prefix(PEER_KEY)
        .and_then(|rest| rest.split_once(' '))
        .is_none_or(|(site, _)| paired.contains(site))
}

/// Opens gRPC channels to other nodes, and keeps one per address: a channel multiplexes
/// any number of calls over one HTTP/2 connection and reconnects by itself.
#[derive(Debug, Clone)]
pub struct Connector {
    connect_timeout: Duration,
    request_timeout: Duration,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// This node's certificate, as renewed (None: `--insecure`).
    own: Option<tandem_tls::LiveTls>,
    /// The site it names.
    own_site_id: Option<Arc<str>>,
}

impl Default for Connector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            channels: Arc::default(),
            own: None,
            own_site_id: None,
        }
    }
}

impl Connector {
    /// Dials the site's other members and its VRAs over mutual TLS with this node's
    /// certificate.
    pub fn with_site_tls(mut self, tls: Option<tandem_tls::LiveTls>) -> Self {
        self.own_site_id = tls
            .as_ref()
            .map(|t| t.current().identity().site.as_str().into());
        self.own = tls;
        self
    }

    /// The site this node's certificate names (None: `--insecure`).
    pub fn tls_site_id(&self) -> Option<&str> {
        self.own_site_id.as_deref()
    }

    /// This node's certificate (None: `--insecure`).
    pub fn site_tls(&self) -> Option<tandem_tls::TlsConfig> {
        self.own.as_ref().map(|t| t.current())
    }

    /// The channel to a node of this site (another member's internal listener, a VRA's
    /// control listener): mutual TLS unless the node runs `--insecure`.
    pub fn own_site(&self, addr: &str) -> ApiResult<Channel> {
        match &self.own {
            Some(tls) => self.tls_channel(
                format!("tls {addr}"),
                addr,
                tandem_tls::dial::TlsDial::live(tls.clone()),
            ),
            None => self.lazy(addr),
        }
    }

    /// The channel to a manager of paired site `peer`: this node's certificate, and only
    /// that site's CA (pinned at pairing) trusted for the server.
    pub fn peer_site(&self, peer: &PeerSite, addr: &str) -> ApiResult<Channel> {
        let Some(tls) = &self.own else {
            return self.lazy(addr);
        };
        if peer.ca_pem.is_empty() {
            return Err(ApiError::Domain(tandem_core::DomainError::precondition(
                format!(
                    "site {} was paired without TLS; unpair it and pair it again",
                    peer.name
                ),
            )));
        }
        let key = format!("{PEER_KEY}{} {addr}", peer_key(&peer.ca_pem));
        let (tls, pem) = (tls.clone(), peer.ca_pem.clone());
        let dial = tandem_tls::dial::TlsDial::from_fn(move || tls.current().peer_client(&pem));
        self.tls_channel(key, addr, dial)
    }

    /// Drops the cached channels to sites no longer paired (`paired`: the fingerprints of
    /// the paired sites' CAs), so their connections close once no call uses them.
    pub fn forget_unpaired(&self, paired: &std::collections::HashSet<String>) {
        self.channels
            .lock()
            .expect("channel cache poisoned")
            .retain(|key, _| still_paired(key, paired));
    }

    /// The cached TLS channel under `key`, or a new one (connecting on first use).
    fn tls_channel(
        &self,
        key: String,
        addr: &str,
        dial: tandem_tls::dial::TlsDial,
    ) -> ApiResult<Channel> {
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(ch) = channels.get(&key) {
            return Ok(ch.clone());
        }
        let ch = self.endpoint(addr)?.connect_with_connector_lazy(dial);
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

    /// A channel to the first of `addrs` that accepts a connection, over TLS with
    /// `tls` when given (a first contact, such as pairing).
    pub async fn first_reachable(
        &self,
        addrs: &[String],
        tls: Option<Arc<tandem_tls::ClientConfig>>,
    ) -> ApiResult<Channel> {
        let mut errors = Vec::new();
        for a in addrs {
            let endpoint = self.endpoint(a)?;
            let connected = match &tls {
                Some(c) => {
                    endpoint
                        .connect_with_connector(tandem_tls::dial::TlsDial::new(c.clone()))
                        .await
                }
                None => endpoint.connect().await,
            };
            match connected {
                Ok(ch) => return Ok(ch),
                Err(e) => {
                    if let Some(refused) = tandem_tls::dial::HandshakeRefused::find(&e) {
                        return Err(ApiError::Peer(
                            format!("{a}: {refused}"),
                            tonic::Code::PermissionDenied,
                        ));
                    }
                    errors.push(format!("{a}: {}", tandem_proto::client::with_causes(&e)));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_channels_to_unpaired_sites_are_forgotten() {
        let paired = std::collections::HashSet::from([peer_key("ca of b")]);
        let to_b = format!("{PEER_KEY}{} 10.0.0.2:7500", peer_key("ca of b"));
        let to_c = format!("{PEER_KEY}{} 10.0.0.3:7500", peer_key("ca of c"));
        assert!(still_paired(&to_b, &paired));
        assert!(!still_paired(&to_c, &paired));
        // Channels within the site stay.
        assert!(still_paired("tls 127.0.0.1:7500", &paired));
        assert!(still_paired("127.0.0.1:7400", &paired));
    }
}
