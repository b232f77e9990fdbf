//! Protection of a lab through the managers' API, as an operator would do it: pair site a
//! with site b, a datastore per host at both sites and a resource pool at b, VMs with one
//! volume each on a's hosts, and one VPG of them recovering to b's hosts (VM i on host
//! i mod hosts, at both sites).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, vm_service_client::VmServiceClient,
    vpg_service_client::VpgServiceClient,
};

use crate::lab::Lab;
use crate::operator::channel;

/// What to protect.
#[derive(Debug, Clone)]
pub struct ProtectOptions {
    pub vpg: String,
    pub vms: usize,
    pub volume_bytes: u64,
    /// Volumes per VM (controller 0, units 0..), each of `volume_bytes`; 0 counts as 1.
    pub volumes_per_vm: u8,
    pub memory_mib: u64,
    pub settings: v1::VpgSettings,
}

/// What was created.
#[derive(Debug, Clone)]
pub struct Protection {
    pub recovery_site_id: String,
    pub created: v1::Vpg,
    /// Per VM: its id and the host index it runs on (at site a) and recovers to (at b).
    pub vms: Vec<(String, usize)>,
}

/// Pairs site `a` with site `b` across their link; answers b's site id.
pub async fn pair(lab: &Lab, a: usize, b: usize) -> Result<String> {
    let ca = channel(&lab.sites[a][0].api).await?;
    let cb = channel(&lab.sites[b][0].api).await?;
    let token = SiteServiceClient::new(cb)
        .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs: 60 })
        .await?
        .into_inner()
        .token;
    Ok(SiteServiceClient::new(ca)
        .pair_site(v1::PairSiteRequest {
            peer_endpoints: lab.peer_endpoints(a, b),
            peer_api_endpoints: lab.peer_api_endpoints(a, b),
            token,
            advertise_endpoints: lab.peer_endpoints(b, a),
        })
        .await?
        .into_inner()
        .id)
}

/// A datastore per host of `site`, in the lab's directory (`<site>/ds-<h>`); answers their
/// ids in host order.
pub async fn datastores(lab: &Lab, ch: &Channel, site: usize) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for (h, vra) in lab.vras[site].iter().enumerate() {
        let name = format!("{}-ds-{h}", lab.site_names[site]);
        let path = lab.dir.join(&lab.site_names[site]).join(format!("ds-{h}"));
        std::fs::create_dir_all(&path)?;
        let ds = DatastoreServiceClient::new(ch.clone())
            .create_datastore(v1::Datastore {
                id: name.clone(),
                name,
                host_id: vra.host.clone(),
                path: path.display().to_string(),
                capacity_bytes: 64 << 30,
            })
            .await?
            .into_inner();
        ids.push(ds.id);
    }
    Ok(ids)
}

/// Sites 0 and 1 paired, with a datastore per host at both and a resource pool at both.
#[derive(Debug, Clone)]
pub struct Sites {
    pub recovery_site_id: String,
    pub protected_datastores: Vec<String>,
    pub recovery_datastores: Vec<String>,
}

/// Pairs sites 0 and 1 and creates the inventory the VPGs of [`protect_vpg`] use.
pub async fn prepare(lab: &Lab) -> Result<Sites> {
    let recovery_site_id = pair(lab, 0, 1).await?;
    let a = channel(&lab.sites[0][0].api).await?;
    let b = channel(&lab.sites[1][0].api).await?;
    let protected_datastores = datastores(lab, &a, 0).await?;
    let recovery_datastores = datastores(lab, &b, 1).await?;
    // A pool at both: the VMs take site 1's when they recover there, and site 0's once
    // they are protected back to it (reverse protection).
    for ch in [b, a] {
        ResourcePoolServiceClient::new(ch)
            .create_resource_pool(v1::ResourcePool {
                id: "pool".into(),
                name: "pool".into(),
                cpu_mhz: 100_000,
                memory_mib: 1 << 20,
                storage_bytes: 1 << 40,
            })
            .await?;
    }
    Ok(Sites {
        recovery_site_id,
        protected_datastores,
        recovery_datastores,
    })
}

/// Pairs sites 0 and 1, creates their inventory and the VPG at site 0 (`CreateVpg` and
/// nothing else drives the VRAs); its VMs are `vm-0`, `vm-1`, ...
pub async fn protect(lab: &Lab, o: &ProtectOptions) -> Result<Protection> {
    let sites = prepare(lab).await?;
    protect_vpg(lab, &sites, o, "vm").await
}

