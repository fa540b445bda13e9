//! A loaded, immutable snapshot and the lookup that runs on it (DESIGN.md §4 steps 2-5, 8).
//!
//! FST keys are domain-first: the domain's index as a fixed-width big-endian prefix, then the
//! folded local part. The domain is found first through a persisted hash index (it has to be,
//! to tell "not ours" apart); its FST node after the prefix is resolved when the snapshot is
//! opened, so a lookup walks only the local part. FST values are `attribute set << 4 | kind`:
//! they repeat within a domain, so the FST stores them almost for free. Diagnostic data
//! (owner, origin) is cold: found by the 64-bit hash of the key, only when asked for.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use fst::raw::{CompiledAddr, Fst, Output};

use super::filter::{self, Keying, ShardFilter};
use super::format::{
    self, COLD_AMBIGUOUS, COLD_REC, DOMAIN_REC, Header, SHARD_REC, Sec, SnapshotError, domain_hash,
    get_str, u32_at,
};
use super::segments::{self, SetIndex};
use super::walk::Walker;
use super::{Hit, Kind, LookupOptions, Match, Reject, Verdict};
use crate::address::{self, AddrBuf, AddrError};

/// FST keys per shard checked against its filter when a snapshot is opened.
const FILTER_SAMPLE: usize = 64;

/// Largest key built on the stack: 4-byte domain prefix plus a folded local part.
const KEY_MAX: usize = 4 + 4 * address::MAX_LOCAL;

/// The bytes behind a snapshot, always memory this process owns: nothing done to the file
/// afterwards (truncated, rewritten in place) can change an answer or crash the process.
enum Backing {
    /// Anonymous memory: the FST in huge pages.
    Anon(memmap2::Mmap),
    /// The whole image (a build, or a snapshot given as bytes).
    Heap(Vec<u8>),
    /// Read from a file: the header and every hot section in `image`, and the file (`len`
    /// bytes), to read the cold sections on first use (checked against their checksums). The
    /// image ends with the last hot section when the file lays out its hot sections first
    /// (as builds do), else it is as long as the file (cold ranges stay zero and untouched,
    /// so they take no memory in a mapping).
    Partial {
        image: Image,
        file: ColdFile,
        len: usize,
    },
}

/// Where the hot sections of a file of `len` bytes end when they all come before the cold
/// ones (the layout of builds since [`Sec::ALL`] put them first), checked to be within the
/// file; `None` for another layout.
fn hot_prefix(header: &Header, len: usize) -> Option<usize> {
    let end = |s: Sec| {
        let r = header.sections[s as usize];
        r.off.checked_add(r.len)
    };
    let hot_end = Sec::ALL
        .into_iter()
        .filter(|s| !s.is_cold())
        .map(end)
        .try_fold(format::HEADER_LEN as u64, |acc, e| e.map(|e| acc.max(e)))?;
    let cold_start = Sec::ALL
        .into_iter()
        .filter(|s| s.is_cold())
        .map(|s| header.sections[s as usize].off)
        .min()
        .unwrap_or(u64::MAX);
    let hot_end = usize::try_from(hot_end).ok()?;
    (hot_end as u64 <= cold_start && hot_end <= len).then_some(hot_end)
}

/// The zeroed image of a file opened from disk. Large ones are an anonymous mapping, whose
/// pages are committed only when written: the cold ranges, never written, take no memory.
/// (Zeroed memory from the heap does not promise that: below the allocator's threshold for
/// mappings — which rises up to 32 MiB as large blocks are freed — a zeroed allocation is
/// recycled memory written with zeros, so a set of small segments had every file resident,
/// cold sections included: 47 bytes per address where 10 are hot.) Small images of hot
/// bytes alone are carved from huge pages shared with other images instead (`arena.rs`).
enum Image {
    Heap(Vec<u8>),
    Anon(memmap2::MmapMut),
    /// Carved from huge pages shared with other small images (a set's segments: see
    /// `arena.rs`).
    Slab(super::arena::Slab),
}

impl Image {
    /// Smallest image put in a mapping of its own (smaller ones are a few pages anyway).
    /// A build lays out the hot sections first, so a mapped image commits the pages of its
    /// hot sections and nothing else: for a segment of 1,000 addresses (~47 KB, 10 KB of
    /// them hot) 3 pages where a zeroed heap block could commit all 12.
    const MAPPED: usize = 16 << 10;

    /// `huge_pages`: a small image is carved from the shared huge pages when it can be.
    fn zeroed(len: usize, huge_pages: bool) -> Image {
        if huge_pages && let Some(s) = super::arena::slab(len) {
            return Image::Slab(s);
        }
        if len >= Image::MAPPED
            && let Ok(m) = memmap2::MmapOptions::new().len(len).map_anon()
        {
            return Image::Anon(m);
        }
        Image::Heap(vec![0u8; len])
    }
}

impl std::ops::Deref for Image {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Image::Heap(v) => v,
            Image::Anon(m) => m,
            Image::Slab(s) => s,
        }
    }
}

impl std::ops::DerefMut for Image {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Image::Heap(v) => v,
            Image::Anon(m) => m,
            Image::Slab(s) => s,
        }
    }
}

/// Where the cold sections of a snapshot opened from a file are read.
enum ColdFile {
    /// The file opened at start (a single snapshot: a file renamed over it later does not
    /// change what is read).
    Open(File),
    /// Opened again at each read: a segment of a set (thousands of segments would otherwise
    /// hold thousands of descriptors; a segment file never changes, and what is read is
    /// checked against the checksums anyway).
    Path(std::path::PathBuf),
}

impl ColdFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            ColdFile::Open(f) => f.read_exact_at(buf, offset),
            ColdFile::Path(p) => File::open(p)?.read_exact_at(buf, offset),
        }
    }
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Anon(m) => m,
            Backing::Heap(v) => v,
            Backing::Partial { image, .. } => image,
        }
    }
}

/// A backing's bytes (or a range of them) with their address kept beside the `Arc` that
/// owns them, so reading them reads no more than the struct holding the view: a lookup in a
/// set's segment reaches the miss filter's fingerprints and the FST's nodes without a trip
/// to the backing's allocation (10,000 segments' are not in cache).
#[derive(Clone)]
struct View {
    ptr: *const u8,
    len: usize,
    /// Keeps the bytes alive and unmoved.
    _owner: Arc<Backing>,
}

// SAFETY: a `View` is an `Arc<Backing>` (`Send` and `Sync`) plus the address and length of
// the bytes that backing owns, read only (see `View::bytes`); sending or sharing it shares
// nothing the `Arc` does not.
#[allow(unsafe_code)]
unsafe impl Send for View {}
#[allow(unsafe_code)]
unsafe impl Sync for View {}

impl View {
    fn of(owner: Arc<Backing>) -> View {
        let bytes = owner.bytes();
        View {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            _owner: owner,
        }
    }

