//! The site's replicated state: what the Raft state machine holds and how commands change
//! it. `apply` is deterministic: ids and clocks come inside the commands, minted by the
//! manager that proposed them, so every node computes the same outcome.

mod access;
mod ca;
mod command;
mod inventory;
mod pairing;
mod records;
mod recovery;
mod rules;
#[cfg(test)]
mod tests;
mod vpg;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Violations};
use crate::ids::{DatastoreId, HostId, PoolId, SiteId, VmId, VpgId};
use crate::inventory::{Datastore, Host, ResourcePool, Vm};
use crate::pairing::{PairingToken, PeerSite};
use crate::status::Operation;
use crate::vpg::{RecoveryCommitments, Vpg, VpgVm};

pub use command::Command;

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
            Command::InitSite { identity } => self.apply_init_site(identity),
            Command::IssuePairingToken { token, now_ms } => {
                self.apply_issue_pairing_token(token, now_ms)
            }
            Command::AcceptPairing {
                token_hash,
                legacy_token,
                peer,
                now_ms,
            } => self.apply_accept_pairing(token_hash, legacy_token, peer, now_ms),
            Command::SetPeerBandwidthLimit { id, bytes_per_sec } => {
                self.apply_set_peer_bandwidth_limit(id, bytes_per_sec)
            }
            Command::AddPeer { peer } => self.apply_add_peer(peer),
            Command::RemovePeer { id } => self.apply_remove_peer(id),
            Command::PutHost { host, create } => self.apply_put_host(host, create),
            Command::DeleteHost { id } => self.apply_delete_host(id),
            Command::PutDatastore { datastore, create } => {
                self.apply_put_datastore(datastore, create)
            }
            Command::DeleteDatastore { id } => self.apply_delete_datastore(id),
            Command::PutPool { pool, create } => self.apply_put_pool(pool, create),
            Command::DeletePool { id } => self.apply_delete_pool(id),
            Command::PutVm { vm, create } => self.apply_put_vm(vm, create),
            Command::DeleteVm { id } => self.apply_delete_vm(id),
            Command::PutVpg {
                vpg,
                expected_generation,
                generation_floor,
                event,
            } => self.apply_put_vpg(vpg, expected_generation, generation_floor, event),
            Command::BeginVpgUpdate {
                id,
                reason,
                now_ms,
                task,
            } => self.apply_begin_vpg_update(id, reason, now_ms, task),
            Command::EndVpgUpdate { id } => self.apply_end_vpg_update(id),
            Command::DeleteVpg { id, now_ms } => self.apply_delete_vpg(id, now_ms),
            Command::BeginRecovery { op } => self.apply_begin_recovery(op),
            Command::AdvanceRecovery { advance: a } => self.apply_advance_recovery(a),
            Command::RecoveryInput { vpg, intent } => self.apply_recovery_input(vpg, intent),
            Command::EndRecovery {
                vpg: id,
                op: op_id,
                now_ms,
            } => self.apply_end_recovery(id, op_id, now_ms),
            Command::StandDown { vpg, stand_down } => self.apply_stand_down(vpg, stand_down),
            Command::ProtectBack { vpg, pool, now_ms } => {
                self.apply_protect_back(vpg, pool, now_ms)
            }
            Command::RecordDivergence {
                vpg,
                divergence,
                now_ms,
            } => self.apply_record_divergence(vpg, divergence, now_ms),
            Command::StandUp { vpg, op, now_ms } => self.apply_stand_up(vpg, op, now_ms),
            Command::StartFailoverTest { test } => self.apply_start_failover_test(test),
            Command::ProgressFailoverTest { progress } => {
                self.apply_progress_failover_test(progress)
            }
            Command::StopFailoverTest {
                vpg,
                verdict,
                now_ms,
            } => self.apply_stop_failover_test(vpg, verdict, now_ms),
            Command::EndFailoverTest {
                vpg,
                task,
                stopped_ms,
                left,
            } => self.apply_end_failover_test(vpg, task, stopped_ms, left),
            Command::SetVpgOperation {
                id,
                generation,
                operation,
                event,
            } => self.apply_set_vpg_operation(id, generation, operation, event),
            Command::BootstrapAdminToken { token, now_ms } => {
                self.apply_bootstrap_admin_token(token, now_ms)
            }
            Command::InstallCa { ca } => self.apply_install_ca(ca),
            Command::StartCaRotation {
                next,
                started_by,
                now_ms,
            } => self.apply_start_ca_rotation(next, started_by, now_ms),
            Command::IssueFromNextCa {
                fingerprint,
                now_ms,
            } => self.apply_issue_from_next_ca(fingerprint, now_ms),
            Command::RetireOldCa {
                fingerprint,
                now_ms,
            } => self.apply_retire_old_ca(fingerprint, now_ms),
            Command::RecordNodeCert { node, cert } => self.apply_record_node_cert(node, cert),
            Command::SetPeerCa { id, ca_pem } => self.apply_set_peer_ca(id, ca_pem),
            Command::CreateJoinToken { token, now_ms } => {
                self.apply_create_join_token(token, now_ms)
            }
            Command::RevokeJoinToken { id } => self.apply_revoke_join_token(id),
            Command::ConsumeJoinToken {
                id,
                secret_hash,
                identity,
                now_ms,
            } => self.apply_consume_join_token(id, secret_hash, identity, now_ms),
            Command::CreateToken { token, now_ms } => self.apply_create_token(token, now_ms),
            Command::RevokeToken { id, now_ms } => self.apply_revoke_token(id, now_ms),
            Command::RecordStatus { vpg, state, event } => {
                self.apply_record_status(vpg, state, event)
            }
            Command::RecordEvent { event } => self.apply_record_event(event),
            Command::RecordEvents { events } => self.apply_record_events(events),
            Command::StartTask { task } => self.apply_start_task(task),
            Command::UpdateTask {
                id,
                progress,
                message,
            } => self.apply_update_task(id, progress, message),
            Command::EndTask {
                id,
                ok,
                message,
                now_ms,
            } => self.apply_end_task(id, ok, message, now_ms),
            Command::BeginVpgDelete {
                id,
                keep_recovery_disks,
                now_ms,
            } => self.apply_begin_vpg_delete(id, keep_recovery_disks, now_ms),
            Command::SetVpgPaused { id, paused } => self.apply_set_vpg_paused(id, paused),
            Command::SetManagerPause { id, until_ms } => self.apply_set_manager_pause(id, until_ms),
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
