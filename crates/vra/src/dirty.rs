//! Which regions of a protected VPG's volumes still have to reach the recovery site, as
//! pure data (no IO): regions written while the stream could not carry them (bitmap sync)
//! and regions never sent (initial sync, which may skip regions that are all zero because
//! a fresh replica is zero there). Persisted with a checksum so that a cleanly stopped VRA
//! resumes with a bitmap sync instead of a delta sync.

use tandem_core::ids::VmId;
use tandem_journal::VolumeId;

/// Granularity of the map: a write anywhere in a region makes the whole region dirty.
pub const REGION: u64 = 64 << 10;

/// Regions of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMap {
    /// The VM.
    pub vm: VmId,
    /// The volume.
    pub volume: VolumeId,
    size: u64,
    /// Must be sent as they are.
    dirty: Bits,
    /// Never sent: the replica holds zeroes there (plus whatever the stream carried).
    initial: Bits,
}

/// A run of regions taken for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Byte offset (a multiple of [`REGION`]).
    pub offset: u64,
    /// Bytes (regions, the last one possibly short at the end of the volume).
    pub len: u64,
    /// Per region of the run: it must be sent even when it reads as zeroes.
    pub must_send: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Bits {
    words: Vec<u64>,
    count: u64,
}

impl Bits {
    fn new(regions: u64) -> Self {
        Self {
            words: vec![0; usize::try_from(regions.div_ceil(64)).unwrap_or(0)],
            count: 0,
        }
    }

    fn get(&self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set(&mut self, i: u64) {
        let (w, b) = ((i / 64) as usize, i % 64);
        if let Some(x) = self.words.get_mut(w)
            && *x & (1 << b) == 0
        {
            *x |= 1 << b;
            self.count += 1;
        }
    }

    fn clear(&mut self, i: u64) {
        let (w, b) = ((i / 64) as usize, i % 64);
        if let Some(x) = self.words.get_mut(w)
            && *x & (1 << b) != 0
        {
            *x &= !(1 << b);
            self.count -= 1;
        }
    }

    /// The first set bit at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while let Some(x) = self.words.get(w) {
            let hit = x & mask;
            if hit != 0 {
                return Some(w as u64 * 64 + u64::from(hit.trailing_zeros()));
            }
            w += 1;
            mask = !0;
        }
        None
    }

    fn resized(&self, regions: u64) -> Self {
        let mut out = Self::new(regions);
        for i in 0..regions {
            if self.get(i) {
                out.set(i);
            }
        }
        out
    }
}

impl VolumeMap {
    /// A clean map of a volume of `size` bytes.
    pub fn new(vm: VmId, volume: VolumeId, size: u64) -> Self {
        let regions = size.div_ceil(REGION);
        Self {
            vm,
            volume,
            size,
            dirty: Bits::new(regions),
            initial: Bits::new(regions),
        }
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn regions(&self) -> u64 {
        self.size.div_ceil(REGION)
    }

    fn region_len(&self, i: u64) -> u64 {
        (self.size - i * REGION).min(REGION)
    }

    fn span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        offset / REGION..end.div_ceil(REGION)
    }

    /// Marks `offset..offset+len` as to be sent (clipped to the volume).
    pub fn mark_dirty(&mut self, offset: u64, len: u64) {
        for i in self.span(offset, len) {
            self.dirty.set(i);
        }
    }

    /// Marks the whole volume as never sent (initial sync).
    pub fn mark_initial(&mut self) {
        self.mark_initial_from(0);
    }

    fn mark_initial_from(&mut self, offset: u64) {
        for i in offset.div_ceil(REGION)..self.regions() {
            self.initial.set(i);
        }
    }

    /// Bytes still to examine (word by word: syncs ask for it after every run).
    pub fn pending_bytes(&self) -> u64 {
        let regions: u64 = self
            .dirty
            .words
            .iter()
            .zip(&self.initial.words)
            .map(|(d, i)| u64::from((d | i).count_ones()))
            .sum();
        let last = self.regions().saturating_sub(1);
        let short = if regions > 0 && self.pending(last) {
            REGION - self.region_len(last)
        } else {
            0
        };
        regions * REGION - short
    }

