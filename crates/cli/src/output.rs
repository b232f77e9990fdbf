//! Output for people (tables) and scripts (`-o json`).

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Prints rows as a table, or `value` as JSON.
pub fn print<T: Serialize + ?Sized>(
    format: Format,
    value: &T,
    header: &[&str],
    rows: Vec<Vec<String>>,
) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("messages serialize")
        ),
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_BORDERS_ONLY);
            t.set_header(header.iter().copied());
            for r in rows {
                t.add_row(r);
            }
            println!("{t}");
        }
    }
}

/// Formats bytes for people: 10.0 GiB.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}
