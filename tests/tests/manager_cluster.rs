//! End-to-end tests of the site manager cluster over real `tandem-manager` processes on
//! loopback port 0: validation through the API, leader kill -9 under concurrent writers,
//! full restart, SIGSTOP of a node, and membership changes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient, host_service_client::HostServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, vm_service_client::VmServiceClient,
    vpg_service_client::VpgServiceClient,
};
use tandem_testkit::lab::{Lab, wait_leader};
use tandem_testkit::operator::cluster_client;
use tandem_testkit::process::ManagerProcess;
use tandem_tests::{any_channel, channel};
use tandem_tls::PeerIdentity;
use tonic::Code;

fn vm(id: &str, host: &str, ds: &str, volumes: u32) -> v1::Vm {
    v1::Vm {
        id: id.into(),
        name: id.into(),
        host_id: host.into(),
        power: v1::PowerState::On as i32,
        memory_mib: 2048,
        cpus: 2,
        cpu_reservation_mhz: 1000,
        memory_reservation_mib: 1024,
        volumes: (0..volumes)
            .map(|i| v1::Volume {
                path: String::new(),
                controller: i / 15,
                unit: i % 15,
                size_bytes: 1 << 30,
                datastore_id: ds.into(),
            })
            .collect(),
        vpg_id: String::new(),
    }
}

async fn host_and_ds(
    ch: &tandem_proto::client::ApiChannel,
    prefix: &str,
    capacity: u64,
) -> Result<()> {
    HostServiceClient::new(ch.clone())
        .create_host(v1::Host {
            id: format!("{prefix}-h"),
            name: format!("{prefix}-h"),
            vra_address: "127.0.0.1:9100".into(),
            peer_vra_address: String::new(),
        })
        .await?;
    DatastoreServiceClient::new(ch.clone())
        .create_datastore(v1::Datastore {
            id: format!("{prefix}-ds"),
            name: format!("{prefix}-ds"),
            host_id: format!("{prefix}-h"),
            path: format!("/data/{prefix}"),
            capacity_bytes: capacity,
        })
        .await?;
    Ok(())
}

