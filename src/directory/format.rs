//! The snapshot file: a fixed header, then sections, each with its own CRC-32.
//!
//! ```text
//! header   magic "RCPTGATE", version, generation, created, counts, key width,
//!          SECTIONS x (offset u64, length u64, crc32 u32, reserved u32), header crc32
//! sections (see `Sec`); all integers little-endian, all tables fixed-width records
//! ```
//! Hot sections are checked when the file is opened; the cold (diagnostic) sections are
//! checked the first time they are read, so a start-up does not pay for them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"RCPTGATE";
/// 2: four kind bits in FST values (exceptions). 3: the `excluded` cold section.
pub const VERSION: u32 = 4;
pub const SECTIONS: usize = 13;
const SECTION_REF: usize = 24;
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 8 + 4 + 4 + SECTIONS * SECTION_REF + 4;

/// Section indices (the header's order of section references; a file may lay them out in
/// any order, see [`Sec::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sec {
    /// Concatenated FSTs, one per shard.
    Fst = 0,
    /// Shards: (first domain u32, fst offset u64, fst length u64), 20 bytes each.
    Shards,
    /// Hot string table index: (offset u32, length u32) into `StrBlob`.
    StrIndex,
    /// Interned strings (profiles, routes, names).
    StrBlob,
    /// Domain records, `DOMAIN_REC` bytes each, sorted by name.
    Domains,
    /// Open-addressing hash index of domains: u32 slots (domain index + 1, 0 = empty).
    DomainSlots,
    /// Attribute sets: (profile string u32, route string u32).
    AttrSets,
    /// Cold: 64-bit hash of every FST key, sorted; entry `i` describes `ColdRecords[i]`.
    ColdKeys,
    /// Source names (string ids), for origins.
    Sources,
    /// Cold: one `COLD_REC`-byte record per address, in `ColdKeys` order.
    ColdRecords,
    /// Cold: length-prefixed strings (owners, DNs, attributes).
    ColdBlob,
    /// Cold: what the build left out and why (`explain`): counts per reason, then a capped
    /// list of records sorted by address.
    Excluded,
    /// A membership filter per shard, checked before the FST walk (see `filter.rs`).
    Filter,
}

impl Sec {
    /// Every section, in the order a build lays them out: the hot ones first, so what a
    /// lookup reads is one run of pages at the start of the file and the cold sections,
    /// which are read from the file on first use, take no memory at all. (Files written
    /// before had `Sources` and `Filter` among the cold sections: still read, since every
    /// section is found by its offset.)
    pub const ALL: [Sec; SECTIONS] = [
        Sec::Fst,
        Sec::Shards,
        Sec::StrIndex,
        Sec::StrBlob,
        Sec::Domains,
        Sec::DomainSlots,
        Sec::AttrSets,
        Sec::Sources,
        Sec::Filter,
        Sec::ColdKeys,
        Sec::ColdRecords,
        Sec::ColdBlob,
        Sec::Excluded,
    ];

    /// The section's name in errors.
    pub fn name(self) -> &'static str {
        match self {
            Sec::Fst => "fst",
            Sec::Shards => "shards",
            Sec::StrIndex => "string index",
            Sec::StrBlob => "strings",
            Sec::Domains => "domains",
            Sec::DomainSlots => "domain index",
            Sec::AttrSets => "attribute sets",
            Sec::ColdKeys => "cold keys",
            Sec::Sources => "sources",
            Sec::ColdRecords => "cold records",
            Sec::ColdBlob => "cold strings",
            Sec::Excluded => "excluded",
            Sec::Filter => "filter",
        }
    }

    /// True for the sections only diagnostics read (checked on first use).
    pub fn is_cold(self) -> bool {
        matches!(
            self,
            Sec::ColdKeys | Sec::ColdRecords | Sec::ColdBlob | Sec::Excluded
        )
    }
}