    /// A view of `range` of `owner`'s bytes (`None` when out of bounds).
    fn of_range(owner: Arc<Backing>, range: Range<usize>) -> Option<View> {
        let bytes = owner.bytes().get(range)?;
        Some(View {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            _owner: owner,
        })
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` and `len` are those of `self._owner.bytes()` or of a range of them
        // (checked with `get` in `of_range`), taken when the view was made. A `Backing` is
        // never changed once it is in an `Arc` (no `&mut` to one is taken after: every
        // variant's bytes are a heap buffer or a mapping, neither moved nor resized nor
        // written while borrowed shared), and `self._owner` keeps it alive as long as
        // `self`, so the bytes are still there, unchanged, for the borrow's life.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr, self.len)
        }
    }
}

/// Hot sections read into memory of their own (huge pages) instead of the backing.
#[derive(Default)]
struct Owned {
    fst: Option<memmap2::Mmap>,
    filter: Option<memmap2::Mmap>,
}

impl Owned {
    /// Where section `sec` goes when it gets memory of its own (`None`: it never does).
    fn slot(&mut self, sec: Sec) -> Option<&mut Option<memmap2::Mmap>> {
        match sec {
            Sec::Fst => Some(&mut self.fst),
            Sec::Filter => Some(&mut self.filter),
            _ => None,
        }
    }
}

/// The cold sections once read: `bytes` covers file offsets `base..`, or is `None` when they
/// are in the backing already.
struct Cold {
    base: usize,
    bytes: Option<Vec<u8>>,
}

/// One shard's FST bytes inside the backing (what `fst::Map` reads).
struct FstBytes {
    backing: Arc<Backing>,
    /// In bounds of `backing`: checked when the snapshot is opened.
    range: Range<usize>,
}

impl AsRef<[u8]> for FstBytes {
    fn as_ref(&self) -> &[u8] {
        self.backing.bytes().get(self.range.clone()).unwrap_or(&[])
    }
}

/// Decoded domain record.
#[derive(Debug, Clone, Copy)]
struct DomainRec {
    index: u32,
    name: u32,
    customer: u32,
    declared: u32,
    flags: u32,
    records: u32,
}

const FLAG_ACCEPT_ALL: u32 = 1;
const FLAG_KEEP_CASE: u32 = 2;

impl DomainRec {
    fn shard(&self) -> usize {
        shard_in(self.flags)
    }
}

/// The FST shard a domain's flags name.
fn shard_in(flags: u32) -> usize {
    ((flags >> 8) & 0xff) as usize
}

/// Longest domain name kept inline in [`DomainHot`]; longer ones compare via the string table.
const INLINE_NAME: usize = 38;

/// What a lookup needs of a domain, in one cache line, built at open: the domain table's
/// slots are these lines themselves (see [`Snapshot::find_hot`]), so the domain step is one
/// read instead of a slot, then an entry, then the record, the string index and the blob.
/// The rest of the record is in [`DomainMore`], by index.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct DomainHot {
    /// The name when it fits (`name_len <= INLINE_NAME`).
    name: [u8; INLINE_NAME],
    name_len: u8,
    /// The domain has addresses: `start_addr` and `start_out` are the FST node after its
    /// key prefix and the output gathered on the way.
    has_start: bool,
    start_addr: CompiledAddr,
    start_out: u64,
    index: u32,
    flags: u32,
}

// A lookup reads one cache line of the domain table.
const _: () = assert!(std::mem::size_of::<DomainHot>() == 64);

/// A free slot of the domain table (no domain name is empty).
const NO_DOMAIN: DomainHot = DomainHot {
    name: [0; INLINE_NAME],
    name_len: 0,
    has_start: false,
    start_addr: 0,
    start_out: 0,
    index: 0,
    flags: 0,
};

/// The rest of a domain's record, by index, for the steps after the domain step.
#[derive(Debug, Clone, Copy)]
struct DomainMore {
    /// String id of the name (read when it is too long for [`DomainHot`]).
    name: u32,
    /// Attribute set declared on the domain.
    declared: u32,
    /// [`domain_hash`] of the name (the key of filters keyed by name).
    name_hash: u64,
}

impl DomainHot {
    /// FST node after the domain's key prefix and the output gathered on the way (`None`
    /// when the domain has no addresses).
    fn start(&self) -> Option<(CompiledAddr, u64)> {
        self.has_start.then_some((self.start_addr, self.start_out))
    }

    /// Its FST shard, from the copy of the flags in the first line.
    fn shard(&self) -> usize {
        shard_in(self.flags)
    }
}

/// Where a domain's addresses are in a snapshot's miss filters (see `filter.rs`).
#[derive(Debug, Clone, Copy)]
enum FilterAt {
    /// Filters keyed by index: the domain's shard and index.
    Index { shard: usize, domain: u32 },
    /// Filters keyed by name: the name's [`domain_hash`].
    Name(u64),
}

/// A domain as the CLI and frontends see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo<'a> {
    /// Its normalized name.
    pub name: &'a str,
    /// The customer it belongs to.
    pub customer: Option<&'a str>,
    /// Default profile of its addresses.
    pub profile: Option<&'a str>,
    /// Default route of its addresses.
    pub route: Option<&'a str>,
    /// Every local part is accepted.
    pub accept_all: bool,
    /// Local parts compare case-sensitively.
    pub keep_case: bool,
    /// Addresses stored for it.
    pub records: u32,
}

/// Diagnostic data of one record, from the cold section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    /// Primary address of the object this address belongs to (itself for a primary).
    pub owner: Option<String>,
    /// `source:line`, and the DN for directory entries.
    pub origin: String,
    /// Other `key=value` attributes from the source.
    pub attributes: Option<String>,
}

/// An immutable directory snapshot. Cheap to share (`Arc`), never modified after load.
pub struct Snapshot {
    backing: Arc<Backing>,
    header: Header,
    /// (first domain index, FST) per shard, in domain order.
    shards: Vec<(u32, Fst<FstBytes>)>,
    /// The miss filter of each shard, when it has a usable one (see `filter.rs`), and the
    /// memory its ranges point into (huge pages of its own, or the backing).
    filters: Vec<Option<ShardFilter>>,
    /// Which of `filters` holds a domain, by its name's hash (keyed by name).
    block_of: filter::BlockOf,
    /// How the filters' keys are made (every usable block is keyed the same way).
    keying: Keying,
    filter_mem: View,
    /// The domain table built at open: each domain's [`DomainHot`] at the first free slot
    /// from its name's hash on (linear probing, a power of two, at most two thirds full).
    /// Shared with a set's [`SegmentHandle`] of this snapshot.
    hot: Arc<[DomainHot]>,
    /// Per domain index, the rest of its record.
    more: Vec<DomainMore>,
    /// Per domain, how many bytes of its FST shard lie at or below its start node and above
    /// every earlier domain's (see [`node_spans`]); 0 when unknown.
    spans: Arc<[u32]>,
    /// Byte ranges of the hot sections inside `backing`, all checked at load.
    str_index: Range<usize>,
    str_blob: Range<usize>,
    domains: Range<usize>,
    slots: Range<usize>,
    attrsets: Range<usize>,
    sources: Range<usize>,
    cold_keys: Range<usize>,
    cold_records: Range<usize>,
    cold_blob: Range<usize>,
    excluded: Range<usize>,
    /// The cold sections, read and checked on first use (or why they cannot be used).
    cold: OnceLock<Result<Cold, String>>,
    /// The `excluded` section, read and checked on its own the first time `explain` needs
    /// it (a miss's explanation does not pay for reading every cold section).
    excluded_cache: OnceLock<Vec<u8>>,
    /// A segmented snapshot (see `segments.rs`): its segments and domain index. Its own
    /// sections are then those of an empty snapshot of the set's generation.
    set: Option<Box<SetIndex>>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.header.generation)
            .field("records", &self.header.records)
            .field("domains", &self.header.domains)
            .finish()
    }
}

impl Snapshot {
    /// Open a persisted snapshot: read the header and every hot section into memory this
    /// process owns (the FST and the miss filter into anonymous memory advised to use
    /// transparent huge pages, in Linux `madvise` mode, which cuts TLB misses on random
    /// lookups in a large directory) and check their checksums. The cold sections (diagnostics) are read on first use.
    /// Whatever happens to the file afterwards cannot change an answer or crash the
    /// process.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        Snapshot::open_with(path, true)
    }

    /// Like [`Self::open`], but a set of segments (see `segments.rs`) is opened from its
    /// index alone, each segment read (and checked) the first time a lookup needs it: what
    /// the daemon does at start, so a directory of thousands of segments answers at once.
    /// A segment that cannot be read then makes its domains answer a temporary failure.
    pub fn open_lazy(path: &Path) -> Result<Snapshot, SnapshotError> {
        let mut magic = [0u8; 8];
        let is_set = File::open(path)
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.read_exact_at(&mut magic, 0)
            })
            .is_ok()
            && segments::is_set(&magic);
        if is_set {
            segments::open(path, true, true)
        } else {
            Snapshot::open(path)
        }
    }

    /// Like [`Self::open`], without the huge-page copies of the FST and the miss filter.
    pub fn open_plain(path: &Path) -> Result<Snapshot, SnapshotError> {
        Snapshot::open_with(path, false)
    }

    fn open_with(path: &Path, huge_pages: bool) -> Result<Snapshot, SnapshotError> {
        use std::os::unix::fs::FileExt;
        let file = File::open(path).map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut magic = [0u8; 8];
        if file.read_exact_at(&mut magic, 0).is_ok() && segments::is_set(&magic) {
            return segments::open(path, huge_pages, false);
        }
        Snapshot::open_file(path, file, huge_pages, true)
    }

    /// Open one segment of a set (a single snapshot file, never an index).
    pub(super) fn open_part(path: &Path, huge_pages: bool) -> Result<Snapshot, SnapshotError> {
        let file = File::open(path).map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Snapshot::open_file(path, file, huge_pages, false)
    }

    /// `keep_open`: read the cold sections later through this open file, else through the
    /// path (see [`ColdFile`]).
    fn open_file(
        path: &Path,
        file: File,
        huge_pages: bool,
        keep_open: bool,
    ) -> Result<Snapshot, SnapshotError> {
        use std::os::unix::fs::FileExt;
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = usize::try_from(file.metadata().map_err(io)?.len())
            .map_err(|_| io(std::io::Error::other("file too large")))?;
        let head = len.min(format::HEADER_LEN);
        let mut first = vec![0u8; head];
        file.read_exact_at(&mut first, 0).map_err(io)?;
        let header = Header::decode(&first)?;
        // Zeroed, so untouched (cold) pages are never committed; only as long as the hot
        // sections when they come first (a small file's image is then its hot bytes alone).
        // Huge pages shared with other images only for hot bytes alone (in another layout
        // the image spans the cold ranges too, which a huge page would commit).
        let prefix = hot_prefix(&header, len);
        let mut image = Image::zeroed(prefix.unwrap_or(len), huge_pages && prefix.is_some());
        image
            .get_mut(..head)
            .ok_or(SnapshotError::TooShort {
                need: format::HEADER_LEN,
                len,
            })?
            .copy_from_slice(&first);
        // The FST and the miss filter (the randomly accessed sections) go to huge pages.
        let mut own = Owned::default();
        for sec in Sec::ALL.into_iter().filter(|s| !s.is_cold()) {
            let range = section_range(&header, &image, sec)?;
            let at = range.start as u64;
            // Only a section of at least one huge page gains from memory of its own (a small
            // segment's would be one more mapping for nothing).
            if huge_pages
                && range.len() >= super::arena::HUGE_PAGE
                && let Some(slot) = own.slot(sec)
                && let Some(mut anon) = super::arena::huge_page_memory(range.len())
            {
                file.read_exact_at(&mut anon[..range.len()], at)
                    .map_err(io)?;
                if let Ok(m) = anon.make_read_only() {
                    *slot = Some(m);
                    continue;
                }
            }
            let dst = image.get_mut(range).unwrap_or_default();
            file.read_exact_at(dst, at).map_err(io)?;
        }
        let file = if keep_open {
            ColdFile::Open(file)
        } else {
            ColdFile::Path(path.to_path_buf())
        };
        Snapshot::from_backing(Arc::new(Backing::Partial { image, file, len }), own)
    }

    /// Check a snapshot's header and its hot sections' checksums without loading it (before
    /// it replaces a persisted file).
    pub fn verify(bytes: &[u8]) -> Result<(), SnapshotError> {
        let header = Header::decode(bytes)?;
        for sec in Sec::ALL {
            header.section(bytes, sec)?;
            if !sec.is_cold() {
                header.check(bytes, sec)?;
            }
        }
        Ok(())
    }

    /// The record count and the domain names (in name order) of a snapshot image, its hot
    /// sections checked, without loading it (what a set's index records of a segment).
    pub(super) fn peek_names(bytes: &[u8]) -> Result<(u64, Vec<Box<str>>), SnapshotError> {
        Snapshot::verify(bytes)?;
        let header = Header::decode(bytes)?;
        let domains = header.section(bytes, Sec::Domains)?;
        let index = header.section(bytes, Sec::StrIndex)?;
        let blob = header.section(bytes, Sec::StrBlob)?;
        let bad = SnapshotError::Malformed {
            section: Sec::Domains.name(),
            what: "domain name unreadable",
        };
        let names = (0..header.domains as usize)
            .map(|d| {
                let id = u32_at(domains, DOMAIN_REC, d, 0)? as usize;
                let off = u32_at(index, 8, id, 0)? as usize;
                let len = u32_at(index, 8, id, 1)? as usize;
                let name = blob.get(off..off.checked_add(len)?)?;
                std::str::from_utf8(name).ok().map(Box::from)
            })
            .collect::<Option<Vec<Box<str>>>>()
            .ok_or(bad)?;
        Ok((header.records, names))
    }

    /// Length and checksum of every section: equal for two snapshots with the same content,
    /// whatever their generation and build time.
    pub fn content_digest(&self) -> Vec<(u64, u32)> {
        if let Some(set) = &self.set {
            return set.loaded().flat_map(|p| p.content_digest()).collect();
        }
        self.header
            .sections
            .iter()
            .map(|r| (r.len, r.crc))
            .collect()
    }

    /// [`Self::content_digest`] of snapshot bytes not loaded yet.
    pub fn digest_of(bytes: &[u8]) -> Result<Vec<(u64, u32)>, SnapshotError> {
        Ok(Header::decode(bytes)?
            .sections
            .iter()
            .map(|r| (r.len, r.crc))
            .collect())
    }

    /// Check and load a snapshot held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Snapshot, SnapshotError> {
        Snapshot::from_backing(Arc::new(Backing::Heap(bytes)), Owned::default())
    }

    /// `own`: sections already read into memory of their own (their ranges in `backing` are
    /// not used then), checked here against the header's checksums.
    fn from_backing(backing: Arc<Backing>, mut own: Owned) -> Result<Snapshot, SnapshotError> {
        let file = backing.bytes();
        let header = Header::decode(file)?;
        for sec in Sec::ALL {
            match &*backing {
                // Cold sections past the image are checked against the file's length.
                Backing::Partial { len, .. } if sec.is_cold() => {
                    header.section_within(*len, sec)?;
                }
                _ => {
                    header.section(file, sec)?;
                }
            }
            match own.slot(sec).and_then(|m| m.as_ref()) {
                Some(m) => {
                    let expected = header.sections[sec as usize].crc;
                    let got = crc32fast::hash(
                        m.get(..header.sections[sec as usize].len as usize)
                            .unwrap_or(&[]),
                    );
                    if expected != got {
                        return Err(SnapshotError::SectionChecksum {
                            section: sec.name(),
                            expected,
                            got,
                        });
                    }
                }
                _ if !sec.is_cold() => header.check(file, sec)?,
                _ => {}
            }
        }
        let range = |sec: Sec| -> Range<usize> {
            let r = header.sections[sec as usize];
            r.off as usize..(r.off + r.len) as usize
        };
        let mut snap = Snapshot {
            shards: Vec::new(),
            filters: Vec::new(),
            block_of: filter::BlockOf::new(0),
            keying: Keying::Name,
            filter_mem: View::of(backing.clone()),
            hot: Arc::from(Vec::new()),
            more: Vec::new(),
            spans: Arc::from(Vec::new()),
            str_index: range(Sec::StrIndex),
            str_blob: range(Sec::StrBlob),
            domains: range(Sec::Domains),
            slots: range(Sec::DomainSlots),
            attrsets: range(Sec::AttrSets),
            sources: range(Sec::Sources),
            cold_keys: range(Sec::ColdKeys),
            cold_records: range(Sec::ColdRecords),
            cold_blob: range(Sec::ColdBlob),
            excluded: range(Sec::Excluded),
            cold: OnceLock::new(),
            excluded_cache: OnceLock::new(),
            set: None,
            header,
            backing: backing.clone(),
        };
        snap.validate_tables()?;
        snap.shards = snap.load_shards(&backing, own.fst.take())?;
        snap.filters = snap.load_filters(own.filter.take())?;
        snap.block_of = filter::BlockOf::new(snap.filters.len());
        snap.build_domain_table()?;
        Ok(snap)
    }

    fn bytes(&self, r: &Range<usize>) -> &[u8] {
        self.backing.bytes().get(r.clone()).unwrap_or(&[])
    }

    fn validate_tables(&self) -> Result<(), SnapshotError> {
        let bad = |sec: Sec, what| SnapshotError::Malformed {
            section: sec.name(),
            what,
        };
        let fixed = [
            (Sec::StrIndex, 8),
            (Sec::Domains, DOMAIN_REC),
            (Sec::DomainSlots, 4),
            (Sec::AttrSets, 8),
            (Sec::ColdKeys, 8),
            (Sec::Sources, 4),
            (Sec::ColdRecords, COLD_REC),
            (Sec::Shards, SHARD_REC),
        ];
        for (sec, width) in fixed {
            let r = self.header.sections[sec as usize];
            if !r.len.is_multiple_of(width as u64) {
                return Err(bad(sec, "length is not a whole number of records"));
            }
        }
        let strings = self.string_count();
        for i in 0..strings {
            let (off, len) = (
                u32_at(self.bytes(&self.str_index), 8, i, 0),
                u32_at(self.bytes(&self.str_index), 8, i, 1),
            );
            let ok = matches!((off, len), (Some(o), Some(l))
                if (o as usize).checked_add(l as usize).is_some_and(|e| e <= self.str_blob.len()));
            if !ok || self.string(i as u32).is_none() {
                return Err(bad(
                    Sec::StrIndex,
                    "string outside the string table or not UTF-8",
                ));
            }
        }
        let domains = self.domains.len() / DOMAIN_REC;
        if domains != self.header.domains as usize {
            return Err(bad(Sec::Domains, "count differs from the header"));
        }
        let shards = self.header.sections[Sec::Shards as usize].len as usize / SHARD_REC;
        let attrsets = self.attrsets.len() / 8;
        let key_cap = 1u64 << (8 * self.header.key_width);
        if domains as u64 > key_cap || (shards == 0 && domains > 0) {
            return Err(bad(
                Sec::Domains,
                "more domains than the key prefix can address",
            ));
        }
        let opt_str = |id: u32| id == super::NONE || (id as usize) < strings;
        for i in 0..domains {
            let d = self
                .domain_rec(i as u32)
                .ok_or(bad(Sec::Domains, "short record"))?;
            if (d.name as usize) >= strings
                || !opt_str(d.customer)
                || d.declared as usize >= attrsets
                || d.shard() >= shards
            {
                return Err(bad(Sec::Domains, "reference out of range"));
            }
        }
        let slots = self.slots.len() / 4;
        if domains > 0 && (!slots.is_power_of_two() || slots < domains) {
            return Err(bad(
                Sec::DomainSlots,
                "slot count is not a power of two above the domain count",
            ));
        }
        for i in 0..slots {
            let v = u32_at(self.bytes(&self.slots), 4, i, 0).unwrap_or(0);
            if v as usize > domains {
                return Err(bad(
                    Sec::DomainSlots,
                    "slot names a domain that does not exist",
                ));
            }
        }
        for i in 0..attrsets {
            let p = u32_at(self.bytes(&self.attrsets), 8, i, 0).unwrap_or(0);
            let r = u32_at(self.bytes(&self.attrsets), 8, i, 1).unwrap_or(0);
            if !opt_str(p) || !opt_str(r) {
                return Err(bad(Sec::AttrSets, "string reference out of range"));
            }
        }
        let records = self.header.records as usize;
        if self.cold_keys.len() != records * 8 || self.cold_records.len() != records * COLD_REC {
            return Err(bad(
                Sec::ColdRecords,
                "cold tables do not match the address count",
            ));
        }
        for i in 0..self.sources.len() / 4 {
            let s = u32_at(self.bytes(&self.sources), 4, i, 0).unwrap_or(0);
            if s as usize >= strings {
                return Err(bad(Sec::Sources, "string reference out of range"));
            }
        }
        Ok(())
    }

    fn load_shards(
        &self,
        backing: &Arc<Backing>,
        fst: Option<memmap2::Mmap>,
    ) -> Result<Vec<(u32, Fst<FstBytes>)>, SnapshotError> {
        let table = self.header.section(backing.bytes(), Sec::Shards)?;
        let fst_sec = self.header.sections[Sec::Fst as usize];
        // Where the FST bytes live, and the offset of the FST section inside that.
        let (fst_backing, base) = match fst {
            Some(copy) => (Arc::new(Backing::Anon(copy)), 0),
            None => (backing.clone(), fst_sec.off as usize),
        };
        let mut shards = Vec::new();
        let mut prev_first = None;
        for chunk in table.chunks_exact(SHARD_REC) {
            let mut r = format::Reader::new(chunk);
            let (Some(first), Some(off), Some(len)) = (r.u32(), r.u64(), r.u64()) else {
                continue;
            };
            let in_bounds = off.checked_add(len).is_some_and(|end| end <= fst_sec.len);
            if !in_bounds || prev_first.is_some_and(|p| p >= first) {
                return Err(SnapshotError::Malformed {
                    section: Sec::Shards.name(),
                    what: "shard outside the FST section or out of order",
                });
            }
            prev_first = Some(first);
            let start = base + off as usize;
            let bytes = FstBytes {
                backing: fst_backing.clone(),
                range: start..start + len as usize,
            };
            let map = Fst::new(bytes).map_err(|e| SnapshotError::Fst(e.to_string()))?;
            // The FST's own checksum too: its node decoder trusts its bytes (hostile bytes
            // behind a forged section checksum could make it index out of bounds).
            map.verify()
                .map_err(|e| SnapshotError::Fst(format!("shard {}: {e}", shards.len())))?;
            // The lookup's decoder (walk.rs) reads format versions 2 and later.
            // (The version is the FST's first eight bytes, little-endian.)
            let version = map
                .as_bytes()
                .first_chunk::<8>()
                .map_or(0, |v| u64::from_le_bytes(*v));
            if version < 2 {
                return Err(SnapshotError::Fst(format!(
                    "shard {}: fst format version {version} (rebuild the snapshot)",
                    shards.len()
                )));
            }
            shards.push((first, map));
        }
        Ok(shards)
    }

    /// The shards' miss filters, each checked against a sample of its FST's keys: one that
    /// disagrees (built with other hashing) is left unused rather than trusted. Sets
    /// `self.keying` from the blocks (Name, the default, when there are none).
    ///
    /// `own`: the section in memory of its own (huge pages), else it is read in the backing.
    fn load_filters(
        &mut self,
        own: Option<memmap2::Mmap>,
    ) -> Result<Vec<Option<ShardFilter>>, SnapshotError> {
        let r = self.header.sections[Sec::Filter as usize];
        let base = match own {
            Some(m) => {
                self.filter_mem = View::of(Arc::new(Backing::Anon(m)));
                0
            }
            None => r.off as usize,
        };
        let section = self
            .filter_mem
            .bytes()
            .get(base..base + r.len as usize)
            .unwrap_or(&[]);
        let mut filters = filter::parse(section, base, self.shards.len()).map_err(|what| {
            SnapshotError::Malformed {
                section: Sec::Filter.name(),
                what,
            }
        })?;
        let w = self.header.key_width as usize;
        let blocks = filters.len();
        let Some(keying) = filters.iter().flatten().next().map(ShardFilter::keying) else {
            return Ok(filters);
        };
        self.keying = keying;
        for (n, (_, fst)) in self.shards.iter().enumerate() {
            let mut stream = fst.stream();
            let mut checked = 0;
            while let Some((key, _)) = fst::Streamer::next(&mut stream) {
                let (Some(prefix), Some(local)) = (key.get(..w), key.get(w..)) else {
                    break;
                };
                let domain = prefix.iter().fold(0u32, |a, &b| a << 8 | u32::from(b));
                // The block and key of this address, as a lookup makes them.
                let (block, k) = match keying {
                    Keying::Index => (n, filter::key(domain, local)),
                    Keying::Name => {
                        let Some(h) = self
                            .domain_rec(domain)
                            .and_then(|d| self.string_bytes(d.name))
                            .map(domain_hash)
                        else {
                            break;
                        };
                        (filter::block_of(h, blocks), filter::key_by_name(h, local))
                    }
                };
                let Some(slot) = filters.get_mut(block) else {
                    break;
                };
                if let Some(f) = slot
                    && !f.may_contain(self.filter_mem.bytes(), k)
                {
                    tracing::warn!(
                        block,
                        generation = self.header.generation,
                        "snapshot's miss filter disagrees with its FST (another build's \
                         hashing?): not used; lookups stay exact, misses cost an FST walk"
                    );
                    *slot = None;
                }
                checked += 1;
                if checked == FILTER_SAMPLE {
                    break;
                }
            }
        }
        Ok(filters)
    }

    /// Blocks of the miss filter in use: 0 when the snapshot has none, or when its filter
    /// failed the check at open (lookups are exact either way; without a filter a miss
    /// costs an FST walk).
    pub fn miss_filters(&self) -> usize {
        match &self.set {
            Some(set) => set.loaded().map(|p| p.miss_filters()).sum(),
            None => self.filters.iter().flatten().count(),
        }
    }

    /// True when the miss filter says that neither `local` nor, with a subaddress at `split`,
    /// its base address can be in the domain at `at`.
    fn surely_absent(&self, at: FilterAt, local: &[u8], split: Option<usize>) -> bool {
        let block = match at {
            FilterAt::Index { shard, .. } => shard,
            FilterAt::Name(h) => self.block_of.of(h),
        };
        let Some(f) = self.filters.get(block).and_then(Option::as_ref) else {
            return false;
        };
        let key = |l: &[u8]| match at {
            FilterAt::Index { domain, .. } => filter::key(domain, l),
            FilterAt::Name(h) => filter::key_by_name(h, l),
        };
        absent_in(f, self.filter_mem.bytes(), key, local, split)
    }

    /// Where domain `d`'s addresses are in this snapshot's filters (`None`: not known, so
    /// the filter is not asked).
    fn filter_at(&self, d: &DomainHot) -> Option<FilterAt> {
        match self.keying {
            Keying::Index => Some(FilterAt::Index {
                shard: d.shard(),
                domain: d.index,
            }),
            Keying::Name => Some(FilterAt::Name(self.more.get(d.index as usize)?.name_hash)),
        }
    }

    /// How many bytes of the file its image holds (tests: the hot prefix or the whole file).
    #[cfg(test)]
    pub(crate) fn image_len(&self) -> usize {
        self.backing.bytes().len()
    }

    /// The whole snapshot file image (what is persisted), when it is all in memory (a build,
    /// or [`Self::from_bytes`]); `None` for a snapshot opened from a file.
    pub fn image(&self) -> Option<&[u8]> {
        if self.set.is_some() {
            return None;
        }
        match &*self.backing {
            Backing::Heap(v) => Some(v),
            Backing::Partial { .. } | Backing::Anon(_) => None,
        }
    }

    /// The generation number (grows by one per publish).
    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    /// When it was built (Unix seconds).
    pub fn created_unix(&self) -> u64 {
        self.header.created_unix
    }

    /// Addresses stored, tombstones and exceptions included.
    pub fn record_count(&self) -> u64 {
        match &self.set {
            Some(set) => set.records(),
            None => self.header.records,
        }
    }

    /// Accepted domains.
    pub fn domain_count(&self) -> u32 {
        match &self.set {
            Some(set) => set.domains.len() as u32,
            None => self.header.domains,
        }
    }

    /// Size of the whole file (of every segment's file, for a set).
    pub fn file_bytes(&self) -> usize {
        match &self.set {
            Some(set) => set.loaded().map(|p| p.file_bytes()).sum(),
            None => match &*self.backing {
                Backing::Partial { len, .. } => *len,
                _ => self.backing.bytes().len(),
            },
        }
    }

    /// Size in bytes of one section (summed over the segments of a set).
    pub fn section_bytes(&self, sec: Sec) -> u64 {
        match &self.set {
            Some(set) => set.loaded().map(|p| p.section_bytes(sec)).sum(),
            None => self.header.sections[sec as usize].len,
        }
    }

    /// Bytes of the sections a verdict needs (everything but the cold sections).
    pub fn hot_bytes(&self) -> u64 {
        if let Some(set) = &self.set {
            return set.loaded().map(|p| p.hot_bytes()).sum();
        }
        Sec::ALL
            .iter()
            .filter(|s| !s.is_cold())
            .map(|&s| self.section_bytes(s))
            .sum::<u64>()
            + format::HEADER_LEN as u64
    }

    /// Bytes of the diagnostic (owner, origin) sections.
    pub fn cold_bytes(&self) -> u64 {
        if let Some(set) = &self.set {
            return set.loaded().map(|p| p.cold_bytes()).sum();
        }
        self.section_bytes(Sec::ColdRecords) + self.section_bytes(Sec::ColdBlob)
    }

    /// True for a segmented snapshot (see [`Self::assemble`]).
    pub fn is_set(&self) -> bool {
        self.set.is_some()
    }

    /// The segments of a set, in the order of its index (each read now if it was not yet);
    /// `None` for a single snapshot, or when a segment cannot be read.
    pub fn segments(&self) -> Option<Vec<Arc<Snapshot>>> {
        self.set.as_deref()?.all()
    }

    /// How many segments a set has (0 for a single snapshot); none is read.
    pub fn segment_count(&self) -> usize {
        self.set.as_deref().map_or(0, SetIndex::len)
    }

    /// Segment `p` of a set (read now if it was not yet).
    pub fn segment(&self, p: usize) -> Option<Arc<Snapshot>> {
        self.set.as_deref()?.part(p).cloned()
    }

    /// This set's segments but those at the positions in `remove`, plus `add`, as a set of
    /// generation `generation`: the kept segments are shared (read or not).
    pub fn with_segments(
        &self,
        remove: &std::collections::HashSet<usize>,
        add: Vec<Arc<Snapshot>>,
        generation: u64,
        created_unix: u64,
    ) -> Result<Snapshot, SnapshotError> {
        segments::with_parts(
            Some(self),
            remove,
            add,
            Vec::new(),
            None,
            generation,
            created_unix,
        )
    }

    pub(super) fn set_index(&self) -> Option<&SetIndex> {
        self.set.as_deref()
    }

    /// A set from its domain index.
    pub(super) fn with_index(
        index: SetIndex,
        generation: u64,
        created_unix: u64,
    ) -> Result<Snapshot, SnapshotError> {
        let mut snap = Snapshot::empty(generation, created_unix)?;
        snap.set = Some(Box::new(index));
        Ok(snap)
    }

    /// For a set: the position (in [`Self::segments`]) of the segment holding domain
    /// `normalized`; `None` for a single snapshot or a domain that is not ours.
    pub fn segment_of(&self, normalized: &str) -> Option<usize> {
        self.set.as_deref()?.find(normalized).map(|(p, _, _)| p)
    }

    /// A set of generation `generation` from `segments` (single snapshots, each holding whole
    /// domains; a domain in two segments is refused). Segments are shared, not copied: a
    /// new set that changes one customer's segment reuses every other segment of the set in
    /// service (see `segments.rs`). Hits name the set's domains and generation.
    pub fn assemble(
        segments: Vec<Arc<Snapshot>>,
        generation: u64,
        created_unix: u64,
    ) -> Result<Snapshot, SnapshotError> {
        Snapshot::with_index(SetIndex::new(segments)?, generation, created_unix)
    }

    /// A snapshot with no domain (the own sections of a set).
    pub(super) fn empty(generation: u64, created_unix: u64) -> Result<Snapshot, SnapshotError> {
        let input = super::BuildInput {
            generation,
            created_unix,
            ..Default::default()
        };
        let (bytes, _) = super::build(input).map_err(|e| SnapshotError::Fst(e.to_string()))?;
        Snapshot::from_bytes(bytes)
    }

    /// The header (of a single snapshot).
    pub(super) fn header(&self) -> &Header {
        &self.header
    }

    /// The whole file of a single snapshot opened from a file, read again and checked
    /// against the header it was opened with (to copy it into a set's directory).
    pub(super) fn read_back(&self) -> Result<Vec<u8>, SnapshotError> {
        let Backing::Partial { file, len, .. } = &*self.backing else {
            return Ok(self.backing.bytes().to_vec());
        };
        let mut bytes = vec![0u8; *len];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|source| SnapshotError::Io {
                path: "segment".into(),
                source,
            })?;
        if Header::decode(&bytes)?.encode() != self.header.encode() {
            return Err(SnapshotError::Cold(
                "the snapshot file changed since it was opened".into(),
            ));
        }
        Snapshot::verify(&bytes)?;
        Ok(bytes)
    }

    fn string_count(&self) -> usize {
        self.str_index.len() / 8
    }

    /// A hot-table string by id (`None` for `NONE` or out of range).
    pub fn string(&self, id: u32) -> Option<&str> {
        self.string_bytes(id)
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    fn string_bytes(&self, id: u32) -> Option<&[u8]> {
        let idx = self.bytes(&self.str_index);
        let off = u32_at(idx, 8, id as usize, 0)? as usize;
        let len = u32_at(idx, 8, id as usize, 1)? as usize;
        self.bytes(&self.str_blob).get(off..off.checked_add(len)?)
    }

    fn domain_rec(&self, index: u32) -> Option<DomainRec> {
        let t = self.bytes(&self.domains);
        let f = |field| u32_at(t, DOMAIN_REC, index as usize, field);
        Some(DomainRec {
            index,
            name: f(0)?,
            customer: f(1)?,
            declared: f(2)?,
            flags: f(4)?,
            records: f(5)?,
        })
    }

    fn find_domain(&self, name: &str) -> Option<&DomainHot> {
        self.find_hot(domain_hash(name.as_bytes()), name)
    }

    fn is_named(&self, d: &DomainHot, name: &str) -> bool {
        if usize::from(d.name_len) <= INLINE_NAME {
            d.name.get(..usize::from(d.name_len)) == Some(name.as_bytes())
        } else {
            let id = self.more.get(d.index as usize).map(|m| m.name);
            id.and_then(|id| self.string_bytes(id)) == Some(name.as_bytes())
        }
    }

    /// Index of an accepted domain (normalized form), if it is one of ours.
    pub fn domain_index(&self, normalized: &str) -> Option<u32> {
        match &self.set {
            Some(set) => set.find(normalized).map(|(_, _, g)| g),
            None => self.find_domain(normalized).map(|d| d.index),
        }
    }

    /// A domain by its index (from a [`Hit`] or [`Self::domain_index`]).
    pub fn domain_info(&self, index: u32) -> Option<DomainInfo<'_>> {
        if let Some(set) = &self.set {
            let &(p, l) = set.domains.get(index as usize)?;
            return set.part(p as usize)?.domain_info(l);
        }
        let d = self.domain_rec(index)?;
        let (profile, route) = self.attrset(d.declared);
        Some(DomainInfo {
            name: self.string(d.name)?,
            customer: self.string(d.customer),
            profile,
            route,
            accept_all: d.flags & FLAG_ACCEPT_ALL != 0,
            keep_case: d.flags & FLAG_KEEP_CASE != 0,
            records: d.records,
        })
    }

    fn attrset(&self, id: u32) -> (Option<&str>, Option<&str>) {
        let t = self.bytes(&self.attrsets);
        let p = u32_at(t, 8, id as usize, 0).and_then(|s| self.string(s));
        let r = u32_at(t, 8, id as usize, 1).and_then(|s| self.string(s));
        (p, r)
    }

    fn shard_of(&self, shard: usize) -> Option<&Fst<FstBytes>> {
        self.shards.get(shard).map(|(_, m)| m)
    }

    /// A domain's lookup line and the rest; walks its key prefix from the root (once, at
    /// open).
    fn domain_hot(&self, index: u32) -> Option<(DomainHot, DomainMore)> {
        let rec = self.domain_rec(index)?;
        let fst = self.shard_of(rec.shard())?;
        let w = self.header.key_width as usize;
        let prefix = index.to_be_bytes();
        let start = walk(fst, fst.root().addr(), Output::zero(), &prefix[4 - w..]);
        let full = self.string_bytes(rec.name)?;
        let mut name = [0u8; INLINE_NAME];
        if let Some(dst) = name.get_mut(..full.len()) {
            dst.copy_from_slice(full);
        }
        let hot = DomainHot {
            name,
            name_len: full.len().min(255) as u8,
            has_start: start.is_some(),
            start_addr: start.map_or(0, |(a, _)| a),
            start_out: start.map_or(0, |(_, o)| o.value()),
            index: rec.index,
            flags: rec.flags,
        };
        let more = DomainMore {
            name: rec.name,
            declared: rec.declared,
            name_hash: domain_hash(full),
        };
        // An empty name would read as a free slot; the format has none (names are checked).
        (!full.is_empty()).then_some((hot, more))
    }

    /// Build the domain table (`hot`, `more`) from the domain records, and `spans`.
    fn build_domain_table(&mut self) -> Result<(), SnapshotError> {
        let n = self.header.domains as usize;
        let size = (n + n / 2).max(2).next_power_of_two();
        let mask = size - 1;
        let mut hot = vec![NO_DOMAIN; size];
        let mut order = Vec::with_capacity(n);
        let mut more = Vec::with_capacity(n);
        for i in 0..self.header.domains {
            let (h, m) = self.domain_hot(i).ok_or(SnapshotError::Malformed {
                section: Sec::Domains.name(),
                what: "domain record unreadable",
            })?;
            let mut at = m.name_hash as usize & mask;
            // At most two thirds full: a free slot is always found.
            while hot.get(at).is_some_and(|d: &DomainHot| d.name_len != 0) {
                at = (at + 1) & mask;
            }
            if let Some(slot) = hot.get_mut(at) {
                *slot = h;
            }
            order.push(at);
            more.push(m);
        }
        self.spans = Arc::from(node_spans(
            self.shards.len(),
            order.iter().filter_map(|&at| hot.get(at)),
        ));
        (self.hot, self.more) = (hot.into(), more);
        Ok(())
    }

    /// The domain named `name` (normalized), whose [`domain_hash`] is `h`: one read of the
    /// domain table, more only when slots from `h` on are taken by other names.
    #[inline]
    fn find_hot(&self, h: u64, name: &str) -> Option<&DomainHot> {
        find_in(&self.hot, h, |d| self.is_named(d, name))
    }

    fn hit(&self, value: u64, domain: u32, matched: Match, local_len: usize) -> Hit {
        hit_of(value, domain, matched, local_len, self.header.generation)
    }

    /// Values of `local` and of its first `split` bytes in domain `d`, in one walk from the
    /// domain's start node (the shorter key is a prefix of the longer).
    fn get(&self, d: &DomainHot, local: &[u8], split: Option<usize>) -> (Option<u64>, Option<u64>) {
        match self.shard_of(d.shard()) {
            Some(fst) => walk_domain(fst.as_bytes(), &self.spans, d, local, split),
            None => (None, None),
        }
    }

    /// Steps 2-5 and 8 of DESIGN.md §4 (the [`super::Directory`] adds 1 and 7).
    pub fn lookup(&self, rcpt: &str, options: &LookupOptions, buf: &mut AddrBuf) -> Verdict {
        let addr = match address::parse(rcpt, buf) {
            Ok(a) => a,
            Err(e) => return self.syntax_verdict(rcpt.as_bytes(), e),
        };
        if addr.literal {
            return Verdict::NotOurs;
        }
        // The local part folded as most domains want it (lower case): the miss filter keyed
        // by name is asked with it before the domain's entry is read, so the two wait on
        // memory together. A keep-case domain folds again and asks its filter afterwards.
        let h = domain_hash(addr.domain.as_bytes());
        let mut key = [0u8; KEY_MAX];
        let mut long = Vec::new();
        let lower = fold_local(addr.local, false, &mut key, &mut long);
        let split = address::subaddress_split(lower, &options.separators);
        let Some(set) = &self.set else {
            return self.lookup_single(&addr, h, lower, split, options);
        };
        // In a set, the candidate segment's filter is asked before its domain entry is read.
        let found = set.find_loaded(addr.domain, h, |seg| {
            let early = seg.surely_absent(h, lower, split);
            Some((seg, seg.find_hot(h, addr.domain)?, early))
        });
        let (seg, d, early, p) = match found {
            Some((Some((seg, d, early)), p)) => (seg, d, early, p),
            // A segment that cannot be read: unsure, so a temporary failure.
            Some((None, _)) => return Verdict::Tempfail(super::Tempfail::Internal),
            None => return Verdict::NotOurs,
        };
        let part = seg.snap();
        let verdict = if d.flags & FLAG_KEEP_CASE != 0 {
            part.match_keeping_case(addr.local, d, options)
        } else {
            // Snapshot::match_local, the FST read through the handle and a hit of the set's
            // generation (the segment's struct is not read for either).
            let found = part.unless_absent(d, lower, split, early, || seg.get(d, lower, split));
            part.verdict_of(found, lower, split, d, options, self.header.generation)
        };
        // A segment's hit, in the set's terms: its global domain and the set's generation.
        match verdict {
            Verdict::Accept(hit) => match set.global_of(p, hit.domain) {
                Some(g) => Verdict::Accept(Hit {
                    domain: g,
                    generation: self.header.generation,
                    ..hit
                }),
                // The segment's domain is not in the set's index: unsure.
                None => Verdict::Tempfail(super::Tempfail::Internal),
            },
            v => v,
        }
    }

    /// For a hit of this snapshot: the (single) snapshot that holds its record, and the hit
    /// in that snapshot's terms (a set's segment); `None` for a hit of another generation.
    fn resolve(&self, hit: &Hit) -> Option<(&Snapshot, Hit)> {
        if !self.same_generation(hit) {
            return None;
        }
        let Some(set) = &self.set else {
            return Some((self, *hit));
        };
        let &(p, l) = set.domains.get(hit.domain as usize)?;
        let part = set.part(p as usize)?;
        Some((
            part,
            Hit {
                domain: l,
                generation: part.header.generation,
                ..*hit
            },
        ))
    }

    /// DESIGN.md §4 step 2 for input that is not a mailbox: a permanent `501` only when what
    /// follows the last `@` names a domain we own; otherwise (no domain, a domain that cannot
    /// be parsed or is not ours) the answer is neutral, because what we cannot read is not a
    /// verdict on a mailbox of ours. `raw` may be any bytes.
    pub fn syntax_verdict(&self, raw: &[u8], e: AddrError) -> Verdict {
        let owned = raw
            .iter()
            .rposition(|&b| b == b'@')
            .and_then(|at| std::str::from_utf8(raw.get(at + 1..)?).ok())
            .map(|d| d.trim().trim_end_matches('>').trim_end())
            .and_then(|d| address::normalize_domain(d).ok())
            .is_some_and(|d| self.domain_index(&d).is_some());
        if owned {
            Verdict::Reject(Reject::Syntax(e))
        } else {
            Verdict::NotOurs
        }
    }

    /// A single snapshot's steps 3-5 and 8. The lookup waits on memory twice, together: the
    /// domain table's slot (the domain's line itself) and the miss filter. Filters keyed by
    /// name (every build's since) are asked before the slot is read, with the local part
    /// folded to lower case (all but keep-case domains, which fold again and ask afterwards);
    /// filters keyed by index (earlier builds) once the slot gives the index and shard.
    /// `h` is the domain name's hash; `lower` the local part folded to lower case, its
    /// subaddress separator at `split`.
    fn lookup_single(
        &self,
        addr: &address::Addr<'_>,
        h: u64,
        lower: &[u8],
        split: Option<usize>,
        options: &LookupOptions,
    ) -> Verdict {
        let early = (self.keying == Keying::Name)
            .then(|| self.surely_absent(FilterAt::Name(h), lower, split));
        let Some(d) = self.find_hot(h, addr.domain) else {
            return Verdict::NotOurs;
        };
        if d.flags & FLAG_KEEP_CASE != 0 {
            return self.match_keeping_case(addr.local, d, options);
        }
        self.match_local(lower, split, d, options, early)
    }

    /// [`Self::match_local`] in a keep-case domain: the local part folded keeping its case,
    /// and the miss filter asked with that.
    fn match_keeping_case(&self, local: &str, d: &DomainHot, options: &LookupOptions) -> Verdict {
        let (mut key, mut long) = ([0u8; KEY_MAX], Vec::new());
        let local = fold_local(local, true, &mut key, &mut long);
        let split = address::subaddress_split(local, &options.separators);
        self.match_local(local, split, d, options, None)
    }

    /// Steps 4-5 and 8 for `local` (folded, its subaddress separator at `split`) in domain
    /// `d`; `absent` is the miss filter's answer when the caller asked it already.
    fn match_local(
        &self,
        local: &[u8],
        split: Option<usize>,
        dh: &DomainHot,
        options: &LookupOptions,
        absent: Option<bool>,
    ) -> Verdict {
        let found = self.unless_absent(dh, local, split, absent, || self.get(dh, local, split));
        self.verdict_of(found, local, split, dh, options, self.header.generation)
    }

    /// The filter first: `walk`'s values for `local` and its base address (a subaddress at
    /// `split`) in domain `dh`, unless the miss filter says neither can be there (`absent`,
    /// when the caller asked it already), when the walk is skipped (it would find nothing).
    #[inline]
    fn unless_absent(
        &self,
        dh: &DomainHot,
        local: &[u8],
        split: Option<usize>,
        absent: Option<bool>,
        walk: impl FnOnce() -> (Option<u64>, Option<u64>),
    ) -> (Option<u64>, Option<u64>) {
        if absent.unwrap_or_else(|| self.absent_at(dh, local, split)) {
            (None, None)
        } else {
            walk()
        }
    }

    /// True when the miss filter says that neither `local` nor its base address (a
    /// subaddress at `split`) can be in domain `dh`.
    fn absent_at(&self, dh: &DomainHot, local: &[u8], split: Option<usize>) -> bool {
        self.filter_at(dh)
            .is_some_and(|at| self.surely_absent(at, local, split))
    }

    /// Step 8 for `local` (its subaddress separator at `split`) in domain `dh`, from the
    /// values `found` for it and its base address; a hit is of generation `generation`.
    fn verdict_of(
        &self,
        found: (Option<u64>, Option<u64>),
        local: &[u8],
        split: Option<usize>,
        dh: &DomainHot,
        options: &LookupOptions,
        generation: u64,
    ) -> Verdict {
        let excepted = |v: u64| Kind::from_code(v) == Kind::Exception;
        match found {
            // An exception wins over everything: the address itself, or its base address
            // when only that is listed.
            (Some(v), _) | (None, Some(v)) if excepted(v) => {
                return Verdict::Reject(Reject::Exception);
            }
            (Some(v), _) => {
                let hit = hit_of(v, dh.index, Match::Exact, local.len(), generation);
                return Verdict::Accept(hit);
            }
            (None, Some(v)) => {
                let p = split.unwrap_or(local.len());
                return Verdict::Accept(hit_of(v, dh.index, Match::Subaddress, p, generation));
            }
            (None, None) => {}
        }
        let reserved = options.is_reserved(local)
            || split.is_some_and(|p| options.is_reserved(local.get(..p).unwrap_or(local)));
        if reserved || dh.flags & FLAG_ACCEPT_ALL != 0 {
            let (kind, matched) = if reserved {
                (Kind::Reserved, Match::Reserved)
            } else {
                (Kind::CatchAll, Match::AcceptAll)
            };
            return Verdict::Accept(Hit {
                kind,
                matched,
                local_len: if reserved { local.len() as u16 } else { 0 },
                domain: dh.index,
                attrs: self
                    .more
                    .get(dh.index as usize)
                    .map_or(super::NONE, |m| m.declared),
                generation,
            });
        }
        Verdict::Reject(Reject::UnknownUser)
    }

    fn same_generation(&self, hit: &Hit) -> bool {
        hit.generation == self.header.generation
    }

    /// Profile of an accepted address (its own, its owner's or its domain's); `None` for a hit of another generation.
    pub fn profile(&self, hit: &Hit) -> Option<&str> {
        let (part, hit) = self.resolve(hit)?;
        part.attrset(hit.attrs).0
    }

    /// Route (next hop) of an accepted address (its own, its owner's or its domain's); `None` for a hit of another generation.
    pub fn route(&self, hit: &Hit) -> Option<&str> {
        let (part, hit) = self.resolve(hit)?;
        part.attrset(hit.attrs).1
    }

    /// Every distinct route (next hop) the snapshot's records and domain defaults name, in
    /// table order: what an outbound TLS policy cache can resolve ahead of the first message.
    pub fn routes(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        let parts: Vec<&Snapshot> = match &self.set {
            Some(set) => set.loaded().map(|p| &**p).collect(),
            None => vec![self],
        };
        let mut out = Vec::new();
        for part in parts {
            let n = part.bytes(&part.attrsets).len() / 8;
            out.extend(
                (0..n as u32)
                    .filter_map(|id| part.attrset(id).1)
                    .filter(|r| seen.insert(*r)),
            );
        }
        out
    }

    /// Customer of an accepted address's domain; `None` for a hit of another generation.
    pub fn customer(&self, hit: &Hit) -> Option<&str> {
        let (part, hit) = self.resolve(hit)?;
        let d = part.domain_rec(hit.domain)?;
        part.string(d.customer)
    }

    /// Read (for a snapshot opened from a file) and check the cold sections, once.
    fn check_cold(&self) -> Result<(), SnapshotError> {
        let res = self.cold.get_or_init(|| self.load_cold());
        res.as_ref()
            .map(|_| ())
            .map_err(|e| SnapshotError::Cold(e.clone()))
    }

    fn load_cold(&self) -> Result<Cold, String> {
        let cold = [
            Sec::ColdKeys,
            Sec::ColdRecords,
            Sec::ColdBlob,
            Sec::Excluded,
        ];
        let ranges: Vec<(Sec, Range<usize>)> = cold
            .iter()
            .map(|&sec| {
                let r = self.header.sections[sec as usize];
                (sec, r.off as usize..(r.off + r.len) as usize)
            })
            .collect();
        let base = ranges.iter().map(|(_, r)| r.start).min().unwrap_or(0);
        let end = ranges.iter().map(|(_, r)| r.end).max().unwrap_or(0);
        let read = match &*self.backing {
            Backing::Partial { file, .. } => {
                let mut bytes = vec![0u8; end.saturating_sub(base)];
                file.read_exact_at(&mut bytes, base as u64)
                    .map_err(|e| format!("reading them from the snapshot file: {e}"))?;
                Some(bytes)
            }
            Backing::Heap(_) | Backing::Anon(_) => None,
        };
        let c = Cold { base, bytes: read };
        for (sec, r) in &ranges {
            let expected = self.header.sections[*sec as usize].crc;
            let got = crc32fast::hash(self.cold_slice(&c, r));
            if expected != got {
                return Err(format!(
                    "section '{}' checksum mismatch (expected {expected:#010x}, got {got:#010x}): the file changed or is corrupt",
                    sec.name()
                ));
            }
        }
        Ok(c)
    }

    fn cold_slice<'a>(&'a self, c: &'a Cold, r: &Range<usize>) -> &'a [u8] {
        match &c.bytes {
            Some(b) => b
                .get(r.start.saturating_sub(c.base)..r.end.saturating_sub(c.base))
                .unwrap_or(&[]),
            None => self.bytes(r),
        }
    }

    /// A cold section's bytes ([`Self::check_cold`] first; empty if that failed).
    fn cold_section(&self, r: &Range<usize>) -> &[u8] {
        match self.cold.get() {
            Some(Ok(c)) => self.cold_slice(c, r),
            _ => &[],
        }
    }

    /// The `excluded` section's bytes (read and checked on first use; empty if the file
    /// changed or the checksum does not match).
    pub(crate) fn excluded_bytes(&self) -> &[u8] {
        self.excluded_cache.get_or_init(|| {
            let r = &self.excluded;
            let bytes = match &*self.backing {
                Backing::Partial { file, .. } => {
                    let mut b = vec![0u8; r.len()];
                    if file.read_exact_at(&mut b, r.start as u64).is_err() {
                        return Vec::new();
                    }
                    b
                }
                Backing::Heap(_) | Backing::Anon(_) => self.bytes(r).to_vec(),
            };
            let expected = self.header.sections[Sec::Excluded as usize].crc;
            if crc32fast::hash(&bytes) != expected {
                tracing::warn!(
                    "snapshot section 'excluded' checksum mismatch: the file changed or is corrupt; explain works without it"
                );
                return Vec::new();
            }
            bytes
        })
    }

    /// Up to `max` addresses of `domain` (normalized) whose local part is within edit
    /// distance 1 of `local`, else 2: the FST's Levenshtein automaton, run only over the
    /// domain's keys.
    pub fn similar(&self, local: &str, domain: &str, max: usize) -> Vec<String> {
        if let Some(set) = &self.set {
            return set
                .find(domain)
                .and_then(|(p, _, _)| set.part(p))
                .map(|part| part.similar(local, domain, max))
                .unwrap_or_default();
        }
        use fst::Automaton;
        use fst::automaton::Levenshtein;
        use fst::{IntoStreamer, Streamer};

        struct InDomain<'a> {
            prefix: &'a [u8],
            lev: &'a Levenshtein,
        }
        impl Automaton for InDomain<'_> {
            type State = (usize, Option<<Levenshtein as Automaton>::State>);
            fn start(&self) -> Self::State {
                (0, None)
            }
            fn is_match(&self, s: &Self::State) -> bool {
                s.0 == self.prefix.len() && s.1.as_ref().is_some_and(|l| self.lev.is_match(l))
            }
            fn can_match(&self, s: &Self::State) -> bool {
                match s {
                    (usize::MAX, _) => false,
                    (p, _) if *p < self.prefix.len() => true,
                    (_, l) => l.as_ref().is_some_and(|l| self.lev.can_match(l)),
                }
            }
            fn accept(&self, s: &Self::State, byte: u8) -> Self::State {
                match s {
                    (usize::MAX, _) => (usize::MAX, None),
                    (p, _) if *p < self.prefix.len() => {
                        if self.prefix[*p] != byte {
                            (usize::MAX, None)
                        } else if p + 1 == self.prefix.len() {
                            (p + 1, Some(self.lev.start()))
                        } else {
                            (p + 1, None)
                        }
                    }
                    (p, l) => (*p, l.as_ref().map(|l| self.lev.accept(l, byte))),
                }
            }
        }

        let Some(index) = self.domain_index(domain) else {
            return Vec::new();
        };
        let Some(rec) = self.domain_rec(index) else {
            return Vec::new();
        };
        let Some(fst) = self.shard_of(rec.shard()) else {
            return Vec::new();
        };
        let w = self.header.key_width as usize;
        let be = index.to_be_bytes();
        let prefix = &be[4 - w..];
        for d in 1..=2 {
            let Ok(lev) = Levenshtein::new(local, d) else {
                return Vec::new();
            };
            let aut = InDomain { prefix, lev: &lev };
            let mut found = Vec::new();
            let mut stream = fst.search(&aut).into_stream();
            while let Some((key, _)) = stream.next() {
                let l = String::from_utf8_lossy(&key[w..]).into_owned();
                if l != local {
                    found.push(format!("{l}@{domain}"));
                }
                if found.len() >= max {
                    break;
                }
            }
            if !found.is_empty() {
                return found;
            }
        }
        Vec::new()
    }

    /// Owner, origin and attributes of the record that answered `rcpt` with `hit`, from the
    /// cold sections (checked on first use). `None` for an accept-all answer, a hit from
    /// another generation, or (p ~ 1e-6 per 10M addresses) a key whose hash is ambiguous.
    pub fn record_info(&self, rcpt: &str, hit: &Hit) -> Result<Option<RecordInfo>, SnapshotError> {
        if matches!(hit.matched, Match::AcceptAll | Match::Reserved) {
            return Ok(None);
        }
        let Some((part, hit)) = self.resolve(hit) else {
            return Ok(None);
        };
        if self.set.is_some() {
            return part.record_info(rcpt, &hit);
        }
        let mut buf = AddrBuf::default();
        let Ok(addr) = address::parse(rcpt, &mut buf) else {
            return Ok(None);
        };
        let keep_case = self
            .domain_rec(hit.domain)
            .is_some_and(|d| d.flags & FLAG_KEEP_CASE != 0);
        let w = self.header.key_width as usize;
        let mut key = hit.domain.to_be_bytes()[4 - w..].to_vec();
        address::fold_local_into(addr.local, keep_case, &mut key);
        key.truncate(w + hit.local_len as usize);
        let h = domain_hash(&key);
        self.check_cold()?;
        let keys = self.cold_section(&self.cold_keys);
        let n = keys.len() / 8;
        let key_at = |i: usize| {
            keys.get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if key_at(mid).unwrap_or(u64::MAX) < h {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if key_at(lo) != Some(h) {
            return Ok(None);
        }
        let ordinal = lo;
        self.check_cold()?;
        let t = self.cold_section(&self.cold_records);
        let blob = self.cold_section(&self.cold_blob);
        let f = |field| u32_at(t, COLD_REC, ordinal, field);
        let bad = || SnapshotError::Malformed {
            section: Sec::ColdRecords.name(),
            what: "record reference out of range",
        };
        let (owner, source, line, dn, attrs) = (
            f(0).ok_or_else(bad)?,
            f(1).ok_or_else(bad)?,
            f(2).ok_or_else(bad)?,
            f(3).ok_or_else(bad)?,
            f(4).ok_or_else(bad)?,
        );
        if source & COLD_AMBIGUOUS != 0 {
            return Ok(None);
        }
        let cold = |off: u32| {
            if off == super::NONE {
                Ok(None)
            } else {
                get_str(blob, off)
                    .map(|s| Some(s.to_owned()))
                    .ok_or_else(bad)
            }
        };
        let source_name = u32_at(self.bytes(&self.sources), 4, source as usize, 0)
            .and_then(|id| self.string(id))
            .unwrap_or("?");
        let mut origin = if line > 0 {
            format!("{source_name}:{line}")
        } else {
            source_name.to_owned()
        };
        if let Some(dn) = cold(dn)? {
            origin.push_str(" (");
            origin.push_str(&dn);
            origin.push(')');
        }
        Ok(Some(RecordInfo {
            owner: cold(owner)?,
            origin,
            attributes: cold(attrs)?,
        }))
    }

    /// A cursor over every address in (domain name, local part) order, the same order for
    /// every snapshot, so two snapshots can be compared by merging their cursors.
    pub fn cursor(&self) -> AddressCursor<'_> {
        AddressCursor {
            snap: self,
            streams: self.shards.iter().map(|(_, f)| f.stream()).collect(),
            shard: 0,
            local: Vec::new(),
            domain: 0,
            value: 0,
            set: self.set.as_deref().map(|index| SetCursor {
                generation: self.header.generation,
                cursors: (0..index.len())
                    .map(|p| index.part(p).map(|s| s.cursor()))
                    .collect(),
                pending: vec![false; index.len()],
                done: vec![false; index.len()],
                index,
                at: 0,
                current: 0,
            }),
        }
    }

    /// Every address in key order with its verdict data (for `diff` and exports).
    pub fn for_each_address(&self, mut f: impl FnMut(&str, Hit)) {
        use fst::Streamer;
        if self.set.is_some() {
            let mut c = self.cursor();
            let mut text = String::new();
            while let Some((domain, local)) = c.next_address() {
                text.clear();
                text.push_str(&String::from_utf8_lossy(local));
                text.push('@');
                text.push_str(domain);
                if let Some(hit) = c.hit() {
                    f(&text, hit);
                }
            }
            return;
        }
        let w = self.header.key_width as usize;
        let mut text = String::new();
        for (_, map) in &self.shards {
            let mut stream = map.stream();
            while let Some((key, out)) = stream.next() {
                let value = out.value();
                let Some((prefix, local)) = key.split_at_checked(w) else {
                    continue;
                };
                let mut idx = [0u8; 4];
                idx[4 - w..].copy_from_slice(prefix);
                let index = u32::from_be_bytes(idx);
                let (Some(d), Ok(local)) = (self.domain_rec(index), std::str::from_utf8(local))
                else {
                    continue;
                };
                let domain = self.string(d.name).unwrap_or("");
                text.clear();
                text.push_str(local);
                text.push('@');
                text.push_str(domain);
                f(&text, self.hit(value, d.index, Match::Exact, local.len()));
            }
        }
    }
}

/// See [`Snapshot::cursor`].
pub struct AddressCursor<'s> {
    snap: &'s Snapshot,
    streams: Vec<fst::raw::Stream<'s>>,
    shard: usize,
    /// The current address's local part (copied out of the stream).
    local: Vec<u8>,
    domain: u32,
    /// The current address's FST value.
    value: u64,
    /// For a set: a cursor per segment, merged in domain name order.
    set: Option<SetCursor<'s>>,
}

/// The segments' cursors of a set's [`AddressCursor`]. Each segment's domains come in name
/// order, and no domain is in two segments, so visiting the set's domains in name order and
/// taking, for each, the addresses its segment's cursor holds for it is the merged order.
struct SetCursor<'s> {
    index: &'s SetIndex,
    generation: u64,
    /// `None` for a segment that cannot be read.
    cursors: Vec<Option<AddressCursor<'s>>>,
    /// Segment `i`'s cursor holds an address not returned yet.
    pending: Vec<bool>,
    /// Segment `i`'s cursor is at its end.
    done: Vec<bool>,
    /// The global domain being visited.
    at: usize,
    /// The segment of the address returned last.
    current: usize,
}

impl std::fmt::Debug for AddressCursor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressCursor")
            .field("shard", &self.shard)
            .finish()
    }
}

impl AddressCursor<'_> {
    /// The next address as (domain, local part), or `None` at the end.
    pub fn next_address(&mut self) -> Option<(&str, &[u8])> {
        use fst::Streamer;
        if self.set.is_some() {
            return self.next_in_set();
        }
        let w = self.snap.header.key_width as usize;
        loop {
            let stream = self.streams.get_mut(self.shard)?;
            let Some((key, out)) = stream.next() else {
                self.shard += 1;
                continue;
            };
            self.value = out.value();
            let Some((prefix, local)) = key.split_at_checked(w) else {
                continue;
            };
            let mut idx = [0u8; 4];
            idx[4 - w..].copy_from_slice(prefix);
            self.domain = u32::from_be_bytes(idx);
            self.local.clear();
            self.local.extend_from_slice(local);
            break;
        }
        self.current()
    }

    /// [`Self::next_address`] of a set's cursor.
    fn next_in_set(&mut self) -> Option<(&str, &[u8])> {
        let set = self.set.as_mut()?;
        loop {
            let &(p, l) = set.index.domains.get(set.at)?;
            let p = p as usize;
            let Some(c) = set.cursors.get_mut(p)?.as_mut() else {
                set.at += 1;
                continue;
            };
            if !set.pending[p] && !set.done[p] {
                if c.next_address().is_some() {
                    set.pending[p] = true;
                } else {
                    set.done[p] = true;
                }
            }
            if set.pending[p] && c.domain == l {
                set.pending[p] = false;
                set.current = p;
                break;
            }
            set.at += 1;
        }
        set.cursors.get(set.current)?.as_ref()?.current()
    }

    /// The address read last, of a single snapshot's cursor.
    fn current(&self) -> Option<(&str, &[u8])> {
        let name = self
            .snap
            .domain_rec(self.domain)
            .and_then(|d| self.snap.string(d.name))?;
        Some((name, &self.local))
    }

    /// What the snapshot says of the current address (after [`Self::next_address`]).
    pub fn hit(&self) -> Option<Hit> {
        if let Some(set) = &self.set {
            let hit = set.cursors.get(set.current)?.as_ref()?.hit()?;
            return Some(Hit {
                domain: set.index.global_of(set.current, hit.domain)?,
                generation: set.generation,
                ..hit
            });
        }
        let d = self.snap.domain_rec(self.domain)?;
        Some(
            self.snap
                .hit(self.value, d.index, Match::Exact, self.local.len()),
        )
    }
}

/// `local` in its lookup form ([`address::fold_local_into`]): in `key` when it fits, else in
/// `long`.
fn fold_local<'k>(
    local: &str,
    keep_case: bool,
    key: &'k mut [u8; KEY_MAX],
    long: &'k mut Vec<u8>,
) -> &'k [u8] {
    match address::fold_local_into_slice(local, keep_case, key) {
        Some(n) => key.get(..n).unwrap_or_default(),
        None => {
            long.clear();
            address::fold_local_into(local, keep_case, long);
            long
        }
    }
}

/// The byte range of a section, checked against the file's length.
fn section_range(header: &Header, file: &[u8], sec: Sec) -> Result<Range<usize>, SnapshotError> {
    header.section(file, sec)?;
    let r = header.sections[sec as usize];
    Ok(r.off as usize..(r.off + r.len) as usize)
}

/// Follow `key` from node `addr`, gathering outputs; the node reached, or `None` if a byte
/// has no transition.
fn walk(
    fst: &Fst<FstBytes>,
    addr: CompiledAddr,
    mut out: Output,
    key: &[u8],
) -> Option<(CompiledAddr, Output)> {
    let mut node = fst.node(addr);
    for &b in key {
        let t = node.transition(node.find_input(b)?);
        out = out.cat(t.out);
        node = fst.node(t.addr);
    }
    Some((node.addr(), out))
}

/// The largest node range that a lookup asks for at once (bytes).
const PREFETCH_MAX: usize = 4096;

/// Where the nodes still ahead of a walk are, until they fit in [`PREFETCH_MAX`] and are
/// asked for all at once rather than one by one as the walk reaches each of them: at once for
/// a small domain, else after a step or two. fst writes a node's subtrees in input order, so
/// the subtree a walk enters lies above the node its previous sibling leads to (or above the
/// domain's floor, see `node_spans`), up to the subtree's own root. Suffixes shared
/// with earlier keys lie below; a walk that enters one stops looking.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    /// The lowest byte the subtree under the walk's node can start at; `None` once asked
    /// for, or not known.
    floor: Option<usize>,
}

impl Ahead {
    /// At the domain's start node, `span` bytes above its floor (0: unknown).
    fn new(start: usize, span: usize) -> Ahead {
        Ahead {
            floor: start.checked_sub(span).filter(|_| span > 0),
        }
    }

    /// Still looking for a range that fits (the walk should report siblings).
    fn looking(&self) -> bool {
        self.floor.is_some()
    }

    /// The range to ask for now, when the subtree under `node` fits (once per walk).
    fn fits(&mut self, node: usize) -> Option<(usize, usize)> {
        let lo = self.floor?;
        let fits = node.checked_sub(lo).is_some_and(|n| n <= PREFETCH_MAX);
        fits.then(|| {
            self.floor = None;
            (lo, node)
        })
    }

    /// The walk went to `next`; `sibling` is where the transition before it leads.
    fn stepped(&mut self, next: usize, sibling: Option<usize>) {
        if let Some(lo) = self.floor {
            let lo = sibling.map_or(lo, |s| s.max(lo));
            self.floor = (next > lo).then_some(lo);
        }
    }
}

/// Where each domain's own FST nodes are, from their lines in domain index order. Keys are
/// sorted by domain index, and fst writes a node once the keys after it no longer pass
/// through it, so a domain's nodes lie above the start nodes of every domain before it in its
/// shard, up to its own start node (suffixes shared with earlier keys point further down and
/// are not counted).
fn node_spans<'a>(shards: usize, lines: impl Iterator<Item = &'a DomainHot>) -> Vec<u32> {
    let mut seen = vec![0usize; shards];
    lines
        .map(|d| {
            let (Some(floor), Some((start, _))) = (seen.get_mut(d.shard()), d.start()) else {
                return 0;
            };
            let span = start.saturating_sub(*floor);
            *floor = (*floor).max(start);
            u32::try_from(span).unwrap_or(0)
        })
        .collect()
}

/// Values of `local` and of its first `split` bytes in domain `d`, in one walk from the
/// domain's start node in `fst`, its shard's FST (the shorter key is a prefix of the
/// longer); `spans` are the snapshot's [`node_spans`].
fn walk_domain(
    fst: &[u8],
    spans: &[u32],
    d: &DomainHot,
    local: &[u8],
    split: Option<usize>,
) -> (Option<u64>, Option<u64>) {
    let Some((mut addr, mut out)) = d.start() else {
        return (None, None);
    };
    // Our decoder of fst's node format: each step reads only what it needs (walk.rs).
    let w = Walker::new(fst);
    let span = spans.get(d.index as usize).copied().unwrap_or(0) as usize;
    let mut ahead = Ahead::new(addr, span);
    let mut at_split = None;
    for (i, &b) in local.iter().enumerate() {
        if let Some((lo, hi)) = ahead.fits(addr) {
            prefetch(fst, lo, hi);
        }
        if split == Some(i) {
            at_split = w.final_output(addr).map(|f| out.wrapping_add(f));
        }
        let step = if ahead.looking() {
            w.step_and_sibling(addr, b).map(|(next, o, sibling)| {
                ahead.stepped(next, sibling);
                (next, o)
            })
        } else {
            w.step(addr, b)
        };
        let Some((next, o)) = step else {
            return (None, at_split);
        };
        addr = next;
        out = out.wrapping_add(o);
    }
    (w.final_output(addr).map(|f| out.wrapping_add(f)), at_split)
}

/// True when filter `f` (its fingerprints in `bytes`) says that neither `local` nor, with a
/// subaddress at `split`, its base address can be stored; `key` makes a local part's key.
#[inline]
fn absent_in(
    f: &ShardFilter,
    bytes: &[u8],
    key: impl Fn(&[u8]) -> u64,
    local: &[u8],
    split: Option<usize>,
) -> bool {
    !f.may_contain(bytes, key(local))
        && split.is_none_or(|p| !f.may_contain(bytes, key(local.get(..p).unwrap_or(local))))
}

/// The hit of a record of value `value` in domain `domain` of generation `generation`.
fn hit_of(value: u64, domain: u32, matched: Match, local_len: usize, generation: u64) -> Hit {
    Hit {
        kind: Kind::from_code(value),
        matched,
        local_len: local_len as u16,
        domain,
        attrs: (value >> Kind::BITS) as u32,
        generation,
    }
}

/// The slot of domain table `hot` that `named` accepts, for a name whose [`domain_hash`] is
/// `h`: one read, more only when slots from `h` on are taken by other names.
#[inline]
fn find_in(hot: &[DomainHot], h: u64, named: impl Fn(&DomainHot) -> bool) -> Option<&DomainHot> {
    let mask = hot.len().wrapping_sub(1);
    let mut at = h as usize & mask;
    for _ in 0..hot.len() {
        let d = hot.get(at)?;
        if d.name_len == 0 {
            return None;
        }
        if named(d) {
            return Some(d);
        }
        at = (at + 1) & mask;
    }
    None
}

/// What a set's lookup reads of a segment, kept by the set side by side with the other
/// segments' handles: the segment's one miss filter block (keyed by name) and the address
/// of its fingerprints, its domain table, its FST's bytes and node spans. A lookup goes from
/// the set's index to these without reading the segment's struct, its lists' allocations or
/// its backing's (10,000 segments' are not in cache).
pub(super) struct SegmentHandle {
    /// The filter block, when the segment has one block keyed by name (every build's
    /// segment); otherwise the lookup asks through `snap`.
    filter: Option<ShardFilter>,
    filter_mem: View,
    hot: Arc<[DomainHot]>,
    /// The FST's bytes, when the segment has one shard (every segment but a huge one).
    fst: Option<View>,
    spans: Arc<[u32]>,
    snap: Arc<Snapshot>,
}

impl SegmentHandle {
    /// The handle of segment `snap`.
    pub(super) fn new(snap: Arc<Snapshot>) -> SegmentHandle {
        let filter = match &snap.filters[..] {
            [Some(only)] if snap.keying == Keying::Name => Some(only.clone()),
            _ => None,
        };
        let fst = match snap.shards.as_slice() {
            [(_, fst)] => {
                let bytes = fst.as_inner();
                View::of_range(bytes.backing.clone(), bytes.range.clone())
            }
            _ => None,
        };
        SegmentHandle {
            filter,
            filter_mem: snap.filter_mem.clone(),
            hot: snap.hot.clone(),
            fst,
            spans: snap.spans.clone(),
            snap,
        }
    }

    /// The segment.
    #[inline]
    pub(super) fn snap(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// [`Snapshot::surely_absent`] for an address of a domain whose name hashes to `h`, asked
    /// before the domain's line is read; `None` when the segment's filters are keyed by
    /// index (the lookup asks them once it has the line).
    #[inline]
    fn surely_absent(&self, h: u64, local: &[u8], split: Option<usize>) -> Option<bool> {
        let Some(f) = &self.filter else {
            return (self.snap.keying == Keying::Name)
                .then(|| self.snap.surely_absent(FilterAt::Name(h), local, split));
        };
        let key = |l: &[u8]| filter::key_by_name(h, l);
        Some(absent_in(f, self.filter_mem.bytes(), key, local, split))
    }

    /// [`Snapshot::find_hot`] in the segment.
    #[inline]
    fn find_hot(&self, h: u64, name: &str) -> Option<&DomainHot> {
        find_in(&self.hot, h, |d| self.snap.is_named(d, name))
    }

    /// [`Snapshot::get`] in the segment, the FST read through the handle.
    #[inline]
    fn get(
        &self,
        dh: &DomainHot,
        local: &[u8],
        split: Option<usize>,
    ) -> (Option<u64>, Option<u64>) {
        match &self.fst {
            Some(fst) if dh.shard() == 0 => walk_domain(fst.bytes(), &self.spans, dh, local, split),
            _ => self.snap.get(dh, local, split),
        }
    }
}

/// Ask the CPU to bring `data[lo..=hi]` into its cache, from the top down (the order a walk
/// reads nodes in). A hint only: nothing is read or written.
#[inline]
fn prefetch(data: &[u8], lo: usize, hi: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let Some(range) = data.get(lo..=hi) else {
            return;
        };
        let base = range.as_ptr();
        let mut at = range.len() - 1;
        loop {
            // SAFETY: `_mm_prefetch` is a hint to the cache: it does not read the memory into
            // the program, cannot fault, and writes nothing; `base.wrapping_add(at)` stays
            // inside `range` (`at < range.len()`), so no pointer outside the slice is formed.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at).cast::<i8>());
            }
            if at < 64 {
                break;
            }
            at -= 64;
        }
        // SAFETY: as above; offset 0 is the first byte of `range`.
        #[allow(unsafe_code)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(base.cast::<i8>());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, lo, hi);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The domain table finds every domain, long names (compared through the string table)
    /// and names that share a slot alike, and nothing else: names one character off, a
    /// prefix, a suffix, or whose hash starts at a taken slot.
    #[test]
    fn the_domain_table_finds_each_domain_and_only_them() {
        let mut text = String::new();
        let mut names = Vec::new();
        for d in 0..700u32 {
            let domain = if d % 7 == 0 {
                format!("a-rather-long-subsidiary-name-{d:04}.onmicrosoft.example")
            } else {
                format!("t{d}.example")
            };
            text.push_str(&format!("1|{domain}\tDOMAIN:\t{domain}\n"));
            if d % 3 != 0 {
                text.push_str(&format!("1|{domain}\tDIR:\tuser@{domain}\n"));
            }
            names.push(domain);
        }
        text.push_str("++++\n");
        let name: Arc<str> = "t.map".into();
        let data = crate::sources::mapfile::parse(&name, &text).expect("parse");
        let (image, _) = crate::sync::merge(&[data], 3).build().expect("build");
        let snap = Snapshot::from_bytes(image).expect("open");
        assert!(snap.hot.len().is_power_of_two() && snap.hot.len() * 2 >= names.len() * 3);
        let mask = snap.hot.len() - 1;
        let mut displaced = 0;
        for domain in &names {
            let d = snap.find_domain(domain).expect(domain);
            let h = domain_hash(domain.as_bytes());
            assert!(
                snap.find_hot(h, domain).is_some_and(|x| std::ptr::eq(x, d)),
                "{domain}"
            );
            let home = h as usize & mask;
            let at = snap
                .hot
                .iter()
                .position(|x| std::ptr::eq(x, d))
                .expect("in table");
            displaced += usize::from(at != home);
            for other in [
                format!("x{domain}"),
                format!("{domain}x"),
                domain[1..].to_string(),
                domain[..domain.len() - 1].to_string(),
                domain.replace('e', "f"),
            ] {
                assert!(snap.find_domain(&other).is_none(), "{other}");
            }
        }
        // Some domains did not get their home slot: probing past taken slots was tested.
        assert!(displaced > 10, "{displaced} displaced");
        // Names whose home slot is taken by a domain, and names not ours at all.
        let strangers = (0..20_000).map(|i| format!("s{i}.example"));
        assert!(
            strangers
                .into_iter()
                .all(|n| snap.find_domain(&n).is_none())
        );
    }

    /// The node ranges a lookup prefetches hold what walks of the domain's own addresses
    /// read: fst writes a domain's nodes between the previous domains' start nodes and its
    /// own. A walk may leave the range for a suffix it shares with an earlier domain (fst
    /// writes a node once and points to it from later keys); it never comes back. If fst ever
    /// laid nodes out otherwise, the prefetch would be wasted work, and this says so.
    #[test]
    fn a_domains_walks_read_mostly_inside_its_node_range() {
        let mut text = String::new();
        let mut addresses: Vec<(String, Vec<String>)> = Vec::new();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for d in 0..60u32 {
            let domain = format!("tenant{d:03}.example");
            text.push_str(&format!("1|{domain}\tDOMAIN:\t{domain}\n"));
            let mut locals = Vec::new();
            // Mostly small domains; every tenth one too big to be asked for at once.
            let n = if d % 10 == 0 {
                3000
            } else {
                1 + (d * 37) % 250
            };
            for i in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let local = format!("user{:x}.{i}", x % 1_000_003);
                text.push_str(&format!("1|{domain}\tDIR:\t{local}@{domain}\n"));
                locals.push(local);
            }
            addresses.push((domain, locals));
        }
        text.push_str("++++\n");
        let name: Arc<str> = "t.map".into();
        let data = crate::sources::mapfile::parse(&name, &text).expect("parse");
        let (image, _) = crate::sync::merge(&[data], 3).build().expect("build");
        let snap = Snapshot::from_bytes(image).expect("open");
        let (mut inside, mut all, mut small) = (0usize, 0usize, 0usize);
        let (mut fetched_in, mut fetched_all, mut deeper) = (0usize, 0usize, 0usize);
        let mut floor = vec![0usize; snap.shards.len()];
        for (domain, locals) in &addresses {
            let d = snap
                .hot
                .iter()
                .find(|h| h.name.get(..h.name_len as usize) == Some(domain.as_bytes()))
                .expect("domain entry");
            let (start, _) = d.start().expect("domain has addresses");
            let span = snap.spans[d.index as usize] as usize;
            // Start nodes rise with the domain index in a shard; the span reaches down to
            // the highest earlier one.
            assert!(start > floor[d.shard()], "{domain}: start {start}");
            assert_eq!(span, start - floor[d.shard()], "{domain}");
            floor[d.shard()] = start;
            small += usize::from(span <= PREFETCH_MAX);
            let fst = snap.shard_of(d.shard()).expect("shard");
            let w = Walker::new(fst.as_bytes());
            for local in locals {
                let mut addr = start;
                let mut left = false;
                for &b in local.as_bytes() {
                    let here = addr + span >= start && addr <= start;
                    assert!(
                        !(left && here),
                        "{local}@{domain}: back inside after leaving"
                    );
                    left |= !here;
                    all += 1;
                    inside += usize::from(here);
                    addr = w
                        .step(addr, b)
                        .expect("a stored address walks to its end")
                        .0;
                }
                // What a lookup prefetches holds the rest of its walk the same way.
                let (mut addr, mut ahead) = (start, Ahead::new(start, span));
                let (mut range, mut left) = (None, false);
                for (step, &b) in local.as_bytes().iter().enumerate() {
                    if range.is_none() {
                        range = ahead.fits(addr);
                        deeper += usize::from(range.is_some() && step > 0);
                    }
                    if let Some((lo, hi)) = range {
                        let here = (lo..=hi).contains(&addr);
                        assert!(!(left && here), "{local}@{domain}: back in its prefetch");
                        left |= !here;
                        fetched_all += 1;
                        fetched_in += usize::from(here);
                    }
                    let (next, _, sibling) = w.step_and_sibling(addr, b).expect("walks");
                    ahead.stepped(next, sibling);
                    addr = next;
                }
            }
        }
        assert!(small > 30, "only {small} domains within PREFETCH_MAX");
        // In the big domains the walk finds a subtree that fits after a step or two.
        assert!(
            deeper > 10_000,
            "{deeper} walks prefetched below their domain's start"
        );
        // Here the local parts end in `.0`, `.1`, … in every domain, so their last nodes
        // are shared with the first domain that had them.
        assert!(
            inside * 3 >= all * 2,
            "{inside} of {all} nodes read inside their domain's range"
        );
        // (65 % here: after the first steps, the `.{i}` endings are most of what is left.)
        assert!(
            fetched_in * 2 >= fetched_all,
            "{fetched_in} of {fetched_all} nodes read after a prefetch were in it"
        );
    }
}
