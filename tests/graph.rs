//! The Microsoft Graph source against a local fake of the token endpoint and Graph
//! (tests/support/graph.rs, HTTPS with its own CA): full sync paged, the AD mapping rules,
//! delta sync with `@removed`, an expired delta token, throttling, every credential and
//! permission error, a certificate credential, a user filter as an advanced query; and the
//! daemon: an alias added in the tenant accepted after the next delta sync, a removed user
//! tombstoned, the server going away keeping the snapshot. Needs `openssl` (tests/run.sh).
#![cfg(feature = "ldap-tests")]

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/graph.rs"]
mod graph;
#[path = "support/slapd.rs"]
mod slapd;

use std::sync::Arc;
use std::time::Duration;

use graph::{CLIENT, FakeGraph, SECRET, TENANT, Tenant, user};
use rcptgate::sources::graph::{self as g, Credential, GraphConfig, GraphError, Synced};
use rcptgate::sources::ldap::PasswordSource;
use serde_json::json;

fn tenant() -> Tenant {
    let mut t = Tenant {
        secret: SECRET.into(),
        ..Tenant::default()
    };
    t.user(
        "u1",
        user(
            "u1",
            "alice@contoso.com",
            &["a@contoso.com", "alice@contoso.de"],
        ),
    );
    t.user("u2", user("u2", "bob@contoso.com", &[]));
    t.user("u3", user("u3", "carol@contoso.com", &[]));
    // A shared mailbox: a disabled account with a mailbox.
    let mut shared = user("u4", "info@contoso.com", &[]);
    shared["accountEnabled"] = json!(false);
    t.user("u4", shared);
    // A guest and a user with a login name but no mailbox.
    let mut guest = user("u5", "partner@fabrikam.example", &[]);
    guest["userType"] = json!("Guest");
    t.user("u5", guest);
    t.user(
        "u6",
        json!({"id": "u6", "mail": null, "userPrincipalName": "svc-backup@contoso.com",
            "accountEnabled": true, "userType": "Member", "proxyAddresses": []}),
    );
    // Only the primary in `mail`, no proxy addresses (cloud-only user without Exchange attributes).
    t.user(
        "u7",
        json!({"id": "u7", "mail": "dave@contoso.com", "userPrincipalName": "dave@contoso.onmicrosoft.com",
            "accountEnabled": true, "userType": "Member", "proxyAddresses": []}),
    );
    t.group(
        "g1",
        json!({"id": "g1", "mail": "sales@contoso.com", "mailEnabled": true, "securityEnabled": false,
            "groupTypes": [], "proxyAddresses": ["SMTP:sales@contoso.com", "smtp:vertrieb@contoso.de"]}),
    );
    t.group(
        "g2",
        json!({"id": "g2", "mail": null, "mailEnabled": false, "securityEnabled": true, "groupTypes": [], "proxyAddresses": []}),
    );
    t.group(
        "g3",
        json!({"id": "g3", "mail": "team@contoso.com", "mailEnabled": true, "securityEnabled": false,
            "groupTypes": ["Unified"], "proxyAddresses": ["SMTP:team@contoso.com"]}),
    );
    t
}

fn config(fake: &FakeGraph) -> GraphConfig {
    let mut c = GraphConfig::new(
        TENANT,
        CLIENT,
        Credential::Secret(PasswordSource::Env("RCPTGATE_TEST_GRAPH_SECRET".into())),
    );
    c.authority = fake.url.clone();
    c.graph_url = fake.url.clone();
    c.ca_file = Some(fake.ca.clone());
    c.page_size = 2;
    c.timeout = Duration::from_secs(10);
    c.retries = 3;
    c
}

fn secret_file(dir: &std::path::Path, secret: &str) -> Credential {
    let p = dir.join(format!("secret-{}", secret.len()));
    std::fs::write(&p, format!("{secret}\n")).expect("secret");
    Credential::Secret(PasswordSource::File(p))
}

fn addresses(d: &rcptgate::sources::SourceData) -> Vec<String> {
    let mut v: Vec<String> = d
        .entries
        .iter()
        .map(|e| format!("{}@{} {}", e.local, e.domain, e.kind.as_str()))
        .collect();
    v.sort();
    v
}

