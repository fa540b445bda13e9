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
