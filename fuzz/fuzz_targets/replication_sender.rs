//! Fuzz target `replication_sender`: see `tandem_vra::fuzz::replication_sender`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_vra::fuzz::replication_sender(data));
