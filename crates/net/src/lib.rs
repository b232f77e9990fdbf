//! Admission of inbound connections, shared by every listener (NBD and gRPC): a connection
//! is *pending* from its accept until its protocol's handshake is done, then *active*
//! until it closes. Pending connections are bounded: one more sheds the oldest (its token
//! is cancelled), so a flood of connections that never speak cannot keep a real client
//! out; a real client finishes its handshake in a moment and moves on. Active connections
//! are capped: one finishing its handshake beyond the cap is refused. Nothing here does IO;
//! the acceptors wire the tokens and guards into their connections.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections still in their handshake; one more sheds the oldest.
    pub max_pending: usize,
    /// Connections served after their handshake; one more is refused.
    pub max_active: usize,
    /// Time a connection has to finish its handshake.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending: 128,
            max_active: 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    pending: VecDeque<(u64, CancellationToken)>,
    active: usize,
    shed: u64,
    refused: u64,
}

/// The admission of one listener; cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Admission {
    limits: Limits,
    state: Arc<Mutex<State>>,
}

/// Counters of an admission, for status and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionStats {
    pub pending: usize,
    pub active: usize,
    /// Pending connections shed so far (the oldest, for a newer one).
    pub shed: u64,
    /// Connections refused so far after their handshake (the active cap was reached).
    pub refused: u64,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Limits {
                max_pending: limits.max_pending.max(1),
                max_active: limits.max_active.max(1),
                ..limits
            },
            state: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection was accepted: it is pending until [`Pending::admit`]. When too many
    /// are pending, the oldest is shed (its [`Pending::shed`] token is cancelled).
    pub fn arrive(&self) -> Pending {
        let token = CancellationToken::new();
        let mut st = self.state();
        let id = st.next;
        st.next += 1;
        st.pending.push_back((id, token.clone()));
        while st.pending.len() > self.limits.max_pending {
            if let Some((_, oldest)) = st.pending.pop_front() {
                oldest.cancel();
                st.shed += 1;
            }
        }
        Pending {
            admission: self.clone(),
            id,
            token,
        }
    }

    pub fn stats(&self) -> AdmissionStats {
        let st = self.state();
        AdmissionStats {
            pending: st.pending.len(),
            active: st.active,
            shed: st.shed,
            refused: st.refused,
        }
    }

    fn leave_pending(&self, id: u64) {
        self.state().pending.retain(|(p, _)| *p != id);
    }
}

/// A connection in its handshake.
#[derive(Debug)]
pub struct Pending {
    admission: Admission,
    id: u64,
    token: CancellationToken,
}

impl Pending {
    /// Cancelled when this connection is shed for a newer one: it should close.
    pub fn shed(&self) -> &CancellationToken {
        &self.token
    }

    /// The time the connection has to finish its handshake.
    pub fn handshake_timeout(&self) -> Duration {
        self.admission.limits.handshake_timeout
    }

    /// The handshake is done: the connection is served, unless the active cap is reached
    /// (`None`: it should close) or it was shed meanwhile.
    pub fn admit(self) -> Option<Active> {
        let admission = self.admission.clone();
        let mut st = admission.state();
        st.pending.retain(|(p, _)| *p != self.id);
        if self.token.is_cancelled() {
            return None;
        }
        if st.active >= admission.limits.max_active {
            st.refused += 1;
            drop(st);
            tracing::warn!(
                max = admission.limits.max_active,
                "connection refused: too many connections"
            );
            return None;
        }
        st.active += 1;
        drop(st);
        Some(Active { admission })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.admission.leave_pending(self.id);
    }
}

/// A served connection; dropping it frees its place.
#[derive(Debug)]
pub struct Active {
    admission: Admission,
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut st = self.admission.state();
        st.active = st.active.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pending: usize, max_active: usize) -> Limits {
        Limits {
            max_pending,
            max_active,
            handshake_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_new_connection_sheds_the_oldest_pending_one() {
        let a = Admission::new(limits(2, 10));
        let first = a.arrive();
        let second = a.arrive();
        assert!(!first.shed().is_cancelled());
        let third = a.arrive();
        assert!(first.shed().is_cancelled());
        assert!(!second.shed().is_cancelled() && !third.shed().is_cancelled());
        assert_eq!(a.stats().pending, 2);
        assert_eq!(a.stats().shed, 1);
        // A shed connection is not served even if its handshake ends.
        assert!(first.admit().is_none());
        assert!(second.admit().is_some());
    }

    #[test]
    fn the_active_cap_refuses_and_a_closed_connection_frees_its_place() {
        let a = Admission::new(limits(10, 2));
        let one = a.arrive().admit().expect("first");
        let _two = a.arrive().admit().expect("second");
        assert!(a.arrive().admit().is_none(), "over the cap");
        assert_eq!(a.stats().refused, 1);
        drop(one);
        assert!(a.arrive().admit().is_some(), "a place was freed");
        assert_eq!(a.stats().pending, 0);
    }

    #[test]
    fn a_pending_connection_that_goes_leaves_no_trace() {
        let a = Admission::new(limits(1, 1));
        drop(a.arrive());
        let kept = a.arrive();
        assert!(
            !kept.shed().is_cancelled(),
            "the dropped one left the queue"
        );
        assert_eq!(a.stats().shed, 0);
    }
}
