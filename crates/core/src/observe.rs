//! Live status: what the VRAs report about a VPG (in domain terms), what a site tells its
//! peer about the VPGs they share, and the pure mapping from all of it to the seed's status
//! model and the figures an operator sees. Every figure shown for a VPG (CLI, CSV, later
//! the dashboard and /metrics) comes from one [`LiveStatus`] snapshot.

use serde::{Deserialize, Serialize};

use crate::ids::{HostId, SiteId, VmId, VpgId};
use crate::status::{Fault, Pause, SyncKind, SyncTrigger, VpgObservation, VpgState};
use crate::vpg::Vpg;

/// The replication stream of one VPG on one VRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamState {
    Disconnected,
    Replicating,
    /// Protected: the stream cannot resume where the receiver is; a sync is due.
    NeedsSync,
    /// Recovery: a journal failed (I/O error, full datastore).
    Failed,
}

/// A sync running (or due) on a protected VRA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub kind: SyncKind,
    pub trigger: Option<SyncTrigger>,
    pub percent: u32,
    pub eta_secs: u64,
    pub total_bytes: u64,
    pub done_bytes: u64,
}

/// Which role a VRA plays for a VPG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Protected,
    Recovery,
    /// Protected until its site stood the VPG down: no exports, no stream.
    StoodDown,
}

/// What one VRA reports about one VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VraVpgReport {
    pub role: Role,
    pub generation: u64,
    pub state: StreamState,
    pub sync: Option<SyncProgress>,
    pub tracking: bool,
    pub paused: bool,
    /// Protected: the highest sequence durable in every journal of its recovery VRA.
    pub acked_seq: u64,
    pub write_iops: u64,
    pub write_bytes_per_sec: u64,
    pub wan_bytes_per_sec: u64,
    /// Recovery: bytes in the VPG's journals on this VRA.
    pub journal_bytes: u64,
    /// Recovery: newest checkpoint durable in every journal here (id, stamped ms).
    pub last_durable_checkpoint: Option<(u64, u64)>,
    /// Recovery: stamp of the oldest usable checkpoint over the journals here.
    pub oldest_checkpoint_ms: Option<u64>,
    /// Recovery: a journal promoted history early because of its hard limit.
    pub history_short: bool,
    /// Recovery: the datastore is full, which keeps entries from becoming durable.
    pub storage_error: Option<String>,
    /// Recovery: a journal write or fsync failed (an I/O error); no entry becomes durable
    /// until the VRA reopens the journal.
    #[serde(default)]
    pub journal_error: Option<String>,
    pub last_error: String,
    /// Protected: the rates of each VM.
    #[serde(default)]
    pub vm_rates: Vec<VmRates>,
    /// Recovery: the size of each VM's journal.
    #[serde(default)]
    pub vm_journal_bytes: Vec<(VmId, u64)>,
    /// Stood down: what each volume holds that was never acknowledged by the recovery
    /// VRA (VM, volume id, bytes).
    #[serde(default)]
    pub divergent: Vec<(VmId, u32, u64)>,
    /// Stood down: whether `divergent` is exact (false after a restart without a clean
    /// stop: only hashes could tell).
    #[serde(default)]
    pub divergence_known: bool,
}

/// The rates a protected VRA measures for one VM (per second).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRates {
    pub vm: VmId,
    pub write_iops: u64,
    pub write_bytes_per_sec: u64,
    pub wan_bytes_per_sec: u64,
}

/// What a manager knows of one host's VRA for one VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VraSeen {
    Reported(Box<VraVpgReport>),
    /// The VRA answered but does not hold the VPG (yet).
    NotAssigned,
    /// The VRA did not answer.
    Unreachable(String),
}

/// One host of a VPG and what its VRA shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSeen {
    pub host: HostId,
    pub seen: VraSeen,
}

/// Why a site cannot put (some of) a VPG's VMs under its VRAs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanError {
    pub kind: PlanErrorKind,
    pub message: String,
}

/// What a [`PlanError`] shows as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanErrorKind {
    /// VM not protected: a host, VRA or volume problem.
    NotProtected,
    /// Recovery storage profile error: the recovery datastore the VPG names cannot be
    /// found (not in the inventory, or not present on its host).
    StorageProfile,
}

impl PlanError {
    pub fn not_protected(message: impl Into<String>) -> Self {
        Self {
            kind: PlanErrorKind::NotProtected,
            message: message.into(),
        }
    }

    /// A planner error: a datastore that is not in the inventory is a storage profile
    /// error, anything else leaves VMs not protected.
    pub fn of_plan(e: &crate::DomainError) -> Self {
        let kind = match e {
            crate::DomainError::NotFound { kind, .. } if kind == crate::ids::DatastoreId::KIND => {
                PlanErrorKind::StorageProfile
            }
            _ => PlanErrorKind::NotProtected,
        };
        Self {
            kind,
            message: e.to_string(),
        }
    }

