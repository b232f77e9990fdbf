//! The demo the README's main command runs: a two-site lab on loopback, pairing across the
//! lab's link emulator, inventory, a VPG stored by both sites, validation, and a kill -9 of a
//! site's leader. Each step prints PASS or FAIL with its figures; any FAIL makes the exit
//! status non-zero.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient, host_service_client::HostServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, vm_service_client::VmServiceClient,
    vpg_service_client::VpgServiceClient,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::lab::{Lab, wait_leader};

struct Report {
    failures: usize,
}

impl Report {
    fn step(&mut self, name: &str, started: Instant, r: Result<String>) {
        let ms = started.elapsed().as_millis();
        match r {
            Ok(figures) => println!("PASS  {name:<44} {ms:>6} ms  {figures}"),
            Err(e) => {
                self.failures += 1;
                println!("FAIL  {name:<44} {ms:>6} ms  {e:#}");
            }
        }
    }
}

async fn channel(endpoints: &[String]) -> Result<Channel> {
    for e in endpoints {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{e}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
        {
            return Ok(ch);
        }
    }
    bail!("no manager reachable among {endpoints:?}")
}

/// Creates hosts, datastores, a pool and VMs on one site; returns (hosts, datastores, pool, vms).
async fn inventory(
    ch: &Channel,
    site: &str,
    vms: usize,
) -> Result<(Vec<String>, Vec<String>, String, Vec<String>)> {
    let mut hosts = Vec::new();
    let mut stores = Vec::new();
    for h in 1..=2 {
        let host = HostServiceClient::new(ch.clone())
            .create_host(v1::Host {
                id: format!("{site}-host-{h}"),
                name: format!("{site}-host-{h}"),
                vra_address: format!("127.0.0.1:{}", 9000 + h),
            })
            .await?
            .into_inner();
        let ds = DatastoreServiceClient::new(ch.clone())
            .create_datastore(v1::Datastore {
                id: format!("{site}-ds-{h}"),
                name: format!("{site}-ds-{h}"),
                host_id: host.id.clone(),
                path: format!("/var/lib/tandem/{site}/ds-{h}"),
                capacity_bytes: 2 << 40,
            })
            .await?
            .into_inner();
        hosts.push(host.id);
        stores.push(ds.id);
    }
    let pool = ResourcePoolServiceClient::new(ch.clone())
        .create_resource_pool(v1::ResourcePool {
            id: format!("{site}-pool"),
            name: format!("{site}-pool"),
            cpu_mhz: 20_000,
            memory_mib: 64 * 1024,
            storage_bytes: 4 << 40,
        })
        .await?
        .into_inner();
    let mut ids = Vec::new();
    for i in 0..vms {
        let vm = VmServiceClient::new(ch.clone())
            .create_vm(v1::Vm {
                id: format!("{site}-vm-{i}"),
                name: format!("{site}-vm-{i}"),
                host_id: hosts[i % 2].clone(),
                power: v1::PowerState::On as i32,
                memory_mib: 4096,
                cpus: 2,
                cpu_reservation_mhz: 1000,
                memory_reservation_mib: 2048,
                volumes: (0..2)
                    .map(|u| v1::Volume {
                        controller: 0,
                        unit: u,
                        size_bytes: 64 << 30,
                        datastore_id: stores[i % 2].clone(),
                    })
                    .collect(),
                vpg_id: String::new(),
            })
            .await?
            .into_inner();
        ids.push(vm.id);
    }
    Ok((hosts, stores, pool.id, ids))
}

fn vpg_spec(
    name: &str,
    recovery_site: &str,
    vms: &[String],
    hosts: &[String],
    stores: &[String],
    pool: &str,
) -> v1::VpgSpec {
    v1::VpgSpec {
        name: name.into(),
        recovery_site_id: recovery_site.into(),
        settings: Some(v1::VpgSettings {
            priority: v1::Priority::High as i32,
            target_rpo_secs: 60,
            journal_history_secs: 4 * 3600,
            wan_compression: true,
            test_reminder_months: 6,
            ..Default::default()
        }),
        vms: vms
            .iter()
            .enumerate()
            .map(|(i, vm)| v1::VmPlacement {
                vm_id: vm.clone(),
                recovery_host_id: hosts[i % 2].clone(),
                recovery_datastore_id: stores[i % 2].clone(),
                recovery_pool_id: pool.into(),
            })
            .collect(),
    }
}

