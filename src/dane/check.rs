//! `rcptgate dane-check DOMAIN`: every DNS step of a DANE decision with its DNSSEC status,
//! whether the TLSA answers fit in UDP, then STARTTLS to each MX address with the TLSA
//! records as the only trust (see [`super::verify`]), a verdict per MX and what to fix.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::Dane;
use super::policy::{Decision, Level, Rendered, Security, Target, Tlsa, parse_key, tlsa_name};
use super::resolve::{self, Step};
use super::verify::{DaneVerifier, Seen};

/// How `dane-check` connects.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Connect to this port instead of the target's (25), e.g. a test listener.
    pub port: Option<u16>,
    /// Per connection step.
    pub timeout: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            port: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// One MX address, connected to.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// The MX host.
    pub host: String,
    /// The address and port connected to.
    pub address: String,
    /// `verified`, `failed` or `not checked`.
    pub result: String,
    /// What happened.
    pub detail: String,
    /// The TLS version and cipher suite, once negotiated.
    pub tls: Option<String>,
    /// What the certificate verifier saw.
    pub certificate: Option<Seen>,
    /// What to fix, when it failed.
    pub fix: Option<String>,
}

/// The whole diagnosis.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The key asked about.
    pub key: String,
    /// What it names.
    pub target: Option<Target>,
    /// Every query, in order, with its DNSSEC status.
    pub steps: Vec<Step>,
    /// The decision.
    pub decision: Option<Decision>,
    /// The `tls_policy` answer rcptgate gives for it.
    pub answer: String,
    /// STARTTLS to each MX address.
    pub probes: Vec<Probe>,
    /// Everything to fix, DNS first.
    pub fixes: Vec<String>,
    /// True when DNS and every probed MX agree (or there is nothing to enforce).
    pub ok: bool,
}

/// Diagnose one key. Resolves afresh (not from the cache) so what is shown is what DNS says
/// now.
pub async fn check(dane: &Dane, key: &str, opts: &CheckOptions) -> Report {
    let mut report = Report {
        key: key.to_owned(),
        target: None,
        steps: Vec::new(),
        decision: None,
        answer: String::new(),
        probes: Vec::new(),
        fixes: Vec::new(),
        ok: false,
    };
    let target = match parse_key(key.as_bytes()) {
        Ok(t) => t,
        Err(e) => {
            report.answer = "NOTFOUND ".into();
            report
                .fixes
                .push(format!("{key}: {e}: DANE does not apply"));
            return report;
        }
    };
    let mut steps = Vec::new();
    let decision = match tokio::time::timeout(
        dane.config().decision_timeout,
        resolve::decide(dane.resolver(), &target, true, Some(&mut steps)),
    )
    .await
    {
        Ok(d) => d,
        Err(_) => Decision::temp(format!(
            "DNS did not answer within {:?}",
            dane.config().decision_timeout
        )),
    };
    report.steps = steps;
    // How big each TLSA answer is over UDP, and whether TCP had to take over.
    for h in decision
        .hosts
        .iter()
        .filter(|h| h.tlsa_security.is_some() && !h.tlsa.is_empty())
    {
        let name = tlsa_name(&h.name, target.port);
        let server = dane
            .config()
            .resolver
            .nameservers
            .first()
            .copied()
            .or_else(system_nameserver);
        if let Some(server) = server {
            let timeout = opts.timeout;
            let s = tokio::task::spawn_blocking(move || transport_step(&name, server, timeout))
                .await
                .unwrap_or_else(|e| Step {
                    query: "TLSA size".into(),
                    status: format!("failed: {e}"),
                    records: Vec::new(),
                });
            report.steps.push(s);
        }
    }
    report.answer = match decision.render(dane.config().rendering, dane.config().digest) {
        Rendered::Ok(v) => format!("OK {v}"),
        Rendered::NotFound => "NOTFOUND ".into(),
        Rendered::Temp(r) => format!("TEMP {r}"),
    };
    report.fixes.extend(dns_fixes(&target, &decision));
    if matches!(
        decision.level,
        Level::DaneOnly | Level::Dane | Level::Encrypt
    ) {
        for h in &decision.hosts {
            let records: Vec<Tlsa> = h.usable().cloned().collect();
            for ip in &h.addresses {
                let addr = SocketAddr::new(*ip, opts.port.unwrap_or(target.port));
                let (host, recs, timeout) = (h.name.clone(), records.clone(), opts.timeout);
                let p = tokio::task::spawn_blocking(move || probe(&host, addr, &recs, timeout))
                    .await
                    .unwrap_or_else(|e| Probe {
                        host: h.name.clone(),
                        address: addr.to_string(),
                        result: "failed".into(),
                        detail: format!("internal error: {e}"),
                        tls: None,
                        certificate: None,
                        fix: None,
                    });
                if let Some(f) = &p.fix {
                    report
                        .fixes
                        .push(format!("{} ({}): {f}", p.host, p.address));
                }
                report.probes.push(p);
            }
        }
    }
    report.ok = match decision.level {
        Level::Temp => false,
        Level::None => true,
        _ => report.probes.iter().all(|p| p.result == "verified"),
    };
    report.target = Some(target);
    report.decision = Some(decision);
    report
}

