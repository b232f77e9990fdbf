//! Labs of real Tandem processes on loopback, their link emulator, and the demo that drives
//! one.

pub mod bench;
pub mod bench_scale;
pub mod bench_vra;
pub mod demo;
pub mod example;
pub mod fault;
pub mod lab;
pub mod link;
pub mod link_control;
pub mod protect;
pub mod units;
pub mod workload;
