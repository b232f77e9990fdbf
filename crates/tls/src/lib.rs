//! Mutual TLS for every connection between Tandem's nodes: who a certificate names
//! ([`identity`]), certificates as text and their fingerprints ([`cert`]), the site CA that issues them and the files they live in ([`pki`]), the
//! rustls configurations built from those files ([`config`]), the check of a site first
//! met by its CA's fingerprint ([`pin`]), renewed certificates loaded while serving
//! ([`reload`]), and the dialer clients use ([`dial`]). Every byte of TLS is stock rustls
//! (through tokio-rustls): nothing here seals, opens or frames a record. The acceptor side
//! is `tandem_proto::transport`, the one acceptor.

pub mod cert;
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
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first (ring lists AES-256 first): TLS 1.3's mandatory suite, 128-bit
    // security, and 10 AES rounds instead of 14 on every byte a replication stream
    // carries. Both ends are ours, so this is what they agree on.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    std::sync::Arc::new(provider)
}

/// How much encrypted data rustls may hold before it is written out: its 64 KiB default
/// made a replication stream's sender write to its socket every 4 records.
pub const SEND_BUFFER: usize = 1 << 20;
