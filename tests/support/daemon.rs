//! The `rcptgate serve` binary as a process, and the `rcptgate` command line, for the test
//! binaries and benchmarks that drive them; plus one policy request over TCP.
//!
//! Tests wait on the daemon's contract, never on its log: the control socket's typed status
//! (generation, rebuild counters, held removals, LDAP syncs, listeners). A config without a
//! control socket gets one next to it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcptgate::service::{Reply, Status};

/// How long any wait on the daemon may take.
const PATIENCE: Duration = Duration::from_secs(60);

/// A running daemon; killed on drop.
pub struct Daemon {
    pub child: Child,
    /// Its control socket.
    pub control: PathBuf,
    /// Its standard error, for failure messages.
    log: PathBuf,
    /// The first TCP policy listener's address (`HOST:PORT`), if any.
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
    /// Start `rcptgate serve --config CONFIG` and wait until its control socket answers
    /// (its listeners are bound by then).
    pub fn start(config: &Path) -> Daemon {
        let mut text = std::fs::read_to_string(config).expect("config");
        let dir = config.parent().expect("config dir").to_owned();
        let control = match control_of(&text) {
            Some(p) => PathBuf::from(p),
            None => {
                let p = dir.join("control.sock");
                text.push_str(&format!("\n[control]\nsocket = \"{}\"\n", p.display()));
                std::fs::write(config, &text).expect("config");
                p
            }
        };
        let log = dir.join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_rcptgate"))
            .args(["serve", "--config"])
            .arg(config)
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("spawn");
        let mut d = Daemon {
            child,
            control,
            log,
            policy: String::new(),
        };
        let s = d.wait("the control socket to answer", |_| true);
        d.policy = s
            .listeners
            .iter()
            .find_map(|l| {
                l.strip_prefix("policy ")
                    .filter(|a| !a.starts_with("unix:"))
            })
            .unwrap_or_default()
            .to_owned();
        d
    }

    /// The daemon's status, or why not.
    pub fn try_status(&self) -> Result<Status, String> {
        match request(&self.control, "status")? {
            Reply::Status(s) => Ok(*s),
            other => Err(format!("{other:?}")),
        }
    }

    /// The daemon's status.
    pub fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|e| self.fail(&e))
    }

    /// Wait until the status satisfies `cond`; returns that status.
    pub fn wait(&self, what: &str, cond: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + PATIENCE;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.try_status() {
                Ok(s) if cond(&s) => return s,
                Ok(s) => last = format!("{s:#?}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.fail(&format!("waited for {what}; last status: {last}"))
    }

    /// Wait until generation `g` is in service.
    pub fn wait_generation(&self, g: u64) -> Status {
        self.wait(&format!("generation {g}"), |s| s.generation == Some(g))
    }

    /// Rebuilds finished so far (good and failed).
    pub fn rebuilds(&self) -> u64 {
        let s = self.status();
        s.reloads_ok + s.reloads_failed
    }

    /// Wait until more than `n` rebuilds have finished and none runs; the status then.
    pub fn after(&self, n: u64) -> Status {
        self.wait(&format!("rebuild {}", n + 1), |s| {
            s.running.is_none() && s.reloads_ok + s.reloads_failed > n
        })
    }

    /// Wait until a rebuild has failed (`reloads_failed` above `n`).
    pub fn failed_after(&self, n: u64) -> Status {
        self.wait(&format!("failed rebuild {}", n + 1), |s| {
            s.reloads_failed > n
        })
    }

    /// The address a listener (`policy`, `socketmap`, `metrics`) was bound to (TCP first).
    pub fn listener(&self, what: &str) -> String {
        let s = self.status();
        let prefix = format!("{what} ");
        let all: Vec<&str> = s
            .listeners
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .collect();
        all.iter()
            .find(|a| !a.starts_with("unix:"))
            .or(all.first())
            .map(|a| a.to_string())
            .unwrap_or_else(|| self.fail(&format!("no {what} listener in {:?}", s.listeners)))
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

    /// The daemon's standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn fail(&self, why: &str) -> ! {
        panic!("{why}\n--- daemon log ---\n{}", self.log())
    }
}

/// The `[control] socket` of a config text, if it has one.
fn control_of(text: &str) -> Option<&str> {
    let at = text.find("[control]")?;
    let line = text[at..]
        .lines()
        .find(|l| l.trim_start().starts_with("socket"))?;
    line.split('"').nth(1)
}

/// One control command to the socket at `path`; its reply.
pub fn request(path: &Path, command: &str) -> Result<Reply, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{command}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
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