pub const SHARD_REC: usize = 20;
pub const DOMAIN_REC: usize = 24;
pub const COLD_REC: usize = 20;
/// Set in a cold record's source field when another key has the same 64-bit hash: its
/// diagnostics are withheld rather than risk showing another address's.
pub const COLD_AMBIGUOUS: u32 = 1 << 31;

/// Why a snapshot file cannot be used. Every variant says what to do: rebuild it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot is {len} bytes, shorter than its {need}-byte header: truncated; rebuild it")]
    TooShort { len: usize, need: usize },
    #[error("not an rcptgate snapshot (bad magic bytes)")]
    BadMagic,
    #[error(
        "snapshot format version {found} is not supported (this build reads {supported}); rebuild it"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error(
        "snapshot header checksum mismatch (expected {expected:#010x}, got {got:#010x}): corrupt; rebuild it"
    )]
    HeaderChecksum { expected: u32, got: u32 },
    #[error(
        "snapshot section '{section}' ({off}+{len}) lies outside the {file_len}-byte file: truncated; rebuild it"
    )]
    SectionOutOfBounds {
        section: &'static str,
        off: u64,
        len: u64,
        file_len: usize,
    },
    #[error(
        "snapshot section '{section}' checksum mismatch (expected {expected:#010x}, got {got:#010x}): corrupt; rebuild it"
    )]
    SectionChecksum {
        section: &'static str,
        expected: u32,
        got: u32,
    },
    #[error("snapshot section '{section}' is malformed: {what}; rebuild it")]
    Malformed {
        section: &'static str,
        what: &'static str,
    },
    #[error("snapshot FST is malformed: {0}; rebuild it")]
    Fst(String),
    #[error("snapshot cold sections (diagnostics) unusable: {0}")]
    Cold(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SectionRef {
    pub off: u64,
    pub len: u64,
    pub crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub created_unix: u64,
    pub records: u64,
    pub domains: u32,
    pub key_width: u32,
    pub sections: [SectionRef; SECTIONS],
}

/// A bounds-checked little-endian reader (the codec never indexes past its input).
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
}

