//! Entry point of the `spec_file` fuzz target in `fuzz/` (built with the `fuzzing`
//! feature), also replayed over the checked-in corpus by `tests/tests/fuzz_corpus.rs`: the
//! text of a spec file parsed into each kind of spec and converted into its request, as
//! `tandem create` and `tandem edit` do. Any panic is a bug.

use crate::spec::{
    DatastoreSpec, HostSpec, PoolSpec, SpecFormat, VmSpec, VpgSpecFile, parse, parse_size,
};

/// Input: a selector byte (bits 0-2: host, datastore, pool, vm, vpg, or a bare size; bit
/// 3: TOML rather than YAML), then the file's text.
pub fn spec(data: &[u8]) {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    // `read` refuses files that are not UTF-8.
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let format = if selector & 8 != 0 {
        SpecFormat::Toml
    } else {
        SpecFormat::Yaml
    };
    match selector & 7 {
        0 => {
            if let Ok(spec) = parse::<HostSpec>(text, format) {
                spec.into_proto();
            }
        }
        1 => {
            if let Ok(spec) = parse::<DatastoreSpec>(text, format) {
                let _ = spec.into_proto();
            }
        }
        2 => {
            if let Ok(spec) = parse::<PoolSpec>(text, format) {
                let _ = spec.into_proto();
            }
        }
        3 => {
            if let Ok(spec) = parse::<VmSpec>(text, format) {
                let _ = spec.into_proto();
            }
        }
        4 => {
            if let Ok(spec) = parse::<VpgSpecFile>(text, format) {
                let _ = spec.into_proto();
            }
        }
        _ => {
            let size = parse_size(text);
            // A whole number of bytes is taken exactly, or refused when it does not fit.
            let digits = text.trim();
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                assert_eq!(size.ok(), digits.parse::<u64>().ok(), "size {digits:?}");
            }
        }
    }
}