fn system_nameserver() -> Option<SocketAddr> {
    let (c, _) = hickory_resolver::system_conf::read_system_conf().ok()?;
    c.name_servers()
        .first()
        .map(|ns| SocketAddr::new(ns.ip, 53))
}

/// What to fix in DNS for this decision.
fn dns_fixes(target: &Target, d: &Decision) -> Vec<String> {
    let mut out = Vec::new();
    match d.level {
        Level::Temp if d.reason.contains("bogus") => out.push(format!(
            "DNSSEC validation fails ({}): the zone's signatures are expired or wrong, or the DS at the parent does not match its keys; re-sign the zone or fix the DS. Senders defer mail until then.",
            d.reason
        )),
        Level::Temp => out.push(format!(
            "DNS could not answer ({}): check that the zone's name servers answer over UDP and TCP; senders defer mail until then.",
            d.reason
        )),
        Level::None if d.mx_security == Some(Security::Insecure) => out.push(format!(
            "{} is not DNSSEC-signed: sign the zone and publish TLSA records at _{}._tcp.<mx> to get DANE (no DANE now; senders use opportunistic TLS).",
            target.name, target.port
        )),
        Level::None => {
            if d.hosts.iter().all(|h| h.addresses.is_empty()) && !d.hosts.is_empty() {
                out.push("no MX host has an address record".into());
            } else {
                out.push(format!(
                    "signed, but no TLSA records: publish e.g. `_{}._tcp.<mx> TLSA 3 1 1 <sha256 of the server's public key>` for each MX host to get DANE",
                    target.port
                ));
            }
        }
        Level::Encrypt | Level::Dane | Level::DaneOnly => {
            for h in &d.hosts {
                if h.address_security == Some(Security::Insecure) {
                    out.push(format!(
                        "{}: its address records are not signed, so its TLSA records are not used",
                        h.name
                    ));
                }
                if !h.tlsa.is_empty() && h.usable().next().is_none() {
                    let why: Vec<&str> = h.tlsa.iter().filter_map(|t| t.unusable()).collect();
                    out.push(format!(
                        "{}: TLSA records exist but none can be used for SMTP ({}); publish DANE-EE (3 1 1) or DANE-TA (2 1 1) records",
                        h.name,
                        why.join("; ")
                    ));
                } else if h.tlsa.is_empty() && !h.addresses.is_empty() {
                    out.push(format!(
                        "{}: no TLSA records; this host gets no DANE protection",
                        h.name
                    ));
                }
            }
        }
    }
    out
}

