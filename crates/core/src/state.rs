//! The site's replicated state: what the Raft state machine holds and how commands change
//! it. `apply` is deterministic: ids and clocks come inside the commands, minted by the
//! manager that proposed them, so every node computes the same outcome.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Violations};
use crate::ids::{DatastoreId, HostId, PoolId, SiteId, VmId, VpgId};
use crate::inventory::{Datastore, Host, ResourcePool, Vm};
use crate::pairing::{PairingToken, PeerSite};
use crate::status::Operation;
use crate::vpg::{RecoveryCommitments, Vpg, VpgVm};

/// The site's own identity, fixed at bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteIdentity {
    pub id: SiteId,
    pub name: String,
    pub created_at_ms: u64,
}

/// The whole configuration of one site, as replicated by Raft.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteState {
    pub identity: Option<SiteIdentity>,
    pub peers: BTreeMap<SiteId, PeerSite>,
    pub pairing_tokens: Vec<PairingToken>,
    pub hosts: BTreeMap<HostId, Host>,
    pub datastores: BTreeMap<DatastoreId, Datastore>,
    pub pools: BTreeMap<PoolId, ResourcePool>,
    pub vms: BTreeMap<VmId, Vm>,
    pub vpgs: BTreeMap<VpgId, Vpg>,
    #[serde(default)]
    pub events: crate::events::EventLog,
    #[serde(default)]
    pub tasks: crate::tasks::TaskLog,
    /// VPGs whose definition is being updated (an edit storing on both sites, or the two
    /// sites' copies being reconciled): no other operation on them until it ends.
    #[serde(default)]
    pub updating: BTreeMap<VpgId, DefinitionUpdate>,
    /// Failover tests running at this (recovery) site, by VPG.
    #[serde(default)]
    pub tests: BTreeMap<VpgId, crate::recovery::FailoverTest>,
    /// The last failover test of each VPG (for the overdue reminder).
    #[serde(default)]
    pub test_results: BTreeMap<VpgId, crate::recovery::TestResult>,
    /// Failovers and moves this site runs, by VPG (at most one each).
    #[serde(default)]
    pub recoveries: BTreeMap<VpgId, crate::recovery::RecoveryOp>,
    /// Operator API tokens (hashes only).
    #[serde(default)]
    pub tokens: crate::access::TokenTable,
    /// The site's CA, with its key: whichever manager leads issues certificates.
    #[serde(default)]
    pub ca: Option<crate::enroll::SiteCaRecord>,
    /// Unused join tokens (hashes only).
    #[serde(default)]
    pub join_tokens: crate::enroll::JoinTokens,
    /// A rotation of the site's CA under way.
    #[serde(default)]
    pub ca_rotation: Option<crate::ca_rotation::CaRotation>,
    /// What each manager (by node id) last reported of its own certificate.
    #[serde(default)]
    pub node_certs: BTreeMap<u64, crate::ca_rotation::NodeCert>,
    /// The status each VPG was last recorded in by the leader's monitor: a new leader
    /// takes up from there, so a change is neither lost nor told twice across leaders.
    #[serde(default)]
    pub recorded_status: BTreeMap<VpgId, crate::status::VpgState>,
    /// VPGs this site protects that another site recovered (or deleted after running
    /// their VMs): this site stands them down.
    #[serde(default)]
    pub stood_down: BTreeMap<VpgId, crate::fence::StandDown>,
    /// How the last failover or move this site ran of each VPG ended (its peer reads it).
    #[serde(default)]
    pub recovery_outcomes: BTreeMap<VpgId, crate::fence::RecoveryClaim>,
    /// VPGs this site deleted, so that a peer returning with an older copy learns it
    /// (bounded by [`crate::fence::MAX_TOMBSTONES`]).
    #[serde(default)]
    pub tombstones: BTreeMap<VpgId, crate::fence::Tombstone>,
}

/// An update of a VPG's definition that is under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionUpdate {
    pub reason: String,
    pub since_ms: u64,
}

/// A change to the site state, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Names the site at bootstrap (idempotent for the same id and name).
    InitSite {
        identity: SiteIdentity,
    },
    IssuePairingToken {
        token: PairingToken,
        now_ms: u64,
    },
    /// A peer presented a pairing token whose hash is `token_hash`: consume it and record
    /// the peer.
    AcceptPairing {
        #[serde(default)]
        token_hash: String,
        /// Entries written before hashes were proposed carry the secret: hashed on apply.
        #[serde(default, rename = "token", skip_serializing)]
        legacy_token: crate::pairing::LegacySecret,
        peer: PeerSite,
        now_ms: u64,
    },
    /// Records a peer that accepted our pairing request.
    AddPeer {
        peer: PeerSite,
    },
    RemovePeer {
        id: SiteId,
    },
    /// Limits what this site's VRAs send to a peer site (0: no limit).
    SetPeerBandwidthLimit {
        id: SiteId,
        bytes_per_sec: u64,
    },
    PutHost {
        host: Host,
        create: bool,
    },
    DeleteHost {
        id: HostId,
    },
    PutDatastore {
        datastore: Datastore,
        create: bool,
    },
    DeleteDatastore {
        id: DatastoreId,
    },
    PutPool {
        pool: ResourcePool,
        create: bool,
    },
    DeletePool {
        id: PoolId,
    },
    PutVm {
        vm: Vm,
        create: bool,
    },
    DeleteVm {
        id: VmId,
    },
    /// Creates (`expected_generation` = None) or replaces a VPG. The protected site checks
    /// its VMs; the recovery site checks placement and room.
    PutVpg {
        vpg: Vpg,
        expected_generation: Option<u64>,
        /// Reconciliation of the two sites' copies: the stored generation is at least this
        /// (both sites then agree on it).
        #[serde(default)]
        generation_floor: Option<u64>,
        /// Recorded with the definition, in the same commit (what an operator's create or
        /// edit reports).
        #[serde(default)]
        event: Option<crate::events::NewEvent>,
    },
    /// Marks a VPG's definition as being updated; refused while another update runs.
    /// With `task`, starts it in the same commit and answers its id.
    BeginVpgUpdate {
        id: VpgId,
        reason: String,
        now_ms: u64,
        #[serde(default)]
        task: Option<crate::tasks::NewTask>,
    },
    /// Ends an update that did not put a new definition (a put ends it by itself).
    EndVpgUpdate {
        id: VpgId,
    },
    DeleteVpg {
        id: VpgId,
        /// When (for its tombstone).
        #[serde(default)]
        now_ms: u64,
    },
    /// This (protected) site stands VPG `vpg` down: another site runs its VMs (or deleted
    /// it after running them). Refused where this site does not protect it; the same cause
    /// again changes nothing, a newer one replaces it (keeping what was counted).
    StandDown {
        vpg: VpgId,
        stand_down: crate::fence::StandDown,
    },
    /// Every VRA of a stood-down VPG stopped: what its VMs wrote that the other site does
    /// not hold, per volume (recorded once, with event EV0067).
    RecordDivergence {
        vpg: VpgId,
        divergence: Vec<crate::fence::VolumeDivergence>,
        now_ms: u64,
    },
    /// Protects the VMs of a VPG recovered here without reverse protection back towards
    /// its old protected site, over that site's original disks (a delta sync there), with
    /// the old site's resource pool `pool` when given (else the one the VPG names).
    ProtectBack {
        vpg: VpgId,
        pool: Option<crate::ids::PoolId>,
        now_ms: u64,
    },
    /// The peer rolled back the recovery `op` this site stood down for: protection
    /// resumes (a final stand-down is never lifted).
    StandUp {
        vpg: VpgId,
        op: crate::ids::RecoveryOpId,
        now_ms: u64,
    },
    /// Sets or clears the operation a VPG is in, if the VPG is still at `generation` (a
    /// controller's view may be stale: an edit in between wins), with the event that tells
    /// it, in the same commit.
    SetVpgOperation {
        id: VpgId,
        generation: u64,
        operation: Option<crate::status::Operation>,
        #[serde(default)]
        event: Option<crate::events::NewEvent>,
    },
    /// Installs the site's first admin token, once in its life (a restarted bootstrap node
    /// proposing it again changes nothing).
    BootstrapAdminToken {
        token: crate::access::ApiToken,
        now_ms: u64,
    },
    /// Keeps the site's CA (once; the same CA again is harmless, another one is refused).
    InstallCa {
        ca: crate::enroll::SiteCaRecord,
    },
    CreateJoinToken {
        token: crate::enroll::JoinToken,
        now_ms: u64,
    },
    /// Starts rotating the site's CA to `next` (trusted everywhere before it issues).
    StartCaRotation {
        next: crate::enroll::SiteCaRecord,
        started_by: String,
        now_ms: u64,
    },
    /// The CA the site rotates to issues from now on.
    IssueFromNextCa {
        fingerprint: String,
        now_ms: u64,
    },
    /// The CA the site rotated from leaves every trust store.
    RetireOldCa {
        fingerprint: String,
        now_ms: u64,
    },
    /// What manager `node` reports of its own certificate.
    RecordNodeCert {
        node: u64,
        cert: crate::ca_rotation::NodeCert,
    },
    /// The CAs a paired site's nodes present certificates of (it rotated its CA); the
    /// caller checked that they continue the ones trusted now.
    SetPeerCa {
        id: SiteId,
        ca_pem: String,
    },
    RevokeJoinToken {
        id: crate::access::TokenId,
    },
    /// Uses a join token for the certificate of `identity`, and records that it did.
    ConsumeJoinToken {
        id: crate::access::TokenId,
        secret_hash: String,
        identity: String,
        now_ms: u64,
    },
    CreateToken {
        token: crate::access::ApiToken,
        now_ms: u64,
    },
    RevokeToken {
        id: crate::access::TokenId,
        now_ms: u64,
    },
    /// The status the leader's monitor sees a VPG in: a change from the recorded one
    /// (with its event, EV0030), or the first it records (no event).
    RecordStatus {
        vpg: VpgId,
        state: crate::status::VpgState,
        event: Option<crate::events::NewEvent>,
    },
    /// Appends to the event log.
    RecordEvent {
        event: crate::events::NewEvent,
    },
    /// Appends several events at once (the audit trail's batches).
    RecordEvents {
        events: Vec<crate::events::NewEvent>,
    },
    /// Starts a task; answers its id.
    StartTask {
        task: crate::tasks::NewTask,
    },
    UpdateTask {
        id: u64,
        progress: u8,
        message: String,
    },
    EndTask {
        id: u64,
        ok: bool,
        message: String,
        now_ms: u64,
    },
    /// Starts deleting a VPG: its controllers unassign its VRAs (removing the recovery
    /// disks unless kept), then remove the definition.
    BeginVpgDelete {
        id: VpgId,
        keep_recovery_disks: bool,
        now_ms: u64,
    },
    /// Pauses or resumes the protection of a VPG this site protects. Not a definition
    /// change: the generation stays (the VRAs keep their assignment).
    SetVpgPaused {
        id: VpgId,
        paused: bool,
    },
    /// The site manager pauses the protection of a VPG this site protects until
    /// `until_ms` (0 ends its pause), to leave time to enlarge a journal that a sync would
    /// otherwise empty of checkpoints.
    SetManagerPause {
        id: VpgId,
        until_ms: u64,
    },
    /// Starts a failover test of a VPG this site recovers.
    StartFailoverTest {
        test: crate::recovery::FailoverTest,
    },
    /// Starts a failover (or move) of a VPG this site recovers, at its first step.
    BeginRecovery {
        op: crate::recovery::RecoveryOp,
    },
    /// The leader moves an operation on (see [`crate::recovery::RecoveryAdvance`]).
    AdvanceRecovery {
        advance: crate::recovery::RecoveryAdvance,
    },
    /// The operator (or the commit policy) commits or rolls back before commit; the first
    /// word stands.
    RecoveryInput {
        vpg: VpgId,
        intent: crate::recovery::RecoveryIntent,
    },
    /// A promoted (committed) or rolled-back operation ends: its task and event, and the
    /// VPG's operation (Recovered, or none).
    EndRecovery {
        vpg: VpgId,
        op: crate::ids::RecoveryOpId,
        now_ms: u64,
    },
    /// The leader's progress on a running test (ignored unless it names that test; a
    /// stopping test stays stopping).
    ProgressFailoverTest {
        progress: crate::recovery::TestProgress,
    },
    /// The operator stops a test (the first verdict given stands).
    StopFailoverTest {
        vpg: VpgId,
        verdict: crate::recovery::TestVerdict,
        #[serde(default)]
        now_ms: u64,
    },
    /// A stopping test whose images are closed: it ends, its result is kept, its task
    /// ends and event EV0061 gives the verdict (all in one step, so a new leader never
    /// finds a test half ended). `left` names images that could not be closed.
    EndFailoverTest {
        vpg: VpgId,
        task: u64,
        stopped_ms: u64,
        #[serde(default)]
        left: Vec<String>,
    },
}

