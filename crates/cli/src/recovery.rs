//! `tandem failover-test`: start, stop and list failover tests (at the recovery site).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Subcommand;
use tandem_proto::v1;
use tandem_proto::v1::recovery_service_client::RecoveryServiceClient;
use tonic::transport::Channel;

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
        let cp = if t.checkpoint_name.is_empty() {
            t.checkpoint_id.to_string()
        } else {
            format!("{} ({})", t.checkpoint_id, t.checkpoint_name)
        };
        let step = if t.error.is_empty() {
            t.step.clone()
        } else {
            format!("{}: {}", t.step, t.error)
        };
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
