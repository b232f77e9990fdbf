//! What tests, the lab and the benchmarks share: processes of Tandem and of the yardsticks
//! (killed on drop), the lab topology, the link emulator, the verifying workload and its
//! checker, fault helpers, and `eventually` for conditions that converge.

pub mod eventually;
pub mod fault;
pub mod lab;
pub mod link;
pub mod link_control;
pub mod operator;
pub mod process;
pub mod protect;
pub mod vra;
pub mod workload;
pub mod yardstick;
