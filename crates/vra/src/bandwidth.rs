//! The bandwidth limit of one site pair: the replication streams of every VPG that goes to
//! that peer site share one rate, and when they compete, higher priorities get a larger
//! share (High 4 : Medium 2 : Low 1), so that a low-priority VPG slows down first but is
//! never starved.
//!
//! [`Scheduler`] is the pure part (token bucket plus stride scheduling over the three
//! priority classes, driven by explicit instants); [`Limiter`] is the actor that grants
//! senders their bytes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tandem_core::vpg::Priority;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Bytes a stream may send at once after being idle, at most one second's worth.
const MAX_BURST: u64 = 4 << 20;

fn class(p: Priority) -> usize {
    match p {
        Priority::Low => 0,
        Priority::Medium => 1,
        Priority::High => 2,
    }
}

const WEIGHTS: [f64; 3] = [1.0, 2.0, 4.0];

/// Token bucket with weighted sharing between priority classes.
#[derive(Debug)]
pub struct Scheduler {
    /// Bytes per second; 0: unlimited.
    rate: u64,
    tokens: f64,
    last: Instant,
    /// Virtual time of each class: bytes granted divided by its weight.
    pass: [f64; 3],
    /// Virtual time of the last grant: a class that becomes busy starts there.
    vtime: f64,
    queues: [VecDeque<(u64, u64)>; 3],
}

impl Scheduler {
    /// A scheduler at `rate` bytes per second (0: unlimited), starting full.
    pub fn new(rate: u64, now: Instant) -> Self {
        let mut s = Self {
            rate,
            tokens: 0.0,
            last: now,
            pass: [0.0; 3],
            vtime: 0.0,
            queues: Default::default(),
        };
        s.tokens = s.burst();
        s
    }

    fn burst(&self) -> f64 {
        self.rate.clamp(1, MAX_BURST) as f64
    }

    /// The rate (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Changes the rate.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.tokens = self.tokens.min(self.burst());
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst());
    }

    /// Queues a request `id` of `bytes` for priority `p`.
    pub fn enqueue(&mut self, id: u64, p: Priority, bytes: u64) {
        let c = class(p);
        if self.queues[c].is_empty() {
            // A class that was idle does not bank credit from its idle time.
            self.pass[c] = self.pass[c].max(self.vtime);
        }
        self.queues[c].push_back((id, bytes));
    }

    /// Grants what can go now, in scheduling order.
    pub fn grant(&mut self, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        self.refill(now);
        while let Some(c) = self.next_class() {
            let Some(&(id, bytes)) = self.queues[c].front() else {
                break;
            };
            if self.rate > 0 {
                // A request larger than the burst goes once the bucket is full, into debt.
                let need = (bytes as f64).min(self.burst());
                if self.tokens < need {
                    break;
                }
                self.tokens -= bytes as f64;
            }
            self.vtime = self.pass[c];
            self.pass[c] += bytes as f64 / WEIGHTS[c];
            self.queues[c].pop_front();
            out.push(id);
        }
        out
    }

    /// The busy class whose turn it is: the least virtual time, higher priority on ties.
    fn next_class(&self) -> Option<usize> {
        (0..3)
            .filter(|&k| !self.queues[k].is_empty())
            .min_by(|&a, &b| self.pass[a].total_cmp(&self.pass[b]).then(b.cmp(&a)))
    }

    /// When the next queued request can be granted (`None`: nothing queued).
    pub fn next_ready(&self, now: Instant) -> Option<Instant> {
        let c = self.next_class()?;
        let &(_, bytes) = self.queues[c].front()?;
        if self.rate == 0 {
            return Some(now);
        }
        let need = (bytes as f64).min(self.burst()) - self.tokens;
        if need <= 0.0 {
            return Some(now);
        }
        Some(now + Duration::from_secs_f64(need / self.rate as f64))
    }
}

enum Msg {
    Acquire {
        priority: Priority,
        bytes: u64,
        reply: oneshot::Sender<()>,
    },
    SetRate(u64),
    Rate(oneshot::Sender<u64>),
}

/// Handle of one site pair's limiter task. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Limiter {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LimiterMsg")
    }
}

impl Limiter {
    /// Starts a limiter at `rate` bytes per second (0: unlimited) that runs until `cancel`.
    pub fn start(rate: u64, cancel: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(run(Scheduler::new(rate, Instant::now()), rx, cancel));
        Self { tx }
    }

    /// Waits until `bytes` of a stream of priority `priority` may go. Returns at once when
    /// the limiter is gone (shutting down).
    pub async fn acquire(&self, priority: Priority, bytes: u64) {
        let (reply, granted) = oneshot::channel();
        if self
            .tx
            .send(Msg::Acquire {
                priority,
                bytes,
                reply,
            })
            .await
            .is_ok()
        {
            let _ = granted.await;
        }
    }

