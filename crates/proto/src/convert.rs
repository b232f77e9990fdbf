//! Conversions between wire messages and domain types. Incoming messages are checked here,
//! once, on receipt; the domain then sees only well-formed values.

use tandem_core::error::{DomainError, Violations};
use tandem_core::ids::{DatastoreId, HostId, PoolId, SiteId, VmId};
use tandem_core::inventory::{self as inv, PowerState};
use tandem_core::pairing::PeerSite;
use tandem_core::vpg::{
    JournalLimit, Priority, ReverseProtection, VmPlacement, Vpg, VpgSettings, VpgSpec,
};

use crate::v1;

/// Ends a conversion: the value when every field parsed, else all violations at once.
fn finish<T>(v: Violations, build: impl FnOnce() -> Option<T>) -> Result<T, DomainError> {
    v.into_result()?;
    build().ok_or_else(|| DomainError::invalid("", "malformed request"))
}

pub fn host_from_proto(p: v1::Host) -> Result<inv::Host, DomainError> {
    let mut v = Violations::new();
    let id = v.absorb(HostId::parse("id", &p.id));
    finish(v, || {
        Some(inv::Host {
            id: id?,
            name: p.name,
            vra_address: p.vra_address,
            peer_vra_address: p.peer_vra_address,
        })
    })
}

pub fn host_to_proto(h: &inv::Host) -> v1::Host {
    v1::Host {
        id: h.id.to_string(),
        name: h.name.clone(),
        vra_address: h.vra_address.clone(),
        peer_vra_address: h.peer_vra_address.clone(),
    }
}

pub fn datastore_from_proto(p: v1::Datastore) -> Result<inv::Datastore, DomainError> {
    let mut v = Violations::new();
    let id = v.absorb(DatastoreId::parse("id", &p.id));
    let host_id = v.absorb(HostId::parse("host_id", &p.host_id));
    finish(v, || {
        Some(inv::Datastore {
            id: id?,
            name: p.name,
            host_id: host_id?,
            path: p.path,
            capacity_bytes: p.capacity_bytes,
        })
    })
}

pub fn datastore_to_proto(d: &inv::Datastore) -> v1::Datastore {
    v1::Datastore {
        id: d.id.to_string(),
        name: d.name.clone(),
        host_id: d.host_id.to_string(),
        path: d.path.clone(),
        capacity_bytes: d.capacity_bytes,
    }
}

pub fn pool_from_proto(p: v1::ResourcePool) -> Result<inv::ResourcePool, DomainError> {
    let mut v = Violations::new();
    let id = v.absorb(PoolId::parse("id", &p.id));
    finish(v, || {
        Some(inv::ResourcePool {
            id: id?,
            name: p.name,
            cpu_mhz: p.cpu_mhz,
            memory_mib: p.memory_mib,
            storage_bytes: p.storage_bytes,
        })
    })
}

pub fn pool_to_proto(p: &inv::ResourcePool) -> v1::ResourcePool {
    v1::ResourcePool {
        id: p.id.to_string(),
        name: p.name.clone(),
        cpu_mhz: p.cpu_mhz,
        memory_mib: p.memory_mib,
        storage_bytes: p.storage_bytes,
    }
}

fn small(v: &mut Violations, field: String, x: u32) -> u8 {
    match u8::try_from(x) {
        Ok(b) => b,
        Err(_) => {
            v.add(field, "out of range");
            u8::MAX
        }
    }
}

