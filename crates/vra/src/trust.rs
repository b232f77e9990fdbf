//! Which sites' VRAs this VRA believes: the CA certificates its managers give it
//! (`SetTrust`): the sites its site is paired with, kept in the data directory across
//! restarts and added to what its PKI directory holds (a site unpaired is dropped), and
//! its own site's, kept as the PKI directory's `ca.crt` (two while the site rotates its
//! CA).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tandem_core::error::Violations;
use tandem_tls::{LiveTls, TlsConfig, TlsError};

use crate::error::{VraError, VraResult};

/// The most paired sites a VRA trusts.
pub const MAX_TRUSTED_SITES: usize = 64;

/// One trusted site: its id and CA certificate (PEM).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TrustedSite {
    pub site_id: String,
    pub ca_pem: String,
}

/// The paired sites' CAs, applied to the VRA's live TLS configuration.
#[derive(Debug, Clone)]
pub struct PeerTrust {
    live: LiveTls,
    file: PathBuf,
    sites: Arc<Mutex<Vec<TrustedSite>>>,
}

impl PeerTrust {
    /// The trust kept in `file` (none if it does not exist yet), applied to `live`.
    pub fn load(live: LiveTls, file: PathBuf) -> Result<Self, TlsError> {
        let sites = match std::fs::read(&file) {
            Ok(bytes) if bytes.len() <= MAX_TRUSTED_SITES * 20 * 1024 => {
                serde_json::from_slice::<Vec<TrustedSite>>(&bytes)
                    .map_err(|e| TlsError::Invalid(format!("{}: {e}", file.display())))?
            }
            Ok(_) => return Err(TlsError::Invalid(format!("{}: too large", file.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(TlsError::Io { path: file, source }),
        };
        let trust = Self {
            live,
            file,
            sites: Arc::new(Mutex::new(Vec::new())),
        };
        trust.apply(sites, trust.live.current())?;
        Ok(trust)
    }

    fn sites(&self) -> std::sync::MutexGuard<'_, Vec<TrustedSite>> {
        self.sites.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `config` trusting also the paired sites (for a renewed configuration).
    pub fn adjust(&self, config: TlsConfig) -> Result<TlsConfig, TlsError> {
        let pairs: Vec<(String, String)> = self
            .sites()
            .iter()
            .map(|s| (s.site_id.clone(), s.ca_pem.clone()))
            .collect();
        config.with_peer_sites(&pairs)
    }

    /// Trusts `sites` besides what `base` (this VRA's own configuration) trusts, from the
    /// next handshake on (one replacement: no handshake meets half of it).
    fn apply(&self, mut sites: Vec<TrustedSite>, base: TlsConfig) -> Result<(), TlsError> {
        sites.sort();
        *self.sites() = sites;
        let config = self.adjust(base)?;
        self.live.replace(config);
        Ok(())
    }

    /// Checks `sites` (the whole set, as the managers give it) and `own_ca_pem` (the own
    /// site's CAs; empty: unchanged), keeps them on disk, then trusts exactly those from
    /// the next handshake on.
    pub fn set(&self, sites: Vec<TrustedSite>, own_ca_pem: &str) -> VraResult<()> {
        let current = self.live.current();
        let own = current.identity().site.clone();
        let mut v = Violations::new();
        v.check(
            sites.len() <= MAX_TRUSTED_SITES,
            "sites",
            format!("at most {MAX_TRUSTED_SITES}"),
        );
        for (i, s) in sites.iter().enumerate() {
            v.absorb(tandem_core::ids::SiteId::parse(
                &format!("sites[{i}].site_id"),
                &s.site_id,
            ));
            v.check(
                s.site_id != own,
                format!("sites[{i}].site_id"),
                "is this VRA's own site",
            );
            if let Err(e) = tandem_tls::cert::check_ca_bundle(&s.ca_pem) {
                v.add(format!("sites[{i}].ca_pem"), e.to_string());
            }
        }
        if !own_ca_pem.is_empty() {
            // It must keep the CA of the certificate in use: else this VRA's own site
            // would refuse it (a certificate of a new CA comes with InstallCertificate).
            match (
                tandem_tls::cert::check_ca_bundle(own_ca_pem),
                current.ca_fingerprint(),
            ) {
                (Err(e), _) => v.add("own_ca_pem", e.to_string()),
                (Ok(fps), Ok(issuer)) if !fps.contains(&issuer) => v.add(
                    "own_ca_pem",
                    format!("does not hold CA {issuer}, which issued this VRA's certificate"),
                ),
                _ => {}
            }
        }
        v.into_result()?;
        let base = if !own_ca_pem.is_empty() && own_ca_pem != current.ca_pem() {
            let dir = current.source().cloned().ok_or_else(|| {
                tandem_core::DomainError::precondition("this VRA's certificate has no directory")
            })?;
            let reloaded = dir
                .replace_ca(own_ca_pem)
                .and_then(|()| tandem_tls::TlsConfig::load(&dir))
                .map_err(|e| {
                    VraError::io("writing", &dir.ca_cert())(std::io::Error::other(e.to_string()))
                })?;
            tracing::info!("this VRA trusts its site's CAs as its managers name them");
            reloaded
        } else {
            current
        };
        let json = serde_json::to_vec(&sites).expect("trusted sites serialize");
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(VraError::io("writing", &self.file))?;
        self.apply(sites, base).map_err(|e| {
            VraError::io("applying", &self.file)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            ))
        })
    }

    /// The trusted sites with their CAs' fingerprints, sorted and joined by commas (for
    /// the status); the own site's too.
    pub fn fingerprints(&self) -> Vec<(String, String)> {
        use tandem_tls::cert::{bundle_key, check_ca_bundle};
        let current = self.live.current();
        let own = (
            current.identity().site.clone(),
            bundle_key(&current.own_ca_fingerprints()),
        );
        self.sites()
            .iter()
            .map(|s| {
                let fps = check_ca_bundle(&s.ca_pem).unwrap_or_default();
                (s.site_id.clone(), bundle_key(&fps))
            })
            .chain(std::iter::once(own))
            .collect()
    }

    /// The fingerprint of the CA that issued the certificate in use (empty: none this
    /// VRA trusts, or it is not valid now).
    pub fn issuer(&self) -> String {
        self.live.current().ca_fingerprint().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_tls::PeerIdentity;
    use tandem_tls::cert::{bundle_key, check_ca_pem};
    use tandem_tls::pki::{NODE_TTL, PkiDir, SiteCa};

    #[test]
    fn the_own_sites_cas_are_taken_only_with_the_ca_of_the_certificate_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new) = (
            SiteCa::generate("site-a1").unwrap(),
            SiteCa::generate("site-a1").unwrap(),
        );
        let pki = PkiDir::new(tmp.path().join("pki"));
        let me = PeerIdentity::vra("site-a1", "h1").unwrap();
        pki.install(old.cert_pem(), &old.issue(&me, NODE_TTL).unwrap())
            .unwrap();
        let live = LiveTls::new(TlsConfig::load(&pki).unwrap());
        let trust = PeerTrust::load(live.clone(), tmp.path().join("trust.json")).unwrap();
        let fp = |ca: &SiteCa| check_ca_pem(ca.cert_pem()).unwrap();
        let own = |t: &PeerTrust| {
            t.fingerprints()
                .into_iter()
                .find(|(s, _)| s == "site-a1")
                .unwrap()
                .1
        };
        assert_eq!(own(&trust), fp(&old));
        // Without the CA that issued its certificate: refused, nothing changes.
        assert!(trust.set(Vec::new(), new.cert_pem()).is_err());
        assert!(trust.set(Vec::new(), "not a certificate").is_err());
        assert_eq!(own(&trust), fp(&old));
        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        trust.set(Vec::new(), &both).unwrap();
        assert_eq!(own(&trust), bundle_key(&[fp(&old), fp(&new)]));
        assert_eq!(std::fs::read_to_string(pki.ca_cert()).unwrap(), both);
        assert_eq!(trust.issuer(), fp(&old));
        // Empty: unchanged.
        trust.set(Vec::new(), "").unwrap();
        assert_eq!(own(&trust), bundle_key(&[fp(&old), fp(&new)]));
    }
}
