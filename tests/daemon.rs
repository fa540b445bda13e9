//! The `rcptgate serve` daemon as a process: persisted snapshot at start, SIGHUP rebuilds,
//! a truncated upload is refused, SIGTERM drains and exits 0.

#[path = "support/daemon.rs"]
mod daemon;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use daemon::{Daemon, cli};

/// Start the daemon; its metrics address too (every config here has one).
fn start(config: &Path) -> (Daemon, String) {
    let d = Daemon::start(config);
    let metrics = d.listener("metrics");
    (d, metrics)
}

fn write_config(dir: &Path, map: &Path, directory: &str) -> std::path::PathBuf {
    let cfg = dir.join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{}\"\ndebounce = \"150ms\"\n{directory}\n[[source]]\nname = \"m\"\nkind = \"map\"\npath = \"{}\"\n\n[policy]\nlisten = [\"127.0.0.1:0\"]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            dir.join("snap.bin").display(),
            map.display()
        ),
    )
    .expect("config");
    cfg
}

/// GET `path` from the metrics port: (status line, body).
fn http_get(metrics: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(metrics).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The audit log's line for `generation`, once it is there.
fn wait_audit(path: &Path, generation: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(v) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["generation"] == generation)
        {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit line for generation {generation} in\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn example() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map"))
        .expect("example")
}

#[test]
fn watched_edits_refused_uploads_sighup_restart_and_shutdown() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("dir.map");
    let example = example();
    std::fs::write(&map, &example).expect("map");
    let cfg = write_config(tmp.path(), &map, "");
    let audit_log = tmp.path().join("audit.log");
    let mut text = std::fs::read_to_string(&cfg).expect("cfg");
    text.push_str(&format!("\n[audit]\npath = \"{}\"\n", audit_log.display()));
    std::fs::write(&cfg, text).expect("cfg");

    let (mut d, m) = start(&cfg);
    d.wait_generation(1);
    assert_eq!(d.ask("alice@contoso.com"), "action=DUNNO");
    assert_eq!(
        d.ask("new.hire@contoso.com"),
        "action=550 5.1.1 User unknown"
    );
    // Regression: reading a source must not count as a change (it once caused a rebuild
    // loop). Several debounce periods later, still generation 1.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(http_get(&m, "/healthz").0, "HTTP/1.1 200 OK");
    let (status, body) = http_get(&m, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    for want in [
        "rcptgate_lookups_total{frontend=\"policy\",verdict=\"accept\"} 1",
        "rcptgate_lookups_total{frontend=\"policy\",verdict=\"reject\"} 1",
        "rcptgate_request_seconds_count{frontend=\"policy\"} 2",
        "rcptgate_reloads_total{result=\"ok\"} 1",
        "rcptgate_snapshot_generation 1",
        "rcptgate_snapshot_addresses 24",
        "rcptgate_directory_stale 0",
    ] {
        assert!(body.contains(want), "missing {want:?} in\n{body}");
    }
    assert_eq!(http_get(&m, "/nope").0, "HTTP/1.1 404 Not Found");

    // Written in place while running: picked up without a signal.
    let edited = example.replace(
        "++++\n",
        "10001|contoso.com\tDIR:\tnew.hire@contoso.com\n++++\n",
    );
    std::fs::write(&map, &edited).expect("edit");
    d.wait_generation(2);
    // The audit line is written as the snapshot is published (right after the swap).
    let audit = wait_audit(&audit_log, 2);
    assert_eq!(audit["generation"], 2);
    assert_eq!(
        (audit["added"].as_u64(), audit["removed"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(audit["added_sample"][0], "new.hire@contoso.com");
    assert_eq!(d.ask("new.hire@contoso.com"), "action=DUNNO");

    // An upload still without its ++++ (or cut off) is refused: the answers stay.
    let second = edited.replace(
        "++++\n",
        "10001|contoso.com\tDIR:\tsecond.hire@contoso.com\n++++\n",
    );
    let failed = d.status().reloads_failed;
    std::fs::write(&map, &second[..second.len() - 5]).expect("partial");
    let s = d.failed_after(failed);
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("dir.map")),
        "{s:?}"
    );
    assert_eq!(d.ask("new.hire@contoso.com"), "action=DUNNO");
    assert_eq!(
        d.ask("second.hire@contoso.com"),
        "action=550 5.1.1 User unknown"
    );
    // The upload completes, replacing the file by rename.
    let tmpfile = tmp.path().join("dir.map.upload");
    std::fs::write(&tmpfile, &second).expect("upload");
    std::fs::rename(&tmpfile, &map).expect("rename");
    d.wait_generation(3);
    assert_eq!(d.ask("second.hire@contoso.com"), "action=DUNNO");

    // SIGHUP rebuilds too; with nothing new, the generation in service stays.
    let n = d.rebuilds();
    d.signal("-HUP");
    let s = d.after(n);
    assert_eq!(s.generation, Some(3));
    assert_eq!(s.last_build.map(|b| b.outcome), Some("unchanged".into()));

    d.signal("-TERM");
    let status = d.child.wait().expect("wait");
    assert!(status.success(), "{status:?}");

    // Restart with the source gone: the persisted snapshot answers at once.
    std::fs::remove_file(&map).expect("rm");
    let (mut d, _) = start(&cfg);
    assert_eq!(d.status().generation, Some(3));
    assert_eq!(d.ask("second.hire@contoso.com"), "action=DUNNO");
    d.failed_after(0);
    assert_eq!(d.status().generation, Some(3));
    assert_eq!(d.ask("nobody@contoso.com"), "action=550 5.1.1 User unknown");
    d.signal("-TERM");
    assert!(d.child.wait().expect("wait").success());
}

#[test]
fn max_age_turns_unknown_rejects_into_deferrals() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("dir.map");
    std::fs::write(&map, example()).expect("map");
    let cfg = write_config(tmp.path(), &map, "max_age = \"4s\"");
    let (mut d, m) = start(&cfg);
    d.wait_generation(1);
    assert_eq!(d.ask("nobody@contoso.com"), "action=550 5.1.1 User unknown");
    // The source breaks and stays broken past max_age.
    std::fs::remove_file(&map).expect("rm");
    d.failed_after(0);
    d.wait("stale data", |s| s.stale);
    let (_, body) = http_get(&m, "/metrics");
    assert!(body.contains("rcptgate_directory_stale 1"), "{body}");
    assert!(
        d.ask("nobody@contoso.com")
            .starts_with("action=DEFER_IF_PERMIT 4.3.0")
    );
    assert_eq!(d.ask("alice@contoso.com"), "action=DUNNO");
    // It comes back (with the same content: no new generation): rejects are definitive
    // again.
    std::fs::write(&map, example()).expect("map");
    let s = d.wait("fresh data", |s| !s.stale);
    assert_eq!(s.generation, Some(1));
    assert_eq!(d.ask("nobody@contoso.com"), "action=550 5.1.1 User unknown");
    d.signal("-TERM");
    assert!(d.child.wait().expect("wait").success());
}

#[test]
fn without_any_snapshot_everything_is_deferred() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("missing.map");
    let cfg = write_config(tmp.path(), &map, "");
    let (mut d, m) = start(&cfg);
    d.failed_after(0);
    assert!(
        d.ask("alice@contoso.com")
            .starts_with("action=DEFER_IF_PERMIT 4.3.0")
    );
    assert_eq!(
        http_get(&m, "/healthz").0,
        "HTTP/1.1 503 Service Unavailable"
    );
    let (_, body) = http_get(&m, "/metrics");
    assert!(
        body.contains("rcptgate_lookups_total{frontend=\"policy\",verdict=\"tempfail\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("rcptgate_reloads_total{result=\"failed\"} 1"),
        "{body}"
    );
    assert!(body.contains("rcptgate_snapshot_loaded 0"), "{body}");
    d.signal("-TERM");
    assert!(d.child.wait().expect("wait").success());
}

#[test]
fn deletion_guard_status_approve_and_conflicts_over_the_control_socket() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("dir.map");
    let example = example();
    std::fs::write(&map, &example).expect("map");
    let sock = tmp.path().join("control.sock");
    let cfg = write_config(tmp.path(), &map, "");
    let mut text = std::fs::read_to_string(&cfg).expect("cfg");
    text.push_str(&format!(
        "\n[control]\nsocket = \"{}\"\n\n[audit]\npath = \"{}\"\n",
        sock.display(),
        tmp.path().join("audit.log").display()
    ));
    std::fs::write(&cfg, text).expect("cfg");
    let cfg_s = cfg.to_str().expect("utf-8 path");

    let (mut d, m) = start(&cfg);
    d.wait_generation(1);
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket is owner-only");

    // 3 of 24 addresses removed (12.5 %) and one added: the removals are held (the old
    // answers stay), the new hire is accepted at once.
    let gone = [
        "henry.hill@fabrikam.com",
        "ines.ibarra@fabrikam.com",
        "board@fabrikam.com",
    ];
    let edited: String = example
        .lines()
        .filter(|l| !gone.iter().any(|g| l.contains(g)))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace(
            "++++\n",
            "20002|fabrikam.com\tDIR:\tnew.hire@fabrikam.com\n++++\n",
        );
    assert_eq!(
        d.ask("new.hire@fabrikam.com"),
        "action=550 5.1.1 User unknown"
    );
    std::fs::write(&map, &edited).expect("edit");
    let s = d.wait("held removals", |s| s.held.is_some());
    assert_eq!(s.generation, Some(2));
    assert_eq!(d.ask("new.hire@fabrikam.com"), "action=DUNNO");
    assert_eq!(d.ask("henry.hill@fabrikam.com"), "action=DUNNO");
    assert_eq!(d.ask("board@fabrikam.com"), "action=DUNNO");
    let (_, body) = http_get(&m, "/metrics");
    assert!(body.contains("rcptgate_guard_held 1"), "{body}");
    assert!(body.contains("rcptgate_guard_held_removals 3"), "{body}");
    let (ok, out) = cli(&["status", "--config", cfg_s]);
    assert!(ok, "{out}");
    assert!(out.contains("REMOVALS HELD by the deletion guard"), "{out}");
    assert!(out.contains("removes 3 of 24 addresses"), "{out}");
    assert!(out.contains("    henry.hill@fabrikam.com"), "{out}");

    let (ok, out) = cli(&["approve", "--config", cfg_s]);
    assert!(ok, "{out}");
    assert!(
        out.contains("generation 3 in service (3 addresses removed)"),
        "{out}"
    );
    assert_eq!(d.status().generation, Some(3));
    // Removed, but within the grace period: still accepted, as tombstones.
    assert_eq!(d.ask("henry.hill@fabrikam.com"), "action=DUNNO");
    assert_eq!(d.ask("new.hire@fabrikam.com"), "action=DUNNO");
    let (ok, out) = cli(&["approve", "--config", cfg_s]);
    assert!(!ok && out.contains("no build is held"), "{out}");

    let (ok, out) = cli(&["conflicts", "--config", cfg_s]);
    assert!(ok, "{out}");
    assert!(out.contains("3 tombstoned address(es)"), "{out}");
    assert!(out.contains("board@fabrikam.com  removed 20"), "{out}");
    assert!(
        out.contains("7d 0h left") || out.contains("6d 23h left"),
        "{out}"
    );
    let csv_path = tmp.path().join("conflicts.csv");
    let (ok, out) = cli(&[
        "conflicts",
        "--config",
        cfg_s,
        "export",
        "--output",
        csv_path.to_str().expect("path"),
    ]);
    assert!(ok, "{out}");
    let csv = std::fs::read_to_string(&csv_path).expect("csv");
    assert!(csv.starts_with("type,address,removed,"), "{csv}");
    assert_eq!(
        csv.lines().filter(|l| l.starts_with("tombstone,")).count(),
        3
    );

    // Delete one by hand (any case): rejected at once. Keep another.
    let (ok, out) = cli(&[
        "conflicts",
        "--config",
        cfg_s,
        "delete",
        "Henry.Hill@FABRIKAM.com",
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        d.ask("henry.hill@fabrikam.com"),
        "action=550 5.1.1 User unknown"
    );
    let (ok, out) = cli(&["conflicts", "--config", cfg_s, "keep", "board@fabrikam.com"]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&[
        "conflicts",
        "--config",
        cfg_s,
        "delete",
        "nobody@fabrikam.com",
    ]);
    assert!(!ok && out.contains("no such tombstone"), "{out}");
    let (ok, out) = cli(&["status", "--config", cfg_s, "--json"]);
    assert!(ok, "{out}");
    let s: rcptgate::service::Status = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(s.tombstones, 2);
    assert_eq!(s.held, None);
    let (_, body) = http_get(&m, "/metrics");
    assert!(body.contains("rcptgate_tombstones 2"), "{body}");
    assert!(body.contains("rcptgate_guard_held 0"), "{body}");
    assert!(
        body.contains("rcptgate_tombstone_accepts_total 1"),
        "{body}"
    );

    // The audit log has the hold, the approval and the publish after the deletion.
    let audit = std::fs::read_to_string(tmp.path().join("audit.log")).expect("audit");
    let events: Vec<String> = audit
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["event"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(events, ["publish", "held", "approved", "publish"]);

    d.signal("-TERM");
    assert!(d.child.wait().expect("wait").success());
    assert!(!sock.exists(), "control socket removed on exit");
    // Without a daemon the CLI says so.
    let (ok, out) = cli(&["status", "--config", cfg_s]);
    assert!(!ok && out.contains("is `rcptgate serve` running"), "{out}");
}
