//! Segmented snapshots: a directory as a set of *segments*, each a complete snapshot file of
//! whole domains (one customer's, say), under a small *index* file that names them.
//!
//! ```text
//! PATH            index: magic "RCPTSETS", version, segment count, generation, created,
//!                 then per segment (name hash u64, the segment header's crc32 u32),
//!                 then a crc32 of everything before it
//! PATH.parts/     one file per segment, named by the hash of its header
//!                 (`<16 hex digits>.snap`): a snapshot of the ordinary format
//! ```
//!
//! A domain lives in exactly one segment, so a segment answers for its domains on its own
//! and a change to one customer rebuilds one segment: [`Snapshot::with_segments`] makes a
//! new set that shares every other segment (memory and file) with the set in service.
//! Writing a set ([`write`]) writes only the segment files that do not exist yet (a segment
//! file never changes once written: its name is its header's hash), then replaces the index
//! atomically, then removes the segment files no index names. A crash at any point leaves
//! the old index naming complete old segment files, or the new index naming complete new
//! ones: a restart opens one directory or the other, never a mix (each segment's header
//! checksum is in the index, and a segment that does not match is refused).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{HEADER_LEN, SnapshotError, domain_hash, write_atomic};
use super::snapshot::Snapshot;

/// First bytes of an index file.
pub const SET_MAGIC: &[u8; 8] = b"RCPTSETS";
const SET_VERSION: u32 = 1;
const FIXED: usize = 8 + 4 + 4 + 8 + 8;
const ENTRY: usize = 12;

/// What a set adds to the snapshot that carries it: its segments and the domain index over
/// all of them. Domains are numbered globally in name order (what a [`super::Hit`] of the
/// set names); each maps to its segment and its index there.
pub(super) struct SetIndex {
    pub(super) parts: Vec<Arc<Snapshot>>,
    /// Per global domain: (segment, domain index in the segment).
    pub(super) domains: Vec<(u32, u32)>,
    /// Per segment, its domains' global indices.
    pub(super) global: Vec<Vec<u32>>,
    /// Open-addressing index: (hash fingerprint, global domain + 1), 0 = empty.
    probe: Vec<(u32, u32)>,
}

impl SetIndex {
    /// Index the domains of `parts`; a domain in two segments is refused.
    pub(super) fn new(mut parts: Vec<Arc<Snapshot>>) -> Result<SetIndex, SnapshotError> {
        // In the order of their first domain's name: the same segments make the same set
        // (its content digest, its index file), however it was put together.
        parts.sort_by_cached_key(|p| p.domain_info(0).map(|d| d.name.to_owned()));
        let mut all: Vec<(&str, u32, u32)> = Vec::new();
        for (p, part) in parts.iter().enumerate() {
            if part.is_set() {
                return Err(malformed("a segment is itself a set"));
            }
            for l in 0..part.domain_count() {
                let info = part
                    .domain_info(l)
                    .ok_or(malformed("segment domain unreadable"))?;
                all.push((info.name, p as u32, l));
            }
        }
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        if all.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(malformed("a domain is in two segments"));
        }
        let mut global: Vec<Vec<u32>> = parts
            .iter()
            .map(|p| vec![0; p.domain_count() as usize])
            .collect();
        let mut domains = Vec::with_capacity(all.len());
        let slots = (all.len() * 2).next_power_of_two().max(2);
        let mut probe = vec![(0u32, 0u32); slots];
        for (g, &(name, p, l)) in all.iter().enumerate() {
            domains.push((p, l));
            global[p as usize][l as usize] = g as u32;
            let h = domain_hash(name.as_bytes());
            let mut at = h as usize & (slots - 1);
            while probe[at].1 != 0 {
                at = (at + 1) & (slots - 1);
            }
            probe[at] = (h as u32, g as u32 + 1);
        }
        Ok(SetIndex {
            parts,
            domains,
            global,
            probe,
        })
    }

    /// The segment holding domain `name` (normalized), its index there and its global index.
    #[inline]
    pub(super) fn find(&self, name: &str) -> Option<(&Snapshot, u32, u32)> {
        let mask = self.probe.len() - 1;
        let h = domain_hash(name.as_bytes());
        let mut at = h as usize & mask;
        loop {
            let (fp, v) = *self.probe.get(at)?;
            if v == 0 {
                return None;
            }
            if fp == h as u32 {
                let g = v - 1;
                let &(p, l) = self.domains.get(g as usize)?;
                let part = self.parts.get(p as usize)?;
                if part.domain_named(l, name) {
                    return Some((part, l, g));
                }
            }
            at = (at + 1) & mask;
        }
    }

    /// Global index of domain `local` of segment `part`.
    pub(super) fn global_of(&self, part: usize, local: u32) -> Option<u32> {
        self.global.get(part)?.get(local as usize).copied()
    }
}

