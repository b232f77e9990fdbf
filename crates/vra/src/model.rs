//! Domain types of the VRA, validated once from their protobuf form on receipt: role
//! assignments (persisted in the data directory, hence serde), checkpoint markers and
//! replication stream entries.

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tandem_core::{
    Violations,
    ids::{VmId, VpgId},
    vpg::Priority,
};
use tandem_journal::{
    Checkpoint, CheckpointId, CheckpointKind, Generation, Seq, UnixMillis, VolumeId,
};
use tandem_proto::v1 as pb;

use crate::error::{VraError, VraResult};

/// Largest volume a VRA accepts (64 TiB).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Most volumes of one VM (4 controllers x 15).
pub const MAX_VOLUMES_PER_VM: usize = 60;
/// Default freeze timeout.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// One volume of an assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAssignment {
    /// Id within its VM.
    pub id: VolumeId,
    /// Size in bytes (a multiple of 512).
    pub size: u64,
    /// Protected role: the image; recovery role: the replica disk.
    pub path: PathBuf,
    /// Protected role: the replica holds a copy already; a new volume is delta-synced.
    #[serde(default)]
    pub preseeded: bool,
}

/// A VM of a protected assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedVmSpec {
    /// The VM.
    pub vm: VmId,
    /// Its volumes.
    pub volumes: Vec<VolumeAssignment>,
}

/// The protected role of a VPG on this VRA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedAssignment {
    /// The VPG.
    pub vpg: VpgId,
    /// Its generation (fence against stale senders).
    pub generation: Generation,
    /// Its VMs on this host.
    pub vms: Vec<ProtectedVmSpec>,
    /// `host:port` of the recovery VRA's control listener.
    pub recovery_vra: String,
    /// Compress write payloads with lz4 on the wire.
    pub wan_compression: bool,
    /// Replication priority.
    pub priority: Priority,
    /// A freeze not thawed within this time aborts itself (milliseconds).
    pub freeze_timeout_ms: u64,
    /// The replicas already hold a copy: a new assignment starts with a delta sync.
    #[serde(default)]
    pub preseeded: bool,
    /// The site it replicates to (whose bandwidth limit its stream shares); empty: default.
    #[serde(default)]
    pub recovery_site: String,
}

/// A VM of a recovery assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryVmSpec {
    /// The VM.
    pub vm: VmId,
    /// Its volumes (paths are replica disks).
    pub volumes: Vec<VolumeAssignment>,
    /// Its journal directory.
    pub journal_dir: PathBuf,
    /// The recovery datastore's directory, which must exist (`None`: not checked).
    #[serde(default)]
    pub datastore: Option<PathBuf>,
}

/// The recovery role of a VPG on this VRA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryAssignment {
    /// The VPG.
    pub vpg: VpgId,
    /// Its generation.
    pub generation: Generation,
    /// Its VMs.
    pub vms: Vec<RecoveryVmSpec>,
    /// Journal history window in seconds.
    pub history_secs: Option<u64>,
    /// Journal warning threshold per VM journal.
    pub warning_bytes: Option<u64>,
    /// Journal hard limit per VM journal.
    pub hard_limit_bytes: Option<u64>,
    /// The site whose VRAs may stream into these journals (None: not checked).
    #[serde(default)]
    pub protected_site: Option<tandem_core::ids::SiteId>,
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

fn check_vpg(v: &mut Violations, s: &str) -> VpgId {
    VpgId::parse("vpg_id", s).unwrap_or_else(|e| {
        v.absorb::<()>(Err(e));
        VpgId::minted(String::new())
    })
}

fn check_generation(v: &mut Violations, g: u64) -> Generation {
    if g == 0 {
        v.add("generation", "must be at least 1");
    }
    Generation(g)
}

