//! Fuzz target `tokens`: see `tandem_core::fuzz::tokens`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_core::fuzz::tokens(data));
