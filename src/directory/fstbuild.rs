//! An FST builder that writes the `fst` crate's format (version 3) byte for byte as
//! `fst::MapBuilder` does for the same keys and values, without its per-node allocations.
//!
//! A build compiles about ten nodes per address (the suffix of each key not shared with the
//! next). `fst`'s builder gives every node a vector of its own, allocated when the node gets
//! its first transition and freed after it is written, and writes each node through
//! `io::Write` a few bytes at a time, updating a CRC at each write, and allocates and frees
//! a registry of 20,000 cells per build: in a profile of the daemon's full build of many
//! segments, a third of its CPU. Here the unfinished nodes are levels kept from key to key
//! (their vectors reused), nodes are written straight into the output, the checksum is
//! computed once at the end, and the registry is kept per thread from build to build. The algorithm is otherwise `fst`'s (Daciuk et al.'s
//! incremental construction of a minimal acyclic transducer from sorted keys): the same
//! output sharing, the same registry of compiled nodes (10,000 rows of two, least recently
//! used replaced, the same FNV hash), the same node encodings, so the bytes are the same
//! and every reader of the format (`fst::Map`, `walk`) reads them. Tested byte for byte
//! against `fst::MapBuilder`.

/// Format version written (what `fst` 0.4 writes and reads).
const VERSION: u64 = 3;
/// Address of the final node without transitions or output (never written).
const EMPTY: usize = 0;
/// "No address": an empty registry cell, or no node compiled yet.
const NONE: usize = 1;
/// Transitions above which a node carries a 256-byte input index.
const INDEX_THRESHOLD: usize = 32;
/// The registry: rows, each of two cells (most recently used first).
const REGISTRY_ROWS: usize = 10_000;

/// `fst`'s common inputs by frequency (its `COMMON_INPUTS_INV`, the first 63 entries): a
/// one-transition node whose input is one of these stores index + 1 in its state byte.
const COMMON: &[u8; 63] = b"te/oasripcnw.hlm-du012g=:bf3y5&_4v9678k%?xCDASFIBEjPTzRNM+LOqHG";

