//! Segmented mode through the loader (`[directory] segments = true`, issue 14 part 2): one
//! segment per group of sources that share domains; a changed customer file rebuilds and
//! writes only its group's segment, with the lifecycle (tombstones, guard, audit) per address
//! as in the single mode; a restart opens the same set. An injected clock, no sleeps.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcptgate::config::Config;
use rcptgate::directory::{Directory, Kind, LookupOptions, Snapshot, Verdict};
use rcptgate::sync::loader::{Clock, LoadError, Loader, Outcome, Report};

const DAY: u64 = 86_400;
const T0: u64 = 1_800_000_000;

/// Customer `c`'s upload: users u0..u{n} of c{c}.test, minus `without`, plus `extra` lines.
fn map_text(c: usize, n: usize, without: &[usize], extra: &str) -> String {
    let mut s = format!("{c}|c{c}.test\tDOMAIN:\tc{c}.test\troute=smtp:[mx{c}.test]:25\n");
    for i in (0..n).filter(|i| !without.contains(i)) {
        s.push_str(&format!("{c}|c{c}.test\tDIR:\tu{i}@c{c}.test\n"));
    }
    s.push_str(extra);
    s.push_str("++++\n");
    s
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    now: Arc<AtomicU64>,
    customers: usize,
    /// `[directory] build_memory`, when not the default.
    build_memory: Option<&'static str>,
}

impl Fixture {
    fn new(customers: usize) -> Fixture {
        let tmp = tempfile::tempdir().expect("tmp");
        let f = Fixture {
            dir: tmp.path().to_path_buf(),
            _tmp: tmp,
            now: Arc::new(AtomicU64::new(T0)),
            customers,
            build_memory: None,
        };
        for c in 0..customers {
            f.write(c, &map_text(c, 20, &[], ""));
        }
        // Contacts of customer 3 kept in a file of their own: it ties to c3.test, so it
        // is in customer 3's group.
        std::fs::write(
            f.dir.join("contacts.csv"),
            "PrimarySmtpAddress,RecipientTypeDetails\nshared-desk@c3.test,SharedMailbox\n",
        )
        .expect("csv");
        f
    }

    fn map(&self, c: usize) -> PathBuf {
        self.dir.join(format!("c{c}.map"))
    }

    fn write(&self, c: usize, text: &str) {
        std::fs::write(self.map(c), text).expect("map");
    }

    fn snapshot(&self) -> PathBuf {
        self.dir.join("snap.bin")
    }

    fn config(&self) -> Config {
        let mut text = format!(
            "[directory]\nsnapshot = \"{}\"\nsegments = true\n{}\n",
            self.snapshot().display(),
            self.build_memory
                .map_or(String::new(), |m| format!("build_memory = {m:?}\n"))
        );
        for c in 0..self.customers {
            text.push_str(&format!(
                "[[source]]\nname = \"c{c}\"\nkind = \"map\"\npath = \"{}\"\n\n",
                self.map(c).display()
            ));
        }
        text.push_str(&format!(
            "[[source]]\nname = \"contacts\"\nkind = \"csv\"\npath = \"{}\"\n\n",
            self.dir.join("contacts.csv").display()
        ));
        text.push_str("[guard]\ndeletion_grace = \"7d\"\n\n[policy]\nlisten = [\"127.0.0.1:0\"]\n");
        Config::parse("test.toml", &text).expect("config")
    }

    fn clock(&self) -> Clock {
        let now = self.now.clone();
        Arc::new(move || now.load(Ordering::Relaxed))
    }

    /// A fresh directory and loader, as after a restart.
    fn loader(&self) -> Loader {
        let dir = Arc::new(Directory::new(LookupOptions::default()));
        let mut l = Loader::new(self.config(), dir, self.clock()).expect("loader");
        l.open_persisted().expect("persisted");
        l
    }

    /// (file name, inode, mtime ns) of every segment file.
    fn files(&self) -> Vec<(String, u64, i64)> {
        let mut out: Vec<_> = std::fs::read_dir(self.dir.join("snap.bin.parts"))
            .expect("parts")
            .map(|e| {
                let e = e.expect("entry");
                let m = e.metadata().expect("meta");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.ino(),
                    m.mtime_nsec(),
                )
            })
            .collect();
        out.sort();
        out
    }
}