pub fn vm_from_proto(p: v1::Vm) -> Result<inv::Vm, DomainError> {
    let mut v = Violations::new();
    let id = v.absorb(VmId::parse("id", &p.id));
    let host_id = v.absorb(HostId::parse("host_id", &p.host_id));
    let power = match v1::PowerState::try_from(p.power) {
        Ok(v1::PowerState::On) => Some(PowerState::On),
        Ok(v1::PowerState::Off) | Ok(v1::PowerState::Unspecified) => Some(PowerState::Off),
        Err(_) => {
            v.add("power", "unknown power state");
            None
        }
    };
    let max = usize::from(inv::MAX_SCSI_CONTROLLERS) * usize::from(inv::MAX_UNITS_PER_CONTROLLER);
    // Bound the work done on an oversized list before converting it element by element.
    if p.volumes.len() > max {
        v.add(
            "volumes",
            format!("at most 4 SCSI controllers x 15 volumes ({max}) per VM"),
        );
        return Err(v.into_result().unwrap_err());
    }
    let mut volumes = Vec::with_capacity(p.volumes.len());
    for (i, vol) in p.volumes.into_iter().enumerate() {
        let controller = small(&mut v, format!("volumes[{i}].controller"), vol.controller);
        let unit = small(&mut v, format!("volumes[{i}].unit"), vol.unit);
        let ds = v.absorb(DatastoreId::parse(
            &format!("volumes[{i}].datastore_id"),
            &vol.datastore_id,
        ));
        if let Some(datastore_id) = ds {
            let path = (!vol.path.is_empty()).then_some(vol.path);
            volumes.push(inv::Volume {
                controller,
                unit,
                size_bytes: vol.size_bytes,
                datastore_id,
                path,
            });
        }
    }
    finish(v, || {
        Some(inv::Vm {
            id: id?,
            name: p.name,
            host_id: host_id?,
            power: power?,
            memory_mib: p.memory_mib,
            cpus: p.cpus,
            cpu_reservation_mhz: p.cpu_reservation_mhz,
            memory_reservation_mib: p.memory_reservation_mib,
            volumes,
        })
    })
}

pub fn vm_to_proto(m: &inv::Vm, vpg_id: Option<&str>) -> v1::Vm {
    v1::Vm {
        id: m.id.to_string(),
        name: m.name.clone(),
        host_id: m.host_id.to_string(),
        power: match m.power {
            PowerState::On => v1::PowerState::On,
            PowerState::Off => v1::PowerState::Off,
        } as i32,
        memory_mib: m.memory_mib,
        cpus: m.cpus,
        cpu_reservation_mhz: m.cpu_reservation_mhz,
        memory_reservation_mib: m.memory_reservation_mib,
        volumes: m
            .volumes
            .iter()
            .map(|vol| v1::Volume {
                controller: vol.controller.into(),
                unit: vol.unit.into(),
                size_bytes: vol.size_bytes,
                datastore_id: vol.datastore_id.to_string(),
                path: vol.path.clone().unwrap_or_default(),
            })
            .collect(),
        vpg_id: vpg_id.unwrap_or_default().to_string(),
    }
}

pub fn peer_to_proto(p: &PeerSite) -> v1::PeerSite {
    v1::PeerSite {
        id: p.id.to_string(),
        name: p.name.clone(),
        endpoints: p.endpoints.clone(),
        paired_at_ms: p.paired_at_ms,
        bandwidth_limit_bytes_per_sec: p.bandwidth_limit_bytes_per_sec,
        ca_pem: p.ca_pem.clone(),
    }
}

pub fn peer_from_proto(p: v1::PeerSite) -> Result<PeerSite, DomainError> {
    let id = SiteId::parse("id", &p.id)?;
    let peer = PeerSite {
        id,
        name: p.name,
        endpoints: p.endpoints,
        paired_at_ms: p.paired_at_ms,
        // A peer's own view of its limits is not ours: a new pair starts without one.
        bandwidth_limit_bytes_per_sec: 0,
        ca_pem: p.ca_pem,
    };
    peer.validate()?;
    Ok(peer)
}

fn limit_from_proto(l: Option<v1::JournalLimit>) -> JournalLimit {
    use v1::journal_limit::Limit;
    match l.and_then(|l| l.limit) {
        None | Some(Limit::Unlimited(_)) => JournalLimit::Unlimited,
        Some(Limit::Bytes(b)) => JournalLimit::Bytes(b),
        Some(Limit::Percent(p)) => JournalLimit::Percent(u8::try_from(p).unwrap_or(u8::MAX)),
    }
}

