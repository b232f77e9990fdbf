//! `ManagerInternal` (leader forwarding inside a site) and `SitePeer` (between paired
//! sites), both on the internal listener. Who may call them is checked
//! before they run (`crate::access`, the listeners' TLS); here a peer's request is also
//! held to the site its certificate names.

use tandem_core::ids::VpgId;
use tandem_core::state::Command;
use tandem_core::vpg::Vpg;
use tandem_proto::v1::{
    self, manager_internal_server::ManagerInternal, site_peer_server::SitePeer,
};
use tonic::{Request, Response, Status};

use super::{MAX_JSON_BYTES, bad};
use crate::access::{PeerCaller, calling_site};
use crate::control::{self, LeaderRequest, LeaderResponse};
use crate::error::ApiError;
use crate::site::SiteManager;

/// The furthest a reconciliation may move a peer's copy of a definition ahead at once.
const MAX_GENERATION_JUMP: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct InternalApi(pub SiteManager);

#[tonic::async_trait]
impl ManagerInternal for InternalApi {
    async fn propose(
        &self,
        r: Request<v1::ProposeRequest>,
    ) -> Result<Response<v1::ProposeResponse>, Status> {
        let r = r.into_inner();
        let (json, hops) = (r.command_json, r.hops);
        if json.len() > MAX_JSON_BYTES {
            return Err(ApiError::invalid("forwarded command too large").into());
        }
        let cmd: Command = serde_json::from_slice(&json)
            .map_err(|e| ApiError::invalid(format!("forwarded command: {e}")))?;
        let (applied_index, outcome) = self.0.node().propose_forwarded(cmd, json, hops).await?;
        let outcome_json =
            serde_json::to_vec(&outcome).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Response::new(v1::ProposeResponse {
            outcome_json,
            applied_index,
        }))
    }

    async fn read_index(
        &self,
        _: Request<v1::ReadIndexRequest>,
    ) -> Result<Response<v1::ReadIndexResponse>, Status> {
        let index = self.0.node().leader_read_index().await?;
        Ok(Response::new(v1::ReadIndexResponse { index }))
    }

    async fn leader_call(
        &self,
        r: Request<v1::LeaderCallRequest>,
    ) -> Result<Response<v1::LeaderCallResponse>, Status> {
        let json = r.into_inner().request_json;
        if json.len() > MAX_JSON_BYTES {
            return Err(ApiError::invalid("leader request too large").into());
        }
        let req: LeaderRequest = serde_json::from_slice(&json)
            .map_err(|e| ApiError::invalid(format!("leader request: {e}")))?;
        // Answered here or not at all: a forwarded request is never forwarded again.
        if self.0.node().store().metrics().role != tandem_store::Role::Leader {
            return Err(ApiError::unavailable("this node is not the leader").into());
        }
        let answer: LeaderResponse = control::answer(&self.0, req).await?;
        let response_json =
            serde_json::to_vec(&answer).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Response::new(v1::LeaderCallResponse { response_json }))
    }
}

#[derive(Debug, Clone)]
pub struct PeerApi(pub SiteManager);

