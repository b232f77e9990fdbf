//! The receiver's stream logic as pure state machines (no IO): [`StreamFence`] fences
//! senders by generation and checks that entries arrive with contiguous sequence numbers
//! within a session; [`AckTracker`] computes the highest stream sequence that is durable
//! in every journal of the VPG, which is all the receiver ever acknowledges.
//!
//! Every VM journal of a VPG carries stream sequence numbers (sparse: its VM's entries and
//! every checkpoint marker), so a journal always holds a prefix, in stream order, of the
//! entries meant for it. Hence after a restart every entry up to the smallest
//! journal-durable sequence is durable everywhere, and an entry resent after a reconnect
//! is skipped by a journal that already holds its sequence.

use tandem_journal::{Generation, Seq};

/// Why a hello or an entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The sender's generation is older than the VPG's.
    #[error("stale generation {got}, the vpg is at {current}")]
    Stale {
        /// Presented.
        got: Generation,
        /// Current.
        current: Generation,
    },
    /// The sender's generation is newer than this VRA was assigned.
    #[error("generation {got} is newer than the assigned {current}")]
    Newer {
        /// Presented.
        got: Generation,
        /// Current.
        current: Generation,
    },
    /// A newer session of the same VPG replaced this one.
    #[error("session superseded by a newer connection")]
    Superseded,
    /// An entry out of sequence.
    #[error("entry {got} out of sequence, expected {expected}")]
    OutOfSequence {
        /// Expected.
        expected: Seq,
        /// Received.
        got: Seq,
    },
}

/// The generation fence alone: a peer presenting `got` may talk about a VPG assigned
/// here at `current` only if they are equal (used by the stream's hello and by requests
/// outside the stream, such as block hashes).
pub fn check_generation(got: Generation, current: Generation) -> Result<(), FenceError> {
    if got < current {
        return Err(FenceError::Stale { got, current });
    }
    if got > current {
        return Err(FenceError::Newer { got, current });
    }
    Ok(())
}

/// Identifies one accepted connection of a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// Generation fence and sequence continuity of one VPG's incoming stream.
#[derive(Debug, Clone)]
pub struct StreamFence {
    generation: Generation,
    session: Option<SessionId>,
    sessions: u64,
    expected: Seq,
    /// Before the first entry of a session: the highest sequence it may start at.
    first_max: Option<Seq>,
}

impl StreamFence {
    /// A fence at the VPG's assigned generation.
    pub fn new(generation: Generation) -> Self {
        Self {
            generation,
            session: None,
            sessions: 0,
            expected: Seq(1),
            first_max: None,
        }
    }

    /// The assigned generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The VPG was re-assigned at a newer generation: current sessions end.
    pub fn set_generation(&mut self, generation: Generation) {
        if generation != self.generation {
            self.generation = generation;
            self.session = None;
        }
    }

    /// A sender says hello; `resume` is the receiver's durable-everywhere position. On
    /// success the new session replaces any earlier one and must send `resume + 1` next.
    /// A sender says hello: it resumes after `resume`, or (when it cannot resume) starts
    /// right after `held`, the highest sequence any journal holds.
    pub fn hello(
        &mut self,
        generation: Generation,
        resume: Seq,
        held: Seq,
    ) -> Result<SessionId, FenceError> {
        check_generation(generation, self.generation)?;
        self.sessions += 1;
        let id = SessionId(self.sessions);
        self.session = Some(id);
        self.expected = resume.next();
        self.first_max = Some(held.max(resume).next());
        Ok(id)
    }

    /// Checks the next entry of a session and moves past it.
    pub fn accept(&mut self, session: SessionId, seq: Seq) -> Result<(), FenceError> {
        if self.session != Some(session) {
            return Err(FenceError::Superseded);
        }
        let first_max = self.first_max.take();
        let fits = match first_max {
            Some(max) => seq >= self.expected && seq <= max,
            None => seq == self.expected,
        };
        if !fits {
            self.first_max = first_max;
            return Err(FenceError::OutOfSequence {
                expected: self.expected,
                got: seq,
            });
        }
        self.expected = seq.next();
        Ok(())
    }

