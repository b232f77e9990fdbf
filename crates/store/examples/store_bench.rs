//! Store-level write benchmark: an in-process cluster of sled nodes on loopback, N concurrent
//! proposers, throughput and commit latency percentiles. Not a test.
//!
//! `cargo run --release -p tandem-store --example store_bench -- [nodes] [clients] [seconds] [sled|memory]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_core::ids::HostId;
use tandem_core::inventory::Host;
use tandem_core::state::Command;
use tandem_store::{ProposeError, SiteStore, StorageKind, StoreConfig, Transport};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let nodes = arg(1, 3);
    let clients = arg(2, 64);
    let seconds = arg(3, 10);
    let dir = tempfile::TempDir::new().expect("temp dir");

    let mut stores = BTreeMap::new();
    let mut servers = Vec::new();
    for id in 1..=nodes {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let storage = if std::env::args().nth(4).as_deref() == Some("memory") {
            StorageKind::Memory
        } else {
            StorageKind::Sled {
                dir: dir.path().join(format!("node-{id}")),
            }
        };
        let config = StoreConfig::new(id, addr, format!("api-{id}:1"), storage);
        let store = SiteStore::open(config, Transport::default())
            .await
            .expect("open");
        let (stop, stopped) = oneshot::channel::<()>();
        let grpc = store.grpc();
        servers.push((
            stop,
            tokio::spawn(async move {
                let _ = grpc
                    .serve(listener, async {
                        let _ = stopped.await;
                    })
                    .await;
            }),
        ));
        stores.insert(id, store);
    }
    let members = stores.iter().map(|(id, s)| (*id, s.node_info())).collect();
    stores[&1].initialize(members).await.expect("initialize");
    let leader = stores[&1]
        .wait_for(Duration::from_secs(10), "leader", |m| m.leader_id.is_some())
        .await
        .expect("leader")
        .leader_id
        .expect("leader id");
    let leader = Arc::new(stores[&leader].clone());

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let leader = leader.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let cmd = Command::PutHost {
                    host: Host {
                        id: HostId::minted(format!("c{c}-{i}")),
                        name: format!("client-{c}-host-{i}"),
                        vra_address: "10.0.0.1:4000".into(),
                        peer_vra_address: String::new(),
                    },
                    create: true,
                };
                let start = Instant::now();
                match leader.propose(cmd).await {
                    Ok(_) => latencies.push(start.elapsed()),
                    Err(ProposeError::Timeout(_)) => {}
                    Err(e) => panic!("proposal failed: {e}"),
                }
                i += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "nodes={nodes} clients={clients} seconds={seconds} writes={} throughput={:.0}/s p50={:?} p99={:?}",
        all.len(),
        all.len() as f64 / seconds as f64,
        pct(0.50),
        pct(0.99)
    );
    for store in stores.values() {
        store.shutdown().await.expect("shutdown");
    }
    for (stop, server) in servers {
        let _ = stop.send(());
        server.await.expect("server");
    }
}