fn kind(l: &Loader, rcpt: &str) -> Option<Kind> {
    match l.directory().verdict(rcpt) {
        Verdict::Accept(h) => Some(h.kind),
        _ => None,
    }
}

fn published(o: Result<Outcome, LoadError>) -> Report {
    match o.expect("rebuild") {
        Outcome::Published(r) => r,
        other => panic!("not published: {other:?}"),
    }
}

/// Every answer of every customer but `except`, as text.
fn answers(l: &Loader, customers: usize, except: usize) -> Vec<String> {
    let mut out = Vec::new();
    for c in (0..customers).filter(|&c| c != except) {
        for q in (0..25)
            .map(|i| format!("u{i}@c{c}.test"))
            .chain([format!("shared-desk@c{c}.test")])
        {
            let v = l.directory().verdict(&q);
            let route = l.directory().lookup(&q).route().map(str::to_owned);
            out.push(format!("{q} {v:?} {route:?}").replace(|c: char| c.is_ascii_digit(), "#"));
        }
    }
    out
}

fn segments(l: &Loader) -> Vec<Arc<Snapshot>> {
    let view = l.directory().view();
    let snap = view.snapshot().expect("in service");
    snap.segments().expect("a set")
}

#[test]
fn a_changed_customer_file_rebuilds_only_its_segment() {
    let f = Fixture::new(6);
    let mut l = f.loader();
    let first = published(l.rebuild());
    assert_eq!(first.addresses, 6 * 20 + 1);
    // Six groups: every customer alone, the contacts with customer 3.
    let before = segments(&l);
    assert_eq!(before.len(), 6);
    assert_eq!(l.status().segments, Some(6));
    assert_eq!(f.files().len(), 6);
    assert_eq!(kind(&l, "shared-desk@c3.test"), Some(Kind::Shared));
    assert_eq!(kind(&l, "u7@c1.test"), Some(Kind::User));
    let others = answers(&l, 6, 1);
    let files = f.files();

    // Customer 1 uploads: u3 is gone, u30 is new.
    f.now.fetch_add(60, Ordering::Relaxed);
    f.write(1, &map_text(1, 20, &[3], "1|c1.test\tDIR:\tu30@c1.test\n"));
    let r = published(l.rebuild());
    assert_eq!((r.plan.added, r.plan.removed, r.plan.tombstoned), (1, 1, 1));
    assert_eq!((r.plan.live_before, r.live), (20, 6 * 20 + 1));
    assert_eq!(kind(&l, "u30@c1.test"), Some(Kind::User));
    assert_eq!(kind(&l, "u3@c1.test"), Some(Kind::Tombstone));
    // Every other customer: the same segment in memory, the same file on disk, the same
    // answers.
    let after = segments(&l);
    assert_eq!(after.len(), 6);
    let shared = after
        .iter()
        .filter(|s| before.iter().any(|b| Arc::ptr_eq(b, s)))
        .count();
    assert_eq!(shared, 5, "one segment rebuilt, five shared");
    let now_files = f.files();
    assert_eq!(now_files.len(), 6);
    assert_eq!(
        now_files.iter().filter(|x| files.contains(x)).count(),
        5,
        "five segment files untouched"
    );
    assert_eq!(answers(&l, 6, 1), others);

    // Nothing changed: nothing read again, nothing published.
    match l.rebuild().expect("rebuild") {
        Outcome::Unchanged(_) => {}
        other => panic!("{other:?}"),
    }

    // A change to the contacts rebuilds customer 3's group, with the file of its own.
    f.now.fetch_add(60, Ordering::Relaxed);
    std::fs::write(
        f.dir.join("contacts.csv"),
        "PrimarySmtpAddress,RecipientTypeDetails\nshared-desk@c3.test,SharedMailbox\nfront-desk@c3.test,SharedMailbox\n",
    )
    .expect("csv");
    let r = published(l.rebuild());
    assert_eq!((r.plan.added, r.plan.removed), (1, 0));
    assert_eq!(kind(&l, "front-desk@c3.test"), Some(Kind::Shared));
    assert_eq!(
        segments(&l)
            .iter()
            .filter(|s| after.iter().any(|b| Arc::ptr_eq(b, s)))
            .count(),
        5
    );

    // A restart opens the same set and answers the same, and goes on from what the set was
    // built from (the sources' summaries beside it): nothing new, then one customer's
    // change rebuilds one segment again.
    let generation = l.directory().generation();
    drop(l);
    let mut l = f.loader();
    assert_eq!(l.directory().generation(), generation);
    assert_eq!(kind(&l, "u3@c1.test"), Some(Kind::Tombstone));
    assert_eq!(kind(&l, "front-desk@c3.test"), Some(Kind::Shared));
    match l.rebuild().expect("rebuild") {
        Outcome::Unchanged(_) => {}
        other => panic!("{other:?}"),
    }
    let opened = segments(&l);
    f.now.fetch_add(60, Ordering::Relaxed);
    f.write(4, &map_text(4, 21, &[], ""));
    assert_eq!(published(l.rebuild()).plan.added, 1);
    assert_eq!(
        segments(&l)
            .iter()
            .filter(|s| opened.iter().any(|b| Arc::ptr_eq(b, s)))
            .count(),
        5
    );
    // Without them (a lost file), the first build is a full one: the same directory.
    std::fs::remove_file(f.dir.join("snap.bin.sources.json")).expect("summaries");
    drop(l);
    let mut l = f.loader();
    let r = l.rebuild();
    match r.expect("rebuild") {
        Outcome::Unchanged(_) => {}
        other => panic!("{other:?}"),
    }

    // The guard holds a customer that loses half its users; the others are not held.
    f.now.fetch_add(60, Ordering::Relaxed);
    f.write(2, &map_text(2, 20, &(0..10).collect::<Vec<_>>(), ""));
    match l.rebuild().expect("rebuild") {
        Outcome::Held(r) => assert_eq!((r.plan.removed, r.plan.live_before), (10, 20)),
        other => panic!("not held: {other:?}"),
    }
    assert_eq!(kind(&l, "u0@c2.test"), Some(Kind::User), "kept while held");
    l.approve().expect("approve");
    assert_eq!(kind(&l, "u0@c2.test"), Some(Kind::Tombstone));

    // Seven days later the tombstones' grace is over: customer 1's and 2's groups are
    // rebuilt without them.
    f.now.fetch_add(7 * DAY + 1, Ordering::Relaxed);
    let r = published(l.rebuild());
    assert_eq!(r.plan.expired, 11);
    assert_eq!(kind(&l, "u3@c1.test"), None);
    assert_eq!(kind(&l, "u0@c2.test"), None);
    assert_eq!(kind(&l, "u30@c1.test"), Some(Kind::User));
}

