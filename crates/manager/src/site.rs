//! The site manager's operations: inventory, pairing and VPG definitions. It mints ids and
//! clocks, checks requests against the replicated state, talks to the peer site where a
//! VPG spans both, and proposes commands through Raft. The gRPC services are thin wrappers.

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

/// A VPG as shown to an operator.
#[derive(Debug, Clone)]
pub struct VpgView {
    pub vpg: Vpg,
    pub own_site: SiteId,
    pub peer_name: String,
    pub state: VpgState,
    /// The leader's live snapshot; `None` when no leader answered (definition alone).
    pub live: Option<LiveStatus>,
    /// A failover test of it runs at this site.
    pub testing: bool,
    /// The site whose VMs of the VPG run, as this site knows it.
    pub owner: SiteId,
    /// This site stood the VPG down (another site runs its VMs).
    pub stood_down: Option<tandem_core::fence::StandDown>,
}

impl VpgView {
    /// The operation column: the operation the VPG is in, or its failover test.
    pub fn operation(&self) -> String {
        match self.vpg.operation {
            Some(o) => format!("{o:?}"),
            None if self.testing => "Failover Test".into(),
            None => String::new(),
        }
    }
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

    // ------------------------------------------------------------ site and pairing

    pub async fn site(&self) -> ApiResult<(SiteIdentity, Vec<PeerSite>)> {
        let identity = self.identity().await?;
        let peers = self
            .node
            .read(|s| s.peers.values().cloned().collect())
            .await?;
        Ok((identity, peers))
    }

    pub async fn create_pairing_token(
        &self,
        ttl_secs: u64,
    ) -> ApiResult<(PairingSecret, PairingToken, SiteIdentity)> {
        let identity = self.identity().await?;
        let ttl_ms = if ttl_secs == 0 {
            PAIRING_TOKEN_TTL_MS
        } else {
            ttl_secs.min(7 * 24 * 3600) * 1000
        };
        let now = now_ms();
        // The state and the Raft log keep its hash; the secret is shown once.
        let secret = PairingSecret::from_random(rand::random());
        let token = PairingToken::new(&secret, now, ttl_ms);
        self.node
            .propose(Command::IssuePairingToken {
                token: token.clone(),
                now_ms: now,
            })
            .await?;
        Ok((secret, token, identity))
    }

    /// Pairs with the site whose operator port is at `api` (its `Pairing` service takes
    /// the token there), records `endpoints` as its internal addresses (empty: those it
    /// answers), and tells it to reach this site at `advertise` (empty: this site's
    /// managers' internal addresses). `code` is the other site's pairing token with its
    /// CA's fingerprint: the site reached must present that CA before the token is sent,
    /// and the two sites exchange their CAs.
    pub async fn pair(
        &self,
        api: Vec<String>,
        endpoints: Vec<String>,
        advertise: Vec<String>,
        code: String,
    ) -> ApiResult<PeerSite> {
        let (token, pinned) = tandem_core::pairing::split_pairing_code(&code);
        let token = token.to_string();
        let mut v = Violations::new();
        v.check(
            !api.is_empty(),
            "peer_api_endpoints",
            "at least one address is needed (the peer's operator port, which takes the \
             pairing token)",
        );
        for (field, list) in [
            ("peer_api_endpoints", &api),
            ("peer_endpoints", &endpoints),
            ("advertise_endpoints", &advertise),
        ] {
            v.check(list.len() <= 16, field, "at most 16 addresses");
            for (i, e) in list.iter().enumerate() {
                v.absorb(tandem_core::ids::check_address(&format!("{field}[{i}]"), e));
            }
        }
        v.check(
            !token.is_empty() && token.len() <= 256,
            "token",
            "must be 1..256 characters",
        );
        let pinned = match (self.connector.site_tls(), pinned) {
            (None, _) => None,
            (Some(_), Some(fp)) => match tandem_tls::pin::PinnedCa::new(fp) {
                Ok(_) => Some(fp.to_ascii_lowercase()),
                Err(e) => {
                    v.check(false, "token", e.to_string());
                    None
                }
            },
            (Some(_), None) => {
                v.check(
                    false,
                    "token",
                    "names no CA fingerprint (`<token>.<sha256>`, as CreatePairingToken \
                     answers it): this site runs TLS and checks whom it pairs with",
                );
                None
            }
        };
        v.into_result()?;
        let mut me = self.self_as_peer().await?;
        if !advertise.is_empty() {
            me.endpoints = advertise;
        }
        let dial = match &pinned {
            Some(fp) => Some(
                tandem_tls::config::pinned_client(fp)
                    .map_err(|e| ApiError::Domain(DomainError::invalid("token", e.to_string())))?,
            ),
            None => None,
        };
        let ch = self.connector.first_reachable(&api, dial).await?;
        let reply = PairingClient::new(ch)
            .accept_pairing(v1::AcceptPairingRequest {
                token,
                requester: Some(tandem_proto::convert::peer_to_proto(&me)),
            })
            .await
            .map_err(ApiError::from_peer)?
            .into_inner();
        let mut peer = tandem_proto::convert::peer_from_proto(reply).map_err(|e| {
            ApiError::Peer(
                format!("bad identity from peer: {e}"),
                tonic::Code::Internal,
            )
        })?;
        if let Some(fp) = &pinned {
            let theirs = tandem_tls::cert::check_ca_bundle(&peer.ca_pem).map_err(|e| {
                ApiError::Peer(format!("the peer's CA: {e}"), tonic::Code::PermissionDenied)
            })?;
            if !theirs.contains(fp) {
                return Err(ApiError::Peer(
                    format!(
                        "the peer answered with CAs {}, not the pinned {fp}",
                        theirs.join(", ")
                    ),
                    tonic::Code::PermissionDenied,
                ));
            }
        }
        peer.paired_at_ms = now_ms();
        if !endpoints.is_empty() {
            peer.endpoints = endpoints;
        }
        if peer.endpoints.is_empty() {
            return Err(ApiError::Peer(
                "the peer answered no internal address; name them (peer_endpoints)".into(),
                tonic::Code::FailedPrecondition,
            ));
        }
        self.node
            .propose(Command::AddPeer { peer: peer.clone() })
            .await?;
        Ok(peer)
    }

