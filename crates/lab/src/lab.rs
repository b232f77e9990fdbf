//! A lab of real processes on loopback: each site's manager cluster, started on port 0,
//! joined into one Raft cluster per site, described in `DIR/lab.json`, and stopped together.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tandem_proto::v1;
use tandem_proto::v1::cluster_service_client::ClusterServiceClient;
use tokio::process::{Child, Command};

/// `lab.json`: what runs where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabFile {
    pub sites: Vec<SiteEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteEntry {
    pub name: String,
    pub managers: Vec<ManagerEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManagerEntry {
    pub id: u64,
    pub api: String,
    pub raft: String,
    pub pid: u32,
}

impl LabFile {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("lab.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join("lab.json"))?;
        Ok(())
    }
}

/// Finds a sibling binary of this executable (cargo puts them side by side), else PATH.
pub fn binary(name: &str) -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(3) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from(name)
}

/// One manager process of the lab.
#[derive(Debug)]
pub struct ManagerProcess {
    pub id: u64,
    pub site: String,
    pub api: String,
    pub raft: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl ManagerProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Starts (or restarts) the node's process from its data directory.
    pub async fn start(&mut self, bootstrap: &str) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let addr_file = self.dir.join("addr.json");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("manager.log"))?;
        let (api, raft) = if self.api.is_empty() {
            ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string())
        } else {
            (self.api.clone(), self.raft.clone())
        };
        let child = Command::new(binary("tandem-manager"))
            .args(["--node-id", &self.id.to_string()])
            .args(["--site-name", &self.site])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--api-listen", &api, "--raft-listen", &raft])
            .args(["--bootstrap", bootstrap])
            .arg("--addr-file")
            .arg(&addr_file)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting tandem-manager (build it with `cargo build --bins`)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                self.api = v["api"].as_str().unwrap_or_default().to_string();
                self.raft = v["raft"].as_str().unwrap_or_default().to_string();
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "manager {} of {} exited at start ({status}); see {}",
                    self.id,
                    self.site,
                    self.dir.join("manager.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "manager {} of {} did not start listening",
                    self.id,
                    self.site
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        if let Some(pid) = self.pid() {
            kill(Pid::from_raw(pid as i32), sig)?;
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            child.kill().await?;
        }
        Ok(())
    }

    /// kill -9.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}

/// A connection to one manager's cluster service.
pub async fn cluster_client(api: &str) -> Result<ClusterServiceClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{api}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(ClusterServiceClient::new(ch))
}

/// The running lab.
#[derive(Debug)]
pub struct Lab {
    pub dir: PathBuf,
    pub sites: Vec<Vec<ManagerProcess>>,
    pub site_names: Vec<String>,
}

impl Lab {
    /// Starts `sites` sites of `managers` managers each and waits until every cluster has a
    /// leader and all its voters.
    pub async fn up(dir: &Path, sites: usize, managers: usize) -> Result<Self> {
        if sites == 0 || managers == 0 || managers > 7 || sites > 8 {
            bail!("--sites must be 1..8 and --managers 1..7");
        }
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let site_names: Vec<String> = (0..sites)
            .map(|i| format!("site-{}", (b'a' + i as u8) as char))
            .collect();
        let mut lab = Lab {
            dir: dir.clone(),
            sites: Vec::new(),
            site_names: site_names.clone(),
        };
        for name in &site_names {
            let mut procs = Vec::new();
            for id in 1..=managers as u64 {
                let mut p = ManagerProcess {
                    id,
                    site: name.clone(),
                    api: String::new(),
                    raft: String::new(),
                    dir: dir.join(name).join(format!("manager-{id}")),
                    child: None,
                };
                p.start(if id == 1 { "single" } else { "join" }).await?;
                procs.push(p);
            }
            lab.sites.push(procs);
        }
        for site in &lab.sites {
            wait_leader(&site[0].api, 1, Duration::from_secs(20)).await?;
            let mut client = cluster_client(&site[0].api).await?;
            for p in &site[1..] {
                client
                    .add_node(v1::AddNodeRequest {
                        id: p.id,
                        api_addr: p.api.clone(),
                        raft_addr: p.raft.clone(),
                        voter: true,
                    })
                    .await
                    .with_context(|| format!("adding manager {} of {}", p.id, p.site))?;
            }
            wait_leader(&site[0].api, site.len(), Duration::from_secs(30)).await?;
        }
        lab.write_file()?;
        Ok(lab)
    }

    pub fn write_file(&self) -> Result<()> {
        let file = LabFile {
            sites: self
                .sites
                .iter()
                .zip(&self.site_names)
                .map(|(procs, name)| SiteEntry {
                    name: name.clone(),
                    managers: procs
                        .iter()
                        .map(|p| ManagerEntry {
                            id: p.id,
                            api: p.api.clone(),
                            raft: p.raft.clone(),
                            pid: p.pid().unwrap_or(0),
                        })
                        .collect(),
                })
                .collect(),
        };
        file.write(&self.dir)
    }

    /// API addresses of a site's managers.
    pub fn endpoints(&self, site: usize) -> Vec<String> {
        self.sites[site].iter().map(|p| p.api.clone()).collect()
    }

    pub async fn down(&mut self) {
        for site in &mut self.sites {
            for p in site.iter_mut() {
                if let Err(e) = p.stop(Duration::from_secs(10)).await {
                    tracing::warn!(id = p.id, site = %p.site, error = %e, "stopping manager");
                }
            }
        }
    }
}

/// Waits until the cluster seen from `api` has a leader and at least `voters` voters.
pub async fn wait_leader(api: &str, voters: usize, within: Duration) -> Result<v1::ClusterStatus> {
    let deadline = Instant::now() + within;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match cluster_client(api).await {
            Ok(mut c) => match c.get_cluster_status(v1::GetClusterStatusRequest {}).await {
                Ok(s) => {
                    let s = s.into_inner();
                    let n = s.nodes.iter().filter(|n| n.voter).count();
                    if s.leader_id != 0 && n >= voters {
                        return Ok(s);
                    }
                    last = format!("leader {} with {n} voters", s.leader_id);
                }
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("cluster at {api} not ready within {within:?}: {last}")
}
