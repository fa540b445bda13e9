//! A full directory sync of 100,000 users (3 addresses each) from a local slapd over LDAPS:
//! `rcptgate serve` from start to its first published snapshot (fetch, map, merge, build,
//! persist, publish), against `ldapsearch -E pr=1000/noprompt` dumping the same attributes
//! with the same filter, interleaved in one run; rcptgate's peak memory from /proc.
//!
//! `cargo bench --features ldap-tests --bench ldap_sync` (root; slapd, ldap-utils, openssl).
//! Under `cargo test` it runs once on 2,000 users as a smoke test.

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "../tests/support/slapd.rs"]
mod slapd;

use std::process::{Command, Stdio};
use std::time::Instant;

use daemon::Daemon;
use slapd::{OU, SVC_DN, SVC_PW, Slapd, ad_ldif};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (users, mut rounds) = if bench { (100_000, 5) } else { (2_000, 1) };
    if let Some(r) = std::env::var("LDAP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        rounds = r;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let t = Instant::now();
    let slapd = Slapd::start(&tmp.path().join("slapd"), &ad_ldif(users, 0, 0));
    eprintln!(
        "slapd with {users} users loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let filter = rcptgate::sources::ldap::DEFAULT_FILTER;
    let attrs = rcptgate::sources::ldap::ATTRIBUTES;
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, SVC_PW).expect("pw");
    let cfg = tmp.path().join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{d}/snap.bin\"\n\n[guard]\nstate = \"{d}/state.json\"\n\n\
[[source]]\nname = \"corp-ad\"\nkind = \"ldap\"\nurl = \"{url}\"\nca_file = \"{ca}\"\nbind = \"{SVC_DN}\"\n\
password_file = \"{pw}\"\nbase_dns = [\"{OU}\"]\ndomains = [\"corp.test\", \"alias.test\"]\n\n\
[policy]\nlisten = [\"127.0.0.1:0\"]\n",
            d = tmp.path().display(),
            url = slapd.url(),
            ca = slapd.ca.display(),
            pw = pw.display()
        ),
    )
    .expect("config");

    let (mut dump, mut sync, mut peak) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        // The bare dump.
        let t = Instant::now();
        let out = Command::new("ldapsearch")
            .env("LDAPTLS_CACERT", &slapd.ca)
            .args(["-x", "-LLL", "-H", &slapd.url(), "-D", SVC_DN, "-y"])
            .arg(&pw)
            .args(["-b", OU, "-E", "pr=1000/noprompt", filter])
            .args(attrs)
            .stdout(Stdio::null())
            .status()
            .expect("ldapsearch");
        assert!(out.success(), "ldapsearch failed");
        dump.push(t.elapsed().as_secs_f64());

        // rcptgate from a cold start to the first snapshot in service.
        for f in ["snap.bin", "state.json"] {
            let _ = std::fs::remove_file(tmp.path().join(f));
        }
        let t = Instant::now();
        let d = Daemon::start(&cfg);
        let s = d.wait_generation(1);
        sync.push(t.elapsed().as_secs_f64());
        eprintln!("{:?}", s.syncs);
        let pid = d.child.id();
        assert_eq!(s.addresses, Some((users / 100 * 99 * 3) as u64), "{s:?}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0);
        peak.push(hwm_kb / 1024.0);
    }
    let (d, s) = (median(dump.clone()), median(sync.clone()));
    println!(
        "\n=== full sync of {users} users ({} addresses) over LDAPS, median of {rounds} ===\n\
ldapsearch -E pr=1000 dump: {d:.2} s (rounds {dump:.2?})\n\
rcptgate start to first publish: {s:.2} s (rounds {sync:.2?}) = {:.2}x the dump; peak RSS {:.0} MiB",
        users / 100 * 99 * 3,
        s / d,
        median(peak)
    );
}