impl PeerApi {
    /// A peer call about VPG `id` must come from one of the two sites it replicates
    /// between (a VPG unknown here passes: the call answers NOT_FOUND itself).
    async fn check_shared<T>(&self, r: &Request<T>, id: &VpgId) -> Result<(), Status> {
        let Some(PeerCaller(caller)) = r.extensions().get::<PeerCaller>().cloned() else {
            return Ok(());
        };
        let id = id.clone();
        let shared = self
            .0
            .read(move |s| {
                s.vpgs
                    .get(&id)
                    .map(|v| v.protected_site == caller || v.recovery_site == caller)
            })
            .await?;
        match shared {
            Some(false) => Err(ApiError::denied(
                "the calling site neither protects nor recovers this VPG",
            )
            .into()),
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl SitePeer for PeerApi {
    async fn get_identity(&self, _: Request<v1::Empty>) -> Result<Response<v1::PeerSite>, Status> {
        let (id, _) = self.0.site().await?;
        Ok(Response::new(v1::PeerSite {
            id: id.id.to_string(),
            name: id.name,
            endpoints: self.0.node().peer_endpoints(),
            paired_at_ms: 0,
            bandwidth_limit_bytes_per_sec: 0,
            ca_pem: String::new(),
        }))
    }

    async fn put_vpg(&self, r: Request<v1::PeerVpgRequest>) -> Result<Response<v1::Empty>, Status> {
        let caller = r.extensions().get::<PeerCaller>().cloned();
        let r = r.into_inner();
        if r.vpg_json.len() > MAX_JSON_BYTES {
            return Err(ApiError::invalid("vpg definition too large").into());
        }
        let vpg: Vpg = serde_json::from_slice(&r.vpg_json)
            .map_err(|e| ApiError::invalid(format!("vpg definition: {e}")))?;
        vpg.validate_received().map_err(bad)?;
        if let Some(PeerCaller(site)) = caller
            && vpg.protected_site != site
            && vpg.recovery_site != site
        {
            return Err(ApiError::denied(format!(
                "site {site} neither protects nor recovers VPG {}",
                vpg.id
            ))
            .into());
        }
        if let Some(floor) = r.generation_floor {
            let ok = r
                .expected_generation
                .is_some_and(|e| floor > e && floor - e <= MAX_GENERATION_JUMP);
            if !ok {
                return Err(ApiError::invalid(format!(
                    "generation_floor: must come with expected_generation and be above it by at \
                     most {MAX_GENERATION_JUMP}"
                ))
                .into());
            }
        }
        self.0
            .put_peer_vpg(vpg, r.expected_generation, r.generation_floor)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn delete_vpg(
        &self,
        r: Request<v1::PeerDeleteVpgRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let from = calling_site(&r, &r.get_ref().from_site_id)?;
        let r = r.into_inner();
        let id = VpgId::parse("vpg_id", &r.vpg_id).map_err(bad)?;
        self.0
            .delete_peer_vpg(id, from, r.keep_recovery_disks)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn unpair(
        &self,
        r: Request<v1::PeerUnpairRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let from = calling_site(&r, &r.get_ref().from_site_id)?;
        self.0.accept_unpair(from).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn report(
        &self,
        r: Request<v1::PeerReportRequest>,
    ) -> Result<Response<v1::PeerReportResponse>, Status> {
        let from = calling_site(&r, &r.get_ref().from_site_id)?;
        let report = self.0.peer_report(from).await?;
        let report_json =
            serde_json::to_vec(&report).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Response::new(v1::PeerReportResponse { report_json }))
    }

    async fn list_checkpoints(
        &self,
        r: Request<v1::ListCheckpointsQuery>,
    ) -> Result<Response<v1::CheckpointList>, Status> {
        let vpg = VpgId::parse("vpg_id", &r.get_ref().vpg_id).map_err(bad)?;
        self.check_shared(&r, &vpg).await?;
        let q = super::vpg::checkpoint_query(r.into_inner())?;
        Ok(Response::new(self.0.checkpoints(q, false).await?))
    }

    async fn prepare_move(
        &self,
        r: Request<v1::PeerMoveRequest>,
    ) -> Result<Response<v1::PeerMoveResponse>, Status> {
        let vpg = VpgId::parse("vpg_id", &r.get_ref().vpg_id).map_err(bad)?;
        self.check_shared(&r, &vpg).await?;
        let r = r.into_inner();
        let op = tandem_core::ids::RecoveryOpId::parse("op_id", &r.op_id).map_err(bad)?;
        Ok(Response::new(self.0.prepare_move(vpg, op, r.drain).await?))
    }

    async fn update_trust(
        &self,
        r: Request<v1::PeerUpdateTrustRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        // Only a certificate says which site calls: without TLS there is no CA to change.
        let Some(PeerCaller(from)) = r.extensions().get::<PeerCaller>().cloned() else {
            return Err(ApiError::precondition(
                "UpdateTrust needs mutual TLS: the calling site is known by its certificate",
            )
            .into());
        };
        self.0
            .update_peer_trust(from, r.into_inner().ca_pem)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn finish_move(
        &self,
        r: Request<v1::PeerFinishMoveRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let vpg = VpgId::parse("vpg_id", &r.get_ref().vpg_id).map_err(bad)?;
        self.check_shared(&r, &vpg).await?;
        let r = r.into_inner();
        let op = tandem_core::ids::RecoveryOpId::parse("op_id", &r.op_id).map_err(bad)?;
        self.0.finish_move(vpg, op, r.committed).await?;
        Ok(Response::new(v1::Empty {}))
    }
}
