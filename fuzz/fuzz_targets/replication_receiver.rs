//! Fuzz target `replication_receiver`: see `tandem_vra::fuzz::replication_receiver`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_vra::fuzz::replication_receiver(data));
