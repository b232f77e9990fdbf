//! Storage faults for labs and tests: a small tmpfs to fill a datastore, and a file that
//! takes its free space (needs root, as the lab's link faults do).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A tmpfs of a fixed size mounted at a directory for the life of the guard.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` MiB at `dir` (created if missing).
    pub fn mount(dir: &Path, size_mib: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("mount point {}", dir.display()))?;
        let target = dir.to_str().context("mount point is not UTF-8")?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m"),
                "tmpfs",
                target,
            ],
        )
        .context("mounting a tmpfs needs root")?;
        Ok(Self(dir.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(p) = self.0.to_str() {
            let _ = run("umount", &["-l", p]);
        }
    }
}

/// Allocates `path` so that about `leave_mib` MiB stay free on its filesystem.
pub fn fill_leaving(path: &Path, leave_mib: u64) -> Result<()> {
    let dir = path.parent().context("a filler needs a directory")?;
    let dir = dir.to_str().context("directory is not UTF-8")?;
    let out = Command::new("df")
        .args(["--output=avail", "-B1", dir])
        .output()
        .context("running df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let free: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("free space of {dir} from df: {text:?}"))?;
    let take = free.saturating_sub(leave_mib << 20);
    let target = path.to_str().context("filler path is not UTF-8")?;
    run("fallocate", &["-l", &take.to_string(), target])
}
