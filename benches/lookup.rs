//! Snapshot build, size, warm start and lookup latency, against a `HashMap<Box<str>, u32>`
//! baseline on the same keys through the same normalization and `ArcSwap` load.
//!
//! `cargo bench --bench lookup` runs 1M and 10M addresses (override with
//! `RCPTGATE_BENCH_SIZES=1000000`); under `cargo test` it runs once on 10k as a smoke test.
//! Besides criterion's figures it prints a report: bytes per address, build times, warm start
//! and per-lookup p50/p99 (each lookup timed individually, timer overhead subtracted).

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, Throughput};

use rcptgate::address::{self, AddrBuf};
use rcptgate::directory::{self, Directory, LookupOptions, Snapshot, Verdict};

use common::{generate, hits, misses};

/// The baseline: same parse, same fold, same subaddress rule, a hash map instead of the FST.
struct HashBaseline {
    map: ArcSwap<HashMap<Box<str>, u32>>,
}

impl HashBaseline {
    fn lookup(&self, rcpt: &str, buf: &mut AddrBuf) -> Option<u32> {
        let map = self.map.load();
        let a = address::parse(rcpt, buf).ok()?;
        let mut key = [0u8; 400];
        let n = address::fold_local_into_slice(a.local, false, &mut key)?;
        key[n] = b'@';
        key[n + 1..n + 1 + a.domain.len()].copy_from_slice(a.domain.as_bytes());
        let full = std::str::from_utf8(&key[..n + 1 + a.domain.len()]).ok()?;
        if let Some(v) = map.get(full) {
            return Some(*v);
        }
        let p = address::subaddress_split(&key[..n], b"+")?;
        let mut short = [0u8; 400];
        short[..p].copy_from_slice(&key[..p]);
        short[p] = b'@';
        short[p + 1..p + 1 + a.domain.len()].copy_from_slice(a.domain.as_bytes());
        let s = std::str::from_utf8(&short[..p + 1 + a.domain.len()]).ok()?;
        map.get(s).copied()
    }

    /// Estimated heap bytes: table slots (16-byte fat pointer + 4-byte value, padded to 24,
    /// plus one control byte) and each key's allocation (glibc: 8 bytes overhead, 16-byte
    /// granularity, 32 minimum).
    fn bytes(&self) -> usize {
        let map = self.map.load();
        let slots = map.capacity() * 25;
        let keys: usize = map
            .keys()
            .map(|k| (k.len() + 8).div_ceil(16).max(2) * 16)
            .sum();
        slots + keys
    }
}

/// Cycle through `qs`, handing each query to the measured routine from a hot buffer.
struct Cycle<'q> {
    qs: &'q [String],
    i: usize,
}

impl Cycle<'_> {
    fn next_into(&mut self, buf: &mut String) {
        self.i = (self.i + 1) % self.qs.len();
        buf.clear();
        buf.push_str(&self.qs[self.i]);
    }
}

fn human(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{}M", n / 1_000_000)
    } else {
        format!("{}k", n / 1000)
    }
}

