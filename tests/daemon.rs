//! The `rcptgate serve` daemon as a process: persisted snapshot at start, SIGHUP rebuilds,
//! a truncated upload is refused, SIGTERM drains and exits 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read but not yet matched by `wait_for`.
    backlog: Vec<String>,
    policy: String,
    metrics: String,
}

impl Drop for Daemon {
    /// Never leave a daemon behind, whatever the test did.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rcptgate"))
        .args(["serve", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut d = Daemon {
        child,
        lines,
        backlog: Vec::new(),
        policy: String::new(),
        metrics: String::new(),
    };
    let line = d.peek_for("policy listening on ");
    d.policy = line.rsplit(' ').next().expect("addr").to_owned();
    let line = d.peek_for("metrics listening on ");
    d.metrics = line.rsplit(' ').next().expect("addr").to_owned();
    d
}

impl Daemon {
    /// Wait until the daemon has said `needle`; earlier lines stay available.
    fn peek_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.backlog.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("daemon never said {needle:?}: {:#?}", self.backlog));
            match self.lines.recv_timeout(left) {
                Ok(l) => self.backlog.push(l),
                Err(_) => panic!("daemon never said {needle:?}: {:#?}", self.backlog),
            }
        }
    }

    /// Wait until the daemon has said `needle`, and forget everything up to it.
    fn wait_for(&mut self, needle: &str) -> String {
        let line = self.peek_for(needle);
        let at = self.backlog.iter().position(|l| *l == line).unwrap_or(0);
        self.backlog.drain(..=at);
        line
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    fn ask(&self, rcpt: &str) -> String {
        let mut s = TcpStream::connect(&self.policy).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient={rcpt}\n\n"
        )
        .expect("write");
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\n\n") {
            let n = s.read(&mut byte).expect("read");
            assert!(n > 0, "closed");
            reply.push(byte[0]);
        }
        String::from_utf8_lossy(&reply).trim().to_owned()
    }
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
fn http_get(d: &Daemon, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(&d.metrics).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
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

    let mut d = start(&cfg);
    d.wait_for("published generation 1");
    assert_eq!(d.ask("alice@contoso.com"), "action=DUNNO");
    assert_eq!(
        d.ask("new.hire@contoso.com"),
        "action=550 5.1.1 User unknown"
    );
    // Regression: reading a source must not count as a change (it once caused a rebuild
    // loop). Several debounce periods later, still generation 1.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(http_get(&d, "/healthz").0, "HTTP/1.1 200 OK");
    let (status, body) = http_get(&d, "/metrics");
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
    assert_eq!(http_get(&d, "/nope").0, "HTTP/1.1 404 Not Found");

    // Written in place while running: picked up without a signal.
    let edited = example.replace(
        "++++\n",
        "10001|contoso.com\tDIR:\tnew.hire@contoso.com\n++++\n",
    );
    std::fs::write(&map, &edited).expect("edit");
    // The audit line is written as the snapshot is published, before the summary line.
    let audit = d.wait_for("rcptgate: audit ");
    d.wait_for("published generation 2");
    let audit: serde_json::Value =
        serde_json::from_str(audit.trim_start_matches("rcptgate: audit ")).expect("json");
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
    std::fs::write(&map, &second[..second.len() - 5]).expect("partial");
    d.wait_for("rebuild failed, snapshot in service kept");
    assert_eq!(d.ask("new.hire@contoso.com"), "action=DUNNO");
    assert_eq!(
        d.ask("second.hire@contoso.com"),
        "action=550 5.1.1 User unknown"
    );
    // The upload completes, replacing the file by rename.
    let tmpfile = tmp.path().join("dir.map.upload");
    std::fs::write(&tmpfile, &second).expect("upload");
    std::fs::rename(&tmpfile, &map).expect("rename");
    d.wait_for("published generation 3");
    assert_eq!(d.ask("second.hire@contoso.com"), "action=DUNNO");

    // SIGHUP rebuilds too; with nothing new, the generation in service stays.
    d.signal("-HUP");
    d.wait_for("no change: generation 3 stays in service");

    d.signal("-TERM");
    let status = d.child.wait().expect("wait");
    assert!(status.success(), "{status:?}");

    // Restart with the source gone: the persisted snapshot answers at once.
    std::fs::remove_file(&map).expect("rm");
    let mut d = start(&cfg);
    d.wait_for("serving persisted snapshot, generation 3");
    assert_eq!(d.ask("second.hire@contoso.com"), "action=DUNNO");
    d.wait_for("rebuild failed, snapshot in service kept");
    assert_eq!(d.ask("nobody@contoso.com"), "action=550 5.1.1 User unknown");
    d.signal("-TERM");
    assert!(d.child.wait().expect("wait").success());
}

