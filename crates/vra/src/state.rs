//! State a VRA keeps across restarts in its data directory: the role assignments of its
//! VPGs (`assignments.json`, serde JSON replaced atomically), and the helper that writes
//! small files atomically (temporary file, fsync, rename, fsync of the directory).

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{VraError, VraResult},
    model::{ProtectedAssignment, RecoveryAssignment},
};

/// Every assignment of the VRA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignments {
    /// Protected VPGs.
    pub protected: Vec<ProtectedAssignment>,
    /// Recovery VPGs.
    pub recovery: Vec<RecoveryAssignment>,
    /// Protected VPGs whose VMs are powered off (their volumes not served).
    #[serde(default)]
    pub powered_off: Vec<tandem_core::ids::VpgId>,
    /// Protected VPGs stood down by their managers (another site runs their VMs).
    #[serde(default)]
    pub stood_down: Vec<crate::stood_down::StoodDownRecord>,
}

/// Where the assignments live in a data directory.
pub fn assignments_path(data_dir: &Path) -> PathBuf {
    data_dir.join("assignments.json")
}

/// Loads the assignments (none when the file does not exist).
pub fn load(data_dir: &Path) -> VraResult<Assignments> {
    let path = assignments_path(data_dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| VraError::Io {
            op: "parse assignments",
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Assignments::default()),
        Err(e) => Err(VraError::io("read assignments", path)(e)),
    }
}

/// Saves the assignments atomically.
pub fn save(data_dir: &Path, a: &Assignments) -> VraResult<()> {
    let bytes = serde_json::to_vec_pretty(a).map_err(|e| VraError::Io {
        op: "encode assignments",
        path: assignments_path(data_dir),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&assignments_path(data_dir), &bytes)
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> VraResult<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(VraError::io("create", &tmp))?;
    f.write_all(bytes).map_err(VraError::io("write", &tmp))?;
    f.sync_all().map_err(VraError::io("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(VraError::io("rename", path))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(VraError::io("fsync dir", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_round_trip_and_missing_file_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("load"), Assignments::default());
        let a = Assignments {
            protected: vec![ProtectedAssignment {
                vpg: tandem_core::ids::VpgId::minted("vpg-1".into()),
                generation: tandem_journal::Generation(2),
                vms: vec![],
                recovery_vra: "127.0.0.1:1".into(),
                wan_compression: true,
                priority: tandem_core::vpg::Priority::Low,
                freeze_timeout_ms: 100,
                preseeded: false,
                recovery_site: String::new(),
            }],
            recovery: vec![],
            powered_off: vec![],
            stood_down: vec![],
        };
        save(dir.path(), &a).expect("save");
        assert_eq!(load(dir.path()).expect("load"), a);
        fs::write(assignments_path(dir.path()), b"{").expect("garble");
        assert!(
            load(dir.path()).is_err(),
            "a garbled file is an error, not an empty state"
        );
    }
}