pub async fn run(
    dir: Option<PathBuf>,
    keep: bool,
    shutdown: CancellationToken,
) -> Result<ExitCode> {
    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
            tmp.clone()
        }
    };
    println!(
        "Tandem demo: two sites x 3 managers on loopback (lab in {})",
        dir.display()
    );
    let mut report = Report { failures: 0 };

    let t = Instant::now();
    let mut lab = match Lab::up(&dir, 2, 3).await {
        Ok(lab) => {
            report.step(
                "start 2 sites x 3 managers",
                t,
                Ok(format!("lab.json in {}", dir.display())),
            );
            lab
        }
        Err(e) => {
            report.step("start 2 sites x 3 managers", t, Err(e));
            return Ok(ExitCode::FAILURE);
        }
    };
    let result = steps(&mut lab, &mut report).await;
    if let Err(e) = result {
        report.failures += 1;
        println!("FAIL  demo stopped: {e:#}");
    }
    if keep && report.failures == 0 {
        println!(
            "lab kept running (Ctrl-C stops it): tandem -e {}",
            lab.endpoints(0).join(",")
        );
        println!(
            "  its links: tandem-lab link --dir {} list",
            lab.dir.display()
        );
        shutdown.cancelled().await;
    }
    lab.down().await;
    println!(
        "{} passed, {} failed",
        if report.failures == 0 {
            "all steps"
        } else {
            "some steps"
        },
        report.failures
    );
    Ok(if report.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn steps(lab: &mut Lab, report: &mut Report) -> Result<()> {
    let a = channel(&lab.endpoints(0)).await?;
    let b = channel(&lab.endpoints(1)).await?;

    // Pairing: site-b issues a token, site-a presents it with site-b's addresses as site-a
    // reaches them: through the link emulator.
    let t = Instant::now();
    let r = async {
        let token = SiteServiceClient::new(b.clone())
            .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs: 600 })
            .await?
            .into_inner();
        let peer = SiteServiceClient::new(a.clone())
            .pair_site(v1::PairSiteRequest {
                peer_endpoints: lab.peer_endpoints(0, 1),
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
        Ok(format!(
            "site-a paired with {} ({}); both sites record the pair",
            peer.name, peer.id
        ))
    }
    .await;
    let site_b_id = SiteServiceClient::new(b.clone())
        .get_site(v1::GetSiteRequest {})
        .await?
        .into_inner()
        .id;
    report.step("pair site-a with site-b (one-time token)", t, r);

    let t = Instant::now();
    let r = async {
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
            "{name}: {} connection(s) from site-a, {} B a->b, {} B b->a",
            s.a_to_b.connections_total, s.a_to_b.bytes, s.b_to_a.bytes
        ))
    }
    .await;
    report.step("pairing crossed the link emulator", t, r);

    let t = Instant::now();
    let inv = async {
        let a_inv = inventory(&a, "a", 4).await?;
        let b_inv = inventory(&b, "b", 0).await?;
        Ok::<_, anyhow::Error>((a_inv, b_inv))
    }
    .await;
    let ((_, _, _, vms), (b_hosts, b_stores, b_pool, _)) = match inv {
        Ok(v) => {
            report.step(
                "create hosts, datastores, pools, 4 VMs",
                t,
                Ok("2 hosts per site, 8 volumes".into()),
            );
            v
        }
        Err(e) => {
            report.step("create hosts, datastores, pools, 4 VMs", t, Err(e));
            bail!("cannot go on without inventory");
        }
    };

    let t = Instant::now();
    let r = async {
        let vpg = VpgServiceClient::new(a.clone())
            .create_vpg(v1::CreateVpgRequest {
                id: "vpg-web".into(),
                spec: Some(vpg_spec(
                    "web-tier", &site_b_id, &vms, &b_hosts, &b_stores, &b_pool,
                )),
            })
            .await?
            .into_inner();
        let at_b = VpgServiceClient::new(b.clone())
            .get_vpg(v1::GetRequest { id: vpg.id.clone() })
            .await?
            .into_inner();
        let st = vpg.status.clone().unwrap_or_default();
        Ok(format!(
            "{} ({} VMs) gen {}: site-a {} / site-b {}; status {} / {}",
            vpg.name,
            vpg.vms.len(),
            vpg.generation,
            vpg.direction,
            at_b.direction,
            st.status,
            st.substatus
        ))
    }
    .await;
    report.step("create VPG a -> b, stored by both sites", t, r);

    let t = Instant::now();
    let r = async {
        let mut spec = vpg_spec(
            "too-big",
            &site_b_id,
            &vms[..0],
            &b_hosts,
            &b_stores,
            &b_pool,
        );
        spec.vms = vec![v1::VmPlacement {
            vm_id: vms[0].clone(),
            recovery_host_id: b_hosts[0].clone(),
            recovery_datastore_id: b_stores[0].clone(),
            recovery_pool_id: b_pool.clone(),
        }];
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

    // kill -9 of site-a's leader: a new leader, and the VPG is still there.
    let t = Instant::now();
    let r = async {
        let status = wait_leader(&lab.sites[0][0].api, 3, Duration::from_secs(5)).await?;
        let leader = status.leader_id;
        let idx = lab.sites[0].iter().position(|p| p.id == leader).context("leader not in lab")?;
        let killed_at = Instant::now();
        lab.sites[0][idx].kill9().await?;
        let survivor = lab.sites[0].iter().find(|p| p.id != leader).context("no survivor")?.api.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let new_leader = loop {
            if let Ok(s) = wait_leader(&survivor, 3, Duration::from_millis(500)).await
                && s.leader_id != leader
            {
                break s.leader_id;
            }
            if Instant::now() > deadline {
                bail!("no new leader within 10 s");
            }
        };
        let elected_ms = killed_at.elapsed().as_millis();
        let ch = channel(&[survivor]).await?;
        let vpgs = VpgServiceClient::new(ch).list_vpgs(v1::ListRequest {}).await?.into_inner();
        if vpgs.vpgs.len() != 1 {
            bail!("expected 1 VPG after failover, found {}", vpgs.vpgs.len());
        }
        lab.sites[0][idx].start("join").await?;
        lab.write_file()?;
        Ok(format!("killed leader {leader}; node {new_leader} leads after {elected_ms} ms; VPG intact; node {leader} restarted"))
    }
    .await;
    report.step("kill -9 site-a leader, new leader, state kept", t, r);

    let ch = channel(&lab.endpoints(0)).await?;
    let csv = VpgServiceClient::new(ch)
        .export_vpgs_csv(v1::ListRequest {})
        .await?
        .into_inner()
        .csv;
    println!("\nVPGs at site-a (CSV export):\n{csv}");
    Ok(())
}
