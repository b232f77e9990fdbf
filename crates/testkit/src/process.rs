//! Tandem's processes as tests, labs and benchmarks run them: the manager and the VRA,
//! started on loopback port 0 with `--addr-file`, their output in a log beside their data,
//! killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_proto::v1::vra_control_client::VraControlClient;
use tandem_tls::pki::{PkiDir, SiteCa};
use tandem_tls::{PeerIdentity, TlsConfig};
use tokio::process::{Child, Command};

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
    /// Environment the process starts with besides the lab's (e.g. failpoints).
    pub env: Vec<(String, String)>,
    /// The site's first admin token, for the node that bootstraps the site.
    pub admin_token_file: Option<PathBuf>,
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
            .args(["--bootstrap", bootstrap])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(f) = &self.admin_token_file {
            cmd.arg("--admin-token-file").arg(f);
        }
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

    /// Whether the process was started and has died since (a failpoint, a crash).
    pub fn died(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }
}

/// A channel (connected on first use) to the VRA control service at `addr`, presenting
/// `harness` (mutual TLS) or nothing (a VRA run `--insecure`).
pub fn vra_control(addr: &str, harness: Option<&TlsConfig>) -> Result<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30));
    Ok(match harness {
        Some(tls) => {
            endpoint.connect_with_connector_lazy(tandem_tls::dial::TlsDial::new(tls.client()))
        }
        None => endpoint.connect_lazy(),
    })
}

/// How a VRA started outside a lab ([`VraProcess::standalone`]) runs.
#[derive(Debug, Clone)]
pub struct VraOptions<'a> {
    /// Its certificate from this CA (mutual TLS on every port), and a manager's certificate
    /// of that site for the harness to drive it; plaintext (`--insecure`) when `None`.
    pub ca: Option<&'a SiteCa>,
    /// Its replication buffer.
    pub ram_mb: u64,
    /// Its `RUST_LOG`.
    pub log_filter: String,
    /// The binary, when not the workspace's `tandem-vra` (a benchmark of another build).
    pub bin: Option<PathBuf>,
}

impl Default for VraOptions<'_> {
    fn default() -> Self {
        Self {
            ca: None,
            ram_mb: 64,
            log_filter: "info,tandem_vra=debug,h2=warn,tower=warn".into(),
            bin: None,
        }
    }
}

