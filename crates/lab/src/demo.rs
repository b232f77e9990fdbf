//! The demo the README's main command runs: a two-site lab on loopback (3 managers and 2
//! hosts with their VRAs per site), every inter-site connection through the lab's link
//! emulator. The managers pair, hold the inventory and a VPG of 4 VMs, refuse a VM in two
//! VPGs and survive a kill -9 of a leader. The VRAs, driven here through `VraControl` (until
//! the managers drive them), replicate the 4 VMs of 2 protected hosts to 2 recovery hosts
//! under the verifying workload ([`crate::workload`]), with a checkpoint barrier every few
//! seconds across both protected VRAs. Point-in-time images of checkpoints are checked
//! against the source (equal to it at one cut the checkpoint allows, closed under
//! happened-before) after steady replication, across a link cut (writes tracked, bitmap
//! sync after the heal) and across a kill -9 of a recovery VRA; the last image, after the
//! workload stops, must hold every acknowledged write. Each step prints PASS or FAIL with
//! its figures (replication lag, RPO seen, bytes sent); any FAIL makes the exit status
//! non-zero. Every process the demo starts is stopped when it ends, also on failure and on
//! Ctrl-C.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tandem_nbd::NbdClient;
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, vm_service_client::VmServiceClient,
    vpg_service_client::VpgServiceClient, vra_control_client::VraControlClient,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::lab::{Lab, wait_leader};
use crate::link::CutMode;
use crate::units::fmt_bytes;
use crate::workload::{
    CutWindow, History, ImageReader, Spread, VolumeTarget, Workload, WorkloadConfig, check_final,
    check_image, seed_from_env,
};

const MIB: u64 = 1 << 20;
/// Protected VMs of the demo's VPG: VM `i` runs on protected host `i % 2`.
const VMS: usize = 4;
/// Hosts (VRAs) per site.
const HOSTS: usize = 2;
/// How long the demo waits for a sync, a resume or a durable checkpoint before failing.
const PATIENCE: Duration = Duration::from_secs(60);
/// How often the monitor samples the VRAs' status.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The RPO above which steady replication fails the demo.
const TARGET_RPO: Duration = Duration::from_secs(10);

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Lab directory; a fresh temporary one (removed after a passing run) by default.
    pub dir: Option<PathBuf>,
    /// Keep the lab running after the demo until Ctrl-C.
    pub keep: bool,
    /// Size of each VM's volume.
    pub volume_mib: u64,
    /// Replication buffer of each VRA (its RAM setting).
    pub vra_ram_mib: u64,
    /// Interval of the checkpoint barrier.
    pub checkpoint_interval: Duration,
    /// How long steady replication runs before its images are checked.
    pub steady: Duration,
    /// How long the link is cut.
    pub cut: Duration,
    /// Writers of the verifying workload (each writes every volume).
    pub writers: u32,
    /// Pause of each writer between two writes (zero: back to back, as fast as the VRAs
    /// take them).
    pub pace: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            dir: None,
            keep: false,
            volume_mib: 64,
            vra_ram_mib: 16,
            checkpoint_interval: Duration::from_millis(2500),
            steady: Duration::from_secs(12),
            cut: Duration::from_secs(10),
            writers: 8,
            pace: Duration::from_millis(2),
        }
    }
}

#[derive(Default)]
struct Report {
    failures: usize,
    passes: usize,
    summary: Vec<(String, String)>,
    images: Vec<(String, bool)>,
}

impl Report {
    fn step(&mut self, name: &str, started: Instant, r: Result<String>) {
        let ms = started.elapsed().as_millis();
        match r {
            Ok(figures) => {
                self.passes += 1;
                println!("PASS  {name:<44} {ms:>6} ms  {figures}");
            }
            Err(e) => {
                self.failures += 1;
                println!("FAIL  {name:<44} {ms:>6} ms  {e:#}");
            }
        }
    }

    fn note(&mut self, what: &str, figures: impl Into<String>) {
        self.summary.push((what.to_string(), figures.into()));
    }

