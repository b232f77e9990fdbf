//! Rotating the site's CA with no handshake failing (security-design.md §7): an admin
//! starts it; the leader moves it on once every node and paired site trusts the new CA
//! (then it issues), and once no certificate of the old CA is in use (then the old one is
//! retired). Each manager keeps its `ca.crt` as the state says and reports its own
//! certificate; the paired sites learn the site's CAs through `SitePeer.UpdateTrust`.

use tandem_core::DomainError;
use tandem_core::access::Caller;
use tandem_core::ca_rotation::{CaRotation, NodeCert};
use tandem_core::ids::SiteId;
use tandem_core::pairing::PeerSite;
use tandem_core::state::{Command, SiteState};
use tandem_proto::v1;
use tandem_tls::cert::{bundle_key, check_ca_bundle};
use tandem_tls::pki::SiteCa;

use crate::error::{ApiError, ApiResult};
use crate::site::{SiteManager, now_ms};

/// The CA status an operator sees with the site.
#[derive(Debug, Clone, Default)]
pub struct CaStatus {
    /// The CAs every node trusts (PEM; empty: the managers hold no CA).
    pub bundle_pem: String,
    pub issuing: String,
    pub trusted: Vec<String>,
    pub rotation: String,
    /// What the rotation waits for (empty: nothing known).
    pub waits_for: String,
    pub node_certs: Vec<(u64, NodeCert)>,
}

impl CaStatus {
    pub fn of(s: &SiteState) -> Self {
        Self {
            bundle_pem: s.ca_bundle().unwrap_or_default(),
            issuing: s
                .ca
                .as_ref()
                .map(|c| c.fingerprint.clone())
                .unwrap_or_default(),
            trusted: s.ca_fingerprints(),
            rotation: s
                .ca_rotation
                .as_ref()
                .map(|r| r.phase().to_string())
                .unwrap_or_default(),
            waits_for: String::new(),
            node_certs: s
                .node_certs
                .iter()
                .map(|(id, c)| (*id, c.clone()))
                .collect(),
        }
    }
}

/// What keeps a rotation from its next step, for the log and the site's status (None:
/// nothing; it moves on).
fn waiting_for(
    site: &SiteManager,
    state: &SiteState,
    rotation: &CaRotation,
    members: &[u64],
) -> Option<String> {
    let key = bundle_key(&state.ca_fingerprints());
    let (Some(issuing), Some(own)) = (
        state.ca.as_ref().map(|c| c.fingerprint.clone()),
        state.site_id().map(|i| i.to_string()),
    ) else {
        return Some("the site's identity and CA in the state".into());
    };
    let live = &site.control().live;
    match rotation {
        CaRotation::Trusting { .. } => {
            for id in members {
                if state
                    .node_certs
                    .get(id)
                    .is_none_or(|c| bundle_key(&c.trusts) != key)
                {
                    return Some(format!("manager {id} to trust both CAs"));
                }
            }
            for host in state.hosts.values() {
                let trusts = live
                    .vra(&host.id)
                    .filter(|o| o.vpgs.is_ok())
                    .and_then(|o| o.trusted.get(&own).cloned());
                if trusts.as_deref() != Some(key.as_str()) {
                    return Some(format!("the VRA of host {} to trust both CAs", host.id));
                }
            }
            for peer in state.peers.values().filter(|p| !p.ca_pem.is_empty()) {
                if !live.peer_trusts(&peer.id, &key) {
                    return Some(format!("paired site {} to trust both CAs", peer.name));
                }
            }
            None
        }
        CaRotation::Issuing { .. } => {
            for id in members {
                if state.node_certs.get(id).is_none_or(|c| c.issuer != issuing) {
                    return Some(format!("manager {id} to renew its certificate"));
                }
            }
            for host in state.hosts.values() {
                let issuer = live
                    .vra(&host.id)
                    .filter(|o| o.vpgs.is_ok())
                    .map(|o| o.cert_issuer.clone());
                if issuer.as_deref() != Some(issuing.as_str()) {
                    return Some(format!(
                        "the VRA of host {} to renew its certificate",
                        host.id
                    ));
                }
            }
            None
        }
    }
}

impl SiteManager {
    /// Starts rotating the site's CA to a new one made here; answers its fingerprint.
    pub async fn start_ca_rotation(&self, caller: &Caller) -> ApiResult<String> {
        let site = self
            .node()
            .read(|s| s.site_id().map(|i| i.to_string()))
            .await?
            .ok_or_else(|| ApiError::Domain(DomainError::precondition("site not initialized")))?;
        if self.site_tls().is_none() {
            return Err(ApiError::Domain(DomainError::precondition(
                "this manager runs --insecure: the site has no CA to rotate",
            )));
        }
        let next = crate::enroll::ca_record(&SiteCa::generate(&site).map_err(ApiError::internal)?)?;
        let fingerprint = next.fingerprint.clone();
        self.node()
            .propose(Command::StartCaRotation {
                next,
                started_by: format!("{} (token {})", caller.name, caller.token),
                now_ms: now_ms(),
            })
            .await?;
        tracing::info!(ca = %fingerprint, "started rotating the site's CA");
        Ok(fingerprint)
    }

    /// The CA status of the site, with what a rotation under way waits for (as the
    /// leader last saw it).
    pub async fn ca_status(&self) -> ApiResult<CaStatus> {
        let mut status = self.node().read(CaStatus::of).await?;
        if !status.rotation.is_empty()
            && let Ok(crate::control::LeaderResponse::CaRotationWait(Some(what))) = self
                .leader_call(crate::control::LeaderRequest::CaRotationWait)
                .await
        {
            status.waits_for = what;
        }
        Ok(status)
    }