fn being_updated(id: &VpgId, u: &DefinitionUpdate) -> DomainError {
    DomainError::precondition(format!(
        "the definition of VPG {id} is being updated ({}); retry when that ends",
        u.reason
    ))
}

/// What a successful command returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Applied {
    Done,
    /// The new generation of a VPG after a put.
    Generation(u64),
    /// The id of a started task.
    Task(u64),
}

/// The outcome of applying a command: a value or a domain error, both replicated.
pub type CommandOutcome = Result<Applied, DomainError>;

impl SiteState {
    /// The site's CAs, their rotation and the managers' certificates, to change together.
    fn site_cas(&mut self) -> crate::ca_rotation::SiteCas<'_> {
        crate::ca_rotation::SiteCas {
            ca: &mut self.ca,
            rotation: &mut self.ca_rotation,
            node_certs: &mut self.node_certs,
        }
    }

    /// The site's CA certificates every node trusts now, the issuing one first (None: the
    /// managers hold no CA).
    pub fn ca_bundle(&self) -> Option<String> {
        crate::ca_rotation::bundle(self.ca.as_ref(), self.ca_rotation.as_ref())
    }

    /// The fingerprints of [`SiteState::ca_bundle`], sorted.
    pub fn ca_fingerprints(&self) -> Vec<String> {
        crate::ca_rotation::bundle_fingerprints(self.ca.as_ref(), self.ca_rotation.as_ref())
    }

    /// This site's id, once bootstrapped.
    pub fn site_id(&self) -> Option<&SiteId> {
        self.identity.as_ref().map(|i| &i.id)
    }

    /// Applies one committed command.
    pub fn apply(&mut self, cmd: Command) -> CommandOutcome {
        match cmd {
            Command::InitSite { identity } => match &self.identity {
                Some(existing) if existing.id != identity.id || existing.name != identity.name => {
                    Err(DomainError::precondition(format!(
                        "site is already initialized as {:?} ({})",
                        existing.name, existing.id
                    )))
                }
                Some(_) => Ok(Applied::Done),
                None => {
                    self.identity = Some(identity);
                    Ok(Applied::Done)
                }
            },
            Command::IssuePairingToken { token, now_ms } => {
                self.pairing_tokens.retain(|t| t.expires_at_ms > now_ms);
                self.pairing_tokens.push(token);
                Ok(Applied::Done)
            }
            Command::AcceptPairing {
                token_hash,
                legacy_token,
                peer,
                now_ms,
            } => {
                self.pairing_tokens.retain(|t| t.expires_at_ms > now_ms);
                let presented = if token_hash.is_empty() {
                    legacy_token.hash()
                } else {
                    token_hash
                };
                let Some(pos) = self
                    .pairing_tokens
                    .iter()
                    .position(|t| t.matches(&presented))
                else {
                    return Err(DomainError::precondition(
                        "pairing token is unknown, used or expired",
                    ));
                };
                self.check_new_peer(&peer)?;
                self.pairing_tokens.remove(pos);
                self.peers.insert(peer.id.clone(), peer);
                Ok(Applied::Done)
            }
            Command::SetPeerBandwidthLimit { id, bytes_per_sec } => {
                crate::pairing::check_bandwidth_limit(bytes_per_sec)?;
                let peer = self
                    .peers
                    .get_mut(&id)
                    .ok_or_else(|| DomainError::not_found(SiteId::KIND, &id))?;
                peer.bandwidth_limit_bytes_per_sec = bytes_per_sec;
                Ok(Applied::Done)
            }
            Command::AddPeer { peer } => {
                self.check_new_peer(&peer)?;
                self.peers.insert(peer.id.clone(), peer);
                Ok(Applied::Done)
            }
            Command::RemovePeer { id } => {
                self.check_unpairable(&id)?;
                self.peers.remove(&id);
                Ok(Applied::Done)
            }
            Command::PutHost { host, create } => {
                host.validate()?;
                self.unique_name(
                    self.hosts.values().map(|h| (&h.id, &h.name)),
                    &host.id,
                    &host.name,
                    "host",
                )?;
                put(&mut self.hosts, host.id.clone(), host, create, HostId::KIND)
            }
            Command::DeleteHost { id } => {
                exists(&self.hosts, &id, HostId::KIND)?;
                if let Some(vm) = self.vms.values().find(|v| v.host_id == id) {
                    return in_use("host", &id, "VM", &vm.name);
                }
                if let Some(ds) = self.datastores.values().find(|d| d.host_id == id) {
                    return in_use("host", &id, "datastore", &ds.name);
                }
                if let Some(g) = self
                    .vpgs
                    .values()
                    .find(|g| g.vms.iter().any(|v| v.placement.recovery_host == id))
                {
                    return in_use("host", &id, "VPG", &g.name);
                }
                self.hosts.remove(&id);
                Ok(Applied::Done)
            }
            Command::PutDatastore { datastore, create } => {
                datastore.validate()?;
                if !self.hosts.contains_key(&datastore.host_id) {
                    return Err(DomainError::invalid(
                        "host_id",
                        format!("host {} does not exist", datastore.host_id),
                    ));
                }
                self.unique_name(
                    self.datastores.values().map(|d| (&d.id, &d.name)),
                    &datastore.id,
                    &datastore.name,
                    "datastore",
                )?;
                if !create {
                    let committed = RecoveryCommitments::of(
                        self.vpgs.values(),
                        &self.own_id(),
                        &VpgId::minted(String::new()),
                    );
                    let used = committed
                        .datastore_bytes
                        .get(&datastore.id)
                        .copied()
                        .unwrap_or(0)
                        + self.local_volume_bytes(&datastore.id, None);
                    if datastore.capacity_bytes < used {
                        return Err(DomainError::invalid(
                            "capacity_bytes",
                            format!("{} bytes are already committed on this datastore", used),
                        ));
                    }
                }
                put(
                    &mut self.datastores,
                    datastore.id.clone(),
                    datastore,
                    create,
                    DatastoreId::KIND,
                )
            }
            Command::DeleteDatastore { id } => {
                exists(&self.datastores, &id, DatastoreId::KIND)?;
                if let Some(vm) = self
                    .vms
                    .values()
                    .find(|v| v.volumes.iter().any(|vol| vol.datastore_id == id))
                {
                    return in_use("datastore", &id, "VM", &vm.name);
                }
                if let Some(g) = self
                    .vpgs
                    .values()
                    .find(|g| g.vms.iter().any(|v| v.placement.recovery_datastore == id))
                {
                    return in_use("datastore", &id, "VPG", &g.name);
                }
                self.datastores.remove(&id);
                Ok(Applied::Done)
            }
            Command::PutPool { pool, create } => {
                pool.validate()?;
                self.unique_name(
                    self.pools.values().map(|p| (&p.id, &p.name)),
                    &pool.id,
                    &pool.name,
                    "resource pool",
                )?;
                put(&mut self.pools, pool.id.clone(), pool, create, PoolId::KIND)
            }
            Command::DeletePool { id } => {
                exists(&self.pools, &id, PoolId::KIND)?;
                if let Some(g) = self
                    .vpgs
                    .values()
                    .find(|g| g.vms.iter().any(|v| v.placement.recovery_pool == id))
                {
                    return in_use("resource pool", &id, "VPG", &g.name);
                }
                self.pools.remove(&id);
                Ok(Applied::Done)
            }
            Command::PutVm { vm, create } => {
                vm.validate()?;
                let mut v = Violations::new();
                v.check(
                    self.hosts.contains_key(&vm.host_id),
                    "host_id",
                    format!("host {} does not exist", vm.host_id),
                );
                for (i, vol) in vm.volumes.iter().enumerate() {
                    v.check(
                        self.datastores.contains_key(&vol.datastore_id),
                        format!("volumes[{i}].datastore_id"),
                        format!("datastore {} does not exist", vol.datastore_id),
                    );
                }
                v.into_result()?;
                if let Some(m) = self
                    .vpgs
                    .values()
                    .flat_map(|g| &g.vms)
                    .find(|m| m.placement.vm_id == vm.id)
                {
                    m.footprint.check_no_shrink(&vm)?;
                }
                // VM names need not be unique (hypervisors allow it); ids are.
                put(&mut self.vms, vm.id.clone(), vm, create, VmId::KIND)
            }
            Command::DeleteVm { id } => {
                exists(&self.vms, &id, VmId::KIND)?;
                if let Some(g) = self.vpg_of_vm(&id) {
                    return in_use("VM", &id, "VPG", &g.name);
                }
                self.vms.remove(&id);
                Ok(Applied::Done)
            }
            Command::PutVpg {
                vpg,
                expected_generation,
                generation_floor,
                event,
            } => {
                let applied = self.put_vpg(vpg, expected_generation, generation_floor)?;
                if let Some(event) = event {
                    self.events.push(event);
                }
                Ok(applied)
            }
            Command::BeginVpgUpdate {
                id,
                reason,
                now_ms,
                task,
            } => {
                exists(&self.vpgs, &id, VpgId::KIND)?;
                self.check_operable(&id)?;
                self.updating.insert(
                    id,
                    DefinitionUpdate {
                        reason,
                        since_ms: now_ms,
                    },
                );
                Ok(task.map_or(Applied::Done, |t| Applied::Task(self.tasks.start(t))))
            }
            Command::EndVpgUpdate { id } => {
                self.updating.remove(&id);
                Ok(Applied::Done)
            }
            Command::DeleteVpg { id, now_ms } => {
                exists(&self.vpgs, &id, VpgId::KIND)?;
                if let (Some(vpg), Some(own)) = (self.vpgs.get(&id), self.site_id()) {
                    let mut t = crate::fence::Tombstone::of(vpg, own, now_ms);
                    t.owned_by_deleter &= !self.stood_down.contains_key(&id);
                    self.tombstones.insert(id.clone(), t);
                    if self.tombstones.len() > crate::fence::MAX_TOMBSTONES
                        && let Some(oldest) = self
                            .tombstones
                            .values()
                            .min_by_key(|t| t.deleted_ms)
                            .map(|t| t.vpg.clone())
                    {
                        self.tombstones.remove(&oldest);
                    }
                }
                self.vpgs.remove(&id);
                self.stood_down.remove(&id);
                self.recovery_outcomes.remove(&id);
                self.updating.remove(&id);
                self.test_results.remove(&id);
                self.recorded_status.remove(&id);
                Ok(Applied::Done)
            }
            Command::BeginRecovery { op } => {
                self.check_recoverable_here(&op.vpg)?;
                let vpg = self
                    .vpgs
                    .get_mut(&op.vpg)
                    .ok_or_else(|| DomainError::not_found(VpgId::KIND, &op.vpg))?;
                vpg.operation = Some(op.step.operation(op.kind));
                self.recoveries.insert(op.vpg.clone(), op);
                Ok(Applied::Done)
            }
            Command::AdvanceRecovery { advance: a } => {
                use crate::recovery::RecoveryStep as Step;
                let Some(op) = self
                    .recoveries
                    .get_mut(&a.vpg)
                    .filter(|op| op.id == a.op && op.step == a.from)
                else {
                    return Ok(Applied::Done);
                };
                let vpg = self
                    .vpgs
                    .get_mut(&a.vpg)
                    .ok_or_else(|| DomainError::not_found(VpgId::KIND, &a.vpg))?;
                let allowed = a.from == a.to
                    || matches!(
                        (a.from, a.to),
                        (Step::PreparingSource, Step::Opening | Step::RollingBack)
                            | (Step::Opening, Step::BeforeCommit | Step::RollingBack)
                            | (Step::BeforeCommit, Step::Committing | Step::RollingBack)
                            | (Step::Committing, Step::Promoting)
                            | (Step::Promoting, Step::HandingOver)
                    );
                if !allowed {
                    return Err(DomainError::precondition(format!(
                        "the {} of VPG {} cannot go from {} to {}",
                        op.kind.name(),
                        a.vpg,
                        a.from.name(),
                        a.to.name()
                    )));
                }
                if a.to == Step::Promoting && a.from == Step::Committing {
                    let g = a
                        .new_generation
                        .filter(|g| *g > vpg.generation)
                        .ok_or_else(|| {
                            DomainError::invalid(
                                "new_generation",
                                format!("must be above {}", vpg.generation),
                            )
                        })?;
                    vpg.generation = g;
                    op.new_generation = Some(g);
                }
                if a.to != a.from {
                    op.step_since_ms = a.now_ms;
                }
                if let Some(point) = a.point {
                    op.point = point;
                }
                op.step = a.to;
                if let Some(v) = a.volumes {
                    op.volumes = v;
                }
                op.error = a.error;
                vpg.operation = Some(a.to.operation(op.kind));
                Ok(Applied::Done)
            }
            Command::RecoveryInput { vpg, intent } => {
                let op = self.recoveries.get_mut(&vpg).ok_or_else(|| {
                    DomainError::precondition(format!("VPG {vpg} has no failover or move running"))
                })?;
                if !op.step.takes_input() {
                    if op.intent == Some(intent) {
                        return Ok(Applied::Done);
                    }
                    return Err(DomainError::precondition(format!(
                        "the {} of VPG {vpg} is {}: it can no longer be {}",
                        op.kind.name(),
                        op.step.name(),
                        match intent {
                            crate::recovery::RecoveryIntent::Commit => "committed",
                            crate::recovery::RecoveryIntent::Rollback => "rolled back",
                        }
                    )));
                }
                op.intent.get_or_insert(intent);
                Ok(Applied::Done)
            }
            Command::EndRecovery {
                vpg: id,
                op: op_id,
                now_ms,
            } => {
                use crate::recovery::RecoveryStep as Step;
                let Some(op) = self
                    .recoveries
                    .get(&id)
                    .filter(|op| {
                        op.id == op_id
                            && matches!(
                                op.step,
                                Step::Promoting | Step::HandingOver | Step::RollingBack
                            )
                    })
                    .cloned()
                else {
                    return Ok(Applied::Done);
                };
                let committed = op.step != Step::RollingBack;
                if let Some(vpg) = self.vpgs.get_mut(&id) {
                    vpg.operation = committed.then_some(Operation::Recovered);
                }
                let reverse = if committed && op.reverse {
                    Some(self.reverse_protection(&id, now_ms))
                } else {
                    None
                };
                let description = if committed {
                    format!(
                        "{} to checkpoint {} committed: the VMs run at this site (generation \
                         {}){}",
                        op.kind.name(),
                        op.point.checkpoint_id,
                        op.new_generation.unwrap_or_default(),
                        match reverse {
                            None => String::new(),
                            Some(Ok(g)) => format!(
                                "; they are protected back to the other site (generation \
                                 {g}), whose original disks take only a delta sync"
                            ),
                            Some(Err(e)) => format!("; reverse protection not started: {e}"),
                        }
                    )
                } else {
                    format!(
                        "{} to checkpoint {} rolled back: the VPG is as it was before it",
                        op.kind.name(),
                        op.point.checkpoint_id
                    )
                };
                self.tasks.end(op.task, true, description.clone(), now_ms);
                self.events.push(crate::events::NewEvent {
                    at_ms: now_ms,
                    code: if committed {
                        crate::events::EventCode::RecoveryCommitted
                    } else {
                        crate::events::EventCode::RecoveryRolledBack
                    },
                    vpg: Some(id.clone()),
                    description,
                });
                self.recovery_outcomes.insert(
                    id.clone(),
                    crate::fence::RecoveryClaim::ended(&op, committed),
                );
                self.recoveries.remove(&id);
                Ok(Applied::Done)
            }
            Command::StandDown { vpg, stand_down } => self.stand_down(vpg, stand_down),
            Command::ProtectBack { vpg, pool, now_ms } => {
                let g = self
                    .vpgs
                    .get(&vpg)
                    .ok_or_else(|| DomainError::not_found(VpgId::KIND, &vpg))?;
                if Some(&g.recovery_site) != self.site_id()
                    || g.operation != Some(Operation::Recovered)
                    || self.recoveries.contains_key(&vpg)
                {
                    return Err(DomainError::precondition(format!(
                        "VPG {vpg} is not recovered here: only a VPG this site recovered \
                         (committed without reverse protection) is protected back"
                    )));
                }
                let before = g.clone();
                // A pool of the old protected site's inventory (not this site's).
                if let Some(pool) = pool
                    && let Some(g) = self.vpgs.get_mut(&vpg)
                {
                    g.settings.reverse.pool = Some(pool);
                }
                match self.reverse_protection(&vpg, now_ms) {
                    Ok(generation) => {
                        self.events.push(crate::events::NewEvent {
                            at_ms: now_ms,
                            code: crate::events::EventCode::ReverseProtection,
                            vpg: Some(vpg.clone()),
                            description: format!(
                                "VPG {vpg} protected back to site {} (generation {generation}): \
                                 its original disks there take a delta sync, which overwrites \
                                 what its VMs there wrote after the recovery",
                                before.protected_site
                            ),
                        });
                        Ok(Applied::Generation(generation))
                    }
                    Err(e) => {
                        self.vpgs.insert(vpg.clone(), before);
                        Err(DomainError::precondition(format!(
                            "VPG {vpg} cannot be protected back: {e}"
                        )))
                    }
                }
            }
            Command::RecordDivergence {
                vpg,
                divergence,
                now_ms,
            } => {
                let Some(d) = self
                    .stood_down
                    .get_mut(&vpg)
                    .filter(|d| d.divergence.is_none())
                else {
                    return Ok(Applied::Done);
                };
                d.divergence = Some(divergence);
                let description = format!(
                    "VPG {vpg}: written here and not held by site {} (kept on this site's \
                     disks until the operator chooses): {}",
                    d.by,
                    d.describe_divergence()
                );
                self.events.push(crate::events::NewEvent {
                    at_ms: now_ms,
                    code: crate::events::EventCode::Divergence,
                    vpg: Some(vpg),
                    description,
                });
                Ok(Applied::Done)
            }
            Command::StandUp { vpg, op, now_ms } => {
                let lifted = self
                    .stood_down
                    .get(&vpg)
                    .is_some_and(|d| !d.final_() && d.claim().is_some_and(|c| c.op == op));
                if lifted {
                    self.stood_down.remove(&vpg);
                    self.events.push(crate::events::NewEvent {
                        at_ms: now_ms,
                        code: crate::events::EventCode::StoodUp,
                        vpg: Some(vpg.clone()),
                        description: format!(
                            "VPG {vpg}: the peer rolled back recovery {op}: this site protects \
                             the VMs again"
                        ),
                    });
                }
                Ok(Applied::Done)
            }
            Command::StartFailoverTest { test } => {
                self.check_testable(&test.vpg)?;
                self.tests.insert(test.vpg.clone(), test);
                Ok(Applied::Done)
            }
            Command::ProgressFailoverTest { progress } => {
                if let Some(t) = self
                    .tests
                    .get_mut(&progress.vpg)
                    .filter(|t| t.task == progress.task)
                {
                    if t.step != crate::recovery::TestStep::Stopping {
                        t.step = progress.step;
                    }
                    t.volumes = progress.volumes;
                    t.error = progress.error;
                }
                Ok(Applied::Done)
            }
            Command::StopFailoverTest {
                vpg,
                verdict,
                now_ms,
            } => {
                verdict.validate()?;
                let t = self.tests.get_mut(&vpg).ok_or_else(|| {
                    DomainError::precondition(format!("VPG {vpg} has no failover test running"))
                })?;
                if t.verdict.is_none() {
                    t.stop_requested_ms = now_ms;
                }
                t.step = crate::recovery::TestStep::Stopping;
                t.verdict.get_or_insert(verdict);
                Ok(Applied::Done)
            }
            Command::EndFailoverTest {
                vpg,
                task,
                stopped_ms,
                left,
            } => {
                let Some(t) = self
                    .tests
                    .get(&vpg)
                    .filter(|t| t.task == task && t.step == crate::recovery::TestStep::Stopping)
                else {
                    return Ok(Applied::Done);
                };
                let result = crate::recovery::TestResult {
                    task,
                    point: t.point.clone(),
                    started_ms: t.started_ms,
                    stopped_ms,
                    verdict: t.verdict.clone().unwrap_or(crate::recovery::TestVerdict {
                        passed: true,
                        note: String::new(),
                    }),
                };
                let v = &result.verdict;
                let mut description = format!(
                    "failover test at checkpoint {} stopped: {}{}",
                    result.point.checkpoint_id,
                    if v.passed { "passed" } else { "failed" },
                    if v.note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({:?})", v.note)
                    }
                );
                if !left.is_empty() {
                    description.push_str(&format!(
                        "; images not closed (their VRA could not be reached; they go when it \
                         restarts): {}",
                        left.join(", ")
                    ));
                }
                self.tasks
                    .end(task, v.passed, description.clone(), stopped_ms);
                self.events.push(crate::events::NewEvent {
                    at_ms: stopped_ms,
                    code: crate::events::EventCode::FailoverTestStopped,
                    vpg: Some(vpg.clone()),
                    description,
                });
                self.tests.remove(&vpg);
                self.test_results.insert(vpg, result);
                Ok(Applied::Done)
            }
            Command::SetVpgOperation {
                id,
                generation,
                operation,
                event,
            } => {
                let vpg = self
                    .vpgs
                    .get_mut(&id)
                    .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
                if vpg.generation != generation {
                    return Err(DomainError::Conflict {
                        kind: "vpg".into(),
                        id: id.to_string(),
                        expected: generation,
                        actual: vpg.generation,
                    });
                }
                vpg.operation = operation;
                if let Some(event) = event {
                    self.events.push(event);
                }
                Ok(Applied::Done)
            }
            Command::BootstrapAdminToken { token, now_ms } => {
                self.tokens.bootstrap(token, now_ms)?;
                Ok(Applied::Done)
            }
            Command::InstallCa { ca } => {
                ca.validate()?;
                match &self.ca {
                    Some(have) if have.fingerprint != ca.fingerprint => {
                        Err(DomainError::precondition(format!(
                            "this site already has CA {}, not {}",
                            have.fingerprint, ca.fingerprint
                        )))
                    }
                    Some(_) => Ok(Applied::Done),
                    None => {
                        self.ca = Some(ca);
                        Ok(Applied::Done)
                    }
                }
            }
            Command::StartCaRotation {
                next,
                started_by,
                now_ms,
            } => {
                let event = self.site_cas().start(next, started_by, now_ms)?;
                self.events.push(event);
                Ok(Applied::Done)
            }
            Command::IssueFromNextCa {
                fingerprint,
                now_ms,
            } => {
                let event = self.site_cas().issue_from_next(&fingerprint, now_ms)?;
                self.events.push(event);
                Ok(Applied::Done)
            }
            Command::RetireOldCa {
                fingerprint,
                now_ms,
            } => {
                let event = self.site_cas().retire_old(&fingerprint, now_ms)?;
                self.events.push(event);
                Ok(Applied::Done)
            }
            Command::RecordNodeCert { node, cert } => {
                self.site_cas().record(node, cert)?;
                Ok(Applied::Done)
            }
            Command::SetPeerCa { id, ca_pem } => {
                let peer = self
                    .peers
                    .get(&id)
                    .ok_or_else(|| DomainError::not_found(SiteId::KIND, &id))?;
                if peer.ca_pem.is_empty() {
                    return Err(DomainError::precondition(format!(
                        "site {id} was paired without TLS: it has no CA to replace"
                    )));
                }
                let updated = crate::pairing::PeerSite {
                    ca_pem,
                    ..peer.clone()
                };
                updated.validate()?;
                self.peers.insert(id, updated);
                Ok(Applied::Done)
            }
            Command::CreateJoinToken { token, now_ms } => {
                self.join_tokens.create(token, now_ms)?;
                Ok(Applied::Done)
            }
            Command::RevokeJoinToken { id } => {
                self.join_tokens.revoke(&id)?;
                Ok(Applied::Done)
            }
            Command::ConsumeJoinToken {
                id,
                secret_hash,
                identity,
                now_ms,
            } => {
                let event = self
                    .join_tokens
                    .consume(&id, &secret_hash, &identity, now_ms)?;
                self.events.push(event);
                Ok(Applied::Done)
            }
            Command::CreateToken { token, now_ms } => {
                self.tokens.create(token, now_ms)?;
                Ok(Applied::Done)
            }
            Command::RevokeToken { id, now_ms } => {
                self.tokens.revoke(&id, now_ms)?;
                Ok(Applied::Done)
            }
            Command::RecordStatus { vpg, state, event } => {
                // A VPG deleted since the monitor looked has no status to keep.
                if self.vpgs.contains_key(&vpg) {
                    self.recorded_status.insert(vpg, state);
                    if let Some(event) = event {
                        self.events.push(event);
                    }
                }
                Ok(Applied::Done)
            }
            Command::RecordEvent { event } => {
                self.events.push(event);
                Ok(Applied::Done)
            }
            Command::RecordEvents { events } => {
                for event in events {
                    self.events.push(event);
                }
                Ok(Applied::Done)
            }
            Command::StartTask { task } => Ok(Applied::Task(self.tasks.start(task))),
            Command::UpdateTask {
                id,
                progress,
                message,
            } => {
                self.tasks.progress(id, progress, message);
                Ok(Applied::Done)
            }
            Command::EndTask {
                id,
                ok,
                message,
                now_ms,
            } => {
                self.tasks.end(id, ok, message, now_ms);
                Ok(Applied::Done)
            }
            Command::BeginVpgDelete {
                id,
                keep_recovery_disks,
                now_ms,
            } => {
                let vpg = self
                    .vpgs
                    .get_mut(&id)
                    .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
                if let Some(u) = self.updating.get(&id) {
                    return Err(being_updated(&id, u));
                }
                if self.tests.contains_key(&id) {
                    return Err(DomainError::precondition(format!(
                        "a failover test of VPG {id} is running: stop it before deleting the VPG"
                    )));
                }
                if let Some(op) = vpg.operation.filter(|op| !op.allows_delete()) {
                    return Err(DomainError::precondition(format!(
                        "VPG {id} is in operation {op:?}: it cannot be deleted now"
                    )));
                }
                if vpg.operation != Some(Operation::Deleting) {
                    vpg.delete_started_ms = now_ms;
                }
                vpg.operation = Some(Operation::Deleting);
                vpg.keep_recovery_disks = keep_recovery_disks;
                Ok(Applied::Done)
            }
            Command::SetVpgPaused { id, paused } => {
                self.check_pausable(&id)?;
                let vpg = self
                    .vpgs
                    .get_mut(&id)
                    .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
                vpg.paused = paused;
                // The operator's word ends the manager's pause either way.
                vpg.manager_paused_until_ms = 0;
                Ok(Applied::Done)
            }
            Command::SetManagerPause { id, until_ms } => {
                if until_ms != 0 {
                    self.check_pausable(&id)?;
                }
                let vpg = self
                    .vpgs
                    .get_mut(&id)
                    .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
                vpg.manager_paused_until_ms = until_ms;
                Ok(Applied::Done)
            }
        }
    }

    /// Whether the protection of VPG `id` can be paused or resumed here: this site protects
    /// it and no operation that excludes it runs.
    pub fn check_pausable(&self, id: &VpgId) -> Result<(), DomainError> {
        let vpg = self
            .vpgs
            .get(id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, id))?;
        if Some(&vpg.protected_site) != self.site_id() {
            return Err(DomainError::precondition(format!(
                "VPG {id} is protected by site {}: pause and resume it there",
                vpg.protected_site
            )));
        }
        if let Some(op) = vpg.operation.filter(|op| !op.allows_pause()) {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: it cannot be paused or resumed now"
            )));
        }
        self.check_operable(id)
    }

    /// Whether a failover test of VPG `id` may start here: this site recovers it, no test
    /// of it runs, and no operation or definition update is under way.
    pub fn check_testable(&self, id: &VpgId) -> Result<(), DomainError> {
        let vpg = self
            .vpgs
            .get(id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, id))?;
        if Some(&vpg.recovery_site) != self.site_id() {
            return Err(DomainError::precondition(format!(
                "VPG {id} is recovered at site {}: test its failover there",
                vpg.recovery_site
            )));
        }
        if self.tests.contains_key(id) {
            return Err(DomainError::precondition(format!(
                "a failover test of VPG {id} is already running"
            )));
        }
        if let Some(op) = vpg.operation {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: its failover cannot be tested now"
            )));
        }
        if vpg.vms.is_empty() {
            return Err(DomainError::precondition(format!("VPG {id} has no VMs")));
        }
        self.check_operable(id)
    }

    /// Whether a failover of VPG `id` may start here: this site recovers it, it has VMs,
    /// and no test, operation or definition update is under way.
    pub fn check_recoverable_here(&self, id: &VpgId) -> Result<(), DomainError> {
        let vpg = self
            .vpgs
            .get(id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, id))?;
        if Some(&vpg.recovery_site) != self.site_id() {
            return Err(DomainError::precondition(format!(
                "VPG {id} is recovered at site {}: fail it over there",
                vpg.recovery_site
            )));
        }
        self.check_not_testing(id, "failing it over")?;
        if let Some(op) = vpg.operation {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: it cannot be failed over now"
            )));
        }
        if vpg.vms.is_empty() {
            return Err(DomainError::precondition(format!("VPG {id} has no VMs")));
        }
        self.check_operable(id)
    }

    fn stand_down(&mut self, id: VpgId, mut d: crate::fence::StandDown) -> CommandOutcome {
        let vpg = self
            .vpgs
            .get(&id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
        if Some(&vpg.protected_site) != self.site_id() {
            return Err(DomainError::precondition(format!(
                "VPG {id} is not protected by this site: nothing to stand down"
            )));
        }
        let first = match self.stood_down.get(&id) {
            Some(current) if current.cause == d.cause => return Ok(Applied::Done),
            Some(current) => {
                // The VRAs stood down already: what they counted stands.
                d.divergence = current.divergence.clone();
                d.since_ms = current.since_ms;
                false
            }
            None => true,
        };
        let description = format!(
            "VPG {:?} {} here: {}; this site's VRAs take no more writes to its volumes \
             and stop replicating",
            vpg.name,
            if first {
                "stood down"
            } else {
                "stays stood down"
            },
            d.describe()
        );
        self.events.push(crate::events::NewEvent {
            at_ms: d.since_ms,
            code: crate::events::EventCode::StoodDown,
            vpg: Some(id.clone()),
            description,
        });
        self.updating.remove(&id);
        self.stood_down.insert(id, d);
        Ok(Applied::Done)
    }

    /// A VPG that is being (or was) recovered keeps its definition: its VMs run on what
    /// the recovery made of it.
    /// Turns a VPG recovered here around (see [`crate::recovery::reversed`]): its
    /// recovered VMs join this site's inventory and the definition protects them towards
    /// the old protected site, one generation up. Answers that generation.
    fn reverse_protection(&mut self, id: &VpgId, now_ms: u64) -> Result<u64, String> {
        let vpg = self
            .vpgs
            .get(id)
            .ok_or_else(|| format!("VPG {id} is gone"))?;
        let generation = vpg.generation + 1;
        let (turned, vms) = crate::recovery::reversed(vpg, self, generation, now_ms)?;
        for vm in &vms {
            vm.validate().map_err(|e| e.to_string())?;
        }
        if let Some(other) = vms.iter().find(|vm| self.vms.contains_key(&vm.id)) {
            return Err(format!(
                "VM {} is in this site's inventory already",
                other.id
            ));
        }
        for vm in vms {
            self.vms.insert(vm.id.clone(), vm);
        }
        self.vpgs.insert(id.clone(), turned);
        Ok(generation)
    }

    fn check_not_recovering(&self, vpg: &Vpg, what: &str) -> Result<(), DomainError> {
        let recovering = self.recoveries.contains_key(&vpg.id)
            || vpg.operation.is_some_and(|op| {
                !matches!(
                    op,
                    Operation::Creating | Operation::Deleting | Operation::DeleteFailed
                )
            });
        if recovering {
            return Err(DomainError::precondition(format!(
                "VPG {} is {}: {what} is not possible",
                vpg.id,
                match vpg.operation {
                    Some(Operation::Recovered) => "recovered".to_string(),
                    Some(op) => format!("in operation {op:?}"),
                    None => "being recovered".to_string(),
                }
            )));
        }
        Ok(())
    }

    /// A failover test of VPG `id` keeps its definition (and the recovery VRAs serving the
    /// test's images) as it is: edits and deletes wait until the test stops.
    fn check_not_testing(&self, id: &VpgId, what: &str) -> Result<(), DomainError> {
        if self.tests.contains_key(id) {
            return Err(DomainError::precondition(format!(
                "a failover test of VPG {id} is running: stop it before {what}"
            )));
        }
        Ok(())
    }

    /// Whether this site may unpair from peer `id`: not while a VPG replicates with it.
    pub fn check_unpairable(&self, id: &SiteId) -> Result<(), DomainError> {
        if !self.peers.contains_key(id) {
            return Err(DomainError::not_found(SiteId::KIND, id));
        }
        if let Some(vpg) = self
            .vpgs
            .values()
            .find(|g| &g.protected_site == id || &g.recovery_site == id)
        {
            return Err(DomainError::precondition(format!(
                "VPG {:?} still replicates with site {id}; delete it first",
                vpg.name
            )));
        }
        Ok(())
    }

    /// FAILED_PRECONDITION, with the reason, while the definition of VPG `id` is being
    /// updated, or while this site stands the VPG down (another site runs its VMs).
    pub fn check_operable(&self, id: &VpgId) -> Result<(), DomainError> {
        if let Some(u) = self.updating.get(id) {
            return Err(being_updated(id, u));
        }
        if let Some(d) = self.stood_down.get(id) {
            return Err(DomainError::precondition(format!(
                "VPG {id} stood down at this site: {}; its VMs run there",
                d.describe()
            )));
        }
        Ok(())
    }

    /// The VPG that protects `vm`, if any.
    pub fn vpg_of_vm(&self, vm: &VmId) -> Option<&Vpg> {
        self.vpgs.values().find(|g| g.vm_ids().any(|v| v == vm))
    }

    fn own_id(&self) -> SiteId {
        self.site_id()
            .cloned()
            .unwrap_or_else(|| SiteId::minted(String::new()))
    }

    /// The bytes this site's VMs keep on datastore `ds`, but for the VMs of `vpg`: a site
    /// taking a VPG turned around holds them still, and their disks are its recovery disks.
    fn local_volume_bytes(&self, ds: &DatastoreId, vpg: Option<&Vpg>) -> u64 {
        self.vms
            .values()
            .filter(|vm| vpg.is_none_or(|g| g.vm_ids().all(|id| id != &vm.id)))
            .flat_map(|vm| vm.volumes.iter())
            .filter(|v| &v.datastore_id == ds)
            .map(|v| v.size_bytes)
            .sum()
    }

    fn check_new_peer(&self, peer: &PeerSite) -> Result<(), DomainError> {
        if Some(&peer.id) == self.site_id() {
            return Err(DomainError::precondition("a site cannot pair with itself"));
        }
        if self
            .peers
            .values()
            .any(|p| p.name == peer.name && p.id != peer.id)
        {
            return Err(DomainError::AlreadyExists {
                kind: "peer site".into(),
                name: peer.name.clone(),
            });
        }
        Ok(())
    }

    fn unique_name<'a, I: Ord + 'a>(
        &self,
        mut existing: impl Iterator<Item = (&'a I, &'a String)>,
        id: &I,
        name: &str,
        kind: &str,
    ) -> Result<(), DomainError> {
        if existing.any(|(other, n)| other != id && n == name) {
            return Err(DomainError::AlreadyExists {
                kind: kind.into(),
                name: name.into(),
            });
        }
        Ok(())
    }

    fn put_vpg(
        &mut self,
        mut vpg: Vpg,
        expected: Option<u64>,
        floor: Option<u64>,
    ) -> CommandOutcome {
        self.prepare_vpg(&mut vpg, expected)?;
        let turned = self.site_id().is_some_and(|own| {
            self.vpgs
                .get(&vpg.id)
                .is_some_and(|current| turned_here(current, &vpg, own))
        });
        if turned {
            // Its VMs run at the other site now; their disks here are its recovery disks.
            for vm in vpg.vms.iter().map(|m| &m.placement.vm_id) {
                self.vms.remove(vm);
            }
            self.stood_down.remove(&vpg.id);
            self.events.push(crate::events::NewEvent {
                at_ms: vpg.updated_at_ms,
                code: crate::events::EventCode::ReverseProtection,
                vpg: Some(vpg.id.clone()),
                description: format!(
                    "VPG {:?} turned around by site {}: its VMs run there and are protected \
                     back to this site, whose disks of them are now their recovery disks \
                     (a delta sync)",
                    vpg.name, vpg.protected_site
                ),
            });
        }
        if let Some(floor) = floor {
            vpg.generation = vpg.generation.max(floor);
        }
        let generation = vpg.generation;
        self.updating.remove(&vpg.id);
        // A live VPG has no tombstone (one of the same id made again).
        self.tombstones.remove(&vpg.id);
        self.vpgs.insert(vpg.id.clone(), vpg);
        Ok(Applied::Generation(generation))
    }

    /// Checks a VPG put without changing the state, and fills in what the current
    /// definition carries over (generation, creation time, operation). `apply` runs the same
    /// check, so a manager can reject a request before involving the peer site.
    pub fn prepare_vpg(&self, vpg: &mut Vpg, expected: Option<u64>) -> Result<(), DomainError> {
        let own = self
            .site_id()
            .cloned()
            .ok_or_else(|| DomainError::precondition("site is not initialized"))?;
        match (self.vpgs.get(&vpg.id), expected) {
            (Some(_), None) => {
                return Err(DomainError::AlreadyExists {
                    kind: "vpg".into(),
                    name: vpg.id.to_string(),
                });
            }
            (None, Some(_)) => return Err(DomainError::not_found(VpgId::KIND, &vpg.id)),
            (Some(current), Some(read_at)) if current.generation != read_at => {
                return Err(DomainError::Conflict {
                    kind: "vpg".into(),
                    id: vpg.id.to_string(),
                    expected: read_at,
                    actual: current.generation,
                });
            }
            (Some(current), Some(_)) if turned_here(current, vpg, &own) => {
                // The recovery site protects the VPG back: this site takes the new
                // direction as it comes, whatever it held (its VMs run there now).
                self.check_not_testing(&vpg.id, "turning the VPG around")?;
                if self.recoveries.contains_key(&vpg.id) {
                    return Err(DomainError::precondition(format!(
                        "VPG {} is being recovered here: it cannot be turned around",
                        vpg.id
                    )));
                }
                // A site whose VMs ran until now first stands down and counts what they
                // wrote that the other site lacks (the delta sync then overwrites it).
                let counted = self
                    .stood_down
                    .get(&vpg.id)
                    .is_some_and(|d| d.divergence.is_some());
                if current.protected_site == own
                    && current.operation != Some(Operation::Recovered)
                    && !counted
                {
                    return Err(DomainError::precondition(format!(
                        "VPG {} is still standing down here (its VRAs are counting what its \
                         VMs wrote): retry",
                        vpg.id
                    )));
                }
                vpg.created_at_ms = current.created_at_ms;
            }
            (Some(current), Some(_)) => {
                self.check_not_testing(&vpg.id, "editing the VPG")?;
                self.check_not_recovering(current, "editing it")?;
                if current.protected_site != vpg.protected_site
                    || current.recovery_site != vpg.recovery_site
                {
                    return Err(DomainError::invalid(
                        "recovery_site",
                        "the sites of a VPG cannot change",
                    ));
                }
                vpg.created_at_ms = current.created_at_ms;
                vpg.operation = current.operation;
                vpg.paused = current.paused;
                vpg.manager_paused_until_ms = current.manager_paused_until_ms;
                let mut kept = current.kept_recovery_vms.clone();
                if vpg.keep_removed_recovery_disks {
                    kept.extend(
                        current
                            .vm_ids()
                            .filter(|vm| vpg.vm_ids().all(|n| n != *vm))
                            .cloned(),
                    );
                }
                kept.retain(|vm| vpg.vm_ids().all(|n| n != vm));
                vpg.kept_recovery_vms = kept;
            }
            (None, None) => {}
        }
        vpg.generation = expected.map_or(1, |g| g + 1);

        let mut v = Violations::new();
        let peer = if vpg.protected_site == own {
            &vpg.recovery_site
        } else {
            &vpg.protected_site
        };
        v.check(
            peer != &own,
            "recovery_site",
            "protected and recovery site must differ",
        );
        v.check(
            vpg.protected_site == own || vpg.recovery_site == own,
            "recovery_site",
            "the VPG does not involve this site",
        );
        v.check(
            self.peers.contains_key(peer),
            "recovery_site",
            format!("site {peer} is not paired with this site"),
        );
        if let Some(other) = self.vpgs.values().find(|g| {
            g.id != vpg.id && g.name == vpg.name && g.joins(&vpg.protected_site, &vpg.recovery_site)
        }) {
            v.add(
                "name",
                format!(
                    "VPG name {:?} is already used between these sites ({})",
                    other.name, other.id
                ),
            );
        }
        if vpg.protected_site == own {
            self.check_protected_side(vpg, &mut v);
        }
        if vpg.recovery_site == own {
            self.check_recovery_side(vpg, &mut v);
        }
        v.into_result()
    }

    fn check_protected_side(&self, vpg: &Vpg, v: &mut Violations) {
        if let Some(pool) = &vpg.settings.reverse.pool {
            v.check(
                self.pools.contains_key(pool),
                "settings.reverse_pool_id",
                format!("resource pool {pool} does not exist at the protected site"),
            );
        }
        for (i, vm) in vpg.vms.iter().enumerate() {
            let id = &vm.placement.vm_id;
            match self.vms.get(id) {
                None => v.add(format!("vms[{i}].vm_id"), format!("VM {id} does not exist")),
                Some(_) => {
                    if let Some(other) = self
                        .vpgs
                        .values()
                        .find(|g| g.id != vpg.id && g.vm_ids().any(|x| x == id))
                    {
                        v.add(
                            format!("vms[{i}].vm_id"),
                            format!("VM {id} is already protected by VPG {:?}", other.name),
                        );
                    }
                }
            }
            let fp = &vm.footprint;
            let disks = fp.provisioned_bytes();
            if let (Some(w), Some(h)) = (
                fp.journal_warning.resolve(disks),
                fp.journal_hard_limit.resolve(disks),
            ) {
                v.check(
                    w < h,
                    format!("vms[{i}].journal_warning"),
                    "warning threshold must be below the hard limit",
                );
            }
        }
    }

    fn check_recovery_side(&self, vpg: &Vpg, v: &mut Violations) {
        let mut committed =
            RecoveryCommitments::of(self.vpgs.values(), &vpg.recovery_site, &vpg.id);
        let mut placed: Vec<&VpgVm> = Vec::new();
        for (i, vm) in vpg.vms.iter().enumerate() {
            let p = &vm.placement;
            let f = |n: &str| format!("vms[{i}].{n}");
            let host = self.hosts.get(&p.recovery_host);
            v.check(
                host.is_some(),
                f("recovery_host"),
                format!(
                    "host {} does not exist at the recovery site",
                    p.recovery_host
                ),
            );
            match self.datastores.get(&p.recovery_datastore) {
                None => v.add(
                    f("recovery_datastore"),
                    format!(
                        "datastore {} does not exist at the recovery site",
                        p.recovery_datastore
                    ),
                ),
                Some(ds) => v.check(
                    ds.host_id == p.recovery_host,
                    f("recovery_datastore"),
                    format!("datastore {:?} is not on host {}", ds.name, p.recovery_host),
                ),
            }
            for (volume, path) in &p.disk_paths {
                v.absorb(crate::inventory::check_disk_path(
                    &f(&format!("disk_paths[{volume}]")),
                    path,
                ));
            }
            v.check(
                self.pools.contains_key(&p.recovery_pool),
                f("recovery_pool"),
                format!(
                    "resource pool {} does not exist at the recovery site",
                    p.recovery_pool
                ),
            );
            committed.add(vm);
            placed.push(vm);
        }
        for (ds_id, need) in &committed.datastore_bytes {
            let Some(ds) = self.datastores.get(ds_id) else {
                continue;
            };
            let total = need + self.local_volume_bytes(ds_id, Some(vpg));
            if total > ds.capacity_bytes
                && placed
                    .iter()
                    .any(|p| &p.placement.recovery_datastore == ds_id)
            {
                v.add(
                    "vms.recovery_datastore",
                    format!(
                        "datastore {:?} has no room: {} bytes needed (replicas and journals), capacity {}",
                        ds.name, total, ds.capacity_bytes
                    ),
                );
            }
        }
        for (pool_id, (cpu, mem, storage)) in &committed.pool {
            let Some(pool) = self.pools.get(pool_id) else {
                continue;
            };
            if !placed.iter().any(|p| &p.placement.recovery_pool == pool_id) {
                continue;
            }
            let mut over = Vec::new();
            if *cpu > pool.cpu_mhz {
                over.push(format!("CPU {cpu} MHz > {}", pool.cpu_mhz));
            }
            if *mem > pool.memory_mib {
                over.push(format!("memory {mem} MiB > {}", pool.memory_mib));
            }
            if *storage > pool.storage_bytes {
                over.push(format!("storage {storage} bytes > {}", pool.storage_bytes));
            }
            if !over.is_empty() {
                v.add(
                    "vms.recovery_pool",
                    format!(
                        "resource pool {:?} cannot hold the reservations of the VPG's VMs: {}",
                        pool.name,
                        over.join(", ")
                    ),
                );
            }
        }
    }
}

