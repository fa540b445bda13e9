//! The fuzz targets' entry points, run on seed inputs so CI exercises them (the targets
//! themselves are one line each; see fuzz/).

use rcptgate::internal::{
    fuzz_address, fuzz_control, fuzz_http, fuzz_milter, fuzz_policy, fuzz_snapshot,
    fuzz_snapshot_section, fuzz_socketmap, fuzz_source,
};
use rcptgate::sources::Format;

fn example(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR"))).expect("example")
}

#[test]
fn address_seeds() {
    for s in [
        "a@b.c",
        "<@x,@y:\"a b\"@[IPv6:::1]>",
        "Jörg@bücher.example.",
        "\"\\",
        "@",
        "",
        "a@xn--",
        "\u{0}@\u{0}",
    ] {
        fuzz_address(s.as_bytes());
    }
}

#[test]
fn source_seeds_including_every_prefix_of_the_examples() {
    for (name, fmt) in [("example.map", Format::Map), ("example.ldif", Format::Ldif)] {
        let bytes = example(name);
        for cut in (0..bytes.len()).step_by(7) {
            fuzz_source(fmt, &bytes[..cut]);
        }
    }
    fuzz_source(
        Format::Csv,
        b"PrimarySmtpAddress,EmailAddresses\n\"a@b.c\",\"smtp:\"\n\"x",
    );
    fuzz_source(Format::Postfix, b"@\n @\n a@b c\n");
}

#[test]
fn snapshot_seeds() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map");
    let src = rcptgate::sources::load(rcptgate::sources::Format::Map, path.as_ref()).expect("load");
    let (bytes, _) = rcptgate::sync::merge(&[src], 1).build().expect("build");
    fuzz_snapshot(&bytes);
    for cut in (0..bytes.len()).step_by(13) {
        fuzz_snapshot(&bytes[..cut]);
    }
    fuzz_snapshot(b"RCPTGATE\x01\x00\x00\x00");
}

#[test]
fn protocol_seeds() {
    let req = b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=a@b.example\n\n";
    let mut stream = req.to_vec();
    stream.extend_from_slice(req);
    for cut in 0..=stream.len() {
        fuzz_policy(&stream[..cut]);
    }
    fuzz_policy(b"request=smtpd_access_policy\nrecipient=\xff\xfe\n\n");
    let frames = b"25:recipients a@b.example,9:transport,0:,";
    for cut in 0..=frames.len() {
        fuzz_socketmap(&frames[..cut]);
    }
}

#[test]
fn http_seeds() {
    let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    for cut in 0..=get.len() {
        fuzz_http(&get[..cut]);
    }
    fuzz_http(b"GET /\xff HTTP/1.0\n\n");
}

#[test]
fn control_seeds() {
    let line = b"delete a@b.example c@d.example\n";
    for cut in 0..=line.len() {
        fuzz_control(&line[..cut]);
    }
    fuzz_control(b"keep \xc3\xa9@x\tb@y\n");
    fuzz_control(b"status\r\n");
}

/// Hostile section contents behind valid checksums: every section emptied, cut short and
/// flipped bit by bit reaches the decoders (the FST's among them) and never panics.
#[test]
fn snapshot_sections_with_valid_checksums() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map");
    let src = rcptgate::sources::load(rcptgate::sources::Format::Map, path.as_ref()).expect("load");
    let (bytes, _) = rcptgate::sync::merge(&[src], 1).build().expect("build");
    rcptgate::Snapshot::from_bytes(bytes).expect("loads");
    for which in 0u8..12 {
        fuzz_snapshot_section(&[which]);
        fuzz_snapshot_section(&[which, 0xff, 0x00, 0x13]);
        fuzz_snapshot_section(&[which; 64]);
    }
    // The FST section itself (section 0), taken from a real snapshot, damaged everywhere.
    let (fst, _) = {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map");
        let src =
            rcptgate::sources::load(rcptgate::sources::Format::Map, path.as_ref()).expect("load");
        rcptgate::sync::merge(&[src], 1).build().expect("build")
    };
    let header = 8 + 4 + 4 + 8 + 8 + 8 + 4 + 4 + 13 * 24 + 4;
    let off = u64::from_le_bytes(fst[48..56].try_into().expect("off")) as usize;
    let len = u64::from_le_bytes(fst[56..64].try_into().expect("len")) as usize;
    assert_eq!(off, header);
    let section = &fst[off..off + len];
    for cut in 0..section.len() {
        let mut input = vec![0u8];
        input.extend_from_slice(&section[..cut]);
        fuzz_snapshot_section(&input);
    }
    for i in 0..section.len() * 8 {
        let mut input = vec![0u8];
        input.extend_from_slice(section);
        input[1 + i / 8] ^= 1 << (i % 8);
        fuzz_snapshot_section(&input);
    }
}

