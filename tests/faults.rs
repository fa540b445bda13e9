//! The fault suite (`--features fault-tests`, as root: it mounts a small tmpfs): the
//! `rcptgate serve` binary on a disk that fills up at each write of a publish, killed with
//! SIGKILL in the middle of publishes, and with its persisted snapshot truncated and zeroed
//! while it runs. Whatever happens, nothing is bounced that the directory accepts, and a
//! restart sees what was published.

#[path = "support/daemon.rs"]
mod daemon;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use daemon::Daemon;

fn users(n: usize, extra: &[&str], without: &[usize]) -> String {
    let mut s = String::from("1|corp.test\tDOMAIN:\tcorp.test\troute=smtp:[mx.corp.test]:25\n");
    for i in (0..n).filter(|i| !without.contains(i)) {
        s.push_str(&format!("1|corp.test\tDIR:\tuser{i}@corp.test\n"));
    }
    for e in extra {
        s.push_str(&format!("1|corp.test\tDIR:\t{e}@corp.test\n"));
    }
    s.push_str("++++\n");
    s
}

fn write_config(dir: &Path, state_dir: &Path, map: &Path) -> PathBuf {
    let cfg = dir.join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{s}/snap.bin\"\ndebounce = \"50ms\"\n\n\
[[source]]\nname = \"m\"\nkind = \"map\"\npath = \"{m}\"\n\n\
[audit]\npath = \"{s}/audit.log\"\n\n\
[policy]\nlisten = [\"127.0.0.1:0\"]\n\n[socketmap]\nlisten = [\"127.0.0.1:0\"]\n\n\
[metrics]\nlisten = \"127.0.0.1:0\"\n",
            s = state_dir.display(),
            m = map.display()
        ),
    )
    .expect("config");
    cfg
}

/// A tmpfs of `kib` KiB at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kib: usize) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(
            ok.success(),
            "mounting a tmpfs needs root (the fault suite runs as root)"
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Fill it up; returns the filler's path. `keep` bytes are left free (in a file removed
    /// before returning, so the space is really there).
    fn fill(&self, keep: usize) -> PathBuf {
        let reserve = self.0.join("reserve");
        std::fs::write(&reserve, vec![1u8; keep]).expect("reserve");
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        std::fs::remove_file(&reserve).expect("free the reserve");
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn metric(d: &Daemon, name: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(d.listener("metrics")).expect("metrics");
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").expect("get");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    body.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_default()
        .to_owned()
}

/// One socketmap query; the reply's payload.
fn socketmap(addr: &str, query: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("socketmap");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "{}:{query},", query.len()).expect("write");
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b",") {
        assert!(s.read(&mut byte).expect("read") > 0, "closed");
        reply.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    let (_, payload) = text.split_once(':').expect("netstring");
    payload.trim_end_matches(',').to_owned()
}

#[test]
fn a_full_disk_at_each_write_of_a_publish_loses_nothing() {
    // (free bytes when the publish comes, what fails): nothing free, so the state write
    // fails; a little free, so the state is written and the snapshot is not.
    for (free, case) in [(0usize, "state"), (16 * 1024, "snapshot")] {
        let tmp = tempfile::tempdir().expect("tmp");
        let disk = Tmpfs::mount(&tmp.path().join("disk"), 1024);
        let map = tmp.path().join("dir.map");
        std::fs::write(&map, users(2000, &[], &[])).expect("map");
        let cfg = write_config(tmp.path(), &disk.0, &map);
        let mut d = Daemon::start(&cfg);
        d.wait_generation(1);
        assert!(disk.0.join("snap.bin").exists());

        let filler = disk.fill(free);
        // user7 leaves, new.hire arrives, while the disk is full.
        std::fs::write(&map, users(2000, &["new.hire"], &[7])).expect("edit");
        let s = d.wait_generation(2);
        assert!(s.persist_error.is_some(), "{case}: {s:?}");
        assert_eq!(
            metric(&d, "rcptgate_persist_pending"),
            "rcptgate_persist_pending 1"
        );
        // In service from memory: the new hire is accepted, the leaver is a tombstone.
        assert_eq!(d.ask("new.hire@corp.test"), "action=DUNNO", "{case}");
        assert_eq!(d.ask("user7@corp.test"), "action=DUNNO", "{case}");
        assert_eq!(s.tombstones, 1);

        // Space again: the retry writes state and snapshot.
        std::fs::remove_file(&filler).expect("free");
        d.wait("the retried persist", |s| s.persist_error.is_none());
        d.signal("-TERM");
        assert!(d.child.wait().expect("wait").success());

        // After a restart: generation 2 from disk, the tombstone with its removal time.
        let mut gone = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&map)
            .expect("map");
        gone.write_all(b"broken: no trailer\n")
            .expect("break the source");
        drop(gone);
        let d = Daemon::start(&cfg);
        let s = d.status();
        assert_eq!((s.generation, s.tombstones), (Some(2), 1), "{case}: {s:?}");
        assert_eq!(d.ask("new.hire@corp.test"), "action=DUNNO", "{case}");
        assert_eq!(d.ask("user7@corp.test"), "action=DUNNO", "{case}");
        assert_eq!(
            d.ask("nobody@corp.test"),
            "action=550 5.1.1 User unknown",
            "{case}"
        );
        drop(d);
    }
}

