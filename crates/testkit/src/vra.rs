//! Driving standalone VRAs the way a site's managers would, for VRA-level tests and
//! benchmarks: one test VPG's assignment on a protected and a recovery VRA, its status,
//! and whether it is level.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tandem_proto::v1 as pb;
use tandem_proto::v1::vra_control_client::VraControlClient;
use tonic::transport::Channel;

use crate::eventually::{Probe, eventually};
use crate::process::VraProcess;

/// One VM of a test VPG: its id and its volumes' sizes.
#[derive(Debug, Clone)]
pub struct TestVm {
    pub id: String,
    pub sizes: Vec<u64>,
}

impl TestVm {
    pub fn new(id: impl Into<String>, sizes: Vec<u64>) -> Self {
        Self {
            id: id.into(),
            sizes,
        }
    }
}

/// Source image of a volume at the protected side: `root/ds-a/VM-VOL.img`.
pub fn image_path(root: &Path, vm: &str, vol: u32) -> PathBuf {
    root.join("ds-a").join(format!("{vm}-{vol}.img"))
}

/// Replica of a volume at the recovery side: `root/ds-b/VM-VOL.replica`.
pub fn replica_path(root: &Path, vm: &str, vol: u32) -> PathBuf {
    root.join("ds-b").join(format!("{vm}-{vol}.replica"))
}

/// A VM's journal directory at the recovery side: `root/ds-b/journals/VM`.
pub fn journal_dir(root: &Path, vm: &str) -> PathBuf {
    root.join("ds-b").join("journals").join(vm)
}

/// A test VPG as both sides are told it.
#[derive(Debug, Clone)]
pub struct Assignment<'a> {
    /// Where the images (`ds-a`) and replicas and journals (`ds-b`) live.
    pub root: &'a Path,
    pub vpg: &'a str,
    pub generation: u64,
    pub vms: &'a [TestVm],
    pub compression: bool,
    /// The address the protected VRA reaches the recovery VRA at (a link proxy); its
    /// control address when `None`.
    pub recovery_address: Option<&'a str>,
    /// The replicas are preseeded (delta sync instead of initial sync).
    pub preseeded: bool,
    pub priority: pb::VraPriority,
    /// 0: no hard limit. The history window is an hour, so within a test only the hard
    /// limit promotes.
    pub journal_hard_limit: u64,
}

impl<'a> Assignment<'a> {
    /// Generation 1, no compression, direct, not preseeded, medium priority, no limit.
    pub fn new(root: &'a Path, vpg: &'a str, vms: &'a [TestVm]) -> Self {
        Self {
            root,
            vpg,
            generation: 1,
            vms,
            compression: false,
            recovery_address: None,
            preseeded: false,
            priority: pb::VraPriority::Medium,
            journal_hard_limit: 0,
        }
    }

    fn volumes(&self, vm: &TestVm, path: fn(&Path, &str, u32) -> PathBuf) -> Vec<pb::VraVolume> {
        vm.sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| pb::VraVolume {
                volume_id: i as u32,
                size_bytes: size,
                path: path(self.root, &vm.id, i as u32).display().to_string(),
                preseeded: false,
            })
            .collect()
    }

    /// The recovery side's assignment.
    pub fn recovery(&self) -> pb::AssignRecoveryRequest {
        pb::AssignRecoveryRequest {
            vpg_id: self.vpg.into(),
            generation: self.generation,
            vms: self
                .vms
                .iter()
                .map(|vm| pb::RecoveryVm {
                    vm_id: vm.id.clone(),
                    volumes: self.volumes(vm, replica_path),
                    journal_dir: journal_dir(self.root, &vm.id).display().to_string(),
                    datastore_path: String::new(),
                })
                .collect(),
            journal_history_secs: 3600,
            journal_warning_bytes: 0,
            journal_hard_limit_bytes: self.journal_hard_limit,
            remove_dropped_vm_data: false,
            keep_vm_ids: Vec::new(),
            protected_site_id: String::new(),
        }
    }

    /// The protected side's assignment, streaming to `recovery_address`.
    pub fn protected(&self, recovery_address: &str) -> pb::AssignProtectedRequest {
        pb::AssignProtectedRequest {
            vpg_id: self.vpg.into(),
            generation: self.generation,
            vms: self
                .vms
                .iter()
                .map(|vm| pb::ProtectedVm {
                    vm_id: vm.id.clone(),
                    volumes: self.volumes(vm, image_path),
                })
                .collect(),
            recovery_vra_address: recovery_address.to_string(),
            wan_compression: self.compression,
            priority: self.priority as i32,
            freeze_timeout_ms: 10_000,
            preseeded: self.preseeded,
            recovery_site_id: String::new(),
        }
    }
}

