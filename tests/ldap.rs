//! Live directory sync against a real LDAP server: OpenLDAP's slapd with the Active Directory
//! attribute names (Debian's `slapd`, started on loopback by the test; AD's 1000-entry limit
//! on unpaged searches enforced). Run with `cargo test --features ldap-tests --test ldap`;
//! `tests/run.sh` installs slapd.
#![cfg(feature = "ldap-tests")]

#[path = "support/slapd.rs"]
mod slapd;

#[path = "support/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::{Daemon, cli_split as rcptgate};
use slapd::{OU, SVC_DN, SVC_PW, Slapd, ad_ldif};

/// A config with one LDAP source; `extra` goes into the source table.
fn config(dir: &Path, url: &str, ca: &Path, extra: &str) -> PathBuf {
    std::fs::write(dir.join("pw"), format!("{SVC_PW}\n")).expect("pw");
    let cfg = dir.join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{d}/snap.bin\"\n\n[[source]]\nname = \"corp-ad\"\nkind = \"ldap\"\n\
url = \"{url}\"\nca_file = \"{ca}\"\nbind = \"{SVC_DN}\"\npassword_file = \"{d}/pw\"\n\
base_dns = [\"{OU}\"]\ndomains = [\"corp.test\", \"alias.test\"]\ntimeout = \"5s\"\nretries = 0\n{extra}\n\
[policy]\nlisten = [\"127.0.0.1:0\"]\n",
            d = dir.display(),
            ca = ca.display()
        ),
    )
    .expect("config");
    cfg
}

#[test]
fn sync_once_pages_maps_and_writes_a_map_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let slapd = Slapd::start(&tmp.path().join("slapd"), &ad_ldif(1500, 10, 5));
    let cfg = config(tmp.path(), &slapd.url(), &slapd.ca, "");
    let map = tmp.path().join("out.map");
    let (ok, out, err) = rcptgate(&[
        "sync",
        "--once",
        "--config",
        cfg.to_str().expect("path"),
        "--output",
        map.to_str().expect("path"),
    ]);
    assert!(ok, "{out}{err}");
    // The filter takes mail-enabled objects: 1485 users (15 have no mail; 15 of the rest
    // are disabled = shared mailboxes) + 10 groups + 5 contacts = 1500 entries, more than
    // one page of 1000, so paging worked. Addresses: 1485 x 3 + 10 x 2 + 5 = 4480, in
    // corp.test, alias.test and the contacts' partner.test.
    assert!(out.contains("corp-ad: 1500 entries in 2 page(s)"), "{out}");
    assert!(out.contains(": 4480 addresses in 3 domain(s)"), "{out}");
    assert!(out.contains("10 group"), "{out}");
    assert!(err.contains("1000 entries, 1 pages"), "{err}");

    // The MAP file answers as the directory would.
    let q = |addr: &str| -> String {
        let (ok, out, err) = rcptgate(&["lookup", map.to_str().expect("path"), addr]);
        assert!(ok, "{err}");
        out
    };
    assert!(q("user.7@corp.test").contains("accept 250 2.1.5 kind=user"));
    assert!(q("U000007@CORP.test").contains("kind=alias owner=user.7@corp.test"));
    assert!(q("user.7@alias.test").contains("kind=alias"));
    assert!(
        q("user.50@corp.test").contains("kind=shared"),
        "disabled = shared mailbox"
    );
    assert!(q("grp00003@alias.test").contains("kind=alias owner=grp00003@corp.test"));
    assert!(
        q("user.100@corp.test").contains("reject 550 5.1.1"),
        "no mail attribute"
    );
    assert!(
        q("hidden@corp.test").contains("reject 550 5.1.1"),
        "out of scope OU"
    );
    assert!(
        q("ext1@partner.test").contains("not_ours"),
        "a contact's domain is not ours"
    );
}