#[test]
fn sigkill_during_publishes_leaves_a_usable_snapshot_and_no_partial_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    let map = tmp.path().join("dir.map");
    std::fs::write(&map, users(20_000, &[], &[])).expect("map");
    let cfg = write_config(tmp.path(), &state, &map);
    let d = Daemon::start(&cfg);
    d.wait_generation(1);
    drop(d);
    // Kill at a different moment of a rebuild each time (a 20k-address build and its
    // persist take tens of milliseconds).
    for round in 0..12u64 {
        let mut d = Daemon::start(&cfg);
        std::fs::write(&map, users(20_000, &[&format!("hire{round}")], &[])).expect("edit");
        std::thread::sleep(Duration::from_millis(40 + round * 15));
        d.signal("-KILL");
        let _ = d.child.wait();
    }
    let d = Daemon::start(&cfg);
    let s = d.status();
    assert!(s.generation.is_some_and(|g| g >= 1), "{s:?}");
    let partial: Vec<_> = std::fs::read_dir(&state)
        .expect("state dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(partial.is_empty(), "left behind: {partial:?}");
    assert_eq!(d.ask("user1234@corp.test"), "action=DUNNO");
    // The last edit is picked up by this daemon's own first build.
    d.wait("the last hire", |_| {
        d.ask("hire11@corp.test") == "action=DUNNO"
    });
    assert_eq!(d.ask("nobody@corp.test"), "action=550 5.1.1 User unknown");
}

#[test]
fn a_snapshot_truncated_or_zeroed_under_the_running_daemon_changes_no_answer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    let map = tmp.path().join("dir.map");
    let mut text = users(500, &[], &[]);
    text = text.replace(
        "++++\n",
        "1|corp.test\tUCFG:\tuser5@corp.test\troute=smtp:[cloud.corp.test]:25\n++++\n",
    );
    std::fs::write(&map, &text).expect("map");
    let cfg = write_config(tmp.path(), &state, &map);
    let d = Daemon::start(&cfg);
    d.wait_generation(1);
    let sm = d.listener("socketmap");
    let snap = state.join("snap.bin");
    let good = std::fs::read(&snap).expect("snapshot");
    for damage in ["truncate", "zero"] {
        let len = std::fs::metadata(&snap).expect("snapshot").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&snap)
            .expect("open");
        if damage == "truncate" {
            f.set_len(0).expect("truncate");
        } else {
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; len as usize], 0)
                .expect("zero");
        }
        drop(f);
        for _ in 0..3 {
            assert_eq!(
                socketmap(&sm, "transport user5@corp.test"),
                "OK smtp:[cloud.corp.test]:25",
                "{damage}"
            );
            assert_eq!(
                socketmap(&sm, "transport user6@corp.test"),
                "OK smtp:[mx.corp.test]:25",
                "{damage}"
            );
            assert_eq!(socketmap(&sm, "recipients user6@corp.test"), "OK user");
            assert_eq!(d.ask("user499@corp.test"), "action=DUNNO", "{damage}");
            assert_eq!(
                d.ask("nobody@corp.test"),
                "action=550 5.1.1 User unknown",
                "{damage}"
            );
        }
        assert_eq!(d.status().generation, Some(1), "{damage}");
        // A restore tool puts the file back, in place (the same inode the daemon has open).
        std::fs::write(&snap, &good).expect("restore");
    }
}