    /// Sets the rate in bytes per second (0: unlimited).
    pub async fn set_rate(&self, rate: u64) {
        let _ = self.tx.send(Msg::SetRate(rate)).await;
    }

    /// The rate (0: unlimited).
    pub async fn rate(&self) -> u64 {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Rate(tx)).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }
}

async fn run(mut s: Scheduler, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
    let mut next_id = 0u64;
    let mut waiting: std::collections::HashMap<u64, oneshot::Sender<()>> = Default::default();
    loop {
        for id in s.grant(Instant::now()) {
            if let Some(reply) = waiting.remove(&id) {
                let _ = reply.send(());
            }
        }
        let wake = s.next_ready(Instant::now());
        tokio::select! {
            () = cancel.cancelled() => return,
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
            msg = rx.recv() => match msg {
                Some(Msg::Acquire { priority, bytes, reply }) => {
                    next_id += 1;
                    waiting.insert(next_id, reply);
                    s.enqueue(next_id, priority, bytes);
                }
                Some(Msg::SetRate(rate)) => s.set_rate(rate, Instant::now()),
                Some(Msg::Rate(reply)) => {
                    let _ = reply.send(s.rate());
                }
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the scheduler in simulated time with every class backlogged by requests of
    /// `size`; returns bytes granted per class after `secs`.
    fn simulate(rate: u64, classes: &[Priority], size: u64, secs: f64) -> [u64; 3] {
        let t0 = Instant::now();
        let mut s = Scheduler::new(rate, t0);
        let mut id = 0;
        let mut owner = std::collections::HashMap::new();
        for &p in classes {
            for _ in 0..2 {
                id += 1;
                owner.insert(id, p);
                s.enqueue(id, p, size);
            }
        }
        let mut got = [0u64; 3];
        let mut now = t0;
        let end = t0 + Duration::from_secs_f64(secs);
        while now < end {
            for g in s.grant(now) {
                let p = owner[&g];
                got[class(p)] += size;
                id += 1;
                owner.insert(id, p);
                s.enqueue(id, p, size);
            }
            now = s
                .next_ready(now)
                .expect("backlogged")
                .max(now + Duration::from_micros(1));
        }
        got
    }

    #[test]
    fn one_class_gets_the_whole_rate_and_no_more() {
        let got = simulate(1_000_000, &[Priority::Low], 10_000, 10.0);
        let total: u64 = got.iter().sum();
        // 10 s at 1 MB/s plus the initial burst.
        assert!((9_900_000..=11_100_000).contains(&total), "{got:?}");
    }

    #[test]
    fn competing_classes_share_by_weight() {
        let got = simulate(
            7_000_000,
            &[Priority::Low, Priority::Medium, Priority::High],
            64 << 10,
            20.0,
        );
        let total: u64 = got.iter().sum();
        let share = |c: usize| got[c] as f64 / total as f64;
        assert!((share(2) - 4.0 / 7.0).abs() < 0.02, "{got:?}");
        assert!((share(1) - 2.0 / 7.0).abs() < 0.02, "{got:?}");
        assert!((share(0) - 1.0 / 7.0).abs() < 0.02, "{got:?}");
    }

    #[test]
    fn unlimited_grants_everything_at_once_and_a_rate_change_applies() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(0, t0);
        for i in 0..5 {
            s.enqueue(i, Priority::Medium, 100 << 20);
        }
        assert_eq!(s.grant(t0).len(), 5);
        s.set_rate(1000, t0);
        s.enqueue(9, Priority::High, 5000);
        // Larger than the burst: waits for a full bucket, then goes into debt.
        let granted = s.grant(t0);
        assert!(granted.is_empty() || granted == vec![9]);
        let at = s.next_ready(t0);
        assert!(at.is_none() || at >= Some(t0));
    }

    #[test]
    fn an_idle_class_does_not_bank_credit() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(1_000, t0);
        // Medium runs alone for a while.
        let mut now = t0;
        for i in 0..50 {
            s.enqueue(i, Priority::Medium, 100);
            now += Duration::from_millis(100);
            s.grant(now);
        }
        // Low arrives late: it shares from now on, it does not get 50 requests in a row.
        for i in 100..110 {
            s.enqueue(i, Priority::Low, 100);
        }
        for i in 200..210 {
            s.enqueue(i, Priority::Medium, 100);
        }
        let mut order = Vec::new();
        for _ in 0..40 {
            now += Duration::from_millis(100);
            order.extend(s.grant(now));
        }
        let first_six: Vec<bool> = order.iter().take(6).map(|&i| i >= 200).collect();
        assert!(
            first_six.iter().filter(|m| **m).count() >= 3,
            "medium kept its share: {order:?}"
        );
    }
}
