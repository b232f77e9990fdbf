//! The demo's setup through the managers' API, as an operator would do it: pairing, inventory, the VPG and its validation.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::client::{ApiChannel as Channel, ApiConnector};
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient,
    monitoring_service_client::MonitoringServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, vm_service_client::VmServiceClient,
    vpg_service_client::VpgServiceClient,
};

use crate::units::fmt_bytes;
use tandem_testkit::lab::Lab;

use super::options::*;

pub(crate) async fn channel(endpoints: &[String]) -> Result<Channel> {
    Ok(ApiConnector::default()
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
        .connect(endpoints)
        .await?)
}

/// The VPG the VRAs replicate, as the managers define it.
#[derive(Debug, Clone)]
pub(crate) struct Protection {
    pub(crate) vpg: String,
    /// VM ids; VM `i` runs on protected host `i % 2` and recovers to recovery host `i % 2`.
    pub(crate) vms: Vec<String>,
}

/// Datastore directory `h` (0-based) of a site: where images, replicas and journals live.
pub(crate) fn datastore_dir(lab: &Lab, site: usize, h: usize) -> PathBuf {
    lab.dir
        .join(&lab.site_names[site])
        .join(format!("ds-{}", h + 1))
}

/// Creates a datastore per host of a site (its VRA's host, registered by the lab), a pool,
/// and `vms` VMs of one volume each; returns (hosts, datastores, pool, vms).
pub(crate) async fn inventory(
    lab: &Lab,
    ch: &Channel,
    site: usize,
    vms: usize,
    volume_bytes: u64,
) -> Result<(Vec<String>, Vec<String>, String, Vec<String>)> {
    let short = &lab.site_names[site]["site-".len()..];
    let mut hosts = Vec::new();
    let mut stores = Vec::new();
    for (h, vra) in lab.vras[site].iter().enumerate() {
        let path = datastore_dir(lab, site, h);
        std::fs::create_dir_all(&path)?;
        let ds = DatastoreServiceClient::new(ch.clone())
            .create_datastore(v1::Datastore {
                id: format!("{short}-ds-{}", h + 1),
                name: format!("{short}-ds-{}", h + 1),
                host_id: vra.host.clone(),
                path: path.display().to_string(),
                capacity_bytes: 64 << 30,
            })
            .await?
            .into_inner();
        hosts.push(vra.host.clone());
        stores.push(ds.id);
    }
    if hosts.len() < 2 {
        bail!("the lab runs {} hosts on {short}, 2 needed", hosts.len());
    }
    let pool = ResourcePoolServiceClient::new(ch.clone())
        .create_resource_pool(v1::ResourcePool {
            id: format!("{short}-pool"),
            name: format!("{short}-pool"),
            cpu_mhz: 20_000,
            memory_mib: 64 * 1024,
            storage_bytes: 1 << 40,
        })
        .await?
        .into_inner();
    let mut ids = Vec::new();
    for i in 0..vms {
        let vm = VmServiceClient::new(ch.clone())
            .create_vm(v1::Vm {
                id: format!("{short}-vm-{i}"),
                name: format!("{short}-vm-{i}"),
                host_id: hosts[i % 2].clone(),
                power: v1::PowerState::On as i32,
                memory_mib: 4096,
                cpus: 2,
                cpu_reservation_mhz: 1000,
                memory_reservation_mib: 2048,
                volumes: vec![v1::Volume {
                    path: String::new(),
                    controller: 0,
                    unit: 0,
                    size_bytes: volume_bytes,
                    datastore_id: stores[i % 2].clone(),
                }],
                vpg_id: String::new(),
            })
            .await?
            .into_inner();
        ids.push(vm.id);
    }
    Ok((hosts, stores, pool.id, ids))
}

/// Where the demo's VMs go: hosts and datastores (VM i on the (i % 2)th) and the pool at
/// the recovery site, and the pool at the protected site once they are protected back.
pub(crate) struct Placement<'a> {
    pub(crate) hosts: &'a [String],
    pub(crate) stores: &'a [String],
    pub(crate) pool: &'a str,
    pub(crate) reverse_pool: &'a str,
}

