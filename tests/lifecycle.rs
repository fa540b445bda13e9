//! The directory lifecycle (DESIGN.md §6) through the loader and the real policy service on
//! loopback: the deletion guard holds a build that removes too much, tombstones keep removed
//! addresses accepted for the grace period across restarts (an injected clock, no sleeps),
//! exceptions beat additions beat the directory, and the audit log rotates.

#[path = "support/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcptgate::config::Config;
use rcptgate::directory::{Directory, Kind, LookupOptions, Verdict};
use rcptgate::proto::policy::Texts;
use rcptgate::server::{Context, Limits, Protocol, serve};
use rcptgate::sync::loader::{Clock, LoadError, Loader, Outcome};

use daemon::ask;

const DAY: u64 = 86_400;
const T0: u64 = 1_800_000_000;

/// A MAP upload for contoso.test with users u0..u{n}, minus those in `without`.
fn map_text(n: usize, without: &[usize], extra: &str) -> String {
    let mut s = String::from(
        "7|contoso.test\tDOMAIN:\tcontoso.test\troute=smtp:[onprem.contoso.test]:25\n\
7|catchall.test\tDOMAIN:\tcatchall.test\taccept_all=yes\n",
    );
    for i in (0..n).filter(|i| !without.contains(i)) {
        s.push_str(&format!("7|contoso.test\tDIR:\tu{i}@contoso.test\n"));
    }
    s.push_str(extra);
    s.push_str("++++\n");
    s
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir_path: PathBuf,
    map: PathBuf,
    now: Arc<AtomicU64>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir_path = tmp.path().to_path_buf();
        Fixture {
            map: dir_path.join("dir.map"),
            dir_path,
            _tmp: tmp,
            now: Arc::new(AtomicU64::new(T0)),
        }
    }

    fn config(&self, extra: &str) -> Config {
        let text = format!(
            "[directory]\nsnapshot = \"{d}/snap.bin\"\n\n[[source]]\nname = \"dir\"\nkind = \"map\"\npath = \"{m}\"\n\n\
{extra}\n[policy]\nlisten = [\"127.0.0.1:0\"]\n",
            d = self.dir_path.display(),
            m = self.map.display()
        );
        Config::parse("test.toml", &text).expect("config")
    }

    fn clock(&self) -> Clock {
        let now = self.now.clone();
        Arc::new(move || now.load(Ordering::Relaxed))
    }

    /// A daemon's worth of state: a fresh directory and loader (as after a restart).
    fn loader(&self, extra: &str) -> Loader {
        let dir = Arc::new(Directory::new(LookupOptions::default()));
        let mut l = Loader::new(self.config(extra), dir, self.clock()).expect("loader");
        l.open_persisted().expect("persisted");
        l
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.map, text).expect("map");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir_path.join(name)
    }
}

fn kind(l: &Loader, rcpt: &str) -> Option<Kind> {
    match l.directory().verdict(rcpt) {
        Verdict::Accept(h) => Some(h.kind),
        _ => None,
    }
}

/// A build in service: published, or the same content as the snapshot in service.
fn published(o: Result<Outcome, LoadError>) -> rcptgate::sync::loader::Report {
    match o.expect("rebuild") {
        Outcome::Published(r) | Outcome::Unchanged(r) => r,
        Outcome::Held(r) => panic!("held: {r:?}"),
    }
}

