//! Live sync from a real Active Directory: a Samba AD domain controller provisioned on
//! 127.0.0.1 by the test (Debian's samba packages). Shows what only AD does: a bind by user
//! principal name, AD's bind error sub-code, and incremental sync by uSNChanged, with
//! deletions noticed by the full resync. Run with
//! `cargo test --features ldap-tests --test samba`; `tests/run.sh` installs Samba.
#![cfg(feature = "ldap-tests")]

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/samba.rs"]
mod samba;
#[path = "support/slapd.rs"]
mod slapd;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use daemon::{Daemon, ask, cli as rcptgate};
use samba::{Samba, unicode_pwd};

const BASE: &str = "DC=corp,DC=test";

/// One domain controller at a time: each binds AD's well-known ports on 127.0.0.1.
static ONE_DC: std::sync::Mutex<()> = std::sync::Mutex::new(());
const OU: &str = "OU=AADDC Users,DC=corp,DC=test";
const SVC_PW: &str = "Svc!Passw0rd1";

fn directory_ldif() -> String {
    let mut w = String::new();
    let _ = write!(
        w,
        "dn: {OU}\nchangetype: add\nobjectClass: organizationalUnit\nou: AADDC Users\n\n\
dn: OU=Out Of Scope,{BASE}\nchangetype: add\nobjectClass: organizationalUnit\nou: Out Of Scope\n\n\
dn: CN=svc-smtp,{OU}\nchangetype: add\nobjectClass: user\nsAMAccountName: svc-smtp\n\
userPrincipalName: svc-smtp@corp.test\nunicodePwd:: {}\nuserAccountControl: 66048\n\n\
dn: CN=Hidden,OU=Out Of Scope,{BASE}\nchangetype: add\nobjectClass: user\nsAMAccountName: hidden\n\
userAccountControl: 544\nmail: hidden@corp.test\nproxyAddresses: SMTP:hidden@corp.test\n\n",
        unicode_pwd(SVC_PW)
    );
    for i in 1..=12 {
        let _ = write!(
            w,
            "dn: CN=User {i},{OU}\nchangetype: add\nobjectClass: user\nsAMAccountName: u{i}\n\
userPrincipalName: u{i}@corp.test\nuserAccountControl: {}\nmail: user.{i}@corp.test\n\
proxyAddresses: SMTP:user.{i}@corp.test\nproxyAddresses: smtp:u{i}@corp.test\n\
proxyAddresses: X500:/o=Corp/ou=Exchange/cn=Recipients/cn=u{i}\n\n",
            if i % 5 == 0 { 546 } else { 544 }
        );
    }
    let _ = write!(
        w,
        "dn: CN=Sales,{OU}\nchangetype: add\nobjectClass: group\nsAMAccountName: sales\n\
mail: sales@corp.test\nproxyAddresses: SMTP:sales@corp.test\n\n\
dn: CN=Partner,{OU}\nchangetype: add\nobjectClass: contact\nmail: someone@partner.test\n\n"
    );
    w
}

/// A domain controller with its own CA, holding `directory_ldif()`.
fn start_dc(tmp: &Path) -> Samba {
    let pki = tmp.join("pki");
    slapd::make_pki(&pki, "Corp AD Test CA");
    let dc = Samba::start(&tmp.join("samba"), &pki);
    dc.modify(&directory_ldif());
    dc
}

fn config(dir: &Path, ca: &Path, bind: &str, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("pw"), format!("{SVC_PW}\n")).expect("pw");
    let cfg = dir.join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{d}/snap.bin\"\n\n[[source]]\nname = \"corp-ad\"\nkind = \"ldap\"\n\
url = \"ldaps://127.0.0.1\"\nca_file = \"{ca}\"\nbind = \"{bind}\"\npassword_file = \"{d}/pw\"\n\
base_dns = [\"{OU}\"]\ntimeout = \"10s\"\nretries = 0\n{extra}\n\
[policy]\nlisten = [\"127.0.0.1:0\"]\n",
            d = dir.display(),
            ca = ca.display()
        ),
    )
    .expect("config");
    cfg
}

