//! Provider scale (issue 14 parts 2 and 3): a directory of `SEG_CUSTOMERS` customers with
//! `SEG_PER_CUSTOMER` addresses each (default 10,000 x 10,000 = 100M), built as one segment
//! per customer, one customer after another (only one customer's records in memory at a
//! time), written as a set, opened warm, and looked up; then one customer uploads a new MAP
//! file and the time from the file being complete to its new address being answered is
//! measured. The baseline in the same run: one snapshot of `SEG_BASELINE` addresses (default
//! 10M; 0 skips it), the lookup benchmark's directory, and the machine's floor beside them:
//! what one dependent random read costs in memory of the baseline's hot size and of the
//! set's (`common::dependent_read_ns`).
//!
//! Then the daemon's path: `SEG_LOADER_CUSTOMERS` MAP files (default 1,000 x
//! `SEG_PER_CUSTOMER` = 10M) as sources of a `Loader` in segmented mode (`segments = true`):
//! its full build, its restart, and one customer's new file to its answer through
//! `Loader::rebuild` (stamps, the group's read, merge, plan, build, write, publish).
//!
//! Last, this program runs itself again to open that set alone (every segment read) and
//! report the memory a fresh process holds for it.
//!
//! `SEG_CUSTOMERS=0` runs the daemon's path alone; `SEG_LOADER_BUDGETS` (default
//! `1MiB,1GiB`) are the `build_memory` budgets its full build is timed at, one after another.
//!
//! `cargo bench --bench segments` (documented figures: ~15 minutes and ~9 GB of memory at
//! the defaults); under `cargo test` it runs once on 20 x 200 as a smoke test.

#[path = "common/mod.rs"]
mod common;

/// The daemon's allocator (`src/main.rs`), so that the daemon's path is measured as it runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashSet;
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rcptgate::address::AddrBuf;
use rcptgate::directory::{Directory, LookupOptions, Snapshot, Verdict, segments};
use rcptgate::internal::{BuildInput, build};
use rcptgate::sources::{self, Format};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory since the last [`reset_peak`], in MiB.
/// A field of /proc/self/status, in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn peak_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Run `f` while sampling the process's anonymous memory (heap: what a build holds, as
/// opposed to mapped files, whose pages the kernel can drop) every 20 ms; its result and
/// the largest sample in MiB.
fn peak_anon<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0f64;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(status_mib("RssAnon:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(status_mib("RssAnon:"))
        });
        let out = f();
        stop.store(true, Ordering::Relaxed);
        (out, sampler.join().unwrap_or(0.0))
    })
}

/// CPU seconds (user and system) the process has used: a build's CPU next to its time says
/// whether both cores were busy.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

fn reset_peak() {
    // Linux: writing 5 to clear_refs resets the peak resident set size.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Customer `c`'s directory: the shared generator's, in domains of its own.
fn customer(c: usize, n: usize, seed: u64) -> (BuildInput, Vec<String>) {
    let syn = common::generate(n, seed);
    let mut input = syn.input;
    for d in &mut input.domains {
        d.name = format!("c{c}-{}", d.name);
        d.customer = input.strings.intern(&format!("customer{c}"));
    }
    let prefix = |a: &String| {
        let (l, d) = a.rsplit_once('@').unwrap_or((a, ""));
        format!("{l}@c{c}-{d}")
    };
    for x in &mut input.excluded {
        x.address = prefix(&x.address);
    }
    let addresses = syn.addresses.iter().map(prefix).collect();
    (input, addresses)
}

/// The same directory as a MAP file, as a directory-sync agent uploads it.
fn map_file(path: &Path, input: &BuildInput, c: usize, extra: &[String]) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("map file"));
    let s = |id: u32| input.strings.get(id).unwrap_or("");
    for d in &input.domains {
        writeln!(
            out,
            "{c}|{n}\tDOMAIN:\t{n}\troute={}\tprofile={}",
            s(d.route),
            s(d.profile),
            n = d.name
        )
        .expect("write");
    }
    for r in &input.records {
        let d = &input.domains[r.domain as usize].name;
        let a = format!("{}@{d}", r.local);
        writeln!(out, "{c}|{d}\tDIR:\t{a}").expect("write");
        if let Some(owner) = &r.owner {
            writeln!(out, "{c}|{d}\tMAP:\t{a}\t{owner}").expect("write");
        }
    }
    for a in extra {
        let d = a.rsplit_once('@').map_or("", |(_, d)| d);
        writeln!(out, "{c}|{d}\tDIR:\t{a}").expect("write");
    }
    // The end marker: the upload is complete.
    writeln!(out, "++++").expect("write");
    out.flush().expect("flush");
}

