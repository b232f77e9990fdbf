//! The reconciler's pure half: what each VRA of a site must be told for a VPG, from the
//! replicated definition and the site's own inventory. A site plans only its own VRAs: the
//! protected site its protected role, the recovery site its recovery role. Planning twice
//! gives the same plan, so the actor that applies plans sends only what differs.
//!
//! One replication stream runs per (VPG, protected VRA, recovery VRA), so within a VPG the
//! VMs of one protected host recover on one host, and a recovery host takes the VMs of one
//! protected host: a "lane". [`lanes`] checks this.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Violations};
use crate::ids::{DatastoreId, HostId, SiteId, VmId, VpgId};
use crate::inventory::{MAX_UNITS_PER_CONTROLLER, Vm, Volume};
use crate::state::SiteState;
use crate::vpg::{Priority, SourceVolume, VmPlacement, VmSource, Vpg, VpgVm};

/// A freeze not thawed within this time aborts itself on the VRA.
pub const FREEZE_TIMEOUT_MS: u32 = 2000;
/// The smallest journal limit a recovery VRA takes: its journal needs two 64 MiB segments.
/// A percentage of a small VM resolves below it and is raised to it.
pub const MIN_JOURNAL_LIMIT_BYTES: u64 = 128 << 20;

/// The VRA's id of a volume within its VM: controller x 15 + unit (0..59).
pub fn volume_id(controller: u8, unit: u8) -> u32 {
    u32::from(controller) * u32::from(MAX_UNITS_PER_CONTROLLER) + u32::from(unit)
}

/// One volume as a VRA serves or replicates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePlan {
    pub volume_id: u32,
    pub size_bytes: u64,
    /// Protected: the VM's raw image; recovery: the replica disk.
    pub path: String,
    /// Protected: the replica is a preseeded copy (a new volume is delta-synced).
    #[serde(default)]
    pub preseeded: bool,
}

/// A VM and its volumes on one VRA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlan {
    pub vm: VmId,
    pub volumes: Vec<VolumePlan>,
    /// Recovery only: the directory of the VM's journal.
    pub journal_dir: String,
    /// Recovery only: the recovery datastore's directory (must exist on the host).
    #[serde(default)]
    pub datastore_path: String,
}

/// "vm: path" of every volume of `vms`, for messages that name disks.
pub fn disk_labels<'a>(vms: impl IntoIterator<Item = &'a VmPlan>) -> Vec<String> {
    vms.into_iter()
        .flat_map(|vm| {
            vm.volumes
                .iter()
                .map(move |v| format!("{}: {}", vm.vm, v.path))
        })
        .collect()
}

/// The protected role of one host for one VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedPlan {
    pub vpg: VpgId,
    pub generation: u64,
    pub host: HostId,
    /// The recovery host its VMs stream to (its address comes from the recovery site).
    pub recovery_host: HostId,
    pub recovery_site: SiteId,
    pub vms: Vec<VmPlan>,
    pub wan_compression: bool,
    pub priority: Priority,
    pub freeze_timeout_ms: u32,
}

/// The recovery role of one host for one VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPlan {
    pub vpg: VpgId,
    pub generation: u64,
    /// The site whose VRAs stream into this VPG's journals.
    pub protected_site: crate::ids::SiteId,
    pub host: HostId,
    pub vms: Vec<VmPlan>,
    pub journal_history_secs: u64,
    /// Per VM journal; 0: none.
    pub journal_warning_bytes: u64,
    pub journal_hard_limit_bytes: u64,
    /// VMs an older generation had and this one has not lose their recovery data, except
    /// those in `kept_vms`.
    pub remove_dropped_vm_data: bool,
    pub kept_vms: Vec<VmId>,
}

/// The protected host of each VM of `vpg`, from the protected site's inventory.
fn protected_host_of<'a>(
    vpg: &'a Vpg,
    site: &'a SiteState,
) -> Vec<(&'a VpgVm, Option<&'a HostId>)> {
    vpg.vms
        .iter()
        .map(|m| (m, site.vms.get(&m.placement.vm_id).map(|vm| &vm.host_id)))
        .collect()
}