fn name() -> Arc<str> {
    Arc::from("entra")
}

#[test]
fn full_then_delta_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeGraph::start(dir.path(), tenant());
    let mut cfg = config(&fake);
    cfg.credential = secret_file(dir.path(), SECRET);
    let Synced::Full(data, mark) =
        g::sync(&name(), &cfg, None, 1000, Duration::from_secs(3600), |_| {}).expect("full")
    else {
        panic!("first sync is full")
    };
    assert_eq!(
        addresses(&data),
        [
            "a@contoso.com alias",
            "alice@contoso.com user",
            "alice@contoso.de alias",
            "bob@contoso.com user",
            "carol@contoso.com user",
            "dave@contoso.com user",
            "info@contoso.com shared",
            "sales@contoso.com group",
            "team@contoso.com group",
            "vertrieb@contoso.de alias",
        ]
    );
    // Pages of 2: the nextLinks were followed; groups asked with their filter.
    fake.with(|t| {
        assert!(
            t.requests
                .iter()
                .filter(|r| r.contains("/v1.0/users?"))
                .count()
                >= 4
        );
        assert!(
            t.requests
                .iter()
                .any(|r| r.contains("/v1.0/groups?") && r.contains("mailEnabled"))
        );
        assert!(t.requests.iter().any(|r| r.contains("$deltatoken=latest")));
        assert_eq!(t.tokens, 1, "one token for the whole sync");
    });

    // Changes in the tenant: an alias for bob, carol deleted, a new user.
    fake.with(|t| {
        t.user("u2", user("u2", "bob@contoso.com", &["robert@contoso.com"]));
        t.remove_user("u3");
        t.user("u8", user("u8", "erin@contoso.com", &[]));
    });
    let Synced::Incremental {
        data,
        mark: mark2,
        changed,
    } = g::sync(
        &name(),
        &cfg,
        Some(&mark),
        1100,
        Duration::from_secs(3600),
        |_| {},
    )
    .expect("delta")
    else {
        panic!("a delta sync")
    };
    assert_eq!(changed, 3);
    let a = addresses(&data);
    assert!(a.contains(&"robert@contoso.com alias".to_owned()), "{a:?}");
    assert!(a.contains(&"erin@contoso.com user".to_owned()), "{a:?}");
    assert!(!a.iter().any(|x| x.starts_with("carol@")), "{a:?}");
    assert_eq!(a.len(), 11);
    // Nothing more changed: unchanged, no rebuild needed.
    assert!(matches!(
        g::sync(
            &name(),
            &cfg,
            Some(&mark2),
            1200,
            Duration::from_secs(3600),
            |_| {}
        ),
        Ok(Synced::Unchanged(_))
    ));
    // A delta token Graph no longer knows: a full sync instead.
    fake.with(|t| {
        t.oldest_token = t.version + 1;
        t.user("u9", user("u9", "frank@contoso.com", &[]));
    });
    let r = g::sync(
        &name(),
        &cfg,
        Some(&mark2),
        1300,
        Duration::from_secs(3600),
        |_| {},
    )
    .expect("fallback");
    assert!(matches!(r, Synced::Full(..)), "{r:?}");
    // After full_interval: a full sync whatever the links say.
    let r = g::sync(
        &name(),
        &cfg,
        Some(&mark2),
        1000 + 3600,
        Duration::from_secs(3600),
        |_| {},
    );
    assert!(matches!(r, Ok(Synced::Full(..))));
}