fn malformed(what: &'static str) -> SnapshotError {
    SnapshotError::Malformed {
        section: "segments",
        what,
    }
}

/// Where the segment files of the set at `path` live.
pub fn parts_dir(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".parts");
    path.with_file_name(name)
}

/// The crc32 of a segment's header (which holds every section's checksum), as the index
/// records it.
fn header_crc(part: &Snapshot) -> u32 {
    segment_ref(&part.header().encode(), 0).crc
}

/// True when `bytes` start like an index file.
pub fn is_set(bytes: &[u8]) -> bool {
    bytes.starts_with(SET_MAGIC)
}

/// What [`write`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Segment files written now.
    pub written: usize,
    /// Segment files that already existed (shared with the set in service).
    pub kept: usize,
    /// Bytes of the segment files written now.
    pub bytes_written: u64,
    /// Segment files no index names any more, removed.
    pub removed: usize,
}

/// A segment file as the index names it (see [`write_segment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRef {
    hash: u64,
    crc: u32,
    /// Bytes written now (0 when the file existed already).
    pub written: u64,
}

fn segment_ref(head: &[u8], written: u64) -> SegmentRef {
    SegmentRef {
        hash: domain_hash(head),
        crc: head.last_chunk::<4>().map_or(0, |b| u32::from_le_bytes(*b)),
        written,
    }
}

/// Write one segment image (a single snapshot's bytes, checked first) into the set directory
/// of `path`, unless a file of the same content is there already. Nothing names it until
/// [`write_index`] does: a crash before that leaves an orphan that [`collect_garbage`]
/// removes.
pub fn write_segment(path: &Path, image: &[u8]) -> Result<SegmentRef, SnapshotError> {
    Snapshot::verify(image)?;
    let head = image.get(..HEADER_LEN).ok_or(SnapshotError::TooShort {
        len: image.len(),
        need: HEADER_LEN,
    })?;
    let r = segment_ref(head, 0);
    let dir = parts_dir(path);
    std::fs::create_dir_all(&dir).map_err(|source| SnapshotError::Io {
        path: dir.clone(),
        source,
    })?;
    let file = dir.join(format!("{:016x}.snap", r.hash));
    if file.exists() {
        return Ok(r);
    }
    write_atomic(&file, image)?;
    Ok(SegmentRef {
        written: image.len() as u64,
        ..r
    })
}

/// Replace the index at `path` (atomically) by one naming `segments`, then remove the
/// segment files it does not name; how many were removed.
pub fn write_index(
    path: &Path,
    generation: u64,
    created_unix: u64,
    segments: &[SegmentRef],
) -> Result<usize, SnapshotError> {
    let mut index = Vec::with_capacity(FIXED + segments.len() * ENTRY + 4);
    index.extend_from_slice(SET_MAGIC);
    index.extend_from_slice(&SET_VERSION.to_le_bytes());
    index.extend_from_slice(&(segments.len() as u32).to_le_bytes());
    index.extend_from_slice(&generation.to_le_bytes());
    index.extend_from_slice(&created_unix.to_le_bytes());
    for r in segments {
        index.extend_from_slice(&r.hash.to_le_bytes());
        index.extend_from_slice(&r.crc.to_le_bytes());
    }
    let crc = crc32fast::hash(&index);
    index.extend_from_slice(&crc.to_le_bytes());
    write_atomic(path, &index)?;
    Ok(collect_garbage(path))
}

