//! The `rcptgate` binary on the bundled example, as the README shows it.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rcptgate"))
}

fn example(name: &str) -> String {
    format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `rcptgate diff` finds no address added or removed between two snapshots (or sets).
fn same_addresses(a: &std::path::Path, b: &std::path::Path) {
    let o = bin().arg("diff").arg(a).arg(b).output().expect("runs");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("0 added, 0 removed"), "{stdout}");
}

fn compile(dir: &tempfile::TempDir, sources: &[&str], name: &str) -> PathBuf {
    let out = dir.path().join(name);
    let o = bin()
        .arg("compile")
        .args(sources)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("runs");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    out
}

#[test]
fn compile_prints_counts_and_sizes() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("ex.snap");
    let o = bin()
        .args(["compile", &example("example.map"), "-o"])
        .arg(&out)
        .output()
        .expect("runs");
    let (stdout, _) = text(&o);
    assert!(o.status.success());
    for want in [
        "addresses:   24",
        "domains:     5",
        "conflicts:   0",
        "bytes/address",
        "build time:",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in\n{stdout}");
    }
    assert!(out.exists());
}

#[test]
fn lookup_json_has_the_documented_fields() {
    let dir = tempfile::tempdir().expect("tmp");
    let snap = compile(&dir, &[&example("example.map")], "ex.snap");
    let o = bin()
        .args(["lookup", "--json", "--snapshot"])
        .arg(&snap)
        .args([
            "Carol+x@Contoso.com",
            "nobody@contoso.com",
            "x@gmail.com",
            "bad@@contoso.com",
            "anyone@fabrikam-lab.com",
            "bad@@x",
        ])
        .output()
        .expect("runs");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 6);
    let carol = &lines[0];
    assert_eq!(carol["input"], "Carol+x@Contoso.com");
    assert_eq!(carol["address"], "carol+x@contoso.com");
    assert_eq!(carol["verdict"], "accept");
    assert_eq!(carol["code"], "250 2.1.5");
    assert_eq!(carol["kind"], "alias");
    assert_eq!(carol["owner"], "carol.chen@contoso.com");
    assert_eq!(carol["customer"], "10001");
    assert_eq!(carol["profile"], "standard");
    assert_eq!(
        carol["route"],
        "smtp:[contoso-com.mail.protection.outlook.com]:25"
    );
    assert!(
        carol["origin"]
            .as_str()
            .expect("origin")
            .ends_with("example.map:18")
    );
    assert_eq!(lines[1]["verdict"], "reject");
    assert_eq!(lines[1]["code"], "550 5.1.1");
    assert_eq!(lines[2]["verdict"], "not_ours");
    assert!(lines[2].get("code").is_none());
    assert_eq!(lines[3]["verdict"], "reject");
    assert_eq!(lines[3]["code"], "501 5.1.3");
    assert_eq!(lines[4]["kind"], "catch_all");
    // Not a mailbox, and not in a domain we own: neutral, never a 501 (DESIGN.md §4).
    assert_eq!(lines[5]["verdict"], "not_ours");
}

#[test]
fn lookup_from_sources_and_without_anything_loaded() {
    let o = bin()
        .args(["lookup", &example("example.ldif"), "helpdesk@contoso.com"])
        .output()
        .expect("runs");
    let (stdout, _) = text(&o);
    assert!(
        stdout.starts_with("helpdesk@contoso.com: accept 250 2.1.5 kind=shared"),
        "{stdout}"
    );
    // A primary matched through its +detail owns itself, without the detail.
    let o = bin()
        .args([
            "lookup",
            &example("example.map"),
            "Bob.Berger+news@CONTOSO.com",
        ])
        .output()
        .expect("runs");
    let (stdout, _) = text(&o);
    assert!(
        stdout.contains("kind=user owner=bob.berger@contoso.com "),
        "{stdout}"
    );
    // Nothing loaded (no snapshot, no sources): a temporary failure, never a reject.
    let o = bin()
        .args(["lookup", "--json", "alice@contoso.com"])
        .output()
        .expect("runs");
    let (stdout, _) = text(&o);
    assert!(
        stdout.contains("\"verdict\":\"tempfail\"") && stdout.contains("451 4.3.0"),
        "{stdout}"
    );
}

#[test]
fn check_reports_locations_and_fails_on_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.map");
    std::fs::write(&bad, "1|c.example\tDOMAIN:\tc.example\n1|c.example\tDIR:\tbad address@c.example\n1|c.example\tDIR:\tok@c.example\n++++\n").expect("write");
    let o = bin().arg("check").arg(&bad).output().expect("runs");
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("bad.map:2:21: error: invalid address"),
        "{stderr}"
    );
    assert!(
        stdout.contains("1 addresses") && stdout.contains("1 error(s)"),
        "{stdout}"
    );

    let cut = dir.path().join("cut.map");
    std::fs::write(
        &cut,
        "1|c.example\tDOMAIN:\tc.example\n1|c.example\tDIR:\tok@c.example\n",
    )
    .expect("write");
    let o = bin().arg("check").arg(&cut).output().expect("runs");
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("cut.map:2: error: no ++++ end marker"),
        "{stderr}"
    );
    // And compile refuses to write anything from it.
    let out = dir.path().join("never.snap");
    let o = bin()
        .arg("compile")
        .arg(&cut)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("runs");
    assert!(!o.status.success());
    assert!(!out.exists());

    let o = bin()
        .args(["check", &example("example.map"), &example("example.ldif")])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", text(&o).1);
}