#[test]
fn throttling_honours_retry_after_then_gives_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeGraph::start(dir.path(), tenant());
    let mut cfg = config(&fake);
    cfg.credential = secret_file(dir.path(), SECRET);
    cfg.page_size = 999;
    fake.with(|t| t.throttle.extend([Some(1), None]));
    let r = g::sync(&name(), &cfg, None, 1000, Duration::from_secs(3600), |_| {});
    assert!(matches!(r, Ok(Synced::Full(..))), "{r:?}");
    // The throttled request was asked again: 2 extra requests.
    fake.with(|t| {
        let first = t.requests[0].clone();
        assert_eq!(
            t.requests.iter().filter(|r| **r == first).count(),
            3,
            "{:?}",
            t.requests
        );
    });
    fake.with(|t| t.throttle.extend([None; 10]));
    cfg.retries = 1;
    let e = g::sync(&name(), &cfg, None, 1000, Duration::from_secs(3600), |_| {})
        .expect_err("throttled");
    assert!(
        matches!(
            e,
            GraphError::Throttled {
                status: 429,
                attempts: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn credential_and_permission_errors_say_what_to_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeGraph::start(dir.path(), tenant());
    let sync = |cfg: &GraphConfig| {
        g::sync(&name(), cfg, None, 1000, Duration::from_secs(3600), |_| {})
            .expect_err("fails")
            .to_string()
    };
    let mut cfg = config(&fake);
    cfg.credential = secret_file(dir.path(), "wrong-secret");
    let e = sync(&cfg);
    assert!(
        e.contains("AADSTS7000215") && e.contains("secret's value"),
        "{e}"
    );
    assert!(
        !e.contains("wrong-secret"),
        "the secret is never shown: {e}"
    );
    cfg.credential = secret_file(dir.path(), SECRET);
    fake.with(|t| t.secret_expired = true);
    let e = sync(&cfg);
    assert!(e.contains("expired") && e.contains("new one"), "{e}");
    fake.with(|t| t.secret_expired = false);
    let mut other = cfg.clone();
    other.tenant_id = "contoso.onmicrosoft.example".into();
    let e = sync(&other);
    assert!(e.contains("AADSTS90002") && e.contains("tenant_id"), "{e}");
    let mut other = cfg.clone();
    other.client_id = "00000000-0000-0000-0000-000000000000".into();
    let e = sync(&other);
    assert!(e.contains("AADSTS700016") && e.contains("client_id"), "{e}");
    let mut other = cfg.clone();
    other.credential = Credential::Secret(PasswordSource::Env("RCPTGATE_NO_SUCH_VARIABLE".into()));
    let e = sync(&other);
    assert!(
        e.contains("client_secret_env RCPTGATE_NO_SUCH_VARIABLE is not set"),
        "{e}"
    );
    fake.with(|t| t.deny.push("users".into()));
    let e = sync(&cfg);
    assert!(e.contains("User.Read.All") && e.contains("consent"), "{e}");
    fake.with(|t| t.deny = vec!["groups".into()]);
    let e = sync(&cfg);
    assert!(e.contains("Group.Read.All"), "{e}");
    fake.with(|t| t.deny.clear());
    // Our own CA is not among the system roots: refused, never unverified.
    let mut other = cfg.clone();
    other.ca_file = None;
    let e = sync(&other);
    assert!(e.contains("cannot reach") && e.contains("ca_file"), "{e}");
    // Nothing listens.
    let mut other = cfg.clone();
    let port = slapd::free_port();
    other.authority = format!("https://127.0.0.1:{port}");
    other.graph_url = other.authority.clone();
    let e = sync(&other);
    assert!(e.contains("cannot reach"), "{e}");
}

#[test]
fn a_certificate_credential_signs_the_assertion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, cert) = (dir.path().join("app.key"), dir.path().join("app.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=rcptgate-app",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let mut t = tenant();
    t.assertion_cert = Some(std::fs::read(&cert).expect("cert"));
    let fake = FakeGraph::start(dir.path(), t);
    let mut cfg = config(&fake);
    cfg.credential = Credential::Certificate {
        key: key.clone(),
        cert: cert.clone(),
    };
    let r = g::sync(&name(), &cfg, None, 1000, Duration::from_secs(3600), |_| {});
    assert!(matches!(r, Ok(Synced::Full(..))), "{r:?}");
    // Another key for the same certificate: refused.
    let other = dir.path().join("other.key");
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&other)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let fake2 = FakeGraph::start(dir.path(), {
        let mut t = tenant();
        t.assertion_cert = Some(std::fs::read(&cert).expect("cert"));
        t
    });
    let mut cfg2 = config(&fake2);
    cfg2.credential = Credential::Certificate { key: other, cert };
    let e = g::sync(
        &name(),
        &cfg2,
        None,
        1000,
        Duration::from_secs(3600),
        |_| {},
    )
    .expect_err("wrong key");
    assert!(e.to_string().contains("token request refused"), "{e}");
}

#[test]
fn a_user_filter_is_an_advanced_query_and_syncs_in_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = tenant();
    t.user("x1", user("x1", "someone@fabrikam.example", &[]));
    let fake = FakeGraph::start(dir.path(), t);
    let mut cfg = config(&fake);
    cfg.credential = secret_file(dir.path(), SECRET);
    cfg.user_filter = Some("endsWith(mail,'@contoso.com')".into());
    let Synced::Full(data, mark) =
        g::sync(&name(), &cfg, None, 1000, Duration::from_secs(3600), |_| {}).expect("full")
    else {
        panic!("full")
    };
    let a = addresses(&data);
    assert!(!a.iter().any(|x| x.contains("fabrikam")), "{a:?}");
    assert!(a.contains(&"alice@contoso.com user".to_owned()));
    assert!(mark.users.is_none(), "no delta with a filter");
    fake.with(|t| {
        assert!(t.consistency.iter().any(|c| c == "eventual"));
        assert!(t.requests.iter().any(|r| r.contains("$count=true")));
    });
    // The next sync is a full one again.
    let r = g::sync(
        &name(),
        &cfg,
        Some(&mark),
        1100,
        Duration::from_secs(3600),
        |_| {},
    );
    assert!(matches!(r, Ok(Synced::Full(..))));
}