/// Whether `new` is `current` turned around by its recovery site, with this site (`own`)
/// its new recovery site: the turn is newer than anything this site holds.
fn turned_here(current: &Vpg, new: &Vpg, own: &SiteId) -> bool {
    &new.recovery_site == own
        && current.protected_site == new.recovery_site
        && current.recovery_site == new.protected_site
        && new.reversed_at > current.generation
}

fn put<K: Ord + std::fmt::Display, V>(
    map: &mut BTreeMap<K, V>,
    id: K,
    value: V,
    create: bool,
    kind: &str,
) -> CommandOutcome {
    match (map.contains_key(&id), create) {
        (true, true) => Err(DomainError::AlreadyExists {
            kind: kind.into(),
            name: id.to_string(),
        }),
        (false, false) => Err(DomainError::not_found(kind, &id)),
        _ => {
            map.insert(id, value);
            Ok(Applied::Done)
        }
    }
}

fn exists<K: Ord + std::fmt::Display, V>(
    map: &BTreeMap<K, V>,
    id: &K,
    kind: &str,
) -> Result<(), DomainError> {
    if map.contains_key(id) {
        Ok(())
    } else {
        Err(DomainError::not_found(kind, id))
    }
}

fn in_use(kind: &str, id: &impl std::fmt::Display, user_kind: &str, user: &str) -> CommandOutcome {
    Err(DomainError::precondition(format!(
        "{kind} {id} is used by {user_kind} {user:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vpg::VpgSettings;

    /// Site `a` with VPG `mine` (protected here) and `theirs` (protected by `b`).
    fn state() -> SiteState {
        let mut s = SiteState {
            identity: Some(SiteIdentity {
                id: SiteId::minted("a".into()),
                name: "a".into(),
                created_at_ms: 0,
            }),
            ..Default::default()
        };
        for (id, protected, recovery) in [("mine", "a", "b"), ("theirs", "b", "a")] {
            let vpg = Vpg {
                reversed_at: 0,
                id: VpgId::minted(id.into()),
                name: id.into(),
                generation: 4,
                protected_site: SiteId::minted(protected.into()),
                recovery_site: SiteId::minted(recovery.into()),
                settings: VpgSettings::default(),
                vms: Vec::new(),
                created_at_ms: 0,
                updated_at_ms: 0,
                operation: None,
                paused: false,
                keep_recovery_disks: false,
                delete_started_ms: 0,
                keep_removed_recovery_disks: false,
                kept_recovery_vms: Default::default(),
                manager_paused_until_ms: 0,
            };
            s.vpgs.insert(vpg.id.clone(), vpg);
        }
        s
    }

    #[test]
    fn a_recorded_status_survives_until_its_vpg_is_deleted_and_only_changes_are_events() {
        use crate::status::{AlertColor, VpgState, VpgStatus, VpgSubstatus};
        let mut s = state();
        let id = VpgId::minted("mine".into());
        let state_of = |status, substatus| VpgState {
            status,
            substatus,
            alert: AlertColor::Green,
        };
        let events = s.events.len();
        s.apply(Command::RecordStatus {
            vpg: id.clone(),
            state: state_of(VpgStatus::MeetingSla, VpgSubstatus::None),
            event: None,
        })
        .unwrap();
        assert_eq!(s.events.len(), events, "a first status is no event");
        let change = crate::events::NewEvent {
            at_ms: 1,
            code: crate::events::EventCode::StatusChanged,
            vpg: Some(id.clone()),
            description: "VPG \"mine\": Meeting SLA -> Not Meeting SLA".into(),
        };
        let down = state_of(VpgStatus::NotMeetingSla, VpgSubstatus::RecoveryIsPossible);
        s.apply(Command::RecordStatus {
            vpg: id.clone(),
            state: down,
            event: Some(change.clone()),
        })
        .unwrap();
        assert_eq!(s.events.len(), events + 1);
        assert_eq!(s.recorded_status[&id], down);
        // A VPG unknown (deleted since the monitor looked) keeps nothing.
        let gone = VpgId::minted("gone".into());
        s.apply(Command::RecordStatus {
            vpg: gone.clone(),
            state: down,
            event: Some(change),
        })
        .unwrap();
        assert!(!s.recorded_status.contains_key(&gone));
        assert_eq!(s.events.len(), events + 1);
        s.apply(Command::DeleteVpg {
            id: id.clone(),
            now_ms: 0,
        })
        .unwrap();
        assert!(s.recorded_status.is_empty());
    }

    fn pause(s: &mut SiteState, id: &str, paused: bool) -> CommandOutcome {
        s.apply(Command::SetVpgPaused {
            id: VpgId::minted(id.into()),
            paused,
        })
    }

    #[test]
    fn pause_and_resume_keep_the_generation() {
        let mut s = state();
        let id = VpgId::minted("mine".into());
        pause(&mut s, "mine", true).unwrap();
        assert!(s.vpgs[&id].paused);
        assert_eq!(
            s.vpgs[&id].generation, 4,
            "a pause is not a definition change"
        );
        pause(&mut s, "mine", false).unwrap();
        assert!(!s.vpgs[&id].paused);
    }

    #[test]
    fn pause_is_refused_at_the_recovery_site_during_operations_and_for_unknown_vpgs() {
        let mut s = state();
        let e = pause(&mut s, "theirs", true).unwrap_err();
        assert!(
            matches!(&e, DomainError::FailedPrecondition(m) if m.contains("protected by site b")),
            "{e:?}"
        );
        assert!(matches!(
            pause(&mut s, "nope", true),
            Err(DomainError::NotFound { .. })
        ));
        let id = VpgId::minted("mine".into());
        s.vpgs.get_mut(&id).unwrap().operation = Some(Operation::Deleting);
        assert!(matches!(
            pause(&mut s, "mine", true),
            Err(DomainError::FailedPrecondition(_))
        ));
        s.vpgs.get_mut(&id).unwrap().operation = Some(Operation::Creating);
        pause(&mut s, "mine", true).unwrap();
    }

    fn begin_update(s: &mut SiteState, id: &str) -> CommandOutcome {
        s.apply(Command::BeginVpgUpdate {
            id: VpgId::minted(id.into()),
            reason: "an edit is being stored on both sites".into(),
            now_ms: 7,
            task: None,
        })
    }

    #[test]
    fn no_operation_while_a_definition_is_being_updated() {
        let mut s = state();
        let id = VpgId::minted("mine".into());
        begin_update(&mut s, "mine").unwrap();
        let refused = |r: CommandOutcome| match r {
            Err(DomainError::FailedPrecondition(m)) => {
                assert!(
                    m.contains("being updated") && m.contains("stored on both"),
                    "{m}"
                )
            }
            other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
        };
        refused(begin_update(&mut s, "mine"));
        refused(pause(&mut s, "mine", true));
        refused(s.apply(Command::BeginVpgDelete {
            id: id.clone(),
            keep_recovery_disks: false,
            now_ms: 8,
        }));
        assert!(s.check_operable(&id).is_err());
        // Another VPG is not affected.
        assert!(s.check_operable(&VpgId::minted("theirs".into())).is_ok());
        s.apply(Command::EndVpgUpdate { id: id.clone() }).unwrap();
        pause(&mut s, "mine", true).unwrap();
        assert!(matches!(
            begin_update(&mut s, "nope"),
            Err(DomainError::NotFound { .. })
        ));
    }

    /// Pairs the test state with a site "b" (the recovery site of its VPGs).
    fn pair_with_b(s: &mut SiteState) {
        let b = SiteId::minted("b".into());
        s.peers.insert(
            b.clone(),
            PeerSite {
                id: b,
                name: "b".into(),
                endpoints: vec!["127.0.0.1:1".into()],
                paired_at_ms: 0,
                bandwidth_limit_bytes_per_sec: 0,
                ca_pem: String::new(),
            },
        );
    }

    #[test]
    fn pairing_tokens_are_kept_and_proposed_as_hashes_and_old_log_entries_still_apply() {
        use crate::pairing::{PairingSecret, PairingToken};
        let peer = |id: &str| PeerSite {
            id: SiteId::minted(id.into()),
            name: id.into(),
            endpoints: vec!["127.0.0.1:1".into()],
            paired_at_ms: 0,
            bandwidth_limit_bytes_per_sec: 0,
            ca_pem: String::new(),
        };
        let mut s = state();
        let secret = PairingSecret::from_random([7; 32]);
        let issue = Command::IssuePairingToken {
            token: PairingToken::new(&secret, 0, 1000),
            now_ms: 0,
        };
        // What the log and the state hold never contains the secret.
        let logged = serde_json::to_string(&issue).unwrap();
        assert!(!logged.contains(secret.reveal()), "{logged}");
        s.apply(issue).unwrap();
        assert!(!serde_json::to_string(&s).unwrap().contains(secret.reveal()));
        let accept = |hash: String, p: &str| Command::AcceptPairing {
            token_hash: hash,
            legacy_token: Default::default(),
            peer: peer(p),
            now_ms: 10,
        };
        let wrong = PairingSecret::presented("0".repeat(64));
        assert!(s.apply(accept(wrong.hash(), "c")).is_err());
        s.apply(accept(secret.hash(), "c")).unwrap();
        assert!(
            s.apply(accept(secret.hash(), "d")).is_err(),
            "a token is used once"
        );
        // Entries written before hashes were kept carry the secret: replayed, they apply
        // as they did.
        let mut old = state();
        let old_issue = r#"{"IssuePairingToken":{"token":{"token":"s3cret","issued_at_ms":0,"expires_at_ms":1000},"now_ms":0}}"#;
        old.apply(serde_json::from_str(old_issue).unwrap()).unwrap();
        let old_accept = format!(
            r#"{{"AcceptPairing":{{"token":"s3cret","peer":{},"now_ms":10}}}}"#,
            serde_json::to_string(&peer("e")).unwrap()
        );
        old.apply(serde_json::from_str(&old_accept).unwrap())
            .unwrap();
        assert!(old.peers.contains_key(&SiteId::minted("e".into())));
        assert!(!serde_json::to_string(&old).unwrap().contains("s3cret"));
    }

    #[test]
    fn a_put_ends_the_update_and_a_floor_raises_the_generation() {
        let mut s = state();
        pair_with_b(&mut s);
        let id = VpgId::minted("mine".into());
        begin_update(&mut s, "mine").unwrap();
        let vpg = s.vpgs[&id].clone();
        let put = |s: &mut SiteState, expected, floor| {
            s.apply(Command::PutVpg {
                vpg: vpg.clone(),
                expected_generation: Some(expected),
                generation_floor: floor,
                event: None,
            })
        };
        assert_eq!(put(&mut s, 4, Some(9)), Ok(Applied::Generation(9)));
        assert!(s.check_operable(&id).is_ok(), "the put ended the update");
        // A floor below the next generation changes nothing.
        assert_eq!(put(&mut s, 9, Some(3)), Ok(Applied::Generation(10)));
        assert!(matches!(
            put(&mut s, 9, None),
            Err(DomainError::Conflict { .. })
        ));
    }

    /// An edit's task starts with its update, in one commit, and only if the update
    /// does; its event is stored with the definition, and only if the put succeeds.
    #[test]
    fn an_edit_starts_its_task_with_the_update_and_stores_its_event_with_the_put() {
        let mut s = state();
        pair_with_b(&mut s);
        let id = VpgId::minted("mine".into());
        let begin = |s: &mut SiteState| {
            s.apply(Command::BeginVpgUpdate {
                id: id.clone(),
                reason: "an edit".into(),
                now_ms: 7,
                task: Some(crate::tasks::NewTask {
                    kind: crate::tasks::TaskKind::EditVpg,
                    vpg: Some(id.clone()),
                    started_ms: 7,
                    generation: Some(5),
                    message: "storing".into(),
                }),
            })
        };
        let tasks = s.tasks.all().count();
        let Ok(Applied::Task(task)) = begin(&mut s) else {
            panic!("the update answers its task");
        };
        assert_eq!(s.tasks.get(task).map(|t| t.generation), Some(Some(5)));
        assert!(begin(&mut s).is_err(), "a second update is refused");
        assert_eq!(s.tasks.all().count(), tasks + 1, "and starts no task");

        let event = |text: &str| crate::events::NewEvent {
            at_ms: 8,
            code: crate::events::EventCode::VpgEdited,
            vpg: Some(id.clone()),
            description: text.into(),
        };
        let vpg = s.vpgs[&id].clone();
        let events = s.events.len();
        let put = |s: &mut SiteState, expected, text: &str| {
            s.apply(Command::PutVpg {
                vpg: vpg.clone(),
                expected_generation: Some(expected),
                generation_floor: None,
                event: Some(event(text)),
            })
        };
        assert!(
            put(&mut s, 3, "stale").is_err(),
            "a stale generation is refused"
        );
        assert_eq!(s.events.len(), events, "and records no event");
        put(&mut s, 4, "edited").unwrap();
        assert_eq!(s.events.len(), events + 1);
        assert!(
            s.events
                .iter()
                .next_back()
                .is_some_and(|e| e.description == "edited"),
            "the put recorded its event"
        );
    }

    /// Starts the site's first task, of `kind` for VPG `id`.
    fn start_test_task(s: &mut SiteState, kind: crate::tasks::TaskKind, id: &VpgId) {
        let task = s.apply(Command::StartTask {
            task: crate::tasks::NewTask {
                kind,
                vpg: Some(id.clone()),
                started_ms: 1000,
                generation: None,
                message: String::new(),
            },
        });
        assert_eq!(task, Ok(Applied::Task(1)));
    }

    /// Gives VPG `id` one VM (recovered on host h, datastore d, pool p).
    fn add_test_vm(s: &mut SiteState, id: &VpgId) {
        s.vpgs.get_mut(id).unwrap().vms.push(crate::vpg::VpgVm {
            source: None,
            placement: crate::vpg::VmPlacement {
                disk_paths: Default::default(),
                vm_id: VmId::minted("vm".into()),
                recovery_host: HostId::minted("h".into()),
                recovery_datastore: DatastoreId::minted("d".into()),
                recovery_pool: PoolId::minted("p".into()),
                preseeded: false,
            },
            footprint: crate::vpg::VmFootprint {
                cpus: 1,
                vm_name: "vm".into(),
                cpu_reservation_mhz: 0,
                memory_reservation_mib: 0,
                memory_mib: 0,
                volumes: vec![(0, 0, 1 << 20)],
                journal_hard_limit: crate::vpg::JournalLimit::Unlimited,
                journal_warning: crate::vpg::JournalLimit::Unlimited,
            },
        });
    }

    /// A recovery of `theirs` at site `a` at the promoting step, about to end.
    /// A failover of VPG `vpg` (operation `n`) at checkpoint 11, opening.
    fn test_op(vpg: &str, n: &str, from_generation: u64) -> crate::recovery::RecoveryOp {
        use crate::recovery::{CommitPolicy, RecoveryKind, RecoveryPoint, RecoveryStep};
        crate::recovery::RecoveryOp {
            id: crate::ids::RecoveryOpId::minted(n.into()),
            kind: RecoveryKind::Failover,
            vpg: VpgId::minted(vpg.into()),
            task: 1,
            point: RecoveryPoint {
                checkpoint_id: 11,
                timestamp_ms: 500,
                name: String::new(),
            },
            policy: CommitPolicy::Manual,
            from_generation,
            new_generation: None,
            step: RecoveryStep::Opening,
            started_ms: 1000,
            step_since_ms: 1000,
            intent: None,
            volumes: Vec::new(),
            error: None,
            shutdown: crate::recovery::Shutdown::No,
            to_last_checkpoint: false,
            reverse: false,
        }
    }

    /// A move of `id` at site `a`, handing over at generation 9, ends.
    fn promoting_op(s: &mut SiteState, id: &VpgId, reverse: bool) {
        s.vpgs.get_mut(id).unwrap().generation = 9;
        let mut op = test_op(id.as_str(), "r", 4);
        op.kind = crate::recovery::RecoveryKind::Move;
        op.new_generation = Some(9);
        op.step = crate::recovery::RecoveryStep::HandingOver;
        op.to_last_checkpoint = true;
        op.reverse = reverse;
        s.recoveries.insert(id.clone(), op);
        s.apply(Command::EndRecovery {
            vpg: id.clone(),
            op: crate::ids::RecoveryOpId::minted("r".into()),
            now_ms: 3000,
        })
        .unwrap();
    }

    #[test]
    fn a_reversing_commit_turns_the_vpg_around_and_the_old_site_takes_the_new_direction() {
        use crate::vpg::{SourceVolume, VmSource};
        let mut a = state();
        let id = VpgId::minted("theirs".into());
        add_test_vm(&mut a, &id);
        let (h, d) = (HostId::minted("h".into()), DatastoreId::minted("d".into()));
        a.datastores.insert(
            d.clone(),
            Datastore {
                id: d.clone(),
                name: "d".into(),
                host_id: h.clone(),
                path: "/ds-a".into(),
                capacity_bytes: 1 << 40,
            },
        );
        let (hb, db, pb) = (
            HostId::minted("hb".into()),
            DatastoreId::minted("db".into()),
            PoolId::minted("pb".into()),
        );
        let original = "/ds-b/vm/c0u0.img".to_string();
        let vm = a.vpgs[&id].vms[0].placement.vm_id.clone();
        a.vpgs.get_mut(&id).unwrap().vms[0].source = Some(VmSource {
            host: hb.clone(),
            volumes: vec![SourceVolume {
                controller: 0,
                unit: 0,
                datastore: db.clone(),
                path: original.clone(),
            }],
        });
        let before = a.vpgs[&id].clone();

        // Without a pool at the old site the commit ends Recovered and says why.
        start_test_task(&mut a, crate::tasks::TaskKind::Move, &id);
        promoting_op(&mut a, &id, true);
        assert_eq!(a.vpgs[&id].operation, Some(Operation::Recovered));
        let said = &a.events.iter().last().unwrap().description;
        assert!(
            said.contains("reverse protection not started: no resource pool"),
            "{said}"
        );
        assert!(a.vms.is_empty());

        // With one it turns the VPG around one generation up.
        a.vpgs.insert(id.clone(), before.clone());
        a.vpgs.get_mut(&id).unwrap().settings.reverse.pool = Some(pb.clone());
        promoting_op(&mut a, &id, true);
        let turned = a.vpgs[&id].clone();
        assert_eq!(turned.operation, None);
        assert_eq!((turned.generation, turned.reversed_at), (10, 10));
        assert_eq!(turned.protected_site.as_str(), "a");
        assert_eq!(turned.recovery_site.as_str(), "b");
        let p = &turned.vms[0].placement;
        assert_eq!((&p.recovery_host, &p.recovery_datastore), (&hb, &db));
        assert_eq!(p.recovery_pool, pb);
        assert!(p.preseeded);
        assert_eq!(p.disk_paths.get(&0), Some(&original));
        assert_eq!(
            turned.settings.reverse.pool,
            Some(PoolId::minted("p".into()))
        );
        let replica = format!("/ds-a/theirs/{vm}/c0u0.replica");
        let here = &a.vms[&vm];
        assert_eq!(here.host_id, h);
        assert_eq!(here.volumes[0].path.as_deref(), Some(replica.as_str()));
        let source = turned.vms[0].source.as_ref().unwrap();
        assert_eq!(
            (&source.host, source.volumes[0].path.as_str()),
            (&h, replica.as_str())
        );
        // The protected plan runs the VM on its replica; the old site recovers onto the
        // original disk.
        let plans = crate::protection::protected_plans(&turned, &a).unwrap();
        assert_eq!(plans[0].vms[0].volumes[0].path, replica);
        assert!(plans[0].vms[0].volumes[0].preseeded);

        // Site b, which protected it at generation 4 (it may not know of the failover).
        let mut b = SiteState {
            identity: Some(SiteIdentity {
                id: SiteId::minted("b".into()),
                name: "b".into(),
                created_at_ms: 0,
            }),
            ..Default::default()
        };
        b.peers.insert(
            SiteId::minted("a".into()),
            crate::pairing::PeerSite {
                id: SiteId::minted("a".into()),
                name: "a".into(),
                endpoints: vec!["127.0.0.1:1".into()],
                paired_at_ms: 0,
                bandwidth_limit_bytes_per_sec: 0,
                ca_pem: String::new(),
            },
        );
        b.hosts.insert(
            hb.clone(),
            Host {
                id: hb.clone(),
                name: "hb".into(),
                vra_address: "127.0.0.1:2".into(),
                peer_vra_address: String::new(),
            },
        );
        b.datastores.insert(
            db.clone(),
            Datastore {
                id: db.clone(),
                name: "db".into(),
                host_id: hb.clone(),
                path: "/ds-b".into(),
                capacity_bytes: 4 << 20,
            },
        );
        b.pools.insert(
            pb.clone(),
            ResourcePool {
                id: pb.clone(),
                name: "pb".into(),
                cpu_mhz: 1000,
                memory_mib: 1000,
                storage_bytes: 1 << 30,
            },
        );
        b.vms.insert(
            vm.clone(),
            Vm {
                id: vm.clone(),
                name: "vm".into(),
                host_id: hb.clone(),
                power: crate::inventory::PowerState::Off,
                memory_mib: 1,
                cpus: 1,
                cpu_reservation_mhz: 0,
                memory_reservation_mib: 0,
                volumes: vec![crate::inventory::Volume {
                    controller: 0,
                    unit: 0,
                    size_bytes: 1 << 20,
                    datastore_id: db.clone(),
                    path: None,
                }],
            },
        );
        let mut old = before.clone();
        old.protected_site = SiteId::minted("b".into());
        old.recovery_site = SiteId::minted("a".into());
        old.generation = 4;
        old.operation = None;
        b.vpgs.insert(id.clone(), old.clone());
        let put = |b: &mut SiteState, vpg: &Vpg| {
            b.apply(Command::PutVpg {
                vpg: vpg.clone(),
                expected_generation: Some(4),
                generation_floor: Some(11),
                event: None,
            })
        };
        // A definition that turns it around without being newer than b's is refused.
        let mut stale = turned.clone();
        stale.reversed_at = 4;
        assert!(put(&mut b, &stale).is_err());
        assert!(b.vms.contains_key(&vm));
        // Not before b stood down and counted what its VMs wrote there.
        let refused = put(&mut b, &turned);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("standing down")),
            "{refused:?}"
        );
        let mut op = test_op(id.as_str(), "r", 4);
        op.new_generation = Some(10);
        op.reverse = true;
        let stand_down = crate::fence::StandDown {
            by: SiteId::minted("a".into()),
            cause: crate::fence::StandDownCause::Recovered(crate::fence::RecoveryClaim::ended(
                &op, true,
            )),
            since_ms: 3000,
            divergence: None,
        };
        b.apply(Command::StandDown {
            vpg: id.clone(),
            stand_down,
        })
        .unwrap();
        assert!(
            b.check_operable(&id).is_err(),
            "no operations while stood down"
        );
        assert!(put(&mut b, &turned).is_err(), "still counting");
        let divergence = vec![crate::fence::VolumeDivergence {
            host: hb.clone(),
            vm: vm.clone(),
            volume_id: 0,
            bytes: 1 << 20,
            known: true,
        }];
        b.apply(Command::RecordDivergence {
            vpg: id.clone(),
            divergence,
            now_ms: 3100,
        })
        .unwrap();
        let told = &b.events.iter().last().unwrap().description;
        assert!(told.contains("1048576 bytes"), "{told}");
        // The turn is taken: b is the recovery site, its VM is gone from its inventory
        // (its disk is the recovery disk, within the datastore's room).
        assert_eq!(put(&mut b, &turned), Ok(Applied::Generation(11)));
        assert!(
            b.stood_down.is_empty(),
            "the new direction ends the stand-down"
        );
        assert_eq!(b.vpgs[&id].recovery_site.as_str(), "b");
        assert!(!b.vms.contains_key(&vm));
        assert!(
            b.events
                .iter()
                .any(|e| e.code == crate::events::EventCode::ReverseProtection)
        );
        let plans = crate::protection::recovery_plans(&b.vpgs[&id], &b).unwrap();
        assert_eq!(plans[0].host, hb);
        assert_eq!(plans[0].vms[0].volumes[0].path, original);
        // Once turned, a definition of the old direction is refused.
        let mut back = old;
        back.reversed_at = 0;
        assert!(
            b.apply(Command::PutVpg {
                vpg: back,
                expected_generation: Some(11),
                generation_floor: None,
                event: None,
            })
            .is_err()
        );
    }

    #[test]
    fn a_failover_moves_step_by_step_commits_to_a_new_generation_and_ends_recovered() {
        use crate::recovery::{
            RecoveryAdvance, RecoveryIntent, RecoveryKind, RecoveryPoint, RecoveryStep as Step,
        };
        let mut s = state();
        let id = VpgId::minted("theirs".into());
        add_test_vm(&mut s, &id);
        let generation = s.vpgs[&id].generation;
        let op = |vpg: &str, n: &str| test_op(vpg, n, generation);
        let refused = |r: CommandOutcome, words: &str| match r {
            Err(DomainError::FailedPrecondition(m)) => assert!(m.contains(words), "{m}"),
            other => panic!("expected FAILED_PRECONDITION ({words}), got {other:?}"),
        };
        refused(
            s.apply(Command::BeginRecovery {
                op: op("mine", "x"),
            }),
            "fail it over there",
        );
        s.apply(Command::BeginRecovery {
            op: op("theirs", "a"),
        })
        .unwrap();
        assert_eq!(s.vpgs[&id].operation, Some(Operation::FailoverBeforeCommit));
        refused(
            s.apply(Command::BeginRecovery {
                op: op("theirs", "b"),
            }),
            "cannot be failed over now",
        );
        let vpg = s.vpgs[&id].clone();
        refused(
            s.apply(Command::PutVpg {
                vpg,
                expected_generation: Some(generation),
                generation_floor: None,
                event: None,
            }),
            "editing it is not possible",
        );
        let advance = |op: &str, from, to, g: Option<u64>| Command::AdvanceRecovery {
            advance: RecoveryAdvance {
                vpg: id.clone(),
                op: crate::ids::RecoveryOpId::minted(op.into()),
                from,
                to,
                volumes: None,
                error: None,
                new_generation: g,
                point: None,
                now_ms: 2000,
            },
        };
        // Another operation's (or another step's) proposal changes nothing.
        s.apply(advance("b", Step::Opening, Step::BeforeCommit, None))
            .unwrap();
        s.apply(advance("a", Step::BeforeCommit, Step::Committing, None))
            .unwrap();
        assert_eq!(s.recoveries[&id].step, Step::Opening);
        s.apply(advance("a", Step::Opening, Step::BeforeCommit, None))
            .unwrap();
        assert_eq!(s.recoveries[&id].step_since_ms, 2000);
        // Not a step that follows.
        refused(
            s.apply(advance("a", Step::BeforeCommit, Step::Promoting, Some(9))),
            "cannot go from before commit to promoting",
        );
        // The first word stands.
        s.apply(Command::RecoveryInput {
            vpg: id.clone(),
            intent: RecoveryIntent::Commit,
        })
        .unwrap();
        s.apply(Command::RecoveryInput {
            vpg: id.clone(),
            intent: RecoveryIntent::Rollback,
        })
        .unwrap();
        assert_eq!(s.recoveries[&id].intent, Some(RecoveryIntent::Commit));
        s.apply(advance("a", Step::BeforeCommit, Step::Committing, None))
            .unwrap();
        assert_eq!(s.vpgs[&id].operation, Some(Operation::FailoverCommitting));
        refused(
            s.apply(Command::RecoveryInput {
                vpg: id.clone(),
                intent: RecoveryIntent::Rollback,
            }),
            "can no longer be rolled back",
        );
        assert!(
            s.apply(advance(
                "a",
                Step::Committing,
                Step::Promoting,
                Some(generation)
            ))
            .is_err(),
            "the generation must move on"
        );
        s.apply(advance(
            "a",
            Step::Committing,
            Step::Promoting,
            Some(generation + 5),
        ))
        .unwrap();
        assert_eq!(s.vpgs[&id].generation, generation + 5);
        assert_eq!(s.vpgs[&id].operation, Some(Operation::FailoverPromoting));
        start_test_task(&mut s, crate::tasks::TaskKind::Failover, &id);
        s.apply(Command::EndRecovery {
            vpg: id.clone(),
            op: crate::ids::RecoveryOpId::minted("a".into()),
            now_ms: 3000,
        })
        .unwrap();
        assert!(s.recoveries.is_empty());
        assert_eq!(s.vpgs[&id].operation, Some(Operation::Recovered));
        let events: Vec<_> = s.events.iter().map(|e| e.code).collect();
        assert!(
            events.contains(&crate::events::EventCode::RecoveryCommitted),
            "{events:?}"
        );

        // A move starts by preparing its source, learns its checkpoint from it, and hands
        // over after promoting; a rollback is possible until commit.
        s.vpgs.get_mut(&id).unwrap().operation = None;
        let mut mv = op("theirs", "m");
        mv.kind = RecoveryKind::Move;
        mv.step = Step::PreparingSource;
        s.apply(Command::BeginRecovery { op: mv }).unwrap();
        assert_eq!(s.vpgs[&id].operation, Some(Operation::MoveBeforeCommit));
        let mut to_opening = advance("m", Step::PreparingSource, Step::Opening, None);
        if let Command::AdvanceRecovery { advance } = &mut to_opening {
            advance.point = Some(RecoveryPoint {
                checkpoint_id: 77,
                timestamp_ms: 9,
                name: "move m".into(),
            });
        }
        s.apply(to_opening).unwrap();
        assert_eq!(s.recoveries[&id].point.checkpoint_id, 77);
        s.apply(Command::RecoveryInput {
            vpg: id.clone(),
            intent: RecoveryIntent::Rollback,
        })
        .unwrap();
        s.apply(advance("m", Step::Opening, Step::RollingBack, None))
            .unwrap();
        assert_eq!(s.vpgs[&id].operation, Some(Operation::MoveRollingBack));
        s.apply(Command::EndRecovery {
            vpg: id.clone(),
            op: crate::ids::RecoveryOpId::minted("m".into()),
            now_ms: 4000,
        })
        .unwrap();
        assert_eq!(s.vpgs[&id].operation, None, "rolled back: as it was");
    }

    #[test]
    fn a_failover_test_runs_at_the_recovery_site_blocks_edits_and_keeps_its_result() {
        use crate::recovery::{FailoverTest, RecoveryPoint, TestProgress, TestStep, TestVerdict};
        let mut s = state();
        let id = VpgId::minted("theirs".into());
        let test = |vpg: &str, task: u64| FailoverTest {
            vpg: VpgId::minted(vpg.into()),
            task,
            point: RecoveryPoint {
                checkpoint_id: 11,
                timestamp_ms: 500,
                name: String::new(),
            },
            step: TestStep::Starting,
            started_ms: 1000,
            volumes: Vec::new(),
            verdict: None,
            stop_requested_ms: 0,
            error: None,
        };
        let refused = |r: CommandOutcome, words: &str| match r {
            Err(DomainError::FailedPrecondition(m)) => assert!(m.contains(words), "{m}"),
            other => panic!("expected FAILED_PRECONDITION ({words}), got {other:?}"),
        };
        refused(
            s.apply(Command::StartFailoverTest {
                test: test("theirs", 1),
            }),
            "no VMs",
        );
        add_test_vm(&mut s, &id);
        // Only where the VPG is recovered.
        refused(
            s.apply(Command::StartFailoverTest {
                test: test("mine", 1),
            }),
            "recovered at site b",
        );
        s.apply(Command::StartFailoverTest {
            test: test("theirs", 1),
        })
        .unwrap();
        refused(
            s.apply(Command::StartFailoverTest {
                test: test("theirs", 2),
            }),
            "already running",
        );
        // While it runs: no edit, no delete.
        let vpg = s.vpgs[&id].clone();
        refused(
            s.apply(Command::PutVpg {
                vpg,
                expected_generation: Some(4),
                generation_floor: None,
                event: None,
            }),
            "stop it before editing",
        );
        refused(
            s.apply(Command::BeginVpgDelete {
                id: id.clone(),
                keep_recovery_disks: false,
                now_ms: 9,
            }),
            "stop it before deleting",
        );
        // Progress from another test (a deposed leader's) changes nothing.
        let progress = |task, step| TestProgress {
            vpg: id.clone(),
            task,
            step,
            volumes: Vec::new(),
            error: None,
        };
        s.apply(Command::ProgressFailoverTest {
            progress: progress(2, TestStep::Running),
        })
        .unwrap();
        assert_eq!(s.tests[&id].step, TestStep::Starting);
        s.apply(Command::ProgressFailoverTest {
            progress: progress(1, TestStep::Running),
        })
        .unwrap();
        assert_eq!(s.tests[&id].step, TestStep::Running);
        // The first verdict stands; a stopping test stays stopping.
        let verdict = |passed: bool, note: &str| TestVerdict {
            passed,
            note: note.into(),
        };
        s.apply(Command::StopFailoverTest {
            vpg: id.clone(),
            verdict: verdict(false, "app did not start"),
            now_ms: 1500,
        })
        .unwrap();
        s.apply(Command::StopFailoverTest {
            vpg: id.clone(),
            verdict: verdict(true, "later"),
            now_ms: 1600,
        })
        .unwrap();
        assert_eq!(s.tests[&id].stop_requested_ms, 1500);
        s.apply(Command::ProgressFailoverTest {
            progress: progress(1, TestStep::Running),
        })
        .unwrap();
        assert_eq!(s.tests[&id].step, TestStep::Stopping);
        start_test_task(&mut s, crate::tasks::TaskKind::FailoverTest, &id);
        s.apply(Command::EndFailoverTest {
            vpg: id.clone(),
            task: 1,
            stopped_ms: 2000,
            left: Vec::new(),
        })
        .unwrap();
        let ended = s.tasks.get(1).unwrap();
        assert_eq!(ended.state, crate::tasks::TaskState::Failed, "{ended:?}");
        let event = s.events.iter().last().unwrap();
        assert_eq!(event.code, crate::events::EventCode::FailoverTestStopped);
        assert!(
            event.description.contains("failed (\"app did not start\")"),
            "{event:?}"
        );
        assert!(s.tests.is_empty());
        let r = &s.test_results[&id];
        assert_eq!(
            (r.stopped_ms, &r.verdict),
            (2000, &verdict(false, "app did not start"))
        );
        refused(
            s.apply(Command::StopFailoverTest {
                vpg: id.clone(),
                verdict: verdict(true, ""),
                now_ms: 3000,
            }),
            "no failover test running",
        );
    }
}