#[test]
fn wrong_password_wrong_ca_and_closed_port_say_what_to_fix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let slapd = Slapd::start(&tmp.path().join("slapd"), &ad_ldif(3, 0, 0));
    let sync = |cfg: &Path| {
        let (ok, out, err) = rcptgate(&["sync", "--once", "--config", cfg.to_str().expect("p")]);
        assert!(!ok, "{out}");
        err
    };
    let cfg = config(tmp.path(), &slapd.url(), &slapd.ca, "");
    std::fs::write(tmp.path().join("pw"), "wrong\n").expect("pw");
    let err = sync(&cfg);
    assert!(
        err.contains("bind as CN=svc-smtp") && err.contains("result code 49 (invalid credentials)"),
        "{err}"
    );
    assert!(
        !err.contains("wrong"),
        "the password is never printed: {err}"
    );

    let other = tmp.path().join("other-ca");
    slapd::make_pki(&other, "Some Other CA");
    let cfg = config(tmp.path(), &slapd.url(), &other.join("ca.pem"), "");
    let err = sync(&cfg);
    assert!(
        err.contains("TLS with ldaps://127.0.0.1") && err.contains("set ca_file"),
        "{err}"
    );

    let closed = slapd::free_port();
    let cfg = config(
        tmp.path(),
        &format!("ldaps://127.0.0.1:{closed}"),
        &slapd.ca,
        "",
    );
    let err = sync(&cfg);
    assert!(
        err.contains("cannot connect to ldaps://127.0.0.1") && err.contains("firewall"),
        "{err}"
    );

    // A base DN with nothing in it: refused, never an empty directory.
    let cfg = config(tmp.path(), &slapd.url(), &slapd.ca, "");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).expect("cfg").replace(
            &format!("base_dns = [\"{OU}\"]"),
            "base_dns = [\"OU=Empty,DC=corp,DC=test\"]",
        ),
    )
    .expect("cfg");
    std::fs::write(tmp.path().join("pw"), format!("{SVC_PW}\n")).expect("pw");
    let err = sync(&cfg);
    assert!(
        err.contains("returned no entries; refusing an empty directory"),
        "{err}"
    );

    // StartTLS on the plain port works with the same CA.
    let cfg = config(
        tmp.path(),
        &format!("ldap://127.0.0.1:{}", slapd.plain_port),
        &slapd.ca,
        "starttls = true\n",
    );
    std::fs::write(tmp.path().join("pw"), format!("{SVC_PW}\n")).expect("pw");
    let (ok, out, err) = rcptgate(&["sync", "--once", "--config", cfg.to_str().expect("p")]);
    assert!(ok && out.contains(": 9 addresses"), "{out}{err}");
}

#[test]
fn the_daemon_syncs_changes_tombstones_deletions_and_survives_an_outage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut slapd = Slapd::start(&tmp.path().join("slapd"), &ad_ldif(40, 2, 1));
    let cfg = config(tmp.path(), &slapd.url(), &slapd.ca, "interval = \"1s\"\n");
    // Answers must come within a second here, so a frozen server is noticed fast.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .expect("cfg")
            .replace("timeout = \"5s\"", "timeout = \"1s\""),
    )
    .expect("cfg");
    let d = Daemon::start(&cfg);
    d.wait_generation(1);
    let reject = "action=550 5.1.1 User unknown";
    assert_eq!(d.ask("user.7@corp.test"), "action=DUNNO");
    assert_eq!(d.ask("u000007@corp.test"), "action=DUNNO");
    assert_eq!(d.ask("grp00001@alias.test"), "action=DUNNO");
    assert_eq!(d.ask("new.alias@corp.test"), reject);
    assert_eq!(d.ask("hidden@corp.test"), reject);

    // An alias added in the directory is accepted after the next sync.
    slapd.modify(&format!(
        "dn: CN=User 000007,{OU}\nchangetype: modify\nadd: proxyAddresses\nproxyAddresses: smtp:new.alias@corp.test\n"
    ));
    d.wait_generation(2);
    assert_eq!(d.ask("new.alias@corp.test"), "action=DUNNO");

    // A user deleted in the directory is tombstoned, not bounced.
    slapd.modify(&format!("dn: CN=User 000008,{OU}\nchangetype: delete\n"));
    let s = d.wait_generation(3);
    assert_eq!(s.last_build.map(|b| b.tombstoned), Some(3));
    assert_eq!(d.ask("user.8@corp.test"), "action=DUNNO");

    // The server hangs (frozen mid-service): the sync times out, the snapshot stays.
    let failed = d.status().reloads_failed;
    slapd.pause();
    let s = d.failed_after(failed);
    let e = s.last_error.unwrap_or_default();
    assert!(e.contains("no answer within"), "{e}");
    // Status answers while syncs hang, and says one runs.
    let s = d.wait("a sync in progress", |s| s.running.is_some());
    assert_eq!(s.generation, Some(3));
    assert_eq!(d.ask("user.7@corp.test"), "action=DUNNO");
    assert_eq!(d.ask("nobody@corp.test"), reject);
    slapd.resume();

    // The server goes away: syncs fail, the snapshot in service stays.
    let failed = d.status().reloads_failed;
    slapd.stop();
    d.failed_after(failed);
    assert_eq!(d.status().generation, Some(3));
    assert_eq!(d.ask("user.7@corp.test"), "action=DUNNO");
    assert_eq!(d.ask("nobody@corp.test"), reject);
    // It comes back: syncs resume.
    slapd.run();
    slapd.modify(&format!(
        "dn: CN=User 000009,{OU}\nchangetype: modify\nadd: proxyAddresses\nproxyAddresses: smtp:back.again@corp.test\n"
    ));
    d.wait_generation(4);
    assert_eq!(d.ask("back.again@corp.test"), "action=DUNNO");
}

