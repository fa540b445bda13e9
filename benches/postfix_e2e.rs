//! End to end through a real Postfix (Debian's package, private instances on loopback):
//! RCPT commands per second with rcptgate as `relay_recipient_maps = socketmap:`, as
//! `check_policy_service` and as a milter (`smtpd_milters`), side by side with Postfix's own `lmdb:` table holding the same
//! addresses, and with no recipient check at all, in one run. Modes are interleaved round by
//! round so machine noise hits them alike; each mode's figure is its median round.
//!
//! CPU: rcptgate's from /proc/PID/stat, the load driver's (this process) from /proc/self/stat,
//! the machine's busy time from /proc/stat; "Postfix" is busy minus those two, so it also
//! carries whatever else the machine did.
//!
//! `cargo bench --features postfix-tests --bench postfix_e2e` (root, Postfix + postfix-lmdb
//! installed; 100k addresses, 5 rounds of 8 s per mode). Under `cargo test` it runs one short
//! round on 10k addresses as a smoke test that checks every reply code.

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "../tests/support/postfix.rs"]
mod postfix;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use daemon::Daemon;
use postfix::{Postfix, run};

const SESSIONS: usize = 8;
const RCPTS_PER_TXN: usize = 50;
/// Every UNKNOWN_EVERY-th recipient is not in the directory.
const UNKNOWN_EVERY: usize = 10;

/// Busy and total jiffies of the whole machine (first line of /proc/stat).
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = cpu.iter().sum();
    let idle = cpu.get(3).copied().unwrap_or(0.0) + cpu.get(4).copied().unwrap_or(0.0);
    (total - idle) / 100.0
}

