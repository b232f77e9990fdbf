//! The sender's replication window, as a pure state machine (no IO, no clocks).
//!
//! It holds every entry that is not yet acknowledged as durable by the recovery VRA, in
//! sequence order, with three positions: `acked` (everything up to it is durable at the
//! recovery side and freed here), `cursor` (the next entry to send) and `next_seq` (the
//! sequence the next pushed entry takes). Space is freed only on acknowledgement; after a
//! reconnect the stream resumes right after the receiver's durable position, resending
//! what was sent but not acknowledged.
//!
//! A window created at process start is *unanchored*: its sequence numbers are provisional
//! until the first connection tells it where the receiver is, and it is then renumbered
//! to continue the receiver's stream. When the receiver already held entries from an
//! earlier incarnation of this sender (or is anywhere the window cannot continue from),
//! writes may have been lost in between: the resume reports `lost`, and the VPG needs a
//! sync before its checkpoints mean anything again.

use std::collections::VecDeque;

use tandem_journal::Seq;

/// What went wrong with an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The receiver acknowledged more than was sent.
    #[error("ack {ack} beyond the last sent sequence {sent}")]
    AckBeyondSent {
        /// The acknowledged sequence.
        ack: Seq,
        /// The highest sequence sent.
        sent: Seq,
    },
    /// The receiver acknowledged less than it had acknowledged before.
    #[error("ack {ack} below the earlier ack {acked}")]
    AckRegressed {
        /// The acknowledged sequence.
        ack: Seq,
        /// The earlier acknowledgement.
        acked: Seq,
    },
    /// The receiver reported a position no stream reaches (the window could not number
    /// its entries after it).
    #[error("receiver position durable {durable}, held {held} is beyond {MAX_RECEIVER_POSITION}")]
    PositionOutOfRange {
        /// The durable position reported.
        durable: Seq,
        /// The held position reported.
        held: Seq,
    },
}

/// The highest position a receiver may report: far beyond any stream (a sequence a
/// nanosecond for centuries), and far enough below `u64::MAX` to number entries after it.
pub const MAX_RECEIVER_POSITION: Seq = Seq(1 << 62);

/// How a connection resumes the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The first sequence to send.
    pub from: Seq,
    /// Buffer cost freed by entries the receiver already had.
    pub freed: u64,
    /// The window was renumbered to continue the receiver's stream.
    pub rebased: bool,
    /// Writes may be missing at the receiver: a sync is needed.
    pub lost: bool,
}

#[derive(Debug, Clone)]
struct Held<T> {
    seq: Seq,
    item: T,
    cost: u64,
}

/// The replication window of one VPG's sender.
#[derive(Debug, Clone)]
pub struct SendWindow<T> {
    entries: VecDeque<Held<T>>,
    next_seq: Seq,
    acked: Seq,
    cursor: Seq,
    anchored: bool,
    bytes: u64,
    /// Set when what the window dropped is tracked elsewhere (the dirty map): the next
    /// connection rebases without loss if the receiver holds at least this much.
    resync_floor: Option<Seq>,
}

