//! Failpoints for chaos tests: `TANDEM_FAILPOINTS` names, comma-separated, the points at
//! which this process dies as a kill -9 would (no cleanup, no flush beyond what is already
//! durable). Unset, as in production, every point is a no-op. The recovery controller
//! names one per step boundary (`recovery-step:<step>`, right after the step is committed),
//! so a test can kill the leader at exactly that boundary.

use std::sync::OnceLock;

/// The variable that names the failpoints.
pub const ENV: &str = "TANDEM_FAILPOINTS";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Dies here if failpoint `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|p| p == name) {
        tracing::error!(failpoint = name, "failpoint hit: the process dies here");
        std::process::abort();
    }
}
