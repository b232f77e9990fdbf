//! fio's nbd engine (and its file engine for the disk's ceiling), run and parsed.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, anyhow, bail};
use tokio::process::Command;

/// What one fio run achieved (writes only; merged over its jobs).
#[derive(Debug, Clone, Copy)]
pub(super) struct Fio {
    pub(super) iops: f64,
    pub(super) bytes_per_sec: f64,
    pub(super) clat_p50_us: f64,
    pub(super) clat_p99_us: f64,
    pub(super) clat_p999_us: f64,
    pub(super) clat_max_us: f64,
}

impl Fio {
    pub(super) fn line(&self) -> String {
        format!(
            "{:.0} IOPS {:.1} MB/s clat p50 {:.0} us p99 {:.0} us p99.9 {:.0} us max {:.1} ms",
            self.iops,
            self.bytes_per_sec / 1e6,
            self.clat_p50_us,
            self.clat_p99_us,
            self.clat_p999_us,
            self.clat_max_us / 1000.0
        )
    }
}

/// fio's nbd engine, one job per URI (each `qd` deep), reported as one group.
pub(super) async fn fio(
    uris: &[String],
    rw: &str,
    bs: &str,
    qd: u32,
    size: u64,
    secs: u64,
) -> Result<Fio> {
    fio_rated(uris, rw, bs, qd, size, secs, 0).await
}

/// [`fio`] over `nbds://` with the NBD client certificates in `certs`. fio's engine does
/// not let libnbd read a `tls-certificates` directory named in the URI, so libnbd takes
/// its default one: `$HOME/.pki/libnbd`, which it reads only when not root (as root it
/// reads `/etc/pki/libnbd`, the machine's). So fio runs with a home of its own holding
/// the certificates there, as `nobody` when the benchmark runs as root.
pub(super) async fn fio_tls(uri: &str, certs: &Path, secs: u64, size: u64) -> Result<Fio> {
    const NOBODY: u32 = 65534;
    let home = certs.join("home");
    let pki = home.join(".pki/libnbd");
    std::fs::create_dir_all(&pki)?;
    // /proc/self belongs to the effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(certs.join(f), pki.join(f))?;
    }
    let fio_args = fio_command("randwrite", "4k", 32, size, secs, 0);
    let mut cmd = if root {
        for p in [&home, &home.join(".pki"), &pki] {
            std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY))?;
        }
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            std::os::unix::fs::chown(pki.join(f), Some(NOBODY), Some(NOBODY))?;
        }
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(fio_args.as_std().get_program())
            .args(fio_args.as_std().get_args());
        c
    } else {
        fio_args
    };
    cmd.env("HOME", &home)
        .arg("--name=j0")
        .arg(format!("--uri={uri}"));
    run_fio(cmd).await
}

/// fio's command line for the nbd engine, without jobs.
pub(super) fn fio_command(
    rw: &str,
    bs: &str,
    qd: u32,
    size: u64,
    secs: u64,
    rate_iops: u64,
) -> Command {
    let mut cmd = Command::new("fio");
    if rate_iops > 0 {
        cmd.arg(format!("--rate_iops={rate_iops}"));
    }
    cmd.args([
        "--ioengine=nbd",
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--iodepth={qd}"),
        &format!("--size={size}"),
        &format!("--runtime={secs}"),
        "--time_based",
        "--group_reporting",
        "--output-format=json",
    ]);
    cmd
}

/// [`fio`] with every job capped at `rate_iops` (0: no cap).
pub(super) async fn fio_rated(
    uris: &[String],
    rw: &str,
    bs: &str,
    qd: u32,
    size: u64,
    secs: u64,
    rate_iops: u64,
) -> Result<Fio> {
    let mut cmd = fio_command(rw, bs, qd, size, secs, rate_iops);
    for (i, uri) in uris.iter().enumerate() {
        cmd.arg(format!("--name=j{i}")).arg(format!("--uri={uri}"));
    }
    run_fio(cmd).await
}

/// The disk's ceiling for durable sequential writes: fio writing 1 MiB blocks to a file
/// at `path` (on the journal's disk), with an fdatasync after every 8 of them.
pub(super) async fn fio_disk_ceiling(path: &Path, size: u64, secs: u64) -> Result<Fio> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=disk",
        "--ioengine=psync",
        "--rw=write",
        "--bs=1M",
        "--fdatasync=8",
        &format!("--size={size}"),
        &format!("--runtime={secs}"),
        "--time_based",
        "--output-format=json",
    ])
    .arg(format!("--filename={}", path.display()));
    let r = run_fio(cmd).await;
    let _ = std::fs::remove_file(path);
    r
}

/// Runs fio (with JSON output) and reads the first job's write figures.
pub(super) async fn run_fio(mut cmd: Command) -> Result<Fio> {
    let out = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running fio")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find('{').map(|i| &text[i..]).ok_or_else(|| {
        anyhow!(
            "fio printed no json: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(json).context("parsing fio's json")?;
    let job = &v["jobs"][0];
    if !out.status.success() || job.is_null() || job["error"].as_i64().unwrap_or(0) != 0 {
        bail!(
            "fio job failed ({}): {}",
            job["error"],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let w = &job["write"];
    let clat = &w["clat_ns"];
    let pct = |k: &str| clat["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Fio {
        iops: w["iops"].as_f64().unwrap_or(0.0),
        bytes_per_sec: w["bw_bytes"].as_f64().unwrap_or(0.0),
        clat_p50_us: pct("50.000000"),
        clat_p99_us: pct("99.000000"),
        clat_p999_us: pct("99.900000"),
        clat_max_us: clat["max"].as_f64().unwrap_or(0.0) / 1000.0,
    })
}
