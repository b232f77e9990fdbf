//! Images the benchmarks write before a run: zeros, random data, a scribbled percentage.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use tandem_testkit::workload::SplitMix64;

use super::settings::*;

pub(super) fn create_parent(path: &Path) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    Ok(())
}

/// A file of `size` bytes written with zeroes (allocated, unlike a sparse file).
pub(super) fn zero_file(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    create_parent(path)?;
    let mut f = std::fs::File::create(path)?;
    let buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// A file of `size` bytes of pseudo-random data.
pub(super) fn random_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    create_parent(path)?;
    let mut f = std::fs::File::create(path)?;
    let mut noise = SplitMix64(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        noise.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Overwrites `percent`% of the 4 KiB blocks of `path` (distinct blocks) with new random
/// data; returns how many.
pub(super) fn scribble(path: &Path, percent: f64, seed: u64) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = f.metadata()?.len() / 4096;
    let n = ((blocks as f64) * percent / 100.0).ceil() as u64;
    let mut noise = SplitMix64(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < n.min(blocks) {
        chosen.insert(noise.next_u64() % blocks);
    }
    let mut buf = vec![0u8; 4096];
    for b in &chosen {
        noise.fill(&mut buf);
        f.write_all_at(&buf, b * 4096)?;
    }
    Ok(chosen.len() as u64)
}

/// Empties a benchmark's work directory (a round may follow one that was kept or failed).
pub(super) fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    Ok(dir.to_path_buf())
}
