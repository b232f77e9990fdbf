//! The machine's state around a measured run: load, idle CPU, no `rustc` running.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::process::Command;

use super::settings::*;

pub(super) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(super) async fn rustc_count() -> usize {
    let out = Command::new("pgrep").args(["-c", "rustc"]).output().await;
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Idle and total jiffies of all CPUs (`/proc/stat`; iowait counts as idle).
pub(super) fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    // guest time is already counted in user time.
    let total = v.iter().take(8).sum();
    (idle, total)
}

/// Percentage of CPU time idle over the next second.
pub(super) async fn idle_percent() -> f64 {
    let (i0, t0) = cpu_jiffies();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (i1, t1) = cpu_jiffies();
    if t1 <= t0 {
        return 100.0;
    }
    (i1 - i0) as f64 * 100.0 / (t1 - t0) as f64
}

/// Waits (up to the configured time) until no rustc runs and the CPUs are idle enough,
/// flushes dirty pages, and describes the machine state for the result line.
pub(super) async fn quiet(s: &Settings) -> String {
    let start = Instant::now();
    let mut told = false;
    let state = loop {
        let n = rustc_count().await;
        let idle = idle_percent().await;
        if n == 0 && idle >= s.min_idle {
            break format!("quiet (idle {idle:.0}%), load {}", loadavg());
        }
        if start.elapsed() >= s.quiet_wait {
            println!("  warning: {n} rustc running, {idle:.0}% idle; measuring anyway");
            break format!("NOT quiet ({n} rustc, idle {idle:.0}%), load {}", loadavg());
        }
        if !told {
            println!("  waiting for a quiet machine ({n} rustc running, {idle:.0}% idle)");
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let _ = Command::new("sync").status().await;
    state
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