pub(crate) fn vpg_spec(
    name: &str,
    recovery_site: &str,
    vms: &[String],
    at: &Placement<'_>,
    checkpoint_interval_secs: u64,
) -> v1::VpgSpec {
    let Placement {
        hosts,
        stores,
        pool,
        reverse_pool,
    } = at;
    v1::VpgSpec {
        name: name.into(),
        recovery_site_id: recovery_site.into(),
        settings: Some(v1::VpgSettings {
            priority: v1::Priority::High as i32,
            target_rpo_secs: TARGET_RPO.as_secs(),
            checkpoint_interval_secs,
            journal_history_secs: 3600,
            wan_compression: true,
            test_reminder_months: 6,
            reverse_pool_id: reverse_pool.to_string(),
            ..Default::default()
        }),
        vms: vms
            .iter()
            .enumerate()
            .map(|(i, vm)| v1::VmPlacement {
                vm_id: vm.clone(),
                recovery_host_id: hosts[i % 2].clone(),
                recovery_datastore_id: stores[i % 2].clone(),
                recovery_pool_id: pool.to_string(),
                preseeded: false,
            })
            .collect(),
    }
}

/// Checks that every node but each site's first manager joined its site with a one-time
/// join token (the managers record each join as EV0071) and that each site's CA lives
/// with its managers; answers what it saw.
pub(crate) async fn joins_recorded(lab: &Lab) -> Result<String> {
    let mut seen = Vec::new();
    for site in 0..lab.sites.len() {
        let events = MonitoringServiceClient::new(channel(&lab.endpoints(site)).await?)
            .list_events(v1::ListEventsQuery {
                code: "EV0071".into(),
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        let want = lab.sites[site].len() - 1 + lab.vras[site].len();
        if events.len() != want {
            bail!(
                "{}: {} joins recorded, expected {want} (managers 2.. and every VRA)",
                lab.site_names[site],
                events.len()
            );
        }
        seen.push(format!("{} {}", lab.site_names[site], events.len()));
    }
    Ok(format!(
        "every manager after the first and every VRA joined with a one-time join token, \
         its certificate issued by its site's managers ({} joins)",
        seen.join(", ")
    ))
}

pub(crate) async fn manager_steps(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
) -> Result<Protection> {
    let a = channel(&lab.endpoints(0)).await?;
    let b = channel(&lab.endpoints(1)).await?;
    let volume_bytes = opts.volume_mib * MIB;

    // Pairing: site-b issues a token, site-a presents it with site-b's addresses as site-a
    // reaches them: through the link emulator.
    let t = Instant::now();
    let r = async {
        let token = SiteServiceClient::new(b.clone())
            .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs: 600 })
            .await?
            .into_inner();
        let pinned = token.ca_fingerprint.clone();
        if pinned.is_empty() {
            bail!("site-b's pairing token pins no CA (is it running --insecure?)");
        }
        let peer = SiteServiceClient::new(a.clone())
            .pair_site(v1::PairSiteRequest {
                peer_endpoints: lab.peer_endpoints(0, 1),
                peer_api_endpoints: lab.peer_api_endpoints(0, 1),
                token: token.token,
                advertise_endpoints: lab.peer_endpoints(1, 0),
            })
            .await?
            .into_inner();
        let b_peers = SiteServiceClient::new(b.clone())
            .list_peers(v1::ListPeersRequest {})
            .await?
            .into_inner();
        if b_peers.peers.len() != 1 {
            bail!("site-b records {} peers, expected 1", b_peers.peers.len());
        }
        // Each site holds the other's CA: site-a the one the token pinned.
        if !tandem_tls::cert::check_ca_bundle(&peer.ca_pem)?.contains(&pinned) {
            bail!("site-a recorded CAs without the one site-b's token pinned");
        }
        tandem_tls::cert::check_ca_bundle(&b_peers.peers[0].ca_pem)
            .context("site-b holds no usable CA of site-a")?;
        let name = lab.link_name(0, 1);
        let s = lab.links.get(&name).await?.state().await?;
        if s.a_to_b.connections_total == 0 || s.a_to_b.bytes == 0 || s.b_to_a.bytes == 0 {
            bail!(
                "no pairing traffic on {name}: {} connections, {} B a->b, {} B b->a",
                s.a_to_b.connections_total,
                s.a_to_b.bytes,
                s.b_to_a.bytes
            );
        }
        Ok(format!(
            "paired with {} ({}), its CA pinned (sha256 {}...) and the CAs exchanged, both \
             sites record it; over {name}: {} B a->b, {} B b->a",
            peer.name,
            peer.id,
            pinned.get(..16).unwrap_or(&pinned),
            s.a_to_b.bytes,
            s.b_to_a.bytes
        ))
    }
    .await;
    report.step("pair the sites across the link emulator", t, r);
    let site_b_id = SiteServiceClient::new(b.clone())
        .get_site(v1::GetSiteRequest {})
        .await?
        .into_inner()
        .id;

    let t = Instant::now();
    let inv = async {
        let a_inv = inventory(lab, &a, 0, VMS, volume_bytes).await?;
        let b_inv = inventory(lab, &b, 1, 0, volume_bytes).await?;
        Ok::<_, anyhow::Error>((a_inv, b_inv))
    }
    .await;
    let ((_, _, a_pool, vms), (b_hosts, b_stores, b_pool, _)) = match inv {
        Ok(v) => {
            report.step(
                "inventory: datastores, pools, 4 VMs",
                t,
                Ok(format!(
                    "{VMS} VMs with a {} volume on the 2 hosts of site-a",
                    fmt_bytes(volume_bytes)
                )),
            );
            v
        }
        Err(e) => {
            report.step("inventory: datastores, pools, 4 VMs", t, Err(e));
            bail!("cannot go on without inventory");
        }
    };
    let protection = Protection {
        vpg: "vpg-web".into(),
        vms: vms.clone(),
    };
    let interval = opts.checkpoint_interval_secs;
    let at_b = Placement {
        hosts: &b_hosts,
        stores: &b_stores,
        pool: &b_pool,
        reverse_pool: &a_pool,
    };

    let t = Instant::now();
    let r = async {
        let vpg = VpgServiceClient::new(a.clone())
            .create_vpg(v1::CreateVpgRequest {
                id: protection.vpg.clone(),
                spec: Some(vpg_spec("web-tier", &site_b_id, &vms, &at_b, interval)),
            })
            .await?
            .into_inner();
        let at_b = VpgServiceClient::new(b.clone())
            .get_vpg(v1::GetRequest { id: vpg.id.clone() })
            .await?
            .into_inner();
        Ok(format!(
            "{} ({} VMs) gen {}: site-a {} / site-b {}",
            vpg.name,
            vpg.vms.len(),
            vpg.generation,
            vpg.direction,
            at_b.direction,
        ))
    }
    .await;
    report.step("tandem vpg create a -> b, both sites store it", t, r);

    let t = Instant::now();
    let r = async {
        let mut spec = vpg_spec("again", &site_b_id, &vms[..1], &at_b, interval);
        spec.name = "again".into();
        match VpgServiceClient::new(a.clone())
            .create_vpg(v1::CreateVpgRequest {
                id: String::new(),
                spec: Some(spec),
            })
            .await
        {
            Ok(_) => bail!("a VM already protected was accepted into a second VPG"),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                Ok(format!("refused: {}", s.message()))
            }
            Err(s) => bail!("unexpected error {s}"),
        }
    }
    .await;
    report.step("a VM in two VPGs is refused", t, r);

    Ok(protection)
}

pub(crate) fn vra_args(opts: &DemoOptions) -> Vec<String> {
    vec!["--ram-mb".into(), opts.vra_ram_mib.to_string()]
}

pub(crate) async fn start_lab(dir: &Path, opts: &DemoOptions) -> Result<Lab> {
    let mut lab = Lab::up(dir, 2, 3).await?;
    if let Err(e) = lab.start_vras_with(HOSTS, &vra_args(opts)).await {
        lab.down().await;
        return Err(e);
    }
    Ok(lab)
}
