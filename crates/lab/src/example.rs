//! `tandem-lab up --example`: a live VPG in one command. The lab pairs its first two sites
//! and creates, through the `tandem` CLI as an operator would, the inventory and one VPG of
//! 4 VMs on 2 hosts from the spec files of `deploy/examples/` (their ids and paths set to
//! the lab's), then waits until the VPG meets its SLA. `lab.json` lists every VM's volumes
//! with their NBD addresses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_yaml::{Mapping, Value};

use tandem_proto::v1;
use tandem_proto::v1::vm_service_client::VmServiceClient;

use tandem_testkit::lab::{Lab, VmEntry, VolumeEntry};
use tandem_testkit::protect;

/// The example spec files, as shipped (compiled in, so the lab needs no checkout).
const DATASTORE: &str = include_str!("../../../deploy/examples/datastore.yaml");
const POOL: &str = include_str!("../../../deploy/examples/pool.yaml");
const VM: &str = include_str!("../../../deploy/examples/vm.yaml");
const VPG: &str = include_str!("../../../deploy/examples/vpg.yaml");

/// VMs of the example VPG, spread over the hosts.
pub const VMS: usize = 4;
/// Hosts per site the example needs.
pub const HOSTS: usize = 2;
/// How long the example VPG may take to meet its SLA.
const LEVEL_WITHIN: Duration = Duration::from_secs(180);

/// What the example created.
#[derive(Debug, Clone)]
pub struct Example {
    pub vpg: String,
    pub status: String,
    pub specs: PathBuf,
}

fn parse(text: &str, what: &str) -> Result<Mapping> {
    match serde_yaml::from_str(text).with_context(|| format!("parsing the {what} example"))? {
        Value::Mapping(m) => Ok(m),
        _ => bail!("the {what} example is not a mapping"),
    }
}

fn set(m: &mut Mapping, key: &str, value: impl Into<Value>) {
    m.insert(Value::from(key), value.into());
}

/// Writes `spec` to `dir/name.yaml` and runs `tandem -e APIS KIND create -f` on it.
async fn create(apis: &[String], dir: &Path, kind: &str, name: &str, spec: &Mapping) -> Result<()> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, serde_yaml::to_string(spec)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let out = tokio::process::Command::from(tandem_testkit::operator::cli())
        .arg("-e")
        .arg(apis.join(","))
        .args([kind, "create", "-f"])
        .arg(&path)
        .output()
        .await
        .context("running tandem")?;
    if !out.status.success() {
        bail!(
            "tandem {kind} create -f {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates the example in `lab` (at least 2 sites of [`HOSTS`] hosts) and waits until it
/// meets its SLA; records its VMs in the lab (written to `lab.json` by the caller).
pub async fn create_in(lab: &mut Lab) -> Result<Example> {
    if lab.site_names.len() < 2 || lab.vras.iter().take(2).any(|v| v.len() < HOSTS) {
        bail!("--example needs 2 sites of {HOSTS} hosts each");
    }
    let specs = lab.dir.join("specs");
    std::fs::create_dir_all(&specs)?;
    let recovery_site = protect::pair(lab, 0, 1).await?;
    let apis = [lab.endpoints(0), lab.endpoints(1)];

    // A datastore per host at both sites, in the lab's directory.
    let mut datastores = [Vec::new(), Vec::new()];
    for site in 0..2 {
        for h in 0..HOSTS {
            let name = format!("{}-ds-{}", lab.site_names[site], h + 1);
            let path = lab
                .dir
                .join(&lab.site_names[site])
                .join(format!("ds-{}", h + 1));
            std::fs::create_dir_all(&path)?;
            let mut ds = parse(DATASTORE, "datastore")?;
            set(&mut ds, "id", name.clone());
            set(&mut ds, "name", name.clone());
            set(&mut ds, "host", lab.vras[site][h].host.clone());
            set(&mut ds, "path", path.display().to_string());
            create(&apis[site], &specs, "datastore", &name, &ds).await?;
            datastores[site].push(name);
        }
    }
    let pool = parse(POOL, "pool")?;
    let pool_id = pool
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("pool")
        .to_string();
    create(&apis[1], &specs, "pool", "pool", &pool).await?;

    // 4 VMs on the 2 hosts of site a, each with the example's volumes.
    let mut placements = Vec::new();
    let mut vms = Vec::new();
    for i in 0..VMS {
        let h = i % HOSTS;
        let id = format!("web-{}", i + 1);
        let mut vm = parse(VM, "vm")?;
        set(&mut vm, "id", id.clone());
        set(&mut vm, "name", id.clone());
        set(&mut vm, "host", lab.vras[0][h].host.clone());
        let volumes = match vm.get_mut("volumes") {
            Some(Value::Sequence(v)) => v,
            _ => bail!("the vm example has no volumes"),
        };
        for v in volumes.iter_mut() {
            let Value::Mapping(v) = v else {
                bail!("a volume of the vm example is not a mapping");
            };
            set(v, "datastore", datastores[0][h].clone());
        }
        create(&apis[0], &specs, "vm", &id, &vm).await?;
        // The volumes as the site manager holds them (sizes parsed by the CLI).
        let (nbd, nbd_tls) = (
            lab.vras[0][h].nbd_socket.clone(),
            lab.vras[0][h].nbd.clone(),
        );
        let entries = VmServiceClient::new(tandem_testkit::operator::channel(&apis[0][0]).await?)
            .get_vm(v1::GetRequest { id: id.clone() })
            .await?
            .into_inner()
            .volumes
            .iter()
            .map(|v| {
                let export = format!("{id}/{}", v.controller * 15 + v.unit);
                VolumeEntry {
                    controller: v.controller,
                    unit: v.unit,
                    size_bytes: v.size_bytes,
                    uri: tandem_nbd::endpoint_uri(&nbd, &export),
                    nbds_uri: format!("nbds://{nbd_tls}/{export}"),
                    nbd: nbd.clone(),
                    export,
                }
            })
            .collect();
        let mut p = Mapping::new();
        set(&mut p, "vm", id.clone());
        set(&mut p, "recovery_host", lab.vras[1][h].host.clone());
        set(&mut p, "recovery_datastore", datastores[1][h].clone());
        set(&mut p, "recovery_pool", pool_id.clone());
        placements.push(Value::Mapping(p));
        vms.push(VmEntry {
            vm: id,
            vpg: String::new(),
            site: lab.site_names[0].clone(),
            host: lab.vras[0][h].host.clone(),
            volumes: entries,
        });
    }
    let mut vpg = parse(VPG, "vpg")?;
    set(&mut vpg, "recovery_site", recovery_site);
    set(&mut vpg, "vms", Value::Sequence(placements));
    let vpg_id = vpg
        .get("id")
        .and_then(Value::as_str)
        .context("the vpg example has no id")?
        .to_string();
    create(&apis[0], &specs, "vpg", &vpg_id, &vpg).await?;
    for vm in &mut vms {
        vm.vpg = vpg_id.clone();
    }
    lab.vms = vms;

    let mut seen = Vec::new();
    let g = protect::wait_vpg(&apis[0], &vpg_id, LEVEL_WITHIN, &mut seen, |g| {
        g.status.as_ref().is_some_and(|s| s.status == "Meeting SLA")
    })
    .await?;
    Ok(Example {
        vpg: vpg_id,
        status: g.status.map(|s| s.status).unwrap_or_default(),
        specs,
    })
}