fn check_volumes(v: &mut Violations, field: &str, vols: &[pb::VraVolume]) -> Vec<VolumeAssignment> {
    if vols.is_empty() {
        v.add(field, "must list at least one volume");
    }
    if vols.len() > MAX_VOLUMES_PER_VM {
        v.add(field, format!("at most {MAX_VOLUMES_PER_VM} volumes"));
    }
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for (i, vol) in vols.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if !ids.insert(vol.volume_id) {
            v.add(format!("{f}.volume_id"), "listed twice");
        }
        if vol.size_bytes == 0 || vol.size_bytes % 512 != 0 || vol.size_bytes > MAX_VOLUME_BYTES {
            v.add(
                format!("{f}.size_bytes"),
                "must be a non-zero multiple of 512 up to 64 TiB",
            );
        }
        if vol.path.is_empty() {
            v.add(format!("{f}.path"), "must not be empty");
        }
        out.push(VolumeAssignment {
            id: VolumeId(vol.volume_id),
            size: vol.size_bytes,
            path: PathBuf::from(&vol.path),
            preseeded: vol.preseeded,
        });
    }
    out
}

fn check_vm_id(v: &mut Violations, field: String, s: &str, seen: &mut HashSet<String>) -> VmId {
    if !seen.insert(s.to_string()) {
        v.add(field.clone(), "listed twice");
    }
    VmId::parse(&field, s).unwrap_or_else(|e| {
        v.absorb::<()>(Err(e));
        VmId::minted(String::new())
    })
}

impl TryFrom<pb::AssignProtectedRequest> for ProtectedAssignment {
    type Error = VraError;

    fn try_from(r: pb::AssignProtectedRequest) -> VraResult<Self> {
        let mut v = Violations::new();
        let vpg = check_vpg(&mut v, &r.vpg_id);
        let generation = check_generation(&mut v, r.generation);
        if r.vms.is_empty() {
            v.add("vms", "must list at least one vm");
        }
        let mut seen = HashSet::new();
        let mut paths = HashSet::new();
        let vms = r
            .vms
            .iter()
            .enumerate()
            .map(|(i, vm)| {
                let vm_id = check_vm_id(&mut v, format!("vms[{i}].vm_id"), &vm.vm_id, &mut seen);
                let volumes = check_volumes(&mut v, &format!("vms[{i}].volumes"), &vm.volumes);
                for vol in &volumes {
                    if !vol.path.as_os_str().is_empty() && !paths.insert(vol.path.clone()) {
                        v.add(format!("vms[{i}].volumes"), "an image path is used twice");
                    }
                }
                ProtectedVmSpec { vm: vm_id, volumes }
            })
            .collect();
        v.absorb(tandem_core::ids::check_address(
            "recovery_vra_address",
            &r.recovery_vra_address,
        ));
        let priority = match pb::VraPriority::try_from(r.priority) {
            Ok(pb::VraPriority::Low) => Priority::Low,
            Ok(pb::VraPriority::High) => Priority::High,
            Ok(pb::VraPriority::Medium | pb::VraPriority::Unspecified) => Priority::Medium,
            Err(_) => {
                v.add("priority", "unknown value");
                Priority::Medium
            }
        };
        let recovery_site = check_site(&mut v, "recovery_site_id", &r.recovery_site_id);
        let freeze_timeout_ms = if r.freeze_timeout_ms == 0 {
            DEFAULT_FREEZE_TIMEOUT.as_millis() as u64
        } else {
            u64::from(r.freeze_timeout_ms)
        };
        v.into_result()?;
        Ok(ProtectedAssignment {
            vpg,
            generation,
            vms,
            recovery_vra: r.recovery_vra_address,
            wan_compression: r.wan_compression,
            priority,
            freeze_timeout_ms,
            preseeded: r.preseeded,
            recovery_site,
        })
    }
}

impl TryFrom<pb::AssignRecoveryRequest> for RecoveryAssignment {
    type Error = VraError;

