//! Block hashes for delta sync, shared by both roles: the recovery VRA hashes its newest
//! durable image (`Replication.BlockHashes`), the protected VRA hashes its own volume the
//! same way and sends only the blocks whose hashes differ. A block's hash is the first
//! [`HASH_LEN`] bytes of the BLAKE3 hash of its bytes; a short last block (at the end of
//! a volume) is hashed as it is. [`check_request`] is the request validation, without IO.

use tandem_core::{DomainError, Violations};

/// Bytes of one block hash.
pub const HASH_LEN: usize = 16;
/// Bytes read and hashed at a time by either side, unless a block is larger: small enough
/// to stay in the CPU's cache between the read and the hash.
pub const SCAN_CHUNK: u64 = 1 << 20;
/// Smallest block size of a request (4 KiB).
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
/// Largest block size of a request (16 MiB).
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// Most blocks one request may cover.
pub const MAX_BLOCKS: u64 = 4096;
/// Most bytes one request may cover (1 GiB).
pub const MAX_LENGTH: u64 = 1 << 30;

/// The hash of one block: BLAKE3 of its bytes, truncated to [`HASH_LEN`].
#[must_use]
pub fn block_hash(bytes: &[u8]) -> [u8; HASH_LEN] {
    let mut out = [0; HASH_LEN];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..HASH_LEN]);
    out
}

/// Block hashing jobs (delta sync scans, on either side) at once in the process: each
/// keeps a core busy with BLAKE3 while it runs, and each side's jobs wait on the other side
/// part of the time, so two keep both sides busy; more would take more of the host's cores
/// from replication and VM IO than a sync is worth.
pub static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Appends the hash of every `block_size` block of `data` to `out`, in order (the last
/// block may be short).
///
/// # Panics
///
/// If `block_size` is 0.
pub fn hash_blocks(data: &[u8], block_size: usize, out: &mut Vec<u8>) {
    assert!(block_size > 0, "block size 0");
    out.reserve(data.len().div_ceil(block_size) * HASH_LEN);
    for block in data.chunks(block_size) {
        out.extend_from_slice(&block_hash(block));
    }
}

/// Checks a hashes request against a volume of `volume_size` bytes; returns the number
/// of blocks it covers, or every field that is wrong. Rules: `block_size` is a power of
/// two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`]; `offset` is a multiple of it;
/// `length` is not 0, covers at most [`MAX_BLOCKS`] blocks and [`MAX_LENGTH`] bytes, and
/// is a multiple of `block_size` unless the range ends at the end of the volume; the
/// range lies within the volume.
pub fn check_request(
    offset: u64,
    length: u64,
    block_size: u32,
    volume_size: u64,
) -> Result<usize, DomainError> {
    let mut v = Violations::new();
    let size_ok =
        block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size);
    v.check(
        size_ok,
        "block_size",
        format!(
            "must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, not {block_size}"
        ),
    );
    v.check(length > 0, "length", "must not be 0");
    v.check(
        length <= MAX_LENGTH,
        "length",
        format!("at most {MAX_LENGTH} bytes in one request, not {length}"),
    );
    let bs = u64::from(block_size);
    let blocks = length.div_ceil(bs.max(1));
    let end = offset.checked_add(length);
    if size_ok {
        v.check(
            offset.is_multiple_of(bs),
            "offset",
            format!("must be a multiple of block_size {bs}, not {offset}"),
        );
        v.check(
            blocks <= MAX_BLOCKS,
            "length",
            format!("at most {MAX_BLOCKS} blocks of {bs} bytes in one request, not {blocks}"),
        );
        v.check(
            length.is_multiple_of(bs) || end == Some(volume_size),
            "length",
            format!(
                "must be a multiple of block_size {bs} unless the range ends at the end of the \
                 volume ({volume_size} bytes)"
            ),
        );
    }
    if offset >= volume_size {
        v.add(
            "offset",
            format!("{offset} is not inside the volume ({volume_size} bytes)"),
        );
    } else if end.is_none_or(|e| e > volume_size) {
        v.add(
            "length",
            format!("{offset}+{length} runs past the end of the volume ({volume_size} bytes)"),
        );
    }
    v.into_result()?;
    // At most MAX_BLOCKS here.
    Ok(usize::try_from(blocks).unwrap_or(usize::MAX))
}

