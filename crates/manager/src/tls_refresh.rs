//! Keeps a node's TLS current while it serves: renewed certificates taken up from the PKI
//! directory, and whom the internal port trusts (exactly the paired sites' CAs).

use std::sync::Arc;

use crate::net::peer_key;
use crate::node::ManagerNode;

/// Keeps the node's TLS current until `shutdown`: `member` (the operator port, Raft and
/// forwarding, VRAs) takes up a renewed certificate from the PKI directory, and
/// `with_peers` (the internal port, where paired sites call) is `member` trusting also the
/// CAs of exactly the sites this site is paired with, as its replicated state names them: pairing admits a site's managers as
/// peers, unpairing withdraws them.
pub async fn keep_tls(
    node: Arc<ManagerNode>,
    member: tandem_tls::LiveTls,
    with_peers: tandem_tls::LiveTls,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut watch = tandem_tls::reload::CertWatch::new(&member.current());
    let mut changes = node.store().watch_metrics();
    let mut trusted: Option<Vec<(String, String)>> = None;
    loop {
        let mut renewed = false;
        match watch.as_mut().and_then(|w| w.check()) {
            None => {}
            Some(Ok(config)) => {
                tracing::info!(identity = %config.identity(), "loaded a renewed certificate; new connections use it");
                member.replace(config);
                renewed = true;
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "the changed certificate files were not loaded")
            }
        }
        // This wakes on every applied entry: compare in place, copy only on a change.
        let changed: Option<Vec<(String, String)>> = node.read_local(|s| {
            let current = s.peers.values().filter(|p| !p.ca_pem.is_empty());
            let unchanged = trusted.as_ref().is_some_and(|t| {
                t.len() == current.clone().count()
                    && current
                        .clone()
                        .zip(t)
                        .all(|(p, (id, pem))| p.id.as_str() == id && p.ca_pem == *pem)
            });
            (!unchanged).then(|| {
                current
                    .map(|p| (p.id.to_string(), p.ca_pem.clone()))
                    .collect()
            })
        });
        if let Some(peers) = &changed {
            node.connector()
                .forget_unpaired(&peers.iter().map(|(_, pem)| peer_key(pem)).collect());
        }
        if renewed || changed.is_some() {
            let peers = changed.unwrap_or_else(|| trusted.clone().unwrap_or_default());
            match member.current().with_peer_sites(&peers) {
                Ok(config) => {
                    with_peers.replace(config);
                    let sites: Vec<&str> = peers.iter().map(|(s, _)| s.as_str()).collect();
                    tracing::info!(?sites, "the internal port trusts these paired sites' CAs");
                }
                Err(e) => {
                    tracing::error!(error = %e, "a paired site's CA is unusable; trust unchanged")
                }
            }
            trusted = Some(peers);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(tandem_tls::reload::CHECK_EVERY) => {}
        }
    }
}