    /// The peer side of pairing: checks and consumes the token, records the requester.
    pub async fn accept_pairing(
        &self,
        token: PairingSecret,
        requester: PeerSite,
    ) -> ApiResult<PeerSite> {
        if self.connector.site_tls().is_some() {
            tandem_tls::cert::check_ca_bundle(&requester.ca_pem).map_err(|e| {
                ApiError::Domain(DomainError::invalid(
                    "requester.ca_pem",
                    format!("{e} (this site runs TLS and pins its peers' CAs)"),
                ))
            })?;
        }
        // A token that is not live here is refused without a proposal (a guessing caller
        // costs reads, not Raft entries).
        let hash = token.hash();
        let live = self
            .node
            .read({
                let hash = hash.clone();
                move |s| {
                    let now = now_ms();
                    s.pairing_tokens
                        .iter()
                        .any(|t| t.expires_at_ms > now && t.matches(&hash))
                }
            })
            .await?;
        if !live {
            return Err(
                DomainError::precondition("pairing token is unknown, used or expired").into(),
            );
        }
        let me = self.self_as_peer().await?;
        let mut peer = requester;
        peer.paired_at_ms = now_ms();
        self.node
            .propose(Command::AcceptPairing {
                token_hash: hash,
                legacy_token: Default::default(),
                peer,
                now_ms: now_ms(),
            })
            .await?;
        Ok(me)
    }

    /// Limits what this site's VRAs send to peer `id`; the reconciler applies it to them.
    pub async fn set_peer_bandwidth_limit(
        &self,
        id: SiteId,
        bytes_per_sec: u64,
    ) -> ApiResult<PeerSite> {
        self.node
            .propose(Command::SetPeerBandwidthLimit {
                id: id.clone(),
                bytes_per_sec,
            })
            .await?;
        self.record_event(
            EventCode::PeerBandwidthLimitSet,
            None,
            match bytes_per_sec {
                0 => format!("bandwidth limit to site {id} removed"),
                b => format!("bandwidth limit to site {id} set to {b} bytes per second"),
            },
        )
        .await;
        self.node
            .read(move |s| s.peers.get(&id).cloned())
            .await?
            .ok_or_else(|| ApiError::internal("the peer went away after its limit was set"))
    }

    /// Unpairs from site `id` on both sites: refused while a VPG replicates between them.
    /// The peer forgets this site first; with `force`, a peer that cannot be reached is left
    /// to unpair on its own.
    pub async fn unpair(&self, id: SiteId, force: bool) -> ApiResult<()> {
        let (peer, own) =
            self.node
                .read({
                    let id = id.clone();
                    move |s| -> ApiResult<(PeerSite, SiteId)> {
                        s.check_unpairable(&id)?;
                        let own = s.site_id().cloned().ok_or_else(|| {
                            DomainError::precondition("site is not initialized yet")
                        })?;
                        Ok((s.peers[&id].clone(), own))
                    }
                })
                .await??;
        let told = self
            .peer_call(&peer, |mut c| {
                let from = own.to_string();
                async move { c.unpair(v1::PeerUnpairRequest { from_site_id: from }).await }
            })
            .await;
        let peer_side = match told {
            Ok(_) => "on both sites".to_string(),
            Err(ApiError::Peer(m, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded))
                if force =>
            {
                tracing::warn!(peer = %id, error = %m, "force unpair: the peer keeps its side");
                format!("here only (site {} could not be reached: {m})", peer.name)
            }
            Err(ApiError::Peer(m, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)) => {
                return Err(ApiError::Peer(
                    format!(
                        "site {} cannot be reached to unpair it ({m}); unpair with force to \
                         forget it here only",
                        peer.name
                    ),
                    tonic::Code::Unavailable,
                ));
            }
            Err(e) => return Err(e),
        };
        self.node
            .propose(Command::RemovePeer { id: id.clone() })
            .await?;
        self.record_event(
            EventCode::SiteUnpaired,
            None,
            format!("unpaired from site {} ({id}) {peer_side}", peer.name),
        )
        .await;
        Ok(())
    }

    /// The peer side of unpairing: forgets the caller unless a VPG still replicates
    /// between the two sites; a caller already forgotten is not an error.
    pub async fn accept_unpair(&self, from: SiteId) -> ApiResult<()> {
        let known = self
            .node
            .read({
                let from = from.clone();
                move |s| -> ApiResult<Option<String>> {
                    let Some(peer) = s.peers.get(&from) else {
                        return Ok(None);
                    };
                    s.check_unpairable(&from)?;
                    Ok(Some(peer.name.clone()))
                }
            })
            .await??;
        if let Some(name) = known {
            self.node
                .propose(Command::RemovePeer { id: from.clone() })
                .await?;
            self.record_event(
                EventCode::SiteUnpaired,
                None,
                format!("site {name} ({from}) unpaired from this site"),
            )
            .await;
        }
        Ok(())
    }

    pub async fn peers(&self) -> ApiResult<Vec<PeerSite>> {
        self.node
            .read(|s| s.peers.values().cloned().collect())
            .await
    }

    // ------------------------------------------------------------ inventory

