//! The `rcptgate serve` binary as a process, and the `rcptgate` command line, for the test
//! binaries and benchmarks that drive them; plus one policy request over TCP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running daemon, its stderr read line by line; killed on drop.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read but not yet matched by `wait_for`.
    backlog: Vec<String>,
    /// The first policy listener's address (`HOST:PORT`).
    pub policy: String,
}

impl Drop for Daemon {
    /// Never leave a daemon behind, whatever the test did.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Start `rcptgate serve --config CONFIG` and wait for its policy listener.
    pub fn start(config: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rcptgate"))
            .args(["serve", "--config"])
            .arg(config)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            lines,
            backlog: Vec::new(),
            policy: String::new(),
        };
        d.policy = d.listener("policy");
        d
    }

    /// The address a listener (`policy`, `socketmap`, `metrics`) says it is listening on.
    pub fn listener(&mut self, what: &str) -> String {
        let line = self.peek_for(&format!("{what} listening on "));
        line.rsplit(' ').next().expect("addr").to_owned()
    }

    /// Wait until the daemon has said `needle`; earlier lines stay available.
    pub fn peek_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.backlog.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("daemon never said {needle:?}: {:#?}", self.backlog));
            match self.lines.recv_timeout(left) {
                Ok(l) => self.backlog.push(l),
                Err(_) => panic!("daemon never said {needle:?}: {:#?}", self.backlog),
            }
        }
    }

    /// Wait until the daemon has said `needle`, and forget everything up to it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let line = self.peek_for(needle);
        let at = self.backlog.iter().position(|l| *l == line).unwrap_or(0);
        self.backlog.drain(..=at);
        line
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Ask the daemon's policy service about `rcpt`.
    pub fn ask(&self, rcpt: &str) -> String {
        ask(&self.policy, rcpt)
    }
}

/// One policy request for `rcpt` to the service at `addr`; the reply's action line(s).
pub fn ask(addr: &str, rcpt: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient={rcpt}\n\n"
    )
    .expect("write");
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\n\n") {
        let n = s.read(&mut byte).expect("read");
        assert!(n > 0, "closed");
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).trim().to_owned()
}

/// `rcptgate ARGS…` as a command: (success, stdout, stderr).
pub fn cli_split(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rcptgate"))
        .args(args)
        .output()
        .expect("run rcptgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `rcptgate ARGS…` as a command: (success, stdout + stderr).
pub fn cli(args: &[&str]) -> (bool, String) {
    let (ok, out, err) = cli_split(args);
    (ok, out + &err)
}
