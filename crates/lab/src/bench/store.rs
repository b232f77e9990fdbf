//! The config-store benchmark: concurrent clients writing ~1 KiB definitions to a 3-node
//! Tandem site and, in the same run, ~1 KiB puts to a 3-node etcd on loopback, both with
//! TLS between clients and nodes and mutual TLS between nodes; prints throughput, p50/p99
//! commit latency and the ratios.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_testkit::yardstick::free_port;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tandem_proto::client::{ApiChannel as Channel, ApiConnector};
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient, host_service_client::HostServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, vm_service_client::VmServiceClient,
    vpg_service_client::VpgServiceClient,
};
use tokio::process::{Child, Command};

use tandem_testkit::lab::Lab;

/// Generated client of etcd's KV service (the subset in `proto/etcd_kv.proto`).
#[allow(clippy::all, missing_docs)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// Each client rewrites this many definitions in turn, so state size stays constant.
const KEYS_PER_CLIENT: u64 = 16;

/// What one workload achieved.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// The first error a client saw, if any.
    pub first_error: Option<String>,
}

impl Outcome {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    fn print(&self) {
        println!(
            "{:<34} {:>9.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} ops, {} errors, {:.1} s)",
            self.name,
            self.ops_per_sec(),
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.ops,
            self.errors,
            self.secs
        );
        if let Some(e) = &self.first_error {
            println!("{:<34} first error: {e}", "");
        }
    }
}

/// Runs `clients` tasks for `duration`, each calling `op(client, i)` in a loop.
async fn drive<F, Fut>(name: &str, clients: usize, duration: Duration, op: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let (mut ops, mut errors, mut i) = (0u64, 0u64, 0u64);
            let mut first = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(c, i).await {
                    Ok(()) => {
                        ops += 1;
                        let _ = h.record(t.elapsed().as_micros() as u64);
                    }
                    Err(e) => {
                        errors += 1;
                        first.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
                i += 1;
            }
            (h, ops, errors, first)
        }));
    }
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    let (mut ops, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        if let Ok((h, o, e, first)) = t.await {
            all.add(h).expect("same histogram bounds");
            ops += o;
            errors += e;
            first_error = first_error.or(first);
        }
    }
    Outcome {
        name: name.to_string(),
        ops,
        errors,
        secs: start.elapsed().as_secs_f64(),
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        first_error,
    }
}

/// A channel to a manager of the lab, with the lab's credentials (its token, over TLS).
async fn connect(addr: &str) -> Result<Channel> {
    connect_as(ApiConnector::default(), addr).await
}

async fn connect_as(connector: ApiConnector, addr: &str) -> Result<Channel> {
    Ok(connector
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
        .connect(&[addr.to_string()])
        .await?)
}

/// A 3-member etcd cluster on loopback, with TLS as Tandem's managers have it: clients
/// check the members' certificates, members authenticate each other (mutual TLS).
struct Etcd {
    children: Vec<Child>,
    clients: Vec<String>,
    /// How clients dial it: trusting its CA.
    connector: ApiConnector,
}