/// Persist a set (or a single snapshot as a set of one): the segment files that do not exist
/// yet, then the index, then remove unnamed segment files. A segment opened from a file is
/// read back from it (and checked) when its file is not in this set's directory.
pub fn write(path: &Path, set: &Snapshot) -> Result<WriteStats, SnapshotError> {
    let dir = parts_dir(path);
    let one = [set];
    let parts: Vec<&Snapshot> = match set.segments() {
        Some(p) => p.iter().map(|p| &**p).collect(),
        None => one.to_vec(),
    };
    let mut stats = WriteStats::default();
    let mut refs = Vec::with_capacity(parts.len());
    for part in parts {
        let head = part.header().encode();
        let r = segment_ref(&head, 0);
        if dir.join(format!("{:016x}.snap", r.hash)).exists() {
            stats.kept += 1;
            refs.push(r);
            continue;
        }
        let bytes = match part.image() {
            Some(b) => std::borrow::Cow::Borrowed(b),
            None => std::borrow::Cow::Owned(part.read_back()?),
        };
        let r = write_segment(path, &bytes)?;
        stats.written += 1;
        stats.bytes_written += r.written;
        refs.push(r);
    }
    stats.removed = write_index(path, set.generation(), set.created_unix(), &refs)?;
    Ok(stats)
}

/// The segment files named by the index at `path`: (file, expected header crc).
fn read_index(path: &Path) -> Result<(u64, u64, Vec<(PathBuf, u32)>), SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let index = parse_index(&bytes)?;
    let dir = parts_dir(path);
    let files = index
        .segments
        .iter()
        .map(|&(h, crc)| (dir.join(format!("{h:016x}.snap")), crc))
        .collect();
    Ok((index.generation, index.created_unix, files))
}

/// A decoded index file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// Generation of the set.
    pub generation: u64,
    /// When it was written (Unix seconds).
    pub created_unix: u64,
    /// Per segment: the hash naming its file, the CRC-32 of its header.
    pub segments: Vec<(u64, u32)>,
}

/// Decode an index file (any bytes: a torn, truncated or corrupt index is an error).
pub fn parse_index(bytes: &[u8]) -> Result<Index, SnapshotError> {
    let body_len = bytes.len().checked_sub(4).ok_or(SnapshotError::TooShort {
        len: bytes.len(),
        need: FIXED + 4,
    })?;
    let (body, tail) = bytes.split_at(body_len);
    let expected = tail
        .first_chunk::<4>()
        .map_or(0, |b| u32::from_le_bytes(*b));
    if !is_set(body) || body.len() < FIXED {
        return Err(SnapshotError::BadMagic);
    }
    let got = crc32fast::hash(body);
    if got != expected {
        return Err(SnapshotError::SectionChecksum {
            section: "segment index",
            expected,
            got,
        });
    }
    let u32_at = |at: usize| {
        body.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |at: usize| {
        body.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let version = u32_at(8).unwrap_or(0);
    if version != SET_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported: SET_VERSION,
        });
    }
    let count = u32_at(12).unwrap_or(0) as usize;
    if Some(body.len()) != count.checked_mul(ENTRY).and_then(|n| n.checked_add(FIXED)) {
        return Err(malformed("index length does not match its segment count"));
    }
    let segments = (0..count)
        .map(|i| {
            let at = FIXED + i * ENTRY;
            (u64_at(at).unwrap_or(0), u32_at(at + 8).unwrap_or(0))
        })
        .collect();
    Ok(Index {
        generation: u64_at(16).unwrap_or(0),
        created_unix: u64_at(24).unwrap_or(0),
        segments,
    })
}