#[test]
fn diff_lists_added_and_removed() {
    let dir = tempfile::tempdir().expect("tmp");
    let old = compile(&dir, &[&example("example.map")], "old.snap");
    let newer = dir.path().join("new.map");
    let text_map = std::fs::read_to_string(example("example.map")).expect("read");
    let edited = text_map
        .replace("10001|contoso.com\tDIR:\tfrank.fischer@contoso.com\n", "")
        .replace(
            "++++\n",
            "10001|contoso.com\tDIR:\tnew.hire@contoso.com\n++++\n",
        );
    std::fs::write(&newer, edited).expect("write");
    let o = bin()
        .arg("diff")
        .arg(&old)
        .arg(&newer)
        .output()
        .expect("runs");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("+ new.hire@contoso.com"), "{stdout}");
    assert!(stdout.contains("- frank.fischer@contoso.com"), "{stdout}");
    assert!(stdout.contains("1 added, 1 removed"), "{stdout}");
}

#[test]
fn corrupt_snapshot_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let snap = compile(&dir, &[&example("example.map")], "ex.snap");
    let mut bytes = std::fs::read(&snap).expect("read");
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&snap, &bytes).expect("write");
    let o = bin()
        .args(["lookup", "--snapshot"])
        .arg(&snap)
        .arg("alice@contoso.com")
        .output()
        .expect("runs");
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(stderr.contains("truncated; rebuild it"), "{stderr}");
}

#[test]
fn compile_segments_writes_a_set_that_answers_like_one_snapshot() {
    let dir = tempfile::tempdir().expect("tmp");
    let one = compile(&dir, &[&example("example.map")], "one.snap");
    let set = dir.path().join("set.snap");
    let o = bin()
        .args(["compile", "--segments", &example("example.map"), "-o"])
        .arg(&set)
        .output()
        .expect("runs");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("segment(s) in"), "{stdout}");
    assert!(stdout.contains("addresses:   24"), "{stdout}");
    // One segment per customer of the example (10001, 20002, and the lab domain's).
    let parts = std::fs::read_dir(dir.path().join("set.snap.parts"))
        .expect("parts")
        .count();
    assert!(parts >= 2, "{parts} segment files");
    let ask = |snap: &PathBuf| {
        let o = bin()
            .args(["lookup", "--json", "--snapshot"])
            .arg(snap)
            .args([
                "Carol+x@Contoso.com",
                "nobody@contoso.com",
                "x@gmail.com",
                "bad@@contoso.com",
                "anyone@fabrikam-lab.com",
                "henry.hill@fabrikam.com",
                "info@münchen-contoso.de",
            ])
            .output()
            .expect("runs");
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stderr}");
        stdout
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).expect("json");
                // Generations and domain numbers are the set's own; the answers are not.
                if let Some(m) = v.as_object_mut() {
                    m.remove("generation");
                }
                v
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(ask(&set), ask(&one));
    same_addresses(&one, &set);
}

/// `compile --segments` over many files reads one group of files at a time (files sharing a
/// domain): the set answers what one snapshot of the same files answers, with one segment per
/// customer; a refused file fails it before anything is written.
#[test]
fn compile_segments_over_many_files_answers_like_one_snapshot_and_refuses_before_writing() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        format!("map:{}", p.display())
    };
    let a = file(
        "a.map",
        "1|a.example\tDOMAIN:\ta.example\n1|a.example\tDIR:\tann@a.example\n++++\n",
    );
    let b = file(
        "b.map",
        "2|b.example\tDOMAIN:\tb.example\troute=smtp:[mx.b.example]:25\n2|b.example\tDIR:\tbo@b.example\n++++\n",
    );
    // Another upload of a.example's customer: read with a.map, in its group.
    let c = file(
        "c.map",
        "1|a.example\tDOMAIN:\ta.example\n1|a.example\tDIR:\tcarl@a.example\n1|a.example\tMAP:\tcarl@a.example\tann@a.example\n++++\n",
    );
    let one = compile(&dir, &[&a, &b, &c], "one.snap");
    let set = dir.path().join("set.snap");
    let o = bin()
        .args(["compile", "--segments", &a, &b, &c, "-o"])
        .arg(&set)
        .output()
        .expect("runs");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("wrote") && stdout.contains("2 segment(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("addresses:   3"), "{stdout}");
    same_addresses(&one, &set);
    let o = bin()
        .args(["lookup", "--snapshot"])
        .arg(&set)
        .args(["carl@a.example", "bo@b.example", "nobody@b.example"])
        .output()
        .expect("runs");
    let (stdout, _) = text(&o);
    assert_eq!(stdout.matches(": accept 250").count(), 2, "{stdout}");
    assert!(stdout.contains("carl@a.example: accept 250 2.1.5 kind=alias owner=ann@a.example"));
    assert!(
        stdout.contains("nobody@b.example: reject 550 5.1.1"),
        "{stdout}"
    );
    // An upload without its end marker: refused, no set written.
    let cut = file("cut.map", "3|c.example\tDOMAIN:\tc.example\n");
    let other = dir.path().join("other.snap");
    let o = bin()
        .args(["compile", "--segments", &a, &cut, "-o"])
        .arg(&other)
        .output()
        .expect("runs");
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success(), "{stdout}");
    assert!(stderr.contains("end marker"), "{stderr}");
    assert!(!other.exists() && !dir.path().join("other.snap.parts").exists());
}