    /// Records whether a checked image equals the source.
    fn image(&mut self, what: &str, equal: bool) {
        self.images.push((what.to_string(), equal));
    }
}

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Polls `f` every 50 ms until it returns `Some`, failing after `within`.
async fn wait_until<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {} waiting for {what}", secs(within));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the demo in `opts.dir` (a fresh temporary directory by default, removed after a
/// passing run); `shutdown` (Ctrl-C) stops it, and ends a `keep` lab. Every process it
/// started is stopped before it returns. The exit code is a failure on any FAIL.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> Result<ExitCode> {
    let temporary = opts.dir.is_none();
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tandem-demo-{}-{}", std::process::id(), now_ms()))
    });
    // A lab directory holds the data of its processes: a used one would resume them.
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} is not empty: the demo needs a fresh lab directory",
            dir.display()
        );
    }
    println!(
        "Tandem demo: two sites x (3 managers, {HOSTS} hosts with a VRA) on loopback, every \
         inter-site connection through the link emulator (lab in {})",
        dir.display()
    );
    let started = Instant::now();
    let mut report = Report::default();

    let t = Instant::now();
    let up = tokio::select! {
        r = start_lab(&dir, &opts) => r,
        () = shutdown.cancelled() => Err(anyhow!("interrupted")),
    };
    let mut lab = match up {
        Ok(lab) => {
            report.step(
                "start 2 sites x 3 managers, 2 VRAs each",
                t,
                Ok(format!(
                    "VRA buffers {} MiB; lab.json in {}",
                    opts.vra_ram_mib,
                    dir.display()
                )),
            );
            lab
        }
        Err(e) => {
            report.step("start 2 sites x 3 managers, 2 VRAs each", t, Err(e));
            println!("logs in {}", dir.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let result = tokio::select! {
        r = steps(&mut lab, &opts, &mut report) => r,
        () = shutdown.cancelled() => Err(anyhow!("interrupted")),
    };
    if let Err(e) = result {
        report.failures += 1;
        println!("FAIL  demo stopped: {e:#}");
    }
    if opts.keep && report.failures == 0 {
        println!(
            "lab kept running (Ctrl-C stops it): tandem -e {}",
            lab.endpoints(0).join(",")
        );
        println!(
            "  its links: tandem-lab link --dir {} list",
            lab.dir.display()
        );
        shutdown.cancelled().await;
    }
    lab.down().await;
    if !report.images.is_empty() {
        let equal = report.images.iter().filter(|(_, ok)| *ok).count();
        let which: Vec<String> = report
            .images
            .iter()
            .map(|(w, ok)| format!("{w} {}", if *ok { "equal" } else { "DIFFERENT" }))
            .collect();
        report.note(
            "images checked",
            format!(
                "{equal} of {} equal the source at their checkpoint ({})",
                report.images.len(),
                which.join(", ")
            ),
        );
    }
    if !report.summary.is_empty() {
        println!("\nSummary");
        for (what, figures) in &report.summary {
            println!("  {what:<20} {figures}");
        }
    }
    println!(
        "\n{}: {} passed, {} failed, {} in all",
        if report.failures == 0 {
            "all steps passed"
        } else {
            "SOME STEPS FAILED"
        },
        report.passes,
        report.failures,
        secs(started.elapsed())
    );
    if report.failures == 0 && temporary && !opts.keep {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            println!("could not remove {}: {e}", dir.display());
        }
    } else {
        println!("lab directory (logs, images, journals): {}", dir.display());
    }
    Ok(if report.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn vra_args(opts: &DemoOptions) -> Vec<String> {
    vec!["--ram-mb".into(), opts.vra_ram_mib.to_string()]
}

async fn start_lab(dir: &Path, opts: &DemoOptions) -> Result<Lab> {
    let mut lab = Lab::up(dir, 2, 3).await?;
    if let Err(e) = lab.start_vras_with(HOSTS, &vra_args(opts)).await {
        lab.down().await;
        return Err(e);
    }
    Ok(lab)
}

async fn steps(lab: &mut Lab, opts: &DemoOptions, report: &mut Report) -> Result<()> {
    let protection = manager_steps(lab, opts, report).await?;
    vra_steps(lab, opts, report, &protection).await
}

// ---------------------------------------------------------------------------------------
// Managers: pairing, inventory, the VPG, validation, leader failover.
// ---------------------------------------------------------------------------------------

async fn channel(endpoints: &[String]) -> Result<Channel> {
    for e in endpoints {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{e}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
        {
            return Ok(ch);
        }
    }
    bail!("no manager reachable among {endpoints:?}")
}

/// The VPG the VRAs replicate, as the managers define it.
#[derive(Debug, Clone)]
struct Protection {
    vpg: String,
    generation: u64,
    /// The recovery site's id (the VRAs share a site pair's bandwidth by it).
    recovery_site: String,
    /// VM ids; VM `i` runs on protected host `i % 2` and recovers to recovery host `i % 2`.
    vms: Vec<String>,
}

/// Datastore directory `h` (0-based) of a site: where images, replicas and journals live.
fn datastore_dir(lab: &Lab, site: usize, h: usize) -> PathBuf {
    lab.dir
        .join(&lab.site_names[site])
        .join(format!("ds-{}", h + 1))
}

/// Creates a datastore per host of a site (its VRA's host, registered by the lab), a pool,
/// and `vms` VMs of one volume each; returns (hosts, datastores, pool, vms).
async fn inventory(
    lab: &Lab,
    ch: &Channel,
    site: usize,
    vms: usize,
    volume_bytes: u64,
) -> Result<(Vec<String>, Vec<String>, String, Vec<String>)> {
    let short = &lab.site_names[site]["site-".len()..];
    let mut hosts = Vec::new();
    let mut stores = Vec::new();
    for (h, vra) in lab.vras[site].iter().enumerate() {
        let path = datastore_dir(lab, site, h);
        std::fs::create_dir_all(&path)?;
        let ds = DatastoreServiceClient::new(ch.clone())
            .create_datastore(v1::Datastore {
                id: format!("{short}-ds-{}", h + 1),
                name: format!("{short}-ds-{}", h + 1),
                host_id: vra.host.clone(),
                path: path.display().to_string(),
                capacity_bytes: 64 << 30,
            })
            .await?
            .into_inner();
        hosts.push(vra.host.clone());
        stores.push(ds.id);
    }
    if hosts.len() < 2 {
        bail!("the lab runs {} hosts on {short}, 2 needed", hosts.len());
    }
    let pool = ResourcePoolServiceClient::new(ch.clone())
        .create_resource_pool(v1::ResourcePool {
            id: format!("{short}-pool"),
            name: format!("{short}-pool"),
            cpu_mhz: 20_000,
            memory_mib: 64 * 1024,
            storage_bytes: 1 << 40,
        })
        .await?
        .into_inner();
    let mut ids = Vec::new();
    for i in 0..vms {
        let vm = VmServiceClient::new(ch.clone())
            .create_vm(v1::Vm {
                id: format!("{short}-vm-{i}"),
                name: format!("{short}-vm-{i}"),
                host_id: hosts[i % 2].clone(),
                power: v1::PowerState::On as i32,
                memory_mib: 4096,
                cpus: 2,
                cpu_reservation_mhz: 1000,
                memory_reservation_mib: 2048,
                volumes: vec![v1::Volume {
                    controller: 0,
                    unit: 0,
                    size_bytes: volume_bytes,
                    datastore_id: stores[i % 2].clone(),
                }],
                vpg_id: String::new(),
            })
            .await?
            .into_inner();
        ids.push(vm.id);
    }
    Ok((hosts, stores, pool.id, ids))
}

fn vpg_spec(
    name: &str,
    recovery_site: &str,
    vms: &[String],
    hosts: &[String],
    stores: &[String],
    pool: &str,
) -> v1::VpgSpec {
    v1::VpgSpec {
        name: name.into(),
        recovery_site_id: recovery_site.into(),
        settings: Some(v1::VpgSettings {
            priority: v1::Priority::High as i32,
            target_rpo_secs: TARGET_RPO.as_secs(),
            journal_history_secs: 3600,
            wan_compression: true,
            test_reminder_months: 6,
            ..Default::default()
        }),
        vms: vms
            .iter()
            .enumerate()
            .map(|(i, vm)| v1::VmPlacement {
                vm_id: vm.clone(),
                recovery_host_id: hosts[i % 2].clone(),
                recovery_datastore_id: stores[i % 2].clone(),
                recovery_pool_id: pool.into(),
            })
            .collect(),
    }
}

async fn manager_steps(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
) -> Result<Protection> {
    let a = channel(&lab.endpoints(0)).await?;
    let b = channel(&lab.endpoints(1)).await?;
    let volume_bytes = opts.volume_mib * MIB;

    // Pairing: site-b issues a token, site-a presents it with site-b's addresses as site-a
    // reaches them: through the link emulator.
    let t = Instant::now();
    let r = async {
        let token = SiteServiceClient::new(b.clone())
            .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs: 600 })
            .await?
            .into_inner();
        let peer = SiteServiceClient::new(a.clone())
            .pair_site(v1::PairSiteRequest {
                peer_endpoints: lab.peer_endpoints(0, 1),
                token: token.token,
                advertise_endpoints: lab.peer_endpoints(1, 0),
            })
            .await?
            .into_inner();
        let b_peers = SiteServiceClient::new(b.clone())
            .list_peers(v1::ListPeersRequest {})
            .await?
            .into_inner();
        if b_peers.peers.len() != 1 {
            bail!("site-b records {} peers, expected 1", b_peers.peers.len());
        }
        let name = lab.link_name(0, 1);
        let s = lab.links.get(&name).await?.state().await?;
        if s.a_to_b.connections_total == 0 || s.a_to_b.bytes == 0 || s.b_to_a.bytes == 0 {
            bail!(
                "no pairing traffic on {name}: {} connections, {} B a->b, {} B b->a",
                s.a_to_b.connections_total,
                s.a_to_b.bytes,
                s.b_to_a.bytes
            );
        }
        Ok(format!(
            "paired with {} ({}), both sites record it; over {name}: {} B a->b, {} B b->a",
            peer.name, peer.id, s.a_to_b.bytes, s.b_to_a.bytes
        ))
    }
    .await;
    report.step("pair the sites across the link emulator", t, r);
    let site_b_id = SiteServiceClient::new(b.clone())
        .get_site(v1::GetSiteRequest {})
        .await?
        .into_inner()
        .id;

    let t = Instant::now();
    let inv = async {
        let a_inv = inventory(lab, &a, 0, VMS, volume_bytes).await?;
        let b_inv = inventory(lab, &b, 1, 0, volume_bytes).await?;
        Ok::<_, anyhow::Error>((a_inv, b_inv))
    }
    .await;
    let ((_, _, _, vms), (b_hosts, b_stores, b_pool, _)) = match inv {
        Ok(v) => {
            report.step(
                "inventory: datastores, pools, 4 VMs",
                t,
                Ok(format!(
                    "{VMS} VMs with a {} volume on the 2 hosts of site-a",
                    fmt_bytes(volume_bytes)
                )),
            );
            v
        }
        Err(e) => {
            report.step("inventory: datastores, pools, 4 VMs", t, Err(e));
            bail!("cannot go on without inventory");
        }
    };
    let mut protection = Protection {
        vpg: "vpg-web".into(),
        generation: 1,
        recovery_site: site_b_id.clone(),
        vms: vms.clone(),
    };

    let t = Instant::now();
    let r = async {
        let vpg = VpgServiceClient::new(a.clone())
            .create_vpg(v1::CreateVpgRequest {
                id: protection.vpg.clone(),
                spec: Some(vpg_spec(
                    "web-tier", &site_b_id, &vms, &b_hosts, &b_stores, &b_pool,
                )),
            })
            .await?
            .into_inner();
        let at_b = VpgServiceClient::new(b.clone())
            .get_vpg(v1::GetRequest { id: vpg.id.clone() })
            .await?
            .into_inner();
        protection.generation = vpg.generation.max(1);
        Ok(format!(
            "{} ({} VMs) gen {}: site-a {} / site-b {}",
            vpg.name,
            vpg.vms.len(),
            vpg.generation,
            vpg.direction,
            at_b.direction,
        ))
    }
    .await;
    report.step("create VPG a -> b, stored by both sites", t, r);

    let t = Instant::now();
    let r = async {
        let mut spec = vpg_spec("again", &site_b_id, &vms[..1], &b_hosts, &b_stores, &b_pool);
        spec.name = "again".into();
        match VpgServiceClient::new(a.clone())
            .create_vpg(v1::CreateVpgRequest {
                id: String::new(),
                spec: Some(spec),
            })
            .await
        {
            Ok(_) => bail!("a VM already protected was accepted into a second VPG"),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                Ok(format!("refused: {}", s.message()))
            }
            Err(s) => bail!("unexpected error {s}"),
        }
    }
    .await;
    report.step("a VM in two VPGs is refused", t, r);

    // kill -9 of site-a's leader: a new leader, and the VPG is still there.
    let t = Instant::now();
    let r = async {
        let status = wait_leader(&lab.sites[0][0].api, 3, Duration::from_secs(5)).await?;
        let leader = status.leader_id;
        let idx = lab.sites[0]
            .iter()
            .position(|p| p.id == leader)
            .context("leader not in lab")?;
        let killed_at = Instant::now();
        lab.sites[0][idx].kill9().await?;
        let survivor = lab.sites[0]
            .iter()
            .find(|p| p.id != leader)
            .context("no survivor")?
            .api
            .clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let new_leader = loop {
            if let Ok(s) = wait_leader(&survivor, 3, Duration::from_millis(300)).await
                && s.leader_id != leader
            {
                break s.leader_id;
            }
            if Instant::now() > deadline {
                bail!("no new leader within 10 s");
            }
        };
        let elected = killed_at.elapsed();
        let ch = channel(&[survivor]).await?;
        let vpgs = VpgServiceClient::new(ch)
            .list_vpgs(v1::ListRequest {})
            .await?
            .into_inner();
        if vpgs.vpgs.len() != 1 {
            bail!("expected 1 VPG after failover, found {}", vpgs.vpgs.len());
        }
        lab.sites[0][idx].start("join").await?;
        lab.write_file()?;
        Ok(format!(
            "killed leader {leader}; node {new_leader} leads after {}; VPG intact; node {leader} restarted",
            ms(elected)
        ))
    }
    .await;
    report.step("kill -9 site-a leader, new leader, state kept", t, r);
    Ok(protection)
}

