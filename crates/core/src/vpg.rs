//! VPG definitions: settings, per-VM recovery placement, and the rules a definition must
//! satisfy at the protected site and at the recovery site.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Violations};
use crate::ids::{DatastoreId, HostId, PoolId, SiteId, VmId, VpgId, check_name};
use crate::inventory::{
    MAX_SCSI_CONTROLLERS, MAX_UNITS_PER_CONTROLLER, MAX_VOLUME_BYTES, SECTOR, Vm, check_disk_path,
};

/// Volumes per VM: every (controller, unit).
const MAX_VOLUMES_PER_VM: usize = MAX_SCSI_CONTROLLERS as usize * MAX_UNITS_PER_CONTROLLER as usize;
use crate::status::Operation;

/// Journal history bounds: 1 hour to 30 days.
pub const MIN_JOURNAL_HISTORY_SECS: u64 = 3600;
pub const MAX_JOURNAL_HISTORY_SECS: u64 = 30 * 24 * 3600;
/// Target RPO alert bounds: 10 seconds to 1 day.
pub const MIN_TARGET_RPO_SECS: u64 = 10;
pub const MAX_TARGET_RPO_SECS: u64 = 24 * 3600;
/// At most this many VMs in one VPG.
pub const MAX_VMS_PER_VPG: usize = 256;
/// Automatic checkpoint interval: 1 second to 1 hour, 5 seconds by default.
pub const MIN_CHECKPOINT_INTERVAL_SECS: u64 = 1;
pub const MAX_CHECKPOINT_INTERVAL_SECS: u64 = 3600;
pub const DEFAULT_CHECKPOINT_INTERVAL_SECS: u64 = 5;

fn default_checkpoint_interval() -> u64 {
    DEFAULT_CHECKPOINT_INTERVAL_SECS
}

/// Replication priority; under WAN pressure lower priorities fall back to bitmap sync first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Priority {
    Low,
    Medium,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "Low",
            Priority::Medium => "Medium",
            Priority::High => "High",
        }
    }
}

/// A journal size limit, absolute or as a percentage of the VM's provisioned storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalLimit {
    Unlimited,
    Bytes(u64),
    Percent(u8),
}

impl JournalLimit {
    /// The limit in bytes for a VM of the given provisioned size; `None` when unlimited.
    pub fn resolve(self, provisioned_bytes: u64) -> Option<u64> {
        match self {
            JournalLimit::Unlimited => None,
            JournalLimit::Bytes(b) => Some(b),
            JournalLimit::Percent(p) => Some(provisioned_bytes / 100 * u64::from(p)),
        }
    }

    fn check(self, field: &str, v: &mut Violations) {
        match self {
            JournalLimit::Bytes(b) => v.check(b >= 1 << 30, field, "must be at least 1 GiB"),
            JournalLimit::Percent(p) => {
                v.check((1..=100).contains(&p), field, "percent must be 1..100")
            }
            JournalLimit::Unlimited => {}
        }
    }
}

/// Defaults used when reverse protection is set up after a failover or move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReverseProtection {
    /// Whether committing a failover or move starts reverse protection by default.
    pub enabled: bool,
    /// Use the original protected disks as preseeded targets (delta sync only).
    pub use_original_disks: bool,
    /// The resource pool at the protected site that its VMs take once they are protected
    /// back towards it; without one, reverse protection waits (Needs Configuration).
    #[serde(default)]
    pub pool: Option<PoolId>,
}

/// The SLA and replication settings of a VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpgSettings {
    pub priority: Priority,
    pub target_rpo_secs: u64,
    pub journal_history_secs: u64,
    pub journal_hard_limit: JournalLimit,
    pub journal_warning: JournalLimit,
    /// How long replication may pause when the journal cannot hold ten minutes of checkpoints.
    pub replication_pause_secs: u64,
    /// Months between failover-test reminders; 0 turns the reminder off.
    pub test_reminder_months: u32,
    pub wan_compression: bool,
    pub reverse: ReverseProtection,
    /// Seconds between automatic checkpoints.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_secs: u64,
}