    fn try_from(r: pb::AssignRecoveryRequest) -> VraResult<Self> {
        let mut v = Violations::new();
        let vpg = check_vpg(&mut v, &r.vpg_id);
        let generation = check_generation(&mut v, r.generation);
        if r.vms.is_empty() {
            v.add("vms", "must list at least one vm");
        }
        let mut seen = HashSet::new();
        let mut dirs = HashSet::new();
        let mut paths = HashSet::new();
        let vms = r
            .vms
            .iter()
            .enumerate()
            .map(|(i, vm)| {
                let vm_id = check_vm_id(&mut v, format!("vms[{i}].vm_id"), &vm.vm_id, &mut seen);
                let volumes = check_volumes(&mut v, &format!("vms[{i}].volumes"), &vm.volumes);
                for vol in &volumes {
                    if !vol.path.as_os_str().is_empty() && !paths.insert(vol.path.clone()) {
                        v.add(format!("vms[{i}].volumes"), "a replica path is used twice");
                    }
                }
                if vm.journal_dir.is_empty() {
                    v.add(format!("vms[{i}].journal_dir"), "must not be empty");
                } else if !dirs.insert(vm.journal_dir.clone()) {
                    v.add(format!("vms[{i}].journal_dir"), "used by two vms");
                }
                RecoveryVmSpec {
                    vm: vm_id,
                    volumes,
                    journal_dir: PathBuf::from(&vm.journal_dir),
                    datastore: (!vm.datastore_path.is_empty())
                        .then(|| PathBuf::from(&vm.datastore_path)),
                }
            })
            .collect();
        if let (Some(w), Some(h)) = (
            nonzero(r.journal_warning_bytes),
            nonzero(r.journal_hard_limit_bytes),
        ) && w > h
        {
            v.add("journal_warning_bytes", "must not exceed the hard limit");
        }
        let protected_site = (!r.protected_site_id.is_empty())
            .then(|| {
                v.absorb(tandem_core::ids::SiteId::parse(
                    "protected_site_id",
                    &r.protected_site_id,
                ))
            })
            .flatten();
        v.into_result()?;
        Ok(RecoveryAssignment {
            vpg,
            generation,
            vms,
            history_secs: nonzero(r.journal_history_secs),
            warning_bytes: nonzero(r.journal_warning_bytes),
            hard_limit_bytes: nonzero(r.journal_hard_limit_bytes),
            protected_site,
        })
    }
}

/// Parses a VPG id field of a request.
/// A peer site id, or empty for the default site pair.
fn check_site(v: &mut Violations, field: &str, s: &str) -> String {
    if !s.is_empty() {
        v.absorb(tandem_core::ids::SiteId::parse(field, s).map(|_| ()));
    }
    s.to_string()
}

/// Parses a peer site id of a bandwidth limit (empty: the default pair).
pub fn parse_peer_site(s: &str) -> VraResult<String> {
    let mut v = Violations::new();
    let site = check_site(&mut v, "peer_site_id", s);
    v.into_result()?;
    Ok(site)
}

pub fn parse_vpg(s: &str) -> VraResult<VpgId> {
    Ok(VpgId::parse("vpg_id", s)?)
}

/// Parses a VM id field of a request.
pub fn parse_vm(s: &str) -> VraResult<VmId> {
    Ok(VmId::parse("vm_id", s)?)
}

/// Parses a generation field (non-zero).
pub fn parse_generation(g: u64) -> VraResult<Generation> {
    if g == 0 {
        return Err(tandem_core::DomainError::invalid("generation", "must be at least 1").into());
    }
    Ok(Generation(g))
}

/// Parses a checkpoint id field (non-zero).
pub fn parse_checkpoint_id(id: u64) -> VraResult<CheckpointId> {
    if id == 0 {
        return Err(tandem_core::DomainError::invalid("checkpoint_id", "must not be 0").into());
    }
    Ok(CheckpointId(id))
}

/// The domain form of a checkpoint kind.
pub fn kind_from_pb(k: i32) -> VraResult<CheckpointKind> {
    match pb::VraCheckpointKind::try_from(k) {
        Ok(pb::VraCheckpointKind::Automatic | pb::VraCheckpointKind::Unspecified) => {
            Ok(CheckpointKind::Automatic)
        }
        Ok(pb::VraCheckpointKind::Manual) => Ok(CheckpointKind::Manual),
        Ok(pb::VraCheckpointKind::ApplicationConsistent) => {
            Ok(CheckpointKind::ApplicationConsistent)
        }
        Err(_) => Err(tandem_core::DomainError::invalid("kind", "unknown value").into()),
    }
}

