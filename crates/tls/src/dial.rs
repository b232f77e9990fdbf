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

/// Where a dial takes its client configuration from, at each connection (so a renewed
/// certificate is presented from the next connection on).
type ConfigSource = Arc<dyn Fn() -> Result<Arc<ClientConfig>, crate::TlsError> + Send + Sync>;

/// Dials TLS connections with a node's client configuration.
#[derive(Clone)]
pub struct TlsDial {
    config: ConfigSource,
    keepalive: Option<Duration>,
}

impl std::fmt::Debug for TlsDial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsDial")
    }
}

impl TlsDial {
    /// Always with `config`.
    pub fn new(config: Arc<ClientConfig>) -> Self {
        Self::from_fn(move || Ok(config.clone()))
    }

    /// With the node's current client configuration.
    pub fn live(tls: crate::LiveTls) -> Self {
        Self::from_fn(move || Ok(tls.current().client()))
    }

    /// With the configuration `config` makes at each connection.
    pub fn from_fn(
        config: impl Fn() -> Result<Arc<ClientConfig>, crate::TlsError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            config: Arc::new(config),
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

/// A TLS handshake that failed on a certificate (the server's was not the expected one,
/// or the server refused ours), as opposed to a network failure: callers find it among an
/// error's causes and answer "refused", not "unreachable".
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake refused: {0}")]
pub struct HandshakeRefused(pub String);

impl HandshakeRefused {
    /// The refusal among `e`'s causes, if any.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a HandshakeRefused> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(r) = c.downcast_ref::<HandshakeRefused>() {
                return Some(r);
            }
            cause = c.source();
        }
        None
    }
}

impl tower::Service<http::Uri> for TlsDial {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = (self.config)();
        let keepalive = self.keepalive;
        Box::pin(async move {
            let config = config?;
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
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| -> BoxError {
                    // rustls reports a refused certificate (either side's) as bad data.
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        Box::new(HandshakeRefused(e.to_string()))
                    } else {
                        Box::new(e)
                    }
                })?;
            tls.get_mut().1.set_buffer_limit(Some(crate::SEND_BUFFER));
            Ok(TokioIo::new(tls))
        })
    }
}

/// The certificate (its leaf, DER) the TLS server at `addr` presents after a handshake
/// with `config`: which certificate a node serves, as an operator or a test sees it.
pub async fn served_certificate(
    addr: &str,
    config: Arc<ClientConfig>,
) -> Result<Vec<u8>, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(SERVER_NAME)?, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("the server presented no certificate")?;
    Ok(leaf.to_vec())
}
