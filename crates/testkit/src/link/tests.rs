//! The link emulator's pure parts: the token bucket's pacing, the delay queue's order and
//! timing, link names.

use super::*;

const MS: Duration = Duration::from_millis(1);

#[test]
fn unlimited_bucket_never_waits() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(0, t0);
    for _ in 0..100 {
        b.take(1 << 20, t0);
        assert_eq!(b.ready_at(t0), t0);
    }
    assert_eq!(b.piece(), usize::MAX);
}

#[test]
fn bucket_holds_a_burst_then_paces_at_the_rate() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(1000, t0);
    assert_eq!(b.burst(), 100);
    assert_eq!(b.ready_at(t0), t0);
    b.take(100, t0);
    assert_eq!(b.ready_at(t0), t0, "a bucket at zero is not in debt");
    b.take(100, t0);
    assert_eq!(b.ready_at(t0), t0 + 100 * MS);
    assert_eq!(b.ready_at(t0 + 50 * MS), t0 + 100 * MS);
    assert_eq!(b.ready_at(t0 + 100 * MS), t0 + 100 * MS);
    // Idle time refills no more than one burst.
    let later = t0 + Duration::from_secs(10);
    b.take(100, later);
    b.take(1, later);
    assert!(b.ready_at(later) > later);
}

/// Sends `total` bytes through the bucket in virtual time as fast as it allows.
fn simulate(rate: u64, total: usize) -> Duration {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(rate, t0);
    let mut now = t0;
    let mut sent = 0;
    while sent < total {
        now = b.ready_at(now);
        let n = b.piece().min(total - sent);
        b.take(n, now);
        sent += n;
    }
    now - t0
}

#[test]
fn bucket_rate_is_exact_up_to_a_burst_and_a_piece() {
    for (rate, total) in [(1000u64, 20_000usize), (1 << 20, 8 << 20), (300, 3000)] {
        let took = simulate(rate, total).as_secs_f64();
        let b = TokenBucket::new(rate, Instant::now());
        let floor = (total as f64 - b.burst() as f64 - b.piece() as f64) / rate as f64;
        let ideal = total as f64 / rate as f64;
        // (nanosecond rounding of the waits aside)
        assert!(took + 1e-6 >= floor, "rate {rate}: {took} s < {floor} s");
        assert!(took <= ideal, "rate {rate}: {took} s > {ideal} s");
    }
}

#[test]
fn bucket_rate_change_applies_to_the_debt() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(1000, t0);
    b.take(1100, t0);
    assert_eq!(b.ready_at(t0), t0 + Duration::from_secs(1));
    b.set_rate(2000, t0);
    assert_eq!(b.ready_at(t0), t0 + 500 * MS);
    b.set_rate(0, t0);
    assert_eq!(b.ready_at(t0), t0);
    // From unlimited to limited: a fresh, full bucket.
    b.set_rate(1000, t0);
    b.take(100, t0);
    assert_eq!(b.ready_at(t0), t0);
}

#[test]
fn delay_queue_releases_in_order_when_due() {
    let t0 = Instant::now();
    let mut q = DelayQueue::new(10);
    q.push(t0, b"abc".to_vec());
    q.push(t0 + 10 * MS, b"de".to_vec());
    q.push(t0 + 20 * MS, Vec::new());
    assert_eq!(q.bytes(), 5);
    let d = 100 * MS;
    assert_eq!(q.due_at(d), Some(t0 + d));
    assert_eq!(q.pop_due(t0 + 99 * MS, d, 64), None);
    assert_eq!(q.pop_due(t0 + d, d, 64).as_deref(), Some(&b"abc"[..]));
    assert_eq!(q.due_at(d), Some(t0 + 110 * MS));
    assert_eq!(q.pop_due(t0 + 105 * MS, d, 64), None);
    assert_eq!(q.pop_due(t0 + 110 * MS, d, 64).as_deref(), Some(&b"de"[..]));
    assert!(q.is_empty());
    assert_eq!(q.bytes(), 0);
    assert_eq!(q.due_at(d), None);
}

#[test]
fn delay_queue_splits_pieces_keeping_the_time_and_order() {
    let t0 = Instant::now();
    let mut q = DelayQueue::new(4);
    q.push(t0, b"hello".to_vec());
    assert!(!q.has_room());
    q.push(t0 + 5 * MS, b"!".to_vec());
    let mut out = Vec::new();
    while let Some(p) = q.pop_due(t0 + 5 * MS, Duration::ZERO, 2) {
        assert!(p.len() <= 2);
        out.extend(p);
    }
    assert_eq!(out, b"hello!");
    assert!(q.has_room());
}

#[test]
fn delay_queue_keeps_order_when_the_delay_shrinks() {
    let t0 = Instant::now();
    let mut q = DelayQueue::new(100);
    q.push(t0, b"1".to_vec());
    q.push(t0 + 50 * MS, b"2".to_vec());
    // Under a long delay nothing is due at t0 + 60 ms ...
    assert_eq!(q.pop_due(t0 + 60 * MS, 200 * MS, 8), None);
    // ... then with the delay cut to 0 both are, oldest first.
    assert_eq!(
        q.pop_due(t0 + 60 * MS, Duration::ZERO, 8),
        Some(b"1".to_vec())
    );
    assert_eq!(
        q.pop_due(t0 + 60 * MS, Duration::ZERO, 8),
        Some(b"2".to_vec())
    );
}

#[test]
fn link_names_do_not_depend_on_order() {
    assert_eq!(link_name("site-b", "site-a"), "site-a<->site-b");
    assert_eq!(link_name("site-a", "site-b"), "site-a<->site-b");
}
