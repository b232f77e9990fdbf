//! `tandem task`: the site's tasks and their progress.

use crate::output::{Format, print};
use anyhow::{Result, bail};
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::task_service_client::TaskServiceClient;

#[derive(Subcommand, Debug)]
pub(crate) enum TaskCmd {
    List {
        #[arg(long)]
        vpg: Option<String>,
        #[arg(long)]
        running: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Follows one task until it ends; the exit status says whether it succeeded.
    Watch {
        id: u64,
        #[arg(long, default_value_t = 1)]
        interval: u64,
    },
    /// Gives a running task the operator's word: commit or rollback (a failover or move
    /// before commit), stop (a failover test, with --failed and --note).
    Input {
        id: u64,
        #[arg(value_parser = ["commit", "rollback", "stop"])]
        input: String,
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value = "")]
        note: String,
    },
}

pub(crate) fn task_rows(ts: &[v1::Task]) -> Vec<Vec<String>> {
    ts.iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.kind.clone(),
                t.vpg_id.clone(),
                t.state.clone(),
                format!("{}%", t.progress_percent),
                t.message.clone(),
            ]
        })
        .collect()
}

pub(crate) const TASK_HEADER: [&str; 6] = ["ID", "KIND", "VPG", "STATE", "PROGRESS", "MESSAGE"];

pub(crate) async fn run(ch: Channel, fmt: Format, c: TaskCmd) -> Result<()> {
    let mut cl = TaskServiceClient::new(ch);
    match c {
        TaskCmd::List {
            vpg,
            running,
            limit,
        } => {
            let r = cl
                .list_tasks(v1::ListTasksQuery {
                    vpg_id: vpg.unwrap_or_default(),
                    running_only: running,
                    limit,
                })
                .await?
                .into_inner();
            print(fmt, &r, &TASK_HEADER, task_rows(&r.tasks));
        }
        TaskCmd::Input {
            id,
            input,
            failed,
            note,
        } => {
            let input = match input.as_str() {
                "commit" => v1::TaskInputKind::Commit,
                "rollback" => v1::TaskInputKind::Rollback,
                _ => v1::TaskInputKind::StopTest,
            };
            let t = cl
                .task_input(v1::TaskInputRequest {
                    task_id: id,
                    input: input as i32,
                    failed,
                    note,
                })
                .await?
                .into_inner();
            print(fmt, &t, &TASK_HEADER, task_rows(std::slice::from_ref(&t)));
        }
        TaskCmd::Watch { id, interval } => loop {
            let t = cl.get_task(v1::GetTaskRequest { id }).await?.into_inner();
            print(fmt, &t, &TASK_HEADER, task_rows(std::slice::from_ref(&t)));
            match t.state.as_str() {
                "running" => {
                    tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))).await
                }
                "succeeded" => break,
                _ => bail!("task {id} failed: {}", t.message),
            }
        },
    }
    Ok(())
}
