//! Segmented snapshots (issue 14 part 2): a set of per-customer segments answers exactly what
//! one snapshot of the same records answers; a change to one customer rebuilds one segment
//! and leaves every other customer's answers and files untouched; a crash between writing a
//! segment and the index restarts into the old directory or the new, never a mix.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use rcptgate::address::AddrBuf;
use rcptgate::directory::{Change, Kind, LookupOptions, Snapshot, Verdict, diff, segments};
use rcptgate::internal::{BuildInput, DomainSpec, Interner, NONE, RecordSpec, build};

/// A customer: its name, its domains, and its addresses as (domain, local, kind, route).
struct Customer {
    name: String,
    domains: Vec<String>,
    records: Vec<(usize, String, Kind, Option<String>)>,
    accept_all: bool,
    /// Local parts compared with their case (`keep_case`), and written with capitals.
    keep_case: bool,
}

fn customer(c: usize, users: usize, tag: &str) -> Customer {
    let domains = (0..1 + c % 3)
        .map(|d| format!("c{c}-d{d}.example"))
        .collect::<Vec<_>>();
    let mut records = Vec::new();
    for u in 0..users {
        let kind = match u % 7 {
            0 => Kind::Alias,
            5 => Kind::Exception,
            _ => Kind::User,
        };
        let route = (u % 4 == 0).then(|| format!("[cloud{}.example]", c % 2));
        let local = if c == 2 {
            format!("{tag}User{u}")
        } else {
            format!("{tag}user{u}")
        };
        records.push((u % domains.len(), local, kind, route));
    }
    Customer {
        name: format!("customer{c}"),
        domains,
        records,
        accept_all: c == 3,
        keep_case: c == 2,
    }
}

/// One snapshot of the given customers.
fn image(customers: &[&Customer], generation: u64) -> Vec<u8> {
    let mut strings = Interner::default();
    let mut domains = Vec::new();
    let mut records = Vec::new();
    for c in customers {
        let base = domains.len();
        let cust = strings.intern(&c.name);
        let profile = strings.intern(&format!("{}-profile", c.name));
        for d in &c.domains {
            domains.push(DomainSpec {
                name: d.clone(),
                customer: cust,
                profile,
                route: NONE,
                accept_all: c.accept_all,
                keep_case: c.keep_case,
            });
        }
        for (d, local, kind, route) in &c.records {
            let mut r = RecordSpec::new((base + d) as u32, local.as_str(), *kind);
            if let Some(route) = route {
                r.route = strings.intern(route);
            }
            records.push(r);
        }
    }
    let input = BuildInput {
        generation,
        created_unix: 1_700_000_000,
        strings,
        domains,
        records,
        ..BuildInput::default()
    };
    build(input).expect("build").0
}

fn single(customers: &[&Customer], generation: u64) -> Snapshot {
    Snapshot::from_bytes(image(customers, generation)).expect("load")
}

/// Every question worth asking of these customers, plus a few that are nobody's.
fn probes(customers: &[&Customer]) -> Vec<String> {
    let mut out = vec![
        "nobody@nowhere.example".to_owned(),
        "postmaster@c1-d0.example".to_owned(),
        "not an address".to_owned(),
        "x@[127.0.0.1]".to_owned(),
    ];
    for c in customers {
        for d in &c.domains {
            out.push(format!("unknown@{d}"));
            out.push(format!("Bad..Dots@{d}"));
        }
        for (d, local, _, _) in &c.records {
            out.push(format!("{local}@{}", c.domains[*d]));
            out.push(format!("{local}+tag@{}", c.domains[*d].to_uppercase()));
            // In a keep-case domain a local part in other case is another address.
            out.push(format!("{}@{}", local.to_lowercase(), c.domains[*d]));
        }
    }
    out
}