/// Checks that each protected host of the VPG streams to one recovery host and each
/// recovery host receives from one protected host; answers the lanes (protected host ->
/// recovery host). Needs the protected site's inventory.
pub fn lanes(vpg: &Vpg, site: &SiteState) -> Result<BTreeMap<HostId, HostId>, DomainError> {
    let mut lanes: BTreeMap<HostId, HostId> = BTreeMap::new();
    let mut senders: BTreeMap<&HostId, &HostId> = BTreeMap::new();
    let mut v = Violations::new();
    for (i, (m, host)) in protected_host_of(vpg, site).into_iter().enumerate() {
        let field = format!("vms[{i}].recovery_host_id");
        let Some(host) = host else {
            v.add(
                format!("vms[{i}].vm_id"),
                format!("VM {} does not exist", m.placement.vm_id),
            );
            continue;
        };
        let target = &m.placement.recovery_host;
        match lanes.get(host) {
            Some(t) if t != target => v.add(
                field,
                format!(
                    "VMs of host {host} recover to {t} already: the VMs of a VPG on one \
                     protected host recover on one host (one replication stream per host pair)"
                ),
            ),
            Some(_) => {}
            None => match senders.get(target) {
                Some(other) if *other != host => v.add(
                    field,
                    format!(
                        "recovery host {target} already takes the VMs of host {other}: a \
                         recovery host takes the VMs of one protected host per VPG"
                    ),
                ),
                _ => {
                    lanes.insert(host.clone(), target.clone());
                    senders.insert(target, host);
                }
            },
        }
    }
    v.into_result()?;
    Ok(lanes)
}

/// The protected role for each of this (protected) site's hosts that runs VMs of `vpg`.
pub fn protected_plans(vpg: &Vpg, site: &SiteState) -> Result<Vec<ProtectedPlan>, DomainError> {
    let lanes = lanes(vpg, site)?;
    let mut by_host: BTreeMap<&HostId, Vec<VmPlan>> = BTreeMap::new();
    for m in &vpg.vms {
        let id = &m.placement.vm_id;
        let vm = site
            .vms
            .get(id)
            .ok_or_else(|| DomainError::not_found(VmId::KIND, id))?;
        let mut volumes = Vec::with_capacity(m.footprint.volumes.len());
        for &(controller, unit, size_bytes) in &m.footprint.volumes {
            let vol = vm
                .volumes
                .iter()
                .find(|v| v.controller == controller && v.unit == unit)
                .ok_or_else(|| {
                    DomainError::precondition(format!(
                        "VM {id} has no volume at controller {controller} unit {unit} any more"
                    ))
                })?;
            volumes.push(VolumePlan {
                volume_id: volume_id(controller, unit),
                size_bytes,
                path: disk_path(site, vm, vol)?,
                preseeded: m.placement.preseeded,
            });
        }
        by_host.entry(&vm.host_id).or_default().push(VmPlan {
            vm: id.clone(),
            volumes,
            journal_dir: String::new(),
            datastore_path: String::new(),
        });
    }
    Ok(by_host
        .into_iter()
        .map(|(host, vms)| ProtectedPlan {
            vpg: vpg.id.clone(),
            generation: vpg.generation,
            host: host.clone(),
            recovery_host: lanes[host].clone(),
            recovery_site: vpg.recovery_site.clone(),
            vms,
            wan_compression: vpg.settings.wan_compression,
            priority: vpg.settings.priority,
            freeze_timeout_ms: FREEZE_TIMEOUT_MS,
        })
        .collect())
}

/// The file of a protected VM's volume: where the inventory says, else the datastore's
/// usual `<datastore>/<vm>/cXuY.img`.
pub fn disk_path(site: &SiteState, vm: &Vm, vol: &Volume) -> Result<String, DomainError> {
    if let Some(path) = &vol.path {
        return Ok(path.clone());
    }
    let ds = site
        .datastores
        .get(&vol.datastore_id)
        .ok_or_else(|| DomainError::not_found(DatastoreId::KIND, &vol.datastore_id))?;
    Ok(format!(
        "{}/{}/c{}u{}.img",
        ds.path.trim_end_matches('/'),
        vm.id,
        vol.controller,
        vol.unit
    ))
}

/// Where a VM's disks are at this (its protected) site, for its definition.
pub fn vm_source(site: &SiteState, vm: &Vm) -> Result<VmSource, DomainError> {
    let volumes = vm
        .volumes
        .iter()
        .map(|vol| {
            Ok(SourceVolume {
                controller: vol.controller,
                unit: vol.unit,
                datastore: vol.datastore_id.clone(),
                path: disk_path(site, vm, vol)?,
            })
        })
        .collect::<Result<_, DomainError>>()?;
    Ok(VmSource {
        host: vm.host_id.clone(),
        volumes,
    })
}

/// The recovery disk of one volume of a VM: the placement's own file for it (after reverse
/// protection, the VM's original disk), else `<vm dir>/cXuY.replica`.
pub fn replica_path(vm_dir: &str, placement: &VmPlacement, controller: u8, unit: u8) -> String {
    placement
        .disk_paths
        .get(&volume_id(controller, unit))
        .cloned()
        .unwrap_or_else(|| format!("{vm_dir}/c{controller}u{unit}.replica"))
}

