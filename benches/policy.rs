//! The policy service over loopback TCP and over a unix socket: requests per second and
//! latency p50/p99 with 1, 8 and 64 concurrent connections, and the server's CPU time per
//! request (each server thread's time on a CPU, from /proc; on loopback TCP that includes the
//! kernel's receive processing of each reply, done in the sender's context). Clients and
//! server share this 2-core machine, so the rates are a floor; CPU per request is the
//! server's alone.
//!
//! Every level also runs against two floors on the same transport: a tokio server of one
//! worker and a blocking thread per connection, both writing a fixed reply without reading the
//! request. Their CPU per request is what the runtime and the kernel cost any server here;
//! rcptgate's own share is its figure minus the tokio floor's.
//!
//! `cargo bench --bench policy` (a directory of 100k synthetic addresses, 3 s per level and
//! server; `POLICY_SECS` changes it, `POLICY_ONLY=unix:8` runs one level); under `cargo test`
//! it runs briefly as a smoke test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use rcptgate::directory::{Directory, LookupOptions, Snapshot};
use rcptgate::proto::policy::Texts;
use rcptgate::server::{Context, Limits, Protocol, serve};

const SERVER_THREAD: &str = "rcptgate-srv";
/// The floors' threads: a server that only reads a request and writes a fixed reply.
const FLOOR_TOKIO_THREAD: &str = "floor-tokio";
const FLOOR_BLOCKING_THREAD: &str = "floor-blk";

/// Nanoseconds on a CPU of one thread, from its `schedstat` (Linux /proc).
fn thread_cpu_ns(task: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(task.join("schedstat")).ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// CPU nanoseconds used so far by the threads named `name`. The blocking floor's threads
/// each add their own time to `FLOOR_EXITED_NS` as they end (the caller waits for that), so
/// they are not read here: a thread on its way out would be counted twice or not at all.
fn cpu_ns(name: &str) -> Option<u64> {
    if name == FLOOR_BLOCKING_THREAD {
        return Some(FLOOR_EXITED_NS.load(Ordering::SeqCst));
    }
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        total += thread_cpu_ns(&path)?;
    }
    Some(total)
}

/// CPU time of the blocking floor's connection threads that have ended.
static FLOOR_EXITED_NS: AtomicU64 = AtomicU64::new(0);
/// Blocking floor connection threads still running.
static FLOOR_LIVE: AtomicUsize = AtomicUsize::new(0);

/// The end of the first request in `buf` (a policy request ends with an empty line).
fn request_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\n\n").map(|i| i + 2)
}

/// The floor's answer to every request.
const FLOOR_REPLY: &[u8] = b"action=DUNNO\n\n";

/// A tokio server that answers every request with `FLOOR_REPLY`: the runtime and the kernel,
/// without decoding, lookup, metrics or timeouts.
async fn floor_conn<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.reserve(4096);
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while let Some(end) = request_end(&buf) {
            if s.write_all(FLOOR_REPLY).await.is_err() {
                return;
            }
            buf.drain(..end);
        }
    }
}

/// A blocking thread per connection answering `FLOOR_REPLY`: the kernel's part alone (one
/// read and one write per request, no event loop).
fn floor_blocking_conn<S: std::io::Read + std::io::Write>(mut s: S) {
    let mut buf = vec![0u8; 8192];
    let mut have = 0;
    loop {
        if have == buf.len() {
            return;
        }
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
        while let Some(end) = request_end(&buf[..have]) {
            if s.write_all(FLOOR_REPLY).is_err() {
                have = 0;
                break;
            }
            buf.copy_within(end..have, 0);
            have -= end;
        }
    }
    if let Some(ns) = thread_cpu_ns(std::path::Path::new("/proc/thread-self")) {
        FLOOR_EXITED_NS.fetch_add(ns, Ordering::SeqCst);
    }
    FLOOR_LIVE.fetch_sub(1, Ordering::SeqCst);
}

/// Spawn a blocking floor thread for each connection `accept` gives.
fn spawn_blocking_floor<S, F>(accept: F)
where
    S: std::io::Read + std::io::Write + Send + 'static,
    F: Fn() -> std::io::Result<S> + Send + 'static,
{
    std::thread::spawn(move || {
        while let Ok(s) = accept() {
            FLOOR_LIVE.fetch_add(1, Ordering::SeqCst);
            std::thread::Builder::new()
                .name(FLOOR_BLOCKING_THREAD.into())
                .spawn(move || floor_blocking_conn(s))
                .expect("floor thread");
        }
    });
}

