//! Segmented snapshots: a directory as a set of *segments*, each a complete snapshot file of
//! whole domains (one customer's, say), under a small *index* file that names them.
//!
//! ```text
//! PATH            index: magic "RCPTSETS", version 2, segment count, generation, created,
//!                 then per segment: the hash naming its file (u64), its header's crc32,
//!                 its address count (u64), its domain names (count, then u16-length
//!                 prefixed, in name order); then a crc32 of everything before it
//! PATH.parts/     one file per segment, named by the hash of its header
//!                 (`<16 hex digits>.snap`): a snapshot of the ordinary format
//! ```
//!
//! A domain lives in exactly one segment, so a segment answers for its domains on its own
//! and a change to one customer rebuilds one segment: [`Snapshot::with_segments`] makes a
//! new set that shares every other segment (memory and file) with the set in service.
//! Writing a set ([`write()`]) writes only the segment files that do not exist yet (a segment
//! file never changes once written: its name is its header's hash), then replaces the index
//! atomically, then removes the segment files no index names. A crash at any point leaves
//! the old index naming complete old segment files, or the new index naming complete new
//! ones: a restart opens one directory or the other, never a mix. Each segment's header
//! checksum is in the index: opened eagerly ([`Snapshot::open`]) a segment that does not
//! match refuses the set; opened lazily ([`Snapshot::open_lazy`], the daemon's start, which
//! reads only the index) it is refused when first read and its domains answer a temporary
//! failure.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use super::format::{HEADER_LEN, SnapshotError, domain_hash, write_atomic};
use super::snapshot::{SegmentHandle, Snapshot};

/// First bytes of an index file.
pub const SET_MAGIC: &[u8; 8] = b"RCPTSETS";
/// 2: each segment's address count and domain names, so a set opens without its segments.
const SET_VERSION: u32 = 2;
const FIXED: usize = 8 + 4 + 4 + 8 + 8;
/// Per segment before its names: hash, header crc, address count, domain count.
const ENTRY: usize = 8 + 4 + 8 + 4;

/// One segment of a set: in memory, or named by the index and read on first use.
pub(super) struct Part {
    /// The hash that names its file, the CRC-32 of its header, its address count.
    hash: u64,
    crc: u32,
    records: u64,
    /// Its domains, in name order (its own domain numbering).
    names: Vec<Box<str>>,
    /// Its file, when it is read on first use.
    file: Option<PathBuf>,
    cell: OnceLock<Option<Arc<Snapshot>>>,
}