// ---------------------------------------------------------------------------------------
// VRAs: replication, checkpoints, point-in-time images, link cut, recovery VRA kill.
// ---------------------------------------------------------------------------------------

/// One VRA as the demo drives it.
#[derive(Debug, Clone)]
struct Vra {
    host: String,
    control: String,
    nbd: String,
    client: VraControlClient<Channel>,
}

impl Vra {
    fn new(p: &crate::lab::VraProcess) -> Result<Self> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", p.control))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self {
            host: p.host.clone(),
            control: p.control.clone(),
            nbd: p.nbd.clone(),
            client: VraControlClient::new(ch),
        })
    }

    fn c(&self) -> VraControlClient<Channel> {
        self.client.clone()
    }

    async fn status(&self, vpg: &str) -> Result<v1::VpgReplicationStatus> {
        let s = self
            .c()
            .get_status(v1::GetVraStatusRequest {})
            .await
            .map_err(|s| anyhow!("{}: status: {}", self.host, s.message()))?
            .into_inner();
        s.vpgs
            .into_iter()
            .find(|p| p.vpg_id == vpg)
            .ok_or_else(|| anyhow!("{} does not list {vpg}", self.host))
    }

    /// The checkpoints of the VPG this recovery VRA knows: (id, durable and usable).
    async fn checkpoints(&self, vpg: &str) -> Result<Vec<v1::VraCheckpoint>> {
        Ok(self
            .c()
            .list_checkpoints(v1::ListCheckpointsRequest { vpg_id: vpg.into() })
            .await
            .map_err(|s| anyhow!("{}: checkpoints: {}", self.host, s.message()))?
            .into_inner()
            .checkpoints)
    }
}

/// Connected, nothing tracked or dirty, no sync running or owed.
fn is_level(s: &v1::VpgReplicationStatus) -> bool {
    s.connected
        && s.sync.is_none()
        && s.dirty_bytes == 0
        && !s.tracking
        && s.state != v1::VpgStreamState::NeedsSync as i32
}

/// One checkpoint the demo took.
#[derive(Debug, Clone)]
struct Cp {
    id: u64,
    /// The workload's window around the barrier (none after the workload stopped).
    window: Option<CutWindow>,
    thawed: Instant,
    /// Marker sequence on each protected VRA's stream.
    markers: [u64; 2],
    /// From the thaw until durable on both recovery VRAs.
    durable_after: Option<Duration>,
}

/// A freeze a protected VRA refused.
#[derive(Debug, Clone)]
struct Refusal {
    at: Instant,
    reason: String,
}

