//! Fuzz target `journal_open`: see `tandem_journal::fuzz::open`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_journal::fuzz::open(data));