/// Where a recovery VM's files live in its datastore: `<ds>/<vpg>/<vm>/`.
pub fn recovery_vm_dir(datastore_path: &str, vpg: &VpgId, vm: &VmId) -> String {
    format!("{}/{vpg}/{vm}", datastore_path.trim_end_matches('/'))
}

/// The recovery role for each of this (recovery) site's hosts that VMs of `vpg` recover on.
pub fn recovery_plans(vpg: &Vpg, site: &SiteState) -> Result<Vec<RecoveryPlan>, DomainError> {
    let mut by_host: BTreeMap<&HostId, (Vec<VmPlan>, u64, u64)> = BTreeMap::new();
    for m in &vpg.vms {
        let p = &m.placement;
        let ds = site.datastores.get(&p.recovery_datastore).ok_or_else(|| {
            DomainError::not_found(crate::ids::DatastoreId::KIND, &p.recovery_datastore)
        })?;
        let dir = recovery_vm_dir(&ds.path, &vpg.id, &p.vm_id);
        let volumes = m
            .footprint
            .volumes
            .iter()
            .map(|&(controller, unit, size_bytes)| VolumePlan {
                volume_id: volume_id(controller, unit),
                size_bytes,
                path: replica_path(&dir, p, controller, unit),
                preseeded: false,
            })
            .collect();
        let disks = m.footprint.provisioned_bytes();
        let entry = by_host.entry(&p.recovery_host).or_default();
        entry.0.push(VmPlan {
            vm: p.vm_id.clone(),
            volumes,
            journal_dir: format!("{dir}/journal"),
            datastore_path: ds.path.clone(),
        });
        // The VRA takes one limit per VPG: the largest of its VMs' (a VM's own limits were
        // captured when it joined; a smaller one is not enforced separately).
        entry.1 = entry
            .1
            .max(m.footprint.journal_warning.resolve(disks).unwrap_or(0));
        entry.2 = entry
            .2
            .max(m.footprint.journal_hard_limit.resolve(disks).unwrap_or(0));
    }
    Ok(by_host
        .into_iter()
        .map(|(host, (vms, warning, hard))| {
            let floor = |b: u64| {
                if b == 0 {
                    0
                } else {
                    b.max(MIN_JOURNAL_LIMIT_BYTES)
                }
            };
            let hard = floor(hard);
            // Raised to the floor, a warning may reach the hard limit: it stays below it.
            let warning = match floor(warning) {
                w if hard > 0 && w >= hard => hard - hard / 10,
                w => w,
            };
            (host, vms, warning, hard)
        })
        .map(|(host, vms, warning, hard)| RecoveryPlan {
            vpg: vpg.id.clone(),
            generation: vpg.generation,
            protected_site: vpg.protected_site.clone(),
            host: host.clone(),
            vms,
            journal_history_secs: vpg.settings.journal_history_secs,
            journal_warning_bytes: warning,
            journal_hard_limit_bytes: hard,
            remove_dropped_vm_data: true,
            kept_vms: vpg.kept_recovery_vms.iter().cloned().collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DatastoreId, PoolId};
    use crate::inventory::{Datastore, Host, PowerState, Vm, Volume};
    use crate::vpg::{JournalLimit, VmFootprint, VmPlacement, VpgSettings};

    fn id<T>(f: fn(String) -> T, s: &str) -> T {
        f(s.to_string())
    }

    /// A protected site with hosts p1, p2 and VMs vm0..vm3 (vm i on p(i%2+1)), and the VPG
    /// placing vm i on recovery host r(i%2+1).
    fn fixture() -> (SiteState, Vpg) {
        let mut s = SiteState::default();
        for h in ["p1", "p2"] {
            s.hosts.insert(
                id(HostId::minted, h),
                Host {
                    id: id(HostId::minted, h),
                    name: h.into(),
                    vra_address: "127.0.0.1:1".into(),
                    peer_vra_address: String::new(),
                },
            );
            s.datastores.insert(
                id(DatastoreId::minted, &format!("ds-{h}")),
                Datastore {
                    id: id(DatastoreId::minted, &format!("ds-{h}")),
                    name: format!("ds-{h}"),
                    host_id: id(HostId::minted, h),
                    path: format!("/data/{h}/"),
                    capacity_bytes: 1 << 40,
                },
            );
        }
        let mut vms = Vec::new();
        for i in 0..4 {
            let h = format!("p{}", i % 2 + 1);
            let vm = Vm {
                id: id(VmId::minted, &format!("vm{i}")),
                name: format!("vm{i}"),
                host_id: id(HostId::minted, &h),
                power: PowerState::On,
                memory_mib: 1024,
                cpus: 1,
                cpu_reservation_mhz: 0,
                memory_reservation_mib: 0,
                volumes: vec![
                    Volume {
                        path: None,
                        controller: 0,
                        unit: 0,
                        size_bytes: 1 << 20,
                        datastore_id: id(DatastoreId::minted, &format!("ds-{h}")),
                    },
                    Volume {
                        path: None,
                        controller: 1,
                        unit: 2,
                        size_bytes: 2 << 20,
                        datastore_id: id(DatastoreId::minted, &format!("ds-{h}")),
                    },
                ],
            };
            let settings = VpgSettings::default();
            vms.push(VpgVm {
                source: None,
                placement: VmPlacement {
                    disk_paths: Default::default(),
                    vm_id: vm.id.clone(),
                    recovery_host: id(HostId::minted, &format!("r{}", i % 2 + 1)),
                    recovery_datastore: id(DatastoreId::minted, &format!("ds-r{}", i % 2 + 1)),
                    recovery_pool: id(PoolId::minted, "pool"),
                    preseeded: false,
                },
                footprint: VmFootprint::of(&vm, &settings),
            });
            s.vms.insert(vm.id.clone(), vm);
        }
        let vpg = Vpg {
            reversed_at: 0,
            id: id(VpgId::minted, "g"),
            name: "g".into(),
            generation: 3,
            protected_site: id(SiteId::minted, "a"),
            recovery_site: id(SiteId::minted, "b"),
            settings: VpgSettings::default(),
            vms,
            created_at_ms: 0,
            updated_at_ms: 0,
            operation: None,
            paused: false,
            keep_recovery_disks: false,
            delete_started_ms: 0,
            keep_removed_recovery_disks: false,
            kept_recovery_vms: Default::default(),
            manager_paused_until_ms: 0,
        };
        (s, vpg)
    }

    #[test]
    fn protected_plans_group_vms_by_host_with_their_lane() {
        let (s, vpg) = fixture();
        let plans = protected_plans(&vpg, &s).unwrap();
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].host.as_str(), "p1");
        assert_eq!(plans[0].recovery_host.as_str(), "r1");
        assert_eq!(plans[0].generation, 3);
        let vms: Vec<&str> = plans[0].vms.iter().map(|v| v.vm.as_str()).collect();
        assert_eq!(vms, ["vm0", "vm2"]);
        let vol = &plans[0].vms[0].volumes[1];
        assert_eq!(vol.volume_id, 17);
        assert_eq!(vol.size_bytes, 2 << 20);
        assert_eq!(vol.path, "/data/p1/vm0/c1u2.img");
        // Planning is a function of its inputs.
        assert_eq!(plans, protected_plans(&vpg, &s).unwrap());
    }

    #[test]
    fn a_host_that_splits_its_vms_over_two_recovery_hosts_is_refused() {
        let (s, mut vpg) = fixture();
        vpg.vms[2].placement.recovery_host = HostId::minted("r2".into());
        let err = protected_plans(&vpg, &s).unwrap_err().to_string();
        assert!(err.contains("recover on one host"), "{err}");
        let (s, mut vpg) = fixture();
        // vm1 (on p2) and vm0 (on p1) both to r1.
        vpg.vms[1].placement.recovery_host = HostId::minted("r1".into());
        vpg.vms[3].placement.recovery_host = HostId::minted("r1".into());
        let err = lanes(&vpg, &s).unwrap_err().to_string();
        assert!(err.contains("takes the VMs of one protected host"), "{err}");
    }

    #[test]
    fn a_vm_that_lost_a_volume_cannot_be_planned() {
        let (mut s, vpg) = fixture();
        s.vms
            .get_mut(&VmId::minted("vm0".into()))
            .unwrap()
            .volumes
            .pop();
        let err = protected_plans(&vpg, &s).unwrap_err().to_string();
        assert!(err.contains("controller 1 unit 2"), "{err}");
    }

    #[test]
    fn inventory_drift_names_added_grown_and_removed_volumes_and_keeps_journal_limits() {
        let (mut s, mut vpg) = fixture();
        let lookup = |s: &SiteState, vpg: &Vpg| vpg.inventory_drift(|id| s.vms.get(id));
        assert!(
            lookup(&s, &vpg).is_empty(),
            "a fresh definition has no drift"
        );
        // Journal limits edited after vm0 joined are not drift: they apply to new VMs only.
        vpg.settings.journal_hard_limit = JournalLimit::Bytes(1 << 30);
        assert!(lookup(&s, &vpg).is_empty());

        let vm0 = s.vms.get_mut(&VmId::minted("vm0".into())).unwrap();
        vm0.volumes[0].size_bytes = 3 << 20;
        vm0.volumes.remove(1);
        let ds = vm0.volumes[0].datastore_id.clone();
        vm0.volumes.push(Volume {
            path: None,
            controller: 2,
            unit: 5,
            size_bytes: 1 << 20,
            datastore_id: ds,
        });
        let drift = lookup(&s, &vpg);
        assert_eq!(drift.len(), 1);
        assert_eq!(drift[0].0.as_str(), "vm0");
        assert_eq!(
            drift[0].1,
            [
                "volume c0u0 resized from 1.0 MiB to 3.0 MiB",
                "volume c2u5 added (1.0 MiB)",
                "volume c1u2 removed",
            ]
        );
        let vm = &s.vms[&VmId::minted("vm0".into())];
        let now = VmFootprint::refreshed(vm, &vpg.settings, Some(&vpg.vms[0].footprint));
        assert_eq!(
            now.journal_hard_limit,
            vpg.vms[0].footprint.journal_hard_limit
        );
        assert_eq!(now.volumes, [(0, 0, 3 << 20), (2, 5, 1 << 20)]);

        // Memory counts too (provisioned storage), with no volume change to name.
        let (mut s, vpg) = fixture();
        s.vms
            .get_mut(&VmId::minted("vm1".into()))
            .unwrap()
            .memory_mib = 4096;
        assert_eq!(lookup(&s, &vpg), [(VmId::minted("vm1".into()), vec![])]);
    }

    #[test]
    fn a_protected_volume_can_grow_but_not_shrink() {
        let (s, vpg) = fixture();
        let mut vm = s.vms[&VmId::minted("vm0".into())].clone();
        let footprint = &vpg.vms[0].footprint;
        vm.volumes[1].size_bytes = 8 << 20;
        footprint.check_no_shrink(&vm).unwrap();
        vm.volumes.remove(0);
        footprint.check_no_shrink(&vm).unwrap();
        vm.volumes[0].size_bytes = 1 << 20;
        let err = footprint.check_no_shrink(&vm).unwrap_err().to_string();
        assert!(err.contains("c1u2") && err.contains("not shrink"), "{err}");
    }

    /// The recovery site of the fixture: datastores ds-r1 and ds-r2 of hosts r1 and r2.
    fn recovery_site() -> SiteState {
        let mut s = SiteState::default();
        for r in ["r1", "r2"] {
            s.datastores.insert(
                DatastoreId::minted(format!("ds-{r}")),
                Datastore {
                    id: DatastoreId::minted(format!("ds-{r}")),
                    name: r.into(),
                    host_id: HostId::minted(r.into()),
                    path: format!("/rec/{r}"),
                    capacity_bytes: 1 << 40,
                },
            );
        }
        s
    }

    #[test]
    fn recovery_plans_place_replicas_and_journals_in_the_recovery_datastore() {
        let (_, vpg) = fixture();
        let s = recovery_site();
        let plans = recovery_plans(&vpg, &s).unwrap();
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[1].host.as_str(), "r2");
        let vm = &plans[1].vms[0];
        assert_eq!(vm.vm.as_str(), "vm1");
        assert_eq!(vm.journal_dir, "/rec/r2/g/vm1/journal");
        assert_eq!(vm.datastore_path, "/rec/r2");
        assert_eq!(vm.volumes[0].path, "/rec/r2/g/vm1/c0u0.replica");
        assert_eq!(plans[1].journal_history_secs, 4 * 3600);
        assert_eq!(plans[1].journal_hard_limit_bytes, 0);
    }

    #[test]
    fn small_journal_limits_are_raised_to_what_a_journal_can_hold() {
        let (_, mut vpg) = fixture();
        let s = recovery_site();
        for vm in &mut vpg.vms {
            vm.footprint.journal_hard_limit = crate::vpg::JournalLimit::Percent(25);
            vm.footprint.journal_warning = crate::vpg::JournalLimit::Percent(20);
        }
        for plan in recovery_plans(&vpg, &s).unwrap() {
            assert_eq!(plan.journal_hard_limit_bytes, MIN_JOURNAL_LIMIT_BYTES);
            assert!(plan.journal_warning_bytes < plan.journal_hard_limit_bytes);
            assert!(plan.journal_warning_bytes > 0);
        }
    }
}
