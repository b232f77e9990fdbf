//! Fuzz target `spec_file`: see `tandem_cli::fuzz::spec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_cli::fuzz::spec(data));
