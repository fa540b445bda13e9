//! rcptgate behind a real Postfix (Debian's package), through real SMTP sessions on
//! loopback: a private Postfix instance (own config, queue and data directories; nothing is
//! delivered: `default_transport = discard:`). Needs root and the `postfix` package;
//! `tests/run.sh` installs it. Run with `cargo test --features postfix-tests --test postfix`.
#![cfg(feature = "postfix-tests")]

mod common;
#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/postfix.rs"]
mod postfix;

use common::example_directory;
use daemon::Daemon;
use postfix::Postfix;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use rcptgate::directory::Directory;
use rcptgate::proto::policy::Texts;
use rcptgate::server::{Context, Limits, Protocol, serve};

/// Serve `protocol` for `dir` on a free loopback port, on a runtime of its own.
fn rcptgate(
    rt: &tokio::runtime::Runtime,
    protocol: Protocol,
    dir: Arc<Directory>,
) -> (u16, watch::Sender<bool>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, rx) = watch::channel(false);
    let ctx = Arc::new(Context {
        directory: dir,
        texts: Texts::default(),
        limits: Limits::default(),
        metrics: Default::default(),
        milter: Default::default(),
        dane: None,
    });
    rt.spawn(serve(listener, protocol, ctx, rx));
    (port, stop)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn policy_service_behind_postfix() {
    let rt = runtime();
    let tmp = tempfile::tempdir().expect("tmp");
    let (port, _stop) = rcptgate(&rt, Protocol::Policy, example_directory(true));
    let (cold_port, _stop2) = rcptgate(&rt, Protocol::Policy, example_directory(false));
    let policy = |p: u16| {
        format!(
            "smtpd_recipient_restrictions = check_policy_service {{ inet:127.0.0.1:{p}, timeout=10s, default_action=DEFER_IF_PERMIT }}, permit"
        )
    };
    let pf = Postfix::start(&tmp.path().join("pf"), &[&policy(port)]);
    let got = pf.rcpt(&[
        "alice.andersen@contoso.com",
        "Bob.Berger+news@CONTOSO.com",
        "nobody@contoso.com",
        "anyone@fabrikam-lab.com",
        "someone@unknown-tenant.example",
    ]);
    assert!(got[0].starts_with("250"), "{got:?}\n{}", pf.log());
    assert!(got[1].starts_with("250"), "{got:?}");
    assert!(
        got[2].starts_with("550 5.1.1") && got[2].contains("User unknown"),
        "{got:?}"
    );
    assert!(got[3].starts_with("250"), "{got:?}");
    // Not ours: the policy stays neutral (DUNNO) and Postfix's own rules decide.
    assert!(got[4].starts_with("250"), "{got:?}");
    drop(pf);

    // No snapshot loaded: Postfix defers, never rejects.
    let pf = Postfix::start(&tmp.path().join("pf2"), &[&policy(cold_port)]);
    let got = pf.rcpt(&["alice.andersen@contoso.com", "nobody@contoso.com"]);
    for g in &got {
        assert!(g.starts_with('4'), "{got:?}\n{}", pf.log());
    }
}

#[test]
fn socketmap_behind_postfix() {
    let rt = runtime();
    let tmp = tempfile::tempdir().expect("tmp");
    let (port, _stop) = rcptgate(&rt, Protocol::Socketmap, example_directory(true));
    let (cold_port, _stop2) = rcptgate(&rt, Protocol::Socketmap, example_directory(false));
    let maps = |p: u16| {
        [
            format!("relay_recipient_maps = socketmap:inet:127.0.0.1:{p}:recipients"),
            format!("transport_maps = socketmap:inet:127.0.0.1:{p}:transport"),
        ]
    };
    let m = maps(port);
    let pf = Postfix::start(&tmp.path().join("pf"), &[&m[0], &m[1]]);
    let got = pf.rcpt(&[
        "alice.andersen@contoso.com",
        "carol@contoso.com",
        "nobody@contoso.com",
        "someone@unknown-tenant.example",
    ]);
    assert!(got[0].starts_with("250"), "{got:?}\n{}", pf.log());
    assert!(got[1].starts_with("250"), "{got:?}");
    assert!(got[2].starts_with("550 5.1.1"), "{got:?}");
    // A relay domain the directory does not hold: deferred, not bounced.
    assert!(got[3].starts_with('4'), "{got:?}");
    // Postfix's own socketmap client asks for the per-recipient route.
    let table = format!("socketmap:inet:127.0.0.1:{port}:transport");
    assert_eq!(
        pf.postmap_q("carol@contoso.com", &table),
        (
            true,
            "smtp:[contoso-com.mail.protection.outlook.com]:25".to_owned()
        )
    );
    assert!(
        !pf.postmap_q("nobody@contoso.com", &table).0,
        "NOTFOUND lets Postfix fall back"
    );
    drop(pf);

    let m = maps(cold_port);
    let pf = Postfix::start(&tmp.path().join("pf2"), &[&m[0], &m[1]]);
    let got = pf.rcpt(&["alice.andersen@contoso.com", "nobody@contoso.com"]);
    for g in &got {
        assert!(g.starts_with("451 4.3.0"), "{got:?}\n{}", pf.log());
    }
}

