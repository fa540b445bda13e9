//! `rcptgate ldap-test`: the "Test connection" button of directory-sync products. Each step
//! (resolve, connect, TLS and the server certificate, bind, search per base DN, a sample of
//! mapped entries) reports what it saw and, when it fails, what to fix.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::ad::{self, AdOptions};
use super::ldap::{ATTRIBUTES, LdapConfig, LdapError, ca_roots, connect, dir_entry, paged};

/// Warn when the server certificate expires within this many days.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// How a step went.
pub enum Status {
    /// It worked.
    Ok,
    /// It worked, but something needs attention.
    Warn,
    /// It failed; the sync cannot work.
    Fail,
}

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    /// How it went.
    pub status: Status,
    /// The step (`resolve`, `connect`, `tls`, `bind`, …).
    pub name: &'static str,
    /// What was seen.
    pub detail: String,
    /// What to do about a warning or failure.
    pub fix: Option<String>,
}

fn step(status: Status, name: &'static str, detail: impl Into<String>) -> Step {
    Step {
        status,
        name,
        detail: detail.into(),
        fix: None,
    }
}

impl Step {
    fn fix(mut self, f: impl Into<String>) -> Step {
        self.fix = Some(f.into());
        self
    }
}

/// Host and port of an `ldap://` or `ldaps://` URL (default ports 389 and 636).
pub fn host_port(url: &str) -> Option<(String, u16, bool)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("ldaps://") {
        (true, r)
    } else {
        (false, url.strip_prefix("ldap://")?)
    };
    let hostport = rest.split('/').next()?;
    let default = if tls { 636 } else { 389 };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h.split_once(']')?;
        let port = after.strip_prefix(':').map(str::parse).transpose().ok()?;
        (h.to_owned(), port.unwrap_or(default))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (hostport.to_owned(), default),
        }
    };
    (!host.is_empty()).then_some((host, port, tls))
}

/// Wraps the real certificate verifier and keeps the chain the server sent, so the
/// certificate can be shown even when verification fails. Verification itself is
/// unchanged: every decision is the inner (webpki) verifier's.
#[derive(Debug)]
struct Recorder {
    inner: Arc<dyn ServerCertVerifier>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut c) = self.chain.lock() {
            *c = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn roots(cfg: &LdapConfig) -> Result<rustls::RootCertStore, String> {
    match &cfg.ca_file {
        Some(ca) => ca_roots(ca).map_err(|e| e.to_string()),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            Ok(roots)
        }
    }
}

/// The LDAP StartTLS extended request (RFC 4511 §4.14), message ID 1.
const STARTTLS: &[u8] = b"\x30\x1d\x02\x01\x01\x77\x18\x80\x161.3.6.1.4.1.1466.20037";

/// Send StartTLS and return the server's result code.
fn starttls(sock: &mut TcpStream) -> std::io::Result<u8> {
    sock.write_all(STARTTLS)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = sock.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
        // The extended response [APPLICATION 24] starts with its result code (ENUMERATED).
        if let Some(at) = buf.iter().position(|&b| b == 0x78)
            && let Some(rest) = buf.get(at..)
            && let Some(i) = rest.windows(2).position(|w| w == [0x0a, 0x01])
            && let Some(&code) = rest.get(i + 2)
        {
            return Ok(code);
        }
        if buf.len() > 4096 {
            return Err(std::io::Error::other("no StartTLS response"));
        }
    }
}