    /// Whether any region is left.
    pub fn is_clean(&self) -> bool {
        self.dirty.count == 0 && self.initial.count == 0
    }

    /// Whether regions never sent are left.
    pub fn has_initial(&self) -> bool {
        self.initial.count > 0
    }

    /// Whether no region was ever sent (a volume new to the VPG).
    pub fn all_initial(&self) -> bool {
        self.initial.count == self.regions()
    }

    fn next_pending(&self, from: u64) -> Option<u64> {
        match (self.dirty.next_set(from), self.initial.next_set(from)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn pending(&self, i: u64) -> bool {
        self.dirty.get(i) || self.initial.get(i)
    }

    /// Takes (and clears) the next run of up to `max_regions` consecutive pending regions.
    pub fn take_run(&mut self, max_regions: u64) -> Option<Run> {
        let first = self.next_pending(0)?;
        let mut must_send = Vec::new();
        let mut len = 0;
        let mut i = first;
        while i < self.regions() && (i - first) < max_regions.max(1) && self.pending(i) {
            must_send.push(self.dirty.get(i));
            len += self.region_len(i);
            self.dirty.clear(i);
            self.initial.clear(i);
            i += 1;
        }
        Some(Run {
            offset: first * REGION,
            len,
            must_send,
        })
    }

    /// The same map for the volume at a new size: regions past the old end are never sent.
    pub fn resize(&self, size: u64) -> Self {
        let regions = size.div_ceil(REGION);
        let mut out = Self {
            vm: self.vm.clone(),
            volume: self.volume,
            size,
            dirty: self.dirty.resized(regions),
            initial: self.initial.resized(regions),
        };
        if size > self.size {
            // The old last region may have been short: the grown part of it was never sent.
            let old_end = self.size - self.size % REGION;
            if !self.size.is_multiple_of(REGION) {
                out.dirty.set(old_end / REGION);
            }
            out.mark_initial_from(self.size.div_ceil(REGION) * REGION);
        }
        out
    }
}

/// The maps of every protected volume of a VPG on this VRA.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyMap {
    volumes: Vec<VolumeMap>,
}

const MAGIC: &[u8; 8] = b"TNDMDRT1";
/// Largest volume count a persisted map may claim (4 controllers x 15 volumes x many VMs).
const MAX_VOLUMES: u64 = 1 << 16;
/// Largest volume a persisted map may claim (64 TiB).
const MAX_SIZE: u64 = 64 << 40;

/// Why a persisted map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dirty map: {0}")]
pub struct DecodeError(String);

impl DirtyMap {
    /// Maps of the given volumes, all clean.
    pub fn new(volumes: impl IntoIterator<Item = (VmId, VolumeId, u64)>) -> Self {
        Self {
            volumes: volumes
                .into_iter()
                .map(|(vm, vol, size)| VolumeMap::new(vm, vol, size))
                .collect(),
        }
    }

    /// The volume maps.
    pub fn volumes(&self) -> &[VolumeMap] {
        &self.volumes
    }

    /// The map of one volume, by position.
    pub fn volume_mut(&mut self, index: usize) -> Option<&mut VolumeMap> {
        self.volumes.get_mut(index)
    }

    /// The position of a volume.
    pub fn index_of(&self, vm: &VmId, volume: VolumeId) -> Option<usize> {
        self.volumes
            .iter()
            .position(|v| &v.vm == vm && v.volume == volume)
    }

    /// Bytes still to examine over all volumes.
    pub fn pending_bytes(&self) -> u64 {
        self.volumes.iter().map(VolumeMap::pending_bytes).sum()
    }

    /// Whether nothing is left.
    pub fn is_clean(&self) -> bool {
        self.volumes.iter().all(VolumeMap::is_clean)
    }