#[test]
fn active_directory_upn_bind_sub_codes_and_incremental_sync() {
    let _one = ONE_DC.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("tmp");
    let dc = start_dc(tmp.path());

    // A bind by user principal name, as AD accepts it.
    let cfg = config(tmp.path(), &dc.ca, "svc-smtp@corp.test", "");
    let (ok, out) = rcptgate(&["ldap-test", "--config", cfg.to_str().expect("p")]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok    bind         svc-smtp@corp.test"),
        "{out}"
    );
    assert!(out.contains("entries in 1 page(s)"), "{out}");

    // A wrong password: AD's sub-code, explained.
    std::fs::write(tmp.path().join("pw"), "wrong\n").expect("pw");
    let (ok, out) = rcptgate(&["ldap-test", "--config", cfg.to_str().expect("p")]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("AD says invalid credentials (wrong password)")
            && out.contains("fix: wrong password"),
        "{out}"
    );

    // The daemon: a full sync first, then incremental ones.
    let cfg = config(
        tmp.path(),
        &dc.ca,
        "svc-smtp@corp.test",
        "interval = \"1s\"\nfull_interval = \"1h\"\n",
    );
    let d = Daemon::start(&cfg);
    let policy = d.policy.clone();
    let s = d.wait_generation(1);
    let sync =
        |s: &rcptgate::service::Status| s.syncs.iter().find(|x| x.source == "corp-ad").cloned();
    let first = sync(&s).expect("synced");
    assert_eq!(
        (first.kind.as_str(), first.addresses),
        ("full", 26),
        "{s:?}"
    );
    let reject = "action=550 5.1.1 User unknown";
    assert_eq!(ask(&policy, "user.3@corp.test"), "action=DUNNO");
    assert_eq!(ask(&policy, "u3@corp.test"), "action=DUNNO");
    assert_eq!(
        ask(&policy, "user.5@corp.test"),
        "action=DUNNO",
        "shared mailbox"
    );
    assert_eq!(ask(&policy, "sales@corp.test"), "action=DUNNO");
    assert_eq!(ask(&policy, "hidden@corp.test"), reject, "out of scope");
    assert_eq!(ask(&policy, "new.alias@corp.test"), reject);

    // An alias added in AD: picked up by an incremental sync (the changed object only).
    dc.modify(&format!(
        "dn: CN=User 3,{OU}\nchangetype: modify\nadd: proxyAddresses\nproxyAddresses: smtp:new.alias@corp.test\n"
    ));
    let s = d.wait_generation(2);
    let inc = sync(&s).expect("synced");
    assert_eq!(
        (inc.kind.as_str(), inc.changed),
        ("incremental", 1),
        "{s:?}"
    );
    assert_eq!(ask(&policy, "new.alias@corp.test"), "action=DUNNO");

    // Mail removed from an object: the incremental sync drops its addresses (tombstoned).
    dc.modify(&format!(
        "dn: CN=User 4,{OU}\nchangetype: modify\ndelete: proxyAddresses\n-\ndelete: mail\n"
    ));
    let s = d.wait_generation(3);
    assert_eq!(s.last_build.map(|b| b.tombstoned), Some(2));

    // A user deleted in AD: incremental syncs cannot see it; the full resync (SIGHUP here,
    // full_interval otherwise) does, and it is tombstoned, not bounced.
    dc.modify(&format!("dn: CN=User 6,{OU}\nchangetype: delete\n"));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(ask(&policy, "user.6@corp.test"), "action=DUNNO");
    d.signal("-HUP");
    let s = d.wait_generation(4);
    assert_eq!(sync(&s).map(|x| x.kind), Some("full".into()));
    assert_eq!(s.last_build.map(|b| b.tombstoned), Some(2));
    assert_eq!(ask(&policy, "user.6@corp.test"), "action=DUNNO");
}

/// Provision on demand (`sync --object`, `--apply`) and `explain` against Active Directory:
/// a user created after the last full sync is in service within a second of `--apply`, with
/// an audit line, and the next full sync keeps it; an object out of the base DNs' scope is
/// refused with the reason; a disabled account with `include_disabled = false` and a
/// contact elsewhere are explained from the snapshot.
#[test]
fn provision_on_demand_and_explain() {
    let _one = ONE_DC.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("tmp");
    let dc = start_dc(tmp.path());
    let audit = tmp.path().join("audit.log");
    let cfg = config(
        tmp.path(),
        &dc.ca,
        "svc-smtp@corp.test",
        &format!(
            "interval = \"1h\"\nfull_interval = \"1h\"\ninclude_disabled = false\n\n[audit]\npath = \"{}\"\n",
            audit.display()
        ),
    );
    let d = Daemon::start(&cfg);
    let policy = d.policy.clone();
    d.wait_generation(1);
    let reject = "action=550 5.1.1 User unknown";
    assert_eq!(ask(&policy, "newbie@corp.test"), reject);
    let c = cfg.to_str().expect("p");

    // Created after the full sync: not in service until the next one (an hour from now).
    dc.modify(&format!(
        "dn: CN=Newbie,{OU}\nchangetype: add\nobjectClass: user\nsAMAccountName: newbie\n\
userPrincipalName: newbie@corp.test\nuserAccountControl: 544\nmail: newbie@corp.test\n\
proxyAddresses: SMTP:newbie@corp.test\nproxyAddresses: smtp:nb@corp.test\n"
    ));
    let (ok, out) = rcptgate(&["sync", "--object", "newbie@corp.test", "--config", c]);
    assert!(ok, "{out}");
    let found = format!("ok    found        CN=Newbie,{OU} under base {OU} (Subtree)");
    for want in [
        found.as_str(),
        "ok    filter       selected by",
        "ok    mapping      newbie@corp.test: user — primary",
        "ok    mapping      nb@corp.test: alias",
        "snapshot     newbie@corp.test: not in service (reject)",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    let t = std::time::Instant::now();
    let (ok, out) = rcptgate(&[
        "sync",
        "--object",
        "newbie@corp.test",
        "--apply",
        "--config",
        c,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("ok    applied      generation 2"), "{out}");
    assert_eq!(ask(&policy, "nb@corp.test"), "action=DUNNO");
    let took = t.elapsed();
    eprintln!("sync --object --apply to accepted: {took:?}");
    let audited = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(
        audited
            .lines()
            .any(|l| l.contains("\"generation\":2") && l.contains("newbie@corp.test")),
        "{audited}"
    );
    // The next full sync (SIGHUP) keeps it.
    let before = d.rebuilds();
    d.signal("-HUP");
    d.after(before);
    assert_eq!(ask(&policy, "newbie@corp.test"), "action=DUNNO");

    // Out of scope: refused, with why.
    let (ok, out) = rcptgate(&[
        "sync",
        "--object",
        "hidden@corp.test",
        "--apply",
        "--config",
        c,
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("under none of base_dns"), "{out}");

    // explain from the daemon: a disabled account (include_disabled = false) and a contact.
    let (ok, out) = rcptgate(&[
        "explain",
        "--config",
        c,
        "user.5@corp.test",
        "someone@partner.test",
        "user.3@corp.tset",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("CN=User 5,{OU}")) && out.contains("disabled"),
        "{out}"
    );
    assert!(
        out.contains("someone@partner.test: not_ours") && out.contains("a contact in partner.test"),
        "{out}"
    );
    assert!(out.contains("near       corp.test"), "{out}");
}
