//! A lab of real processes on loopback: each site's manager cluster, started on port 0,
//! joined into one Raft cluster per site, described in `DIR/lab.json`, and stopped together.
//! The inter-site addresses the lab hands out ([`Lab::peer_endpoints`], [`Lab::link_address`])
//! point at its link emulator ([`crate::link`]), controlled over gRPC at `link_control` in
//! `lab.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tandem_core::access::BearerToken;
use tandem_tls::pki::{PkiDir, SiteCa};
use tandem_tls::{PeerIdentity, TlsConfig};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tandem_proto::v1;
use tandem_proto::v1::host_service_client::HostServiceClient;
use tandem_proto::v1::token_service_client::TokenServiceClient;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::link::{LinkEmulator, ProxyInfo, link_name};
use crate::operator::{CA_FILE, TOKEN_FILE, cluster_client, use_lab_credentials};
use crate::process::{ManagerProcess, VraProcess};

/// `lab.json`: what runs where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabFile {
    pub sites: Vec<SiteEntry>,
    /// Address of the `tandem.lab.v1.LinkControl` service of the lab process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_control: Option<String>,
    /// One link per site pair, with its proxies.
    #[serde(default)]
    pub links: Vec<LinkEntry>,
    /// The protected VMs the lab created (`tandem-lab up --example`), with their volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmEntry>,
    /// The admin API token of every site of the lab (mode 0600): clients present it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The CA certificates of every site of the lab: clients check the managers'
    /// certificates against them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How to use it with the CLI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<String>,
}

/// One protected VM of `lab.json` and where any NBD client reaches each of its volumes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmEntry {
    pub vm: String,
    pub vpg: String,
    pub site: String,
    pub host: String,
    pub volumes: Vec<VolumeEntry>,
}

/// One volume of a [`VmEntry`]: its address in the VM, size and NBD export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub controller: u32,
    pub unit: u32,
    pub size_bytes: u64,
    /// The protected VRA's NBD Unix socket (this host's clients) and the export there.
    pub nbd: String,
    pub export: String,
    /// The same as a URI (`nbd+unix:///export?socket=PATH`), for qemu-img, nbdinfo,
    /// nbdcopy on this host.
    pub uri: String,
    /// The export over TCP with TLS (`nbds://host:port/export`): with the site's NBD client
    /// certificate ([`SiteEntry::nbd_client_certs`]).
    #[serde(default)]
    pub nbds_uri: String,
}

