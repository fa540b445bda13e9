//! DANE figures on the loopback DNSSEC testbed (NSD serving a fake signed root built at
//! start; needs root, `nsd bind9-utils openssl`, and for the comparison `pip install
//! postfix-mta-sts-resolver uvloop`):
//!
//! 1. a cached decision in-process (`Dane::cached`), ns per call;
//! 2. a cold decision (a fresh engine, nothing cached, every DNSKEY fetched and validated):
//!    median and p99;
//! 3. memory for 10k cached domains (each a signed MX with a DANE host), live heap and RSS;
//! 4. `tls_policy` socketmap requests/s at 1, 8 and 64 connections, `rcptgate serve` against
//!    `postfix-mta-sts-resolver` (the established Postfix TLS-policy socketmap daemon) on the
//!    same loopback with the same client, both answering from their cache, with server CPU
//!    per request from /proc.
//!
//! `cargo bench --features dane-tests --bench dane` (env `DANE_SECS` per load point, default 5).
//! Under `cargo test` it runs small (200 domains, 1 s per point) as a smoke test that checks
//! every answer.

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "../tests/support/nsd.rs"]
mod nsd;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcptgate::dane::Dane;

/// Counts live heap bytes, to tell what the decision cache holds.
struct Counting;
static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        // SAFETY: `p` was allocated by `alloc` above with `l`.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or_default()
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("DANE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 5 } else { 1 });
    let domains: usize = if bench { 10_000 } else { 200 };
    let (cold_runs, calls) = if bench {
        (200, 1_000_000u32)
    } else {
        (5, 10_000)
    };
    let extra: Vec<String> = (0..domains)
        .map(|i| format!("d{i}              IN MX  10 mx1"))
        .collect();
    eprintln!("building and signing the testbed with {domains} extra domains...");
    let tb = nsd::Testbed::start(&extra);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // 2. Cold decisions: a new engine each time.
    let mut cold = Vec::new();
    for _ in 0..cold_runs {
        let dane = Dane::new(tb.dane_config()).expect("engine");
        let t = Instant::now();
        let a = rt.block_on(dane.policy(b"example.test"));
        cold.push(t.elapsed());
        assert_eq!(
            a.rendered(),
            &rcptgate::dane::Rendered::Ok("dane-only".into())
        );
    }
    cold.sort();
    println!(
        "cold decision example.test (MX, 2 hosts x A/AAAA/TLSA, 30 TLSA over TCP, full chain): median {:.2} ms, p99 {:.2} ms ({} runs)",
        percentile(&cold, 0.5).as_secs_f64() * 1e3,
        percentile(&cold, 0.99).as_secs_f64() * 1e3,
        cold.len()
    );

    // 1. Cached decision in-process.
    let dane = Dane::new(tb.dane_config()).expect("engine");
    rt.block_on(dane.policy(b"example.test"));
    let _guard = rt.enter();
    let mut per_call = Vec::new();
    for _ in 0..7 {
        let n = calls;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(dane.cached(std::hint::black_box(b"example.test")));
        }
        per_call.push(t.elapsed() / n);
    }
    per_call.sort();
    println!(
        "cached decision in-process (Dane::cached, key parsed each call): median {} ns (7 x {calls} calls)",
        percentile(&per_call, 0.5).as_nanos()
    );

    // 3. Memory for 10k cached domains.
    let heap0 = LIVE.load(Ordering::Relaxed);
    let rss0 = rss_kib();
    let dane10k = Dane::new(tb.dane_config()).expect("engine");
    let t = Instant::now();
    rt.block_on(async {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..domains {
            let d = dane10k.clone();
            let permit = sem.clone().acquire_owned().await.expect("permit");
            set.spawn(async move {
                let key = format!("d{i}.example.test");
                let a = d.policy(key.as_bytes()).await;
                drop(permit);
                a.rendered().clone()
            });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(
                r.expect("join"),
                rcptgate::dane::Rendered::Ok("dane-only".into())
            );
        }
    });
    let took = t.elapsed();
    let heap = LIVE.load(Ordering::Relaxed) - heap0;
    let rss = rss_kib().saturating_sub(rss0);
    println!(
        "{domains} domains decided in {:.2} s ({:.0}/s, 32 at a time); cache entries {}; live heap +{:.1} MiB ({:.0} B/domain, resolver's record cache included), RSS +{:.1} MiB",
        took.as_secs_f64(),
        domains as f64 / took.as_secs_f64(),
        dane10k.cached_entries(),
        heap as f64 / 1048576.0,
        heap as f64 / domains as f64,
        rss as f64 / 1024.0
    );
    drop(dane10k);

    // 4. Socketmap throughput: rcptgate serve vs postfix-mta-sts-resolver.
    let dir = tempfile::tempdir().expect("tempdir");
    let map = dir.path().join("dir.map");
    std::fs::write(
        &map,
        "1|contoso.com\tDOMAIN:\tcontoso.com\n1|contoso.com\tDIR:\ta@contoso.com\n++++\n",
    )
    .expect("map");
    let cfg = dir.path().join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{}\"\n\n[[source]]\nname = \"d\"\nkind = \"map\"\npath = \"{}\"\n\n\
[socketmap]\nlisten = [\"127.0.0.1:0\"]\n\n[log]\nlevel = \"warn\"\n\n\
[dane]\nnameservers = [\"{}\"]\ntrust_anchor = \"{}\"\n",
            dir.path().join("snap").display(),
            map.display(),
            tb.addr(),
            tb.anchor().display()
        ),
    )
    .expect("config");
    let d = daemon::Daemon::start(&cfg);
    d.wait_generation(1);
    let rcptgate_addr = d.listener("socketmap");
    let rcptgate_pid = d.child.id();
    let sts = start_mta_sts(dir.path());
    let mut servers: Vec<(&str, String, u32, &str)> =
        vec![("rcptgate", rcptgate_addr, rcptgate_pid, "OK dane-only")];
    if let Some((addr, pid)) = &sts {
        servers.push((
            "postfix-mta-sts-resolver",
            addr.clone(),
            *pid,
            "OK secure match=",
        ));
    } else {
        println!(
            "postfix-mta-sts-resolver not available (pip install postfix-mta-sts-resolver uvloop): comparison skipped"
        );
    }
    println!("tls_policy socketmap, cached answer for example.test, {secs} s per point:");
    for conns in [1usize, 8, 64] {
        for (name, addr, pid, want) in &servers {
            let cpu0 = process_cpu(*pid);
            let (n, el) = rt.block_on(load(addr, conns, Duration::from_secs(secs), want));
            let cpu = process_cpu(*pid) - cpu0;
            println!(
                "  {conns:>2} conn  {name:<26} {:>9.0} req/s   server CPU {:>6.1} µs/req",
                n as f64 / el,
                cpu / n as f64 * 1e6
            );
        }
    }
    if let Some((_, pid)) = sts {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
}