    /// Carries this map over to a new set of volumes (an assignment at a new generation):
    /// kept volumes keep their regions (resized if their size changed), new volumes are
    /// never sent, removed volumes are dropped.
    pub fn carry_to(&self, volumes: impl IntoIterator<Item = (VmId, VolumeId, u64)>) -> Self {
        Self {
            volumes: volumes
                .into_iter()
                .map(|(vm, vol, size)| match self.index_of(&vm, vol) {
                    Some(i) if self.volumes[i].size == size => self.volumes[i].clone(),
                    Some(i) => self.volumes[i].resize(size),
                    None => {
                        let mut m = VolumeMap::new(vm, vol, size);
                        m.mark_initial();
                        m
                    }
                })
                .collect(),
        }
    }

    /// The persisted form: magic, volumes (VM id, volume id, size, both bitmaps), CRC32C.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.volumes.len() as u64).to_le_bytes());
        for v in &self.volumes {
            let vm = v.vm.as_str().as_bytes();
            out.extend_from_slice(&(vm.len() as u64).to_le_bytes());
            out.extend_from_slice(vm);
            out.extend_from_slice(&v.volume.0.to_le_bytes());
            out.extend_from_slice(&v.size.to_le_bytes());
            for bits in [&v.dirty, &v.initial] {
                for w in &bits.words {
                    out.extend_from_slice(&w.to_le_bytes());
                }
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses [`DirtyMap::encode`]'s output; every length is bounded and checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let err = |m: &str| DecodeError(m.to_string());
        let (body, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or_else(|| err("too short"))?;
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err(err("checksum mismatch"));
        }
        let mut r = Reader { bytes: body };
        if r.take(8)? != MAGIC {
            return Err(err("bad magic"));
        }
        let count = r.u64()?;
        if count > MAX_VOLUMES {
            return Err(err("too many volumes"));
        }
        let mut volumes = Vec::new();
        for _ in 0..count {
            let vm_len = r.u64()?;
            if vm_len > 64 {
                return Err(err("vm id too long"));
            }
            let vm = std::str::from_utf8(r.take(vm_len as usize)?)
                .map_err(|_| err("vm id is not utf-8"))?;
            let vm = VmId::parse("vm", vm).map_err(|e| DecodeError(e.to_string()))?;
            let volume = VolumeId(r.u32()?);
            let size = r.u64()?;
            if size > MAX_SIZE {
                return Err(err("volume too large"));
            }
            let mut map = VolumeMap::new(vm, volume, size);
            for i in 0..2 {
                let bits = if i == 0 {
                    &mut map.dirty
                } else {
                    &mut map.initial
                };
                for w in bits.words.iter_mut() {
                    *w = r.u64()?;
                }
                let regions = size.div_ceil(REGION);
                if !regions.is_multiple_of(64)
                    && let Some(last) = bits.words.last()
                    && last >> (regions % 64) != 0
                {
                    return Err(err("bits past the end of a volume"));
                }
                bits.count = bits.words.iter().map(|w| u64::from(w.count_ones())).sum();
            }
            volumes.push(map);
        }
        if !r.bytes.is_empty() {
            return Err(err("trailing bytes"));
        }
        Ok(Self { volumes })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError("truncated".into()));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn vm(s: &str) -> VmId {
        VmId::parse("vm", s).unwrap()
    }

    #[test]
    fn marks_cover_whole_regions_and_runs_take_them_once() {
        let mut m = VolumeMap::new(vm("a"), VolumeId(1), 10 * REGION + 100);
        m.mark_dirty(REGION + 5, 10);
        m.mark_dirty(2 * REGION, REGION + 1);
        assert_eq!(m.pending_bytes(), 3 * REGION);
        let run = m.take_run(16).unwrap();
        assert_eq!(run.offset, REGION);
        assert_eq!(run.len, 3 * REGION);
        assert_eq!(run.must_send, vec![true; 3]);
        assert!(m.is_clean());
        assert_eq!(m.take_run(16), None);
    }

    #[test]
    fn pending_bytes_equal_the_sum_of_the_regions_runs_take() {
        // Marks overlapping dirty and initial regions at assorted places, short tail too.
        let size = 200 * REGION + 777;
        let mut m = VolumeMap::new(vm("a"), VolumeId(1), size);
        m.mark_initial_from(150 * REGION);
        for k in 0..40u64 {
            m.mark_dirty((k * 7919 * 4096) % size, 3 * 4096 + k);
        }
        m.mark_dirty(size - 1, 1);
        let mut left = m.pending_bytes();
        while let Some(run) = m.take_run(5) {
            assert!(run.len <= left, "{run:?} beyond {left}");
            left -= run.len;
            assert_eq!(m.pending_bytes(), left);
        }
        assert_eq!(left, 0);
    }

    #[test]
    fn initial_regions_may_be_skipped_but_dirty_ones_not_and_the_short_tail_counts() {
        let mut m = VolumeMap::new(vm("a"), VolumeId(1), 3 * REGION + 512);
        m.mark_initial();
        m.mark_dirty(REGION, 1);
        assert_eq!(m.pending_bytes(), 3 * REGION + 512);
        let run = m.take_run(2).unwrap();
        assert_eq!((run.offset, run.len), (0, 2 * REGION));
        assert_eq!(run.must_send, vec![false, true]);
        let run = m.take_run(8).unwrap();
        assert_eq!((run.offset, run.len), (2 * REGION, REGION + 512));
        assert!(m.is_clean());
    }

    #[test]
    fn marks_past_the_end_are_clipped() {
        let mut m = VolumeMap::new(vm("a"), VolumeId(1), REGION);
        m.mark_dirty(REGION * 5, 100);
        m.mark_dirty(u64::MAX - 1, 100);
        assert!(m.is_clean());
    }

    #[test]
    fn carrying_over_keeps_regions_adds_new_volumes_as_initial_and_grows_as_initial() {
        let mut d = DirtyMap::new([(vm("a"), VolumeId(1), 4 * REGION)]);
        d.volume_mut(0).unwrap().mark_dirty(0, 1);
        let c = d.carry_to([
            (vm("a"), VolumeId(1), 6 * REGION),
            (vm("b"), VolumeId(1), 2 * REGION),
        ]);
        assert_eq!(c.volumes()[0].pending_bytes(), 3 * REGION);
        assert!(c.volumes()[1].has_initial());
        assert_eq!(c.pending_bytes(), 5 * REGION);
        let shrunk = d.carry_to([(vm("a"), VolumeId(1), REGION)]);
        assert_eq!(shrunk.pending_bytes(), REGION);
    }

    #[test]
    fn damaged_persisted_maps_are_refused() {
        let mut d = DirtyMap::new([(vm("a"), VolumeId(1), 100 * REGION)]);
        d.volume_mut(0).unwrap().mark_dirty(7 * REGION, 3 * REGION);
        let bytes = d.encode();
        assert_eq!(DirtyMap::decode(&bytes).unwrap(), d);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(DirtyMap::decode(&b).is_err(), "flip at {i} accepted");
        }
        for n in 0..bytes.len() {
            assert!(DirtyMap::decode(&bytes[..n]).is_err());
        }
    }

    proptest! {
        #[test]
        fn taking_runs_returns_exactly_the_marked_regions(
            size in 1u64..(40 * REGION),
            marks in proptest::collection::vec((0u64..(45 * REGION), 1u64..(3 * REGION)), 0..20),
            max in 1u64..8,
        ) {
            let mut m = VolumeMap::new(vm("a"), VolumeId(1), size);
            let mut expected = std::collections::BTreeSet::new();
            for (o, l) in &marks {
                m.mark_dirty(*o, *l);
                let end = (o + l).min(size);
                if *o < end {
                    for r in o / REGION..end.div_ceil(REGION) {
                        expected.insert(r);
                    }
                }
            }
            let back = DirtyMap::decode(&DirtyMap { volumes: vec![m.clone()] }.encode()).unwrap();
            prop_assert_eq!(&back.volumes()[0], &m);
            let mut got = std::collections::BTreeSet::new();
            while let Some(run) = m.take_run(max) {
                prop_assert!(run.must_send.len() as u64 <= max);
                for k in 0..run.must_send.len() as u64 {
                    prop_assert!(got.insert(run.offset / REGION + k));
                }
                prop_assert!(run.offset + run.len <= size);
            }
            prop_assert_eq!(got, expected);
        }
    }
}
