//! The cost of mutual TLS on the data path: the write path and the initial sync, plaintext and with TLS, in one run.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tandem_proto::v1::{self as pb};
use tokio::process::Command;

use tandem_testkit::process::VraProcess;
use tandem_testkit::yardstick::cpu_secs;

use super::files::*;
use super::fio::*;
use super::harness::*;
use super::machine::*;
use super::settings::*;

/// The same VRA pair plaintext and with mutual TLS, one after the other in one run: the
/// 4 KiB randwrite QD32 of the write path and the initial sync of `sync_bytes` of random
/// data (floor: TLS at least 0.9x of plaintext on both).
/// The runs of a two-mode comparison: `first` then the other, then mirrored, `per_mode`
/// runs of each in all (A B B A A B ...), so that neither mode always runs first or
/// meets what the other left behind (its files being freed, the page cache).
pub(super) fn alternating(first: usize, per_mode: usize) -> Vec<usize> {
    let (a, b) = (first, 1 - first);
    (0..2 * per_mode)
        .map(|i| if matches!(i % 4, 0 | 3) { a } else { b })
        .collect()
}

/// One measured run of the TLS comparison: its figure (higher is better), what is
/// printed of it, and the machine's state before it.
#[derive(Clone, Debug)]
pub(super) struct TlsRun {
    pub(super) figure: f64,
    pub(super) shown: String,
    pub(super) machine: String,
}

/// The better run of a mode, and every run's figure as printed.
pub(super) fn best_run(runs: &[TlsRun]) -> (TlsRun, String) {
    let best = runs
        .iter()
        .max_by(|a, b| a.figure.total_cmp(&b.figure))
        .cloned()
        .unwrap_or(TlsRun {
            figure: 0.0,
            shown: String::new(),
            machine: String::new(),
        });
    let all = runs
        .iter()
        .map(|r| r.shown.clone())
        .collect::<Vec<_>>()
        .join(", ");
    (best, all)
}

/// A fresh VRA pair in `dir` (with mutual TLS when `ca` is given): host-a protects VM
/// `vm-1`, one zeroed volume of the benchmark's size, to host-b; answered once level.
pub(super) async fn protected_pair(
    s: &Settings,
    dir: &Path,
    ca: Option<&tandem_tls::pki::SiteCa>,
) -> Result<(VraProcess, VraProcess)> {
    let vm = Placement::new(dir, "vm-1", s.volume_bytes);
    zero_file(&vm.image, s.volume_bytes)?;
    let b = start_vra(s, dir, "host-b", ca).await?;
    let a = start_vra(s, dir, "host-a", ca).await?;
    assign_recovery(&b, &[&vm], s.journal_limit).await?;
    assign_protected(&a, &b.control, &[&vm], false).await?;
    wait_level(&a, Duration::from_secs(600)).await?;
    Ok((a, b))
}

