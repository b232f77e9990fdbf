//! The site manager's operations: inventory, pairing and VPG definitions. It mints ids and
//! clocks, checks requests against the replicated state, talks to the peer site where a
//! VPG spans both, and proposes commands through Raft. The gRPC services are thin wrappers.

mod inventory;
mod pairing;
mod protection;
mod records;
mod views;
mod vpgs;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tandem_core::DomainError;
use tandem_core::error::Violations;
use tandem_core::events::{EventCode, NewEvent};
use tandem_core::ids::{SiteId, VpgId};
use tandem_core::inventory::{Datastore, Host, ResourcePool, Vm};
use tandem_core::pairing::{PAIRING_TOKEN_TTL_MS, PairingSecret, PairingToken, PeerSite};
use tandem_core::state::Applied;
use tandem_core::state::{Command, SiteIdentity, SiteState};
use tandem_core::status::{Operation, VpgObservation, VpgState};
use tandem_core::tasks::{NewTask, Task, TaskKind, TaskState};
use tandem_core::vpg::{VmFootprint, VmPlacement, Vpg, VpgSpec, VpgVm};
use tandem_proto::v1;
use tandem_proto::v1::pairing_client::PairingClient;
use tandem_proto::v1::site_peer_client::SitePeerClient;

use tandem_core::observe::LiveStatus;
use tandem_proto::v1::manager_internal_client::ManagerInternalClient;

use crate::control::{self, Control, LeaderRequest, LeaderResponse};
use crate::error::{ApiError, ApiResult};
use crate::net::Connector;
use crate::node::ManagerNode;

pub use protection::{CheckpointQuery, page_checkpoints};
pub use views::{VpgView, vpgs_csv};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A task about to start now.
fn new_task(
    kind: TaskKind,
    vpg: Option<&VpgId>,
    generation: Option<u64>,
    message: String,
) -> NewTask {
    NewTask {
        kind,
        vpg: vpg.cloned(),
        started_ms: now_ms(),
        generation,
        message,
    }
}

/// An event of a VPG, happening now.
/// An event of VPG `vpg` now.
pub(crate) fn new_event(code: EventCode, vpg: &VpgId, description: String) -> NewEvent {
    NewEvent {
        at_ms: now_ms(),
        code,
        vpg: Some(vpg.clone()),
        description,
    }
}

/// A fresh id with a readable prefix.
pub fn mint(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Where a reconciliation puts both copies of a definition.
#[derive(Debug, Clone, Copy)]
struct GenerationFloor {
    /// The generation the peer reported.
    peer_expected: u64,
    /// The generation both sites store.
    generation: u64,
}

/// The operations of one site's manager.
#[derive(Clone)]
pub struct SiteManager {
    node: Arc<ManagerNode>,
    connector: Connector,
    control: Control,
    /// How long the certificates this node issues are valid.
    cert_ttl: std::time::Duration,
}

impl std::fmt::Debug for SiteManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteManager").finish_non_exhaustive()
    }
}

/// A query of the event log.
#[derive(Debug, Clone)]
pub struct EventQuery {
    pub vpg: Option<VpgId>,
    pub code: Option<EventCode>,
    pub after_id: u64,
    pub limit: usize,
}

impl SiteManager {
    pub fn new(node: Arc<ManagerNode>, connector: Connector) -> Self {
        let control = Control::new(connector.clone());
        Self {
            node,
            connector,
            control,
            cert_ttl: tandem_tls::pki::NODE_TTL,
        }
    }

    /// Issues certificates valid for `ttl` (renewed when a third of it is left).
    pub fn with_cert_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.cert_ttl = ttl;
        self
    }

    /// How long the certificates this node issues are valid.
    pub fn cert_ttl(&self) -> std::time::Duration {
        self.cert_ttl
    }

    /// This node's certificate (None: `--insecure`).
    pub fn site_tls(&self) -> Option<tandem_tls::TlsConfig> {
        self.connector.site_tls()
    }

    /// The site this node's certificate names (None: `--insecure`); renewal never changes
    /// it.
    pub fn tls_site_id(&self) -> Option<&str> {
        self.connector.tls_site_id()
    }

    pub fn node(&self) -> &Arc<ManagerNode> {
        &self.node
    }

    /// The controllers' shared parts (filled while this node leads).
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Runs a leader-only request here when this node leads, else on the leader.
    pub async fn leader_call(&self, req: LeaderRequest) -> ApiResult<LeaderResponse> {
        let m = self.node.store().metrics();
        if m.role == tandem_store::Role::Leader {
            return control::answer(self, req).await;
        }
        let leader = m
            .leader
            .ok_or_else(|| ApiError::unavailable("no leader is known to this node"))?;
        let json = serde_json::to_vec(&req).map_err(ApiError::internal)?;
        let reply = ManagerInternalClient::new(self.connector.own_site(&leader.raft_addr)?)
            .max_decoding_message_size(tandem_proto::MAX_MESSAGE_BYTES)
            .leader_call(v1::LeaderCallRequest { request_json: json })
            .await
            .map_err(ApiError::forwarded)?
            .into_inner();
        serde_json::from_slice(&reply.response_json).map_err(ApiError::internal)
    }

    /// Names the site once, at bootstrap, with `id` (the one its certificates name) or a
    /// new one. Does nothing when it already has an identity.
    pub async fn ensure_identity(&self, name: &str, id: Option<&str>) -> ApiResult<()> {
        let has = self.node.read(|s| s.identity.is_some()).await?;
        if !has {
            let identity = SiteIdentity {
                id: SiteId::minted(id.map(str::to_string).unwrap_or_else(|| mint("site"))),
                name: name.to_string(),
                created_at_ms: now_ms(),
            };
            match self.node.propose(Command::InitSite { identity }).await {
                Ok(_) => {}
                // Another bootstrap attempt won the race; the site is named either way.
                Err(ApiError::Domain(DomainError::FailedPrecondition(_))) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn identity(&self) -> ApiResult<SiteIdentity> {
        self.node
            .read(|s| s.identity.clone())
            .await?
            .ok_or_else(|| {
                ApiError::Domain(DomainError::precondition("site is not initialized yet"))
            })
    }

    async fn self_as_peer(&self) -> ApiResult<PeerSite> {
        let identity = self.identity().await?;
        Ok(PeerSite {
            id: identity.id,
            name: identity.name,
            endpoints: self.node.peer_endpoints(),
            paired_at_ms: now_ms(),
            bandwidth_limit_bytes_per_sec: 0,
            ca_pem: self
                .connector
                .site_tls()
                .map(|t| t.ca_pem().to_string())
                .unwrap_or_default(),
        })
    }

    /// The fingerprint of this site's CA (None: `--insecure`).
    pub fn ca_fingerprint(&self) -> ApiResult<Option<String>> {
        self.connector
            .site_tls()
            .map(|t| t.ca_fingerprint())
            .transpose()
            .map_err(|e| ApiError::internal(format!("this site's CA: {e}")))
    }
}