/// CPU seconds (user + system) of a process, all its threads.
fn process_cpu(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    (fields.get(11).copied().unwrap_or(0.0) + fields.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// The `rcptgate serve` binary on `map`, TCP and unix listeners for the policy and socketmap
/// protocols, a milter and metrics, its first snapshot published; (daemon, socketmap,
/// metrics, milter) addresses.
fn start_daemon(dir: &Path, map: &Path) -> (Daemon, String, String, String) {
    let cfg = dir.join("rcptgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[directory]\nsnapshot = \"{}\"\n\n[[source]]\nname = \"bench\"\nkind = \"map\"\npath = \"{}\"\n\n\
[policy]\nlisten = [\"127.0.0.1:0\", \"unix:{d}/policy.sock\"]\n\n\
[socketmap]\nlisten = [\"127.0.0.1:0\", \"unix:{d}/socketmap.sock\"]\n\n\
[milter]\nlisten = [\"127.0.0.1:0\"]\n\n\
[metrics]\nlisten = \"127.0.0.1:0\"\n\n[limits]\nthreads = {threads}\n",
            dir.join("snap.bin").display(),
            map.display(),
            d = dir.display(),
            // E2E_THREADS: the daemon's request-path threads (`[limits] threads`, default 1).
            threads = std::env::var("E2E_THREADS").unwrap_or_else(|_| "1".into())
        ),
    )
    .expect("config");
    let d = Daemon::start(&cfg);
    let (socketmap, metrics) = (d.listener("socketmap"), d.listener("metrics"));
    let milter = d.listener("milter");
    d.wait_generation(1);
    (d, socketmap, metrics, milter)
}

/// Requests the daemon with metrics on `metrics` answered so far, all frontends.
fn requests(metrics: &str) -> f64 {
    let mut s = TcpStream::connect(metrics).expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("get");
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).expect("read metrics");
    body.lines()
        .filter(|l| l.starts_with("rcptgate_request_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The final line's code of one (possibly multi-line) SMTP reply.
fn reply(r: &mut BufReader<TcpStream>, line: &mut String) -> [u8; 3] {
    loop {
        line.clear();
        let n = r.read_line(line).expect("read reply");
        assert!(n > 0, "Postfix closed the session");
        if line.as_bytes().get(3) != Some(&b'-') {
            let b = line.as_bytes();
            return [b[0], b[1], b[2]];
        }
    }
}

/// One load run: SESSIONS connections, each pipelining MAIL, RCPT_PER_TXN RCPTs and RSET until
/// `secs` have passed. Returns RCPT replies by code and the wall time.
fn load(port: u16, space: usize, secs: f64) -> (BTreeMap<String, u64>, f64) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..SESSIONS)
        .map(|s| {
            std::thread::spawn(move || {
                let mut codes = BTreeMap::<String, u64>::new();
                let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .expect("timeout");
                let mut w = stream.try_clone().expect("clone");
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                reply(&mut r, &mut line);
                w.write_all(b"EHLO load.test\r\n").expect("ehlo");
                reply(&mut r, &mut line);
                let mut i = s * 7919;
                let mut batch = Vec::with_capacity(64 * RCPTS_PER_TXN);
                while Instant::now() < deadline {
                    batch.clear();
                    batch.extend_from_slice(b"MAIL FROM:<load@sender.test>\r\n");
                    for _ in 0..RCPTS_PER_TXN {
                        let n = i % space + 1;
                        let user = if i % UNKNOWN_EVERY == UNKNOWN_EVERY - 1 {
                            "nouser"
                        } else {
                            "user"
                        };
                        i += 1;
                        batch.extend_from_slice(
                            format!("RCPT TO:<{n}{user}@example.com>\r\n").as_bytes(),
                        );
                    }
                    batch.extend_from_slice(b"RSET\r\n");
                    w.write_all(&batch).expect("write");
                    let mail = reply(&mut r, &mut line);
                    assert_eq!(&mail, b"250", "MAIL FROM: {line}");
                    for _ in 0..RCPTS_PER_TXN {
                        let code = reply(&mut r, &mut line);
                        *codes
                            .entry(String::from_utf8_lossy(&code).into_owned())
                            .or_default() += 1;
                    }
                    reply(&mut r, &mut line);
                }
                let _ = w.write_all(b"QUIT\r\n");
                codes
            })
        })
        .collect();
    let mut codes = BTreeMap::new();
    for t in threads {
        for (k, v) in t.join().expect("load session") {
            *codes.entry(k).or_default() += v;
        }
    }
    (codes, started.elapsed().as_secs_f64())
}

#[derive(Default)]
struct Round {
    rate: f64,
    postfix_us: f64,
    rcptgate_us: f64,
    driver_us: f64,
    /// rcptgate requests per RCPT command.
    requests: f64,
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (space, mut rounds, mut secs) = if bench {
        (100_000, 5, 8.0)
    } else {
        (10_000, 1, 0.5)
    };
    // E2E_ROUNDS, E2E_SECS and E2E_MODES (comma-separated) narrow a run, e.g. for profiling.
    let env = |k: &str| std::env::var(k).ok();
    if let Some(r) = env("E2E_ROUNDS").and_then(|v| v.parse().ok()) {
        rounds = r;
    }
    if let Some(s) = env("E2E_SECS").and_then(|v| v.parse().ok()) {
        secs = s;
    }
    let only = env("E2E_MODES");
    let wanted = |m: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == m));
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tmp.path();

    // The same addresses for rcptgate (MAP upload) and for Postfix's lmdb: table.
    let mut map = String::from("1|example.com\tDOMAIN:\texample.com\n");
    let mut table = String::new();
    for n in 1..=space {
        map.push_str(&format!("1|example.com\tDIR:\t{n}user@example.com\n"));
        table.push_str(&format!("{n}user@example.com OK\n"));
    }
    map.push_str("++++\n");
    std::fs::write(base.join("dir.map"), map).expect("map");
    std::fs::write(base.join("rcpt.table"), table).expect("table");

    let (daemon, socketmap, metrics, milter) = start_daemon(base, &base.join("dir.map"));
    // Postfix's smtpd runs as `postfix`: let it into the directory of the unix sockets
    // (rcptgate makes the sockets themselves 0666).
    run(Command::new("chmod").arg("755").arg(base));
    let rcptgate_pid = daemon.child.id().to_string();
    let lmdb = format!("lmdb:{}", base.join("rcpt.table").display());
    let modes: Vec<(&str, Postfix)> = vec![
        ("lmdb", {
            // The table exists before Postfix starts: start_for's readiness probe spawns an
            // smtpd that opens relay_recipient_maps at once and lives on to serve the load,
            // so a table built afterwards raced it ("open database …: Bad file descriptor",
            // one session of 4xx in CI). postmap needs only an empty main.cf.
            let etc = base.join("postmap-etc");
            std::fs::create_dir_all(&etc).expect("mkdir");
            std::fs::write(etc.join("main.cf"), "").expect("main.cf");
            run(Command::new("postmap").arg("-c").arg(&etc).arg(&lmdb));
            Postfix::start_for(
                &base.join("pf-lmdb"),
                "example.com",
                &[&format!("relay_recipient_maps = {lmdb}")],
            )
        }),
        (
            "socketmap",
            Postfix::start_for(
                &base.join("pf-socketmap"),
                "example.com",
                &[&format!(
                    "relay_recipient_maps = socketmap:inet:{socketmap}:recipients"
                )],
            ),
        ),
        (
            "policy",
            Postfix::start_for(
                &base.join("pf-policy"),
                "example.com",
                &[&format!(
                    "smtpd_recipient_restrictions = check_policy_service {{ inet:{}, timeout=10s, default_action=DEFER_IF_PERMIT }}, permit",
                    daemon.policy
                )],
            ),
        ),
        (
            "socketmap-unix",
            Postfix::start_for(
                &base.join("pf-socketmap-unix"),
                "example.com",
                &[&format!(
                    "relay_recipient_maps = socketmap:unix:{}/socketmap.sock:recipients",
                    base.display()
                )],
            ),
        ),
        (
            "policy-unix",
            Postfix::start_for(
                &base.join("pf-policy-unix"),
                "example.com",
                &[&format!(
                    "smtpd_recipient_restrictions = check_policy_service {{ unix:{}/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }}, permit",
                    base.display()
                )],
            ),
        ),
        (
            "milter",
            Postfix::start_for(
                &base.join("pf-milter"),
                "example.com",
                &[
                    &format!("smtpd_milters = inet:{milter}"),
                    "milter_default_action = tempfail",
                    "milter_protocol = 6",
                ],
            ),
        ),
        (
            "none",
            Postfix::start_for(&base.join("pf-none"), "example.com", &[]),
        ),
    ];

    let modes: Vec<(&str, Postfix)> = modes.into_iter().filter(|(m, _)| wanted(m)).collect();
    eprintln!("rcptgate pid {rcptgate_pid}");
    // Warm-up: smtpd processes started, maps opened, rcptgate connections made.
    for (_, pf) in &modes {
        load(pf.port, space, 0.3);
    }
    let mut results: BTreeMap<&str, Vec<Round>> = BTreeMap::new();
    for _ in 0..rounds {
        for (mode, pf) in &modes {
            let req0 = requests(&metrics);
            let (busy0, rg0, me0) = (
                machine_busy(),
                process_cpu(&rcptgate_pid),
                process_cpu("self"),
            );
            let (codes, wall) = load(pf.port, space, secs);
            let (busy, rg, me) = (
                machine_busy() - busy0,
                process_cpu(&rcptgate_pid) - rg0,
                process_cpu("self") - me0,
            );
            let rcpts: u64 = codes.values().sum();
            let requests = requests(&metrics) - req0;
            let unknown = rcpts / UNKNOWN_EVERY as u64;
            // Every reply must be the right one: 550 for the unknown tenth (none when
            // nothing checks recipients), 250 for the rest; a 4xx would mean lost speed.
            let expect_550 = if *mode == "none" { 0 } else { unknown };
            let got_550 = codes.get("550").copied().unwrap_or(0);
            let got_250 = codes.get("250").copied().unwrap_or(0);
            assert!(
                got_550.abs_diff(expect_550) <= SESSIONS as u64 && got_250 + got_550 == rcpts,
                "{mode}: unexpected replies {codes:?}\n{}",
                pf.log()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            let per = |cpu: f64| cpu / rcpts as f64 * 1e6;
            results.entry(mode).or_default().push(Round {
                rate: rcpts as f64 / wall,
                postfix_us: per(busy - rg - me),
                rcptgate_us: per(rg),
                driver_us: per(me),
                requests: requests / rcpts as f64,
            });
        }
    }

    let median = |rounds: &mut Vec<Round>| -> Round {
        rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        rounds.swap_remove(rounds.len() / 2)
    };
    let mut table: Vec<(&str, Round)> = Vec::new();
    for mode in [
        "lmdb",
        "socketmap",
        "socketmap-unix",
        "policy",
        "policy-unix",
        "milter",
        "none",
    ] {
        if let Some(r) = results.get_mut(mode) {
            let all: Vec<String> = r.iter().map(|x| format!("{:.0}", x.rate)).collect();
            eprintln!("{mode}: rounds {}", all.join(" "));
            table.push((mode, median(r)));
        }
    }
    let lmdb_rate = table.first().map_or(1.0, |(_, r)| r.rate);
    println!(
        "\n=== RCPT/s through Postfix, {space} addresses, {SESSIONS} sessions x {RCPTS_PER_TXN} pipelined RCPTs, 1 in {UNKNOWN_EVERY} unknown, median of {rounds} x {secs} s ==="
    );
    println!(
        "{:<14} {:>9} {:>8} {:>17} {:>18} {:>15} {:>15} {:>14}",
        "mode",
        "RCPT/s",
        "vs lmdb",
        "Postfix µs/RCPT",
        "rcptgate µs/RCPT",
        "rcptgate share",
        "driver µs/RCPT",
        "requests/RCPT"
    );
    for (mode, r) in &table {
        let total = r.postfix_us + r.rcptgate_us;
        println!(
            "{mode:<14} {:>9.0} {:>7.2}x {:>17.1} {:>18.1} {:>14.1}% {:>15.1} {:>14.2}",
            r.rate,
            r.rate / lmdb_rate,
            r.postfix_us,
            r.rcptgate_us,
            if total > 0.0 {
                r.rcptgate_us / total * 100.0
            } else {
                0.0
            },
            r.driver_us,
            r.requests
        );
    }
}
