//! Certificate rotation without downtime: a node notices that the files of its PKI
//! directory changed (a renewed certificate and key, a CA it trusts) and loads them for
//! the handshakes that follow; open connections keep what they were made with.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::pki::PkiDir;
use crate::{LiveTls, TlsConfig, TlsError};

/// What the files looked like: name, length and modification time of each.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn stamp(dir: &PkiDir) -> Stamp {
    let mut files = vec![dir.node_cert(), dir.node_key(), dir.ca_cert()];
    if let Ok(entries) = std::fs::read_dir(dir.trust_dir()) {
        files.extend(entries.flatten().map(|e| e.path()));
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (f, len, modified)
        })
        .collect()
}

/// Watches the PKI directory a configuration was loaded from.
#[derive(Debug)]
pub struct CertWatch {
    dir: PkiDir,
    current: TlsConfig,
    loaded: Stamp,
    seen: Stamp,
}

impl CertWatch {
    /// None when `current` was not loaded from a directory.
    pub fn new(current: &TlsConfig) -> Option<Self> {
        let dir = current.source()?.clone();
        let now = stamp(&dir);
        Some(Self {
            dir,
            current: current.clone(),
            loaded: now.clone(),
            seen: now,
        })
    }

    /// Looks at the files once. Answers a new configuration when they changed and then
    /// held still until this look (a certificate and its key are written one after the
    /// other: both are read together); an error when the new files cannot be used, or
    /// name another node (rotation renews a node's certificate, it never changes who the
    /// node is). Either way the files are not looked at again until they change.
    pub fn check(&mut self) -> Option<Result<TlsConfig, TlsError>> {
        let now = stamp(&self.dir);
        if now == self.loaded {
            self.seen = now;
            return None;
        }
        if now != self.seen {
            self.seen = now;
            return None;
        }
        self.loaded = now;
        let fresh = TlsConfig::load(&self.dir).and_then(|c| {
            if c.identity() == self.current.identity() {
                Ok(c)
            } else {
                Err(TlsError::Invalid(format!(
                    "the new certificate in {} names {}, not {}: kept the old one",
                    self.dir.dir.display(),
                    c.identity(),
                    self.current.identity()
                )))
            }
        });
        if let Ok(c) = &fresh {
            self.current = c.clone();
        }
        Some(fresh)
    }
}

/// How often a node looks at its PKI directory.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Keeps `live` loaded from the directory its configuration came from, handing each
/// reloaded configuration through `adjust` first (a manager adds its paired sites' CAs),
/// until `stop` completes.
pub async fn keep_loaded(
    live: LiveTls,
    adjust: impl Fn(TlsConfig) -> Result<TlsConfig, TlsError>,
    stop: impl std::future::Future<Output = ()>,
) {
    let Some(mut watch) = CertWatch::new(&live.current()) else {
        return;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
        match watch.check().map(|r| r.and_then(&adjust)) {
            None => {}
            Some(Ok(config)) => {
                tracing::info!(identity = %config.identity(), "loaded a renewed certificate; new connections use it");
                live.replace(config);
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "the changed certificate files were not loaded")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerIdentity;
    use crate::pki::SiteCa;

    #[test]
    fn a_renewed_certificate_is_loaded_once_it_holds_still_and_another_identity_never() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = SiteCa::generate("site-a1").unwrap();
        let pki = PkiDir::new(tmp.path());
        let me = PeerIdentity::manager("site-a1", 1).unwrap();
        ca.provision(&pki, &me).unwrap();
        let first = TlsConfig::load(&pki).unwrap();
        let mut watch = CertWatch::new(&first).unwrap();
        assert!(watch.check().is_none());
        ca.provision(&pki, &me).unwrap();
        assert!(
            watch.check().is_none(),
            "loaded while possibly half written"
        );
        let renewed = watch.check().expect("loaded").unwrap();
        assert_eq!(renewed.identity(), &me);
        assert_ne!(renewed.chain_leaf(), first.chain_leaf());
        assert!(watch.check().is_none());
        ca.provision(&pki, &PeerIdentity::manager("site-a1", 2).unwrap())
            .unwrap();
        assert!(watch.check().is_none());
        assert!(watch.check().expect("looked at").is_err());
        assert!(watch.check().is_none(), "retried without a change");
    }
}
