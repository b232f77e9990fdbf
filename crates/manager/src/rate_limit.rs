//! Per-source rate limits for calls that need no credential (pairing acceptance, node
//! enrollment) and for failed token checks: a token bucket per source address, bounded in
//! how many sources it tracks. A caller out of tokens is answered RESOURCE_EXHAUSTED with
//! the time until its next token, before anything is read or proposed. Pure: the caller
//! passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Attempts a source may make at once (a lab enrolls every node of a site from one
/// address within seconds).
pub const BURST: f64 = 64.0;
/// How fast a source earns attempts back (60 a minute).
pub const REFILL_PER_SEC: f64 = 1.0;
/// Sources tracked at most; beyond, the fullest (least recently limited) are forgotten.
const MAX_SOURCES: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> f64 {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * REFILL_PER_SEC;
        (self.tokens + earned).min(BURST)
    }
}

/// The buckets of one manager node, shared by its listeners.
#[derive(Debug, Clone, Default)]
pub struct SourceLimits {
    buckets: Arc<Mutex<HashMap<IpAddr, Bucket>>>,
}

impl SourceLimits {
    /// Spends one attempt of `source`; when it has none, how long until it has.
    pub fn take(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&source) {
            // Forget the sources that have recovered all their attempts.
            buckets.retain(|_, b| b.refilled(now) < BURST);
            if buckets.len() >= MAX_SOURCES {
                // Still full: forget the one that recovered most.
                if let Some(ip) = buckets
                    .iter()
                    .max_by(|a, b| a.1.refilled(now).total_cmp(&b.1.refilled(now)))
                    .map(|(ip, _)| *ip)
                {
                    buckets.remove(&ip);
                }
            }
        }
        let b = buckets.entry(source).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let tokens = b.refilled(now);
        if tokens < 1.0 {
            return Err(wait_for_one(tokens));
        }
        *b = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        Ok(())
    }
}

fn wait_for_one(tokens: f64) -> Duration {
    Duration::from_secs_f64(((1.0 - tokens) / REFILL_PER_SEC).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_source_gets_its_burst_then_one_attempt_per_refill_and_others_are_not_affected() {
        let limits = SourceLimits::default();
        let t0 = Instant::now();
        for i in 0..BURST as usize {
            assert!(limits.take(ip(1), t0).is_ok(), "attempt {i}");
        }
        let wait = limits.take(ip(1), t0).expect_err("over the burst");
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limits.take(ip(2), t0).is_ok(), "another source");
        let later = t0 + Duration::from_secs(1);
        assert!(limits.take(ip(1), later).is_ok(), "one earned back");
        assert!(limits.take(ip(1), later).is_err());
        // 10 000 attempts in a minute get through at most the burst and a minute's refill.
        let limits = SourceLimits::default();
        let through = (0..10_000u64)
            .filter(|i| {
                limits
                    .take(ip(3), t0 + Duration::from_micros(i * 6000))
                    .is_ok()
            })
            .count();
        assert!(through <= BURST as usize + 61, "{through}");
    }

    #[test]
    fn the_number_of_sources_tracked_is_bounded() {
        let limits = SourceLimits::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let a = IpAddr::from(i.wrapping_add(1 << 24).to_be_bytes());
            let _ = limits.take(a, t0);
        }
        assert!(limits.buckets.lock().unwrap().len() <= MAX_SOURCES);
    }
}