#[test]
fn guard_holds_a_build_that_removes_eleven_percent_until_approved() {
    let f = Fixture::new();
    f.write(&map_text(100, &[], ""));
    let mut l = f.loader("");
    published(l.rebuild());
    assert_eq!(kind(&l, "u5@contoso.test"), Some(Kind::User));

    // 11 of 100 removed: more than 10 %.
    let gone: Vec<usize> = (0..11).collect();
    f.write(&map_text(100, &gone, ""));
    let held = match l.rebuild().expect("rebuild") {
        Outcome::Held(r) => r,
        Outcome::Published(r) | Outcome::Unchanged(r) => panic!("not held: {r:?}"),
    };
    assert_eq!((held.plan.removed, held.plan.live_before), (11, 100));
    assert!(
        held.plan
            .removed_sample
            .contains(&"u5@contoso.test".to_owned())
    );
    // The removed answer as before: u5 is still a user. The build itself is in service
    // (a new hire of the same build would be accepted): generation 2.
    assert_eq!(kind(&l, "u5@contoso.test"), Some(Kind::User));
    assert_eq!(l.directory().generation(), Some(2));
    let status = l.status();
    let h = status.held.as_ref().expect("held");
    assert_eq!(h.removed, 11);
    assert!(h.reason.contains("removes 11 of 100"), "{status:?}");
    assert_eq!(h.removed_sample.len(), 11);
    // The same sources again: still held, nothing new to publish.
    assert!(matches!(l.rebuild(), Ok(Outcome::Held(_))));
    assert_eq!(l.directory().generation(), Some(2));

    // Approved: the removed addresses are tombstones now, still accepted.
    let r = l.approve().expect("approve");
    assert!(r.approved);
    assert_eq!((r.plan.tombstoned, r.plan.approved), (11, 11));
    assert_eq!(kind(&l, "u5@contoso.test"), Some(Kind::Tombstone));
    assert!(l.held().is_none());
    assert!(matches!(l.approve(), Err(LoadError::NothingHeld)));

    // 10 % exactly is within the limit.
    let gone: Vec<usize> = (0..11).chain(11..19).collect();
    f.write(&map_text(100, &gone, ""));
    let r = published(l.rebuild());
    assert_eq!(r.plan.removed, 8);
}

#[test]
fn a_good_build_under_the_limits_releases_the_hold() {
    let f = Fixture::new();
    f.write(&map_text(20, &[], ""));
    let mut l = f.loader("[guard]\nmax_deletions = 2\n");
    published(l.rebuild());
    f.write(&map_text(20, &[1, 2, 3], ""));
    assert!(matches!(l.rebuild(), Ok(Outcome::Held(_))));
    assert!(l.held().is_some());
    // Upstream fixed it: one removal only, under both limits.
    f.write(&map_text(20, &[1], ""));
    let r = published(l.rebuild());
    assert_eq!(r.plan.removed, 1);
    assert!(l.held().is_none());
    assert_eq!(kind(&l, "u2@contoso.test"), Some(Kind::User));
    assert_eq!(kind(&l, "u1@contoso.test"), Some(Kind::Tombstone));
}

#[test]
fn the_first_build_is_never_held_and_an_empty_one_never_published() {
    let f = Fixture::new();
    f.write(&map_text(3, &[], ""));
    let mut l = f.loader("[guard]\nmax_deletions = 0\nmax_deletion_ratio = 0.0\n");
    published(l.rebuild());
    f.write(&map_text(0, &[], ""));
    assert!(matches!(l.rebuild(), Err(LoadError::Empty(3))));
    assert_eq!(kind(&l, "u1@contoso.test"), Some(Kind::User));
}

#[test]
fn tombstones_last_the_grace_period_across_restarts_then_expire() {
    let f = Fixture::new();
    let grace = "[guard]\ndeletion_grace = \"7d\"\n";
    f.write(&map_text(30, &[], ""));
    let mut l = f.loader(grace);
    published(l.rebuild());

    f.write(&map_text(30, &[7], ""));
    let r = published(l.rebuild());
    assert_eq!(
        (r.plan.removed, r.plan.tombstoned, r.plan.tombstones),
        (1, 1, 1)
    );
    assert_eq!(kind(&l, "u7@contoso.test"), Some(Kind::Tombstone));
    // The tombstone keeps the route the mailbox had.
    let view = l.directory().view();
    let hit = *view
        .snapshot()
        .expect("snap")
        .lookup(
            "u7@contoso.test",
            &LookupOptions::default(),
            &mut Default::default(),
        )
        .hit()
        .expect("hit");
    assert_eq!(
        view.snapshot().and_then(|s| s.route(&hit)),
        Some("smtp:[onprem.contoso.test]:25")
    );
    drop(view);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f.path("snap.bin.state.json")).expect("state file"),
    )
    .expect("json");
    assert_eq!(state["tombstones"]["u7@contoso.test"]["removed"], T0);
    drop(l);

    // Restart six days later: the persisted snapshot accepts it at once, and so does the
    // first build.
    f.now.store(T0 + 6 * DAY, Ordering::Relaxed);
    let mut l = f.loader(grace);
    assert_eq!(kind(&l, "u7@contoso.test"), Some(Kind::Tombstone));
    let r = published(l.rebuild());
    assert_eq!(
        (r.plan.tombstoned, r.plan.expired, r.plan.tombstones),
        (0, 0, 1)
    );
    assert_eq!(kind(&l, "u7@contoso.test"), Some(Kind::Tombstone));
    assert_eq!(l.next_expiry(), Some(T0 + 7 * DAY));
    drop(l);

    // Restart after the grace period: rejected.
    f.now.store(T0 + 7 * DAY, Ordering::Relaxed);
    let mut l = f.loader(grace);
    let r = published(l.rebuild());
    assert_eq!((r.plan.expired, r.plan.tombstones), (1, 0));
    assert!(matches!(
        l.directory().verdict("u7@contoso.test"),
        Verdict::Reject(_)
    ));
    assert!(l.state().tombstones.is_empty());
}