fn run_size(c: &mut Criterion, n: usize, test_mode: bool) {
    let label = human(n);
    let t = Instant::now();
    let syn = generate(n, 0x5EED ^ n as u64);
    let gen_time = t.elapsed();
    let addresses = syn.addresses.clone();

    // Build (sort + FST + sections), timed once here; criterion repeats it for sizes <= 1M.
    let (bytes, stats) = rcptgate::internal::build(syn.input).expect("build");
    let dir_tmp = tempfile::tempdir().expect("tempdir");
    let path = dir_tmp.path().join("snapshot.bin");
    directory::write_atomic(&path, &bytes).expect("persist");
    drop(bytes);

    // Warm start: open (hot sections read into owned memory, the FST into huge pages, hot and
    // FST checksums, table validation) to first answer.
    let probe = addresses[addresses.len() / 2].clone();
    let mut starts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let snap = Snapshot::open(&path).expect("open");
        let dir = Directory::new(LookupOptions::default());
        dir.publish(Arc::new(snap));
        assert!(matches!(dir.verdict(&probe), Verdict::Accept(_)));
        starts.push(t.elapsed());
    }
    starts.sort();
    let warm_start = starts[starts.len() / 2];

    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(Snapshot::open_plain(&path).expect("open")));
    let huge = Directory::new(LookupOptions::default());
    huge.publish(Arc::new(Snapshot::open(&path).expect("open")));

    let t = Instant::now();
    let mut map: HashMap<Box<str>, u32> = HashMap::with_capacity(addresses.len());
    for (i, a) in addresses.iter().enumerate() {
        map.insert(a.as_str().into(), i as u32);
    }
    let hash_build = t.elapsed();
    let base = HashBaseline {
        map: ArcSwap::from_pointee(map),
    };
    drop(addresses);

    let nq = if test_mode { 1000 } else { 1_000_000 };
    let all = generate_view(&dir);
    let q_hit = hits(&all, nq, 1, false);
    let q_sub = hits(&all, nq, 2, true);
    let q_miss = misses(&all, nq, 3);
    drop(all);

    // Sanity: both structures agree on every query.
    let mut buf = AddrBuf::default();
    for q in q_hit.iter().chain(&q_sub).chain(&q_miss).take(10_000) {
        let fst = matches!(dir.verdict(q), Verdict::Accept(_));
        let hash = base.lookup(q, &mut buf).is_some();
        assert_eq!(fst, hash, "disagreement on {q}");
    }

    let overhead = common::timer_overhead();
    let mut report = Vec::new();
    for (name, qs) in [
        ("hit", &q_hit),
        ("subaddress hit", &q_sub),
        ("miss", &q_miss),
    ] {
        let f = common::time_each(qs, overhead, |q| {
            black_box(dir.verdict(black_box(q)));
        });
        let hp = common::time_each(qs, overhead, |q| {
            black_box(huge.verdict(black_box(q)));
        });
        let mut b2 = AddrBuf::default();
        let h = common::time_each(qs, overhead, |q| {
            black_box(base.lookup(black_box(q), &mut b2));
        });
        report.push((name, f, hp, h));
    }

    let nn = stats.records as f64;
    println!(
        "\n=== rcptgate snapshot, {label} addresses, {} domains ===",
        stats.domains
    );
    println!(
        "generate {:.1} s (not part of the build)",
        gen_time.as_secs_f64()
    );
    println!(
        "build: {:.2} s total ({} shard(s); sort {:.2} s, fst {:.2} s, miss filter {:.2} s) | HashMap inserts {:.2} s",
        stats.total_time.as_secs_f64(),
        stats.shards,
        stats.sort_time.as_secs_f64(),
        stats.fst_time.as_secs_f64(),
        stats.filter_time.as_secs_f64(),
        hash_build.as_secs_f64()
    );
    println!(
        "bytes/address: fst {:.2}, miss filter {:.2}, hot {:.2} (fst + filter + domains + attributes; goal <= 11), cold {:.2} | HashMap ~{:.1} (estimate)",
        stats.fst_bytes as f64 / nn,
        stats.filter_bytes as f64 / nn,
        stats.hot_bytes as f64 / nn,
        stats.cold_bytes as f64 / nn,
        base.bytes() as f64 / nn
    );
    println!(
        "warm start (open + first answer, file in page cache): {:.2} ms",
        warm_start.as_secs_f64() * 1e3
    );
    println!(
        "per-lookup latency through Directory::verdict (normalize + ArcSwap + lookup), timer overhead {overhead:.0} ns subtracted:"
    );
    for (name, f, hp, h) in &report {
        // The goals: a miss at most the hash map's, a hit at most 0.8x (p50, huge pages).
        let goal = match *name {
            "miss" => format!(
                "goal <= 1.00: {}",
                if hp.0 <= h.0 { "met" } else { "NOT met" }
            ),
            "hit" => format!(
                "goal <= 0.80: {}",
                if hp.0 <= 0.8 * h.0 { "met" } else { "NOT met" }
            ),
            _ => String::new(),
        };
        println!(
            "  {name:<15} fst (plain) p50 {:>5.0} p99 {:>5.0} | fst (huge pages) p50 {:>5.0} p99 {:>5.0} | HashMap p50 {:>5.0} p99 {:>5.0} ns | fst/HashMap p50 {:.2} / {:.2} {goal}",
            f.0,
            f.1,
            hp.0,
            hp.1,
            h.0,
            h.1,
            f.0 / h.0.max(1.0),
            hp.0 / h.0.max(1.0)
        );
    }

    // `explain` of a miss: the cold sections (checked on first use), the excluded list, the
    // closest addresses of the domain by the Levenshtein automaton.
    let snap = Snapshot::open(&path).expect("open");
    let opts = LookupOptions::default();
    let t = Instant::now();
    let _ = snap.explain(&q_miss[0], &opts);
    let first = t.elapsed();
    let mut ex: Vec<Duration> = q_miss
        .iter()
        .skip(1)
        .take(if test_mode { 20 } else { 200 })
        .map(|q| {
            let t = Instant::now();
            black_box(snap.explain(black_box(q), &opts));
            t.elapsed()
        })
        .collect();
    ex.sort();
    println!(
        "explain of a miss: first {:.1} ms (the excluded section read and checked), then p50 {:.1} ms, p99 {:.1} ms | excluded section {} bytes = {:.3} bytes/address ({} exclusions counted)",
        first.as_secs_f64() * 1e3,
        ex[ex.len() / 2].as_secs_f64() * 1e3,
        ex[(ex.len() - 1) * 99 / 100].as_secs_f64() * 1e3,
        snap.section_bytes(rcptgate::directory::Sec::Excluded),
        snap.section_bytes(rcptgate::directory::Sec::Excluded) as f64 / nn,
        snap.excluded_counts().iter().map(|(_, n)| n).sum::<u64>()
    );

    // Criterion: mean time per lookup over the random query sets.
    let mut g = c.benchmark_group(format!("lookup/{label}"));
    g.throughput(Throughput::Elements(1));
    if !test_mode {
        g.measurement_time(Duration::from_secs(5));
    }
    for (name, qs) in [("hit", &q_hit), ("subaddress", &q_sub), ("miss", &q_miss)] {
        let mut cy = Cycle { qs, i: 0 };
        g.bench_function(BenchmarkId::new("fst-huge-pages", name), |b| {
            let mut cy = Cycle { qs, i: 0 };
            b.iter_batched_ref(
                || {
                    let mut s = String::with_capacity(128);
                    cy.next_into(&mut s);
                    s
                },
                |q| black_box(huge.verdict(q)),
                criterion::BatchSize::SmallInput,
            )
        });
        g.bench_function(BenchmarkId::new("fst", name), |b| {
            b.iter_batched_ref(
                || {
                    let mut s = String::with_capacity(128);
                    cy.next_into(&mut s);
                    s
                },
                |q| black_box(dir.verdict(q)),
                criterion::BatchSize::SmallInput,
            )
        });
        let mut cy = Cycle { qs, i: 0 };
        let mut b2 = AddrBuf::default();
        g.bench_function(BenchmarkId::new("hashmap", name), |b| {
            b.iter_batched_ref(
                || {
                    let mut s = String::with_capacity(128);
                    cy.next_into(&mut s);
                    s
                },
                |q| black_box(base.lookup(q, &mut b2)),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    let mut g = c.benchmark_group(format!("warm_start/{label}"));
    g.bench_function("open+first_lookup", |b| {
        b.iter(|| {
            let snap = Snapshot::open(&path).expect("open");
            let d = Directory::new(LookupOptions::default());
            d.publish(Arc::new(snap));
            black_box(d.verdict(&probe))
        })
    });
    g.finish();

    if n <= 1_000_000 {
        let mut g = c.benchmark_group(format!("build/{label}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function("sort+fst+sections", |b| {
            b.iter_batched(
                || generate(n, 0x5EED ^ n as u64).input,
                |input| black_box(rcptgate::internal::build(input).expect("build")),
                criterion::BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

/// Re-derive the generated address list from the snapshot (queries must come from the
/// directory actually built, and we dropped the generator's copy to save memory).
fn generate_view(dir: &Directory) -> common::Synthetic {
    let view = dir.view();
    let mut addresses = Vec::new();
    if let Some(s) = view.snapshot() {
        s.for_each_address(|a, _| addresses.push(a.to_owned()));
    }
    common::Synthetic {
        input: Default::default(),
        addresses,
    }
}

fn main() {
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = match std::env::var("RCPTGATE_BENCH_SIZES") {
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) if test_mode => vec![10_000],
        Err(_) => vec![1_000_000, 10_000_000],
    };
    let mut c = Criterion::default().configure_from_args();
    if test_mode {
        c = c
            .sample_size(10)
            .warm_up_time(Duration::from_millis(10))
            .measurement_time(Duration::from_millis(50));
    }
    for n in sizes {
        run_size(&mut c, n, test_mode);
    }
    c.final_summary();
}
