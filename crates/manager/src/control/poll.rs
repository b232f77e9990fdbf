//! The leader's poller: every [`POLL_EVERY`], the status of every VRA of this site and the
//! report of every peer site that shares a VPG, read in parallel into [`super::Live`].

use tandem_core::ids::{HostId, SiteId, VpgId};
use tandem_core::pairing::PeerSite;
use tandem_proto::v1;
use tandem_proto::vra_convert;
use tokio_util::sync::CancellationToken;

use super::live::VraPoll;
use super::{POLL_EVERY, every, vra_request};
use crate::site::SiteManager;

/// Polls until `cancel`.
pub async fn run(site: SiteManager, cancel: CancellationToken) {
    every(POLL_EVERY, &cancel, None, || poll_once(&site)).await;
}

/// One round: every VRA and every peer, at once.
pub async fn poll_once(site: &SiteManager) {
    let (hosts, peers): (Vec<(HostId, String)>, Vec<PeerSite>) = site.node().read_local(|s| {
        let hosts = s
            .hosts
            .values()
            .map(|h| (h.id.clone(), h.vra_address.clone()))
            .collect();
        let own = s.site_id();
        let peers = s
            .peers
            .values()
            .filter(|p| own.is_some_and(|own| s.vpgs.values().any(|g| g.joins(own, &p.id))))
            .cloned()
            .collect();
        (hosts, peers)
    });
    let vras = futures::future::join_all(hosts.into_iter().map(|(host, addr)| async move {
        let r = poll_vra(site, &addr).await;
        site.control().live.record_vra(host, r);
    }));
    let peers = futures::future::join_all(peers.into_iter().map(|p| async move {
        let r = poll_peer(site, &p).await;
        if let Err(e) = &r {
            tracing::debug!(peer = %p.id, error = %e, "peer report failed");
        }
        site.control().live.record_peer(p.id.clone(), r);
    }));
    futures::future::join(vras, peers).await;
}

async fn poll_vra(site: &SiteManager, addr: &str) -> Result<VraPoll, String> {
    let mut c = site.control().vra(addr).map_err(|e| e.to_string())?;
    let status = c
        .get_status(vra_request(v1::GetVraStatusRequest {}))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let vpgs = status
        .vpgs
        .iter()
        .filter_map(|v| {
            VpgId::parse("vpg_id", &v.vpg_id)
                .ok()
                .map(|id| (id, vra_convert::vpg_report(v)))
        })
        .collect();
    let limits = status
        .bandwidth_limits
        .into_iter()
        .map(|l| (l.peer_site_id, l.bytes_per_sec))
        .collect();
    Ok(VraPoll {
        vpgs,
        limits,
        exports: status.exports.into_iter().collect(),
        trusted: status
            .trusted
            .into_iter()
            .map(|t| (t.site_id, t.ca_fingerprint))
            .collect(),
        cert_valid_until_ms: status.cert_valid_until_ms,
        cert_issuer: status.cert_issuer_fingerprint,
    })
}

async fn poll_peer(
    site: &SiteManager,
    peer: &PeerSite,
) -> Result<tandem_core::observe::PeerReport, String> {
    let own: SiteId = site
        .node()
        .read_local(|s| s.site_id().cloned())
        .ok_or("site not initialized")?;
    let call = site.peer_call(peer, |mut c| {
        let from = own.to_string();
        async move {
            let mut r = tonic::Request::new(v1::PeerReportRequest { from_site_id: from });
            r.set_timeout(super::VRA_CALL_TIMEOUT);
            c.report(r).await
        }
    });
    let reply = tokio::time::timeout(super::VRA_CALL_TIMEOUT * 2, call)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if reply.report_json.len() > crate::api::MAX_JSON_BYTES {
        return Err("peer report too large".into());
    }
    serde_json::from_slice(&reply.report_json).map_err(|e| format!("peer report: {e}"))
}
