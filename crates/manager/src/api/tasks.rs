//! The task service: operations with their progress and outcome.

use tandem_core::error::Violations;
use tandem_core::ids::VpgId;
use tandem_core::recovery::{RecoveryIntent, TestVerdict};
use tandem_core::tasks::{Task, TaskState};
use tandem_proto::v1::{self, task_service_server::TaskService};
use tonic::{Request, Response, Status};

use super::bad;
use crate::error::ApiError;
use crate::recovery::TaskInput;
use crate::site::SiteManager;

pub struct TaskApi(pub SiteManager);

const DEFAULT_TASKS: usize = 100;
const MAX_TASKS: usize = 1000;

fn to_proto(t: Task) -> v1::Task {
    v1::Task {
        id: t.id,
        kind: t.kind.name().to_string(),
        vpg_id: t.vpg.map(|g| g.to_string()).unwrap_or_default(),
        state: match t.state {
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
        }
        .to_string(),
        progress_percent: u32::from(t.progress),
        message: t.message,
        started_ms: t.started_ms,
        ended_ms: t.ended_ms.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn list_tasks(
        &self,
        r: Request<v1::ListTasksQuery>,
    ) -> Result<Response<v1::TaskList>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        let vpg = if r.vpg_id.is_empty() {
            None
        } else {
            v.absorb(VpgId::parse("vpg_id", &r.vpg_id))
        };
        v.check(
            r.limit as usize <= MAX_TASKS,
            "limit",
            format!("at most {MAX_TASKS}"),
        );
        v.into_result().map_err(bad)?;
        let limit = match r.limit {
            0 => DEFAULT_TASKS,
            n => n as usize,
        };
        let tasks = self
            .0
            .tasks(vpg, r.running_only, limit)
            .await?
            .into_iter()
            .map(to_proto)
            .collect();
        Ok(Response::new(v1::TaskList { tasks }))
    }

    async fn task_input(
        &self,
        r: Request<v1::TaskInputRequest>,
    ) -> Result<Response<v1::Task>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        v.check(r.task_id != 0, "task_id", "must be set");
        let input = match v1::TaskInputKind::try_from(r.input) {
            Ok(v1::TaskInputKind::Commit) => Some(TaskInput::Recovery(RecoveryIntent::Commit)),
            Ok(v1::TaskInputKind::Rollback) => Some(TaskInput::Recovery(RecoveryIntent::Rollback)),
            Ok(v1::TaskInputKind::StopTest) => Some(TaskInput::StopTest(TestVerdict {
                passed: !r.failed,
                note: r.note,
            })),
            Ok(v1::TaskInputKind::Unspecified) | Err(_) => {
                v.add("input", "must be commit, rollback or stop_test");
                None
            }
        };
        if let Some(TaskInput::StopTest(verdict)) = &input {
            v.absorb(verdict.validate());
        }
        v.into_result().map_err(bad)?;
        let input = input.ok_or_else(|| ApiError::invalid("input"))?;
        Ok(Response::new(to_proto(
            self.0.task_input(r.task_id, input).await?,
        )))
    }

    async fn get_task(&self, r: Request<v1::GetTaskRequest>) -> Result<Response<v1::Task>, Status> {
        let id = r.into_inner().id;
        if id == 0 {
            return Err(ApiError::invalid("id: must be set").into());
        }
        Ok(Response::new(to_proto(self.0.task(id).await?)))
    }
}