impl Etcd {
    async fn start(dir: &Path) -> Result<Self> {
        use tandem_tls::PeerIdentity;
        use tandem_tls::pki::{NODE_TTL, PkiDir, SiteCa};
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            peers.push(free_port()?);
            clients.push(free_port()?);
        }
        // One certificate for every member (they share an address), with the loopback IP
        // that etcd's members check when they dial each other.
        let ca = SiteCa::generate("bench-etcd")?;
        let pki = PkiDir::new(dir.join("pki"));
        let issued = ca.issue_for(
            &PeerIdentity::manager("bench-etcd", 1)?,
            NODE_TTL,
            &[std::net::Ipv4Addr::LOCALHOST.into()],
        )?;
        pki.install(ca.cert_pem(), &issued)?;
        let connector = ApiConnector::new(
            tandem_proto::client::Credentials::none().with_ca_file(&pki.ca_cert())?,
        );
        let cluster = (0..3)
            .map(|i| format!("e{i}=https://127.0.0.1:{}", peers[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        for i in 0..3 {
            let data = dir.join(format!("etcd-{i}"));
            std::fs::create_dir_all(&data)?;
            let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
            let child = Command::new("etcd")
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(&data)
                .arg("--cert-file")
                .arg(pki.node_cert())
                .arg("--key-file")
                .arg(pki.node_key())
                .arg("--peer-cert-file")
                .arg(pki.node_cert())
                .arg("--peer-key-file")
                .arg(pki.node_key())
                .arg("--peer-trusted-ca-file")
                .arg(pki.ca_cert())
                .arg("--peer-client-cert-auth")
                .args([
                    "--listen-client-urls",
                    &format!("https://127.0.0.1:{}", clients[i]),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("https://127.0.0.1:{}", clients[i]),
                ])
                .args([
                    "--listen-peer-urls",
                    &format!("https://127.0.0.1:{}", peers[i]),
                ])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("https://127.0.0.1:{}", peers[i]),
                ])
                .args([
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                ])
                .args([
                    "--initial-cluster-token",
                    "tandem-bench",
                    "--log-level",
                    "error",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("starting etcd (Debian package etcd-server)")?;
            children.push(child);
        }
        let clients: Vec<String> = clients.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = async {
                let mut kv = etcdserverpb::kv_client::KvClient::new(
                    connect_as(connector.clone(), &clients[0]).await?,
                );
                kv.put(etcdserverpb::PutRequest {
                    key: b"ready".to_vec(),
                    value: b"1".to_vec(),
                    ..Default::default()
                })
                .await?;
                anyhow::Ok(())
            }
            .await;
            if ok.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd cluster did not come up (see {}/etcd-*.log)",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Self {
            children,
            clients,
            connector,
        })
    }

    async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
    }
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i as u64 + seed) % 26) as u8)
        .collect()
}

/// A VM definition of about 1 KiB on the wire and in the log.
fn vm_def(id: String) -> v1::Vm {
    v1::Vm {
        name: id.clone(),
        id,
        host_id: "bench-h".into(),
        power: v1::PowerState::On as i32,
        memory_mib: 4096,
        cpus: 4,
        cpu_reservation_mhz: 100,
        memory_reservation_mib: 128,
        volumes: (0..10)
            .map(|u| v1::Volume {
                path: String::new(),
                controller: u / 15,
                unit: u % 15,
                size_bytes: 1 << 30,
                datastore_id: "bench-ds".into(),
            })
            .collect(),
        vpg_id: String::new(),
    }
}

/// Removes a directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the whole benchmark and prints the comparison.
pub async fn run(dir: Option<PathBuf>, clients: usize, secs: u64, rounds: usize) -> Result<()> {
    // A directory of our own making goes when the benchmark ends, however it ends (rounds
    // that fail or are interrupted left gigabytes of etcd and Raft data in /tmp).
    let _remove_on_exit;
    let dir = match dir {
        Some(d) => d,
        None => {
            let d = std::env::temp_dir().join(format!("tandem-bench-{}", std::process::id()));
            _remove_on_exit = RemoveOnDrop(d.clone());
            d
        }
    };
    std::fs::create_dir_all(&dir)?;
    let duration = Duration::from_secs(secs);
    println!(
        "config store benchmark: {clients} clients, {secs} s per workload, 3 nodes each, \
         loopback, {rounds} round(s) of etcd then tandem"
    );
    let mut all = Vec::new();
    for round in 0..rounds.max(1) {
        let here = dir.join(format!("round-{round}"));
        let (etcd_put, vm_put, vpg_put) = bench_round(&here, clients, duration).await?;
        println!("round {} of {}:", round + 1, rounds.max(1));
        let ratios = [&vm_put, &vpg_put].map(|o| {
            let r = (
                o.ops_per_sec() / etcd_put.ops_per_sec(),
                o.p99_us as f64 / etcd_put.p99_us.max(1) as f64,
            );
            println!(
                "ratio {:<28} throughput {:.2}x etcd, p99 {:.2}x etcd's",
                o.name, r.0, r.1
            );
            r
        });
        all.push(ratios);
        let _ = std::fs::remove_dir_all(&here);
    }
    if all.len() > 1 {
        println!();
        for (k, name) in [
            "tandem VM definition ~1 KiB",
            "tandem VPG edit (both sites)",
        ]
        .iter()
        .enumerate()
        {
            let mut tp: Vec<f64> = all.iter().map(|r| r[k].0).collect();
            let mut p99: Vec<f64> = all.iter().map(|r| r[k].1).collect();
            tp.sort_by(f64::total_cmp);
            p99.sort_by(f64::total_cmp);
            println!(
                "median of {} rounds: {name:<28} throughput {:.2}x etcd (min {:.2}x, max {:.2}x), \
                 p99 {:.2}x etcd's",
                all.len(),
                tp[tp.len() / 2],
                tp[0],
                tp[tp.len() - 1],
                p99[p99.len() / 2]
            );
        }
    }
    Ok(())
}