#[test]
fn the_daemon_follows_the_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeGraph::start(dir.path(), tenant());
    let config = graph::daemon_config(
        dir.path(),
        &fake,
        "interval = \"1s\"\nfull_interval = \"1h\"\ndomains = [\"contoso.com\", \"contoso.de\"]",
        "[policy]\nlisten = [\"127.0.0.1:0\"]\n\n[guard]\ndeletion_grace = \"7d\"\n",
    );
    let d = daemon::Daemon::start(&config);
    d.wait_generation(1);
    assert!(
        d.ask("alice@contoso.de").contains("action=DUNNO"),
        "accepted"
    );
    assert!(d.ask("robert@contoso.com").contains("550"), "not yet");
    // An alias added and a user removed in the tenant: the next delta sync has them.
    fake.with(|t| {
        t.user("u2", user("u2", "bob@contoso.com", &["robert@contoso.com"]));
        t.remove_user("u3");
    });
    let s = d.wait("a delta sync with the change", |s| {
        s.syncs
            .iter()
            .any(|x| x.kind == "incremental" && x.changed >= 2)
            && s.generation.unwrap_or(0) >= 2
    });
    assert!(s.tombstones >= 1, "{s:?}");
    assert!(d.ask("robert@contoso.com").contains("action=DUNNO"));
    // Carol is a tombstone: still accepted for the grace period.
    assert!(d.ask("carol@contoso.com").contains("action=DUNNO"));
    // The tenant goes away: syncs fail, the snapshot stays in service.
    let g = s.generation;
    fake.shutdown();
    let s = d.wait("a failed sync", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("entra"))
    });
    assert_eq!(s.generation, g);
    assert!(d.ask("robert@contoso.com").contains("action=DUNNO"));
    assert!(d.ask("nobody@contoso.com").contains("550"));
}

fn cli_config(dir: &std::path::Path, fake: &FakeGraph) -> std::path::PathBuf {
    let config = dir.join("cli.toml");
    std::fs::write(&config, graph::source_block(dir, fake)).expect("config");
    config
}

/// A daemon on this fake syncing hourly (so only the test's own steps change it), with a
/// policy listener.
fn hourly_daemon_config(dir: &std::path::Path, fake: &FakeGraph) -> std::path::PathBuf {
    graph::daemon_config(
        dir,
        fake,
        "interval = \"1h\"",
        "[policy]\nlisten = [\"127.0.0.1:0\"]\n",
    )
}