/// What a snapshot answers, in terms that do not depend on how it is cut into segments.
fn answer(snap: &Snapshot, q: &str) -> String {
    let mut buf = AddrBuf::default();
    let v = snap.lookup(q, &LookupOptions::default(), &mut buf);
    match v {
        Verdict::Accept(hit) => {
            let domain = snap.domain_info(hit.domain).expect("domain of a hit");
            let info = snap.record_info(q, &hit).expect("cold sections");
            format!(
                "accept {:?} {:?} domain={} customer={:?} profile={:?} route={:?} origin={:?}",
                hit.kind,
                hit.matched,
                domain.name,
                snap.customer(&hit),
                snap.profile(&hit),
                snap.route(&hit),
                info.map(|i| i.origin),
            )
        }
        other => format!("{other:?}"),
    }
}

fn addresses(snap: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let mut c = snap.cursor();
    while let Some((d, l)) = c.next_address() {
        let (d, l) = (d.to_owned(), l.to_vec());
        let hit = c.hit().expect("hit of the cursor");
        let info = snap.domain_info(hit.domain).expect("domain");
        assert_eq!(info.name, d, "the cursor's hit names its domain");
        out.push(format!(
            "{}@{d} {:?}",
            String::from_utf8_lossy(&l),
            hit.kind
        ));
    }
    out
}

fn set_of(parts: &[&Customer], generation: u64) -> Snapshot {
    let segments = parts
        .iter()
        .map(|c| Arc::new(single(&[c], 1)))
        .collect::<Vec<_>>();
    Snapshot::assemble(segments, generation, 1_700_000_000).expect("assemble")
}

#[test]
fn a_set_answers_what_one_snapshot_of_the_same_records_answers() {
    let cs: Vec<Customer> = (0..6).map(|c| customer(c, 40 + c * 7, "")).collect();
    let all: Vec<&Customer> = cs.iter().collect();
    let one = single(&all, 7);
    let set = set_of(&all, 7);
    assert!(set.is_set() && !one.is_set());
    assert_eq!(set.segments().map(|s| s.len()), Some(6));
    assert_eq!(set.record_count(), one.record_count());
    assert_eq!(set.domain_count(), one.domain_count());
    assert_eq!(set.generation(), 7);
    for q in probes(&all) {
        assert_eq!(answer(&set, &q), answer(&one, &q), "{q}");
    }
    // The domains are numbered alike (name order over the whole set).
    for i in 0..one.domain_count() {
        assert_eq!(set.domain_info(i), one.domain_info(i));
    }
    // The same addresses in the same order, so `diff` compares a set with anything.
    assert_eq!(addresses(&set), addresses(&one));
    let mut changes = 0;
    diff(&one, &set, |_| changes += 1);
    assert_eq!(changes, 0);
    let mut routes: Vec<&str> = set.routes();
    routes.sort_unstable();
    let mut expected: Vec<&str> = one.routes();
    expected.sort_unstable();
    assert_eq!(routes, expected);
    // A hit of another generation resolves to nothing, as for a single snapshot.
    let mut buf = AddrBuf::default();
    let Verdict::Accept(hit) =
        set.lookup("user1@c0-d0.example", &LookupOptions::default(), &mut buf)
    else {
        panic!("user1 is a user of customer0");
    };
    let stale = rcptgate::directory::Hit {
        generation: 6,
        ..hit
    };
    assert_eq!(set.route(&stale), None);
    assert_eq!(set.customer(&stale), None);
    assert_eq!(set.customer(&hit), Some("customer0"));
}

#[test]
fn a_domain_in_two_segments_is_refused() {
    let a = customer(1, 10, "");
    let mut b = customer(2, 10, "");
    b.domains[0] = a.domains[0].clone();
    let err = Snapshot::assemble(
        vec![Arc::new(single(&[&a], 1)), Arc::new(single(&[&b], 1))],
        2,
        0,
    )
    .expect_err("the same domain twice");
    assert!(err.to_string().contains("two segments"), "{err}");
}

