//! This VRA's side of certificate renewal by its managers: a new key made here (its private
//! half never leaves the host), then the certificate they issue for it, checked and kept in
//! the PKI directory, and presented from the next handshake on.

use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use tandem_core::DomainError;
use tandem_tls::pki::{Issued, NodeKey, PkiDir};
use tandem_tls::{LiveTls, TlsConfig};

use crate::error::VraResult;
use crate::trust::PeerTrust;

/// The largest certificate accepted (a P-256 leaf is under 1 KiB of PEM).
const MAX_CERT_PEM: usize = 16 * 1024;

fn invalid(field: &str, e: impl std::fmt::Display) -> DomainError {
    DomainError::invalid(field, e.to_string())
}

/// Renews this VRA's certificate when its managers say so.
#[derive(Clone)]
pub struct Renewal {
    live: LiveTls,
    trust: PeerTrust,
    /// The key made for the next certificate, until it arrives.
    pending: Arc<Mutex<Option<NodeKey>>>,
}

impl std::fmt::Debug for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Renewal")
    }
}

impl Renewal {
    pub fn new(live: LiveTls, trust: PeerTrust) -> Self {
        Self {
            live,
            trust,
            pending: Arc::default(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<NodeKey>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the key for the next certificate (replacing any made before); answers its
    /// public half.
    pub fn new_key(&self) -> VraResult<Vec<u8>> {
        let key = NodeKey::generate().map_err(|e| invalid("key", e))?;
        let public = key.public_key().to_vec();
        *self.pending() = Some(key);
        Ok(public)
    }

    /// Checks the certificate issued for the pending key (this VRA's identity, issued by
    /// one of its site's CAs `ca_pem`, which hold one it trusts now, that key), keeps it
    /// in the PKI directory and presents it from now on.
    pub fn install(&self, cert_pem: &str, ca_pem: &str) -> VraResult<()> {
        let current = self.live.current();
        if cert_pem.len() > MAX_CERT_PEM {
            return Err(invalid("cert_pem", format!("at most {MAX_CERT_PEM} bytes")).into());
        }
        let cas = tandem_tls::cert::check_ca_bundle(ca_pem).map_err(|e| invalid("ca_pem", e))?;
        let trusted = current.own_ca_fingerprints();
        if !cas.iter().any(|fp| trusted.contains(fp)) {
            return Err(DomainError::precondition(format!(
                "none of the CAs {} is one this VRA trusts for its site ({})",
                cas.join(", "),
                trusted.join(", ")
            ))
            .into());
        }
        let dir = current
            .source()
            .cloned()
            .ok_or_else(|| DomainError::precondition("this VRA's certificate has no directory"))?;
        let mut pending = self.pending();
        let key = pending.as_ref().ok_or_else(|| {
            DomainError::precondition("no key is waiting for a certificate (NewCertificateKey)")
        })?;
        let issued = Issued {
            cert_pem: cert_pem.to_string(),
            key_pem: key.key_pem(),
        };
        // Checked in a staging directory first: the files in use are replaced only by a
        // certificate that loads, holds the pending key and names this VRA.
        let staging = PkiDir::new(dir.dir.join("renewing"));
        let staged = staging
            .install(ca_pem, &issued)
            .and_then(|()| TlsConfig::load(&staging));
        let _ = std::fs::remove_dir_all(&staging.dir);
        let staged = staged.map_err(|e| invalid("cert_pem", e))?;
        if staged.ca_fingerprint().is_err() {
            return Err(
                invalid("cert_pem", "was not issued by any of the CAs given with it").into(),
            );
        }
        if staged.identity() != current.identity() {
            return Err(invalid(
                "cert_pem",
                format!("names {}, not {}", staged.identity(), current.identity()),
            )
            .into());
        }
        dir.install(ca_pem, &issued)
            .map_err(|e| DomainError::precondition(e.to_string()))?;
        let renewed = TlsConfig::load(&dir)
            .and_then(|c| self.trust.adjust(c))
            .map_err(|e| DomainError::precondition(e.to_string()))?;
        self.live.replace(renewed);
        *pending = None;
        tracing::info!(identity = %current.identity(), "renewed this VRA's certificate");
        Ok(())
    }

    /// Until when the certificate in use is valid (ms since the epoch; 0: not valid now).
    pub fn valid_until_ms(&self) -> u64 {
        self.live
            .current()
            .valid_until()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tandem_tls::PeerIdentity;
    use tandem_tls::pki::SiteCa;

    #[test]
    fn only_a_certificate_for_the_pending_key_naming_this_vra_is_installed() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = SiteCa::generate("site-a1").unwrap();
        let me = PeerIdentity::vra("site-a1", "h1").unwrap();
        let pki = PkiDir::new(tmp.path().join("pki"));
        pki.install(
            ca.cert_pem(),
            &ca.issue(&me, Duration::from_secs(600)).unwrap(),
        )
        .unwrap();
        let live = LiveTls::new(TlsConfig::load(&pki).unwrap());
        let trust = PeerTrust::load(live.clone(), tmp.path().join("trust.json")).unwrap();
        let renewal = Renewal::new(live.clone(), trust);
        let before = renewal.valid_until_ms();
        assert!(before > 0);
        let ttl = Duration::from_secs(3600);

        // No key asked for yet.
        let key = NodeKey::generate().unwrap();
        let cert = ca.issue_to(&me, ttl, key.public_key()).unwrap();
        assert!(renewal.install(&cert, ca.cert_pem()).is_err());

        let public = renewal.new_key().unwrap();
        // For another key, another VRA, or from another CA: refused, nothing changes.
        let other_vra = PeerIdentity::vra("site-a1", "h2").unwrap();
        let rogue = SiteCa::generate("site-a1").unwrap();
        for (cert, ca_pem) in [
            (
                ca.issue_to(&me, ttl, key.public_key()).unwrap(),
                ca.cert_pem(),
            ),
            (
                ca.issue_to(&other_vra, ttl, &public).unwrap(),
                ca.cert_pem(),
            ),
            (rogue.issue_to(&me, ttl, &public).unwrap(), rogue.cert_pem()),
            ("garbage".to_string(), ca.cert_pem()),
        ] {
            assert!(renewal.install(&cert, ca_pem).is_err());
            assert_eq!(renewal.valid_until_ms(), before);
        }
        // The right one is kept and used from now on.
        let cert = ca.issue_to(&me, ttl, &public).unwrap();
        renewal.install(&cert, ca.cert_pem()).unwrap();
        assert!(renewal.valid_until_ms() > before + 2_000_000);
        assert_eq!(live.current().identity(), &me);
        assert_eq!(
            TlsConfig::load(&pki).unwrap().chain_leaf(),
            live.current().chain_leaf()
        );
        // Its key was used up: the same certificate again is refused.
        assert!(renewal.install(&cert, ca.cert_pem()).is_err());
    }
}
