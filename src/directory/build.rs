//! Building a snapshot file from merged records, off the request path.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Kind;
use super::filter::Keying;
use super::format::{
    COLD_AMBIGUOUS, COLD_REC, DOMAIN_REC, HEADER_LEN, Header, SECTIONS, SHARD_REC, Sec, SectionRef,
    domain_hash, put_str,
};
use super::fstbuild::FstBuildError;

/// "No string" / "no value" marker in every u32 reference.
pub const NONE: u32 = u32::MAX;

/// Interned strings (profiles, routes, customers, domain names).
#[derive(Debug, Default, Clone)]
pub struct Interner {
    /// Index of each string in `list`.
    ids: foldhash::HashMap<Box<str>, u32>,
    list: Vec<Box<str>>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.list.len() as u32;
        self.list.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    pub fn get(&self, id: u32) -> Option<&str> {
        self.list.get(id as usize).map(|s| &**s)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// One accepted domain. `name` is normalized (see `address::normalize_domain`).
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub name: String,
    pub customer: u32,
    /// Default profile and route for records that have none, and for accept-all answers.
    pub profile: u32,
    pub route: u32,
    pub accept_all: bool,
    pub keep_case: bool,
}

/// One address. `local` is already folded for its domain (see `address::fold_local_into`).
#[derive(Debug, Clone)]
pub struct RecordSpec {
    /// Index into `BuildInput::domains`.
    pub domain: u32,
    pub local: Box<str>,
    pub kind: Kind,
    /// Interned, or `NONE` to inherit the domain's.
    pub profile: u32,
    pub route: u32,
    /// Primary address of the owning object, when it is not this address.
    pub owner: Option<Box<str>>,
    /// Index into `BuildInput::sources`.
    pub source: u32,
    pub line: u32,
    pub dn: Option<Box<str>>,
    pub attributes: Option<Box<str>>,
    /// Effective attribute set, assigned by the build.
    attrs: u32,
}

impl RecordSpec {
    /// A record with no profile, route, owner or diagnostics of its own.
    pub fn new(domain: u32, local: impl Into<Box<str>>, kind: Kind) -> RecordSpec {
        RecordSpec {
            domain,
            local: local.into(),
            kind,
            profile: NONE,
            route: NONE,
            owner: None,
            source: 0,
            line: 0,
            dn: None,
            attributes: None,
            attrs: NONE,
        }
    }
}

/// Everything a snapshot is built from. Records must have unique (domain, local) keys.
#[derive(Debug, Default)]
pub struct BuildInput {
    pub generation: u64,
    pub created_unix: u64,
    pub strings: Interner,
    pub sources: Vec<String>,
    pub domains: Vec<DomainSpec>,
    pub records: Vec<RecordSpec>,
    /// FST shards built in parallel: 0 = automatic (one per core, at most 16, for 500,000
    /// addresses or more; else one), n = n shards (at most 16; tests of several shards).
    pub shards: usize,
    /// How the miss filter's keys are made: by domain name (every build's); by domain index
    /// writes the format of earlier builds (tests of reading it).
    pub filter_keying: Keying,
    /// What the sources listed but the build left out, and why (for `explain`).
    pub excluded: Vec<super::explain::Excluded>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("duplicate address {0:?} in build input (merge must deduplicate)")]
    Duplicate(String),
    #[error("record names domain #{0}, which does not exist")]
    UnknownDomain(u32),
    #[error("too many {0} for the snapshot format")]
    TooMany(&'static str),
    #[error("FST build failed: {0}")]
    Fst(String),
    #[error("build failed: {0}")]
    Internal(String),
}

/// What a build produced, for `compile` and the benchmarks.
#[derive(Debug, Clone, Default)]
pub struct BuildStats {
    pub records: usize,
    pub domains: usize,
    pub shards: usize,
    pub fst_bytes: usize,
    /// Bytes of the miss filters (hot).
    pub filter_bytes: usize,
    pub hot_bytes: usize,
    pub cold_bytes: usize,
    pub file_bytes: usize,
    pub sort_time: Duration,
    pub fst_time: Duration,
    /// Building the miss filters (their blocks in parallel, after the FSTs).
    pub filter_time: Duration,
    pub total_time: Duration,
}

impl std::ops::AddAssign<&BuildStats> for BuildStats {
    /// Another build's, summed (the segments of a set).
    fn add_assign(&mut self, s: &BuildStats) {
        self.records += s.records;
        self.domains += s.domains;
        self.shards += s.shards;
        self.fst_bytes += s.fst_bytes;
        self.filter_bytes += s.filter_bytes;
        self.hot_bytes += s.hot_bytes;
        self.cold_bytes += s.cold_bytes;
        self.file_bytes += s.file_bytes;
        self.sort_time += s.sort_time;
        self.fst_time += s.fst_time;
        self.filter_time += s.filter_time;
        self.total_time += s.total_time;
    }
}

/// What one shard thread returns.
struct ShardOut {
    fst: Vec<u8>,
    /// The filter keys of the shard's addresses, by filter block (`filter::block_of` their
    /// domain name's hash).
    keys: Vec<Vec<u64>>,
    /// Sorted by key.
    records: Vec<RecordSpec>,
}

/// Domains in name order (the order of a snapshot's domain table and of its address
/// cursor): the indices in that order, and each domain's position in it.
pub fn name_order(domains: &[DomainSpec]) -> (Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..domains.len() as u32).collect();
    order.sort_by(|&a, &b| domains[a as usize].name.cmp(&domains[b as usize].name));
    let mut rank = vec![0u32; domains.len()];
    for (r, &d) in order.iter().enumerate() {
        rank[d as usize] = r as u32;
    }
    (order, rank)
}

