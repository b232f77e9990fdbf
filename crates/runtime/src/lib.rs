//! What every Tandem process shares at run time: its logging setup, SIGINT and SIGTERM
//! turned into one cancellation, and tasks tied to the value that owns them (aborted when
//! it is dropped), so no library task outlives what started it.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// Logs to stderr, filtered by `RUST_LOG` or else `default_filter`; as JSON lines when
/// `json`.
pub fn init_logging(default_filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A token cancelled at the first SIGINT or SIGTERM. The handlers are installed before it
/// returns (an error if they cannot be), so a signal sent right after is not lost.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    // The one task of a process's main that lives as long as the process.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = cancel.cancelled() => return,
        }
        cancel.cancel();
    });
    Ok(token)
}

/// Runs `task` as long as the returned handle lives: dropping the handle aborts it. For
/// a task that belongs to a value (a connection's reader, a sync's pieces in flight).
pub fn scoped<F>(task: F) -> AbortOnDropHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    AbortOnDropHandle::new(tokio::spawn(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scoped_task_ends_with_its_handle() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let handle = scoped(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        drop(handle);
        // The task was aborted: its sender is gone.
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_scoped_task_answers_through_its_handle() {
        assert_eq!(scoped(async { 7 }).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn sigterm_cancels_the_token() {
        let token = shutdown_on_signals().unwrap();
        // To this test's own process (the handler is installed: it is not killed).
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(std::time::Duration::from_secs(10), token.cancelled())
            .await
            .expect("SIGTERM cancels");
    }
}
