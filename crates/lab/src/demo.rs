//! The demo the README's main command runs: a two-site lab on loopback (3 managers and 2
//! hosts with their VRAs per site), every inter-site connection through the lab's link
//! emulator. Everything goes through the managers' API, as an operator would drive it:
//! pairing, inventory, a VPG of 4 VMs on 2 hosts (and a VM in two VPGs refused); the
//! managers then assign the VRAs, sync, and checkpoint at the VPG's interval. Under the
//! verifying workload ([`crate::workload`]) over NBD, the demo follows both sites' view of
//! the VPG and the recovery site's checkpoint list, and checks the point-in-time images of
//! listed checkpoints against the source (equal to it at one cut the checkpoint's
//! timestamp allows, closed under happened-before): in steady protection, under a new
//! leader after a kill -9 of site-a's leader (no event or task lost), during and after a
//! link cut (Site disconnection / Recovery is possible, then the sync), and after a kill
//! -9 of a recovery VRA; the last image, a named checkpoint taken after the workload
//! stops, must hold every acknowledged write. Then the recovery operations: a failover
//! test, a move to site-b committed with reverse protection (site-a's disks delta-synced,
//! bytes printed) and the move back, and a failover after kill -9 of all of site-a, each
//! checked against every acknowledged write. The demo opens images at the recovery VRAs
//! to check them and drives no VRA. Each step prints PASS or FAIL with its figures (RPO,
//! times, bytes); any FAIL makes the exit status non-zero. Every process the demo starts
//! is stopped when it ends, also on failure and on Ctrl-C.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tandem_nbd::NbdClient;
use tandem_proto::client::{ApiChannel as Channel, ApiConnector};
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient,
    monitoring_service_client::MonitoringServiceClient,
    recovery_service_client::RecoveryServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, task_service_client::TaskServiceClient,
    vm_service_client::VmServiceClient, vpg_service_client::VpgServiceClient,
    vra_control_client::VraControlClient,
};
use tokio_util::sync::CancellationToken;

use crate::lab::{Lab, wait_leader};
use crate::link::CutMode;
use crate::units::{fmt_bytes, percentile};
use crate::workload::{
    History, ImageReader, Spread, VolumeTarget, Workload, WorkloadConfig, check_final, check_image,
    seed_from_env,
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
    /// The VPG's checkpoint interval, in seconds (at least 1).
    pub checkpoint_interval_secs: u64,
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
            checkpoint_interval_secs: 2,
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
            let joined = joins_recorded(&lab).await.map(|joined| {
                format!(
                    "{joined}; VRA buffers {} MiB; lab.json in {}",
                    opts.vra_ram_mib,
                    dir.display()
                )
            });
            report.step("start 2 sites x 3 managers, 2 VRAs each", t, joined);
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
    protection_steps(lab, opts, report, &protection).await
}

// ---------------------------------------------------------------------------------------
// Managers: pairing, inventory, the VPG, validation.
// ---------------------------------------------------------------------------------------

async fn channel(endpoints: &[String]) -> Result<Channel> {
    Ok(ApiConnector::default()
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
        .connect(endpoints)
        .await?)
}

/// The VPG the VRAs replicate, as the managers define it.
#[derive(Debug, Clone)]
struct Protection {
    vpg: String,
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
                    path: String::new(),
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

/// Where the demo's VMs go: hosts and datastores (VM i on the (i % 2)th) and the pool at
/// the recovery site, and the pool at the protected site once they are protected back.
struct Placement<'a> {
    hosts: &'a [String],
    stores: &'a [String],
    pool: &'a str,
    reverse_pool: &'a str,
}

fn vpg_spec(
    name: &str,
    recovery_site: &str,
    vms: &[String],
    at: &Placement<'_>,
    checkpoint_interval_secs: u64,
) -> v1::VpgSpec {
    let Placement {
        hosts,
        stores,
        pool,
        reverse_pool,
    } = at;
    v1::VpgSpec {
        name: name.into(),
        recovery_site_id: recovery_site.into(),
        settings: Some(v1::VpgSettings {
            priority: v1::Priority::High as i32,
            target_rpo_secs: TARGET_RPO.as_secs(),
            checkpoint_interval_secs,
            journal_history_secs: 3600,
            wan_compression: true,
            test_reminder_months: 6,
            reverse_pool_id: reverse_pool.to_string(),
            ..Default::default()
        }),
        vms: vms
            .iter()
            .enumerate()
            .map(|(i, vm)| v1::VmPlacement {
                vm_id: vm.clone(),
                recovery_host_id: hosts[i % 2].clone(),
                recovery_datastore_id: stores[i % 2].clone(),
                recovery_pool_id: pool.to_string(),
                preseeded: false,
            })
            .collect(),
    }
}