/// Open the set whose index is at `path`: every segment (on `threads` threads), each checked
/// against the index's record of its header.
pub(super) fn open(path: &Path, huge_pages: bool) -> Result<Snapshot, SnapshotError> {
    let (generation, created, files) = read_index(path)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 8);
    let chunk = files.len().div_ceil(threads).max(1);
    let opened: Vec<Result<Arc<Snapshot>, SnapshotError>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|group| {
                s.spawn(move || {
                    group
                        .iter()
                        .map(|(file, crc)| {
                            let part = Snapshot::open_part(file, huge_pages)?;
                            if header_crc(&part) != *crc {
                                return Err(malformed(
                                    "a segment file does not match the index (replaced?)",
                                ));
                            }
                            Ok(Arc::new(part))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![Err(malformed("opening a segment panicked"))])
            })
            .collect()
    });
    let parts = opened.into_iter().collect::<Result<Vec<_>, _>>()?;
    Snapshot::assemble(parts, generation, created)
}

/// The set `set`, written at `path` already, with every segment that is still held in
/// memory as built (a whole image, cold sections included) replaced by the same segment
/// opened from its file (hot sections only); the other segments are shared.
pub fn reopen(path: &Path, set: &Snapshot) -> Result<Snapshot, SnapshotError> {
    let Some(parts) = set.segments() else {
        return Snapshot::open(path);
    };
    let dir = parts_dir(path);
    let parts = parts
        .iter()
        .map(|p| {
            if p.image().is_none() {
                return Ok(p.clone());
            }
            let r = segment_ref(&p.header().encode(), 0);
            let opened = Snapshot::open_part(&dir.join(format!("{:016x}.snap", r.hash)), true)?;
            if header_crc(&opened) != r.crc {
                return Err(malformed(
                    "a segment file does not match the index (replaced?)",
                ));
            }
            Ok(Arc::new(opened))
        })
        .collect::<Result<Vec<_>, SnapshotError>>()?;
    Snapshot::assemble(parts, set.generation(), set.created_unix())
}

/// Remove the segment files that the index at `path` does not name (left by a crash between
/// writing segments and the index, or no longer used), and temporary files; how many.
pub fn collect_garbage(path: &Path) -> usize {
    let Ok((_, _, named)) = read_index(path) else {
        return 0;
    };
    let keep: HashSet<PathBuf> = named.into_iter().map(|(p, _)| p).collect();
    let dir = parts_dir(path);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mine = format!(".tmp.{}", std::process::id());
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| !keep.contains(p))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().ends_with(&mine))
        })
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(count: u32, entries: &[(u64, u32)]) -> Vec<u8> {
        let mut b = SET_MAGIC.to_vec();
        b.extend_from_slice(&SET_VERSION.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&9u64.to_le_bytes());
        b.extend_from_slice(&1_700_000_000u64.to_le_bytes());
        for (h, c) in entries {
            b.extend_from_slice(&h.to_le_bytes());
            b.extend_from_slice(&c.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn an_index_decodes_and_every_damage_is_refused() {
        let good = index(2, &[(0xfeed, 7), (0xbeef, 8)]);
        assert_eq!(
            parse_index(&good).expect("good"),
            Index {
                generation: 9,
                created_unix: 1_700_000_000,
                segments: vec![(0xfeed, 7), (0xbeef, 8)],
            }
        );
        assert_eq!(parse_index(&index(0, &[])).expect("empty").segments, []);
        // Torn at every length, a flipped bit anywhere, a count that lies: refused.
        for cut in 0..good.len() {
            assert!(parse_index(&good[..cut]).is_err(), "cut at {cut}");
        }
        for bit in 0..good.len() * 8 {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(parse_index(&b).is_err(), "bit {bit}");
        }
        assert!(parse_index(&index(3, &[(1, 1), (2, 2)])).is_err());
        assert!(parse_index(&index(u32::MAX, &[])).is_err());
        // A single snapshot is not an index.
        assert!(matches!(
            parse_index(b"RCPTGATE and more bytes than the index header needs....."),
            Err(SnapshotError::BadMagic | SnapshotError::SectionChecksum { .. })
        ));
    }
}
