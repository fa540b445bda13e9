//! The policy and socketmap listeners over real loopback sockets (a test client plays
//! Postfix's side of each protocol; the real-Postfix tests come with the daemon).

mod common;

use common::example_directory;
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
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
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
    s.write_all(b"request=smtpd_access_policy\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed by the server")
        .expect("read");
    assert_eq!(n, 0);
}

async fn socketmap_query(s: &mut TcpStream, query: &str) -> String {
    let mut framed = Vec::new();
    rcptgate::proto::netstring::encode(query.as_bytes(), &mut framed);
    s.write_all(&framed).await.expect("write");
    let mut buf = Vec::new();
    loop {
        if let Ok(rcptgate::proto::netstring::Decoded::Frame { payload, .. }) =
            rcptgate::proto::netstring::decode(&buf, 100_000)
        {
            return String::from_utf8_lossy(payload).into_owned();
        }
        let mut chunk = [0u8; 512];
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(got > 0, "closed early");
        buf.extend_from_slice(&chunk[..got]);
    }
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
