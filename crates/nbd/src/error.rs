//! The crate's error type.

use std::{io, path::PathBuf};

use crate::proto::{ErrorCode, ProtocolError};

/// Errors of the NBD server, client and file device.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A socket or file operation failed.
    #[error("io error: {0}")]
    Io(#[from] io::Error),
    /// A file could not be opened or created.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// An export of that name is already registered.
    #[error("export {0:?} already exists")]
    ExportExists(String),
    /// An export name the protocol cannot carry.
    #[error("invalid export name {name:?}: {reason}")]
    InvalidExportName {
        /// The name (shortened).
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The server answered an option with an error (client side).
    #[error("server refused option {option} with reply {reply:#x}: {message}")]
    OptionRefused {
        /// The option.
        option: u32,
        /// The error reply type (`proto::rep::ERR_*`).
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server answered a request with an error (client side).
    #[error("server replied with error {0}")]
    Remote(ErrorCode),
    /// The client did not finish the handshake in time (or was shed for a newer one).
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The server serves as many connections as it may.
    #[error("too many connections")]
    TooManyConnections,
    /// The connection closed before the exchange completed.
    #[error("connection closed")]
    Disconnected,
}

impl NbdError {
    /// The NBD error value the server replied with, if this is such an error.
    pub fn remote_error(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote(code) => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::File { path, source }
    }
}
