//! 5. RTO of a failover with a large unpromoted journal vs restoring by copy and vs promoting first.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::v1::{self as pb};
use tokio::process::Command;

use tandem_testkit::workload::SplitMix64;

use super::files::*;
use super::harness::*;
use super::machine::*;
use super::settings::*;

/// VMs and volumes of the RTO run.
pub(super) const RTO_VMS: usize = 10;
pub(super) const RTO_VOLUMES: u32 = 2;

/// The RTO run's volumes: (vm, volume id).
pub(super) fn rto_volumes() -> Vec<(String, u32)> {
    (0..RTO_VMS)
        .flat_map(|v| (0..RTO_VOLUMES).map(move |n| (format!("vm-{v}"), n)))
        .collect()
}

pub(super) async fn bench_rto(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let vols = rto_volumes();
    let per_volume = (s.rto_journal_bytes / vols.len() as u64).div_ceil(MIB) * MIB;
    let size = (per_volume + per_volume / 4).div_ceil(MIB) * MIB;
    println!(
        "\n== failover RTO: {RTO_VMS} VMs x {RTO_VOLUMES} volumes of {} MiB, {} MiB of \
         unpromoted journal, vs restore by nbdcopy and vs promote-then-serve",
        size / MIB,
        per_volume * vols.len() as u64 / MIB
    );
    let root = fresh_dir(&s.dir.join("rto"))?;
    let ds_a = root.join("ds-a");
    let ds_b = root.join("ds-b");
    std::fs::create_dir_all(&ds_a)?;
    std::fs::create_dir_all(&ds_b)?;
    let b = start_vra(s, &root, "host-b", None).await?;
    let a = start_vra(s, &root, "host-a", None).await?;
    let volume = |dir: &Path, vm: &str, n: u32, ext: &str| pb::VraVolume {
        volume_id: n,
        size_bytes: size,
        path: dir.join(format!("{vm}-{n}.{ext}")).display().to_string(),
        preseeded: false,
    };
    let vms: Vec<String> = (0..RTO_VMS).map(|v| format!("vm-{v}")).collect();
    b.client()
        .await?
        .assign_recovery(pb::AssignRecoveryRequest {
            vpg_id: VPG.into(),
            generation: 1,
            vms: vms
                .iter()
                .map(|vm| pb::RecoveryVm {
                    vm_id: vm.clone(),
                    volumes: (0..RTO_VOLUMES)
                        .map(|n| volume(&ds_b, vm, n, "replica"))
                        .collect(),
                    journal_dir: ds_b.join("journals").join(vm).display().to_string(),
                    datastore_path: String::new(),
                })
                .collect(),
            // Nothing is promoted during the run: the whole journal stays unpromoted.
            journal_history_secs: 3600,
            journal_warning_bytes: 0,
            journal_hard_limit_bytes: 0,
            remove_dropped_vm_data: false,
            keep_vm_ids: Vec::new(),
            protected_site_id: String::new(),
        })
        .await
        .context("assign recovery")?;
    for vm in &vms {
        for n in 0..RTO_VOLUMES {
            zero_file(&ds_a.join(format!("{vm}-{n}.img")), size)?;
        }
    }
    a.client()
        .await?
        .assign_protected(pb::AssignProtectedRequest {
            vpg_id: VPG.into(),
            generation: 1,
            vms: vms
                .iter()
                .map(|vm| pb::ProtectedVm {
                    vm_id: vm.clone(),
                    volumes: (0..RTO_VOLUMES)
                        .map(|n| volume(&ds_a, vm, n, "img"))
                        .collect(),
                })
                .collect(),
            recovery_vra_address: b.control.clone(),
            wan_compression: false,
            priority: pb::VraPriority::Medium as i32,
            freeze_timeout_ms: 10_000,
            preseeded: false,
            recovery_site_id: String::new(),
        })
        .await
        .context("assign protected")?;
    wait_level(&a, Duration::from_secs(300)).await?;

    // The journal: random data over every volume, 1 MiB writes, all volumes at once.
    let t = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for (i, (vm, n)) in vols.iter().enumerate() {
        let (addr, export) = (a.nbd_socket.clone(), format!("{vm}/{n}"));
        writers.spawn(async move {
            let c = tandem_nbd::NbdClient::connect_to(&addr, &export).await?;
            let mut rng = SplitMix64(0x5eed + i as u64);
            let mut buf = vec![0u8; MIB as usize];
            for off in (0..per_volume).step_by(MIB as usize) {
                rng.fill(&mut buf);
                c.write(off, bytes::Bytes::copy_from_slice(&buf), false)
                    .await?;
            }
            c.flush().await?;
            c.disconnect().await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    let status = wait_level(&a, Duration::from_secs(600)).await?;
    println!(
        "journal written: {} MiB in {:.1} s (through the protected VRA, replicated)",
        per_volume * vols.len() as u64 / MIB,
        t.elapsed().as_secs_f64()
    );
    let mut ca = a.client().await?;
    ca.freeze(pb::FreezeRequest {
        vpg_id: VPG.into(),
        checkpoint_id: 1,
    })
    .await?;
    let marker = ca
        .thaw(pb::ThawRequest {
            vpg_id: VPG.into(),
            checkpoint_id: 1,
            timestamp_ms: unix_ms(),
            kind: pb::VraCheckpointKind::Manual as i32,
            name: "before-disaster".into(),
        })
        .await?
        .into_inner()
        .marker_seq;
    ca.wait_durable(pb::WaitDurableRequest {
        vpg_id: VPG.into(),
        seq: marker.max(status.written_seq),
        timeout_ms: 10_000,
    })
    .await?;
    let mut cb = b.client().await?;
    let journal = vpg_status(&mut cb).await?.journal_bytes;
    println!("journal at the recovery VRA: {} MiB", journal / MIB);
    // The protected side is gone.
    drop(a);

    let machine = quiet(s).await;
    let t = Instant::now();
    let rec = cb
        .start_recovery(pb::StartRecoveryRequest {
            vpg_id: VPG.into(),
            generation: 1,
            checkpoint_id: 1,
            op_id: "bench-1".into(),
        })
        .await
        .context("start recovery")?
        .into_inner();
    let mut readers = tokio::task::JoinSet::new();
    for v in &rec.volumes {
        let (addr, export) = (rec.nbd_socket.clone(), v.export_name.clone());
        readers.spawn(async move {
            let c = tandem_nbd::NbdClient::connect_to(&addr, &export).await?;
            c.read(0, 4096).await?;
            c.disconnect().await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = readers.join_next().await {
        r??;
    }
    let rto = t.elapsed();
    println!(
        "tandem RTO: {} ms to {} volumes answering reads (images over {} MiB of journal)",
        rto.as_millis(),
        rec.volumes.len(),
        journal / MIB
    );

    // Yardstick 1: restore by copy, every recovered volume copied to a file.
    let machine2 = quiet(s).await;
    let t = Instant::now();
    for v in &rec.volumes {
        let dst = root.join(format!("copy-{}.raw", v.export_name.replace('/', "-")));
        std::fs::File::create(&dst)?.set_len(v.size_bytes)?;
        let out = Command::new("nbdcopy")
            .arg(tandem_nbd::endpoint_uri(&rec.nbd_socket, &v.export_name))
            .arg(&dst)
            .output()
            .await
            .context("running nbdcopy")?;
        if !out.status.success() {
            bail!("nbdcopy failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let copy = t.elapsed();
    println!(
        "restore by nbdcopy of the {} volumes: {:.2} s",
        rec.volumes.len(),
        copy.as_secs_f64()
    );
    // Yardstick 2: promote before serving (the commit's work, timed here).
    let t = Instant::now();
    cb.commit_recovery(pb::CommitRecoveryRequest {
        vpg_id: VPG.into(),
        op_id: "bench-1".into(),
        new_generation: 2,
    })
    .await?;
    loop {
        let st = vpg_status(&mut cb).await?;
        if st.recovered_phase == pb::RecoveredPhase::Live as i32 {
            break;
        }
        if !st.last_error.is_empty() {
            bail!("commit failed: {}", st.last_error);
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("commit did not finish");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let promote = t.elapsed();
    println!(
        "promote-then-serve (the commit: promotion and merge): {:.2} s",
        promote.as_secs_f64()
    );
    let ratio = copy.as_secs_f64() / rto.as_secs_f64();
    let met = rto <= Duration::from_secs(2);
    println!(
        "ratio RTO: {ratio:.1}x faster than restore by copy, {:.1}x faster than promote-then-serve ({})",
        promote.as_secs_f64() / rto.as_secs_f64(),
        if met { "ok" } else { "ABOVE FLOOR 2 s" }
    );
    rows.push(Row {
        bench: format!(
            "failover RTO, {RTO_VMS} VMs x {RTO_VOLUMES} volumes, {} MiB written",
            per_volume * vols.len() as u64 / MIB
        ),
        tandem: format!("{} ms (journal {} MiB)", rto.as_millis(), journal / MIB),
        yardstick: format!(
            "nbdcopy restore {:.2} s; promote-then-serve {:.2} s",
            copy.as_secs_f64(),
            promote.as_secs_f64()
        ),
        ratio: format!("{ratio:.1}x"),
        figure: rto.as_secs_f64() * 1000.0,
        unit: " ms",
        floor: "<= 2 s".into(),
        met,
        machine: format!("{machine} / {machine2}"),
    });
    drop(b);
    s.clean(&root);
    Ok(())
}