impl Part {
    /// A segment in memory.
    fn loaded(snap: Arc<Snapshot>) -> Result<Part, SnapshotError> {
        if snap.is_set() {
            return Err(malformed("a segment is itself a set"));
        }
        let r = segment_ref(&snap.header().encode(), 0);
        let names = (0..snap.domain_count())
            .map(|l| {
                snap.domain_info(l)
                    .map(|d| d.name.into())
                    .ok_or(malformed("segment domain unreadable"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Part {
            hash: r.hash,
            crc: r.crc,
            records: snap.record_count(),
            names,
            file: None,
            cell: OnceLock::from(Some(snap)),
        })
    }

    /// The segment, read (and checked against the index) the first time it is needed;
    /// `None` when it cannot be read (logged; its domains then answer a temporary failure).
    fn get(&self) -> Option<&Arc<Snapshot>> {
        self.cell
            .get_or_init(|| {
                let file = self.file.as_ref()?;
                match Snapshot::open_part(file, true) {
                    Ok(s) if header_crc(&s) == self.crc => Some(Arc::new(s)),
                    Ok(_) => {
                        tracing::error!(file = %file.display(), "segment file does not match the index (replaced?): its domains answer 4xx until the next full build");
                        None
                    }
                    Err(e) => {
                        tracing::error!(file = %file.display(), error = %e, "segment unreadable: {e}; its domains answer 4xx until the next full build");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// A segment named by `r`, in its file in `dir`, read on first use.
    fn on_disk(r: SegmentRef, dir: &Path) -> Part {
        Part {
            file: Some(segment_file(dir, r.hash)),
            hash: r.hash,
            crc: r.crc,
            records: r.records,
            names: r.names,
            cell: OnceLock::new(),
        }
    }

    fn segment_ref(&self) -> SegmentRef {
        SegmentRef {
            hash: self.hash,
            crc: self.crc,
            records: self.records,
            names: self.names.clone(),
            written: 0,
        }
    }
}

/// What a set adds to the snapshot that carries it: its segments and the domain index over
/// all of them. Domains are numbered globally in name order (what a [`super::Hit`] of the
/// set names); each maps to its segment and its index there. The index needs no segment in
/// memory: a set opened from its index file reads each segment on first use.
pub(super) struct SetIndex {
    parts: Vec<Arc<Part>>,
    /// Per global domain: (segment, domain index in the segment).
    pub(super) domains: Vec<(u32, u32)>,
    /// Every segment's domains' global indices, segment after segment (one allocation, so
    /// a hit reads one place for its global index), and where each segment's indices start.
    global: Vec<u32>,
    first: Vec<u32>,
    /// Open-addressing index: (hash fingerprint, segment + 1; 0: empty). A lookup reads one
    /// slot and goes to the segment, which finds the domain in its own table; at 8 bytes a
    /// slot the index takes 4 MB at 200,000 domains.
    probe: Vec<(u32, u32)>,
    /// Per segment, this set's handle of the segment once read, side by side: a lookup
    /// reaches the segment's filter, domain table and FST without a trip to its `Part` or
    /// to the segment's struct.
    loaded: Vec<OnceLock<Option<SegmentHandle>>>,
}

impl SetIndex {
    /// Index the domains of `parts`; a domain in two segments is refused.
    pub(super) fn new(parts: Vec<Arc<Snapshot>>) -> Result<SetIndex, SnapshotError> {
        let parts = parts
            .into_iter()
            .map(|p| Part::loaded(p).map(Arc::new))
            .collect::<Result<_, _>>()?;
        SetIndex::of(parts)
    }

    fn of(mut parts: Vec<Arc<Part>>) -> Result<SetIndex, SnapshotError> {
        // In the order of their first domain's name: the same segments make the same set
        // (its content digest, its index file), however it was put together.
        parts.sort_by(|a, b| a.names.first().cmp(&b.names.first()));
        // A domain is found in its segment's names by binary search.
        if parts
            .iter()
            .any(|p| p.names.windows(2).any(|w| w[0] >= w[1]))
        {
            return Err(malformed("a segment's domain names are not in name order"));
        }
        let mut all: Vec<(&str, u32, u32)> = Vec::new();
        for (p, part) in parts.iter().enumerate() {
            for (l, name) in part.names.iter().enumerate() {
                all.push((name, p as u32, l as u32));
            }
        }
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        if all.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(malformed("a domain is in two segments"));
        }
        let mut first = Vec::with_capacity(parts.len());
        let mut total = 0usize;
        for part in &parts {
            first.push(u32::try_from(total).map_err(|_| malformed("too many domains"))?);
            total += part.names.len();
        }
        let mut global = vec![0u32; total];
        let mut domains = Vec::with_capacity(all.len());
        let slots = (all.len() * 2).next_power_of_two().max(2);
        let mut probe = vec![(0u32, 0u32); slots];
        for (g, &(name, p, l)) in all.iter().enumerate() {
            domains.push((p, l));
            global[first[p as usize] as usize + l as usize] = g as u32;
            let h = domain_hash(name.as_bytes());
            let mut at = h as usize & (slots - 1);
            while probe[at].1 != 0 {
                at = (at + 1) & (slots - 1);
            }
            probe[at] = (h as u32, p + 1);
        }
        let loaded = parts
            .iter()
            .map(|p| match p.cell.get() {
                Some(s) => OnceLock::from(s.clone().map(SegmentHandle::new)),
                None => OnceLock::new(),
            })
            .collect();
        Ok(SetIndex {
            parts,
            domains,
            global,
            first,
            probe,
            loaded,
        })
    }

    /// The segment (number) holding domain `name` (normalized), its index there and its
    /// global index; no segment is read.
    pub(super) fn find(&self, name: &str) -> Option<(usize, u32, u32)> {
        self.probe_for(domain_hash(name.as_bytes()), |p| {
            let l = self.local_of(p, name)?;
            Some((p, l, self.global_of(p, l)?))
        })
    }

    /// [`Self::find`] for a lookup: each candidate segment read (on first use) and handed to
    /// `in_segment`, which answers what the lookup needs of the domain when the segment has
    /// a domain named `name` (`None` sends the probe on). `hash` is the name's
    /// `domain_hash`. Returns that answer (`None` in its place when the segment cannot be
    /// read and the index names the domain in it) and the segment's number.
    #[inline]
    pub(super) fn find_loaded<'a, T>(
        &'a self,
        name: &str,
        hash: u64,
        in_segment: impl Fn(&'a SegmentHandle) -> Option<T>,
    ) -> Option<(Option<T>, usize)> {
        self.probe_for(hash, |p| match self.handle(p) {
            Some(s) => in_segment(s).map(|t| (Some(t), p)),
            None => self.local_of(p, name).map(|_| (None, p)),
        })
    }

    /// Where the index's copy of segment `p`'s domain names (in name order) has `name`.
    fn local_of(&self, p: usize, name: &str) -> Option<u32> {
        let names = &self.parts.get(p)?.names;
        let l = names.binary_search_by(|n| (**n).cmp(name)).ok()?;
        u32::try_from(l).ok()
    }

    /// Probe the slots from hash `h`: `found` gets each candidate segment whose fingerprint
    /// matches and says whether it is the one.
    #[inline]
    fn probe_for<T>(&self, h: u64, found: impl Fn(usize) -> Option<T>) -> Option<T> {
        let mask = self.probe.len() - 1;
        let mut at = h as usize & mask;
        loop {
            let (fp, v) = *self.probe.get(at)?;
            if v == 0 {
                return None;
            }
            if fp == h as u32
                && let Some(t) = found(v as usize - 1)
            {
                return Some(t);
            }
            at = (at + 1) & mask;
        }
    }

    /// Segment `p`, read on first use (`None` if it cannot be read).
    #[inline]
    pub(super) fn part(&self, p: usize) -> Option<&Arc<Snapshot>> {
        self.handle(p).map(SegmentHandle::snap)
    }

    /// Segment `p`'s handle, the segment read on first use (`None` if it cannot be read).
    #[inline]
    fn handle(&self, p: usize) -> Option<&SegmentHandle> {
        self.loaded
            .get(p)?
            .get_or_init(|| self.parts.get(p)?.get().cloned().map(SegmentHandle::new))
            .as_ref()
    }

    /// How many segments.
    pub(super) fn len(&self) -> usize {
        self.parts.len()
    }

    /// Every segment that can be read (reading those not read yet).
    pub(super) fn loaded(&self) -> impl Iterator<Item = &Arc<Snapshot>> {
        (0..self.parts.len()).filter_map(|p| self.part(p))
    }

    /// Every segment, read; `None` if one cannot be read.
    pub(super) fn all(&self) -> Option<Vec<Arc<Snapshot>>> {
        (0..self.parts.len())
            .map(|p| self.part(p).cloned())
            .collect()
    }

    /// Addresses in every segment (from the index: no segment is read).
    pub(super) fn records(&self) -> u64 {
        self.parts.iter().map(|p| p.records).sum()
    }

    /// The same segments, those held as built (whole images in memory) replaced by their
    /// files in `dir`, read on first use.
    pub(super) fn built_to_files(&self, dir: &Path) -> Result<SetIndex, SnapshotError> {
        let parts = self
            .parts
            .iter()
            .map(|p| {
                let built = p.cell.get().and_then(Option::as_ref);
                if built.is_none_or(|s| s.image().is_none()) {
                    return p.clone();
                }
                Arc::new(Part::on_disk(p.segment_ref(), dir))
            })
            .collect();
        SetIndex::of(parts)
    }

    /// Global index of domain `local` of segment `part`.
    pub(super) fn global_of(&self, part: usize, local: u32) -> Option<u32> {
        let start = *self.first.get(part)? as usize;
        let end = self
            .first
            .get(part + 1)
            .map_or(self.global.len(), |&e| e as usize);
        let at = start.checked_add(local as usize)?;
        (at < end).then(|| self.global.get(at).copied()).flatten()
    }
}

fn malformed(what: &'static str) -> SnapshotError {
    SnapshotError::Malformed {
        section: "segments",
        what,
    }
}

/// The file of the segment whose header hashes to `hash`, in a set's directory `dir`.
fn segment_file(dir: &Path, hash: u64) -> PathBuf {
    dir.join(format!("{hash:016x}.snap"))
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

/// What [`write()`] did.
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRef {
    hash: u64,
    crc: u32,
    records: u64,
    names: Vec<Box<str>>,
    /// Bytes written now (0 when the file existed already).
    pub written: u64,
}

fn segment_ref(head: &[u8], written: u64) -> SegmentRef {
    SegmentRef {
        hash: domain_hash(head),
        crc: head.last_chunk::<4>().map_or(0, |b| u32::from_le_bytes(*b)),
        records: 0,
        names: Vec::new(),
        written,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write one segment (a single snapshot's image, loaded and checked first) into the set
/// directory of `path`, unless a file of the same content is there already. Nothing names
/// it until [`write_index`] does: a crash before that leaves an orphan that
/// [`collect_garbage`] removes.
pub fn write_segment(path: &Path, image: &[u8]) -> Result<SegmentRef, SnapshotError> {
    let (records, names) = Snapshot::peek_names(image)?;
    let head = image.get(..HEADER_LEN).ok_or(SnapshotError::TooShort {
        len: image.len(),
        need: HEADER_LEN,
    })?;
    let mut r = SegmentRef {
        records,
        names,
        ..segment_ref(head, 0)
    };
    let dir = parts_dir(path);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let file = segment_file(&dir, r.hash);
    if !file.exists() {
        write_atomic(&file, image)?;
        r.written = image.len() as u64;
    }
    Ok(r)
}

/// Replace the index at `path` (atomically) by one naming `segments`, then remove the
/// segment files it does not name; how many were removed.
pub fn write_index(
    path: &Path,
    generation: u64,
    created_unix: u64,
    segments: &[SegmentRef],
) -> Result<usize, SnapshotError> {
    let mut index = Vec::with_capacity(FIXED + segments.len() * (ENTRY + 64) + 4);
    index.extend_from_slice(SET_MAGIC);
    index.extend_from_slice(&SET_VERSION.to_le_bytes());
    index.extend_from_slice(&(segments.len() as u32).to_le_bytes());
    index.extend_from_slice(&generation.to_le_bytes());
    index.extend_from_slice(&created_unix.to_le_bytes());
    for r in segments {
        index.extend_from_slice(&r.hash.to_le_bytes());
        index.extend_from_slice(&r.crc.to_le_bytes());
        index.extend_from_slice(&r.records.to_le_bytes());
        index.extend_from_slice(&(r.names.len() as u32).to_le_bytes());
        for n in &r.names {
            let len = u16::try_from(n.len()).map_err(|_| malformed("domain name too long"))?;
            index.extend_from_slice(&len.to_le_bytes());
            index.extend_from_slice(n.as_bytes());
        }
    }
    let crc = crc32fast::hash(&index);
    index.extend_from_slice(&crc.to_le_bytes());
    write_atomic(path, &index)?;
    Ok(collect_garbage(path))
}

/// Persist a set (or a single snapshot as a set of one): the segment files that do not exist
/// yet, then the index, then remove unnamed segment files. Segments read from this set's
/// directory are not read again.
pub fn write(path: &Path, set: &Snapshot) -> Result<WriteStats, SnapshotError> {
    let dir = parts_dir(path);
    let mut stats = WriteStats::default();
    let mut refs = Vec::new();
    let put = |part: &Snapshot, stats: &mut WriteStats| -> Result<SegmentRef, SnapshotError> {
        let bytes = match part.image() {
            Some(b) => std::borrow::Cow::Borrowed(b),
            None => std::borrow::Cow::Owned(part.read_back()?),
        };
        let r = write_segment(path, &bytes)?;
        stats.written += 1;
        stats.bytes_written += r.written;
        Ok(r)
    };
    match set.set_index() {
        None => refs.push(put(set, &mut stats)?),
        Some(index) => {
            for part in &index.parts {
                let r = part.segment_ref();
                if segment_file(&dir, r.hash).exists() {
                    stats.kept += 1;
                    refs.push(r);
                    continue;
                }
                let snap = part
                    .get()
                    .ok_or(malformed("a segment to write cannot be read"))?;
                refs.push(put(snap, &mut stats)?);
            }
        }
    }
    stats.removed = write_index(path, set.generation(), set.created_unix(), &refs)?;
    Ok(stats)
}

/// A decoded index file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// Generation of the set.
    pub generation: u64,
    /// When it was written (Unix seconds).
    pub created_unix: u64,
    /// The segments, in order.
    pub segments: Vec<IndexEntry>,
}

/// One segment as the index records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The hash that names its file.
    pub hash: u64,
    /// The CRC-32 of its header.
    pub crc: u32,
    /// Its addresses.
    pub records: u64,
    /// Its domains, in name order.
    pub domains: Vec<String>,
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
    let mut r = super::format::Reader::new(body.get(8..).unwrap_or_default());
    let short = || malformed("index shorter than its segment count");
    let version = r.u32().unwrap_or(0);
    if version != SET_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported: SET_VERSION,
        });
    }
    let count = r.u32().ok_or_else(short)? as usize;
    let generation = r.u64().ok_or_else(short)?;
    let created_unix = r.u64().ok_or_else(short)?;
    // Every entry takes ENTRY bytes at least: a count the body cannot hold is refused before
    // anything is allocated for it.
    if count > body.len() / ENTRY {
        return Err(short());
    }
    let mut segments = Vec::with_capacity(count);
    for _ in 0..count {
        let hash = r.u64().ok_or_else(short)?;
        let crc = r.u32().ok_or_else(short)?;
        let records = r.u64().ok_or_else(short)?;
        let n = r.u32().ok_or_else(short)? as usize;
        if n > body.len() / 2 {
            return Err(short());
        }
        let mut domains = Vec::with_capacity(n);
        for _ in 0..n {
            let len = r
                .take(2)
                .and_then(|b| b.first_chunk::<2>().copied())
                .map(u16::from_le_bytes)
                .ok_or_else(short)?;
            let name = r.take(usize::from(len)).ok_or_else(short)?;
            let name = std::str::from_utf8(name).map_err(|_| malformed("domain name not UTF-8"))?;
            domains.push(name.to_owned());
        }
        if domains.windows(2).any(|w| w[0] >= w[1]) {
            return Err(malformed("a segment's domains out of order"));
        }
        segments.push(IndexEntry {
            hash,
            crc,
            records,
            domains,
        });
    }
    if r.take(1).is_some() {
        return Err(malformed("bytes after the last segment"));
    }
    Ok(Index {
        generation,
        created_unix,
        segments,
    })
}

fn read_index(path: &Path) -> Result<Index, SnapshotError> {
    parse_index(&std::fs::read(path).map_err(io(path))?)
}

/// Open the set whose index is at `path`. `lazy`: only the index is read, and each segment
/// the first time it is needed (a start-up does not wait for them; every segment file is
/// checked to be there). Otherwise every segment is read now (on every core) and checked
/// against the index's record of its header.
pub(super) fn open(path: &Path, huge_pages: bool, lazy: bool) -> Result<Snapshot, SnapshotError> {
    let index = read_index(path)?;
    let dir = parts_dir(path);
    let file = |e: &IndexEntry| segment_file(&dir, e.hash);
    if lazy {
        let parts = index
            .segments
            .iter()
            .map(|e| {
                let f = file(e);
                let len = std::fs::metadata(&f).map_err(io(&f))?.len();
                if len < HEADER_LEN as u64 {
                    return Err(malformed("a segment file is shorter than its header"));
                }
                let r = SegmentRef {
                    hash: e.hash,
                    crc: e.crc,
                    records: e.records,
                    names: e.domains.iter().map(|d| d.as_str().into()).collect(),
                    written: 0,
                };
                Ok(Arc::new(Part::on_disk(r, &dir)))
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        return Snapshot::with_index(SetIndex::of(parts)?, index.generation, index.created_unix);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 8);
    let chunk = index.segments.len().div_ceil(threads).max(1);
    let opened: Vec<Result<Arc<Snapshot>, SnapshotError>> = std::thread::scope(|s| {
        let handles: Vec<_> = index
            .segments
            .chunks(chunk)
            .map(|group| {
                let file = &file;
                s.spawn(move || {
                    group
                        .iter()
                        .map(|e| {
                            let part = Snapshot::open_part(&file(e), huge_pages)?;
                            if header_crc(&part) != e.crc {
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
    Snapshot::assemble(parts, index.generation, index.created_unix)
}

/// A set of generation `generation`: the segments of `old` but those at the positions in
/// `remove`, the segments in `built` (in memory) and those in `written` (files in `dir`,
/// read on first use).
pub fn with_parts(
    old: Option<&Snapshot>,
    remove: &HashSet<usize>,
    built: Vec<Arc<Snapshot>>,
    written: Vec<SegmentRef>,
    dir: Option<&Path>,
    generation: u64,
    created_unix: u64,
) -> Result<Snapshot, SnapshotError> {
    let mut parts: Vec<Arc<Part>> = old
        .and_then(Snapshot::set_index)
        .map(|i| {
            i.parts
                .iter()
                .enumerate()
                .filter(|(p, _)| !remove.contains(p))
                .map(|(_, p)| p.clone())
                .collect()
        })
        .unwrap_or_default();
    for b in built {
        parts.push(Arc::new(Part::loaded(b)?));
    }
    if !written.is_empty() {
        let dir = dir.ok_or(malformed("written segments without a directory"))?;
        for r in written {
            parts.push(Arc::new(Part::on_disk(r, dir)));
        }
    }
    Snapshot::with_index(SetIndex::of(parts)?, generation, created_unix)
}

/// The set `set`, written at `path` already, with every segment that is still held in
/// memory as built (a whole image, cold sections included) replaced by its file, read on
/// first use (hot sections only); the other segments are shared.
pub fn reopen(path: &Path, set: &Snapshot) -> Result<Snapshot, SnapshotError> {
    let Some(index) = set.set_index() else {
        return Snapshot::open(path);
    };
    Snapshot::with_index(
        index.built_to_files(&parts_dir(path))?,
        set.generation(),
        set.created_unix(),
    )
}

/// Remove the segment files that the index at `path` does not name (left by a crash between
/// writing segments and the index, or no longer used), and temporary files; how many.
pub fn collect_garbage(path: &Path) -> usize {
    let Ok(index) = read_index(path) else {
        return 0;
    };
    let dir = parts_dir(path);
    let keep: HashSet<PathBuf> = index
        .segments
        .iter()
        .map(|e| segment_file(&dir, e.hash))
        .collect();
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
    use crate::directory::{LookupOptions, Reject, Verdict};

    /// A segment declaring `domains`, each with `user@` the domain.
    fn segment(domains: &[&str]) -> Arc<Snapshot> {
        let mut text = String::new();
        for d in domains {
            text.push_str(&format!("1|{d}\tDOMAIN:\t{d}\n1|{d}\tDIR:\tuser@{d}\n"));
        }
        text.push_str("++++\n");
        let name: Arc<str> = "t.map".into();
        let data = crate::sources::mapfile::parse(&name, &text).expect("parse");
        let (image, _) = crate::sync::merge(&[data], 3).build().expect("build");
        Arc::new(Snapshot::from_bytes(image).expect("open"))
    }

    /// Two domains whose hashes share the index's fingerprint (and so its first slot), in
    /// different segments: a lookup goes on past the segment that does not have the name,
    /// so each is answered by its own segment, and a name in no segment of the set is not
    /// ours.
    #[test]
    fn names_that_share_a_fingerprint_are_told_apart_by_their_segments() {
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (0u32..)
            .find_map(|i| {
                let name = format!("d{i}.example");
                let tag = domain_hash(name.as_bytes()) as u32;
                seen.insert(tag, name.clone()).map(|other| (other, name))
            })
            .expect("a pair");
        let (sa, sb) = (segment(&[&a, "x1.example"]), segment(&[&b, "x2.example"]));
        let options = LookupOptions::default();
        let mut buf = crate::address::AddrBuf::default();
        let mut ask = |set: &Snapshot, q: &str| set.lookup(q, &options, &mut buf);
        let both = Snapshot::assemble(vec![sa.clone(), sb.clone()], 5, 1).expect("set");
        for (name, other) in [(&a, &b), (&b, &a)] {
            let Verdict::Accept(hit) = ask(&both, &format!("user@{name}")) else {
                panic!("user@{name} not found");
            };
            let info = both.domain_info(hit.domain).expect("domain");
            assert_eq!(info.name, name.as_str());
            assert_eq!(both.domain_index(name), Some(hit.domain));
            assert_ne!(both.domain_index(other), Some(hit.domain));
            assert_eq!(
                ask(&both, &format!("nobody@{name}")),
                Verdict::Reject(Reject::UnknownUser)
            );
        }
        for (only, stranger) in [(&sa, &b), (&sb, &a)] {
            let set = Snapshot::assemble(vec![only.clone()], 6, 1).expect("set");
            assert_eq!(ask(&set, &format!("user@{stranger}")), Verdict::NotOurs);
            assert_eq!(set.domain_index(stranger), None);
        }
    }

    /// An index of (hash, crc, records, domains) entries, `count` claimed.
    fn index(count: u32, entries: &[(u64, u32, u64, &[&str])]) -> Vec<u8> {
        let mut b = SET_MAGIC.to_vec();
        b.extend_from_slice(&SET_VERSION.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&9u64.to_le_bytes());
        b.extend_from_slice(&1_700_000_000u64.to_le_bytes());
        for (h, c, r, names) in entries {
            b.extend_from_slice(&h.to_le_bytes());
            b.extend_from_slice(&c.to_le_bytes());
            b.extend_from_slice(&r.to_le_bytes());
            b.extend_from_slice(&(names.len() as u32).to_le_bytes());
            for n in *names {
                b.extend_from_slice(&(n.len() as u16).to_le_bytes());
                b.extend_from_slice(n.as_bytes());
            }
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn an_index_decodes_and_every_damage_is_refused() {
        let good = index(
            2,
            &[
                (0xfeed, 7, 100, &["a.example", "b.example"]),
                (0xbeef, 8, 5, &["c.example"]),
            ],
        );
        let parsed = parse_index(&good).expect("good");
        assert_eq!((parsed.generation, parsed.created_unix), (9, 1_700_000_000));
        assert_eq!(
            parsed.segments[0],
            IndexEntry {
                hash: 0xfeed,
                crc: 7,
                records: 100,
                domains: vec!["a.example".into(), "b.example".into()],
            }
        );
        assert_eq!(parsed.segments[1].domains, ["c.example"]);
        assert_eq!(parse_index(&index(0, &[])).expect("empty").segments, []);
        // Torn at every length, a flipped bit anywhere, a count that lies, names out of
        // order: refused.
        for cut in 0..good.len() {
            assert!(parse_index(&good[..cut]).is_err(), "cut at {cut}");
        }
        for bit in 0..good.len() * 8 {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(parse_index(&b).is_err(), "bit {bit}");
        }
        assert!(parse_index(&index(3, &[(1, 1, 1, &["x"]), (2, 2, 2, &["y"])])).is_err());
        assert!(parse_index(&index(1, &[(1, 1, 1, &["x"]), (2, 2, 2, &["y"])])).is_err());
        assert!(parse_index(&index(u32::MAX, &[])).is_err());
        assert!(parse_index(&index(1, &[(1, 1, 1, &["b", "a"])])).is_err());
        // A single snapshot is not an index.
        assert!(matches!(
            parse_index(b"RCPTGATE and more bytes than the index header needs....."),
            Err(SnapshotError::BadMagic | SnapshotError::SectionChecksum { .. })
        ));
    }
}
