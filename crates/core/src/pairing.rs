//! Site pairing: one-time tokens issued by one site and presented by the other, and the
//! record each site keeps of its peers.

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::error::{DomainError, Violations};
use crate::ids::{SiteId, check_address, check_name};

/// How long a pairing token stays valid by default.
pub const PAIRING_TOKEN_TTL_MS: u64 = 60 * 60 * 1000;

/// A one-time secret that lets one other site pair with this one, as the site keeps it:
/// the blake3 hash of the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredPairingToken")]
pub struct PairingToken {
    /// blake3 of the secret, hex.
    pub token_hash: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A token as a snapshot or log entry holds it: those written before hashes were kept
/// hold the secret, which is hashed as it is read (and never written again).
#[derive(Deserialize)]
struct StoredPairingToken {
    #[serde(default)]
    token_hash: String,
    #[serde(default)]
    token: LegacySecret,
    issued_at_ms: u64,
    expires_at_ms: u64,
}

impl From<StoredPairingToken> for PairingToken {
    fn from(t: StoredPairingToken) -> Self {
        Self {
            token_hash: if t.token_hash.is_empty() {
                t.token.hash()
            } else {
                t.token_hash
            },
            issued_at_ms: t.issued_at_ms,
            expires_at_ms: t.expires_at_ms,
        }
    }
}

impl PairingToken {
    /// A token for `secret`, valid from `now_ms` for `ttl_ms`.
    pub fn new(secret: &PairingSecret, now_ms: u64, ttl_ms: u64) -> Self {
        Self {
            token_hash: secret.hash(),
            issued_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        }
    }

    /// Whether `presented_hash` (blake3 hex of a presented secret) is this token's, in
    /// constant time (blake3's `Hash` compares so).
    pub fn matches(&self, presented_hash: &str) -> bool {
        match (
            blake3::Hash::from_hex(&self.token_hash),
            blake3::Hash::from_hex(presented_hash),
        ) {
            (Ok(stored), Ok(presented)) => stored == presented,
            _ => false,
        }
    }
}

/// A secret from a record written before hashes were kept: read only to be hashed; no
/// Debug text.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct LegacySecret(String);

impl LegacySecret {
    /// blake3 of it, hex (of the empty string when there is none).
    pub fn hash(&self) -> String {
        blake3::hash(self.0.as_bytes()).to_hex().to_string()
    }
}

impl Drop for LegacySecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for LegacySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "none"
        } else {
            "<secret>"
        })
    }
}

/// The secret of a pairing token, as issued or presented: shown to the operator once,
/// hashed before it goes anywhere else (no Debug or Display: it never reaches a log), zeroed
/// when dropped.
pub struct PairingSecret(String);

