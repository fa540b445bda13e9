//! DANE against a real DNSSEC-signing name server (NSD, a fake signed root built and signed
//! at test time; tests/support/nsd.rs): every row of the DESIGN §8 table through the
//! socketmap, the 30-record TLSA RRset over TCP, bogus and dead DNS as `TEMP`, single
//! flight, refresh failures; `rcptgate dane-check` against local STARTTLS sinks; and (with
//! `postfix-tests`) Postfix's `postmap -q` and a real delivery under the `fingerprint`
//! rendering. Needs root, `nsd bind9-utils openssl` (tests/run.sh installs them).
#![cfg(feature = "dane-tests")]

mod common;
#[path = "support/nsd.rs"]
mod nsd;
#[path = "support/smtp_sink.rs"]
mod smtp_sink;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use rcptgate::dane::{Dane, DaneConfig, Level, Rendering};
use rcptgate::directory::Directory;
use rcptgate::proto::policy::Texts;
use rcptgate::server::{Context, Limits, Protocol, serve};

/// Ports with TLSA records of their own at `_PORT._tcp.mx2.example.test` (the EE key of
/// the testbed certificate): the sinks of the dane-check and delivery tests.
struct Ports {
    good: u16,
    wrong: u16,
    plain: u16,
    closed: u16,
    deliver_good: u16,
    deliver_wrong: u16,
    /// Only a DANE-TA record (the testbed CA's key) at this port.
    trust_anchor: u16,
}

struct Bed {
    tb: nsd::Testbed,
    ports: Ports,
}

fn bed() -> &'static Bed {
    static BED: OnceLock<Bed> = OnceLock::new();
    BED.get_or_init(|| {
        let ports = Ports {
            // Sinks' ports bound now (and kept until each sink starts); `closed` stays closed.
            good: smtp_sink::reserve(),
            wrong: smtp_sink::reserve(),
            plain: smtp_sink::reserve(),
            closed: nsd::free_port(),
            deliver_good: smtp_sink::reserve(),
            deliver_wrong: smtp_sink::reserve(),
            trust_anchor: smtp_sink::reserve(),
        };
        let mut extra = vec![
            // Secure MX, one host with usable TLSA (mx1) and one without (mx3): `dane`.
            "partial           IN MX  10 mx1".to_owned(),
            "partial           IN MX  20 mx3".to_owned(),
        ];
        for p in [
            ports.good,
            ports.wrong,
            ports.plain,
            ports.closed,
            ports.deliver_good,
            ports.deliver_wrong,
        ] {
            extra.push(format!("_{p}._tcp.mx2      IN TLSA 3 1 1 @EE_SPKI_SHA256@"));
        }
        extra.push(format!(
            "_{}._tcp.mx2      IN TLSA 2 1 1 @TA_SPKI_SHA256@",
            ports.trust_anchor
        ));
        Bed {
            tb: nsd::Testbed::start(&extra),
            ports,
        }
    })
}

