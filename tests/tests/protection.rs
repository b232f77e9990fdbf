//! The managers drive protection end to end, on real processes: 2 sites x 3 managers, 2
//! hosts with a VRA per site, every inter-site connection through the lab's link emulator.
//! `CreateVpg` and nothing else: the VPG goes through Initializing / Initial Sync to
//! Meeting SLA, checkpoints come at its interval and are listed by the recovery site (also
//! when asked at the protected site); a kill -9 of the protected site's leader leaves
//! replication running and checkpoints resume under the new leader. Pause, resume, force
//! sync and a kill -9 of a VRA, each observed through the VPG's status.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient,
    monitoring_service_client::MonitoringServiceClient, site_service_client::SiteServiceClient,
    task_service_client::TaskServiceClient, vm_service_client::VmServiceClient,
    vpg_service_client::VpgServiceClient, vra_control_client::VraControlClient,
};
use tandem_testkit::fault::{Tmpfs, fill_leaving};
use tandem_testkit::lab::{Lab, wait_leader};
use tandem_testkit::link::{CutMode, Direction};
use tandem_testkit::protect::{self, ProtectOptions, wait_vpg_cli};
use tandem_testkit::workload::{VolumeTarget, Workload, WorkloadConfig};
use tandem_tests::channel;

const MIB: u64 = 1 << 20;

async fn get(ch: &Channel, id: &str) -> Result<v1::Vpg> {
    Ok(VpgServiceClient::new(ch.clone())
        .get_vpg(v1::GetRequest { id: id.into() })
        .await?
        .into_inner())
}

fn shown(g: &v1::Vpg) -> (String, String) {
    let s = g.status.clone().unwrap_or_default();
    (s.status, s.substatus)
}

