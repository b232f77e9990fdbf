//! Repeated refusals in the audit trail, told once per interval with a count: the first
//! refusal of a call by a caller with an outcome is recorded as it comes; the same refusal
//! again within [`DIGEST_WINDOW`] is only counted, and when the window ends one event
//! says how many more there were. A peer retrying a refused call, or a client guessing
//! tokens, then costs the event log (and Raft) one entry per interval, not one per call.
//! Pure: the caller passes the time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tandem_core::events::NewEvent;

/// How long refusals with the same key are folded into one count.
pub const DIGEST_WINDOW: Duration = Duration::from_secs(60);
/// Keys held at most (a flood of distinct callers is told one by one beyond this).
const MAX_KEYS: usize = 4096;

/// One audit record: the event, and for a refusal the key it is folded by.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub event: NewEvent,
    /// Caller, call and outcome of a refused call (None: recorded as it comes).
    pub refusal: Option<String>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// Refusals since the one recorded, and the latest (its text is the summary's base).
    folded: u64,
    last: NewEvent,
}

/// The folding state.
#[derive(Debug, Default)]
pub struct Digest {
    windows: HashMap<String, Window>,
}

impl Digest {
    /// The event to record now for `r`, if any (a repeated refusal is only counted).
    pub fn admit(&mut self, r: AuditRecord, now: Instant) -> Option<NewEvent> {
        let Some(key) = r.refusal else {
            return Some(r.event);
        };
        if let Some(w) = self.windows.get_mut(&key)
            && now.duration_since(w.started) < DIGEST_WINDOW
        {
            w.folded += 1;
            w.last = r.event;
            return None;
        }
        if self.windows.len() < MAX_KEYS || self.windows.contains_key(&key) {
            self.windows.insert(
                key,
                Window {
                    started: now,
                    folded: 0,
                    last: r.event.clone(),
                },
            );
        }
        Some(r.event)
    }

    /// The summaries of windows that ended by `now` (one event per key that folded
    /// refusals), and the ended windows forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<NewEvent> {
        let mut out = Vec::new();
        self.windows.retain(|_, w| {
            if now.duration_since(w.started) < DIGEST_WINDOW {
                return true;
            }
            if w.folded > 0 {
                let mut e = w.last.clone();
                e.description = format!(
                    "{} (and {} more times within {} s)",
                    e.description,
                    w.folded,
                    DIGEST_WINDOW.as_secs()
                );
                out.push(e);
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::events::EventCode;

    fn refusal(text: &str) -> AuditRecord {
        AuditRecord {
            event: NewEvent {
                at_ms: 0,
                code: EventCode::OperatorCall,
                vpg: None,
                description: text.into(),
            },
            refusal: Some(text.into()),
        }
    }

    #[test]
    fn a_repeated_refusal_is_told_once_then_counted_once_per_window() {
        let mut d = Digest::default();
        let t0 = Instant::now();
        assert!(d.admit(refusal("PutVpg by b: refused"), t0).is_some());
        for i in 1..=1000 {
            let at = t0 + Duration::from_millis(i * 50);
            assert!(
                d.admit(refusal("PutVpg by b: refused"), at).is_none(),
                "refusal {i} folded"
            );
        }
        assert!(
            d.due(t0 + Duration::from_secs(30)).is_empty(),
            "window runs"
        );
        let told = d.due(t0 + DIGEST_WINDOW);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(
            told[0].description.contains("1000 more times"),
            "{}",
            told[0].description
        );
        // A new window starts with the next refusal, recorded at once.
        let later = t0 + DIGEST_WINDOW + Duration::from_secs(1);
        assert!(d.admit(refusal("PutVpg by b: refused"), later).is_some());
        assert!(d.due(later + DIGEST_WINDOW).is_empty(), "nothing folded");
    }

    #[test]
    fn other_refusals_and_successes_are_told_as_they_come() {
        let mut d = Digest::default();
        let t0 = Instant::now();
        assert!(d.admit(refusal("PutVpg by b: refused"), t0).is_some());
        assert!(d.admit(refusal("DeleteVpg by b: refused"), t0).is_some());
        let ok = AuditRecord {
            refusal: None,
            ..refusal("PutVpg by b: ok")
        };
        assert!(d.admit(ok.clone(), t0).is_some());
        assert!(d.admit(ok, t0).is_some(), "successes are never folded");
    }
}