fn files(dir: &Path) -> Vec<(String, u64, i64)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .expect("parts dir")
        .map(|e| {
            let e = e.expect("entry");
            let m = e.metadata().expect("metadata");
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

#[test]
fn a_change_to_one_customer_rebuilds_one_segment_and_touches_nobody_else() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("directory.snap");
    let cs: Vec<Customer> = (0..5).map(|c| customer(c, 30, "")).collect();
    let all: Vec<&Customer> = cs.iter().collect();
    let first = set_of(&all, 1);
    let w = segments::write(&path, &first).expect("write");
    assert_eq!((w.written, w.kept, w.removed), (5, 0, 0));
    let before = files(&segments::parts_dir(&path));
    assert_eq!(before.len(), 5);

    // Served from the files: every answer as built.
    let opened = Arc::new(Snapshot::open(&path).expect("open the set"));
    assert!(opened.is_set());
    for q in probes(&all) {
        assert_eq!(answer(&opened, &q), answer(&first, &q), "{q}");
    }

    // Customer 2 uploads a new file: one new segment, the others shared.
    let changed = customer(2, 45, "new");
    let mut parts: Vec<Arc<Snapshot>> = opened.segments().expect("a set");
    let at = parts
        .iter()
        .position(|p| p.domain_index(&changed.domains[0]).is_some())
        .expect("customer 2's segment");
    parts[at] = Arc::new(single(&[&changed], 2));
    let next = Snapshot::assemble(parts, 2, 0).expect("assemble");
    let served = opened.segments().expect("set");
    for (i, p) in next.segments().expect("set").iter().enumerate() {
        if i != at {
            assert!(Arc::ptr_eq(p, &served[i]));
        }
    }
    let w = segments::write(&path, &next).expect("write");
    assert_eq!((w.written, w.kept, w.removed), (1, 4, 1));
    let after = files(&segments::parts_dir(&path));
    let untouched: HashSet<_> = before.iter().collect();
    assert_eq!(
        after.iter().filter(|f| untouched.contains(f)).count(),
        4,
        "the other customers' files are the same files, unmodified"
    );

    // Every other customer answers as before; customer 2 answers its new file.
    let reopened = Snapshot::open(&path).expect("open");
    let mut now: Vec<&Customer> = all.clone();
    now[2] = &changed;
    let oracle = single(&now, 2);
    for q in probes(&all).into_iter().chain(probes(&[&changed])) {
        assert_eq!(answer(&reopened, &q), answer(&oracle, &q), "{q}");
        let lower = q.to_lowercase();
        let in_customer_2 = changed.domains.iter().any(|d| lower.ends_with(d.as_str()));
        if !in_customer_2 {
            assert_eq!(answer(&reopened, &q), answer(&first, &q), "{q}");
        }
    }
    // diff names exactly customer 2's changes.
    let mut changes = Vec::new();
    diff(&first, &reopened, |c| {
        changes.push(match c {
            Change::Added(a) | Change::Removed(a) => a.to_owned(),
        })
    });
    assert!(!changes.is_empty());
    assert!(changes.iter().all(|a| a.contains("@c2-")), "{changes:?}");
}

#[test]
fn a_crash_between_segment_and_index_restarts_into_one_directory_or_the_other() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("directory.snap");
    let cs: Vec<Customer> = (0..4).map(|c| customer(c, 20, "")).collect();
    let all: Vec<&Customer> = cs.iter().collect();
    let old = set_of(&all, 1);
    segments::write(&path, &old).expect("write");
    let dir = segments::parts_dir(&path);

    // The new segment reached the disk, the index did not (the process died in between):
    // the old directory, whole; the orphan is removed by the next start's clean-up.
    let new_part = image(&[&customer(1, 25, "v2")], 2);
    std::fs::write(dir.join("00000000deadbeef.snap"), &new_part).expect("orphan");
    let restarted = Snapshot::open(&path).expect("open after the crash");
    for q in probes(&all) {
        assert_eq!(answer(&restarted, &q), answer(&old, &q), "{q}");
    }
    assert_eq!(segments::collect_garbage(&path), 1);
    assert_eq!(files(&dir).len(), 4);

    // An index naming a segment that is missing or not the one it recorded is refused as a
    // whole (the daemon then keeps what it serves, or rebuilds from its sources): never a
    // directory with one customer from another generation.
    let victim = files(&dir)[0].0.clone();
    let saved = std::fs::read(dir.join(&victim)).expect("read");
    std::fs::write(dir.join(&victim), &new_part).expect("replace");
    let err = Snapshot::open(&path).expect_err("a replaced segment");
    assert!(
        err.to_string().contains("does not match the index"),
        "{err}"
    );
    std::fs::remove_file(dir.join(&victim)).expect("remove");
    assert!(Snapshot::open(&path).is_err(), "a missing segment");
    std::fs::write(dir.join(&victim), &saved).expect("restore");
    assert!(Snapshot::open(&path).is_ok());

    // A torn or corrupt index is refused, never half read.
    let index = std::fs::read(&path).expect("index");
    for cut in [0, 8, 20, index.len() - 1] {
        std::fs::write(&path, &index[..cut]).expect("torn");
        assert!(Snapshot::open(&path).is_err(), "cut at {cut}");
    }
    let mut flipped = index.clone();
    flipped[30] ^= 1;
    std::fs::write(&path, &flipped).expect("flipped");
    assert!(Snapshot::open(&path).is_err());
}

