//! The one acceptor for every gRPC listener of Tandem (managers, VRAs): accepted
//! connections are prepared and admitted here, so TLS can later wrap them in one place.
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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A connection admitted to a gRPC server; its place is freed when it closes.
#[derive(Debug)]
pub struct Admitted {
    stream: TcpStream,
    _active: tandem_net::Active,
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepted connections of a listener, admitted with the default limits (see the module
/// docs), with Nagle off. tonic's `tcp_nodelay` applies only to listeners it binds itself;
/// on ours a gRPC reply written in several small pieces would have its later pieces held
/// back ~40 ms by Nagle plus the peer's delayed ACK.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Admitted>> + Send {
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
            tokio::spawn(async move {
                if let Some(admitted) = admit(stream, pending).await {
                    let _ = tx.send(Ok(admitted)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Waits for the client's first bytes (within the handshake timeout, unless shed), then
/// admits the connection; `None`: it is closed.
async fn admit(stream: TcpStream, pending: tandem_net::Pending) -> Option<Admitted> {
    stream.set_nodelay(true).ok()?;
    let mut first = [0u8; 1];
    let spoke = tokio::select! {
        () = pending.shed().cancelled() => false,
        r = tokio::time::timeout(pending.handshake_timeout(), stream.peek(&mut first)) => {
            matches!(r, Ok(Ok(n)) if n > 0)
        }
    };
    if !spoke {
        return None;
    }
    let active = pending.admit()?;
    Some(Admitted {
        stream,
        _active: active,
    })
}
