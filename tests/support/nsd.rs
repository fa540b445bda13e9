//! The DNSSEC testbed (from ../shared/testbeds/dane, kept in tests/support/dane): a fake
//! signed root `.` → `test.` → `example.test` (+ `bogus.test`, `insecure.test`) on NSD,
//! built and signed at test time in a temporary folder (signatures last 30 days, so signed
//! zones are never committed), on a free loopback port. Needs `nsd bind9-utils openssl`.
//!
//! Extra zone lines are appended to `example.test` before signing: the tests add a domain
//! with one DANE host and one without, and TLSA records for the STARTTLS sinks' ports.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Testbed {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pid: Option<u32>,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read testbed") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// A UDP and TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    loop {
        let t = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = t.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Testbed {
    /// Build, sign and serve; `extra` lines go into the `example.test` zone.
    pub fn start(extra: &[String]) -> Testbed {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/dane");
        copy_dir(&src, dir.path());
        let zone = dir.path().join("zones/example.test.zone.in");
        let mut text = std::fs::read_to_string(&zone).expect("zone");
        for l in extra {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(&zone, text).expect("zone");
        for s in ["build.sh", "gen-certs.sh"] {
            run(Command::new("chmod").arg("+x").arg(dir.path().join(s)));
        }
        run(Command::new("./build.sh").current_dir(dir.path()));
        let port = free_port();
        let run_dir = dir.path().join("run");
        std::fs::create_dir_all(&run_dir).expect("run dir");
        let conf = std::fs::read_to_string(dir.path().join("nsd.conf.in"))
            .expect("conf")
            .replace("@TB@", &dir.path().display().to_string())
            .replace("@PORT@", &port.to_string());
        let conf_path = run_dir.join("nsd.conf");
        std::fs::write(&conf_path, conf).expect("conf");
        run(Command::new("nsd").arg("-c").arg(&conf_path));
        let mut tb = Testbed {
            dir,
            port,
            pid: None,
        };
        // Ready when it answers the root SOA over UDP.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !tb.answers() {
            assert!(
                std::time::Instant::now() < deadline,
                "nsd did not start: {}",
                std::fs::read_to_string(tb.dir.path().join("run/nsd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        tb.pid = std::fs::read_to_string(tb.dir.path().join("run/nsd.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        tb
    }

    fn answers(&self) -> bool {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        // A minimal query: id 1, RD, one question `. SOA IN`.
        let q = [1u8, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 1];
        if s.send_to(&q, ("127.0.0.1", self.port)).is_err() {
            return false;
        }
        let mut buf = [0u8; 512];
        s.recv(&mut buf).is_ok()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn anchor(&self) -> PathBuf {
        self.dir.path().join("anchors/root-ksk.dnskey")
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// A DANE configuration that asks this testbed.
    pub fn dane_config(&self) -> rcptgate::dane::DaneConfig {
        let mut c = rcptgate::dane::DaneConfig::default();
        c.resolver.nameservers = vec![self.addr()];
        c.resolver.trust_anchor = Some(self.anchor());
        c.resolver.timeout = std::time::Duration::from_secs(1);
        c.decision_timeout = std::time::Duration::from_secs(5);
        c
    }

    /// A self-signed certificate and key that no TLSA record names.
    pub fn wrong_cert(&self) -> (PathBuf, PathBuf) {
        let c = self.certs();
        let (cert, key) = (c.join("wrong.pem"), c.join("wrong.key"));
        if !cert.exists() {
            run(Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-days", "30", "-subj", "/CN=mx2.example.test"])
                .args(["-addext", "subjectAltName=DNS:mx2.example.test"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert));
        }
        (cert, key)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}
