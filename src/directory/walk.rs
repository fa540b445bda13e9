//! A decoder of the `fst` crate's node format (format versions 2 and 3) for the one thing the
//! hot path does with it: follow one byte from a node, and ask whether a node is final.
//!
//! `fst::raw::Node::new` decodes a node whole (its end address, final output, pack sizes)
//! before a transition can be read, then `transition(i)` decodes the sizes again; a lookup
//! pays that at every byte of the local part. Here each step reads only the bytes that step
//! needs. The layout (read backwards from a node's address) is the fst crate's:
//!
//! - `0b11xxxxxx` one transition to the node just before, no output; `xxxxxx` is the input's
//!   index in fst's table of common inputs, or 0 with the input in the byte before.
//! - `0b10xxxxxx` one transition with an output: input as above, then a pack-size byte
//!   (transition size in the high nibble, output size in the low), the address delta, the
//!   output.
//! - `0b0fnnnnnn` any number of transitions (`f` = final; `nnnnnn` = count, or 0 with the
//!   count in the byte before, 1 there meaning 256): pack sizes, a 256-byte input index when
//!   there are more than 32 transitions, the inputs (reversed), the address deltas, the
//!   outputs, the final output.
//!
//! Every read is bounds-checked and every address computed with checked arithmetic: hostile
//! bytes make a step answer "no transition", never a panic. Tested against `fst::raw` on the
//! same FSTs.

/// Address of the final node without transitions (never written out).
const EMPTY: usize = 0;
/// Transitions above which a node carries a 256-byte input index (format version >= 2).
const INDEX_THRESHOLD: usize = 32;

/// The first 63 of the `fst` crate's common inputs, by frequency: a one-transition node
/// whose input is one of these stores its index + 1 in the state byte instead of the byte.
/// (Part of the format: `fst::raw`'s `COMMON_INPUTS_INV`.)
const COMMON: &[u8; 63] = b"te/oasripcnw.hlm-du012g=:bf3y5&_4v9678k%?xCDASFIBEjPTzRNM+LOqHG";

/// The FST bytes of one shard, as `fst::raw::Fst::as_bytes` gives them.
#[derive(Debug, Clone, Copy)]
pub struct Walker<'a> {
    data: &'a [u8],
}