/// AES-128-GCM's own cost on this CPU, in CPU seconds per GiB (seal, open) of 16 KiB
/// records, as `openssl speed` measures it on one core: what a TLS byte must cost at
/// least, to set the VRAs' CPU beside (OpenSSL's implementation, not ring's that the VRAs'
/// rustls uses; the workspace times no cipher code itself).
pub(super) async fn aead_secs_per_gib() -> Result<(f64, f64)> {
    async fn bytes_per_sec(decrypt: bool) -> Result<f64> {
        let mut cmd = Command::new("openssl");
        cmd.arg("speed");
        if decrypt {
            cmd.arg("-decrypt");
        }
        let out = cmd
            .args([
                "-evp",
                "aes-128-gcm",
                "-bytes",
                "16384",
                "-seconds",
                "1",
                "-mr",
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .context("running openssl speed")?;
        // Machine-readable: `+F:<n>:AES-128-GCM:<bytes per second>`.
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| l.strip_prefix("+F:"))
            .filter_map(|l| l.rsplit(':').next()?.trim().parse::<f64>().ok())
            .find(|rate| *rate > 0.0)
            .ok_or_else(|| anyhow!("openssl speed printed no rate: {text}"))
    }
    let gib = (1u64 << 30) as f64;
    Ok((
        gib / bytes_per_sec(false).await?,
        gib / bytes_per_sec(true).await?,
    ))
}

pub(super) async fn bench_tls(s: &Settings, rows: &mut Vec<Row>, round: usize) -> Result<()> {
    // Each round after the first swaps which mode runs first.
    let first = if round.is_multiple_of(2) { 1 } else { 0 };
    let root = fresh_dir(&s.dir.join("tls"))?;
    let ca = tandem_tls::pki::SiteCa::generate("site-bench")?;
    let modes: [(&str, Option<&tandem_tls::pki::SiteCa>); 2] =
        [("plaintext", None), ("mutual TLS", Some(&ca))];
    // The runs of one mode swing more between runs than TLS costs here (the disk under
    // the journal above all): each mode runs several times, alternating, and the better
    // run of each is compared.
    println!(
        "\n== TLS cost on the data path: one VRA pair, plaintext and with mutual TLS, \
         alternating ({} first)",
        modes[first].0
    );

    let mut write: [Vec<TlsRun>; 2] = [Vec::new(), Vec::new()];
    for m in alternating(first, 2) {
        let (name, tls) = modes[m];
        let dir = root.join(format!("write-{m}-{}", write[m].len()));
        let (a, b) = protected_pair(s, &dir, tls).await?;
        let machine = quiet(s).await;
        let (a_cpu, b_cpu) = (cpu_secs(a.pid()), cpu_secs(b.pid()));
        let r = fio(
            &[a.uri("vm-1/0")],
            "randwrite",
            "4k",
            32,
            s.volume_bytes,
            s.write_secs,
        )
        .await?;
        let caught_up = wait_level(&a, Duration::from_secs(300)).await.is_ok();
        let (a_cpu, b_cpu) = (cpu_secs(a.pid()) - a_cpu, cpu_secs(b.pid()) - b_cpu);
        println!(
            "4 KiB randwrite QD32, {name}: {} (protected cpu {a_cpu:.1} s, recovery cpu \
             {b_cpu:.1} s){}",
            r.line(),
            if caught_up { "" } else { " (NOT caught up)" }
        );
        write[m].push(TlsRun {
            figure: r.iops,
            shown: format!("{:.0}", r.iops),
            machine,
        });
        drop(a);
        drop(b);
        s.clean(&dir);
    }
    let ((plain, plain_all), (tls, tls_all)) = (best_run(&write[0]), best_run(&write[1]));
    let ratio = tls.figure / plain.figure.max(1e-9);
    println!(
        "ratio TLS 4 KiB randwrite QD32: {ratio:.2}x plaintext (the better run of each: \
         plaintext {plain_all} IOPS, TLS {tls_all} IOPS)"
    );
    rows.push(Row {
        bench: "TLS: 4 KiB randwrite QD32".into(),
        tandem: format!("{:.0} IOPS with mutual TLS (runs {tls_all})", tls.figure),
        yardstick: format!("{:.0} IOPS plaintext (runs {plain_all})", plain.figure),
        ratio: format!("{ratio:.2}x"),
        figure: ratio,
        unit: "x plaintext",
        floor: ">= 0.9x".into(),
        met: ratio >= 0.9,
        machine: format!("{} / {}", plain.machine, tls.machine),
    });

    let size = s.sync_bytes;
    let mut sync: [Vec<TlsRun>; 2] = [Vec::new(), Vec::new()];
    for m in alternating(first, 3) {
        let (name, tls) = modes[m];
        let dir = root.join(format!("sync-{m}-{}", sync[m].len()));
        let vm = Placement::new(&dir, "vm-1", size);
        random_file(&vm.image, size, 7)?;
        let b = start_vra(s, &dir, "host-b", tls).await?;
        let a = start_vra(s, &dir, "host-a", tls).await?;
        assign_recovery(&b, &[&vm], 0).await?;
        let machine = quiet(s).await;
        let (a_cpu, b_cpu) = (cpu_secs(a.pid()), cpu_secs(b.pid()));
        let t = Instant::now();
        assign_protected(&a, &b.control, &[&vm], false).await?;
        let (took, _) = wait_sync(&a, pb::VraSyncKind::Initial, t).await?;
        let (a_cpu, b_cpu) = (cpu_secs(a.pid()) - a_cpu, cpu_secs(b.pid()) - b_cpu);
        let mbs = size as f64 / took.as_secs_f64() / 1e6;
        let gib = size as f64 / (1024.0 * MIB as f64);
        println!(
            "initial sync {} MiB, {name}: {:.2} s, {mbs:.0} MB/s (protected cpu {a_cpu:.1} s, \
             {:.2} s/GiB; recovery cpu {b_cpu:.1} s, {:.2} s/GiB)",
            size / MIB,
            took.as_secs_f64(),
            a_cpu / gib,
            b_cpu / gib
        );
        sync[m].push(TlsRun {
            figure: mbs,
            shown: format!("{:.2}", took.as_secs_f64()),
            machine,
        });
        drop(a);
        drop(b);
        s.clean(&dir);
    }
    let ((plain, plain_all), (tls, tls_all)) = (best_run(&sync[0]), best_run(&sync[1]));
    let ratio = tls.figure / plain.figure.max(1e-9);
    let secs = |r: &TlsRun| size as f64 / r.figure.max(1e-9) / 1e6;
    let (seal, open) = aead_secs_per_gib().await?;
    println!(
        "AES-128-GCM itself (openssl speed, 16 KiB records, one core, this run): seal \
         {seal:.3} s/GiB, open {open:.3} s/GiB: about the least TLS can add to the sending \
         and the receiving VRA"
    );
    println!(
        "ratio TLS initial sync: {ratio:.2}x plaintext's speed (the faster run of each: \
         plaintext {plain_all} s, TLS {tls_all} s)"
    );
    rows.push(Row {
        bench: format!("TLS: initial sync {} MiB", size / MIB),
        tandem: format!(
            "{:.2} s, {:.0} MB/s with mutual TLS (runs {tls_all} s)",
            secs(&tls),
            tls.figure
        ),
        yardstick: format!(
            "{:.2} s, {:.0} MB/s plaintext (runs {plain_all} s)",
            secs(&plain),
            plain.figure
        ),
        ratio: format!("{ratio:.2}x"),
        figure: ratio,
        unit: "x plaintext",
        floor: ">= 0.85x".into(),
        met: ratio >= 0.85,
        machine: format!("{} / {}", plain.machine, tls.machine),
    });
    s.clean(&root);
    Ok(())
}