#[test]
fn sigterm_during_a_hanging_sync_exits_at_once_and_status_answers_meanwhile() {
    let tmp = tempfile::tempdir().expect("tmp");
    let slapd = Slapd::start(&tmp.path().join("slapd"), &ad_ldif(20, 1, 0));
    // A sync against a frozen server waits 60 s per try, with retries: minutes.
    let cfg = config(tmp.path(), &slapd.url(), &slapd.ca, "interval = \"1h\"\n");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .expect("cfg")
            .replace("timeout = \"5s\"", "timeout = \"60s\"")
            .replace("retries = 0", "retries = 2"),
    )
    .expect("cfg");
    let mut d = Daemon::start(&cfg);
    d.wait_generation(1);
    slapd.pause();
    d.signal("-HUP");
    let s = d.wait("the sync to run", |s| {
        s.running.as_ref().is_some_and(|r| r.reason == "SIGHUP")
    });
    // The directory keeps answering, and so does the control socket.
    assert_eq!(s.generation, Some(1));
    assert_eq!(d.ask("user.7@corp.test"), "action=DUNNO");
    assert!(d.status().running.is_some());
    d.signal("-TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = d.child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 15 s after SIGTERM\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}\n{}", d.log());
    slapd.resume();
}

#[test]
fn ldap_test_walks_every_step_and_says_what_to_fix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("slapd");
    // A server certificate that expires in 10 days.
    slapd::make_pki_days(&dir.join("pki"), "Corp Test CA", 10);
    let slapd = Slapd::start(&dir, &ad_ldif(20, 1, 0));
    let test = |cfg: &Path| rcptgate(&["ldap-test", "--config", cfg.to_str().expect("p")]);

    let cfg = config(tmp.path(), &slapd.url(), &slapd.ca, "");
    let (ok, out, err) = test(&cfg);
    assert!(ok, "{out}{err}");
    for want in [
        "ok    resolve      127.0.0.1 -> 127.0.0.1",
        "ok    connect      127.0.0.1:",
        "WARN  certificate  subject CN=localhost, issuer CN=Corp Test CA",
        "fix: renew the LDAPS certificate: it expires in ",
        "ok    bind         CN=svc-smtp",
        "ok    tls          TLSv1_3, TLS13_",
        "names [DNS:localhost, IP:127.0.0.1]",
        &format!("ok    search       {OU}: 21 entries in 1 page(s)"),
        "User 000001,",
        "user.1@corp.test u000001@corp.test user.1@alias.test",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }

    // StartTLS on the plain port.
    let cfg = config(
        tmp.path(),
        &format!("ldap://127.0.0.1:{}", slapd.plain_port),
        &slapd.ca,
        "starttls = true\n",
    );
    let (ok, out, _) = test(&cfg);
    assert!(ok && out.contains("ok    starttls     accepted"), "{out}");

    // Unknown CA: the certificate is still shown, with the fix.
    let other = tmp.path().join("other-ca");
    slapd::make_pki(&other, "Some Other CA");
    let cfg = config(tmp.path(), &slapd.url(), &other.join("ca.pem"), "");
    let (ok, out, _) = test(&cfg);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL  tls") && out.contains("UnknownIssuer"),
        "{out}"
    );
    assert!(
        out.contains("point ca_file at the CA that issued it"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  certificate  subject CN=localhost, issuer CN=Corp Test CA"),
        "{out}"
    );

    // Wrong password.
    let cfg = config(tmp.path(), &slapd.url(), &slapd.ca, "");
    std::fs::write(tmp.path().join("pw"), "wrong\n").expect("pw");
    let (ok, out, _) = test(&cfg);
    assert!(
        !ok && out.contains("FAIL  bind") && out.contains("invalid credentials"),
        "{out}"
    );

    // Nothing listening.
    let closed = slapd::free_port();
    let cfg = config(
        tmp.path(),
        &format!("ldaps://127.0.0.1:{closed}"),
        &slapd.ca,
        "",
    );
    let (ok, out, _) = test(&cfg);
    assert!(
        !ok && out.contains("FAIL  connect") && out.contains("nothing listens on port"),
        "{out}"
    );
}