/// For each byte, its index + 1 in [`COMMON`], or 0.
const COMMON_IDX: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < COMMON.len() {
        t[COMMON[i] as usize] = i as u8 + 1;
        i += 1;
    }
    t
};

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FstBuildError {
    /// The key was inserted before.
    Duplicate(Vec<u8>),
    /// The key sorts before the one inserted last.
    OutOfOrder(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Trans {
    inp: u8,
    out: u64,
    addr: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Node {
    is_final: bool,
    final_output: u64,
    trans: Vec<Trans>,
}

/// One unfinished node on the path of the last key, with its last transition (input and
/// output) whose target is not compiled yet.
#[derive(Debug, Default)]
struct Level {
    node: Node,
    last: Option<(u8, u64)>,
}

impl Level {
    /// The last transition now points at `addr`.
    fn freeze_last(&mut self, addr: usize) {
        if let Some((inp, out)) = self.last.take() {
            self.node.trans.push(Trans { inp, out, addr });
        }
    }

    fn add_output_prefix(&mut self, prefix: u64) {
        if self.node.is_final {
            self.node.final_output += prefix;
        }
        for t in &mut self.node.trans {
            t.out += prefix;
        }
        if let Some((_, out)) = &mut self.last {
            *out += prefix;
        }
    }
}

/// One row of the registry: two cells, the most recently used one first in `fst`'s order.
/// `fst` keeps the cells in that order, each with a copy of its node, and swaps them on use;
/// a row here notes which of its two cells is the most recent instead, and keeps no copy
/// of the nodes: a cell is where its node's bytes are in the output, and a node is told
/// equal to it by being encoded there again (see [`Writer::holds`]). One cache line.
#[derive(Debug, Clone, Copy)]
#[repr(align(64))]
struct Row {
    /// Each cell's node's full hash: most lookups miss, and a miss is told from this,
    /// without reading the output.
    hash: [u64; 2],
    /// Where each cell's node starts in the output.
    start: [usize; 2],
    /// The build each cell was filled in (an older one's cell counts as empty).
    build: [u64; 2],
    /// Each cell's node's length in bytes (at most a few KiB: 256 transitions).
    len: [u32; 2],
    /// The cell used last (0 or 1).
    mru: u8,
}

impl Row {
    /// The address of cell `c`'s node: its last byte.
    fn addr(&self, c: usize) -> usize {
        self.start[c] + self.len[c] as usize - 1
    }
}

/// The registry of compiled nodes. Kept per thread from build to build (allocating and
/// freeing its 20,000 cells cost a small segment's build as much as its nodes); a new build
/// empties it by moving on to a new build number.
struct Registry {
    rows: Vec<Row>,
    build: u64,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            rows: vec![
                Row {
                    hash: [0; 2],
                    start: [0; 2],
                    build: [0; 2],
                    len: [0; 2],
                    mru: 0,
                };
                REGISTRY_ROWS
            ],
            build: 0,
        }
    }
}

thread_local! {
    static REGISTRY: std::cell::RefCell<Option<Registry>> = const { std::cell::RefCell::new(None) };
}

/// The output and the registry of compiled nodes.
struct Writer {
    out: Vec<u8>,
    reg: Registry,
    /// A node encoded again, to compare with the output.
    scratch: Vec<u8>,
}

impl Writer {
    /// The address of `node`: one compiled before that is equal, or `node` written now.
    fn compile(&mut self, node: &Node) -> usize {
        if node.is_final && node.trans.is_empty() && node.final_output == 0 {
            return EMPTY;
        }
        let hash = node_hash(node);
        let r = (hash as usize) % REGISTRY_ROWS;
        let row = self.reg.rows[r];
        let (mru, lru) = (usize::from(row.mru), usize::from(1 - row.mru));
        if self.holds(&row, mru, hash, node) {
            return row.addr(mru);
        }
        if self.holds(&row, lru, hash, node) {
            self.reg.rows[r].mru = lru as u8;
            return row.addr(lru);
        }
        // Replace the least recently used cell and make it the most recent.
        let start = self.out.len();
        encode(node, start, &mut self.out);
        let row = &mut self.reg.rows[r];
        row.build[lru] = self.reg.build;
        row.hash[lru] = hash;
        row.start[lru] = start;
        row.len[lru] = (self.out.len() - start) as u32;
        row.mru = lru as u8;
        self.out.len() - 1
    }

    /// Whether cell `c` of `row` holds `node`: same build, same hash, and `node` encoded
    /// where the cell's node starts gives the bytes there. The encoding is a function of
    /// the node and its start (each transition's target is written relative to it), and
    /// an FST reader decodes those bytes back to that node, so equal bytes mean an equal
    /// node, without a copy of every node kept to compare with.
    fn holds(&mut self, row: &Row, c: usize, hash: u64, node: &Node) -> bool {
        if row.build[c] != self.reg.build || row.hash[c] != hash {
            return false;
        }
        let (start, len) = (row.start[c], row.len[c] as usize);
        let Some(written) = self.out.get(start..start + len) else {
            return false;
        };
        self.scratch.clear();
        encode(node, start, &mut self.scratch);
        self.scratch == written
    }
}

/// Append `node`'s bytes to `out`, the node starting at address `start` (its address is
/// that of its last byte).
fn encode(node: &Node, start: usize, out: &mut Vec<u8>) {
    if node.trans.len() != 1 || node.is_final {
        encode_any(node, start, out);
        return;
    }
    let t = node.trans[0];
    let common = COMMON_IDX[usize::from(t.inp)];
    // Nodes are written back to back: the node just before this one ends at `start - 1`.
    if t.addr.wrapping_add(1) == start && t.out == 0 {
        // One transition to the node just before, no output.
        if common == 0 {
            out.push(t.inp);
        }
        out.push(0b11_000000 | common);
        return;
    }
    let osize = if t.out == 0 {
        0
    } else {
        pack(out, t.out, pack_size(t.out))
    };
    let delta = delta(start, t.addr);
    let tsize = pack(out, delta, pack_size(delta));
    out.push((tsize << 4) | osize);
    if common == 0 {
        out.push(t.inp);
    }
    out.push(0b10_000000 | common);
}

fn encode_any(node: &Node, start: usize, out: &mut Vec<u8>) {
    let mut tsize = 0;
    let mut osize = pack_size(node.final_output);
    let mut any_outs = node.final_output != 0;
    for t in &node.trans {
        tsize = tsize.max(pack_size(delta(start, t.addr)));
        osize = osize.max(pack_size(t.out));
        any_outs |= t.out != 0;
    }
    let sizes = (tsize << 4) | if any_outs { osize } else { 0 };
    let n = node.trans.len();
    // The count in the state byte when it fits in six bits (256 wraps to 0: not there).
    let mut state = if node.is_final { 0b01_000000 } else { 0 };
    if (n as u8) <= 0b00_111111 {
        state |= n as u8;
    }
    if any_outs {
        if node.is_final {
            pack(out, node.final_output, osize);
        }
        for t in node.trans.iter().rev() {
            pack(out, t.out, osize);
        }
    }
    for t in node.trans.iter().rev() {
        pack(out, delta(start, t.addr), tsize);
    }
    out.extend(node.trans.iter().rev().map(|t| t.inp));
    if n > INDEX_THRESHOLD {
        let mut index = [255u8; 256];
        for (i, t) in node.trans.iter().enumerate() {
            index[usize::from(t.inp)] = i as u8;
        }
        out.extend_from_slice(&index);
    }
    out.push(sizes);
    if state & 0b00_111111 == 0 {
        // 256 transitions cannot be counted in a byte; 1 never is here (one transition
        // is always counted in the state byte).
        out.push(if n == 256 { 1 } else { n as u8 });
    }
    out.push(state);
}

/// `fst`'s registry hash (FNV-1a over the node's fields); its row is the hash modulo the
/// number of rows.
fn node_hash(node: &Node) -> u64 {
    const PRIME: u64 = 1_099_511_628_211;
    let mut h: u64 = 14_695_981_039_346_656_037;
    h = (h ^ u64::from(node.is_final)).wrapping_mul(PRIME);
    h = (h ^ node.final_output).wrapping_mul(PRIME);
    for t in &node.trans {
        h = (h ^ u64::from(t.inp)).wrapping_mul(PRIME);
        h = (h ^ t.out).wrapping_mul(PRIME);
        h = (h ^ t.addr as u64).wrapping_mul(PRIME);
    }
    h
}

/// A transition's address as written: its distance back from the node, or 0 for the empty
/// final node.
fn delta(node: usize, target: usize) -> u64 {
    if target == EMPTY {
        0
    } else {
        node.saturating_sub(target) as u64
    }
}

/// Bytes needed for `n` (at least one).
fn pack_size(n: u64) -> u8 {
    let bits = 64 - n.leading_zeros();
    (bits.div_ceil(8).max(1)) as u8
}

/// Append `n` in `size` little-endian bytes; returns `size`.
fn pack(out: &mut Vec<u8>, n: u64, size: u8) -> u8 {
    out.extend_from_slice(&n.to_le_bytes()[..usize::from(size)]);
    size
}

/// Builds a map from sorted, unique byte keys to `u64` values.
pub struct FstBuilder {
    w: Writer,
    /// The unfinished nodes on the last key's path; `levels[..depth]` are in use, the rest
    /// kept for their vectors.
    levels: Vec<Level>,
    depth: usize,
    len: u64,
    last_key: Option<Vec<u8>>,
}

impl Default for FstBuilder {
    fn default() -> Self {
        FstBuilder::new()
    }
}

impl FstBuilder {
    /// An empty builder writing to memory.
    pub fn new() -> FstBuilder {
        let mut out = Vec::with_capacity(10 * 1024);
        out.extend_from_slice(&VERSION.to_le_bytes());
        // The FST type: 0.
        out.extend_from_slice(&0u64.to_le_bytes());
        let mut reg = REGISTRY
            .with(|r| r.try_borrow_mut().ok().and_then(|mut r| r.take()))
            .unwrap_or_else(Registry::new);
        reg.build += 1;
        let mut b = FstBuilder {
            w: Writer {
                out,
                reg,
                scratch: Vec::with_capacity(64),
            },
            levels: Vec::with_capacity(64),
            depth: 0,
            len: 0,
            last_key: None,
        };
        b.push_level(false);
        b
    }

    fn push_level(&mut self, is_final: bool) {
        if self.depth == self.levels.len() {
            self.levels.push(Level::default());
        }
        let l = &mut self.levels[self.depth];
        l.node.is_final = is_final;
        l.node.final_output = 0;
        l.node.trans.clear();
        l.last = None;
        self.depth += 1;
    }

    /// Add `key` with `value`; keys must come in strictly increasing order.
    pub fn insert(&mut self, key: &[u8], value: u64) -> Result<(), FstBuildError> {
        match &mut self.last_key {
            Some(last) => {
                if key == last.as_slice() {
                    return Err(FstBuildError::Duplicate(key.to_vec()));
                }
                if key < last.as_slice() {
                    return Err(FstBuildError::OutOfOrder(key.to_vec()));
                }
                last.clear();
                last.extend_from_slice(key);
            }
            None => self.last_key = Some(key.to_vec()),
        }
        if key.is_empty() {
            // Necessarily the first key.
            self.len = 1;
            self.levels[0].node.is_final = true;
            self.levels[0].node.final_output = value;
            return Ok(());
        }
        let (prefix, out) = self.common_prefix_and_set_output(key, value);
        if prefix == key.len() {
            // Only a duplicate shares the whole key, and duplicates are refused above.
            return Ok(());
        }
        self.len += 1;
        self.compile_from(prefix);
        self.add_suffix(&key[prefix..], out);
        Ok(())
    }

    /// How many leading bytes of `key` the last key's path shares; the outputs along it
    /// become the common part of theirs and `out`, the rest pushed down. Returns what is
    /// left of `out` for the new suffix.
    fn common_prefix_and_set_output(&mut self, key: &[u8], mut out: u64) -> (usize, u64) {
        let mut i = 0;
        while i < key.len() && i < self.depth {
            let add = match &mut self.levels[i].last {
                Some((inp, t_out)) if *inp == key[i] => {
                    let common = (*t_out).min(out);
                    let add = *t_out - common;
                    out -= common;
                    *t_out = common;
                    add
                }
                _ => break,
            };
            i += 1;
            if add != 0 && i < self.depth {
                self.levels[i].add_output_prefix(add);
            }
        }
        (i, out)
    }

    /// Compile the nodes of the last key's path below level `istate`.
    fn compile_from(&mut self, istate: usize) {
        let mut addr = NONE;
        while istate + 1 < self.depth {
            self.depth -= 1;
            let level = &mut self.levels[self.depth];
            if addr != NONE {
                level.freeze_last(addr);
            }
            addr = self.w.compile(&level.node);
        }
        self.levels[self.depth - 1].freeze_last(addr);
    }

    fn add_suffix(&mut self, suffix: &[u8], out: u64) {
        let Some((&first, rest)) = suffix.split_first() else {
            return;
        };
        self.levels[self.depth - 1].last = Some((first, out));
        for &b in rest {
            self.push_level(false);
            self.levels[self.depth - 1].last = Some((b, 0));
        }
        self.push_level(true);
    }

    /// The FST's bytes (header, nodes, key count, root address, checksum).
    pub fn finish(mut self) -> Vec<u8> {
        self.compile_from(0);
        let root = self.w.compile(&self.levels[0].node);
        let Writer { mut out, reg, .. } = self.w;
        REGISTRY.with(|r| {
            if let Ok(mut r) = r.try_borrow_mut() {
                *r = Some(reg);
            }
        });
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&(root as u64).to_le_bytes());
        let sum = crc32c(&out);
        let masked = (sum.rotate_right(15)).wrapping_add(0xA282_EAD8);
        out.extend_from_slice(&masked.to_le_bytes());
        out
    }
}

