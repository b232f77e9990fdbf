//! `tandem-lab bench-vra`: the VRA's benchmarks, each side by side with its yardstick in
//! one run, with the ratios printed:
//!
//! 1. write path: fio (nbd engine) 4 KiB randwrite QD32 and 1 MiB sequential write QD8
//!    against a protected volume that replicates to a recovery VRA on the same machine
//!    (journal fsynced), vs the same fio against nbdkit's file plugin on a raw file; the
//!    replication lag (acknowledged at the protected side -> durable at the recovery side)
//!    comes from `GetStatus` samples of `written_seq` and `acked_seq`;
//! 2. checkpoint barrier: fio completion latency of one QD32 job on each of two protected
//!    VRAs of one VPG, without and with a checkpoint (freeze both, thaw both) every second;
//! 3. initial sync of a volume of random data vs `nbdcopy` between two nbdkit exports;
//! 4. delta sync of a preseeded volume with 1% of its 4 KiB blocks changed vs
//!    `rsync --inplace --no-whole-file`, with the bytes on the wire of each;
//! 5. RTO of a failover: 10 VMs x 2 volumes with 1 GiB of unpromoted journal, from
//!    `StartRecovery` to every recovered volume answering an NBD read, vs restoring the
//!    same volumes by copy (`nbdcopy` of each to a file) and vs promoting the journal
//!    before serving (the commit's promotion and merge, timed in the same run).
//!
//! It reports and never asserts: a missed floor is printed, the run still succeeds.
//! Before each measured run it waits for the machine to be quiet (no `rustc` running).

mod checkpoint;
mod delta_sync;
mod files;
mod fio;
mod harness;
mod initial_sync;
mod lag;
mod machine;
mod managed;
mod moves;
mod nbd_tls;
mod rto;
mod settings;
#[cfg(test)]
mod tests;
mod tls;
mod write;

use anyhow::{Context, Result, bail};

use checkpoint::*;
use delta_sync::*;
use initial_sync::*;
use machine::*;
use managed::*;
use moves::*;
use nbd_tls::*;
use rto::*;
use settings::*;
pub use settings::{Args, Which};
use tls::*;
use write::*;

/// Runs the selected benchmarks and prints every result, the ratios and a summary table.
pub async fn run(args: Args) -> Result<()> {
    let s = Settings::from_args(&args)?;
    for tool in ["fio", "nbdkit", "nbdcopy", "rsync", "pgrep"] {
        if which(tool).is_none() {
            bail!("missing {tool}: run scripts/install-test-deps.sh");
        }
    }
    if s.dir.exists() {
        std::fs::remove_dir_all(&s.dir).with_context(|| format!("clearing {}", s.dir.display()))?;
    }
    std::fs::create_dir_all(&s.dir)?;
    println!(
        "vra benchmarks: {} cpus, load {}, dir {}, vra {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        s.dir.display(),
        s.vra_bin.display()
    );
    println!(
        "settings: write {} s, checkpoint {} s every {} ms, initial sync {} MiB, delta sync {} MiB \
         ({}% of 4 KiB blocks), volumes {} MiB, ram {} MiB, journal limit {} MiB",
        s.write_secs,
        s.cp_secs,
        s.cp_interval.as_millis(),
        s.sync_bytes / MIB,
        s.delta_bytes / MIB,
        s.delta_percent,
        s.volume_bytes / MIB,
        s.ram_mb,
        s.journal_limit / MIB
    );
    let mut rows = Vec::new();
    let rounds = args.rounds.max(1);
    for round in 1..=rounds {
        if rounds > 1 {
            println!("\n#### round {round} of {rounds}");
        }
        for which in [
            Which::Write,
            Which::Checkpoint,
            Which::Initial,
            Which::Delta,
            Which::Managed,
            Which::Rto,
            Which::Move,
            Which::Tls,
            Which::NbdTls,
        ] {
            if !args.only.contains(&which) {
                continue;
            }
            let r = match which {
                Which::Write => bench_write(&s, &mut rows).await,
                Which::Checkpoint => bench_checkpoint(&s, &mut rows).await,
                Which::Initial => bench_initial_sync(&s, &mut rows).await,
                Which::Delta => bench_delta_sync(&s, &mut rows).await,
                Which::Managed => bench_checkpoint_managed(&s, &mut rows).await,
                Which::Rto => bench_rto(&s, &mut rows).await,
                Which::Move => bench_move(&s, &mut rows).await,
                Which::Tls => bench_tls(&s, &mut rows, round).await,
                Which::NbdTls => bench_nbd_tls(&s, &mut rows, round).await,
            };
            if let Err(e) = r {
                println!("{which:?} benchmark failed: {e:#}");
            }
        }
    }
    println!();
    println!("| benchmark | tandem | yardstick | ratio | floor | met | machine |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.bench,
            r.tandem,
            r.yardstick,
            r.ratio,
            r.floor,
            if r.met { "yes" } else { "**no**" },
            r.machine
        );
    }
    if rounds > 1 {
        print_medians(&rows);
    }
    s.clean(&s.dir);
    Ok(())
}

/// Per benchmark, the median, least and greatest figure over the rounds, and in how many
/// rounds the floor was met.
fn print_medians(rows: &[Row]) {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.bench.as_str()) {
            names.push(&r.bench);
        }
    }
    println!();
    println!("| benchmark | rounds | median | min | max | floor | met in |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for name in names {
        let of: Vec<&Row> = rows.iter().filter(|r| r.bench == name).collect();
        let mut figures: Vec<f64> = of.iter().map(|r| r.figure).collect();
        figures.sort_by(f64::total_cmp);
        let unit = of[0].unit;
        println!(
            "| {name} | {} | {:.2}{unit} | {:.2}{unit} | {:.2}{unit} | {} | {} of {} |",
            of.len(),
            figures[figures.len() / 2],
            figures[0],
            figures[figures.len() - 1],
            of[0].floor,
            of.iter().filter(|r| r.met).count(),
            of.len()
        );
    }
}