fn describe_cert(der: &[u8], now_unix: i64) -> (String, i64) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => {
            let not_after = cert.validity().not_after.timestamp();
            let days = (not_after - now_unix).div_euclid(86_400);
            use x509_parser::extensions::GeneralName;
            let sans = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|ext| {
                    ext.value
                        .general_names
                        .iter()
                        .map(|n| match n {
                            GeneralName::DNSName(d) => format!("DNS:{d}"),
                            GeneralName::IPAddress(b) => match b.len() {
                                4 => <[u8; 4]>::try_from(*b)
                                    .map(|a| format!("IP:{}", std::net::Ipv4Addr::from(a)))
                                    .unwrap_or_default(),
                                16 => <[u8; 16]>::try_from(*b)
                                    .map(|a| format!("IP:{}", std::net::Ipv6Addr::from(a)))
                                    .unwrap_or_default(),
                                _ => "IP:?".into(),
                            },
                            other => other.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            (
                format!(
                    "subject {}, issuer {}, names [{sans}], expires {} ({days} days)",
                    cert.subject(),
                    cert.issuer(),
                    cert.validity().not_after.to_datetime().date()
                ),
                days,
            )
        }
        Err(e) => (format!("unreadable certificate: {e}"), i64::MAX),
    }
}

/// TLS handshake on `sock`: protocol, cipher, the certificate, and its expiry.
fn tls_steps(cfg: &LdapConfig, host: &str, sock: &mut TcpStream, out: &mut Vec<Step>) -> bool {
    let roots = match roots(cfg) {
        Ok(r) => r,
        Err(e) => {
            out.push(
                step(Status::Fail, "tls", e)
                    .fix("ca_file must be a PEM file with the CA certificate"),
            );
            return false;
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = match rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    {
        Ok(v) => v,
        Err(e) => {
            out.push(
                step(Status::Fail, "tls", format!("no usable trust anchors: {e}")).fix(
                    "set ca_file to the PEM file of the CA that issued the server certificate",
                ),
            );
            return false;
        }
    };
    let recorder = Arc::new(Recorder {
        inner,
        chain: Mutex::new(Vec::new()),
    });
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        // `dangerous()` only to install the recording wrapper around the real verifier.
        Ok(b) => b
            .dangerous()
            .with_custom_certificate_verifier(recorder.clone())
            .with_no_client_auth(),
        Err(e) => {
            out.push(step(Status::Fail, "tls", e.to_string()));
            return false;
        }
    };
    let Ok(name) = ServerName::try_from(host.to_owned()) else {
        out.push(step(
            Status::Fail,
            "tls",
            format!("{host:?} is not a host name"),
        ));
        return false;
    };
    let mut conn = match rustls::ClientConnection::new(Arc::new(config), name) {
        Ok(c) => c,
        Err(e) => {
            out.push(step(Status::Fail, "tls", e.to_string()));
            return false;
        }
    };
    let mut result = Ok(());
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(sock) {
            result = Err(e);
            break;
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let chain = recorder.chain.lock().map(|c| c.clone()).unwrap_or_default();
    let cert = chain.first().map(|c| describe_cert(c, now));
    match result {
        Ok(()) => {
            out.push(step(
                Status::Ok,
                "tls",
                format!(
                    "{}, {}",
                    conn.protocol_version()
                        .map_or("?".to_owned(), |v| format!("{v:?}")),
                    conn.negotiated_cipher_suite()
                        .map_or("?".to_owned(), |c| format!("{:?}", c.suite()))
                ),
            ));
            if let Some((text, days)) = cert {
                if days < EXPIRY_WARNING_DAYS {
                    out.push(step(Status::Warn, "certificate", text).fix(format!(
                        "renew the LDAPS certificate: it expires in {days} days, and an expired certificate silently stops the sync"
                    )));
                } else {
                    out.push(step(Status::Ok, "certificate", text));
                }
            }
            true
        }
        Err(e) => {
            let text = e.to_string();
            let mut s = step(Status::Fail, "tls", text.clone());
            s = if text.contains("UnknownIssuer") {
                s.fix(match &cfg.ca_file {
                    Some(ca) => format!(
                        "the certificate is not issued by the CA in {}: point ca_file at the CA that issued it",
                        ca.display()
                    ),
                    None => "the certificate's CA is not among the system roots (Azure AD DS often uses its own): set ca_file to that CA's PEM file".into(),
                })
            } else if text.contains("NotValidForName") {
                s.fix("the certificate is not for this host name: connect by a name it lists")
            } else if text.contains("Expired") {
                s.fix("the server certificate has expired: renew it on the domain controller")
            } else {
                s
            };
            out.push(s);
            if let Some((text, _)) = cert {
                out.push(step(Status::Fail, "certificate", text));
            }
            false
        }
    }
}

/// Run every step; stops at the first failure that makes the rest meaningless.
pub fn run(cfg: &LdapConfig) -> Vec<Step> {
    let mut out = Vec::new();
    let Some((host, port, ldaps)) = host_port(&cfg.url) else {
        out.push(step(
            Status::Fail,
            "url",
            format!(
                "{:?} is not ldaps://HOST[:PORT] or ldap://HOST[:PORT]",
                cfg.url
            ),
        ));
        return out;
    };
    let addrs: Vec<_> = match (host.as_str(), port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            out.push(step(Status::Fail, "resolve", format!("{host}: {e}")).fix(
                "the name does not resolve here: check DNS (Azure AD DS: use the managed domain's DNS servers)",
            ));
            return out;
        }
    };
    out.push(step(
        Status::Ok,
        "resolve",
        format!(
            "{host} -> {}",
            addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    let started = Instant::now();
    let mut sock = None;
    let mut last_err = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, cfg.timeout) {
            Ok(s) => {
                sock = Some((s, *a));
                break;
            }
            Err(e) => last_err = Some((e, *a)),
        }
    }
    let Some((mut sock, addr)) = sock else {
        let (e, a) = last_err.map_or((std::io::Error::other("no address"), None), |(e, a)| {
            (e, Some(a))
        });
        let fix = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => format!(
                "nothing listens on port {port}: is LDAP{} enabled on the server? (AD needs a certificate before it serves LDAPS on 636)",
                if ldaps { "S" } else { "" }
            ),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => format!(
                "no answer: a firewall or network security group drops port {port} between here and the server"
            ),
            _ => format!("check the route and port {port}"),
        };
        out.push(
            step(
                Status::Fail,
                "connect",
                format!("{}: {e}", a.map_or(host.clone(), |a| a.to_string())),
            )
            .fix(fix),
        );
        return out;
    };
    out.push(step(
        Status::Ok,
        "connect",
        format!("{addr} in {} ms", started.elapsed().as_millis()),
    ));
    let _ = sock.set_read_timeout(Some(cfg.timeout));
    let _ = sock.set_write_timeout(Some(cfg.timeout));
    if !ldaps {
        if cfg.starttls {
            match starttls(&mut sock) {
                Ok(0) => out.push(step(Status::Ok, "starttls", "accepted")),
                Ok(rc) => {
                    out.push(
                        step(
                            Status::Fail,
                            "starttls",
                            format!("refused with result code {rc}"),
                        )
                        .fix("the server does not offer StartTLS here: use ldaps:// (port 636)"),
                    );
                    return out;
                }
                Err(e) => {
                    out.push(step(Status::Fail, "starttls", e.to_string()));
                    return out;
                }
            }
        } else {
            out.push(
                step(Status::Warn, "tls", "none: plain ldap:// without StartTLS").fix(
                    "use ldaps:// or starttls = true; a bind would send the password in the clear",
                ),
            );
        }
    }
    if (ldaps || cfg.starttls) && !tls_steps(cfg, &host, &mut sock, &mut out) {
        return out;
    }
    drop(sock);

    // Bind and search with the real client, as a sync does.
    let mut conn = match connect(cfg) {
        Ok(c) => c,
        Err(e) => {
            let fix = match &e {
                LdapError::Bind { detail, .. } if detail.contains("52e") => {
                    "wrong password: check password_file / password_env"
                }
                LdapError::Bind { detail, .. } if detail.contains("775") => {
                    "the account is locked out: unlock it in AD (and fix the password first)"
                }
                LdapError::Bind { detail, .. } if detail.contains("525") => {
                    "no such account: check bind (a DN, or a user principal name like svc@corp.example)"
                }
                LdapError::Bind { detail, .. }
                    if detail.contains("532") || detail.contains("773") =>
                {
                    "the password has expired or must be changed: set a new one"
                }
                LdapError::Bind { .. } => "check bind and the password",
                _ => "",
            };
            let s = step(Status::Fail, "bind", e.to_string());
            out.push(if fix.is_empty() { s } else { s.fix(fix) });
            return out;
        }
    };
    out.push(step(
        Status::Ok,
        "bind",
        cfg.bind.clone().unwrap_or_else(|| "anonymous".into()),
    ));
    let file: Arc<str> = Arc::from(cfg.url.as_str());
    let opts = AdOptions {
        include_disabled: cfg.include_disabled,
    };
    for (base, scope) in &cfg.bases {
        let search = conn.with_timeout(cfg.timeout).streaming_search_with(
            paged(cfg.page_size),
            base,
            *scope,
            &cfg.filter,
            ATTRIBUTES.to_vec(),
        );
        let mut search = match search {
            Ok(s) => s,
            Err(e) => {
                out.push(step(Status::Fail, "search", format!("{base}: {e}")));
                continue;
            }
        };
        let (mut n, mut samples, mut failed) = (0u64, Vec::new(), None);
        loop {
            match search.next() {
                Ok(Some(raw)) => {
                    n += 1;
                    if samples.len() < 5 {
                        let e = dir_entry(raw);
                        let m = ad::map_entry(&e, &file, &opts);
                        let addrs: Vec<String> = m
                            .entries
                            .iter()
                            .map(|x| format!("{}@{}", x.local, x.domain))
                            .collect();
                        samples.push(match m.skipped {
                            Some(why) => format!("{}: skipped ({why})", e.dn),
                            None => format!(
                                "{}: {} {}",
                                e.dn,
                                m.entries.first().map_or("", |x| x.object.as_str()),
                                addrs.join(" ")
                            ),
                        });
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        let res = search.result();
        match failed {
            Some(e) => out.push(step(Status::Fail, "search", format!("{base}: {e}"))),
            None if res.rc != 0 => out.push(
                step(
                    Status::Fail,
                    "search",
                    format!("{base}: result code {} {}", res.rc, res.text),
                )
                .fix(if res.rc == 4 {
                    "size limit: the server stops unpaged searches; keep page_size at 1000 or less"
                } else if res.rc == 32 {
                    "no such object: check the base DN"
                } else {
                    "check base_dns and filter"
                }),
            ),
            None if n == 0 => out.push(
                step(Status::Warn, "search", format!("{base}: no entries"))
                    .fix("check base_dns (Azure AD DS: OU=AADDC Users,DC=…) and filter"),
            ),
            None => {
                out.push(step(
                    Status::Ok,
                    "search",
                    format!(
                        "{base}: {n} entries in {} page(s)",
                        n.div_ceil(cfg.page_size.max(1) as u64)
                    ),
                ));
                for s in samples {
                    out.push(step(Status::Ok, "sample", s));
                }
            }
        }
    }
    let _ = conn.unbind();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("ldaps://dc1.corp.example"),
            Some(("dc1.corp.example".into(), 636, true))
        );
        assert_eq!(
            host_port("ldap://127.0.0.1:6389/"),
            Some(("127.0.0.1".into(), 6389, false))
        );
        assert_eq!(
            host_port("ldaps://[::1]:6636"),
            Some(("::1".into(), 6636, true))
        );
        assert_eq!(host_port("http://x"), None);
        assert_eq!(host_port("ldaps://"), None);
        assert_eq!(host_port("ldaps://h:notaport"), None);
    }

    #[test]
    fn the_starttls_request_is_well_formed() {
        // SEQUENCE of 29 bytes: messageID 1, [APPLICATION 23] with [0] and the 22-byte OID.
        assert_eq!(STARTTLS.len(), 31);
        assert_eq!(STARTTLS[1] as usize, STARTTLS.len() - 2);
        assert_eq!(STARTTLS[6] as usize, STARTTLS.len() - 7);
        assert_eq!(STARTTLS[8] as usize, STARTTLS.len() - 9);
    }
}
