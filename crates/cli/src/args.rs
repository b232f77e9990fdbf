//! Arguments several nouns share: a spec file, the create/get/list/edit/delete verbs of inventory kinds, durations.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub(crate) struct FileArg {
    /// Spec file (YAML, or TOML by extension).
    #[arg(long = "file", short = 'f')]
    pub(crate) file: PathBuf,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Crud {
    /// Creates from a spec file.
    Create(FileArg),
    Get {
        id: String,
    },
    List,
    /// Replaces the object with the spec file's content.
    Edit {
        id: String,
        #[command(flatten)]
        file: FileArg,
    },
    Delete {
        id: String,
    },
}

/// Seconds from `90`, `90s`, `90m`, `12h` or `30d`.
pub(crate) fn duration_secs(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration (like 90m, 12h or 30d)"))?;
    let per = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{s:?}: the unit must be s, m, h or d"),
    };
    n.checked_mul(per)
        .ok_or_else(|| anyhow::anyhow!("{s:?} is too long"))
}
