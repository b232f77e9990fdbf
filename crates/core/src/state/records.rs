//! Applying what the leader records: VPG statuses, events, tasks.

use super::*;

impl SiteState {
    /// [`Command::RecordStatus`].
    pub(super) fn apply_record_status(
        &mut self,
        vpg: VpgId,
        state: crate::status::VpgState,
        event: Option<crate::events::NewEvent>,
    ) -> CommandOutcome {
        // A VPG deleted since the monitor looked has no status to keep.
        if self.vpgs.contains_key(&vpg) {
            self.recorded_status.insert(vpg, state);
            if let Some(event) = event {
                self.events.push(event);
            }
        }
        Ok(Applied::Done)
    }

    /// [`Command::RecordEvent`].
    pub(super) fn apply_record_event(&mut self, event: crate::events::NewEvent) -> CommandOutcome {
        self.events.push(event);
        Ok(Applied::Done)
    }

    /// [`Command::RecordEvents`].
    pub(super) fn apply_record_events(
        &mut self,
        events: Vec<crate::events::NewEvent>,
    ) -> CommandOutcome {
        for event in events {
            self.events.push(event);
        }
        Ok(Applied::Done)
    }

    /// [`Command::StartTask`].
    pub(super) fn apply_start_task(&mut self, task: crate::tasks::NewTask) -> CommandOutcome {
        Ok(Applied::Task(self.tasks.start(task)))
    }

    /// [`Command::UpdateTask`].
    pub(super) fn apply_update_task(
        &mut self,
        id: u64,
        progress: u8,
        message: String,
    ) -> CommandOutcome {
        self.tasks.progress(id, progress, message);
        Ok(Applied::Done)
    }

    /// [`Command::EndTask`].
    pub(super) fn apply_end_task(
        &mut self,
        id: u64,
        ok: bool,
        message: String,
        now_ms: u64,
    ) -> CommandOutcome {
        self.tasks.end(id, ok, message, now_ms);
        Ok(Applied::Done)
    }
}
