//! Waiting for a condition that converges: one poll loop for tests, labs and benchmarks,
//! which reports what it saw last when the condition never held.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;

/// How often [`eventually`] polls.
pub const POLL: Duration = Duration::from_millis(50);

/// What one probe of a condition found.
#[derive(Debug)]
pub enum Probe<T, S: Debug> {
    /// The condition holds, with this result.
    Ready(T),
    /// Not yet: what was seen instead (reported if the wait times out).
    Seen(S),
}

/// Polls `probe` every [`POLL`] until it is [`Probe::Ready`], for at most `patience`;
/// the error names `what` and the last value seen.
pub async fn eventually<T, S, F, Fut>(what: &str, patience: Duration, mut probe: F) -> Result<T>
where
    S: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Probe<T, S>>,
{
    let deadline = Instant::now() + patience;
    loop {
        match probe().await {
            Probe::Ready(v) => return Ok(v),
            Probe::Seen(last) => {
                if Instant::now() >= deadline {
                    bail!("{what}: not within {patience:?}; last seen: {last:?}");
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a probe that answers `Some` when the condition holds; an error or
/// `None` is what it saw.
pub async fn eventually_some<T, F, Fut>(what: &str, patience: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    eventually(what, patience, || {
        let next = probe();
        async move {
            match next.await {
                Ok(Some(v)) => Probe::Ready(v),
                Ok(None) => Probe::Seen("not yet".to_string()),
                Err(e) => Probe::Seen(format!("{e:#}")),
            }
        }
    })
    .await
}

/// [`eventually`] for a probe that cannot fail: `Some` when the condition holds.
pub async fn until_some<T, F, Fut>(what: &str, patience: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_some(what, patience, || {
        let next = probe();
        async move { Ok(next.await) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reports_the_last_value_seen() {
        let mut n = 0;
        let err = eventually("n to reach 1000", Duration::from_secs(1), || {
            n += 1;
            let v = n;
            async move {
                if v >= 1000 {
                    Probe::Ready(v)
                } else {
                    Probe::Seen(v)
                }
            }
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("n to reach 1000"), "{err}");
        assert!(err.contains("last seen: 21"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn returns_once_ready() {
        let mut n = 0;
        let v = eventually("n to reach 3", Duration::from_secs(1), || {
            n += 1;
            let v = n;
            async move {
                if v >= 3 {
                    Probe::Ready(v)
                } else {
                    Probe::Seen(v)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }
}
