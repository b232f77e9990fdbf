//! The commands proposed through Raft: every change to the site state, as the log holds it
//! (its serialized form is the log's: fields are only ever added, with defaults).

use super::*;

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
