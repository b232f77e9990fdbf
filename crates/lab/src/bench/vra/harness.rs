//! The benchmarks' VRA pairs: started alone (`tandem_testkit::process`), assigned one VPG, waited on until caught up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tandem_proto::v1::{self as pb, vra_control_client::VraControlClient};
use tonic::transport::Channel;

use tandem_testkit::process::{VraOptions, VraProcess};
use tandem_testkit::vra::{
    Assignment, TestVm, caught_up, image_path, replica_path, status_of, wait_status,
};

use super::settings::*;

/// A VRA without managers: plaintext (`--insecure`) without `ca`, else mutual TLS with its
/// certificate from `ca` and the benchmark's own (a manager of that site) to drive it.
pub(super) async fn start_vra(
    s: &Settings,
    root: &Path,
    host: &str,
    ca: Option<&tandem_tls::pki::SiteCa>,
) -> Result<VraProcess> {
    VraProcess::standalone(
        root,
        host,
        VraOptions {
            ca,
            ram_mb: s.ram_mb,
            log_filter: std::env::var("VRA_LOG").unwrap_or_else(|_| "warn".into()),
            bin: Some(s.vra_bin.clone()),
        },
    )
    .await
}

/// One protected volume (volume 0 of `vm`) and where it is recovered.
pub(super) struct Placement {
    pub(super) vm: TestVm,
    /// The benchmark's directory the images and replicas are under.
    pub(super) root: PathBuf,
    pub(super) image: PathBuf,
    pub(super) replica: PathBuf,
}

impl Placement {
    pub(super) fn new(root: &Path, vm: &str, size: u64) -> Self {
        Self {
            vm: TestVm::new(vm, vec![size]),
            root: root.to_path_buf(),
            image: image_path(root, vm, 0),
            replica: replica_path(root, vm, 0),
        }
    }
}

pub(super) async fn assign_recovery(
    b: &VraProcess,
    vms: &[&Placement],
    hard_limit: u64,
) -> Result<()> {
    let list: Vec<TestVm> = vms.iter().map(|p| p.vm.clone()).collect();
    let mut x = Assignment::new(&vms[0].root, VPG, &list);
    x.journal_hard_limit = hard_limit;
    tandem_testkit::vra::assign_recovery(b, &x).await
}

pub(super) async fn assign_protected(
    a: &VraProcess,
    recovery_address: &str,
    vms: &[&Placement],
    preseeded: bool,
) -> Result<()> {
    let list: Vec<TestVm> = vms.iter().map(|p| p.vm.clone()).collect();
    let mut x = Assignment::new(&vms[0].root, VPG, &list);
    x.preseeded = preseeded;
    tandem_testkit::vra::assign_protected(a, recovery_address, &x).await
}

pub(super) async fn vpg_status(
    c: &mut VraControlClient<Channel>,
) -> Result<pb::VpgReplicationStatus> {
    status_of(c, VPG).await
}

/// Polls until the protected VPG is caught up; returns its status then.
pub(super) async fn wait_level(
    a: &VraProcess,
    patience: Duration,
) -> Result<pb::VpgReplicationStatus> {
    wait_status(a, VPG, "caught up", patience, caught_up).await
}

/// Polls until the protected VPG is level after a sync of `kind`; returns the elapsed
/// time from `start` and that sync's status.
pub(super) async fn wait_sync(
    a: &VraProcess,
    kind: pb::VraSyncKind,
    start: Instant,
) -> Result<(Duration, pb::VraSyncStatus)> {
    let mut c = a.client().await?;
    let deadline = start + Duration::from_secs(3600);
    loop {
        let s = vpg_status(&mut c).await?;
        if caught_up(&s)
            && let Some(last) = s.last_sync.as_ref().filter(|l| l.kind == kind as i32)
        {
            return Ok((start.elapsed(), last.clone()));
        }
        if Instant::now() > deadline {
            bail!("the {kind:?} sync did not finish: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
