//! `tandem failover-test` (start, stop and list failover tests) and `tandem failover`
//! (start, commit, roll back and list failovers), at the recovery site.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::recovery_service_client::RecoveryServiceClient;

use crate::output::{Format, bytes, print};

#[derive(Subcommand, Debug)]
pub enum FailoverTestCmd {
    /// Starts a failover test of each VPG, at the recovery site: every volume of its VMs
    /// is served at the checkpoint as a writable scratch image (test VMs use it) while
    /// protection and checkpoints go on. With --wait, answers once every image is served,
    /// listing their nbd:// URIs.
    Start {
        #[arg(required = true)]
        vpgs: Vec<String>,
        /// latest (default), latest-named, a checkpoint id, or a checkpoint name.
        #[arg(long, default_value = "latest")]
        checkpoint: String,
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Stops the tests: their images are closed (what the test VMs wrote is gone) and the
    /// result is kept, with the verdict and the note.
    Stop {
        #[arg(required = true)]
        vpgs: Vec<String>,
        /// The test failed (the default verdict is passed).
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// The running tests and their volumes (with nbd:// URIs).
    List { vpgs: Vec<String> },
}

#[derive(Subcommand, Debug)]
pub enum FailoverCmd {
    /// Failover: brings a VPG up at this (its recovery) site, working while the protected
    /// site is gone; its VMs' volumes are served before commit (nbd:// URIs listed), the
    /// journals and replicas left as they were, until commit or rollback. Move: the
    /// protected VMs are powered off and drained first and the VPG recovers to their last
    /// checkpoint, nothing lost (--checkpoint does not apply). With --wait, answers once the
    /// volumes are served.
    Start {
        vpg: String,
        /// latest (default), latest-named, a checkpoint id, or a checkpoint name.
        #[arg(long, default_value = "latest")]
        checkpoint: String,
        /// manual (default), auto-commit=SECS or auto-rollback=SECS.
        #[arg(long, default_value = "manual")]
        commit_policy: String,
        /// Failover only: no (default; the protected site may be gone), yes (power the
        /// protected VMs off and drain them first; with --checkpoint latest, to a last
        /// checkpoint taken after) or force (power them off without waiting).
        #[arg(long, default_value = "no", value_parser = ["no", "yes", "force"])]
        shutdown: String,
        /// On commit, protect the recovered VMs back towards the old protected site, whose
        /// original disks take only a delta sync: default (a move: yes; a failover: the
        /// VPG's reverse-protection setting), yes or no.
        #[arg(long, default_value = "default", value_parser = ["default", "yes", "no"])]
        reverse: String,
        #[arg(long)]
        wait: bool,
        /// --wait, printing each step (and why it waits) as it goes.
        #[arg(long)]
        watch: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Commits the failover: the VMs keep running while the journals are promoted behind
    /// them; the VPG ends Recovered. With --wait, answers once the volumes are live.
    Commit {
        vpg: String,
        #[arg(long)]
        wait: bool,
        /// --wait, printing each step as it goes.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Rolls the failover back: everything as it was before it; protection resumes.
    Rollback {
        vpg: String,
        #[arg(long)]
        wait: bool,
        /// --wait, printing each step as it goes.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// The failovers running at this site and their volumes (with nbd:// URIs).
    List { vpgs: Vec<String> },
    /// Protects a VPG recovered here without reverse protection back towards its old
    /// protected site: that site's original disks take a delta sync, which overwrites what
    /// its VMs wrote there after the recovery (`tandem vpg get` there lists it first).
    ProtectBack {
        vpg: String,
        /// A resource pool of the old protected site for the VMs (default: the VPG's
        /// reverse_pool_id).
        #[arg(long)]
        reverse_pool: Option<String>,
    },
}

/// The commit policy a command line names.
fn commit_policy(s: &str) -> Result<(v1::CommitPolicyKind, u64)> {
    let secs = |v: &str| -> Result<u64> {
        v.parse()
            .map_err(|_| anyhow::anyhow!("--commit-policy: {v:?} is not a number of seconds"))
    };
    Ok(match s.split_once('=') {
        None if s == "manual" => (v1::CommitPolicyKind::Manual, 0),
        Some(("auto-commit", v)) => (v1::CommitPolicyKind::AutoCommit, secs(v)?),
        Some(("auto-rollback", v)) => (v1::CommitPolicyKind::AutoRollback, secs(v)?),
        _ => bail!("--commit-policy: manual, auto-commit=SECS or auto-rollback=SECS"),
    })
}

const OP_HEAD: [&str; 8] = [
    "VPG",
    "KIND",
    "STEP",
    "CHECKPOINT",
    "VM",
    "VOLUME",
    "SIZE",
    "NBD URI",
];

fn op_rows(ops: &[v1::RecoveryOperation]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for o in ops {
        let cp = checkpoint_label(o.checkpoint_id, &o.checkpoint_name);
        let step = step_label(&o.step, &o.error);
        let head = [o.vpg_id.clone(), o.kind.clone(), step, cp];
        if o.volumes.is_empty() {
            out.push(head.to_vec());
        }
        for v in &o.volumes {
            let mut row = head.to_vec();
            row.extend([
                v.vm_id.clone(),
                v.volume_id.to_string(),
                bytes(v.size_bytes),
                v.nbd_uri.clone(),
            ]);
            out.push(row);
        }
    }
    out
}

fn checkpoint_label(id: u64, name: &str) -> String {
    if name.is_empty() {
        id.to_string()
    } else {
        format!("{id} ({name})")
    }
}

fn step_label(step: &str, error: &str) -> String {
    if error.is_empty() {
        step.to_string()
    } else {
        format!("{step}: {error}")
    }
}

/// Polls the VPG's failover until `done` says so (None: it ended), or fails after
/// `timeout` seconds.
async fn wait_op(
    cl: &mut RecoveryServiceClient<Channel>,
    vpg: &str,
    timeout: u64,
    watch: bool,
    done: impl Fn(Option<&v1::RecoveryOperation>) -> bool,
) -> Result<Option<v1::RecoveryOperation>> {
    let since = Instant::now();
    let mut shown = String::new();
    loop {
        let now = cl
            .list_recoveries(v1::ListRecoveriesRequest {
                vpg_ids: vec![vpg.to_string()],
            })
            .await?
            .into_inner()
            .operations
            .pop();
        let label = now
            .as_ref()
            .map_or("ended".into(), |o| step_label(&o.step, &o.error));
        if watch && label != shown {
            eprintln!("{:6.1}s  {vpg}: {label}", since.elapsed().as_secs_f64());
            shown = label;
        }
        if done(now.as_ref()) {
            return Ok(now);
        }
        if since.elapsed() > Duration::from_secs(timeout) {
            let why = now.map_or("ended".into(), |o| step_label(&o.step, &o.error));
            bail!("the failover of {vpg} did not get there within {timeout}s: {why}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Failover, or move: the same commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Failover,
    Move,
}

pub async fn failover(ch: Channel, fmt: Format, kind: Kind, c: FailoverCmd) -> Result<()> {
    let mut cl = RecoveryServiceClient::new(ch);
    let show = |ops: Vec<v1::RecoveryOperation>| {
        let list = v1::RecoveryOperations { operations: ops };
        print(fmt, &list, &OP_HEAD, op_rows(&list.operations));
    };
    let commit = matches!(c, FailoverCmd::Commit { .. });
    match c {
        FailoverCmd::Start {
            vpg,
            checkpoint,
            commit_policy: policy,
            shutdown,
            reverse,
            wait,
            watch,
            timeout,
        } => {
            let (policy, after) = commit_policy(&policy)?;
            let reverse = match reverse.as_str() {
                "yes" => v1::ReverseProtection::Yes,
                "no" => v1::ReverseProtection::No,
                _ => v1::ReverseProtection::Default,
            } as i32;
            let op = match kind {
                Kind::Failover => cl
                    .start_failover(v1::StartFailoverRequest {
                        vpg_id: vpg.clone(),
                        checkpoint: Some(choice(&checkpoint)),
                        commit_policy: policy as i32,
                        commit_after_secs: after,
                        shutdown: match shutdown.as_str() {
                            "yes" => v1::ShutdownVms::Yes,
                            "force" => v1::ShutdownVms::Force,
                            _ => v1::ShutdownVms::No,
                        } as i32,
                        reverse,
                    })
                    .await?
                    .into_inner(),
                Kind::Move if shutdown != "no" => {
                    bail!(
                        "a move always powers the protected VMs off and drains them: no --shutdown"
                    )
                }
                Kind::Move if checkpoint != "latest" => {
                    bail!(
                        "a move recovers to the protected site's last checkpoint: no --checkpoint"
                    )
                }
                Kind::Move => cl
                    .start_move(v1::StartMoveRequest {
                        vpg_id: vpg.clone(),
                        commit_policy: policy as i32,
                        commit_after_secs: after,
                        reverse,
                    })
                    .await?
                    .into_inner(),
            };
            if !wait && !watch {
                show(vec![op]);
                return Ok(());
            }
            let now = wait_op(&mut cl, &vpg, timeout, watch, |o| {
                o.is_none_or(|o| o.step != "opening" && o.step != "preparing the source")
            })
            .await?;
            show(now.into_iter().collect());
        }
        FailoverCmd::Commit {
            vpg,
            wait,
            watch,
            timeout,
        }
        | FailoverCmd::Rollback {
            vpg,
            wait,
            watch,
            timeout,
        } => {
            let r = v1::RecoveryRef {
                vpg_id: vpg.clone(),
            };
            let op = if commit {
                cl.commit_recovery(r).await?
            } else {
                cl.rollback_recovery(r).await?
            }
            .into_inner();
            if !wait && !watch {
                show(vec![op]);
                return Ok(());
            }
            wait_op(&mut cl, &vpg, timeout, watch, |o| o.is_none()).await?;
            println!(
                "{vpg}: {}",
                if commit {
                    "committed; the VMs run at this site"
                } else {
                    "rolled back; protection resumes"
                }
            );
        }
        FailoverCmd::List { vpgs } => {
            let r = cl
                .list_recoveries(v1::ListRecoveriesRequest { vpg_ids: vpgs })
                .await?
                .into_inner();
            show(r.operations);
        }
        FailoverCmd::ProtectBack { vpg, reverse_pool } => {
            let g = cl
                .protect_back(v1::ProtectBackRequest {
                    vpg_id: vpg,
                    reverse_pool_id: reverse_pool.unwrap_or_default(),
                })
                .await?
                .into_inner();
            crate::vpg::vpg_detail(fmt, &g);
        }
    }
    Ok(())
}

/// The checkpoint a command line names.
fn choice(s: &str) -> v1::CheckpointChoice {
    use v1::checkpoint_choice::Choice;
    let choice = match s {
        "latest" => Choice::Latest(true),
        "latest-named" => Choice::LatestNamed(true),
        _ => match s.parse::<u64>() {
            Ok(id) => Choice::Id(id),
            Err(_) => Choice::Name(s.to_string()),
        },
    };
    v1::CheckpointChoice {
        choice: Some(choice),
    }
}

const HEAD: [&str; 7] = [
    "VPG",
    "STEP",
    "CHECKPOINT",
    "VM",
    "VOLUME",
    "SIZE",
    "NBD URI",
];

fn rows(tests: &[v1::FailoverTest]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for t in tests {
        let cp = checkpoint_label(t.checkpoint_id, &t.checkpoint_name);
        let step = step_label(&t.step, &t.error);
        if t.volumes.is_empty() {
            out.push(vec![t.vpg_id.clone(), step.clone(), cp.clone()]);
        }
        for v in &t.volumes {
            out.push(vec![
                t.vpg_id.clone(),
                step.clone(),
                cp.clone(),
                v.vm_id.clone(),
                v.volume_id.to_string(),
                bytes(v.size_bytes),
                v.nbd_uri.clone(),
            ]);
        }
    }
    out
}

pub async fn failover_test(ch: Channel, fmt: Format, c: FailoverTestCmd) -> Result<()> {
    let mut cl = RecoveryServiceClient::new(ch);
    match c {
        FailoverTestCmd::Start {
            vpgs,
            checkpoint,
            wait,
            timeout,
        } => {
            let started = cl
                .start_failover_test(v1::StartFailoverTestRequest {
                    vpg_ids: vpgs.clone(),
                    checkpoint: Some(choice(&checkpoint)),
                })
                .await?
                .into_inner();
            if !wait {
                print(fmt, &started, &HEAD, rows(&started.tests));
                return Ok(());
            }
            let since = Instant::now();
            loop {
                let now = cl
                    .list_failover_tests(v1::ListFailoverTestsRequest {
                        vpg_ids: vpgs.clone(),
                    })
                    .await?
                    .into_inner();
                if now.tests.len() == vpgs.len() && now.tests.iter().all(|t| t.step == "running") {
                    print(fmt, &now, &HEAD, rows(&now.tests));
                    return Ok(());
                }
                if since.elapsed() > Duration::from_secs(timeout) {
                    let why: Vec<String> = now
                        .tests
                        .iter()
                        .map(|t| format!("{} {} {}", t.vpg_id, t.step, t.error))
                        .collect();
                    bail!(
                        "the tests did not start within {timeout}s: {}",
                        why.join("; ")
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        FailoverTestCmd::Stop { vpgs, failed, note } => {
            cl.stop_failover_test(v1::StopFailoverTestRequest {
                vpg_ids: vpgs,
                failed,
                note,
            })
            .await?;
        }
        FailoverTestCmd::List { vpgs } => {
            let r = cl
                .list_failover_tests(v1::ListFailoverTestsRequest { vpg_ids: vpgs })
                .await?
                .into_inner();
            print(fmt, &r, &HEAD, rows(&r.tests));
        }
    }
    Ok(())
}