/// One round: etcd, then a fresh two-site lab, on the same disk.
async fn bench_round(
    dir: &std::path::Path,
    clients: usize,
    duration: Duration,
) -> Result<(Outcome, Outcome, Outcome)> {
    let etcd = Etcd::start(&dir.join("etcd")).await?;
    let mut etcd_kvs = Vec::new();
    for c in &etcd.clients {
        etcd_kvs.push(etcdserverpb::kv_client::KvClient::new(
            connect_as(etcd.connector.clone(), c).await?,
        ));
    }
    let value = Arc::new(payload(1024, 7));
    let kvs = Arc::new(etcd_kvs);
    let etcd_put = drive(
        "etcd put 1 KiB (rewrite)",
        clients,
        duration,
        move |c, i| {
            let mut kv = kvs[c % kvs.len()].clone();
            let value = value.clone();
            async move {
                kv.put(etcdserverpb::PutRequest {
                    key: format!("vm/{c}/{}", i % KEYS_PER_CLIENT).into_bytes(),
                    value: value.to_vec(),
                    ..Default::default()
                })
                .await?;
                Ok(())
            }
        },
    )
    .await;
    etcd_put.print();
    etcd.stop().await;

    let mut lab = Lab::up(&dir.join("lab"), 2, 3).await?;
    let result = tandem_workloads(&lab, clients, duration).await;
    lab.down().await;
    let (vm_put, vpg_put) = result?;
    Ok((etcd_put, vm_put, vpg_put))
}