    fn fault(&self) -> Fault {
        match self.kind {
            PlanErrorKind::NotProtected => Fault::VmNotProtected,
            PlanErrorKind::StorageProfile => Fault::RecoveryStorageProfile,
        }
    }
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a site tells its peer about one VPG they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerVpgReport {
    pub vpg: VpgId,
    /// The generation of the reporting site's definition.
    pub generation: u64,
    /// The generation the reporting site's VRAs were assigned (0: not yet).
    pub assigned_generation: u64,
    /// The reporting site's VRAs of the VPG.
    pub vras: Vec<HostSeen>,
    /// Recovery site only: the address at which the protected VRAs reach each recovery
    /// host's VRA.
    pub targets: Vec<(HostId, String)>,
    /// Why the reporting site cannot assign its VRAs, if it cannot.
    pub plan_error: Option<PlanError>,
    /// Protected site only: its site manager (not the operator) paused protection.
    #[serde(default)]
    pub manager_paused: bool,
    /// The reporting site's failover or move of the VPG: running, or how its last one
    /// ended.
    #[serde(default)]
    pub recovery: Option<crate::fence::RecoveryClaim>,
}

/// A site's report to a peer: the VPGs they share, as the reporting site sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    pub site: Option<SiteId>,
    pub vpgs: Vec<PeerVpgReport>,
    /// The CAs (fingerprints, sorted, joined by commas) this site trusts for the site it
    /// reports to (None: none, it was paired without TLS).
    #[serde(default)]
    pub your_cas: Option<String>,
    /// Whether every VRA of this site trusts exactly those.
    #[serde(default)]
    pub your_cas_applied: bool,
    /// VPGs shared with the site reported to that the reporting site deleted.
    #[serde(default)]
    pub deleted: Vec<crate::fence::Tombstone>,
}

/// The figures an operator sees for a VPG, beside its status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub actual_rpo_secs: Option<u64>,
    pub sync: Option<SyncProgress>,
    pub write_iops: u64,
    pub write_bytes_per_sec: u64,
    pub wan_bytes_per_sec: u64,
    /// Disks and memory of the VMs (the seed's provisioned storage).
    pub provisioned_bytes: u64,
    /// Recovery disks and journals.
    pub used_bytes: u64,
    pub history_held_secs: u64,
    pub history_configured_secs: u64,
    /// The newest checkpoint durable in every journal (id, stamped ms).
    pub last_checkpoint: Option<(u64, u64)>,
    pub problems: Vec<String>,
    pub observed_at_ms: u64,
    /// The figures of each VM of the VPG (the seed's VMs tab), in the definition's order.
    #[serde(default)]
    pub vms: Vec<VmFigures>,
}

/// The figures an operator sees for one VM of a VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFigures {
    pub vm: VmId,
    pub write_iops: u64,
    pub write_bytes_per_sec: u64,
    pub wan_bytes_per_sec: u64,
    /// Its disks and memory.
    pub provisioned_bytes: u64,
    /// Its recovery disks and journal.
    pub used_bytes: u64,
}

/// One status snapshot of a VPG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveStatus {
    pub state: VpgState,
    pub observation: VpgObservation,
    pub figures: Figures,
    /// Replicating at the definition's generation with no sync running or due: the VPG is
    /// level (a new VPG leaves Creating; checkpoints may be taken).
    pub level: bool,
}

/// Everything the mapping looks at for one VPG.
#[derive(Debug, Clone)]
pub struct LiveInputs<'a> {
    pub vpg: &'a Vpg,
    /// This site protects the VPG (else it recovers it).
    pub protects: bool,
    pub now_ms: u64,
    /// This site's VRAs of the VPG.
    pub own: &'a [HostSeen],
    /// The peer's report of the VPG; `None` when the peer site cannot be reached.
    pub peer: Option<&'a PeerVpgReport>,
    /// Why this site cannot assign its VRAs, if it cannot.
    pub plan_error: Option<&'a PlanError>,
    /// The newest checkpoint this site's coordinator saw durable everywhere (id, ms).
    pub coordinated_checkpoint: Option<(u64, u64)>,
    /// This (recovery) site has not tested the VPG's failover within its reminder interval.
    pub test_overdue: bool,
    /// This (protected) site stood the VPG down: another site runs its VMs.
    pub stood_down: Option<&'a crate::fence::StandDown>,
}

/// The strongest of two syncs, for a VPG whose VRAs run different ones.
fn sync_rank(k: SyncKind) -> u8 {
    match k {
        SyncKind::Initial => 5,
        SyncKind::Delta => 4,
        SyncKind::VolumeInitial => 3,
        SyncKind::VolumeDelta => 2,
        SyncKind::Evaluating => 1,
        SyncKind::Bitmap => 0,
    }
}

fn reports(seen: &[HostSeen]) -> impl Iterator<Item = (&HostId, &VraVpgReport)> {
    seen.iter().filter_map(|h| match &h.seen {
        VraSeen::Reported(r) => Some((&h.host, &**r)),
        _ => None,
    })
}

