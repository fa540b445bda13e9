//! Entry points shared by the fuzz targets and their unit tests (each must never panic), and
//! the snapshot builder's raw input types for the benchmarks. Not a stable API.

pub use crate::directory::build::{
    BuildInput, DomainSpec, Interner, NONE, RecordSpec, build, name_order,
};
pub use crate::directory::filter::Keying;

use std::sync::Arc;

use crate::address;
use crate::directory::Snapshot;
use crate::sources::{self, Format};

/// Parse and normalize arbitrary text as an address. Normalization is idempotent, with one
/// exception RFC 5321 makes: its 64-octet limit applies to the local part as sent, and case
/// folding can lengthen it (`İ` is two octets, its lowercase `i̇` three), so the key of a
/// local part at the limit may be longer than the limit and is then not itself an address.
pub fn fuzz_address(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = address::normalize(s) {
        let local = n.rsplit_once('@').map_or(n.len(), |(l, _)| l.len());
        let again = address::normalize(&n);
        if local > address::MAX_LOCAL {
            assert_eq!(again, Err(address::AddrError::LocalTooLong(local)), "{s:?}");
        } else {
            assert_eq!(again.as_deref(), Ok(n.as_str()), "not idempotent: {s:?}");
        }
    }
    // The parse of an address expected in a domain (the MAP parser's short way) is the
    // parse: for the input's own domain, its text after the last '@' as it is, and another.
    let mut buf = address::AddrBuf::default();
    let mut expected: Vec<String> = vec!["contoso.com".into()];
    if let Ok(a) = address::parse(s, &mut buf) {
        expected.push(a.domain.to_owned());
    }
    if let Some((_, d)) = s.rsplit_once('@') {
        expected.push(d.to_owned());
    }
    for d in &expected {
        let (mut a, mut b) = (address::AddrBuf::default(), address::AddrBuf::default());
        assert_eq!(
            address::parse_in_domain(s, d, &mut a),
            address::parse(s, &mut b),
            "{s:?} in {d:?}"
        );
    }
}

/// Parse arbitrary bytes as a source file of the given format.
pub fn fuzz_source(format: Format, data: &[u8]) {
    let name: Arc<str> = Arc::from("fuzz");
    if let Ok(text) = sources::decode_utf8(&name, data) {
        let parsed = sources::parse_text(format, &name, text);
        // The first pass of a segmented build scans MAP files for their domains: it must
        // find every domain the parse declares or lists addresses in.
        if format == Format::Map
            && let Ok(d) = &parsed
        {
            let (declared, touched) =
                sources::mapfile::scan_domains(text).expect("a parsed file scans");
            for x in &d.domains {
                assert!(declared.contains(x.name.as_str()), "{}", x.name);
            }
            for e in &d.entries {
                assert!(touched.contains(&*e.domain), "{}", e.domain);
            }
        }
    }
}

/// A valid snapshot of the bundled example directory, built once.
fn example_image() -> &'static [u8] {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let name: Arc<str> = Arc::from("example.map");
        sources::parse_text(Format::Map, &name, include_str!("../config/example.map"))
            .ok()
            .and_then(|src| crate::sync::merge(&[src], 1).build().ok())
            .map(|(bytes, _)| bytes)
            .unwrap_or_default()
    })
}

/// Structure-aware: the example snapshot with one section (chosen by the first byte)
/// replaced by the rest of the input and every checksum made to match, so the input reaches
/// the FST decoder and the table validators instead of stopping at a checksum.
pub fn fuzz_snapshot_section(data: &[u8]) {
    let Some((&which, content)) = data.split_first() else {
        return;
    };
    if let Some(image) =
        crate::directory::with_section(example_image(), usize::from(which), content)
    {
        fuzz_snapshot(&image);
    }
}