/// The `rcptgate serve` binary on `map`, with its first snapshot published.
fn start_daemon(dir: &Path, map: &Path) -> Daemon {
    let cfg = dir.join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{}\"\ndebounce = \"100ms\"\n\n[[source]]\nname = \"m\"\nkind = \"map\"\npath = \"{}\"\n\n[policy]\nlisten = [\"127.0.0.1:0\"]\n",
            dir.join("snap.bin").display(),
            map.display()
        ),
    )
    .expect("config");
    let d = Daemon::start(&cfg);
    d.wait_generation(1);
    d
}

#[test]
fn live_edits_truncated_uploads_and_sigterm_under_load_through_postfix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("dir.map");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map"))
            .expect("example");
    std::fs::write(&map, &example).expect("map");
    let mut daemon = start_daemon(tmp.path(), &map);
    let restriction = format!(
        "smtpd_recipient_restrictions = check_policy_service {{ inet:{}, timeout=10s, default_action=DEFER_IF_PERMIT }}, permit",
        daemon.policy
    );
    let pf = Postfix::start(&tmp.path().join("pf"), &[&restriction]);
    let got = pf.rcpt(&["new.hire@contoso.com"]);
    assert!(got[0].starts_with("550 5.1.1"), "{got:?}\n{}", pf.log());

    // Edited while running: Postfix sees the new answer without a restart.
    let edited = example.replace(
        "++++\n",
        "10001|contoso.com\tDIR:\tnew.hire@contoso.com\n++++\n",
    );
    std::fs::write(&map, &edited).expect("edit");
    daemon.wait_generation(2);
    assert!(pf.rcpt(&["new.hire@contoso.com"])[0].starts_with("250"));

    // A truncated upload changes nothing.
    let next = edited.replace(
        "++++\n",
        "10001|contoso.com\tDIR:\tlater@contoso.com\n++++\n",
    );
    let failed = daemon.status().reloads_failed;
    std::fs::write(&map, &next[..next.len() - 3]).expect("truncated");
    daemon.failed_after(failed);
    let got = pf.rcpt(&["new.hire@contoso.com", "later@contoso.com"]);
    assert!(
        got[0].starts_with("250") && got[1].starts_with("550 5.1.1"),
        "{got:?}"
    );

    // SIGTERM under load: every RCPT gets its right answer or a temporary failure, never a
    // wrong permanent one.
    let pf = Arc::new(pf);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let pf = pf.clone();
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                for _ in 0..15 {
                    answers.extend(pf.rcpt(&["alice.andersen@contoso.com", "nobody@contoso.com"]));
                }
                answers
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    daemon.signal("-TERM");
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.join().expect("client"));
    }
    assert_eq!(answers.len(), 4 * 15 * 2);
    for pair in answers.chunks(2) {
        let (known, unknown) = (&pair[0], &pair[1]);
        assert!(
            known.starts_with("250") || known.starts_with('4'),
            "known got {known}"
        );
        assert!(
            unknown.starts_with("550 5.1.1") || unknown.starts_with('4'),
            "unknown got {unknown}"
        );
    }
    // The load really spanned the shutdown: answered before it, deferred after it.
    let served = answers.iter().filter(|a| !a.starts_with('4')).count();
    let deferred = answers.len() - served;
    eprintln!("served {served}, deferred {deferred}");
    assert!(
        served > 0 && deferred > 0,
        "served {served}, deferred {deferred}"
    );
    assert!(
        daemon.child.wait().expect("wait").success(),
        "SIGTERM exits 0"
    );
}