#[test]
fn max_age_turns_unknown_rejects_into_deferrals() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("dir.map");
    std::fs::write(&map, example()).expect("map");
    let cfg = write_config(tmp.path(), &map, "max_age = \"1s\"");
    let mut d = start(&cfg);
    d.wait_for("published generation 1");
    assert_eq!(d.ask("nobody@contoso.com"), "action=550 5.1.1 User unknown");
    // The source breaks and stays broken past max_age.
    std::fs::remove_file(&map).expect("rm");
    d.wait_for("rebuild failed");
    d.wait_for("unknown recipients are now deferred");
    assert!(
        d.ask("nobody@contoso.com")
            .starts_with("action=DEFER_IF_PERMIT 4.3.0")
    );
    assert_eq!(d.ask("alice@contoso.com"), "action=DUNNO");
    // It comes back (with the same content: no new generation): rejects are definitive
    // again.
    std::fs::write(&map, example()).expect("map");
    d.wait_for("no change: generation 1 stays in service");
    d.wait_for("directory fresh again");
    assert_eq!(d.ask("nobody@contoso.com"), "action=550 5.1.1 User unknown");
    d.signal("-TERM");
    assert!(d.child.wait().expect("wait").success());
}

#[test]
fn without_any_snapshot_everything_is_deferred() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("missing.map");
    let cfg = write_config(tmp.path(), &map, "");
    let mut d = start(&cfg);
    d.wait_for("rebuild failed");
    assert!(
        d.ask("alice@contoso.com")
            .starts_with("action=DEFER_IF_PERMIT 4.3.0")
    );
    assert_eq!(
        http_get(&d, "/healthz").0,
        "HTTP/1.1 503 Service Unavailable"
    );
    let (_, body) = http_get(&d, "/metrics");
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

/// `rcptgate` run as a command; (success, stdout + stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rcptgate"))
        .args(args)
        .output()
        .expect("run rcptgate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
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

    let mut d = start(&cfg);
    d.wait_for("published generation 1");
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket is owner-only");

    // 3 of 24 addresses removed (12.5 %): held; the old answers stay.
    let gone = [
        "henry.hill@fabrikam.com",
        "ines.ibarra@fabrikam.com",
        "board@fabrikam.com",
    ];
    let edited: String = example
        .lines()
        .filter(|l| !gone.iter().any(|g| l.contains(g)))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&map, &edited).expect("edit");
    d.wait_for("deletion guard: holding generation 2");
    assert_eq!(d.ask("henry.hill@fabrikam.com"), "action=DUNNO");
    let (_, body) = http_get(&d, "/metrics");
    assert!(body.contains("rcptgate_guard_held 1"), "{body}");
    assert!(body.contains("rcptgate_guard_held_removals 3"), "{body}");
    let (ok, out) = cli(&["status", "--config", cfg_s]);
    assert!(ok, "{out}");
    assert!(out.contains("HELD by the deletion guard"), "{out}");
    assert!(out.contains("removes 3 of 24 addresses"), "{out}");
    assert!(out.contains("    henry.hill@fabrikam.com"), "{out}");

    let (ok, out) = cli(&["approve", "--config", cfg_s]);
    assert!(ok, "{out}");
    assert!(out.contains("published generation 2"), "{out}");
    d.wait_for("published generation 2");
    // Removed, but within the grace period: still accepted, as tombstones.
    assert_eq!(d.ask("henry.hill@fabrikam.com"), "action=DUNNO");
    d.wait_for("accepted henry.hill@fabrikam.com as a tombstone");
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
    let s: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(s["tombstones"], 2);
    assert_eq!(s["held"], serde_json::Value::Null);
    let (_, body) = http_get(&d, "/metrics");
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
