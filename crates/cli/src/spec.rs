//! Spec files (YAML or TOML) that describe objects to create or edit, and human sizes.

use std::{io::Read, path::Path};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tandem_proto::v1;

/// The example spec file of each kind (`deploy/examples/`), shown by `create --help`.
pub const EXAMPLES: [(&str, &str); 5] = [
    ("host", include_str!("../../../deploy/examples/host.yaml")),
    (
        "datastore",
        include_str!("../../../deploy/examples/datastore.yaml"),
    ),
    ("pool", include_str!("../../../deploy/examples/pool.yaml")),
    ("vm", include_str!("../../../deploy/examples/vm.yaml")),
    ("vpg", include_str!("../../../deploy/examples/vpg.yaml")),
];

/// Parses "10GiB", "512MiB", "1.5TB", "4096" (bytes) into bytes. Whole numbers are exact
/// up to `u64::MAX`; a number with a fraction must come to a whole number of bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1_000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        other => bail!("unknown size unit {other:?} in {s:?}"),
    };
    if !num.contains('.') {
        return num
            .parse::<u64>()
            .with_context(|| format!("bad size {s:?}"))?
            .checked_mul(mult)
            .with_context(|| format!("size {s:?} is more than {} bytes", u64::MAX));
    }
    let num: f64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    let bytes = num * mult as f64;
    // `u64::MAX as f64` is 2^64, the first value that does not fit.
    if !(0.0..(u64::MAX as f64)).contains(&bytes) || bytes.fract() != 0.0 {
        bail!("size {s:?} is not a whole number of bytes");
    }
    Ok(bytes as u64)
}

/// A size written either as a number of bytes or as a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self) -> Result<u64> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => parse_size(t),
        }
    }
}

/// Longest spec file taken.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// How a spec file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    Yaml,
    Toml,
}

/// Reads a spec file, choosing the format by extension (`.toml`, else YAML).
pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| {
            file.take(MAX_SPEC_BYTES as u64 + 1)
                .read_to_string(&mut text)
        })
        .with_context(|| format!("reading {}", path.display()))?;
    let format = if path.extension().is_some_and(|e| e == "toml") {
        SpecFormat::Toml
    } else {
        SpecFormat::Yaml
    };
    parse(&text, format).with_context(|| format!("parsing {}", path.display()))
}

