//! The benchmarks of `tandem-lab`, each beside its yardstick in the same run: the config
//! store vs etcd (`store`), the managers at scale (`scale`), and the VRA's data path, one
//! file per benchmark (`vra`).

pub mod scale;
pub mod store;
pub mod vra;
