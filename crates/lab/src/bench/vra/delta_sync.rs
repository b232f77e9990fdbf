//! 4. Delta sync of a preseeded volume with a percentage of blocks changed vs rsync.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tandem_proto::v1::{self as pb};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use tandem_testkit::link::LinkEmulator;
use tandem_testkit::yardstick::cpu_secs;

use super::files::*;
use super::harness::*;
use super::machine::*;
use super::settings::*;

/// `rsync --stats` figures: total bytes sent and received.
/// Brings `dst` in line with `src` with rsync's delta algorithm (as between hosts);
/// answers its bytes on the wire.
pub(super) async fn rsync_delta(src: &Path, dst: &Path) -> Result<u64> {
    let out = Command::new("rsync")
        // --ignore-times: the copies may share size and mtime (to the second), and rsync
        // would skip the file without comparing it.
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(src)
        .arg(dst)
        .output()
        .await
        .context("running rsync")?;
    if !out.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(rsync_wire(&String::from_utf8_lossy(&out.stdout)))
}

pub(super) fn rsync_wire(stats: &str) -> u64 {
    stats
        .lines()
        .filter(|l| l.starts_with("Total bytes sent:") || l.starts_with("Total bytes received:"))
        .filter_map(|l| {
            l.split(':')
                .nth(1)
                .map(|v| v.trim().replace(',', ""))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

pub(super) async fn bench_delta_sync(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let size = s.delta_bytes;
    println!(
        "\n== delta sync of {} MiB, {}% of 4 KiB blocks changed, vs rsync --inplace --no-whole-file",
        size / MIB,
        s.delta_percent
    );
    let root = fresh_dir(&s.dir.join("delta"))?;
    let vm = Placement::new(&root, "vm-1", size);
    random_file(&vm.image, size, 11)?;
    create_parent(&vm.replica)?;
    std::fs::copy(&vm.image, &vm.replica)?;
    let rsync_dst = root.join("rsync-dst.img");
    std::fs::copy(&vm.image, &rsync_dst)?;
    let changed = scribble(&vm.image, s.delta_percent, 13)?;
    println!(
        "changed {changed} blocks of 4 KiB ({} MiB)",
        changed * 4096 / MIB
    );

    let machine = quiet(s).await;
    let t = Instant::now();
    let rs_wire = rsync_delta(&vm.image, &rsync_dst).await?;
    let rs = t.elapsed();
    std::fs::remove_file(&rsync_dst)?;
    println!(
        "rsync: {:.2} s, {rs_wire} bytes on the wire ({:.2} MiB)",
        rs.as_secs_f64(),
        rs_wire as f64 / MIB as f64
    );

    // The protected VRA reaches the recovery VRA through a link proxy that counts bytes
    // (unless --no-link-proxy).
    let cancel = CancellationToken::new();
    let links = LinkEmulator::start(cancel.clone());
    let b = start_vra(s, &root, "host-b", None).await?;
    let a = start_vra(s, &root, "host-a", None).await?;
    let link = if s.link_proxy {
        let link = links.link("site-a", "site-b").await?;
        let proxy = link.add_proxy("site-a", &b.control).await?;
        Some((link, proxy.to_string()))
    } else {
        None
    };
    let recovery_address = link.as_ref().map_or(b.control.clone(), |(_, p)| p.clone());
    let machine2 = quiet(s).await;
    assign_recovery(&b, &[&vm], 0).await?;
    let (a_cpu, b_cpu) = (cpu_secs(a.pid()), cpu_secs(b.pid()));
    let t = Instant::now();
    assign_protected(&a, &recovery_address, &[&vm], true).await?;
    let (took, sync) = wait_sync(&a, pb::VraSyncKind::Delta, t).await?;
    let (a_cpu, b_cpu) = (cpu_secs(a.pid()) - a_cpu, cpu_secs(b.pid()) - b_cpu);
    let wire = match &link {
        Some((link, _)) => {
            let state = link.state().await?;
            state.a_to_b.bytes + state.b_to_a.bytes
        }
        None => sync.sent_bytes + sync.hash_bytes,
    };
    let ratio = rs.as_secs_f64() / took.as_secs_f64();
    let wire_ratio = wire as f64 / rs_wire.max(1) as f64;
    let met = ratio >= 4.0 && wire_ratio <= 0.2;
    println!(
        "tandem delta sync: {:.2} s, {wire} bytes on the wire ({:.2} MiB; data {} bytes, hashes \
         {} bytes) (protected cpu {a_cpu:.1} s, recovery cpu {b_cpu:.1} s)",
        took.as_secs_f64(),
        wire as f64 / MIB as f64,
        sync.sent_bytes,
        sync.hash_bytes
    );
    println!(
        "ratio delta sync: {ratio:.2}x rsync's speed, wire {wire_ratio:.3}x rsync's bytes ({})",
        if met {
            "ok"
        } else {
            "BELOW FLOOR: 4x the speed, 0.2x the bytes"
        },
    );
    rows.push(Row {
        bench: format!(
            "delta sync {} MiB, {}% changed",
            size / MIB,
            s.delta_percent
        ),
        tandem: format!(
            "{:.2} s, {:.2} MiB on the wire",
            took.as_secs_f64(),
            wire as f64 / MIB as f64
        ),
        yardstick: format!(
            "rsync {:.2} s, {:.2} MiB on the wire",
            rs.as_secs_f64(),
            rs_wire as f64 / MIB as f64
        ),
        ratio: format!("{ratio:.2}x speed, {wire_ratio:.3}x bytes"),
        figure: ratio,
        unit: "x rsync's speed",
        floor: ">= 4x speed, <= 0.2x bytes".into(),
        met,
        machine: format!("{machine} / {machine2}"),
    });
    drop(a);
    drop(b);
    links.shutdown().await;
    s.clean(&root);
    Ok(())
}