impl<T: Clone> Default for SendWindow<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> SendWindow<T> {
    /// An empty, unanchored window (a sender that just started).
    pub fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            next_seq: Seq(1),
            acked: Seq(0),
            cursor: Seq(1),
            anchored: false,
            bytes: 0,
            resync_floor: None,
        }
    }

    /// Adds an entry of `cost` buffer bytes; returns its (possibly provisional) sequence.
    pub fn push(&mut self, item: T, cost: u64) -> Seq {
        let seq = self.next_seq;
        self.next_seq = seq.next();
        self.bytes += cost;
        self.entries.push_back(Held { seq, item, cost });
        seq
    }

    /// The lowest sequence still held (the next sequence when none is).
    pub fn resume_from(&self) -> Seq {
        self.entries.front().map_or(self.next_seq, |h| h.seq)
    }

    /// A connection is established and the receiver holds everything up to `durable`
    /// durably, and entries up to `held` in some journal. Frees what it already has and
    /// moves the cursor right after it; when it cannot continue from there (see the module
    /// docs) it renumbers the window to start after `held`, so that no entry collides with
    /// one an earlier incarnation of this sender left at the receiver. Positions beyond
    /// [`MAX_RECEIVER_POSITION`] are refused, and the window is left as it was.
    pub fn on_connected(&mut self, durable: Seq, held: Seq) -> Result<Resume, WindowError> {
        if durable.max(held) > MAX_RECEIVER_POSITION {
            return Err(WindowError::PositionOutOfRange { durable, held });
        }
        let continues = self.anchored && durable >= self.acked && durable < self.next_seq;
        if continues {
            let freed = self.free_through(durable);
            self.acked = durable;
            self.cursor = durable.next();
            return Ok(Resume {
                from: self.cursor,
                freed,
                rebased: false,
                lost: false,
            });
        }
        // Fresh on both sides is the only rebase that loses nothing, unless what was dropped
        // is tracked for a sync and the receiver kept everything it acknowledged.
        let lost = match self.resync_floor.take() {
            Some(floor) => durable < floor,
            None => self.anchored || durable > Seq(0),
        };
        let base = durable.max(held);
        let mut seq = base;
        for h in &mut self.entries {
            seq = seq.next();
            h.seq = seq;
        }
        self.next_seq = seq.next();
        self.acked = durable;
        self.cursor = base.next();
        self.anchored = true;
        Ok(Resume {
            from: self.cursor,
            freed: 0,
            rebased: true,
            lost,
        })
    }

    /// The connection is gone: everything not acknowledged will be resent.
    pub fn on_disconnected(&mut self) {
        self.cursor = self.acked.next();
    }

    /// Takes the next entries to send, up to `max_cost` bytes (at least one entry) and
    /// `max_entries`, and moves the cursor past them.
    pub fn next_batch(&mut self, max_cost: u64, max_entries: usize) -> Vec<(Seq, T)> {
        let Some(front) = self.entries.front() else {
            return Vec::new();
        };
        let start =
            usize::try_from(self.cursor.0.saturating_sub(front.seq.0)).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut cost = 0;
        for h in self.entries.iter().skip(start) {
            if out.len() >= max_entries || (!out.is_empty() && cost + h.cost > max_cost) {
                break;
            }
            cost += h.cost;
            out.push((h.seq, h.item.clone()));
        }
        if let Some((last, _)) = out.last() {
            self.cursor = last.next();
        }
        out
    }

    /// Whether at least `entries` entries or `cost` of buffer cost wait to be sent (a scan
    /// of at most `entries` entries).
    pub fn unsent_at_least(&self, cost: u64, entries: usize) -> bool {
        let Some(front) = self.entries.front() else {
            return false;
        };
        if !self.anchored {
            return false;
        }
        let start =
            usize::try_from(self.cursor.0.saturating_sub(front.seq.0)).unwrap_or(usize::MAX);
        let mut total = 0;
        for (n, h) in self.entries.iter().skip(start).enumerate() {
            total += h.cost;
            if n + 1 >= entries || total >= cost {
                return true;
            }
        }
        false
    }

    /// Whether entries wait to be sent.
    pub fn has_unsent(&self) -> bool {
        self.anchored && self.cursor < self.next_seq
    }

    /// The receiver acknowledged everything up to `ack` as durable; returns the buffer
    /// cost freed.
    pub fn on_ack(&mut self, ack: Seq) -> Result<u64, WindowError> {
        if ack < self.acked {
            return Err(WindowError::AckRegressed {
                ack,
                acked: self.acked,
            });
        }
        if ack >= self.cursor {
            return Err(WindowError::AckBeyondSent {
                ack,
                sent: self.sent_seq(),
            });
        }
        self.acked = ack;
        Ok(self.free_through(ack))
    }

    fn free_through(&mut self, seq: Seq) -> u64 {
        let mut freed = 0;
        while self.entries.front().is_some_and(|h| h.seq <= seq) {
            if let Some(h) = self.entries.pop_front() {
                freed += h.cost;
            }
        }
        self.bytes -= freed;
        freed
    }

    /// Whether sequence numbers are aligned with the receiver's stream.
    pub fn anchored(&self) -> bool {
        self.anchored
    }

    /// Highest sequence assigned.
    pub fn written_seq(&self) -> Seq {
        Seq(self.next_seq.0 - 1)
    }

    /// Highest sequence sent on the current connection.
    pub fn sent_seq(&self) -> Seq {
        Seq(self.cursor.0 - 1)
    }

    /// Highest sequence acknowledged.
    pub fn acked_seq(&self) -> Seq {
        self.acked
    }

    /// Buffer cost held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Gives up the entries held (the caller tracks their regions for a sync instead) and
    /// unanchors the window: the next connection continues wherever the receiver is,
    /// without counting the dropped entries as lost. Returns them and the cost freed.
    pub fn abandon(&mut self) -> (Vec<T>, u64) {
        let items = self.entries.drain(..).map(|h| h.item).collect();
        let freed = std::mem::take(&mut self.bytes);
        let floor = if self.anchored {
            self.acked
        } else {
            self.resync_floor.unwrap_or(Seq(0))
        };
        self.resync_floor = Some(floor);
        self.anchored = false;
        self.cursor = self.next_seq;
        (items, freed)
    }

    /// Trusts a sync to cover whatever an earlier incarnation of this sender did not get
    /// acknowledged (a clean restart with a persisted dirty map): the first connection
    /// rebases without counting anything as lost.
    pub fn trust_resync(&mut self) {
        if !self.anchored {
            self.resync_floor = Some(Seq(0));
        }
    }

    /// Drops everything held; returns the buffer cost freed (the VPG goes away).
    pub fn clear(&mut self) -> u64 {
        self.entries.clear();
        std::mem::take(&mut self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn seqs(batch: &[(Seq, u32)]) -> Vec<u64> {
        batch.iter().map(|(s, _)| s.0).collect()
    }

    #[test]
    fn fresh_sender_and_receiver_start_at_one_without_loss() {
        let mut w = SendWindow::new();
        w.push(10u32, 100);
        w.push(11, 100);
        assert!(
            !w.has_unsent(),
            "nothing is sent before the first connection"
        );
        let r = w.on_connected(Seq(0), Seq(0)).expect("resume");
        assert_eq!(
            r,
            Resume {
                from: Seq(1),
                freed: 0,
                rebased: true,
                lost: false
            }
        );
        assert_eq!(seqs(&w.next_batch(1000, 10)), vec![1, 2]);
        assert_eq!(w.on_ack(Seq(1)), Ok(100));
        assert_eq!(w.bytes(), 100);
        assert_eq!(w.on_ack(Seq(2)), Ok(100));
        assert!(w.is_empty());
        assert_eq!(w.written_seq(), Seq(2));
    }

    #[test]
    fn unsent_amount_counts_only_what_follows_the_cursor() {
        let mut w = SendWindow::new();
        for i in 0..4u32 {
            w.push(i, 100);
        }
        assert!(
            !w.unsent_at_least(1, 1),
            "nothing is unsent before a connection"
        );
        w.on_connected(Seq(0), Seq(0)).expect("resume");
        assert!(w.unsent_at_least(400, 10));
        assert!(!w.unsent_at_least(401, 10));
        assert!(w.unsent_at_least(10_000, 4));
        assert!(!w.unsent_at_least(10_000, 5));
        w.next_batch(250, 10);
        assert!(w.unsent_at_least(200, 10) && !w.unsent_at_least(201, 10));
        w.next_batch(1000, 10);
        assert!(!w.unsent_at_least(1, 1));
    }

    #[test]
    fn abandoned_entries_are_returned_and_the_next_connection_rebases_without_loss() {
        let mut w = SendWindow::new();
        w.on_connected(Seq(0), Seq(0)).expect("resume");
        for i in 0..4u32 {
            w.push(i, 10);
        }
        w.next_batch(1000, 10);
        assert_eq!(w.on_ack(Seq(2)), Ok(20));
        let (items, freed) = w.abandon();
        assert_eq!((items, freed), (vec![2, 3], 20));
        assert!(!w.has_unsent());
        w.push(9, 10);
        // The receiver got one more than was acknowledged: nothing is lost.
        let r = w.on_connected(Seq(3), Seq(3)).expect("resume");
        assert!(r.rebased && !r.lost, "{r:?}");
        assert_eq!(seqs(&w.next_batch(1000, 10)), vec![4]);
        // A receiver behind what it acknowledged lost data.
        let (_, _) = w.abandon();
        assert!(w.on_connected(Seq(1), Seq(1)).expect("resume").lost);
    }

    #[test]
    fn a_rebase_numbers_after_everything_the_receiver_holds() {
        let mut w = SendWindow::new();
        w.push(1u32, 10);
        w.push(2, 10);
        w.trust_resync();
        let r = w.on_connected(Seq(5), Seq(9)).expect("resume");
        assert!(r.rebased && !r.lost, "{r:?}");
        assert_eq!(r.from, Seq(10));
        assert_eq!(seqs(&w.next_batch(1000, 10)), vec![10, 11]);
        // Acks between durable and held free nothing and are not errors.
        assert_eq!(w.on_ack(Seq(8)), Ok(0));
        assert_eq!(w.on_ack(Seq(10)), Ok(10));
    }

    #[test]
    fn a_trusted_resync_rebases_a_restarted_sender_without_loss() {
        let mut w = SendWindow::<u32>::new();
        w.trust_resync();
        assert!(!w.on_connected(Seq(77), Seq(77)).expect("resume").lost);
        let mut plain = SendWindow::<u32>::new();
        assert!(plain.on_connected(Seq(77), Seq(77)).expect("resume").lost);
    }

    #[test]
    fn reconnect_resends_after_the_receivers_durable_position() {
        let mut w = SendWindow::new();
        w.on_connected(Seq(0), Seq(0)).expect("resume");
        for i in 0..5 {
            w.push(i, 10);
        }
        assert_eq!(seqs(&w.next_batch(1000, 10)), vec![1, 2, 3, 4, 5]);
        w.on_ack(Seq(2)).expect("ack");
        w.on_disconnected();
        // The receiver made 3 durable before the link dropped.
        let r = w.on_connected(Seq(3), Seq(3)).expect("resume");
        assert_eq!(
            r,
            Resume {
                from: Seq(4),
                freed: 10,
                rebased: false,
                lost: false
            }
        );
        assert_eq!(seqs(&w.next_batch(1000, 10)), vec![4, 5]);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn batches_respect_cost_and_count_but_take_at_least_one() {
        let mut w = SendWindow::new();
        w.on_connected(Seq(0), Seq(0)).expect("resume");
        w.push(1, 500);
        w.push(2, 500);
        w.push(3, 500);
        assert_eq!(seqs(&w.next_batch(100, 10)), vec![1]);
        assert_eq!(seqs(&w.next_batch(1000, 10)), vec![2, 3]);
        assert!(w.next_batch(1000, 10).is_empty());
        w.push(4, 1);
        w.push(5, 1);
        assert_eq!(seqs(&w.next_batch(1000, 1)), vec![4]);
    }

    #[test]
    fn bad_acks_are_refused() {
        let mut w = SendWindow::new();
        w.on_connected(Seq(0), Seq(0)).expect("resume");
        w.push(1u32, 1);
        w.push(2, 1);
        w.next_batch(1, 1);
        assert_eq!(
            w.on_ack(Seq(2)),
            Err(WindowError::AckBeyondSent {
                ack: Seq(2),
                sent: Seq(1)
            })
        );
        w.on_ack(Seq(1)).expect("ack");
        assert_eq!(
            w.on_ack(Seq(0)),
            Err(WindowError::AckRegressed {
                ack: Seq(0),
                acked: Seq(1)
            })
        );
    }

    #[test]
    fn restarted_sender_continues_the_receivers_stream_and_reports_loss() {
        let mut w = SendWindow::new();
        w.push(1u32, 1);
        w.push(2, 1);
        let r = w.on_connected(Seq(41), Seq(41)).expect("resume");
        assert_eq!(
            r,
            Resume {
                from: Seq(42),
                freed: 0,
                rebased: true,
                lost: true
            }
        );
        assert_eq!(seqs(&w.next_batch(100, 10)), vec![42, 43]);
        assert_eq!(w.push(3, 1), Seq(44));
    }

    #[test]
    fn receiver_that_lost_acknowledged_entries_forces_a_rebase() {
        let mut w = SendWindow::new();
        w.on_connected(Seq(0), Seq(0)).expect("resume");
        for i in 0..4 {
            w.push(i, 1);
        }
        w.next_batch(100, 10);
        w.on_ack(Seq(3)).expect("ack");
        w.on_disconnected();
        let r = w.on_connected(Seq(1), Seq(1)).expect("resume");
        assert!(r.rebased && r.lost);
        assert_eq!(seqs(&w.next_batch(100, 10)), vec![2]);
    }

    #[test]
    fn a_receiver_position_no_stream_reaches_is_refused() {
        // Found by the replication_sender fuzz target: an ack at u64::MAX overflowed the
        // renumbering.
        let mut w = SendWindow::new();
        w.push(1u32, 10);
        for (durable, held) in [(Seq(u64::MAX), Seq(0)), (Seq(0), Seq(u64::MAX))] {
            assert_eq!(
                w.on_connected(durable, held),
                Err(WindowError::PositionOutOfRange { durable, held })
            );
        }
        assert!(!w.anchored());
        let r = w
            .on_connected(MAX_RECEIVER_POSITION, MAX_RECEIVER_POSITION)
            .expect("resume");
        assert_eq!(r.from, MAX_RECEIVER_POSITION.next());
    }

    proptest! {
        /// Under any interleaving of pushes, sends, acks of sent entries and reconnects at
        /// a durable position the receiver could report, the window stays contiguous,
        /// its byte count matches what it holds, and every pushed entry is sent in order
        /// after the last acknowledgement.
        #[test]
        fn window_invariants(ops in proptest::collection::vec((0u8..4, 0u64..8), 1..200)) {
            let mut w = SendWindow::new();
            w.on_connected(Seq(0), Seq(0)).expect("resume");
            let mut durable_at_receiver = Seq(0);
            let mut pushed = 0u64;
            for (op, arg) in ops {
                match op {
                    0 => { w.push(pushed, arg + 1); pushed += 1; }
                    1 => {
                        let batch = w.next_batch(arg * 10, 3);
                        for pair in batch.windows(2) {
                            prop_assert_eq!(pair[1].0, pair[0].0.next());
                        }
                    }
                    2 => {
                        let sent = w.sent_seq();
                        let ack = Seq(w.acked_seq().0 + arg.min(sent.0 - w.acked_seq().0));
                        prop_assert!(w.on_ack(ack).is_ok());
                        durable_at_receiver = durable_at_receiver.max(ack);
                    }
                    _ => {
                        let sent = w.sent_seq();
                        w.on_disconnected();
                        let d = Seq(durable_at_receiver.0 + arg.min(sent.0.saturating_sub(durable_at_receiver.0)));
                        let r = w.on_connected(d, d).expect("resume");
                        prop_assert!(!r.rebased && !r.lost);
                        prop_assert_eq!(r.from, d.next());
                        durable_at_receiver = d;
                    }
                }
                prop_assert_eq!(w.len() as u64, w.written_seq().0 - w.acked_seq().0);
                prop_assert!(w.acked_seq() <= w.sent_seq());
                prop_assert!(w.sent_seq() <= w.written_seq());
                prop_assert_eq!(w.resume_from(), w.acked_seq().next());
            }
        }
    }
}
