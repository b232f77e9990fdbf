//! The site's inventory: hosts with their VRA, datastores, resource pools and VMs with their
//! volumes. A VM is simulated as DESIGN.md allows: a set of volumes plus a power state.

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Violations};
use crate::ids::{DatastoreId, HostId, PoolId, VmId, check_address, check_name};

/// SCSI controllers per VM.
pub const MAX_SCSI_CONTROLLERS: u8 = 4;
/// Units (volumes) per SCSI controller.
pub const MAX_UNITS_PER_CONTROLLER: u8 = 15;
/// The largest volume accepted: 64 TiB.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Volume sizes are whole 512-byte sectors.
pub const SECTOR: u64 = 512;

/// A hypervisor host and the address of its VRA's control service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: HostId,
    pub name: String,
    pub vra_address: String,
    /// Where the VRAs of paired sites reach this VRA; empty: `vra_address`.
    #[serde(default)]
    pub peer_vra_address: String,
}

impl Host {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.absorb(check_name("name", &self.name));
        v.absorb(check_address("vra_address", &self.vra_address));
        if !self.peer_vra_address.is_empty() {
            v.absorb(check_address("peer_vra_address", &self.peer_vra_address));
        }
        v.into_result()
    }

    /// The address a paired site's VRAs dial to stream to this VRA.
    pub fn peer_address(&self) -> &str {
        if self.peer_vra_address.is_empty() {
            &self.vra_address
        } else {
            &self.peer_vra_address
        }
    }
}

/// A directory with a quota on a host; recovery volumes and journals live in datastores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    pub id: DatastoreId,
    pub name: String,
    pub host_id: HostId,
    pub path: String,
    pub capacity_bytes: u64,
}

impl Datastore {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.absorb(check_name("name", &self.name));
        v.absorb(check_disk_path("path", &self.path));
        v.check(
            self.capacity_bytes > 0,
            "capacity_bytes",
            "must be positive",
        );
        v.into_result()
    }
}

/// CPU, memory and storage that recovered VMs may reserve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcePool {
    pub id: PoolId,
    pub name: String,
    pub cpu_mhz: u64,
    pub memory_mib: u64,
    pub storage_bytes: u64,
}

impl ResourcePool {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.absorb(check_name("name", &self.name));
        v.check(self.cpu_mhz > 0, "cpu_mhz", "must be positive");
        v.check(self.memory_mib > 0, "memory_mib", "must be positive");
        v.check(self.storage_bytes > 0, "storage_bytes", "must be positive");
        v.into_result()
    }
}

/// A VM's power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerState {
    Off,
    On,
}

/// One virtual disk, at a SCSI controller and unit, stored in a datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub controller: u8,
    pub unit: u8,
    pub size_bytes: u64,
    pub datastore_id: DatastoreId,
    /// The disk's file, when it is not the datastore's usual `<datastore>/<vm>/cXuY.img`:
    /// a VM recovered here runs on its replica disks where they are.
    #[serde(default)]
    pub path: Option<String>,
}

/// Checks a file path that a definition or the inventory names: absolute, without `..`,
/// bounded.
pub fn check_disk_path(field: &str, path: &str) -> Result<(), DomainError> {
    let mut v = Violations::new();
    v.check(path.starts_with('/'), field, "must be an absolute path");
    v.check(path.len() <= 4096, field, "must be at most 4096 bytes");
    v.check(
        !path.split('/').any(|c| c == ".."),
        field,
        "must not contain '..'",
    );
    v.into_result()
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: VmId,
    pub name: String,
    pub host_id: HostId,
    pub power: PowerState,
    pub memory_mib: u64,
    pub cpus: u32,
    pub cpu_reservation_mhz: u64,
    pub memory_reservation_mib: u64,
    pub volumes: Vec<Volume>,
}

