//! The policy and socketmap listeners over real loopback sockets (a test client plays
//! Postfix's side of each protocol; the real-Postfix tests come with the daemon).

mod common;

use common::{example_directory, socketmap_query};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use rcptgate::directory::Directory;
use rcptgate::proto::policy::Texts;
use rcptgate::server::{Context, Limits, Protocol, serve};

struct Running {
    addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(protocol: Protocol, dir: Arc<Directory>, limits: Limits) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = watch::channel(false);
    let ctx = Arc::new(Context {
        directory: dir,
        texts: Texts::default(),
        limits,
        metrics: Default::default(),
        milter: Default::default(),
        dane: None,
    });
    let task = tokio::spawn(serve(listener, protocol, ctx, rx));
    Running { addr, stop, task }
}

fn policy_request(rcpt: &str, state: &str) -> String {
    format!(
        "request=smtpd_access_policy\nprotocol_state={state}\nprotocol_name=ESMTP\n\
client_address=192.0.2.1\nsender=someone@example.net\nrecipient={rcpt}\nqueue_id=\n\
instance=1a2b.3c4d.0\nsize=0\n\n"
    )
}

/// Read until `n` replies (each ending in an empty line) have arrived.
async fn read_policy_replies(s: &mut TcpStream, n: usize) -> Vec<String> {
    let mut buf = Vec::new();
    while buf.windows(2).filter(|w| w == b"\n\n").count() < n {
        let mut chunk = [0u8; 1024];
        let got = tokio::time::timeout(Duration::from_secs(15), s.read(&mut chunk))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(
            got > 0,
            "connection closed early: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..got]);
    }
    String::from_utf8_lossy(&buf)
        .split("\n\n")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn policy_answers_many_requests_per_connection() {
    let srv = start(Protocol::Policy, example_directory(true), Limits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    // Several requests in one write, and one split across writes.
    let mut batch = String::new();
    for rcpt in [
        "alice.andersen@contoso.com",
        "nobody@contoso.com",
        "bad address@contoso.com",
        "x@gmail.com",
    ] {
        batch.push_str(&policy_request(rcpt, "RCPT"));
    }
    batch.push_str(&policy_request("nobody@contoso.com", "DATA"));
    s.write_all(batch.as_bytes()).await.expect("write");
    let late = policy_request("Bob.Berger+news@CONTOSO.com", "RCPT");
    let (a, b) = late.as_bytes().split_at(40);
    s.write_all(a).await.expect("write");
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.write_all(b).await.expect("write");
    let replies = read_policy_replies(&mut s, 6).await;
    assert_eq!(
        replies,
        vec![
            "action=DUNNO",
            "action=550 5.1.1 User unknown",
            "action=501 5.1.3 Bad recipient address syntax",
            "action=DUNNO",
            "action=DUNNO",
            "action=DUNNO",
        ]
    );
    srv.stop.send(true).expect("stop");
    drop(s);
    srv.task.await.expect("join").expect("served");
}

/// Regression: a RCPT request with no recipient, or an empty one, got `501 5.1.3`; there is
/// nothing to judge, so no verdict at all. A non-UTF-8 recipient outside our domains is
/// neutral.
#[tokio::test]
async fn requests_without_a_recipient_or_a_readable_one_are_not_verdicts() {
    let srv = start(Protocol::Policy, example_directory(true), Limits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a@b.example\n\n")
        .await
        .expect("write");
    s.write_all(policy_request("", "RCPT").as_bytes())
        .await
        .expect("write");
    s.write_all(policy_request("  ", "RCPT").as_bytes())
        .await
        .expect("write");
    let mut latin1 = policy_request("J\u{fc}rgen@example.org", "RCPT").into_bytes();
    let at = latin1
        .windows(2)
        .position(|w| w == "\u{fc}".as_bytes())
        .expect("u");
    latin1.splice(at..at + 2, [0xfc]);
    s.write_all(&latin1).await.expect("write");
    let mut ours = policy_request("J\u{fc}rgen@contoso.com", "RCPT").into_bytes();
    let at = ours
        .windows(2)
        .position(|w| w == "\u{fc}".as_bytes())
        .expect("u");
    ours.splice(at..at + 2, [0xfc]);
    s.write_all(&ours).await.expect("write");
    let replies = read_policy_replies(&mut s, 5).await;
    assert_eq!(
        replies,
        [
            "action=DUNNO",
            "action=DUNNO",
            "action=DUNNO",
            "action=DUNNO",
            "action=501 5.1.3 Bad recipient address syntax"
        ]
    );
}

#[tokio::test]
async fn nothing_loaded_defers_never_rejects() {
    let srv = start(
        Protocol::Policy,
        example_directory(false),
        Limits::default(),
    )
    .await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(policy_request("nobody@contoso.com", "RCPT").as_bytes())
        .await
        .expect("write");
    let replies = read_policy_replies(&mut s, 1).await;
    assert!(
        replies[0].starts_with("action=DEFER_IF_PERMIT 4.3.0 "),
        "{replies:?}"
    );
}

#[tokio::test]
async fn malformed_input_closes_only_that_connection() {
    let srv = start(Protocol::Policy, example_directory(true), Limits::default()).await;
    let mut good = TcpStream::connect(srv.addr).await.expect("connect");
    let mut bad = TcpStream::connect(srv.addr).await.expect("connect");
    bad.write_all(b"request=smtpd_access_policy\nthis line has no equals sign\n\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(n, 0, "no reply to a malformed request");
    // An over-long request is cut off too, without being buffered whole.
    let mut huge = TcpStream::connect(srv.addr).await.expect("connect");
    let _ = huge.write_all(&vec![b'x'; 100_000]).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), huge.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "over-long request must close the connection"
    );
    // The good connection is unaffected.
    good.write_all(policy_request("sales@contoso.com", "RCPT").as_bytes())
        .await
        .expect("write");
    assert_eq!(
        read_policy_replies(&mut good, 1).await,
        vec!["action=DUNNO"]
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(100),
        ..Limits::default()
    };
    let srv = start(Protocol::Policy, example_directory(true), limits).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed by the server")
        .expect("read");
    assert_eq!(n, 0);
}

/// Send `request` in two pieces, `pause` apart, and read its answer.
async fn send_in_two_pieces(s: &mut TcpStream, request: &str, pause: Duration) -> Vec<String> {
    let (a, b) = request.as_bytes().split_at(request.len() / 2);
    s.write_all(a).await.expect("write");
    tokio::time::sleep(pause).await;
    s.write_all(b).await.expect("write");
    read_policy_replies(s, 1).await
}

/// A policy connection under `idle` and `request` timeouts that has had one request, sent in
/// two pieces `pause` apart, answered. The server runs as long as the `Running` is kept.
async fn answered_in_pieces(
    idle: Duration,
    request: Duration,
    pause: Duration,
) -> (Running, TcpStream, String) {
    let limits = Limits {
        idle_timeout: idle,
        request_timeout: request,
        ..Limits::default()
    };
    let srv = start(Protocol::Policy, example_directory(true), limits).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let text = policy_request("alice@contoso.com", "RCPT");
    assert_eq!(
        send_in_two_pieces(&mut s, &text, pause).await,
        vec!["action=DUNNO"]
    );
    (srv, s, text)
}

/// A connection keeps one timer for its reads: a request that came in pieces set it to the
/// request timeout, and the idle wait after the answer must not be cut at that deadline.
#[tokio::test]
async fn an_idle_connection_outlives_an_earlier_request_deadline() {
    let (_srv, mut s, request) = answered_in_pieces(
        Duration::from_secs(30),
        Duration::from_millis(200),
        Duration::from_millis(50),
    )
    .await;
    // Idle well past the first request's deadline, then ask again on the same connection.
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(request.as_bytes()).await.expect("write");
    assert_eq!(read_policy_replies(&mut s, 1).await, vec!["action=DUNNO"]);
}

/// The other way round: a request whose pieces come further apart than the idle timeout moves
/// the timer to the long request timeout; the idle wait after its answer must still close the
/// connection at the idle timeout.
#[tokio::test]
async fn the_idle_timeout_holds_after_a_request_in_pieces() {
    let (_srv, mut s, _) = answered_in_pieces(
        Duration::from_millis(300),
        Duration::from_secs(20),
        Duration::from_millis(500),
    )
    .await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed at the idle timeout, not the request timeout")
        .expect("read");
    assert_eq!(n, 0);
}

/// Regression (slowloris): clients that trickle one byte at a time, each within the idle
/// timeout, held every slot for as long as they liked, and real clients got no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_trickled_in_is_cut_at_the_request_timeout() {
    let limits = Limits {
        max_connections: 2,
        idle_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let srv = start(Protocol::Policy, example_directory(true), limits).await;
    let request = policy_request("alice@contoso.com", "RCPT");
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        let bytes = request.clone().into_bytes();
        slow.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            for b in bytes {
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut probe = [0u8; 1];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
                {
                    return started.elapsed();
                }
            }
            started.elapsed()
        }));
    }
    // Both slots are taken by the slow clients; a real one is answered once they are cut.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let answer = tokio::time::timeout(Duration::from_secs(5), read_policy_replies(&mut s, 1))
        .await
        .expect("answered while slow clients trickle");
    assert_eq!(answer, vec!["action=DUNNO"]);
    for t in slow {
        let held = t.await.expect("slow client");
        // Cut near the request timeout, long before the whole request (~400 bytes × 50 ms).
        assert!(held < Duration::from_secs(3), "held {held:?}");
    }
}