/// Cut one build input into one input per customer (the domains without a customer make
/// one input of their own), for a set of segments (`segments.rs`): see `split_by`.
pub fn split_by_customer(input: BuildInput) -> Vec<BuildInput> {
    split_by(input, |d| u64::from(d.customer))
}

/// Cut one build input into one input per value of `key` over its domains: each keeps its
/// domains' records and exclusions, with its own string table. Exclusions of addresses in
/// no accepted domain go with the first input. Inputs come in the order of their first
/// domain's name.
pub fn split_by(input: BuildInput, key: impl Fn(&DomainSpec) -> u64) -> Vec<BuildInput> {
    let (order, _) = name_order(&input.domains);
    // Key -> part, in name order of each part's first domain.
    let mut part_of_key: HashMap<u64, usize> = HashMap::new();
    let mut part_of_domain = vec![0usize; input.domains.len()];
    for &d in &order {
        let c = key(&input.domains[d as usize]);
        let n = part_of_key.len();
        part_of_domain[d as usize] = *part_of_key.entry(c).or_insert(n);
    }
    let parts = part_of_key.len().max(1);
    let mut out: Vec<BuildInput> = (0..parts)
        .map(|_| BuildInput {
            generation: input.generation,
            created_unix: input.created_unix,
            shards: input.shards,
            ..BuildInput::default()
        })
        .collect();
    // Each part names only the sources its records come from, so a part's content does not
    // depend on the sources of the others.
    let mut source_of: Vec<HashMap<u32, u32>> = vec![HashMap::new(); parts];
    let mut local = vec![0u32; input.domains.len()];
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    let copy = |strings: &Interner, to: &mut Interner, id: u32| {
        strings.get(id).map_or(NONE, |s| to.intern(s))
    };
    for (d, spec) in input.domains.iter().enumerate() {
        let p = &mut out[part_of_domain[d]];
        local[d] = p.domains.len() as u32;
        by_name.insert(&spec.name, part_of_domain[d]);
        let mut spec = spec.clone();
        spec.customer = copy(&input.strings, &mut p.strings, spec.customer);
        spec.profile = copy(&input.strings, &mut p.strings, spec.profile);
        spec.route = copy(&input.strings, &mut p.strings, spec.route);
        p.domains.push(spec);
    }
    for mut r in input.records {
        let Some(&p) = part_of_domain.get(r.domain as usize) else {
            // `build` refuses it; keep it so the part's build says so.
            out[0].records.push(r);
            continue;
        };
        let part = &mut out[p];
        if let Some(name) = input.sources.get(r.source as usize) {
            let n = part.sources.len() as u32;
            r.source = *source_of[p].entry(r.source).or_insert_with(|| {
                part.sources.push(name.clone());
                n
            });
        }
        r.profile = copy(&input.strings, &mut part.strings, r.profile);
        r.route = copy(&input.strings, &mut part.strings, r.route);
        r.domain = local[r.domain as usize];
        part.records.push(r);
    }
    for x in input.excluded {
        let domain = x.address.rsplit_once('@').map_or("", |(_, d)| d);
        let p = by_name.get(domain).copied().unwrap_or(0);
        out[p].excluded.push(x);
    }
    out
}