/// p50 and p99 of each lookup timed on its own, in µs (as the lookup benchmark times them).
fn time_each(dir: &Directory, queries: &[String]) -> (f64, f64) {
    let overhead = common::timer_overhead();
    let mut buf = AddrBuf::default();
    let (p50, p99) = common::time_each(queries, overhead, |q| {
        black_box(dir.verdict_in(q, &mut buf));
    });
    (p50 / 1000.0, p99 / 1000.0)
}

fn misses(hits: &[String]) -> Vec<String> {
    hits.iter()
        .enumerate()
        .map(|(i, a)| {
            let (l, d) = a.rsplit_once('@').unwrap_or((a, ""));
            format!("{l}.x{}@{d}", i % 1000)
        })
        .collect()
}

/// Lookups of `hits` and of invented addresses in the same domains, in a random order;
/// every hit must accept. The set's samples come customer by customer: timed in that order,
/// a run of lookups in one segment would find it in cache.
fn lookups(dir: &Directory, hits: &[String]) -> [(f64, f64); 2] {
    let mut buf = AddrBuf::default();
    for q in hits {
        assert!(
            matches!(dir.verdict_in(q, &mut buf), Verdict::Accept(_)),
            "{q} must be accepted"
        );
    }
    let hits = common::shuffled(hits, 0x5EED);
    [time_each(dir, &hits), time_each(dir, &misses(&hits))]
}