impl Vm {
    /// Checks the VM on its own (references are checked against the inventory elsewhere).
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.absorb(check_name("name", &self.name));
        v.check(self.memory_mib > 0, "memory_mib", "must be positive");
        v.check(self.cpus > 0 && self.cpus <= 768, "cpus", "must be 1..768");
        v.check(
            self.memory_reservation_mib <= self.memory_mib,
            "memory_reservation_mib",
            "must not exceed memory_mib",
        );
        let max = usize::from(MAX_SCSI_CONTROLLERS) * usize::from(MAX_UNITS_PER_CONTROLLER);
        v.check(
            self.volumes.len() <= max,
            "volumes",
            format!(
                "at most {MAX_SCSI_CONTROLLERS} SCSI controllers x {MAX_UNITS_PER_CONTROLLER} volumes ({max}) per VM"
            ),
        );
        let mut seen = std::collections::BTreeSet::new();
        for (i, vol) in self.volumes.iter().enumerate() {
            let f = |name: &str| format!("volumes[{i}].{name}");
            v.check(
                vol.controller < MAX_SCSI_CONTROLLERS,
                f("controller"),
                format!("must be 0..{}", MAX_SCSI_CONTROLLERS - 1),
            );
            v.check(
                vol.unit < MAX_UNITS_PER_CONTROLLER,
                f("unit"),
                format!("must be 0..{}", MAX_UNITS_PER_CONTROLLER - 1),
            );
            v.check(
                seen.insert((vol.controller, vol.unit)),
                f("unit"),
                format!(
                    "controller {} unit {} is used twice",
                    vol.controller, vol.unit
                ),
            );
            v.check(
                vol.size_bytes > 0 && vol.size_bytes % SECTOR == 0,
                f("size_bytes"),
                "must be a positive multiple of 512",
            );
            v.check(
                vol.size_bytes <= MAX_VOLUME_BYTES,
                f("size_bytes"),
                "must be at most 64 TiB",
            );
            if let Some(path) = &vol.path {
                v.absorb(check_disk_path(&f("path"), path));
            }
        }
        v.into_result()
    }

    /// The VM's provisioned storage: the sum of its volume sizes.
    pub fn provisioned_bytes(&self) -> u64 {
        self.volumes.iter().map(|v| v.size_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(volumes: Vec<Volume>) -> Vm {
        Vm {
            id: VmId::minted("vm-1".into()),
            name: "web".into(),
            host_id: HostId::minted("h1".into()),
            power: PowerState::On,
            memory_mib: 1024,
            cpus: 2,
            cpu_reservation_mhz: 500,
            memory_reservation_mib: 512,
            volumes,
        }
    }

    fn vol(controller: u8, unit: u8) -> Volume {
        Volume {
            controller,
            unit,
            size_bytes: 1 << 20,
            datastore_id: DatastoreId::minted("ds".into()),
            path: None,
        }
    }

    #[test]
    fn a_volume_path_must_be_absolute_and_stay_inside() {
        let mut v = vol(0, 0);
        v.path = Some("/ds/vpg-1/vm-1/c0u0.replica".into());
        assert!(vm(vec![v.clone()]).validate().is_ok());
        for bad in ["relative/c0u0.img", "/ds/../etc/passwd"] {
            v.path = Some(bad.into());
            let err = vm(vec![v.clone()]).validate().unwrap_err().to_string();
            assert!(err.contains("volumes[0].path"), "{bad}: {err}");
        }
    }

    #[test]
    fn sixty_volumes_fit_sixty_one_do_not() {
        let mut vols: Vec<Volume> = (0..4)
            .flat_map(|c| (0..15).map(move |u| vol(c, u)))
            .collect();
        assert!(vm(vols.clone()).validate().is_ok());
        vols.push(vol(0, 0));
        let err = vm(vols).validate().unwrap_err().to_string();
        assert!(
            err.contains("at most 4 SCSI controllers x 15 volumes"),
            "{err}"
        );
    }

    #[test]
    fn controller_and_unit_bounds() {
        assert!(vm(vec![vol(4, 0)]).validate().is_err());
        assert!(vm(vec![vol(0, 15)]).validate().is_err());
        assert!(vm(vec![vol(0, 1), vol(0, 1)]).validate().is_err());
        let mut odd = vol(0, 0);
        odd.size_bytes = 1000;
        assert!(vm(vec![odd]).validate().is_err());
    }
}
