//! Listeners bounded by design, on real processes: thousands of idle connections to a
//! VRA's NBD port and to a manager's API port are shed (the oldest silent ones closed) or
//! refused, the server's descriptors stay bounded, and real clients keep being served.
//! Latencies are printed, not asserted (benchmarks measure speed).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_nbd::NbdClient;
use tandem_proto::v1;
use tandem_proto::v1::cluster_service_client::ClusterServiceClient;
use tandem_testkit::lab::Lab;
use tandem_tests::channel;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Idle connections opened to each port.
const IDLE: usize = 5000;

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Raises this process's descriptor limit to its hard limit (the idle connections need
/// twice `IDLE` of them); fails when that is not enough.
fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    if hard < (2 * IDLE + 1000) as u64 {
        bail!("the descriptor limit {hard} is below what {IDLE} idle connections per port need");
    }
    Ok(())
}

/// p50 and max of `n` timed runs of `op`, each within 10 s.
async fn timed<F, Fut>(what: &str, n: usize, mut op: F) -> Result<(Duration, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), op())
            .await
            .with_context(|| format!("{what}: not served within 10 s"))??;
        took.push(t.elapsed());
    }
    took.sort();
    Ok((took[n / 2], took[n - 1]))
}

/// Opens `n` TCP connections to `addr` that never speak.
async fn idle_connections(addr: &str, n: usize) -> Result<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(TcpStream::connect(addr).await?);
    }
    Ok(out)
}