/// Ask one name server for a TLSA RRset over UDP (EDNS 1232, DO) and, when the answer is
/// truncated, over TCP: the step a truncated-UDP failure hides.
fn transport_step(name: &str, server: SocketAddr, timeout: Duration) -> Step {
    use hickory_resolver::proto::op::{Edns, Message, Query};
    use hickory_resolver::proto::rr::{Name, RecordType};
    let mut step = Step {
        query: format!("TLSA {name} over UDP (EDNS 1232) to {server}"),
        status: String::new(),
        records: Vec::new(),
    };
    let build = || -> Option<Vec<u8>> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::TLSA));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_dnssec_ok(true);
        m.set_edns(e);
        m.to_vec().ok()
    };
    let Some(q) = build() else {
        step.status = "failed: cannot build the query".into();
        return step;
    };
    let udp = (|| -> std::io::Result<Vec<u8>> {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().map_err(std::io::Error::other)?
        } else {
            "[::]:0".parse().map_err(std::io::Error::other)?
        };
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(timeout))?;
        s.send_to(&q, server)?;
        let mut buf = vec![0u8; 4096];
        let n = s.recv(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    })();
    let udp = match udp {
        Ok(b) => b,
        Err(e) => {
            step.status = format!("failed: {e}");
            return step;
        }
    };
    let Ok(m) = Message::from_vec(&udp) else {
        step.status = "failed: undecodable answer".into();
        return step;
    };
    if !m.metadata.truncation {
        step.status = format!(
            "{} bytes, {} records, fits in UDP",
            udp.len(),
            m.answers.len()
        );
        return step;
    }
    let tcp = (|| -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&server, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let len = u16::try_from(q.len()).map_err(std::io::Error::other)?;
        s.write_all(&len.to_be_bytes())?;
        s.write_all(&q)?;
        let mut l = [0u8; 2];
        s.read_exact(&mut l)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(l))];
        s.read_exact(&mut buf)?;
        Ok(buf)
    })();
    step.status = match tcp.map(|b| (b.len(), Message::from_vec(&b).map(|m| m.answers.len()))) {
        Ok((n, Ok(k))) => format!(
            "truncated over UDP ({} bytes, TC=1); retried over TCP: {n} bytes, {k} records",
            udp.len()
        ),
        Ok((_, Err(_))) => "truncated over UDP; TCP answer undecodable".into(),
        Err(e) => format!(
            "truncated over UDP and TCP failed ({e}): resolvers without TCP to this server cannot get the TLSA records"
        ),
    };
    step
}

/// Read one SMTP reply (all its lines); `None` on a closed connection or a line too long.
pub(crate) fn read_reply<R: BufRead>(r: &mut R) -> std::io::Result<(u16, Vec<String>)> {
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.by_ref().take(4096).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let code = text
            .get(..3)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an SMTP reply: {text:?}")))?;
        let last = text.as_bytes().get(3) != Some(&b'-');
        lines.push(text.get(4..).unwrap_or("").to_owned());
        if last || lines.len() > 100 {
            return Ok((code, lines));
        }
    }
}

/// STARTTLS to one address with the TLSA records as the only trust.
pub fn probe(host: &str, addr: SocketAddr, records: &[Tlsa], timeout: Duration) -> Probe {
    let mut p = Probe {
        host: host.to_owned(),
        address: addr.to_string(),
        result: "failed".into(),
        detail: String::new(),
        tls: None,
        certificate: None,
        fix: None,
    };
    let fail = |mut p: Probe, detail: String, fix: &str| {
        p.detail = detail;
        p.fix = Some(fix.to_owned());
        p
    };
    let sock = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                p,
                format!("connect: {e}"),
                "the MX does not accept connections on this port: check the server and firewalls",
            );
        }
    };
    let _ = sock.set_read_timeout(Some(timeout));
    let _ = sock.set_write_timeout(Some(timeout));
    let Ok(read_half) = sock.try_clone() else {
        return fail(p, "socket clone failed".into(), "internal error");
    };
    let mut reader = BufReader::new(read_half);
    let mut w = &sock;
    let smtp = (|| -> std::io::Result<bool> {
        let (code, _) = read_reply(&mut reader)?;
        if code != 220 {
            return Err(std::io::Error::other(format!("greeting {code}")));
        }
        w.write_all(b"EHLO rcptgate-dane-check\r\n")?;
        let (code, lines) = read_reply(&mut reader)?;
        if code != 250 {
            return Err(std::io::Error::other(format!("EHLO answered {code}")));
        }
        if !lines.iter().any(|l| l.eq_ignore_ascii_case("STARTTLS")) {
            return Ok(false);
        }
        w.write_all(b"STARTTLS\r\n")?;
        let (code, _) = read_reply(&mut reader)?;
        if code != 220 {
            return Err(std::io::Error::other(format!("STARTTLS answered {code}")));
        }
        Ok(true)
    })();
    match smtp {
        Err(e) => {
            return fail(
                p,
                format!("SMTP: {e}"),
                "the server's SMTP dialogue failed before TLS",
            );
        }
        Ok(false) => {
            return fail(
                p,
                "STARTTLS not offered".into(),
                "the server does not offer STARTTLS while TLSA records are published: DANE senders defer all mail; enable STARTTLS (or remove the TLSA records)",
            );
        }
        Ok(true) => {}
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let verifier = Arc::new(DaneVerifier::new(records.to_vec(), seen.clone()));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| {
        b.dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    });
    let config = match config {
        Ok(c) => Arc::new(c),
        Err(e) => return fail(p, format!("TLS setup: {e}"), "internal error"),
    };
    let name = match rustls::pki_types::ServerName::try_from(host.to_owned()) {
        Ok(n) => n,
        Err(e) => {
            return fail(
                p,
                format!("server name: {e}"),
                "the MX name is not a valid host name",
            );
        }
    };
    let mut conn = match rustls::ClientConnection::new(config, name) {
        Ok(c) => c,
        Err(e) => return fail(p, format!("TLS: {e}"), "internal error"),
    };
    // Bytes the reader buffered past the 220 belong to the TLS stream: there should be none.
    if !reader.buffer().is_empty() {
        return fail(
            p,
            "the server sent data after 220 before the TLS handshake".into(),
            "the server's STARTTLS is broken (or something in the path injects data)",
        );
    }
    let mut s = &sock;
    let hs = (|| -> std::io::Result<()> {
        while conn.is_handshaking() {
            conn.complete_io(&mut s)?;
        }
        Ok(())
    })();
    p.certificate = seen.lock().ok().map(|s| s.clone());
    if let Err(e) = hs {
        let cert = p.certificate.clone().unwrap_or_default();
        let fix = match (&cert.error, &cert.leaf_spki_sha256) {
            (Some(_), Some(spki)) => format!(
                "the certificate matches no usable TLSA record: publish `{} TLSA 3 1 1 {spki}` for the key in use (keep the old record until caches expire), or put the matching key back",
                tlsa_name(host, 25).trim_end_matches('.')
            ),
            _ => "the TLS handshake failed: check the server's TLS configuration".to_owned(),
        };
        return fail(p, format!("TLS handshake: {e}"), &fix);
    }
    p.tls = Some(format!(
        "{:?} {:?}",
        conn.protocol_version()
            .map_or("?".into(), |v| format!("{v:?}")),
        conn.negotiated_cipher_suite()
            .map_or("?".into(), |c| format!("{:?}", c.suite()))
    ));
    // Say goodbye inside TLS; the answer does not matter.
    let _ = conn.writer().write_all(b"QUIT\r\n");
    let _ = conn.complete_io(&mut s);
    p.result = "verified".into();
    p.detail = format!(
        "certificate matches {}",
        p.certificate
            .as_ref()
            .and_then(|c| c.matched.clone())
            .unwrap_or_default()
    );
    p
}

