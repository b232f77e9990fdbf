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
mod tests;