async fn tandem_workloads(
    lab: &Lab,
    clients: usize,
    duration: Duration,
) -> Result<(Outcome, Outcome)> {
    let a_eps = lab.endpoints(0);
    let b_eps = lab.endpoints(1);
    let a = connect(&a_eps[0]).await?;
    let b = connect(&b_eps[0]).await?;
    let token = SiteServiceClient::new(b.clone())
        .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs: 600 })
        .await?
        .into_inner()
        .token;
    let peer = SiteServiceClient::new(a.clone())
        .pair_site(v1::PairSiteRequest {
            peer_endpoints: lab.internal_endpoints(1),
            peer_api_endpoints: lab.endpoints(1),
            token,
            ..Default::default()
        })
        .await?
        .into_inner();
    for (ch, site) in [(&a, "a"), (&b, "b")] {
        HostServiceClient::new(ch.clone())
            .create_host(v1::Host {
                id: "bench-h".into(),
                name: format!("{site}-bench"),
                vra_address: "127.0.0.1:9".into(),
                peer_vra_address: String::new(),
            })
            .await?;
        DatastoreServiceClient::new(ch.clone())
            .create_datastore(v1::Datastore {
                id: "bench-ds".into(),
                name: format!("{site}-ds"),
                host_id: "bench-h".into(),
                path: "/bench".into(),
                capacity_bytes: 1 << 60,
            })
            .await?;
    }
    ResourcePoolServiceClient::new(b.clone())
        .create_resource_pool(v1::ResourcePool {
            id: "bench-pool".into(),
            name: "bench".into(),
            cpu_mhz: 1 << 40,
            memory_mib: 1 << 40,
            storage_bytes: 1 << 60,
        })
        .await?;

    let mut chans = Vec::new();
    for e in &a_eps {
        chans.push(connect(e).await?);
    }
    let chans = Arc::new(chans);
    let vm_chans = chans.clone();
    for c in 0..clients {
        for k in 0..KEYS_PER_CLIENT {
            VmServiceClient::new(a.clone())
                .create_vm(vm_def(format!("vm-{c}-{k}")))
                .await?;
        }
    }
    let vm_put = drive(
        "tandem VM definition ~1 KiB",
        clients,
        duration,
        move |c, i| {
            let mut cl = VmServiceClient::new(vm_chans[c % vm_chans.len()].clone());
            let mut vm = vm_def(format!("vm-{c}-{}", i % KEYS_PER_CLIENT));
            vm.memory_mib = 4096 + i % 1024;
            async move {
                cl.update_vm(vm).await?;
                Ok(())
            }
        },
    )
    .await;
    vm_put.print();

    // One VPG per client, two VMs each; each op edits it (both sites store the new definition).
    let mut generations = Vec::new();
    let peer_id = peer.id.clone();
    let spec = move |c: usize, rpo: u64| v1::VpgSpec {
        name: format!("bench-vpg-{c}"),
        recovery_site_id: peer_id.clone(),
        settings: Some(v1::VpgSettings {
            target_rpo_secs: rpo,
            wan_compression: true,
            ..Default::default()
        }),
        vms: (0..2)
            .map(|k| v1::VmPlacement {
                vm_id: format!("vm-{c}-{k}"),
                recovery_host_id: "bench-h".into(),
                recovery_datastore_id: "bench-ds".into(),
                recovery_pool_id: "bench-pool".into(),
                preseeded: false,
            })
            .collect(),
    };
    for c in 0..clients {
        let g = VpgServiceClient::new(a.clone())
            .create_vpg(v1::CreateVpgRequest {
                id: format!("bench-vpg-{c}"),
                spec: Some(spec(c, 60)),
            })
            .await?
            .into_inner();
        generations.push(std::sync::atomic::AtomicU64::new(g.generation));
    }
    let generations = Arc::new(generations);
    let spec = Arc::new(spec);
    let vpg_put = drive(
        "tandem VPG edit (both sites)",
        clients,
        duration,
        move |c, i| {
            let mut cl = VpgServiceClient::new(chans[c % chans.len()].clone());
            let generations = generations.clone();
            let spec = spec(c, 60 + i % 600);
            async move {
                let id = format!("bench-vpg-{c}");
                let generation = generations[c].load(std::sync::atomic::Ordering::Relaxed);
                let updated = cl
                    .update_vpg(v1::UpdateVpgRequest {
                        id: id.clone(),
                        generation,
                        spec: Some(spec),
                        keep_removed_recovery_disks: false,
                    })
                    .await;
                match updated {
                    Ok(g) => {
                        let g = g.into_inner().generation;
                        generations[c].store(g, std::sync::atomic::Ordering::Relaxed);
                        Ok(())
                    }
                    Err(e) => {
                        // As an operator's client does: read the generation again (the
                        // failed edit may have committed), so one error stays one error.
                        if let Ok(v) = cl.get_vpg(v1::GetRequest { id }).await {
                            let g = v.into_inner().generation;
                            generations[c].store(g, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e.into())
                    }
                }
            }
        },
    )
    .await;
    vpg_put.print();
    Ok((vm_put, vpg_put))
}
