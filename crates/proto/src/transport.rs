//! The one acceptor for every gRPC listener of Tandem (managers, VRAs): accepted
//! connections are prepared here, so TLS can later wrap them in one place.

use futures::{Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;

/// Accepted connections of a listener, with Nagle off. tonic's `tcp_nodelay` applies only
/// to listeners it binds itself; on ours a gRPC reply written in several small pieces
/// would have its later pieces held back ~40 ms by Nagle plus the peer's delayed ACK.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> + Send {
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}
