//! `SiteService`: the site's identity, pairing tokens and pairs; `Pairing`: where a site
//! not paired yet presents a token issued here.

use tandem_core::ids::SiteId;
use tandem_proto::convert::{peer_from_proto, peer_to_proto};
use tandem_proto::v1::{self, pairing_server::Pairing, site_service_server::SiteService};
use tonic::{Request, Response, Status};

use super::bad;
use crate::error::ApiError;
use crate::site::SiteManager;

#[derive(Debug, Clone)]
pub struct SiteApi(pub SiteManager);

impl SiteApi {
    async fn site_reply(&self) -> Result<v1::Site, Status> {
        let (id, peers) = self.0.site().await?;
        let cas = self.0.ca_status().await?;
        Ok(v1::Site {
            id: id.id.to_string(),
            name: id.name,
            peers: peers.iter().map(peer_to_proto).collect(),
            issuing_ca_fingerprint: cas.issuing,
            ca_fingerprints: cas.trusted,
            ca_rotation: cas.rotation,
            ca_rotation_waits_for: cas.waits_for,
            ca_bundle_pem: if cas.bundle_pem.is_empty() {
                self.0
                    .site_tls()
                    .map(|t| t.ca_pem().to_string())
                    .unwrap_or_default()
            } else {
                cas.bundle_pem
            },
            node_certificates: cas
                .node_certs
                .into_iter()
                .map(|(node_id, c)| v1::NodeCertificate {
                    node_id,
                    issuer_fingerprint: c.issuer,
                    valid_until_ms: c.valid_until_ms,
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl SiteService for SiteApi {
    async fn get_site(&self, _: Request<v1::GetSiteRequest>) -> Result<Response<v1::Site>, Status> {
        Ok(Response::new(self.site_reply().await?))
    }

    async fn rotate_ca(
        &self,
        r: Request<v1::RotateCaRequest>,
    ) -> Result<Response<v1::Site>, Status> {
        let caller = crate::access::caller(&r)?.clone();
        self.0.start_ca_rotation(&caller).await?;
        Ok(Response::new(self.site_reply().await?))
    }

    async fn create_pairing_token(
        &self,
        r: Request<v1::CreatePairingTokenRequest>,
    ) -> Result<Response<v1::PairingToken>, Status> {
        let (secret, t, site) = self.0.create_pairing_token(r.into_inner().ttl_secs).await?;
        let fingerprint = self.0.ca_fingerprint()?;
        Ok(Response::new(v1::PairingToken {
            token: tandem_core::pairing::pairing_code(secret.reveal(), fingerprint.as_deref()),
            expires_at_ms: t.expires_at_ms,
            site_id: site.id.to_string(),
            site_name: site.name,
            ca_fingerprint: fingerprint.unwrap_or_default(),
        }))
    }

    async fn pair_site(
        &self,
        r: Request<v1::PairSiteRequest>,
    ) -> Result<Response<v1::PeerSite>, Status> {
        let r = r.into_inner();
        let peer = self
            .0
            .pair(
                r.peer_api_endpoints,
                r.peer_endpoints,
                r.advertise_endpoints,
                r.token,
            )
            .await?;
        Ok(Response::new(peer_to_proto(&peer)))
    }

    async fn list_peers(
        &self,
        _: Request<v1::ListPeersRequest>,
    ) -> Result<Response<v1::ListPeersResponse>, Status> {
        let peers = self.0.peers().await?;
        Ok(Response::new(v1::ListPeersResponse {
            peers: peers.iter().map(peer_to_proto).collect(),
        }))
    }

    async fn unpair_site(
        &self,
        r: Request<v1::UnpairSiteRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        let id = SiteId::parse("site_id", &r.site_id).map_err(bad)?;
        self.0.unpair(id, r.force).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn set_peer_bandwidth_limit(
        &self,
        r: Request<v1::SetPeerBandwidthLimitRequest>,
    ) -> Result<Response<v1::PeerSite>, Status> {
        let r = r.into_inner();
        let id = SiteId::parse("site_id", &r.site_id).map_err(bad)?;
        tandem_core::pairing::check_bandwidth_limit(r.bytes_per_sec).map_err(bad)?;
        let peer = self.0.set_peer_bandwidth_limit(id, r.bytes_per_sec).await?;
        Ok(Response::new(peer_to_proto(&peer)))
    }
}

/// The operator port's pairing acceptance: no API token, the pairing token in the body
/// speaks for the caller (rate-limited per source by `crate::access`).
#[derive(Debug, Clone)]
pub struct PairingApi(pub SiteManager);

#[tonic::async_trait]
impl Pairing for PairingApi {
    async fn accept_pairing(
        &self,
        r: Request<v1::AcceptPairingRequest>,
    ) -> Result<Response<v1::PeerSite>, Status> {
        let r = r.into_inner();
        let requester = r
            .requester
            .ok_or_else(|| ApiError::invalid("requester: is required"))?;
        let requester = peer_from_proto(requester).map_err(bad)?;
        if r.token.is_empty() || r.token.len() > 256 {
            return Err(ApiError::invalid("token: must be 1..256 characters").into());
        }
        let token = tandem_core::pairing::PairingSecret::presented(r.token);
        let me = self.0.accept_pairing(token, requester).await?;
        Ok(Response::new(peer_to_proto(&me)))
    }
}
