//! The one acceptor for every gRPC listener of Tandem (managers, VRAs): accepted
//! connections are prepared and admitted here, and, on a listener that demands it, go
//! through the mutual TLS handshake here, so the peer's identity is known in one place.
//!
//! Admission ([`tandem_net`]): a connection is handed to the gRPC server only once its
//! client has spoken (an HTTP/2 preface, or later a TLS hello). Until then it is pending:
//! at most [`tandem_net::Limits::max_pending`] are, a newer one sheds the oldest, and one
//! silent past the handshake timeout is closed. Served connections are capped. So
//! thousands of idle connections to a manager or VRA port cannot keep its clients out.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tandem_tls::{ClientAuth, LiveTls, PeerIdentity, TlsConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// What a served request knows of its connection (in its extensions): addresses, and on
/// a mutual TLS listener who the client is, from its verified certificate.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub local: Option<std::net::SocketAddr>,
    pub remote: Option<std::net::SocketAddr>,
    pub peer: Option<std::sync::Arc<PeerIdentity>>,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tandem_tls::config::ServerStream>),
}

/// A connection admitted to a gRPC server; its place is freed when it closes.
#[derive(Debug)]
pub struct Admitted {
    io: Io,
    info: PeerInfo,
    _active: tandem_net::Active,
}

impl Connected for Admitted {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Which identities a mutual TLS listener serves.
pub type Admit = std::sync::Arc<dyn Fn(&PeerIdentity) -> bool + Send + Sync>;

/// How a listener takes its connections.
#[derive(Clone)]
pub enum Security {
    /// Plain HTTP/2 (`--insecure`).
    Plain,
    /// Mutual TLS: a client certificate of the site's CA, whose identity `admit` accepts.
    /// The configuration is read afresh for each handshake (renewed certificates).
    MutualTls { tls: LiveTls, admit: Admit },
    /// TLS with the node's certificate; a client certificate is optional (operators bring
    /// tokens instead) and, when sent, must be of a trusted site's CA. The configuration is
    /// read afresh for each handshake (pairing changes whom it trusts).
    ServerTls { tls: LiveTls },
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Plain => f.write_str("Plain"),
            Security::MutualTls { tls, .. } => write!(f, "MutualTls({:?})", tls.current()),
            Security::ServerTls { tls } => write!(f, "ServerTls({:?})", tls.current()),
        }
    }
}

/// Accepted connections of a listener, admitted with the default limits (see the module
/// docs), with Nagle off. tonic's `tcp_nodelay` applies only to listeners it binds itself;
/// on ours a gRPC reply written in several small pieces would have its later pieces held
/// back ~40 ms by Nagle plus the peer's delayed ACK.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Admitted>> + Send {
    incoming_with(listener, Security::Plain)
}

/// Accepted connections of a listener, admitted (see [`incoming`]) and, with mutual TLS,
/// handed to the server only after a handshake that proved an admitted identity; the
/// handshake counts as the client's first words, so it too is bounded by the timeout.
pub fn incoming_with(
    listener: TcpListener,
    security: Security,
) -> impl Stream<Item = io::Result<Admitted>> + Send {
    let admission = tandem_net::Admission::new(tandem_net::Limits::default());
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // The server stopped taking connections: stop accepting.
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let pending = admission.arrive();
            let tx = tx.clone();
            let security = security.clone();
            tokio::spawn(async move {
                if let Some(admitted) = admit(stream, pending, security).await {
                    let _ = tx.send(Ok(admitted)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Waits for the client's first bytes, or its whole TLS handshake (within the handshake
/// timeout, unless shed), then admits the connection; `None`: it is closed.
async fn admit(
    stream: TcpStream,
    pending: tandem_net::Pending,
    security: Security,
) -> Option<Admitted> {
    stream.set_nodelay(true).ok()?;
    let (local, remote) = (stream.local_addr().ok(), stream.peer_addr().ok());
    let timeout = pending.handshake_timeout();
    let (io, peer) = match security {
        Security::Plain => {
            let mut first = [0u8; 1];
            let spoke = tokio::select! {
                () = pending.shed().cancelled() => false,
                r = tokio::time::timeout(timeout, stream.peek(&mut first)) => {
                    matches!(r, Ok(Ok(n)) if n > 0)
                }
            };
            if !spoke {
                return None;
            }
            (Io::Plain(stream), None)
        }
        Security::MutualTls { tls, admit } => {
            let (s, peer) = handshake(
                &tls.current(),
                stream,
                ClientAuth::Required,
                &pending,
                remote,
            )
            .await?;
            let peer = peer?;
            if !admit(&peer) {
                tracing::warn!(?remote, peer = %peer, "connection refused: this listener does not serve that identity");
                return None;
            }
            (Io::Tls(Box::new(s)), Some(peer))
        }
        Security::ServerTls { tls } => {
            let (s, peer) = handshake(
                &tls.current(),
                stream,
                ClientAuth::Optional,
                &pending,
                remote,
            )
            .await?;
            (Io::Tls(Box::new(s)), peer)
        }
    };
    let active = pending.admit()?;
    Some(Admitted {
        io,
        info: PeerInfo {
            local,
            remote,
            peer: peer.map(std::sync::Arc::new),
        },
        _active: active,
    })
}

/// The server side of a TLS handshake within the handshake timeout (unless shed); None:
/// it failed and the connection is closed.
async fn handshake(
    tls: &TlsConfig,
    stream: TcpStream,
    auth: ClientAuth,
    pending: &tandem_net::Pending,
    remote: Option<std::net::SocketAddr>,
) -> Option<(tandem_tls::config::ServerStream, Option<PeerIdentity>)> {
    let shook = tokio::select! {
        () = pending.shed().cancelled() => return None,
        r = tokio::time::timeout(pending.handshake_timeout(), tls.accept(stream, auth)) => r,
    };
    match shook {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            tracing::warn!(?remote, error = %e, "connection refused: TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}
