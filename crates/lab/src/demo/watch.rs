//! Following protection as the managers run it: both sites' view of the VPG and the recovery site's checkpoint list, sampled while the steps run, and the images of listed checkpoints checked against the source.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tandem_nbd::NbdClient;
use tandem_proto::client::{ApiChannel as Channel, ApiConnector};
use tandem_proto::v1;
use tandem_proto::v1::{
    monitoring_service_client::MonitoringServiceClient,
    recovery_service_client::RecoveryServiceClient, task_service_client::TaskServiceClient,
    vpg_service_client::VpgServiceClient, vra_control_client::VraControlClient,
};
use tokio_util::sync::CancellationToken;

use crate::units::fmt_bytes;
use tandem_testkit::lab::Lab;
use tandem_testkit::workload::{History, ImageReader, Workload, check_final, check_image};

use super::options::*;
use super::setup::*;

/// The managers of one site, asked at whichever node answers (a dead one is skipped).
#[derive(Debug, Clone)]
pub(crate) struct Managers {
    pub(crate) site: String,
    pub(crate) channels: Vec<Channel>,
}

impl Managers {
    pub(crate) fn new(site: &str, endpoints: &[String]) -> Result<Self> {
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
    pub(crate) async fn ask<T, F, Fut>(&self, call: F) -> Result<T>
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

    pub(crate) async fn vpg(&self, id: &str) -> Result<v1::Vpg> {
        self.ask(|ch| async move {
            VpgServiceClient::new(ch)
                .get_vpg(v1::GetRequest { id: id.into() })
                .await
        })
        .await
    }

    /// The VPG's status as this site shows it: (status, substatus).
    pub(crate) async fn shown(&self, id: &str) -> Result<(String, String)> {
        let s = self.vpg(id).await?.status.unwrap_or_default();
        Ok((s.status, s.substatus))
    }

    /// The failovers of `vpg` that run here.
    pub(crate) async fn recoveries(&self, vpg: &str) -> Result<Vec<v1::RecoveryOperation>> {
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
    pub(crate) async fn wait_no_recovery(&self, vpg: &str, what: &str) -> Result<()> {
        until_some(what, PATIENCE, || async {
            self.recoveries(vpg).await.ok().filter(|o| o.is_empty())
        })
        .await
        .map(|_| ())
    }

    /// The failover tests of `vpg` that run here.
    pub(crate) async fn failover_tests(&self, vpg: &str) -> Result<Vec<v1::FailoverTest>> {
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
    pub(crate) async fn checkpoints(&self, vpg: &str, from_ms: u64) -> Result<Vec<v1::Checkpoint>> {
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

    pub(crate) async fn events(&self) -> Result<Vec<v1::Event>> {
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

    pub(crate) async fn tasks(&self) -> Result<Vec<v1::Task>> {
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
    pub(crate) async fn wait_shown(
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
pub(crate) struct VmAt {
    pub(crate) vm: String,
    pub(crate) prot_nbd: String,
    pub(crate) rec_host: String,
    pub(crate) rec_control: String,
    /// The lab's harness certificate for the recovery site's VRAs.
    pub(crate) rec_harness: Option<tandem_tls::TlsConfig>,
    pub(crate) rec_nbd: String,
}

/// One look at what both sites show.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) at: Instant,
    pub(crate) wall_ms: u64,
    pub(crate) a: Option<v1::VpgStatus>,
    pub(crate) b: Option<v1::VpgStatus>,
}

/// A checkpoint the recovery site listed, and when the demo first saw it usable.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub(crate) cp: v1::Checkpoint,
    pub(crate) usable_at_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Record {
    pub(crate) samples: Vec<Sample>,
    pub(crate) listed: std::collections::BTreeMap<u64, Listed>,
}

/// What the monitor and the steps share.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) vpg: String,
    pub(crate) a: Managers,
    pub(crate) b: Managers,
    pub(crate) vms: Vec<VmAt>,
    pub(crate) interval: Duration,
    pub(crate) record: Mutex<Record>,
}

impl Ctx {
    pub(crate) fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Usable checkpoints listed so far stamped in `[from_ms, to_ms]`, oldest first.
    pub(crate) fn usable(&self, from_ms: u64, to_ms: u64) -> Vec<Listed> {
        self.record()
            .listed
            .values()
            .filter(|l| l.cp.usable && l.cp.timestamp_ms >= from_ms && l.cp.timestamp_ms <= to_ms)
            .cloned()
            .collect()
    }

    /// The first usable checkpoint stamped after `after_ms`, as the recovery site lists it.
    pub(crate) async fn usable_after(
        &self,
        after_ms: u64,
        within: Duration,
    ) -> Result<v1::Checkpoint> {
        until_some("a usable checkpoint", within, || async {
            let cps = self.b.checkpoints(&self.vpg, after_ms + 1).await.ok()?;
            cps.into_iter()
                .filter(|c| c.usable && c.timestamp_ms > after_ms)
                .min_by_key(|c| c.timestamp_ms)
        })
        .await
    }

    /// The newest usable checkpoint the recovery site lists.
    pub(crate) async fn latest_usable(&self) -> Result<v1::Checkpoint> {
        self.b
            .checkpoints(&self.vpg, 0)
            .await?
            .into_iter()
            .find(|c| c.usable)
            .context("no usable checkpoint listed")
    }
}

/// Samples both sites' status of the VPG and the recovery site's checkpoint list.
pub(crate) async fn monitor(ctx: Arc<Ctx>, cancel: CancellationToken) {
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
pub(crate) fn push_new(lines: &mut Vec<String>, line: String) {
    if lines.last() != Some(&line) {
        lines.push(line);
    }
}

/// Figures of the record between two instants.
#[derive(Debug, Default)]
pub(crate) struct Window {
    pub(crate) listed: usize,
    pub(crate) usable_after_ms: Vec<u64>,
    pub(crate) rpo_ms: Vec<u64>,
    /// (status / substatus) in the order site-a and site-b showed them.
    pub(crate) shown: Vec<String>,
    pub(crate) shown_b: Vec<String>,
}

impl Window {
    pub(crate) fn of(ctx: &Ctx, from: Instant, to: Instant) -> Self {
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

    pub(crate) fn usable_figures(&self) -> String {
        match self.usable_after_ms.last() {
            Some(max) => format!(
                "listed usable after p50 {} ms, max {max} ms",
                self.usable_after_ms[self.usable_after_ms.len() / 2]
            ),
            None => "none listed usable".into(),
        }
    }

    pub(crate) fn rpo_max(&self) -> Option<Duration> {
        self.rpo_ms.last().map(|&m| Duration::from_millis(m))
    }

    pub(crate) fn rpo_figures(&self) -> String {
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
pub(crate) struct Run {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) workload: Option<Workload>,
    /// The workload's whole history, once stopped.
    pub(crate) history: Option<History>,
    pub(crate) monitor: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Run {
    pub(crate) fn workload(&self) -> Result<&Workload> {
        self.workload
            .as_ref()
            .context("the workload is not running")
    }

    /// Opens the point-in-time images of listed checkpoint `cp` at the recovery VRAs and
    /// checks them: against the window of its timestamp while the workload runs, against
    /// every acknowledged write after it stopped (`history` given).
    pub(crate) async fn check(
        &self,
        cp: &v1::Checkpoint,
        stopped: Option<&History>,
    ) -> Result<String> {
        let ctx = &self.ctx;
        let t = Instant::now();
        let mut clients = Vec::new();
        let mut exports = Vec::new();
        let opened = async {
            for v in &ctx.vms {
                let mut c = VraControlClient::new(tandem_testkit::process::vra_control(
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
    pub(crate) async fn check_at(
        &self,
        cp: &v1::Checkpoint,
        images: &[&dyn ImageReader],
    ) -> Result<(tandem_testkit::workload::CheckReport, String)> {
        let workload = self.workload()?;
        let window = until_some("the checkpoint's window", PATIENCE, || async {
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

    pub(crate) fn start_monitor(&mut self) {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(monitor(self.ctx.clone(), cancel.clone()));
        self.monitor = Some((cancel, task));
    }

    /// Stops the monitor and the workload, if they run.
    pub(crate) async fn end(&mut self) {
        self.stop_monitor().await;
        if let Some(w) = self.workload.take() {
            drop(w.stop().await);
        }
    }

    pub(crate) async fn stop_monitor(&mut self) {
        if let Some((cancel, task)) = self.monitor.take() {
            cancel.cancel();
            let _ = task.await;
        }
    }
}

/// The VPG's context and an idle run: VM `i` on host `i % HOSTS` at both sites.
pub(crate) fn new_run(lab: &Lab, opts: &DemoOptions, protection: &Protection) -> Result<Run> {
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