/// Maps what is observed about a VPG to the seed's status, substatus and alert colour,
/// with its figures.
pub fn evaluate(i: &LiveInputs<'_>) -> LiveStatus {
    let empty = Vec::new();
    let peer_vras = i.peer.map_or(&empty, |p| &p.vras);
    let (protected, recovery) = if i.protects {
        (i.own, peer_vras.as_slice())
    } else {
        (peer_vras.as_slice(), i.own)
    };
    let mut faults = Vec::new();
    let mut problems = Vec::new();
    let peer_side = if i.protects { "recovery" } else { "protected" };

    // Turned around here (reverse protection) and the old protected site has not taken
    // the new direction yet: it waits for that site, and proceeds by itself once it is
    // back. Taking it stores a generation above the turn's at both sites, so a later link
    // cut shows as a site disconnection again.
    let turn_pending = i.protects
        && i.vpg.reversed_at > 0
        && i.vpg.generation == i.vpg.reversed_at
        && i.peer.is_none_or(|p| p.generation < i.vpg.reversed_at);
    if turn_pending {
        faults.push(Fault::NeedsConfiguration);
        problems.push(format!(
            "reverse protection waits for the {peer_side} site to take the VPG's new \
             direction (generation {}){}",
            i.vpg.reversed_at,
            if i.peer.is_none() {
                ": it cannot be reached"
            } else {
                ""
            }
        ));
    } else if i.peer.is_none() {
        faults.push(if i.protects {
            Fault::SiteDisconnected
        } else {
            Fault::ProtectedSiteDown
        });
        problems.push(format!("the {peer_side} site cannot be reached"));
    }
    if let Some(e) = i.plan_error {
        faults.push(e.fault());
        problems.push(e.to_string());
    }
    if let Some(e) = i.peer.and_then(|p| p.plan_error.as_ref()) {
        faults.push(e.fault());
        problems.push(format!("{peer_side} site: {e}"));
    }
    for (side, seen) in [("protected", protected), ("recovery", recovery)] {
        for h in seen {
            match &h.seen {
                VraSeen::Unreachable(e) => {
                    faults.push(Fault::Error);
                    problems.push(format!(
                        "{side} VRA of host {} cannot be reached: {e}",
                        h.host
                    ));
                }
                VraSeen::NotAssigned => {
                    faults.push(Fault::VmNotProtected);
                    problems.push(format!(
                        "{side} VRA of host {} does not protect the VPG yet",
                        h.host
                    ));
                }
                VraSeen::Reported(r) => {
                    if let Some(e) = &r.journal_error {
                        faults.push(Fault::JournalStorage);
                        problems.push(format!("{side} VRA of host {}: {e}", h.host));
                    } else if let Some(e) = &r.storage_error {
                        faults.push(Fault::RecoveryStorage);
                        problems.push(format!("{side} VRA of host {}: {e}", h.host));
                    } else if r.state == StreamState::Failed {
                        faults.push(Fault::JournalStorage);
                        problems.push(format!("{side} VRA of host {}: {}", h.host, r.last_error));
                    }
                }
            }
        }
    }
    if turn_pending {
        // Until the other site takes the new direction, this site's VRAs keep the
        // recovered volumes: not a fault of protection.
        faults.retain(|f| {
            matches!(
                f,
                Fault::NeedsConfiguration | Fault::JournalStorage | Fault::RecoveryStorage
            )
        });
    }
    // The protected VRAs hear of a recovery storage error on their ack streams: it counts
    // even while the recovery site's report is out of reach.
    if reports(protected).any(|(_, r)| {
        r.sync
            .as_ref()
            .is_some_and(|s| s.trigger == Some(SyncTrigger::RecoveryOrJournalStorageError))
            && !r.last_error.is_empty()
    }) && !faults.contains(&Fault::RecoveryStorage)
        && !faults.contains(&Fault::JournalStorage)
    {
        faults.push(Fault::RecoveryStorage);
        if let Some((h, r)) = reports(protected).find(|(_, r)| !r.last_error.is_empty()) {
            problems.push(format!("protected VRA of host {h}: {}", r.last_error));
        }
    }

    // Stood down: another site runs the VMs; that, not protection, is what this site shows.
    let stood_down = i.stood_down.filter(|_| i.protects);
    let mut operation = i.vpg.operation;
    if let Some(d) = stood_down {
        faults.clear();
        problems.clear();
        problems.push(format!("stood down: {}", d.describe()));
        match d.claim() {
            Some(c) if !c.committed() => operation = operation.or(d.peer_operation()),
            Some(c) if c.reverse => {
                faults.push(Fault::NeedsConfiguration);
                problems.push(format!(
                    "site {} protects the VMs back to this site: this site takes the new \
                     direction once it has counted what its VMs wrote",
                    d.by
                ));
            }
            Some(_) => {
                faults.push(Fault::NeedsConfiguration);
                problems.push("reverse protection is not specified".into());
            }
            None => {
                faults.push(Fault::NeedsConfiguration);
                problems.push(format!("site {} holds the VPG no more", d.by));
            }
        }
        problems.push(format!(
            "written here after the recovery's checkpoint (kept on this site's disks): {}",
            d.describe_divergence()
        ));
    }

    let sync = reports(protected)
        .filter_map(|(_, r)| {
            r.sync.clone().or_else(|| {
                (r.state == StreamState::NeedsSync).then_some(SyncProgress {
                    kind: SyncKind::Evaluating,
                    trigger: None,
                    percent: 0,
                    eta_secs: 0,
                    total_bytes: 0,
                    done_bytes: 0,
                })
            })
        })
        .reduce(|a, b| {
            let (hi, lo) = if sync_rank(b.kind) > sync_rank(a.kind) {
                (b, a)
            } else {
                (a, b)
            };
            // One progress for the VPG: bytes over every VRA running the strongest kind.
            if hi.kind == lo.kind {
                let total = hi.total_bytes + lo.total_bytes;
                let done = hi.done_bytes + lo.done_bytes;
                SyncProgress {
                    percent: done
                        .saturating_mul(100)
                        .checked_div(total)
                        .map_or(hi.percent.min(lo.percent), |p| p.min(100) as u32),
                    eta_secs: hi.eta_secs.max(lo.eta_secs),
                    total_bytes: total,
                    done_bytes: done,
                    trigger: hi.trigger.or(lo.trigger),
                    kind: hi.kind,
                }
            } else {
                hi
            }
        });
    let paused = reports(protected).any(|(_, r)| r.paused);
    let manager_paused = if i.protects {
        i.vpg.paused_by_manager()
    } else {
        i.peer.is_some_and(|p| p.manager_paused)
    };

    let durable_here = reports(recovery)
        .map(|(_, r)| r.last_durable_checkpoint)
        .try_fold(None::<(u64, u64)>, |acc, cp| {
            let cp = cp?;
            Some(Some(match acc {
                Some(a) if a.1 <= cp.1 => a,
                _ => cp,
            }))
        })
        .flatten()
        .filter(|_| reports(recovery).count() == recovery.len() && !recovery.is_empty());
    let last_checkpoint = match (durable_here, i.coordinated_checkpoint) {
        (Some(a), Some(b)) => Some(if a.1 >= b.1 { a } else { b }),
        (a, b) => a.or(b),
    };
    // A stood-down VPG is not protected from this site: no RPO to show.
    let actual_rpo_secs = last_checkpoint
        .map(|(_, ms)| i.now_ms.saturating_sub(ms) / 1000)
        .filter(|_| stood_down.is_none());
    let history_met = !reports(recovery).any(|(_, r)| r.history_short);
    let oldest = reports(recovery)
        .filter_map(|(_, r)| r.oldest_checkpoint_ms)
        .max();

    let observation = VpgObservation {
        vm_count: i.vpg.vms.len(),
        operation,
        sync: sync.as_ref().map(|s| s.kind),
        forced: sync
            .as_ref()
            .is_some_and(|s| s.trigger == Some(SyncTrigger::ForceSync)),
        pause: paused.then_some(if manager_paused {
            Pause::Manager
        } else {
            Pause::User
        }),
        faults,
        backup_running: false,
        actual_rpo_secs,
        target_rpo_secs: i.vpg.settings.target_rpo_secs,
        history_met,
        has_checkpoints: last_checkpoint.is_some(),
        after_rollback: false,
        test_overdue: i.test_overdue,
    };
    let state = observation.evaluate();
    let level = stood_down.is_none()
        && !protected.is_empty()
        && protected.iter().all(|h| {
            matches!(&h.seen, VraSeen::Reported(r)
                if r.generation == i.vpg.generation
                    && r.state == StreamState::Replicating
                    && r.sync.is_none()
                    && !r.tracking
                    && !r.paused)
        })
        && observation.faults.is_empty();

    let sum = |f: fn(&VraVpgReport) -> u64| reports(protected).map(|(_, r)| f(r)).sum::<u64>();
    let journals: u64 = reports(recovery).map(|(_, r)| r.journal_bytes).sum();
    let disks: u64 = i
        .vpg
        .vms
        .iter()
        .map(|m| m.footprint.provisioned_bytes())
        .sum();
    let memory: u64 = i.vpg.vms.iter().map(|m| m.footprint.memory_mib << 20).sum();
    let vms = i
        .vpg
        .vms
        .iter()
        .map(|m| {
            let vm = &m.placement.vm_id;
            let rates = reports(protected)
                .flat_map(|(_, r)| r.vm_rates.iter())
                .filter(|v| &v.vm == vm);
            let (iops, bps, wan) = rates.fold((0, 0, 0), |(a, b, c), v| {
                (
                    a + v.write_iops,
                    b + v.write_bytes_per_sec,
                    c + v.wan_bytes_per_sec,
                )
            });
            let journal: u64 = reports(recovery)
                .flat_map(|(_, r)| r.vm_journal_bytes.iter())
                .filter(|(v, _)| v == vm)
                .map(|(_, b)| b)
                .sum();
            let disks = m.footprint.provisioned_bytes();
            VmFigures {
                vm: vm.clone(),
                write_iops: iops,
                write_bytes_per_sec: bps,
                wan_bytes_per_sec: wan,
                provisioned_bytes: disks + (m.footprint.memory_mib << 20),
                used_bytes: disks + journal,
            }
        })
        .collect();
    let figures = Figures {
        actual_rpo_secs,
        sync,
        write_iops: sum(|r| r.write_iops),
        write_bytes_per_sec: sum(|r| r.write_bytes_per_sec),
        wan_bytes_per_sec: sum(|r| r.wan_bytes_per_sec),
        provisioned_bytes: disks + memory,
        used_bytes: disks + journals,
        history_held_secs: oldest.map_or(0, |ms| i.now_ms.saturating_sub(ms) / 1000),
        history_configured_secs: i.vpg.settings.journal_history_secs,
        last_checkpoint,
        problems,
        observed_at_ms: i.now_ms,
        vms,
    };
    LiveStatus {
        state,
        observation,
        figures,
        level,
    }
}