/// Waits until `vpg-web`'s newest task of `kind` has ended; answers it.
async fn ended_task(ch: &Channel, kind: &str, within: Duration) -> Result<v1::Task> {
    let start = Instant::now();
    loop {
        let tasks = TaskServiceClient::new(ch.clone())
            .list_tasks(v1::ListTasksQuery {
                vpg_id: "vpg-web".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .tasks;
        if let Some(t) = tasks.iter().rev().find(|t| t.kind == kind)
            && t.state != "running"
        {
            return Ok(t.clone());
        }
        if start.elapsed() > within {
            bail!("no ended {kind} task within {within:?}: {tasks:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn checkpoints(ch: &Channel, vpg: &str) -> Result<Vec<v1::Checkpoint>> {
    Ok(VpgServiceClient::new(ch.clone())
        .list_checkpoints(v1::ListCheckpointsQuery {
            vpg_id: vpg.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .checkpoints)
}

/// A two-site lab protecting VPG `vpg-web` (4 VMs of 32 MiB on 2 hosts, checkpoints every
/// second) from site a to site b, created with `CreateVpg` alone and Meeting SLA.
struct Protected {
    lab: Lab,
    a: Channel,
    b: Channel,
    apis_a: Vec<String>,
    apis_b: Vec<String>,
    created: v1::Vpg,
    /// Every (status, substatus) the protected site showed so far.
    seen: Vec<(String, String)>,
    /// The status when it first met its SLA.
    levelled: v1::Vpg,
}

/// Checkpoints every second, an hour of history, a target RPO of a minute.
fn settings() -> v1::VpgSettings {
    v1::VpgSettings {
        checkpoint_interval_secs: 1,
        journal_history_secs: 3600,
        target_rpo_secs: 60,
        ..Default::default()
    }
}

async fn protect(dir: &std::path::Path) -> Result<Protected> {
    protect_with(dir, settings()).await
}

async fn protect_with(dir: &std::path::Path, settings: v1::VpgSettings) -> Result<Protected> {
    let mut lab = Lab::up(dir, 2, 3).await?;
    lab.start_vras(2).await?;
    let options = ProtectOptions {
        volumes_per_vm: 1,
        vpg: "vpg-web".into(),
        vms: 4,
        volume_bytes: 32 * MIB,
        memory_mib: 1024,
        settings,
    };
    let created = protect::protect(&lab, &options).await?.created;
    assert_eq!(shown(&created).0, "Initializing");
    let a = channel(&lab.sites[0][0].api).await?;
    let b = channel(&lab.sites[1][0].api).await?;

    // Nothing else: the managers assign the VRAs, the initial sync runs, the VPG levels.
    let apis_a = lab.endpoints(0);
    let apis_b = lab.endpoints(1);
    let mut seen = Vec::new();
    let g = meeting_sla(&apis_a, Duration::from_secs(60), &mut seen).await?;
    Ok(Protected {
        lab,
        a,
        b,
        apis_a,
        apis_b,
        created,
        seen,
        levelled: g,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_alone_protects_checkpoints_and_survives_a_leader_kill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Protected {
        mut lab,
        a,
        b,
        apis_a,
        apis_b,
        created,
        mut seen,
        levelled: g,
    } = protect(dir.path()).await?;
    assert!(
        seen.iter().any(|(s, _)| s == "Initializing"),
        "creation not seen: {seen:?}"
    );
    let st = g.status.clone().unwrap();
    assert!(st.actual_rpo_secs.is_some_and(|r| r <= 5), "{st:?}");
    assert!(st.last_checkpoint_id > 0, "{st:?}");
    assert_eq!(st.provisioned_bytes, 4 * (32 * MIB + 1024 * MIB));
    assert!(st.problems.is_empty(), "{:?}", st.problems);
    // The create ran as a task that ended when the initial sync did.
    let t = ended_task(&a, "Create VPG", Duration::from_secs(15)).await?;
    assert_eq!(
        (t.state.as_str(), t.progress_percent),
        ("succeeded", 100),
        "{t:?}"
    );

    // The recovery site shows it too, from its side.
    let mut seen_b = Vec::new();
    wait_vpg_cli(
        &apis_b,
        "vpg-web",
        Duration::from_secs(20),
        &mut seen_b,
        |g| shown(g).0 == "Meeting SLA" && g.direction == "incoming",
    )
    .await?;

    // The VMs view (`tandem vm list`) under a workload writing every VM: each VM with its
    // VPG's status and its own IO, throughput, WAN traffic and storage; the recovery site
    // lists the same VMs, incoming.
    let writer = workload(&lab).await?;
    let start = Instant::now();
    loop {
        let rows = vm_list(&apis_a, "performance").await?;
        let vms: Vec<&str> = rows.iter().filter_map(|r| r["vm_id"].as_str()).collect();
        assert_eq!(vms, ["vm-0", "vm-1", "vm-2", "vm-3"], "{rows:?}");
        let all_busy = rows.iter().all(|r| {
            r["vpg_id"] == "vpg-web"
                && r["direction"] == "outgoing"
                && r["status"] == "Meeting SLA"
                && r["write_iops"].as_u64() > Some(0)
                && r["write_bytes_per_sec"].as_u64() > Some(0)
                && r["wan_bytes_per_sec"].as_u64() > Some(0)
                && r["provisioned_bytes"].as_u64() == Some(32 * MIB + 1024 * MIB)
                && r["used_bytes"].as_u64() > Some(32 * MIB)
        });
        if all_busy {
            break;
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("the VMs view never showed every VM busy: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let history = writer.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());
    let rows_b = vm_list(&apis_b, "general").await?;
    assert!(
        rows_b.len() == 4 && rows_b.iter().all(|r| r["direction"] == "incoming"),
        "{rows_b:?}"
    );

    // Checkpoints at every interval, listed by the recovery site, also through site a.
    let first = checkpoints(&b, "vpg-web").await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = checkpoints(&a, "vpg-web").await?;
    let new: Vec<_> = later
        .iter()
        .filter(|c| first.iter().all(|f| f.id != c.id))
        .collect();
    assert!(
        new.len() >= 2,
        "{} new checkpoints in 4 s: {later:?}",
        new.len()
    );
    assert!(later.iter().filter(|c| c.usable).count() >= 2, "{later:?}");

    // A named checkpoint, through a follower of site a.
    let status = wait_leader(&apis_a[0], 3, Duration::from_secs(10)).await?;
    let follower = lab.sites[0]
        .iter()
        .find(|p| p.id != status.leader_id)
        .context("no follower")?
        .api
        .clone();
    let named = VpgServiceClient::new(channel(&follower).await?)
        .add_checkpoint(v1::AddCheckpointRequest {
            vpg_ids: vec!["vpg-web".into()],
            name: "before-upgrade".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(named.checkpoints.len(), 1);
    let named_id = named.checkpoints[0].id;
    let start = Instant::now();
    loop {
        let list = VpgServiceClient::new(b.clone())
            .list_checkpoints(v1::ListCheckpointsQuery {
                vpg_id: "vpg-web".into(),
                named_only: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        if list
            .checkpoints
            .iter()
            .any(|c| c.id == named_id && c.name == "before-upgrade" && c.usable)
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("named checkpoint {named_id} not listed as usable: {list:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // kill -9 of site a's leader: checkpoints resume under the new leader within 5 s, and
    // no event or task is lost.
    let events_before = events(&a, "").await?;
    let tasks_before = tasks(&a).await?;
    assert!(!events_before.is_empty() && !tasks_before.is_empty());
    let before_kill = checkpoints(&b, "vpg-web").await?;
    let newest_before = before_kill.iter().map(|c| c.id).max().unwrap_or(0);
    let leader_idx = lab.sites[0]
        .iter()
        .position(|p| p.id == status.leader_id)
        .context("leader not in lab")?;
    lab.sites[0][leader_idx].kill9().await?;
    let killed_at = Instant::now();
    let survivors: Vec<String> = lab.sites[0]
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader_idx)
        .map(|(_, p)| p.api.clone())
        .collect();
    loop {
        let list = checkpoints(&b, "vpg-web").await?;
        // A new leader's ids carry its (greater) term in their high bits.
        if list
            .iter()
            .any(|c| c.id >> 32 > newest_before >> 32 && c.usable)
        {
            break;
        }
        if killed_at.elapsed() > Duration::from_secs(15) {
            bail!("no checkpoint from a new leader within 15 s: {list:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resumed = killed_at.elapsed();
    eprintln!("checkpoints resumed {resumed:?} after the leader kill (election included)");
    let g = meeting_sla(&survivors, Duration::from_secs(20), &mut seen).await?;
    assert_eq!(g.generation, created.generation);
    let survivor = tandem_testkit::operator::channel(&survivors[0]).await?;
    let events_after = events(&survivor, "").await?;
    for e in &events_before {
        assert!(
            events_after.contains(e),
            "event {e:?} lost with the leader: {events_after:?}"
        );
    }
    let tasks_after = tasks(&survivor).await?;
    for t in &tasks_before {
        assert!(
            tasks_after.iter().any(|x| x.id == t.id && x.kind == t.kind),
            "task {t:?} lost with the leader: {tasks_after:?}"
        );
    }
    lab.down().await;
    Ok(())
}

/// `tandem vm list --view VIEW -o json`: the VMs view's rows.
async fn vm_list(apis: &[String], view: &str) -> Result<Vec<serde_json::Value>> {
    let out = tokio::process::Command::from(tandem_testkit::operator::cli())
        .args([
            "-e",
            &apis.join(","),
            "vm",
            "list",
            "--view",
            view,
            "-o",
            "json",
        ])
        .output()
        .await
        .context("running tandem vm list")?;
    if !out.status.success() {
        bail!("tandem vm list: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

async fn tasks(ch: &Channel) -> Result<Vec<v1::Task>> {
    Ok(TaskServiceClient::new(ch.clone())
        .list_tasks(v1::ListTasksQuery {
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .tasks)
}

/// The verifying workload on the 4 protected VMs' volumes, over NBD.
async fn workload(lab: &Lab) -> Result<Workload> {
    let targets = (0..4)
        .map(|i| VolumeTarget::new(&lab.vras[0][i % 2].nbd_socket, format!("vm-{i}/0")))
        .collect();
    let mut config = WorkloadConfig::new(targets);
    // 4 MiB per volume: the dirty set a pause or a slow link leaves stays small.
    config.region_blocks = Some(1024);
    let seed = config.seed;
    eprintln!(
        "workload seed {seed}; rerun: TANDEM_WORKLOAD_SEED={seed} cargo nextest run -p tandem-tests --test protection"
    );
    Ok(Workload::start(config).await?)
}

fn vpgs(ch: &Channel) -> VpgServiceClient<Channel> {
    VpgServiceClient::new(ch.clone())
}

fn ids() -> v1::VpgIdsRequest {
    v1::VpgIdsRequest {
        vpg_ids: vec!["vpg-web".into()],
    }
}

/// The protected VRAs' last finished (or running) sync of `vpg-web`, from their own status.
async fn protected_syncs(lab: &Lab) -> Result<Vec<v1::VraSyncStatus>> {
    let mut out = Vec::new();
    for vra in &lab.vras[0] {
        let st = VraControlClient::new(vra.control_channel().await?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner();
        let g = st
            .vpgs
            .into_iter()
            .find(|g| g.vpg_id == "vpg-web")
            .context("vpg-web not on a protected VRA")?;
        out.extend(g.sync.filter(|s| s.kind != 0).or(g.last_sync));
    }
    Ok(out)
}

/// Waits until a protected VRA of `vpg-web` runs (or ran) a sync of `kind` started at
/// `since_ms` or later; fails at once on a full initial sync since then (a partial change
/// must never resend everything).
async fn wait_partial_sync(lab: &Lab, since_ms: u64, kind: v1::VraSyncKind) -> Result<()> {
    let start = Instant::now();
    loop {
        let syncs = protected_syncs(lab).await?;
        let fresh = |s: &&v1::VraSyncStatus| s.started_ms >= since_ms;
        if syncs
            .iter()
            .filter(fresh)
            .any(|s| s.kind == v1::VraSyncKind::Initial as i32)
        {
            bail!("a full initial sync for a partial change: {syncs:?}");
        }
        if syncs.iter().filter(fresh).any(|s| s.kind == kind as i32) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("no {kind:?} sync since {since_ms}: {syncs:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_force_sync_and_a_vra_kill_converge() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Protected {
        mut lab,
        a,
        b,
        apis_a,
        ..
    } = protect(dir.path()).await?;
    let workload = workload(&lab).await?;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;

    // The recovery site cannot pause what it does not protect.
    let e = vpgs(&b).pause_vpgs(ids()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    // Pause: the VPG says so, and nothing of it crosses the WAN while writes go on.
    vpgs(&a).pause_vpgs(ids()).await?;
    let mut seen = Vec::new();
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(10),
        &mut seen,
        |g| shown(g).1 == "User paused protection",
    )
    .await?;
    // A force sync of a paused VPG is refused.
    let e = vpgs(&a).force_sync_vpgs(ids()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = link.state().await?;
    let acked_before = workload.acked();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = link.state().await?;
    let written = (workload.acked() - acked_before) * 4096;
    let crossed =
        after.a_to_b.bytes - before.a_to_b.bytes + after.b_to_a.bytes - before.b_to_a.bytes;
    eprintln!(
        "paused 3 s: {written} bytes written, {crossed} bytes crossed the link (managers' talk)"
    );
    assert!(written > 4 * MIB, "the workload barely wrote: {written}");
    assert!(
        crossed < written / 8 && crossed < 2 * MIB,
        "{crossed} bytes crossed the link while paused ({written} written)"
    );
    let g = get(&a, "vpg-web").await?;
    assert_eq!(g.status.as_ref().map(|s| s.wan_bytes_per_sec), Some(0));

    // Resume through a slow link: the bitmap sync shows, then the VPG meets its SLA again.
    link.throttle(None, 2 * MIB).await?;
    vpgs(&a).resume_vpgs(ids()).await?;
    let mut seen = Vec::new();
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(20),
        &mut seen,
        |g| shown(g).1 == "Bitmap Syncing",
    )
    .await?;
    link.throttle(None, 0).await?;
    meeting_sla(&apis_a, Duration::from_secs(30), &mut seen).await?;
    let history = workload.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());

    // Force sync: a delta sync that the operator asked for, on every protected VRA.
    vpgs(&a).force_sync_vpgs(ids()).await?;
    let start = Instant::now();
    loop {
        let syncs = protected_syncs(&lab).await?;
        let forced = syncs
            .iter()
            .filter(|s| s.kind == v1::VraSyncKind::Delta as i32 && s.trigger == "Force Sync")
            .count();
        if forced == lab.vras[0].len() {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("force sync not run by every protected VRA: {syncs:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    meeting_sla(&apis_a, Duration::from_secs(30), &mut seen).await?;
    let t = ended_task(&a, "Force Sync", Duration::from_secs(20)).await?;
    assert_eq!(t.state, "succeeded", "{t:?}");
    for kind in ["Pause VPG", "Resume VPG"] {
        assert_eq!(
            ended_task(&a, kind, Duration::from_secs(1)).await?.state,
            "succeeded"
        );
    }

    // kill -9 of a protected VRA: the VPG shows it; after the restart it converges alone.
    lab.vras[0][0].kill9().await?;
    let mut seen = Vec::new();
    let down = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(15),
        &mut seen,
        |g| shown(g).0 == "Not Meeting SLA",
    )
    .await?;
    let problems = down.status.map(|s| s.problems).unwrap_or_default();
    assert!(
        problems.iter().any(|p| p.contains(&lab.vras[0][0].host)),
        "the unreachable VRA is not named: {problems:?}"
    );
    lab.vras[0][0].start().await?;
    meeting_sla(&apis_a, Duration::from_secs(60), &mut seen).await?;
    eprintln!("after the VRA kill: {seen:?}");
    lab.down().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wan_cut_shows_on_both_sides_keeps_checkpoints_listed_and_heals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Protected {
        mut lab,
        b,
        apis_a,
        apis_b,
        ..
    } = protect(dir.path()).await?;
    let mut seen_b = Vec::new();
    meeting_sla(&apis_b, Duration::from_secs(20), &mut seen_b).await?;
    // A new leader's monitor takes its first statuses as a baseline, not as transitions
    // (`monitor::BASELINE`, 5 s): the lab is up so fast that a cut now could fall inside it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before: Vec<u64> = checkpoints(&b, "vpg-web")
        .await?
        .iter()
        .filter(|c| c.usable)
        .map(|c| c.id)
        .collect();
    assert!(!before.is_empty(), "no usable checkpoint before the cut");

    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(CutMode::Drop).await?;
    let mut seen_a = Vec::new();
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(20),
        &mut seen_a,
        |g| shown(g) == ("Not Meeting SLA".into(), "Site disconnection".into()),
    )
    .await?;
    wait_vpg_cli(
        &apis_b,
        "vpg-web",
        Duration::from_secs(20),
        &mut seen_b,
        |g| shown(g) == ("Not Meeting SLA".into(), "Recovery is possible".into()),
    )
    .await?;
    let alerts = MonitoringServiceClient::new(b.clone())
        .list_alerts(v1::ListAlertsRequest::default())
        .await?
        .into_inner()
        .alerts;
    assert!(
        alerts
            .iter()
            .any(|a| a.code == "AL0004" && a.vpg_id == "vpg-web" && a.severity == "error"),
        "{alerts:?}"
    );
    // The recovery site lists its checkpoints on its own throughout.
    let during = checkpoints(&b, "vpg-web").await?;
    for id in &before {
        assert!(
            during.iter().any(|c| c.id == *id && c.usable),
            "checkpoint {id} not listed as usable during the cut: {during:?}"
        );
    }

    // The leader's monitor records the transition as an event (it looks once a second,
    // after a 5 s baseline of a new leader: a WAN cut lasts longer than that).
    let start = Instant::now();
    loop {
        let changes = events(&b, "EV0030").await?;
        if changes.iter().any(|e| {
            e.description
                .contains("-> Not Meeting SLA / Recovery is possible")
        }) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no EV0030 for Recovery is possible: {changes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    link.heal().await?;
    meeting_sla(&apis_a, Duration::from_secs(60), &mut seen_a).await?;
    meeting_sla(&apis_b, Duration::from_secs(20), &mut seen_b).await?;
    eprintln!("protected side: {seen_a:?}; recovery side: {seen_b:?}");
    let alerts = MonitoringServiceClient::new(b.clone())
        .list_alerts(v1::ListAlertsRequest::default())
        .await?
        .into_inner()
        .alerts;
    assert!(alerts.is_empty(), "alerts left after the heal: {alerts:?}");
    // Checkpoints come again after the heal.
    let newest = during.iter().map(|c| c.id).max().unwrap_or(0);
    let start = Instant::now();
    while !checkpoints(&b, "vpg-web")
        .await?
        .iter()
        .any(|c| c.id > newest && c.usable)
    {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("no new checkpoint after the heal");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lab.down().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_vm_syncs_its_volumes_only_and_removed_vms_keep_or_lose_their_disks() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let Protected {
        mut lab,
        a,
        b,
        apis_a,
        ..
    } = protect(dir.path()).await?;
    let before: Vec<u64> = checkpoints(&b, "vpg-web")
        .await?
        .iter()
        .filter(|c| c.usable)
        .map(|c| c.id)
        .collect();
    assert!(!before.is_empty());

    let g = get(&a, "vpg-web").await?;
    let edited_at = tandem_now_ms();
    // Data to copy: a volume initial sync skips what reads as zeros.
    let source = lab.dir.join(&lab.site_names[0]).join("ds-0/vm-4/c0u1.img");
    fill_random(&source, 16 * MIB, 4)?;
    let generation = add_vm(&lab, &a, "vm-4", 1).await?;
    assert_eq!(generation, g.generation + 1);

    // The host of the new VM runs a volume initial sync; nobody runs a full initial sync.
    wait_partial_sync(&lab, edited_at, v1::VraSyncKind::VolumeInitial).await?;
    let mut seen = Vec::new();
    let g = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(60),
        &mut seen,
        |g| shown(g).0 == "Meeting SLA" && g.generation == generation,
    )
    .await?;
    assert_eq!(g.vms.len(), 5);
    assert_eq!(
        g.status.as_ref().map(|s| s.provisioned_bytes),
        Some(4 * (32 * MIB + 1024 * MIB) + 16 * MIB + 512 * MIB)
    );
    let replica = lab
        .dir
        .join(&lab.site_names[1])
        .join("ds-0/vpg-web/vm-4/c0u1.replica");
    assert_eq!(
        std::fs::metadata(&replica)
            .with_context(|| format!("{}", replica.display()))?
            .len(),
        16 * MIB
    );
    // The history from before the edit is still there.
    let after = checkpoints(&b, "vpg-web").await?;
    assert!(
        before.iter().all(|id| after.iter().any(|c| c.id == *id)),
        "checkpoints lost by the edit: before {before:?}, after {after:?}"
    );
    eprintln!("after adding vm-4: {seen:?}");

    // Removing vm-4 and keeping its recovery disks: EV0040 at the recovery site names them
    // and they stay; removing vm-3 without keeping them removes its journal and disks.
    let rec_vm_dir = |h: usize, vm: &str| {
        lab.dir
            .join(&lab.site_names[1])
            .join(format!("ds-{h}/vpg-web/{vm}"))
    };
    assert!(rec_vm_dir(1, "vm-3").join("journal").exists());
    let generation = remove_vm(&a, "vm-4", true).await?;
    let mut seen = Vec::new();
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(30),
        &mut seen,
        |g| shown(g).0 == "Meeting SLA" && g.generation == generation,
    )
    .await?;
    let start = Instant::now();
    let kept = loop {
        let kept = events(&b, "EV0040").await?;
        if !kept.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break kept;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].description.contains("vm-4")
            && kept[0].description.contains(&replica.display().to_string()),
        "{:?}",
        kept[0].description
    );
    assert_eq!(std::fs::metadata(&replica)?.len(), 16 * MIB);

    // vm-4 back, its kept disks preseeded, after 512 KiB written to it while it was out of
    // the VPG: a delta sync of its volume alone ("Delta syncing a volume", shown over a
    // 64 KB/s link) sends about what differs, and its image equals the source again.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&source)?;
        f.write_all_at(&vec![0x6b; 512 << 10], 4 * MIB)?;
        f.sync_all()?;
    }
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.throttle(None, 64 * 1024).await?;
    let readded_at = tandem_now_ms();
    let generation = add_to_vpg(&lab, &a, "vm-4", true).await?;
    let shown_delta = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(60),
        &mut seen,
        |g| shown(g).1 == "Delta syncing a volume",
    )
    .await;
    link.throttle(None, 0).await?;
    shown_delta?;
    wait_partial_sync(&lab, readded_at, v1::VraSyncKind::VolumeDelta).await?;
    let g = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(60),
        &mut seen,
        |g| shown(g).0 == "Meeting SLA" && g.generation == generation,
    )
    .await?;
    let preseeded = |g: &v1::Vpg| -> Vec<String> {
        g.vms
            .iter()
            .filter_map(|v| v.placement.as_ref())
            .filter(|p| p.preseeded)
            .map(|p| p.vm_id.clone())
            .collect()
    };
    assert_eq!(preseeded(&g), ["vm-4"]);
    let syncs = protected_syncs(&lab).await?;
    let delta = syncs
        .iter()
        .find(|s| s.kind == v1::VraSyncKind::VolumeDelta as i32 && s.started_ms >= readded_at)
        .context("no delta sync of the preseeded volume")?;
    eprintln!("preseeded vm-4: {delta:?}");
    assert!(
        (512 << 10..2 * MIB).contains(&delta.sent_bytes),
        "a preseeded 16 MiB volume with 512 KiB changed sent {} bytes",
        delta.sent_bytes
    );
    checkpoint_matches_source(&lab, &a, &b, "vm-4", &[(0, 1)]).await?;

    let generation = remove_vm(&a, "vm-3", false).await?;
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(30),
        &mut seen,
        |g| shown(g).0 == "Meeting SLA" && g.generation == generation && g.vms.len() == 4,
    )
    .await?;
    let g = get(&a, "vpg-web").await?;
    assert!(
        preseeded(&g).is_empty(),
        "preseeding is for the edit a VM joins in: {:?}",
        g.vms
    );
    let start = Instant::now();
    while rec_vm_dir(1, "vm-3").exists() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("vm-3's recovery data is still there after its removal");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert!(replica.exists(), "the kept disk went with vm-3's removal");
    // Deleted without keeping the recovery disks: both sites forget it, the disks go.
    VpgServiceClient::new(a.clone())
        .delete_vpg(v1::DeleteVpgRequest {
            id: "vpg-web".into(),
            keep_recovery_disks: false,
            force: false,
        })
        .await?;
    gone(&a, "vpg-web", Duration::from_secs(20)).await?;
    gone(&b, "vpg-web", Duration::from_secs(20)).await?;
    for (h, vm) in [(0, "vm-0"), (1, "vm-1"), (0, "vm-2")] {
        assert!(
            !rec_vm_dir(h, vm).exists(),
            "{vm}'s recovery data left behind"
        );
    }
    // vm-4 was back in the VPG: its disks go with it.
    assert!(!replica.exists(), "vm-4's recovery disk left behind");
    for ds in ["ds-0", "ds-1"] {
        let left = lab.dir.join(&lab.site_names[1]).join(ds).join("vpg-web");
        assert!(!left.exists(), "{} left behind", left.display());
    }
    assert_eq!(events(&b, "EV0040").await?.len(), 1);
    lab.down().await;
    Ok(())
}

/// Removes `vm` from `vpg-web` at site a; answers the new generation.
/// Edits `vpg-web`: `change` alters its current spec, sent read at `generation` (the
/// current one when `None`), keeping removed VMs' recovery disks if `keep`; answers the new
/// generation.
async fn edit_vpg(
    a: &Channel,
    generation: Option<u64>,
    keep: bool,
    change: impl FnOnce(&mut v1::VpgSpec),
) -> Result<u64> {
    let g = get(a, "vpg-web").await?;
    let mut spec = v1::VpgSpec {
        name: g.name.clone(),
        recovery_site_id: g.recovery_site_id.clone(),
        settings: g.settings,
        vms: g.vms.iter().filter_map(|v| v.placement.clone()).collect(),
    };
    change(&mut spec);
    Ok(VpgServiceClient::new(a.clone())
        .update_vpg(v1::UpdateVpgRequest {
            id: "vpg-web".into(),
            generation: generation.unwrap_or(g.generation),
            spec: Some(spec),
            keep_removed_recovery_disks: keep,
        })
        .await?
        .into_inner()
        .generation)
}

async fn remove_vm(a: &Channel, vm: &str, keep: bool) -> Result<u64> {
    edit_vpg(a, None, keep, |s| s.vms.retain(|p| p.vm_id != vm)).await
}

/// Creates VM `vm` (one 16 MiB volume at controller 0 `unit` on host 1 of site a) and adds
/// it to `vpg-web`, recovered on host 1 of site b; answers the new generation.
async fn add_vm(lab: &Lab, a: &Channel, vm: &str, unit: u32) -> Result<u64> {
    VmServiceClient::new(a.clone())
        .create_vm(v1::Vm {
            id: vm.into(),
            name: vm.into(),
            host_id: lab.vras[0][0].host.clone(),
            power: v1::PowerState::On as i32,
            memory_mib: 512,
            cpus: 1,
            cpu_reservation_mhz: 100,
            memory_reservation_mib: 128,
            volumes: vec![v1::Volume {
                path: String::new(),
                controller: 0,
                unit,
                size_bytes: 16 * MIB,
                datastore_id: format!("{}-ds-0", lab.site_names[0]),
            }],
            vpg_id: String::new(),
        })
        .await?;
    add_to_vpg(lab, a, vm, false).await
}

/// Adds existing VM `vm` to `vpg-web`, recovered on host 0 of site b, its recovery disks
/// `preseeded` or not; answers the new generation.
async fn add_to_vpg(lab: &Lab, a: &Channel, vm: &str, preseeded: bool) -> Result<u64> {
    let placement = v1::VmPlacement {
        vm_id: vm.into(),
        recovery_host_id: lab.vras[1][0].host.clone(),
        recovery_datastore_id: format!("{}-ds-0", lab.site_names[1]),
        recovery_pool_id: "pool".into(),
        preseeded,
    };
    edit_vpg(a, None, false, |s| s.vms.push(placement)).await
}
fn tandem_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_limit_below_the_write_rate_misses_the_rpo_until_it_is_lifted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Protected {
        mut lab,
        a,
        apis_a,
        created,
        ..
    } = protect_with(
        dir.path(),
        v1::VpgSettings {
            target_rpo_secs: 10,
            ..settings()
        },
    )
    .await?;
    let site = SiteServiceClient::new(a.clone());
    // Bad limits are refused and change nothing.
    let e = site
        .clone()
        .set_peer_bandwidth_limit(v1::SetPeerBandwidthLimitRequest {
            site_id: created.recovery_site_id.clone(),
            bytes_per_sec: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let limit = 256 * 1024;
    let peer = site
        .clone()
        .set_peer_bandwidth_limit(v1::SetPeerBandwidthLimitRequest {
            site_id: created.recovery_site_id.clone(),
            bytes_per_sec: limit,
        })
        .await?
        .into_inner();
    assert_eq!(peer.bandwidth_limit_bytes_per_sec, limit);
    let workload = workload(&lab).await?;
    let mut seen = Vec::new();
    let slow = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(40),
        &mut seen,
        |g| shown(g).0 == "RPO Not Meeting SLA",
    )
    .await?;
    let st = slow.status.unwrap_or_default();
    assert!(st.actual_rpo_secs.is_some_and(|r| r > 10), "{st:?}");
    // Every protected VRA applies the site pair's limit.
    for vra in &lab.vras[0] {
        let s = VraControlClient::new(vra.control_channel().await?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner();
        assert!(
            s.bandwidth_limits
                .iter()
                .any(|l| l.peer_site_id == created.recovery_site_id && l.bytes_per_sec == limit),
            "{:?}",
            s.bandwidth_limits
        );
    }
    site.clone()
        .set_peer_bandwidth_limit(v1::SetPeerBandwidthLimitRequest {
            site_id: created.recovery_site_id.clone(),
            bytes_per_sec: 0,
        })
        .await?;
    let history = workload.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());
    meeting_sla(&apis_a, Duration::from_secs(60), &mut seen).await?;
    eprintln!("under the limit and after: {seen:?}");
    lab.down().await;
    Ok(())
}

/// A journal too small for the workload: History Not Meeting SLA. A force sync into it
/// then pauses protection for the replication pause time (Site Manager paused
/// protection), resumes by itself, and the journal's condition survives the edit that set
/// the pause time (its journals reopened at the new generation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_too_small_for_the_history_shows_history_not_meeting_sla() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A quarter of a 32 MiB disk: the workload fills it in moments.
    let small = v1::JournalLimit {
        limit: Some(v1::journal_limit::Limit::Percent(25)),
    };
    let Protected {
        mut lab, a, apis_a, ..
    } = protect_with(
        dir.path(),
        v1::VpgSettings {
            journal_hard_limit: Some(small),
            journal_warning: Some(v1::JournalLimit {
                limit: Some(v1::journal_limit::Limit::Percent(20)),
            }),
            ..settings()
        },
    )
    .await?;
    let workload = workload(&lab).await?;
    let mut seen = Vec::new();
    let short = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(40),
        &mut seen,
        |g| shown(g).0 == "History Not Meeting SLA",
    )
    .await?;
    let st = short.status.unwrap_or_default();
    assert!(st.history_held_secs < st.history_configured_secs, "{st:?}");
    let history = workload.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());
    eprintln!("with a small journal: {seen:?}");

    // The replication pause time: a force sync into this full journal, with fewer than ten
    // minutes of checkpoints in it, pauses protection for 6 s (Site Manager paused
    // protection), then resumes by itself and the sync goes on.
    edit_vpg(&a, None, false, |s| {
        if let Some(st) = s.settings.as_mut() {
            st.replication_pause_secs = 6;
        }
    })
    .await?;
    let drift = lab.dir.join(&lab.site_names[0]).join("ds-0/vm-0/c0u0.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&drift)?;
        f.write_all_at(&vec![0x3c; 2 << 20], 0)?;
        f.sync_all()?;
    }
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.throttle(None, 256 * 1024).await?;
    vpgs(&a).force_sync_vpgs(ids()).await?;
    let paused = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(30),
        &mut seen,
        |g| shown(g).1 == "Site Manager paused protection",
    )
    .await;
    link.throttle(None, 0).await?;
    paused?;
    // The pause's length comes from the events' own times: the moment this test saw the
    // pause depends on its polling and on the machine's load.
    let paused = event_saying(&a, "EV0013", &["paused by the site manager for 6 s"]).await?;
    let resumed = event_saying(&a, "EV0014", &["resumed by the site manager"]).await?;
    let lasted = Duration::from_millis(resumed.at_ms.saturating_sub(paused.at_ms));
    assert!(
        lasted >= Duration::from_secs(5),
        "the pause lasted {lasted:?}: {paused:?} {resumed:?}"
    );
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(60),
        &mut seen,
        |g| shown(g) == pair("History Not Meeting SLA", "—"),
    )
    .await?;
    eprintln!("force sync into a full journal: {seen:?}");
    lab.down().await;
    Ok(())
}

/// Recovery storage faults, each shown at both sites and each gone once its cause goes:
/// a full recovery datastore (Recovery storage error), a journal whose files cannot be
/// written (Journal storage error; the VRA reopens it) and a recovery datastore missing
/// from its host when an edit needs it (Recovery storage profile error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_missing_or_failing_recovery_storage_shows_and_recovers_when_the_cause_goes()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    // Host 1's recovery datastore of site b: replicas (2 x 32 MiB) and journals.
    let fs = Tmpfs::mount(&dir.path().join("site-b").join("ds-0"), 384)?;
    let Protected {
        mut lab,
        apis_a,
        apis_b,
        ..
    } = protect(dir.path()).await?;
    let filler = fs.path().join("filler");
    fill_leaving(&filler, 4)?;
    let filling = workload(&lab).await?;
    let mut seen = Vec::new();
    let full = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(30),
        &mut seen,
        |g| shown(g).1 == "Recovery storage error",
    )
    .await?;
    eprintln!("problems: {:?}", full.status.map(|s| s.problems));
    let mut seen_b = Vec::new();
    wait_vpg_cli(
        &apis_b,
        "vpg-web",
        Duration::from_secs(10),
        &mut seen_b,
        |g| shown(g).1 == "Recovery storage error",
    )
    .await?;
    let history = filling.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());

    std::fs::remove_file(&filler)?;
    meeting_sla(&apis_a, Duration::from_secs(60), &mut seen).await?;
    eprintln!("full datastore and after: {seen:?}");

    // A journal I/O error: its files made immutable (chattr +i; writes fail with EPERM).
    // Journal storage error at both sites, naming the error; once the files can be
    // written again the VRA reopens the journal and the VPG meets its SLA again, with
    // nothing the workload wrote lost.
    let journals = journal_files(&dir.path().join("site-b"))?;
    assert!(!journals.is_empty(), "no journal files under site-b");
    let writer = workload(&lab).await?;
    let immutable = Immutable::set(&journals)?;
    let sites = (&apis_a[..], &apis_b[..]);
    let seen_ab = (&mut seen, &mut seen_b);
    shown_at_both(sites, seen_ab, "Journal storage error", |p| {
        p.contains("journal storage error")
    })
    .await?;
    drop(immutable);
    meeting_sla(&apis_a, Duration::from_secs(60), &mut seen).await?;
    let history = writer.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());
    let a = channel(&lab.sites[0][0].api).await?;
    let b = channel(&lab.sites[1][0].api).await?;
    checkpoint_matches_source(&lab, &a, &b, "vm-0", &[(0, 0)]).await?;
    eprintln!("journal error and after: {seen:?}");

    // The recovery datastore of host 2 gone from its host (unmounted) when an edit needs
    // it: its VRA refuses the new assignment (the datastore is not created) and both sites
    // show Recovery storage profile error; back in place, the edit goes through.
    let ds = dir.path().join("site-b").join("ds-1");
    let away = dir.path().join("site-b").join("ds-1.unmounted");
    std::fs::rename(&ds, &away)?;
    edit_vpg(&a, None, false, |s| {
        if let Some(settings) = s.settings.as_mut() {
            settings.target_rpo_secs = 120;
        }
    })
    .await?;
    let seen_ab = (&mut seen, &mut seen_b);
    shown_at_both(sites, seen_ab, "Recovery storage profile error", |p| {
        p.contains("ds-1") && p.contains("not found")
    })
    .await?;
    assert!(!ds.exists(), "the VRA created the missing datastore");
    std::fs::rename(&away, &ds)?;
    meeting_sla(&apis_a, Duration::from_secs(60), &mut seen).await?;
    eprintln!("missing datastore and after: {seen:?}");
    lab.down().await;
    drop(fs);
    Ok(())
}

/// Every (status, substatus) a site showed, in order.
type Seen = Vec<(String, String)>;

/// Waits until `vpg-web` shows Meeting SLA at `apis` (whatever its substatus).
async fn meeting_sla(apis: &[String], within: Duration, seen: &mut Seen) -> Result<v1::Vpg> {
    wait_vpg_cli(apis, "vpg-web", within, seen, |g| {
        shown(g).0 == "Meeting SLA"
    })
    .await
}

/// Waits until site a shows `vpg-web` as Not Meeting SLA / `substatus` with a problem
/// that `names` accepts, then until site b shows the substatus too.
async fn shown_at_both(
    (apis_a, apis_b): (&[String], &[String]),
    (seen_a, seen_b): (&mut Seen, &mut Seen),
    substatus: &str,
    names: impl Fn(&str) -> bool,
) -> Result<()> {
    let g = wait_vpg_cli(apis_a, "vpg-web", Duration::from_secs(30), seen_a, |g| {
        shown(g) == pair("Not Meeting SLA", substatus)
    })
    .await?;
    let problems = g.status.unwrap_or_default().problems;
    assert!(problems.iter().any(|p| names(p)), "{problems:?}");
    wait_vpg_cli(apis_b, "vpg-web", Duration::from_secs(10), seen_b, |g| {
        shown(g).1 == substatus
    })
    .await?;
    Ok(())
}

/// Every file in a directory named `journal` under `root`.
fn journal_files(root: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if d.file_name().is_some_and(|n| n == "journal") {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// Files made immutable with `chattr +i` (even root cannot write them) until dropped.
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    fn set(files: &[std::path::PathBuf]) -> Result<Self> {
        let guard = Immutable(files.to_vec());
        chattr("+i", files)?;
        Ok(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        if let Err(e) = chattr("-i", &self.0) {
            eprintln!("chattr -i failed: {e}");
        }
    }
}

fn chattr(flag: &str, files: &[std::path::PathBuf]) -> Result<()> {
    let status = std::process::Command::new("chattr")
        .arg(flag)
        .args(files)
        .status()
        .context("running chattr")?;
    if !status.success() {
        bail!("chattr {flag} failed: {status}");
    }
    Ok(())
}

async fn events(ch: &Channel, code: &str) -> Result<Vec<v1::Event>> {
    Ok(MonitoringServiceClient::new(ch.clone())
        .list_events(v1::ListEventsQuery {
            vpg_id: "vpg-web".into(),
            code: code.into(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events)
}

async fn gone(ch: &Channel, id: &str, within: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match VpgServiceClient::new(ch.clone())
            .get_vpg(v1::GetRequest { id: id.into() })
            .await
        {
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Ok(g) if start.elapsed() > within => bail!("VPG {id} still there: {g:?}"),
            Err(s) if start.elapsed() > within => bail!("VPG {id}: {s:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_keeping_recovery_disks_names_them_and_a_stuck_delete_is_retried() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Protected {
        mut lab,
        a,
        b,
        apis_b,
        ..
    } = protect(dir.path()).await?;
    // No unpairing while a VPG replicates between the sites, at either site.
    let site_id = |ch: &Channel| {
        let ch = ch.clone();
        async move {
            anyhow::Ok(
                SiteServiceClient::new(ch)
                    .get_site(v1::GetSiteRequest {})
                    .await?
                    .into_inner()
                    .id,
            )
        }
    };
    let (id_a, id_b) = (site_id(&a).await?, site_id(&b).await?);
    for (ch, peer) in [(&a, &id_b), (&b, &id_a)] {
        let e = SiteServiceClient::new(ch.clone())
            .unpair_site(v1::UnpairSiteRequest {
                site_id: peer.clone(),
                force: false,
            })
            .await
            .expect_err("unpaired while a VPG replicates");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("still replicates"), "{e:?}");
    }

    // One recovery VRA is down: the recovery site cannot finish its side of the delete.
    lab.vras[1][0].kill9().await?;
    VpgServiceClient::new(a.clone())
        .delete_vpg(v1::DeleteVpgRequest {
            id: "vpg-web".into(),
            keep_recovery_disks: true,
            force: false,
        })
        .await?;
    gone(&a, "vpg-web", Duration::from_secs(20)).await?;
    let mut seen = Vec::new();
    wait_vpg_cli(
        &apis_b,
        "vpg-web",
        Duration::from_secs(40),
        &mut seen,
        |g| shown(g) == ("Deleting".into(), "VPG waiting to be removed".into()),
    )
    .await?;
    assert!(
        seen.iter().any(|s| s.1 == "Deleting the VPG"),
        "the delete was not seen running: {seen:?}"
    );
    assert_eq!(events(&b, "EV0005").await?.len(), 1);

    // The VRA is back; the recovery site retries without force.
    lab.vras[1][0].start().await?;
    VpgServiceClient::new(b.clone())
        .delete_vpg(v1::DeleteVpgRequest {
            id: "vpg-web".into(),
            keep_recovery_disks: true,
            force: false,
        })
        .await?;
    gone(&b, "vpg-web", Duration::from_secs(30)).await?;
    // Each site's delete ran as a task: site a's ended when its side was done, site b's
    // retry when the definition went.
    for ch in [&a, &b] {
        let t = ended_task(ch, "Delete VPG", Duration::from_secs(10)).await?;
        assert_eq!(t.state, "succeeded", "{t:?}");
    }
    let kept = events(&b, "EV0040").await?;
    assert_eq!(kept.len(), 1, "{kept:?}");
    for i in 0..4 {
        let replica = lab
            .dir
            .join(&lab.site_names[1])
            .join(format!("ds-{}/vpg-web/vm-{i}/c0u0.replica", i % 2));
        assert!(
            kept[0].description.contains(&replica.display().to_string()),
            "{replica:?} not named in {:?}",
            kept[0].description
        );
        assert_eq!(std::fs::metadata(&replica)?.len(), 32 * MIB);
    }
    for (site, ch) in [("a", &a), ("b", &b)] {
        assert_eq!(events(ch, "EV0003").await?.len(), 1, "site {site}");
        assert_eq!(events(ch, "EV0004").await?.len(), 1, "site {site}");
    }
    // No VRA holds it any more.
    for vra in lab.vras.iter().flatten() {
        let st = VraControlClient::new(vra.control_channel().await?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner();
        assert!(st.vpgs.is_empty(), "{} still holds {:?}", vra.host, st.vpgs);
    }

    // With no VPG left, unpairing at the recovery site removes the pair on both sites.
    SiteServiceClient::new(b.clone())
        .unpair_site(v1::UnpairSiteRequest {
            site_id: id_a.clone(),
            force: false,
        })
        .await?;
    for (site, ch) in [("a", &a), ("b", &b)] {
        let peers = SiteServiceClient::new(ch.clone())
            .list_peers(v1::ListPeersRequest {})
            .await?
            .into_inner()
            .peers;
        assert!(peers.is_empty(), "site {site} still pairs with {peers:?}");
        let unpaired = MonitoringServiceClient::new(ch.clone())
            .list_events(v1::ListEventsQuery {
                code: "EV0051".into(),
                limit: 10,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        assert_eq!(unpaired.len(), 1, "site {site}: {unpaired:?}");
    }
    lab.down().await;
    Ok(())
}

/// Replaces `vpg-web`'s target RPO, read at `generation`; answers the new generation.
async fn set_target_rpo(a: &Channel, generation: u64, secs: u64) -> Result<u64> {
    edit_vpg(a, Some(generation), false, |s| {
        if let Some(settings) = s.settings.as_mut() {
            settings.target_rpo_secs = secs;
        }
    })
    .await
}
/// An edit whose answer from the recovery site is lost (the recovery site committed it,
/// the protected site did not) is reconciled: both sites end at one generation, above
/// either, holding the protected site's definition, and later edits go through. While the
/// edit is being stored, other operations on the VPG are refused with FAILED_PRECONDITION
/// and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_the_protected_site_lost_is_reconciled_and_blocks_operations_while_stored()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let Protected { mut lab, a, b, .. } = protect(dir.path()).await?;
    let g0 = get(&a, "vpg-web").await?.generation;
    assert_eq!(get(&b, "vpg-web").await?.generation, g0);
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    // Site b's answers are held back longer than the edit waits for them (10 s).
    link.delay(Some(Direction::BToA), Duration::from_secs(15))
        .await?;
    let edit = tokio::spawn({
        let a = a.clone();
        async move { set_target_rpo(&a, g0, 90).await }
    });
    // The edit is under way once its task runs: pause, force sync, a named checkpoint and
    // another edit are refused until it ends.
    let start = Instant::now();
    while !tasks(&a)
        .await?
        .iter()
        .any(|t| t.kind == "Edit VPG" && t.state == "running")
    {
        assert!(start.elapsed() < Duration::from_secs(5), "no edit task");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{what}: {e:?}");
        assert!(
            e.message().contains("is being updated")
                && e.message().contains("being stored on both sites"),
            "{what}: {e:?}"
        );
    };
    refused(
        vpgs(&a).pause_vpgs(ids()).await.map(|_| ()),
        "pause during an edit",
    );
    refused(
        vpgs(&a).force_sync_vpgs(ids()).await.map(|_| ()),
        "force sync during an edit",
    );
    refused(
        vpgs(&a)
            .add_checkpoint(v1::AddCheckpointRequest {
                vpg_ids: vec!["vpg-web".into()],
                name: "during-edit".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "named checkpoint during an edit",
    );
    refused(
        set_target_rpo(&a, g0, 120).await.map(|_| ()).map_err(|e| {
            match e.downcast::<tonic::Status>() {
                Ok(s) => s,
                Err(e) => tonic::Status::unknown(e.to_string()),
            }
        }),
        "a second edit",
    );
    let lost = edit.await?;
    assert!(lost.is_err(), "the edit's answer was held back: {lost:?}");
    assert_eq!(
        get(&a, "vpg-web").await?.generation,
        g0,
        "site a did not commit the edit"
    );

    // The answers flow again: site b holds generation g0 + 1, site a g0; the protected
    // site's controller brings both to one generation with its own definition.
    link.delay(None, Duration::ZERO).await?;
    let start = Instant::now();
    let (ga, gb) = loop {
        let (ga, gb) = (get(&a, "vpg-web").await?, get(&b, "vpg-web").await?);
        if ga.generation == gb.generation && ga.generation > g0 + 1 {
            break (ga, gb);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "not reconciled: generation {} at a, {} at b",
                ga.generation,
                gb.generation
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for g in [&ga, &gb] {
        assert_eq!(g.settings.as_ref().map(|s| s.target_rpo_secs), Some(60));
    }
    let reconciled = events(&a, "EV0006").await?;
    assert_eq!(reconciled.len(), 1, "{reconciled:?}");
    assert!(
        reconciled[0]
            .description
            .contains(&format!("was {g0} here, {} there", g0 + 1)),
        "{reconciled:?}"
    );
    // Edits go through again, on both sites.
    let g = set_target_rpo(&a, ga.generation, 90).await?;
    assert_eq!(g, ga.generation + 1);
    let gb = get(&b, "vpg-web").await?;
    assert_eq!(gb.generation, g);
    assert_eq!(gb.settings.map(|s| s.target_rpo_secs), Some(90));
    // And protection is level again.
    let mut seen = Vec::new();
    wait_vpg_cli(
        &lab.endpoints(0),
        "vpg-web",
        Duration::from_secs(30),
        &mut seen,
        |g| shown(g).0 == "Meeting SLA",
    )
    .await?;
    lab.down().await;
    Ok(())
}

/// Writes `bytes` of incompressible data to `path` (a volume the VRA will find).
fn fill_random(path: &std::path::Path, bytes: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..bytes / 8 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.write_all(&x.to_le_bytes())?;
    }
    f.flush()?;
    Ok(())
}

fn pair(status: &str, substatus: &str) -> (String, String) {
    (status.to_string(), substatus.to_string())
}

/// The seed's live statuses that the other tests do not reach, driven one after another
/// on one VPG and each observed through `tandem vpg get -o json`: Creating VPG, Initial
/// Sync with progress (the site link at 2 MB/s), Delta Syncing after a force sync (the link
/// at 64 KB/s), Volume Initial Sync of an added VM and, with the link cut during it, "Site
/// disconnection. No checkpoints" (the checkpoints before the VM was added are no recovery
/// point of the VPG as it is now), Error for a protected VRA that is gone, Syncing while
/// the restarted VRA's stream is not yet established (the kind of its sync being
/// evaluated), the delta sync it then runs unasked (Not Meeting SLA / Delta Syncing), and
/// VPG has no VMs once every VM is removed. Each cause removed, the VPG meets its SLA again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_live_statuses_are_each_driven_and_shown_by_the_cli() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(dir.path(), 2, 3).await?;
    lab.start_vras(2).await?;
    let sites = protect::prepare(&lab).await?;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    let a = channel(&lab.sites[0][0].api).await?;
    let (apis_a, apis_b) = (lab.endpoints(0), lab.endpoints(1));
    let mut seen = Vec::new();
    let mut seen_b = Vec::new();
    let within = Duration::from_secs(60);
    let meeting_sla = |g: &v1::Vpg| shown(g).0 == "Meeting SLA";

    // Creating VPG, then Initial Sync with its progress, over a 2 MB/s link.
    link.throttle(Some(Direction::AToB), 2 * MIB).await?;
    let options = ProtectOptions {
        volumes_per_vm: 1,
        vpg: "vpg-web".into(),
        vms: 2,
        volume_bytes: 8 * MIB,
        memory_mib: 512,
        settings: settings(),
    };
    // Data to send: an initial sync skips what reads as zeros.
    for i in 0..options.vms {
        let file = lab
            .dir
            .join(&lab.site_names[0])
            .join(format!("ds-{}/vm-{i}/c0u0.img", i % 2));
        fill_random(&file, options.volume_bytes, i as u64)?;
    }
    protect::protect_vpg(&lab, &sites, &options, "vm").await?;
    // Its progress (durable bytes at the recovery VRA) is shown while it runs, and never
    // goes back.
    let percents = std::sync::Mutex::new(Vec::new());
    let progressed = |g: &v1::Vpg| {
        let s = g.status.clone().unwrap_or_default();
        if shown(g) == pair("Initializing", "Initial Sync") {
            percents.lock().unwrap().push(s.sync_percent);
        }
        shown(g).0 == "Meeting SLA"
    };
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, progressed).await?;
    let percents = percents.into_inner().unwrap();
    eprintln!("initial sync progress seen: {percents:?}");
    assert!(!percents.is_empty(), "no Initial Sync shown: {seen:?}");
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]) && percents.iter().all(|p| *p < 100),
        "initial sync progress went back or showed 100% while running: {percents:?}"
    );
    link.throttle(None, 0).await?;
    // Each site ends "Creating" on its own once it sees the VPG level.
    wait_vpg_cli(&apis_b, "vpg-web", within, &mut seen_b, meeting_sla).await?;

    // Force sync after the volumes drifted apart (512 KiB written past the VRA): a delta
    // sync, sending what differs over a 64 KB/s link.
    let drift = lab.dir.join(&lab.site_names[0]).join("ds-0/vm-0/c0u0.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&drift)?;
        f.write_all_at(&vec![0x5a; 512 << 10], 0)?;
        f.sync_all()?;
    }
    link.throttle(None, 64 * 1024).await?;
    vpgs(&a).force_sync_vpgs(ids()).await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, |g| {
        shown(g).1 == "Delta Syncing"
    })
    .await?;
    link.throttle(None, 0).await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, meeting_sla).await?;

    // An added VM: Volume Initial Sync; the link cut during it leaves no checkpoint of
    // the VPG as it is now.
    link.throttle(Some(Direction::AToB), MIB).await?;
    fill_random(
        &lab.dir
            .join(&lab.site_names[0])
            .join("ds-0/vm-new/c0u0.img"),
        16 * MIB,
        7,
    )?;
    add_vm(&lab, &a, "vm-new", 0).await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, |g| {
        shown(g).1 == "Volume Initial Sync"
    })
    .await?;
    link.cut(CutMode::Drop).await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, |g| {
        shown(g) == pair("Not Meeting SLA", "Site disconnection. No checkpoints")
    })
    .await?;
    wait_vpg_cli(&apis_b, "vpg-web", within, &mut seen_b, |g| {
        shown(g) == pair("Not Meeting SLA", "Recovery is possible")
    })
    .await?;
    link.heal().await?;
    link.throttle(None, 0).await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, meeting_sla).await?;

    // A protected VRA gone: Error, naming its host; back without an operator.
    lab.vras[0][0].kill9().await?;
    let error = wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, |g| {
        shown(g) == pair("Not Meeting SLA", "Error")
    })
    .await?;
    let problems = error.status.unwrap_or_default().problems;
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&lab.vras[0][0].host) && p.contains("cannot be reached")),
        "{problems:?}"
    );
    // Restarted after the kill it owes a sync; until its stream reaches the recovery VRA
    // (1 s each way on the link) the sync's kind is being evaluated: Syncing. Then, with
    // 512 KiB written past it while it was down, a delta sync the operator did not ask
    // for (the sites drifted apart) over a 64 KB/s link: Not Meeting SLA / Delta Syncing.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&drift)?;
        f.write_all_at(&vec![0xa5; 512 << 10], 1 << 20)?;
        f.sync_all()?;
    }
    link.delay(None, Duration::from_secs(1)).await?;
    link.throttle(None, 64 * 1024).await?;
    lab.vras[0][0].start().await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, |g| {
        shown(g).1 == "Syncing"
    })
    .await?;
    link.delay(None, Duration::ZERO).await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, |g| {
        shown(g) == pair("Not Meeting SLA", "Delta Syncing")
    })
    .await?;
    link.throttle(None, 0).await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, |g| {
        shown(g) == pair("Meeting SLA", "—")
    })
    .await?;

    // Every VM removed.
    edit_vpg(&a, None, false, |s| s.vms.clear()).await?;
    wait_vpg_cli(&apis_a, "vpg-web", within, &mut seen, |g| {
        shown(g) == pair("Not Meeting SLA", "VPG has no VMs")
    })
    .await?;

    eprintln!("site a showed: {seen:?}");
    // The status beside a sync follows the SLA figures; the substatus names the sync.
    for sync in ["Delta Syncing", "Volume Initial Sync", "Syncing"] {
        assert!(
            seen.iter().any(|s| s.1 == sync),
            "{sync} never shown: {seen:?}"
        );
    }
    for want in [
        pair("Initializing", "Creating VPG"),
        pair("Initializing", "Initial Sync"),
        pair("Meeting SLA", "—"),
        pair("Not Meeting SLA", "Site disconnection. No checkpoints"),
        pair("Not Meeting SLA", "Error"),
        pair("Not Meeting SLA", "Delta Syncing"),
        pair("Not Meeting SLA", "VPG has no VMs"),
    ] {
        assert!(seen.contains(&want), "{want:?} never shown: {seen:?}");
    }
    lab.down().await;
    Ok(())
}

/// Waits until an event of `code` whose description contains every one of `words` is
/// listed at `ch`.
async fn event_saying(ch: &Channel, code: &str, words: &[&str]) -> Result<v1::Event> {
    let start = Instant::now();
    loop {
        let list = events(ch, code).await?;
        if let Some(e) = list
            .iter()
            .find(|e| words.iter().all(|w| e.description.contains(w)))
        {
            return Ok(e.clone());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("no {code} event saying {words:?}: {list:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes a named checkpoint of `vpg-web` (nothing writing), waits until it is usable at
/// site b, and compares the point-in-time image of each (controller, unit) volume of `vm`
/// (on host 0 of both sites) with its source image at site a, with `qemu-img compare`.
async fn checkpoint_matches_source(
    lab: &Lab,
    a: &Channel,
    b: &Channel,
    vm: &str,
    volumes: &[(u32, u32)],
) -> Result<()> {
    let named = vpgs(a)
        .add_checkpoint(v1::AddCheckpointRequest {
            vpg_ids: vec!["vpg-web".into()],
            name: format!("check-{vm}"),
            ..Default::default()
        })
        .await?
        .into_inner()
        .checkpoints[0]
        .id;
    let start = Instant::now();
    while !checkpoints(b, "vpg-web")
        .await?
        .iter()
        .any(|c| c.id == named && c.usable)
    {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("checkpoint {named} never usable");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovery = &lab.vras[1][0];
    let mut control = VraControlClient::new(recovery.control_channel().await?);
    for &(controller, unit) in volumes {
        let source = lab
            .dir
            .join(&lab.site_names[0])
            .join(format!("ds-0/{vm}/c{controller}u{unit}.img"));
        let export = control
            .open_export(v1::OpenExportRequest {
                vpg_id: "vpg-web".into(),
                vm_id: vm.into(),
                volume_id: controller * 15 + unit,
                checkpoint_id: named,
                writable: false,
            })
            .await?
            .into_inner()
            .export_name;
        let uri = tandem_nbd::endpoint_uri(&recovery.nbd_socket, &export);
        let source_arg = source.display().to_string();
        let (code, out) = tandem_testkit::yardstick::run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &source_arg, &uri],
        )?;
        control
            .close_export(v1::CloseExportRequest {
                export_name: export,
            })
            .await?;
        if code != 0 {
            bail!("{vm} c{controller}u{unit} at checkpoint {named}: {out}");
        }
    }
    Ok(())
}

/// Changes VM `id`'s inventory record at site a (the hypervisor's view of it).
async fn update_vm(a: &Channel, id: &str, change: impl FnOnce(&mut v1::Vm)) -> Result<()> {
    let mut vm = VmServiceClient::new(a.clone())
        .get_vm(v1::GetRequest { id: id.into() })
        .await?
        .into_inner();
    change(&mut vm);
    VmServiceClient::new(a.clone()).update_vm(vm).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_added_grown_and_removed_in_the_inventory_reach_the_mirror() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Protected {
        mut lab,
        a,
        b,
        apis_a,
        levelled,
        ..
    } = protect(dir.path()).await?;
    let ds = |site: usize| format!("{}-ds-0", lab.site_names[site]);
    let provisioned = |g: &v1::Vpg| g.status.as_ref().map_or(0, |s| s.provisioned_bytes);

    // A protected volume can grow, never shrink: the replica holds data past the new end.
    let shrink = update_vm(&a, "vm-2", |vm| vm.volumes[0].size_bytes = 16 * MIB).await;
    let err = shrink.expect_err("a protected volume shrank");
    let status = err
        .downcast_ref::<tonic::Status>()
        .context("not a status")?;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("not shrink"), "{status:?}");

    // vm-0 (host 0) gets a second volume and its first grows by 8 MiB, in the inventory
    // alone: the VPG follows at a new generation, syncing the new and grown parts only.
    let changed_at = tandem_now_ms();
    update_vm(&a, "vm-0", |vm| {
        vm.volumes[0].size_bytes = 40 * MIB;
        vm.volumes.push(v1::Volume {
            path: String::new(),
            controller: 0,
            unit: 1,
            size_bytes: 8 * MIB,
            datastore_id: ds(0),
        });
    })
    .await?;
    let e = event_saying(&a, "EV0007", &["vm-0", "c0u1 added", "c0u0 resized"]).await?;
    eprintln!("{}", e.description);
    wait_partial_sync(&lab, changed_at, v1::VraSyncKind::VolumeInitial).await?;
    let mut seen = Vec::new();
    let g = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(60),
        &mut seen,
        |g| shown(g).0 == "Meeting SLA" && g.generation == levelled.generation + 1,
    )
    .await?;
    assert_eq!(provisioned(&g), provisioned(&levelled) + 16 * MIB);
    eprintln!("after the inventory change: {seen:?}");

    // Data written to the new volume and to the grown tail is in a checkpoint's image at
    // the recovery site, byte for byte (qemu-io writes, qemu-img compares).
    let nbd = lab.vras[0][0].nbd_socket.clone();
    for (export, write) in [
        ("vm-0/1", "write -P 0x5a 1M 2M"),
        ("vm-0/0", "write -P 0xa5 36M 1M"),
    ] {
        let uri = tandem_nbd::endpoint_uri(&nbd, export);
        let (code, out) =
            tandem_testkit::yardstick::run("qemu-io", &["-f", "raw", "-c", write, &uri])?;
        assert!(code == 0 && !out.contains("error"), "qemu-io {uri}: {out}");
    }
    checkpoint_matches_source(&lab, &a, &b, "vm-0", &[(0, 0), (0, 1)]).await?;

    // The new volume removed from the VM: the VPG follows and its replica goes with it.
    let replica = lab
        .dir
        .join(&lab.site_names[1])
        .join("ds-0/vpg-web/vm-0/c0u1.replica");
    assert_eq!(std::fs::metadata(&replica)?.len(), 8 * MIB);
    update_vm(&a, "vm-0", |vm| vm.volumes.retain(|v| v.unit != 1)).await?;
    event_saying(&a, "EV0007", &["vm-0", "c0u1 removed"]).await?;
    let g = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(30),
        &mut seen,
        |g| shown(g).0 == "Meeting SLA" && g.generation == levelled.generation + 2,
    )
    .await?;
    assert_eq!(provisioned(&g), provisioned(&levelled) + 8 * MIB);
    let start = Instant::now();
    while replica.exists() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("the removed volume's replica is still there");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A grown volume the recovery datastore has no room for: the recovery site refuses
    // the edit, the VM shows as not protected (with the reason) while the VPG retries;
    // once the operator gives the datastore room, the VPG follows and meets its SLA.
    let mut datastores = DatastoreServiceClient::new(b.clone());
    let ds_b = datastores
        .get_datastore(v1::GetRequest { id: ds(1) })
        .await?
        .into_inner();
    let committed = datastores
        .update_datastore(v1::Datastore {
            capacity_bytes: 1,
            ..ds_b.clone()
        })
        .await
        .expect_err("a datastore smaller than what it holds");
    let used: u64 = committed
        .message()
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .context("no byte count in the refusal")?;
    datastores
        .update_datastore(v1::Datastore {
            capacity_bytes: used,
            ..ds_b.clone()
        })
        .await?;
    update_vm(&a, "vm-2", |vm| vm.volumes[0].size_bytes += 8 * MIB).await?;
    let g = wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(30),
        &mut seen,
        |g| shown(g) == pair("Not Meeting SLA", "VM not protected"),
    )
    .await?;
    let problems = g.status.unwrap_or_default().problems;
    assert!(
        problems
            .iter()
            .any(|p| p.contains("vm-2") && p.contains("no room")),
        "{problems:?}"
    );
    datastores.update_datastore(ds_b).await?;
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(40),
        &mut seen,
        |g| shown(g) == pair("Meeting SLA", "—"),
    )
    .await?;
    eprintln!("inventory changes: {seen:?}");
    lab.down().await;
    Ok(())
}