impl Drop for PairingSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PairingSecret {
    /// A secret of 32 random bytes (the caller draws them: this crate does no IO), in hex.
    pub fn from_random(bytes: [u8; 32]) -> Self {
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A presented secret (checked for length by the caller).
    pub fn presented(secret: String) -> Self {
        Self(secret)
    }

    /// blake3 of the secret, hex: what the state and the Raft log hold.
    pub fn hash(&self) -> String {
        blake3::hash(self.0.as_bytes()).to_hex().to_string()
    }

    /// The secret itself, to hand to the operator once.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

/// What an operator carries from one site to the other: the token and, when the issuing
/// site runs TLS, its CA's fingerprint, as `<token>.<sha256-hex>`.
pub fn pairing_code(token: &str, ca_fingerprint: Option<&str>) -> String {
    match ca_fingerprint {
        Some(fp) => format!("{token}.{fp}"),
        None => token.to_string(),
    }
}

/// A pairing code's token and the CA fingerprint it pins, if any.
pub fn split_pairing_code(code: &str) -> (&str, Option<&str>) {
    match code.trim().split_once('.') {
        Some((token, fp)) => (token, Some(fp)),
        None => (code.trim(), None),
    }
}

/// A site this site is paired with, and where its managers listen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSite {
    pub id: SiteId,
    pub name: String,
    /// Internal addresses (`host:port`) of the peer's manager nodes: where it serves paired
    /// sites.
    pub endpoints: Vec<String>,
    pub paired_at_ms: u64,
    /// The most this site's VRAs may send to that site, in bytes per second (0: no limit);
    /// the streams share it by priority.
    #[serde(default)]
    pub bandwidth_limit_bytes_per_sec: u64,
    /// The peer's CA certificate (PEM), pinned at pairing: its managers and VRAs are
    /// believed only with certificates this CA issued. Empty: paired without TLS
    /// (`--insecure`).
    #[serde(default)]
    pub ca_pem: String,
}

/// The longest CA certificate a peer may hand over at pairing.
pub const MAX_CA_PEM: usize = 16 * 1024;

/// The smallest bandwidth limit that can be set (below it a stream cannot keep up even
/// with its checkpoints).
pub const MIN_BANDWIDTH_LIMIT: u64 = 64 * 1024;
/// The largest (100 GB/s).
pub const MAX_BANDWIDTH_LIMIT: u64 = 100_000_000_000;

/// A bandwidth limit is 0 (none) or within [`MIN_BANDWIDTH_LIMIT`, `MAX_BANDWIDTH_LIMIT`].
pub fn check_bandwidth_limit(bytes_per_sec: u64) -> Result<(), DomainError> {
    if bytes_per_sec == 0 || (MIN_BANDWIDTH_LIMIT..=MAX_BANDWIDTH_LIMIT).contains(&bytes_per_sec) {
        Ok(())
    } else {
        Err(DomainError::invalid(
            "bytes_per_sec",
            format!(
                "must be 0 (no limit) or {MIN_BANDWIDTH_LIMIT} to {MAX_BANDWIDTH_LIMIT} bytes per second"
            ),
        ))
    }
}

impl PeerSite {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.absorb(check_name("name", &self.name));
        v.check(
            !self.endpoints.is_empty(),
            "endpoints",
            "at least one manager address is needed",
        );
        v.check(
            self.endpoints.len() <= 16,
            "endpoints",
            "at most 16 addresses",
        );
        for (i, e) in self.endpoints.iter().enumerate() {
            v.absorb(check_address(&format!("endpoints[{i}]"), e));
        }
        v.check(
            self.ca_pem.len() <= MAX_CA_PEM,
            "ca_pem",
            format!("at most {MAX_CA_PEM} bytes"),
        );
        v.check(
            self.ca_pem.is_empty()
                || self
                    .ca_pem
                    .trim_start()
                    .starts_with("-----BEGIN CERTIFICATE-----"),
            "ca_pem",
            "must be a PEM certificate",
        );
        v.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pairing_code_carries_its_token_and_the_pinned_fingerprint() {
        let fp = "ab".repeat(32);
        let code = pairing_code("t0k3n", Some(&fp));
        assert_eq!(split_pairing_code(&code), ("t0k3n", Some(fp.as_str())));
        assert_eq!(split_pairing_code(" t0k3n\n"), ("t0k3n", None));
        assert_eq!(pairing_code("t0k3n", None), "t0k3n");
    }

    #[test]
    fn a_peer_ca_is_bounded_and_must_be_pem() {
        let mut p = PeerSite {
            id: SiteId::minted("b".into()),
            name: "b".into(),
            endpoints: vec!["127.0.0.1:1".into()],
            paired_at_ms: 0,
            bandwidth_limit_bytes_per_sec: 0,
            ca_pem: "not a certificate".into(),
        };
        assert!(p.validate().is_err());
        p.ca_pem = format!("-----BEGIN CERTIFICATE-----\n{}", "A".repeat(MAX_CA_PEM));
        assert!(p.validate().is_err());
        p.ca_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
        assert!(p.validate().is_ok());
    }
}