fn spec(name: &str, site: &str, vms: &[&str], pool: &str) -> v1::VpgSpec {
    v1::VpgSpec {
        name: name.into(),
        recovery_site_id: site.into(),
        settings: None,
        vms: vms
            .iter()
            .map(|v| v1::VmPlacement {
                vm_id: v.to_string(),
                recovery_host_id: "b-h".into(),
                recovery_datastore_id: "b-ds".into(),
                recovery_pool_id: pool.into(),
                preseeded: false,
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_validate_every_rule_and_keep_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(dir.path(), 2, 1).await?;
    let a = channel(&lab.sites[0][0].api).await?;
    let b = channel(&lab.sites[1][0].api).await?;

    // Pairing: a token works once.
    let token = SiteServiceClient::new(b.clone())
        .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs: 60 })
        .await?
        .into_inner();
    let peer = SiteServiceClient::new(a.clone())
        .pair_site(v1::PairSiteRequest {
            peer_endpoints: lab.internal_endpoints(1),
            peer_api_endpoints: lab.endpoints(1),
            token: token.token.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(peer.name, "site-b");
    let again = SiteServiceClient::new(a.clone())
        .pair_site(v1::PairSiteRequest {
            peer_endpoints: lab.internal_endpoints(1),
            peer_api_endpoints: lab.endpoints(1),
            token: token.token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    let site_b = peer.id;

    host_and_ds(&a, "a", 1 << 40).await?;
    host_and_ds(&b, "b", 100 << 30).await?;
    let mut pools = ResourcePoolServiceClient::new(b.clone());
    pools
        .create_resource_pool(v1::ResourcePool {
            id: "big".into(),
            name: "big".into(),
            cpu_mhz: 10_000,
            memory_mib: 16_384,
            storage_bytes: 1 << 40,
        })
        .await?;
    pools
        .create_resource_pool(v1::ResourcePool {
            id: "tiny".into(),
            name: "tiny".into(),
            cpu_mhz: 500,
            memory_mib: 512,
            storage_bytes: 1 << 40,
        })
        .await?;
    let mut vms = VmServiceClient::new(a.clone());
    for id in ["vm1", "vm2", "vm3"] {
        vms.create_vm(vm(id, "a-h", "a-ds", 2)).await?;
    }
    // 4 controllers x 15 volumes fit; 61 do not.
    vms.create_vm(vm("vm60", "a-h", "a-ds", 60)).await?;
    let e = vms
        .create_vm(vm("vm61", "a-h", "a-ds", 61))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("4 SCSI controllers x 15 volumes"),
        "{}",
        e.message()
    );
    // Unknown references and ids.
    let e = vms
        .create_vm(vm("vmx", "nohost", "a-ds", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("host_id"), "{}", e.message());
    let e = vms
        .get_vm(v1::GetRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = vms
        .get_vm(v1::GetRequest {
            id: "bad id!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = vms
        .create_vm(vm("vm1", "a-h", "a-ds", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    let mut vpgs = VpgServiceClient::new(a.clone());
    let created = vpgs
        .create_vpg(v1::CreateVpgRequest {
            id: "g1".into(),
            spec: Some(spec("web", &site_b, &["vm1", "vm2"], "big")),
        })
        .await?
        .into_inner();
    assert_eq!(created.generation, 1);
    assert_eq!(created.status.as_ref().unwrap().status, "Initializing");
    // Both sites hold the definition.
    let at_b = VpgServiceClient::new(b.clone())
        .get_vpg(v1::GetRequest { id: "g1".into() })
        .await?
        .into_inner();
    assert_eq!(at_b.direction, "incoming");

    let refused = |name: &str, s: v1::VpgSpec| {
        let mut c = vpgs.clone();
        let name = name.to_string();
        async move {
            let e = c
                .create_vpg(v1::CreateVpgRequest {
                    id: String::new(),
                    spec: Some(s),
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
            e.message().to_string()
        }
    };
    // A VM in at most one VPG.
    let m = refused("vm twice", spec("other", &site_b, &["vm1"], "big")).await;
    assert!(m.contains("already protected"), "{m}");
    // VPG names unique per site pair.
    let m = refused("same name", spec("web", &site_b, &["vm3"], "big")).await;
    assert!(m.contains("already used"), "{m}");
    // The recovery pool holds the reservations.
    let m = refused("tiny pool", spec("p", &site_b, &["vm3"], "tiny")).await;
    assert!(m.contains("cannot hold the reservations"), "{m}");
    // Recovery datastores have room (60 GiB of disks + journal on a 100 GiB datastore, with
    // 2 x 2 GiB x 2 already committed).
    let m = refused("no room", spec("room", &site_b, &["vm60"], "big")).await;
    assert!(m.contains("has no room"), "{m}");
    // History bounds and warning below hard limit.
    let mut s = spec("h", &site_b, &["vm3"], "big");
    s.settings = Some(v1::VpgSettings {
        journal_history_secs: 60,
        ..Default::default()
    });
    assert!(refused("history", s).await.contains("journal_history_secs"));
    let mut s = spec("w", &site_b, &["vm3"], "big");
    let pct = |p| {
        Some(v1::JournalLimit {
            limit: Some(v1::journal_limit::Limit::Percent(p)),
        })
    };
    s.settings = Some(v1::VpgSettings {
        journal_hard_limit: pct(10),
        journal_warning: pct(20),
        ..Default::default()
    });
    assert!(refused("warning", s).await.contains("below the hard limit"));
    // Unpaired recovery site.
    assert!(
        refused("unpaired", spec("u", "site-zzz", &["vm3"], "big"))
            .await
            .contains("not paired")
    );
    // Unknown VM.
    assert!(
        refused("unknown vm", spec("u", &site_b, &["ghost"], "big"))
            .await
            .contains("does not exist")
    );
    // Oversized request: over the message limit.
    let huge = spec(&"x".repeat(5 << 20), &site_b, &["vm3"], "big");
    let e = vpgs
        .create_vpg(v1::CreateVpgRequest {
            id: String::new(),
            spec: Some(huge),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::ResourceExhausted | Code::InvalidArgument | Code::OutOfRange
        ),
        "{e:?}"
    );

    // Edits carry their generation; a stale one is ABORTED.
    let updated = vpgs
        .update_vpg(v1::UpdateVpgRequest {
            id: "g1".into(),
            generation: 1,
            spec: Some(spec("web", &site_b, &["vm1", "vm2", "vm3"], "big")),
            keep_removed_recovery_disks: false,
        })
        .await?
        .into_inner();
    assert_eq!(updated.generation, 2);
    let e = vpgs
        .update_vpg(v1::UpdateVpgRequest {
            id: "g1".into(),
            generation: 1,
            spec: Some(spec("web", &site_b, &["vm1"], "big")),
            keep_removed_recovery_disks: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    // A protected VM cannot be deleted; CSV export lists the VPG.
    assert_eq!(
        vms.delete_vm(v1::DeleteRequest { id: "vm1".into() })
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let csv = vpgs
        .export_vpgs_csv(v1::ListRequest {})
        .await?
        .into_inner()
        .csv;
    assert!(csv.lines().nth(1).unwrap().contains("web"), "{csv}");
    // Delete starts on both sites; with no VRA to confirm it (this lab runs none) it can
    // only be forced, at each site; the cluster still serves.
    vpgs.delete_vpg(v1::DeleteVpgRequest {
        id: "g1".into(),
        keep_recovery_disks: false,
        force: false,
    })
    .await?;
    for ch in [&a, &b] {
        let g = VpgServiceClient::new(ch.clone())
            .get_vpg(v1::GetRequest { id: "g1".into() })
            .await?
            .into_inner();
        assert_eq!(g.status.map(|s| s.status), Some("Deleting".into()));
    }
    for ch in [&b, &a] {
        VpgServiceClient::new(ch.clone())
            .delete_vpg(v1::DeleteVpgRequest {
                id: "g1".into(),
                keep_recovery_disks: false,
                force: true,
            })
            .await?;
        let e = VpgServiceClient::new(ch.clone())
            .get_vpg(v1::GetRequest { id: "g1".into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    assert_eq!(
        vms.list_vms(v1::ListRequest {})
            .await?
            .into_inner()
            .vms
            .len(),
        4
    );
    lab.down().await;
    Ok(())
}

/// Every VM and VPG id on the node at `api`, read through that node.
async fn vm_ids(api: &str) -> Result<BTreeSet<String>> {
    let ch = channel(api).await?;
    let vms = VmServiceClient::new(ch.clone())
        .list_vms(v1::ListRequest {})
        .await?
        .into_inner();
    let vpgs = VpgServiceClient::new(ch)
        .list_vpgs(v1::ListRequest {})
        .await?
        .into_inner();
    Ok(vms
        .vms
        .into_iter()
        .map(|v| v.id)
        .chain(vpgs.vpgs.into_iter().map(|g| g.id))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_under_16_writers_loses_no_acknowledged_write_and_restart_keeps_state()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    // Site b recovers the VPGs that the writers define at site a.
    let mut lab = Lab::up(dir.path(), 2, 3).await?;
    let apis = lab.endpoints(0);
    let ch = any_channel(&apis).await?;
    let b = any_channel(&lab.endpoints(1)).await?;
    host_and_ds(&ch, "a", 1 << 50).await?;
    host_and_ds(&b, "b", 1 << 50).await?;
    ResourcePoolServiceClient::new(b.clone())
        .create_resource_pool(v1::ResourcePool {
            id: "big".into(),
            name: "big".into(),
            cpu_mhz: 1 << 40,
            memory_mib: 1 << 40,
            storage_bytes: 1 << 60,
        })
        .await?;
    let token = SiteServiceClient::new(b.clone())
        .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs: 60 })
        .await?
        .into_inner()
        .token;
    let site_b = SiteServiceClient::new(ch.clone())
        .pair_site(v1::PairSiteRequest {
            peer_endpoints: lab.internal_endpoints(1),
            peer_api_endpoints: lab.endpoints(1),
            token,
            ..Default::default()
        })
        .await?
        .into_inner()
        .id;

    let status = wait_leader(&apis[0], 3, Duration::from_secs(10)).await?;
    let leader = status.leader_id;
    let followers: Vec<String> = lab.sites[0]
        .iter()
        .filter(|p| p.id != leader)
        .map(|p| p.api.clone())
        .collect();

    // 16 writers, each against a follower (writes are forwarded to the leader).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..16 {
        let api = followers[w % followers.len()].clone();
        let stop = stop.clone();
        let site_b = site_b.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 5000 {
                let id = format!("w{w}-{i}");
                i += 1;
                let r = async {
                    let ch = channel(&api).await?;
                    VmServiceClient::new(ch.clone())
                        .create_vm(vm(&id, "a-h", "a-ds", 1))
                        .await?;
                    anyhow::Ok(ch)
                }
                .await;
                match r {
                    Ok(ch) => {
                        acked.push(id.clone());
                        // Every fourth VM also gets a VPG of its own.
                        if i % 4 == 0 {
                            let vpg = format!("g-{id}");
                            let created = VpgServiceClient::new(ch)
                                .create_vpg(v1::CreateVpgRequest {
                                    id: vpg.clone(),
                                    spec: Some(spec(&vpg, &site_b, &[id.as_str()], "big")),
                                })
                                .await;
                            match created {
                                Ok(_) => acked.push(vpg),
                                Err(_) => failed.push(vpg),
                            }
                        }
                    }
                    Err(_) => {
                        failed.push(id);
                        // Back off a little, as a client would, while there is no leader.
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }
            }
            (acked, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let idx = lab.sites[0].iter().position(|p| p.id == leader).unwrap();
    let killed = Instant::now();
    lab.sites[0][idx].kill9().await?;
    let new_leader = loop {
        if let Ok(s) = wait_leader(&followers[0], 1, Duration::from_millis(200)).await
            && s.leader_id != leader
            && s.leader_id != 0
        {
            break s.leader_id;
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "no new leader");
    };
    let elected = killed.elapsed();
    println!("new leader {new_leader} after {elected:?}");
    assert!(
        elected < Duration::from_secs(3),
        "new leader took {elected:?}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    let mut failed = BTreeSet::new();
    for w in writers {
        let (a, f) = w.await?;
        acked.extend(a);
        failed.extend(f);
    }
    assert!(
        acked.len() > 50,
        "too few writes acknowledged: {}",
        acked.len()
    );

    // The killed node comes back and catches up.
    lab.sites[0][idx].start("join").await?;
    wait_leader(&lab.sites[0][idx].api, 3, Duration::from_secs(10)).await?;
    let mut views = Vec::new();
    for p in &lab.sites[0] {
        views.push(vm_ids(&p.api).await?);
    }
    for v in &views {
        assert_eq!(v, &views[0], "nodes disagree");
        for id in &acked {
            assert!(v.contains(id), "acknowledged write {id} lost");
        }
    }
    // A VPG committed at its protected site is held by its recovery site too.
    let at_b = vm_ids(&lab.sites[1][0].api).await?;
    for id in views[0].iter().filter(|id| id.starts_with("g-")) {
        assert!(at_b.contains(id), "VPG {id} missing at the recovery site");
    }
    println!(
        "{} acknowledged, {} failed (each present or absent as a whole)",
        acked.len(),
        failed.len()
    );

    // Stop all three, start them again: the same state everywhere.
    for p in lab.sites[0].iter_mut() {
        p.stop(Duration::from_secs(10)).await?;
    }
    for p in lab.sites[0].iter_mut() {
        p.start("join").await?;
    }
    wait_leader(&lab.sites[0][0].api, 3, Duration::from_secs(15)).await?;
    for p in &lab.sites[0] {
        assert_eq!(
            vm_ids(&p.api).await?,
            views[0],
            "state differs after restart"
        );
    }
    lab.down().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_is_left_behind_then_catches_up_and_membership_grows_and_shrinks() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(dir.path(), 1, 1).await?;
    let first = lab.sites[0][0].api.clone();
    let ch = channel(&first).await?;
    host_and_ds(&ch, "a", 1 << 50).await?;
    let mut vms = VmServiceClient::new(ch.clone());

    // Grow 1 -> 3 while writing.
    let mut added = Vec::new();
    for id in 2..=3u64 {
        let mut p = ManagerProcess {
            id,
            site: "site-a".into(),
            api: String::new(),
            raft: String::new(),
            dir: dir.path().join(format!("extra-{id}")),
            child: None,
            env: Vec::new(),
            admin_token_file: None,
        };
        let site_id = lab.site_id(0).context("site id")?.to_string();
        lab.provision(
            0,
            &PeerIdentity::manager(&site_id, id)?,
            &p.dir.join("data"),
        )?;
        p.start("join").await?;
        vms.create_vm(vm(&format!("grow-{id}"), "a-h", "a-ds", 1))
            .await?;
        cluster_client(&first)
            .await?
            .add_node(v1::AddNodeRequest {
                id,
                api_addr: p.api.clone(),
                raft_addr: p.raft.clone(),
                voter: true,
            })
            .await?;
        added.push(p);
    }
    let s = wait_leader(&first, 3, Duration::from_secs(10)).await?;
    assert_eq!(s.nodes.iter().filter(|n| n.voter).count(), 3);

    // SIGSTOP one follower: the others go on; SIGCONT: it catches up.
    let stopped = &added[1];
    stopped.signal(Signal::SIGSTOP)?;
    for i in 0..20 {
        vms.create_vm(vm(&format!("while-stopped-{i}"), "a-h", "a-ds", 1))
            .await?;
    }
    stopped.signal(Signal::SIGCONT)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(ids) = vm_ids(&stopped.api).await
            && ids.contains("while-stopped-19")
        {
            break;
        }
        assert!(Instant::now() < deadline, "stopped node did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Shrink 3 -> 1 while writing.
    for p in &added {
        vms.create_vm(vm(&format!("shrink-{}", p.id), "a-h", "a-ds", 1))
            .await?;
        cluster_client(&first)
            .await?
            .remove_node(v1::NodeRequest { id: p.id })
            .await?;
    }
    // The leader's metrics show the final membership shortly after the change commits.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = wait_leader(&first, 1, Duration::from_secs(10)).await?;
        if s.nodes.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "membership did not shrink to 1: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    vms.create_vm(vm("after-shrink", "a-h", "a-ds", 1)).await?;
    assert!(vm_ids(&first).await?.contains("after-shrink"));
    for p in added.iter_mut() {
        p.stop(Duration::from_secs(5)).await?;
    }
    lab.down().await;
    Ok(())
}