impl Default for VpgSettings {
    fn default() -> Self {
        Self {
            priority: Priority::Medium,
            target_rpo_secs: 300,
            journal_history_secs: 4 * 3600,
            journal_hard_limit: JournalLimit::Unlimited,
            journal_warning: JournalLimit::Unlimited,
            replication_pause_secs: 0,
            test_reminder_months: 6,
            wan_compression: true,
            reverse: ReverseProtection::default(),
            checkpoint_interval_secs: DEFAULT_CHECKPOINT_INTERVAL_SECS,
        }
    }
}

impl VpgSettings {
    pub fn validate(&self, v: &mut Violations) {
        v.check(
            (MIN_TARGET_RPO_SECS..=MAX_TARGET_RPO_SECS).contains(&self.target_rpo_secs),
            "settings.target_rpo_secs",
            format!("must be {MIN_TARGET_RPO_SECS}..{MAX_TARGET_RPO_SECS} seconds"),
        );
        v.check(
            (MIN_JOURNAL_HISTORY_SECS..=MAX_JOURNAL_HISTORY_SECS)
                .contains(&self.journal_history_secs),
            "settings.journal_history_secs",
            "must be from 1 hour (3600) to 30 days (2592000)",
        );
        self.journal_hard_limit
            .check("settings.journal_hard_limit", v);
        self.journal_warning.check("settings.journal_warning", v);
        let below = match (self.journal_warning, self.journal_hard_limit) {
            (_, JournalLimit::Unlimited) => true,
            (JournalLimit::Unlimited, _) => false,
            (JournalLimit::Bytes(w), JournalLimit::Bytes(h)) => w < h,
            (JournalLimit::Percent(w), JournalLimit::Percent(h)) => w < h,
            // Mixed units are compared per VM, once sizes are known.
            _ => true,
        };
        v.check(
            below,
            "settings.journal_warning",
            "warning threshold must be below the hard limit",
        );
        v.check(
            self.replication_pause_secs <= 24 * 3600,
            "settings.replication_pause_secs",
            "must be at most one day",
        );
        v.check(
            self.test_reminder_months <= 12,
            "settings.test_reminder_months",
            "must be 0..12",
        );
        v.check(
            (MIN_CHECKPOINT_INTERVAL_SECS..=MAX_CHECKPOINT_INTERVAL_SECS)
                .contains(&self.checkpoint_interval_secs),
            "settings.checkpoint_interval_secs",
            format!(
                "must be {MIN_CHECKPOINT_INTERVAL_SECS}..{MAX_CHECKPOINT_INTERVAL_SECS} seconds"
            ),
        );
    }
}

/// Where and how one VM of the VPG is recovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlacement {
    pub vm_id: VmId,
    pub recovery_host: HostId,
    pub recovery_datastore: DatastoreId,
    pub recovery_pool: PoolId,
    /// In the edit that adds the VM: its recovery disks are already in place (kept when
    /// it left), so its volumes are delta-synced. Cleared once the VM is in the VPG.
    #[serde(default)]
    pub preseeded: bool,
    /// The recovery disks' files by volume id, when they are not the recovery datastore's
    /// usual `<datastore>/<vpg>/<vm>/cXuY.replica`: after reverse protection, the VM's
    /// original disks at the site it was protected at.
    #[serde(default)]
    pub disk_paths: BTreeMap<u32, String>,
}

/// Where a protected VM's disks are at its protected site: what reverse protection uses
/// as the preseeded recovery disks there. The protected site records it in the definition,
/// so the recovery site can reverse the VPG on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSource {
    pub host: HostId,
    /// (controller, unit, datastore, file) of each volume.
    pub volumes: Vec<SourceVolume>,
}

