//! The site manager node: configuration, the replicated store, the API services and the
//! site's operations.

pub mod access;
pub mod api;
pub mod audit_digest;
pub mod ca_rotation;
pub mod config;
pub mod control;
pub mod enroll;
pub mod error;
pub mod failpoint;
pub mod net;
pub mod node;
pub mod rate_limit;
pub mod recovery;
pub mod server;
pub mod site;
pub mod tls_refresh;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use tandem_store::{NodeInfo, SiteStore, StorageKind, StoreConfig, Transport};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Bootstrap, Config};
use crate::node::ManagerNode;
use crate::site::SiteManager;

/// Runs a node on already bound listeners until `shutdown` fires.
pub async fn run(
    config: Config,
    api_listener: TcpListener,
    raft_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let api_addr = config
        .api_advertise
        .clone()
        .unwrap_or(api_listener.local_addr()?.to_string());
    let raft_addr = config
        .raft_advertise
        .clone()
        .unwrap_or(raft_listener.local_addr()?.to_string());
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    // The replicated state holds the site CA's key: the data directory is the owner's only.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", config.data_dir.display()))?;
    }
    // Renewed certificates in the PKI directory are taken up while serving (tls_refresh::keep_tls).
    let tls = member_tls(&config).await?.map(tandem_tls::LiveTls::new);

    let mut store_config = StoreConfig::new(
        config.node_id,
        raft_addr.clone(),
        api_addr.clone(),
        StorageKind::Sled {
            dir: config.data_dir.join("raft"),
        },
    );
    store_config.heartbeat_interval = std::time::Duration::from_millis(config.heartbeat_ms);
    store_config.election_timeout_min =
        std::time::Duration::from_millis(config.election_timeout_min_ms);
    store_config.election_timeout_max =
        std::time::Duration::from_millis(config.election_timeout_max_ms);
    let mut transport = Transport::default();
    if let Some(tls) = &tls {
        transport.connector = std::sync::Arc::new(tandem_store::TlsConnector {
            base: tandem_store::TcpConnector::default(),
            tls: tls.clone(),
        });
    }
    let store = SiteStore::open(store_config, transport)
        .await
        .context("opening the store")?;

    let tasks = tokio_util::task::TaskTracker::new();
    let raft_server = store.grpc().into_server();
    let connector = net::Connector::default().with_site_tls(tls.clone());
    let node = Arc::new(ManagerNode::new(
        store,
        connector.clone(),
        raft_addr.clone(),
    ));
    let site = SiteManager::new(node.clone(), connector)
        .with_cert_ttl(std::time::Duration::from_secs(config.cert_ttl_secs));
    let site_id = tls.as_ref().map(|t| t.current().identity().site.clone());
    // The operator port presents the node's certificate; the internal one requires a
    // client certificate of this site's CA or a paired site's (their managers call it),
    // so nothing past the handshake is reachable without one; which identity may call
    // what is the access layer's, per call.
    let (api_security, internal_security) = match &tls {
        Some(member) => {
            let with_peers = tandem_tls::LiveTls::new(member.current());
            tasks.spawn(tls_refresh::keep_tls(
                node.clone(),
                member.clone(),
                with_peers.clone(),
                shutdown.clone(),
            ));
            tasks.spawn(enroll::keep_renewed(
                site.clone(),
                member.clone(),
                tandem_tls::pki::PkiDir::new(config.pki_path()),
                shutdown.clone(),
            ));
            (
                tandem_proto::transport::Security::ServerTls {
                    tls: member.clone(),
                },
                tandem_proto::transport::Security::MutualTls {
                    tls: with_peers,
                    admit: std::sync::Arc::new(|_| true),
                },
            )
        }
        None => (
            tandem_proto::transport::Security::Plain,
            tandem_proto::transport::Security::Plain,
        ),
    };
    let (trail, trail_writer) = access::AuditTrail::start(site.clone(), shutdown.clone());
    // Detached, as before: at shutdown it writes what is queued once, best effort.
    tokio::spawn(trail_writer);
    let (internal_site, internal_shutdown, internal_trail) =
        (site.clone(), shutdown.clone(), trail.clone());
    tasks.spawn(async move {
        let served = server::serve_internal(
            raft_listener,
            internal_security,
            raft_server,
            internal_site,
            internal_trail,
            internal_shutdown,
        );
        if let Err(e) = served.await {
            tracing::error!(error = %e, "internal server failed");
        }
    });
    tasks.spawn(control::run(site.clone(), shutdown.clone()));
    let api_shutdown = shutdown.clone();
    let api_site = site.clone();
    tasks.spawn(async move {
        let served = server::serve_api(api_listener, api_security, api_site, trail, api_shutdown);
        if let Err(e) = served.await {
            tracing::error!(error = %e, "api server failed");
        }
    });

    if let Some(path) = &config.addr_file {
        let json =
            serde_json::json!({ "api": api_addr, "raft": raft_addr, "node_id": config.node_id });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json.to_string())?;
        std::fs::rename(&tmp, path)?;
    }

    let bootstraps = match config.bootstrap {
        Bootstrap::Single => {
            let members = BTreeMap::from([(
                config.node_id,
                NodeInfo::new(raft_addr.clone(), api_addr.clone()),
            )]);
            node.store()
                .initialize(members)
                .await
                .context("initializing the cluster")?;
            true
        }
        Bootstrap::Members => {
            let lowest = config.members.iter().map(|m| m.id).min();
            if lowest == Some(config.node_id) {
                let members = config
                    .members
                    .iter()
                    .map(|m| (m.id, NodeInfo::new(m.raft.clone(), m.api.clone())))
                    .collect();
                node.store()
                    .initialize(members)
                    .await
                    .context("initializing the cluster")?;
                true
            } else {
                false
            }
        }
        Bootstrap::Join => false,
    };
    tracing::info!(node = config.node_id, api = %api_addr, raft = %raft_addr, "manager node started");

    if bootstraps {
        let site_name = config.site_name.clone();
        let admin = access::bootstrap_token(&config.admin_token_path())?;
        let naming = shutdown.clone();
        let pki = tandem_tls::pki::PkiDir::new(config.pki_path());
        tasks.spawn(async move {
            // Names the site and installs its first admin token once a leader exists;
            // retries while the cluster forms.
            loop {
                let named = async {
                    site.ensure_identity(&site_name, site_id.as_deref()).await?;
                    site.ensure_admin_token(&admin).await?;
                    site.ensure_ca(&pki).await
                };
                match named.await {
                    Ok(()) => break,
                    Err(e) => tracing::debug!(error = %e, "site not named yet"),
                }
                tokio::select! {
                    _ = naming.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                }
            }
        });
    }

    shutdown.cancelled().await;
    tracing::info!(node = config.node_id, "manager node stopping");
    tasks.close();
    tasks.wait().await;
    node.store().shutdown().await.ok();
    Ok(())
}