/// One link of `lab.json`: the proxies between sites `a` and `b`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkEntry {
    pub name: String,
    pub a: String,
    pub b: String,
    pub proxies: Vec<ProxyInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteEntry {
    pub name: String,
    pub managers: Vec<ManagerEntry>,
    #[serde(default)]
    pub vras: Vec<VraEntry>,
    /// A client certificate of the site's CA for its VRAs' NBD ports, in the layout qemu's
    /// `tls-creds-x509` and libnbd's `tls-certificates` read (`ca-cert.pem`,
    /// `client-cert.pem`, `client-key.pem`).
    #[serde(default)]
    pub nbd_client_certs: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VraEntry {
    pub host: String,
    pub control: String,
    /// NBD over TCP, TLS required (`nbds://`).
    pub nbd: String,
    /// NBD on a Unix socket, for this host (`nbd+unix://`).
    #[serde(default)]
    pub nbd_socket: String,
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
    /// Makes the lab's admin token what this process's API clients present.
    pub fn use_credentials(&self) -> Result<()> {
        if let Some(path) = &self.token_file {
            use_lab_credentials(path, self.ca_file.as_deref())?;
        }
        Ok(())
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("lab.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join("lab.json"))?;
        Ok(())
    }
}

/// Whom a join token is for.
#[derive(Debug, Clone)]
pub enum JoinAs {
    /// A manager node, by id.
    Manager(u64),
    /// The VRA of a host.
    Vra(String),
}

/// The running lab.
#[derive(Debug)]
pub struct Lab {
    pub dir: PathBuf,
    pub sites: Vec<Vec<ManagerProcess>>,
    /// Per site, one VRA per host.
    pub vras: Vec<Vec<VraProcess>>,
    pub site_names: Vec<String>,
    /// The link emulator every inter-site address goes through.
    pub links: LinkEmulator,
    /// Address of the link control gRPC service.
    pub link_control: String,
    /// (from site, to site, upstream) -> proxy address.
    proxies: BTreeMap<(usize, usize, String), String>,
    /// Each site's CA, as its first manager created it (its key is in that manager's PKI
    /// directory): for certificates the lab issues by hand, as an administrator could.
    /// Nodes get theirs from the managers, with join tokens.
    site_cas: Vec<SiteCa>,
    /// The protected VMs the lab created itself, listed in `lab.json`.
    pub vms: Vec<VmEntry>,
    /// The control server's task.
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Stops the link emulator and the control server if the lab is dropped without `down`.
    _stop_on_drop: DropGuard,
}

impl Lab {
    /// Starts `sites` sites of `managers` managers each and waits until every cluster has a
    /// leader and all its voters.
    pub async fn up(dir: &Path, sites: usize, managers: usize) -> Result<Self> {
        Self::up_with(dir, sites, managers, &[]).await
    }

    /// [`Lab::up`], with `manager_env` in every manager's environment (e.g.
    /// `TANDEM_CERT_TTL_SECS`), across restarts too.
    pub async fn up_with(
        dir: &Path,
        sites: usize,
        managers: usize,
        manager_env: &[(&str, &str)],
    ) -> Result<Self> {
        let manager_env: Vec<(String, String)> = manager_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if sites == 0 || managers == 0 || managers > 7 || sites > 8 {
            bail!("--sites must be 1..8 and --managers 1..7");
        }
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        // One token for every site of the lab, so one file serves the CLI at either site.
        let token_file = dir.join(TOKEN_FILE);
        tandem_proto::client::read_or_create_token_file(&token_file, || {
            BearerToken::from_random(rand::random(), rand::random())
        })
        .with_context(|| format!("the lab's admin token {}", token_file.display()))?;
        let site_names: Vec<String> = (0..sites)
            .map(|i| format!("site-{}", (b'a' + i as u8) as char))
            .collect();
        let cancel = CancellationToken::new();
        let links = LinkEmulator::start(cancel.child_token());
        let control = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let link_control = control.local_addr()?.to_string();
        let tasks = TaskTracker::new();
        {
            let (links, shutdown) = (links.clone(), cancel.child_token());
            tasks.spawn(async move {
                if let Err(e) = crate::link_control::serve(control, links, shutdown).await {
                    tracing::warn!(error = %e, "link control server stopped");
                }
            });
        }
        let mut lab = Lab {
            dir: dir.clone(),
            sites: Vec::new(),
            vras: (0..sites).map(|_| Vec::new()).collect(),
            site_names: site_names.clone(),
            links,
            link_control,
            proxies: BTreeMap::new(),
            site_cas: Vec::new(),
            vms: Vec::new(),
            tasks,
            _stop_on_drop: cancel.clone().drop_guard(),
            cancel,
        };
        // Each site's first manager bootstraps it alone and creates its CA; the others
        // join with join tokens, as an operator would add them.
        for name in &site_names {
            let mut first = ManagerProcess {
                id: 1,
                site: name.clone(),
                api: String::new(),
                raft: String::new(),
                dir: dir.join(name).join("manager-1"),
                child: None,
                env: manager_env.clone(),
                admin_token_file: Some(token_file.clone()),
            };
            first.start("single").await?;
            let pki = PkiDir::new(first.dir.join("data").join("pki"));
            let site_id = TlsConfig::load(&pki)
                .with_context(|| format!("{name}'s first manager's certificate"))?
                .identity()
                .site
                .clone();
            lab.site_cas.push(SiteCa::load(&pki, &site_id)?);
            lab.sites.push(vec![first]);
        }
        for i in 0..site_names.len() {
            lab.site_cas[i].provision_nbd_client(&lab.nbd_client_certs(i), "lab-operator")?;
        }
        let bundle: String = lab.site_cas.iter().map(|c| c.cert_pem()).collect();
        tandem_tls::pki::write_file(&dir.join(CA_FILE), &bundle, 0o644)?;
        use_lab_credentials(&token_file, Some(&dir.join(CA_FILE)))?;
        for (i, name) in site_names.iter().enumerate() {
            let first_api = lab.sites[i][0].api.clone();
            wait_leader(&first_api, 1, Duration::from_secs(20)).await?;
            for id in 2..=managers as u64 {
                let token = lab
                    .join_token(i, JoinAs::Manager(id))
                    .await
                    .with_context(|| {
                        format!("a join token for manager {id} of {}", site_names[i])
                    })?;
                let mut p = ManagerProcess {
                    id,
                    site: name.clone(),
                    api: String::new(),
                    raft: String::new(),
                    dir: dir.join(name).join(format!("manager-{id}")),
                    child: None,
                    env: manager_env
                        .iter()
                        .cloned()
                        .chain([
                            ("TANDEM_JOIN_TOKEN".into(), token),
                            ("TANDEM_JOIN".into(), first_api.clone()),
                        ])
                        .collect(),
                    admin_token_file: Some(token_file.clone()),
                };
                p.start("join").await?;
                // Used up: a restart finds its certificate.
                p.env.retain(|(k, _)| !k.starts_with("TANDEM_JOIN"));
                cluster_client(&first_api)
                    .await?
                    .add_node(v1::AddNodeRequest {
                        id: p.id,
                        api_addr: p.api.clone(),
                        raft_addr: p.raft.clone(),
                        voter: true,
                    })
                    .await
                    .with_context(|| format!("adding manager {} of {}", p.id, p.site))?;
                lab.sites[i].push(p);
            }
            wait_leader(&first_api, managers, Duration::from_secs(30)).await?;
        }
        // A link per site pair, with a proxy for each manager a peer site may dial: its
        // internal listener, which serves paired sites, and its operator port, where a
        // pairing token is presented.
        for to in 0..sites {
            for from in (0..sites).filter(|&f| f != to) {
                for addr in lab
                    .internal_endpoints(to)
                    .into_iter()
                    .chain(lab.endpoints(to))
                {
                    lab.add_proxy(from, to, &addr).await?;
                }
            }
        }
        lab.write_file()?;
        Ok(lab)
    }

    /// Issues `who` (of site `site`) its certificate, with the site's CA beside it, in the
    /// PKI directory of the node whose data directory is `data_dir`: by hand, with the CA
    /// key the site's first manager keeps, as an administrator holding it could.
    pub fn provision(&self, site: usize, who: &PeerIdentity, data_dir: &Path) -> Result<()> {
        let ca = self.site_cas.get(site).context("no such site")?;
        ca.provision(&PkiDir::new(data_dir.join("pki")), who)?;
        Ok(())
    }

    /// A one-time join token of site `site` for `who` (retried while the site's first
    /// manager has not yet put its CA in the replicated state).
    pub async fn join_token(&self, site: usize, who: JoinAs) -> Result<String> {
        let (role, node_id, host_id) = match who {
            JoinAs::Manager(id) => (v1::JoinRole::Manager, id, String::new()),
            JoinAs::Vra(host) => (v1::JoinRole::Vra, 0, host),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let channel = tandem_proto::client::ApiConnector::default()
                .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
                .connect(&self.endpoints(site))
                .await?;
            let asked = TokenServiceClient::new(channel)
                .create_join_token(v1::CreateJoinTokenRequest {
                    role: role as i32,
                    node_id,
                    host_id: host_id.clone(),
                    ttl_secs: 600,
                })
                .await;
            match asked {
                Ok(r) => return Ok(r.into_inner().token),
                Err(s)
                    if Instant::now() < deadline
                        && matches!(
                            s.code(),
                            tonic::Code::FailedPrecondition | tonic::Code::Unavailable
                        ) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => bail!("{}: {}", s.code(), s.message()),
            }
        }
    }

    /// The certificate the lab's harness presents to site `site`'s nodes: a manager of that
    /// site no member is (id 0), issued once by hand with the CA key, valid for a year
    /// whatever lifetime the managers give nodes' certificates (the harness is the lab's
    /// tool, not a node the managers renew).
    pub fn harness(&self, site: usize) -> Result<TlsConfig> {
        let data = self.dir.join("harness").join(&self.site_names[site]);
        let pki = PkiDir::new(data.join("pki"));
        if !pki.is_provisioned() {
            let site_id = self.site_id(site).context("no such site")?.to_string();
            self.provision(site, &PeerIdentity::manager(&site_id, 0)?, &data)?;
        }
        Ok(TlsConfig::load(&pki)?)
    }

    /// A channel to the control service of the VRA listening at `control` (one of the
    /// lab's), with the harness certificate of its site.
    pub async fn vra_channel(&self, control: &str) -> Result<tonic::transport::Channel> {
        let vra = self
            .vras
            .iter()
            .flatten()
            .find(|v| v.control == control)
            .with_context(|| format!("no VRA of the lab listens at {control}"))?;
        vra.control_channel().await
    }

    /// Adds `pem` (a site's CAs, as `tandem site get` shows them while its CA is rotated)
    /// to what the lab's operator clients trust: the lab's CA file, for the CLI and this
    /// process.
    pub fn trust_operator_cas(&self, pem: &str) -> Result<()> {
        let path = self.dir.join(CA_FILE);
        let mut bundle = std::fs::read_to_string(&path)?;
        bundle.push_str(pem);
        tandem_tls::pki::write_file(&path, &bundle, 0o644)?;
        use_lab_credentials(&self.dir.join(TOKEN_FILE), Some(&path))
    }

    /// Where the NBD client certificate of site `site` is (see
    /// [`SiteEntry::nbd_client_certs`]).
    pub fn nbd_client_certs(&self, site: usize) -> PathBuf {
        self.dir.join(&self.site_names[site]).join("nbd-client")
    }

    /// The id of site `site`, as its certificates name it.
    pub fn site_id(&self, site: usize) -> Option<&str> {
        self.site_cas.get(site).map(|c| c.site())
    }

    /// The name of the link between two sites, e.g. `site-a<->site-b`.
    pub fn link_name(&self, x: usize, y: usize) -> String {
        link_name(&self.site_names[x], &self.site_names[y])
    }

    async fn add_proxy(&mut self, from: usize, to: usize, upstream: &str) -> Result<String> {
        let key = (from, to, upstream.to_string());
        if let Some(listen) = self.proxies.get(&key) {
            return Ok(listen.clone());
        }
        let listen = self
            .links
            .proxy(&self.site_names[from], &self.site_names[to], upstream)
            .await
            .with_context(|| {
                format!(
                    "proxying {upstream} of {} for {}",
                    self.site_names[to], self.site_names[from]
                )
            })?
            .to_string();
        self.proxies.insert(key, listen.clone());
        Ok(listen)
    }

    /// The address site `from` must dial to reach `upstream` (an address in site `to`)
    /// across their link: a proxy of the link emulator, started on first use (and then
    /// listed in `lab.json`). Within one site it is `upstream` itself.
    pub async fn link_address(&mut self, from: usize, to: usize, upstream: &str) -> Result<String> {
        if from >= self.site_names.len() || to >= self.site_names.len() {
            bail!("no site {from} or {to} in this lab");
        }
        if from == to {
            return Ok(upstream.to_string());
        }
        let known = self.proxies.len();
        let listen = self.add_proxy(from, to, upstream).await?;
        if self.proxies.len() != known {
            self.write_file()?;
        }
        Ok(listen)
    }

    /// The internal addresses of site `to`'s managers as site `from` must dial them:
    /// through the link (these are what a pairing request from `from` should carry).
    pub fn peer_endpoints(&self, from: usize, to: usize) -> Vec<String> {
        self.through_link(from, to, self.internal_endpoints(to))
    }

    /// The operator addresses of site `to`'s managers as site `from` must dial them:
    /// through the link (where a pairing request from `from` presents the token).
    pub fn peer_api_endpoints(&self, from: usize, to: usize) -> Vec<String> {
        self.through_link(from, to, self.endpoints(to))
    }

    /// `addrs` of site `to` as site `from` dials them: their link's proxies where the lab
    /// made them.
    fn through_link(&self, from: usize, to: usize, addrs: Vec<String>) -> Vec<String> {
        addrs
            .into_iter()
            .map(|addr| {
                self.proxies
                    .get(&(from, to, addr.clone()))
                    .cloned()
                    .unwrap_or(addr)
            })
            .collect()
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
                    nbd_client_certs: None,
                })
                .collect(),
            link_control: Some(self.link_control.clone()),
            links: self.link_entries(),
            vms: self.vms.clone(),
            token_file: Some(self.dir.join(TOKEN_FILE)),
            ca_file: Some(self.dir.join(CA_FILE)),
            usage: Some(format!(
                "TANDEM_TOKEN_FILE={} TANDEM_CA_FILE={} tandem -e {} vpg list",
                self.dir.join(TOKEN_FILE).display(),
                self.dir.join(CA_FILE).display(),
                self.endpoints(0).join(",")
            )),
        };
        let mut file = file;
        for (i, entry) in file.sites.iter_mut().enumerate() {
            entry.nbd_client_certs = Some(self.nbd_client_certs(i));
        }
        for (entry, vras) in file.sites.iter_mut().zip(&self.vras) {
            entry.vras = vras
                .iter()
                .map(|v| VraEntry {
                    host: v.host.clone(),
                    control: v.control.clone(),
                    nbd: v.nbd.clone(),
                    nbd_socket: v.nbd_socket.clone(),
                    pid: v.pid().unwrap_or(0),
                })
                .collect();
        }
        file.write(&self.dir)
    }

    /// The links of `lab.json`, from the proxies the lab started.
    fn link_entries(&self) -> Vec<LinkEntry> {
        let mut links: BTreeMap<String, LinkEntry> = BTreeMap::new();
        for ((from, to, upstream), listen) in &self.proxies {
            let (from, to) = (&self.site_names[*from], &self.site_names[*to]);
            let name = link_name(from, to);
            let (a, b) = if from <= to { (from, to) } else { (to, from) };
            links
                .entry(name.clone())
                .or_insert_with(|| LinkEntry {
                    name,
                    a: a.clone(),
                    b: b.clone(),
                    proxies: Vec::new(),
                })
                .proxies
                .push(ProxyInfo {
                    listen: listen.clone(),
                    upstream: upstream.clone(),
                    from: from.clone(),
                    to: to.clone(),
                });
        }
        links.into_values().collect()
    }

    /// Starts `hosts` VRAs per site and registers each as a host (with its VRA's control
    /// address) in its site's managers.
    pub async fn start_vras(&mut self, hosts: usize) -> Result<()> {
        self.start_vras_with(hosts, &[]).await
    }

    /// [`Lab::start_vras`] with extra `tandem-vra` flags for every VRA (e.g. `--ram-mb 32`).
    pub async fn start_vras_with(&mut self, hosts: usize, extra_args: &[String]) -> Result<()> {
        if hosts > 16 {
            bail!("--hosts must be 0..16");
        }
        for (i, name) in self.site_names.clone().iter().enumerate() {
            let endpoints = self.endpoints(i);
            for h in 1..=hosts {
                let host = format!("{name}-host-{h}");
                let dir = self.dir.join(name).join(format!("vra-{h}"));
                // It joins with a join token: its site's managers issue its certificate;
                // the paired sites' CAs come from them once the sites pair.
                let token = self.join_token(i, JoinAs::Vra(host.clone())).await?;
                let mut vra = VraProcess::new(&host, dir);
                vra.harness = Some(self.harness(i)?);
                let mut args = extra_args.to_vec();
                args.extend(["--join".to_string(), endpoints.join(",")]);
                vra.start_joining(&args, &token).await?;
                // Every other site reaches this VRA (replication streams) across its link;
                // the host record names the proxy of the first peer (two-site labs: the peer).
                let mut peer_vra_address = String::new();
                for from in (0..self.site_names.len()).filter(|&f| f != i) {
                    let proxy = self.add_proxy(from, i, &vra.control).await?;
                    if peer_vra_address.is_empty() {
                        peer_vra_address = proxy;
                    }
                }
                HostServiceClient::new(crate::operator::channel(&endpoints[0]).await?)
                    .create_host(v1::Host {
                        id: host.clone(),
                        name: host.clone(),
                        vra_address: vra.control.clone(),
                        peer_vra_address,
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

    /// Internal addresses of a site's managers (its members and paired sites call them).
    pub fn internal_endpoints(&self, site: usize) -> Vec<String> {
        self.sites[site].iter().map(|p| p.raft.clone()).collect()
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
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.links.shutdown().await;
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