/// A client connection, TCP or unix.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One request at a time until `deadline`, as Postfix's smtpd does: the latency of each.
async fn client(
    mut s: Box<dyn Stream>,
    requests: &[Vec<u8>],
    first: usize,
    deadline: Instant,
) -> Vec<u64> {
    let mut lat = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut i = first;
    while Instant::now() < deadline {
        let req = &requests[i % requests.len()];
        i += 1;
        let t = Instant::now();
        s.write_all(req).await.expect("write");
        let mut got = 0;
        loop {
            let n = s.read(&mut buf[got..]).await.expect("read");
            assert!(n > 0, "server closed");
            got += n;
            if buf[..got].ends_with(b"\n\n") {
                break;
            }
        }
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)] as f64 / 1000.0
}

fn main() {
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let (n, secs) = if test_mode {
        (10_000, 0.2)
    } else {
        let secs = std::env::var("POLICY_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3.0);
        (100_000, secs)
    };
    let syn = common::generate(n, 42);
    let hits = common::hits(&syn, 10_000, 7, false);
    let misses = common::misses(&syn, 10_000, 8);
    let (bytes, _) = rcptgate::internal::build(syn.input).expect("build");
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(Snapshot::from_bytes(bytes).expect("load")));

    let workers: usize = std::env::var("SERVER_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()
        .expect("server runtime");
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Context {
        directory: Arc::new(dir),
        texts: Texts::default(),
        limits: Limits::default(),
        metrics: Default::default(),
        milter: Default::default(),
        dane: None,
    });
    server_rt.spawn(serve(listener, Protocol::Policy, ctx.clone(), rx.clone()));
    // The same service on a unix socket (Postfix: `check_policy_service unix:…`).
    let sock_dir = tempfile::tempdir().expect("tempdir");
    let sock = sock_dir.path().join("policy.sock");
    let unix = {
        let _guard = server_rt.enter();
        tokio::net::UnixListener::bind(&sock).expect("bind unix")
    };
    server_rt.spawn(serve(unix, Protocol::Policy, ctx, rx));

    // The floors, on the same transports: a tokio server of one worker and blocking threads,
    // both answering a fixed reply without reading the request.
    let floor_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(FLOOR_TOKIO_THREAD)
        .enable_all()
        .build()
        .expect("floor runtime");
    let floor_sock = sock_dir.path().join("floor.sock");
    let (floor_addr, floor_unix) = {
        let _guard = floor_rt.enter();
        let tcp = floor_rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind floor");
        let addr = tcp.local_addr().expect("floor addr");
        let unix = tokio::net::UnixListener::bind(&floor_sock).expect("bind floor unix");
        floor_rt.spawn(async move {
            while let Ok((s, _)) = tcp.accept().await {
                tokio::spawn(floor_conn(s));
            }
        });
        floor_rt.spawn(async move {
            while let Ok((s, _)) = unix.accept().await {
                tokio::spawn(floor_conn(s));
            }
        });
        (addr, floor_sock)
    };
    let blk_tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind blocking floor");
    let blk_addr = blk_tcp.local_addr().expect("blocking floor addr");
    spawn_blocking_floor(move || blk_tcp.accept().map(|(s, _)| s));
    let blk_sock = sock_dir.path().join("floor-blk.sock");
    let blk_unix = std::os::unix::net::UnixListener::bind(&blk_sock).expect("bind");
    spawn_blocking_floor(move || blk_unix.accept().map(|(s, _)| s));

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");
    // Requests as Postfix sends them (29 attributes), half known recipients, half unknown.
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        hits.iter()
            .zip(&misses)
            .flat_map(|(h, m)| [h, m])
            .map(|rcpt| {
                format!(
                    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
client_address=192.0.2.10\nclient_name=mail.example.net\nclient_port=40000\n\
reverse_client_name=mail.example.net\nserver_address=127.0.0.1\nserver_port=25\n\
helo_name=mail.example.net\nsender=someone@example.net\nrecipient={rcpt}\n\
recipient_count=0\nqueue_id=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\n\
size=0\nccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n\
encryption_protocol=\nencryption_cipher=\nencryption_keysize=0\netrn_domain=\n\
instance=1a2b.5f3c.0\npolicy_context=\ncompatibility_level=3.6\n\n"
                )
                .into_bytes()
            })
            .collect(),
    );

    println!("\n=== policy service, {n} addresses, loopback, server on {workers} thread(s) ===");
    println!(
        "floors: a tokio server (1 worker) and a blocking thread per connection, each writing a \
         fixed reply without reading the request; rcptgate's own share is its CPU minus the \
         tokio floor's"
    );
    let servers = [
        ("rcptgate", SERVER_THREAD, addr, sock.clone()),
        ("tokio floor", FLOOR_TOKIO_THREAD, floor_addr, floor_unix),
        ("blocking floor", FLOOR_BLOCKING_THREAD, blk_addr, blk_sock),
    ];
    for (transport, conns) in [
        ("tcp", 1usize),
        ("tcp", 8),
        ("tcp", 64),
        ("unix", 1),
        ("unix", 8),
        ("unix", 64),
    ] {
        // `POLICY_ONLY=unix:8` runs one level (for a profile of it).
        if let Ok(only) = std::env::var("POLICY_ONLY")
            && only != format!("{transport}:{conns}")
        {
            continue;
        }
        // The servers take turns in short slices, so that a change in the machine's speed
        // during the level falls on all of them alike.
        const SLICES: u32 = 6;
        let slice = Duration::from_secs_f64(secs / f64::from(SLICES));
        let mut latencies: Vec<Vec<u64>> = vec![Vec::new(); servers.len()];
        let mut cpu: Vec<Option<u64>> = vec![Some(0); servers.len()];
        let mut elapsed = vec![0f64; servers.len()];
        for _ in 0..SLICES {
            for (k, (_, thread, addr, sock)) in servers.iter().enumerate() {
                let cpu0 = cpu_ns(thread);
                let started = Instant::now();
                let deadline = started + slice;
                let got: Vec<u64> = client_rt.block_on(async {
                    let mut tasks = Vec::new();
                    for c in 0..conns {
                        let requests = requests.clone();
                        let sock = sock.clone();
                        let addr = *addr;
                        tasks.push(tokio::spawn(async move {
                            let stream: Box<dyn Stream> = if transport == "tcp" {
                                Box::new(TcpStream::connect(addr).await.expect("connect"))
                            } else {
                                Box::new(UnixStream::connect(&sock).await.expect("connect"))
                            };
                            client(stream, &requests, c * 997, deadline).await
                        }));
                    }
                    let mut all = Vec::new();
                    for t in tasks {
                        all.extend(t.await.expect("client"));
                    }
                    all
                });
                elapsed[k] += started.elapsed().as_secs_f64();
                // The blocking floor's threads add their time as they end: wait for them.
                while FLOOR_LIVE.load(Ordering::SeqCst) > 0 {
                    std::thread::yield_now();
                }
                cpu[k] = match (cpu[k], cpu0, cpu_ns(thread)) {
                    (Some(sum), Some(a), Some(b)) => Some(sum + b.saturating_sub(a)),
                    _ => None,
                };
                latencies[k].extend(got);
            }
        }
        let mut per = [0f64; 3];
        for (k, (server, ..)) in servers.iter().enumerate() {
            let sorted = &mut latencies[k];
            sorted.sort_unstable();
            let count = sorted.len();
            let per_request = cpu[k].map(|c| c as f64 / count as f64 / 1000.0);
            if let (Some(p), Some(slot)) = (per_request, per.get_mut(k)) {
                *slot = p;
            }
            println!(
                "{transport:<4} {conns:>3} connections, {server:<14}: {:>8.0} requests/s, latency p50 {:>6.1} µs p99 {:>6.1} µs, server CPU {}",
                count as f64 / elapsed[k],
                percentile(sorted, 0.5),
                percentile(sorted, 0.99),
                per_request.map_or("n/a".to_owned(), |c| format!("{c:.1} µs/request")),
            );
        }
        let [ours, tokio_floor, blocking_floor] = per;
        let goal = if conns == 1 {
            format!(
                "; goal at 1 connection: rcptgate's CPU <= 10 µs/request: {} ({ours:.1}; the \
                 floors alone {tokio_floor:.1} / {blocking_floor:.1})",
                if ours <= 10.0 { "met" } else { "NOT met" }
            )
        } else {
            String::new()
        };
        println!(
            "{transport:<4} {conns:>3} connections: rcptgate's own share {:.1} µs/request{goal}",
            ours - tokio_floor
        );
    }
}
