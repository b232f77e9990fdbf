//! 3. Initial sync of a volume of random data vs `nbdcopy` between two nbdkit exports.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use tandem_proto::v1::{self as pb};
use tokio::process::Command;

use tandem_testkit::yardstick::{Nbdkit, cpu_secs};

use super::files::*;
use super::harness::*;
use super::machine::*;
use super::settings::*;

pub(super) async fn bench_initial_sync(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let size = s.sync_bytes;
    println!(
        "\n== initial sync of {} MiB of random data vs nbdcopy between two nbdkit exports",
        size / MIB
    );
    let root = fresh_dir(&s.dir.join("initial"))?;
    let vm = Placement::new(&root, "vm-1", size);
    random_file(&vm.image, size, 7)?;

    // nbdcopy: nbdkit (read-only) on the source, nbdkit on a fresh sparse file.
    let dst = root.join("nbdcopy-dst.raw");
    std::fs::File::create(&dst)?.set_len(size)?;
    let src_kit = Nbdkit::start(&vm.image, true).await?;
    let dst_kit = Nbdkit::start(&dst, false).await?;
    let machine = quiet(s).await;
    let t = Instant::now();
    let out = Command::new("nbdcopy")
        .arg("--flush")
        .arg(src_kit.uri())
        .arg(dst_kit.uri())
        .output()
        .await
        .context("running nbdcopy")?;
    let copy = t.elapsed();
    if !out.status.success() {
        bail!("nbdcopy failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    src_kit.stop().await;
    dst_kit.stop().await;
    std::fs::remove_file(&dst)?;
    let copy_mbs = size as f64 / copy.as_secs_f64() / 1e6;
    println!(
        "nbdcopy --flush: {:.2} s, {copy_mbs:.0} MB/s",
        copy.as_secs_f64()
    );

    let b = start_vra(s, &root, "host-b", None).await?;
    let a = start_vra(s, &root, "host-a", None).await?;
    let machine2 = quiet(s).await;
    assign_recovery(&b, &[&vm], 0).await?;
    let (a_cpu, b_cpu) = (cpu_secs(a.pid()), cpu_secs(b.pid()));
    let t = Instant::now();
    assign_protected(&a, &b.control, &[&vm], false).await?;
    let (took, sync) = wait_sync(&a, pb::VraSyncKind::Initial, t).await?;
    let (a_cpu, b_cpu) = (cpu_secs(a.pid()) - a_cpu, cpu_secs(b.pid()) - b_cpu);
    let mbs = size as f64 / took.as_secs_f64() / 1e6;
    let ratio = copy.as_secs_f64() / took.as_secs_f64();
    println!(
        "tandem initial sync: {:.2} s, {mbs:.0} MB/s, sent {} MiB (protected cpu {a_cpu:.1} s, \
         recovery cpu {b_cpu:.1} s)",
        took.as_secs_f64(),
        sync.sent_bytes / MIB
    );
    println!(
        "ratio initial sync: {ratio:.2}x nbdcopy's speed ({})",
        if ratio >= 1.0 {
            "ok"
        } else {
            "BELOW FLOOR 1.0x"
        }
    );
    rows.push(Row {
        bench: format!("initial sync {} MiB", size / MIB),
        tandem: format!("{:.2} s, {mbs:.0} MB/s", took.as_secs_f64()),
        yardstick: format!(
            "nbdcopy --flush {:.2} s, {copy_mbs:.0} MB/s",
            copy.as_secs_f64()
        ),
        ratio: format!("{ratio:.2}x"),
        figure: ratio,
        unit: "x nbdcopy",
        floor: ">= 1.0x".into(),
        met: ratio >= 1.0,
        machine: format!("{machine} / {machine2}"),
    });
    drop(a);
    drop(b);
    s.clean(&root);
    Ok(())
}
