//! The VRA (replication appliance of one host), as a library behind the `tandem-vra`
//! binary.
//!
//! - [`model`]: validated domain types (assignments, stream entries) and wire conversions.
//! - [`window`] and [`fence`]: the sender's and the receiver's stream logic as pure state
//!   machines.
//! - [`protected`] and [`sender`]: the protected role (NBD volumes, replication buffer,
//!   checkpoint barrier, stream sender).
//! - [`bandwidth`]: the bandwidth limit of a site pair, shared by priority.
//! - [`pool`]: the VRA-wide replication buffer and which VPG gives it up first.
//! - [`dirty`] and [`sync`]: what still has to reach the recovery site (dirty map) and the
//!   syncer that sends it (bitmap, initial and delta sync), with pause and force sync.
//! - [`recovery`]: the recovery role (journals, receiver actor, acknowledgements,
//!   point-in-time images).
//! - [`hashes`]: block hashes and request checks of delta sync, shared by both roles.
//! - [`stood_down`]: a protected VPG its managers stood down (another site runs its VMs):
//!   no exports, no stream, the regions never acknowledged kept and counted.
//! - [`rates`]: per-second rates from cumulative counters, for status.
//! - [`vra`]: the registry of VPGs and the domain operations; [`service`]: thin tonic
//!   services over it; [`state`]: what survives a restart; [`connector`]: the outgoing
//!   connection seam; [`config`]: process configuration.
//! - `fuzz` (feature `fuzzing`): entry points of the replication fuzz targets in `fuzz/`.
//!
//! [`run`] serves a VRA on two bound listeners until its shutdown token is cancelled.

pub mod access;
pub mod bandwidth;
pub mod config;
pub mod connector;
pub mod dirty;
pub mod error;
pub mod fence;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod hashes;
pub mod model;
pub mod nbd_access;
pub mod pool;
pub mod protected;
mod ranges;
pub mod rates;
pub mod recovered;
pub mod recovery;
pub mod renewal;
pub mod sender;
pub mod service;
pub mod state;
pub mod stood_down;
pub mod sync;
pub mod trust;
pub mod vra;
pub mod window;

use std::path::PathBuf;

use anyhow::{Context, Result};
use tandem_nbd::{Exports, NbdServer, ServerConfig};
use tandem_proto::v1::{
    replication_server::ReplicationServer, vra_control_server::VraControlServer,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use error::{VraError, VraResult};
pub use vra::{Vra, VraSettings};

/// Largest NBD request payload the VRA accepts (a write becomes one journal record).
pub const NBD_MAX_PAYLOAD: u32 = 4 << 20;

/// What [`run`] needs besides its listeners.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The host id.
    pub host_id: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Replication buffer budget in bytes.
    pub buffer_bytes: u64,
    /// Where to write the bound addresses.
    pub addr_file: Option<PathBuf>,
    /// This VRA's certificate: mutual TLS on its gRPC listener and to other VRAs (None:
    /// `--insecure`, plaintext).
    pub tls: Option<tandem_tls::TlsConfig>,
}

