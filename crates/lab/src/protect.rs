//! Protection of a lab through the managers' API, as an operator would do it: pair site a
//! with site b, a datastore per host at both sites and a resource pool at b, VMs with one
//! volume each on a's hosts, and one VPG of them recovering to b's hosts (VM i on host
//! i mod hosts, at both sites).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, vm_service_client::VmServiceClient,
    vpg_service_client::VpgServiceClient,
};
use tonic::transport::Channel;

use crate::lab::Lab;

/// What to protect.
#[derive(Debug, Clone)]
pub struct ProtectOptions {
    pub vpg: String,
    pub vms: usize,
    pub volume_bytes: u64,
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

/// A channel to one manager API.
pub async fn channel(api: &str) -> Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{api}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?,
    )
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

/// Pairs sites 0 and 1, creates their inventory and the VPG at site 0 (`CreateVpg` and
/// nothing else drives the VRAs).
pub async fn protect(lab: &Lab, o: &ProtectOptions) -> Result<Protection> {
    let recovery_site_id = pair(lab, 0, 1).await?;
    let a = channel(&lab.sites[0][0].api).await?;
    let b = channel(&lab.sites[1][0].api).await?;
    let prot_ds = datastores(lab, &a, 0).await?;
    let rec_ds = datastores(lab, &b, 1).await?;
    ResourcePoolServiceClient::new(b.clone())
        .create_resource_pool(v1::ResourcePool {
            id: "pool".into(),
            name: "pool".into(),
            cpu_mhz: 100_000,
            memory_mib: 1 << 20,
            storage_bytes: 1 << 40,
        })
        .await?;
    let hosts = lab.vras[0].len().min(lab.vras[1].len());
    if hosts == 0 {
        bail!("the lab has no VRAs at one of its sites");
    }
    let mut placements = Vec::new();
    let mut vms = Vec::new();
    for i in 0..o.vms {
        let h = i % hosts;
        let id = format!("vm-{i}");
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
                volumes: vec![v1::Volume {
                    controller: 0,
                    unit: 0,
                    size_bytes: o.volume_bytes,
                    datastore_id: prot_ds[h].clone(),
                }],
                vpg_id: String::new(),
            })
            .await
            .with_context(|| format!("creating {id}"))?;
        placements.push(v1::VmPlacement {
            vm_id: id.clone(),
            recovery_host_id: lab.vras[1][h].host.clone(),
            recovery_datastore_id: rec_ds[h].clone(),
            recovery_pool_id: "pool".into(),
        });
        vms.push((id, h));
    }
    let created = VpgServiceClient::new(a)
        .create_vpg(v1::CreateVpgRequest {
            id: o.vpg.clone(),
            spec: Some(v1::VpgSpec {
                name: o.vpg.clone(),
                recovery_site_id: recovery_site_id.clone(),
                settings: Some(o.settings),
                vms: placements,
            }),
        })
        .await?
        .into_inner();
    Ok(Protection {
        recovery_site_id,
        created,
        vms,
    })
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
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < within {
        for api in apis {
            let Ok(ch) = channel(api).await else { continue };
            if let Ok(g) = VpgServiceClient::new(ch)
                .get_vpg(v1::GetRequest { id: id.into() })
                .await
            {
                let g = g.into_inner();
                let s = g.status.clone().unwrap_or_default();
                let shown = (s.status, s.substatus);
                if seen.last() != Some(&shown) {
                    seen.push(shown);
                }
                if done(&g) {
                    return Ok(g);
                }
                last = Some(g);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("VPG {id} not there within {within:?}; seen {seen:?}; last {last:#?}")
}
