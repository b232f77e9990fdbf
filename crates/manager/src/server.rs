//! Assembles the node's two gRPC servers on their injected listeners, split by audience:
//! the API (operator services, health, reflection) and the internal one (Raft and the
//! forwarding to the leader for the site's members; `SitePeer` for its paired sites),
//! which the operator's port never serves. One access layer over both decides, per call,
//! who may call what.

use std::time::Duration;

use anyhow::Result;
use tandem_proto::MAX_MESSAGE_BYTES;
use tandem_proto::v1::{
    cluster_service_server::ClusterServiceServer, datastore_service_server::DatastoreServiceServer,
    enrollment_server::EnrollmentServer, host_service_server::HostServiceServer,
    manager_internal_server::ManagerInternalServer,
    monitoring_service_server::MonitoringServiceServer, pairing_server::PairingServer,
    recovery_service_server::RecoveryServiceServer,
    resource_pool_service_server::ResourcePoolServiceServer, site_peer_server::SitePeerServer,
    site_service_server::SiteServiceServer, task_service_server::TaskServiceServer,
    token_service_server::TokenServiceServer, vm_service_server::VmServiceServer,
    vpg_service_server::VpgServiceServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::Server;

use crate::api::{
    cluster::ClusterApi,
    enroll::EnrollmentApi,
    internal::{InternalApi, PeerApi},
    inventory::InventoryApi,
    monitoring::MonitoringApi,
    recovery::RecoveryApi,
    site::{PairingApi, SiteApi},
    tasks::TaskApi,
    tokens::TokenApi,
    vpg::VpgApi,
};
use crate::site::SiteManager;

macro_rules! limited {
    ($server:ident, $svc:expr) => {
        $server::new($svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
}

/// Serves the site's members and its paired sites on `listener` (the Raft listener) until
/// `shutdown` fires: Raft, and the forwarding of writes, reads and leader calls to the
/// leader, for members; `SitePeer` for paired sites' managers.
pub async fn serve_internal(
    listener: TcpListener,
    security: tandem_proto::transport::Security,
    raft: tandem_proto::v1::raft_server::RaftServer<tandem_store::RaftGrpc>,
    site: SiteManager,
    trail: crate::access::AuditTrail,
    shutdown: CancellationToken,
) -> Result<()> {
    Server::builder()
        .layer(crate::access::AccessLayer::new(
            site.clone(),
            trail,
            crate::access::Listener::Internal,
        ))
        .add_service(raft)
        .add_service(limited!(ManagerInternalServer, InternalApi(site.clone())))
        .add_service(limited!(SitePeerServer, PeerApi(site)))
        .serve_with_incoming_shutdown(
            tandem_proto::transport::incoming_with(listener, security),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// Keeps the node's gRPC health (overall, and of the VPG service) SERVING while it knows a
/// leader and NOT_SERVING while it does not (a write would fail), until `shutdown`.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    site: SiteManager,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    let mut metrics = site.node().store().watch_metrics();
    let mut shown = None;
    loop {
        let status = if site.node().store().metrics().leader.is_some() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if shown != Some(status) {
            health.set_service_status("", status).await;
            health
                .set_service_status(<VpgServiceServer<VpgApi> as NamedService>::NAME, status)
                .await;
            shown = Some(status);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = metrics.changed() => if r.is_err() { return },
        }
    }
}

/// Serves the API on `listener` until `shutdown` fires: over TLS with the node's
/// certificate (operators bring tokens; a joining node or pairing site its one-time
/// token), or plaintext under `--insecure`.
pub async fn serve_api(
    listener: TcpListener,
    security: tandem_proto::transport::Security,
    site: SiteManager,
    trail: crate::access::AuditTrail,
    shutdown: CancellationToken,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(health, site.clone(), shutdown.clone()));
    let (reflection, reflection_alpha) = tandem_proto::discovery::reflection(&[
        <SiteServiceServer<SiteApi> as NamedService>::NAME,
        <HostServiceServer<InventoryApi> as NamedService>::NAME,
        <DatastoreServiceServer<InventoryApi> as NamedService>::NAME,
        <ResourcePoolServiceServer<InventoryApi> as NamedService>::NAME,
        <VmServiceServer<InventoryApi> as NamedService>::NAME,
        <VpgServiceServer<VpgApi> as NamedService>::NAME,
        <ClusterServiceServer<ClusterApi> as NamedService>::NAME,
        <MonitoringServiceServer<MonitoringApi> as NamedService>::NAME,
        <TaskServiceServer<TaskApi> as NamedService>::NAME,
        <RecoveryServiceServer<RecoveryApi> as NamedService>::NAME,
        <TokenServiceServer<TokenApi> as NamedService>::NAME,
        <EnrollmentServer<EnrollmentApi> as NamedService>::NAME,
        <PairingServer<PairingApi> as NamedService>::NAME,
        tandem_proto::discovery::HEALTH,
    ])?;
    let inventory = InventoryApi(site.clone());
    Server::builder()
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .layer(crate::access::AccessLayer::new(
            site.clone(),
            trail,
            crate::access::Listener::Operator,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(limited!(SiteServiceServer, SiteApi(site.clone())))
        .add_service(limited!(HostServiceServer, inventory.clone()))
        .add_service(limited!(DatastoreServiceServer, inventory.clone()))
        .add_service(limited!(ResourcePoolServiceServer, inventory.clone()))
        .add_service(limited!(VmServiceServer, inventory))
        .add_service(limited!(VpgServiceServer, VpgApi(site.clone())))
        .add_service(limited!(ClusterServiceServer, ClusterApi(site.clone())))
        .add_service(limited!(
            MonitoringServiceServer,
            MonitoringApi(site.clone())
        ))
        .add_service(limited!(TaskServiceServer, TaskApi(site.clone())))
        .add_service(limited!(RecoveryServiceServer, RecoveryApi(site.clone())))
        .add_service(limited!(TokenServiceServer, TokenApi(site.clone())))
        .add_service(limited!(PairingServer, PairingApi(site.clone())))
        .add_service(limited!(EnrollmentServer, EnrollmentApi(site)))
        .serve_with_incoming_shutdown(
            tandem_proto::transport::incoming_with(listener, security),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}