#[test]
fn tombstones_can_be_kept_deleted_or_come_back() {
    let f = Fixture::new();
    f.write(&map_text(30, &[], ""));
    let mut l = f.loader("");
    published(l.rebuild());
    f.write(&map_text(30, &[1, 2, 3], ""));
    published(l.rebuild());
    assert_eq!(l.state().tombstones.len(), 3);

    l.keep_tombstones(&["u1@contoso.test".into()])
        .expect("keep");
    l.delete_tombstones(&["u2@contoso.test".into()])
        .expect("delete");
    assert!(matches!(
        l.directory().verdict("u2@contoso.test"),
        Verdict::Reject(_)
    ));
    assert!(matches!(
        l.delete_tombstones(&["nobody@contoso.test".into()]),
        Err(LoadError::NoTombstone(_))
    ));
    // u3 comes back to the directory: no longer a tombstone.
    f.write(&map_text(30, &[1, 2], ""));
    let r = published(l.rebuild());
    assert_eq!(r.plan.returned, 1);
    assert_eq!(kind(&l, "u3@contoso.test"), Some(Kind::User));
    // A year later the kept one is still accepted.
    f.now.store(T0 + 365 * DAY, Ordering::Relaxed);
    published(l.rebuild());
    assert_eq!(kind(&l, "u1@contoso.test"), Some(Kind::Tombstone));
    let c = l.conflicts_view();
    assert_eq!(c.tombstones[0].address, "u1@contoso.test");
    assert!(c.tombstones[0].keep);
    assert_eq!(c.tombstones[0].left, None);

    // deletion_grace = 0 turns tombstones off: they all go.
    let mut l = f.loader("[guard]\ndeletion_grace = \"0s\"\n");
    let r = published(l.rebuild());
    assert_eq!((r.plan.expired, r.plan.tombstones), (1, 0));
    f.write(&map_text(30, &[1, 2, 4], ""));
    let r = published(l.rebuild());
    assert_eq!((r.plan.removed, r.plan.tombstoned), (1, 0));
    assert!(matches!(
        l.directory().verdict("u4@contoso.test"),
        Verdict::Reject(_)
    ));
}

fn write_source(path: &Path, text: &str) {
    std::fs::write(path, text).expect("source");
}