/// Creates `o.vms` VMs named `<vm_prefix>-<i>` on site 0's hosts and the VPG of them.
pub async fn protect_vpg(
    lab: &Lab,
    sites: &Sites,
    o: &ProtectOptions,
    vm_prefix: &str,
) -> Result<Protection> {
    let a = channel(&lab.sites[0][0].api).await?;
    let hosts = lab.vras[0].len().min(lab.vras[1].len());
    if hosts == 0 {
        bail!("the lab has no VRAs at one of its sites");
    }
    let mut placements = Vec::new();
    let mut vms = Vec::new();
    for i in 0..o.vms {
        let h = i % hosts;
        let id = format!("{vm_prefix}-{i}");
        VmServiceClient::new(a.clone())
            .create_vm(v1::Vm {
                id: id.clone(),
                name: id.clone(),
                host_id: lab.vras[0][h].host.clone(),
                power: v1::PowerState::On as i32,
                memory_mib: o.memory_mib,
                cpus: 1,
                cpu_reservation_mhz: 100,
                memory_reservation_mib: 256,
                volumes: (0..o.volumes_per_vm.max(1))
                    .map(|unit| v1::Volume {
                        path: String::new(),
                        controller: 0,
                        unit: unit.into(),
                        size_bytes: o.volume_bytes,
                        datastore_id: sites.protected_datastores[h].clone(),
                    })
                    .collect(),
                vpg_id: String::new(),
            })
            .await
            .with_context(|| format!("creating {id}"))?;
        placements.push(v1::VmPlacement {
            vm_id: id.clone(),
            recovery_host_id: lab.vras[1][h].host.clone(),
            recovery_datastore_id: sites.recovery_datastores[h].clone(),
            recovery_pool_id: "pool".into(),
            preseeded: false,
        });
        vms.push((id, h));
    }
    let created = VpgServiceClient::new(a)
        .create_vpg(v1::CreateVpgRequest {
            id: o.vpg.clone(),
            spec: Some(v1::VpgSpec {
                name: o.vpg.clone(),
                recovery_site_id: sites.recovery_site_id.clone(),
                settings: Some(v1::VpgSettings {
                    reverse_pool_id: if o.settings.reverse_pool_id.is_empty() {
                        "pool".into()
                    } else {
                        o.settings.reverse_pool_id.clone()
                    },
                    ..o.settings.clone()
                }),
                vms: placements,
            }),
        })
        .await?
        .into_inner();
    Ok(Protection {
        recovery_site_id: sites.recovery_site_id.clone(),
        created,
        vms,
    })
}

/// Polls VPG `id` as an operator watches it, `tandem -e APIS vpg get ID -o json` (the CLI's
/// JSON parsed back into the message), until `done` holds, recording every (status,
/// substatus) seen; fails after `within` with what it saw.
pub async fn wait_vpg_cli(
    apis: &[String],
    id: &str,
    within: Duration,
    seen: &mut Vec<(String, String)>,
    done: impl Fn(&v1::Vpg) -> bool,
) -> Result<v1::Vpg> {
    let endpoints = apis.join(",");
    poll_vpg(id, within, seen, done, || async {
        let out = tokio::process::Command::from(crate::operator::cli())
            .args(["-e", &endpoints, "vpg", "get", id, "-o", "json"])
            .output()
            .await
            .context("running tandem vpg get")?;
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        let g = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "tandem vpg get -o json printed what does not parse: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        Ok(Ok(g))
    })
    .await
}

/// Polls VPG `id` at any of `apis` until `done` holds, recording every (status,
/// substatus) seen; fails after `within` with what it saw.
pub async fn wait_vpg(
    apis: &[String],
    id: &str,
    within: Duration,
    seen: &mut Vec<(String, String)>,
    done: impl Fn(&v1::Vpg) -> bool,
) -> Result<v1::Vpg> {
    poll_vpg(id, within, seen, done, || async {
        let mut failed = String::from("no manager reachable");
        for api in apis {
            let Ok(ch) = channel(api).await else { continue };
            match VpgServiceClient::new(ch)
                .get_vpg(v1::GetRequest { id: id.into() })
                .await
            {
                Ok(g) => return Ok(Ok(g.into_inner())),
                Err(s) => failed = s.message().to_string(),
            }
        }
        Ok(Err(failed))
    })
    .await
}

/// Fetches the VPG every 200 ms until `done` holds (`fetch` answers the VPG, or why it
/// could not be read this time, or an error that ends the wait).
async fn poll_vpg<F, Fut>(
    id: &str,
    within: Duration,
    seen: &mut Vec<(String, String)>,
    done: impl Fn(&v1::Vpg) -> bool,
    mut fetch: F,
) -> Result<v1::Vpg>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<std::result::Result<v1::Vpg, String>>>,
{
    let start = Instant::now();
    let mut last = None;
    let mut failed = String::new();
    while start.elapsed() < within {
        match fetch().await? {
            Ok(g) => {
                let s = g.status.clone().unwrap_or_default();
                let shown = (s.status, s.substatus);
                if seen.last() != Some(&shown) {
                    seen.push(shown);
                }
                if done(&g) {
                    return Ok(g);
                }
                last = Some(g);
            }
            Err(e) => failed = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "VPG {id} not there within {within:?}; seen {seen:?}; last error {failed:?}; last \
         {last:#?}"
    )
}

/// The last sync each protected VRA of `site` ran for `vpg`, once every VRA of the site
/// that holds the VPG protects it, runs no sync and has finished one (a reverse
/// protection's delta syncs, say); with when they were seen finished (ms since the epoch).
pub async fn finished_syncs(
    lab: &Lab,
    site: usize,
    vpg: &str,
    within: Duration,
) -> Result<(Vec<v1::VraSyncStatus>, u64)> {
    use v1::vra_control_client::VraControlClient;
    let start = Instant::now();
    loop {
        let mut done = Vec::new();
        let mut all = true;
        for vra in &lab.vras[site] {
            let status = VraControlClient::new(vra.control_channel().await?)
                .get_status(v1::GetVraStatusRequest {})
                .await?
                .into_inner();
            for g in status.vpgs.iter().filter(|g| g.vpg_id == vpg) {
                let running = g.sync.as_ref().is_some_and(|s| s.kind != 0);
                match (
                    &g.last_sync,
                    running,
                    g.role == v1::VraRole::Protected as i32,
                ) {
                    (Some(last), false, true) => done.push(last.clone()),
                    _ => all = false,
                }
            }
        }
        if all && !done.is_empty() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            return Ok((done, now));
        }
        if start.elapsed() > within {
            bail!("the syncs of {vpg} at site {site} did not end within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
