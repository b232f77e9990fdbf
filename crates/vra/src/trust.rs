//! Which paired sites' VRAs this VRA believes: the CA certificates its managers give it
//! (`SetTrust`, the sites its site is paired with), kept in the data directory across
//! restarts and added to what its PKI directory holds; a site unpaired is dropped.

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
        trust.apply(sites)?;
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

    fn apply(&self, mut sites: Vec<TrustedSite>) -> Result<(), TlsError> {
        sites.sort();
        *self.sites() = sites;
        let config = self.adjust(self.live.current())?;
        self.live.replace(config);
        Ok(())
    }

    /// Checks `sites` (the whole set, as the managers give it), keeps it on disk, then
    /// trusts exactly those sites from the next handshake on.
    pub fn set(&self, sites: Vec<TrustedSite>) -> VraResult<()> {
        let own = self.live.current().identity().site.clone();
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
            if let Err(e) = tandem_tls::config::check_ca_pem(&s.ca_pem) {
                v.add(format!("sites[{i}].ca_pem"), e.to_string());
            }
        }
        v.into_result()?;
        let json = serde_json::to_vec(&sites).expect("trusted sites serialize");
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(VraError::io("writing", &self.file))?;
        self.apply(sites).map_err(|e| {
            VraError::io("applying", &self.file)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            ))
        })
    }

    /// The trusted sites with their CAs' fingerprints (for the status).
    pub fn fingerprints(&self) -> Vec<(String, String)> {
        self.sites()
            .iter()
            .map(|s| {
                let fp = tandem_tls::config::check_ca_pem(&s.ca_pem).unwrap_or_default();
                (s.site_id.clone(), fp)
            })
            .collect()
    }
}