#[test]
fn graph_test_and_sync_once_on_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeGraph::start(dir.path(), tenant());
    let config = cli_config(dir.path(), &fake);
    let c = config.display().to_string();
    let (ok, out) = daemon::cli(&["graph-test", "--config", &c]);
    assert!(ok, "{out}");
    // The README shows this output.
    println!("{out}");
    for want in [
        "ok    token",
        "User.Read.All: /users readable",
        "Group.Read.All: /groups readable",
        "Directory.Read.All: tenant \"Contoso\", verified domains: contoso.com, contoso.de",
        "10 addresses",
        "ok    sample       alice@contoso.com user",
        "credentials end: 2027-05-01T00:00:00Z",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    fake.with(|t| {
        t.deny.push("users".into());
        t.deny.push("applications".into());
    });
    let (ok, out) = daemon::cli(&["graph-test", "--config", &c]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL  permission")
            && out.contains("fix: add the application permission User.Read.All"),
        "{out}"
    );
    fake.with(|t| t.deny.retain(|d| d != "users"));
    let (ok, out) = daemon::cli(&["graph-test", "--config", &c]);
    assert!(ok, "{out}");
    assert!(
        out.contains("WARN  expiry") && out.contains("Application.Read.All"),
        "{out}"
    );
    // One full sync to a MAP file that a file source (or another gateway) can read.
    let map = dir.path().join("entra.map");
    let (ok, out) = daemon::cli(&[
        "sync",
        "--once",
        "--config",
        &c,
        "--output",
        &map.display().to_string(),
    ]);
    assert!(ok, "{out}");
    let data = rcptgate::sources::load(rcptgate::sources::Format::Map, &map).expect("map");
    assert_eq!(data.entries.len(), 10);
}

#[test]
fn a_restart_continues_from_the_delta_links() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeGraph::start(dir.path(), tenant());
    let config = hourly_daemon_config(dir.path(), &fake);
    let d = daemon::Daemon::start(&config);
    let s = d.wait_generation(1);
    assert_eq!(s.syncs[0].kind, "full");
    assert!(dir.path().join("snap.graph-entra.json").exists());
    drop(d);
    fake.with(|t| t.user("u2", user("u2", "bob@contoso.com", &["bobby@contoso.com"])));
    let d = daemon::Daemon::start(&config);
    let s = d.wait("the first sync after the restart", |s| !s.syncs.is_empty());
    assert_eq!(s.syncs[0].kind, "incremental", "{s:?}");
    assert_eq!(s.syncs[0].changed, 1);
    d.wait_generation(2);
    assert!(d.ask("bobby@contoso.com").contains("action=DUNNO"));
    assert!(d.ask("alice@contoso.de").contains("action=DUNNO"));
}

#[test]
fn provision_on_demand_from_the_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeGraph::start(dir.path(), tenant());
    let config = hourly_daemon_config(dir.path(), &fake);
    let d = daemon::Daemon::start(&config);
    d.wait_generation(1);
    fake.with(|t| {
        t.user(
            "u10",
            user("u10", "gina@contoso.com", &["g.new@contoso.com"]),
        )
    });
    assert!(
        d.ask("g.new@contoso.com").contains("550"),
        "not before the next sync"
    );
    let c = config.display().to_string();
    // By proxy address (an advanced query), then applied.
    let (ok, out) = daemon::cli(&["sync", "--object", "g.new@contoso.com", "--config", &c]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok    found        users/u10 (gina@contoso.com)"),
        "{out}"
    );
    assert!(
        out.contains("ok    mapping      g.new@contoso.com: alias"),
        "{out}"
    );
    assert!(
        out.contains("snapshot     gina@contoso.com: not in service"),
        "{out}"
    );
    let (ok, out) = daemon::cli(&[
        "sync",
        "--object",
        "gina@contoso.com",
        "--apply",
        "--config",
        &c,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("applied      generation 2"), "{out}");
    // The README shows this output.
    println!("{out}");
    assert!(d.ask("g.new@contoso.com").contains("action=DUNNO"));
    // A guest is left out, with why.
    let (ok, out) = daemon::cli(&[
        "sync",
        "--object",
        "partner@fabrikam.example",
        "--apply",
        "--config",
        &c,
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("guest"), "{out}");
    // Nothing by that name.
    let (ok, out) = daemon::cli(&["sync", "--object", "nobody@contoso.com", "--config", &c]);
    assert!(!ok && out.contains("FAIL  found"), "{out}");
}
