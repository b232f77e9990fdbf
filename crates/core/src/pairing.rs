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
