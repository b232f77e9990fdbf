//! Labs of real Tandem processes on loopback, and the demo that drives one.

pub mod bench;
pub mod demo;
pub mod lab;
