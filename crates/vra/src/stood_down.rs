//! A protected VPG its managers stood down: another site runs its VMs now. Nothing runs
//! for it here: no export, no stream, no sync. What it kept is the dirty map of its last
//! protected role (every region the recovery VRA never acknowledged), persisted beside
//! the assignments, so that the divergence it reports survives a restart and a stand-up
//! (the other site rolled back) resumes with a bitmap sync of exactly those regions.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_core::ids::VpgId;
use tandem_proto::v1 as pb;

use crate::{
    dirty::DirtyMap,
    error::{VraError, VraResult},
    model::ProtectedAssignment,
    protected::Carry,
    state::write_atomic,
};

/// What a stood-down VPG keeps in the assignments file (its map is a file of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoodDownRecord {
    /// The protected assignment it held.
    pub assignment: ProtectedAssignment,
    /// Why, as its managers said (the other site and its operation).
    pub reason: String,
    /// Whether the map holds every region written and not acknowledged (false when a
    /// delta sync was owed: a restart without a clean stop lost that knowledge).
    pub known: bool,
}

/// A stood-down VPG.
#[derive(Debug)]
pub struct StoodDownVpg {
    record: StoodDownRecord,
    map: DirtyMap,
}

impl StoodDownVpg {
    /// Stands down from a stopped protected role's `carry`; persists its map.
    pub fn from_carry(
        data_dir: &Path,
        assignment: ProtectedAssignment,
        reason: String,
        carry: Carry,
    ) -> VraResult<Self> {
        let record = StoodDownRecord {
            assignment,
            reason,
            known: !carry.delta_owed,
        };
        let path = map_path(data_dir, &record.assignment.vpg);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(VraError::io("create dir", dir))?;
        }
        write_atomic(&path, &carry.map.encode())?;
        Ok(Self {
            record,
            map: carry.map,
        })
    }

    /// Reloads a stood-down VPG after a restart (a lost or damaged map: nothing known).
    pub fn restore(data_dir: &Path, record: StoodDownRecord) -> Self {
        let path = map_path(data_dir, &record.assignment.vpg);
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| DirtyMap::decode(&b).ok());
        match map {
            Some(map) => Self { record, map },
            None => {
                tracing::warn!(vpg = %record.assignment.vpg, path = %path.display(),
                    "stood-down map missing or damaged: its divergence is unknown");
                let a = &record.assignment;
                let map = DirtyMap::new(
                    a.vms
                        .iter()
                        .flat_map(|vm| vm.volumes.iter().map(|v| (vm.vm.clone(), v.id, v.size))),
                );
                Self {
                    record: StoodDownRecord {
                        known: false,
                        ..record
                    },
                    map,
                }
            }
        }
    }

    pub fn id(&self) -> &VpgId {
        &self.record.assignment.vpg
    }

    pub fn record(&self) -> &StoodDownRecord {
        &self.record
    }

    /// What a protected role resuming over it starts from: the kept regions (a bitmap
    /// sync), or a delta sync when they are not known.
    pub fn carry(&self) -> Carry {
        Carry {
            map: self.map.clone(),
            delta_owed: !self.record.known,
        }
    }

    /// Bytes never acknowledged by the recovery VRA, per volume.
    pub fn divergent(&self) -> Vec<pb::VolumeDivergence> {
        self.map
            .volumes()
            .iter()
            .map(|v| pb::VolumeDivergence {
                vm_id: v.vm.to_string(),
                volume_id: v.volume.0,
                bytes: v.pending_bytes(),
            })
            .collect()
    }

    /// Its status line.
    pub fn status(&self, powered_off: bool) -> pb::VpgReplicationStatus {
        pb::VpgReplicationStatus {
            vpg_id: self.id().to_string(),
            role: pb::VraRole::StoodDown as i32,
            generation: self.record.assignment.generation.0,
            state: pb::VpgStreamState::Disconnected as i32,
            dirty_bytes: self.map.pending_bytes(),
            divergent: self.divergent(),
            divergence_known: self.record.known,
            last_error: format!("stood down: {}", self.record.reason),
            powered_off,
            ..Default::default()
        }
    }

    /// Removes its map file (the role ends: unassigned, or replaced).
    pub fn remove_files(&self, data_dir: &Path) -> VraResult<()> {
        let path = map_path(data_dir, self.id());
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VraError::io("remove stood-down map", path)(e)),
        }
    }
}

/// Where the map of a stood-down `vpg` is kept under a VRA's data directory.
pub fn map_path(data_dir: &Path, vpg: &VpgId) -> PathBuf {
    data_dir.join("protected").join(format!("{vpg}.stood-down"))
}