/// Smallest coarse block of a compare request (8 KiB: two fine blocks of the smallest size).
pub const MIN_COARSE_BLOCK_SIZE: u32 = 2 * MIN_BLOCK_SIZE;
/// Most fine blocks in one coarse block of a compare request.
pub const MAX_FINE_PER_COARSE: u32 = 256;
/// Most fine hashes one compare answer may carry (every coarse block differing): 1 MiB.
pub const MAX_FINE_HASHES: u64 = 1 << 16;

/// Checks a compare request (a [`check_request`] range in coarse blocks, the fine block
/// size, and the sender's coarse hashes) against a volume of `volume_size` bytes; returns
/// the number of coarse blocks, or every field that is wrong.
pub fn check_compare(
    offset: u64,
    length: u64,
    coarse: u32,
    fine: u32,
    coarse_hashes: usize,
    volume_size: u64,
) -> Result<usize, DomainError> {
    let mut v = Violations::new();
    v.check(
        coarse >= MIN_COARSE_BLOCK_SIZE,
        "coarse_block_size",
        format!("must be at least {MIN_COARSE_BLOCK_SIZE}, not {coarse}"),
    );
    let fine_ok = fine.is_power_of_two()
        && fine >= MIN_BLOCK_SIZE
        && fine < coarse
        && coarse / fine <= MAX_FINE_PER_COARSE;
    v.check(
        fine_ok,
        "fine_block_size",
        format!(
            "must be a power of two of at least {MIN_BLOCK_SIZE}, below coarse_block_size {coarse} and at least 1/{MAX_FINE_PER_COARSE} of it, not {fine}"
        ),
    );
    let blocks = match check_request(offset, length, coarse, volume_size) {
        Ok(n) => Some(n),
        Err(DomainError::Invalid(fields)) => {
            for f in fields {
                let field = if f.field == "block_size" {
                    "coarse_block_size".to_string()
                } else {
                    f.field
                };
                v.add(field, f.message);
            }
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(n) = blocks {
        v.check(
            coarse_hashes == n * HASH_LEN,
            "coarse_hashes",
            format!(
                "must hold {HASH_LEN} bytes for each of the {n} coarse blocks, not {coarse_hashes}                  bytes"
            ),
        );
        if fine_ok {
            let fine_total = n as u64 * u64::from(coarse / fine);
            v.check(
                fine_total <= MAX_FINE_HASHES,
                "length",
                format!("at most {MAX_FINE_HASHES} fine blocks in one request, not {fine_total}"),
            );
        }
    }
    v.into_result()?;
    Ok(blocks.unwrap_or(0))
}

/// Length of block `k` of `block` bytes in a range of `len` bytes (the last may be short;
/// a block past the end is empty).
#[must_use]
pub fn block_len(len: u64, block: u64, k: u32) -> u64 {
    block.min(len.saturating_sub(u64::from(k).saturating_mul(block)))
}

/// Whether a compare answer fits the range it answers, `len` bytes in `coarse` blocks:
/// its differing blocks are ascending positions within the range, and its `fine_hashes`
/// bytes hold one hash for each `fine` block of each of them (a short block hashed as it
/// is). The protected VRA checks an answer with it before using it.
#[must_use]
pub fn compare_answer_fits(
    len: u64,
    coarse: u64,
    fine: u64,
    differing: &[u32],
    fine_hashes: usize,
) -> bool {
    let blocks = len.div_ceil(coarse.max(1));
    let ascending = differing.windows(2).all(|w| w[0] < w[1]);
    let in_range = differing.last().is_none_or(|&b| u64::from(b) < blocks);
    let fine_blocks = differing
        .iter()
        .map(|&b| block_len(len, coarse, b).div_ceil(fine.max(1)))
        .fold(0u64, u64::saturating_add);
    ascending && in_range && fine_blocks.checked_mul(HASH_LEN as u64) == Some(fine_hashes as u64)
}

/// What a compare found in one stretch of coarse blocks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Differences {
    /// Positions of the differing coarse blocks, ascending.
    pub differing: Vec<u32>,
    /// The fine hashes of each differing coarse block, in order.
    pub fine_hashes: Vec<u8>,
}

impl Differences {
    /// Compares `data` (whole coarse blocks, the last possibly short), whose first block
    /// is coarse block `first` of the request, with `theirs` (the sender's hashes of those
    /// blocks) and records the blocks that differ with their fine hashes.
    ///
    /// # Panics
    ///
    /// If a block size is 0 or `theirs` is shorter than the blocks of `data`.
    pub fn add(&mut self, data: &[u8], first: u32, coarse: usize, fine: usize, theirs: &[u8]) {
        for (k, block) in data.chunks(coarse).enumerate() {
            let want = &theirs[k * HASH_LEN..(k + 1) * HASH_LEN];
            if block_hash(block) != want {
                self.differing.push(first + k as u32);
                hash_blocks(block, fine, &mut self.fine_hashes);
            }
        }
    }
}

/// Whether fine block `k`, holding `bytes`, hashes differently from its hash in `theirs`
/// (the other side's fine hashes of the same range; a missing hash counts as different).
pub fn fine_differs(theirs: &[u8], k: usize, bytes: &[u8]) -> bool {
    theirs.get(k * HASH_LEN..(k + 1) * HASH_LEN) != Some(&block_hash(bytes)[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn fields(r: Result<usize, DomainError>) -> Vec<String> {
        match r {
            Err(DomainError::Invalid(f)) => f.into_iter().map(|f| f.field).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn hashes_are_truncated_blake3_per_block() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(block_hash(&data)[..], blake3::hash(&data).as_bytes()[..16]);
        let mut out = Vec::new();
        hash_blocks(&data, 4096, &mut out);
        assert_eq!(out.len(), 3 * HASH_LEN);
        assert_eq!(out[..16], block_hash(&data[..4096]));
        assert_eq!(out[16..32], block_hash(&data[4096..8192]));
        assert_eq!(out[32..], block_hash(&data[8192..]), "short last block");
        hash_blocks(&[], 4096, &mut out);
        assert_eq!(out.len(), 3 * HASH_LEN, "no blocks, no hashes");
    }

    #[test]
    fn compare_finds_differing_blocks_and_their_fine_runs() {
        let mut mine: Vec<u8> = (0..(64 << 10) * 3 + 5000)
            .map(|i| (i % 251) as u8)
            .collect();
        let theirs_data = mine.clone();
        // Change one fine block of coarse block 1 and the short tail of block 3.
        mine[(64 << 10) + 4096 * 3 + 7] ^= 1;
        let n = mine.len();
        mine[n - 1] ^= 1;
        let mut coarse_mine = Vec::new();
        hash_blocks(&mine, 64 << 10, &mut coarse_mine);
        let mut d = Differences::default();
        // The receiver compares its data with the sender's hashes, in two stretches.
        d.add(
            &theirs_data[..64 << 10],
            0,
            64 << 10,
            4096,
            &coarse_mine[..16],
        );
        d.add(
            &theirs_data[64 << 10..],
            1,
            64 << 10,
            4096,
            &coarse_mine[16..],
        );
        assert_eq!(d.differing, [1, 3]);
        assert_eq!(
            d.fine_hashes.len(),
            (16 + 2) * HASH_LEN,
            "short block: 2 fine blocks"
        );
        // The sender finds the fine blocks to send.
        let differing = |block: &[u8], theirs: &[u8]| -> Vec<usize> {
            (block.chunks(4096).enumerate())
                .filter(|(k, b)| fine_differs(theirs, *k, b))
                .map(|(k, _)| k)
                .collect()
        };
        let b1 = &mine[64 << 10..128 << 10];
        assert_eq!(differing(b1, &d.fine_hashes[..16 * HASH_LEN]), [3]);
        let b3 = &mine[3 * (64 << 10)..];
        assert_eq!(
            differing(b3, &d.fine_hashes[16 * HASH_LEN..]),
            [1],
            "the short one"
        );
        assert_eq!(differing(b1, &[]).len(), 16, "no hashes: all");
    }

    #[test]
    fn compare_requests_are_checked() {
        let h = |n: usize| n * HASH_LEN;
        assert_eq!(
            check_compare(0, 16 << 20, 64 << 10, 4096, h(256), GIB),
            Ok(256)
        );
        let bad = |r| match r {
            Err(DomainError::Invalid(f)) => f.into_iter().map(|f| f.field).collect::<Vec<_>>(),
            other => panic!("expected field errors, got {other:?}"),
        };
        assert_eq!(
            bad(check_compare(0, 16 << 20, 64 << 10, 4096, h(255), GIB)),
            ["coarse_hashes"]
        );
        assert_eq!(
            bad(check_compare(0, 4096, 4096, 4096, h(1), GIB)),
            ["coarse_block_size", "fine_block_size"]
        );
        assert_eq!(
            bad(check_compare(0, 16 << 20, 16 << 20, 4096, h(1), GIB)),
            ["fine_block_size"],
            "4096 fine blocks per coarse block"
        );
        assert_eq!(
            bad(check_compare(0, 1 << 30, 1 << 20, 4096, h(1024), 2 * GIB)),
            ["length"],
            "1024 x 256 fine hashes"
        );
        assert_eq!(
            bad(check_compare(4096, 64 << 10, 64 << 10, 4096, h(1), GIB)),
            ["offset"]
        );
    }

    #[test]
    fn good_requests_give_their_block_count() {
        assert_eq!(check_request(0, GIB, 1 << 20, 4 * GIB), Ok(1024));
        assert_eq!(check_request(GIB, 4096 * 4096, 4096, 4 * GIB), Ok(4096));
        assert_eq!(check_request(0, 16 << 20, 16 << 20, 4 * GIB), Ok(1));
        // A short last block at the end of the volume.
        let size = 10 * 4096 + 512;
        assert_eq!(check_request(8 * 4096, 2 * 4096 + 512, 4096, size), Ok(3));
        assert_eq!(check_request(0, size, 1 << 20, size), Ok(1));
    }

    #[test]
    fn bad_requests_name_their_fields() {
        assert_eq!(fields(check_request(0, 3000, 3000, GIB)), ["block_size"]);
        assert_eq!(fields(check_request(0, 2048, 2048, GIB)), ["block_size"]);
        assert_eq!(
            fields(check_request(0, 32 << 20, 32 << 20, GIB)),
            ["block_size"]
        );
        assert_eq!(fields(check_request(0, 4096, 0, GIB)), ["block_size"]);
        assert_eq!(fields(check_request(512, 4096, 4096, GIB)), ["offset"]);
        assert_eq!(fields(check_request(0, 0, 4096, GIB)), ["length"]);
        assert_eq!(fields(check_request(0, 4097 * 4096, 4096, GIB)), ["length"]);
        assert_eq!(
            fields(check_request(0, 2 * GIB, 16 << 20, 4 * GIB)),
            ["length"],
            "over 1 GiB"
        );
        assert_eq!(
            fields(check_request(0, 4096 + 1, 4096, GIB)),
            ["length"],
            "short block not at the end"
        );
        assert_eq!(fields(check_request(GIB, 4096, 4096, GIB)), ["offset"]);
        assert_eq!(
            fields(check_request(GIB - 4096, 8192, 4096, GIB)),
            ["length"]
        );
        assert_eq!(
            fields(check_request(u64::MAX - 4095, 8192, 4096, GIB)),
            ["offset"]
        );
        assert_eq!(
            fields(check_request(513, 0, 3000, GIB)),
            ["block_size", "length"],
            "every problem at once"
        );
    }
}
