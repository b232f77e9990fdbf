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
use tandem_proto::v1::host_service_client::HostServiceClient;
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
    #[serde(default)]
    pub vras: Vec<VraEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VraEntry {
    pub host: String,
    pub control: String,
    pub nbd: String,
    pub pid: u32,
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
        let (api, raft) = if self.api.is_empty() {
            ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string())
        } else {
            (self.api.clone(), self.raft.clone())
        };
        let mut cmd = Command::new(binary("tandem-manager"));
        cmd.args(["--node-id", &self.id.to_string()])
            .args(["--site-name", &self.site])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--api-listen", &api, "--raft-listen", &raft])
            .args(["--bootstrap", bootstrap]);
        let what = format!("manager {} of {}", self.id, self.site);
        let (child, addrs) = spawn_listening(&what, cmd, &self.dir, "manager.log").await?;
        self.child = Some(child);
        self.api = addrs["api"].as_str().unwrap_or_default().to_string();
        self.raft = addrs["raft"].as_str().unwrap_or_default().to_string();
        Ok(())
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        signal_child(self.child.as_ref(), sig)
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        stop_child(self.child.take(), grace).await
    }

    /// kill -9.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}

/// One VRA process of the lab, serving one host.
#[derive(Debug)]
pub struct VraProcess {
    pub host: String,
    pub control: String,
    pub nbd: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl VraProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Starts (or restarts, on the same addresses) the VRA from its data directory.
    pub async fn start(&mut self) -> Result<()> {
        let (control, nbd) = if self.control.is_empty() {
            ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string())
        } else {
            (self.control.clone(), self.nbd.clone())
        };
        let mut cmd = Command::new(binary("tandem-vra"));
        cmd.args(["--host-id", &self.host])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--control-listen", &control, "--nbd-listen", &nbd]);
        let what = format!("vra of {}", self.host);
        let (child, addrs) = spawn_listening(&what, cmd, &self.dir, "vra.log").await?;
        self.child = Some(child);
        self.control = addrs["control"].as_str().unwrap_or_default().to_string();
        self.nbd = addrs["nbd"].as_str().unwrap_or_default().to_string();
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        stop_child(self.child.take(), grace).await
    }

    /// kill -9.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}

/// Spawns `cmd` with `--addr-file` in `dir`, its output appended to `dir/log_name`, and
/// waits until it has written the addresses it listens on.
async fn spawn_listening(
    what: &str,
    mut cmd: Command,
    dir: &Path,
    log_name: &str,
) -> Result<(Child, serde_json::Value)> {
    std::fs::create_dir_all(dir)?;
    let addr_file = dir.join("addr.json");
    let _ = std::fs::remove_file(&addr_file);
    let log_path = dir.join(log_name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut child = cmd
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
        .with_context(|| {
            format!("starting {what} (build the binaries with `cargo build --bins`)")
        })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            return Ok((child, v));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited at start ({status}); see {}",
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            bail!("{what} did not start listening; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal_child(child: Option<&Child>, sig: Signal) -> Result<()> {
    if let Some(pid) = child.and_then(|c| c.id()) {
        kill(Pid::from_raw(pid as i32), sig)?;
    }
    Ok(())
}

async fn stop_child(child: Option<Child>, grace: Duration) -> Result<()> {
    let Some(mut child) = child else {
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
    /// Per site, one VRA per host.
    pub vras: Vec<Vec<VraProcess>>,
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
            vras: (0..sites).map(|_| Vec::new()).collect(),
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
                    vras: Vec::new(),
                })
                .collect(),
        };
        let mut file = file;
        for (entry, vras) in file.sites.iter_mut().zip(&self.vras) {
            entry.vras = vras
                .iter()
                .map(|v| VraEntry {
                    host: v.host.clone(),
                    control: v.control.clone(),
                    nbd: v.nbd.clone(),
                    pid: v.pid().unwrap_or(0),
                })
                .collect();
        }
        file.write(&self.dir)
    }

    /// Starts `hosts` VRAs per site and registers each as a host (with its VRA's control
    /// address) in its site's managers.
    pub async fn start_vras(&mut self, hosts: usize) -> Result<()> {
        if hosts > 16 {
            bail!("--hosts must be 0..16");
        }
        for (i, name) in self.site_names.clone().iter().enumerate() {
            let endpoints = self.endpoints(i);
            for h in 1..=hosts {
                let host = format!("{name}-host-{h}");
                let mut vra = VraProcess {
                    host: host.clone(),
                    control: String::new(),
                    nbd: String::new(),
                    dir: self.dir.join(name).join(format!("vra-{h}")),
                    child: None,
                };
                vra.start().await?;
                let ch =
                    tonic::transport::Endpoint::from_shared(format!("http://{}", endpoints[0]))?
                        .connect_timeout(Duration::from_secs(2))
                        .timeout(Duration::from_secs(10))
                        .connect()
                        .await?;
                HostServiceClient::new(ch)
                    .create_host(v1::Host {
                        id: host.clone(),
                        name: host.clone(),
                        vra_address: vra.control.clone(),
                    })
                    .await
                    .with_context(|| format!("registering {host}"))?;
                self.vras[i].push(vra);
            }
        }
        self.write_file()
    }

    /// API addresses of a site's managers.
    pub fn endpoints(&self, site: usize) -> Vec<String> {
        self.sites[site].iter().map(|p| p.api.clone()).collect()
    }

    pub async fn down(&mut self) {
        for vras in &mut self.vras {
            for v in vras.iter_mut() {
                if let Err(e) = v.stop(Duration::from_secs(10)).await {
                    tracing::warn!(host = %v.host, error = %e, "stopping vra");
                }
            }
        }
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