fn limit_to_proto(l: JournalLimit) -> v1::JournalLimit {
    use v1::journal_limit::Limit;
    v1::JournalLimit {
        limit: Some(match l {
            JournalLimit::Unlimited => Limit::Unlimited(true),
            JournalLimit::Bytes(b) => Limit::Bytes(b),
            JournalLimit::Percent(p) => Limit::Percent(p.into()),
        }),
    }
}

pub fn settings_from_proto(p: Option<v1::VpgSettings>) -> Result<VpgSettings, DomainError> {
    let d = VpgSettings::default();
    let Some(p) = p else { return Ok(d) };
    let priority = match v1::Priority::try_from(p.priority) {
        Ok(v1::Priority::Unspecified) => d.priority,
        Ok(v1::Priority::Low) => Priority::Low,
        Ok(v1::Priority::Medium) => Priority::Medium,
        Ok(v1::Priority::High) => Priority::High,
        Err(_) => {
            return Err(DomainError::invalid(
                "settings.priority",
                "unknown priority",
            ));
        }
    };
    let or = |x: u64, dflt: u64| if x == 0 { dflt } else { x };
    Ok(VpgSettings {
        priority,
        target_rpo_secs: or(p.target_rpo_secs, d.target_rpo_secs),
        journal_history_secs: or(p.journal_history_secs, d.journal_history_secs),
        journal_hard_limit: limit_from_proto(p.journal_hard_limit),
        journal_warning: limit_from_proto(p.journal_warning),
        replication_pause_secs: p.replication_pause_secs,
        test_reminder_months: p.test_reminder_months,
        wan_compression: p.wan_compression,
        reverse: ReverseProtection {
            enabled: p.reverse_protection,
            use_original_disks: p.reverse_use_original_disks,
            pool: if p.reverse_pool_id.is_empty() {
                None
            } else {
                Some(PoolId::parse(
                    "settings.reverse_pool_id",
                    &p.reverse_pool_id,
                )?)
            },
        },
        checkpoint_interval_secs: or(p.checkpoint_interval_secs, d.checkpoint_interval_secs),
    })
}

pub fn settings_to_proto(s: &VpgSettings) -> v1::VpgSettings {
    v1::VpgSettings {
        priority: match s.priority {
            Priority::Low => v1::Priority::Low,
            Priority::Medium => v1::Priority::Medium,
            Priority::High => v1::Priority::High,
        } as i32,
        target_rpo_secs: s.target_rpo_secs,
        journal_history_secs: s.journal_history_secs,
        journal_hard_limit: Some(limit_to_proto(s.journal_hard_limit)),
        journal_warning: Some(limit_to_proto(s.journal_warning)),
        replication_pause_secs: s.replication_pause_secs,
        test_reminder_months: s.test_reminder_months,
        wan_compression: s.wan_compression,
        reverse_protection: s.reverse.enabled,
        reverse_use_original_disks: s.reverse.use_original_disks,
        reverse_pool_id: s
            .reverse
            .pool
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        checkpoint_interval_secs: s.checkpoint_interval_secs,
    }
}

