//! Between the managers' domain and the VRA control API: plans into assignment requests,
//! VRA status into the reports the live status is computed from, journal checkpoints into
//! the operator's checkpoints.

use tandem_core::ids::VmId;
use tandem_core::observe::{Role, StreamState, SyncProgress, VmRates, VraVpgReport};
use tandem_core::protection::{ProtectedPlan, RecoveryPlan, VmPlan};
use tandem_core::status::{SyncKind, SyncTrigger};
use tandem_core::vpg::Priority;

use crate::v1;

fn volumes(vm: &VmPlan) -> Vec<v1::VraVolume> {
    vm.volumes
        .iter()
        .map(|v| v1::VraVolume {
            volume_id: v.volume_id,
            size_bytes: v.size_bytes,
            path: v.path.clone(),
            preseeded: v.preseeded,
        })
        .collect()
}

fn priority(p: Priority) -> v1::VraPriority {
    match p {
        Priority::Low => v1::VraPriority::Low,
        Priority::Medium => v1::VraPriority::Medium,
        Priority::High => v1::VraPriority::High,
    }
}

/// The protected role of `plan`, streaming to the recovery VRA at `recovery_address`.
pub fn assign_protected(
    plan: &ProtectedPlan,
    recovery_address: &str,
    preseeded: bool,
) -> v1::AssignProtectedRequest {
    v1::AssignProtectedRequest {
        vpg_id: plan.vpg.to_string(),
        generation: plan.generation,
        vms: plan
            .vms
            .iter()
            .map(|vm| v1::ProtectedVm {
                vm_id: vm.vm.to_string(),
                volumes: volumes(vm),
            })
            .collect(),
        recovery_vra_address: recovery_address.to_string(),
        wan_compression: plan.wan_compression,
        priority: priority(plan.priority) as i32,
        freeze_timeout_ms: plan.freeze_timeout_ms,
        preseeded,
        recovery_site_id: plan.recovery_site.to_string(),
    }
}

/// The recovery role of `plan`.
pub fn assign_recovery(plan: &RecoveryPlan) -> v1::AssignRecoveryRequest {
    v1::AssignRecoveryRequest {
        vpg_id: plan.vpg.to_string(),
        generation: plan.generation,
        vms: plan
            .vms
            .iter()
            .map(|vm| v1::RecoveryVm {
                vm_id: vm.vm.to_string(),
                volumes: volumes(vm),
                journal_dir: vm.journal_dir.clone(),
                datastore_path: vm.datastore_path.clone(),
            })
            .collect(),
        journal_history_secs: plan.journal_history_secs,
        journal_warning_bytes: plan.journal_warning_bytes,
        journal_hard_limit_bytes: plan.journal_hard_limit_bytes,
        remove_dropped_vm_data: plan.remove_dropped_vm_data,
        keep_vm_ids: plan.kept_vms.iter().map(|v| v.to_string()).collect(),
        protected_site_id: plan.protected_site.to_string(),
    }
}

fn sync_kind(k: i32) -> Option<SyncKind> {
    Some(match v1::VraSyncKind::try_from(k).ok()? {
        v1::VraSyncKind::None => return None,
        v1::VraSyncKind::Initial => SyncKind::Initial,
        v1::VraSyncKind::Delta => SyncKind::Delta,
        v1::VraSyncKind::Bitmap => SyncKind::Bitmap,
        v1::VraSyncKind::VolumeInitial => SyncKind::VolumeInitial,
        v1::VraSyncKind::VolumeDelta => SyncKind::VolumeDelta,
        v1::VraSyncKind::Evaluating => SyncKind::Evaluating,
    })
}

/// The display name of a VRA sync kind, as the seed's substatus names it.
pub fn sync_name(k: SyncKind) -> &'static str {
    match k {
        SyncKind::Evaluating => "Syncing",
        SyncKind::Initial => "Initial Sync",
        SyncKind::Delta => "Delta Syncing",
        SyncKind::Bitmap => "Bitmap Syncing",
        SyncKind::VolumeInitial => "Volume Initial Sync",
        SyncKind::VolumeDelta => "Delta syncing a volume",
    }
}

fn progress(s: &v1::VraSyncStatus) -> Option<SyncProgress> {
    Some(SyncProgress {
        kind: sync_kind(s.kind)?,
        trigger: SyncTrigger::from_display(&s.trigger),
        percent: s.percent.min(100),
        eta_secs: s.eta_secs,
        total_bytes: s.total_bytes,
        done_bytes: s.done_bytes,
    })
}

