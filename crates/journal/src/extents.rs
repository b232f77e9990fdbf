//! A region map: non-overlapping byte ranges of a volume, each mapped to where its
//! newest content lives (a place in the journal, zeroes, or the scratch overlay).
//! Inserting a range overwrites whatever it overlaps (newest wins).

use std::collections::BTreeMap;

use crate::types::SegmentId;

/// Where the bytes of a mapped range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Journal data: `pos` is the segment offset of the range's first byte.
    Journal {
        /// Segment holding the data.
        segment: SegmentId,
        /// Segment offset of the byte at the start of the range.
        pos: u64,
    },
    /// Zeroes (write-zeroes or trim).
    Zero,
    /// The scratch overlay file, at the same offset as in the volume.
    Scratch,
}

impl Source {
    fn advanced(self, by: u64) -> Source {
        match self {
            Source::Journal { segment, pos } => Source::Journal {
                segment,
                pos: pos + by,
            },
            other => other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    end: u64,
    src: Source,
}

/// Map of volume ranges to sources, newest wins.
#[derive(Debug, Clone, Default)]
pub struct ExtentMap {
    map: BTreeMap<u64, Extent>,
}

/// A piece of a looked-up range: `src` is `None` where nothing is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Volume offset of the piece.
    pub start: u64,
    /// Length of the piece.
    pub len: u64,
    /// Its source, positioned at `start`.
    pub src: Option<Source>,
}

impl ExtentMap {
    /// An empty map.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of extents.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no range is mapped.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Maps `[start, start + len)` to `src`, replacing anything it overlaps.
    pub fn insert(&mut self, start: u64, len: u64, src: Source) {
        if len == 0 {
            return;
        }
        let end = start + len;
        // An extent beginning before `start` that reaches into the range.
        if let Some((&k, &e)) = self.map.range(..start).next_back()
            && e.end > start
        {
            self.map.insert(
                k,
                Extent {
                    end: start,
                    src: e.src,
                },
            );
            if e.end > end {
                self.map.insert(
                    end,
                    Extent {
                        end: e.end,
                        src: e.src.advanced(end - k),
                    },
                );
            }
        }
        // Extents beginning inside the range.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            if let Some(e) = self.map.remove(&k)
                && e.end > end
            {
                self.map.insert(
                    end,
                    Extent {
                        end: e.end,
                        src: e.src.advanced(end - k),
                    },
                );
            }
        }
        self.map.insert(start, Extent { end, src });
    }

    /// Unmaps `[start, start + len)`.
    pub fn remove(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        // Any source will do: the range is split out of its neighbours, then dropped.
        self.insert(start, len, Source::Scratch);
        self.map.remove(&start);
    }

    /// Whether any part of `[start, start + len)` is mapped.
    #[must_use]
    pub fn intersects(&self, start: u64, len: u64) -> bool {
        let end = start + len;
        self.map
            .range(..end)
            .next_back()
            .is_some_and(|(_, e)| e.end > start)
    }

    /// Splits `[start, start + len)` into pieces by what covers them.
    pub fn lookup(&self, start: u64, len: u64, out: &mut Vec<Piece>) {
        out.clear();
        let end = start + len;
        let mut cur = start;
        let first = self
            .map
            .range(..=start)
            .next_back()
            .filter(|(_, e)| e.end > start)
            .map(|(&k, _)| k)
            .unwrap_or(start);
        for (&k, e) in self.map.range(first..end) {
            if e.end <= cur {
                continue;
            }
            if k > cur {
                out.push(Piece {
                    start: cur,
                    len: k - cur,
                    src: None,
                });
                cur = k;
            }
            let piece_end = e.end.min(end);
            out.push(Piece {
                start: cur,
                len: piece_end - cur,
                src: Some(e.src.advanced(cur - k)),
            });
            cur = piece_end;
        }
        if cur < end {
            out.push(Piece {
                start: cur,
                len: end - cur,
                src: None,
            });
        }
    }

    /// All extents in order, as pieces.
    pub fn iter(&self) -> impl Iterator<Item = Piece> + '_ {
        self.map.iter().map(|(&k, e)| Piece {
            start: k,
            len: e.end - k,
            src: Some(e.src),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn src(n: u64) -> Source {
        Source::Journal {
            segment: SegmentId(n),
            pos: n * 1000,
        }
    }

    proptest! {
        #[test]
        fn matches_a_byte_model(ops in proptest::collection::vec((0u64..200, 1u64..60, 0u64..5), 1..40)) {
            let mut m = ExtentMap::new();
            // model: per byte, (writer id, byte index within that writer's range) or none
            let mut model: Vec<Option<(u64, u64)>> = vec![None; 300];
            for (i, &(start, len, _)) in ops.iter().enumerate() {
                let id = i as u64 + 1;
                m.insert(start, len, src(id));
                for b in start..start + len {
                    model[b as usize] = Some((id, b - start));
                }
            }
            let mut out = Vec::new();
            m.lookup(0, 300, &mut out);
            let mut covered = 0;
            for p in &out {
                prop_assert_eq!(p.start, covered);
                covered += p.len;
                for b in p.start..p.start + p.len {
                    let expect = model[b as usize];
                    match (p.src, expect) {
                        (None, None) => {}
                        (Some(Source::Journal { segment, pos }), Some((id, idx))) => {
                            prop_assert_eq!(segment.0, id);
                            prop_assert_eq!(pos + (b - p.start), id * 1000 + idx);
                        }
                        other => prop_assert!(false, "mismatch at {}: {:?}", b, other),
                    }
                }
            }
            prop_assert_eq!(covered, 300);
        }
    }
}