    /// Proposes an inventory command and maps its outcome.
    pub async fn put(&self, cmd: Command) -> ApiResult<()> {
        self.node.propose(cmd).await.map(|_| ())
    }

    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SiteState) -> T + Send + 'static,
    ) -> ApiResult<T> {
        self.node.read(f).await
    }

    /// Reads one object by id, or NOT_FOUND naming its kind.
    async fn get_one<K, V>(
        &self,
        kind: &'static str,
        id: K,
        pick: fn(&SiteState, &K) -> Option<V>,
    ) -> ApiResult<V>
    where
        K: std::fmt::Display + Clone + Send + 'static,
        V: Send + 'static,
    {
        let key = id.clone();
        self.node
            .read(move |s| pick(s, &key))
            .await?
            .ok_or_else(|| DomainError::not_found(kind, &id).into())
    }

    pub async fn host(&self, id: tandem_core::ids::HostId) -> ApiResult<Host> {
        self.get_one("host", id, |s, id| s.hosts.get(id).cloned())
            .await
    }

    pub async fn datastore(&self, id: tandem_core::ids::DatastoreId) -> ApiResult<Datastore> {
        self.get_one("datastore", id, |s, id| s.datastores.get(id).cloned())
            .await
    }

    pub async fn pool(&self, id: tandem_core::ids::PoolId) -> ApiResult<ResourcePool> {
        self.get_one("resource pool", id, |s, id| s.pools.get(id).cloned())
            .await
    }

    pub async fn vm(&self, id: tandem_core::ids::VmId) -> ApiResult<(Vm, Option<VpgId>)> {
        self.get_one("vm", id, |s, id| {
            let vpg = s.vpg_of_vm(id).map(|g| g.id.clone());
            s.vms.get(id).cloned().map(|vm| (vm, vpg))
        })
        .await
    }

    // ------------------------------------------------------------ VPGs

    /// Calls the peer site through the first of its endpoints that answers.
    pub(crate) async fn peer_call<T, F, Fut>(&self, peer: &PeerSite, call: F) -> ApiResult<T>
    where
        F: Fn(SitePeerClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = None;
        for addr in &peer.endpoints {
            let client = SitePeerClient::new(self.connector.peer_site(peer, addr)?);
            match call(client).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == tonic::Code::Unavailable => last = Some(s),
                Err(s) => return Err(ApiError::from_peer(s)),
            }
        }
        Err(ApiError::from_peer(last.unwrap_or_else(|| {
            tonic::Status::unavailable("peer site has no endpoints")
        })))
    }

    /// Asks the peer site to delete its copy of a VPG this site (`own`) protects.
    async fn peer_delete_vpg(
        &self,
        peer: &PeerSite,
        id: &VpgId,
        own: String,
        keep_recovery_disks: bool,
    ) -> ApiResult<()> {
        self.peer_call(peer, |mut c| {
            let (id, own) = (id.to_string(), own.clone());
            async move {
                c.delete_vpg(v1::PeerDeleteVpgRequest {
                    vpg_id: id,
                    from_site_id: own,
                    keep_recovery_disks,
                })
                .await
            }
        })
        .await
        .map(|_| ())
    }

    /// Builds the full definition from a spec, using this (protected) site's inventory.
    /// With `edit_of`, the spec replaces the VPG's definition read at that generation; all is
    /// checked in one linearizable read.
    async fn build_vpg(
        &self,
        id: VpgId,
        spec: VpgSpec,
        edit_of: Option<u64>,
    ) -> ApiResult<(Vpg, PeerSite)> {
        self.node
            .read(move |s| -> ApiResult<(Vpg, PeerSite)> {
                let own = s
                    .site_id()
                    .cloned()
                    .ok_or_else(|| DomainError::precondition("site is not initialized yet"))?;
                let previous = match edit_of {
                    None => None,
                    Some(generation) => Some(Self::editable(s, &id, &own, generation, &spec)?),
                };
                let peer = s.peers.get(&spec.recovery_site).cloned().ok_or_else(|| {
                    DomainError::invalid(
                        "spec.recovery_site_id",
                        format!("site {} is not paired with this site", spec.recovery_site),
                    )
                })?;
                let mut v = Violations::new();
                let mut vms = Vec::with_capacity(spec.vms.len());
                for (i, p) in spec.vms.iter().enumerate() {
                    let kept = previous
                        .as_ref()
                        .and_then(|g| g.vms.iter().find(|m| m.placement.vm_id == p.vm_id));
                    match s.vms.get(&p.vm_id) {
                        None => v.add(
                            format!("vms[{i}].vm_id"),
                            format!("VM {} does not exist", p.vm_id),
                        ),
                        Some(vm) => vms.push(VpgVm {
                            // Preseeding is for the edit a VM joins in; later a new volume
                            // of it has no copy at the recovery site. Recovery disks of
                            // their own (the original disks, after reverse protection)
                            // stay where they are.
                            placement: VmPlacement {
                                preseeded: p.preseeded && kept.is_none(),
                                disk_paths: kept
                                    .map(|k| k.placement.disk_paths.clone())
                                    .unwrap_or_default(),
                                ..p.clone()
                            },
                            footprint: VmFootprint::refreshed(
                                vm,
                                &spec.settings,
                                kept.map(|k| &k.footprint),
                            ),
                            source: Some(tandem_core::protection::vm_source(s, vm)?),
                        }),
                    }
                }
                v.into_result()?;
                let now = now_ms();
                let mut vpg = Vpg {
                    id,
                    name: spec.name,
                    generation: 0,
                    protected_site: own,
                    recovery_site: spec.recovery_site,
                    settings: spec.settings,
                    vms,
                    created_at_ms: now,
                    updated_at_ms: now,
                    operation: Some(Operation::Creating),
                    paused: false,
                    keep_recovery_disks: false,
                    delete_started_ms: 0,
                    keep_removed_recovery_disks: false,
                    kept_recovery_vms: Default::default(),
                    manager_paused_until_ms: 0,
                    reversed_at: previous.as_ref().map_or(0, |g| g.reversed_at),
                };
                let expected = previous.as_ref().map(|g| g.generation);
                s.prepare_vpg(&mut vpg, expected)?;
                Ok((vpg, peer))
            })
            .await?
    }

    /// The current definition of a VPG about to be edited, if the edit may go ahead.
    fn editable(
        s: &SiteState,
        id: &VpgId,
        own: &SiteId,
        generation: u64,
        spec: &VpgSpec,
    ) -> ApiResult<Vpg> {
        let current = s
            .vpgs
            .get(id)
            .cloned()
            .ok_or_else(|| DomainError::not_found("vpg", id))?;
        if &current.protected_site != own {
            return Err(DomainError::precondition("a VPG is edited at its protected site").into());
        }
        s.check_operable(id)?;
        if current.generation != generation {
            return Err(DomainError::Conflict {
                kind: "vpg".into(),
                id: id.to_string(),
                expected: generation,
                actual: current.generation,
            }
            .into());
        }
        if spec.recovery_site != current.recovery_site {
            return Err(DomainError::invalid(
                "spec.recovery_site_id",
                "the recovery site of a VPG cannot change",
            )
            .into());
        }
        Ok(current)
    }

    /// Creates a VPG protected by this site: the recovery site checks placement and room
    /// and stores its copy first, then this site commits.
    pub async fn create_vpg(&self, id: Option<VpgId>, spec: VpgSpec) -> ApiResult<VpgView> {
        let id = id.unwrap_or_else(|| VpgId::minted(mint("vpg")));
        if spec.vms.is_empty() {
            return Err(DomainError::invalid("spec.vms", "a new VPG needs at least one VM").into());
        }
        let (vpg, peer) = self.build_vpg(id.clone(), spec, None).await?;
        let what = format!("VPG {:?} created with {} VMs", vpg.name, vpg.vms.len());
        let task = self
            .start_task(
                TaskKind::CreateVpg,
                Some(&id),
                None,
                "storing the definition on both sites".into(),
            )
            .await;
        let event = new_event(EventCode::VpgCreated, &id, what);
        let index = self
            .store_on_both(vpg, None, None, &peer, Some(event))
            .await;
        let index = self.fail_task_on_error(task, index).await?;
        self.vpg_after(index, id).await
    }

    /// Replaces the definition of a VPG this site protects, if `generation` is current.
    pub async fn update_vpg(
        &self,
        id: VpgId,
        generation: u64,
        spec: VpgSpec,
        keep_removed_recovery_disks: bool,
    ) -> ApiResult<VpgView> {
        self.edit_vpg(id, generation, spec, keep_removed_recovery_disks, None)
            .await
    }

    /// Brings a VPG this site protects up to date with its VMs' inventory (`changes`, as
    /// [`Vpg::inventory_drift`] names them): a new generation whose footprints, and so the
    /// mirror's volumes, are the inventory's.
    pub async fn follow_inventory(
        &self,
        vpg: &Vpg,
        changes: &[(tandem_core::ids::VmId, Vec<String>)],
    ) -> ApiResult<VpgView> {
        let what = changes
            .iter()
            .map(|(vm, c)| {
                let c = if c.is_empty() {
                    "memory or reservations changed".to_string()
                } else {
                    c.join(", ")
                };
                format!("VM {vm}: {c}")
            })
            .collect::<Vec<_>>()
            .join("; ");
        self.edit_vpg(
            vpg.id.clone(),
            vpg.generation,
            vpg.spec(),
            false,
            Some(what),
        )
        .await
    }

    /// An edit by the operator (`inventory` is `None`) or one that follows the inventory.
    async fn edit_vpg(
        &self,
        id: VpgId,
        generation: u64,
        spec: VpgSpec,
        keep_removed_recovery_disks: bool,
        inventory: Option<String>,
    ) -> ApiResult<VpgView> {
        let (mut vpg, peer) = self.build_vpg(id.clone(), spec, Some(generation)).await?;
        vpg.updated_at_ms = now_ms();
        vpg.keep_removed_recovery_disks = keep_removed_recovery_disks;
        let (code, what) = match &inventory {
            None => (
                EventCode::VpgEdited,
                format!(
                    "VPG {:?} edited: generation {}, {} VMs",
                    vpg.name,
                    generation + 1,
                    vpg.vms.len()
                ),
            ),
            Some(changes) => (
                EventCode::VpgFollowedInventory,
                format!(
                    "VPG {:?} follows the inventory at generation {}: {changes}",
                    vpg.name,
                    generation + 1
                ),
            ),
        };
        // Until both sites hold the new definition, nothing else may change the VPG. The
        // edit's task starts in the same commit, and its event is stored with the
        // definition: an edit waits for two commits here, not four.
        let task = new_task(
            TaskKind::EditVpg,
            Some(&id),
            Some(generation + 1),
            "storing the definition on both sites".into(),
        );
        let task = match self
            .node
            .propose(Command::BeginVpgUpdate {
                id: id.clone(),
                reason: format!(
                    "an edit to generation {} is being stored on both sites",
                    generation + 1
                ),
                now_ms: now_ms(),
                task: Some(task),
            })
            .await?
        {
            Applied::Task(task) => Some(task),
            _ => None,
        };
        let event = new_event(code, &id, what);
        let index = self
            .store_on_both(vpg, Some(generation), None, &peer, Some(event))
            .await;
        if index.is_err() {
            // The peer may hold the edit all the same (its answer was lost): the protected
            // site's controller reconciles the two copies.
            self.end_update(&id).await;
        }
        let index = self.fail_task_on_error(task, index).await?;
        self.vpg_after(index, id).await
    }

    /// The view of a VPG on this node once it has applied `index` (its own write).
    async fn vpg_after(&self, index: u64, id: VpgId) -> ApiResult<VpgView> {
        self.node
            .read_after(index, |s| s.vpgs.get(&id).map(|g| Self::view(s, g)))
            .await?
            .ok_or_else(|| DomainError::not_found("vpg", &id).into())
    }

    /// Ends a definition update that did not commit, or that a node which died mid-edit
    /// left behind; logged, not fatal.
    pub async fn end_update(&self, id: &VpgId) {
        let cmd = Command::EndVpgUpdate { id: id.clone() };
        if let Err(e) = self.node.propose(cmd).await {
            tracing::warn!(vpg = %id, error = %e, "definition update not ended");
        }
    }

    /// Stores a definition at the peer, then here: the recovery site checks placement and
    /// room first. With `floor` (reconciliation) the peer was read at
    /// `floor.peer_expected` and both sites store generation `floor.generation`.
    async fn store_on_both(
        &self,
        vpg: Vpg,
        expected: Option<u64>,
        floor: Option<GenerationFloor>,
        peer: &PeerSite,
        event: Option<NewEvent>,
    ) -> ApiResult<u64> {
        let json = serde_json::to_vec(&vpg).map_err(ApiError::internal)?;
        let peer_expected = floor.map_or(expected, |f| Some(f.peer_expected));
        let generation_floor = floor.map(|f| f.generation);
        self.peer_call(peer, |mut c| {
            let json = json.clone();
            async move {
                c.put_vpg(v1::PeerVpgRequest {
                    vpg_json: json,
                    expected_generation: peer_expected,
                    generation_floor,
                })
                .await
            }
        })
        .await?;
        let id = vpg.id.clone();
        let committed = self
            .node
            .propose_indexed(Command::PutVpg {
                vpg,
                expected_generation: expected,
                generation_floor,
                event,
            })
            .await;
        match committed {
            Ok((index, _)) => Ok(index),
            Err(e) => {
                if expected.is_none() {
                    // Undo the peer's copy so that a failed create leaves nothing behind.
                    let own = self
                        .identity()
                        .await
                        .map(|i| i.id.to_string())
                        .unwrap_or_default();
                    let undo = self.peer_delete_vpg(peer, &id, own, false).await;
                    if let Err(u) = undo {
                        tracing::warn!(vpg = %id, error = %u, "could not undo peer copy of a failed vpg create");
                    }
                }
                Err(e)
            }
        }
    }

    /// Brings the recovery site's copy of a VPG this site protects back in line with this
    /// site's, when the two differ in generation (an edit the peer committed and this site
    /// did not): both then store this site's definition at a generation above either.
    pub async fn reconcile_definition(&self, id: &VpgId, peer_generation: u64) -> ApiResult<u64> {
        let (vpg, peer) = self
            .node
            .read({
                let id = id.clone();
                move |s| {
                    let g = s.vpgs.get(&id).cloned();
                    let peer = g
                        .as_ref()
                        .and_then(|g| s.peers.get(&g.recovery_site).cloned());
                    (g, peer)
                }
            })
            .await?;
        let vpg = vpg.ok_or_else(|| DomainError::not_found("vpg", id))?;
        let peer =
            peer.ok_or_else(|| DomainError::precondition("the recovery site is not paired"))?;
        let own_generation = vpg.generation;
        let generation = own_generation.max(peer_generation) + 1;
        self.node
            .propose(Command::BeginVpgUpdate {
                id: id.clone(),
                reason: format!(
                    "reconciling the definition with site {} (generation {own_generation} here, \
                     {peer_generation} there)",
                    peer.name
                ),
                now_ms: now_ms(),
                task: None,
            })
            .await?;
        let floor = GenerationFloor {
            peer_expected: peer_generation,
            generation,
        };
        let r = self
            .store_on_both(vpg, Some(own_generation), Some(floor), &peer, None)
            .await;
        if r.is_err() {
            self.end_update(id).await;
        }
        r?;
        self.record_event(
            EventCode::DefinitionReconciled,
            Some(id),
            format!(
                "definition reconciled with site {}: both sites hold this site's definition at \
                 generation {generation} (it was {own_generation} here, {peer_generation} there)",
                peer.name
            ),
        )
        .await;
        Ok(generation)
    }

    /// Stores a definition sent by the peer site (the recovery side of create/edit).
    pub async fn put_peer_vpg(
        &self,
        vpg: Vpg,
        expected: Option<u64>,
        generation_floor: Option<u64>,
    ) -> ApiResult<()> {
        // The recovery disks of VMs this edit removes, by VM, as this site placed them.
        let removed = self
            .node
            .read({
                let new = vpg.clone();
                move |s| {
                    let Some(old) = s.vpgs.get(&new.id) else {
                        return Vec::new();
                    };
                    let plans = tandem_core::protection::recovery_plans(old, s).unwrap_or_default();
                    plans
                        .into_iter()
                        .flat_map(|p| p.vms)
                        .filter(|vm| new.vms.iter().all(|n| n.placement.vm_id != vm.vm))
                        .map(|vm| {
                            let paths: Vec<String> =
                                vm.volumes.iter().map(|v| v.path.clone()).collect();
                            (vm.vm.to_string(), paths)
                        })
                        .collect::<Vec<_>>()
                }
            })
            .await?;
        let (id, keep) = (vpg.id.clone(), vpg.keep_removed_recovery_disks);
        self.node
            .propose(Command::PutVpg {
                vpg,
                expected_generation: expected,
                generation_floor,
                event: None,
            })
            .await?;
        for (vm, paths) in removed {
            if keep {
                self.record_event(
                    EventCode::RecoveryDisksKept,
                    Some(&id),
                    format!(
                        "VM {vm} removed from the VPG; its recovery disks were kept at: {}",
                        paths.join("; ")
                    ),
                )
                .await;
            } else {
                self.record_event(
                    EventCode::VpgEdited,
                    Some(&id),
                    format!("VM {vm} removed from the VPG; its recovery disks are removed"),
                )
                .await;
            }
        }
        Ok(())
    }

    /// The recovery side of a delete: starts deleting this site's copy.
    pub async fn delete_peer_vpg(
        &self,
        id: VpgId,
        from: SiteId,
        keep_recovery_disks: bool,
    ) -> ApiResult<()> {
        let owner = self
            .node
            .read({
                let id = id.clone();
                move |s| {
                    s.vpgs
                        .get(&id)
                        .map(|g| (g.protected_site.clone(), g.operation))
                }
            })
            .await?;
        match owner {
            None => Ok(()),
            Some((_, Some(Operation::Recovered))) => Err(DomainError::precondition(
                "this site recovered the VPG and runs its VMs: delete it here, not from the \
                 old protected site",
            )
            .into()),
            Some((site, _)) if site == from => self
                .node
                .propose(Command::BeginVpgDelete {
                    id,
                    keep_recovery_disks,
                    now_ms: now_ms(),
                })
                .await
                .map(|_| ()),
            Some(_) => {
                Err(DomainError::precondition("only the protected site may delete its VPG").into())
            }
        }
    }

    /// Deletes a VPG on both sites: the peer confirms, then both sites' controllers
    /// unassign their VRAs (the recovery site removes the recovery disks unless kept) and
    /// remove the definition. A delete that cannot finish leaves "VPG waiting to be
    /// removed": deleting again retries; `force` removes the definition here at once
    /// (also at the recovery site, or when the peer is gone) and leaves the VRAs' data.
    pub async fn delete_vpg(
        &self,
        id: VpgId,
        keep_recovery_disks: bool,
        force: bool,
    ) -> ApiResult<()> {
        let (vpg, peer, own, away) = self
            .node
            .read({
                let id = id.clone();
                move |s| {
                    let g = s.vpgs.get(&id).cloned();
                    // Its VMs run at the peer (stood down, or moved away): this site only
                    // lets go of its copy, the peer's stays.
                    let away = s.stood_down.contains_key(&id)
                        || g.as_ref().is_some_and(|g| {
                            g.operation == Some(Operation::Recovered)
                                && Some(&g.protected_site) == s.site_id()
                        });
                    let peer = g.as_ref().and_then(|g| {
                        let other = if Some(&g.protected_site) == s.site_id() {
                            &g.recovery_site
                        } else {
                            &g.protected_site
                        };
                        s.peers.get(other).cloned()
                    });
                    (g, peer, s.site_id().cloned(), away)
                }
            })
            .await?;
        let vpg = vpg.ok_or_else(|| DomainError::not_found("vpg", &id))?;
        let protected_here = Some(&vpg.protected_site) == own.as_ref();
        // The recovery site may retry a delete the protected site started (and may have
        // finished on its side).
        let retry = matches!(
            vpg.operation,
            Some(Operation::Deleting | Operation::DeleteFailed)
        );
        if !protected_here && !force && !retry {
            return Err(DomainError::precondition(
                "this site recovers the VPG; delete it at its protected site, or use force",
            )
            .into());
        }
        if let Some(op) = vpg.operation.filter(|op| !op.allows_delete()) {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: it cannot be deleted now"
            ))
            .into());
        }
        if protected_here
            && !away
            && let Some(peer) = &peer
        {
            let own = own.map(|s| s.to_string()).unwrap_or_default();
            let r = self
                .peer_delete_vpg(peer, &id, own, keep_recovery_disks)
                .await;
            match r {
                Ok(_) => {}
                Err(e) if force => {
                    tracing::warn!(vpg = %id, error = %e, "force delete: peer copy left behind");
                }
                Err(e) => return Err(e),
            }
        }
        if force {
            let r = self
                .node
                .propose(Command::DeleteVpg {
                    id: id.clone(),
                    now_ms: now_ms(),
                })
                .await;
            self.instant_task(TaskKind::DeleteVpg, Some(&id), &r).await;
            r?;
            self.record_event(
                EventCode::VpgDeleted,
                Some(&id),
                format!(
                    "VPG {:?} force-deleted; its VRAs' data was left in place",
                    vpg.name
                ),
            )
            .await;
            return Ok(());
        }
        let r = self
            .node
            .propose(Command::BeginVpgDelete {
                id: id.clone(),
                keep_recovery_disks,
                now_ms: now_ms(),
            })
            .await;
        if r.is_ok() {
            // Running until the controllers have removed the definition.
            self.start_task(
                TaskKind::DeleteVpg,
                Some(&id),
                None,
                "unassigning the VRAs".into(),
            )
            .await;
        }
        r?;
        self.record_event(
            EventCode::VpgDeleteStarted,
            Some(&id),
            format!(
                "deleting VPG {:?}, {} its recovery disks",
                vpg.name,
                if keep_recovery_disks {
                    "keeping"
                } else {
                    "removing"
                }
            ),
        )
        .await;
        Ok(())
    }

    /// Events matching `q`, oldest first: after `after_id`, or the newest `limit`.
    pub async fn events(&self, q: EventQuery) -> ApiResult<Vec<tandem_core::events::Event>> {
        self.node
            .read(move |s| {
                let matching = |e: &&tandem_core::events::Event| {
                    q.vpg.as_ref().is_none_or(|v| e.vpg.as_ref() == Some(v))
                        && q.code.is_none_or(|c| e.code == c)
                };
                let mut out: Vec<_> = if q.after_id > 0 {
                    s.events
                        .iter()
                        .filter(|e| e.id > q.after_id)
                        .filter(matching)
                        .take(q.limit)
                        .cloned()
                        .collect()
                } else {
                    s.events
                        .iter()
                        .rev()
                        .filter(matching)
                        .take(q.limit)
                        .cloned()
                        .collect()
                };
                out.sort_by_key(|e| e.id);
                out
            })
            .await
    }

    /// The active alerts (of one VPG, or all), from the leader's status snapshot.
    pub async fn alerts(&self, vpg: Option<VpgId>) -> ApiResult<Vec<control::ActiveAlert>> {
        match self.leader_call(LeaderRequest::Alerts { vpg }).await? {
            LeaderResponse::Alerts(a) => Ok(a),
            _ => Err(ApiError::internal("unexpected leader answer")),
        }
    }

    /// Starts a task; a task that cannot be stored is logged, not fatal to its operation.
    pub async fn start_task(
        &self,
        kind: TaskKind,
        vpg: Option<&VpgId>,
        generation: Option<u64>,
        message: String,
    ) -> Option<u64> {
        let task = new_task(kind, vpg, generation, message);
        match self.node.propose(Command::StartTask { task }).await {
            Ok(Applied::Task(id)) => Some(id),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(kind = kind.name(), error = %e, "task not recorded");
                None
            }
        }
    }

    pub async fn end_task(&self, id: Option<u64>, ok: bool, message: String) {
        let Some(id) = id else { return };
        let cmd = Command::EndTask {
            id,
            ok,
            message,
            now_ms: now_ms(),
        };
        if let Err(e) = self.node.propose(cmd).await {
            tracing::warn!(task = id, error = %e, "task end not recorded");
        }
    }

    /// Ends `task` as failed when `r` is an error; answers `r`.
    async fn fail_task_on_error<T>(&self, task: Option<u64>, r: ApiResult<T>) -> ApiResult<T> {
        if let Err(e) = &r {
            self.end_task(task, false, e.to_string()).await;
        }
        r
    }

    /// A task that ends with its operation.
    async fn instant_task<T>(&self, kind: TaskKind, vpg: Option<&VpgId>, r: &ApiResult<T>) {
        let task = self.start_task(kind, vpg, None, String::new()).await;
        let (ok, message) = match r {
            Ok(_) => (true, "done".to_string()),
            Err(e) => (false, e.to_string()),
        };
        self.end_task(task, ok, message).await;
    }

    /// Tasks, oldest first (of one VPG, or running ones only, when asked).
    pub async fn tasks(
        &self,
        vpg: Option<VpgId>,
        running_only: bool,
        limit: usize,
    ) -> ApiResult<Vec<Task>> {
        self.node
            .read(move |s| {
                let mut v: Vec<Task> = s
                    .tasks
                    .all()
                    .filter(|t| vpg.as_ref().is_none_or(|g| t.vpg.as_ref() == Some(g)))
                    .filter(|t| !running_only || t.state == TaskState::Running)
                    .cloned()
                    .collect();
                let skip = v.len().saturating_sub(limit);
                v.drain(..skip);
                v
            })
            .await
    }

    pub async fn task(&self, id: u64) -> ApiResult<Task> {
        self.node
            .read(move |s| s.tasks.get(id).cloned())
            .await?
            .ok_or_else(|| DomainError::not_found("task", id).into())
    }

    /// Appends to the event log; an event that cannot be stored is logged, not fatal to
    /// the operation it describes.
    pub async fn record_event(&self, code: EventCode, vpg: Option<&VpgId>, description: String) {
        let event = NewEvent {
            at_ms: now_ms(),
            code,
            vpg: vpg.cloned(),
            description,
        };
        if let Err(e) = self.node.propose(Command::RecordEvent { event }).await {
            tracing::warn!(code = code.code(), error = %e, "event not recorded");
        }
    }

    fn view(s: &SiteState, g: &Vpg) -> VpgView {
        let own = s
            .site_id()
            .cloned()
            .unwrap_or_else(|| SiteId::minted(String::new()));
        let peer_id = if g.protected_site == own {
            &g.recovery_site
        } else {
            &g.protected_site
        };
        let peer_name = s
            .peers
            .get(peer_id)
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let stood_down = s.stood_down.get(&g.id).cloned();
        let owner = if let Some(d) = &stood_down {
            d.by.clone()
        } else if s.recoveries.contains_key(&g.id)
            || (g.operation == Some(Operation::Recovered) && g.recovery_site == own)
        {
            own.clone()
        } else if g.operation == Some(Operation::Recovered) {
            g.recovery_site.clone()
        } else {
            g.protected_site.clone()
        };
        // Until VRAs report in, what is known is the definition alone.
        let obs = VpgObservation {
            vm_count: g.vms.len(),
            operation: g
                .operation
                .or_else(|| stood_down.as_ref().and_then(|d| d.peer_operation())),
            sync: None,
            forced: false,
            pause: None,
            faults: match &stood_down {
                Some(d) if d.peer_operation().is_none() => {
                    vec![tandem_core::status::Fault::NeedsConfiguration]
                }
                _ => vec![],
            },
            backup_running: false,
            actual_rpo_secs: None,
            target_rpo_secs: g.settings.target_rpo_secs,
            history_met: false,
            has_checkpoints: false,
            after_rollback: false,
            test_overdue: false,
        };
        VpgView {
            vpg: g.clone(),
            own_site: own,
            peer_name,
            state: obs.evaluate(),
            live: None,
            testing: s.tests.contains_key(&g.id),
            owner,
            stood_down,
        }
    }

    /// Puts the leader's live snapshots into `views`.
    async fn with_live(&self, mut views: Vec<VpgView>) -> Vec<VpgView> {
        let ids = if views.len() == 1 {
            vec![views[0].vpg.id.clone()]
        } else {
            Vec::new()
        };
        let mut live = control::live_statuses(self, ids).await;
        for v in &mut views {
            if let Some(l) = live.remove(&v.vpg.id) {
                v.state = l.state;
                v.live = Some(l);
            }
        }
        views
    }

    pub async fn vpg(&self, id: VpgId) -> ApiResult<VpgView> {
        let found = self.node.read({
            let id = id.clone();
            move |s| s.vpgs.get(&id).map(|g| Self::view(s, g))
        });
        let view = found
            .await?
            .ok_or_else(|| ApiError::from(DomainError::not_found("vpg", &id)))?;
        Ok(self.with_live(vec![view]).await.remove(0))
    }

    pub async fn vpgs(&self) -> ApiResult<Vec<VpgView>> {
        let views = self
            .node
            .read(|s| s.vpgs.values().map(|g| Self::view(s, g)).collect())
            .await?;
        Ok(self.with_live(views).await)
    }
}