/// This node's certificate for its site's members. A node that bootstraps a site alone
/// creates the site's CA (and the site's id with it) on first start; a node given a join
/// token obtains its certificate from the site's managers; any other node must have been
/// given its certificate. `--insecure`: none, and a loud warning.
async fn member_tls(config: &Config) -> Result<Option<tandem_tls::TlsConfig>> {
    use tandem_tls::pki::{PkiDir, SiteCa};
    if config.insecure {
        tracing::warn!(
            "INSECURE: --insecure is set: the operator port, calls between sites, and Raft and \
             forwarding between this site's managers are plaintext, and peers are not \
             authenticated; anyone who reaches the internal port can act as a member. Do \
             not run a site like this."
        );
        return Ok(None);
    }
    let pki = PkiDir::new(config.pki_path());
    if let Some(token) = &config.join_token {
        tandem_proto::enroll::join_unless_provisioned(
            &config.join,
            token.expose(),
            &pki,
            tandem_tls::PeerRole::Manager,
            &config.node_id.to_string(),
            &[],
        )
        .await
        .context("joining the site")?;
    }
    if !pki.is_provisioned() {
        if config.bootstrap != Bootstrap::Single {
            anyhow::bail!(
                "no certificate in {}: give this node a join token (--join-token, from \
                 `tandem token join --node-id N`) and --join, or one issued by its site's CA \
                 (ca.crt, node.crt, node.key); or run with --insecure",
                pki.dir.display()
            );
        }
        let site_id = site::mint("site");
        let ca = SiteCa::generate(&site_id)?;
        ca.save(&pki)?;
        let me = tandem_tls::PeerIdentity::manager(&site_id, config.node_id)?;
        pki.install(
            ca.cert_pem(),
            &ca.issue(&me, std::time::Duration::from_secs(config.cert_ttl_secs))?,
        )?;
        tracing::info!(site = %site_id, dir = %pki.dir.display(), "created the site's CA and this node's certificate");
    }
    let tls = tandem_tls::TlsConfig::load(&pki)
        .with_context(|| format!("loading the certificate in {}", pki.dir.display()))?;
    let me = tls.identity();
    if me.role != tandem_tls::PeerRole::Manager || me.id != config.node_id.to_string() {
        anyhow::bail!(
            "the certificate in {} names {me}, not manager {} of a site",
            pki.dir.display(),
            config.node_id
        );
    }
    Ok(Some(tls))
}