/// How many of `conns` the server closed (EOF or reset when read).
async fn closed_by_server(conns: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for c in conns.iter_mut() {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_millis(20), c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed += 1;
                    break;
                }
                // The NBD greeting: keep reading.
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_are_shed_while_real_clients_are_served() -> Result<()> {
    raise_fd_limit()?;
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(dir.path(), 1, 1).await?;
    lab.start_vras(1).await?;
    let api = lab.sites[0][0].api.clone();
    // Idle connections fill the TCP port; real clients come over the local socket (the
    // TCP port wants TLS), through the same admission.
    let nbd = lab.vras[0][0].nbd.clone();
    let nbd_socket = lab.vras[0][0].nbd_socket.clone();
    let manager_pid = lab.sites[0][0].pid().context("manager pid")?;
    let vra_pid = lab.vras[0][0].pid().context("vra pid")?;

    let nbd_client = || {
        let nbd = nbd_socket.clone();
        async move {
            NbdClient::list_exports_at(&nbd).await?;
            Ok(())
        }
    };
    let grpc_client = || {
        let api = api.clone();
        async move {
            ClusterServiceClient::new(channel(&api).await?)
                .get_cluster_status(v1::GetClusterStatusRequest {})
                .await?;
            Ok(())
        }
    };
    // The VRA's control port answers standard health checks.
    let status =
        tonic_health::pb::health_client::HealthClient::new(lab.vras[0][0].control_channel().await?)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner()
            .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let nbd_before = timed("NBD", 20, nbd_client).await?;
    let grpc_before = timed("gRPC", 20, grpc_client).await?;
    let fds_before = (open_fds(vra_pid)?, open_fds(manager_pid)?);

    let mut idle_nbd = idle_connections(&nbd, IDLE).await?;
    let mut idle_api = idle_connections(&api, IDLE).await?;
    // Real clients, with every idle connection still open on this side.
    let nbd_during = timed("NBD", 20, nbd_client).await?;
    let grpc_during = timed("gRPC", 20, grpc_client).await?;
    let fds_during = (open_fds(vra_pid)?, open_fds(manager_pid)?);
    let closed = (
        closed_by_server(&mut idle_nbd).await,
        closed_by_server(&mut idle_api).await,
    );
    eprintln!(
        "{IDLE} idle connections per port: NBD list p50/max {:?}/{:?} before, {:?}/{:?} \
         during; gRPC p50/max {:?}/{:?} before, {:?}/{:?} during; descriptors (VRA, manager) \
         {fds_before:?} before, {fds_during:?} during; closed by the servers (NBD, gRPC) \
         {closed:?}",
        nbd_before.0,
        nbd_before.1,
        nbd_during.0,
        nbd_during.1,
        grpc_before.0,
        grpc_before.1,
        grpc_during.0,
        grpc_during.1,
    );
    // The servers hold a bounded number of them (the pending ones, 128 by default) and
    // closed the rest.
    let bound = 128 + 64;
    assert!(
        fds_during.0 < fds_before.0 + bound && fds_during.1 < fds_before.1 + bound,
        "descriptors grew with the idle connections: {fds_before:?} -> {fds_during:?}"
    );
    assert!(
        closed.0 >= IDLE - bound && closed.1 >= IDLE - bound,
        "idle connections kept open: {closed:?} of {IDLE} closed"
    );
    drop(idle_nbd);
    drop(idle_api);
    lab.down().await;
    Ok(())
}

/// The operator's port serves no manager-internal service: a plain client proposing a
/// command there (here, adding a rogue peer site, as a tester once did) is answered
/// UNIMPLEMENTED and the site records nothing; writes sent to a follower's API still reach
/// the leader (forwarded over the internal listener).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_port_serves_no_internal_service() -> Result<()> {
    use tandem_proto::v1::manager_internal_client::ManagerInternalClient;
    use tandem_proto::v1::site_service_client::SiteServiceClient;
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(dir.path(), 1, 3).await?;
    let rogue = serde_json::json!({ "AddPeer": { "peer": {
        "id": "site-rogue", "name": "rogue", "endpoints": ["127.0.0.1:9"], "paired_at_ms": 0
    }}});
    for m in &lab.sites[0] {
        let err = ManagerInternalClient::new(channel(&m.api).await?)
            .propose(v1::ProposeRequest {
                command_json: serde_json::to_vec(&rogue)?,
                ..Default::default()
            })
            .await
            .expect_err("the operator port took a manager-internal call");
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    }
    for m in &lab.sites[0] {
        let peers = SiteServiceClient::new(channel(&m.api).await?)
            .list_peers(v1::ListPeersRequest {})
            .await?
            .into_inner();
        assert!(peers.peers.is_empty(), "{peers:?}");
    }
    // Every node takes writes: a follower forwards them to the leader.
    for (i, m) in lab.sites[0].iter().enumerate() {
        tandem_proto::v1::resource_pool_service_client::ResourcePoolServiceClient::new(
            channel(&m.api).await?,
        )
        .create_resource_pool(v1::ResourcePool {
            id: format!("pool-{i}"),
            name: format!("pool-{i}"),
            cpu_mhz: 1000,
            memory_mib: 1024,
            storage_bytes: 1 << 30,
        })
        .await
        .with_context(|| format!("a write through node {}", m.id))?;
    }
    lab.down().await;
    Ok(())
}

/// gRPC health and reflection for standard clients: a manager's health is SERVING while it
/// knows a leader and NOT_SERVING once it cannot (two of three nodes killed); reflection
/// answers in v1 and in v1alpha (older grpcurl).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_leader_and_reflection_speaks_both_versions() -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(dir.path(), 1, 3).await?;
    let api = lab.sites[0][2].api.clone();
    let health = |api: String| async move {
        let r = HealthClient::new(channel(&api).await?)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        Ok::<_, anyhow::Error>(r.status)
    };
    // A node that just joined may not know the leader yet: SERVING once it does.
    let start = Instant::now();
    while health(api.clone()).await? != ServingStatus::Serving as i32 {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("not SERVING 30 s after the cluster came up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel(&api).await?)
        .server_reflection_info(tokio_stream::once(request))
        .await?
        .into_inner();
    let reply = replies.message().await?.context("no reflection reply")?;
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        bail!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "tandem.v1.VpgService"),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n == "tandem.v1.ManagerInternal"),
        "the operator port lists an internal service: {names:?}"
    );

    lab.sites[0][0].kill9().await?;
    lab.sites[0][1].kill9().await?;
    let start = Instant::now();
    while health(api.clone()).await? != ServingStatus::NotServing as i32 {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("still SERVING 30 s after losing its quorum");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lab.down().await;
    Ok(())
}