/// The report as text for a terminal.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "DANE check for {}", r.key);
    for s in &r.steps {
        let _ = writeln!(o, "  {:<48} {}", s.query, s.status);
        for rec in &s.records {
            let _ = writeln!(o, "      {rec}");
        }
    }
    if let Some(d) = &r.decision {
        let _ = writeln!(o, "decision: {} ({})", d.level.as_str(), d.reason);
    }
    let _ = writeln!(o, "tls_policy answer: {}", r.answer);
    for p in &r.probes {
        let _ = writeln!(o, "  {} {}: {} — {}", p.host, p.address, p.result, p.detail);
        if let Some(t) = &p.tls {
            let _ = writeln!(o, "      TLS {t}");
        }
        if let Some(c) = &p.certificate
            && let Some(s) = &c.leaf_subject
        {
            let _ = writeln!(
                o,
                "      certificate {s}, SPKI SHA-256 {}",
                c.leaf_spki_sha256.as_deref().unwrap_or("?")
            );
        }
    }
    for f in &r.fixes {
        let _ = writeln!(o, "fix: {f}");
    }
    let _ = writeln!(o, "{}", if r.ok { "OK" } else { "NOT OK" });
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_replies() {
        let mut r =
            std::io::Cursor::new(b"250-mx.example\r\n250-STARTTLS\r\n250 SIZE 10\r\n".to_vec());
        let (code, lines) = read_reply(&mut r).expect("reply");
        assert_eq!(code, 250);
        assert_eq!(lines, ["mx.example", "STARTTLS", "SIZE 10"]);
        let mut bad = std::io::Cursor::new(b"hello\r\n".to_vec());
        assert!(read_reply(&mut bad).is_err());
        let mut empty = std::io::Cursor::new(Vec::new());
        assert!(read_reply(&mut empty).is_err());
    }

    #[test]
    fn dns_fixes_name_the_cause() {
        let t = parse_key(b"example.com").expect("key");
        let f = dns_fixes(
            &t,
            &Decision::temp("MX example.com.: DNSSEC validation failed (bogus)"),
        );
        assert!(f[0].contains("re-sign"), "{f:?}");
        let f = dns_fixes(&t, &Decision::none("x", Some(Security::Insecure), 1));
        assert!(f[0].contains("not DNSSEC-signed"), "{f:?}");
    }
}
