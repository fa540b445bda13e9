//! A STARTTLS SMTP sink on loopback for the DANE tests: offers STARTTLS (or not) with a
//! given certificate (rustls), accepts every message, and records what it saw — messages
//! with whether they came over TLS, and TLS handshakes that failed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, Clone)]
pub struct Delivered {
    pub tls: bool,
    pub rcpt: Vec<String>,
    pub data: String,
}

#[derive(Default)]
pub struct Seen {
    pub messages: Mutex<Vec<Delivered>>,
    pub handshake_failures: AtomicUsize,
    pub mail_in_clear: AtomicUsize,
    pub connections: AtomicUsize,
}

pub struct Sink {
    pub port: u16,
    pub seen: Arc<Seen>,
}

/// Listeners bound ahead by [`reserve`], by port.
static RESERVED: Mutex<Vec<TcpListener>> = Mutex::new(Vec::new());

/// A port on 127.0.0.1 for a sink started later, bound now and kept so: a port only chosen
/// free and bound minutes later can meanwhile be the source port of some connection of
/// another test (seen as "Address already in use").
pub fn reserve() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("reserve a port");
    let port = l.local_addr().expect("addr").port();
    RESERVED.lock().unwrap_or_else(|e| e.into_inner()).push(l);
    port
}

/// The listener [`reserve`] bound on `port`, or a new one.
fn listener(port: u16) -> TcpListener {
    let mut held = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    match held
        .iter()
        .position(|l| l.local_addr().is_ok_and(|a| a.port() == port))
    {
        Some(i) if port != 0 => held.swap_remove(i),
        _ => TcpListener::bind(("127.0.0.1", port)).expect("sink bind"),
    }
}

impl Sink {
    /// Listen on 127.0.0.1:`port` (0: any); `tls` = (certificate chain PEM, key PEM) to
    /// offer STARTTLS with, `None` to offer none.
    pub fn start(port: u16, tls: Option<(&Path, &Path)>) -> Sink {
        let config = tls.map(|(cert, key)| {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .expect("cert file")
                .collect::<Result<_, _>>()
                .expect("certs");
            let key = PrivateKeyDer::from_pem_file(key).expect("key");
            Arc::new(
                rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server config"),
            )
        });
        let l = listener(port);
        let port = l.local_addr().expect("addr").port();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (s, config) = (s.clone(), config.clone());
                std::thread::spawn(move || {
                    s.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = session(c, config, &s);
                });
            }
        });
        Sink { port, seen }
    }

    pub fn messages(&self) -> Vec<Delivered> {
        self.seen.messages.lock().expect("lock").clone()
    }
}

/// One SMTP conversation, in clear until STARTTLS, then inside TLS.
fn session(
    c: TcpStream,
    config: Option<Arc<rustls::ServerConfig>>,
    seen: &Seen,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut w = c.try_clone()?;
    let mut r = BufReader::new(c.try_clone()?);
    w.write_all(b"220 sink.example.test ESMTP\r\n")?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_ascii_uppercase();
        if cmd.starts_with("EHLO") {
            if config.is_some() {
                w.write_all(b"250-sink.example.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")?;
            } else {
                w.write_all(b"250-sink.example.test\r\n250 8BITMIME\r\n")?;
            }
        } else if cmd == "STARTTLS" {
            let Some(cfg) = config.clone() else {
                w.write_all(b"502 no TLS\r\n")?;
                continue;
            };
            w.write_all(b"220 go ahead\r\n")?;
            let mut conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
            let mut sock = c.try_clone()?;
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut sock) {
                    seen.handshake_failures.fetch_add(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
            let tls = rustls::StreamOwned::new(conn, sock);
            return smtp(tls, seen, true);
        } else if cmd.starts_with("MAIL") {
            seen.mail_in_clear.fetch_add(1, Ordering::SeqCst);
            w.write_all(b"250 ok\r\n")?;
        } else if cmd == "QUIT" {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 ok\r\n")?;
        }
    }
}

/// SMTP inside TLS: accept one or more messages.
fn smtp<S: Read + Write>(mut s: S, seen: &Seen, tls: bool) -> std::io::Result<()> {
    let mut rcpt = Vec::new();
    let mut buf = Vec::new();
    let mut in_data = false;
    let mut data = String::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = buf.drain(..i + 2).collect();
            let line = String::from_utf8_lossy(&line[..i]).to_string();
            if in_data {
                if line == "." {
                    in_data = false;
                    seen.messages.lock().expect("lock").push(Delivered {
                        tls,
                        rcpt: std::mem::take(&mut rcpt),
                        data: std::mem::take(&mut data),
                    });
                    s.write_all(b"250 queued\r\n")?;
                } else {
                    data.push_str(&line);
                    data.push('\n');
                }
                continue;
            }
            let cmd = line.to_ascii_uppercase();
            let reply: &[u8] = if cmd.starts_with("EHLO") {
                b"250-sink.example.test\r\n250 8BITMIME\r\n"
            } else if cmd.starts_with("RCPT") {
                rcpt.push(line[8.min(line.len())..].to_string());
                b"250 ok\r\n"
            } else if cmd == "DATA" {
                in_data = true;
                b"354 go\r\n"
            } else if cmd == "QUIT" {
                s.write_all(b"221 bye\r\n")?;
                return Ok(());
            } else {
                b"250 ok\r\n"
            };
            s.write_all(reply)?;
        }
        s.flush()?;
    }
}