/// What a VRA's status says about one VPG, in domain terms.
pub fn vpg_report(s: &v1::VpgReplicationStatus) -> VraVpgReport {
    // A VPG recovered here is at its recovery site: the recovery side's report.
    let role = if s.role == v1::VraRole::Recovery as i32 || s.role == v1::VraRole::Recovered as i32
    {
        Role::Recovery
    } else if s.role == v1::VraRole::StoodDown as i32 {
        Role::StoodDown
    } else {
        Role::Protected
    };
    let state = match v1::VpgStreamState::try_from(s.state) {
        Ok(v1::VpgStreamState::Replicating) => StreamState::Replicating,
        Ok(v1::VpgStreamState::NeedsSync) => StreamState::NeedsSync,
        Ok(v1::VpgStreamState::Failed) => StreamState::Failed,
        _ => StreamState::Disconnected,
    };
    let recovery = role == Role::Recovery;
    let failed = recovery && state == StreamState::Failed && !s.last_error.is_empty();
    let journal = s.storage_fault == v1::VraStorageFault::Journal as i32;
    let storage_error = (failed && !journal).then(|| s.last_error.clone());
    let journal_error = (failed && journal).then(|| s.last_error.clone());
    VraVpgReport {
        role,
        generation: s.generation,
        state,
        sync: s.sync.as_ref().and_then(progress),
        tracking: s.tracking,
        paused: s.paused,
        acked_seq: s.acked_seq,
        write_iops: s.write_iops,
        write_bytes_per_sec: s.write_bytes_per_sec,
        wan_bytes_per_sec: s.wan_bytes_per_sec,
        journal_bytes: s.journal_bytes,
        last_durable_checkpoint: (s.last_durable_checkpoint_id != 0)
            .then_some((s.last_durable_checkpoint_id, s.last_durable_checkpoint_ms)),
        oldest_checkpoint_ms: s
            .journals
            .iter()
            .filter(|j| j.oldest_checkpoint_id != 0)
            .map(|j| j.oldest_checkpoint_ms)
            .max(),
        history_short: s.journals.iter().any(|j| j.history_not_meeting_sla),
        storage_error,
        journal_error,
        last_error: s.last_error.clone(),
        vm_rates: s
            .vms
            .iter()
            .filter_map(|v| {
                Some(VmRates {
                    vm: VmId::parse("vm_id", &v.vm_id).ok()?,
                    write_iops: v.write_iops,
                    write_bytes_per_sec: v.write_bytes_per_sec,
                    wan_bytes_per_sec: v.wan_bytes_per_sec,
                })
            })
            .collect(),
        vm_journal_bytes: s
            .journals
            .iter()
            .filter_map(|j| Some((VmId::parse("vm_id", &j.vm_id).ok()?, j.size_bytes)))
            .collect(),
        divergent: s
            .divergent
            .iter()
            .filter_map(|d| Some((VmId::parse("vm_id", &d.vm_id).ok()?, d.volume_id, d.bytes)))
            .collect(),
        divergence_known: s.divergence_known,
    }
}

/// The operator's kind of a journal checkpoint kind.
pub fn checkpoint_kind(k: i32) -> v1::CheckpointKind {
    match v1::VraCheckpointKind::try_from(k) {
        Ok(v1::VraCheckpointKind::Automatic) => v1::CheckpointKind::Automatic,
        Ok(v1::VraCheckpointKind::Manual) => v1::CheckpointKind::Manual,
        Ok(v1::VraCheckpointKind::ApplicationConsistent) => {
            v1::CheckpointKind::ApplicationConsistent
        }
        _ => v1::CheckpointKind::Unspecified,
    }
}

/// The journal's kind of an operator checkpoint kind.
pub fn vra_checkpoint_kind(k: v1::CheckpointKind) -> v1::VraCheckpointKind {
    match k {
        v1::CheckpointKind::Automatic => v1::VraCheckpointKind::Automatic,
        v1::CheckpointKind::ApplicationConsistent => v1::VraCheckpointKind::ApplicationConsistent,
        v1::CheckpointKind::Manual | v1::CheckpointKind::Unspecified => {
            v1::VraCheckpointKind::Manual
        }
    }
}

/// Application-consistent checkpoints carry their VM in the marker's name as
/// `<name>@vm=<vm_id>`: the journal stores one name, and recovery needs both back.
pub const APP_VM_SEPARATOR: &str = "@vm=";

/// The operator's name and VM of a marker name.
pub fn split_marker_name(name: &str) -> (String, String) {
    match name.rsplit_once(APP_VM_SEPARATOR) {
        Some((n, vm)) => (n.to_string(), vm.to_string()),
        None => (name.to_string(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_status_maps_to_a_report() {
        let s = v1::VpgReplicationStatus {
            role: v1::VraRole::Recovery as i32,
            generation: 4,
            state: v1::VpgStreamState::Failed as i32,
            last_error: "journal: no space left on device".into(),
            last_durable_checkpoint_id: 9,
            last_durable_checkpoint_ms: 1234,
            journals: vec![
                v1::VraJournalStatus {
                    oldest_checkpoint_id: 3,
                    oldest_checkpoint_ms: 100,
                    ..Default::default()
                },
                v1::VraJournalStatus {
                    oldest_checkpoint_id: 4,
                    oldest_checkpoint_ms: 200,
                    history_not_meeting_sla: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = vpg_report(&s);
        assert_eq!(r.role, Role::Recovery);
        assert_eq!(r.last_durable_checkpoint, Some((9, 1234)));
        assert_eq!(r.oldest_checkpoint_ms, Some(200));
        assert!(r.history_short);
        assert!(r.storage_error.unwrap().contains("no space"));
        assert_eq!(r.journal_error, None);
        let r = vpg_report(&v1::VpgReplicationStatus {
            storage_fault: v1::VraStorageFault::Journal as i32,
            last_error: "journal of vm a failed: Operation not permitted".into(),
            ..s
        });
        assert_eq!(r.storage_error, None);
        assert!(r.journal_error.unwrap().contains("not permitted"));
    }

    #[test]
    fn sync_progress_and_trigger_come_through() {
        let s = v1::VpgReplicationStatus {
            role: v1::VraRole::Protected as i32,
            state: v1::VpgStreamState::Replicating as i32,
            sync: Some(v1::VraSyncStatus {
                kind: v1::VraSyncKind::Delta as i32,
                trigger: "Force Sync".into(),
                percent: 40,
                ..Default::default()
            }),
            ..Default::default()
        };
        let sync = vpg_report(&s).sync.unwrap();
        assert_eq!(sync.kind, SyncKind::Delta);
        assert_eq!(sync.trigger, Some(SyncTrigger::ForceSync));
        assert_eq!(
            split_marker_name("pre-upgrade@vm=vm-1"),
            ("pre-upgrade".into(), "vm-1".into())
        );
    }
}