/// Checks that every node but each site's first manager joined its site with a one-time
/// join token (the managers record each join as EV0071) and that each site's CA lives
/// with its managers; answers what it saw.
async fn joins_recorded(lab: &Lab) -> Result<String> {
    let mut seen = Vec::new();
    for site in 0..lab.sites.len() {
        let events = MonitoringServiceClient::new(channel(&lab.endpoints(site)).await?)
            .list_events(v1::ListEventsQuery {
                code: "EV0071".into(),
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        let want = lab.sites[site].len() - 1 + lab.vras[site].len();
        if events.len() != want {
            bail!(
                "{}: {} joins recorded, expected {want} (managers 2.. and every VRA)",
                lab.site_names[site],
                events.len()
            );
        }
        seen.push(format!("{} {}", lab.site_names[site], events.len()));
    }
    Ok(format!(
        "every manager after the first and every VRA joined with a one-time join token, \
         its certificate issued by its site's managers ({} joins)",
        seen.join(", ")
    ))
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
        let pinned = token.ca_fingerprint.clone();
        if pinned.is_empty() {
            bail!("site-b's pairing token pins no CA (is it running --insecure?)");
        }
        let peer = SiteServiceClient::new(a.clone())
            .pair_site(v1::PairSiteRequest {
                peer_endpoints: lab.peer_endpoints(0, 1),
                peer_api_endpoints: lab.peer_api_endpoints(0, 1),
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
        // Each site holds the other's CA: site-a the one the token pinned.
        if !tandem_tls::config::check_ca_bundle(&peer.ca_pem)?.contains(&pinned) {
            bail!("site-a recorded CAs without the one site-b's token pinned");
        }
        tandem_tls::config::check_ca_bundle(&b_peers.peers[0].ca_pem)
            .context("site-b holds no usable CA of site-a")?;
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
            "paired with {} ({}), its CA pinned (sha256 {}...) and the CAs exchanged, both \
             sites record it; over {name}: {} B a->b, {} B b->a",
            peer.name,
            peer.id,
            pinned.get(..16).unwrap_or(&pinned),
            s.a_to_b.bytes,
            s.b_to_a.bytes
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
    let ((_, _, a_pool, vms), (b_hosts, b_stores, b_pool, _)) = match inv {
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
    let protection = Protection {
        vpg: "vpg-web".into(),
        vms: vms.clone(),
    };
    let interval = opts.checkpoint_interval_secs;
    let at_b = Placement {
        hosts: &b_hosts,
        stores: &b_stores,
        pool: &b_pool,
        reverse_pool: &a_pool,
    };

    let t = Instant::now();
    let r = async {
        let vpg = VpgServiceClient::new(a.clone())
            .create_vpg(v1::CreateVpgRequest {
                id: protection.vpg.clone(),
                spec: Some(vpg_spec("web-tier", &site_b_id, &vms, &at_b, interval)),
            })
            .await?
            .into_inner();
        let at_b = VpgServiceClient::new(b.clone())
            .get_vpg(v1::GetRequest { id: vpg.id.clone() })
            .await?
            .into_inner();
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
    report.step("tandem vpg create a -> b, both sites store it", t, r);

    let t = Instant::now();
    let r = async {
        let mut spec = vpg_spec("again", &site_b_id, &vms[..1], &at_b, interval);
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

    Ok(protection)
}

// ---------------------------------------------------------------------------------------
// Protection as the managers run it: statuses, checkpoints, their images, faults.
// ---------------------------------------------------------------------------------------

/// The managers of one site, asked at whichever node answers (a dead one is skipped).
#[derive(Debug, Clone)]
struct Managers {
    site: String,
    channels: Vec<Channel>,
}

impl Managers {
    fn new(site: &str, endpoints: &[String]) -> Result<Self> {
        let connector = ApiConnector::default()
            .with_timeouts(Duration::from_millis(500), Duration::from_secs(5));
        let channels = endpoints
            .iter()
            .map(|e| Ok(connector.lazy(e)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            site: site.into(),
            channels,
        })
    }

    /// The first answer of `call` at any node.
    async fn ask<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = String::from("no node");
        for ch in &self.channels {
            match call(ch.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => last = s.message().to_string(),
            }
        }
        bail!("{}: no manager answered ({last})", self.site)
    }

    async fn vpg(&self, id: &str) -> Result<v1::Vpg> {
        self.ask(|ch| async move {
            VpgServiceClient::new(ch)
                .get_vpg(v1::GetRequest { id: id.into() })
                .await
        })
        .await
    }

    /// The VPG's status as this site shows it: (status, substatus).
    async fn shown(&self, id: &str) -> Result<(String, String)> {
        let s = self.vpg(id).await?.status.unwrap_or_default();
        Ok((s.status, s.substatus))
    }

    /// The failovers of `vpg` that run here.
    async fn recoveries(&self, vpg: &str) -> Result<Vec<v1::RecoveryOperation>> {
        let vpg = vpg.to_string();
        Ok(self
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .list_recoveries(v1::ListRecoveriesRequest { vpg_ids: vec![vpg] })
                        .await
                }
            })
            .await?
            .operations)
    }

    /// Waits until no failover or move of `vpg` runs here.
    async fn wait_no_recovery(&self, vpg: &str, what: &str) -> Result<()> {
        wait_until(what, PATIENCE, || async {
            self.recoveries(vpg).await.ok().filter(|o| o.is_empty())
        })
        .await
        .map(|_| ())
    }

    /// The failover tests of `vpg` that run here.
    async fn failover_tests(&self, vpg: &str) -> Result<Vec<v1::FailoverTest>> {
        Ok(self
            .ask(|ch| async move {
                RecoveryServiceClient::new(ch)
                    .list_failover_tests(v1::ListFailoverTestsRequest {
                        vpg_ids: vec![vpg.into()],
                    })
                    .await
            })
            .await?
            .tests)
    }

    /// Checkpoints stamped at or after `from_ms`, newest first.
    async fn checkpoints(&self, vpg: &str, from_ms: u64) -> Result<Vec<v1::Checkpoint>> {
        Ok(self
            .ask(|ch| async move {
                VpgServiceClient::new(ch)
                    .list_checkpoints(v1::ListCheckpointsQuery {
                        vpg_id: vpg.into(),
                        from_ms,
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await
            })
            .await?
            .checkpoints)
    }

    async fn events(&self) -> Result<Vec<v1::Event>> {
        Ok(self
            .ask(|ch| async move {
                MonitoringServiceClient::new(ch)
                    .list_events(v1::ListEventsQuery {
                        limit: 1000,
                        ..Default::default()
                    })
                    .await
            })
            .await?
            .events)
    }

    async fn tasks(&self) -> Result<Vec<v1::Task>> {
        Ok(self
            .ask(|ch| async move {
                TaskServiceClient::new(ch)
                    .list_tasks(v1::ListTasksQuery {
                        limit: 1000,
                        ..Default::default()
                    })
                    .await
            })
            .await?
            .tasks)
    }

    /// Polls until the VPG's (status, substatus) satisfies `done`; records every one seen.
    async fn wait_shown(
        &self,
        vpg: &str,
        within: Duration,
        seen: &mut Vec<String>,
        done: impl Fn(&str, &str) -> bool,
    ) -> Result<Duration> {
        let t = Instant::now();
        loop {
            if let Ok((status, sub)) = self.shown(vpg).await {
                push_new(seen, format!("{status} / {sub}"));
                if done(&status, &sub) {
                    return Ok(t.elapsed());
                }
            }
            if t.elapsed() > within {
                bail!(
                    "{} does not show it within {}; seen: {}",
                    self.site,
                    secs(within),
                    seen.join(" -> ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Where one VM of the VPG lives: its volume at the protected VRA, its images at the
/// recovery VRA (opened there to be checked; the managers list the checkpoints).
#[derive(Debug, Clone)]
struct VmAt {
    vm: String,
    prot_nbd: String,
    rec_host: String,
    rec_control: String,
    /// The lab's harness certificate for the recovery site's VRAs.
    rec_harness: Option<tandem_tls::TlsConfig>,
    rec_nbd: String,
}

/// One look at what both sites show.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    wall_ms: u64,
    a: Option<v1::VpgStatus>,
    b: Option<v1::VpgStatus>,
}

/// A checkpoint the recovery site listed, and when the demo first saw it usable.
#[derive(Debug, Clone)]
struct Listed {
    cp: v1::Checkpoint,
    usable_at_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Record {
    samples: Vec<Sample>,
    listed: std::collections::BTreeMap<u64, Listed>,
}

/// What the monitor and the steps share.
#[derive(Debug)]
struct Ctx {
    vpg: String,
    a: Managers,
    b: Managers,
    vms: Vec<VmAt>,
    interval: Duration,
    record: Mutex<Record>,
}

impl Ctx {
    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Usable checkpoints listed so far stamped in `[from_ms, to_ms]`, oldest first.
    fn usable(&self, from_ms: u64, to_ms: u64) -> Vec<Listed> {
        self.record()
            .listed
            .values()
            .filter(|l| l.cp.usable && l.cp.timestamp_ms >= from_ms && l.cp.timestamp_ms <= to_ms)
            .cloned()
            .collect()
    }

    /// The first usable checkpoint stamped after `after_ms`, as the recovery site lists it.
    async fn usable_after(&self, after_ms: u64, within: Duration) -> Result<v1::Checkpoint> {
        wait_until("a usable checkpoint", within, || async {
            let cps = self.b.checkpoints(&self.vpg, after_ms + 1).await.ok()?;
            cps.into_iter()
                .filter(|c| c.usable && c.timestamp_ms > after_ms)
                .min_by_key(|c| c.timestamp_ms)
        })
        .await
    }

    /// The newest usable checkpoint the recovery site lists.
    async fn latest_usable(&self) -> Result<v1::Checkpoint> {
        self.b
            .checkpoints(&self.vpg, 0)
            .await?
            .into_iter()
            .find(|c| c.usable)
            .context("no usable checkpoint listed")
    }
}

/// Samples both sites' status of the VPG and the recovery site's checkpoint list.
async fn monitor(ctx: Arc<Ctx>, cancel: CancellationToken) {
    loop {
        let since = now_ms().saturating_sub(30_000);
        let (a, b, cps) = tokio::join!(
            ctx.a.vpg(&ctx.vpg),
            ctx.b.vpg(&ctx.vpg),
            ctx.b.checkpoints(&ctx.vpg, since)
        );
        let wall_ms = now_ms();
        {
            let mut rec = ctx.record();
            rec.samples.push(Sample {
                at: Instant::now(),
                wall_ms,
                a: a.ok().and_then(|g| g.status),
                b: b.ok().and_then(|g| g.status),
            });
            for cp in cps.unwrap_or_default() {
                let l = rec.listed.entry(cp.id).or_insert_with(|| Listed {
                    cp: cp.clone(),
                    usable_at_ms: None,
                });
                if cp.usable && l.usable_at_ms.is_none() {
                    l.usable_at_ms = Some(wall_ms);
                }
                l.cp = cp;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

/// Appends `line` unless it repeats the last one.
fn push_new(lines: &mut Vec<String>, line: String) {
    if lines.last() != Some(&line) {
        lines.push(line);
    }
}

/// Figures of the record between two instants.
#[derive(Debug, Default)]
struct Window {
    listed: usize,
    usable_after_ms: Vec<u64>,
    rpo_ms: Vec<u64>,
    /// (status / substatus) in the order site-a and site-b showed them.
    shown: Vec<String>,
    shown_b: Vec<String>,
}

impl Window {
    fn of(ctx: &Ctx, from: Instant, to: Instant) -> Self {
        let rec = ctx.record();
        let mut w = Window::default();
        let walls: Vec<u64> = rec
            .samples
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .map(|s| s.wall_ms)
            .collect();
        let (Some(&from_ms), Some(&to_ms)) = (walls.first(), walls.last()) else {
            return w;
        };
        for l in rec
            .listed
            .values()
            .filter(|l| l.cp.timestamp_ms >= from_ms && l.cp.timestamp_ms <= to_ms)
        {
            w.listed += 1;
            if let Some(at) = l.usable_at_ms {
                w.usable_after_ms.push(at.saturating_sub(l.cp.timestamp_ms));
            }
        }
        w.usable_after_ms.sort_unstable();
        for s in rec.samples.iter().filter(|s| s.at >= from && s.at <= to) {
            if let Some(st) = &s.a {
                if st.last_checkpoint_ms > 0 {
                    w.rpo_ms
                        .push(s.wall_ms.saturating_sub(st.last_checkpoint_ms));
                }
                push_new(&mut w.shown, format!("{} / {}", st.status, st.substatus));
            }
            if let Some(st) = &s.b {
                push_new(&mut w.shown_b, format!("{} / {}", st.status, st.substatus));
            }
        }
        w.rpo_ms.sort_unstable();
        w
    }

    fn usable_figures(&self) -> String {
        match self.usable_after_ms.last() {
            Some(max) => format!(
                "listed usable after p50 {} ms, max {max} ms",
                self.usable_after_ms[self.usable_after_ms.len() / 2]
            ),
            None => "none listed usable".into(),
        }
    }

    fn rpo_max(&self) -> Option<Duration> {
        self.rpo_ms.last().map(|&m| Duration::from_millis(m))
    }

    fn rpo_figures(&self) -> String {
        match self.rpo_ms.last() {
            Some(max) => format!(
                "actual RPO p50 {}, max {}",
                secs(Duration::from_millis(self.rpo_ms[self.rpo_ms.len() / 2])),
                secs(Duration::from_millis(*max))
            ),
            None => "RPO not shown".into(),
        }
    }
}

/// The running part: its context, the workload and the monitor.
struct Run {
    ctx: Arc<Ctx>,
    workload: Option<Workload>,
    /// The workload's whole history, once stopped.
    history: Option<History>,
    monitor: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Run {
    fn workload(&self) -> Result<&Workload> {
        self.workload
            .as_ref()
            .context("the workload is not running")
    }

    /// Opens the point-in-time images of listed checkpoint `cp` at the recovery VRAs and
    /// checks them: against the window of its timestamp while the workload runs, against
    /// every acknowledged write after it stopped (`history` given).
    async fn check(&self, cp: &v1::Checkpoint, stopped: Option<&History>) -> Result<String> {
        let ctx = &self.ctx;
        let t = Instant::now();
        let mut clients = Vec::new();
        let mut exports = Vec::new();
        let opened = async {
            for v in &ctx.vms {
                let mut c = VraControlClient::new(crate::lab::vra_control(
                    &v.rec_control,
                    v.rec_harness.as_ref(),
                )?);
                let e = c
                    .open_export(v1::OpenExportRequest {
                        vpg_id: ctx.vpg.clone(),
                        vm_id: v.vm.clone(),
                        volume_id: 0,
                        checkpoint_id: cp.id,
                        writable: false,
                    })
                    .await
                    .map_err(|s| {
                        anyhow!(
                            "{}: open {} at {}: {}",
                            v.rec_host,
                            v.vm,
                            cp.id,
                            s.message()
                        )
                    })?
                    .into_inner();
                exports.push((c, e.export_name.clone()));
                let client = NbdClient::connect_to(&v.rec_nbd, &e.export_name)
                    .await
                    .with_context(|| format!("nbd {} {}", v.rec_nbd, e.export_name))?;
                clients.push(client);
            }
            anyhow::Ok(())
        }
        .await;
        let mut window_figures = String::new();
        let checked = async {
            opened?;
            let images: Vec<&dyn ImageReader> =
                clients.iter().map(|c| c as &dyn ImageReader).collect();
            match stopped {
                Some(history) => check_final(history, &images)
                    .await
                    .map_err(|e| anyhow!("checkpoint {}: {e}", cp.id)),
                None => {
                    let (report, figures) = self.check_at(cp, &images).await?;
                    window_figures = figures;
                    Ok(report)
                }
            }
        }
        .await;
        for c in clients {
            let _ = c.disconnect().await;
        }
        for (mut c, name) in exports {
            let _ = c
                .close_export(v1::CloseExportRequest { export_name: name })
                .await;
        }
        let r = checked?;
        Ok(format!(
            "checkpoint {}{} holds {} writes ({} acked before it + {} in flight), {} blocks \
             with data; {} read from {} NBD exports in {}",
            cp.id,
            window_figures,
            r.writes_included,
            r.required.iter().sum::<u64>(),
            r.writes_in_window,
            r.writes_visible,
            fmt_bytes(r.bytes_checked),
            ctx.vms.len(),
            secs(t.elapsed())
        ))
    }

    /// Checks `images` (one per VM, in order) against the workload at checkpoint `cp`'s
    /// timestamp; answers the report and the window's figures.
    async fn check_at(
        &self,
        cp: &v1::Checkpoint,
        images: &[&dyn ImageReader],
    ) -> Result<(crate::workload::CheckReport, String)> {
        let workload = self.workload()?;
        let window = wait_until("the checkpoint's window", PATIENCE, || async {
            workload.window_at(cp.timestamp_ms)
        })
        .await?;
        let figures = format!(
            " (window {}..{} around its timestamp)",
            window.acked_before, window.issued_after
        );
        // Taken now, after the checkpoint's window closed.
        let history = workload.history();
        let report = check_image(&history, &window, images)
            .await
            .map_err(|e| anyhow!("checkpoint {}: {e}", cp.id))?;
        Ok((report, figures))
    }

    fn start_monitor(&mut self) {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(monitor(self.ctx.clone(), cancel.clone()));
        self.monitor = Some((cancel, task));
    }

    /// Stops the monitor and the workload, if they run.
    async fn end(&mut self) {
        self.stop_monitor().await;
        if let Some(w) = self.workload.take() {
            drop(w.stop().await);
        }
    }

    async fn stop_monitor(&mut self) {
        if let Some((cancel, task)) = self.monitor.take() {
            cancel.cancel();
            let _ = task.await;
        }
    }
}

/// The VPG's context and an idle run: VM `i` on host `i % HOSTS` at both sites.
fn new_run(lab: &Lab, opts: &DemoOptions, protection: &Protection) -> Result<Run> {
    if lab.vras.len() < 2 || lab.vras.iter().any(|v| v.len() < HOSTS) {
        bail!("the lab runs fewer than {HOSTS} VRAs per site");
    }
    let vms = protection
        .vms
        .iter()
        .enumerate()
        .map(|(i, vm)| VmAt {
            vm: vm.clone(),
            prot_nbd: lab.vras[0][i % HOSTS].nbd_socket.clone(),
            rec_host: lab.vras[1][i % HOSTS].host.clone(),
            rec_control: lab.vras[1][i % HOSTS].control.clone(),
            rec_harness: lab.vras[1][i % HOSTS].harness.clone(),
            rec_nbd: lab.vras[1][i % HOSTS].nbd_socket.clone(),
        })
        .collect();
    let ctx = Arc::new(Ctx {
        vpg: protection.vpg.clone(),
        a: Managers::new(&lab.site_names[0], &lab.endpoints(0))?,
        b: Managers::new(&lab.site_names[1], &lab.endpoints(1))?,
        vms,
        interval: Duration::from_secs(opts.checkpoint_interval_secs.max(1)),
        record: Mutex::new(Record::default()),
    });
    Ok(Run {
        ctx,
        workload: None,
        history: None,
        monitor: None,
    })
}

async fn protection_steps(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    protection: &Protection,
) -> Result<()> {
    let mut run = new_run(lab, opts, protection)?;
    let r = protection_steps_in(lab, opts, report, &mut run).await;
    run.end().await;
    r
}

async fn protection_steps_in(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    run: &mut Run,
) -> Result<()> {
    let ctx = run.ctx.clone();
    let started = Instant::now();
    let started_ms = now_ms();

    let t = Instant::now();
    let mut seen = Vec::new();
    let r = ctx
        .a
        .wait_shown(&ctx.vpg, Duration::from_secs(120), &mut seen, |s, _| {
            s == "Meeting SLA"
        })
        .await
        .map(|took| {
            report.note("protection", format!("Meeting SLA after {}", secs(took)));
            format!(
                "site-a showed {}; no VRA driven by the demo",
                seen.join(" -> ")
            )
        });
    let ok = r.is_ok();
    report.step("the managers protect it: Meeting SLA", t, r);
    if !ok {
        bail!("cannot go on without protection");
    }
    run.start_monitor();

    let t = Instant::now();
    let r = start_workload(opts, run).await;
    let ok = r.is_ok();
    report.step("verifying workload over NBD, 4 volumes", t, r);
    if !ok {
        bail!("cannot go on without the workload");
    }

    let t = Instant::now();
    tokio::time::sleep(opts.steady).await;
    let r = steady(opts, report, run, t);
    report.step("checkpoints by the managers every interval", t, r);

    let t = Instant::now();
    let r = async {
        let cp = ctx.latest_usable().await?;
        run.check(&cp, None).await
    }
    .await;
    report.image("steady", r.is_ok());
    report.step("listed checkpoint's image = source", t, r);

    failover_test(report, run).await;

    leader_kill(lab, report, run).await?;
    link_cut(lab, opts, report, run).await?;
    recovery_vra_kill(lab, opts, report, run).await?;

    let t = Instant::now();
    let r = finish(report, run).await;
    report.image("final", r.is_ok());
    report.step("stop workload; named checkpoint holds all", t, r);

    move_and_back(lab, report, run).await;
    disaster_failover(lab, report, run).await;

    let all = Window::of(&ctx, started, Instant::now());
    let listed = ctx.usable(started_ms, now_ms()).len();
    report.note(
        "checkpoints",
        format!(
            "{listed} usable listed by the recovery site in {}; {}",
            secs(started.elapsed()),
            all.usable_figures()
        ),
    );
    Ok(())
}

/// Starts the verifying workload over NBD on the protected volumes.
async fn start_workload(opts: &DemoOptions, run: &mut Run) -> Result<String> {
    let ctx = run.ctx.clone();
    let targets = ctx
        .vms
        .iter()
        .map(|v| VolumeTarget::new(&v.prot_nbd, format!("{}/0", v.vm)))
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
    let workload = Workload::start(config).await?;
    let seed = workload.seed();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = workload.acked() as f64 / t.elapsed().as_secs_f64();
    run.workload = Some(workload);
    Ok(format!(
        "{} writers each writing all {} volumes, 4 KiB writes at {rate:.0}/s ({}/s); seed \
         {seed:#x} (TANDEM_WORKLOAD_SEED={seed:#x} repeats it)",
        opts.writers,
        ctx.vms.len(),
        fmt_bytes((rate * 4096.0) as u64),
    ))
}

/// Figures of steady protection since `from`: a checkpoint every interval, the RPO.
fn steady(opts: &DemoOptions, report: &mut Report, run: &Run, from: Instant) -> Result<String> {
    let ctx = &run.ctx;
    let w = Window::of(ctx, from, Instant::now());
    // One checkpoint per interval, less one for the first and the last partial interval.
    let expected = (opts.steady.as_millis() / ctx.interval.as_millis().max(1))
        .saturating_sub(1)
        .max(1) as usize;
    if w.usable_after_ms.len() < expected {
        bail!(
            "{} checkpoints listed, {} usable, {expected} expected; site-a showed {}",
            w.listed,
            w.usable_after_ms.len(),
            w.shown.join(" -> ")
        );
    }
    if let Some(max) = w.rpo_max()
        && max > TARGET_RPO
    {
        bail!("RPO reached {} (target {})", secs(max), secs(TARGET_RPO));
    }
    report.note(
        "steady protection",
        format!(
            "{} checkpoints, {}; {}",
            w.usable_after_ms.len(),
            w.usable_figures(),
            w.rpo_figures()
        ),
    );
    Ok(format!(
        "{} listed by the recovery site in {} ({expected} due), {}; {}; site-a showed {}",
        count(w.usable_after_ms.len(), "usable checkpoint"),
        secs(opts.steady),
        w.usable_figures(),
        w.rpo_figures(),
        w.shown.join(" -> ")
    ))
}

/// A failover test at site-b under the workload, as an operator runs it: started at the
/// latest checkpoint, its test images (served by the recovery VRAs) checked against the
/// source at that checkpoint, a test VM's write, checkpoints going on during it, then
/// stopped, leaving no image behind. Reports one step.
async fn failover_test(report: &mut Report, run: &Run) {
    let ctx = &run.ctx;
    let t = Instant::now();
    let r = async {
        let vpg = ctx.vpg.clone();
        let started = ctx
            .b
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .start_failover_test(v1::StartFailoverTestRequest {
                            vpg_ids: vec![vpg],
                            checkpoint: None,
                        })
                        .await
                }
            })
            .await?;
        let task = started.tests.first().context("no test started")?.task_id;
        let test = wait_until("the test images", PATIENCE, || async {
            let tests = ctx.b.failover_tests(&ctx.vpg).await.ok()?;
            tests.into_iter().find(|t| t.step == "running")
        })
        .await?;
        let served_in = t.elapsed();
        let mut volumes = test.volumes.clone();
        volumes.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        let mut clients = Vec::new();
        for v in &volumes {
            clients.push(NbdClient::connect_uri(&v.nbd_uri).await?);
        }
        let cp = v1::Checkpoint {
            id: test.checkpoint_id,
            timestamp_ms: test.checkpoint_ms,
            ..Default::default()
        };
        let checked = async {
            let images: Vec<&dyn ImageReader> =
                clients.iter().map(|c| c as &dyn ImageReader).collect();
            let (r, window) = run.check_at(&cp, &images).await?;
            // A test VM writes to its volume and reads it back.
            let marker = bytes::Bytes::from(vec![0x5c; 64 << 10]);
            clients[0].write(0, marker.clone(), false).await?;
            let back = clients[0].read(0, marker.len() as u32).await?;
            if back != marker {
                bail!("the test VM did not read back what it wrote");
            }
            anyhow::Ok((r, window))
        }
        .await;
        for c in clients {
            let _ = c.disconnect().await;
        }
        let (r, window) = checked?;
        let during = ctx.usable(test.checkpoint_ms + 1, now_ms()).len();
        ctx.b
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .stop_failover_test(v1::StopFailoverTestRequest {
                            vpg_ids: vec![vpg],
                            failed: false,
                            note: "demo: images checked against the source".into(),
                        })
                        .await
                }
            })
            .await?;
        wait_until("the test to stop", PATIENCE, || async {
            ctx.b
                .failover_tests(&ctx.vpg)
                .await
                .ok()
                .filter(|t| t.is_empty())
        })
        .await?;
        for v in &ctx.vms {
            let exports = VraControlClient::new(crate::lab::vra_control(
                &v.rec_control,
                v.rec_harness.as_ref(),
            )?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner()
            .exports;
            if let Some(left) = exports.iter().find(|e| e.ends_with("/rw")) {
                bail!("test image {left} left at {}", v.rec_host);
            }
        }
        report.note(
            "failover test",
            format!(
                "images served {} after the request, checkpoint {}",
                secs(served_in),
                test.checkpoint_id
            ),
        );
        Ok(format!(
            "task {task}: {} test images at checkpoint {}{window} served {} after the \
             request, holding {} writes; a test VM wrote and read 64 KiB; {during} \
             checkpoints listed during the test; stopped, no image left",
            volumes.len(),
            test.checkpoint_id,
            secs(served_in),
            r.writes_included,
        ))
    }
    .await;
    report.image("failover test", r.is_ok());
    report.step("failover test at site-b = source, stopped", t, r);
}

/// kill -9 of site-a's leader under the workload: a new leader, checkpoints resume under
/// it, no definition, task or event lost; an image under the new leader is checked.
async fn leader_kill(lab: &mut Lab, report: &mut Report, run: &Run) -> Result<()> {
    let ctx = &run.ctx;
    let t = Instant::now();
    let r = async {
        let events = ctx.a.events().await?;
        let tasks = ctx.a.tasks().await?;
        let status = wait_leader(&lab.sites[0][0].api, 3, Duration::from_secs(5)).await?;
        let leader = status.leader_id;
        let idx = lab.sites[0]
            .iter()
            .position(|p| p.id == leader)
            .context("leader not in lab")?;
        let acked = run.workload()?.acked();
        let killed_ms = now_ms();
        let killed_at = Instant::now();
        lab.sites[0][idx].kill9().await?;
        let survivor = lab.sites[0]
            .iter()
            .find(|p| p.id != leader)
            .context("no survivor")?
            .api
            .clone();
        let new_leader = wait_until("a new leader", Duration::from_secs(10), || async {
            wait_leader(&survivor, 3, Duration::from_millis(300))
                .await
                .ok()
                .filter(|s| s.leader_id != leader && s.leader_id != 0)
                .map(|s| s.leader_id)
        })
        .await?;
        let elected = killed_at.elapsed();
        let cp = ctx.usable_after(killed_ms, Duration::from_secs(30)).await?;
        let resumed = Duration::from_millis(cp.timestamp_ms.saturating_sub(killed_ms));
        let acked_since = run.workload()?.acked() - acked;
        let (events_after, tasks_after) = (ctx.a.events().await?, ctx.a.tasks().await?);
        let lost_events = events
            .iter()
            .filter(|e| {
                !events_after
                    .iter()
                    .any(|x| x.id == e.id && x.code == e.code)
            })
            .count();
        let lost_tasks = tasks
            .iter()
            .filter(|e| !tasks_after.iter().any(|x| x.id == e.id))
            .count();
        ctx.a
            .vpg(&ctx.vpg)
            .await
            .context("the VPG after the kill")?;
        if lost_events + lost_tasks > 0 {
            bail!("{lost_events} events and {lost_tasks} tasks lost with the leader");
        }
        if resumed > Duration::from_secs(10) {
            bail!(
                "the first checkpoint under the new leader came {} after the kill",
                secs(resumed)
            );
        }
        lab.sites[0][idx].start("join").await?;
        lab.write_file()?;
        report.note(
            "leader kill",
            format!(
                "new leader after {}, checkpoints again {} after the kill",
                ms(elected),
                secs(resumed)
            ),
        );
        Ok((
            cp,
            format!(
                "killed leader {leader}; node {new_leader} leads after {}; its first checkpoint \
                 {} after the kill; {acked_since} writes acked meanwhile; all {} events and {} \
                 tasks kept; node {leader} restarted",
                ms(elected),
                secs(resumed),
                events.len(),
                tasks.len(),
            ),
        ))
    }
    .await;
    let cp = match r {
        Ok((cp, figures)) => {
            report.step("kill -9 site-a leader under the workload", t, Ok(figures));
            cp
        }
        Err(e) => {
            report.step("kill -9 site-a leader under the workload", t, Err(e));
            return Ok(());
        }
    };
    let t = Instant::now();
    let r = run.check(&cp, None).await;
    report.image("new leader", r.is_ok());
    report.step("checkpoint of the new leader = source", t, r);
    Ok(())
}

/// Cuts the link under the workload, heals it after `opts.cut`, and checks a checkpoint
/// from before the cut (during it) and one after the heal. Reports three steps.
async fn link_cut(lab: &mut Lab, opts: &DemoOptions, report: &mut Report, run: &Run) -> Result<()> {
    let ctx = &run.ctx;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    let t = Instant::now();
    let before_cut = ctx.latest_usable().await;
    let cut_state = link.cut(CutMode::Drop).await?;
    let cut_at = Instant::now();
    let cut_ms = now_ms();
    let r = async {
        let before_cut = before_cut.context("no usable checkpoint before the cut")?;
        let mut seen_a = Vec::new();
        let mut seen_b = Vec::new();
        let a_after = ctx
            .a
            .wait_shown(&ctx.vpg, opts.cut, &mut seen_a, |_, sub| {
                sub.starts_with("Site disconnection")
            })
            .await?;
        let b_after = ctx
            .b
            .wait_shown(&ctx.vpg, opts.cut, &mut seen_b, |_, sub| {
                sub == "Recovery is possible"
            })
            .await?;
        // Recovery to the last checkpoint before the cut stays possible during it: the
        // recovery site lists it and its image is whole.
        let listed = ctx.b.checkpoints(&ctx.vpg, 0).await?;
        if !listed.iter().any(|c| c.id == before_cut.id && c.usable) {
            bail!(
                "the recovery site no longer lists checkpoint {}",
                before_cut.id
            );
        }
        let image = run.check(&before_cut, None).await;
        report.image("during the cut", image.is_ok());
        let image = image.context("the last checkpoint before the cut")?;
        let link_now = link.state().await?;
        let refused = link_now.a_to_b.connections_refused - cut_state.a_to_b.connections_refused;
        Ok(format!(
            "site-a: {} after {}; site-b: {} after {}; link refused {refused} connections; \
             during the cut the recovery site lists {} usable checkpoints and {image}",
            seen_a.last().cloned().unwrap_or_default(),
            secs(a_after),
            seen_b.last().cloned().unwrap_or_default(),
            secs(b_after),
            listed.iter().filter(|c| c.usable).count(),
        ))
    }
    .await;
    // Whatever happened, heal after the cut's length.
    tokio::time::sleep(opts.cut.saturating_sub(cut_at.elapsed())).await;
    let healed_state = link.heal().await?;
    let heal_at = Instant::now();
    let heal_ms = now_ms();
    report.step(
        &format!("cut the link {} under the workload", secs(opts.cut)),
        t,
        r,
    );

    let r = async {
        let mut seen = Vec::new();
        let took = ctx
            .a
            .wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s == "Meeting SLA")
            .await?;
        let link_now = link.state().await?;
        let outage = Window::of(ctx, cut_at, Instant::now());
        let crossed = link_now.a_to_b.bytes - healed_state.a_to_b.bytes;
        let during = ctx.usable(cut_ms, heal_ms).len();
        report.note(
            "link cut",
            format!(
                "{}; Meeting SLA {} after the heal; site-a showed {}; site-b {}; {}",
                secs(opts.cut),
                secs(took),
                outage.shown.join(" -> "),
                outage.shown_b.join(" -> "),
                outage.rpo_figures()
            ),
        );
        Ok(format!(
            "site-a showed {} after the heal, Meeting SLA after {}; link counted {} a->b \
             since the heal (sync + live writes, lz4); {during} checkpoints of the cut usable \
             (those still in the protected buffer when it filled are lost with it); {}",
            seen.join(" -> "),
            secs(took),
            fmt_bytes(crossed),
            outage.rpo_figures()
        ))
    }
    .await;
    report.step("heal: sync, then Meeting SLA", heal_at, r);

    let t = Instant::now();
    let r = async {
        let cp = ctx.usable_after(heal_ms, PATIENCE).await?;
        run.check(&cp, None).await
    }
    .await;
    report.image("after the cut", r.is_ok());
    report.step("checkpoint after the heal = source", t, r);
    Ok(())
}

/// kill -9 of a recovery VRA: the VPG shows it; after the restart the managers bring it
/// back to Meeting SLA with no operator; a checkpoint after that is checked.
async fn recovery_vra_kill(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    run: &Run,
) -> Result<()> {
    let ctx = &run.ctx;
    let t = Instant::now();
    let host = lab.vras[1][0].host.clone();
    let r = async {
        lab.vras[1][0].kill9().await?;
        let killed_at = Instant::now();
        let mut seen = Vec::new();
        let shown_after = ctx
            .a
            .wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s != "Meeting SLA")
            .await;
        let problems = ctx
            .b
            .vpg(&ctx.vpg)
            .await
            .ok()
            .and_then(|g| g.status)
            .map(|s| s.problems)
            .unwrap_or_default();
        lab.vras[1][0].start_with(&vra_args(opts)).await?;
        lab.write_file()?;
        let restarted = Instant::now();
        let shown_after = shown_after?;
        let back = ctx
            .a
            .wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s == "Meeting SLA")
            .await?;
        report.note(
            "recovery VRA kill",
            format!(
                "shown after {}, Meeting SLA {} after the restart",
                secs(shown_after),
                secs(back)
            ),
        );
        Ok(format!(
            "{host} killed; site-a showed {} ({} after the kill; site-b: {}); restarted after \
             {}, Meeting SLA again {} after, no operator",
            seen.join(" -> "),
            secs(shown_after),
            if problems.is_empty() {
                "no problem listed".to_string()
            } else {
                problems.join("; ")
            },
            secs(restarted.duration_since(killed_at)),
            secs(back)
        ))
    }
    .await;
    report.step("kill -9 recovery VRA, managers recover", t, r);
    let t = Instant::now();
    let r = async {
        let cp = ctx.usable_after(now_ms(), PATIENCE).await?;
        run.check(&cp, None).await
    }
    .await;
    report.image("after the VRA kill", r.is_ok());
    report.step("checkpoint after the restart = source", t, r);
    Ok(())
}

/// A move to site-b with nothing lost, reverse protection, and the move back: site-a's VMs
/// are powered off and drained, a last checkpoint is taken and the VMs come up at site-b
/// holding every write the workload acknowledged; the commit protects them back to site-a,
/// whose disks of them take only a delta sync (bytes sent reported). The move back runs at
/// site-a the same way and protects the VMs forward again; every write is still there.
async fn move_and_back(lab: &Lab, report: &mut Report, run: &Run) {
    let ctx = &run.ctx;
    let t = Instant::now();
    let r = move_once(lab, ctx, run, &ctx.b, &ctx.a, 1).await;
    report.image("move", r.is_ok());
    let there = r.is_ok();
    report.step("move to site-b, nothing lost; protected back (delta)", t, r);
    if !there {
        return;
    }
    let t = Instant::now();
    let r = move_once(lab, ctx, run, &ctx.a, &ctx.b, 0).await;
    report.image("move back", r.is_ok());
    report.step("move back to site-a, nothing lost; protected again", t, r);
}

/// One move of the demo's VPG to the site of `to` (its VRAs: `lab.vras[to_site]`), from
/// the site of `from`, committed with reverse protection.
async fn move_once(
    lab: &Lab,
    ctx: &Ctx,
    run: &Run,
    to: &Managers,
    from: &Managers,
    to_site: usize,
) -> Result<String> {
    let t = Instant::now();
    let history = run.history.as_ref().context("no workload history")?;
    let vpg = ctx.vpg.clone();
    let started = to
        .ask(|ch| {
            let vpg = vpg.clone();
            async move {
                RecoveryServiceClient::new(ch)
                    .start_move(v1::StartMoveRequest {
                        reverse: v1::ReverseProtection::Yes as i32,
                        vpg_id: vpg,
                        commit_policy: v1::CommitPolicyKind::Manual as i32,
                        commit_after_secs: 0,
                    })
                    .await
            }
        })
        .await?;
    let (op, clients) = before_commit(to, &ctx.vpg, &started.op_id).await?;
    let up_in = t.elapsed();
    let checked = check_recovered(history, &clients).await;
    for c in clients {
        let _ = c.disconnect().await;
    }
    let moved = checked?;
    let (_, sub) = to.shown(&ctx.vpg).await?;
    to.ask(|ch| {
        let vpg = vpg.clone();
        async move {
            RecoveryServiceClient::new(ch)
                .commit_recovery(v1::RecoveryRef { vpg_id: vpg })
                .await
        }
    })
    .await?;
    to.wait_no_recovery(&ctx.vpg, "the commit to end").await?;
    let committed = t.elapsed();
    let mut seen = Vec::new();
    to.wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s == "Meeting SLA")
        .await?;
    let direction = to.vpg(&ctx.vpg).await?.direction;
    if direction != "outgoing" {
        bail!("{} shows the VPG {direction} after the move", to.site);
    }
    let protected_in = t.elapsed();
    // What the delta syncs of the old site's disks sent, once every protected VRA of the
    // new site ran its own.
    let (finished, _) = crate::protect::finished_syncs(lab, to_site, &ctx.vpg, PATIENCE).await?;
    let sent: u64 = finished.iter().map(|s| s.sent_bytes).sum();
    let hashes: u64 = finished.iter().map(|s| s.hash_bytes).sum();
    let kinds: Vec<i32> = finished.iter().map(|s| s.kind).collect();
    let deltas = [
        v1::VraSyncKind::Delta as i32,
        v1::VraSyncKind::VolumeDelta as i32,
    ];
    if kinds.is_empty() || kinds.iter().any(|k| !deltas.contains(k)) {
        bail!("the protection back ran {kinds:?}, not delta syncs");
    }
    let total: u64 = op.volumes.iter().map(|v| v.size_bytes).sum();
    // The old site learns the end of the syncs from the new one's reports: only once it
    // shows Meeting SLA too may the VPG move back (a sync refuses recovery there).
    let mut seen_old = Vec::new();
    from.wait_shown(&ctx.vpg, PATIENCE, &mut seen_old, |s, _| s == "Meeting SLA")
        .await?;
    let (old_status, old_sub) = from.shown(&ctx.vpg).await?;
    Ok(format!(
        "{:?} taken; {} volumes up at {} in {} ({sub}) holding {} writes = all \
         acknowledged; committed in {}, protected back to {} in {} (delta sync of {} of \
         volumes: {} of checksums exchanged, {} of data sent; {} shows {old_status} / \
         {old_sub})",
        op.checkpoint_name,
        op.volumes.len(),
        to.site,
        secs(up_in),
        moved.writes_included,
        secs(committed),
        from.site,
        secs(protected_in),
        fmt_bytes(total),
        fmt_bytes(hashes),
        fmt_bytes(sent),
        from.site,
    ))
}

/// The protected site is lost (kill -9 of every manager and VRA of site-a) and site-b's
/// managers fail the VPG over to the latest checkpoint: RTO from the request to every
/// recovered volume answering a read; the volumes hold every write the workload
/// acknowledged (it stopped before, so the latest checkpoint holds all of it), before
/// commit and again once the commit has promoted the journals and the VPG is Recovered.
async fn disaster_failover(lab: &mut Lab, report: &mut Report, run: &Run) {
    let ctx = &run.ctx;
    let t = Instant::now();
    let r = async {
        let history = run.history.as_ref().context("no workload history")?;
        for m in &mut lab.sites[0] {
            m.kill9().await?;
        }
        for v in &mut lab.vras[0] {
            v.kill9().await?;
        }
        let requested = Instant::now();
        let vpg = ctx.vpg.clone();
        let op = ctx
            .b
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .start_failover(v1::StartFailoverRequest {
                            reverse: v1::ReverseProtection::Default as i32,
                            vpg_id: vpg,
                            checkpoint: None,
                            commit_policy: v1::CommitPolicyKind::Manual as i32,
                            commit_after_secs: 0,
                            shutdown: v1::ShutdownVms::No as i32,
                        })
                        .await
                }
            })
            .await?;
        let (op, clients) = before_commit(&ctx.b, &ctx.vpg, &op.op_id).await?;
        for c in &clients {
            c.read(0, 4096).await?;
        }
        let rto = requested.elapsed();
        let volumes = clients.len();
        let before = check_recovered(history, &clients).await?;
        let (_, sub) = ctx.b.shown(&ctx.vpg).await?;
        ctx.b
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .commit_recovery(v1::RecoveryRef { vpg_id: vpg })
                        .await
                }
            })
            .await?;
        let committing = Instant::now();
        ctx.b
            .wait_no_recovery(&ctx.vpg, "the commit to end")
            .await?;
        let promoted = committing.elapsed();
        let (status, _) = ctx.b.shown(&ctx.vpg).await?;
        if status != "Recovered" {
            bail!("site-b shows {status} after the commit");
        }
        let after = check_recovered(history, &clients).await?;
        for c in clients {
            let _ = c.disconnect().await;
        }
        report.note(
            "failover",
            format!(
                "RTO {} (request -> {volumes} volumes answering reads), commit {}",
                ms(rto),
                secs(promoted)
            ),
        );
        Ok(format!(
            "site-a gone (3 managers, 2 VRAs); failover to checkpoint {}: RTO {}, {sub}, \
             {} writes = all acknowledged; committed in {} (promoted behind the VMs), \
             Recovered, still {} writes",
            op.checkpoint_id,
            ms(rto),
            before.writes_included,
            secs(promoted),
            after.writes_included
        ))
    }
    .await;
    report.image("failover", r.is_ok());
    report.step("kill -9 site-a; failover at site-b = source", t, r);
}

/// Waits for operation `op_id` of `vpg` at `site` to be before commit; answers it with an
/// NBD client on volume 0 of each VM, in VM order.
async fn before_commit(
    site: &Managers,
    vpg: &str,
    op_id: &str,
) -> Result<(v1::RecoveryOperation, Vec<NbdClient>)> {
    let op = wait_until("the recovered volumes", PATIENCE, || async {
        site.recoveries(vpg)
            .await
            .ok()?
            .into_iter()
            .find(|o| o.op_id == op_id && o.step == "before commit")
    })
    .await?;
    let mut volumes: Vec<&v1::RecoveredVolume> =
        op.volumes.iter().filter(|v| v.volume_id == 0).collect();
    volumes.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    let mut clients = Vec::new();
    for v in &volumes {
        clients.push(NbdClient::connect_uri(&v.nbd_uri).await?);
    }
    Ok((op, clients))
}

/// Checks recovered volumes (one per VM, in order) against the whole stopped workload.
async fn check_recovered(
    history: &History,
    clients: &[NbdClient],
) -> Result<crate::workload::CheckReport> {
    let images: Vec<&dyn ImageReader> = clients.iter().map(|c| c as &dyn ImageReader).collect();
    check_final(history, &images)
        .await
        .map_err(|e| anyhow!("recovered volumes: {e}"))
}

/// Stops the workload, waits for Meeting SLA, takes a named checkpoint through the API and
/// checks that its image holds every acknowledged write.
async fn finish(report: &mut Report, run: &mut Run) -> Result<String> {
    let ctx = run.ctx.clone();
    let workload = run.workload.take().context("no workload")?;
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
    let mut seen = Vec::new();
    ctx.a
        .wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s == "Meeting SLA")
        .await?;
    let vpg = ctx.vpg.clone();
    let taken = ctx
        .a
        .ask(|ch| {
            let vpg = vpg.clone();
            async move {
                VpgServiceClient::new(ch)
                    .add_checkpoint(v1::AddCheckpointRequest {
                        vpg_ids: vec![vpg],
                        name: "demo-final".into(),
                        kind: v1::CheckpointKind::Manual as i32,
                        vm_id: String::new(),
                    })
                    .await
            }
        })
        .await?
        .checkpoints
        .into_iter()
        .next()
        .context("no checkpoint taken")?;
    let cp = wait_until("the named checkpoint to be usable", PATIENCE, || async {
        ctx.b
            .checkpoints(&ctx.vpg, taken.timestamp_ms)
            .await
            .ok()?
            .into_iter()
            .find(|c| c.id == taken.id && c.usable)
    })
    .await?;
    let usable_after = t.elapsed();
    let checked = run.check(&cp, Some(&history)).await?;
    run.history = Some(history.clone());
    let g = ctx.a.vpg(&ctx.vpg).await?;
    let s = g.status.unwrap_or_default();
    report.note(
        "workload",
        format!(
            "{} writes, all acknowledged, none failed; VPG provisioned {}, used {}",
            history.acked_writes(),
            fmt_bytes(s.provisioned_bytes),
            fmt_bytes(s.used_bytes),
        ),
    );
    Ok(format!(
        "{} writes acked, none failed; checkpoint '{}' usable {} after the stop; {checked}",
        history.acked_writes(),
        cp.name,
        secs(usable_after)
    ))
}