/// Load arbitrary bytes as a snapshot (and decode them as a set's index file), and answer a
/// few lookups if it loads. The same bytes
/// are also walked as FST nodes by the lookup's own decoder (a loaded snapshot's FST has
/// passed fst's checksum, which hostile bytes rarely do; the decoder must not trust it either).
pub fn fuzz_snapshot(data: &[u8]) {
    crate::directory::fuzz_walk(data);
    // The same bytes as a set's index file (segments.rs): decoded or refused, never a panic.
    if let Ok(index) = crate::directory::segments::parse_index(data) {
        let names: usize = index
            .segments
            .iter()
            .flat_map(|s| &s.domains)
            .map(|d| d.len() + 2)
            .sum();
        assert_eq!(index.segments.len() * 24 + names + 36, data.len());
    }
    if let Ok(snap) = Snapshot::from_bytes(data.to_vec()) {
        let mut buf = address::AddrBuf::default();
        for q in ["alice@contoso.com", "x+y@example.com", "a@b"] {
            let v = snap.lookup(q, &crate::directory::LookupOptions::default(), &mut buf);
            if let Some(hit) = v.hit() {
                let _ = snap.route(hit);
                let _ = snap.record_info(q, hit);
            }
        }
        snap.for_each_address(|_, _| {});
        for q in ["alise@contoso.com", "sales@contoso.com", "x@contoso.co"] {
            let _ = snap.explain(q, &crate::directory::LookupOptions::default());
        }
        let _ = snap.excluded_counts();
    }
}

/// Decode a stream of policy requests, as a server loop would, and answer each.
pub fn fuzz_policy(data: &[u8]) {
    use crate::proto::policy::{self, Decoded, Limits, Texts};
    let limits = Limits::default();
    let mut at = 0;
    while let Ok(Decoded::Request { request, consumed }) = policy::decode(&data[at..], &limits) {
        assert!(consumed > 0 && at + consumed <= data.len());
        let mut out = Vec::new();
        let verdict = std::str::from_utf8(request.recipient)
            .ok()
            .and_then(|r| address::normalize(r).ok())
            .map(|_| crate::directory::Verdict::NotOurs);
        policy::encode_reply(verdict.as_ref(), &Texts::default(), &mut out);
        assert!(out.ends_with(b"\n\n"));
        at += consumed;
    }
}

/// Decode a stream of socketmap requests, as a server loop would.
pub fn fuzz_socketmap(data: &[u8]) {
    use crate::proto::{netstring::Decoded, socketmap};
    let mut at = 0;
    while let Ok(Decoded::Frame { payload, consumed }) = socketmap::decode(&data[at..]) {
        assert!(consumed > payload.len() && at + consumed <= data.len());
        if let Some(req) = socketmap::parse_request(payload) {
            let mut out = Vec::new();
            socketmap::encode_reply(
                socketmap::Reply::Ok(&String::from_utf8_lossy(req.key)),
                &mut out,
            );
        }
        at += consumed;
    }
}

/// Parse an HTTP request head as the metrics port does.
pub fn fuzz_http(data: &[u8]) {
    if let Ok(Some(head)) = crate::proto::http::parse_head(data) {
        assert!(head.path.starts_with(b"/"));
    }
}

/// Decode a control command; a decoded command re-encodes to a line that decodes the same.
pub fn fuzz_control(data: &[u8]) {
    use crate::proto::control::{decode, encode};
    if let Ok(Some(cmd)) = decode(data) {
        let line = encode(&cmd);
        assert_eq!(
            decode(line.as_bytes()),
            Ok(Some(cmd)),
            "round trip of {line:?}"
        );
    }
}

