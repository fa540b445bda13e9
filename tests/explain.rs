//! `explain` for every reason an address gets its answer, from a snapshot alone: built from a
//! MAP file (an invalid address, a conflict, an address in a domain not accepted), an LDIF
//! export mapped with `include_disabled = false` (a disabled user, a computer with mail, a
//! shared mailbox, an X500-only object), Graph objects (a guest, a group that is not
//! mail-enabled) and an exceptions source; a typo, a foreign domain, the example directory;
//! and the daemon's `explain` through the control socket, with the audit log's history of a
//! removal and of an expired tombstone.

mod common;
#[path = "support/daemon.rs"]
mod daemon;

use std::sync::Arc;

use rcptgate::sources::{self, Format, Role, SourceData};
use rcptgate::{LookupOptions, Snapshot};

const MAP: &str =
    "1|contoso.com\tDOMAIN:\tcontoso.com\troute=smtp:[mx.contoso.com]:25\tprofile=standard
1|contoso.com\tDIR:\talice@contoso.com
1|contoso.com\tDIR:\tbob@contoso.com
1|contoso.com\tDIR:\tsales@contoso.com
1|contoso.com\tMAP:\tsales@contoso.com\talice@contoso.com
1|contoso.com\tDIR:\tjo..hn@contoso.com
1|contoso.com\tDIR:\tfinance@contoso.com
1|contoso.com\tDIR:\tmallory@contoso.com
++++
";

const LDIF: &str = "dn: CN=Dieter,OU=Staff,DC=contoso,DC=com
objectClass: user
mail: dieter@contoso.com
proxyAddresses: SMTP:dieter@contoso.com
proxyAddresses: smtp:d.dorn@contoso.com
userAccountControl: 514

dn: CN=Bob Two,OU=Staff,DC=contoso,DC=com
objectClass: user
mail: bob2@contoso.com
proxyAddresses: SMTP:bob2@contoso.com
proxyAddresses: smtp:sales@contoso.com
userAccountControl: 512

dn: CN=PRINTER1,OU=Devices,DC=contoso,DC=com
objectClass: computer
mail: printer@contoso.com

dn: CN=Legacy,OU=Staff,DC=contoso,DC=com
objectClass: user
proxyAddresses: X500:/o=Contoso/ou=Exchange/cn=Recipients/cn=legacy
userAccountControl: 512

dn: CN=Partner,OU=Contacts,DC=contoso,DC=com
objectClass: contact
mail: partner@fabrikam.example
";

