//! The site manager node: configuration, the replicated store, the API services and the
//! site's operations.

pub mod access;
pub mod api;
pub mod config;
pub mod control;
pub mod error;
pub mod failpoint;
pub mod net;
pub mod node;
pub mod recovery;
pub mod server;
pub mod site;

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
    let store = SiteStore::open(store_config, Transport::default())
        .await
        .context("opening the store")?;

    let tasks = tokio_util::task::TaskTracker::new();
    let raft_server = store.grpc().into_server();
    let node = Arc::new(ManagerNode::new(
        store,
        net::Connector::default(),
        api_addr.clone(),
    ));
    let site = SiteManager::new(node.clone(), net::Connector::default());
    let (internal_site, internal_shutdown) = (site.clone(), shutdown.clone());
    tasks.spawn(async move {
        let served =
            server::serve_internal(raft_listener, raft_server, internal_site, internal_shutdown);
        if let Err(e) = served.await {
            tracing::error!(error = %e, "internal server failed");
        }
    });
    tasks.spawn(control::run(site.clone(), shutdown.clone()));
    let api_shutdown = shutdown.clone();
    let api_site = site.clone();
    tasks.spawn(async move {
        if let Err(e) = server::serve_api(api_listener, api_site, api_shutdown).await {
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
        tasks.spawn(async move {
            // Names the site and installs its first admin token once a leader exists;
            // retries while the cluster forms.
            loop {
                let named = async {
                    site.ensure_identity(&site_name).await?;
                    site.ensure_admin_token(&admin).await
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
