//! Labs of real Tandem processes on loopback, and the demo that drives one.

pub mod demo;
pub mod lab;