/// Checks a VPG spec's shape (everything that needs no inventory) on receipt.
pub fn vpg_spec_from_proto(p: Option<v1::VpgSpec>) -> Result<VpgSpec, DomainError> {
    let Some(p) = p else {
        return Err(DomainError::invalid("spec", "is required"));
    };
    let mut v = Violations::new();
    if p.vms.len() > tandem_core::vpg::MAX_VMS_PER_VPG {
        v.add(
            "spec.vms",
            format!("at most {} VMs per VPG", tandem_core::vpg::MAX_VMS_PER_VPG),
        );
        return Err(v.into_result().unwrap_err());
    }
    let recovery_site = v.absorb(SiteId::parse("recovery_site_id", &p.recovery_site_id));
    let settings = v.absorb(settings_from_proto(p.settings));
    let mut vms = Vec::with_capacity(p.vms.len());
    for (i, m) in p.vms.into_iter().enumerate() {
        let f = |n: &str| format!("vms[{i}].{n}");
        let vm_id = v.absorb(VmId::parse(&f("vm_id"), &m.vm_id));
        let host = v.absorb(HostId::parse(&f("recovery_host_id"), &m.recovery_host_id));
        let ds = v.absorb(DatastoreId::parse(
            &f("recovery_datastore_id"),
            &m.recovery_datastore_id,
        ));
        let pool = v.absorb(PoolId::parse(&f("recovery_pool_id"), &m.recovery_pool_id));
        if let (Some(vm_id), Some(recovery_host), Some(recovery_datastore), Some(recovery_pool)) =
            (vm_id, host, ds, pool)
        {
            vms.push(VmPlacement {
                vm_id,
                recovery_host,
                recovery_datastore,
                recovery_pool,
                preseeded: m.preseeded,
                // The recovery disks' own files are the definition's, never the operator's:
                // an edit keeps those the VPG has.
                disk_paths: Default::default(),
            });
        }
    }
    let spec = finish(v, || {
        Some(VpgSpec {
            name: p.name,
            recovery_site: recovery_site?,
            settings: settings?,
            vms,
        })
    })?;
    let mut v = Violations::new();
    spec.validate_shape(&mut v);
    v.into_result()?;
    Ok(spec)
}

fn placement_to_proto(p: &VmPlacement) -> v1::VmPlacement {
    v1::VmPlacement {
        vm_id: p.vm_id.to_string(),
        recovery_host_id: p.recovery_host.to_string(),
        recovery_datastore_id: p.recovery_datastore.to_string(),
        recovery_pool_id: p.recovery_pool.to_string(),
        preseeded: p.preseeded,
    }
}

/// The wire form of a VPG, with the status and direction as seen from `own_site`.
pub fn vpg_to_proto(g: &Vpg, own_site: &SiteId, peer_name: &str, status: v1::VpgStatus) -> v1::Vpg {
    v1::Vpg {
        id: g.id.to_string(),
        name: g.name.clone(),
        generation: g.generation,
        protected_site_id: g.protected_site.to_string(),
        recovery_site_id: g.recovery_site.to_string(),
        settings: Some(settings_to_proto(&g.settings)),
        vms: g
            .vms
            .iter()
            .map(|m| v1::VpgVm {
                placement: Some(placement_to_proto(&m.placement)),
                vm_name: m.footprint.vm_name.clone(),
                provisioned_bytes: m.footprint.provisioned_bytes(),
                cpu_reservation_mhz: m.footprint.cpu_reservation_mhz,
                memory_reservation_mib: m.footprint.memory_reservation_mib,
                volumes: m.footprint.volumes.len() as u32,
            })
            .collect(),
        created_at_ms: g.created_at_ms,
        updated_at_ms: g.updated_at_ms,
        status: Some(status),
        direction: if &g.protected_site == own_site {
            "outgoing".into()
        } else {
            "incoming".into()
        },
        peer_site_name: peer_name.to_string(),
        owner_site_id: String::new(),
        stood_down: None,
    }
}

/// The wire form of a stand-down.
pub fn stand_down_to_proto(d: &tandem_core::fence::StandDown) -> v1::VpgStandDown {
    v1::VpgStandDown {
        by_site_id: d.by.to_string(),
        what: d.describe(),
        r#final: d.final_(),
        since_ms: d.since_ms,
        counted: d.divergence.is_some(),
        divergence: d
            .divergence
            .iter()
            .flatten()
            .map(|v| v1::VpgDivergence {
                host_id: v.host.to_string(),
                vm_id: v.vm.to_string(),
                volume_id: v.volume_id,
                bytes: v.bytes,
                known: v.known,
            })
            .collect(),
    }
}
