//! Write-order fidelity across two protected VRAs: one VPG of 4 VMs, 2 on each protected
//! VRA, each streaming to its own recovery VRA; the lab's verifying workload writes every
//! volume with writers whose writes depend on each other across VRAs; checkpoints freeze
//! both protected VRAs, then thaw both. Every checkpoint image (4 point-in-time exports)
//! must be a cut closed under "happened before" that holds every write acknowledged
//! before the checkpoint was asked for and none issued after it was taken.
//!
//! Seeded: the seed is printed; rerun with `TANDEM_WORKLOAD_SEED=<seed> cargo nextest run
//! -p tandem-vra --test write_order`.

mod common;

use std::time::Duration;

use common::*;
use tandem_nbd::NbdClient;
use tandem_proto::v1 as pb;
use tandem_testkit::workload::{CutWindow, ImageReader, VolumeTarget, Workload, WorkloadConfig};

const MIB: u64 = 1 << 20;
const CHECKPOINTS: u64 = 6;

async fn freeze_both(protected: &[&VraProcess], vpg: &str, id: u64) {
    for a in protected {
        let c = a.client().await.expect("control client");
        wait_for("a freeze to be accepted", || {
            let mut c = c.clone();
            async move {
                c.freeze(pb::FreezeRequest {
                    vpg_id: vpg.into(),
                    checkpoint_id: id,
                })
                .await
                .ok()
            }
        })
        .await;
    }
}

async fn thaw_both(protected: &[&VraProcess], vpg: &str, id: u64) {
    for a in protected {
        a.client()
            .await
            .expect("control client")
            .thaw(pb::ThawRequest {
                vpg_id: vpg.into(),
                checkpoint_id: id,
                timestamp_ms: 1_700_000_000_000 + id,
                kind: pb::VraCheckpointKind::Automatic as i32,
                name: String::new(),
            })
            .await
            .expect("thaw");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_checkpoint_across_two_protected_vras_is_closed_under_happened_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a1 = start(root, "host-a1").await;
    let a2 = start(root, "host-a2").await;
    let b1 = start(root, "host-b1").await;
    let b2 = start(root, "host-b2").await;
    let size = 16 * MIB;
    let vm = |id: &'static str| TestVm {
        id: id.into(),
        sizes: vec![size],
    };
    assign(root, &a1, &b1, "vpg-w", 1, &[vm("vm-1"), vm("vm-2")], true).await;
    assign(root, &a2, &b2, "vpg-w", 1, &[vm("vm-3"), vm("vm-4")], true).await;
    wait_connected(&a1, "vpg-w").await;
    wait_connected(&a2, "vpg-w").await;

    let placement = [
        (&a1, &b1, "vm-1"),
        (&a1, &b1, "vm-2"),
        (&a2, &b2, "vm-3"),
        (&a2, &b2, "vm-4"),
    ];
    let mut config = WorkloadConfig::new(
        placement
            .iter()
            .map(|(a, _, vm)| VolumeTarget::new(&a.nbd, format!("{vm}/0")))
            .collect(),
    );
    config.region_blocks = Some(512);
    let seed = config.seed;
    println!(
        "workload seed {seed}; rerun: TANDEM_WORKLOAD_SEED={seed} cargo nextest run -p tandem-vra --test write_order"
    );
    let workload = Workload::start(config).await.expect("workload");
    workload.wait_acked(200).await.expect("writes flow");

    let mut windows = Vec::new();
    for id in 1..=CHECKPOINTS {
        let before = workload.mark();
        freeze_both(&[&a1, &a2], "vpg-w", id).await;
        thaw_both(&[&a1, &a2], "vpg-w", id).await;
        let after = workload.mark();
        windows.push((id, CutWindow::new(before, after)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let history = workload.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());

    for (id, window) in &windows {
        wait_durable_checkpoint(&b1, "vpg-w", *id).await;
        wait_durable_checkpoint(&b2, "vpg-w", *id).await;
        let mut clients = Vec::new();
        for (_, b, vm) in &placement {
            let name = open_pit(b, "vpg-w", vm, 0, *id).await;
            clients.push(
                NbdClient::connect(b.nbd.as_str(), &name)
                    .await
                    .expect("connect to the point-in-time export"),
            );
        }
        let images: Vec<&dyn ImageReader> = clients.iter().map(|c| c as &dyn ImageReader).collect();
        let report = tandem_testkit::workload::check_image(&history, window, &images)
            .await
            .unwrap_or_else(|e| panic!("checkpoint {id} (seed {seed}): {e}"));
        println!("checkpoint {id}: {report}");
        assert!(report.writes_included > 0, "checkpoint {id} holds no write");
    }
}
