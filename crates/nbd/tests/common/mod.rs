//! Helpers shared by the integration tests: an in-process server on port 0, image files
//! with random content, hashing, and running real client tools.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    sync::Arc,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tandem_nbd::{Exports, FileDevice, NbdError, NbdServer, ServerConfig};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tandem_nbd=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A server running in this process on 127.0.0.1, port 0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub exports: Exports,
    pub shutdown: CancellationToken,
    handle: JoinHandle<Result<(), NbdError>>,
}

impl TestServer {
    pub async fn start(exports: Exports) -> Self {
        Self::start_with_config(exports, ServerConfig::default()).await
    }

    pub async fn start_with_config(exports: Exports, config: ServerConfig) -> Self {
        init_tracing();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = NbdServer::with_config(exports.clone(), config);
        let handle = tokio::spawn(server.serve(listener, shutdown.clone()));
        Self {
            addr,
            exports,
            shutdown,
            handle,
        }
    }

    /// Serves the given files, each under its stem.
    pub async fn serve_files(paths: &[&Path]) -> Self {
        let exports = Exports::new();
        for path in paths {
            let name = path.file_stem().unwrap().to_str().unwrap();
            exports
                .insert(name, Arc::new(FileDevice::open(path).unwrap()))
                .unwrap();
        }
        Self::start(exports).await
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// Cancels the server and waits for it (it must stop cleanly).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// Fails the test with a clear message when a client tool is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{name}` is not installed; run scripts/install-test-deps.sh"
    );
}

/// Writes a file of `size` bytes of seeded random data.
pub fn random_image(dir: &Path, name: &str, size: usize, seed: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, random_bytes(size, seed)).unwrap();
    path
}

pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    StdRng::seed_from_u64(seed).fill(&mut data[..]);
    data
}

pub fn hash_file(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

pub fn hash_range(path: &Path, start: usize, end: usize) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap()[start..end])
}

/// Runs a command, failing the test with its output if it does not succeed.
pub async fn run_ok(program: &str, args: &[&str]) -> Output {
    run_ok_in(Path::new("."), program, args).await
}

/// Like [`run_ok`], in the directory `dir` (fio leaves state files in its directory).
pub async fn run_ok_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    require_tool(program);
    let output = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a command and returns its output whatever its status.
pub async fn run_any(program: &str, args: &[&str]) -> Output {
    require_tool(program);
    tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"))
}
