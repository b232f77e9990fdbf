//! The VRA: the registry of its VPGs (protected or recovery role), the NBD exports it
//! serves, the VRA-wide replication buffer budget, and the domain operations behind
//! `VraControl` and `Replication`. Assignments are persisted in the data directory and
//! restored on start.

mod recovery_ops;
mod status;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
};

use tandem_core::{
    DomainError,
    ids::{VmId, VpgId},
};
use tandem_journal::{Checkpoint, CheckpointId, Generation, Seq, VolumeId};
use tandem_nbd::{BlockDevice, Exports};
use tandem_proto::v1 as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    bandwidth::Limiter,
    connector::Connector,
    error::{VraError, VraResult},
    fence::SessionId,
    model::{ProtectedAssignment, RecoveryAssignment},
    pool::BufferPool,
    protected::{ProtectedVpg, StartKind},
    recovered::{self, RecoveredPhase, RecoveredRecord, RecoveredVpg},
    recovery::{RecoveryVpg, StorageFault, VpgCheckpoint},
    state::{self, Assignments},
    stood_down::StoodDownVpg,
};
use tandem_core::ids::RecoveryOpId;

/// Settings of a VRA process.
#[derive(Debug, Clone)]
pub struct VraSettings {
    /// The host this VRA serves.
    pub host_id: String,
    /// Its data directory (assignments, per-VPG stream state, scratch overlays).
    pub data_dir: PathBuf,
    /// The replication buffer budget over all protected VPGs, in bytes.
    pub buffer_bytes: u64,
}

#[derive(Debug, Clone)]
enum Role {
    Protected(Arc<ProtectedVpg>),
    Recovery(Arc<RecoveryVpg>),
    /// Failed over or moved here (its replication stream is refused).
    Recovered(Arc<RecoveredVpg>),
    /// Protected until its managers stood it down (another site runs its VMs).
    StoodDown(Arc<StoodDownVpg>),
}

impl Role {
    fn name(&self) -> &'static str {
        match self {
            Role::Protected(_) => "protected",
            Role::Recovery(_) => "recovery",
            Role::Recovered(_) => "recovered",
            Role::StoodDown(_) => "stood down",
        }
    }
}

/// An opened point-in-time export.
#[derive(Debug, Clone)]
pub struct OpenedExport {
    /// Its NBD export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether it takes writes (scratch overlay).
    pub writable: bool,
}

/// Where this VRA listens, as it reports it.
#[derive(Debug, Clone, Default)]
struct Addresses {
    control: String,
    /// NBD over TCP (TLS required when the VRA has certificates).
    nbd: String,
    /// NBD on a Unix socket, for the local host.
    nbd_socket: String,
}

#[derive(Debug)]
struct Inner {
    settings: VraSettings,
    exports: Exports,
    pool: Arc<BufferPool>,
    /// Bandwidth limiters by peer site ("" for the default pair).
    limiters: Mutex<BTreeMap<String, Limiter>>,
    connector: Connector,
    vpgs: tokio::sync::Mutex<BTreeMap<VpgId, Role>>,
    pits: Mutex<BTreeMap<String, VpgId>>,
    /// Protected VPGs whose VMs are powered off: their volumes are not exported.
    powered_off: Mutex<std::collections::BTreeSet<VpgId>>,
    cancel: CancellationToken,
    addrs: Mutex<Addresses>,
}

/// A cheaply cloneable handle to the VRA.
#[derive(Debug, Clone)]
pub struct Vra {
    inner: Arc<Inner>,
}

