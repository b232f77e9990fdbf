//! The managers at scale (`tandem-lab bench-scale`): one site pair, 2 hosts a site, VPGs
//! of 4 VMs with small volumes, all protected through the API. Measured side by side in one
//! run, 1 VPG and then `vpgs` VPGs: the protected site's managers' CPU and memory in steady
//! protection, `ListVpgs` (and `tandem vpg list`) latency, and the lag between a change and
//! the status every VPG shows (a pause of all of them, a link cut). Floors: lag <= 2 s,
//! `vpg list` < 200 ms. It reports and does not assert.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::vpg_service_client::VpgServiceClient;

use crate::units::{fmt_bytes, percentile};
use tandem_testkit::lab::Lab;
use tandem_testkit::link::CutMode;
use tandem_testkit::protect::{self, ProtectOptions, Sites};

/// What `bench-scale` runs.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub dir: std::path::PathBuf,
    pub vpgs: usize,
    pub vms_per_vpg: usize,
    pub volume_mib: u64,
    pub steady: Duration,
    pub keep: bool,
}

/// Figures of one size.
#[derive(Debug, Default)]
struct Figures {
    vpgs: usize,
    protected_after: Duration,
    cpu_percent: f64,
    rss_bytes: u64,
    /// Sorted, ascending.
    list_ms: Vec<f64>,
    cli_ms: Vec<f64>,
    pause_lag: Duration,
    resume_lag: Duration,
    cut_lag: Duration,
    heal_lag: Duration,
}

/// CPU seconds (user + system) and resident bytes of a process, from /proc.
fn cpu_and_rss(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // Clock ticks are 100 per second on Linux (USER_HZ).
    let rss_pages: u64 = f.get(21).context("rss")?.parse()?;
    Ok((ticks / 100.0, rss_pages * 4096))
}

/// Every protected-site manager's CPU seconds and resident bytes, summed.
fn site_usage(lab: &Lab, site: usize) -> Result<(f64, u64)> {
    let mut cpu = 0.0;
    let mut rss = 0;
    for m in &lab.sites[site] {
        let (c, r) = cpu_and_rss(m.pid().context("a manager is not running")?)?;
        cpu += c;
        rss += r;
    }
    Ok((cpu, rss))
}

async fn list(ch: &Channel) -> Result<Vec<v1::Vpg>> {
    Ok(VpgServiceClient::new(ch.clone())
        .list_vpgs(v1::ListRequest {})
        .await?
        .into_inner()
        .vpgs)
}