/// Regression: a client that pipelines requests and never reads its answers blocked the
/// server's write forever, keeping its slot and the shutdown waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_and_shutdown_refuses_new_clients_at_once() {
    let limits = Limits {
        max_connections: 1,
        write_timeout: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let srv = start(Protocol::Policy, example_directory(true), limits).await;
    // ~15 MB of short requests whose replies (more than the socket buffers hold) are never
    // read: the server's write blocks.
    let many = "request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=nobody@contoso.com\n\n"
        .repeat(200_000);
    let mut stalled = {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        socket.connect(srv.addr).await.expect("connect")
    };
    let m = many.clone();
    let writer = tokio::spawn(async move {
        let _ = stalled.write_all(m.as_bytes()).await;
        stalled
    });
    // The only slot is freed once the write times out: a new client gets its answer.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(policy_request("alice@contoso.com", "RCPT").as_bytes())
        .await
        .expect("write");
    let answer = tokio::time::timeout(Duration::from_secs(20), read_policy_replies(&mut s, 1))
        .await
        .expect("slot freed by the write timeout");
    assert_eq!(answer, vec!["action=DUNNO"]);
    drop(s);
    let _stalled = writer.await.expect("writer");

    // A second stalled reader, then shutdown: the listener closes at once (new clients are
    // refused, not left waiting), and serving ends within the timeouts.
    let mut stalled = {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        socket.connect(srv.addr).await.expect("connect")
    };
    let writer = tokio::spawn(async move {
        let _ = stalled.write_all(many.as_bytes()).await;
        stalled
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = std::time::Instant::now();
    srv.stop.send(true).expect("stop");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(srv.addr).await.is_err(),
        "listener still open after shutdown"
    );
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .expect("serving ended")
        .expect("join")
        .expect("served");
    assert!(stopped.elapsed() < Duration::from_secs(3));
    let _ = writer.await;
}

#[tokio::test]
async fn socketmap_maps() {
    let srv = start(
        Protocol::Socketmap,
        example_directory(true),
        Limits::default(),
    )
    .await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let cases = [
        ("recipients alice.andersen@contoso.com", "OK user"),
        ("recipients carol@contoso.com", "OK alias"),
        ("recipients bob.berger+x@contoso.com", "OK user"),
        ("recipients nobody@contoso.com", "NOTFOUND "),
        (
            "recipients someone@not-in-directory.example",
            "TEMP domain not in directory",
        ),
        (
            "transport Carol.Chen@Contoso.com",
            "OK smtp:[contoso-com.mail.protection.outlook.com]:25",
        ),
        ("transport nobody@contoso.com", "NOTFOUND "),
        ("transport *", "NOTFOUND "),
        ("profile alice@contoso.com", "OK executives"),
        ("profile x@gmail.com", "NOTFOUND "),
        ("colours alice@contoso.com", "PERM unknown map"),
        // Keys that name no domain of ours are never a NOTFOUND (a 550 through
        // relay_recipient_maps): regression for spaces-only keys.
        ("recipients    ", "TEMP domain not in directory"),
        ("recipients no-at-sign", "TEMP domain not in directory"),
        // Not a mailbox in a domain we own: the directory's verdict.
        ("recipients a@b@contoso.com", "NOTFOUND "),
    ];
    for (q, want) in cases {
        assert_eq!(socketmap_query(&mut s, q).await, want, "query {q}");
    }
    // Not loaded: TEMP for every map.
    let srv2 = start(
        Protocol::Socketmap,
        example_directory(false),
        Limits::default(),
    )
    .await;
    let mut s2 = TcpStream::connect(srv2.addr).await.expect("connect");
    for q in [
        "recipients alice@contoso.com",
        "transport alice@contoso.com",
    ] {
        assert!(
            socketmap_query(&mut s2, q).await.starts_with("TEMP "),
            "{q}"
        );
    }
    // A netstring over the 10000-byte limit closes the connection.
    s2.write_all(b"20000:").await.expect("write");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s2.read_to_end(&mut rest))
        .await
        .expect("closed")
        .expect("read");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight() {
    let srv = start(Protocol::Policy, example_directory(true), Limits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    // Half a request is in flight when the shutdown comes.
    let req = policy_request("alice@contoso.com", "RCPT");
    let (a, b) = req.as_bytes().split_at(30);
    s.write_all(a).await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.stop.send(true).expect("stop");
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b).await.expect("write");
    assert_eq!(read_policy_replies(&mut s, 1).await, vec!["action=DUNNO"]);
    // Then the connection and the listener close, and new clients are refused.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed")
        .expect("read");
    assert_eq!(n, 0);
    srv.task.await.expect("join").expect("served");
    assert!(TcpStream::connect(srv.addr).await.is_err());
}

/// A thousand MTA connections at once against a cap of 32: never more than 32 served at a
/// time, every one served in turn, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_milter_connections_against_the_cap() {
    let limits = Limits {
        max_connections: 32,
        ..Limits::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, rx) = watch::channel(false);
    let metrics: Arc<rcptgate::server::metrics::Metrics> = Default::default();
    let ctx = Arc::new(Context {
        directory: example_directory(true),
        texts: Texts::default(),
        limits,
        metrics: metrics.clone(),
        milter: Default::default(),
        dane: None,
    });
    tokio::spawn(serve(listener, Protocol::Milter, ctx, rx));
    let peak = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let watcher = {
        let (metrics, peak) = (metrics.clone(), peak.clone());
        let dir = example_directory(true);
        tokio::spawn(async move {
            loop {
                let text = metrics.render(&dir);
                let open = text
                    .lines()
                    .find(|l| l.starts_with("rcptgate_open_connections{frontend=\"milter\"}"))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
                    .unwrap_or(0);
                peak.fetch_max(open, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let frame = |c: u8, d: &[u8]| {
        let mut f = Vec::new();
        rcptgate::proto::milter::frame(c, d, &mut f);
        f
    };
    let mut session = frame(b'O', &[0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0x1f, 0xff, 0xff]);
    session.extend(frame(b'M', b"<>\0"));
    session.extend(frame(b'R', b"<nobody@contoso.com>\0"));
    let mut clients = Vec::new();
    for _ in 0..1000 {
        let session = session.clone();
        clients.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(&session).await.expect("send");
            // OPTNEG, MAIL's continue, then the RCPT's reply code.
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !got.windows(9).any(|w| w == b"550 5.1.1") {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(&frame(b'Q', b"")).await.expect("quit");
        }));
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("served in time")
            .expect("client");
    }
    watcher.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=32).contains(&peak), "peak {peak}");
}
