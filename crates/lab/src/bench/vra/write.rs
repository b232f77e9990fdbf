//! 1. The write path: fio randwrite and sequential write on a replicating volume vs nbdkit.

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use tandem_testkit::yardstick::{Nbdkit, cpu_secs};

use super::files::*;
use super::fio::*;
use super::harness::*;
use super::lag::*;
use super::machine::*;
use super::settings::*;

pub(super) async fn bench_write(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    println!("\n== write path: fio nbd engine, protected VRA -> recovery VRA vs nbdkit file");
    let root = fresh_dir(&s.dir.join("write"))?;
    let size = s.volume_bytes;
    let raw = root.join("nbdkit.raw");
    zero_file(&raw, size)?;
    let vm = Placement::new(&root, "vm-1", size);
    zero_file(&vm.image, size)?;
    let kit = Nbdkit::start(&raw, false).await?;
    let b = start_vra(s, &root, "host-b", None).await?;
    let a = start_vra(s, &root, "host-a", None).await?;
    assign_recovery(&b, &[&vm], s.journal_limit).await?;
    assign_protected(&a, &b.control, &[&vm], false).await?;
    wait_level(&a, Duration::from_secs(600)).await?;
    let uri = a.uri("vm-1/0");
    for (rw, bs, qd, label) in [
        ("randwrite", "4k", 32, "4 KiB randwrite QD32"),
        ("write", "1M", 8, "1 MiB seq write QD8"),
    ] {
        let machine = quiet(s).await;
        let kit_cpu = kit.cpu();
        let yard = fio(&[kit.uri()], rw, bs, qd, size, s.write_secs).await?;
        let kit_cpu = kit.cpu() - kit_cpu;
        println!(
            "{label} nbdkit: {} (nbdkit cpu {kit_cpu:.1} s)",
            yard.line()
        );

        let machine2 = quiet(s).await;
        let stop = CancellationToken::new();
        let sampler = spawn_sampler(a.client().await?, s.lag_sample, stop.clone());
        let (a_cpu, b_cpu) = (cpu_secs(a.pid()), cpu_secs(b.pid()));
        let ours = fio(std::slice::from_ref(&uri), rw, bs, qd, size, s.write_secs).await?;
        let fio_end = Instant::now();
        let caught_up = wait_level(&a, Duration::from_secs(300)).await;
        let drain = fio_end.elapsed();
        // One more period so that the last acknowledgement is sampled.
        tokio::time::sleep(s.lag_sample * 2).await;
        stop.cancel();
        let samples = sampler.await?;
        let (a_cpu, b_cpu) = (cpu_secs(a.pid()) - a_cpu, cpu_secs(b.pid()) - b_cpu);
        let lag = Lag::from_samples(&samples, s.lag_sample);
        let ratio = ours.iops / yard.iops.max(1e-9);
        println!(
            "{label} tandem: {} (protected cpu {a_cpu:.1} s, recovery cpu {b_cpu:.1} s)",
            ours.line()
        );
        println!(
            "{label} tandem: {}; level {:.1} s after fio ended{}",
            lag.line(),
            drain.as_secs_f64(),
            if caught_up.is_err() {
                " (NOT caught up)"
            } else {
                ""
            }
        );
        let throughput_ok = ratio >= 0.9;
        let lag_ok = lag.p99_ms <= 1000.0 && lag.unacked == 0 && lag.tracking_secs == 0.0;
        println!(
            "ratio {label}: {ratio:.2}x nbdkit ({}), lag p99 {:.0} ms ({})",
            if throughput_ok {
                "ok"
            } else {
                "BELOW FLOOR 0.9x"
            },
            lag.p99_ms,
            if lag_ok {
                "ok"
            } else {
                "ABOVE 1 s OR FELL BACK TO TRACKING"
            }
        );
        if bs == "1M" {
            // Every byte acknowledged must become durable in the journal on this machine's
            // disk: its durable write rate bounds what can replicate without falling back.
            let disk = fio_disk_ceiling(&root.join("disk-ceiling.tmp"), size, s.write_secs.min(20))
                .await?;
            println!(
                "disk ceiling (fio psync 1 MiB sequential writes, fdatasync every 8 MiB, same \
                 disk as the journal): {:.1} MB/s = {:.2}x nbdkit's rate; the floor asks the \
                 journal to make {:.1} MB/s durable",
                disk.bytes_per_sec / 1e6,
                disk.bytes_per_sec / yard.bytes_per_sec.max(1.0),
                0.9 * yard.bytes_per_sec / 1e6
            );
        }
        rows.push(Row {
            bench: format!("write {label}"),
            tandem: format!(
                "{:.0} IOPS, {:.1} MB/s, lag p50 {:.0} ms p99 {:.0} ms{}",
                ours.iops,
                ours.bytes_per_sec / 1e6,
                lag.p50_ms,
                lag.p99_ms,
                if lag.tracking_secs > 0.0 {
                    format!(", tracked {:.1} s", lag.tracking_secs)
                } else {
                    String::new()
                }
            ),
            yardstick: format!(
                "nbdkit {:.0} IOPS, {:.1} MB/s",
                yard.iops,
                yard.bytes_per_sec / 1e6
            ),
            ratio: format!("{ratio:.2}x"),
            floor: ">= 0.9x, lag p99 <= 1 s".into(),
            met: throughput_ok && lag_ok,
            machine: format!("{machine} / {machine2}"),
            figure: ratio,
            unit: "x nbdkit",
        });
    }
    drop(a);
    drop(b);
    kit.stop().await;
    s.clean(&root);
    Ok(())
}