/// One protected volume's place at its site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceVolume {
    pub controller: u8,
    pub unit: u8,
    pub datastore: DatastoreId,
    pub path: String,
}

/// What the recovery site must hold for one VM: copied from the protected inventory into
/// the definition, so the recovery site can check room and later recover on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFootprint {
    pub vm_name: String,
    pub cpu_reservation_mhz: u64,
    pub memory_reservation_mib: u64,
    /// The VM's memory (part of the seed's provisioned storage).
    #[serde(default)]
    pub memory_mib: u64,
    #[serde(default)]
    pub cpus: u32,
    /// (controller, unit, size) of each volume.
    pub volumes: Vec<(u8, u8, u64)>,
    /// Journal limits captured when the VM joined (edits apply to new VMs only).
    pub journal_hard_limit: JournalLimit,
    pub journal_warning: JournalLimit,
}

impl VmFootprint {
    pub fn of(vm: &Vm, settings: &VpgSettings) -> Self {
        Self {
            vm_name: vm.name.clone(),
            cpu_reservation_mhz: vm.cpu_reservation_mhz,
            memory_reservation_mib: vm.memory_reservation_mib,
            memory_mib: vm.memory_mib,
            cpus: vm.cpus,
            volumes: vm
                .volumes
                .iter()
                .map(|v| (v.controller, v.unit, v.size_bytes))
                .collect(),
            journal_hard_limit: settings.journal_hard_limit,
            journal_warning: settings.journal_warning,
        }
    }

    /// The footprint of `vm` as the inventory has it now; journal limits stay as they were
    /// captured when the VM joined (`joined`), since the seed applies edits of them to new
    /// VMs only.
    pub fn refreshed(vm: &Vm, settings: &VpgSettings, joined: Option<&VmFootprint>) -> Self {
        let mut f = Self::of(vm, settings);
        if let Some(j) = joined {
            f.journal_hard_limit = j.journal_hard_limit;
            f.journal_warning = j.journal_warning;
        }
        f
    }

    /// What changed in the volumes from `self` to `now`, for an operator ("volume c0u1
    /// added (8 MiB)"); empty when only other figures changed.
    pub fn volume_changes(&self, now: &VmFootprint) -> Vec<String> {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
        let find = |vols: &[(u8, u8, u64)], c: u8, u: u8| {
            vols.iter().find(|v| v.0 == c && v.1 == u).map(|v| v.2)
        };
        let mut out = Vec::new();
        for &(c, u, size) in &now.volumes {
            match find(&self.volumes, c, u) {
                None => out.push(format!("volume c{c}u{u} added ({})", mib(size))),
                Some(old) if old != size => out.push(format!(
                    "volume c{c}u{u} resized from {} to {}",
                    mib(old),
                    mib(size)
                )),
                Some(_) => {}
            }
        }
        for &(c, u, _) in &self.volumes {
            if find(&now.volumes, c, u).is_none() {
                out.push(format!("volume c{c}u{u} removed"));
            }
        }
        out
    }

    /// Why the inventory may not shrink a protected volume to `vm`'s sizes, if it does: its
    /// replica and journal hold data past the new end.
    pub fn check_no_shrink(&self, vm: &Vm) -> Result<(), crate::DomainError> {
        for v in &vm.volumes {
            if let Some(&(_, _, protected)) = self
                .volumes
                .iter()
                .find(|p| p.0 == v.controller && p.1 == v.unit)
                .filter(|p| p.2 > v.size_bytes)
            {
                return Err(crate::DomainError::precondition(format!(
                    "volume c{}u{} of VM {} is protected at {protected} bytes: a protected \
                     volume can grow, not shrink (remove it from the VM first)",
                    v.controller, v.unit, vm.id
                )));
            }
        }
        Ok(())
    }

    pub fn provisioned_bytes(&self) -> u64 {
        self.volumes.iter().map(|v| v.2).sum()
    }

