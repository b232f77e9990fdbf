//! Tasks: every operation an operator starts, with its progress while it runs and its
//! outcome after, kept in the replicated state (running ones always, ended ones bounded).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::ids::VpgId;

/// Ended tasks kept per site; the oldest go first.
pub const MAX_ENDED_TASKS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskKind {
    CreateVpg,
    EditVpg,
    DeleteVpg,
    PauseVpg,
    ResumeVpg,
    ForceSync,
    AddCheckpoint,
    FailoverTest,
    Failover,
    Move,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::CreateVpg => "Create VPG",
            Self::EditVpg => "Edit VPG",
            Self::DeleteVpg => "Delete VPG",
            Self::PauseVpg => "Pause VPG",
            Self::ResumeVpg => "Resume VPG",
            Self::ForceSync => "Force Sync",
            Self::AddCheckpoint => "Add Checkpoint",
            Self::FailoverTest => "Failover Test",
            Self::Failover => "Failover",
            Self::Move => "Move",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
}

/// A task as started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTask {
    pub kind: TaskKind,
    pub vpg: Option<VpgId>,
    pub started_ms: u64,
    /// For edits: the generation whose protection ends the task.
    pub generation: Option<u64>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: u64,
    pub kind: TaskKind,
    pub vpg: Option<VpgId>,
    pub started_ms: u64,
    pub generation: Option<u64>,
    pub state: TaskState,
    /// 0 to 100.
    pub progress: u8,
    pub message: String,
    pub ended_ms: Option<u64>,
}

/// Running tasks and the bounded history of ended ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskLog {
    running: Vec<Task>,
    ended: VecDeque<Task>,
    next_id: u64,
}

impl TaskLog {
    pub fn start(&mut self, t: NewTask) -> u64 {
        self.next_id = self.next_id.max(1);
        let id = self.next_id;
        self.next_id += 1;
        self.running.push(Task {
            id,
            kind: t.kind,
            vpg: t.vpg,
            started_ms: t.started_ms,
            generation: t.generation,
            state: TaskState::Running,
            progress: 0,
            message: t.message,
            ended_ms: None,
        });
        id
    }

    /// Updates a running task; an ended or unknown one is left alone (a late update).
    pub fn progress(&mut self, id: u64, progress: u8, message: String) {
        if let Some(t) = self.running.iter_mut().find(|t| t.id == id) {
            t.progress = progress.min(100);
            t.message = message;
        }
    }

    /// Ends a running task; ending it twice keeps the first outcome.
    pub fn end(&mut self, id: u64, ok: bool, message: String, now_ms: u64) {
        let Some(pos) = self.running.iter().position(|t| t.id == id) else {
            return;
        };
        let mut t = self.running.remove(pos);
        t.state = if ok {
            TaskState::Succeeded
        } else {
            TaskState::Failed
        };
        if ok {
            t.progress = 100;
        }
        t.message = message;
        t.ended_ms = Some(now_ms);
        self.ended.push_back(t);
        while self.ended.len() > MAX_ENDED_TASKS {
            self.ended.pop_front();
        }
    }

    pub fn running(&self) -> &[Task] {
        &self.running
    }

    /// Every task kept, oldest first.
    pub fn all(&self) -> impl Iterator<Item = &Task> {
        let mut v: Vec<&Task> = self.ended.iter().chain(self.running.iter()).collect();
        v.sort_by_key(|t| t.id);
        v.into_iter()
    }

    pub fn get(&self, id: u64) -> Option<&Task> {
        self.running
            .iter()
            .chain(self.ended.iter())
            .find(|t| t.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(kind: TaskKind) -> NewTask {
        NewTask {
            kind,
            vpg: None,
            started_ms: 1,
            generation: None,
            message: String::new(),
        }
    }

    #[test]
    fn a_task_runs_progresses_and_ends_once() {
        let mut log = TaskLog::default();
        let id = log.start(new(TaskKind::ForceSync));
        log.progress(id, 140, "syncing".into());
        assert_eq!(log.get(id).map(|t| t.progress), Some(100));
        log.progress(id, 40, "syncing".into());
        log.end(id, false, "VRA gone".into(), 9);
        log.end(id, true, "late".into(), 10);
        log.progress(id, 90, "late".into());
        let t = log.get(id).unwrap();
        assert_eq!(
            (t.state, t.progress, t.ended_ms),
            (TaskState::Failed, 40, Some(9))
        );
        assert_eq!(t.message, "VRA gone");
        assert!(log.running().is_empty());
    }

    #[test]
    fn ended_tasks_are_bounded_running_ones_are_not() {
        let mut log = TaskLog::default();
        let keep = log.start(new(TaskKind::CreateVpg));
        for _ in 0..MAX_ENDED_TASKS + 5 {
            let id = log.start(new(TaskKind::PauseVpg));
            log.end(id, true, String::new(), 2);
        }
        assert_eq!(log.all().count(), MAX_ENDED_TASKS + 1);
        assert_eq!(log.all().next().map(|t| t.id), Some(keep));
    }
}
