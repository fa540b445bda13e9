//! A full Microsoft Graph sync of 100,000 users and 20,000 groups from the local fake of
//! Graph (tests/support/graph.rs, HTTPS, pages of 999): `rcptgate serve` from its start to the
//! first published snapshot, with its peak RSS, next to the time the same fake takes to serve
//! the same pages to a bare HTTP client (reqwest, JSON parsed, nothing else), interleaved,
//! median of 3. Needs `openssl` for the fake's certificates.
//!
//! `cargo bench --features ldap-tests --bench graph_sync`; under `cargo test` it runs once on
//! 2,000 users as a smoke test.

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "../tests/support/graph.rs"]
mod graph;
#[path = "../tests/support/slapd.rs"]
mod slapd;

use std::time::{Duration, Instant};

use graph::{CLIENT, FakeGraph, SECRET, TENANT, Tenant, user};
use serde_json::{Value, json};

fn tenant(users: usize, groups: usize) -> Tenant {
    let mut t = Tenant {
        secret: SECRET.into(),
        ..Tenant::default()
    };
    for i in 0..users {
        let id = format!("u{i:07}");
        let d = if i % 3 == 0 {
            "contoso.com"
        } else {
            "fabrikam.com"
        };
        let mut u = user(&id, &format!("user{i}@{d}"), &[&format!("u{i}@{d}")]);
        if i % 50 == 0 {
            u["accountEnabled"] = json!(false);
        }
        t.user(&id, u);
    }
    for i in 0..groups {
        let id = format!("g{i:07}");
        t.group(
            &id,
            json!({"id": id, "mail": format!("group{i}@contoso.com"), "mailEnabled": true,
                "securityEnabled": false, "groupTypes": [], "proxyAddresses": [format!("SMTP:group{i}@contoso.com")]}),
        );
    }
    t
}

/// The bare client: token, then every page of users and groups, JSON parsed. (seconds,
/// objects)
fn bare(fake: &FakeGraph) -> (f64, usize) {
    let ca = std::fs::read(&fake.ca).expect("ca");
    let client = reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates({
                use rustls::pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
                    roots.add(c.expect("cert")).expect("root");
                }
                roots
            })
            .with_no_client_auth(),
        )
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let t = Instant::now();
    let tok: Value = client
        .post(format!("{}/{TENANT}/oauth2/v2.0/token", fake.url))
        .form(&[
            ("client_id", CLIENT),
            ("client_secret", SECRET),
            ("scope", &format!("{}/.default", fake.url)),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .expect("token")
        .json()
        .expect("json");
    let token = tok["access_token"].as_str().expect("token").to_owned();
    let mut n = 0;
    for first in [
        format!(
            "{}/v1.0/users?$select={}&$top=999",
            fake.url,
            rcptgate::sources::graph::USER_FIELDS
        ),
        format!(
            "{}/v1.0/groups?$select={}&$filter=mailEnabled%20eq%20true&$top=999",
            fake.url,
            rcptgate::sources::graph::GROUP_FIELDS
        ),
    ] {
        let mut url = Some(first);
        while let Some(u) = url {
            let v: Value = client
                .get(&u)
                .bearer_auth(&token)
                .send()
                .expect("page")
                .json()
                .expect("json");
            n += v["value"].as_array().map_or(0, Vec::len);
            url = v["@odata.nextLink"].as_str().map(str::to_owned);
        }
    }
    (t.elapsed().as_secs_f64(), n)
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// `rcptgate serve` from spawn to its first published snapshot. (seconds, peak RSS MiB,
/// addresses)
fn rcptgate(fake: &FakeGraph, dir: &std::path::Path, run: usize) -> (f64, f64, u64) {
    let d = dir.join(format!("run{run}"));
    std::fs::create_dir_all(&d).expect("dir");
    let config = graph::daemon_config(
        &d,
        fake,
        "interval = \"1h\"",
        "[policy]\nlisten = [\"127.0.0.1:0\"]\n\n[log]\nlevel = \"warn\"\n",
    );
    let t = Instant::now();
    let daemon = daemon::Daemon::start(&config);
    let s = daemon.wait_generation(1);
    let took = t.elapsed().as_secs_f64();
    (
        took,
        peak_rss_mib(daemon.child.id()),
        s.addresses.unwrap_or(0),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (users, groups, runs) = if bench {
        (100_000, 20_000, 3)
    } else {
        (2_000, 400, 1)
    };
    let dir = tempfile::tempdir().expect("tempdir");
    eprintln!("fake tenant: {users} users, {groups} groups...");
    let fake = FakeGraph::start(dir.path(), tenant(users, groups));
    let (mut b, mut r, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    let mut addresses = 0;
    for run in 0..runs {
        let (secs, n) = bare(&fake);
        assert_eq!(n, users + groups);
        b.push(secs);
        let (secs, peak, a) = rcptgate(&fake, dir.path(), run);
        r.push(secs);
        rss.push(peak);
        addresses = a;
    }
    let (mb, mr) = (median(b), median(r));
    println!(
        "Graph full sync, {users} users + {groups} groups from the local fake (pages of 999), median of {runs}:"
    );
    println!("  bare client (token + every page, JSON parsed)  {mb:.2} s");
    println!(
        "  rcptgate serve to first publish                {mr:.2} s = {:.2}x, {addresses} addresses, peak RSS {:.0} MiB",
        mr / mb,
        median(rss)
    );
}