/// The daemon's path: a `Loader` in segmented mode over one MAP file per customer.
fn loader_phase(customers: usize, per: usize, root: &Path) {
    use rcptgate::sync::loader::{Loader, Outcome, system_clock};
    let dir = root.join("loader");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut sources = String::new();
    let mut file_bytes = 0;
    for c in 0..customers {
        let (input, _) = customer(c, per, 5000 + c as u64);
        let file = dir.join(format!("c{c}.map"));
        map_file(&file, &input, c, &[]);
        file_bytes += std::fs::metadata(&file).map_or(0, |m| m.len());
        sources.push_str(&format!(
            "[[source]]\nname = \"c{c}\"\nkind = \"map\"\npath = \"{}\"\n\n",
            file.display()
        ));
    }
    let config = |budget: &str| {
        let text = format!(
            "[directory]\nsnapshot = \"{}\"\nsegments = true\nbuild_memory = \"{budget}\"\n\n{sources}",
            dir.join("directory.snap").display()
        );
        rcptgate::Config::parse("bench.toml", &text).expect("config")
    };
    // The full build from nothing, one group at a time (the smallest budget: no two groups'
    // estimates fit in it) and then at the default budget (groups built on every core).
    let mut full = Vec::new();
    let budgets = std::env::var("SEG_LOADER_BUDGETS").unwrap_or_else(|_| "1MiB,1GiB".into());
    for budget in budgets.split(',') {
        for e in std::fs::read_dir(&dir).expect("dir").flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("directory.snap")
            {
                let p = e.path();
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
        reset_peak();
        let (t, cpu) = (Instant::now(), cpu_seconds());
        let directory = Arc::new(Directory::new(LookupOptions::default()));
        let mut loader = Loader::new(config(budget), directory, system_clock()).expect("loader");
        let (first, anon) = peak_anon(|| loader.rebuild().expect("full build"));
        assert!(matches!(first, Outcome::Published(_)));
        full.push((budget, t.elapsed(), cpu_seconds() - cpu, peak_mib(), anon));
    }
    let cfg = config(budgets.rsplit(',').next().unwrap_or("1GiB"));
    // A restart: the set and the sources' summaries, then a build that reads nothing.
    let t = Instant::now();
    let directory = Arc::new(Directory::new(LookupOptions::default()));
    let mut loader = Loader::new(cfg, directory.clone(), system_clock()).expect("loader");
    loader.open_persisted().expect("open");
    let restart = t.elapsed();
    let t = Instant::now();
    assert!(matches!(loader.rebuild(), Ok(Outcome::Unchanged(_))));
    let idle = t.elapsed();
    // In service: every segment read (hot sections, the `excluded` section), nothing else.
    let serving = status_mib("RssAnon:");
    let hot = directory.view().snapshot().map_or(0, |s| s.hot_bytes()) as f64 / (1u64 << 20) as f64;
    let c = customers / 2;
    let mut changes = Vec::new();
    let (input, addresses) = customer(c, per, 5000 + c as u64);
    let domain = addresses[0]
        .rsplit_once('@')
        .map_or("", |(_, d)| d)
        .to_owned();
    let mut hires = Vec::new();
    for round in 0..5u64 {
        // The customer's next upload: the same directory and 20 new hires.
        hires.extend((0..20).map(|i| format!("hire{round}-{i}@{domain}")));
        map_file(&dir.join(format!("c{c}.map")), &input, c, &hires);
        let probe = hires.last().expect("a hire").clone();
        let t = Instant::now();
        let out = loader.rebuild().expect("rebuild");
        assert!(matches!(out, Outcome::Published(_)), "{out:?}");
        let mut buf = AddrBuf::default();
        assert!(matches!(
            directory.verdict_in(&probe, &mut buf),
            Verdict::Accept(_)
        ));
        changes.push(t.elapsed());
    }
    changes.sort();
    // The set as a fresh process holds it: this program again, opening the set alone.
    let fresh = std::env::current_exe().ok().and_then(|exe| {
        let out = std::process::Command::new(exe)
            .env("SEG_OPEN_SET", dir.join("directory.snap"))
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let mut it = text.split_whitespace().map(str::parse::<f64>);
        Some((it.next()?.ok()?, it.next()?.ok()?))
    });
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "daemon path (Loader, segments = true): {customers} MAP files x {per} = {} addresses",
        customers * per
    );
    println!(
        "  files: {:.0} MiB ({:.1} bytes/address)",
        file_bytes as f64 / (1u64 << 20) as f64,
        file_bytes as f64 / (customers * per) as f64
    );
    for (budget, time, cpu, peak, anon) in &full {
        println!(
            "  full build (read, merge, plan, build, write), build_memory = {budget}: {:.1} s ({cpu:.1} s of CPU), peak RSS {peak:.0} MiB, of which anonymous (heap) {anon:.0} MiB",
            time.as_secs_f64()
        );
    }
    println!(
        "  restart: set and summaries opened in {:.0} ms; first build (stat of every file, nothing read) {:.0} ms",
        ms(restart),
        ms(idle)
    );
    println!(
        "  in service after the restart, every segment read: anonymous memory {serving:.0} MiB (hot sections {hot:.0} MiB)"
    );
    match fresh {
        Some((anon, hot)) => println!(
            "  a fresh process that opens the set (every segment read): anonymous memory {anon:.1} MiB (hot sections {hot:.1} MiB)"
        ),
        None => println!("  a fresh process that opens the set: not measured (the child failed)"),
    }
    println!(
        "  one customer's new file to its answer: median {:.0} ms, max {:.0} ms (goal <= 1000 ms)",
        ms(changes[changes.len() / 2]),
        ms(changes[changes.len() - 1])
    );
}