#[test]
fn a_customer_that_joins_another_group_rebuilds_both() {
    let f = Fixture::new(3);
    let mut l = f.loader();
    published(l.rebuild());
    // Three customers, and the contacts file's c3.test.
    assert_eq!(segments(&l).len(), 4);
    // Customer 0 now also declares c1.test and lists an address in it: one group, one
    // segment, and the merge decides as in the single mode (the first declaration wins).
    f.write(
        0,
        &map_text(
            0,
            20,
            &[],
            "0|c1.test\tDOMAIN:\tc1.test\n0|c1.test\tDIR:\tfrom-c0@c1.test\n",
        ),
    );
    let r = published(l.rebuild());
    assert_eq!(r.plan.added, 1);
    assert_eq!(segments(&l).len(), 3);
    assert_eq!(kind(&l, "from-c0@c1.test"), Some(Kind::User));
    assert_eq!(kind(&l, "u5@c1.test"), Some(Kind::User));
    assert_eq!(kind(&l, "u5@c0.test"), Some(Kind::User));
    // And back: two groups again, nothing lost on the way.
    f.write(0, &map_text(0, 20, &[], ""));
    let r = published(l.rebuild());
    assert_eq!((r.plan.removed, r.plan.tombstoned), (1, 1));
    assert_eq!(segments(&l).len(), 4);
    assert_eq!(kind(&l, "from-c0@c1.test"), Some(Kind::Tombstone));
    assert_eq!(kind(&l, "u5@c1.test"), Some(Kind::User));
}

