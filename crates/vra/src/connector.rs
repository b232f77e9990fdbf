//! The one seam for outgoing connections between VRAs, so that a link emulator or mTLS can
//! be inserted in one place.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Opens gRPC channels to other VRAs. Replication streams are long-lived, so no request
/// timeout is set; HTTP/2 keepalives detect a dead peer instead.
#[derive(Debug, Clone)]
pub struct Connector {
    connect_timeout: Duration,
    keepalive: Duration,
    /// This VRA's certificate, as renewed (None: plaintext, `--insecure`).
    tls: Option<tandem_tls::LiveTls>,
}

impl Default for Connector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(5),
            tls: None,
        }
    }
}

impl Connector {
    /// Dials other VRAs over mutual TLS with this VRA's certificate.
    pub fn with_tls(mut self, tls: Option<tandem_tls::LiveTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Connects to `addr` (`host:port`, or a URI).
    pub async fn connect(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_timeout(self.keepalive * 2)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20));
        match &self.tls {
            Some(tls) => {
                endpoint
                    .connect_with_connector(tandem_tls::dial::TlsDial::live(tls.clone()))
                    .await
            }
            None => endpoint.connect().await,
        }
    }
}