struct Running {
    addr: std::net::SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn socketmap(dane: Option<Dane>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = watch::channel(false);
    let ctx = Arc::new(Context {
        directory: Arc::new(Directory::new(Default::default())),
        texts: Texts::default(),
        limits: Limits::default(),
        metrics: Default::default(),
        milter: Default::default(),
        dane,
    });
    tokio::spawn(serve(listener, Protocol::Socketmap, ctx, rx));
    Running { addr, _stop: stop }
}

fn ee_fingerprint() -> String {
    let env = std::fs::read_to_string(bed().tb.certs().join("hashes.env")).expect("hashes");
    let hex = env
        .lines()
        .find_map(|l| l.strip_prefix("EE_SPKI_SHA256="))
        .expect("EE hash")
        .trim()
        .to_ascii_uppercase();
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// The DESIGN §8 table, row by row, through the socketmap.
const ROWS: &[(&str, &str)] = &[
    // secure MX, every host (mx1; mx2 with 30 TLSA records over TCP) has usable TLSA
    ("example.test", "OK dane-only"),
    // secure MX, only some hosts have usable TLSA
    ("partial.example.test", "OK dane"),
    // TLSA present but none usable (usages 0 and 1)
    ("unusable.example.test", "OK encrypt"),
    // secure without TLSA
    ("nodane.example.test", "NOTFOUND "),
    // insecure domain (TLSA published in an unsigned zone is ignored)
    ("insecure.test", "NOTFOUND "),
    // insecure MX pointing at a signed host
    ("hosted.insecure.test", "NOTFOUND "),
    // secure MX whose host lives in an unsigned zone
    ("mixed.example.test", "NOTFOUND "),
    // signed denial of the domain
    ("nx.example.test", "NOTFOUND "),
    // a transport next hop: no MX lookup, the host's own TLSA
    ("[mx1.example.test]", "OK dane-only"),
    ("[mx1.example.test]:587", "NOTFOUND "),
    // an address literal has no DANE
    ("[192.0.2.1]:25", "NOTFOUND "),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_table_through_the_socketmap() {
    let dane = Dane::new(bed().tb.dane_config()).expect("engine");
    let srv = socketmap(Some(dane.clone())).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    for (key, want) in ROWS {
        assert_eq!(
            common::socketmap_query(&mut s, &format!("tls_policy {key}")).await,
            *want,
            "{key}"
        );
    }
    // Bogus: expired signatures on the whole zone, and one corrupted TLSA signature in a
    // secure zone. Never a downgrade: TEMP.
    for key in ["bogus.test", "badsig.example.test"] {
        let r = common::socketmap_query(&mut s, &format!("tls_policy {key}")).await;
        assert!(r.starts_with("TEMP ") && r.contains("bogus"), "{key}: {r}");
    }
    // The same answers again come from the cache (no new decision).
    let decided: u64 = dane
        .stats()
        .decisions
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .sum();
    for (key, want) in ROWS.iter().filter(|(k, _)| !k.contains("192.0.2.1")) {
        assert_eq!(
            common::socketmap_query(&mut s, &format!("tls_policy {key}")).await,
            *want,
            "{key}"
        );
    }
    let again: u64 = dane
        .stats()
        .decisions
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .sum();
    assert_eq!(decided, again, "cached answers made new decisions");
    assert!(dane.stats().hits.load(Ordering::Relaxed) >= 10);
    // The directory maps still answer on the same connection.
    assert_eq!(
        common::socketmap_query(&mut s, "recipients alice@contoso.com").await,
        "TEMP directory unavailable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_rendering_uses_the_validated_dane_ee_records() {
    let mut cfg = bed().tb.dane_config();
    cfg.rendering = Rendering::Fingerprint;
    let dane = Dane::new(cfg).expect("engine");
    let srv = socketmap(Some(dane)).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let fp = ee_fingerprint();
    // mx1 (3 1 1 + 2 1 1) and mx2 (30 records, over TCP) share the EE key, plus mx2's 28
    // filler records: every 3 1 1 digest is offered, the real one among them.
    let r = common::socketmap_query(&mut s, "tls_policy example.test").await;
    assert!(r.starts_with("OK fingerprint match="), "{r}");
    assert!(r.contains(&fp), "{r} lacks {fp}");
    assert_eq!(r.matches('|').count(), 28, "{r}");
    // Only DANE-TA would not do for fingerprints; a domain with a host without TLSA keeps
    // `dane`, and rows without DANE stay as they are.
    assert_eq!(
        common::socketmap_query(&mut s, "tls_policy partial.example.test").await,
        "OK dane"
    );
    assert_eq!(
        common::socketmap_query(&mut s, "tls_policy nodane.example.test").await,
        "NOTFOUND "
    );
    assert_eq!(
        common::socketmap_query(&mut s, "tls_policy [mx1.example.test]").await,
        format!("OK fingerprint match={fp}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_tlsa_records_come_over_tcp() {
    let dane = Dane::new(bed().tb.dane_config()).expect("engine");
    let a = dane.policy(b"[mx2.example.test]").await;
    let rcptgate::dane::PolicyAnswer::Decided(c) = a else {
        panic!("decided")
    };
    assert_eq!(c.decision.level, Level::DaneOnly, "{:?}", c.decision);
    assert_eq!(c.decision.hosts[0].tlsa.len(), 30);
    // Kept as long as the smallest TTL used: mx2 has no AAAA, whose signed denial lives
    // 300 s (the SOA's), against 3600 s for the rest.
    assert_eq!(c.decision.ttl, 300);
    assert_eq!(c.ttl, Duration::from_secs(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_or_silent_dns_is_temp_never_notfound() {
    // Nothing listens: refused at once.
    let mut cfg = bed().tb.dane_config();
    cfg.resolver.nameservers = vec![([127, 0, 0, 1], nsd::free_port()).into()];
    let dane = Dane::new(cfg).expect("engine");
    let srv = socketmap(Some(dane.clone())).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    for key in ["example.test", "nodane.example.test", "insecure.test"] {
        let r = common::socketmap_query(&mut s, &format!("tls_policy {key}")).await;
        assert!(r.starts_with("TEMP "), "{key}: {r}");
    }
    // A server that swallows every query: TEMP within the decision timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let silent_tcp = std::net::TcpListener::bind(silent.local_addr().expect("addr")).ok();
    let mut cfg = bed().tb.dane_config();
    cfg.resolver.nameservers = vec![silent.local_addr().expect("addr")];
    cfg.resolver.timeout = Duration::from_millis(300);
    cfg.decision_timeout = Duration::from_secs(2);
    let dane = Dane::new(cfg).expect("engine");
    let srv = socketmap(Some(dane.clone())).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let r = common::socketmap_query(&mut s, "tls_policy example.test").await;
    assert!(r.starts_with("TEMP "), "{r}");
    let mut m = String::new();
    dane.render_metrics(&mut m);
    assert!(
        m.contains("rcptgate_dane_decisions_total{policy=\"temp\"} 1"),
        "{m}"
    );
    drop((silent, silent_tcp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_one_cold_domain_makes_one_query_set() {
    let dane = Dane::new(bed().tb.dane_config()).expect("engine");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let d = dane.clone();
        set.spawn(async move { d.policy(b"example.test").await.rendered().clone() });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(
            r.expect("join"),
            rcptgate::dane::Rendered::Ok("dane-only".into())
        );
    }
    let decided: u64 = dane
        .stats()
        .decisions
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .sum();
    assert_eq!(decided, 1, "one resolution for 100 requests");
    assert_eq!(
        dane.stats().misses.load(Ordering::Relaxed) + dane.stats().hits.load(Ordering::Relaxed),
        100
    );
}

/// A UDP relay to the testbed that can be cut: DNS going away under a cached decision.
struct Relay {
    addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
}

fn relay(to: std::net::SocketAddr) -> Relay {
    let front = std::net::UdpSocket::bind("127.0.0.1:0").expect("relay");
    let addr = front.local_addr().expect("addr");
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let u = up.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, client)) = front.recv_from(&mut buf) {
            if !u.load(Ordering::SeqCst) {
                continue;
            }
            let back = std::net::UdpSocket::bind("127.0.0.1:0").expect("back");
            back.set_read_timeout(Some(Duration::from_secs(2))).ok();
            if back.send_to(&buf[..n], to).is_ok() {
                let mut ans = [0u8; 4096];
                if let Ok(m) = back.recv(&mut ans) {
                    let _ = front.send_to(&ans[..m], client);
                }
            }
        }
    });
    Relay { addr, up }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_keeps_the_decision_until_it_expires() {
    let r = relay(bed().tb.addr());
    let mut cfg: DaneConfig = bed().tb.dane_config();
    cfg.resolver.nameservers = vec![r.addr];
    cfg.resolver.timeout = Duration::from_millis(300);
    cfg.decision_timeout = Duration::from_secs(1);
    // Decisions live 6 s, refreshed 2 s before expiry (twice the decision timeout); a
    // failed refresh is retried after 1 s.
    cfg.min_ttl = Duration::from_secs(6);
    cfg.max_ttl = Duration::from_secs(6);
    cfg.temp_ttl = Duration::from_secs(1);
    let dane = Dane::new(cfg).expect("engine");
    let key = b"[mx1.example.test]";
    let ok = rcptgate::dane::Rendered::Ok("dane-only".into());
    assert_eq!(dane.policy(key).await.rendered(), &ok);
    let made = Instant::now();
    r.up.store(false, Ordering::SeqCst);
    // Ask until a refresh has failed: every answer meanwhile is the cached decision.
    let st = dane.stats();
    while st.refresh_failures.load(Ordering::Relaxed) == 0 {
        assert!(
            made.elapsed() < Duration::from_secs(10),
            "no refresh failed"
        );
        assert_eq!(
            dane.policy(key).await.rendered(),
            &ok,
            "answer changed before expiry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(st.refreshes.load(Ordering::Relaxed) >= 1);
    // After expiry, with DNS still down: TEMP, never NOTFOUND.
    loop {
        let a = dane.policy(key).await;
        match a.rendered() {
            rcptgate::dane::Rendered::Temp(_) => break,
            other => assert_eq!(other, &ok),
        }
        assert!(made.elapsed() < Duration::from_secs(15), "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(made.elapsed() >= Duration::from_secs(5), "expired early");
    // DNS back: the next decision is good again.
    r.up.store(true, Ordering::SeqCst);
    loop {
        if dane.policy(key).await.rendered() == &ok {
            break;
        }
        assert!(made.elapsed() < Duration::from_secs(30), "did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `rcptgate dane-check --json` against the testbed.
fn dane_check(key: &str) -> (bool, serde_json::Value) {
    let tb = &bed().tb;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rcptgate"))
        .args(["dane-check", "--json", "--timeout", "5", "--nameserver"])
        .arg(tb.addr().to_string())
        .arg("--trust-anchor")
        .arg(tb.anchor())
        .arg(key)
        .output()
        .expect("dane-check runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{key}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

#[test]
fn dane_check_verifies_starttls_against_the_tlsa_records() {
    let b = bed();
    let certs = b.tb.certs();
    let good = smtp_sink::Sink::start(
        b.ports.good,
        Some((&certs.join("mx1-chain.pem"), &certs.join("mx1.key"))),
    );
    let (wc, wk) = b.tb.wrong_cert();
    let _wrong = smtp_sink::Sink::start(b.ports.wrong, Some((&wc, &wk)));
    let _plain = smtp_sink::Sink::start(b.ports.plain, None);

    let (ok, v) = dane_check(&format!("[mx2.example.test]:{}", b.ports.good));
    assert!(ok, "{v:#}");
    assert_eq!(v["answer"], "OK dane-only");
    assert_eq!(v["probes"][0]["result"], "verified", "{v:#}");
    assert!(
        v["probes"][0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("3 1 1"),
        "{v:#}"
    );
    assert!(good.seen.connections.load(Ordering::SeqCst) >= 1);
    // The 30-record RRset of mx2 at port 25 is the one that needs TCP; its key has its own
    // records here, but the UDP size step shows for every RRset.
    assert!(
        v["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .any(|s| s["query"].as_str().unwrap_or("").contains("over UDP")),
        "{v:#}"
    );

    // DANE-TA: the CA in the chain the server sends matches; chain and name then verify.
    let _ta = smtp_sink::Sink::start(
        b.ports.trust_anchor,
        Some((&certs.join("mx1-chain.pem"), &certs.join("mx1.key"))),
    );
    let (ok, v) = dane_check(&format!("[mx2.example.test]:{}", b.ports.trust_anchor));
    assert!(ok, "{v:#}");
    assert!(
        v["probes"][0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("2 1 1"),
        "{v:#}"
    );

    let (ok, v) = dane_check(&format!("[mx2.example.test]:{}", b.ports.wrong));
    assert!(!ok);
    let p = &v["probes"][0];
    assert_eq!(p["result"], "failed");
    assert!(
        p["detail"].as_str().unwrap_or("").contains("TLS handshake"),
        "{v:#}"
    );
    assert!(
        p["fix"].as_str().unwrap_or("").contains("TLSA 3 1 1"),
        "{v:#}"
    );
    assert!(p["certificate"]["leaf_spki_sha256"].is_string(), "{v:#}");

    let (ok, v) = dane_check(&format!("[mx2.example.test]:{}", b.ports.plain));
    assert!(!ok);
    assert_eq!(v["probes"][0]["detail"], "STARTTLS not offered", "{v:#}");

    let (ok, v) = dane_check(&format!("[mx2.example.test]:{}", b.ports.closed));
    assert!(!ok);
    assert!(
        v["probes"][0]["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("connect:"),
        "{v:#}"
    );

    // DNS trouble is named with its fix.
    let (ok, v) = dane_check("badsig.example.test");
    assert!(!ok);
    assert!(
        v["answer"].as_str().unwrap_or("").starts_with("TEMP"),
        "{v:#}"
    );
    assert!(
        v["fixes"][0].as_str().unwrap_or("").contains("re-sign"),
        "{v:#}"
    );
    let (ok, v) = dane_check("insecure.test");
    assert!(ok, "no DANE to enforce is not an error");
    assert!(
        v["fixes"][0]
            .as_str()
            .unwrap_or("")
            .contains("not DNSSEC-signed"),
        "{v:#}"
    );
    // The big RRset: truncated over UDP, then TCP.
    let (_, v) = dane_check("example.test");
    let steps = v["steps"].as_array().expect("steps");
    assert!(
        steps.iter().any(|s| s["status"]
            .as_str()
            .unwrap_or("")
            .contains("retried over TCP")),
        "{v:#}"
    );
}

#[cfg(feature = "postfix-tests")]
#[path = "support/postfix.rs"]
mod postfix;

#[cfg(feature = "postfix-tests")]
#[test]
fn postfix_postmap_answers_every_row() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dane = Dane::new(bed().tb.dane_config()).expect("engine");
    let srv = rt.block_on(socketmap(Some(dane)));
    let base = tempfile::tempdir().expect("tempdir");
    let pf = postfix::Postfix::start_for(base.path(), "example.test", &[]);
    let table = format!("socketmap:inet:{}:tls_policy", srv.addr);
    for (key, want) in ROWS {
        let (found, value) = pf.postmap_q(key, &table);
        match want.strip_prefix("OK ") {
            Some(v) => assert!(found && value == v, "{key}: {found} {value:?}"),
            None => assert!(!found && value.is_empty(), "{key}: {found} {value:?}"),
        }
    }
    drop(pf);
}

/// Whether Postfix's queue holds a deferred message (`postqueue -j`, one JSON object per
/// message).
#[cfg(feature = "postfix-tests")]
fn deferred(pf: &postfix::Postfix) -> bool {
    let out = std::process::Command::new("postqueue")
        .arg("-c")
        .arg(pf.base.join("etc"))
        .arg("-j")
        .output()
        .expect("postqueue");
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["queue_name"] == "deferred")
    })
}

/// Make `mx2.example.test` resolve to 127.0.0.1 for Postfix's own (native) host lookups.
#[cfg(feature = "postfix-tests")]
fn hosts_entry() {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !hosts.lines().any(|l| {
        l.split_whitespace()
            .skip(1)
            .any(|n| n == "mx2.example.test")
    }) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")
            .expect("/etc/hosts (root)");
        std::io::Write::write_all(
            &mut f,
            b"\n127.0.0.1 mx2.example.test # rcptgate dane test\n",
        )
        .expect("write /etc/hosts");
    }
}

#[cfg(feature = "postfix-tests")]
#[test]
fn postfix_delivers_only_to_the_matching_certificate_under_fingerprint() {
    hosts_entry();
    let b = bed();
    let certs = b.tb.certs();
    let good = smtp_sink::Sink::start(
        b.ports.deliver_good,
        Some((&certs.join("mx1-chain.pem"), &certs.join("mx1.key"))),
    );
    let (wc, wk) = b.tb.wrong_cert();
    let wrong = smtp_sink::Sink::start(b.ports.deliver_wrong, Some((&wc, &wk)));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut cfg = b.tb.dane_config();
    cfg.rendering = Rendering::Fingerprint;
    let dane = Dane::new(cfg).expect("engine");
    let srv = rt.block_on(socketmap(Some(dane)));
    let base = tempfile::tempdir().expect("tempdir");
    let transport = format!(
        "transport_maps = inline:{{ good.example.test=smtp:[mx2.example.test]:{}, wrong.example.test=smtp:[mx2.example.test]:{} }}",
        b.ports.deliver_good, b.ports.deliver_wrong
    );
    let policy = format!(
        "smtp_tls_policy_maps = socketmap:inet:{}:tls_policy",
        srv.addr
    );
    let pf = postfix::Postfix::start_for(
        base.path(),
        "good.example.test, wrong.example.test",
        &[
            &transport,
            &policy,
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            "smtp_tls_loglevel = 1",
        ],
    );
    let (replies, end) = pf.session(
        &["alice@good.example.test"],
        Some("Subject: dane good\r\n\r\nhello"),
    );
    assert!(replies[0].starts_with("250") && end.is_some_and(|e| e.starts_with("250")));
    let (replies, end) = pf.session(
        &["bob@wrong.example.test"],
        Some("Subject: dane wrong\r\n\r\nhello"),
    );
    assert!(replies[0].starts_with("250") && end.is_some_and(|e| e.starts_with("250")));
    // The matching sink gets its message over TLS.
    let deadline = Instant::now() + Duration::from_secs(60);
    while good.messages().is_empty() {
        assert!(Instant::now() < deadline, "not delivered:\n{}", pf.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = &good.messages()[0];
    assert!(m.tls && m.data.contains("dane good"), "{m:?}");
    // The wrong certificate: Postfix finds no matching fingerprint, sends nothing and the
    // message waits in the queue; nothing is ever sent in clear.
    while wrong.seen.connections.load(Ordering::SeqCst) == 0 || !deferred(&pf) {
        assert!(Instant::now() < deadline, "not deferred:\n{}", pf.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(wrong.messages().is_empty());
    assert_eq!(wrong.seen.mail_in_clear.load(Ordering::SeqCst), 0);
    assert_eq!(good.seen.mail_in_clear.load(Ordering::SeqCst), 0);
    drop(pf);
}

#[path = "support/daemon.rs"]
mod daemon;

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// `rcptgate serve` with `[dane]`: `tls_policy` on the socketmap listener, and the routes of
/// the published directory resolved ahead of the first message.
#[test]
fn the_daemon_serves_tls_policy_and_warms_its_routes() {
    let tb = &bed().tb;
    let dir = tempfile::tempdir().expect("tempdir");
    let map = dir.path().join("dir.map");
    std::fs::write(
        &map,
        "1|contoso.com\tDOMAIN:\tcontoso.com\troute=smtp:[mx1.example.test]:25\n\
1|contoso.com\tDIR:\talice@contoso.com\n\
1|contoso.com\tDIR:\tbob@contoso.com\n\
1|contoso.com\tUCFG:\tbob@contoso.com\troute=smtp:[mx2.example.test]\n\
++++\n",
    )
    .expect("map");
    let metrics = format!("127.0.0.1:{}", nsd::free_port());
    let config = dir.path().join("rcptgate.toml");
    std::fs::write(
        &config,
        format!(
            "[directory]\nsnapshot = \"{snap}\"\n\n[[source]]\nname = \"dirsync\"\nkind = \"map\"\npath = \"{map}\"\n\n\
[socketmap]\nlisten = [\"127.0.0.1:0\"]\n\n[metrics]\nlisten = \"{metrics}\"\n\n\
[dane]\nnameservers = [\"{ns}\"]\ntrust_anchor = \"{anchor}\"\n",
            snap = dir.path().join("snap").display(),
            map = map.display(),
            ns = tb.addr(),
            anchor = tb.anchor().display()
        ),
    )
    .expect("config");
    let d = daemon::Daemon::start(&config);
    d.wait_generation(1);
    // Both route next hops are decided without anyone asking.
    let deadline = Instant::now() + Duration::from_secs(30);
    let dane_only = "rcptgate_dane_decisions_total{policy=\"dane-only\"}";
    while metric(&http_get(&metrics, "/metrics"), dane_only) < 2 {
        assert!(Instant::now() < deadline, "routes not warmed:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sm = d.listener("socketmap");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut s = TcpStream::connect(&sm).await.expect("connect");
        for key in ["[mx1.example.test]:25", "[mx2.example.test]"] {
            assert_eq!(
                common::socketmap_query(&mut s, &format!("tls_policy {key}")).await,
                "OK dane-only"
            );
        }
        assert_eq!(
            common::socketmap_query(&mut s, "recipients alice@contoso.com").await,
            "OK user"
        );
    });
    let m = http_get(&metrics, "/metrics");
    assert_eq!(
        metric(&m, dane_only),
        2,
        "answered from the warm cache:\n{m}"
    );
    assert!(metric(&m, "rcptgate_dane_cache_hits_total") >= 2, "{m}");
    assert_eq!(metric(&m, "rcptgate_dane_cache_entries"), 2, "{m}");
}