/// One `tandem-vra` process serving one host: a lab's, or one started alone for VRA-level
/// tests and benchmarks. Killed when dropped.
#[derive(Debug)]
pub struct VraProcess {
    pub host: String,
    pub control: String,
    /// The NBD TCP listener (TLS required unless the VRA runs `--insecure`: NBD's STARTTLS
    /// with a client certificate of the site's CA, see `Lab::nbd_client_certs`).
    pub nbd: String,
    /// The NBD Unix socket, absolute: where this host's clients (the workload, qemu-io)
    /// reach the exports.
    pub nbd_socket: String,
    /// Its directory: `data/` and `vra.log`.
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// The certificate (of its site's CA, naming a manager no member uses) the harness
    /// presents to call this VRA's control service directly.
    pub harness: Option<TlsConfig>,
    /// The binary, flags and extra environment it starts (and restarts) with.
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl VraProcess {
    /// A VRA of `host` living in `dir`, not started.
    pub fn new(host: &str, dir: PathBuf) -> Self {
        Self {
            host: host.to_string(),
            control: String::new(),
            nbd: String::new(),
            nbd_socket: String::new(),
            dir,
            child: None,
            harness: None,
            bin: binary("tandem-vra"),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Starts a VRA of `host` in `root/host` with no managers (they are the harness).
    pub async fn standalone(root: &Path, host: &str, opts: VraOptions<'_>) -> Result<Self> {
        let mut vra = Self::new(host, root.join(host));
        if let Some(bin) = &opts.bin {
            vra.bin = bin.clone();
        }
        vra.env.push(("RUST_LOG".into(), opts.log_filter.clone()));
        let mut args = vec!["--ram-mb".to_string(), opts.ram_mb.to_string()];
        match opts.ca {
            Some(ca) => {
                // The certificate names 127.0.0.1, where the NBD listener is: libnbd's
                // nbds:// checks the address it dials.
                let issued = ca.issue_for(
                    &PeerIdentity::vra(ca.site(), host)?,
                    Duration::from_secs(24 * 3600),
                    &[std::net::Ipv4Addr::LOCALHOST.into()],
                )?;
                PkiDir::new(vra.data_dir().join("pki")).install(ca.cert_pem(), &issued)?;
                let me = PkiDir::new(root.join("harness"));
                if !me.is_provisioned() {
                    ca.provision(&me, &PeerIdentity::manager(ca.site(), 0)?)?;
                }
                vra.harness = Some(TlsConfig::load(&me)?);
            }
            None => args.push("--insecure".into()),
        }
        vra.args = args;
        vra.start().await?;
        Ok(vra)
    }

    /// A channel to this VRA's control service, as its site's managers dial it (mutual TLS
    /// with the harness certificate).
    pub async fn control_channel(&self) -> Result<tonic::transport::Channel> {
        vra_control(&self.control, self.harness.as_ref())
    }

    /// A control client.
    pub async fn client(&self) -> Result<VraControlClient<tonic::transport::Channel>> {
        Ok(VraControlClient::new(self.control_channel().await?))
    }

    /// The export as this host's clients reach it (the Unix socket).
    pub fn uri(&self, export: &str) -> String {
        tandem_nbd::endpoint_uri(&self.nbd_socket, export)
    }

    /// The export over TCP: `nbds://` for a VRA with TLS, plain `nbd://` for an
    /// `--insecure` one.
    pub fn tcp_uri(&self, export: &str) -> String {
        if self.harness.is_some() {
            format!("nbds://{}/{export}", self.nbd)
        } else {
            tandem_nbd::endpoint_uri(&self.nbd, export)
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Where it keeps its assignments, buffers and journals' metadata.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("vra.log")
    }

    /// The last 40 lines of its log (for failure messages).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 40)
    }

    /// Starts (or restarts, on the same addresses) the VRA from its data directory.
    pub async fn start(&mut self) -> Result<()> {
        self.start_with(&[]).await
    }

    /// [`VraProcess::start`] with extra `tandem-vra` flags (e.g. `--ram-mb 32`).
    pub async fn start_with(&mut self, extra_args: &[String]) -> Result<()> {
        self.start_joining(extra_args, "").await
    }

    /// [`VraProcess::start_with`], the first time: with a join token (none if empty), in
    /// its environment where `ps` does not show it.
    pub async fn start_joining(&mut self, extra_args: &[String], join_token: &str) -> Result<()> {
        let (control, nbd) = if self.control.is_empty() {
            ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string())
        } else {
            (self.control.clone(), self.nbd.clone())
        };
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--host-id", &self.host])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--control-listen", &control, "--nbd-listen", &nbd])
            .args(&self.args)
            .args(extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if !join_token.is_empty() {
            cmd.env("TANDEM_VRA_JOIN_TOKEN", join_token);
        }
        let what = format!("vra of {}", self.host);
        let (child, addrs) = spawn_listening(&what, cmd, &self.dir, "vra.log").await?;
        self.child = Some(child);
        self.control = addrs["control"].as_str().unwrap_or_default().to_string();
        self.nbd = addrs["nbd"].as_str().unwrap_or_default().to_string();
        // Absolute: a relative path would read as a host name in an NBD URI.
        let socket = addrs["nbd_socket"].as_str().unwrap_or_default();
        self.nbd_socket = if socket.is_empty() {
            String::new()
        } else {
            std::path::absolute(socket)?.display().to_string()
        };
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

    /// SIGTERM and wait for its exit, however long it takes (a clean shutdown is the test).
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        signal_child(Some(&child), Signal::SIGTERM)?;
        Ok(child.wait().await?)
    }

    /// kill -9.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Spawns `cmd` with `--addr-file` in `dir`, its output appended to `dir/log_name`, and
/// waits until it has written the addresses it listens on.
pub async fn spawn_listening(
    what: &str,
    mut cmd: Command,
    dir: &Path,
    log_name: &str,
) -> Result<(Child, serde_json::Value)> {
    std::fs::create_dir_all(dir)?;
    // The caller's filter, else this process's, else info.
    let log_filter = cmd
        .as_std()
        .get_envs()
        .find(|(k, _)| *k == "RUST_LOG")
        .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
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
        .env("RUST_LOG", log_filter)
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

pub fn signal_child(child: Option<&Child>, sig: Signal) -> Result<()> {
    if let Some(pid) = child.and_then(|c| c.id()) {
        kill(Pid::from_raw(pid as i32), sig)?;
    }
    Ok(())
}

pub async fn stop_child(child: Option<Child>, grace: Duration) -> Result<()> {
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