/// The least history (seconds of checkpoints) a sync may leave in the journal before the
/// site manager pauses it (the seed's "at least ten minutes worth of checkpoints").
pub const SYNC_MIN_HISTORY_SECS: u64 = 600;

/// What the site manager does about a VPG's replication pause time at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPause {
    Nothing,
    /// Pause protection until this time (ms).
    Pause {
        until_ms: u64,
    },
    /// End the pause: its time is over, or the operator paused or resumed meanwhile.
    End,
}

/// The seed's replication pause time, for a VPG this site protects: while a sync runs
/// (other than the initial one, which has no checkpoints to keep) and the journal is at its
/// hard limit (history promoted early) with less than [`SYNC_MIN_HISTORY_SECS`] of
/// checkpoints, protection pauses for the VPG's replication pause time, once per sync
/// (`paused_this_sync`), so that the operator can enlarge the journal first.
pub fn sync_pause(vpg: &Vpg, st: &LiveStatus, paused_this_sync: bool, now_ms: u64) -> SyncPause {
    if vpg.manager_paused_until_ms != 0 {
        return if now_ms >= vpg.manager_paused_until_ms || vpg.paused {
            SyncPause::End
        } else {
            SyncPause::Nothing
        };
    }
    let pause_secs = vpg.settings.replication_pause_secs;
    let syncing = st.observation.sync.is_some_and(|k| k != SyncKind::Initial);
    if pause_secs == 0
        || vpg.paused
        || paused_this_sync
        || vpg.operation.is_some()
        || !syncing
        || st.observation.history_met
        || st.figures.history_held_secs >= SYNC_MIN_HISTORY_SECS
    {
        return SyncPause::Nothing;
    }
    SyncPause::Pause {
        until_ms: now_ms.saturating_add(pause_secs.saturating_mul(1000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DatastoreId, PoolId, VmId};
    use crate::status::{AlertColor, Operation, VpgStatus, VpgSubstatus};
    use crate::vpg::{VmFootprint, VmPlacement, VpgSettings, VpgVm};

    fn vpg(operation: Option<Operation>) -> Vpg {
        Vpg {
            reversed_at: 0,
            id: VpgId::minted("g".into()),
            name: "g".into(),
            generation: 2,
            protected_site: SiteId::minted("a".into()),
            recovery_site: SiteId::minted("b".into()),
            settings: VpgSettings::default(),
            vms: vec![VpgVm {
                source: None,
                placement: VmPlacement {
                    disk_paths: Default::default(),
                    vm_id: VmId::minted("vm".into()),
                    recovery_host: HostId::minted("r1".into()),
                    recovery_datastore: DatastoreId::minted("ds".into()),
                    recovery_pool: PoolId::minted("p".into()),
                    preseeded: false,
                },
                footprint: VmFootprint {
                    cpus: 1,
                    vm_name: "vm".into(),
                    cpu_reservation_mhz: 0,
                    memory_reservation_mib: 0,
                    memory_mib: 4096,
                    volumes: vec![(0, 0, 1 << 30)],
                    journal_hard_limit: crate::vpg::JournalLimit::Unlimited,
                    journal_warning: crate::vpg::JournalLimit::Unlimited,
                },
            }],
            created_at_ms: 0,
            updated_at_ms: 0,
            operation,
            paused: false,
            keep_recovery_disks: false,
            delete_started_ms: 0,
            keep_removed_recovery_disks: false,
            kept_recovery_vms: Default::default(),
            manager_paused_until_ms: 0,
        }
    }

    fn protected() -> VraVpgReport {
        VraVpgReport {
            role: Role::Protected,
            generation: 2,
            state: StreamState::Replicating,
            sync: None,
            tracking: false,
            paused: false,
            acked_seq: 10,
            write_iops: 100,
            write_bytes_per_sec: 1 << 20,
            wan_bytes_per_sec: 1 << 19,
            journal_bytes: 0,
            last_durable_checkpoint: None,
            oldest_checkpoint_ms: None,
            history_short: false,
            storage_error: None,
            journal_error: None,
            last_error: String::new(),
            vm_rates: vec![VmRates {
                vm: VmId::minted("vm".into()),
                write_iops: 100,
                write_bytes_per_sec: 1 << 20,
                wan_bytes_per_sec: 1 << 19,
            }],
            vm_journal_bytes: vec![],
            divergent: vec![],
            divergence_known: false,
        }
    }

    fn recovery(cp_ms: u64) -> VraVpgReport {
        VraVpgReport {
            role: Role::Recovery,
            journal_bytes: 5 << 20,
            vm_rates: vec![],
            vm_journal_bytes: vec![(VmId::minted("vm".into()), 5 << 20)],
            last_durable_checkpoint: Some((7, cp_ms)),
            oldest_checkpoint_ms: Some(cp_ms - 60_000),
            write_iops: 0,
            write_bytes_per_sec: 0,
            wan_bytes_per_sec: 0,
            ..protected()
        }
    }

    fn seen(host: &str, r: VraVpgReport) -> HostSeen {
        HostSeen {
            host: HostId::minted(host.into()),
            seen: VraSeen::Reported(Box::new(r)),
        }
    }

    fn peer(vras: Vec<HostSeen>) -> PeerVpgReport {
        PeerVpgReport {
            vpg: VpgId::minted("g".into()),
            generation: 2,
            assigned_generation: 2,
            vras,
            targets: vec![],
            plan_error: None,
            manager_paused: false,
            recovery: None,
        }
    }

    const NOW: u64 = 1_000_000;

    fn run(g: &Vpg, protects: bool, own: &[HostSeen], peer: Option<&PeerVpgReport>) -> LiveStatus {
        evaluate(&LiveInputs {
            vpg: g,
            protects,
            now_ms: NOW,
            own,
            peer,
            plan_error: None,
            coordinated_checkpoint: None,
            test_overdue: false,
            stood_down: None,
        })
    }

    fn shown(s: &LiveStatus) -> (VpgStatus, VpgSubstatus, AlertColor) {
        (s.state.status, s.state.substatus, s.state.alert)
    }

    #[test]
    fn replicating_with_a_recent_checkpoint_meets_sla_with_figures() {
        let g = vpg(None);
        let own = [seen("p1", protected())];
        let p = peer(vec![seen("r1", recovery(NOW - 3000))]);
        let s = run(&g, true, &own, Some(&p));
        assert_eq!(
            shown(&s),
            (VpgStatus::MeetingSla, VpgSubstatus::None, AlertColor::Green)
        );
        assert!(s.level);
        assert_eq!(s.figures.actual_rpo_secs, Some(3));
        assert_eq!(s.figures.write_iops, 100);
        assert_eq!(s.figures.provisioned_bytes, (1 << 30) + (4096 << 20));
        assert_eq!(s.figures.used_bytes, (1 << 30) + (5 << 20));
        // The VM's own figures (the VMs tab): its rates from the protected VRA, its disks
        // and memory, its recovery disks and journal.
        let vm = &s.figures.vms[0];
        assert_eq!(vm.vm.as_str(), "vm");
        assert_eq!(
            (vm.write_iops, vm.write_bytes_per_sec, vm.wan_bytes_per_sec),
            (100, 1 << 20, 1 << 19)
        );
        assert_eq!(vm.provisioned_bytes, (1 << 30) + (4096 << 20));
        assert_eq!(vm.used_bytes, (1 << 30) + (5 << 20));
        assert_eq!(s.figures.history_held_secs, 63);
        // The recovery site sees the same VPG the same way from its side.
        let own = [seen("r1", recovery(NOW - 3000))];
        let p = peer(vec![seen("p1", protected())]);
        assert_eq!(
            shown(&run(&g, false, &own, Some(&p))).0,
            VpgStatus::MeetingSla
        );
    }

    #[test]
    fn a_turned_vpg_needs_configuration_until_the_old_site_takes_it_then_a_cut_is_a_cut() {
        let mut g = vpg(None);
        g.reversed_at = g.generation;
        let own = [seen("p1", protected())];
        let needs = (
            VpgStatus::NotMeetingSla,
            VpgSubstatus::NeedsConfiguration,
            AlertColor::Red,
        );
        assert_eq!(shown(&run(&g, true, &own, None)), needs);
        let mut behind = peer(vec![seen("r1", recovery(NOW - 3000))]);
        behind.generation = g.generation - 1;
        assert_eq!(shown(&run(&g, true, &own, Some(&behind))), needs);
        // Taken: both sites store a generation above the turn's; a later cut is a cut.
        g.generation += 1;
        let cut = shown(&run(&g, true, &own, None)).1;
        assert!(
            matches!(
                cut,
                VpgSubstatus::SiteDisconnection | VpgSubstatus::SiteDisconnectionNoCheckpoints
            ),
            "{cut:?}"
        );
    }

    #[test]
    fn a_sync_into_a_full_journal_pauses_once_for_the_replication_pause_time() {
        let mut g = vpg(None);
        g.settings.replication_pause_secs = 30;
        let mut a = protected();
        a.sync = Some(SyncProgress {
            kind: SyncKind::Delta,
            trigger: Some(SyncTrigger::ForceSync),
            percent: 10,
            eta_secs: 30,
            total_bytes: 100,
            done_bytes: 10,
        });
        let own = [seen("p1", a)];
        let mut full = recovery(NOW - 3000);
        full.history_short = true;
        let p = peer(vec![seen("r1", full)]);
        let st = run(&g, true, &own, Some(&p));
        assert!(st.figures.history_held_secs < SYNC_MIN_HISTORY_SECS);
        let until_ms = NOW + 30_000;
        assert_eq!(
            sync_pause(&g, &st, false, NOW),
            SyncPause::Pause { until_ms }
        );
        // Once per sync; never without a pause time, or for an initial sync.
        assert_eq!(sync_pause(&g, &st, true, NOW), SyncPause::Nothing);
        let mut no_time = g.clone();
        no_time.settings.replication_pause_secs = 0;
        assert_eq!(sync_pause(&no_time, &st, false, NOW), SyncPause::Nothing);
        let mut initial = st.clone();
        initial.observation.sync = Some(SyncKind::Initial);
        assert_eq!(sync_pause(&g, &initial, false, NOW), SyncPause::Nothing);
        // A journal with room, or with ten minutes of checkpoints left, goes on syncing.
        let p_room = peer(vec![seen("r1", recovery(NOW - 3000))]);
        let room = run(&g, true, &own, Some(&p_room));
        assert_eq!(sync_pause(&g, &room, false, NOW), SyncPause::Nothing);

        // Paused: shown as the site manager's pause, on both sides, until the time is over.
        g.manager_paused_until_ms = until_ms;
        let mut held = protected();
        held.paused = true;
        held.tracking = true;
        let own = [seen("p1", held.clone())];
        let st = run(&g, true, &own, Some(&p));
        assert_eq!(st.state.substatus, VpgSubstatus::ManagerPausedProtection);
        assert_eq!(sync_pause(&g, &st, true, NOW), SyncPause::Nothing);
        assert_eq!(sync_pause(&g, &st, true, until_ms), SyncPause::End);
        let mut from_protected = peer(vec![seen("p1", held)]);
        from_protected.manager_paused = true;
        let at_recovery = run(
            &g,
            false,
            &[seen("r1", recovery(NOW))],
            Some(&from_protected),
        );
        assert_eq!(
            at_recovery.state.substatus,
            VpgSubstatus::ManagerPausedProtection
        );
        // The operator's pause is the operator's, and ends the manager's.
        g.paused = true;
        let st = run(&g, true, &own, Some(&p));
        assert_eq!(st.state.substatus, VpgSubstatus::UserPausedProtection);
        assert_eq!(sync_pause(&g, &st, true, NOW), SyncPause::End);
    }

    #[test]
    fn initial_sync_shows_progress_while_creating() {
        let g = vpg(Some(Operation::Creating));
        let mut a = protected();
        a.sync = Some(SyncProgress {
            kind: SyncKind::Initial,
            trigger: None,
            percent: 10,
            eta_secs: 30,
            total_bytes: 100,
            done_bytes: 10,
        });
        let mut b = a.clone();
        b.sync.as_mut().unwrap().done_bytes = 50;
        let own = [seen("p1", a), seen("p2", b)];
        let p = peer(vec![seen(
            "r1",
            VraVpgReport {
                last_durable_checkpoint: None,
                ..recovery(NOW)
            },
        )]);
        let s = run(&g, true, &own, Some(&p));
        assert_eq!(
            shown(&s),
            (
                VpgStatus::Initializing,
                VpgSubstatus::InitialSync,
                AlertColor::Green
            )
        );
        let sync = s.figures.sync.unwrap();
        assert_eq!(
            (sync.percent, sync.eta_secs, sync.total_bytes),
            (30, 30, 200)
        );
        assert!(!s.level);
        assert_eq!(s.figures.actual_rpo_secs, None);
    }

    #[test]
    fn peer_out_of_reach_is_site_disconnection_or_recovery_is_possible() {
        let g = vpg(None);
        let own = [seen("p1", protected())];
        let s = run(&g, true, &own, None);
        assert_eq!(
            s.state.substatus,
            VpgSubstatus::SiteDisconnectionNoCheckpoints
        );
        let s = evaluate(&LiveInputs {
            coordinated_checkpoint: Some((3, NOW - 1000)),
            ..LiveInputs {
                vpg: &g,
                protects: true,
                now_ms: NOW,
                own: &own,
                peer: None,
                plan_error: None,
                coordinated_checkpoint: None,
                test_overdue: false,
                stood_down: None,
            }
        });
        assert_eq!(
            shown(&s),
            (
                VpgStatus::NotMeetingSla,
                VpgSubstatus::SiteDisconnection,
                AlertColor::Red
            )
        );
        let own = [seen("r1", recovery(NOW - 1000))];
        let s = run(&g, false, &own, None);
        assert_eq!(s.state.substatus, VpgSubstatus::RecoveryIsPossible);
    }

    #[test]
    fn vra_faults_map_to_the_seed_substatuses() {
        let g = vpg(None);
        let own = [HostSeen {
            host: HostId::minted("p1".into()),
            seen: VraSeen::Unreachable("connection refused".into()),
        }];
        let p = peer(vec![seen("r1", recovery(NOW))]);
        let s = run(&g, true, &own, Some(&p));
        assert_eq!(s.state.substatus, VpgSubstatus::Error);
        assert!(s.figures.problems[0].contains("connection refused"));
        let own = [HostSeen {
            host: HostId::minted("p1".into()),
            seen: VraSeen::NotAssigned,
        }];
        assert_eq!(
            run(&g, true, &own, Some(&p)).state.substatus,
            VpgSubstatus::VmNotProtected
        );
        // The recovery site cannot find the datastore the VPG names: both sites show it.
        let mut missing = peer(vec![]);
        missing.plan_error = Some(PlanError::of_plan(&crate::DomainError::not_found(
            crate::ids::DatastoreId::KIND,
            "ds-9",
        )));
        let own = [seen("p1", protected())];
        let s = run(&g, true, &own, Some(&missing));
        assert_eq!(s.state.substatus, VpgSubstatus::RecoveryStorageProfileError);
        assert!(s.figures.problems[0].starts_with("recovery site: "));
        let s = evaluate(&LiveInputs {
            vpg: &g,
            protects: false,
            now_ms: NOW,
            own: &[],
            peer: Some(&peer(vec![seen("p1", protected())])),
            plan_error: missing.plan_error.as_ref(),
            coordinated_checkpoint: None,
            test_overdue: false,
            stood_down: None,
        });
        assert_eq!(s.state.substatus, VpgSubstatus::RecoveryStorageProfileError);
        let host_gone = PlanError::of_plan(&crate::DomainError::not_found("host", "h9"));
        assert_eq!(host_gone.kind, PlanErrorKind::NotProtected);
        let full = VraVpgReport {
            storage_error: Some("no space left on device".into()),
            state: StreamState::Failed,
            ..recovery(NOW)
        };
        let p = peer(vec![seen("r1", full.clone())]);
        assert_eq!(
            run(&g, true, &own, Some(&p)).state.substatus,
            VpgSubstatus::RecoveryStorageError
        );
        // A journal's I/O error is shown as such at both sites, ahead of the storage error
        // the protected VRA hears of on its stream.
        let broken = VraVpgReport {
            storage_error: None,
            journal_error: Some("journal of vm a failed: Input/output error".into()),
            ..full
        };
        let mut hearing = protected();
        hearing.last_error = "journal storage error".into();
        hearing.sync = Some(SyncProgress {
            kind: SyncKind::Bitmap,
            trigger: Some(SyncTrigger::RecoveryOrJournalStorageError),
            percent: 0,
            eta_secs: 0,
            total_bytes: 0,
            done_bytes: 0,
        });
        let p = peer(vec![seen("r1", broken.clone())]);
        let s = run(&g, true, &[seen("p1", hearing)], Some(&p));
        assert_eq!(s.state.substatus, VpgSubstatus::JournalStorageError);
        assert!(
            s.figures
                .problems
                .iter()
                .any(|p| p.contains("Input/output error"))
        );
        let p = peer(vec![seen("p1", protected())]);
        assert_eq!(
            run(&g, false, &[seen("r1", broken)], Some(&p))
                .state
                .substatus,
            VpgSubstatus::JournalStorageError
        );
        let mut paused = protected();
        paused.paused = true;
        let p = peer(vec![seen("r1", recovery(NOW))]);
        assert_eq!(
            run(&g, true, &[seen("p1", paused)], Some(&p))
                .state
                .substatus,
            VpgSubstatus::UserPausedProtection
        );
    }

    #[test]
    fn sla_figures_decide_the_status_while_replicating() {
        let g = vpg(None);
        let own = [seen("p1", protected())];
        let p = peer(vec![seen("r1", recovery(NOW - 400_000))]);
        assert_eq!(
            run(&g, true, &own, Some(&p)).state.status,
            VpgStatus::RpoNotMeetingSla
        );
        let short = VraVpgReport {
            history_short: true,
            ..recovery(NOW - 1000)
        };
        let p = peer(vec![seen("r1", short)]);
        assert_eq!(
            run(&g, true, &own, Some(&p)).state.status,
            VpgStatus::HistoryNotMeetingSla
        );
        // The oldest of the recovery VRAs' newest checkpoints is the VPG's.
        let p = peer(vec![
            seen("r1", recovery(NOW - 1000)),
            seen("r2", recovery(NOW - 9000)),
        ]);
        assert_eq!(
            run(&g, true, &own, Some(&p)).figures.actual_rpo_secs,
            Some(9)
        );
        let mut bitmap = protected();
        bitmap.sync = Some(SyncProgress {
            kind: SyncKind::Bitmap,
            trigger: Some(SyncTrigger::RecoveryVraCommunicationProblem),
            percent: 0,
            eta_secs: 0,
            total_bytes: 0,
            done_bytes: 0,
        });
        let p = peer(vec![seen("r1", recovery(NOW - 1000))]);
        let s = run(&g, true, &[seen("p1", bitmap)], Some(&p));
        assert_eq!(s.state.substatus, VpgSubstatus::BitmapSyncing);
        assert_eq!(
            s.figures.sync.unwrap().trigger,
            Some(SyncTrigger::RecoveryVraCommunicationProblem)
        );
    }

    #[test]
    fn a_stood_down_vpg_shows_the_peers_operation_then_needs_configuration_never_green() {
        use crate::fence::{ClaimPhase, RecoveryClaim, StandDown, StandDownCause};
        use crate::recovery::{RecoveryKind, RecoveryPoint};
        let g = vpg(None);
        let claim = |phase, reverse| RecoveryClaim {
            op: crate::ids::RecoveryOpId::minted("op".into()),
            kind: RecoveryKind::Failover,
            point: RecoveryPoint {
                checkpoint_id: 7,
                timestamp_ms: NOW - 5000,
                name: String::new(),
            },
            from_generation: 2,
            phase,
            reverse,
            source_shut_down: false,
        };
        let stood = |c| StandDown {
            by: SiteId::minted("b".into()),
            cause: StandDownCause::Recovered(c),
            since_ms: NOW,
            divergence: None,
        };
        // Everything else looks healthy: replicating, a recent checkpoint.
        let own = [seen("p1", protected())];
        let p = peer(vec![seen("r1", recovery(NOW - 1000))]);
        let shown_with = |d: &StandDown| {
            evaluate(&LiveInputs {
                vpg: &g,
                protects: true,
                now_ms: NOW,
                own: &own,
                peer: Some(&p),
                plan_error: None,
                coordinated_checkpoint: None,
                test_overdue: false,
                stood_down: Some(d),
            })
        };
        let before = stood(claim(
            ClaimPhase::Running {
                operation: Operation::FailoverBeforeCommit,
            },
            false,
        ));
        let s = shown_with(&before);
        assert_eq!(
            shown(&s),
            (
                VpgStatus::FailingOver,
                VpgSubstatus::FailingOverBeforeCommit,
                AlertColor::Orange
            )
        );
        assert!(!s.level && s.figures.actual_rpo_secs.is_none());
        let committed = stood(claim(ClaimPhase::Committed { generation: 3 }, false));
        let s = shown_with(&committed);
        assert_eq!(
            shown(&s),
            (
                VpgStatus::NotMeetingSla,
                VpgSubstatus::NeedsConfiguration,
                AlertColor::Red
            )
        );
        assert!(
            s.figures
                .problems
                .iter()
                .any(|p| p == "reverse protection is not specified"),
            "{:?}",
            s.figures.problems
        );
        let reversed = stood(claim(ClaimPhase::Committed { generation: 3 }, true));
        assert_eq!(
            shown_with(&reversed).state.substatus,
            VpgSubstatus::NeedsConfiguration
        );
    }
}