#[test]
fn a_full_rebuild_goes_group_by_group_and_keeps_unchanged_segments() {
    let f = Fixture::new(5);
    let mut l = f.loader();
    // The first build already goes one group after another, each segment written as built.
    published(l.rebuild());
    let files = f.files();
    assert_eq!(files.len(), 5);
    let before = segments(&l);
    // SIGHUP reads every file again: nothing changed, nothing written, nothing published.
    f.now.fetch_add(60, Ordering::Relaxed);
    match l.rebuild_synced().expect("rebuild") {
        Outcome::Unchanged(_) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(f.files(), files);
    // One file changed: a full rebuild replaces that group's segment only.
    f.write(2, &map_text(2, 20, &[4], ""));
    let r = published(l.rebuild_synced());
    assert_eq!(
        (r.plan.removed, r.plan.tombstoned, r.plan.live_before),
        (1, 1, 101)
    );
    assert_eq!(kind(&l, "u4@c2.test"), Some(Kind::Tombstone));
    let after = segments(&l);
    assert_eq!(
        after
            .iter()
            .filter(|s| before.iter().any(|b| Arc::ptr_eq(b, s)))
            .count(),
        4
    );
    let now_files = f.files();
    assert_eq!(now_files.len(), 5, "no orphan: {now_files:?}");
    assert_eq!(now_files.iter().filter(|x| files.contains(x)).count(), 4);
    // Every address still answers.
    for c in (0..5).filter(|&c| c != 2) {
        assert_eq!(kind(&l, &format!("u7@c{c}.test")), Some(Kind::User));
    }
}

/// The build memory budget decides how many groups are built at once, not what is built: with
/// room for one group at a time (the smallest budget) and with the default (every group at
/// once here), the same segments come out, and they answer the same.
#[test]
fn the_build_memory_budget_changes_when_groups_are_built_not_what() {
    // The same segments (their content, which names each source's path: so one directory,
    // built twice from nothing).
    let digests = |l: &Loader| {
        let mut d: Vec<_> = segments(l).iter().map(|s| s.content_digest()).collect();
        d.sort();
        d
    };
    let mut f = Fixture::new(6);
    let mut b = f.loader();
    published(b.rebuild());
    let (all_at_once, answered) = (digests(&b), answers(&b, 6, usize::MAX));
    drop(b);
    for e in std::fs::read_dir(&f.dir).expect("dir").flatten() {
        if e.file_name().to_string_lossy().starts_with("snap.bin") {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).expect("rm");
            } else {
                std::fs::remove_file(&p).expect("rm");
            }
        }
    }
    f.build_memory = Some("1MiB");
    let mut a = f.loader();
    published(a.rebuild());
    assert_eq!(f.files().len(), 6);
    assert_eq!(digests(&a), all_at_once);
    assert_eq!(answers(&a, 6, usize::MAX), answered);
    let one_at_a_time = &f;
    // And an incremental build of two changed groups under the small budget.
    one_at_a_time.write(1, &map_text(1, 20, &[3], ""));
    one_at_a_time.write(4, &map_text(4, 20, &[5], ""));
    let r = published(a.rebuild());
    assert_eq!((r.plan.removed, r.plan.tombstoned), (2, 2));
    assert_eq!(kind(&a, "u3@c1.test"), Some(Kind::Tombstone));
    assert_eq!(kind(&a, "u5@c4.test"), Some(Kind::Tombstone));
    assert_eq!(kind(&a, "u5@c1.test"), Some(Kind::User));
}

/// The lost-snapshot guard holds in segmented mode too: with the set's index gone but the
/// state file there, a first build that removes most of what was in service is held (every
/// answer a 4xx), then approved into a set again.
#[test]
fn a_lost_set_does_not_bypass_the_deletion_guard() {
    let f = Fixture::new(4);
    let mut l = f.loader();
    published(l.rebuild());
    drop(l);
    std::fs::remove_file(f.snapshot()).expect("lose the index");
    for c in 0..3 {
        f.write(c, &map_text(c, 20, &(0..15).collect::<Vec<_>>(), ""));
    }
    let mut l = f.loader();
    match l.rebuild().expect("rebuild") {
        Outcome::Held(r) => assert_eq!(r.plan.removed, 45),
        other => panic!("not held: {other:?}"),
    }
    assert_eq!(l.directory().generation(), None);
    assert!(matches!(
        l.directory().verdict("u17@c0.test"),
        Verdict::Tempfail(_)
    ));
    l.approve().expect("approve");
    assert_eq!(l.directory().generation(), Some(2));
    assert_eq!(kind(&l, "u17@c0.test"), Some(Kind::User));
    assert_eq!(kind(&l, "u3@c0.test"), None);
    assert_eq!(l.status().segments, Some(4));
    // The next change is incremental again.
    let before = segments(&l);
    f.write(3, &map_text(3, 21, &[], ""));
    published(l.rebuild());
    assert_eq!(
        segments(&l)
            .iter()
            .filter(|s| before.iter().any(|b| Arc::ptr_eq(b, s)))
            .count(),
        3
    );
}