/// The protobuf form of a checkpoint kind.
pub fn kind_to_pb(k: CheckpointKind) -> pb::VraCheckpointKind {
    match k {
        CheckpointKind::Automatic => pb::VraCheckpointKind::Automatic,
        CheckpointKind::Manual => pb::VraCheckpointKind::Manual,
        CheckpointKind::ApplicationConsistent => pb::VraCheckpointKind::ApplicationConsistent,
    }
}

/// A validated thaw: the checkpoint marker to append.
pub fn checkpoint_from_thaw(r: &pb::ThawRequest) -> VraResult<Checkpoint> {
    let id = parse_checkpoint_id(r.checkpoint_id)?;
    if !r.name.is_empty() {
        tandem_core::ids::check_name("name", &r.name)?;
    }
    Ok(Checkpoint {
        id,
        timestamp: UnixMillis(r.timestamp_ms),
        kind: kind_from_pb(r.kind)?,
        name: (!r.name.is_empty()).then(|| r.name.clone()),
        vm: None,
    })
}

/// What one replication stream entry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryBody {
    /// Data written to a volume.
    Write {
        /// The VM.
        vm: Arc<VmId>,
        /// The volume.
        volume: VolumeId,
        /// Byte offset.
        offset: u64,
        /// The bytes (uncompressed).
        data: Bytes,
    },
    /// A range set to zeroes.
    Zero {
        /// The VM.
        vm: Arc<VmId>,
        /// The volume.
        volume: VolumeId,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A range discarded.
    Trim {
        /// The VM.
        vm: Arc<VmId>,
        /// The volume.
        volume: VolumeId,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A checkpoint marker (goes into every journal of the VPG).
    Checkpoint(Checkpoint),
}

impl EntryBody {
    /// Buffer cost of an entry besides its data.
    pub const OVERHEAD: u64 = 64;

    /// Bytes this entry holds in the replication buffer.
    pub fn cost(&self) -> u64 {
        match self {
            EntryBody::Write { data, .. } => Self::OVERHEAD + data.len() as u64,
            _ => Self::OVERHEAD,
        }
    }

    /// The VM a data entry belongs to (`None` for a marker).
    pub fn vm(&self) -> Option<&VmId> {
        match self {
            EntryBody::Write { vm, .. }
            | EntryBody::Zero { vm, .. }
            | EntryBody::Trim { vm, .. } => Some(vm),
            EntryBody::Checkpoint(_) => None,
        }
    }
}

/// One entry of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its stream sequence number (also its sequence in the journals).
    pub seq: Seq,
    /// What it does.
    pub body: EntryBody,
}

/// Largest write payload accepted on the stream (the journal's default record limit).
pub const MAX_ENTRY_DATA: u32 = tandem_journal::DEFAULT_MAX_PAYLOAD - 64;

/// Encodes an entry for the wire, lz4-compressing write data when asked and when it pays.
/// Returns the message and the write payload's bytes before and after compression.
pub fn entry_to_pb(e: &Entry, compress: bool) -> (pb::ReplicateEntry, u64, u64) {
    use pb::replicate_entry::Body;
    let range = |vm: &VmId, volume: VolumeId, offset: u64, len: u64| pb::ReplicatedRange {
        vm_id: vm.to_string(),
        volume_id: volume.0,
        offset,
        length: len,
    };
    let (body, raw, sent) = match &e.body {
        EntryBody::Write {
            vm,
            volume,
            offset,
            data,
        } => {
            let raw = data.len() as u64;
            let (data, raw_len) = if compress {
                let c = lz4_flex::block::compress(data);
                if c.len() < data.len() {
                    (Bytes::from(c), data.len() as u32)
                } else {
                    (data.clone(), 0)
                }
            } else {
                (data.clone(), 0)
            };
            let sent = data.len() as u64;
            (
                Body::Write(pb::ReplicatedWrite {
                    vm_id: vm.to_string(),
                    volume_id: volume.0,
                    offset: *offset,
                    data,
                    raw_len,
                }),
                raw,
                sent,
            )
        }
        EntryBody::Zero {
            vm,
            volume,
            offset,
            len,
        } => (Body::Zero(range(vm, *volume, *offset, *len)), 0, 0),
        EntryBody::Trim {
            vm,
            volume,
            offset,
            len,
        } => (Body::Trim(range(vm, *volume, *offset, *len)), 0, 0),
        EntryBody::Checkpoint(cp) => (
            Body::Checkpoint(pb::CheckpointMarker {
                checkpoint_id: cp.id.0,
                timestamp_ms: cp.timestamp.0,
                kind: kind_to_pb(cp.kind) as i32,
                name: cp.name.clone().unwrap_or_default(),
            }),
            0,
            0,
        ),
    };
    (
        pb::ReplicateEntry {
            seq: e.seq.0,
            body: Some(body),
        },
        raw,
        sent,
    )
}

