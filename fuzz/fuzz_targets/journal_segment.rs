//! Fuzz target `journal_segment`: see `tandem_journal::fuzz::segment`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_journal::fuzz::segment(data));
