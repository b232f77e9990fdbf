//! Fuzz target `nbd_transmission`: see `tandem_nbd::fuzz::transmission`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_nbd::fuzz::transmission(data));
