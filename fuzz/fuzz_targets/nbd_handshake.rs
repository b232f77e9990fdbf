//! Fuzz target `nbd_handshake`: see `tandem_nbd::fuzz::handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_nbd::fuzz::handshake(data));