// ---------------------------------------------------------------------------------------
// The RPO benchmark: the demo's VPG and workload, the actual RPO the managers show.
// ---------------------------------------------------------------------------------------

/// `tandem-lab bench-rpo`: the demo's lab, VPG and verifying workload, protected by the
/// managers at the VPG's checkpoint interval for `duration`; the actual RPO site-a shows
/// (now minus its newest checkpoint durable in every journal), sampled every 200 ms, with
/// its p50/p99 against the interval and the 1.5 s floor. Reports and does not assert:
/// it exits 0 when the floor is missed, non-zero when the run itself fails.
pub async fn bench_rpo(
    opts: DemoOptions,
    duration: Duration,
    shutdown: CancellationToken,
) -> Result<ExitCode> {
    const FLOOR: Duration = Duration::from_millis(1500);
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "tandem-bench-rpo-{}-{}",
            std::process::id(),
            now_ms()
        ))
    });
    println!(
        "RPO benchmark: the demo's VPG (4 VMs on 2 hosts) under its verifying workload ({} \
         writers, {} ms pace), a checkpoint every {} s, for {} (lab in {})",
        opts.writers,
        opts.pace.as_millis(),
        opts.checkpoint_interval_secs,
        secs(duration),
        dir.display()
    );
    let mut lab = start_lab(&dir, &opts).await?;
    let mut report = Report::default();
    let r = async {
        let protection = manager_steps(&mut lab, &opts, &mut report).await?;
        let mut run = new_run(&lab, &opts, &protection)?;
        let r = async {
            let ctx = run.ctx.clone();
            let mut seen = Vec::new();
            ctx.a
                .wait_shown(&ctx.vpg, Duration::from_secs(120), &mut seen, |s, _| {
                    s == "Meeting SLA"
                })
                .await?;
            run.start_monitor();
            let figures = start_workload(&opts, &mut run).await?;
            println!("workload: {figures}");
            let from = Instant::now();
            let from_ms = now_ms();
            tokio::select! {
                () = tokio::time::sleep(duration) => {}
                () = shutdown.cancelled() => bail!("interrupted"),
            }
            let w = Window::of(&ctx, from, Instant::now());
            let acked = run.workload()?.acked();
            let listed = ctx.usable(from_ms, now_ms()).len();
            let stale: Vec<u64> = {
                let rec = ctx.record();
                let mut v: Vec<u64> = rec
                    .samples
                    .iter()
                    .filter(|s| s.at >= from)
                    .filter_map(|s| {
                        let st = s.a.as_ref()?;
                        Some(s.wall_ms.saturating_sub(st.observed_at_ms))
                    })
                    .collect();
                v.sort_unstable();
                v
            };
            Ok::<_, anyhow::Error>((w, acked, listed, stale))
        }
        .await;
        run.end().await;
        r
    }
    .await;
    lab.down().await;
    let (w, acked, listed, stale) = match r {
        Ok(v) => v,
        Err(e) => {
            println!(
                "RPO benchmark failed: {e:#}; lab directory {}",
                dir.display()
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    if opts.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let interval_ms = opts.checkpoint_interval_secs.max(1) * 1000;
    let (p50, p99, max) = (
        percentile(&w.rpo_ms, 0.5),
        percentile(&w.rpo_ms, 0.99),
        w.rpo_ms.last().copied().unwrap_or(0),
    );
    let due = duration.as_millis() as u64 / interval_ms;
    let met = !w.rpo_ms.is_empty() && p99 <= FLOOR.as_millis() as u64;
    println!(
        "actual RPO over {} samples: p50 {p50} ms, p99 {p99} ms, max {max} ms ({:.2}x / \
         {:.2}x the interval); {listed} checkpoints listed usable for {due} intervals; status \
         observed p50 {} ms, p99 {} ms before it was read; {acked} writes acked; site-a \
         showed {}",
        w.rpo_ms.len(),
        p50 as f64 / interval_ms as f64,
        p99 as f64 / interval_ms as f64,
        percentile(&stale, 0.5),
        percentile(&stale, 0.99),
        w.shown.join(" -> ")
    );
    println!("\n| benchmark | tandem | yardstick | ratio | floor | met |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| actual RPO, demo workload, {} s interval, {} | p50 {p50} ms, p99 {p99} ms, max \
         {max} ms; {listed} checkpoints in {due} intervals | the interval, {interval_ms} ms | \
         p99 {:.2}x the interval | p99 <= 1500 ms | {} |",
        opts.checkpoint_interval_secs,
        secs(duration),
        p99 as f64 / interval_ms as f64,
        if met { "yes" } else { "**no**" }
    );
    Ok(ExitCode::SUCCESS)
}