/// Build a snapshot file image. Pure function of the input (plus timings).
pub fn build(mut input: BuildInput) -> Result<(Vec<u8>, BuildStats), BuildError> {
    let t0 = Instant::now();
    // Domains in name order; remap record domain indices.
    let (order, remap) = name_order(&input.domains);
    let domains: Vec<DomainSpec> = order
        .iter()
        .map(|&o| input.domains[o as usize].clone())
        .collect();
    let key_width = match domains.len() {
        0..=0x100 => 1,
        0x101..=0x1_0000 => 2,
        0x1_0001..=0x100_0000 => 3,
        _ => 4,
    };
    if domains.len() > u32::MAX as usize - 1 {
        return Err(BuildError::TooMany("domains"));
    }
    if input.records.len() >= (1usize << 32) {
        return Err(BuildError::TooMany("records"));
    }

    // Attribute sets: the effective (profile, route) of every record and domain.
    // foldhash, not std's SipHash: a lookup per record (keys from the sources, so seeded).
    let mut sets: foldhash::HashMap<(u32, u32), u32> = foldhash::HashMapExt::new();
    let mut set_list: Vec<(u32, u32)> = Vec::new();
    let mut set_id = |p: u32, r: u32| {
        *sets.entry((p, r)).or_insert_with(|| {
            set_list.push((p, r));
            set_list.len() as u32 - 1
        })
    };
    let declared: Vec<u32> = domains.iter().map(|d| set_id(d.profile, d.route)).collect();
    let mut per_domain = vec![0usize; domains.len()];
    let mut last: Option<(u32, u32, u32)> = None;
    for r in input.records.iter_mut() {
        let d = *remap
            .get(r.domain as usize)
            .ok_or(BuildError::UnknownDomain(r.domain))?;
        r.domain = d;
        per_domain[d as usize] += 1;
        let dom = &domains[d as usize];
        let p = if r.profile == NONE {
            dom.profile
        } else {
            r.profile
        };
        let ro = if r.route == NONE { dom.route } else { r.route };
        // Consecutive records usually share a set: skip the hash lookup then.
        let id = match last {
            Some((lp, lr, id)) if (lp, lr) == (p, ro) => id,
            _ => {
                let id = set_id(p, ro);
                last = Some((p, ro, id));
                id
            }
        };
        r.attrs = id;
    }

    // Shards: contiguous domain ranges of roughly equal record counts.
    let threads = if input.shards > 0 {
        input.shards
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let nshards = if input.shards == 0 && input.records.len() < 500_000 {
        1
    } else {
        threads.clamp(1, 16)
    };
    let mut bounds = vec![0u32]; // first domain of each shard
    let target = input.records.len().div_ceil(nshards.max(1));
    let mut acc = 0;
    for (i, &n) in per_domain.iter().enumerate() {
        // Never a shard without domains (a bound equal to the first).
        if acc >= target && bounds.len() < nshards && i > 0 {
            bounds.push(i as u32);
            acc = 0;
        }
        acc += n;
    }
    let shard_of_domain = |d: u32| bounds.partition_point(|&b| b <= d) - 1;
    let mut parts: Vec<Vec<RecordSpec>> = (0..bounds.len()).map(|_| Vec::new()).collect();
    for r in input.records.drain(..) {
        parts[shard_of_domain(r.domain)].push(r);
    }

    let sort_fst = Instant::now();
    // The miss filter's blocks are keyed by domain name (filter.rs): one per shard, each
    // holding the domains whose names hash to it.
    let name_hashes: Vec<u64> = domains
        .iter()
        .map(|d| domain_hash(d.name.as_bytes()))
        .collect();
    let blocks = parts.len();
    let filter_keys = FilterKeys {
        name_hashes: &name_hashes,
        blocks,
        keying: input.filter_keying,
    };
    // One shard (every build under 500,000 addresses: a segment, a small directory) is built
    // on this thread: a thread of its own would only add a spawn and a wake-up per build
    // (thousands of segments in a full build).
    let results: Vec<Result<(ShardOut, Duration), BuildError>> = if parts.len() == 1 {
        parts
            .into_iter()
            .map(|part| {
                // A panic is the same error as a shard thread's.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    build_shard(part, key_width, filter_keys)
                }))
                .unwrap_or_else(shard_panicked)
            })
            .collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| s.spawn(move || build_shard(part, key_width, filter_keys)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(shard_panicked))
                .collect()
        })
    };
    let mut shards = Vec::with_capacity(results.len());
    let mut sort_time = Duration::ZERO;
    for r in results {
        let (out, st) = r?;
        sort_time = sort_time.max(st);
        shards.push(out);
    }
    let fst_time = sort_fst.elapsed().saturating_sub(sort_time);

    // The filter blocks: each gathers its keys from every shard, built in parallel.
    let tf = Instant::now();
    let mut block_keys: Vec<Vec<u64>> = vec![Vec::new(); blocks];
    for (n, s) in shards.iter_mut().enumerate() {
        let mine = std::mem::take(&mut s.keys);
        if input.filter_keying == Keying::Index {
            block_keys[n] = mine.into_iter().next().unwrap_or_default();
            continue;
        }
        for (all, mine) in block_keys.iter_mut().zip(mine) {
            if all.is_empty() {
                *all = mine;
            } else {
                all.extend_from_slice(&mine);
            }
        }
    }
    let kind = match input.filter_keying {
        Keying::Name => super::filter::KIND_BY_NAME,
        Keying::Index => super::filter::KIND_BY_INDEX,
    };
    let filter_blocks: Vec<Vec<u8>> = if blocks == 1 {
        block_keys
            .into_iter()
            .map(|keys| super::filter::block_of_kind(keys, kind))
            .collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = block_keys
                .into_iter()
                .map(|keys| s.spawn(move || super::filter::block_of_kind(keys, kind)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| ()))
                .collect::<Result<Vec<_>, ()>>()
        })
        .map_err(|()| BuildError::Internal("a filter thread panicked".into()))?
    };
    let filter_time = tf.elapsed();

    // Assemble sections.
    let mut strings = input.strings;
    let domain_name_ids: Vec<u32> = domains.iter().map(|d| strings.intern(&d.name)).collect();
    let source_ids: Vec<u32> = input.sources.iter().map(|s| strings.intern(s)).collect();
    let mut sec: Vec<Vec<u8>> = vec![Vec::new(); SECTIONS];
    let mut shard_table = Vec::new();
    for ((first, s), _) in bounds.iter().zip(&shards).zip(0..) {
        let off = sec[Sec::Fst as usize].len() as u64;
        sec[Sec::Fst as usize].extend_from_slice(&s.fst);
        shard_table.extend_from_slice(&first.to_le_bytes());
        shard_table.extend_from_slice(&off.to_le_bytes());
        shard_table.extend_from_slice(&(s.fst.len() as u64).to_le_bytes());
    }
    debug_assert_eq!(shard_table.len(), bounds.len() * SHARD_REC);
    sec[Sec::Filter as usize] = filter_blocks.concat();
    let fst_bytes = sec[Sec::Fst as usize].len();
    sec[Sec::Shards as usize] = shard_table;
    {
        let mut idx = Vec::with_capacity(strings.len() * 8);
        let mut blob = Vec::new();
        for s in &strings.list {
            idx.extend_from_slice(&(blob.len() as u32).to_le_bytes());
            idx.extend_from_slice(&(s.len() as u32).to_le_bytes());
            blob.extend_from_slice(s.as_bytes());
        }
        sec[Sec::StrIndex as usize] = idx;
        sec[Sec::StrBlob as usize] = blob;
    }
    let mut dom = Vec::with_capacity(domains.len() * DOMAIN_REC);
    for (i, d) in domains.iter().enumerate() {
        let mut flags = 0u32;
        if d.accept_all {
            flags |= 1;
        }
        if d.keep_case {
            flags |= 2;
        }
        flags |= (shard_of_domain(i as u32) as u32) << 8;
        for v in [
            domain_name_ids[i],
            d.customer,
            declared[i],
            0,
            flags,
            per_domain[i] as u32,
        ] {
            dom.extend_from_slice(&v.to_le_bytes());
        }
    }
    sec[Sec::Domains as usize] = dom;
    let nslots = (domains.len() * 2).next_power_of_two().max(1);
    let mut slots = vec![0u32; nslots];
    for (i, d) in domains.iter().enumerate() {
        let mut at = domain_hash(d.name.as_bytes()) as usize & (nslots - 1);
        while slots[at] != 0 {
            at = (at + 1) & (nslots - 1);
        }
        slots[at] = i as u32 + 1;
    }
    sec[Sec::DomainSlots as usize] = slots.iter().flat_map(|v| v.to_le_bytes()).collect();
    sec[Sec::AttrSets as usize] = set_list
        .iter()
        .flat_map(|&(p, r)| p.to_le_bytes().into_iter().chain(r.to_le_bytes()))
        .collect();
    sec[Sec::Sources as usize] = source_ids.iter().flat_map(|v| v.to_le_bytes()).collect();

    // Cold: owner, source, line, dn, attributes per record, found by the hash of its key.
    // One sequential pass in key order makes compact rows (owners written once, borrowed
    // from the records), then the rows are sorted by hash.
    let total_records: usize = shards.iter().map(|s| s.records.len()).sum();
    let mut rows: Vec<(u64, [u32; 5])> = Vec::with_capacity(total_records);
    let mut blob = Vec::new();
    let mut owners: foldhash::HashMap<&str, u32> = foldhash::HashMapExt::new();
    let mut key = Vec::with_capacity(300);
    for r in shards.iter().flat_map(|s| s.records.iter()) {
        fst_key(&mut key, r, key_width as usize);
        let owner = match r.owner.as_deref() {
            Some(o) => *owners.entry(o).or_insert_with(|| put_str(&mut blob, o)),
            None => NONE,
        };
        let dn = r.dn.as_deref().map_or(NONE, |d| put_str(&mut blob, d));
        let attrs = r
            .attributes
            .as_deref()
            .map_or(NONE, |a| put_str(&mut blob, a));
        rows.push((domain_hash(&key), [owner, r.source, r.line, dn, attrs]));
    }
    drop(owners);
    rows.sort_unstable_by_key(|row| row.0);
    let mut cold = Vec::with_capacity(total_records * COLD_REC);
    let mut cold_keys = Vec::with_capacity(total_records * 8);
    for (n, (h, fields)) in rows.iter().enumerate() {
        let ambiguous =
            (n > 0 && rows[n - 1].0 == *h) || rows.get(n + 1).is_some_and(|k| k.0 == *h);
        cold_keys.extend_from_slice(&h.to_le_bytes());
        let mut fields = *fields;
        if ambiguous {
            fields[1] |= COLD_AMBIGUOUS;
        }
        for v in fields {
            cold.extend_from_slice(&v.to_le_bytes());
        }
    }
    drop(rows);
    sec[Sec::ColdKeys as usize] = cold_keys;
    if blob.len() >= NONE as usize {
        return Err(BuildError::TooMany("bytes of diagnostic strings"));
    }
    sec[Sec::ColdRecords as usize] = cold;
    sec[Sec::ColdBlob as usize] = blob;
    sec[Sec::Excluded as usize] = super::explain::encode(std::mem::take(&mut input.excluded));

    let mut header = Header {
        generation: input.generation,
        created_unix: input.created_unix,
        records: total_records as u64,
        domains: domains.len() as u32,
        key_width,
        sections: [SectionRef::default(); SECTIONS],
    };
    let mut off = HEADER_LEN as u64;
    for name in Sec::ALL {
        let s = &sec[name as usize];
        header.sections[name as usize] = SectionRef {
            off,
            len: s.len() as u64,
            crc: crc32fast::hash(s),
        };
        off += s.len() as u64;
    }
    let mut file = header.encode();
    file.reserve(off as usize - HEADER_LEN);
    for name in Sec::ALL {
        file.extend_from_slice(&sec[name as usize]);
    }
    let cold_bytes: usize = Sec::ALL
        .iter()
        .filter(|s| s.is_cold())
        .map(|&s| sec[s as usize].len())
        .sum();
    let stats = BuildStats {
        records: total_records,
        domains: domains.len(),
        shards: shards.len(),
        fst_bytes,
        filter_bytes: sec[Sec::Filter as usize].len(),
        hot_bytes: file.len() - cold_bytes,
        cold_bytes,
        file_bytes: file.len(),
        sort_time,
        fst_time,
        filter_time,
        total_time: t0.elapsed(),
    };
    Ok((file, stats))
}

