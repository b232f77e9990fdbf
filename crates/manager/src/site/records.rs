//! Events, alerts and tasks as the operator API shows them, and recording them.

use super::*;

impl SiteManager {
    /// Events matching `q`, oldest first: after `after_id`, or the newest `limit`.
    pub async fn events(&self, q: EventQuery) -> ApiResult<Vec<tandem_core::events::Event>> {
        self.node
            .read(move |s| {
                let matching = |e: &&tandem_core::events::Event| {
                    q.vpg.as_ref().is_none_or(|v| e.vpg.as_ref() == Some(v))
                        && q.code.is_none_or(|c| e.code == c)
                };
                let mut out: Vec<_> = if q.after_id > 0 {
                    s.events
                        .iter()
                        .filter(|e| e.id > q.after_id)
                        .filter(matching)
                        .take(q.limit)
                        .cloned()
                        .collect()
                } else {
                    s.events
                        .iter()
                        .rev()
                        .filter(matching)
                        .take(q.limit)
                        .cloned()
                        .collect()
                };
                out.sort_by_key(|e| e.id);
                out
            })
            .await
    }

    /// The active alerts (of one VPG, or all), from the leader's status snapshot.
    pub async fn alerts(&self, vpg: Option<VpgId>) -> ApiResult<Vec<control::ActiveAlert>> {
        match self.leader_call(LeaderRequest::Alerts { vpg }).await? {
            LeaderResponse::Alerts(a) => Ok(a),
            _ => Err(ApiError::internal("unexpected leader answer")),
        }
    }

    /// Starts a task; a task that cannot be stored is logged, not fatal to its operation.
    pub async fn start_task(
        &self,
        kind: TaskKind,
        vpg: Option<&VpgId>,
        generation: Option<u64>,
        message: String,
    ) -> Option<u64> {
        let task = new_task(kind, vpg, generation, message);
        match self.node.propose(Command::StartTask { task }).await {
            Ok(Applied::Task(id)) => Some(id),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(kind = kind.name(), error = %e, "task not recorded");
                None
            }
        }
    }

    pub async fn end_task(&self, id: Option<u64>, ok: bool, message: String) {
        let Some(id) = id else { return };
        let cmd = Command::EndTask {
            id,
            ok,
            message,
            now_ms: now_ms(),
        };
        if let Err(e) = self.node.propose(cmd).await {
            tracing::warn!(task = id, error = %e, "task end not recorded");
        }
    }

    /// Ends `task` as failed when `r` is an error; answers `r`.
    pub(super) async fn fail_task_on_error<T>(
        &self,
        task: Option<u64>,
        r: ApiResult<T>,
    ) -> ApiResult<T> {
        if let Err(e) = &r {
            self.end_task(task, false, e.to_string()).await;
        }
        r
    }

    /// A task that ends with its operation.
    pub(super) async fn instant_task<T>(
        &self,
        kind: TaskKind,
        vpg: Option<&VpgId>,
        r: &ApiResult<T>,
    ) {
        let task = self.start_task(kind, vpg, None, String::new()).await;
        let (ok, message) = match r {
            Ok(_) => (true, "done".to_string()),
            Err(e) => (false, e.to_string()),
        };
        self.end_task(task, ok, message).await;
    }

    /// Tasks, oldest first (of one VPG, or running ones only, when asked).
    pub async fn tasks(
        &self,
        vpg: Option<VpgId>,
        running_only: bool,
        limit: usize,
    ) -> ApiResult<Vec<Task>> {
        self.node
            .read(move |s| {
                let mut v: Vec<Task> = s
                    .tasks
                    .all()
                    .filter(|t| vpg.as_ref().is_none_or(|g| t.vpg.as_ref() == Some(g)))
                    .filter(|t| !running_only || t.state == TaskState::Running)
                    .cloned()
                    .collect();
                let skip = v.len().saturating_sub(limit);
                v.drain(..skip);
                v
            })
            .await
    }

    pub async fn task(&self, id: u64) -> ApiResult<Task> {
        self.node
            .read(move |s| s.tasks.get(id).cloned())
            .await?
            .ok_or_else(|| DomainError::not_found("task", id).into())
    }

    /// Appends to the event log; an event that cannot be stored is logged, not fatal to
    /// the operation it describes.
    pub async fn record_event(&self, code: EventCode, vpg: Option<&VpgId>, description: String) {
        let event = NewEvent {
            at_ms: now_ms(),
            code,
            vpg: vpg.cloned(),
            description,
        };
        if let Err(e) = self.node.propose(Command::RecordEvent { event }).await {
            tracing::warn!(code = code.code(), error = %e, "event not recorded");
        }
    }
}
