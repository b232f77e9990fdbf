//! The one binary encoding of Raft structures, on disk and on the wire: bincode 1 with
//! variable-length integers and a size limit on decoding, so a corrupt length prefix cannot
//! make a node allocate without bound.

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest encoded value accepted when decoding (a snapshot chunk or a batch of entries).
pub const MAX_DECODED_BYTES: u64 = 256 * 1024 * 1024;

/// Encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
#[error("codec: {0}")]
pub struct CodecError(#[from] bincode::Error);

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_limit(MAX_DECODED_BYTES)
}

/// Encodes a value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(options().serialize(value)?)
}

/// Decodes a value encoded by [`encode`]; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(options().deserialize(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reject_garbage() {
        let v: (u64, String) = (7, "x".into());
        let b = encode(&v).unwrap();
        assert_eq!(decode::<(u64, String)>(&b).unwrap(), v);
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(decode::<(u64, String)>(&trailing).is_err());
        // A length prefix far beyond the limit must fail instead of allocating.
        let huge = [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode::<Vec<u8>>(&huge).is_err());
    }
}