/// CRC-32C (Castagnoli), as `fst` checksums its bytes: eight bytes per step.
fn crc32c(data: &[u8]) -> u32 {
    const TABLES: [[u32; 256]; 8] = {
        let mut t = [[0u32; 256]; 8];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[0][i] = c;
            i += 1;
        }
        let mut i = 0;
        while i < 256 {
            let mut j = 1;
            while j < 8 {
                t[j][i] = (t[j - 1][i] >> 8) ^ t[0][(t[j - 1][i] & 0xff) as usize];
                j += 1;
            }
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = TABLES[7][(lo & 0xff) as usize]
            ^ TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][usize::from(c[4])]
            ^ TABLES[2][usize::from(c[5])]
            ^ TABLES[1][usize::from(c[6])]
            ^ TABLES[0][usize::from(c[7])];
    }
    for &b in chunks.remainder() {
        crc = TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(keys: &[(Vec<u8>, u64)]) -> Vec<u8> {
        let mut b = FstBuilder::new();
        for (k, v) in keys {
            b.insert(k, *v).expect("insert");
        }
        b.finish()
    }

    fn theirs(keys: &[(Vec<u8>, u64)]) -> Vec<u8> {
        let mut b = fst::MapBuilder::memory();
        for (k, v) in keys {
            b.insert(k, *v).expect("insert");
        }
        b.into_inner().expect("fst")
    }

    fn same(mut keys: Vec<(Vec<u8>, u64)>) {
        keys.sort();
        keys.dedup_by(|a, b| a.0 == b.0);
        let (a, b) = (ours(&keys), theirs(&keys));
        assert_eq!(a, b, "{} keys", keys.len());
        let map = fst::Map::new(a).expect("readable");
        for (k, v) in &keys {
            assert_eq!(map.get(k), Some(*v));
        }
    }

    #[test]
    fn crc32c_of_known_input() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn every_node_shape_writes_what_fst_writes() {
        // No keys; the empty key alone; the empty key with others.
        same(vec![]);
        same(vec![(vec![], 0)]);
        same(vec![(vec![], 7), (b"a".to_vec(), 1), (b"ab".to_vec(), 0)]);
        // 256 transitions from the root, 40 (an input index), 33, 32.
        for n in [256usize, 40, 33, 32, 2] {
            same((0..n).map(|b| (vec![b as u8], b as u64)).collect());
        }
        // Outputs of every size, shared prefixes that push outputs down, final nodes
        // with outputs and transitions.
        same(vec![
            (b"abc".to_vec(), u64::MAX),
            (b"abcd".to_vec(), 1 << 40),
            (b"abd".to_vec(), 3),
            (b"b".to_vec(), 0),
            (b"ba".to_vec(), 300),
            (b"bab".to_vec(), 70_000),
        ]);
        // Uncommon inputs (not in the common table) in one-transition nodes.
        same(vec![(vec![0xff, 0x01, 0x80], 0), (vec![0xff, 0x02], 5)]);
    }

    #[test]
    fn the_registry_fills_and_evicts_as_fsts_does() {
        // More distinct suffixes than the registry's 20,000 cells.
        let keys = (0..60_000u64)
            .map(|i| (format!("{:06}@x{}.example", i, i % 97).into_bytes(), i % 5))
            .collect();
        same(keys);
    }

    #[test]
    fn a_build_after_another_on_the_thread_starts_from_an_empty_registry() {
        // The same suffixes in both: a registry kept with its first build's addresses would
        // point the second build's nodes at bytes it never wrote.
        let keys = |p: &str| -> Vec<(Vec<u8>, u64)> {
            (0..500u64)
                .map(|i| (format!("{p}{i:04}@example.com").into_bytes(), 0))
                .collect()
        };
        same(keys("alpha"));
        same(keys("b"));
        let mut first = FstBuilder::new();
        first.insert(b"zz", 1).expect("insert");
        // A builder dropped without finishing does not lose the thread its registry.
        drop(first);
        same(keys("c"));
    }

    #[test]
    fn refuses_duplicates_and_disorder() {
        let mut b = FstBuilder::new();
        b.insert(b"b", 1).expect("first");
        assert_eq!(
            b.insert(b"b", 2),
            Err(FstBuildError::Duplicate(b"b".to_vec()))
        );
        assert_eq!(
            b.insert(b"a", 2),
            Err(FstBuildError::OutOfOrder(b"a".to_vec()))
        );
    }

    proptest::proptest! {
        #[test]
        fn random_maps_write_what_fst_writes(
            keys in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        proptest::prop_oneof![0x61u8..0x65, 0u8..=255],
                        0..10,
                    ),
                    proptest::prop_oneof![0u64..3, proptest::num::u64::ANY],
                ),
                0..200,
            ),
        ) {
            same(keys);
        }
    }
}