/// A shard build that panicked (on its own thread or this one), as an error.
fn shard_panicked<T>(_: Box<dyn std::any::Any + Send>) -> Result<T, BuildError> {
    Err(BuildError::Fst("shard thread panicked".into()))
}

/// The FST key of a record: the domain index (big-endian, `w` bytes), then the local part.
fn fst_key(key: &mut Vec<u8>, r: &RecordSpec, w: usize) {
    key.clear();
    key.extend_from_slice(&r.domain.to_be_bytes()[4 - w..]);
    key.extend_from_slice(r.local.as_bytes());
}

/// Records in key order (domain, then local part byte by byte). Sorted as small keys — the
/// domain, the local part's first eight bytes, the record's index — then moved into place
/// once: sorting the records themselves moved each ~100-byte record a dozen times and read
/// both local parts (elsewhere in memory) for every comparison.
fn sorted(records: Vec<RecordSpec>) -> Vec<RecordSpec> {
    let prefix = |local: &str| {
        let mut b = [0u8; 8];
        let n = local.len().min(8);
        b[..n].copy_from_slice(&local.as_bytes()[..n]);
        u64::from_be_bytes(b)
    };
    let mut keys: Vec<(u32, u64, u32)> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.domain, prefix(&r.local), i as u32))
        .collect();
    // Equal prefixes (zero-padded: a shorter local part sorts first, as in byte order) are
    // told apart by the whole local part.
    keys.sort_unstable_by(|a, b| {
        (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| {
            records[a.2 as usize]
                .local
                .cmp(&records[b.2 as usize].local)
        })
    });
    let mut slots: Vec<Option<RecordSpec>> = records.into_iter().map(Some).collect();
    keys.iter()
        .filter_map(|k| slots[k.2 as usize].take())
        .collect()
}

