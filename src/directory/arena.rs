//! Transparent huge pages shared by small snapshot images: a set's segments, and any other
//! snapshot of at most [`MAX_IMAGE`] hot bytes opened from a file.
//!
//! A set of 10,000 customers is 10,000 segment images of ~100 KB. Each in a mapping of its
//! own sits in 4 KiB pages: a lookup's few reads (domain line, filter fingerprints, FST
//! nodes) land on pages no TLB entry covers, and the page-table walk is itself a trip to
//! memory. Images carved from shared chunks advised to use transparent huge pages (Linux
//! `madvise` mode) are covered by one TLB entry per 2 MiB.
//!
//! A chunk is unmapped when the last image carved from it is dropped. Space is never reused
//! inside a chunk, so a chunk can stay mapped for one survivor while its other segments were
//! replaced. To bound that, a new chunk is only mapped while the chunks mapped are at most
//! [`WASTE`] times the bytes of the images alive in them (plus one chunk); otherwise the
//! image gets memory of its own (4 KiB pages: slower, never more memory than it needs). The
//! chunks so never take more than [`WASTE`] times the most they held, plus two chunks.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes per chunk: two huge pages (a small chunk is freed sooner once its segments are
/// replaced).
const CHUNK: usize = 4 << 20;
/// Largest image carved from a chunk (larger ones are mappings of their own, and their FST
/// and filter get huge pages of their own from 2 MiB up).
pub(super) const MAX_IMAGE: usize = 1 << 20;
/// How many times the bytes alive in chunks the chunks may take before no new one is
/// mapped.
const WASTE: usize = 2;
/// Images start on a cache line.
const ALIGN: usize = 64;

/// Bytes of every chunk mapped, and of the images alive in them.
static MAPPED: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The chunk images are carved from now, and where its free space starts.
static CURRENT: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

/// One anonymous mapping of [`CHUNK`] bytes, zeroed by the kernel.
struct Chunk {
    map: memmap2::MmapRaw,
}

impl Chunk {
    fn new() -> Option<Chunk> {
        let map = memmap2::MmapOptions::new().len(CHUNK).map_anon().ok()?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        MAPPED.fetch_add(CHUNK, Ordering::Relaxed);
        Some(Chunk {
            map: memmap2::MmapRaw::from(map),
        })
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        MAPPED.fetch_sub(CHUNK, Ordering::Relaxed);
    }
}

/// `len` zeroed bytes of a chunk, this slab's alone.
pub(super) struct Slab {
    chunk: Arc<Chunk>,
    range: Range<usize>,
}

/// `len` zeroed bytes in huge pages shared with other slabs; `None` when `len` is too large
/// for a chunk (or zero), when no chunk can be mapped, or when mapping one more would let
/// the arena's memory exceed its bound.
pub(super) fn slab(len: usize) -> Option<Slab> {
    if len == 0 || len > MAX_IMAGE {
        return None;
    }
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let start = match &*current {
        Some((_, free)) if free.next_multiple_of(ALIGN) + len <= CHUNK => {
            free.next_multiple_of(ALIGN)
        }
        _ => {
            if !may_map(MAPPED.load(Ordering::Relaxed), LIVE.load(Ordering::Relaxed)) {
                return None;
            }
            // The previous chunk stays mapped while its slabs live.
            *current = Some((Arc::new(Chunk::new()?), 0));
            0
        }
    };
    let (chunk, free) = current.as_mut()?;
    *free = start + len;
    LIVE.fetch_add(len, Ordering::Relaxed);
    Some(Slab {
        chunk: chunk.clone(),
        range: start..start + len,
    })
}

/// Anonymous memory of `len` bytes advised to use transparent huge pages.
pub(super) fn huge_page_memory(len: usize) -> Option<memmap2::MmapMut> {
    let anon = memmap2::MmapOptions::new()
        .len(len.max(1))
        .map_anon()
        .ok()?;
    #[cfg(target_os = "linux")]
    let _ = anon.advise(memmap2::Advice::HugePage);
    Some(anon)
}

/// The size of a transparent huge page on x86-64.
pub(super) const HUGE_PAGE: usize = 2 << 20;

/// Whether one more chunk may be mapped when `mapped` bytes of chunks hold `live` bytes of
/// images: while the chunks are at most [`WASTE`] times what they hold, plus one chunk.
fn may_map(mapped: usize, live: usize) -> bool {
    mapped <= live.saturating_mul(WASTE).saturating_add(CHUNK)
}

impl Drop for Slab {
    fn drop(&mut self) {
        LIVE.fetch_sub(self.range.len(), Ordering::Relaxed);
    }
}

impl std::ops::Deref for Slab {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `range` lies inside the chunk's mapping (`slab` only hands out ranges that
        // end at or before CHUNK, the mapping's length), which stays mapped while `self`
        // holds its `Arc`. No two slabs' ranges overlap (each starts where the previous one
        // of its chunk ended, under the lock, and the chunk's free space only grows), and
        // the chunk's memory is reached only through its slabs; so the only writes to these
        // bytes are through `&mut self` (below), which cannot coexist with this borrow.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(
                self.chunk.map.as_ptr().add(self.range.start),
                self.range.len(),
            )
        }
    }
}

impl std::ops::DerefMut for Slab {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`: the range is inside the live mapping and this slab's alone,
        // and `&mut self` excludes every other borrow of it.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(
                self.chunk.map.as_mut_ptr().add(self.range.start),
                self.range.len(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slabs are zeroed, disjoint, aligned, keep what is written to them, and a chunk
    /// outlives the slabs carved from it only as the current chunk.
    #[test]
    fn slabs_are_zeroed_disjoint_and_keep_their_bytes() {
        let mut slabs: Vec<Slab> = (1..200)
            .map(|i| slab(i * 997 % 5000 + 1).expect("a slab"))
            .collect();
        for (i, s) in slabs.iter_mut().enumerate() {
            assert!(s.iter().all(|&b| b == 0), "slab {i} not zeroed");
            assert_eq!(s.as_ptr() as usize % ALIGN, 0);
            s.fill(i as u8);
        }
        for (i, s) in slabs.iter().enumerate() {
            assert!(s.iter().all(|&b| b == i as u8), "slab {i} overwritten");
        }
        // Moved to other threads and read there.
        let total: usize = std::thread::scope(|scope| {
            slabs
                .chunks(50)
                .map(|part| scope.spawn(move || part.iter().map(|s| s.len()).sum::<usize>()))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().expect("reader"))
                .sum()
        });
        assert_eq!(total, slabs.iter().map(|s| s.len()).sum::<usize>());
        assert!(slab(0).is_none());
        assert!(slab(MAX_IMAGE + 1).is_none());
    }

    /// The bound on what chunks pinned by a few survivors may cost: the first chunks are
    /// always mapped, and no new one once the chunks hold less than half their bytes.
    #[test]
    fn a_new_chunk_only_while_the_chunks_are_mostly_alive() {
        assert!(may_map(0, 0));
        assert!(may_map(CHUNK, 0));
        assert!(!may_map(2 * CHUNK, 0));
        assert!(may_map(2 * CHUNK, CHUNK / 2));
        assert!(may_map(10 * CHUNK, 5 * CHUNK));
        assert!(!may_map(10 * CHUNK, 4 * CHUNK));
        assert!(may_map(usize::MAX, usize::MAX));
    }
}
