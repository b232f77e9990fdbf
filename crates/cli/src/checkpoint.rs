//! `tandem checkpoint`: listing checkpoints and taking named ones (with quiesce hooks).

use crate::output::{Format, print};
use anyhow::{Result, bail};
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::{vm_service_client::VmServiceClient, vpg_service_client::VpgServiceClient};

#[derive(Subcommand, Debug)]
pub(crate) enum CheckpointCmd {
    /// Takes a named checkpoint in one or several VPGs (crash consistency per VPG). With
    /// --vm and --quiesce, an application-consistent one: runs the quiesce command, takes
    /// the checkpoint, then runs --release (also when the checkpoint fails).
    Add {
        /// VPG ids (comma-separated); with --vm, the VM's VPG.
        #[arg(long = "vpg", value_delimiter = ',')]
        vpgs: Vec<String>,
        #[arg(long)]
        name: String,
        /// The VM the checkpoint is application-consistent for.
        #[arg(long)]
        vm: Option<String>,
        /// Shell command that quiesces the application (run before the checkpoint).
        #[arg(long, requires = "vm")]
        quiesce: Option<String>,
        /// Shell command that releases it (run after the checkpoint, whatever happened).
        #[arg(long, requires = "quiesce")]
        release: Option<String>,
    },
    /// The checkpoints of a VPG, newest first, from the recovery site's journals.
    List {
        vpg: String,
        /// Only named (manual and application-consistent) checkpoints.
        #[arg(long)]
        named: bool,
        /// Only this kind.
        #[arg(long, value_enum)]
        kind: Option<CheckpointKindArg>,
        /// Only checkpoints stamped at or after / before these Unix milliseconds.
        #[arg(long, default_value_t = 0)]
        from_ms: u64,
        #[arg(long, default_value_t = 0)]
        to_ms: u64,
        /// Page size (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// From a previous page's next_page_token.
        #[arg(long, default_value = "")]
        page_token: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum CheckpointKindArg {
    Automatic,
    Manual,
    ApplicationConsistent,
}

pub(crate) fn checkpoint_rows(cps: &[v1::Checkpoint]) -> Vec<Vec<String>> {
    cps.iter()
        .map(|c| {
            let kind = match v1::CheckpointKind::try_from(c.kind) {
                Ok(v1::CheckpointKind::Automatic) => "automatic",
                Ok(v1::CheckpointKind::Manual) => "manual",
                Ok(v1::CheckpointKind::ApplicationConsistent) => "application-consistent",
                _ => "-",
            };
            vec![
                c.id.to_string(),
                c.timestamp_ms.to_string(),
                kind.into(),
                c.name.clone(),
                c.vm_id.clone(),
                if c.usable { "yes" } else { "no" }.into(),
            ]
        })
        .collect()
}

pub(crate) const CHECKPOINT_HEAD: [&str; 6] =
    ["ID", "TIMESTAMP MS", "KIND", "NAME", "VM", "USABLE"];

/// Runs an operator's quiesce or release command through the shell.
pub(crate) async fn run_hook(what: &str, cmd: &str) -> Result<()> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .await?;
    if !status.success() {
        bail!("{what} command {cmd:?} failed: {status}");
    }
    Ok(())
}

pub(crate) async fn run(ch: Channel, fmt: Format, c: CheckpointCmd) -> Result<()> {
    let mut cl = VpgServiceClient::new(ch.clone());
    match c {
        CheckpointCmd::Add {
            mut vpgs,
            name,
            vm,
            quiesce,
            release,
        } => {
            let kind = if vm.is_some() {
                v1::CheckpointKind::ApplicationConsistent
            } else {
                v1::CheckpointKind::Manual
            };
            if let Some(vm) = &vm
                && vpgs.is_empty()
            {
                let v = VmServiceClient::new(ch)
                    .get_vm(v1::GetRequest { id: vm.clone() })
                    .await?
                    .into_inner();
                if v.vpg_id.is_empty() {
                    bail!("VM {vm} is not protected by any VPG");
                }
                vpgs.push(v.vpg_id);
            }
            if let Some(q) = &quiesce {
                run_hook("quiesce", q).await?;
            }
            let taken = cl
                .add_checkpoint(v1::AddCheckpointRequest {
                    vpg_ids: vpgs,
                    name,
                    kind: kind as i32,
                    vm_id: vm.unwrap_or_default(),
                })
                .await;
            // The application is released whatever happened to the checkpoint.
            let released = match &release {
                Some(r) => run_hook("release", r).await,
                None => Ok(()),
            };
            let taken = taken?.into_inner();
            released?;
            print(
                fmt,
                &taken,
                &CHECKPOINT_HEAD,
                checkpoint_rows(&taken.checkpoints),
            );
        }
        CheckpointCmd::List {
            vpg,
            named,
            kind,
            from_ms,
            to_ms,
            limit,
            page_token,
        } => {
            let kind = match kind {
                None => v1::CheckpointKind::Unspecified,
                Some(CheckpointKindArg::Automatic) => v1::CheckpointKind::Automatic,
                Some(CheckpointKindArg::Manual) => v1::CheckpointKind::Manual,
                Some(CheckpointKindArg::ApplicationConsistent) => {
                    v1::CheckpointKind::ApplicationConsistent
                }
            };
            let r = cl
                .list_checkpoints(v1::ListCheckpointsQuery {
                    vpg_id: vpg,
                    from_ms,
                    to_ms,
                    named_only: named,
                    kind: kind as i32,
                    page_size: limit,
                    page_token,
                })
                .await?
                .into_inner();
            print(fmt, &r, &CHECKPOINT_HEAD, checkpoint_rows(&r.checkpoints));
            if fmt == Format::Table && !r.next_page_token.is_empty() {
                println!(
                    "{} in all; next page: --page-token {}",
                    r.total, r.next_page_token
                );
            }
        }
    }
    Ok(())
}
