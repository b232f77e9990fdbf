//! Who a certificate names: one URI SAN, `tandem://<site>/manager/<node-id>`,
//! `tandem://<site>/vra/<host-id>` or `tandem://<site>/client/<name>`. A certificate is believed only after its chain was
//! verified against the CA of the site it names (see [`crate::config`]).

use std::fmt;

use crate::TlsError;

/// The kind of node a certificate was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// A site manager node.
    Manager,
    /// A host's VRA.
    Vra,
    /// A tool of the site's operators or hypervisors that reads and writes volumes over
    /// NBD (qemu, nbdcopy): admitted by a VRA's NBD port, by nothing else.
    Client,
}

impl PeerRole {
    pub fn name(self) -> &'static str {
        match self {
            PeerRole::Manager => "manager",
            PeerRole::Vra => "vra",
            PeerRole::Client => "client",
        }
    }
}

/// The identity a certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub site: String,
    pub role: PeerRole,
    pub id: String,
}

const SCHEME: &str = "tandem://";
/// Longest site or node id accepted in a certificate.
const MAX_PART: usize = 128;

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PART
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl PeerIdentity {
    pub fn new(site: &str, role: PeerRole, id: &str) -> Result<Self, TlsError> {
        if !valid_part(site) || !valid_part(id) {
            return Err(TlsError::Invalid(format!(
                "site {site:?} and id {id:?} must be 1 to {MAX_PART} of [A-Za-z0-9._-]"
            )));
        }
        Ok(Self {
            site: site.to_string(),
            role,
            id: id.to_string(),
        })
    }

    pub fn manager(site: &str, node_id: u64) -> Result<Self, TlsError> {
        Self::new(site, PeerRole::Manager, &node_id.to_string())
    }

    pub fn vra(site: &str, host: &str) -> Result<Self, TlsError> {
        Self::new(site, PeerRole::Vra, host)
    }

    pub fn client(site: &str, name: &str) -> Result<Self, TlsError> {
        Self::new(site, PeerRole::Client, name)
    }

    /// The URI SAN that names it.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}/{}", self.site, self.role.name(), self.id)
    }

    pub fn parse_uri(uri: &str) -> Result<Self, TlsError> {
        let bad = || TlsError::Invalid(format!("{uri:?} is not a Tandem identity"));
        let rest = uri.strip_prefix(SCHEME).ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(site), Some(role), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let role = match role {
            "manager" => PeerRole::Manager,
            "vra" => PeerRole::Vra,
            "client" => PeerRole::Client,
            _ => return Err(bad()),
        };
        Self::new(site, role, id).map_err(|_| bad())
    }

    /// The identity of a DER certificate: exactly one `tandem://` URI SAN. The chain must
    /// have been verified already; this only reads the name.
    pub fn from_cert(der: &[u8]) -> Result<Self, TlsError> {
        let der = rustls::pki_types::CertificateDer::from(der);
        let cert = webpki::EndEntityCert::try_from(&der)
            .map_err(|e| TlsError::Invalid(format!("unreadable certificate: {e:?}")))?;
        let mut ours = cert.valid_uri_names().filter(|u| u.starts_with(SCHEME));
        match (ours.next(), ours.next()) {
            (Some(uri), None) => Self::parse_uri(uri),
            _ => Err(TlsError::Invalid(
                "a certificate must name exactly one tandem:// identity".into(),
            )),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_bad_ones_are_refused() {
        let m = PeerIdentity::manager("site-3f2a", 2).unwrap();
        assert_eq!(m.uri(), "tandem://site-3f2a/manager/2");
        assert_eq!(PeerIdentity::parse_uri(&m.uri()).unwrap(), m);
        let v = PeerIdentity::vra("site-3f2a", "host-1").unwrap();
        assert_eq!(PeerIdentity::parse_uri(&v.uri()).unwrap(), v);
        for bad in [
            "",
            "tandem://",
            "tandem://s/manager",
            "tandem://s/admin/1",
            "tandem://s/manager/1/x",
            "tandem://../manager/1",
            "tandem://s/vra/a b",
            "https://s/manager/1",
        ] {
            assert!(PeerIdentity::parse_uri(bad).is_err(), "{bad}");
        }
        assert!(PeerIdentity::vra("s", &"x".repeat(129)).is_err());
    }
}
