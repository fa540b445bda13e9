//! Membership filters checked before the FST walk: a miss in a domain we own (dictionary
//! attacks, invented local parts: most lookups at a provider's MX) usually ends after three
//! byte reads instead of a walk of several FST nodes.
//!
//! Binary fuse filters (`xorf::BinaryFuse8`, ~9 bits per key, false positives ~1/256) over a
//! 64-bit key per address. They can only say "surely absent"; "maybe present" falls through
//! to the FST, so an answer never depends on them. Every key is in its block's filter
//! (checked at build time for every key, and on a sample of the FST's keys when a snapshot
//! is opened: a filter that fails the sample, e.g. written by a build whose hashing differs,
//! is not used, and lookups stay exact).
//!
//! Builds write blocks keyed by name ([`KIND_BY_NAME`]): the key of an address is
//! [`key_by_name`] of (its domain name's hash, folded local part), and its block is
//! [`block_of`] that hash, so a lookup can ask the filter as soon as it has parsed the
//! address, while the domain index is still being read. Snapshots of earlier builds have
//! blocks keyed by index ([`KIND_BY_INDEX`]): one per FST shard, [`key`] of (domain index,
//! folded local part); they are still read.
//!
//! Section layout, one block per FST shard (as many blocks as shards): `kind u32` (0 = no
//! filter, 1 = binary fuse 8 keyed by index, 2 = keyed by name), `length u64` of the
//! fingerprints, the 20-byte descriptor (seed u64, segment length u32, segment length mask
//! u32, segment count length u32), then the fingerprints.

use std::ops::Range;

use xorf::{BinaryFuse8, DmaSerializable, Filter};

use super::format::domain_hash;

/// Bytes of a block's fixed part.
pub const BLOCK_HEAD: usize = 4 + 8 + DESCRIPTOR;
/// Bytes of a serialized binary fuse descriptor.
const DESCRIPTOR: usize = 20;
const KIND_NONE: u32 = 0;
/// A binary fuse filter of one FST shard's addresses, keyed by [`key`] (earlier builds).
pub const KIND_BY_INDEX: u32 = 1;
/// A binary fuse filter of the addresses whose domain names hash to the block
/// ([`block_of`]), keyed by [`key_by_name`].
pub const KIND_BY_NAME: u32 = 2;

/// How a block's keys are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keying {
    /// Keys of the domain's index; a domain's block is its FST shard (earlier builds).
    Index,
    /// Keys of the domain name's hash; a domain's block is chosen by that hash.
    #[default]
    Name,
}

