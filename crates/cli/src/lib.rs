//! The parts of `tandem`, the command-line client (`src/main.rs`), that other crates reach:
//! spec files, and (feature `fuzzing`) the entry point of their fuzz target in `fuzz/`.

#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod spec;