#[test]
fn exceptions_beat_additions_beat_the_directory_through_the_policy_service() {
    let f = Fixture::new();
    f.write(&map_text(
        50,
        &[],
        "7|contoso.test\tDIR:\tdave@contoso.test\n7|contoso.test\tDIR:\talice@contoso.test\n",
    ));
    // Additions: a dynamic group the directory cannot export, and u1 routed elsewhere.
    write_source(
        &f.path("additions.txt"),
        "all-staff@contoso.test OK\nu1@contoso.test OK\nwrong@not-ours.test OK\n",
    );
    // Exceptions: a directory user, an addition, a base address (so +detail too), and an
    // address in an accept-all domain.
    write_source(
        &f.path("exceptions.csv"),
        "PrimarySmtpAddress\nalice@contoso.test\nall-staff@contoso.test\ndave@contoso.test\nnoreply@catchall.test\n",
    );
    let roles = format!(
        "[[source]]\nname = \"adds\"\nkind = \"postfix\"\nrole = \"additions\"\npath = \"{}\"\n\n\
[[source]]\nname = \"excl\"\nkind = \"csv\"\nrole = \"exceptions\"\npath = \"{}\"\n",
        f.path("additions.txt").display(),
        f.path("exceptions.csv").display()
    );
    let mut l = f.loader(&roles);
    let r = published(l.rebuild());
    assert!(r.errors == 0, "{r:?}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Context {
        directory: l.directory().clone(),
        texts: Texts::default(),
        limits: Limits::default(),
        metrics: Default::default(),
        milter: Default::default(),
        dane: None,
    });
    rt.spawn(serve(listener, Protocol::Policy, ctx, rx));

    let reject = "action=550 5.1.1 User unknown";
    // The directory alone.
    assert_eq!(ask(&addr, "u0@contoso.test"), "action=DUNNO");
    assert_eq!(ask(&addr, "nobody@contoso.test"), reject);
    assert_eq!(ask(&addr, "anyone@catchall.test"), "action=DUNNO");
    // Additions beat the directory (u1 is an addition now) and add what it lacks.
    assert_eq!(kind(&l, "u1@contoso.test"), Some(Kind::Addition));
    assert_eq!(ask(&addr, "u1@contoso.test"), "action=DUNNO");
    // An addition never makes a domain ours.
    assert_eq!(ask(&addr, "wrong@not-ours.test"), "action=DUNNO");
    assert!(matches!(
        l.directory().verdict("wrong@not-ours.test"),
        Verdict::NotOurs
    ));
    // Exceptions beat both, subaddresses and accept-all domains included.
    assert_eq!(ask(&addr, "alice@contoso.test"), reject);
    assert_eq!(ask(&addr, "all-staff@contoso.test"), reject);
    assert_eq!(ask(&addr, "dave+news@contoso.test"), reject);
    assert_eq!(ask(&addr, "noreply@catchall.test"), reject);
    assert_eq!(ask(&addr, "other@catchall.test"), "action=DUNNO");

    // An exception removes a directory address at once: no tombstone for it.
    let st = l.state().clone();
    assert!(st.tombstones.is_empty(), "{st:?}");
    // Dropping the exception brings alice back; listing u2 removes it without a tombstone.
    write_source(
        &f.path("exceptions.csv"),
        "PrimarySmtpAddress\nu2@contoso.test\n",
    );
    let r = published(l.rebuild());
    assert_eq!((r.plan.removed, r.plan.tombstoned), (1, 0));
    assert_eq!(ask(&addr, "alice@contoso.test"), "action=DUNNO");
    assert_eq!(ask(&addr, "u2@contoso.test"), reject);
}

#[test]
fn the_audit_log_has_one_line_per_publish_and_rotates_by_size() {
    let f = Fixture::new();
    let audit = f.path("audit.log");
    let cfg = format!(
        "[audit]\npath = \"{}\"\nmax_size = 4096\nkeep = 2\n",
        audit.display()
    );
    let mut l = f.loader(&cfg);
    for i in 0..40 {
        f.write(&map_text(10 + i, &[], ""));
        published(l.rebuild());
    }
    let current = std::fs::read_to_string(&audit).expect("audit");
    let last: serde_json::Value =
        serde_json::from_str(current.lines().last().expect("a line")).expect("json");
    assert_eq!(last["event"], "publish");
    assert_eq!(last["generation"], 40);
    assert_eq!(last["added"], 1);
    assert_eq!(last["added_sample"][0], "u48@contoso.test");
    assert_eq!(last["sources"][0]["name"], "dir");
    assert_eq!(last["held"], false);
    for key in ["removed", "tombstoned", "expired", "time"] {
        assert!(last.get(key).is_some(), "no {key} in {last}");
    }
    let mut total = current.lines().count();
    for n in 1..=2 {
        let p = f.path(&format!("audit.log.{n}"));
        let text = std::fs::read_to_string(&p).expect("rotated file");
        assert!(
            text.len() <= 4096,
            "{} is {} bytes",
            p.display(),
            text.len()
        );
        total += text.lines().count();
    }
    assert!(!f.path("audit.log.3").exists(), "keep = 2");
    assert!(current.len() <= 4096);
    // The oldest lines were rotated away, the newest are all there, in order.
    assert!(total < 40);
    let gens: Vec<u64> = current
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["generation"].as_u64())
        .collect();
    assert!(gens.windows(2).all(|w| w[1] == w[0] + 1), "{gens:?}");
}