#[test]
fn milter_seeds() {
    let frame = |c: u8, d: &[u8]| {
        let mut f = Vec::new();
        rcptgate::proto::milter::frame(c, d, &mut f);
        f
    };
    let mut stream = frame(b'O', &[0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0x1f, 0xff, 0xff]);
    stream.extend(frame(b'D', b"R{rcpt_addr}\0a@b.example\0"));
    stream.extend(frame(b'R', b"<a@b.example>\0"));
    stream.extend(frame(b'L', b"X-Rcptgate-Profile\0forged\0"));
    stream.extend(frame(b'E', b""));
    stream.extend(frame(b'Q', b""));
    for cut in 0..=stream.len() {
        fuzz_milter(&stream[..cut]);
    }
    fuzz_milter(&[0, 0, 0, 0]);
    fuzz_milter(&[0xff, 0xff, 0xff, 0xff, b'R']);
    fuzz_milter(&frame(b'O', &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]));
}

/// Found by fuzzing: a local part of 62 octets with five `İ` folds to 67 octets; its key is
/// longer than the limit (which applies to the address as sent) and is not an address again.
#[test]
fn folding_can_lengthen_a_local_part_at_the_limit() {
    let input = "DDDDDDDDDDDDDDag\u{130}DDDDDDDDDDag\u{130}DDDDDDDDDDag\u{130}OOagDDDag\u{130}OOag\u{130}@g";
    fuzz_address(input.as_bytes());
    let n = rcptgate::address::normalize(input).expect("valid as sent");
    assert!(n.starts_with("ddddddddddddddagi\u{307}"));
    assert_eq!(
        rcptgate::address::normalize(&n),
        Err(rcptgate::address::AddrError::LocalTooLong(68))
    );
}

#[test]
fn dane_seeds() {
    use rcptgate::internal::fuzz_dane;
    for s in [
        &b"example.com"[..],
        b"[mx.example.com]:587",
        b"[192.0.2.1]",
        b"example.com:0",
        b"[",
        b"250-mx\r\n250-STARTTLS\r\n250 SIZE\r\n",
        b"2",
        b"\xff\xfe",
    ] {
        fuzz_dane(s);
    }
    // A real certificate behind a TLSA prefix.
    let mut cert = vec![3, 1, 1];
    cert.extend_from_slice(&[0u8; 32]);
    cert.extend_from_slice(&[0x30, 0x82, 0x01, 0x00]);
    fuzz_dane(&cert);
}

#[test]
fn graph_seeds() {
    use rcptgate::internal::fuzz_graph;
    for s in [
        r#"{"value":[{"id":"1","mail":"a@b.example","proxyAddresses":["SMTP:a@b.example","smtp:x@b.example","SIP:q"],"accountEnabled":false},{"id":"2","mailEnabled":true,"mail":"g@b.example"}]}"#,
        r#"{"value":[{"id":"1","mail":"@","proxyAddresses":["SMTP:","smtp:a@@b",7,null]},{"id":null}]}"#,
        r#"{"value":"no"}"#,
        "[]",
        "{",
    ] {
        fuzz_graph(s.as_bytes());
    }
}