/// What a shard thread needs to make the filter keys of its addresses.
#[derive(Clone, Copy)]
struct FilterKeys<'a> {
    /// Each domain's name hash, by domain index.
    name_hashes: &'a [u64],
    /// Filter blocks in the snapshot.
    blocks: usize,
    keying: Keying,
}

fn build_shard(
    records: Vec<RecordSpec>,
    key_width: u32,
    filter_keys: FilterKeys<'_>,
) -> Result<(ShardOut, Duration), BuildError> {
    let t = Instant::now();
    let records = sorted(records);
    let sort_time = t.elapsed();

    let w = key_width as usize;
    // The fst crate's format, written by our builder (the same bytes, half the instructions).
    let mut builder = super::fstbuild::FstBuilder::new();
    let mut key: Vec<u8> = Vec::with_capacity(300);
    for r in &records {
        fst_key(&mut key, r, w);
        // Values repeat within a domain, so the FST stores them almost for free.
        let value = (u64::from(r.attrs) << Kind::BITS) | r.kind.code();
        builder.insert(&key, value).map_err(|e| match e {
            FstBuildError::Duplicate(got) => {
                BuildError::Duplicate(String::from_utf8_lossy(&got[w.min(got.len())..]).into())
            }
            FstBuildError::OutOfOrder(got) => BuildError::Fst(format!(
                "key {:?} out of order",
                String::from_utf8_lossy(&got)
            )),
        })?;
    }
    let mut fst = builder.finish();
    fst.shrink_to_fit();
    let FilterKeys {
        name_hashes,
        blocks,
        keying,
    } = filter_keys;
    let mut keys: Vec<Vec<u64>> = vec![Vec::new(); blocks];
    if blocks == 1 {
        keys[0].reserve_exact(records.len());
    }
    for r in &records {
        let h = name_hashes
            .get(r.domain as usize)
            .copied()
            .ok_or(BuildError::UnknownDomain(r.domain))?;
        let local = r.local.as_bytes();
        // Keyed by index (earlier builds), a shard's keys are its own block: the first one
        // here, moved to the shard's place when the blocks are gathered.
        let (block, key) = match keying {
            Keying::Name => (
                super::filter::block_of(h, blocks),
                super::filter::key_by_name(h, local),
            ),
            Keying::Index => (0, super::filter::key(r.domain, local)),
        };
        if let Some(k) = keys.get_mut(block) {
            k.push(key);
        }
    }
    Ok((ShardOut { fst, keys, records }, sort_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Records come out in the order of sorting them by (domain, local part) directly:
        /// local parts that share their first eight bytes or are a prefix of another, empty
        /// ones, multi-byte characters.
        #[test]
        fn sorted_is_key_order(
            keys in proptest::collection::vec((0u32..3, "(abcdefgh|abc|ä|z){0,4}"), 0..60)
        ) {
            let records: Vec<RecordSpec> =
                keys.iter().map(|(d, l)| RecordSpec::new(*d, l.as_str(), Kind::User)).collect();
            let mut expected: Vec<(u32, String)> = keys.clone();
            expected.sort();
            let got: Vec<(u32, String)> =
                sorted(records).into_iter().map(|r| (r.domain, r.local.into())).collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }
}
