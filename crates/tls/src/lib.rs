//! Mutual TLS for every connection between Tandem's nodes: who a certificate names
//! ([`identity`]), the site CA that issues them and the files they live in ([`pki`]), the
//! rustls configurations built from those files ([`config`]), the check of a site first
//! met by its CA's fingerprint ([`pin`]), renewed certificates loaded while serving
//! ([`reload`]), and the dialer clients use ([`dial`]). The acceptor side is
//! `tandem_proto::transport`, the one acceptor.

pub mod config;
pub mod dial;
pub mod identity;
pub mod pin;
pub mod pki;
pub mod reload;

pub use config::{ClientAuth, LiveTls, TlsConfig};
pub use identity::{PeerIdentity, PeerRole};
pub use rustls::ClientConfig;

/// What went wrong with certificates or keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider of every config: ring, chosen explicitly so nothing depends on a
/// process-wide default.
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