/// The VPG list as CSV, with the columns of the seed's VPGs view.
pub fn vpgs_csv(views: &[VpgView]) -> String {
    fn cell(s: &str) -> String {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let mut out = String::from(
        "Alert Status,VPG Name,#VMs,Direction,Peer Site,Priority,Protection Status,State,Actual RPO,Operation\n",
    );
    for v in views {
        let direction = if v.vpg.protected_site == v.own_site {
            "Outgoing"
        } else {
            "Incoming"
        };
        let operation = v.operation();
        let row = [
            v.state.alert.as_str().to_string(),
            v.vpg.name.clone(),
            v.vpg.vms.len().to_string(),
            direction.to_string(),
            v.peer_name.clone(),
            v.vpg.settings.priority.as_str().to_string(),
            v.state.status.as_str().to_string(),
            v.state.substatus.as_str().to_string(),
            v.live
                .as_ref()
                .and_then(|l| l.figures.actual_rpo_secs)
                .map(|r| format!("{r}s"))
                .unwrap_or_default(),
            operation,
        ];
        out.push_str(&row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

/// A checked checkpoint listing query.
#[derive(Debug, Clone)]
pub struct CheckpointQuery {
    pub vpg: VpgId,
    pub from_ms: u64,
    pub to_ms: u64,
    pub named_only: bool,
    pub kind: Option<v1::CheckpointKind>,
    pub page_size: usize,
    /// Continue after this checkpoint id (the list is newest first, ids descend).
    pub after: Option<u64>,
    /// The query as received, to pass on to the recovery site.
    pub wire: v1::ListCheckpointsQuery,
}

/// Filters and pages the checkpoints of one VPG (the VRA's list, oldest first).
pub fn page_checkpoints(list: Vec<v1::VraCheckpoint>, q: &CheckpointQuery) -> v1::CheckpointList {
    use tandem_proto::vra_convert::{checkpoint_kind, split_marker_name};
    let matching: Vec<v1::Checkpoint> = list
        .into_iter()
        .rev()
        .filter(|c| c.timestamp_ms >= q.from_ms && (q.to_ms == 0 || c.timestamp_ms <= q.to_ms))
        .filter(|c| !q.named_only || !c.name.is_empty())
        .filter(|c| q.kind.is_none_or(|k| checkpoint_kind(c.kind) == k))
        .map(|c| {
            let (name, vm_id) = split_marker_name(&c.name);
            v1::Checkpoint {
                id: c.checkpoint_id,
                timestamp_ms: c.timestamp_ms,
                kind: checkpoint_kind(c.kind) as i32,
                name,
                vm_id,
                usable: c.durable && c.usable,
            }
        })
        .collect();
    let total = matching.len() as u32;
    let mut rest = matching
        .into_iter()
        .skip_while(|c| q.after.is_some_and(|a| c.id >= a))
        .peekable();
    let mut checkpoints = Vec::with_capacity(q.page_size.min(1000));
    while checkpoints.len() < q.page_size {
        match rest.next() {
            Some(c) => checkpoints.push(c),
            None => break,
        }
    }
    let next_page_token = match (rest.peek(), checkpoints.last()) {
        (Some(_), Some(last)) => last.id.to_string(),
        _ => String::new(),
    };
    v1::CheckpointList {
        checkpoints,
        next_page_token,
        total,
    }
}

impl SiteManager {
    /// This site's report for the peer `from` (from the leader's memory).
    pub async fn peer_report(&self, from: SiteId) -> ApiResult<tandem_core::observe::PeerReport> {
        let known = self.node.read_local(|s| s.peers.contains_key(&from));
        if !known {
            return Err(DomainError::precondition(format!(
                "site {from} is not paired with this site"
            ))
            .into());
        }
        match self.leader_call(LeaderRequest::PeerReport { from }).await? {
            LeaderResponse::PeerReport(r) => Ok(r),
            _ => Err(ApiError::internal("unexpected leader answer")),
        }
    }

    /// The checkpoints of a VPG, from the recovery site's journals: read here when this
    /// site recovers it, else asked of the recovery site (`forward`).
    pub async fn checkpoints(
        &self,
        q: CheckpointQuery,
        forward: bool,
    ) -> ApiResult<v1::CheckpointList> {
        let (protects, peer) = self
            .node
            .read({
                let id = q.vpg.clone();
                move |s| -> ApiResult<(bool, Option<PeerSite>)> {
                    let g = s
                        .vpgs
                        .get(&id)
                        .ok_or_else(|| DomainError::not_found("vpg", &id))?;
                    Ok((
                        s.site_id() == Some(&g.protected_site),
                        s.peers.get(&g.recovery_site).cloned(),
                    ))
                }
            })
            .await??;
        if !protects {
            let list = control::recovery_checkpoints(self, &q.vpg).await?;
            return Ok(page_checkpoints(list, &q));
        }
        if !forward {
            return Err(DomainError::precondition(format!(
                "this site protects VPG {}: its checkpoints are listed at the recovery site",
                q.vpg
            ))
            .into());
        }
        let peer =
            peer.ok_or_else(|| DomainError::precondition("the recovery site is not paired"))?;
        self.peer_call(&peer, |mut c| {
            let wire = q.wire.clone();
            async move { c.list_checkpoints(wire).await }
        })
        .await
    }

    /// Takes a named checkpoint in each VPG (one barrier each), on the leader.
    /// Pauses (or resumes) the protection of VPGs this site protects. Every VPG is checked
    /// before any changes; the reconciler then pauses or resumes their protected VRAs.
    pub async fn set_paused(&self, vpgs: Vec<VpgId>, paused: bool) -> ApiResult<()> {
        let check = vpgs.clone();
        self.node
            .read(move |s| check.iter().try_for_each(|id| s.check_pausable(id)))
            .await??;
        for id in vpgs {
            let r = self
                .node
                .propose(Command::SetVpgPaused {
                    id: id.clone(),
                    paused,
                })
                .await;
            let kind = if paused {
                TaskKind::PauseVpg
            } else {
                TaskKind::ResumeVpg
            };
            self.instant_task(kind, Some(&id), &r).await;
            r?;
            let (code, what) = if paused {
                (
                    EventCode::ProtectionPaused,
                    "protection paused by the operator",
                )
            } else {
                (
                    EventCode::ProtectionResumed,
                    "protection resumed by the operator",
                )
            };
            self.record_event(code, Some(&id), what.into()).await;
        }
        Ok(())
    }

    /// Starts a delta sync of every volume of these VPGs (the leader asks their VRAs).
    pub async fn force_sync(&self, vpgs: Vec<VpgId>) -> ApiResult<()> {
        match self
            .leader_call(LeaderRequest::ForceSync { vpgs: vpgs.clone() })
            .await?
        {
            LeaderResponse::Done => {
                for id in &vpgs {
                    // Running until the delta sync has run and the VPG is level again.
                    self.start_task(
                        TaskKind::ForceSync,
                        Some(id),
                        None,
                        "delta sync of every volume".into(),
                    )
                    .await;
                    self.record_event(
                        EventCode::ForceSyncStarted,
                        Some(id),
                        "force sync started: a delta sync of every volume".into(),
                    )
                    .await;
                }
                Ok(())
            }
            _ => Err(ApiError::internal("unexpected leader answer")),
        }
    }

    pub async fn add_checkpoint(
        &self,
        vpgs: Vec<VpgId>,
        name: String,
        kind: control::checkpoints::Kind,
        vm: Option<tandem_core::ids::VmId>,
    ) -> ApiResult<Vec<control::checkpoints::Taken>> {
        match self
            .leader_call(LeaderRequest::AddCheckpoint {
                vpgs,
                name,
                kind,
                vm,
            })
            .await?
        {
            LeaderResponse::Checkpoints(t) => {
                for c in &t {
                    self.instant_task(TaskKind::AddCheckpoint, Some(&c.vpg), &Ok(()))
                        .await;
                    self.record_event(
                        EventCode::CheckpointAdded,
                        Some(&c.vpg),
                        format!("checkpoint {:?} added ({:?}, id {})", c.name, c.kind, c.id),
                    )
                    .await;
                }
                Ok(t)
            }
            _ => Err(ApiError::internal("unexpected leader answer")),
        }
    }
}
