//! The recovery controller, on the leader of the site that runs a recovery operation.
//! Today it drives failover tests: it opens a writable scratch image of every volume at
//! the test's checkpoint on the recovery VRA of the volume's host, opens again an image
//! that a restarted VRA lost, and once the operator stops the test closes them all and
//! ends the test (result, task and event in one command). Every step is idempotent and
//! starts from the replicated state, so a new leader repeats the current one.

use std::time::Duration;

use tandem_core::ids::{HostId, VmId};
use tandem_core::protection::recovery_plans;
use tandem_core::recovery::{FailoverTest, TestProgress, TestStep, TestVolume};
use tandem_core::state::{Command, SiteState};
use tandem_proto::v1;
use tokio_util::sync::CancellationToken;

use super::reconcile::applied;
use super::{TICK, call_vra_status, every, vra_request};
use crate::site::{SiteManager, now_ms};

/// How long a stopping test waits for a VRA that cannot be reached before it ends without
/// closing that VRA's images (they are not persisted: they go when the VRA restarts).
pub const CLOSE_PATIENCE: Duration = Duration::from_secs(30);

/// Drives the site's recovery operations every tick and soon after each committed change
/// (a stop reaches the VRAs at once), until `cancel`.
pub async fn run(site: SiteManager, cancel: CancellationToken) {
    every(TICK, &cancel, Some(applied(&site, &cancel)), || async {
        if site.control().live.observed_any() {
            pass(&site).await;
        }
    })
    .await;
}

/// One pass over every running test.
async fn pass(site: &SiteManager) {
    // A linearizable read: a new leader acts on the committed state, never a stale one.
    let state = match site.node().read(|s| s.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "recovery: no state");
            return;
        }
    };
    for test in state.tests.values() {
        match test.step {
            TestStep::Starting | TestStep::Running => serve(site, &state, test).await,
            TestStep::Stopping => stop(site, &state, test).await,
        }
    }
}

/// A volume a test serves, and the VRA that serves it.
struct Wanted {
    vm: VmId,
    volume_id: u32,
    host: HostId,
    vra: String,
}

/// Every volume of every VM of the test's VPG, on the recovery host of its VM.
fn wanted(state: &SiteState, test: &FailoverTest) -> Result<Vec<Wanted>, String> {
    let vpg = state
        .vpgs
        .get(&test.vpg)
        .ok_or_else(|| format!("VPG {} is gone", test.vpg))?;
    let plans = recovery_plans(vpg, state).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for plan in plans {
        let host = state
            .hosts
            .get(&plan.host)
            .ok_or_else(|| format!("host {} is not in the inventory", plan.host))?;
        for vm in plan.vms {
            for v in vm.volumes {
                out.push(Wanted {
                    vm: vm.vm.clone(),
                    volume_id: v.volume_id,
                    host: plan.host.clone(),
                    vra: host.vra_address.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// Opens what the test does not serve yet (or no longer: a VRA that restarted lost its
/// images, and what the test VM wrote with them).
async fn serve(site: &SiteManager, state: &SiteState, test: &FailoverTest) {
    let wanted = match wanted(state, test) {
        Ok(w) => w,
        Err(e) => return progress(site, test, test.step, test.volumes.clone(), Some(e)).await,
    };
    let live = &site.control().live;
    let mut volumes = Vec::with_capacity(wanted.len());
    let mut errors = Vec::new();
    for w in wanted {
        let served = test
            .volumes
            .iter()
            .find(|v| v.vm == w.vm && v.volume_id == w.volume_id && v.host == w.host);
        if let Some(v) = served {
            let lost = live
                .vra(&w.host)
                .is_some_and(|o| o.vpgs.is_ok() && !o.exports.contains(&v.export_name));
            if !lost {
                volumes.push(v.clone());
                continue;
            }
            tracing::warn!(vpg = %test.vpg, export = %v.export_name, host = %w.host,
                "a test image is gone (its VRA restarted): opening it again, without what the test VM wrote");
        }
        let req = v1::OpenExportRequest {
            vpg_id: test.vpg.to_string(),
            vm_id: w.vm.to_string(),
            volume_id: w.volume_id,
            checkpoint_id: test.point.checkpoint_id,
            writable: true,
        };
        let opened = match site.control().vra(&w.vra) {
            Ok(mut c) => c
                .open_export(vra_request(req))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string()),
            Err(e) => Err(e.to_string()),
        };
        match opened {
            Ok(e) => volumes.push(TestVolume {
                vm: w.vm,
                volume_id: w.volume_id,
                host: w.host,
                export_name: e.export_name,
                nbd_address: e.nbd_address,
                size_bytes: e.size_bytes,
            }),
            Err(e) => errors.push(format!(
                "VM {} volume {} on host {}: {e}",
                w.vm, w.volume_id, w.host
            )),
        }
    }
    let step = if errors.is_empty() {
        TestStep::Running
    } else {
        test.step
    };
    let error = (!errors.is_empty()).then(|| format!("opening test images: {}", errors.join("; ")));
    if step == TestStep::Running && test.step == TestStep::Starting {
        tracing::info!(vpg = %test.vpg, volumes = volumes.len(), checkpoint = test.point.checkpoint_id,
            "failover test images served");
    }
    progress(site, test, step, volumes, error).await;
}

/// Records the test's progress when it changed.
async fn progress(
    site: &SiteManager,
    test: &FailoverTest,
    step: TestStep,
    volumes: Vec<TestVolume>,
    error: Option<String>,
) {
    if step == test.step && volumes == test.volumes && error == test.error {
        return;
    }
    let cmd = Command::ProgressFailoverTest {
        progress: TestProgress {
            vpg: test.vpg.clone(),
            task: test.task,
            step,
            volumes,
            error,
        },
    };
    if let Err(e) = site.node().propose(cmd).await {
        tracing::warn!(vpg = %test.vpg, error = %e, "failover test progress not recorded");
    }
}

/// Closes every image of a stopping test, then ends it. A VRA that cannot be reached for
/// [`CLOSE_PATIENCE`] after the stop is left behind, and named in the result.
async fn stop(site: &SiteManager, state: &SiteState, test: &FailoverTest) {
    let patience_over =
        now_ms().saturating_sub(test.stop_requested_ms) > CLOSE_PATIENCE.as_millis() as u64;
    let mut open = Vec::new();
    let mut left = Vec::new();
    for v in &test.volumes {
        let Some(host) = state.hosts.get(&v.host) else {
            continue;
        };
        let name = v.export_name.clone();
        let r = call_vra_status(site, &host.vra_address, |mut c| async move {
            c.close_export(vra_request(v1::CloseExportRequest { export_name: name }))
                .await
        })
        .await;
        match r {
            // Closed, or already gone (closed by an earlier pass, or lost with a restart).
            Ok(()) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(_) if patience_over => left.push(format!("{} on host {}", v.export_name, v.host)),
            Err(s) => open.push(format!(
                "{} on host {}: {}",
                v.export_name,
                v.host,
                s.message()
            )),
        }
    }
    if !open.is_empty() {
        let error = Some(format!("closing test images: {}", open.join("; ")));
        return progress(site, test, test.step, test.volumes.clone(), error).await;
    }
    let cmd = Command::EndFailoverTest {
        vpg: test.vpg.clone(),
        task: test.task,
        stopped_ms: now_ms(),
        left,
    };
    match site.node().propose(cmd).await {
        Ok(_) => tracing::info!(vpg = %test.vpg, task = test.task, "failover test ended"),
        Err(e) => tracing::warn!(vpg = %test.vpg, error = %e, "failover test end not recorded"),
    }
}
