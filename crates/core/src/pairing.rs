//! Site pairing: one-time tokens issued by one site and presented by the other, and the
//! record each site keeps of its peers.

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Violations};
use crate::ids::{SiteId, check_address, check_name};

/// How long a pairing token stays valid by default.
pub const PAIRING_TOKEN_TTL_MS: u64 = 60 * 60 * 1000;

/// A one-time secret that lets one other site pair with this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingToken {
    pub token: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A site this site is paired with, and where its managers listen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSite {
    pub id: SiteId,
    pub name: String,
    /// API addresses (`host:port`) of the peer's manager nodes.
    pub endpoints: Vec<String>,
    pub paired_at_ms: u64,
    /// The most this site's VRAs may send to that site, in bytes per second (0: no limit);
    /// the streams share it by priority.
    #[serde(default)]
    pub bandwidth_limit_bytes_per_sec: u64,
}

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
        v.into_result()
    }
}
