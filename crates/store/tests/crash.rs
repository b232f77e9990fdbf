//! Unclean stop: a single-node sled store in a child process is killed with SIGKILL while it
//! writes; reopened, it holds every write it acknowledged (from its snapshot and its log).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{WAIT, cmd, has};
use tandem_store::{SiteStore, StorageKind, StoreConfig, Transport};
use tokio::net::TcpListener;

const CHILD_DIR_ENV: &str = "TANDEM_STORE_CRASH_CHILD_DIR";
/// Writes acknowledged before the kill; crosses several snapshots.
const ACKED_BEFORE_KILL: u64 = 150;

fn config(dir: PathBuf, raft_addr: String) -> StoreConfig {
    let mut config =
        StoreConfig::new(1, raft_addr, "api:1", StorageKind::Sled { dir }).with_test_timings();
    config.snapshot_logs_since_last = 40;
    config.max_in_snapshot_log_to_keep = 5;
    config
}

async fn open_single(dir: PathBuf) -> SiteStore {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let store = SiteStore::open(config(dir, addr), Transport::default())
        .await
        .expect("open");
    store
        .initialize(BTreeMap::from([(1, store.node_info())]))
        .await
        .expect("initialize");
    store
        .wait_for(WAIT, "leader", |m| m.leader_id == Some(1))
        .await
        .expect("leader");
    // A single node needs no peers; the listener is dropped.
    drop(listener);
    store
}

/// The child: writes until killed, printing each acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by killed_writer_restarts_with_every_acknowledged_write in a child process"]
async fn crash_child() {
    let dir = PathBuf::from(std::env::var(CHILD_DIR_ENV).expect("child dir"));
    let store = open_single(dir).await;
    let mut out = std::io::stdout();
    for i in 0..100_000 {
        store
            .propose(cmd(i))
            .await
            .expect("committed")
            .expect("applied");
        writeln!(out, "acked {i}").expect("stdout");
        out.flush().expect("stdout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_writer_restarts_with_every_acknowledged_write() {
    common::init_tracing();
    let tmp = tempfile::TempDir::new().expect("temp dir");
    let dir = tmp.path().join("node-1");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_child", "--ignored", "--nocapture"])
        .env(CHILD_DIR_ENV, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let last_acked = tokio::task::spawn_blocking(move || {
        let mut last = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("child output");
            if let Some(i) = line.strip_prefix("acked ") {
                let i: u64 = i.parse().expect("index");
                last = Some(i);
                if i + 1 >= ACKED_BEFORE_KILL {
                    break;
                }
            }
        }
        last
    })
    .await
    .expect("reader");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap child");
    let last_acked = last_acked.expect("child acknowledged writes before dying");
    assert!(last_acked + 1 >= ACKED_BEFORE_KILL);

    let store = open_single(dir).await;
    // Entries logged but not yet known committed before the kill are applied once the
    // restarted leader commits them.
    let last_applied = store
        .wait_for(WAIT, "whole log applied", |m| {
            m.last_applied_index == m.last_log_index
        })
        .await
        .expect("log applied")
        .last_applied_index;
    let dump = store.dump();
    for i in 0..=last_acked {
        assert!(
            has(&dump, i),
            "acknowledged write {i} lost (applied {last_applied:?})"
        );
    }
    assert!(
        store.metrics().snapshot_index.is_some(),
        "restored with a snapshot"
    );
    store.shutdown().await.expect("shutdown");
}
