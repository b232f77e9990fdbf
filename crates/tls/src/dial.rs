//! The client side of mutual TLS for tonic channels: a connector (a tower service from
//! URI to connection) that dials TCP and runs the TLS handshake, for
//! `Endpoint::connect_with_connector_lazy`. Channels keep `http://` URIs; TLS is ours.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::pki::SERVER_NAME;

/// Dials TLS connections with a node's client configuration.
#[derive(Clone)]
pub struct TlsDial {
    config: Arc<ClientConfig>,
    keepalive: Option<Duration>,
}

impl std::fmt::Debug for TlsDial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsDial")
    }
}

impl TlsDial {
    pub fn new(config: Arc<ClientConfig>) -> Self {
        Self {
            config,
            keepalive: None,
        }
    }

    /// TCP keepalive on the dialed sockets (tonic does not apply its own to a custom
    /// connector).
    pub fn with_keepalive(mut self, every: Option<Duration>) -> Self {
        self.keepalive = every;
        self
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for TlsDial {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        let keepalive = self.keepalive;
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| format!("{uri} names no host"))?
                .as_str()
                .to_string();
            let tcp = TcpStream::connect(&authority).await?;
            // As tonic does for its own connections: replies are small and latency-bound.
            tcp.set_nodelay(true)?;
            if let Some(every) = keepalive {
                let sock = socket2::SockRef::from(&tcp);
                sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(every))?;
            }
            let name = ServerName::try_from(SERVER_NAME)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}