/// One look at the VRAs.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    prot: [Option<v1::VpgReplicationStatus>; 2],
    /// Age of the newest checkpoint durable on both recovery VRAs.
    rpo: Option<Duration>,
}

#[derive(Debug, Default)]
struct Record {
    samples: Vec<Sample>,
    checkpoints: Vec<Cp>,
    refusals: Vec<Refusal>,
}

/// What the monitor, the checkpoint coordinator and the steps share.
#[derive(Debug)]
struct Ctx {
    vpg: String,
    /// Protected VRAs (site-a hosts 1 and 2).
    prot: [Vra; 2],
    /// Recovery VRAs (site-b hosts 1 and 2); `rec[h]` receives from `prot[h]`.
    rec: [Vra; 2],
    vms: Vec<String>,
    next_id: AtomicU64,
    record: Mutex<Record>,
}

impl Ctx {
    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The VMs of host `h`.
    fn vms_of(&self, h: usize) -> Vec<String> {
        self.vms
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == h)
            .map(|(_, vm)| vm.clone())
            .collect()
    }

    async fn prot_status(&self) -> Result<[v1::VpgReplicationStatus; 2]> {
        let (a, b) = tokio::join!(
            self.prot[0].status(&self.vpg),
            self.prot[1].status(&self.vpg)
        );
        Ok([a?, b?])
    }

    /// The checkpoint barrier across both protected VRAs: freeze both, then thaw both with
    /// one id (the next one) and timestamp; a refused freeze aborts the other. An id a VRA
    /// accepted is never used again, even when the barrier fails.
    async fn barrier(&self, workload: Option<&Workload>) -> Result<Cp, String> {
        let id = self.next_id.load(Ordering::SeqCst) + 1;
        let before = workload.map(Workload::mark);
        let freeze = |v: &Vra| {
            let mut c = v.c();
            let req = v1::FreezeRequest {
                vpg_id: self.vpg.clone(),
                checkpoint_id: id,
            };
            async move { c.freeze(req).await }
        };
        let (f0, f1) = tokio::join!(freeze(&self.prot[0]), freeze(&self.prot[1]));
        if f0.is_ok() || f1.is_ok() {
            self.next_id.store(id, Ordering::SeqCst);
        }
        if f0.is_err() || f1.is_err() {
            for (v, ok) in self.prot.iter().zip([f0.is_ok(), f1.is_ok()]) {
                if ok {
                    let _ = v
                        .c()
                        .abort(v1::AbortRequest {
                            vpg_id: self.vpg.clone(),
                            checkpoint_id: id,
                        })
                        .await;
                }
            }
            let (host, e) = match (f0, f1) {
                (Err(e), _) => (&self.prot[0].host, e),
                (_, Err(e)) => (&self.prot[1].host, e),
                _ => unreachable!("one freeze failed"),
            };
            return Err(format!("{host}: {}", e.message()));
        }
        let ts_ms = now_ms();
        let thaw = |v: &Vra| {
            let mut c = v.c();
            let req = v1::ThawRequest {
                vpg_id: self.vpg.clone(),
                checkpoint_id: id,
                timestamp_ms: ts_ms,
                kind: v1::VraCheckpointKind::Automatic as i32,
                name: String::new(),
            };
            async move { c.thaw(req).await }
        };
        let (t0, t1) = tokio::join!(thaw(&self.prot[0]), thaw(&self.prot[1]));
        let after = workload.map(Workload::mark);
        let thawed = Instant::now();
        match (t0, t1) {
            (Ok(m0), Ok(m1)) => Ok(Cp {
                id,
                window: before.zip(after).map(|(b, a)| CutWindow::new(b, a)),
                thawed,
                markers: [m0.into_inner().marker_seq, m1.into_inner().marker_seq],
                durable_after: None,
            }),
            (Err(e), _) => Err(format!("{}: thaw: {}", self.prot[0].host, e.message())),
            (_, Err(e)) => Err(format!("{}: thaw: {}", self.prot[1].host, e.message())),
        }
    }

    /// Whether checkpoint `id` is durable and usable on both recovery VRAs.
    async fn durable(&self, id: u64) -> bool {
        let (a, b) = tokio::join!(
            self.rec[0].checkpoints(&self.vpg),
            self.rec[1].checkpoints(&self.vpg)
        );
        [a, b].into_iter().all(|r| {
            r.is_ok_and(|cps| {
                cps.iter()
                    .any(|c| c.checkpoint_id == id && c.durable && c.usable)
            })
        })
    }

    /// The newest checkpoint durable on both recovery VRAs.
    fn latest_durable(&self) -> Option<Cp> {
        self.record()
            .checkpoints
            .iter()
            .rev()
            .find(|c| c.durable_after.is_some())
            .cloned()
    }

    /// The first checkpoint thawed after `after` that is durable on both recovery VRAs.
    async fn durable_checkpoint_after(&self, after: Instant) -> Result<Cp> {
        wait_until("a durable checkpoint", PATIENCE, || async {
            self.record()
                .checkpoints
                .iter()
                .find(|c| c.thawed > after && c.durable_after.is_some())
                .cloned()
        })
        .await
    }
}