    /// Room the VM takes on its recovery datastore: replica disks plus the journal's hard
    /// limit (history with no hard limit is budgeted at 100% of the disks).
    pub fn recovery_bytes(&self) -> u64 {
        let disks = self.provisioned_bytes();
        disks.saturating_add(self.journal_hard_limit.resolve(disks).unwrap_or(disks))
    }
}

/// One VM of a VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpgVm {
    pub placement: VmPlacement,
    pub footprint: VmFootprint,
    /// Where its disks are at the protected site (`None` in definitions made before this
    /// was recorded: such a VPG cannot be protected back).
    #[serde(default)]
    pub source: Option<VmSource>,
}

/// What an operator asks for when creating or editing a VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpgSpec {
    pub name: String,
    pub recovery_site: SiteId,
    pub settings: VpgSettings,
    pub vms: Vec<VmPlacement>,
}

impl VpgSpec {
    /// Checks everything that needs no inventory.
    pub fn validate_shape(&self, v: &mut Violations) {
        v.absorb(check_name("name", &self.name));
        self.settings.validate(v);
        v.check(
            self.vms.len() <= MAX_VMS_PER_VPG,
            "vms",
            format!("at most {MAX_VMS_PER_VPG} VMs per VPG"),
        );
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.vms.iter().enumerate() {
            v.check(
                seen.insert(&p.vm_id),
                format!("vms[{i}].vm_id"),
                format!("VM {} is listed twice", p.vm_id),
            );
        }
    }
}

/// A VPG definition as both sites hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vpg {
    pub id: VpgId,
    pub name: String,
    /// Bumped on every change; edits carry the generation they were read at.
    pub generation: u64,
    pub protected_site: SiteId,
    pub recovery_site: SiteId,
    pub settings: VpgSettings,
    pub vms: Vec<VpgVm>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The operation in progress, if any (creation until the first sync completes).
    pub operation: Option<Operation>,
    /// The operator paused protection (kept by the protected site; edits keep it).
    #[serde(default)]
    pub paused: bool,
    /// The site manager paused protection until this time (ms; 0: not paused): a sync
    /// would have left the journal under ten minutes of checkpoints (the seed's
    /// replication pause time). Kept by the protected site; edits keep it.
    #[serde(default)]
    pub manager_paused_until_ms: u64,
    /// While deleting: whether the recovery disks stay at the recovery site.
    #[serde(default)]
    pub keep_recovery_disks: bool,
    /// When the current delete started (0: none).
    #[serde(default)]
    pub delete_started_ms: u64,
    /// The edit that made this generation keeps the recovery disks of the VMs it removed.
    #[serde(default)]
    pub keep_removed_recovery_disks: bool,
    /// VMs removed over the VPG's life whose recovery disks were kept: a recovery VRA that
    /// catches up over several edits at once must not remove them.
    #[serde(default)]
    pub kept_recovery_vms: BTreeSet<VmId>,
    /// The generation at which the VPG's direction last turned (reverse protection after a
    /// failover or move; 0: never). A site that still holds the other direction at a lower
    /// generation takes this definition as it is: it is the new recovery site.
    #[serde(default)]
    pub reversed_at: u64,
}

impl Vpg {
    pub fn vm_ids(&self) -> impl Iterator<Item = &VmId> {
        self.vms.iter().map(|v| &v.placement.vm_id)
    }

    /// Whether the protected VRAs should hold replication now: paused by the operator, or
    /// by the site manager until its pause time is over.
    pub fn pause_wanted(&self, now_ms: u64) -> bool {
        self.paused || self.manager_paused(now_ms)
    }

    /// Whether the site manager's pause holds at `now_ms` (and the operator's does not).
    pub fn manager_paused(&self, now_ms: u64) -> bool {
        !self.paused && now_ms < self.manager_paused_until_ms
    }

    /// Whether a pause of the VRAs is the site manager's: its pause is set and not ended
    /// yet (the VRAs resume a moment after its time is over).
    pub fn paused_by_manager(&self) -> bool {
        !self.paused && self.manager_paused_until_ms != 0
    }