#[test]
fn a_lost_state_file_keeps_the_tombstones_of_the_persisted_snapshot() {
    let f = Fixture::new();
    f.write(&map_text(30, &[], ""));
    let mut l = f.loader("");
    published(l.rebuild());
    f.write(&map_text(30, &[9], ""));
    published(l.rebuild());
    drop(l);
    std::fs::remove_file(f.path("snap.bin.state.json")).expect("rm state");
    // Restart a day later without the state: still accepted, with a fresh grace period.
    f.now.store(T0 + DAY, Ordering::Relaxed);
    let mut l = f.loader("");
    let r = published(l.rebuild());
    assert_eq!(r.plan.tombstones, 1);
    assert_eq!(kind(&l, "u9@contoso.test"), Some(Kind::Tombstone));
    assert_eq!(l.state().tombstones["u9@contoso.test"].removed, T0 + DAY);
    // A corrupt state file stops the loader with its location instead.
    std::fs::write(f.path("snap.bin.state.json"), "{\"tombstones\": [1,\n").expect("corrupt");
    let dir = Arc::new(Directory::new(LookupOptions::default()));
    let e = Loader::new(f.config(""), dir, f.clock())
        .expect_err("corrupt state")
        .to_string();
    assert!(e.contains("snap.bin.state.json:1:15: invalid type"), "{e}");
}

#[test]
fn a_build_with_nothing_new_keeps_the_generation_in_service() {
    let f = Fixture::new();
    f.write(&map_text(10, &[], ""));
    let mut l = f.loader("");
    published(l.rebuild());
    assert!(matches!(l.rebuild(), Ok(Outcome::Unchanged(_))));
    assert_eq!(
        l.directory().view().snapshot().map(|s| s.generation()),
        Some(1)
    );
    f.write(&map_text(11, &[], ""));
    assert!(matches!(l.rebuild(), Ok(Outcome::Published(_))));
    assert_eq!(
        l.directory().view().snapshot().map(|s| s.generation()),
        Some(2)
    );
}

/// Regression: with the persisted snapshot lost (deleted, corrupt) but the state file still
/// there, a source missing 60 % of the addresses was published as a first build.
#[test]
fn a_lost_snapshot_does_not_bypass_the_deletion_guard() {
    let f = Fixture::new();
    f.write(&map_text(100, &[], ""));
    let mut l = f.loader("");
    published(l.rebuild());
    drop(l);
    std::fs::remove_file(f.path("snap.bin")).expect("lose the snapshot");
    let gone: Vec<usize> = (0..60).collect();
    f.write(&map_text(100, &gone, ""));
    let mut l = f.loader("");
    match l.rebuild().expect("rebuild") {
        Outcome::Held(r) => assert_eq!((r.plan.live_before, r.plan.removed), (100, 60)),
        other => panic!("not held: {other:?}"),
    }
    // Nothing in service: deferred, never bounced.
    assert_eq!(l.directory().generation(), None);
    assert!(matches!(
        l.directory().verdict("u70@contoso.test"),
        Verdict::Tempfail(_)
    ));
    let s = l.status();
    let held = s.held.expect("held");
    assert!(
        held.reason.contains("persisted snapshot is missing"),
        "{}",
        held.reason
    );
    assert_eq!(held.removed, 60);
    // Approved: in service, and the generations go on from the last publish.
    l.approve().expect("approve");
    assert_eq!(l.directory().generation(), Some(2));
    assert_eq!(kind(&l, "u70@contoso.test"), Some(Kind::User));
    assert!(l.held().is_none());

    // A first build after a lost snapshot that removes little is published as usual.
    drop(l);
    std::fs::remove_file(f.path("snap.bin")).expect("lose it again");
    f.write(&map_text(100, &(0..61).collect::<Vec<_>>(), ""));
    let mut l = f.loader("");
    let r = published(l.rebuild());
    assert_eq!(r.generation, 3);
}