/// `conns` connections each asking `tls_policy example.test` in a loop for `dur`; every
/// answer checked. (requests, seconds).
async fn load(addr: &str, conns: usize, dur: Duration, want: &str) -> (u64, f64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let count = std::sync::Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (addr, count, want) = (addr.to_owned(), count.clone(), want.to_owned());
        set.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            s.set_nodelay(true).ok();
            let mut req = Vec::new();
            rcptgate::proto::netstring::encode(b"tls_policy example.test", &mut req);
            let mut buf = Vec::with_capacity(4096);
            while start.elapsed() < dur {
                s.write_all(&req).await.expect("write");
                buf.clear();
                loop {
                    if let Ok(rcptgate::proto::netstring::Decoded::Frame { payload, .. }) =
                        rcptgate::proto::netstring::decode(&buf, 100_000)
                    {
                        assert!(
                            payload.starts_with(want.as_bytes()),
                            "{}",
                            String::from_utf8_lossy(payload)
                        );
                        break;
                    }
                    let mut chunk = [0u8; 2048];
                    let n = s.read(&mut chunk).await.expect("read");
                    assert!(n > 0, "closed");
                    buf.extend_from_slice(&chunk[..n]);
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while set.join_next().await.is_some() {}
    (count.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

/// postfix-mta-sts-resolver's daemon with its in-memory cache holding an enforced policy for
/// example.test (so every request is a cache hit, as for rcptgate); (address, pid).
fn start_mta_sts(dir: &std::path::Path) -> Option<(String, u32)> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import postfix_mta_sts_resolver"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return None;
    }
    let port = nsd::free_port();
    let cfg = dir.join("mta-sts.yml");
    std::fs::write(
        &cfg,
        format!("host: 127.0.0.1\nport: {port}\nreuse_port: true\ncache_grace: 86400\ncache:\n  type: internal\n  options:\n    cache_size: 10000\ndefault_zone:\n  strict_testing: false\n  timeout: 4\n"),
    )
    .ok()?;
    let wrapper = dir.join("mta_sts_cached.py");
    std::fs::write(
        &wrapper,
        r#"import sys, time
from postfix_mta_sts_resolver import utils, internal_cache, daemon
from postfix_mta_sts_resolver.base_cache import CacheEntry
def create_cache(kind, options):
    c = internal_cache.InternalLRUCache(**options)
    c._cache["example.test"] = CacheEntry(time.time(), "bench", {"mode": "enforce", "max_age": 86400, "mx": ["mx1.example.test", "mx2.example.test"]})
    return c
utils.create_cache = create_cache
sys.argv = ["mta-sts-daemon", "-c", sys.argv[1], "-v", "warn"]
sys.exit(daemon.main())
"#,
    )
    .ok()?;
    let child = std::process::Command::new("python3")
        .arg(&wrapper)
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((addr, child.id()))
}