    /// This definition as an operator would send it to edit it.
    pub fn spec(&self) -> VpgSpec {
        VpgSpec {
            name: self.name.clone(),
            recovery_site: self.recovery_site.clone(),
            settings: self.settings.clone(),
            vms: self.vms.iter().map(|m| m.placement.clone()).collect(),
        }
    }

    /// The VMs whose inventory (volumes, memory, reservations) changed since the definition
    /// captured them, each with what changed in its volumes: the seed reflects such changes
    /// in the volumes used for the mirror. A VM missing from the inventory is not drift (the
    /// plans report it).
    pub fn inventory_drift<'a>(
        &self,
        inventory: impl Fn(&VmId) -> Option<&'a Vm>,
    ) -> Vec<(VmId, Vec<String>)> {
        self.vms
            .iter()
            .filter_map(|m| {
                let vm = inventory(&m.placement.vm_id)?;
                let now = VmFootprint::refreshed(vm, &self.settings, Some(&m.footprint));
                (now != m.footprint).then(|| (vm.id.clone(), m.footprint.volume_changes(&now)))
            })
            .collect()
    }

    /// Checks a whole definition that arrived from the peer site exactly as operator input
    /// is checked: every id's shape (ids name directories), names, settings, each VM's
    /// volumes and every file path. The state's own rules (`SiteState::prepare_vpg`) come
    /// after this.
    pub fn validate_received(&self) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.absorb(self.id.check("id"));
        v.absorb(self.protected_site.check("protected_site"));
        v.absorb(self.recovery_site.check("recovery_site"));
        self.spec().validate_shape(&mut v);
        for (i, m) in self.vms.iter().enumerate() {
            let f = |n: &str| format!("vms[{i}].{n}");
            let p = &m.placement;
            v.absorb(p.vm_id.check(&f("vm_id")));
            v.absorb(p.recovery_host.check(&f("recovery_host")));
            v.absorb(p.recovery_datastore.check(&f("recovery_datastore")));
            v.absorb(p.recovery_pool.check(&f("recovery_pool")));
            for (volume, path) in &p.disk_paths {
                v.absorb(check_disk_path(&f(&format!("disk_paths[{volume}]")), path));
            }
            let fp = &m.footprint;
            v.absorb(check_name(&f("footprint.vm_name"), &fp.vm_name));
            v.check(
                fp.volumes.len() <= MAX_VOLUMES_PER_VM,
                f("footprint.volumes"),
                format!("at most {MAX_VOLUMES_PER_VM} volumes"),
            );
            for &(c, u, size) in &fp.volumes {
                v.check(
                    c < MAX_SCSI_CONTROLLERS && u < MAX_UNITS_PER_CONTROLLER,
                    f("footprint.volumes"),
                    format!("controller {c} unit {u} is out of range"),
                );
                v.check(
                    size > 0 && size % SECTOR == 0 && size <= MAX_VOLUME_BYTES,
                    f("footprint.volumes"),
                    format!("volume c{c}u{u}: size {size} is not a positive multiple of 512 up to 64 TiB"),
                );
            }
            if let Some(source) = &m.source {
                v.absorb(source.host.check(&f("source.host")));
                for s in &source.volumes {
                    v.absorb(s.datastore.check(&f("source.volumes.datastore")));
                    v.absorb(check_disk_path(&f("source.volumes.path"), &s.path));
                }
            }
        }
        for vm in &self.kept_recovery_vms {
            v.absorb(vm.check("kept_recovery_vms"));
        }
        v.into_result()
    }

    /// Whether this VPG is between the same two sites as `a` and `b`, in either direction.
    pub fn joins(&self, a: &SiteId, b: &SiteId) -> bool {
        (&self.protected_site == a && &self.recovery_site == b)
            || (&self.protected_site == b && &self.recovery_site == a)
    }
}