/// Most write data one batch received on the stream may carry, counted before anything is
/// decompressed: twice what a sender puts in one (a batch holds at most 1 MiB of entries,
/// or one larger entry), so that a peer cannot make the receiver inflate a small message
/// into gigabytes.
pub const MAX_BATCH_DATA: u64 = 2 * MAX_ENTRY_DATA as u64;

/// Decodes and validates a batch received on the stream: each entry as [`entry_from_pb`]
/// does, and at most [`MAX_BATCH_DATA`] bytes of write data in all.
pub fn batch_from_pb(entries: Vec<pb::ReplicateEntry>) -> VraResult<Vec<Entry>> {
    let mut data = 0u64;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if let Some(pb::replicate_entry::Body::Write(w)) = &e.body {
            let len = if w.raw_len == 0 {
                w.data.len() as u64
            } else {
                u64::from(w.raw_len)
            };
            data = data.saturating_add(len);
            if data > MAX_BATCH_DATA {
                return Err(VraError::Stream(format!(
                    "batch carries more than {MAX_BATCH_DATA} bytes of write data"
                )));
            }
        }
        out.push(entry_from_pb(e)?);
    }
    Ok(out)
}

/// Decodes and validates an entry received on the stream (decompressing write data).
pub fn entry_from_pb(e: pb::ReplicateEntry) -> VraResult<Entry> {
    use pb::replicate_entry::Body;
    let bad = |m: String| VraError::Stream(format!("entry {}: {m}", e.seq));
    if e.seq == 0 {
        return Err(bad("sequence 0".into()));
    }
    let vm = |s: &str| -> VraResult<Arc<VmId>> {
        VmId::parse("vm_id", s)
            .map(Arc::new)
            .map_err(|err| bad(err.to_string()))
    };
    let body = match e.body {
        None => return Err(bad("no body".into())),
        Some(Body::Write(w)) => {
            let data = if w.raw_len == 0 {
                w.data
            } else {
                if w.raw_len > MAX_ENTRY_DATA {
                    return Err(bad(format!("write of {} bytes is too large", w.raw_len)));
                }
                let d = lz4_flex::block::decompress(&w.data, w.raw_len as usize)
                    .map_err(|err| bad(format!("lz4: {err}")))?;
                if d.len() != w.raw_len as usize {
                    return Err(bad("lz4 data of the wrong length".into()));
                }
                Bytes::from(d)
            };
            if data.is_empty() || data.len() > MAX_ENTRY_DATA as usize {
                return Err(bad(format!("write of {} bytes", data.len())));
            }
            EntryBody::Write {
                vm: vm(&w.vm_id)?,
                volume: VolumeId(w.volume_id),
                offset: w.offset,
                data,
            }
        }
        Some(Body::Zero(r)) => EntryBody::Zero {
            vm: vm(&r.vm_id)?,
            volume: VolumeId(r.volume_id),
            offset: r.offset,
            len: r.length,
        },
        Some(Body::Trim(r)) => EntryBody::Trim {
            vm: vm(&r.vm_id)?,
            volume: VolumeId(r.volume_id),
            offset: r.offset,
            len: r.length,
        },
        Some(Body::Checkpoint(c)) => EntryBody::Checkpoint(Checkpoint {
            id: parse_checkpoint_id(c.checkpoint_id).map_err(|err| bad(err.to_string()))?,
            timestamp: UnixMillis(c.timestamp_ms),
            kind: kind_from_pb(c.kind).map_err(|err| bad(err.to_string()))?,
            name: (!c.name.is_empty()).then_some(c.name),
            vm: None,
        }),
    };
    Ok(Entry {
        seq: Seq(e.seq),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protected_request() -> pb::AssignProtectedRequest {
        pb::AssignProtectedRequest {
            vpg_id: "vpg-1".into(),
            generation: 1,
            vms: vec![pb::ProtectedVm {
                vm_id: "vm-1".into(),
                volumes: vec![pb::VraVolume {
                    volume_id: 0,
                    size_bytes: 1 << 20,
                    path: "/tmp/a.img".into(),
                    preseeded: false,
                }],
            }],
            recovery_vra_address: "127.0.0.1:5000".into(),
            wan_compression: true,
            priority: pb::VraPriority::High as i32,
            freeze_timeout_ms: 0,
            preseeded: false,
            recovery_site_id: String::new(),
        }
    }

    #[test]
    fn valid_protected_assignment_converts() {
        let a = ProtectedAssignment::try_from(protected_request()).expect("valid");
        assert_eq!(a.vpg.as_str(), "vpg-1");
        assert_eq!(a.priority, Priority::High);
        assert_eq!(a.freeze_timeout_ms, 5000);
    }

    #[test]
    fn invalid_protected_assignment_lists_every_problem() {
        let mut r = protected_request();
        r.generation = 0;
        r.vms[0].volumes[0].size_bytes = 1000;
        let dup = r.vms[0].volumes[0].clone();
        r.vms[0].volumes.push(dup);
        r.recovery_vra_address = "nowhere".into();
        let err = ProtectedAssignment::try_from(r).expect_err("invalid");
        let text = err.to_string();
        for field in [
            "generation",
            "size_bytes",
            "volume_id",
            "recovery_vra_address",
        ] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        assert_eq!(err.to_status().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn entries_round_trip_with_and_without_compression() {
        let vm = Arc::new(VmId::minted("vm-1".into()));
        let entries = vec![
            Entry {
                seq: Seq(7),
                body: EntryBody::Write {
                    vm: vm.clone(),
                    volume: VolumeId(2),
                    offset: 4096,
                    data: Bytes::from(vec![7u8; 8192]),
                },
            },
            Entry {
                seq: Seq(8),
                body: EntryBody::Write {
                    vm: vm.clone(),
                    volume: VolumeId(2),
                    offset: 0,
                    data: Bytes::from((0..255u8).collect::<Vec<_>>()),
                },
            },
            Entry {
                seq: Seq(9),
                body: EntryBody::Trim {
                    vm: vm.clone(),
                    volume: VolumeId(1),
                    offset: 512,
                    len: 1024,
                },
            },
            Entry {
                seq: Seq(10),
                body: EntryBody::Checkpoint(Checkpoint {
                    id: CheckpointId(3),
                    timestamp: UnixMillis(99),
                    kind: CheckpointKind::Manual,
                    name: Some("before upgrade".into()),
                    vm: None,
                }),
            },
        ];
        for compress in [false, true] {
            for e in &entries {
                let (wire, raw, sent) = entry_to_pb(e, compress);
                if compress && e.seq == Seq(7) {
                    assert!(sent < raw, "a run of one byte compresses");
                }
                assert_eq!(&entry_from_pb(wire).expect("decode"), e);
            }
        }
    }

    #[test]
    fn bad_entries_are_refused() {
        let mut wire = entry_to_pb(
            &Entry {
                seq: Seq(1),
                body: EntryBody::Write {
                    vm: Arc::new(VmId::minted("vm".into())),
                    volume: VolumeId(0),
                    offset: 0,
                    data: Bytes::from(vec![1u8; 4096]),
                },
            },
            true,
        )
        .0;
        if let Some(pb::replicate_entry::Body::Write(w)) = &mut wire.body {
            w.raw_len += 1;
        }
        assert!(entry_from_pb(wire).is_err());
        assert!(entry_from_pb(pb::ReplicateEntry { seq: 1, body: None }).is_err());
    }
}