/// Assigns the recovery role on `b`.
pub async fn assign_recovery(b: &VraProcess, x: &Assignment<'_>) -> Result<()> {
    b.client()
        .await?
        .assign_recovery(x.recovery())
        .await
        .with_context(|| format!("assign recovery of {} on {}", x.vpg, b.host))?;
    Ok(())
}

/// Assigns the protected role on `a`, streaming to `recovery_address`.
pub async fn assign_protected(
    a: &VraProcess,
    recovery_address: &str,
    x: &Assignment<'_>,
) -> Result<()> {
    a.client()
        .await?
        .assign_protected(x.protected(recovery_address))
        .await
        .with_context(|| format!("assign protected of {} on {}", x.vpg, a.host))?;
    Ok(())
}

/// Recovery on `b` first (the protected side's stream is refused until then), then
/// protected on `a`.
pub async fn assign(a: &VraProcess, b: &VraProcess, x: &Assignment<'_>) -> Result<()> {
    assign_recovery(b, x).await?;
    assign_protected(a, x.recovery_address.unwrap_or(&b.control), x).await
}

/// Status of one VPG on a VRA.
pub async fn vpg_status(v: &VraProcess, vpg: &str) -> Result<pb::VpgReplicationStatus> {
    status_of(&mut v.client().await?, vpg)
        .await
        .with_context(|| format!("on {}", v.host))
}

/// Status of one VPG over an open control client (for tight polling loops).
pub async fn status_of(
    c: &mut VraControlClient<Channel>,
    vpg: &str,
) -> Result<pb::VpgReplicationStatus> {
    c.get_status(pb::GetVraStatusRequest {})
        .await
        .context("VRA status")?
        .into_inner()
        .vpgs
        .into_iter()
        .find(|p| p.vpg_id == vpg)
        .with_context(|| format!("{vpg} not in the VRA's status"))
}

/// Level: connected, nothing tracked or dirty, no sync running or owed. Writes may be in
/// flight (see [`caught_up`]).
pub fn is_level(s: &pb::VpgReplicationStatus) -> bool {
    s.connected
        && s.sync.is_none()
        && s.dirty_bytes == 0
        && !s.tracking
        && s.state != pb::VpgStreamState::NeedsSync as i32
}

/// Level, and every write sent is durable at the recovery side.
pub fn caught_up(s: &pb::VpgReplicationStatus) -> bool {
    is_level(s) && s.acked_seq >= s.written_seq
}

/// Polls the protected side until `ready` holds of the VPG's status; answers that status.
pub async fn wait_status(
    a: &VraProcess,
    vpg: &str,
    what: &str,
    patience: Duration,
    ready: fn(&pb::VpgReplicationStatus) -> bool,
) -> Result<pb::VpgReplicationStatus> {
    eventually(
        &format!("{vpg} on {}: {what}", a.host),
        patience,
        || async {
            match vpg_status(a, vpg).await {
                Ok(s) if ready(&s) => Probe::Ready(s),
                Ok(s) => Probe::Seen(format!("{s:?}")),
                Err(e) => Probe::Seen(format!("{e:#}")),
            }
        },
    )
    .await
    .with_context(|| format!("see {}", a.log_path().display()))
}