/// Read the `i`-th little-endian u32 of a table of `width`-byte records at field `field`.
pub fn u32_at(table: &[u8], width: usize, i: usize, field: usize) -> Option<u32> {
    let at = i.checked_mul(width)?.checked_add(field * 4)?;
    table
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(SECTIONS as u32).to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.created_unix.to_le_bytes());
        out.extend_from_slice(&self.records.to_le_bytes());
        out.extend_from_slice(&self.domains.to_le_bytes());
        out.extend_from_slice(&self.key_width.to_le_bytes());
        for s in &self.sections {
            out.extend_from_slice(&s.off.to_le_bytes());
            out.extend_from_slice(&s.len.to_le_bytes());
            out.extend_from_slice(&s.crc.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Header, SnapshotError> {
        if bytes.len() < 12 {
            return Err(SnapshotError::TooShort {
                len: bytes.len(),
                need: HEADER_LEN,
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let mut r = Reader::new(&bytes[8..]);
        let version = r.u32().unwrap_or(0);
        if version != VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(SnapshotError::TooShort {
                len: bytes.len(),
                need: HEADER_LEN,
            });
        }
        let body = &bytes[..HEADER_LEN - 4];
        let mut r = Reader::new(&bytes[HEADER_LEN - 4..HEADER_LEN]);
        let expected = r.u32().unwrap_or(0);
        let got = crc32fast::hash(body);
        if expected != got {
            return Err(SnapshotError::HeaderChecksum { expected, got });
        }
        let malformed = SnapshotError::Malformed {
            section: "header",
            what: "field out of range",
        };
        let mut r = Reader::new(&body[12..]);
        let count = r.u32().ok_or(SnapshotError::BadMagic)?;
        if count as usize != SECTIONS {
            return Err(malformed);
        }
        let mut h = Header {
            generation: r.u64().unwrap_or(0),
            created_unix: r.u64().unwrap_or(0),
            records: r.u64().unwrap_or(0),
            domains: r.u32().unwrap_or(0),
            key_width: r.u32().unwrap_or(0),
            sections: [SectionRef::default(); SECTIONS],
        };
        for s in h.sections.iter_mut() {
            s.off = r.u64().unwrap_or(0);
            s.len = r.u64().unwrap_or(0);
            s.crc = r.u32().unwrap_or(0);
            let _reserved = r.u32();
        }
        if !(1..=4).contains(&h.key_width) {
            return Err(malformed);
        }
        Ok(h)
    }

    /// The bytes of one section, bounds-checked against the file.
    pub fn section<'a>(&self, file: &'a [u8], sec: Sec) -> Result<&'a [u8], SnapshotError> {
        let r = self.sections[sec as usize];
        let out_of_bounds = || SnapshotError::SectionOutOfBounds {
            section: sec.name(),
            off: r.off,
            len: r.len,
            file_len: file.len(),
        };
        let start = usize::try_from(r.off).map_err(|_| out_of_bounds())?;
        let len = usize::try_from(r.len).map_err(|_| out_of_bounds())?;
        let end = start.checked_add(len).ok_or_else(out_of_bounds)?;
        if start < HEADER_LEN {
            return Err(out_of_bounds());
        }
        file.get(start..end).ok_or_else(out_of_bounds)
    }

    /// Check that a section lies within a file of `file_len` bytes (one not in memory).
    pub fn section_within(&self, file_len: usize, sec: Sec) -> Result<(), SnapshotError> {
        let r = self.sections[sec as usize];
        let out_of_bounds = SnapshotError::SectionOutOfBounds {
            section: sec.name(),
            off: r.off,
            len: r.len,
            file_len,
        };
        match r.off.checked_add(r.len) {
            Some(end) if r.off >= HEADER_LEN as u64 && end <= file_len as u64 => Ok(()),
            _ => Err(out_of_bounds),
        }
    }

    pub fn check(&self, file: &[u8], sec: Sec) -> Result<(), SnapshotError> {
        let bytes = self.section(file, sec)?;
        let expected = self.sections[sec as usize].crc;
        let got = crc32fast::hash(bytes);
        if expected != got {
            return Err(SnapshotError::SectionChecksum {
                section: sec.name(),
                expected,
                got,
            });
        }
        Ok(())
    }
}

/// Append a length-prefixed string (LEB128 length) to a blob; returns its offset.
pub fn put_str(blob: &mut Vec<u8>, s: &str) -> u32 {
    let off = blob.len() as u32;
    let mut n = s.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            blob.push(b);
            break;
        }
        blob.push(b | 0x80);
    }
    blob.extend_from_slice(s.as_bytes());
    off
}

/// Read a string written by [`put_str`]; `None` if the offset or length is out of range.
pub fn get_str(blob: &[u8], off: u32) -> Option<&str> {
    let mut at = off as usize;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = *blob.get(at)?;
        at += 1;
        len |= usize::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
    let bytes = blob.get(at..at.checked_add(len)?)?;
    std::str::from_utf8(bytes).ok()
}

/// Write `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync the
/// directory. Readers see the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.as_deref().unwrap_or("snapshot"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            d.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// `image` with section number `index` (modulo [`SECTIONS`]) replaced by `content`, the
/// sections laid out again one after the other in the header's order (the layout of files
/// written before [`Sec::ALL`] put the hot sections first) and every checksum recomputed: a
/// snapshot whose checksums all pass around hostile content (the structure-aware fuzz
/// target).
pub(crate) fn with_section(image: &[u8], index: usize, content: &[u8]) -> Option<Vec<u8>> {
    let header = Header::decode(image).ok()?;
    let index = index % SECTIONS;
    let mut out = vec![0u8; HEADER_LEN];
    let mut sections = header.sections;
    let mut in_header_order = Sec::ALL;
    in_header_order.sort_by_key(|&s| s as usize);
    for (i, sec) in in_header_order.into_iter().enumerate() {
        let bytes = if i == index {
            content
        } else {
            header.section(image, sec).ok()?
        };
        sections[i] = SectionRef {
            off: out.len() as u64,
            len: bytes.len() as u64,
            crc: crc32fast::hash(bytes),
        };
        out.extend_from_slice(bytes);
    }
    let head = Header { sections, ..header }.encode();
    out.get_mut(..HEADER_LEN)?
        .copy_from_slice(head.get(..HEADER_LEN)?);
    Some(out)
}