/// Parses the text of a spec file.
pub fn parse<T: for<'de> Deserialize<'de>>(text: &str, format: SpecFormat) -> Result<T> {
    if text.len() > MAX_SPEC_BYTES {
        bail!("a spec file is at most 1 MiB");
    }
    Ok(match format {
        SpecFormat::Toml => toml::from_str(text)?,
        SpecFormat::Yaml => serde_yaml::from_str(text)?,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    #[serde(default)]
    pub id: String,
    pub name: String,
    /// host:port of the host's VRA control service.
    pub vra_address: String,
    /// host:port at which paired sites' VRAs reach this VRA (default: vra_address).
    #[serde(default)]
    pub peer_vra_address: String,
}

impl HostSpec {
    pub fn into_proto(self) -> v1::Host {
        v1::Host {
            id: self.id,
            name: self.name,
            vra_address: self.vra_address,
            peer_vra_address: self.peer_vra_address,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreSpec {
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub host: String,
    pub path: String,
    pub capacity: Size,
}

impl DatastoreSpec {
    pub fn into_proto(self) -> Result<v1::Datastore> {
        Ok(v1::Datastore {
            id: self.id,
            name: self.name,
            host_id: self.host,
            path: self.path,
            capacity_bytes: self.capacity.bytes()?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub cpu_mhz: u64,
    pub memory_mib: u64,
    pub storage: Size,
}

impl PoolSpec {
    pub fn into_proto(self) -> Result<v1::ResourcePool> {
        Ok(v1::ResourcePool {
            id: self.id,
            name: self.name,
            cpu_mhz: self.cpu_mhz,
            memory_mib: self.memory_mib,
            storage_bytes: self.storage.bytes()?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub controller: u32,
    pub unit: u32,
    pub size: Size,
    pub datastore: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub host: String,
    #[serde(default)]
    pub power: Option<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    #[serde(default)]
    pub cpu_reservation_mhz: u64,
    #[serde(default)]
    pub memory_reservation_mib: u64,
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
}

impl VmSpec {
    pub fn into_proto(self) -> Result<v1::Vm> {
        let power = match self
            .power
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("on") => v1::PowerState::On,
            Some("off") => v1::PowerState::Off,
            Some(other) => bail!("power must be on or off, not {other:?}"),
        };
        let volumes = self
            .volumes
            .into_iter()
            .map(|v| {
                Ok(v1::Volume {
                    path: String::new(),
                    controller: v.controller,
                    unit: v.unit,
                    size_bytes: v.size.bytes()?,
                    datastore_id: v.datastore,
                })
            })
            .collect::<Result<_>>()?;
        Ok(v1::Vm {
            id: self.id,
            name: self.name,
            host_id: self.host,
            power: power as i32,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            cpu_reservation_mhz: self.cpu_reservation_mhz,
            memory_reservation_mib: self.memory_reservation_mib,
            volumes,
            vpg_id: String::new(),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    pub vm: String,
    pub recovery_host: String,
    pub recovery_datastore: String,
    pub recovery_pool: String,
    /// The VM's recovery disks are in place already (kept when it left the VPG).
    #[serde(default)]
    pub preseeded: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpgSpecFile {
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub recovery_site: String,
    #[serde(default)]
    pub priority: Option<String>,
    #[serde(default)]
    pub target_rpo_secs: u64,
    #[serde(default)]
    pub journal_history_secs: u64,
    /// "unlimited", "20%" or a size such as "50GiB".
    #[serde(default)]
    pub journal_hard_limit: Option<String>,
    #[serde(default)]
    pub journal_warning: Option<String>,
    #[serde(default)]
    pub replication_pause_secs: u64,
    #[serde(default)]
    pub test_reminder_months: Option<u32>,
    #[serde(default = "yes")]
    pub wan_compression: bool,
    #[serde(default)]
    pub reverse_protection: bool,
    #[serde(default)]
    pub reverse_use_original_disks: bool,
    /// The protected site's resource pool for its VMs once protected back to it.
    #[serde(default)]
    pub reverse_pool_id: String,
    /// Seconds between automatic checkpoints (default 5, at least 1).
    #[serde(default)]
    pub checkpoint_interval_secs: u64,
    pub vms: Vec<PlacementSpec>,
}

fn yes() -> bool {
    true
}

fn journal_limit(s: Option<&str>) -> Result<Option<v1::JournalLimit>> {
    use v1::journal_limit::Limit;
    let Some(s) = s else { return Ok(None) };
    let limit = if s.eq_ignore_ascii_case("unlimited") {
        Limit::Unlimited(true)
    } else if let Some(p) = s.strip_suffix('%') {
        Limit::Percent(
            p.trim()
                .parse()
                .with_context(|| format!("bad percent {s:?}"))?,
        )
    } else {
        Limit::Bytes(parse_size(s)?)
    };
    Ok(Some(v1::JournalLimit { limit: Some(limit) }))
}

impl VpgSpecFile {
    pub fn into_proto(self) -> Result<(String, v1::VpgSpec)> {
        let priority = match self
            .priority
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => v1::Priority::Unspecified,
            Some("low") => v1::Priority::Low,
            Some("medium") => v1::Priority::Medium,
            Some("high") => v1::Priority::High,
            Some(other) => bail!("priority must be low, medium or high, not {other:?}"),
        };
        let settings = v1::VpgSettings {
            priority: priority as i32,
            target_rpo_secs: self.target_rpo_secs,
            journal_history_secs: self.journal_history_secs,
            journal_hard_limit: journal_limit(self.journal_hard_limit.as_deref())?,
            journal_warning: journal_limit(self.journal_warning.as_deref())?,
            replication_pause_secs: self.replication_pause_secs,
            test_reminder_months: self.test_reminder_months.unwrap_or(6),
            wan_compression: self.wan_compression,
            reverse_protection: self.reverse_protection,
            reverse_use_original_disks: self.reverse_use_original_disks,
            reverse_pool_id: self.reverse_pool_id.clone(),
            checkpoint_interval_secs: self.checkpoint_interval_secs,
        };
        let vms = self
            .vms
            .into_iter()
            .map(|p| v1::VmPlacement {
                vm_id: p.vm,
                recovery_host_id: p.recovery_host,
                recovery_datastore_id: p.recovery_datastore,
                recovery_pool_id: p.recovery_pool,
                preseeded: p.preseeded,
            })
            .collect();
        Ok((
            self.id,
            v1::VpgSpec {
                name: self.name,
                recovery_site_id: self.recovery_site,
                settings: Some(settings),
                vms,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert!(parse_size("1.1B").is_err());
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn whole_sizes_are_exact_and_too_large_ones_refused() {
        // Sizes went through f64, so one past u64::MAX was taken as u64::MAX and whole
        // numbers above 2^53 were rounded (the spec_file fuzz target now checks this).
        assert_eq!(
            parse_size("9007199254740993").unwrap(),
            9_007_199_254_740_993
        );
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("16777216TiB").is_err());
        assert!(parse_size("18446744073709551616.0").is_err());
        assert_eq!(parse_size("0.5KiB").unwrap(), 512);
    }

    #[test]
    fn vpg_spec_from_yaml() {
        let f: VpgSpecFile = serde_yaml::from_str(
            "name: web\nrecovery_site: s2\njournal_hard_limit: 20%\njournal_warning: 10GiB\nvms:\n  - {vm: v1, recovery_host: h, recovery_datastore: d, recovery_pool: p}\n",
        )
        .unwrap();
        let (_, spec) = f.into_proto().unwrap();
        let s = spec.settings.unwrap();
        assert_eq!(
            s.journal_hard_limit.unwrap().limit,
            Some(v1::journal_limit::Limit::Percent(20))
        );
        assert_eq!(
            s.journal_warning.unwrap().limit,
            Some(v1::journal_limit::Limit::Bytes(10 << 30))
        );
        assert!(
            serde_yaml::from_str::<VpgSpecFile>("name: x\nrecovery_site: s\nvms: []\nbogus: 1\n")
                .is_err()
        );
    }

    #[test]
    fn every_example_spec_parses_into_its_message() {
        for (kind, text) in EXAMPLES {
            let parsed = match kind {
                "host" => serde_yaml::from_str::<HostSpec>(text).map(|h| drop(h.into_proto())),
                "datastore" => serde_yaml::from_str::<DatastoreSpec>(text)
                    .map(|d| d.into_proto().map(drop).unwrap()),
                "pool" => serde_yaml::from_str::<PoolSpec>(text)
                    .map(|p| p.into_proto().map(drop).unwrap()),
                "vm" => {
                    serde_yaml::from_str::<VmSpec>(text).map(|v| v.into_proto().map(drop).unwrap())
                }
                "vpg" => serde_yaml::from_str::<VpgSpecFile>(text)
                    .map(|v| v.into_proto().map(drop).unwrap()),
                other => panic!("no parser for {other}"),
            };
            parsed.unwrap_or_else(|e| panic!("deploy/examples/{kind}.yaml: {e}"));
        }
    }
}