impl<'a> Walker<'a> {
    /// `data` must be an FST of format version 2 or later (what `fst` 0.4 writes).
    pub fn new(data: &'a [u8]) -> Walker<'a> {
        Walker { data }
    }

    #[inline(always)]
    fn byte(&self, at: usize) -> Option<u8> {
        self.data.get(at).copied()
    }

    /// Little-endian unsigned integer of `n` bytes at `at` (0 for `n == 0`).
    #[inline(always)]
    fn uint(&self, at: usize, n: usize) -> Option<u64> {
        let s = self.data.get(at..at.checked_add(n)?)?;
        Some(s.iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
    }

    /// Input of a one-transition node and the bytes it takes.
    #[inline(always)]
    fn one_input(&self, addr: usize, state: u8) -> Option<(u8, usize)> {
        match state & 0b0011_1111 {
            0 => Some((self.byte(addr.checked_sub(1)?)?, 1)),
            i => Some((*COMMON.get(usize::from(i) - 1)?, 0)),
        }
    }

    /// Follow input `b` from the node at `addr`: the next node's address and the
    /// transition's output, or `None` when the node has no transition on `b`.
    #[inline]
    pub fn step(&self, addr: usize, b: u8) -> Option<(usize, u64)> {
        self.step_with(addr, b, false)
            .map(|(next, out, _)| (next, out))
    }

    /// As [`Self::step`], and the node that the node's transition before it (on the next
    /// smaller input) leads to, when there is one. fst writes a node's subtrees in the order
    /// of their inputs, so what a transition leads to was written above that node.
    #[inline]
    pub fn step_and_sibling(&self, addr: usize, b: u8) -> Option<(usize, u64, Option<usize>)> {
        self.step_with(addr, b, true)
    }

    #[inline(always)]
    fn step_with(&self, addr: usize, b: u8, sibling: bool) -> Option<(usize, u64, Option<usize>)> {
        if addr == EMPTY {
            return None;
        }
        let state = self.byte(addr)?;
        match state >> 6 {
            0b11 => {
                let (input, ilen) = self.one_input(addr, state)?;
                if input != b {
                    return None;
                }
                Some((addr.checked_sub(ilen + 1)?, 0, None))
            }
            0b10 => {
                let (input, ilen) = self.one_input(addr, state)?;
                if input != b {
                    return None;
                }
                let sizes_at = addr.checked_sub(ilen + 1)?;
                let sizes = self.byte(sizes_at)?;
                let (tsize, osize) = (usize::from(sizes >> 4), usize::from(sizes & 0xf));
                let delta_at = sizes_at.checked_sub(tsize)?;
                let delta = self.uint(delta_at, tsize)?;
                let out_at = delta_at.checked_sub(osize)?;
                let out = self.uint(out_at, osize)?;
                Some((next(out_at, delta)?, out, None))
            }
            _ => {
                let any = self.any(addr, state)?;
                let i = if any.indexed {
                    let i = usize::from(self.byte(any.inputs_end.checked_add(usize::from(b))?)?);
                    if i >= any.ntrans {
                        return None;
                    }
                    i
                } else {
                    let inputs = self.data.get(any.inputs_start..any.inputs_end)?;
                    any.ntrans
                        .checked_sub(1 + inputs.iter().position(|&x| x == b)?)?
                };
                let delta_at = any
                    .inputs_start
                    .checked_sub((i + 1).checked_mul(any.tsize)?)?;
                let delta = self.uint(delta_at, any.tsize)?;
                let out = if any.osize == 0 {
                    0
                } else {
                    let at = any
                        .deltas_start
                        .checked_sub((i + 1).checked_mul(any.osize)?)?;
                    self.uint(at, any.osize)?
                };
                let end = if any.is_final {
                    any.outs_start.checked_sub(any.osize)?
                } else {
                    any.outs_start
                };
                let before = match i.checked_sub(1) {
                    Some(_) if sibling => {
                        let at = any.inputs_start.checked_sub(i.checked_mul(any.tsize)?)?;
                        Some(next(end, self.uint(at, any.tsize)?)?)
                    }
                    _ => None,
                };
                Some((next(end, delta)?, out, before))
            }
        }
    }

    /// The final output of the node at `addr` when it is final (a key ends there).
    #[inline]
    pub fn final_output(&self, addr: usize) -> Option<u64> {
        if addr == EMPTY {
            return Some(0);
        }
        let state = self.byte(addr)?;
        if state >> 6 >= 0b10 {
            return None; // one-transition nodes are never final
        }
        let any = self.any(addr, state)?;
        if !any.is_final {
            return None;
        }
        if any.osize == 0 {
            return Some(0);
        }
        self.uint(any.outs_start.checked_sub(any.osize)?, any.osize)
    }

    /// The header of a node with any number of transitions.
    #[inline(always)]
    fn any(&self, addr: usize, state: u8) -> Option<Any> {
        let (ntrans, nlen) = match state & 0b0011_1111 {
            0 => match self.byte(addr.checked_sub(1)?)? {
                1 => (256, 1),
                n => (usize::from(n), 1),
            },
            n => (usize::from(n), 0),
        };
        let sizes_at = addr.checked_sub(nlen + 1)?;
        let sizes = self.byte(sizes_at)?;
        let indexed = ntrans > INDEX_THRESHOLD;
        let (tsize, osize) = (usize::from(sizes >> 4), usize::from(sizes & 0xf));
        // Going down from the pack sizes: the index (when there is one), the inputs, the
        // address deltas, the outputs, the final output.
        let inputs_end = sizes_at.checked_sub(if indexed { 256 } else { 0 })?;
        let inputs_start = inputs_end.checked_sub(ntrans)?;
        let deltas_start = inputs_start.checked_sub(ntrans.checked_mul(tsize)?)?;
        let outs_start = deltas_start.checked_sub(ntrans.checked_mul(osize)?)?;
        Some(Any {
            is_final: state & 0b0100_0000 != 0,
            ntrans,
            tsize,
            osize,
            indexed,
            inputs_end,
            inputs_start,
            deltas_start,
            outs_start,
        })
    }
}

/// Walk arbitrary bytes as an FST from a few addresses (the fuzz targets): never panics.
pub fn fuzz(data: &[u8]) {
    let w = Walker::new(data);
    let starts = [data.len().saturating_sub(1), data.len() / 2, 1, 0];
    for start in starts {
        for key in [&b"alice"[..], b"\0\xff\x80", b"teoa"] {
            let mut addr = start;
            for &b in key {
                let _ = w.final_output(addr);
                match w.step(addr, b) {
                    Some((next, _)) => addr = next,
                    None => break,
                }
            }
        }
    }
}

/// Decoded header of a node with any number of transitions.
struct Any {
    is_final: bool,
    ntrans: usize,
    tsize: usize,
    osize: usize,
    indexed: bool,
    /// Where the index (when there is one) starts and the inputs end.
    inputs_end: usize,
    inputs_start: usize,
    deltas_start: usize,
    outs_start: usize,
}

/// The address a transition leads to: `end` is the end of the node it leaves (its lowest
/// byte), the delta is stored relative to it; 0 stands for the empty final node.
#[inline(always)]
fn next(end: usize, delta: u64) -> Option<usize> {
    let delta = usize::try_from(delta).ok()?;
    if delta == EMPTY {
        Some(EMPTY)
    } else {
        end.checked_sub(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fst::raw::{Fst, Output};

    /// Walk `key` with both decoders from the root: the outputs gathered and the final
    /// output at every prefix must agree.
    fn agree(fst: &Fst<Vec<u8>>, key: &[u8]) {
        let w = Walker::new(fst.as_bytes());
        let mut node = fst.root();
        let (mut addr, mut ours) = (node.addr(), 0u64);
        let mut out = Output::zero();
        for (i, &b) in key.iter().enumerate() {
            let theirs_final = node
                .is_final()
                .then(|| out.cat(node.final_output()).value());
            let our_final = w.final_output(addr).map(|f| ours.wrapping_add(f));
            assert_eq!(our_final, theirs_final, "final at {i} of {key:?}");
            let found = node.find_input(b);
            let theirs = found.map(|t| node.transition(t));
            let step = w.step(addr, b);
            assert_eq!(
                step,
                theirs.map(|t| (t.addr, t.out.value())),
                "byte {i} of {key:?}"
            );
            let sibling = found
                .and_then(|t| t.checked_sub(1))
                .map(|t| node.transition(t).addr);
            assert_eq!(
                w.step_and_sibling(addr, b),
                step.map(|(a, o)| (a, o, sibling)),
                "sibling at byte {i} of {key:?}"
            );
            let Some(t) = theirs else { return };
            out = out.cat(t.out);
            node = fst.node(t.addr);
            (addr, ours) = (t.addr, ours.wrapping_add(t.out.value()));
        }
        let theirs_final = node
            .is_final()
            .then(|| out.cat(node.final_output()).value());
        assert_eq!(
            w.final_output(addr).map(|f| ours.wrapping_add(f)),
            theirs_final,
            "end of {key:?} at {addr}: {node:?}"
        );
    }

    fn build(mut keys: Vec<(Vec<u8>, u64)>) -> Fst<Vec<u8>> {
        keys.sort();
        keys.dedup_by(|a, b| a.0 == b.0);
        let mut b = fst::raw::Builder::memory();
        for (k, v) in &keys {
            b.insert(k, *v).expect("insert");
        }
        Fst::new(b.into_inner().expect("fst")).expect("fst")
    }

    #[test]
    fn agrees_on_every_node_shape() {
        let mut keys = Vec::new();
        // A root with all 256 inputs (indexed), nodes with 33 (indexed) and 20 (scanned)
        // inputs, common and uncommon single inputs, outputs from 0 to u64::MAX.
        for b in 0..=255u8 {
            keys.push((vec![b], u64::from(b) * 0x0101_0101));
            keys.push((vec![b, b'x', b], 7));
        }
        for b in 0..33u8 {
            keys.push((vec![b'k', b + 40, b'z'], u64::MAX - u64::from(b)));
        }
        for b in 0..20u8 {
            keys.push((vec![b'm', b + 60], 0));
            keys.push((vec![b'm', b + 60, 0xff, 0x80], 1 << 40));
        }
        for n in 0..500u64 {
            keys.push((format!("user{n}").into_bytes(), n % 5));
            keys.push((format!("user{n}.alias").into_bytes(), n));
        }
        let fst = build(keys.clone());
        for (k, _) in &keys {
            agree(&fst, k);
            let mut miss = k.clone();
            miss.push(b'q');
            agree(&fst, &miss);
            agree(&fst, &k[..k.len() / 2]);
        }
        for b in 0..=255u8 {
            agree(&fst, &[b'k', b]);
            agree(&fst, &[b'm', b, 0xff]);
        }
    }

    proptest::proptest! {
        #[test]
        fn agrees_on_random_fsts(
            keys in proptest::collection::vec(
                (proptest::collection::vec(proptest::prop_oneof![0x61u8..0x66, 0u8..=255], 0..12), proptest::num::u64::ANY),
                0..200,
            ),
            probes in proptest::collection::vec(proptest::collection::vec(0x61u8..0x66, 0..12), 0..50),
        ) {
            let fst = build(keys.clone());
            for k in keys.iter().map(|(k, _)| k).chain(&probes) {
                agree(&fst, k);
            }
        }
    }

    #[test]
    fn empty_and_single_key_fsts() {
        let fst = build(Vec::new());
        agree(&fst, b"");
        agree(&fst, b"a");
        let fst = build(vec![(Vec::new(), 5)]);
        agree(&fst, b"");
        agree(&fst, b"a");
        let fst = build(vec![(b"only".to_vec(), 0)]);
        for k in [&b"only"[..], b"onl", b"onlyx", b"x"] {
            agree(&fst, k);
        }
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let fst = build(
            (0..300u64)
                .map(|n| (format!("k{n}").into_bytes(), n))
                .collect(),
        );
        let mut bytes = fst.as_bytes().to_vec();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % bytes.len();
            bytes[at] = (x >> 32) as u8;
            let w = Walker::new(&bytes);
            let mut addr = (x >> 16) as usize % (bytes.len() + 10);
            for b in format!("k{round}").bytes() {
                let _ = w.final_output(addr);
                match w.step(addr, b) {
                    Some((a, _)) => addr = a,
                    None => break,
                }
            }
        }
    }
}