#[test]
fn a_single_snapshot_is_written_as_a_set_of_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("one.snap");
    let cs: Vec<Customer> = (0..3).map(|c| customer(c, 20, "")).collect();
    let all: Vec<&Customer> = cs.iter().collect();
    let one = single(&all, 4);
    segments::write(&path, &one).expect("write");
    let back = Snapshot::open(&path).expect("open");
    assert_eq!(back.segments().map(|s| s.len()), Some(1));
    assert_eq!(back.generation(), 4);
    for q in probes(&all) {
        assert_eq!(answer(&back, &q), answer(&one, &q), "{q}");
    }
}

#[test]
fn a_set_opened_lazily_answers_from_its_index_and_reads_segments_on_first_use() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("directory.snap");
    let cs: Vec<Customer> = (0..4).map(|c| customer(c, 30, "")).collect();
    let all: Vec<&Customer> = cs.iter().collect();
    let built = set_of(&all, 3);
    segments::write(&path, &built).expect("write");
    let lazy = Snapshot::open_lazy(&path).expect("open from the index");
    // Counts come from the index; answers read the segments they need.
    assert_eq!(lazy.record_count(), built.record_count());
    assert_eq!(lazy.domain_count(), built.domain_count());
    assert_eq!(lazy.segment_count(), 4);
    for q in probes(&all) {
        assert_eq!(answer(&lazy, &q), answer(&built, &q), "{q}");
    }

    // A segment replaced under a lazily opened set: its domains answer a temporary failure
    // (never a 5xx), every other domain as before.
    let dir = segments::parts_dir(&path);
    let lazy = Snapshot::open_lazy(&path).expect("open again");
    let victim = lazy
        .segment_of("c2-d0.example")
        .expect("customer 2's segment");
    let file = files(&dir)
        .into_iter()
        .map(|f| dir.join(f.0))
        .find(|f| Snapshot::open(f).is_ok_and(|s| s.domain_index("c2-d0.example").is_some()))
        .expect("customer 2's file");
    std::fs::write(&file, image(&[&customer(2, 31, "other")], 9)).expect("replace");
    let mut buf = AddrBuf::default();
    assert_eq!(
        lazy.lookup("user1@c2-d0.example", &LookupOptions::default(), &mut buf),
        Verdict::Tempfail(rcptgate::directory::Tempfail::Internal)
    );
    assert_eq!(
        lazy.lookup("nobody@c2-d0.example", &LookupOptions::default(), &mut buf),
        Verdict::Tempfail(rcptgate::directory::Tempfail::Internal)
    );
    assert!(lazy.segment(victim).is_none());
    assert!(lazy.segments().is_none(), "not every segment can be read");
    assert_eq!(
        answer(&lazy, "user1@c1-d0.example"),
        answer(&built, "user1@c1-d0.example")
    );
    // A missing segment file: the set is refused at once.
    std::fs::remove_file(&file).expect("remove");
    assert!(Snapshot::open_lazy(&path).is_err());
}