/// A segment file damaged on disk: after a restart its domains answer 4xx (never 5xx) until
/// the first build, which notices and builds everything again from the sources.
#[test]
fn a_damaged_segment_is_rebuilt_by_the_first_build_after_a_start() {
    let f = Fixture::new(3);
    let mut l = f.loader();
    published(l.rebuild());
    drop(l);
    let parts = f.dir.join("snap.bin.parts");
    let victim = std::fs::read_dir(&parts)
        .expect("parts")
        .map(|e| e.expect("entry").path())
        .find(|p| Snapshot::open(p).is_ok_and(|s| s.domain_index("c1.test").is_some()))
        .expect("customer 1's segment");
    let mut bytes = std::fs::read(&victim).expect("read");
    // The last byte of what is read at open (the header and the hot sections, laid out
    // first; the cold sections are checked when first read).
    let hot = Snapshot::open(&victim).expect("segment").hot_bytes() as usize;
    bytes[hot - 1] ^= 0xff;
    std::fs::write(&victim, bytes).expect("damage");
    let mut l = f.loader();
    assert!(matches!(
        l.directory().verdict("u1@c1.test"),
        Verdict::Tempfail(_)
    ));
    assert!(matches!(
        l.directory().verdict("nobody@c1.test"),
        Verdict::Tempfail(_)
    ));
    assert_eq!(kind(&l, "u1@c0.test"), Some(Kind::User));
    // Nothing changed in the sources, but the set in service cannot be read whole: a full
    // build replaces it.
    let r = published(l.rebuild());
    assert_eq!(r.plan.removed, 0);
    assert_eq!(kind(&l, "u1@c1.test"), Some(Kind::User));
    assert!(matches!(
        l.directory().verdict("nobody@c1.test"),
        Verdict::Reject(_)
    ));
}

/// A build that fails after reading a changed file (here: its segment cannot be written)
/// leaves that file counted as changed: the next build applies it.
#[test]
fn a_failed_build_leaves_its_changed_files_to_the_next() {
    let f = Fixture::new(3);
    let mut l = f.loader();
    published(l.rebuild());
    f.write(1, &map_text(1, 20, &[2], ""));
    // The segments' directory replaced by a file: writing a segment fails.
    let parts = f.dir.join("snap.bin.parts");
    let away = f.dir.join("parts.away");
    std::fs::rename(&parts, &away).expect("move");
    std::fs::write(&parts, b"not a directory").expect("file");
    assert!(l.rebuild_synced().is_err());
    std::fs::remove_file(&parts).expect("rm");
    std::fs::rename(&away, &parts).expect("back");
    assert_eq!(kind(&l, "u2@c1.test"), Some(Kind::User));
    let r = published(l.rebuild());
    assert_eq!((r.plan.removed, r.plan.tombstoned), (1, 1));
    assert_eq!(kind(&l, "u2@c1.test"), Some(Kind::Tombstone));
}

/// A full build that fails after reading every file (the first build after a restart without
/// the sources' summaries file is a full one; every file emptied: refused as empty) does not
/// keep the files' stamps: the next build reads them again and refuses again, rather than
/// taking the emptied files for built and answering "unchanged".
#[test]
fn a_failed_full_build_leaves_its_files_to_the_next() {
    let f = Fixture::new(3);
    let mut l = f.loader();
    published(l.rebuild());
    drop(l);
    std::fs::remove_file(f.dir.join("snap.bin.sources.json")).expect("summaries");
    let mut l = f.loader();
    for c in 0..3 {
        f.write(c, "++++\n");
    }
    std::fs::write(f.dir.join("contacts.csv"), "PrimarySmtpAddress\n").expect("csv");
    for attempt in 0..2 {
        match l.rebuild() {
            Err(LoadError::Empty(n)) => assert!(n > 0),
            other => panic!("attempt {attempt}: not refused as empty: {other:?}"),
        }
        assert_eq!(
            kind(&l, "u2@c1.test"),
            Some(Kind::User),
            "the set in service kept"
        );
    }
}
