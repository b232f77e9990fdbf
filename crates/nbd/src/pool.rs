//! A small fixed pool of threads for blocking file IO, one pool per device.
//!
//! Compared with tokio's blocking pool (up to hundreds of threads, each woken for one
//! job), a few threads draining one queue hand over far less: while they are busy, new
//! jobs are picked up without waking anyone, so under a deep queue most operations cost
//! no thread switch at all. A slow disk also cannot starve the threads of other devices.
//! The threads stop and are joined when the pool is dropped.

use std::{
    collections::VecDeque,
    io,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread::{JoinHandle, ThreadId},
};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    idle: usize,
    shutdown: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fixed set of threads running blocking jobs in submission order.
pub(crate) struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<(ThreadId, JoinHandle<()>)>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl IoPool {
    /// Starts `threads` threads (at least one) named `name`.
    pub(crate) fn new(name: &str, threads: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let mut handles = Vec::new();
        for index in 0..threads.max(1) {
            let worker = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || work(&worker))?;
            handles.push((handle.thread().id(), handle));
        }
        Ok(Self {
            shared,
            threads: handles,
        })
    }

    /// Runs `job` on a pool thread; resolves to its result.
    pub(crate) async fn run<T, F>(&self, job: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let wrapped: Job = Box::new(move || {
            let _ = tx.send(job());
        });
        {
            let mut state = self.shared.lock();
            if state.shutdown {
                return Err(io::Error::other("io pool is shut down"));
            }
            state.jobs.push_back(wrapped);
            if state.idle > 0 {
                self.shared.ready.notify_one();
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("io pool job panicked")))
    }
}

fn work(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            // A panicking job drops its reply sender, which its caller sees as an error.
            let _ = catch_unwind(AssertUnwindSafe(job));
            state = shared.lock();
            continue;
        }
        if state.shutdown {
            return;
        }
        state.idle += 1;
        state = shared
            .ready
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
        state.idle -= 1;
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.ready.notify_all();
        let current = std::thread::current().id();
        for (id, handle) in self.threads.drain(..) {
            // The last reference may be dropped by a job on a pool thread itself; that
            // thread exits on its own once its job returns.
            if id != current {
                let _ = handle.join();
            }
        }
    }
}
