//! Typed identifiers. Ids are opaque strings minted by the manager (never by the state
//! machine, which must stay deterministic) and checked for shape on receipt.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::DomainError;

/// The longest id or name accepted anywhere.
pub const MAX_ID_LEN: usize = 64;
/// The longest human-readable name accepted.
pub const MAX_NAME_LEN: usize = 80;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// What the id names, for messages.
            pub const KIND: &'static str = $kind;

            /// Checks the shape of an id taken from a request.
            pub fn parse(field: &str, s: &str) -> Result<Self, DomainError> {
                check_id(field, s)?;
                Ok(Self(s.to_string()))
            }

            /// Wraps an id minted by this program.
            pub fn minted(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Checks the shape of an id that arrived inside a document (a definition
            /// from the peer site), as [`Self::parse`] checks one from a request.
            pub fn check(&self, field: &str) -> Result<(), DomainError> {
                check_id(field, &self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A site, fixed when the site is first bootstrapped.
    SiteId, "site");
id_type!(
    /// A hypervisor host with its VRA.
    HostId, "host");
id_type!(
    /// A datastore on a host.
    DatastoreId, "datastore");
id_type!(
    /// A resource pool.
    PoolId, "resource pool");
id_type!(
    /// A virtual machine.
    VmId, "vm");
id_type!(
    /// A virtual protection group.
    VpgId, "vpg");
id_type!(
    /// A recovery operation (failover or move) of a VPG: the key that makes its steps
    /// idempotent at the VRAs.
    RecoveryOpId, "recovery operation");

fn check_id(field: &str, s: &str) -> Result<(), DomainError> {
    if s.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if s.len() > MAX_ID_LEN {
        return Err(DomainError::invalid(
            field,
            format!("must be at most {MAX_ID_LEN} characters"),
        ));
    }
    if s == "." || s == ".." {
        // Ids name directories (`<datastore>/<vpg>/<vm>/`).
        return Err(DomainError::invalid(field, "must not be '.' or '..'"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(DomainError::invalid(
            field,
            "may contain only letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// Checks a human-readable name: non-empty, bounded, printable, no surrounding blanks.
pub fn check_name(field: &str, s: &str) -> Result<(), DomainError> {
    if s.trim().is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if s.chars().count() > MAX_NAME_LEN {
        return Err(DomainError::invalid(
            field,
            format!("must be at most {MAX_NAME_LEN} characters"),
        ));
    }
    if s.trim() != s {
        return Err(DomainError::invalid(
            field,
            "must not start or end with white space",
        ));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(DomainError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks a `host:port` address.
pub fn check_address(field: &str, s: &str) -> Result<(), DomainError> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(DomainError::invalid(field, "must be host:port"));
    };
    if host.is_empty() || host.len() > 253 || host.chars().any(|c| c.is_whitespace()) {
        return Err(DomainError::invalid(field, "must be host:port with a host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(DomainError::invalid(field, "port must be 1..65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(VmId::parse("vm_id", "vm-1").is_ok());
        assert!(VmId::parse("vm_id", "").is_err());
        assert!(VmId::parse("vm_id", "a b").is_err());
        assert!(VmId::parse("vm_id", &"x".repeat(65)).is_err());
        assert!(VmId::parse("vm_id", "..").is_err(), "ids name directories");
        assert!(VmId::parse("vm_id", "vm.1").is_ok());
        assert!(VmId::minted("../x".into()).check("vm_id").is_err());
    }

    #[test]
    fn names_and_addresses_are_checked() {
        assert!(check_name("name", "web tier").is_ok());
        assert!(check_name("name", " web").is_err());
        assert!(check_name("name", "a\nb").is_err());
        assert!(check_address("a", "127.0.0.1:80").is_ok());
        assert!(check_address("a", "[::1]:80").is_ok());
        assert!(check_address("a", "localhost").is_err());
        assert!(check_address("a", "h:0").is_err());
    }
}