    /// A paired site `from` rotated its CA: its nodes present certificates of the CAs in
    /// `ca_pem` from now on. They must include one trusted for it now (a rotation adds a
    /// CA, then drops one; never all at once).
    pub async fn update_peer_trust(&self, from: SiteId, ca_pem: String) -> ApiResult<()> {
        let new = check_ca_bundle(&ca_pem)
            .map_err(|e| ApiError::Domain(DomainError::invalid("ca_pem", e.to_string())))?;
        let id = from.clone();
        let current = self
            .node()
            .read(move |s| s.peers.get(&id).map(|p| p.ca_pem.clone()))
            .await?
            .ok_or_else(|| DomainError::not_found(SiteId::KIND, &from))?;
        let now = check_ca_bundle(&current).unwrap_or_default();
        if bundle_key(&now) == bundle_key(&new) {
            return Ok(());
        }
        if !new.iter().any(|fp| now.contains(fp)) {
            return Err(ApiError::Denied(format!(
                "none of the CAs {} is one this site trusts for {from} now ({}): a rotation \
                 keeps one of them; pair again instead",
                new.join(", "),
                now.join(", ")
            )));
        }
        self.node()
            .propose(Command::SetPeerCa {
                id: from.clone(),
                ca_pem,
            })
            .await?;
        tracing::info!(peer = %from, cas = ?new, "a paired site's CAs changed: trusting these");
        Ok(())
    }

    /// Reports this manager's certificate into the state when it differs from what is
    /// recorded there.
    pub async fn record_own_cert(&self, tls: &tandem_tls::TlsConfig) -> ApiResult<()> {
        let Ok(issuer) = tls.ca_fingerprint() else {
            return Ok(());
        };
        let mut trusts = tls.own_ca_fingerprints();
        trusts.sort();
        let cert = NodeCert {
            issuer,
            trusts,
            valid_until_ms: tls
                .valid_until()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64),
        };
        let node = self.node().store().metrics().node_id;
        if self
            .node()
            .read_local(|s| s.node_certs.get(&node) == Some(&cert))
        {
            return Ok(());
        }
        self.node()
            .propose(Command::RecordNodeCert { node, cert })
            .await?;
        Ok(())
    }

    /// The leader's step of a rotation, once per reconcile pass: gives the paired sites
    /// this site's CAs where they hold others, and moves the rotation on when nothing
    /// holds it back.
    pub async fn advance_ca_rotation(&self, state: &SiteState) {
        if self.site_tls().is_none() {
            return;
        }
        let Some(bundle) = state.ca_bundle() else {
            return;
        };
        let key = bundle_key(&state.ca_fingerprints());
        for peer in state.peers.values().filter(|p| !p.ca_pem.is_empty()) {
            if self.control().live.peer_holds_other(&peer.id, &key)
                && self.control().start_giving_trust(&peer.id, &key)
            {
                self.give_peer_trust(peer, &bundle).await;
            }
        }
        let Some(rotation) = &state.ca_rotation else {
            return;
        };
        let members: Vec<u64> = self
            .node()
            .store()
            .metrics()
            .nodes
            .keys()
            .copied()
            .collect();
        let waits = waiting_for(self, state, rotation, &members);
        if self.control().rotation_waits_for(waits.as_deref())
            && let Some(what) = &waits
        {
            tracing::info!(phase = rotation.phase(), "CA rotation waits for {what}");
        }
        if waits.is_some() {
            return;
        }
        let cmd = match rotation {
            CaRotation::Trusting { next, .. } => Command::IssueFromNextCa {
                fingerprint: next.fingerprint.clone(),
                now_ms: now_ms(),
            },
            CaRotation::Issuing {
                old_fingerprint, ..
            } => Command::RetireOldCa {
                fingerprint: old_fingerprint.clone(),
                now_ms: now_ms(),
            },
        };
        match self.node().propose(cmd).await {
            Ok(_) => tracing::info!(phase = rotation.phase(), "CA rotation moved on"),
            Err(e) => tracing::warn!(error = %e, "CA rotation could not move on"),
        }
    }

    async fn give_peer_trust(&self, peer: &PeerSite, bundle: &str) {
        let req = v1::PeerUpdateTrustRequest {
            ca_pem: bundle.to_string(),
        };
        match self
            .peer_call(peer, |mut c| {
                let req = req.clone();
                async move { c.update_trust(req).await }
            })
            .await
        {
            Ok(_) => tracing::info!(peer = %peer.id, "gave a paired site this site's CAs"),
            Err(e) => {
                tracing::warn!(peer = %peer.id, error = %e, "a paired site did not take this site's CAs")
            }
        }
    }
}

/// Keeps this manager's `ca.crt` as the state says (the site's CAs, two during a
/// rotation), unless it would drop the CA of the certificate in use (renewal replaces
/// both then). `written`: the bundle last written or found. Answers whether it wrote.
pub fn keep_own_bundle(
    state_bundle: Option<String>,
    tls: &tandem_tls::TlsConfig,
    written: &mut String,
) -> bool {
    let Some(bundle) = state_bundle else {
        return false;
    };
    if *written == bundle || bundle == tls.ca_pem() {
        *written = bundle;
        return false;
    }
    let Some(dir) = tls.source() else {
        return false;
    };
    let holds_issuer = match (tls.ca_fingerprint(), check_ca_bundle(&bundle)) {
        (Ok(issuer), Ok(fps)) => fps.contains(&issuer),
        _ => false,
    };
    if !holds_issuer {
        return false;
    }
    match dir.replace_ca(&bundle) {
        Ok(()) => {
            tracing::info!(cas = ?check_ca_bundle(&bundle).unwrap_or_default(), "this manager trusts the site's CAs as the state names them");
            *written = bundle;
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "could not write the site's CAs");
            false
        }
    }
}