/// Remove what [`write_atomic`] of `path` left behind when a process died mid-write
/// (`.NAME.tmp.PID` beside it, from any process but this one); how many were removed.
pub fn clean_temporaries(path: &Path) -> usize {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    let prefix = format!(".{name}.tmp.");
    let mine = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.strip_prefix(&prefix)
                .is_some_and(|pid| pid != mine && pid.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Stable 64-bit hash for the persisted domain index (must never change within a version).
pub fn domain_hash(s: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0x243F_6A88_85A3_08D3 ^ (s.len() as u64).wrapping_mul(K);
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // The tail as a little-endian word padded with zeros, gathered byte by byte: a copy
        // of a variable length would be a call to `memcpy` on every lookup.
        let w = rest
            .iter()
            .rev()
            .fold(0u64, |w, &b| (w << 8) | u64::from(b));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    h ^= h >> 32;
    h = h.wrapping_mul(K);
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash is persisted (domain index, miss filter keys): it must not change. Values
    /// of the first definition, whose tail was copied into a zeroed word.
    #[test]
    fn domain_hash_is_stable() {
        fn reference(s: &[u8]) -> u64 {
            const K: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut h: u64 = 0x243F_6A88_85A3_08D3 ^ (s.len() as u64).wrapping_mul(K);
            let mut chunks = s.chunks_exact(8);
            for c in &mut chunks {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let mut w = [0u8; 8];
                w[..rest.len()].copy_from_slice(rest);
                h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
            }
            h ^= h >> 32;
            h = h.wrapping_mul(K);
            h ^ (h >> 29)
        }
        let bytes: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8 | 0x80).collect();
        for len in 0..=bytes.len() {
            assert_eq!(
                domain_hash(&bytes[..len]),
                reference(&bytes[..len]),
                "{len}"
            );
        }
        // Pinned values (computed independently of this code).
        assert_eq!(domain_hash(b"contoso.com"), 0x846a_9473_c4c2_a879);
        assert_eq!(domain_hash(b""), 0x4486_4e3d_b0f4_548b);
        assert_eq!(domain_hash(b"a"), 0x6989_9dcc_b45d_f1a0);
    }

    #[test]
    fn strings_round_trip_and_reject_out_of_range() {
        let mut blob = Vec::new();
        let a = put_str(&mut blob, "alice@contoso.com");
        let long = "x".repeat(300);
        let b = put_str(&mut blob, &long);
        assert_eq!(get_str(&blob, a), Some("alice@contoso.com"));
        assert_eq!(get_str(&blob, b), Some(long.as_str()));
        assert_eq!(get_str(&blob, blob.len() as u32), None);
        assert_eq!(get_str(&blob[..blob.len() - 1], b), None);
        assert_eq!(get_str(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01], 0), None);
    }

    #[test]
    fn hot_sections_come_first_and_the_earlier_layout_still_opens() {
        use crate::address::AddrBuf;
        use crate::directory::{LookupOptions, Snapshot, Verdict};
        let text = "\
1|contoso.com\tDOMAIN:\tcontoso.com\troute=smtp:[mx.contoso.com]:25
1|contoso.com\tDIR:\talice@contoso.com
1|contoso.com\tDIR:\tal@contoso.com
1|contoso.com\tMAP:\tal@contoso.com\talice@contoso.com
1|contoso.com\tPROFILE:\talice@contoso.com\texecutives
++++
";
        let name: std::sync::Arc<str> = "t.map".into();
        let data = crate::sources::mapfile::parse(&name, text).expect("parse");
        let (image, _) = crate::sync::merge(&[data], 3).build().expect("build");
        let header = Header::decode(&image).expect("header");
        let end = |s: Sec| header.sections[s as usize].off + header.sections[s as usize].len;
        let hot_end = Sec::ALL.into_iter().filter(|s| !s.is_cold()).map(end).max();
        let cold_start = Sec::ALL
            .into_iter()
            .filter(|s| s.is_cold())
            .map(|s| header.sections[s as usize].off)
            .min();
        assert!(hot_end <= cold_start, "{hot_end:?} > {cold_start:?}");
        // The layout of files written before: every section in the header's order.
        let fst = header.section(&image, Sec::Fst).expect("fst").to_vec();
        let earlier = with_section(&image, Sec::Fst as usize, &fst).expect("relaid");
        let old = Header::decode(&earlier).expect("header");
        assert!(old.sections[Sec::Filter as usize].off > old.sections[Sec::Excluded as usize].off);
        let dir = tempfile::tempdir().expect("tempdir");
        let answers = |bytes: &[u8], file: &str| {
            let path = dir.path().join(file);
            std::fs::write(&path, bytes).expect("write");
            let snap = Snapshot::open(&path).expect("open");
            // Only the hot sections are held when they come first; else the file's length.
            let held = if file == "new.snap" {
                hot_end.map_or(0, |e| e as usize)
            } else {
                bytes.len()
            };
            assert_eq!(snap.image_len(), held, "{file}");
            assert_eq!(snap.file_bytes(), bytes.len(), "{file}");
            let mut buf = AddrBuf::default();
            ["alice@contoso.com", "al@contoso.com", "bob@contoso.com"]
                .iter()
                .map(|a| {
                    let v = snap.lookup(a, &LookupOptions::default(), &mut buf);
                    let detail = match &v {
                        Verdict::Accept(hit) => format!(
                            "{:?} {:?} {:?}",
                            snap.profile(hit),
                            snap.route(hit),
                            snap.record_info(a, hit)
                                .expect("cold")
                                .map(|r| (r.owner, r.origin))
                        ),
                        _ => String::new(),
                    };
                    format!("{a}: {} {detail}", v.name())
                })
                .collect::<Vec<_>>()
        };
        let now = answers(&image, "new.snap");
        assert_eq!(now, answers(&earlier, "old.snap"));
        assert_eq!(
            now,
            [
                "alice@contoso.com: accept Some(\"executives\") Some(\"smtp:[mx.contoso.com]:25\") Some((None, \"t.map:2\"))",
                "al@contoso.com: accept Some(\"executives\") Some(\"smtp:[mx.contoso.com]:25\") Some((Some(\"alice@contoso.com\"), \"t.map:3\"))",
                "bob@contoso.com: reject ",
            ]
        );
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let mut h = Header {
            generation: 7,
            created_unix: 1,
            records: 3,
            domains: 2,
            key_width: 1,
            sections: [SectionRef::default(); SECTIONS],
        };
        h.sections[0] = SectionRef {
            off: HEADER_LEN as u64,
            len: 5,
            crc: 9,
        };
        let bytes = h.encode();
        assert_eq!(bytes.len(), HEADER_LEN);
        assert_eq!(Header::decode(&bytes).expect("round trip"), h);
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(matches!(
            Header::decode(&bad),
            Err(SnapshotError::HeaderChecksum { .. })
        ));
        assert!(matches!(
            Header::decode(&bytes[..40]),
            Err(SnapshotError::TooShort { .. })
        ));
        assert!(matches!(
            Header::decode(b"NOTASNAPSHOT"),
            Err(SnapshotError::BadMagic)
        ));
    }
}
