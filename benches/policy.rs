//! The policy service over loopback TCP and over a unix socket: requests per second and
//! latency p50/p99 with 1, 8 and 64 concurrent connections, and the server's CPU time per
//! request (read from the server runtime's own threads in /proc; on loopback TCP that
//! includes the kernel's receive processing of each reply, done in the sender's context). Clients and server share this 2-core machine, so the
//! rates are a floor; CPU per request is the server's alone.
//!
//! `cargo bench --bench policy` (a directory of 100k synthetic addresses, 3 s per level);
//! under `cargo test` it runs briefly as a smoke test.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use rcptgate::directory::{Directory, LookupOptions, Snapshot};
use rcptgate::proto::policy::Texts;
use rcptgate::server::{Context, Limits, Protocol, serve};

const SERVER_THREAD: &str = "rcptgate-srv";

/// CPU seconds used so far by the threads named `SERVER_THREAD` (Linux /proc).
fn server_cpu() -> Option<f64> {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != SERVER_THREAD {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).ok()?;
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields after the command: state is [0]; utime is [11], stime [12].
        total += fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    }
    Some(total as f64 / ticks)
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
        (100_000, 3.0)
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

    println!("\n=== policy service, {n} addresses, loopback, server on 1 thread ===");
    for (transport, conns) in [
        ("tcp", 1usize),
        ("tcp", 8),
        ("tcp", 64),
        ("unix", 1),
        ("unix", 8),
        ("unix", 64),
    ] {
        let cpu0 = server_cpu();
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(secs);
        let latencies: Vec<u64> = client_rt.block_on(async {
            let mut tasks = Vec::new();
            for c in 0..conns {
                let requests = requests.clone();
                let sock = sock.clone();
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
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = match (cpu0, server_cpu()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let mut sorted = latencies;
        sorted.sort_unstable();
        let count = sorted.len();
        println!(
            "{transport:<4} {conns:>3} connections: {:>8.0} requests/s, latency p50 {:>6.1} µs p99 {:>6.1} µs, server CPU {}",
            count as f64 / elapsed,
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99),
            cpu.map_or("n/a".to_owned(), |c| format!(
                "{:.1} µs/request",
                c / count as f64 * 1e6
            )),
        );
    }
}
