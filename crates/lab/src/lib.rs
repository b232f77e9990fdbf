//! The `tandem-lab` program's library: the demo that drives a two-site lab, the benchmarks,
//! and the example deployment. Labs themselves, the link emulator and the workload are in
//! `tandem-testkit`.

pub mod bench;
pub mod demo;
pub mod example;
pub mod units;