fn snapshot() -> Snapshot {
    let name: Arc<str> = Arc::from("dir.map");
    let map = sources::parse_text(Format::Map, &name, MAP).expect("map");
    let ldif_name: Arc<str> = Arc::from("ad.ldif");
    let ldif = sources::ldif::parse(
        &ldif_name,
        LDIF,
        &sources::ad::AdOptions {
            include_disabled: false,
        },
    );
    let exc_name: Arc<str> = Arc::from("exceptions");
    let mut exceptions =
        sources::parse_text(Format::Postfix, &exc_name, "mallory@contoso.com REJECT\n")
            .expect("exceptions");
    exceptions.role = Role::Exceptions;
    let graph = {
        use rcptgate::sources::graph::{Credential, GraphConfig, build_data};
        let cfg = GraphConfig::new(
            "t",
            "c",
            Credential::Secret(rcptgate::sources::ldap::PasswordSource::None),
        );
        let obj = |v: serde_json::Value| match v {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        let mut objects = std::collections::HashMap::new();
        objects.insert(
            "users/g1".to_owned(),
            obj(serde_json::json!({"id": "g1", "mail": "guest.user@contoso.com", "userType": "Guest",
                "accountEnabled": true, "proxyAddresses": ["SMTP:guest.user@contoso.com"]})),
        );
        objects.insert(
            "groups/s1".to_owned(),
            obj(
                serde_json::json!({"id": "s1", "mail": "secgroup@contoso.com", "mailEnabled": false,
                "securityEnabled": true, "proxyAddresses": []}),
            ),
        );
        let (d, _) = build_data(&Arc::from("entra"), &cfg, &objects);
        d
    };
    let srcs: Vec<SourceData> = vec![map, ldif, graph, exceptions];
    let mut merged = rcptgate::sync::merge(&srcs, 1);
    let (bytes, _) = merged.build().expect("build");
    Snapshot::from_bytes(bytes).expect("snapshot")
}

fn opts() -> LookupOptions {
    LookupOptions {
        separators: b"+".as_slice().into(),
        always_accept: vec!["postmaster".into()],
    }
}

#[test]
fn every_reason_is_explained_from_the_snapshot() {
    let snap = snapshot();
    let x = |a: &str| snap.explain(a, &opts());

    // A hit, with the claim that won and the one that lost a conflict.
    let e = x("sales@contoso.com");
    assert_eq!(e.verdict, "accept");
    assert!(
        e.record
            .as_deref()
            .is_some_and(|r| r.contains("owner=alice@contoso.com")),
        "{e:?}"
    );
    assert!(e.claims[0].starts_with("dir.map:"), "{e:?}");
    assert!(
        e.claims
            .iter()
            .any(|c| c.contains("ad.ldif") && c.contains("CN=Bob Two") && c.contains("lost")),
        "{e:?}"
    );

    // Disabled account (include_disabled = false): both of its addresses.
    for a in ["dieter@contoso.com", "d.dorn@contoso.com"] {
        let e = x(a);
        assert_eq!(e.verdict, "reject");
        assert!(e.step.contains("left it out"), "{e:?}");
        assert!(
            e.excluded
                .iter()
                .any(|l| l.contains("CN=Dieter") && l.contains("disabled")),
            "{e:?}"
        );
    }
    // A computer with a mail attribute.
    let e = x("printer@contoso.com");
    assert!(e.excluded.iter().any(|l| l.contains("not a user")), "{e:?}");
    // Graph: a guest and a group that is not mail-enabled.
    let e = x("guest.user@contoso.com");
    assert!(e.excluded.iter().any(|l| l.contains("guest")), "{e:?}");
    let e = x("secgroup@contoso.com");
    assert!(
        e.excluded.iter().any(|l| l.contains("not mail-enabled")),
        "{e:?}"
    );
    // Invalid syntax in the source, with its file:line:column.
    let e = x("jo..hn@contoso.com");
    assert_eq!(e.verdict, "reject");
    assert!(
        e.excluded
            .iter()
            .any(|l| l.starts_with("dir.map:6:") && l.contains("invalid_syntax")),
        "{e:?}"
    );
    // An exception.
    let e = x("mallory@contoso.com");
    assert_eq!(e.verdict, "reject");
    assert!(e.step.contains("exceptions"), "{e:?}");
    assert!(
        e.claims.iter().any(|c| c.starts_with("exceptions:1")),
        "{e:?}"
    );
    // A contact in a domain that is not ours: neutral, and the source's entry shows.
    let e = x("partner@fabrikam.example");
    assert_eq!(e.verdict, "not_ours");
    assert!(
        e.excluded
            .iter()
            .any(|l| l.contains("not an accepted domain")),
        "{e:?}"
    );
    // A typo: the closest addresses of the domain.
    let e = x("alise@contoso.com");
    assert_eq!(e.verdict, "reject");
    assert!(e.step.starts_with("8: not in any source"), "{e:?}");
    assert_eq!(e.similar, ["alice@contoso.com"]);
    let e = x("bbo@contoso.com");
    assert!(e.similar.contains(&"bob@contoso.com".to_owned()), "{e:?}");
    // A foreign domain near ours.
    let e = x("alice@contoso.co");
    assert_eq!(e.verdict, "not_ours");
    assert_eq!(e.near_domains, ["contoso.com"]);
    // An X500-only object has no SMTP address: nothing of it is an address to explain.
    let e = x("legacy@contoso.com");
    assert!(e.excluded.is_empty() && e.step.starts_with("8:"), "{e:?}");
    // Counts by reason.
    let counts = snap.excluded_counts();
    assert!(counts.len() >= 6, "{counts:?}");
}

#[test]
fn the_example_directory_and_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("ex.snap");
    let example = format!("{}/config/example.map", env!("CARGO_MANIFEST_DIR"));
    let (ok, out) = daemon::cli(&["compile", &example, "-o", &snap.display().to_string()]);
    assert!(ok, "{out}");
    let s = snap.display().to_string();
    let (ok, out) = daemon::cli(&[
        "explain",
        "--snapshot",
        &s,
        "alise@contoso.com",
        "alice@contoso.com",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("did you mean alice@contoso.com"), "{out}");
    assert!(
        out.contains("claimed by config/example.map:12") || out.contains("example.map:12"),
        "{out}"
    );
    let (ok, out) = daemon::cli(&["explain", "--json", "--snapshot", &s, "someone@gmail.com"]);
    assert!(ok, "{out}");
    let v: serde_json::Value =
        serde_json::from_str(out.lines().next().unwrap_or("")).expect("json");
    assert_eq!(v["verdict"], "not_ours");
}

#[test]
fn the_daemon_explains_with_the_audit_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let map = dir.path().join("dir.map");
    let lines = |extra: &str| {
        format!(
            "1|contoso.com\tDOMAIN:\tcontoso.com\n1|contoso.com\tDIR:\talice@contoso.com\n1|contoso.com\tDIR:\tbob@contoso.com\n{extra}++++\n"
        )
    };
    std::fs::write(&map, lines("1|contoso.com\tDIR:\tcarol@contoso.com\n")).expect("map");
    let config = dir.path().join("rcptgate.toml");
    std::fs::write(
        &config,
        format!(
            "[directory]\nsnapshot = \"{}\"\n\n[[source]]\nname = \"d\"\nkind = \"map\"\npath = \"{}\"\n\n\
[policy]\nlisten = [\"127.0.0.1:0\"]\n\n[guard]\nmax_deletion_ratio = 0.5\ndeletion_grace = \"1s\"\n\n[audit]\npath = \"{}\"\n",
            dir.path().join("snap").display(),
            map.display(),
            dir.path().join("audit.log").display()
        ),
    )
    .expect("config");
    let d = daemon::Daemon::start(&config);
    d.wait_generation(1);
    std::fs::write(&map, lines("")).expect("map");
    d.wait_generation(2);
    let c = config.display().to_string();
    // Removed: a tombstone for its grace period (1 s here), unless that already ran out.
    let (ok, out) = daemon::cli(&["explain", "--config", &c, "carol@contoso.com"]);
    assert!(ok, "{out}");
    if out.contains(": accept") {
        assert!(out.contains("6: a tombstone"), "{out}");
    }
    // The grace ends: a publish drops the tombstone.
    d.wait("the tombstone to expire", |s| {
        s.tombstones == 0 && s.generation >= Some(3)
    });
    let (ok, out) = daemon::cli(&[
        "explain",
        "--config",
        &c,
        "carol@contoso.com",
        "bob@contoso.com",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("carol@contoso.com: reject 550 5.1.1"), "{out}");
    assert!(
        out.contains("generation 2 removed it from the sources (kept as a tombstone"),
        "{out}"
    );
    assert!(
        out.contains("dropped its tombstone (grace period over)"),
        "{out}"
    );
    assert!(out.contains("bob@contoso.com: accept"), "{out}");
    // The README shows this output.
    println!("{out}");
}
