//! The programs others wrote that tests and benchmarks measure Tandem against: qemu-io,
//! qemu-img, nbdkit; and small process helpers (a free port, a port that listens, a
//! process's CPU time).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Runs a program to its end: its exit code (-1 if killed) and its output.
pub fn run(program: &str, args: &[&str]) -> Result<(i32, String)> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// `qemu-io -f raw -c CMD...` against an NBD URI; an error if it fails or reports one.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String> {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let (code, out) = run("qemu-io", &args)?;
    if code != 0 || out.contains("error") || out.contains("failed") {
        bail!("qemu-io {cmds:?} on {uri}: {out}");
    }
    Ok(out)
}

/// `qemu-img compare` of two raw images (files or NBD URIs): 0 identical, 1 different.
pub fn qemu_img_compare(a: &str, b: &str) -> Result<(i32, String)> {
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b])
}

/// A port free on loopback now (a yardstick that cannot take port 0 binds it next).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts connections at `addr`.
pub async fn wait_port(addr: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{what} does not listen on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Clock ticks per second of `/proc/PID/stat`.
fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) a process has used; 0 when it is gone.
pub fn cpu_secs(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clk_tck()
}

/// nbdkit's file plugin serving one file on loopback; killed when dropped.
#[derive(Debug)]
pub struct Nbdkit {
    child: Child,
    addr: String,
}

impl Nbdkit {
    pub async fn start(file: &Path, readonly: bool) -> Result<Self> {
        let port = free_port()?;
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()]);
        if readonly {
            cmd.arg("-r");
        }
        let child = cmd
            .arg("file")
            .arg(format!("file={}", file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting nbdkit (Debian package nbdkit)")?;
        let addr = format!("127.0.0.1:{port}");
        wait_port(&addr, "nbdkit").await?;
        Ok(Self { child, addr })
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}/", self.addr)
    }

    pub fn cpu(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
