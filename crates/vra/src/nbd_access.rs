//! Who reaches the VRA's NBD exports: the local host over a Unix socket (owner and group
//! only), anyone else over TCP only after NBD's STARTTLS with a certificate of this site's
//! CA (rustls does the TLS; this module only says whom it admits).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::FutureExt;
use tandem_nbd::server::{NbdIo, StartTls};
use tandem_tls::{ClientAuth, LiveTls};
use tokio::net::{TcpStream, UnixListener};

/// The IP addresses this VRA's certificate names, for NBD clients that check the address
/// they dial (libnbd's `nbds://`): its NBD listener's, unless it listens on every address.
pub fn certificate_ips(nbd_listen: &str) -> Vec<String> {
    match nbd_listen.parse::<std::net::SocketAddr>() {
        Ok(a) if !a.ip().is_unspecified() => vec![a.ip().to_string()],
        _ => Vec::new(),
    }
}

/// Binds the NBD Unix socket at `path` (its directory made if missing; a socket left by a
/// previous run replaced), readable and writable by its owner and group only.
pub fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the old socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding nbd {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// The NBD port's TLS: the VRA's current certificate (renewals are taken up by the next
/// handshake), a client certificate required, and of this site only (the VRA also trusts
/// its paired sites' CAs, for replication, but their holders have no business with this
/// site's disks).
pub struct NbdTls {
    tls: LiveTls,
    site: String,
}

impl NbdTls {
    pub fn new(tls: LiveTls) -> Arc<Self> {
        let site = tls.current().identity().site.clone();
        Arc::new(Self { tls, site })
    }
}

impl StartTls for NbdTls {
    fn accept(
        &self,
        tcp: TcpStream,
    ) -> futures::future::BoxFuture<'static, std::io::Result<Box<dyn NbdIo>>> {
        let (config, site) = (self.tls.current(), self.site.clone());
        async move {
            let refused =
                |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
            let (stream, peer) = config
                .accept(tcp, ClientAuth::Required)
                .await
                .map_err(|e| refused(e.to_string()))?;
            match peer {
                Some(peer) if peer.site == site => {
                    tracing::debug!(%peer, "nbd client admitted");
                    Ok(Box::new(stream) as Box<dyn NbdIo>)
                }
                Some(peer) => {
                    tracing::warn!(%peer, "nbd client of another site refused");
                    Err(refused(format!("{peer} is not of site {site}")))
                }
                None => Err(refused("no client certificate".into())),
            }
        }
        .boxed()
    }
}