impl Vra {
    /// A VRA with no VPGs; `cancel` is the root of every task it starts.
    pub fn new(
        settings: VraSettings,
        exports: Exports,
        connector: Connector,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool: BufferPool::new(settings.buffer_bytes),
                limiters: Mutex::new(BTreeMap::new()),
                settings,
                exports,
                connector,
                vpgs: tokio::sync::Mutex::new(BTreeMap::new()),
                pits: Mutex::new(BTreeMap::new()),
                powered_off: Mutex::new(std::collections::BTreeSet::new()),
                cancel,
                addrs: Mutex::new(Addresses::default()),
            }),
        }
    }

    /// Records the bound addresses (reported in status).
    pub fn set_addresses(&self, control: String, nbd: String, nbd_socket: String) {
        *self
            .inner
            .addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Addresses {
            control,
            nbd,
            nbd_socket,
        };
    }

    /// The NBD listener's address (host:port) and Unix socket.
    pub fn nbd_addresses(&self) -> (String, String) {
        let a = self
            .inner
            .addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (a.nbd, a.nbd_socket)
    }

    /// Re-applies the assignments persisted in the data directory.
    pub async fn restore(&self) -> VraResult<()> {
        let dir = self.inner.settings.data_dir.clone();
        let saved = tokio::task::spawn_blocking(move || state::load(&dir))
            .await
            .map_err(|_| VraError::ShuttingDown)??;
        self.powered_off().extend(saved.powered_off.iter().cloned());
        for vpg in self.recovered_on_disk().await? {
            if let Err(e) = self.restore_recovered(&vpg).await {
                warn!(vpg = %vpg, error = %e, "restoring a recovered vpg failed");
            }
        }
        for a in saved.recovery {
            let vpg = a.vpg.clone();
            if self.inner.vpgs.lock().await.contains_key(&vpg) {
                // Recovered here: its record, not the recovery role, holds.
                continue;
            }
            if let Err(e) = self.assign_recovery(a, None).await {
                warn!(vpg = %vpg, error = %e, "restoring recovery assignment failed");
            }
        }
        for record in saved.stood_down {
            let sd = StoodDownVpg::restore(&self.inner.settings.data_dir, record);
            info!(vpg = %sd.id(), "stood down (restored)");
            self.inner
                .vpgs
                .lock()
                .await
                .insert(sd.id().clone(), Role::StoodDown(Arc::new(sd)));
        }
        for a in saved.protected {
            let vpg = a.vpg.clone();
            let path = ProtectedVpg::map_path(&self.inner.settings.data_dir, &vpg);
            let map = tokio::task::spawn_blocking(move || ProtectedVpg::take_saved_map(&path))
                .await
                .map_err(|_| VraError::ShuttingDown)?;
            if let Err(e) = self.start_protected(a, StartKind::Restored(map)).await {
                warn!(vpg = %vpg, error = %e, "restoring protected assignment failed");
            }
        }
        Ok(())
    }

    async fn persist(&self, vpgs: &BTreeMap<VpgId, Role>) -> VraResult<()> {
        let mut a = Assignments::default();
        for role in vpgs.values() {
            match role {
                Role::Protected(p) => a.protected.push(p.assignment().clone()),
                Role::Recovery(r) => a.recovery.push(r.assignment().clone()),
                // Kept in its own record (`recovered.json`).
                Role::Recovered(_) => {}
                Role::StoodDown(d) => a.stood_down.push(d.record().clone()),
            }
        }
        // All of them, also of protected VPGs not restored yet (a persist during restore):
        // an entry goes only with power on or unassign.
        a.powered_off = self.powered_off().iter().cloned().collect();
        let dir = self.inner.settings.data_dir.clone();
        tokio::task::spawn_blocking(move || state::save(&dir, &a))
            .await
            .map_err(|_| VraError::ShuttingDown)?
    }

    fn check_generation(vpg: &VpgId, current: Generation, new: Generation) -> VraResult<()> {
        if new < current {
            return Err(VraError::StaleGeneration {
                vpg: vpg.clone(),
                got: new,
                current,
            });
        }
        Ok(())
    }

    /// Takes the protected role for a VPG (or replaces it at a newer generation).
    pub async fn assign_protected(&self, a: ProtectedAssignment) -> VraResult<()> {
        self.start_protected(a, StartKind::New).await
    }

    async fn start_protected(&self, a: ProtectedAssignment, start: StartKind) -> VraResult<()> {
        let mut vpgs = self.inner.vpgs.lock().await;
        self.start_protected_locked(&mut vpgs, a, start).await
    }

    async fn start_protected_locked(
        &self,
        vpgs: &mut BTreeMap<VpgId, Role>,
        a: ProtectedAssignment,
        mut start: StartKind,
    ) -> VraResult<()> {
        if let Some(Role::StoodDown(d)) = vpgs.get(&a.vpg) {
            return Err(DomainError::precondition(format!(
                "vpg {} stood down here ({}): its managers lift that first",
                a.vpg,
                d.record().reason
            ))
            .into());
        }
        if let Some(Role::Recovered(r)) = vpgs.get(&a.vpg) {
            // Reverse protection: the VMs recovered here are protected from their volumes
            // where they are.
            let r = r.clone();
            self.check_protectable(&r, &a)?;
            self.remove_recovered_exports(&r);
            r.stop().await;
            recovered::remove_state(&self.vpg_dir(&a.vpg))?;
            vpgs.remove(&a.vpg);
            info!(vpg = %a.vpg, generation = a.generation.0, "recovered VMs: protected from here on");
        }
        if let Some(role) = vpgs.get(&a.vpg) {
            let Role::Protected(p) = role else {
                return Err(VraError::WrongRole {
                    vpg: a.vpg.clone(),
                    role: role.name(),
                });
            };
            Self::check_generation(&a.vpg, p.assignment().generation, a.generation)?;
            if p.assignment() == &a {
                return Ok(());
            }
            if p.assignment().generation == a.generation {
                return Err(DomainError::precondition(format!(
                    "vpg {} is assigned differently at generation {}; bump the generation",
                    a.vpg, a.generation
                ))
                .into());
            }
            let old = p.clone();
            self.remove_protected_exports(&old);
            start = StartKind::Replaced(old.stop(false).await);
            vpgs.remove(&a.vpg);
        }
        let p = ProtectedVpg::start(
            a.clone(),
            start,
            ProtectedVpg::map_path(&self.inner.settings.data_dir, &a.vpg),
            self.inner.pool.clone(),
            self.limiter(&a.recovery_site),
            self.inner.connector.clone(),
            self.inner.settings.host_id.clone(),
            &self.inner.cancel,
        )?;
        let mut added: Vec<String> = Vec::new();
        let off = self.powered_off().contains(&a.vpg);
        for (name, vol) in p.volumes().iter().filter(|_| !off) {
            let device: Arc<dyn BlockDevice> = vol.clone();
            if let Err(e) = self.inner.exports.insert(name.clone(), device) {
                for n in &added {
                    self.inner.exports.remove(n);
                }
                p.stop(false).await;
                return Err(e.into());
            }
            added.push(name.clone());
        }
        vpgs.insert(a.vpg.clone(), Role::Protected(Arc::new(p)));
        self.persist(vpgs).await?;
        info!(vpg = %a.vpg, generation = a.generation.0, "assigned protected role");
        Ok(())
    }

    /// Stands a protected VPG down (another site runs its VMs): its exports close once
    /// the requests in flight are answered, its stream and syncs stop, and every region
    /// its recovery VRA never acknowledged is kept (persisted) and counted. Idempotent.
    pub async fn stand_down(&self, vpg: &VpgId, reason: String) -> VraResult<()> {
        let mut vpgs = self.inner.vpgs.lock().await;
        if let Some(Role::StoodDown(_)) = vpgs.get(vpg) {
            return Ok(());
        }
        let p = protected_in(&vpgs, vpg)?;
        self.remove_protected_exports(&p);
        let carry = p.stop(false).await;
        let dir = self.inner.settings.data_dir.clone();
        let assignment = p.assignment().clone();
        let reason_log = reason.clone();
        let d = tokio::task::spawn_blocking(move || {
            StoodDownVpg::from_carry(&dir, assignment, reason, carry)
        })
        .await
        .map_err(|_| VraError::ShuttingDown)??;
        let divergent: u64 = d.divergent().iter().map(|v| v.bytes).sum();
        let known = d.record().known;
        vpgs.insert(vpg.clone(), Role::StoodDown(Arc::new(d)));
        self.persist(&vpgs).await?;
        warn!(vpg = %vpg, reason = %reason_log, divergent_bytes = divergent, known,
            "stood down: no more writes to its volumes, no replication");
        Ok(())
    }

    /// The other site rolled its recovery back: a stood-down VPG takes its protected role
    /// up again, syncing what it kept (bitmap sync; a delta sync when that is not known).
    pub async fn stand_up(&self, vpg: &VpgId) -> VraResult<()> {
        let mut vpgs = self.inner.vpgs.lock().await;
        let d = match vpgs.get(vpg) {
            Some(Role::StoodDown(d)) => d.clone(),
            Some(Role::Protected(_)) => return Ok(()),
            Some(other) => {
                return Err(VraError::WrongRole {
                    vpg: vpg.clone(),
                    role: other.name(),
                });
            }
            None => return Err(VraError::VpgNotFound(vpg.clone())),
        };
        vpgs.remove(vpg);
        let start = StartKind::Replaced(d.carry());
        if let Err(e) = self
            .start_protected_locked(&mut vpgs, d.record().assignment.clone(), start)
            .await
        {
            // Still stood down: nothing was lost.
            vpgs.insert(vpg.clone(), Role::StoodDown(d));
            return Err(e);
        }
        d.remove_files(&self.inner.settings.data_dir)?;
        info!(vpg = %vpg, "stood up: protection resumes");
        Ok(())
    }

    /// A recovered VPG becomes protected (reverse protection) once its commit is done, at a
    /// newer generation, over the volumes it serves.
    fn check_protectable(&self, r: &RecoveredVpg, a: &ProtectedAssignment) -> VraResult<()> {
        let record = r.record();
        if record.phase != RecoveredPhase::Live {
            return Err(DomainError::precondition(format!(
                "vpg {} is still being committed here ({:?}): it is protected once its volumes \
                 are live",
                a.vpg, record.phase
            ))
            .into());
        }
        let at = record
            .new_generation
            .unwrap_or(record.assignment.generation);
        Self::check_generation(&a.vpg, at, a.generation)?;
        if a.generation == at {
            return Err(DomainError::precondition(format!(
                "vpg {} was recovered here at generation {}: protecting it needs a newer one",
                a.vpg, at.0
            ))
            .into());
        }
        let serving: std::collections::BTreeSet<PathBuf> = record
            .assignment
            .vms
            .iter()
            .flat_map(|vm| vm.volumes.iter().map(|v| v.path.clone()))
            .collect();
        if let Some(v) = a
            .vms
            .iter()
            .flat_map(|vm| &vm.volumes)
            .find(|v| !serving.contains(&v.path))
        {
            return Err(DomainError::precondition(format!(
                "vpg {}: {} is not a volume recovered here",
                a.vpg,
                v.path.display()
            ))
            .into());
        }
        Ok(())
    }

    fn powered_off(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<VpgId>> {
        self.inner
            .powered_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Powers a protected VPG's VMs off (their volumes' exports close once the requests in
    /// flight are answered; replication goes on) or on again. Persisted.
    pub async fn set_vm_power(&self, vpg: &VpgId, on: bool) -> VraResult<()> {
        let vpgs = self.inner.vpgs.lock().await;
        let p = protected_in(&vpgs, vpg)?;
        if on {
            for (name, vol) in p.volumes() {
                let device: Arc<dyn BlockDevice> = vol.clone();
                match self.inner.exports.insert(name.clone(), device) {
                    Ok(()) | Err(tandem_nbd::NbdError::ExportExists(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.powered_off().remove(vpg);
        } else {
            self.powered_off().insert(vpg.clone());
            self.remove_protected_exports(&p);
        }
        self.persist(&vpgs).await?;
        info!(vpg = %vpg, on, "vms powered");
        Ok(())
    }

    fn remove_recovered_exports(&self, r: &RecoveredVpg) {
        for (name, _) in r.volumes() {
            self.inner.exports.remove(name);
        }
    }

    fn remove_protected_exports(&self, p: &ProtectedVpg) {
        for (name, _) in p.volumes() {
            self.inner.exports.remove(name);
        }
    }

    fn remove_pit_exports(&self, vpg: &VpgId) {
        let mut pits = self
            .inner
            .pits
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pits.retain(|name, v| {
            if v == vpg {
                self.inner.exports.remove(name);
                false
            } else {
                true
            }
        });
    }

    /// Takes the recovery role for a VPG (or replaces it at a newer generation; with
    /// `remove_dropped`, the data of VMs the new generation no longer has is removed, except
    /// for the VMs it lists).
    pub async fn assign_recovery(
        &self,
        a: RecoveryAssignment,
        remove_dropped: Option<Vec<String>>,
    ) -> VraResult<()> {
        let mut vpgs = self.inner.vpgs.lock().await;
        let mut dropped = None;
        let mut dropped_volumes: Vec<PathBuf> = Vec::new();
        // A datastore that is not there is not created (it would land on the root file
        // system of an unmounted datastore); what runs keeps running.
        let missing = a
            .vms
            .iter()
            .filter_map(|vm| vm.datastore.as_ref())
            .find(|ds| !ds.is_dir())
            .map(|ds| VraError::DatastoreMissing(ds.clone()));
        if let Some(Role::Protected(p)) = vpgs.get(&a.vpg)
            && p.assignment().generation < a.generation
            && missing.is_none()
        {
            // Turned around (reverse protection): this VRA's VMs run at the other site now,
            // and their disks here become the recovery disks. Its volumes go first.
            let p = p.clone();
            self.remove_protected_exports(&p);
            p.stop(false).await;
            self.powered_off().remove(&a.vpg);
            vpgs.remove(&a.vpg);
            info!(vpg = %a.vpg, generation = a.generation.0, "protected role replaced by the recovery role");
        }
        if let Some(Role::StoodDown(d)) = vpgs.get(&a.vpg)
            && d.record().assignment.generation < a.generation
            && missing.is_none()
        {
            // Stood down, then turned around: what it kept here is overwritten by the
            // delta sync of the new direction.
            let d = d.clone();
            d.remove_files(&self.inner.settings.data_dir)?;
            self.powered_off().remove(&a.vpg);
            vpgs.remove(&a.vpg);
            info!(vpg = %a.vpg, generation = a.generation.0, "stood-down role replaced by the recovery role");
        }
        if let Some(role) = vpgs.get(&a.vpg) {
            let Role::Recovery(r) = role else {
                return Err(VraError::WrongRole {
                    vpg: a.vpg.clone(),
                    role: role.name(),
                });
            };
            Self::check_generation(&a.vpg, r.assignment().generation, a.generation)?;
            if r.assignment() == &a {
                return Ok(());
            }
            if r.assignment().generation == a.generation {
                return Err(DomainError::precondition(format!(
                    "vpg {} is assigned differently at generation {}; bump the generation",
                    a.vpg, a.generation
                ))
                .into());
            }
            if let Some(e) = missing {
                return Err(e);
            }
            let old = r.clone();
            self.remove_pit_exports(&a.vpg);
            old.stop().await;
            vpgs.remove(&a.vpg);
            if let Some(kept) = &remove_dropped {
                let mut gone = old.assignment().clone();
                // Volumes a staying VM lost: their replicas would be stale copies.
                dropped_volumes = gone
                    .vms
                    .iter()
                    .filter_map(|vm| Some((vm, a.vms.iter().find(|n| n.vm == vm.vm)?)))
                    .flat_map(|(vm, now)| {
                        vm.volumes
                            .iter()
                            .filter(|v| now.volumes.iter().all(|n| n.id != v.id))
                            .map(|v| v.path.clone())
                    })
                    .collect();
                gone.vms.retain(|vm| {
                    a.vms.iter().all(|n| n.vm != vm.vm) && !kept.iter().any(|k| k == vm.vm.as_str())
                });
                dropped = (!gone.vms.is_empty()).then_some(gone);
            }
        } else if let Some(e) = missing {
            return Err(e);
        }
        if let Some(gone) = &dropped {
            remove_recovery_data_of(gone)?;
        }
        for path in &dropped_volumes {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    info!(vpg = %a.vpg, path = %path.display(), "replica of a removed volume removed")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VraError::io("remove replica", path)(e)),
            }
        }
        let (vpg, generation) = (a.vpg.clone(), a.generation.0);
        self.start_recovery_role(&mut vpgs, a).await?;
        info!(vpg = %vpg, generation, "assigned recovery role");
        Ok(())
    }

    fn vpg_dir(&self, vpg: &VpgId) -> PathBuf {
        self.inner.settings.data_dir.join("vpgs").join(vpg.as_str())
    }

    /// Drops the VPG's role (files stay on disk).
    /// Drops the VPG's role; with `remove_recovery_data`, a recovery role's journals and
    /// replica disks go too.
    pub async fn unassign(&self, vpg: &VpgId, remove_recovery_data: bool) -> VraResult<()> {
        let mut vpgs = self.inner.vpgs.lock().await;
        let role = vpgs
            .remove(vpg)
            .ok_or_else(|| VraError::VpgNotFound(vpg.clone()))?;
        match &role {
            Role::Protected(p) => {
                self.remove_protected_exports(p);
                p.stop(false).await;
                self.powered_off().remove(vpg);
            }
            Role::Recovery(r) => {
                self.remove_pit_exports(vpg);
                r.stop().await;
            }
            Role::Recovered(r) => {
                self.remove_recovered_exports(r);
                r.stop().await;
            }
            Role::StoodDown(d) => {
                d.remove_files(&self.inner.settings.data_dir)?;
                self.powered_off().remove(vpg);
            }
        }
        self.persist(&vpgs).await?;
        if remove_recovery_data && let Role::Recovery(r) = &role {
            remove_recovery_data_of(r.assignment())?;
        }
        if let Role::Recovered(r) = &role {
            let record = r.record();
            recovered::remove_state(&self.vpg_dir(vpg))?;
            // Once committed the replicas are the recovered VMs' own disks: never removed.
            if remove_recovery_data && record.phase == RecoveredPhase::BeforeCommit {
                remove_recovery_data_of(&record.assignment)?;
            }
        }
        info!(vpg = %vpg, remove_recovery_data, "unassigned");
        Ok(())
    }

    async fn role(&self, vpg: &VpgId) -> VraResult<Role> {
        self.inner
            .vpgs
            .lock()
            .await
            .get(vpg)
            .cloned()
            .ok_or_else(|| VraError::VpgNotFound(vpg.clone()))
    }

    async fn protected(&self, vpg: &VpgId) -> VraResult<Arc<ProtectedVpg>> {
        protected_in(&*self.inner.vpgs.lock().await, vpg)
    }

    /// The recovery role of a VPG (not found, or the wrong role, as an error).
    pub async fn recovery(&self, vpg: &VpgId) -> VraResult<Arc<RecoveryVpg>> {
        match self.role(vpg).await? {
            Role::Recovery(r) => Ok(r),
            other => Err(VraError::WrongRole {
                vpg: vpg.clone(),
                role: other.name(),
            }),
        }
    }

    /// The bandwidth limiter of the pair with `site` (created unlimited).
    fn limiter(&self, site: &str) -> Limiter {
        self.inner
            .limiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(site.to_string())
            .or_insert_with(|| Limiter::start(0, self.inner.cancel.clone()))
            .clone()
    }

    /// Limits the replication bandwidth towards `site` (0: no limit).
    pub async fn set_bandwidth_limit(&self, site: &str, bytes_per_sec: u64) {
        self.limiter(site).set_rate(bytes_per_sec).await;
        info!(peer_site = site, bytes_per_sec, "bandwidth limit set");
    }

    /// Pauses protection of a VPG (its writes are tracked for a bitmap sync).
    pub async fn pause(&self, vpg: &VpgId) -> VraResult<()> {
        self.protected(vpg).await?.pause();
        Ok(())
    }

    /// Resumes protection of a VPG; a bitmap sync follows.
    pub async fn resume(&self, vpg: &VpgId) -> VraResult<()> {
        self.protected(vpg).await?.resume();
        Ok(())
    }

    /// Delta sync of a VPG, or of one of its volumes.
    pub async fn force_sync(&self, vpg: &VpgId, volume: Option<(VmId, VolumeId)>) -> VraResult<()> {
        self.protected(vpg)
            .await?
            .force_sync(volume.as_ref().map(|(vm, v)| (vm, *v)))
    }

    /// Checkpoint barrier: freeze.
    pub async fn freeze(&self, vpg: &VpgId, id: CheckpointId) -> VraResult<()> {
        self.protected(vpg).await?.freeze(id).await
    }

    /// Checkpoint barrier: thaw with the marker; returns its stream sequence.
    pub async fn thaw(&self, vpg: &VpgId, checkpoint: Checkpoint) -> VraResult<Seq> {
        self.protected(vpg).await?.thaw(checkpoint).await
    }

    /// Protected role: waits until the stream is durable up to `seq` (at most `timeout`).
    pub async fn wait_durable(
        &self,
        vpg: &VpgId,
        seq: u64,
        timeout: std::time::Duration,
    ) -> VraResult<u64> {
        Ok(self.protected(vpg).await?.wait_durable(seq, timeout).await)
    }

    /// Checkpoint barrier: abort.
    pub async fn abort(&self, vpg: &VpgId, id: CheckpointId) -> VraResult<()> {
        self.protected(vpg).await?.abort(id).await
    }

    /// The checkpoints of a recovery VPG.
    pub async fn checkpoints(&self, vpg: &VpgId) -> VraResult<Vec<VpgCheckpoint>> {
        self.recovery(vpg).await?.checkpoints().await
    }

    /// Serves a point-in-time image over NBD; returns its export.
    pub async fn open_export(
        &self,
        vpg: &VpgId,
        vm: &VmId,
        volume: VolumeId,
        checkpoint: CheckpointId,
        writable: bool,
    ) -> VraResult<OpenedExport> {
        let r = self.recovery(vpg).await?;
        let mut name = format!("pit/{vpg}/{vm}/{volume}/{checkpoint}");
        if writable {
            name.push_str("/rw");
        }
        if let Some(device) = self.inner.exports.device(&name) {
            return Ok(OpenedExport {
                name,
                size: device.size(),
                writable,
            });
        }
        let image = r.open_image(vm, volume, checkpoint, writable).await?;
        let size = image.size();
        self.inner.exports.insert(name.clone(), Arc::new(image))?;
        self.inner
            .pits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone(), vpg.clone());
        info!(export = %name, "point-in-time export opened");
        Ok(OpenedExport {
            name,
            size,
            writable,
        })
    }

    /// Closes a point-in-time export.
    pub fn close_export(&self, name: &str) -> VraResult<()> {
        let removed = self
            .inner
            .pits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        if removed.is_none() {
            return Err(DomainError::not_found("point-in-time export", name).into());
        }
        self.inner.exports.remove(name);
        Ok(())
    }

    /// Accepts a replication sender for a recovery VPG.
    pub async fn replicate_hello(
        &self,
        vpg: &VpgId,
        generation: Generation,
    ) -> VraResult<(Arc<RecoveryVpg>, SessionId, Seq, Seq, watch::Receiver<Seq>)> {
        let r = self.recovery(vpg).await?;
        let (session, resume, held, acked) = r.hello(generation).await?;
        Ok((r, session, resume, held, acked))
    }

    /// Stops every VPG (assignments stay persisted for the next start).
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        let vpgs: Vec<Role> = std::mem::take(&mut *self.inner.vpgs.lock().await)
            .into_values()
            .collect();
        for role in vpgs {
            match role {
                // A clean stop keeps the dirty map: the restart does a bitmap sync.
                Role::Protected(p) => drop(p.stop(true).await),
                Role::Recovery(r) => r.stop().await,
                Role::Recovered(r) => r.stop().await,
                // Its map is on disk already.
                Role::StoodDown(_) => {}
            }
        }
    }
}

/// The protected role of `vpg` in `vpgs` (not found, or the wrong role, as an error).
fn protected_in(vpgs: &BTreeMap<VpgId, Role>, vpg: &VpgId) -> VraResult<Arc<ProtectedVpg>> {
    match vpgs.get(vpg) {
        Some(Role::Protected(p)) => Ok(p.clone()),
        Some(other) => Err(VraError::WrongRole {
            vpg: vpg.clone(),
            role: other.name(),
        }),
        None => Err(VraError::VpgNotFound(vpg.clone())),
    }
}

/// Removes the journals and replica disks of a stopped recovery role; what is already gone
/// is fine (a repeated unassign).
fn remove_recovery_data_of(a: &RecoveryAssignment) -> VraResult<()> {
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    for vm in &a.vms {
        gone(std::fs::remove_dir_all(&vm.journal_dir))
            .map_err(VraError::io("remove journal", &vm.journal_dir))?;
        for v in &vm.volumes {
            gone(std::fs::remove_file(&v.path)).map_err(VraError::io("remove replica", &v.path))?;
        }
        // The VM's and then the VPG's directory, once empty (the planner's layout); a
        // directory that holds anything else stays.
        let vm_dir = vm.journal_dir.parent();
        for dir in [vm_dir, vm_dir.and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_dir(dir);
        }
    }
    info!(vpg = %a.vpg, "recovery data removed");
    Ok(())
}