/// The `rcptgate serve` binary's milter on `map` (header on), its first snapshot published.
fn start_milter_daemon(dir: &Path, map: &Path) -> Daemon {
    let cfg = dir.join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{}\"\n\n[[source]]\nname = \"m\"\nkind = \"map\"\npath = \"{}\"\n\n\
[milter]\nlisten = [\"127.0.0.1:0\"]\nheader = \"X-Rcptgate-Profile\"\n",
            dir.join("snap.bin").display(),
            map.display()
        ),
    )
    .expect("config");
    Daemon::start(&cfg)
}

#[test]
fn milter_behind_postfix_rejects_at_rcpt_and_tags_each_recipient() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("dir.map");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map"),
        &map,
    )
    .expect("map");
    let daemon = start_milter_daemon(tmp.path(), &map);
    daemon.wait_generation(1);
    let milter = daemon.listener("milter");
    // Messages stay in the hold queue, where their headers can be read.
    let pf = Postfix::start(
        &tmp.path().join("pf"),
        &[
            &format!("smtpd_milters = inet:{milter}"),
            "milter_default_action = tempfail",
            "milter_protocol = 6",
            "smtpd_data_restrictions = check_client_access static:HOLD",
        ],
    );
    let got = pf.rcpt(&[
        "alice@contoso.com",
        "nobody@contoso.com",
        "Bob.Berger+news@contoso.com",
    ]);
    assert!(got[0].starts_with("250"), "{got:?}\n{}", pf.log());
    assert!(got[1].starts_with("550 5.1.1"), "{got:?}");
    assert!(got[2].starts_with("250"), "{got:?}");

    // A message to three recipients, one unknown, with a forged profile header.
    let message = "From: <sender@example.net>\r\nTo: <alice@contoso.com>\r\n\
X-Rcptgate-Profile: executives; rcpt=<mallory@contoso.com>\r\nSubject: test\r\n\r\nhello";
    let (rcpts, end) = pf.session(
        &[
            "alice@contoso.com",
            "nobody@contoso.com",
            "carol@contoso.com",
        ],
        Some(message),
    );
    assert!(rcpts[1].starts_with("550 5.1.1"), "{rcpts:?}");
    assert!(
        end.as_deref().is_some_and(|e| e.starts_with("250")),
        "{end:?}\n{}",
        pf.log()
    );
    let etc = pf.base.join("etc");
    let queue = std::process::Command::new("postqueue")
        .arg("-c")
        .arg(&etc)
        .arg("-j")
        .output()
        .expect("postqueue");
    let queue = String::from_utf8_lossy(&queue.stdout).into_owned();
    let id = queue
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["queue_name"] == "hold")
        .and_then(|v| v["queue_id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no held message: {queue}\n{}", pf.log()));
    let copy = std::process::Command::new("postcat")
        .arg("-c")
        .arg(&etc)
        .args(["-h", "-q", &id])
        .output()
        .expect("postcat");
    let headers = String::from_utf8_lossy(&copy.stdout).into_owned();
    let tags: Vec<&str> = headers
        .lines()
        .filter(|l| l.starts_with("X-Rcptgate-Profile:"))
        .collect();
    assert_eq!(
        tags,
        [
            "X-Rcptgate-Profile: executives; rcpt=<alice@contoso.com>",
            "X-Rcptgate-Profile: standard; rcpt=<carol@contoso.com>",
        ],
        "{headers}"
    );

    // rcptgate stopped: Postfix's milter_default_action, a temporary failure, never an accept.
    drop(daemon);
    let (got, end) = pf.session(&["alice@contoso.com"], Some("Subject: x\r\n\r\nx"));
    assert!(got[0].starts_with("451"), "{got:?}");
    assert_eq!(end, None);
}

#[test]
fn milter_behind_postfix_defers_when_nothing_is_loaded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = start_milter_daemon(tmp.path(), &tmp.path().join("missing.map"));
    daemon.wait("the failed first build", |s| s.reloads_failed > 0);
    let pf = Postfix::start(
        &tmp.path().join("pf"),
        &[
            &format!("smtpd_milters = inet:{}", daemon.listener("milter")),
            "milter_default_action = accept",
            "milter_protocol = 6",
        ],
    );
    // Even with a milter_default_action of accept: rcptgate itself answers 451.
    let got = pf.rcpt(&["alice@contoso.com"]);
    assert!(got[0].starts_with("451 4.3.0"), "{got:?}\n{}", pf.log());
}
