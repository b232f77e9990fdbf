//! Rates from cumulative counters: a [`RateMeter`] remembers the counters at its last
//! sample and turns the difference into per-second rates once at least a second has passed,
//! so that status reads at any frequency see stable figures.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shortest interval a rate is computed over.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Per-second rates of a fixed set of counters.
#[derive(Debug)]
pub struct RateMeter<const N: usize> {
    state: Mutex<MeterState<N>>,
}

#[derive(Debug)]
struct MeterState<const N: usize> {
    at: Instant,
    counters: [u64; N],
    rates: [u64; N],
}

impl<const N: usize> Default for RateMeter<N> {
    fn default() -> Self {
        Self::new([0; N])
    }
}

impl<const N: usize> RateMeter<N> {
    /// A meter whose first interval starts now, with these counters.
    pub fn new(counters: [u64; N]) -> Self {
        Self::starting_at(Instant::now(), counters)
    }

    fn starting_at(at: Instant, counters: [u64; N]) -> Self {
        Self {
            state: Mutex::new(MeterState {
                at,
                counters,
                rates: [0; N],
            }),
        }
    }

    /// The rates, given the counters now.
    pub fn rates(&self, counters: [u64; N]) -> [u64; N] {
        self.rates_at(Instant::now(), counters)
    }

    fn rates_at(&self, now: Instant, counters: [u64; N]) -> [u64; N] {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(st.at);
        if elapsed >= MIN_INTERVAL {
            let secs = elapsed.as_secs_f64();
            let previous = st.counters;
            for ((rate, now), then) in st.rates.iter_mut().zip(counters).zip(previous) {
                *rate = (now.saturating_sub(then) as f64 / secs).round() as u64;
            }
            st.at = now;
            st.counters = counters;
        }
        st.rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_change_only_after_a_full_interval() {
        let t0 = Instant::now();
        let m = RateMeter::starting_at(t0, [0, 0]);
        assert_eq!(
            m.rates_at(t0 + Duration::from_millis(500), [50, 5000]),
            [0, 0]
        );
        assert_eq!(
            m.rates_at(t0 + Duration::from_secs(2), [200, 20_000]),
            [100, 10_000]
        );
        // Within the next second the figures hold.
        assert_eq!(
            m.rates_at(t0 + Duration::from_millis(2500), [900, 90_000]),
            [100, 10_000]
        );
        // A counter that went back (restart) gives zero, not a wrap.
        assert_eq!(m.rates_at(t0 + Duration::from_secs(3), [10, 10]), [0, 0]);
    }
}