/// Decode a stream of milter frames as a server loop would, parse every command, negotiate
/// on an offer; every reply rcptgate could send about the input frames back whole.
pub fn fuzz_milter(data: &[u8]) {
    use crate::proto::milter::{self, Command, Decoded, RcptAnswer, Reply, Session, Step};
    let mut session = Session::new(milter::SessionOptions {
        headers: vec!["X-Rcptgate-Profile".into()],
    });
    let mut judge = |rcpt: &str| RcptAnswer {
        reply: rcpt
            .contains('x')
            .then(|| "550 5.1.1 User unknown".to_owned()),
        headers: vec![format!("standard; rcpt={rcpt}")],
    };
    let mut at = 0;
    while let Ok(Decoded::Frame {
        command,
        data: body,
        consumed,
    }) = milter::decode(&data[at..])
    {
        at += consumed;
        let Ok(cmd) = milter::parse(command, body) else {
            break;
        };
        if let Command::OptNeg {
            version,
            actions,
            protocol,
        } = cmd
            && let Ok(n) = milter::negotiate(version, actions, protocol, true)
        {
            assert_eq!(n.actions & !actions, 0, "asked for an action not offered");
            assert_eq!(
                n.protocol & !protocol,
                0,
                "asked for a step flag not offered"
            );
        }
        let text = String::from_utf8_lossy(body);
        let mut out = Vec::new();
        milter::encode(&Reply::ReplyCode(&text), &mut out);
        assert!(matches!(
            milter::decode(&out),
            Ok(Decoded::Frame { consumed, .. }) if consumed == out.len()
        ));
        match session.on_command(cmd, &mut judge) {
            Ok(Step::Reply(replies)) => {
                out.clear();
                for r in &replies {
                    milter::encode(&r.as_reply(), &mut out);
                }
            }
            Ok(Step::Close) | Err(_) => break,
        }
    }
}

/// The DANE parsing rcptgate does itself: a policy-table key and a route's next hop (the
/// MTA's input), an SMTP reply of an MX (`dane-check`'s input) and a certificate matched
/// against a TLSA record (the MX's certificate; the first 3 bytes choose usage, selector
/// and matching type, the next 32 are the association data).
pub fn fuzz_dane(data: &[u8]) {
    use crate::dane::{Decision, Digest, Host, Rendering, Tlsa, check, policy, verify};
    if let Ok(t) = policy::parse_key(data) {
        assert!(!t.name.is_empty() && t.port != 0);
        assert!(policy::tlsa_name(&t.name, t.port).ends_with('.'));
    }
    let text = String::from_utf8_lossy(data);
    let _ = crate::dane::route_target(&text);
    let mut r = std::io::Cursor::new(data);
    while let Ok((code, lines)) = check::read_reply(&mut r) {
        assert!(code <= 999 && !lines.is_empty() && lines.len() <= 101);
    }
    if data.len() >= 35 {
        let t = Tlsa {
            usage: data[0] % 4,
            selector: data[1] % 3,
            matching: data[2] % 4,
            data: data[3..35].to_vec(),
        };
        let _ = verify::matches(&data[35..], &t);
        let mut h = Host::new("mx.example");
        h.addresses.push(std::net::IpAddr::from([127, 0, 0, 1]));
        h.address_security = Some(policy::Security::Secure);
        h.tlsa_security = Some(policy::Security::Secure);
        h.tlsa.push(t);
        let d = Decision::from_hosts(vec![h], 300);
        let _ = d.render(Rendering::Fingerprint, Digest::Sha256);
        let _ = d.render(Rendering::Dane, Digest::Sha512);
    }
}

/// A Graph answer page as the Graph source reads it: its `value` objects keyed by kind and
/// id, mapped through the AD rules (what a hostile or broken Graph could send).
pub fn fuzz_graph(data: &[u8]) {
    use crate::sources::graph::{Credential, GraphConfig, build_data};
    use crate::sources::ldap::PasswordSource;
    let Ok(serde_json::Value::Object(page)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    let mut objects = std::collections::HashMap::new();
    if let Some(serde_json::Value::Array(items)) = page.get("value") {
        for (i, it) in items.iter().enumerate() {
            if let serde_json::Value::Object(m) = it {
                let kind = if i % 2 == 0 { "users" } else { "groups" };
                let id = m.get("id").and_then(|v| v.as_str()).unwrap_or("x");
                objects.insert(format!("{kind}/{id}"), m.clone());
            }
        }
    }
    let mut cfg = GraphConfig::new("t", "c", Credential::Secret(PasswordSource::None));
    cfg.include_disabled = data.len().is_multiple_of(2);
    cfg.include_guests = data.len().is_multiple_of(3);
    let name: std::sync::Arc<str> = std::sync::Arc::from("fuzz");
    let (d, _) = build_data(&name, &cfg, &objects);
    for e in &d.entries {
        assert!(!e.local.is_empty() && !e.domain.is_empty());
    }
}
