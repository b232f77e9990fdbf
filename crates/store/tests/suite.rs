//! openraft's storage conformance suite, run on both backends through the shared
//! `LogStore`/`StateMachineStore` implementation.

#![allow(
    clippy::result_large_err,
    reason = "StoreBuilder::build returns openraft's StorageError"
)]

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use tandem_store::storage::{LogStore, MemoryBackend, SledBackend, StateMachineStore};
use tandem_store::types::{StorageError, TypeConfig};
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore<SledBackend>, StateMachineStore<SledBackend>, TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            TempDir,
            LogStore<SledBackend>,
            StateMachineStore<SledBackend>,
        ),
        StorageError,
    > {
        let dir = TempDir::new().expect("temp dir");
        let backend = Arc::new(SledBackend::open(dir.path()).expect("open sled"));
        let log = LogStore::open(backend.clone())?;
        let sm = StateMachineStore::open(backend)?;
        Ok((dir, log, sm))
    }
}

struct MemoryBuilder;

impl StoreBuilder<TypeConfig, LogStore<MemoryBackend>, StateMachineStore<MemoryBackend>, ()>
    for MemoryBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            (),
            LogStore<MemoryBackend>,
            StateMachineStore<MemoryBackend>,
        ),
        StorageError,
    > {
        let backend = Arc::new(MemoryBackend::new());
        let log = LogStore::open(backend.clone())?;
        let sm = StateMachineStore::open(backend)?;
        Ok(((), log, sm))
    }
}

// The suite builds its own tokio runtimes, so these are plain tests.
#[test]
fn sled_store_passes_openraft_suite() {
    Suite::test_all(SledBuilder).expect("sled store conforms");
}

#[test]
fn memory_store_passes_openraft_suite() {
    Suite::test_all(MemoryBuilder).expect("memory store conforms");
}