/// Customer `c`'s upload in segmented mode: `n` users of c{c}.test and the hires named.
fn customer_map(c: usize, n: usize, hires: &[String]) -> String {
    let mut s = format!("{c}|c{c}.test\tDOMAIN:\tc{c}.test\troute=smtp:[mx{c}.test]:25\n");
    for i in 0..n {
        s.push_str(&format!("{c}|c{c}.test\tDIR:\tuser{i}@c{c}.test\n"));
    }
    for h in hires {
        s.push_str(&format!("{c}|c{c}.test\tDIR:\t{h}@c{c}.test\n"));
    }
    s.push_str("++++\n");
    s
}

#[test]
fn sigkill_during_segmented_publishes_restarts_into_whole_segments() {
    const CUSTOMERS: usize = 12;
    const USERS: usize = 3000;
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    let map = |c: usize| tmp.path().join(format!("c{c}.map"));
    let mut text = format!(
        "[directory]\nsnapshot = \"{s}/snap.bin\"\ndebounce = \"20ms\"\nsegments = true\n\n",
        s = state.display()
    );
    for c in 0..CUSTOMERS {
        std::fs::write(map(c), customer_map(c, USERS, &[])).expect("map");
        text.push_str(&format!(
            "[[source]]\nname = \"c{c}\"\nkind = \"map\"\npath = \"{}\"\n\n",
            map(c).display()
        ));
    }
    text.push_str("[policy]\nlisten = [\"127.0.0.1:0\"]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let cfg = tmp.path().join("rcptgate.toml");
    std::fs::write(&cfg, text).expect("config");
    let d = Daemon::start(&cfg);
    d.wait_generation(1);
    drop(d);

    // Every version each customer's file has had: the set on disk must hold one of them
    // for every customer, whole.
    let mut versions: Vec<Vec<Vec<String>>> = vec![vec![Vec::new()]; CUSTOMERS];
    for round in 0..12usize {
        let mut d = Daemon::start(&cfg);
        // Two customers change at once, the kill lands somewhere in their rebuilds.
        for c in [round % CUSTOMERS, (round * 5 + 3) % CUSTOMERS] {
            let mut hires = versions[c].last().cloned().unwrap_or_default();
            hires.push(format!("hire{round}"));
            std::fs::write(map(c), customer_map(c, USERS, &hires)).expect("edit");
            versions[c].push(hires);
        }
        std::thread::sleep(Duration::from_millis(30 + (round as u64 * 37) % 150));
        d.signal("-KILL");
        let _ = d.child.wait();

        let set = rcptgate::Snapshot::open(&state.join("snap.bin"))
            .expect("the persisted set opens after every kill");
        for (c, seen) in versions.iter().enumerate() {
            let mut buf = rcptgate::address::AddrBuf::default();
            let opts = rcptgate::LookupOptions::default();
            let mut accepted =
                |a: &str| matches!(set.lookup(a, &opts, &mut buf), rcptgate::Verdict::Accept(_));
            assert!(accepted(&format!("user{}@c{c}.test", USERS - 1)));
            let hired: Vec<String> = (0..=round)
                .map(|r| format!("hire{r}"))
                .filter(|h| accepted(&format!("{h}@c{c}.test")))
                .collect();
            assert!(
                seen.contains(&hired),
                "round {round}: customer {c} holds {hired:?}, no version of its file: {seen:?}"
            );
        }
    }
    // The last daemon finishes what the kills interrupted and leaves no orphans.
    let d = Daemon::start(&cfg);
    for (c, seen) in versions.iter().enumerate() {
        for h in seen.last().expect("a version") {
            let a = format!("{h}@c{c}.test");
            d.wait(&a, |_| d.ask(&a) == "action=DUNNO");
        }
    }
    // Its last publish is on disk (the index names the generation in service, no job runs).
    let on_disk = || {
        std::fs::read(state.join("snap.bin"))
            .ok()
            .and_then(|b| rcptgate::directory::segments::parse_index(&b).ok())
    };
    d.wait("the last publish on disk", |s| {
        s.running.is_none() && on_disk().map(|i| i.generation) == s.generation
    });
    let index = on_disk().expect("index");
    let files = std::fs::read_dir(state.join("snap.bin.parts"))
        .expect("parts")
        .count();
    assert_eq!(files, index.segments.len(), "no orphan segment files");
    assert_eq!(index.segments.len(), CUSTOMERS);
}
