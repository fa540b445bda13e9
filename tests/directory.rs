//! The Directory contract (DESIGN.md §4), end to end: sources -> merge -> build -> persisted
//! snapshot -> mmap -> lookup. Every verdict, and every way a snapshot file can be damaged.

use std::sync::Arc;

use rcptgate::address::AddrError;
use rcptgate::directory::{
    self, Directory, Hit, Kind, LookupOptions, Match, Reject, Snapshot, SnapshotError, Tempfail,
    Verdict,
};
use rcptgate::sources;
use rcptgate::sync::merge;

fn example_bytes() -> Vec<u8> {
    let src = sources::load(
        sources::Format::Map,
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map").as_ref(),
    )
    .expect("example loads");
    assert!(src.diagnostics.is_empty(), "{:?}", src.diagnostics);
    let mut merged = merge(&[src], 42);
    assert!(merged.conflicts.is_empty());
    merged.build().expect("builds").0
}

fn example_dir() -> Directory {
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(
        Snapshot::from_bytes(example_bytes()).expect("loads"),
    ));
    dir
}

fn accept(v: Verdict) -> Hit {
    match v {
        Verdict::Accept(h) => h,
        other => panic!("expected accept, got {other:?}"),
    }
}

#[test]
fn not_loaded_is_a_temporary_failure() {
    let dir = Directory::new(LookupOptions::default());
    assert_eq!(
        dir.verdict("alice.andersen@contoso.com"),
        Verdict::Tempfail(Tempfail::NotLoaded)
    );
    assert_eq!(dir.verdict("nobody@contoso.com").code(), Some("451 4.3.0"));
}