/// Regression: a full disk between writing the snapshot and the state lost tombstones (the
/// snapshot was ahead of the state), and a full disk held back every change. Now the state
/// goes first, and a publish that cannot be persisted is served from memory and retried.
#[test]
fn a_publish_the_disk_refuses_is_served_from_memory_and_never_loses_tombstones() {
    let f = Fixture::new();
    f.write(&map_text(20, &[], ""));
    let mut l = f.loader("");
    published(l.rebuild());
    let saved = std::fs::read(f.path("snap.bin")).expect("snapshot");
    // The snapshot can no longer be written (its path is taken by a non-empty directory):
    // u3 leaves, new.hire arrives.
    std::fs::remove_file(f.path("snap.bin")).expect("rm");
    std::fs::create_dir(f.path("snap.bin")).expect("dir");
    std::fs::write(f.path("snap.bin/blocker"), "x").expect("blocker");
    f.now.store(T0 + 100, Ordering::Relaxed);
    f.write(&map_text(
        20,
        &[3],
        "7|contoso.test\tDIR:\tnew.hire@contoso.test\n",
    ));
    let r = published(l.rebuild());
    assert_eq!(r.plan.tombstoned, 1);
    // In service from memory at once.
    assert_eq!(kind(&l, "new.hire@contoso.test"), Some(Kind::User));
    assert_eq!(kind(&l, "u3@contoso.test"), Some(Kind::Tombstone));
    assert!(l.persist_pending());
    assert!(l.status().persist_error.is_some());
    // The state was written first: it has the tombstone.
    let state = std::fs::read_to_string(f.path("snap.bin.state.json")).expect("state");
    assert!(state.contains("u3@contoso.test"), "{state}");

    // A crash now: the old snapshot on disk beside the new state. After the restart the
    // tombstone keeps its removal time (the grace period is not restarted, nor lost).
    drop(l);
    std::fs::remove_dir_all(f.path("snap.bin")).expect("rm dir");
    std::fs::write(f.path("snap.bin"), &saved).expect("old snapshot back");
    f.now.store(T0 + DAY, Ordering::Relaxed);
    let mut l = f.loader("");
    published(l.rebuild());
    assert_eq!(kind(&l, "u3@contoso.test"), Some(Kind::Tombstone));
    let t = l.conflicts_view().tombstones;
    assert_eq!((t.len(), t[0].removed), (1, T0 + 100));
    assert!(!l.persist_pending());

    // Retried once the disk takes it again.
    std::fs::remove_file(f.path("snap.bin")).expect("rm");
    std::fs::create_dir(f.path("snap.bin")).expect("dir");
    std::fs::write(f.path("snap.bin/blocker"), "x").expect("blocker");
    f.write(&map_text(21, &[3], ""));
    published(l.rebuild());
    assert!(l.persist_pending());
    l.retry_persist();
    assert!(l.persist_pending());
    std::fs::remove_dir_all(f.path("snap.bin")).expect("rm dir");
    l.retry_persist();
    assert!(!l.persist_pending());
    let on_disk = rcptgate::Snapshot::open(&f.path("snap.bin")).expect("persisted");
    assert_eq!(Some(on_disk.generation()), l.directory().generation());
}

/// Regression: every kill -9 during a publish left a partial `.snap.bin.tmp.PID` behind.
#[test]
fn partial_files_of_an_interrupted_write_are_removed_at_start() {
    let f = Fixture::new();
    f.write(&map_text(5, &[], ""));
    for name in [".snap.bin.tmp.4242", ".snap.bin.state.json.tmp.77"] {
        std::fs::write(f.path(name), "partial").expect("partial");
    }
    std::fs::write(f.path(".other.tmp.1"), "not ours").expect("other");
    let _l = f.loader("");
    assert!(!f.path(".snap.bin.tmp.4242").exists());
    assert!(!f.path(".snap.bin.state.json.tmp.77").exists());
    assert!(f.path(".other.tmp.1").exists());
}