    /// The session currently allowed to send.
    pub fn current(&self) -> Option<SessionId> {
        self.session
    }

    /// Ends a session (its connection closed).
    pub fn end(&mut self, session: SessionId) {
        if self.session == Some(session) {
            self.session = None;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Lane {
    submitted: Seq,
    durable: Seq,
}

/// Computes the acknowledgeable position from per-journal submitted and durable
/// positions. Lanes are journals, by index.
#[derive(Debug, Clone)]
pub struct AckTracker {
    lanes: Vec<Lane>,
    received: Seq,
    acked: Seq,
}

impl AckTracker {
    /// Journals reopened at their durable positions; `floor` is a position known to have
    /// been durable everywhere before (the persisted acknowledgement).
    pub fn new(durable: &[Seq], floor: Seq) -> Self {
        let min = durable.iter().copied().min().unwrap_or(Seq(0));
        let start = min.max(floor);
        Self {
            lanes: durable
                .iter()
                .map(|&d| Lane {
                    submitted: d,
                    durable: d,
                })
                .collect(),
            received: start,
            acked: start,
        }
    }

    /// A record at `seq` was handed to journal `lane`.
    pub fn submitted(&mut self, lane: usize, seq: Seq) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.submitted = l.submitted.max(seq);
        }
    }

    /// Every entry up to `seq` has been handed to its journals (or skipped by journals that
    /// already held it).
    pub fn received(&mut self, seq: Seq) {
        self.received = self.received.max(seq);
    }

    /// Journal `lane` is durable up to `seq`.
    pub fn durable(&mut self, lane: usize, seq: Seq) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.durable = l.durable.max(seq);
        }
    }

    /// The highest sequence durable in every journal (never decreases).
    pub fn acked(&mut self) -> Seq {
        let computed = self
            .lanes
            .iter()
            .map(|l| {
                if l.durable >= l.submitted {
                    self.received
                } else {
                    l.durable
                }
            })
            .min()
            .unwrap_or(self.received);
        self.acked = self.acked.max(computed);
        self.acked
    }

    /// The lowest durable position of any journal: a restart reopens every journal at
    /// least there, so it is acknowledgeable without any other record.
    pub fn min_durable(&self) -> Seq {
        self.lanes
            .iter()
            .map(|l| l.durable)
            .min()
            .unwrap_or(self.received)
    }

    /// The highest sequence received (where a new session resumes once it is durable).
    pub fn received_seq(&self) -> Seq {
        self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_newer_generations_are_refused() {
        let mut f = StreamFence::new(Generation(3));
        assert_eq!(
            f.hello(Generation(2), Seq(0), Seq(0)),
            Err(FenceError::Stale {
                got: Generation(2),
                current: Generation(3)
            })
        );
        assert_eq!(
            f.hello(Generation(4), Seq(0), Seq(0)),
            Err(FenceError::Newer {
                got: Generation(4),
                current: Generation(3)
            })
        );
        assert_eq!(f.current(), None);
        let s = f.hello(Generation(3), Seq(0), Seq(0)).expect("hello");
        f.set_generation(Generation(4));
        assert_eq!(f.accept(s, Seq(1)), Err(FenceError::Superseded));
    }

    #[test]
    fn entries_must_be_contiguous_from_the_resume_point() {
        let mut f = StreamFence::new(Generation(1));
        let s = f.hello(Generation(1), Seq(10), Seq(10)).expect("hello");
        assert_eq!(
            f.accept(s, Seq(10)),
            Err(FenceError::OutOfSequence {
                expected: Seq(11),
                got: Seq(10)
            })
        );
        f.accept(s, Seq(11)).expect("next");
        assert_eq!(
            f.accept(s, Seq(13)),
            Err(FenceError::OutOfSequence {
                expected: Seq(12),
                got: Seq(13)
            })
        );
        f.accept(s, Seq(12)).expect("next");
    }

    #[test]
    fn a_rebasing_sender_may_start_right_after_what_the_journals_hold() {
        let mut f = StreamFence::new(Generation(1));
        let s = f.hello(Generation(1), Seq(10), Seq(15)).expect("hello");
        assert!(f.accept(s, Seq(17)).is_err(), "past held + 1");
        f.accept(s, Seq(16)).expect("held + 1");
        assert!(f.accept(s, Seq(18)).is_err(), "contiguous after the first");
        f.accept(s, Seq(17)).expect("next");
        let s = f.hello(Generation(1), Seq(10), Seq(15)).expect("hello");
        f.accept(s, Seq(11))
            .expect("a resuming sender starts at resume + 1");
        assert!(f.accept(s, Seq(16)).is_err());
    }

    #[test]
    fn a_new_session_supersedes_the_old_one() {
        let mut f = StreamFence::new(Generation(1));
        let old = f.hello(Generation(1), Seq(0), Seq(0)).expect("hello");
        f.accept(old, Seq(1)).expect("1");
        let new = f.hello(Generation(1), Seq(1), Seq(1)).expect("hello");
        assert_eq!(f.accept(old, Seq(2)), Err(FenceError::Superseded));
        f.accept(new, Seq(2)).expect("2");
        f.end(old);
        assert_eq!(f.current(), Some(new));
        f.end(new);
        assert_eq!(f.current(), None);
    }

    #[test]
    fn ack_is_the_minimum_over_journals_with_pending_records() {
        // Two journals, fresh.
        let mut t = AckTracker::new(&[Seq(0), Seq(0)], Seq(0));
        // 1 -> journal 0, 2 -> journal 1, 3 (marker) -> both.
        t.submitted(0, Seq(1));
        t.submitted(1, Seq(2));
        t.submitted(0, Seq(3));
        t.submitted(1, Seq(3));
        t.received(Seq(3));
        assert_eq!(t.acked(), Seq(0));
        t.durable(1, Seq(3));
        assert_eq!(t.acked(), Seq(0), "journal 0 holds 1 and 3 pending");
        t.durable(0, Seq(1));
        assert_eq!(t.acked(), Seq(1));
        t.durable(0, Seq(3));
        assert_eq!(t.acked(), Seq(3));
        // 4 and 5 go to journal 0 only; journal 1 is idle and caught up.
        t.submitted(0, Seq(5));
        t.received(Seq(5));
        assert_eq!(t.acked(), Seq(3));
        t.durable(0, Seq(5));
        assert_eq!(t.acked(), Seq(5));
        // Journal 1 reopens at 3: only 3 is acknowledgeable without a floor on disk.
        assert_eq!(t.min_durable(), Seq(3));
    }

    #[test]
    fn ack_never_goes_back() {
        let mut t = AckTracker::new(&[Seq(0), Seq(0)], Seq(0));
        t.submitted(0, Seq(1));
        t.received(Seq(1));
        t.durable(0, Seq(1));
        assert_eq!(t.acked(), Seq(1));
        // Journal 1 gets 2; journal 0 is caught up; journal 1 not durable yet.
        t.submitted(1, Seq(2));
        t.received(Seq(2));
        assert_eq!(t.acked(), Seq(1));
    }

    #[test]
    fn reopened_journals_resume_at_the_larger_of_minimum_and_floor() {
        let mut t = AckTracker::new(&[Seq(40), Seq(12)], Seq(0));
        assert_eq!(t.acked(), Seq(12));
        let mut t = AckTracker::new(&[Seq(40), Seq(12)], Seq(40));
        assert_eq!(t.acked(), Seq(40));
        assert_eq!(t.received_seq(), Seq(40));
    }
}