#[test]
fn every_verdict() {
    let dir = example_dir();
    let view = dir.view();
    let snap = view.snapshot().expect("loaded");

    let h = accept(dir.verdict("alice.andersen@contoso.com"));
    assert_eq!((h.kind, h.matched), (Kind::User, Match::Exact));
    assert_eq!(snap.profile(&h), Some("executives"));
    assert_eq!(snap.route(&h), Some("smtp:[exch01.corp.contoso.com]:25"));
    assert_eq!(snap.customer(&h), Some("10001"));
    let info = snap
        .record_info("alice.andersen@contoso.com", &h)
        .expect("cold ok")
        .expect("record");
    assert_eq!(info.owner, None);
    assert!(info.origin.ends_with("example.map:6"), "{}", info.origin);
    assert_eq!(
        info.attributes.as_deref(),
        Some("lang=en\tdepartment=Board")
    );

    // Alias: owner recorded, route and profile inherited from the owner.
    let h = accept(dir.verdict("<Carol@CONTOSO.com>"));
    assert_eq!(h.kind, Kind::Alias);
    assert_eq!(
        snap.route(&h),
        Some("smtp:[contoso-com.mail.protection.outlook.com]:25")
    );
    let info = snap
        .record_info("<Carol@CONTOSO.com>", &h)
        .expect("cold ok")
        .expect("record");
    assert_eq!(info.owner.as_deref(), Some("carol.chen@contoso.com"));

    // Subaddress, only after the exact key missed.
    let h = accept(dir.verdict("bob.berger+newsletter@contoso.com"));
    assert_eq!((h.kind, h.matched), (Kind::User, Match::Subaddress));
    let info = snap
        .record_info("bob.berger+newsletter@contoso.com", &h)
        .expect("cold ok")
        .expect("record");
    assert!(info.origin.ends_with("example.map:7"), "{}", info.origin);

    assert_eq!(accept(dir.verdict("sales@contoso.com")).kind, Kind::Group);
    assert_eq!(
        accept(dir.verdict("helpdesk@contoso.com")).kind,
        Kind::Shared
    );
    // IDN: U-label and A-label are one key, NFD local part meets NFC.
    let h = accept(dir.verdict("ju\u{0308}rgen.mu\u{0308}ller@MÜNCHEN-contoso.de"));
    assert_eq!(h.kind, Kind::User);
    accept(dir.verdict("jürgen.müller@xn--mnchen-contoso-gsb.de."));

    // Accept-all domain answers with the domain's defaults.
    let h = accept(dir.verdict("anything@fabrikam-lab.com"));
    assert_eq!((h.kind, h.matched), (Kind::CatchAll, Match::AcceptAll));
    assert_eq!(
        snap.record_info("anything@fabrikam-lab.com", &h)
            .expect("cold ok"),
        None
    );
    assert_eq!(snap.profile(&h), Some("quarantine-strict"));

    assert_eq!(
        dir.verdict("nobody@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
    assert_eq!(dir.verdict("nobody@contoso.com").code(), Some("550 5.1.1"));
    assert_eq!(dir.verdict("someone@gmail.com"), Verdict::NotOurs);
    assert_eq!(dir.verdict("postmaster@[192.0.2.1]"), Verdict::NotOurs);
    // Not a mailbox: 501 only in a domain we own (DESIGN.md §4 step 2); what names no domain
    // of ours is neutral.
    assert_eq!(dir.verdict("no at sign"), Verdict::NotOurs);
    assert_eq!(dir.verdict("<>"), Verdict::NotOurs);
    assert_eq!(dir.verdict("   "), Verdict::NotOurs);
    assert_eq!(dir.verdict("a@b@gmail.com"), Verdict::NotOurs);
    assert!(matches!(
        dir.verdict("a@b@contoso.com"),
        Verdict::Reject(Reject::Syntax(_))
    ));
    assert_eq!(
        dir.verdict(&format!("{}@Contoso.com.", "x".repeat(65))),
        Verdict::Reject(Reject::Syntax(AddrError::LocalTooLong(65)))
    );
    assert_eq!(dir.verdict("a\0b@contoso.com").code(), Some("501 5.1.3"));
    let view = dir.view();
    let mut buf = Default::default();
    // Latin-1 bytes, not UTF-8: 501 in our domain, neutral elsewhere.
    assert_eq!(
        view.lookup_bytes(b"j\xfcrgen@contoso.com", &mut buf),
        Verdict::Reject(Reject::Syntax(AddrError::NotText))
    );
    assert_eq!(
        view.lookup_bytes(b"j\xfcrgen@example.org", &mut buf),
        Verdict::NotOurs
    );
    assert_eq!(view.lookup_bytes(b"\xff\xfe", &mut buf), Verdict::NotOurs);
}

#[test]
fn data_older_than_max_age_defers_unknown_recipients() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock = {
        let now = now.clone();
        Arc::new(move || now.load(Ordering::Relaxed))
    };
    let dir = Directory::with_clock(LookupOptions::default(), clock);
    dir.publish(Arc::new(
        Snapshot::from_bytes(example_bytes()).expect("loads"),
    ));
    // Unknown age: never stale by itself.
    dir.set_max_age(Some(std::time::Duration::from_secs(3600)));
    assert_eq!(
        dir.verdict("nobody@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
    dir.set_data_time(1_000_000);
    now.store(1_000_000 + 3600, Ordering::Relaxed);
    assert_eq!(
        dir.verdict("nobody@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
    // One second past max_age: unknown -> tempfail, known still accepted, others neutral.
    now.store(1_000_000 + 3601, Ordering::Relaxed);
    assert!(dir.is_stale());
    assert_eq!(
        dir.verdict("nobody@contoso.com"),
        Verdict::Tempfail(Tempfail::Stale)
    );
    assert_eq!(
        dir.lookup("nobody@contoso.com").verdict().code(),
        Some("451 4.3.0")
    );
    accept(dir.verdict("alice.andersen@contoso.com"));
    assert_eq!(dir.verdict("someone@gmail.com"), Verdict::NotOurs);
    // Fresh data again.
    dir.set_data_time(1_000_000 + 3601);
    assert_eq!(
        dir.verdict("nobody@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
    // max_age off.
    now.store(u64::MAX / 2, Ordering::Relaxed);
    dir.set_max_age(None);
    assert_eq!(
        dir.verdict("nobody@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
}

#[test]
fn postmaster_is_accepted_in_every_domain_we_own() {
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(
        Snapshot::from_bytes(example_bytes()).expect("loads"),
    ));
    for rcpt in [
        "postmaster@contoso.com",
        "PostMaster@CONTOSO.com",
        "postmaster+x@contoso.com",
    ] {
        let a = dir.lookup(rcpt);
        let h = accept(a.verdict());
        assert_eq!(
            (h.kind, h.matched),
            (Kind::Reserved, Match::Reserved),
            "{rcpt}"
        );
        // The domain's route and profile, from the same generation.
        assert_eq!(a.route(), Some("smtp:[exch01.corp.contoso.com]:25"));
        assert_eq!(a.generation(), Some(42));
    }
    // Not ours stays neutral; abuse is not reserved unless configured.
    assert_eq!(dir.verdict("postmaster@gmail.com"), Verdict::NotOurs);
    assert_eq!(
        dir.verdict("abuse@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
    let more = Directory::new(LookupOptions {
        always_accept: vec!["postmaster".into(), "abuse".into()],
        ..LookupOptions::default()
    });
    more.publish(Arc::new(
        Snapshot::from_bytes(example_bytes()).expect("loads"),
    ));
    assert_eq!(
        accept(more.verdict("Abuse@contoso.com")).kind,
        Kind::Reserved
    );
    // An empty list turns it off.
    let none = Directory::new(LookupOptions {
        always_accept: Vec::new(),
        ..LookupOptions::default()
    });
    none.publish(Arc::new(
        Snapshot::from_bytes(example_bytes()).expect("loads"),
    ));
    assert_eq!(
        none.verdict("postmaster@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
}

#[test]
fn an_exception_beats_postmaster() {
    let name: Arc<str> = Arc::from("x.map");
    let text = "1|x.example\tDOMAIN:\tx.example\n1|x.example\tDIR:\ta@x.example\n++++\n";
    let src = sources::parse_text(sources::Format::Map, &name, text).expect("parses");
    let exc = sources::parse_text(
        sources::Format::Postfix,
        &Arc::from("exc"),
        "postmaster@x.example x\n",
    )
    .expect("parses");
    let mut exc = exc;
    exc.role = sources::Role::Exceptions;
    let (bytes, _) = merge(&[src, exc], 1).build().expect("builds");
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(Snapshot::from_bytes(bytes).expect("loads")));
    assert_eq!(
        dir.verdict("postmaster@x.example"),
        Verdict::Reject(Reject::Exception)
    );
}

#[test]
fn an_answer_keeps_its_generation_across_a_publish() {
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(
        Snapshot::from_bytes(example_bytes()).expect("loads"),
    ));
    let answer = dir.lookup("carol@contoso.com");
    // Another generation where carol has no route of her own.
    let name: Arc<str> = Arc::from("other.map");
    let text =
        "1|contoso.com\tDOMAIN:\tcontoso.com\n1|contoso.com\tDIR:\tcarol@contoso.com\n++++\n";
    let src = sources::parse_text(sources::Format::Map, &name, text).expect("parses");
    let (bytes, _) = merge(&[src], 43).build().expect("builds");
    dir.publish(Arc::new(Snapshot::from_bytes(bytes).expect("loads")));
    assert_eq!(answer.generation(), Some(42));
    assert_eq!(
        answer.route(),
        Some("smtp:[contoso-com.mail.protection.outlook.com]:25")
    );
    assert_eq!(dir.lookup("carol@contoso.com").route(), None);
}

#[test]
fn subaddressing_can_be_disabled_or_use_other_separators() {
    let bytes = example_bytes();
    let none = Directory::new(LookupOptions {
        separators: Box::from(&b""[..]),
        ..LookupOptions::default()
    });
    none.publish(Arc::new(
        Snapshot::from_bytes(bytes.clone()).expect("loads"),
    ));
    assert_eq!(
        none.verdict("bob.berger+x@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
    let dash = Directory::new(LookupOptions {
        separators: Box::from(&b"+-"[..]),
        ..LookupOptions::default()
    });
    dash.publish(Arc::new(Snapshot::from_bytes(bytes).expect("loads")));
    accept(dash.verdict("bob-lists@contoso.com"));
    // "all-staff" exists exactly: the exact key wins over stripping at '-'.
    assert_eq!(
        accept(dash.verdict("all-staff@contoso.com")).matched,
        Match::Exact
    );
}

#[test]
fn keep_case_domain() {
    let name: Arc<str> = Arc::from("kc.map");
    let text = "1|case.example\tDOMAIN:\tcase.example\tkeep_case=yes\n1|case.example\tDIR:\tJohn.Doe@case.example\n++++\n";
    let src = sources::parse_text(sources::Format::Map, &name, text).expect("parses");
    let (bytes, _) = merge(&[src], 1).build().expect("builds");
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(Snapshot::from_bytes(bytes).expect("loads")));
    accept(dir.verdict("John.Doe@CASE.example"));
    assert_eq!(
        dir.verdict("john.doe@case.example"),
        Verdict::Reject(Reject::UnknownUser)
    );
}

#[test]
fn persisted_snapshot_round_trips_through_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("snapshot.bin");
    directory::write_atomic(&path, &example_bytes()).expect("written");
    let snap = Snapshot::open(&path).expect("maps");
    assert_eq!(snap.generation(), 42);
    assert_eq!(snap.record_count(), 24);
    assert_eq!(snap.domain_count(), 5);
    let mut all = Vec::new();
    snap.for_each_address(|a, _| all.push(a.to_owned()));
    assert_eq!(all.len(), 24);
    assert!(all.contains(&"support@contoso.com".to_owned()));
    let contoso = snap.domain_index("contoso.com").expect("ours");
    let info = snap.domain_info(contoso).expect("domain");
    assert_eq!(
        (info.name, info.customer, info.records),
        ("contoso.com", Some("10001"), 14)
    );
    assert_eq!(info.route, Some("smtp:[exch01.corp.contoso.com]:25"));
    let lab = snap
        .domain_info(snap.domain_index("fabrikam-lab.com").expect("ours"))
        .expect("domain");
    assert!(lab.accept_all && lab.records == 0);
    assert_eq!(snap.domain_index("gmail.com"), None);
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
}

#[test]
fn truncated_or_corrupt_snapshots_give_clear_errors() {
    let bytes = example_bytes();
    for cut in [0, 7, 12, 100, bytes.len() / 2, bytes.len() - 1] {
        let err = Snapshot::from_bytes(bytes[..cut].to_vec()).expect_err("truncated must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("rebuild") || msg.contains("magic"),
            "cut {cut}: {msg}"
        );
    }
    // Flip one bit in every position: never a panic, never a silently different answer.
    let reference = example_dir();
    let probes = [
        "alice.andersen@contoso.com",
        "nobody@contoso.com",
        "x@fabrikam-lab.com",
        "grace@fabrikam.com",
    ];
    let expected: Vec<_> = probes.iter().map(|p| reference.verdict(p).name()).collect();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        match Snapshot::from_bytes(bad) {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(snap) => {
                // Only a flip in a cold section can load; hot answers are unchanged and the
                // cold data reports the damage instead of returning it.
                let d = Directory::new(LookupOptions::default());
                d.publish(Arc::new(snap));
                let got: Vec<_> = probes.iter().map(|p| d.verdict(p).name()).collect();
                assert_eq!(got, expected, "bit flip at {i} changed answers");
                let h = accept(d.verdict("alice.andersen@contoso.com"));
                let v = d.view();
                assert!(
                    matches!(
                        v.snapshot()
                            .expect("loaded")
                            .record_info("alice.andersen@contoso.com", &h),
                        Err(SnapshotError::Cold(m)) if m.contains("checksum mismatch")
                    ),
                    "flip at {i}"
                );
            }
        }
    }
}

/// Regression: the persisted snapshot was mapped shared; `truncate -s 0` on it killed the
/// daemon with SIGBUS, and zeroing it in place made every route empty. A snapshot is served
/// from memory the process owns: nothing done to the file changes an answer.
#[test]
fn a_snapshot_file_changed_under_an_open_snapshot_changes_nothing() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, damage) in [("truncated", 0u8), ("zeroed", 1u8)] {
        let path = tmp.path().join(format!("{name}.bin"));
        directory::write_atomic(&path, &example_bytes()).expect("written");
        for open in [Snapshot::open, Snapshot::open_plain] {
            let dir = Directory::new(LookupOptions::default());
            dir.publish(Arc::new(open(&path).expect("opens")));
            let before = dir.lookup("carol@contoso.com");
            assert_eq!(
                before.route(),
                Some("smtp:[contoso-com.mail.protection.outlook.com]:25")
            );
            drop(before);
            let len = std::fs::metadata(&path).expect("meta").len();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open for writing");
            if damage == 0 {
                f.set_len(0).expect("truncate");
            } else {
                f.write_all_at(&vec![0u8; len as usize], 0).expect("zero");
            }
            drop(f);
            let after = dir.lookup("carol@contoso.com");
            assert_eq!(
                after.route(),
                Some("smtp:[contoso-com.mail.protection.outlook.com]:25"),
                "{name}"
            );
            assert_eq!(after.profile(), Some("standard"), "{name}");
            assert_eq!(
                dir.verdict("nobody@contoso.com"),
                Verdict::Reject(Reject::UnknownUser)
            );
            // Diagnostics read later say the file changed; they never return its bytes.
            let hit = *after.hit().expect("accepted");
            let info = after
                .snapshot()
                .expect("loaded")
                .record_info("carol@contoso.com", &hit);
            assert!(
                matches!(info, Err(SnapshotError::Cold(_))),
                "{name}: {info:?}"
            );
            directory::write_atomic(&path, &example_bytes()).expect("rewritten");
        }
    }
}

#[test]
fn ldif_source_maps_the_same_directory() {
    let src = sources::load(
        sources::Format::Ldif,
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.ldif").as_ref(),
    )
    .expect("loads");
    assert!(src.diagnostics.is_empty(), "{:?}", src.diagnostics);
    let mut merged = merge(&[src], 1);
    let (bytes, _) = merged.build().expect("builds");
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(Snapshot::from_bytes(bytes).expect("loads")));
    assert_eq!(accept(dir.verdict("alice@contoso.com")).kind, Kind::Alias);
    assert_eq!(
        accept(dir.verdict("helpdesk@contoso.com")).kind,
        Kind::Shared
    );
    assert_eq!(accept(dir.verdict("support@contoso.com")).kind, Kind::Alias);
    assert_eq!(
        accept(dir.verdict("info@münchen-contoso.de")).kind,
        Kind::Shared
    );
    assert_eq!(accept(dir.verdict("sales@contoso.com")).kind, Kind::Group);
    // The UPN of a mail-less service account is not a recipient; the contact's domain is not ours.
    assert_eq!(dir.verdict("svc-backup@corp.contoso.com"), Verdict::NotOurs);
    assert_eq!(dir.verdict("partner@fabrikam.example"), Verdict::NotOurs);
    assert_eq!(
        dir.verdict("nobody@contoso.com"),
        Verdict::Reject(Reject::UnknownUser)
    );
}

#[test]
fn conflicts_prefer_the_primary_owner_then_source_order() {
    let name: Arc<str> = Arc::from("a.map");
    let a = "1|c.example\tDOMAIN:\tc.example\n1|c.example\tDIR:\tinfo@c.example\n1|c.example\tMAP:\tinfo@c.example\tbob@c.example\n1|c.example\tDIR:\tbob@c.example\n++++\n";
    let b_name: Arc<str> = Arc::from("b.csv");
    let b = "PrimarySmtpAddress,EmailAddresses,RecipientTypeDetails\ninfo@c.example,,SharedMailbox\nalice@c.example,smtp:bob@c.example,UserMailbox\n";
    let sa = sources::parse_text(sources::Format::Map, &name, a).expect("map");
    let sb = sources::parse_text(sources::Format::Csv, &b_name, b).expect("csv");
    let mut m = merge(&[sa, sb], 1);
    assert_eq!(m.conflicts.len(), 2, "{:#?}", m.conflicts);
    let info = m
        .conflicts
        .iter()
        .find(|c| c.address == "info@c.example")
        .expect("info");
    assert_eq!(
        (info.kept_owner.as_str(), info.rule),
        ("info@c.example", "its primary address")
    );
    assert_eq!(info.kept_origin, "b.csv:2");
    let bob = m
        .conflicts
        .iter()
        .find(|c| c.address == "bob@c.example")
        .expect("bob");
    assert_eq!(
        (bob.kept_owner.as_str(), bob.dropped_owner.as_str()),
        ("bob@c.example", "alice@c.example")
    );
    let (bytes, _) = m.build().expect("builds");
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(Snapshot::from_bytes(bytes).expect("loads")));
    assert_eq!(accept(dir.verdict("info@c.example")).kind, Kind::Shared);
}

#[test]
fn diff_is_right_when_domain_indices_shift() {
    let build = |text: &str| {
        let name: Arc<str> = Arc::from("d.map");
        let src = sources::parse_text(sources::Format::Map, &name, text).expect("parses");
        Snapshot::from_bytes(merge(&[src], 1).build().expect("builds").0).expect("loads")
    };
    let old = build(
        "1|a.example\tDOMAIN:\ta.example\n1|a.example\tDIR:\tx@a.example\n\
1|c.example\tDOMAIN:\tc.example\n1|c.example\tDIR:\tgone@c.example\n1|c.example\tDIR:\tstays@c.example\n++++\n",
    );
    // b.example sorts between a and c: every index after it moves.
    let new = build(
        "1|a.example\tDOMAIN:\ta.example\n1|a.example\tDIR:\tx@a.example\n\
1|b.example\tDOMAIN:\tb.example\n1|b.example\tDIR:\tnew@b.example\n\
1|c.example\tDOMAIN:\tc.example\n1|c.example\tDIR:\tstays@c.example\n1|c.example\tDIR:\tzed@c.example\n++++\n",
    );
    let mut changes = Vec::new();
    directory::diff(&old, &new, |c| {
        changes.push(match c {
            directory::Change::Added(a) => format!("+{a}"),
            directory::Change::Removed(r) => format!("-{r}"),
        })
    });
    assert_eq!(
        changes,
        vec!["+new@b.example", "-gone@c.example", "+zed@c.example"]
    );
}