/// Takes a checkpoint every `interval` (every 500 ms after a refusal) and times how long
/// its marker takes to become durable on both recovery VRAs.
async fn coordinator(
    ctx: Arc<Ctx>,
    workload: Arc<Workload>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        match ctx.barrier(Some(&workload)).await {
            Ok(cp) => {
                let (id, thawed) = (cp.id, cp.thawed);
                ctx.record().checkpoints.push(cp);
                next = tokio::time::Instant::from_std(thawed) + interval;
                let deadline = thawed + interval.min(Duration::from_secs(2));
                while Instant::now() < deadline && !cancel.is_cancelled() {
                    if ctx.durable(id).await {
                        let took = thawed.elapsed();
                        if let Some(c) = ctx.record().checkpoints.iter_mut().find(|c| c.id == id)
                            && c.durable_after.is_none()
                        {
                            c.durable_after = Some(took);
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }
            Err(reason) => {
                ctx.record().refusals.push(Refusal {
                    at: Instant::now(),
                    reason,
                });
                next = tokio::time::Instant::now() + Duration::from_millis(500);
            }
        }
    }
}

/// Samples the protected VRAs' streams, the RPO, and which checkpoints became durable.
async fn monitor(ctx: Arc<Ctx>, cancel: CancellationToken) {
    loop {
        let (p0, p1, r0, r1, c0, c1) = tokio::join!(
            ctx.prot[0].status(&ctx.vpg),
            ctx.prot[1].status(&ctx.vpg),
            ctx.rec[0].status(&ctx.vpg),
            ctx.rec[1].status(&ctx.vpg),
            ctx.rec[0].checkpoints(&ctx.vpg),
            ctx.rec[1].checkpoints(&ctx.vpg),
        );
        let now = Instant::now();
        let wall = now_ms();
        let rpo = match (&r0, &r1) {
            (Ok(a), Ok(b))
                if a.last_durable_checkpoint_ms > 0 && b.last_durable_checkpoint_ms > 0 =>
            {
                let newest = a
                    .last_durable_checkpoint_ms
                    .min(b.last_durable_checkpoint_ms);
                Some(Duration::from_millis(wall.saturating_sub(newest)))
            }
            _ => None,
        };
        {
            let mut rec = ctx.record();
            rec.samples.push(Sample {
                at: now,
                prot: [p0.ok(), p1.ok()],
                rpo,
            });
            if let (Ok(c0), Ok(c1)) = (&c0, &c1) {
                let ok = |cps: &[v1::VraCheckpoint], id| {
                    cps.iter()
                        .any(|c| c.checkpoint_id == id && c.durable && c.usable)
                };
                for cp in rec
                    .checkpoints
                    .iter_mut()
                    .filter(|c| c.durable_after.is_none())
                {
                    if ok(c0, cp.id) && ok(c1, cp.id) {
                        cp.durable_after = Some(now.duration_since(cp.thawed));
                    }
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

/// Figures of the record between two instants.
#[derive(Debug, Default)]
struct Window {
    taken: usize,
    durable: usize,
    durable_ms: Vec<u64>,
    refused: usize,
    first_refusal: Option<String>,
    max_lag_entries: u64,
    max_buffer: u64,
    rpo_max: Option<Duration>,
    rpo_sum: Duration,
    rpo_n: u32,
}

impl Window {
    fn of(ctx: &Ctx, from: Instant, to: Instant) -> Self {
        let rec = ctx.record();
        let mut w = Window::default();
        for cp in rec
            .checkpoints
            .iter()
            .filter(|c| c.thawed >= from && c.thawed <= to)
        {
            w.taken += 1;
            if let Some(d) = cp.durable_after {
                w.durable += 1;
                w.durable_ms.push(d.as_millis() as u64);
            }
        }
        w.durable_ms.sort_unstable();
        for r in rec.refusals.iter().filter(|r| r.at >= from && r.at <= to) {
            w.refused += 1;
            w.first_refusal.get_or_insert_with(|| r.reason.clone());
        }
        for s in rec.samples.iter().filter(|s| s.at >= from && s.at <= to) {
            for p in s.prot.iter().flatten() {
                w.max_lag_entries = w
                    .max_lag_entries
                    .max(p.written_seq.saturating_sub(p.acked_seq));
                w.max_buffer = w.max_buffer.max(p.buffer_bytes);
            }
            if let Some(r) = s.rpo {
                w.rpo_max = Some(w.rpo_max.map_or(r, |m| m.max(r)));
                w.rpo_sum += r;
                w.rpo_n += 1;
            }
        }
        w
    }

    fn durable_figures(&self) -> String {
        match (self.durable_ms.first(), self.durable_ms.last()) {
            (Some(_), Some(max)) => format!(
                "durable after p50 {} ms, max {max} ms",
                self.durable_ms[self.durable_ms.len() / 2]
            ),
            _ => "none durable".into(),
        }
    }

    fn rpo_figures(&self) -> String {
        match self.rpo_max {
            Some(max) if self.rpo_n > 0 => format!(
                "RPO seen avg {}, max {}",
                secs(self.rpo_sum / self.rpo_n),
                secs(max)
            ),
            _ => "RPO not seen".into(),
        }
    }
}

/// The running VRA part: its context, the workload and the background tasks.
struct Run {
    ctx: Arc<Ctx>,
    workload: Option<Arc<Workload>>,
    tasks: JoinSet<()>,
    coordinator: Option<CancellationToken>,
    monitor: CancellationToken,
}

impl Run {
    fn workload(&self) -> Result<&Workload> {
        self.workload
            .as_deref()
            .context("the workload is not running")
    }

    /// Opens the point-in-time images of checkpoint `cp` (workload order) and checks them:
    /// against its window while the workload runs, against every acknowledged write after
    /// it stopped (`history` given).
    async fn check(&self, cp: &Cp, stopped: Option<&History>) -> Result<String> {
        let ctx = &self.ctx;
        let t = Instant::now();
        let mut clients = Vec::new();
        let mut exports = Vec::new();
        let opened = async {
            for (i, vm) in ctx.vms.iter().enumerate() {
                let rec = &ctx.rec[i % 2];
                let e = rec
                    .c()
                    .open_export(v1::OpenExportRequest {
                        vpg_id: ctx.vpg.clone(),
                        vm_id: vm.clone(),
                        volume_id: 0,
                        checkpoint_id: cp.id,
                        writable: false,
                    })
                    .await
                    .map_err(|s| anyhow!("{}: open {vm} at {}: {}", rec.host, cp.id, s.message()))?
                    .into_inner();
                exports.push((i % 2, e.export_name.clone()));
                let client = NbdClient::connect(rec.nbd.as_str(), &e.export_name)
                    .await
                    .with_context(|| format!("nbd {} {}", rec.nbd, e.export_name))?;
                clients.push(client);
            }
            anyhow::Ok(())
        }
        .await;
        let checked = async {
            opened?;
            let images: Vec<&dyn ImageReader> =
                clients.iter().map(|c| c as &dyn ImageReader).collect();
            match stopped {
                Some(history) => check_final(history, &images).await,
                None => {
                    // Taken now, after the checkpoint's window closed.
                    let history = self.workload()?.history();
                    let window = cp.window.context("checkpoint without a window")?;
                    check_image(&history, &window, &images).await
                }
            }
            .map_err(|e| anyhow!("checkpoint {}: {e}", cp.id))
        }
        .await;
        for c in clients {
            let _ = c.disconnect().await;
        }
        for (h, name) in exports {
            let _ = ctx.rec[h]
                .c()
                .close_export(v1::CloseExportRequest { export_name: name })
                .await;
        }
        let r = checked?;
        Ok(format!(
            "checkpoint {} (markers at seq {}/{}) holds {} writes ({} acked before the freeze \
             + {} in flight), {} blocks with data; {} read from {} NBD exports in {}",
            cp.id,
            cp.markers[0],
            cp.markers[1],
            r.writes_included,
            r.required.iter().sum::<u64>(),
            r.writes_in_window,
            r.writes_visible,
            fmt_bytes(r.bytes_checked),
            ctx.vms.len(),
            secs(t.elapsed())
        ))
    }

    async fn stop_background(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.cancel();
        }
        self.monitor.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Waits until both protected VRAs are level; returns their status.
async fn wait_level(ctx: &Ctx, within: Duration) -> Result<[v1::VpgReplicationStatus; 2]> {
    let deadline = Instant::now() + within;
    loop {
        let last = match ctx.prot_status().await {
            Ok(s) if s.iter().all(is_level) => return Ok(s),
            Ok(s) => s
                .iter()
                .zip(&ctx.prot)
                .map(|(s, v)| {
                    format!(
                        "{}: connected {} tracking {} dirty {} sync {} {}",
                        v.host,
                        s.connected,
                        s.tracking,
                        fmt_bytes(s.dirty_bytes),
                        s.sync
                            .as_ref()
                            .map_or("none".into(), |x| format!("{}%", x.percent)),
                        s.last_error
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!(
                "the protected VRAs are not level after {}: {last}",
                secs(within)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sync_kind(k: i32) -> &'static str {
    match v1::VraSyncKind::try_from(k) {
        Ok(v1::VraSyncKind::None) => "none",
        Ok(v1::VraSyncKind::Initial) => "initial",
        Ok(v1::VraSyncKind::Delta) => "delta",
        Ok(v1::VraSyncKind::Bitmap) => "bitmap",
        Ok(v1::VraSyncKind::VolumeInitial) => "volume initial",
        Ok(v1::VraSyncKind::VolumeDelta) => "volume delta",
        Err(_) => "unknown",
    }
}

async fn vra_steps(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    protection: &Protection,
) -> Result<()> {
    if lab.vras.len() < 2 || lab.vras.iter().any(|v| v.len() < 2) {
        bail!("the lab runs fewer than 2 VRAs per site");
    }
    let ctx = Arc::new(Ctx {
        vpg: protection.vpg.clone(),
        prot: [Vra::new(&lab.vras[0][0])?, Vra::new(&lab.vras[0][1])?],
        rec: [Vra::new(&lab.vras[1][0])?, Vra::new(&lab.vras[1][1])?],
        vms: protection.vms.clone(),
        next_id: AtomicU64::new(0),
        record: Mutex::new(Record::default()),
    });
    let mut run = Run {
        ctx: ctx.clone(),
        workload: None,
        tasks: JoinSet::new(),
        coordinator: None,
        monitor: CancellationToken::new(),
    };
    let r = vra_steps_in(lab, opts, report, protection, &mut run).await;
    run.stop_background().await;
    if let Some(w) = run.workload.take()
        && let Ok(w) = Arc::try_unwrap(w)
    {
        drop(w.stop().await);
    }
    r
}

async fn vra_steps_in(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    protection: &Protection,
    run: &mut Run,
) -> Result<()> {
    let started = Instant::now();
    let t = Instant::now();
    let r = assign(lab, opts, report, protection, run).await;
    let ok = r.is_ok();
    report.step("assign 4 VMs on 2 hosts, initial sync", t, r);
    if !ok {
        bail!("cannot go on without replication");
    }
    run.tasks
        .spawn(monitor(run.ctx.clone(), run.monitor.clone()));

    let t = Instant::now();
    let r = start_workload(opts, run).await;
    let ok = r.is_ok();
    report.step("verifying workload over NBD, 4 volumes", t, r);
    if !ok {
        bail!("cannot go on without the workload");
    }

    let t = Instant::now();
    tokio::time::sleep(opts.steady).await;
    let r = steady(opts, report, run, t).await;
    report.step("replicate with a checkpoint every few s", t, r);

    let t = Instant::now();
    let r = async {
        run.ctx.durable_checkpoint_after(started).await?;
        let cp = run.ctx.latest_durable().context("no durable checkpoint")?;
        run.check(&cp, None).await
    }
    .await;
    report.image("steady", r.is_ok());
    report.step("point-in-time image = source at checkpoint", t, r);

    link_cut(lab, opts, report, run).await?;

    let t = Instant::now();
    let r = kill_recovery_vra(lab, opts, report, run).await;
    report.step("kill -9 recovery VRA, restart, resume", t, r);
    let t = Instant::now();
    let r = async {
        let cp = run.ctx.durable_checkpoint_after(t).await?;
        run.check(&cp, None).await
    }
    .await;
    report.image("after the kill", r.is_ok());
    report.step("checkpoint after the restart = source", t, r);

    let t = Instant::now();
    let r = finish(report, run).await;
    report.image("final", r.is_ok());
    report.step("stop workload; last image holds every ack", t, r);

    let all = Window::of(&run.ctx, started, Instant::now());
    report.note(
        "checkpoints",
        format!(
            "{} taken, {} durable on both recovery VRAs, {} freezes refused; {}",
            all.taken,
            all.durable,
            all.refused,
            all.durable_figures()
        ),
    );
    Ok(())
}

/// Assigns the recovery role for each protected host's VMs on its recovery VRA, then the
/// protected role (same VPG id and generation on both protected VRAs), and waits for the
/// initial syncs.
/// A VM's only volume (id 0), an image file `name` in the datastore `dir`.
fn volume(dir: &Path, name: &str, size_bytes: u64) -> v1::VraVolume {
    v1::VraVolume {
        volume_id: 0,
        size_bytes,
        path: dir.join(name).display().to_string(),
    }
}

async fn assign(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    protection: &Protection,
    run: &Run,
) -> Result<String> {
    let t = Instant::now();
    let ctx = &run.ctx;
    let volume_bytes = opts.volume_mib * MIB;
    for h in 0..2 {
        let vms = ctx.vms_of(h);
        let rec_dir = datastore_dir(lab, 1, h);
        ctx.rec[h]
            .c()
            .assign_recovery(v1::AssignRecoveryRequest {
                vpg_id: ctx.vpg.clone(),
                generation: protection.generation,
                vms: vms
                    .iter()
                    .map(|vm| v1::RecoveryVm {
                        vm_id: vm.clone(),
                        volumes: vec![volume(&rec_dir, &format!("{vm}-0.replica"), volume_bytes)],
                        journal_dir: rec_dir.join("journals").join(vm).display().to_string(),
                    })
                    .collect(),
                journal_history_secs: 3600,
                journal_warning_bytes: 0,
                journal_hard_limit_bytes: 0,
                remove_dropped_vm_data: false,
                keep_vm_ids: Vec::new(),
            })
            .await
            .map_err(|s| anyhow!("{}: assign recovery: {}", ctx.rec[h].host, s.message()))?;
        // The protected VRA reaches its recovery VRA across the link.
        let recovery = lab.link_address(0, 1, &ctx.rec[h].control).await?;
        let prot_dir = datastore_dir(lab, 0, h);
        ctx.prot[h]
            .c()
            .assign_protected(v1::AssignProtectedRequest {
                vpg_id: ctx.vpg.clone(),
                generation: protection.generation,
                vms: vms
                    .iter()
                    .map(|vm| v1::ProtectedVm {
                        vm_id: vm.clone(),
                        volumes: vec![volume(&prot_dir, &format!("{vm}-0.img"), volume_bytes)],
                    })
                    .collect(),
                recovery_vra_address: recovery,
                wan_compression: true,
                priority: v1::VraPriority::High as i32,
                freeze_timeout_ms: 5000,
                preseeded: false,
                recovery_site_id: protection.recovery_site.clone(),
            })
            .await
            .map_err(|s| anyhow!("{}: assign protected: {}", ctx.prot[h].host, s.message()))?;
    }
    let s = wait_level(ctx, PATIENCE).await?;
    let mut parts = Vec::new();
    let (mut examined, mut sent) = (0, 0);
    for (h, (st, v)) in s.iter().zip(&ctx.prot).enumerate() {
        let sync = st.last_sync.clone().context("no sync reported")?;
        if sync.kind != v1::VraSyncKind::Initial as i32 {
            bail!(
                "{}: last sync is {}, not initial",
                v.host,
                sync_kind(sync.kind)
            );
        }
        examined += sync.done_bytes;
        sent += sync.sent_bytes;
        parts.push(format!(
            "{} -> {}: {}",
            v.host,
            ctx.rec[h].host,
            ctx.vms_of(h).join(", ")
        ));
    }
    let took = t.elapsed();
    report.note(
        "initial sync",
        format!(
            "{} examined, {} sent (zero regions skipped), {}",
            fmt_bytes(examined),
            fmt_bytes(sent),
            secs(took)
        ),
    );
    Ok(format!(
        "{}; initial sync {} examined, {} sent, level after {}",
        parts.join("; "),
        fmt_bytes(examined),
        fmt_bytes(sent),
        secs(took)
    ))
}

/// Starts the verifying workload over NBD on the protected volumes, then the checkpoint
/// coordinator.
async fn start_workload(opts: &DemoOptions, run: &mut Run) -> Result<String> {
    let ctx = run.ctx.clone();
    let targets = ctx
        .vms
        .iter()
        .enumerate()
        .map(|(i, vm)| VolumeTarget::new(&ctx.prot[i % 2].nbd, format!("{vm}/0")))
        .collect();
    let config = WorkloadConfig {
        volumes: targets,
        writers: opts.writers,
        spread: Spread::AcrossVolumes,
        region_blocks: None,
        seed: seed_from_env(),
        pace: opts.pace,
        fua: false,
    };
    let workload = Arc::new(Workload::start(config).await?);
    run.workload = Some(workload.clone());
    let seed = workload.seed();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = workload.acked() as f64 / t.elapsed().as_secs_f64();
    let cancel = CancellationToken::new();
    run.tasks.spawn(coordinator(
        ctx.clone(),
        workload,
        opts.checkpoint_interval,
        cancel.clone(),
    ));
    run.coordinator = Some(cancel);
    Ok(format!(
        "{} writers each writing all {} volumes, 4 KiB writes at {rate:.0}/s ({}/s); seed \
         {seed:#x} (TANDEM_WORKLOAD_SEED={seed:#x} repeats it); a checkpoint every {}",
        opts.writers,
        ctx.vms.len(),
        fmt_bytes((rate * 4096.0) as u64),
        secs(opts.checkpoint_interval)
    ))
}

/// Figures of steady replication since `from`.
async fn steady(
    opts: &DemoOptions,
    report: &mut Report,
    run: &Run,
    from: Instant,
) -> Result<String> {
    let ctx = &run.ctx;
    let w = Window::of(ctx, from, Instant::now());
    // One checkpoint per interval, less one for the first and the last partial interval.
    let expected = (opts.steady.as_millis() / opts.checkpoint_interval.as_millis().max(1))
        .saturating_sub(1)
        .max(1) as usize;
    let s = ctx.prot_status().await?;
    let sent: u64 = s.iter().map(|p| p.wan_bytes_sent).sum();
    let raw: u64 = s.iter().map(|p| p.wan_bytes_raw).sum();
    if w.durable < expected {
        bail!(
            "{} checkpoints taken, {} durable, {expected} expected ({} refused: {})",
            w.taken,
            w.durable,
            w.refused,
            w.first_refusal.unwrap_or_default()
        );
    }
    if let Some(max) = w.rpo_max
        && max > TARGET_RPO
    {
        bail!("RPO reached {} (target {})", secs(max), secs(TARGET_RPO));
    }
    report.note(
        "steady replication",
        format!(
            "{} checkpoints, {}; lag max {} entries / {} buffered; {}",
            w.durable,
            w.durable_figures(),
            w.max_lag_entries,
            fmt_bytes(w.max_buffer),
            w.rpo_figures()
        ),
    );
    Ok(format!(
        "{} checkpoints, {} durable on both recovery VRAs, {}; replication lag (written - \
         acked) max {} entries, {} buffered; {}; WAN {} sent so far ({} before lz4)",
        w.taken,
        w.durable,
        w.durable_figures(),
        w.max_lag_entries,
        fmt_bytes(w.max_buffer),
        w.rpo_figures(),
        fmt_bytes(sent),
        fmt_bytes(raw)
    ))
}

/// Cuts the link under the workload, heals it after `opts.cut`, follows the bitmap sync,
/// and checks a checkpoint after it. Reports three steps.
async fn link_cut(lab: &mut Lab, opts: &DemoOptions, report: &mut Report, run: &Run) -> Result<()> {
    let ctx = &run.ctx;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    let t = Instant::now();
    let before_cut = ctx.latest_durable();
    let acked_at_cut = run.workload()?.acked();
    let cut_state = link.cut(CutMode::Drop).await?;
    let cut_at = Instant::now();
    let r = async {
        let before_cut = before_cut.context("no durable checkpoint before the cut")?;
        let tracked = wait_until("writes to be tracked", opts.cut, || async {
            let s = ctx.prot_status().await.ok()?;
            s.iter().all(|p| p.tracking).then(|| cut_at.elapsed())
        })
        .await;
        // Recovery to the last checkpoint before the cut stays possible during it.
        let image = run.check(&before_cut, None).await;
        tokio::time::sleep(opts.cut.saturating_sub(cut_at.elapsed())).await;
        let s = ctx.prot_status().await?;
        let w = Window::of(ctx, cut_at, Instant::now());
        let acked = run.workload()?.acked() - acked_at_cut;
        let link_now = link.state().await?;
        let crossed = link_now.a_to_b.bytes - cut_state.a_to_b.bytes;
        let refused_conns =
            link_now.a_to_b.connections_refused - cut_state.a_to_b.connections_refused;
        let tracked = tracked.with_context(|| {
            format!(
                "tracking {} / {}, buffers {} / {}",
                s[0].tracking,
                s[1].tracking,
                fmt_bytes(s[0].buffer_bytes),
                fmt_bytes(s[1].buffer_bytes)
            )
        })?;
        image.context("the last checkpoint before the cut")?;
        Ok(format!(
            "{acked} writes acked during the cut; both VRAs tracking writes after {} (buffers \
             full), {} dirty; {} taken before that, {} refused after ({}); link counted \
             {crossed} B a->b and refused {refused_conns} connections; checkpoint {} from \
             before the cut checked equal during it",
            secs(tracked),
            fmt_bytes(s.iter().map(|p| p.dirty_bytes).sum()),
            count(w.taken, "checkpoint"),
            count(w.refused, "freeze"),
            w.first_refusal.as_deref().unwrap_or("none tried"),
            before_cut.id,
        ))
    }
    .await;
    // Whatever happened, heal after the cut's length.
    tokio::time::sleep(opts.cut.saturating_sub(cut_at.elapsed())).await;
    let healed_state = link.heal().await?;
    let heal_at = Instant::now();
    report.step(
        &format!("cut the link {} under the workload", secs(opts.cut)),
        t,
        r,
    );

    let r = async {
        let s = wait_level(ctx, PATIENCE).await?;
        let level_at = Instant::now();
        let level_after = level_at.duration_since(heal_at);
        let link_now = link.state().await?;
        let syncing = Window::of(ctx, heal_at, level_at);
        let outage = Window::of(ctx, cut_at, level_at);
        let lost = ctx
            .record()
            .checkpoints
            .iter()
            .filter(|c| c.thawed >= cut_at && c.thawed <= heal_at && c.durable_after.is_none())
            .count();
        let mut parts = Vec::new();
        let mut sent = 0;
        for (p, v) in s.iter().zip(&ctx.prot) {
            let sync = p.last_sync.clone().context("no sync reported")?;
            if sync.kind != v1::VraSyncKind::Bitmap as i32 {
                bail!(
                    "{}: last sync is {}, not bitmap",
                    v.host,
                    sync_kind(sync.kind)
                );
            }
            sent += sync.sent_bytes;
            parts.push(format!(
                "{} {} ({:?})",
                v.host,
                fmt_bytes(sync.sent_bytes),
                sync.trigger
            ));
        }
        let crossed = link_now.a_to_b.bytes - healed_state.a_to_b.bytes;
        let rpo = outage.rpo_max.map_or("-".into(), secs);
        report.note(
            "link cut",
            format!(
                "{}; bitmap sync {} in {}; RPO seen max {rpo}; {} refused, {} lost with the \
                 buffer",
                secs(opts.cut),
                fmt_bytes(sent),
                secs(level_after),
                count(outage.refused, "freeze"),
                count(lost, "checkpoint"),
            ),
        );
        Ok(format!(
            "bitmap sync sent {} ({}), level {} after the heal; link counted {} a->b since \
             the heal (sync + live writes, lz4); {} refused while syncing ({}); {} taken in \
             the cut before tracking began lost with the buffer; RPO seen max {rpo}",
            fmt_bytes(sent),
            parts.join(", "),
            secs(level_after),
            fmt_bytes(crossed),
            count(syncing.refused, "freeze"),
            syncing.first_refusal.as_deref().unwrap_or("none tried"),
            count(lost, "checkpoint"),
        ))
    }
    .await;
    report.step("heal: bitmap sync, then level", heal_at, r);

    let t = Instant::now();
    let r = async {
        let cp = ctx.durable_checkpoint_after(t).await?;
        run.check(&cp, None).await
    }
    .await;
    report.image("after the cut", r.is_ok());
    report.step("checkpoint after the heal = source", t, r);
    Ok(())
}

/// kill -9 of recovery VRA 1; it restarts on the same addresses, and its sender resumes
/// after the acknowledged sequence.
async fn kill_recovery_vra(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    run: &Run,
) -> Result<String> {
    let ctx = &run.ctx;
    let (prot, rec) = (&ctx.prot[0], &ctx.rec[0]);
    let before = prot.status(&ctx.vpg).await?;
    let killed_at = Instant::now();
    lab.vras[1][0].kill9().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead = killed_at.elapsed();
    lab.vras[1][0].start_with(&vra_args(opts)).await?;
    lab.write_file()?;
    let restarted = Instant::now();
    let after_restart = rec.status(&ctx.vpg).await?;
    if after_restart.durable_seq < before.acked_seq {
        bail!(
            "seq {} was acknowledged before the kill, the journals hold {} after the restart",
            before.acked_seq,
            after_restart.durable_seq
        );
    }
    // Resumed: reconnected, and entries written after the restart are acknowledged.
    let target = after_restart.durable_seq + 500;
    let (resumed, s) = wait_until("the stream to resume", PATIENCE, || async {
        let s = prot.status(&ctx.vpg).await.ok()?;
        (s.connected && s.reconnects > before.reconnects && s.acked_seq >= target)
            .then(|| (restarted.elapsed(), s))
    })
    .await?;
    let level = wait_level(ctx, PATIENCE).await?;
    let sync = match (&before.last_sync, &level[0].last_sync) {
        (Some(a), Some(b)) if a.started_ms != b.started_ms => format!(
            "it needed a {} sync of {}",
            sync_kind(b.kind),
            fmt_bytes(b.sent_bytes)
        ),
        _ => "no sync needed".into(),
    };
    report.note(
        "recovery VRA kill",
        format!(
            "down {}, stream resumed {} after the restart, {sync}, no acknowledged sequence \
             lost",
            secs(restarted.duration_since(killed_at)),
            secs(resumed),
        ),
    );
    Ok(format!(
        "{} killed with {} entries ({}) unacknowledged in {}'s buffer, dead {}, up again \
         after {}; its journals hold seq {} >= {} acked before the kill; {} reconnected \
         (reconnects {} -> {}) and resumed: acked {} within {} of the restart; {sync}",
        rec.host,
        before.written_seq.saturating_sub(before.acked_seq),
        fmt_bytes(before.buffer_bytes),
        prot.host,
        secs(dead),
        secs(restarted.duration_since(killed_at)),
        after_restart.durable_seq,
        before.acked_seq,
        prot.host,
        before.reconnects,
        s.reconnects,
        s.acked_seq,
        secs(resumed),
    ))
}

/// Stops the coordinator and the workload, waits for level, takes a last checkpoint and
/// checks that its image holds every acknowledged write.
async fn finish(report: &mut Report, run: &mut Run) -> Result<String> {
    let ctx = run.ctx.clone();
    if let Some(c) = run.coordinator.take() {
        c.cancel();
    }
    // The coordinator ends after the barrier it may have in flight; then the workload is
    // ours alone.
    let mut w = run.workload.take().context("no workload")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let workload = loop {
        match Arc::try_unwrap(w) {
            Ok(x) => break x,
            Err(a) if Instant::now() < deadline => w = a,
            Err(a) => {
                run.workload = Some(a);
                bail!("the checkpoint coordinator did not stop");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let history = workload.stop().await;
    if let Some(f) = history.failures().first() {
        bail!(
            "{} writes failed, first {}: {}",
            history.failures().len(),
            f.write,
            f.error
        );
    }
    let t = Instant::now();
    wait_level(&ctx, PATIENCE).await?;
    let level_after = t.elapsed();
    let cp = wait_until("the last checkpoint", PATIENCE, || async {
        ctx.barrier(None).await.ok()
    })
    .await?;
    let id = cp.id;
    ctx.record().checkpoints.push(cp.clone());
    wait_until("the last checkpoint to be durable", PATIENCE, || async {
        ctx.durable(id).await.then_some(())
    })
    .await?;
    let checked = run.check(&cp, Some(&history)).await?;
    let s = ctx.prot_status().await?;
    let raw: u64 = s.iter().map(|p| p.wan_bytes_raw).sum();
    let sent: u64 = s.iter().map(|p| p.wan_bytes_sent).sum();
    let written: u64 = s.iter().map(|p| p.write_bytes).sum();
    report.note(
        "workload",
        format!(
            "{} writes, all acknowledged, none failed; {} written; WAN {} sent ({} before lz4)",
            history.acked_writes(),
            fmt_bytes(written),
            fmt_bytes(sent),
            fmt_bytes(raw)
        ),
    );
    Ok(format!(
        "{} writes acked, none failed; level {} after the stop; {checked}",
        history.acked_writes(),
        secs(level_after)
    ))
}