/// The filter key of an address in a block keyed by index: its folded local part's stable
/// hash mixed with its domain's index (the filter hashes it again with its own seed).
#[inline]
pub fn key(domain: u32, local: &[u8]) -> u64 {
    domain_hash(local)
        ^ u64::from(domain)
            .wrapping_add(1)
            .wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// The filter key of an address in a block keyed by name: its folded local part's stable
/// hash mixed with its domain name's [`domain_hash`].
#[inline]
pub fn key_by_name(name_hash: u64, local: &[u8]) -> u64 {
    domain_hash(local)
        ^ name_hash
            .rotate_left(23)
            .wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// The block (of `blocks`, at least one) holding the addresses of a domain whose name hashes
/// to `name_hash`, in blocks keyed by name. Uses other bits of the hash than the domain
/// index's slot does.
#[inline]
pub fn block_of(name_hash: u64, blocks: usize) -> usize {
    ((name_hash >> 40) as usize) % blocks.max(1)
}

/// [`block_of`] for a fixed number of blocks, without a division: Lemire's exact remainder
/// by multiplication (the dividend, 24 bits of the hash, and the divisor fit 32 bits).
#[derive(Debug, Clone, Copy)]
pub struct BlockOf {
    blocks: u64,
    /// `u64::MAX / blocks + 1`, wrapping (0 for one block, whose remainder is always 0).
    inverse: u64,
}

impl BlockOf {
    /// For `blocks` blocks (at least one is assumed; none answers 0, as `block_of` does).
    pub fn new(blocks: usize) -> BlockOf {
        let blocks = u32::try_from(blocks.max(1)).unwrap_or(u32::MAX);
        BlockOf {
            blocks: u64::from(blocks),
            inverse: (u64::MAX / u64::from(blocks)).wrapping_add(1),
        }
    }

    /// The block of a domain whose name hashes to `name_hash`: `block_of(name_hash, blocks)`.
    #[inline]
    pub fn of(&self, name_hash: u64) -> usize {
        let low = self.inverse.wrapping_mul(name_hash >> 40);
        ((u128::from(low) * u128::from(self.blocks)) >> 64) as usize
    }
}

/// A block keyed by name for `keys` (any order, duplicates allowed).
#[cfg(test)]
fn block(keys: Vec<u64>) -> Vec<u8> {
    block_of_kind(keys, KIND_BY_NAME)
}

/// A block of `kind` ([`KIND_BY_NAME`], or [`KIND_BY_INDEX`] for earlier builds' format) for
/// `keys` (any order, duplicates allowed). A block without keys, or one whose filter cannot
/// be built (the construction failing is rare and only costs speed), is empty: every lookup
/// of its domains walks the FST.
pub fn block_of_kind(mut keys: Vec<u64>, kind: u32) -> Vec<u8> {
    let mut out = Vec::new();
    keys.sort_unstable();
    keys.dedup();
    let filter = if keys.is_empty() {
        None
    } else {
        BinaryFuse8::try_from(&keys[..]).ok()
    };
    // Every key must answer "maybe": the one property lookups rely on.
    let filter = filter.filter(|f| keys.iter().all(|k| f.contains(k)));
    match filter {
        Some(f) => {
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&(f.fingerprints.len() as u64).to_le_bytes());
            let mut desc = [0u8; DESCRIPTOR];
            f.dma_copy_descriptor_to(&mut desc);
            out.extend_from_slice(&desc);
            out.extend_from_slice(&f.fingerprints);
        }
        None => {
            out.extend_from_slice(&KIND_NONE.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
            out.extend_from_slice(&[0u8; DESCRIPTOR]);
        }
    }
    out
}

/// One block's filter inside a snapshot: where its fingerprints are in the snapshot's bytes.
#[derive(Debug, Clone)]
pub struct ShardFilter {
    /// The binary fuse descriptor, read once (xorf's layout: seed, segment length, its
    /// mask, segment count length).
    seed: u64,
    segment_length: u32,
    segment_length_mask: u32,
    segment_count_length: u32,
    fingerprints: Range<usize>,
    keying: Keying,
}

impl ShardFilter {
    /// How the block's keys are made.
    pub fn keying(&self) -> Keying {
        self.keying
    }

    /// False when `key` is surely not in the shard. `bytes` are the snapshot's bytes the
    /// ranges were parsed from (checked then, so the reads stay in bounds).
    ///
    /// `BinaryFuse8::contains` of xorf 0.13 (its hash, fingerprint and three positions),
    /// with the descriptor read once instead of at every call; a test holds the two equal.
    #[inline]
    pub fn may_contain(&self, bytes: &[u8], key: u64) -> bool {
        let Some(fingerprints) = bytes.get(self.fingerprints.clone()) else {
            return true;
        };
        let hash = mix64(key.wrapping_add(self.seed));
        let f = (hash ^ (hash >> 32)) as u8;
        let h0 = ((u128::from(hash) * u128::from(self.segment_count_length)) >> 64) as u32;
        let h1 = (h0.wrapping_add(self.segment_length))
            ^ ((hash >> 18) as u32 & self.segment_length_mask);
        let h2 = (h0.wrapping_add(self.segment_length.wrapping_mul(2)))
            ^ (hash as u32 & self.segment_length_mask);
        let at = |h: u32| fingerprints.get(h as usize).copied();
        match (at(h0), at(h1), at(h2)) {
            (Some(a), Some(b), Some(c)) => f ^ a ^ b ^ c == 0,
            // Out of the fingerprints (a descriptor `parse` let through by mistake): unsure.
            _ => true,
        }
    }
}

/// MurmurHash3's 64-bit finalizer, as xorf mixes a key with the filter's seed.
#[inline]
fn mix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The blocks of a filter section at `base` in the snapshot's bytes, one per shard (`None`
/// for a shard without a filter). Errors say what is malformed: a descriptor whose indexes
/// could leave the fingerprints is never used.
pub fn parse(
    section: &[u8],
    base: usize,
    shards: usize,
) -> Result<Vec<Option<ShardFilter>>, &'static str> {
    let mut out = Vec::with_capacity(shards);
    let mut at = 0usize;
    for _ in 0..shards {
        let head = section
            .get(at..at + BLOCK_HEAD)
            .ok_or("block shorter than its header")?;
        let u32_at = |o: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&head[o..o + 4]);
            u32::from_le_bytes(w)
        };
        let kind = u32_at(0);
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[4..12]);
        let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| "length too large")?;
        let mut descriptor = [0u8; DESCRIPTOR];
        descriptor.copy_from_slice(&head[12..BLOCK_HEAD]);
        let start = at + BLOCK_HEAD;
        let end = start.checked_add(len).ok_or("length too large")?;
        if end > section.len() {
            return Err("fingerprints run past the section");
        }
        match kind {
            KIND_NONE if len == 0 => out.push(None),
            KIND_BY_INDEX | KIND_BY_NAME => {
                let (seg_len, mask, count_len) = (u32_at(20), u32_at(24), u32_at(28));
                // Lookups index fingerprints below count_len + 2 * seg_len (the fuse
                // graph's three segments from a start below count_len, a whole number of
                // segments): anything else could index out of bounds.
                let consistent = seg_len.is_power_of_two()
                    && mask == seg_len - 1
                    && count_len.is_multiple_of(seg_len)
                    && u64::from(count_len) + 2 * u64::from(seg_len) == len as u64
                    && len <= u32::MAX as usize;
                if !consistent {
                    return Err("descriptor does not match the fingerprints");
                }
                let seed = u64::from_le_bytes(
                    descriptor
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or_default(),
                );
                out.push(Some(ShardFilter {
                    seed,
                    segment_length: seg_len,
                    segment_length_mask: mask,
                    segment_count_length: count_len,
                    fingerprints: base + start..base + end,
                    keying: if kind == KIND_BY_INDEX {
                        Keying::Index
                    } else {
                        Keying::Name
                    },
                }));
            }
            _ => return Err("unknown filter kind"),
        }
        at = end;
    }
    if at != section.len() {
        return Err("bytes after the last shard's block");
    }
    let keyed = |k: Keying| out.iter().flatten().any(|f| f.keying == k);
    if keyed(Keying::Index) && keyed(Keying::Name) {
        return Err("blocks keyed by index and by name");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u32) -> Vec<u64> {
        (0..n)
            .map(|i| key(i % 7, format!("user{i}").as_bytes()))
            .collect()
    }

    #[test]
    fn every_key_is_contained_and_strangers_mostly_are_not() {
        let ks = keys(50_000);
        let b = block(ks.clone());
        let f = parse(&b, 0, 1).expect("parse")[0]
            .clone()
            .expect("a filter");
        assert!(ks.iter().all(|&k| f.may_contain(&b, k)));
        let strangers = (0..50_000u32)
            .filter(|i| f.may_contain(&b, key(i % 7, format!("nobody{i}").as_bytes())))
            .count();
        // ~1/256 expected; far fewer than 1 % says the filter filters.
        assert!(strangers < 500, "{strangers} false positives in 50000");
    }

    /// Our reading of a block answers exactly as xorf's own `BinaryFuse8Ref` over the same
    /// bytes, for members and strangers, in blocks of many sizes.
    #[test]
    fn may_contain_is_xorf_contains() {
        use xorf::{BinaryFuse8Ref, FilterRef};
        for n in [1u32, 2, 3, 10, 100, 1000, 30_000] {
            let b = block(keys(n));
            let Some(f) = parse(&b, 0, 1).expect("parse")[0].clone() else {
                continue;
            };
            let x = BinaryFuse8Ref::from_dma(&b[12..BLOCK_HEAD], &b[BLOCK_HEAD..]);
            let probes = keys(n).into_iter().chain((0..20_000u64).map(|i| {
                key(
                    (i % 11) as u32,
                    format!("stranger{i}.{}", i * 7919).as_bytes(),
                )
            }));
            for k in probes {
                assert_eq!(f.may_contain(&b, k), x.contains(&k), "{n} keys, key {k:#x}");
            }
        }
    }

    #[test]
    fn block_of_without_division() {
        let hashes = (0..200_000u64)
            .map(|i| domain_hash(format!("d{i}.example").as_bytes()))
            .chain([0, u64::MAX, 1 << 40, (1 << 40) - 1, u64::MAX << 40]);
        let hashes: Vec<u64> = hashes.collect();
        for blocks in [
            1usize,
            2,
            3,
            7,
            16,
            255,
            1000,
            65_537,
            1 << 24,
            (1 << 24) + 3,
        ] {
            let fast = BlockOf::new(blocks);
            for &h in &hashes {
                assert_eq!(fast.of(h), block_of(h, blocks), "{blocks} blocks, {h:#x}");
            }
        }
        assert_eq!(BlockOf::new(0).of(12345 << 40), 0);
    }

    #[test]
    fn empty_and_tiny_shards() {
        let b = block(Vec::new());
        assert_eq!(b.len(), BLOCK_HEAD);
        assert!(parse(&b, 0, 1).expect("parse")[0].is_none());
        for n in 1..40 {
            let ks = keys(n);
            let b = block(ks.clone());
            if let Some(f) = parse(&b, 0, 1).expect("parse")[0].clone() {
                assert!(ks.iter().all(|&k| f.may_contain(&b, k)), "{n} keys");
            }
        }
    }

    #[test]
    fn duplicates_are_fine() {
        let mut ks = keys(1000);
        ks.extend(keys(1000));
        let b = block(ks.clone());
        let f = parse(&b, 0, 1).expect("parse")[0]
            .clone()
            .expect("a filter");
        assert!(ks.iter().all(|&k| f.may_contain(&b, k)));
    }

    #[test]
    fn two_blocks_at_an_offset() {
        let (a, b) = (keys(300), keys(3000));
        let mut sec = block(a.clone());
        sec.extend(block(b.clone()));
        let mut file = vec![0xAAu8; 100];
        file.extend_from_slice(&sec);
        let fs = parse(&sec, 100, 2).expect("parse");
        let (fa, fb) = (fs[0].clone().expect("a"), fs[1].clone().expect("b"));
        assert!(a.iter().all(|&k| fa.may_contain(&file, k)));
        assert!(b.iter().all(|&k| fb.may_contain(&file, k)));
    }

    #[test]
    fn hostile_blocks_are_refused() {
        let good = block(keys(1000));
        assert!(parse(&good, 0, 2).is_err(), "a missing block");
        assert!(parse(&good[..good.len() - 1], 0, 1).is_err(), "truncated");
        let mut extra = good.clone();
        extra.push(0);
        assert!(parse(&extra, 0, 1).is_err(), "trailing bytes");
        // Each descriptor field changed: a segment length that is not a power of two, a
        // mask that does not match, a count length that would index past the end.
        for (at, v) in [(20usize, 3u32), (24, 0xffff_ffff), (28, 0xffff_fff0)] {
            let mut bad = good.clone();
            bad[at..at + 4].copy_from_slice(&v.to_le_bytes());
            assert!(parse(&bad, 0, 1).is_err(), "field at {at}");
        }
        let mut kind = good.clone();
        kind[0] = 9;
        assert!(parse(&kind, 0, 1).is_err(), "unknown kind");
    }

    #[test]
    fn blocks_say_how_they_are_keyed_and_one_section_keys_one_way() {
        let by_name = block(keys(300));
        let by_index = block_of_kind(keys(300), KIND_BY_INDEX);
        let name = parse(&by_name, 0, 1).expect("parse")[0].clone().expect("a");
        let index = parse(&by_index, 0, 1).expect("parse")[0]
            .clone()
            .expect("a");
        assert_eq!(
            (name.keying(), index.keying()),
            (Keying::Name, Keying::Index)
        );
        let mut mixed = by_name.clone();
        mixed.extend_from_slice(&by_index);
        assert!(parse(&mixed, 0, 2).is_err(), "blocks keyed two ways");
        // An empty block goes with either.
        let mut with_empty = by_index.clone();
        with_empty.extend_from_slice(&block(Vec::new()));
        assert!(parse(&with_empty, 0, 2).is_ok());
    }

    #[test]
    fn blocks_by_name_spread_domains_and_keys_separate_them() {
        assert_eq!(block_of(12345, 0), 0);
        assert_eq!(block_of(u64::MAX, 1), 0);
        let mut per_block = [0usize; 3];
        for i in 0..3000u32 {
            let h = domain_hash(format!("d{i}.example").as_bytes());
            per_block[block_of(h, 3)] += 1;
        }
        assert!(per_block.iter().all(|&n| n > 800), "{per_block:?}");
        let (a, b) = (domain_hash(b"a.example"), domain_hash(b"b.example"));
        assert_ne!(key_by_name(a, b"alice"), key_by_name(b, b"alice"));
        assert_ne!(key_by_name(a, b"alice"), key_by_name(a, b"alicf"));
    }

    #[test]
    fn the_key_separates_domains() {
        assert_ne!(key(0, b"alice"), key(1, b"alice"));
        assert_ne!(key(0, b"alice"), key(0, b"alicf"));
    }
}