/// Polls the list at `ch` until every VPG of `ids` satisfies `done`; answers how long.
async fn wait_all(
    ch: &Channel,
    ids: &[String],
    within: Duration,
    what: &str,
    done: impl Fn(&v1::VpgStatus) -> bool,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let vpgs = list(ch).await?;
        let pending: Vec<&v1::Vpg> = vpgs
            .iter()
            .filter(|g| ids.contains(&g.id))
            .filter(|g| !g.status.as_ref().is_some_and(&done))
            .collect();
        if pending.is_empty() && vpgs.iter().filter(|g| ids.contains(&g.id)).count() == ids.len() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > within {
            let first = pending.first().and_then(|g| g.status.clone());
            bail!(
                "{} of {} VPGs not {what} within {within:?}; first: {first:?}",
                pending.len(),
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pauses or resumes every VPG of `ids`, in calls of at most the API's 64.
async fn pause_all(ch: &Channel, ids: &[String], pause: bool) -> Result<()> {
    for chunk in ids.chunks(64) {
        let req = v1::VpgIdsRequest {
            vpg_ids: chunk.to_vec(),
        };
        let mut c = VpgServiceClient::new(ch.clone());
        if pause {
            c.pause_vpgs(req).await?;
        } else {
            c.resume_vpgs(req).await?;
        }
    }
    Ok(())
}

/// Protects `count` more VPGs (numbered from `first`), then measures.
async fn measure(
    lab: &mut Lab,
    sites: &Sites,
    o: &ScaleOptions,
    first: usize,
    count: usize,
    all: &mut Vec<String>,
) -> Result<Figures> {
    let a = tandem_testkit::operator::channel(&lab.sites[0][0].api).await?;
    let settings = v1::VpgSettings {
        checkpoint_interval_secs: 5,
        target_rpo_secs: 60,
        journal_history_secs: 3600,
        ..Default::default()
    };
    let t = Instant::now();
    for n in first..first + count {
        let vpg = format!("vpg-{n:03}");
        let opts = ProtectOptions {
            volumes_per_vm: 1,
            vpg: vpg.clone(),
            vms: o.vms_per_vpg,
            volume_bytes: o.volume_mib << 20,
            memory_mib: 1024,
            settings: settings.clone(),
        };
        protect::protect_vpg(lab, sites, &opts, &vpg).await?;
        all.push(vpg);
    }
    let meeting = |s: &v1::VpgStatus| s.status == "Meeting SLA";
    let protected_after =
        t.elapsed() + wait_all(&a, all, Duration::from_secs(900), "Meeting SLA", meeting).await?;
    println!(
        "{} VPGs x {} VMs Meeting SLA {:.1} s after the first create",
        all.len(),
        o.vms_per_vpg,
        protected_after.as_secs_f64()
    );

    // Steady protection: checkpoints every 5 s on every VPG.
    let (cpu0, _) = site_usage(lab, 0)?;
    let t = Instant::now();
    tokio::time::sleep(o.steady).await;
    let (cpu1, rss) = site_usage(lab, 0)?;
    let cpu_percent = (cpu1 - cpu0) / t.elapsed().as_secs_f64() * 100.0;

    let mut list_ms = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let n = list(&a).await?.len();
        list_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if n != all.len() {
            bail!("ListVpgs answered {n} VPGs, {} exist", all.len());
        }
    }
    let apis = lab.endpoints(0).join(",");
    let mut cli_ms = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let out = tokio::process::Command::from(tandem_testkit::operator::cli())
            .args(["-e", &apis, "vpg", "list", "-o", "json"])
            .output()
            .await?;
        cli_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !out.status.success() {
            bail!("tandem vpg list: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    list_ms.sort_by(f64::total_cmp);
    cli_ms.sort_by(f64::total_cmp);

    // Pause every VPG, then resume them.
    pause_all(&a, all, true).await?;
    let pause_lag = wait_all(&a, all, Duration::from_secs(60), "paused", |s| {
        s.substatus == "User paused protection"
    })
    .await?;
    pause_all(&a, all, false).await?;
    let resume_lag = wait_all(&a, all, Duration::from_secs(60), "resumed", |s| {
        s.substatus != "User paused protection"
    })
    .await?;
    wait_all(&a, all, Duration::from_secs(300), "Meeting SLA", meeting).await?;

    // Cut the link between the sites: every VPG shows it at the protected site.
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(CutMode::Drop).await?;
    let cut_lag = wait_all(&a, all, Duration::from_secs(60), "disconnected", |s| {
        s.substatus.starts_with("Site disconnection")
    })
    .await;
    link.heal().await?;
    let cut_lag = cut_lag?;
    let heal_lag = wait_all(&a, all, Duration::from_secs(300), "Meeting SLA", meeting).await?;
    Ok(Figures {
        vpgs: all.len(),
        protected_after,
        cpu_percent,
        rss_bytes: rss,
        list_ms,
        cli_ms,
        pause_lag,
        resume_lag,
        cut_lag,
        heal_lag,
    })
}

fn print(f: &Figures) {
    println!(
        "{} VPGs (Meeting SLA {:.1} s after the first create): site-a managers {:.1}% CPU (of one core, 3 nodes), {} resident; ListVpgs \
         p50 {:.1} ms p99 {:.1} ms; tandem vpg list -o json p50 {:.0} ms max {:.0} ms; pause \
         shown on all after {:.2} s, resume after {:.2} s; link cut shown on all after {:.2} \
         s, Meeting SLA again {:.1} s after the heal",
        f.vpgs,
        f.protected_after.as_secs_f64(),
        f.cpu_percent,
        fmt_bytes(f.rss_bytes),
        percentile(&f.list_ms, 0.5),
        percentile(&f.list_ms, 0.99),
        percentile(&f.cli_ms, 0.5),
        percentile(&f.cli_ms, 1.0),
        f.pause_lag.as_secs_f64(),
        f.resume_lag.as_secs_f64(),
        f.cut_lag.as_secs_f64(),
        f.heal_lag.as_secs_f64(),
    );
}

/// Runs the benchmark; see the module docs.
pub async fn run(o: ScaleOptions) -> Result<()> {
    if std::fs::read_dir(&o.dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} is not empty: the benchmark needs a fresh directory",
            o.dir.display()
        );
    }
    let mut lab = Lab::up(&o.dir, 2, 3).await?;
    let r = async {
        lab.start_vras_with(2, &["--ram-mb".into(), "64".into()])
            .await?;
        let sites = protect::prepare(&lab).await?;
        let mut all = Vec::new();
        let one = measure(&mut lab, &sites, &o, 0, 1, &mut all).await?;
        print(&one);
        let many = measure(&mut lab, &sites, &o, 1, o.vpgs.saturating_sub(1), &mut all).await?;
        print(&many);
        Ok::<_, anyhow::Error>((one, many))
    }
    .await;
    lab.down().await;
    let (one, many) = r?;
    if !o.keep {
        let _ = std::fs::remove_dir_all(&o.dir);
    }
    let lag = many.pause_lag.max(many.cut_lag);
    let list_p99 = percentile(&many.list_ms, 0.99).max(percentile(&many.cli_ms, 1.0));
    let met = lag <= Duration::from_secs(2) && list_p99 < 200.0;
    println!(
        "\n| benchmark | tandem ({} VPGs) | yardstick (1 VPG, same run) | ratio | floor | met |",
        many.vpgs
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| scale, {} VPGs x {} VMs, 2 hosts a site | managers {:.1}% CPU, {} resident; list \
         p99 {:.1} ms (CLI max {:.0} ms); pause shown {:.2} s, cut shown {:.2} s | {:.1}% \
         CPU, {}; list p99 {:.1} ms (CLI max {:.0} ms); pause {:.2} s, cut {:.2} s | {:.1}x \
         CPU | lag <= 2 s, list < 200 ms | {} |",
        many.vpgs,
        o.vms_per_vpg,
        many.cpu_percent,
        fmt_bytes(many.rss_bytes),
        percentile(&many.list_ms, 0.99),
        percentile(&many.cli_ms, 1.0),
        many.pause_lag.as_secs_f64(),
        many.cut_lag.as_secs_f64(),
        one.cpu_percent,
        fmt_bytes(one.rss_bytes),
        percentile(&one.list_ms, 0.99),
        percentile(&one.cli_ms, 1.0),
        one.pause_lag.as_secs_f64(),
        one.cut_lag.as_secs_f64(),
        many.cpu_percent / one.cpu_percent.max(0.01),
        if met { "yes" } else { "**no**" }
    );
    Ok(())
}