/// How often failed journals are checked for a resolved cause.
const JOURNAL_HEAL_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves a VRA: `VraControl` and `Replication` on `control`, NBD on `nbd` (TLS required
/// unless the VRA runs without certificates) and on `nbd_local` (the local host), until
/// `shutdown` is cancelled; then stops every VPG and returns.
pub async fn run(
    config: RunConfig,
    control: TcpListener,
    nbd: TcpListener,
    nbd_local: tokio::net::UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    // Renewed certificates in the PKI directory are taken up while serving; the paired
    // sites' CAs come from the managers (kept in the data directory).
    let live_tls = config.tls.clone().map(tandem_tls::LiveTls::new);
    let trust = match &live_tls {
        Some(live) => Some(
            trust::PeerTrust::load(live.clone(), config.data_dir.join("trust.json"))
                .context("the paired sites' CAs")?,
        ),
        None => None,
    };
    let control_addr = control.local_addr()?.to_string();
    let nbd_addr = nbd.local_addr()?.to_string();
    let nbd_socket = nbd_local
        .local_addr()?
        .as_pathname()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let exports = Exports::new();
    let vra_cancel = shutdown.child_token();
    let vra = Vra::new(
        VraSettings {
            host_id: config.host_id.clone(),
            data_dir: config.data_dir.clone(),
            buffer_bytes: config.buffer_bytes,
        },
        exports.clone(),
        connector::Connector::default().with_tls(live_tls.clone()),
        vra_cancel,
    );
    vra.set_addresses(control_addr.clone(), nbd_addr.clone(), nbd_socket.clone());
    vra.restore().await.context("restoring assignments")?;

    let tasks = TaskTracker::new();
    let nbd_server = NbdServer::with_config(
        exports,
        ServerConfig {
            max_payload: NBD_MAX_PAYLOAD,
            ..ServerConfig::default()
        },
    );
    let nbd_server = match &live_tls {
        Some(live) => nbd_server.requiring_tls(nbd_access::NbdTls::new(live.clone())),
        None => {
            tracing::warn!(
                "INSECURE: the NBD port serves every export in plaintext to anyone who \
                 reaches it"
            );
            nbd_server
        }
    };
    let (nbd_shutdown, local_shutdown) = (shutdown.clone(), shutdown.clone());
    let local_server = nbd_server.clone();
    let nbd_task = tasks.spawn(async move { nbd_server.serve(nbd, nbd_shutdown).await });
    let nbd_local_task =
        tasks.spawn(async move { local_server.serve_unix(nbd_local, local_shutdown).await });

    let sessions = TaskTracker::new();
    let control_svc = VraControlServer::new(service::ControlService::new(
        vra.clone(),
        trust.clone(),
        live_tls
            .clone()
            .zip(trust.clone())
            .map(|(live, trust)| renewal::Renewal::new(live, trust)),
    ))
    .max_decoding_message_size(tandem_proto::MAX_MESSAGE_BYTES);
    let repl_svc = ReplicationServer::new(service::ReplicationService::new(
        vra.clone(),
        sessions.clone(),
    ))
    .max_decoding_message_size(sender::MAX_STREAM_MESSAGE)
    .max_encoding_message_size(sender::MAX_STREAM_MESSAGE);
    use tonic::server::NamedService;
    let (reflection, reflection_alpha) = tandem_proto::discovery::reflection(&[
        <VraControlServer<service::ControlService> as NamedService>::NAME,
        <ReplicationServer<service::ReplicationService> as NamedService>::NAME,
        tandem_proto::discovery::HEALTH,
    ])?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let grpc_shutdown = shutdown.clone();
    let (security, own_site) = match &live_tls {
        Some(live) => {
            let stop = shutdown.clone().cancelled_owned();
            let trust = trust.clone().expect("trust comes with TLS");
            tasks.spawn(tandem_tls::reload::keep_loaded(
                live.clone(),
                move |c| trust.adjust(c),
                stop,
            ));
            (
                tandem_proto::transport::Security::MutualTls {
                    tls: live.clone(),
                    // Which services each identity may call is the policy's (per call).
                    admit: std::sync::Arc::new(|_| true),
                },
                live.current().identity().site.clone(),
            )
        }
        None => (tandem_proto::transport::Security::Plain, String::new()),
    };
    let grpc_task = tasks.spawn(async move {
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            // Streams arrive in large DATA frames: with HTTP/2's 16 KiB default, each frame
            // over TLS became a full record and a 9-byte one (its header did not fit).
            .max_frame_size(Some(1 << 20))
            .layer(tandem_proto::peer_access::PeerCheckLayer::new(
                access::policy(own_site),
            ))
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(control_svc)
            .add_service(repl_svc)
            .serve_with_incoming_shutdown(
                tandem_proto::transport::incoming_with(control, security),
                grpc_shutdown.cancelled_owned(),
            )
            .await
    });
    tasks.spawn(
        vra.clone()
            .heal_failed_journals(JOURNAL_HEAL_EVERY, shutdown.clone()),
    );
    tasks.close();

    if let Some(path) = &config.addr_file {
        let json = serde_json::json!({
            "control": control_addr,
            "nbd": nbd_addr,
            "nbd_socket": nbd_socket,
            "host_id": config.host_id,
            "pid": std::process::id(),
        });
        state::write_atomic(path, json.to_string().as_bytes())?;
    }
    tracing::info!(host = %config.host_id, control = %control_addr, nbd = %nbd_addr, "vra started");

    shutdown.cancelled().await;
    tracing::info!("vra stopping");
    vra.shutdown().await;
    sessions.close();
    sessions.wait().await;
    let grpc = grpc_task.await.context("grpc server task")?;
    let nbd = nbd_task.await.context("nbd server task")?;
    let nbd_local = nbd_local_task.await.context("nbd socket server task")?;
    tasks.wait().await;
    grpc.context("grpc server")?;
    nbd.context("nbd server")?;
    nbd_local.context("nbd socket server")?;
    tracing::info!("vra stopped");
    Ok(())
}