fn main() {
    // The child of the daemon path's last step: open the set at SEG_OPEN_SET (every segment
    // read) and print its anonymous memory and hot sections in MiB.
    if let Ok(path) = std::env::var("SEG_OPEN_SET") {
        let set = Snapshot::open(Path::new(&path)).expect("open the set");
        let hot = set.hot_bytes() as f64 / (1u64 << 20) as f64;
        println!("{} {hot}", status_mib("RssAnon:"));
        return;
    }
    // `cargo bench` passes --bench; `cargo test` runs it as a smoke test.
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let (customers, per, baseline) = if test_mode {
        (20, 200, 2000)
    } else {
        (
            env("SEG_CUSTOMERS", 10_000),
            env("SEG_PER_CUSTOMER", 10_000),
            env("SEG_BASELINE", 10_000_000),
        )
    };
    let samples = if test_mode { 2000 } else { 200_000 };
    let tmp = tempfile::tempdir_in(
        std::env::var("SEG_DIR").map_or_else(|_| std::env::temp_dir(), Into::into),
    )
    .expect("tempdir");
    let options = LookupOptions::default();
    let loader_customers = if test_mode {
        20
    } else {
        env("SEG_LOADER_CUSTOMERS", 1000)
    };
    // SEG_CUSTOMERS=0: the daemon's path alone.
    if customers == 0 {
        loader_phase(loader_customers, per, tmp.path());
        return;
    }

    // Baseline: one snapshot, opened from its file like the daemon does.
    let mut base = None;
    if baseline > 0 {
        let syn = common::generate(baseline, 42);
        let step = (syn.addresses.len() / samples).max(1);
        let hits: Vec<String> = syn.addresses.iter().step_by(step).cloned().collect();
        let (image, _) = build(syn.input).expect("baseline build");
        let file = tmp.path().join("baseline.snap");
        rcptgate::directory::write_atomic(&file, &image).expect("write baseline");
        drop(image);
        let dir = Directory::new(options.clone());
        let snap = Arc::new(Snapshot::open(&file).expect("open baseline"));
        let hot = snap.hot_bytes() as usize;
        dir.publish(snap);
        base = Some((baseline, lookups(&dir, &hits), hot));
        let _ = std::fs::remove_file(&file);
    }

    // The set: one segment per customer, built one after another on every core, each
    // written as soon as it is built.
    reset_peak();
    let index = tmp.path().join("directory.snap");
    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    // Thread time spent in the benchmark's own generator (not rcptgate's work).
    let generating = std::sync::atomic::AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let per_sample = (samples / customers).max(1);
    let mut built: Vec<(usize, segments::SegmentRef, Vec<String>, u64)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let c = next.fetch_add(1, Ordering::Relaxed);
                        if c >= customers {
                            return mine;
                        }
                        let t = Instant::now();
                        let (input, addresses) = customer(c, per, 1000 + c as u64);
                        generating.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        let (image, stats) = build(input).expect("segment build");
                        let r = segments::write_segment(&index, &image).expect("write");
                        let step = (addresses.len() / per_sample).max(1);
                        let sample = addresses.iter().step_by(step).cloned().collect();
                        mine.push((c, r, sample, stats.records as u64));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    built.sort_by_key(|b| b.0);
    let refs: Vec<segments::SegmentRef> = built.iter().map(|b| b.1.clone()).collect();
    segments::write_index(&index, 1, 0, &refs).expect("index");
    let build_time = t0.elapsed();
    let build_peak = peak_mib();
    let addresses: u64 = built.iter().map(|b| b.3).sum();
    let hits: Vec<String> = built.iter().flat_map(|b| b.2.iter().cloned()).collect();
    drop(built);

    // Warm start as the daemon does it: the index alone, each segment read on first use;
    // until the first answer (of a customer in the middle). Then every segment read now.
    let probe = &hits[hits.len() / 2];
    let mut lazy_starts = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let s = Arc::new(Snapshot::open_lazy(&index).expect("open the set's index"));
        let d = Directory::new(options.clone());
        d.publish(s);
        let mut buf = AddrBuf::default();
        assert!(matches!(d.verdict_in(probe, &mut buf), Verdict::Accept(_)));
        lazy_starts.push(t.elapsed());
    }
    lazy_starts.sort();
    let mut starts = Vec::new();
    let mut set = None;
    for _ in 0..3 {
        let t = Instant::now();
        let s = Snapshot::open(&index).expect("open the set");
        starts.push(t.elapsed());
        set = Some(s);
    }
    starts.sort();
    let set = Arc::new(set.expect("opened"));
    let hot = set.hot_bytes() as f64 / addresses as f64;
    let dir = Directory::new(options.clone());
    dir.publish(set.clone());
    let seg = lookups(&dir, &hits);

    // One customer uploads a new file: parse, merge, build its segment, write it and a new
    // index, publish a set that shares every other segment; until its new address answers.
    let c = customers / 2;
    let mut changes = Vec::new();
    let mut rebuilt = 0;
    let mut current = set.clone();
    for round in 0..5u64 {
        let (input, addresses) = customer(c, per, 77_000 + round);
        let file = tmp.path().join(format!("customer{c}.map"));
        map_file(&file, &input, c, &[]);
        drop(input);
        let probe = addresses.last().expect("an address").clone();
        let t = Instant::now();
        let src = sources::load(Format::Map, &file).expect("load the map file");
        let mut merged = rcptgate::sync::merge(&[src], 1);
        let (image, _) = merged.build().expect("build");
        let r = segments::write_segment(&index, &image).expect("write segment");
        let part = Arc::new(Snapshot::from_bytes(image).expect("segment"));
        let first_domain = part.domain_info(0).expect("a domain").name.to_owned();
        let at = current
            .segment_of(&first_domain)
            .expect("the customer's segment");
        let generation = current.generation() + 1;
        let next_set = Arc::new(
            current
                .with_segments(&HashSet::from([at]), vec![part], generation, 0)
                .expect("a set sharing the other segments"),
        );
        let mut all = refs.clone();
        rebuilt = r.written;
        all[c] = r;
        segments::write_index(&index, generation, 0, &all).expect("index");
        dir.publish(next_set.clone());
        let mut buf = AddrBuf::default();
        assert!(matches!(
            dir.verdict_in(&probe, &mut buf),
            Verdict::Accept(_)
        ));
        changes.push(t.elapsed());
        current = next_set;
    }
    changes.sort();
    let median = |v: &[Duration]| v[v.len() / 2];

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("segments: {customers} customers x {per} = {addresses} addresses, {threads} threads");
    println!(
        "  full build, one customer at a time: {:.1} s (goal <= 180 s), of which generating the input {:.1} s of thread time over {threads} threads; peak RSS {build_peak:.0} MiB",
        build_time.as_secs_f64(),
        generating.load(Ordering::Relaxed) as f64 / 1e9
    );
    println!(
        "  hot bytes per address: {hot:.2} (goal: hot total <= 1.2 GB: {:.2} GB)",
        set.hot_bytes() as f64 / 1e9
    );
    println!(
        "  warm start to the first answer (index, segments read on first use; page cache): median {:.0} ms (goal <= 200 ms); every segment read: {:.0} ms",
        ms(median(&lazy_starts)),
        ms(median(&starts))
    );
    println!(
        "  one customer's new file ({per} addresses) to its answer: median {:.0} ms, max {:.0} ms (goal <= 1000 ms); segment rebuilt {} KiB of {:.1} GiB",
        ms(median(&changes)),
        ms(changes[changes.len() - 1]),
        rebuilt / 1024,
        set.file_bytes() as f64 / (1u64 << 30) as f64
    );
    println!(
        "  hit p50/p99 {:.2}/{:.2} µs, miss p50/p99 {:.2}/{:.2} µs",
        seg[0].0, seg[0].1, seg[1].0, seg[1].1
    );
    if let Some((n, b, base_hot)) = base {
        println!(
            "  baseline, one snapshot of {n}: hit p50/p99 {:.2}/{:.2} µs, miss p50/p99 {:.2}/{:.2} µs (goal: set p50 within 1.3x: hit {:.2}x, miss {:.2}x)",
            b[0].0,
            b[0].1,
            b[1].0,
            b[1].1,
            seg[0].0 / b[0].0,
            seg[1].0 / b[1].0
        );
        // What this machine charges for one read of a chain in memory of each size: a
        // snapshot's miss waits for one (its filter and its domain's line, side by side), a
        // set's for the index slot and the segment's handle before those.
        let hops = if test_mode { 10_000 } else { 5_000_000 };
        let set_hot = set.hot_bytes() as usize;
        println!(
            "  memory floor, one dependent random read (huge pages): {:.0} ns in {:.1} MB (the baseline's hot data), {:.0} ns in {:.1} MB (the set's)",
            common::dependent_read_ns(base_hot, hops),
            base_hot as f64 / 1e6,
            common::dependent_read_ns(set_hot, hops),
            set_hot as f64 / 1e6
        );
    }
    drop(dir);
    drop(current);
    drop(set);
    if loader_customers > 0 {
        loader_phase(loader_customers, per, tmp.path());
    }
}