/// What a recovery site has already committed to other VPGs, per datastore and pool.
#[derive(Debug, Default)]
pub struct RecoveryCommitments {
    pub datastore_bytes: BTreeMap<DatastoreId, u64>,
    pub pool: BTreeMap<PoolId, (u64, u64, u64)>,
}

impl RecoveryCommitments {
    /// Adds up what `vpgs` (other than `except`) place on this site.
    pub fn of<'a>(vpgs: impl Iterator<Item = &'a Vpg>, site: &SiteId, except: &VpgId) -> Self {
        let mut c = Self::default();
        for vpg in vpgs.filter(|g| &g.recovery_site == site && &g.id != except) {
            for vm in &vpg.vms {
                c.add(vm);
            }
        }
        c
    }

    pub fn add(&mut self, vm: &VpgVm) {
        *self
            .datastore_bytes
            .entry(vm.placement.recovery_datastore.clone())
            .or_default() += vm.footprint.recovery_bytes();
        let p = self
            .pool
            .entry(vm.placement.recovery_pool.clone())
            .or_default();
        p.0 += vm.footprint.cpu_reservation_mhz;
        p.1 += vm.footprint.memory_reservation_mib;
        p.2 += vm.footprint.provisioned_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A definition as a peer would send it: one VM with one volume.
    fn received() -> Vpg {
        Vpg {
            id: VpgId::minted("vpg-1".into()),
            name: "web".into(),
            generation: 3,
            protected_site: SiteId::minted("site-a".into()),
            recovery_site: SiteId::minted("site-b".into()),
            settings: VpgSettings::default(),
            vms: vec![VpgVm {
                placement: VmPlacement {
                    vm_id: VmId::minted("vm-1".into()),
                    recovery_host: HostId::minted("h".into()),
                    recovery_datastore: DatastoreId::minted("d".into()),
                    recovery_pool: PoolId::minted("p".into()),
                    preseeded: false,
                    disk_paths: BTreeMap::from([(0, "/ds/vm-1/c0u0.img".to_string())]),
                },
                footprint: VmFootprint {
                    vm_name: "vm-1".into(),
                    cpu_reservation_mhz: 0,
                    memory_reservation_mib: 0,
                    memory_mib: 1,
                    cpus: 1,
                    volumes: vec![(0, 0, 1 << 20)],
                    journal_hard_limit: JournalLimit::Unlimited,
                    journal_warning: JournalLimit::Unlimited,
                },
                source: None,
            }],
            created_at_ms: 0,
            updated_at_ms: 0,
            operation: None,
            paused: false,
            manager_paused_until_ms: 0,
            keep_recovery_disks: false,
            delete_started_ms: 0,
            keep_removed_recovery_disks: false,
            kept_recovery_vms: BTreeSet::new(),
            reversed_at: 0,
        }
    }

    #[test]
    fn a_received_definition_is_checked_like_operator_input() {
        assert!(received().validate_received().is_ok());
        type Spoil = fn(&mut Vpg);
        let bad: [(&str, Spoil); 5] = [
            ("vms[0].vm_id", |g| {
                g.vms[0].placement.vm_id = VmId::minted("..".into());
            }),
            ("vms[0].disk_paths[0]", |g| {
                g.vms[0]
                    .placement
                    .disk_paths
                    .insert(0, "/ds/../etc/x".into());
            }),
            ("vms[0].footprint.volumes", |g| {
                g.vms[0].footprint.volumes = vec![(9, 0, 1 << 20)];
            }),
            ("vms[0].footprint.volumes", |g| {
                g.vms[0].footprint.volumes = vec![(0, 0, 1000)];
            }),
            ("settings.target_rpo_secs", |g| {
                g.settings.target_rpo_secs = 0
            }),
        ];
        for (field, spoil) in bad {
            let mut g = received();
            spoil(&mut g);
            let err = g.validate_received().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
