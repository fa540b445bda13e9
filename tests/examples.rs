//! The examples, run as a user would: `smtp_receiver` answers RCPT from the directory, driven
//! by a real SMTP client (Python's smtplib), every reply checked; `embed` prints its answers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An example's binary, built by `cargo build --examples` (tests/run.sh does) next to the
/// tests.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("examples").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --examples` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// Killed on drop.
struct Receiver(Child, String);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the receiver on a config whose only source is `map`; its address.
fn receiver(dir: &Path, map: &Path) -> Receiver {
    let cfg = dir.join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{}\"\n\n[[source]]\nname = \"m\"\nkind = \"map\"\npath = \"{}\"\n",
            dir.join("snap.bin").display(),
            map.display()
        ),
    )
    .expect("config");
    let mut child = Command::new(example("smtp_receiver"))
        .arg(&cfg)
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address")
        .to_owned();
    Receiver(child, addr)
}

/// One SMTP session through smtplib: EHLO, MAIL, RCPT for each address, DATA when one was
/// accepted, QUIT. The replies as JSON.
fn smtp(addr: &str, rcpts: &[&str]) -> serde_json::Value {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let script = r#"
import json, smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=10)
out = {"ehlo": s.ehlo()[0], "mail": s.mail("sender@example.org")[0], "rcpt": []}
ok = 0
for r in sys.argv[3:]:
    code, msg = s.rcpt(r)
    ok += code == 250
    out["rcpt"].append([code, msg.decode()])
if ok:
    code, msg = s.data(b"Subject: test\r\n\r\n.leading dot\r\nhello\r\n")
    out["data"] = [code, msg.decode()]
out["quit"] = s.quit()[0]
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([host, port])
        .args(rcpts)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn rcpt_codes(v: &serde_json::Value) -> Vec<(u64, String)> {
    v["rcpt"]
        .as_array()
        .expect("rcpt")
        .iter()
        .map(|r| {
            (
                r[0].as_u64().unwrap_or(0),
                r[1].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn smtp_receiver_answers_rcpt_from_the_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("dir.map");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map"),
        &map,
    )
    .expect("map");
    let r = receiver(tmp.path(), &map);
    // The first build runs in the background: until it is done, RCPT is deferred (451).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = smtp(&r.1, &["alice@contoso.com"]);
        match rcpt_codes(&v)[0].0 {
            250 => break,
            451 => assert!(Instant::now() < deadline, "never loaded"),
            other => panic!("before the first build: {other} {v}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = smtp(
        &r.1,
        &[
            "alice@contoso.com",
            "Bob.Berger+news@CONTOSO.com",
            "nobody@contoso.com",
            "bad..dots@contoso.com",
            "someone@gmail.com",
            "postmaster@contoso.com",
        ],
    );
    assert_eq!(
        (v["ehlo"].as_u64(), v["mail"].as_u64()),
        (Some(250), Some(250)),
        "{v}"
    );
    let got = rcpt_codes(&v);
    assert_eq!(got[0].0, 250, "{v}");
    assert!(got[0].1.starts_with("2.1.5"), "{v}");
    assert!(
        got[0]
            .1
            .contains("alias via smtp:[exch01.corp.contoso.com]:25"),
        "{v}"
    );
    assert_eq!(got[1].0, 250, "{v}");
    assert_eq!(got[2], (550, "5.1.1 User unknown".into()), "{v}");
    assert_eq!(got[3].0, 501, "{v}");
    assert!(got[3].1.starts_with("5.1.3"), "{v}");
    assert_eq!(got[4], (554, "5.7.1 Relay access denied".into()), "{v}");
    assert_eq!(got[5].0, 250, "{v}");
    assert!(got[5].1.contains("reserved"), "{v}");
    assert_eq!(v["data"][0].as_u64(), Some(250), "{v}");
    assert!(
        v["data"][1]
            .as_str()
            .is_some_and(|m| m.contains("for 3 recipient(s)")),
        "{v}"
    );
    assert_eq!(v["quit"].as_u64(), Some(221), "{v}");
}

#[test]
fn smtp_receiver_defers_when_the_directory_cannot_load() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = receiver(tmp.path(), &tmp.path().join("missing.map"));
    let v = smtp(&r.1, &["alice@contoso.com", "someone@gmail.com"]);
    let got = rcpt_codes(&v);
    assert_eq!(got[0].0, 451, "{v}");
    assert!(got[0].1.starts_with("4.3.0"), "{v}");
    // Nothing loaded: not even "not ours" can be known, so that is deferred too.
    assert_eq!(got[1].0, 451, "{v}");
    assert!(v.get("data").is_none(), "{v}");
}

#[test]
fn embed_prints_verdict_route_and_profile() {
    let out = Command::new(example("embed"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "alice@contoso.com",
            "nobody@contoso.com",
            "someone@example.org",
        ])
        .output()
        .expect("embed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "alice@contoso.com: 250 alias route=smtp:[exch01.corp.contoso.com]:25 profile=executives"
        ),
        "{text}"
    );
    assert!(
        text.contains("nobody@contoso.com: 550 5.1.1 User unknown"),
        "{text}"
    );
    assert!(
        text.contains("someone@example.org: not one of our domains"),
        "{text}"
    );
}
