//! Prometheus metrics and `/healthz` on a local HTTP port. Counters are relaxed atomics: a
//! lookup pays one increment and one histogram bucket.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::Protocol;
use crate::directory::{Directory, Sec, Verdict};
use crate::proto::http;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 9] = [1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2];
const VERDICTS: [&str; 4] = ["accept", "reject", "tempfail", "not_ours"];
const FRONTENDS: [&str; 3] = ["policy", "socketmap", "milter"];

#[derive(Debug, Default)]
struct Frontend {
    /// Indexed like `VERDICTS`; `None` verdicts (not a RCPT request) are not counted.
    lookups: [AtomicU64; 4],
    /// Cumulative counts per bucket of `BUCKETS`, plus +Inf.
    buckets: [AtomicU64; 10],
    latency_ns: AtomicU64,
    open: AtomicI64,
}

/// Everything `/metrics` reports besides the snapshot itself.
#[derive(Debug, Default)]
pub struct Metrics {
    frontends: [Frontend; 3],
    /// Rebuilds that succeeded (published, unchanged or held).
    pub reloads_ok: AtomicU64,
    /// Rebuilds that failed (the snapshot in service stayed).
    pub reloads_failed: AtomicU64,
    /// Recipients accepted only because their address is a tombstone.
    tombstone_accepts: AtomicU64,
    /// When a tombstone accept was last logged (Unix seconds), to log one per second.
    tombstone_logged: AtomicU64,
    /// Set by the loader: tombstones in force, and a build held by the deletion guard.
    pub tombstones: AtomicU64,
    /// 1 while the deletion guard holds removals.
    pub held: AtomicU64,
    /// Removals the guard holds.
    pub held_removals: AtomicU64,
    /// Listeners that stopped on their own (a closed port): `/healthz` answers 503.
    pub listeners_down: AtomicU64,
    /// 1 while the snapshot or state in service is not on disk (disk full; retried).
    pub persist_pending: AtomicU64,
    /// The DANE engine, whose counters are reported too (set once at start).
    pub dane: std::sync::OnceLock<crate::dane::Dane>,
}

fn slot(p: Protocol) -> usize {
    match p {
        Protocol::Policy => 0,
        Protocol::Socketmap => 1,
        Protocol::Milter => 2,
    }
}

/// Counts an open connection for as long as it lives.
#[derive(Debug)]
pub struct OpenGuard<'m>(&'m AtomicI64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Count an open connection until the guard drops.
    pub fn connection(&self, p: Protocol) -> OpenGuard<'_> {
        let open = &self.frontends[slot(p)].open;
        open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(open)
    }

    /// Record one answered request.
    pub fn observe(&self, p: Protocol, verdict: Option<&Verdict>, took: Duration) {
        let f = &self.frontends[slot(p)];
        if let Some(Verdict::Accept(hit)) = verdict
            && hit.kind == crate::directory::Kind::Tombstone
        {
            self.tombstone_accepts.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(v) = verdict {
            let i = match v {
                Verdict::Accept(_) => 0,
                Verdict::Reject(_) => 1,
                Verdict::Tempfail(_) => 2,
                Verdict::NotOurs => 3,
            };
            f.lookups[i].fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        let b = BUCKETS
            .iter()
            .position(|&u| secs <= u)
            .unwrap_or(BUCKETS.len());
        f.buckets[b].fetch_add(1, Ordering::Relaxed);
        f.latency_ns.fetch_add(
            took.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// True at most once per second: whether to log a tombstone accept now.
    pub fn log_tombstone_now(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.tombstone_logged.swap(now, Ordering::Relaxed) != now
    }

    /// The Prometheus text exposition.
    pub fn render(&self, dir: &Directory) -> String {
        use std::fmt::Write;
        let mut o = String::with_capacity(4096);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "# HELP rcptgate_lookups_total Answered recipient lookups."
        );
        let _ = writeln!(o, "# TYPE rcptgate_lookups_total counter");
        for (fi, fe) in FRONTENDS.iter().enumerate() {
            for (vi, v) in VERDICTS.iter().enumerate() {
                let n = get(&self.frontends[fi].lookups[vi]);
                let _ = writeln!(
                    o,
                    "rcptgate_lookups_total{{frontend=\"{fe}\",verdict=\"{v}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP rcptgate_request_seconds Time to answer one request."
        );
        let _ = writeln!(o, "# TYPE rcptgate_request_seconds histogram");
        for (fi, fe) in FRONTENDS.iter().enumerate() {
            let f = &self.frontends[fi];
            let mut cum = 0;
            for (bi, le) in BUCKETS
                .iter()
                .map(|b| b.to_string())
                .chain(["+Inf".into()])
                .enumerate()
            {
                cum += get(&f.buckets[bi]);
                let _ = writeln!(
                    o,
                    "rcptgate_request_seconds_bucket{{frontend=\"{fe}\",le=\"{le}\"}} {cum}"
                );
            }
            let _ = writeln!(
                o,
                "rcptgate_request_seconds_sum{{frontend=\"{fe}\"}} {}",
                get(&f.latency_ns) as f64 / 1e9
            );
            let _ = writeln!(
                o,
                "rcptgate_request_seconds_count{{frontend=\"{fe}\"}} {cum}"
            );
        }
        let _ = writeln!(o, "# TYPE rcptgate_open_connections gauge");
        for (fi, fe) in FRONTENDS.iter().enumerate() {
            let n = self.frontends[fi].open.load(Ordering::Relaxed);
            let _ = writeln!(o, "rcptgate_open_connections{{frontend=\"{fe}\"}} {n}");
        }
        let _ = writeln!(o, "# TYPE rcptgate_reloads_total counter");
        let _ = writeln!(
            o,
            "rcptgate_reloads_total{{result=\"ok\"}} {}",
            get(&self.reloads_ok)
        );
        let _ = writeln!(
            o,
            "rcptgate_reloads_total{{result=\"failed\"}} {}",
            get(&self.reloads_failed)
        );
        for (name, help, kind, v) in [
            (
                "rcptgate_tombstone_accepts_total",
                "Recipients accepted only as tombstones (removed from the directory, in their grace period).",
                "counter",
                &self.tombstone_accepts,
            ),
            (
                "rcptgate_tombstones",
                "Removed addresses still accepted (deletion grace).",
                "gauge",
                &self.tombstones,
            ),
            (
                "rcptgate_guard_held",
                "1 while the deletion guard holds removals (rcptgate status; rcptgate approve).",
                "gauge",
                &self.held,
            ),
            (
                "rcptgate_guard_held_removals",
                "Removals held by the deletion guard (the addresses answer as before).",
                "gauge",
                &self.held_removals,
            ),
            (
                "rcptgate_persist_pending",
                "1 while the snapshot or state in service is not on disk (served from memory; retried).",
                "gauge",
                &self.persist_pending,
            ),
            (
                "rcptgate_listeners_down",
                "Listeners that stopped on their own (/healthz answers 503).",
                "gauge",
                &self.listeners_down,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            let _ = writeln!(o, "{name} {}", get(v));
        }
        let view = dir.view();
        let loaded = view.snapshot();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let gauges = [
            (
                "rcptgate_snapshot_loaded",
                "1 when a snapshot is in service",
                u64::from(loaded.is_some()),
            ),
            (
                "rcptgate_snapshot_generation",
                "generation in service",
                loaded.map_or(0, |s| s.generation()),
            ),
            (
                "rcptgate_snapshot_age_seconds",
                "age of the snapshot in service",
                loaded.map_or(0, |s| now.saturating_sub(s.created_unix())),
            ),
            (
                "rcptgate_snapshot_addresses",
                "addresses in service",
                loaded.map_or(0, |s| s.record_count()),
            ),
            (
                "rcptgate_snapshot_domains",
                "accepted domains in service",
                loaded.map_or(0, |s| u64::from(s.domain_count())),
            ),
            (
                "rcptgate_snapshot_segments",
                "segments of the set in service (0: a single snapshot)",
                loaded.map_or(0, |s| s.segment_count() as u64),
            ),
            (
                "rcptgate_snapshot_hot_bytes",
                "bytes a verdict needs",
                loaded.map_or(0, |s| s.hot_bytes()),
            ),
            (
                "rcptgate_snapshot_fst_bytes",
                "FST bytes",
                loaded.map_or(0, |s| s.section_bytes(Sec::Fst)),
            ),
            (
                "rcptgate_directory_stale",
                "1 while the data in service is older than max_age (unknown recipients deferred)",
                u64::from(dir.is_stale()),
            ),
            (
                "rcptgate_data_age_seconds",
                "seconds since the data in service was read",
                dir.data_time().map_or(0, |t| now.saturating_sub(t)),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}.\n# TYPE {name} gauge\n{name} {v}");
        }
        if let Some(dane) = self.dane.get() {
            dane.render_metrics(&mut o);
        }
        o
    }
}

/// Connections the metrics port serves at once (scrapers and health checks are few).
pub const MAX_CONNECTIONS: usize = 32;
/// A request head must arrive, and the response be written, within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `/metrics` and `/healthz` (200 with a snapshot in service and every listener up,
/// else 503) until shutdown. At most [`MAX_CONNECTIONS`] at once, each done within
/// [`REQUEST_TIMEOUT`] however slowly its bytes come.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    dir: Arc<Directory>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(io::Error::other)?,
            _ = shutdown.changed() => return Ok(()),
        };
        let stream = tokio::select! {
            s = listener.accept() => s,
            _ = shutdown.changed() => return Ok(()),
        };
        let mut s = match stream {
            Ok((s, _)) => s,
            Err(e) => {
                super::accept_backoff("metrics", &e).await;
                continue;
            }
        };
        let (metrics, dir) = (metrics.clone(), dir.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(&mut s, &metrics, &dir)).await;
            drop(permit);
        });
    }
}

/// Read one request head and write its response.
async fn answer(s: &mut tokio::net::TcpStream, metrics: &Metrics, dir: &Directory) {
    let mut buf = Vec::with_capacity(1024);
    let head = loop {
        match http::parse_head(&buf) {
            Ok(Some(h)) => break Ok((h.method.to_vec(), h.path.to_vec())),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        if !matches!(s.read_buf(&mut buf).await, Ok(n) if n > 0) {
            return;
        }
    };
    let reply = match head.as_ref().map(|(m, p)| (m.as_slice(), p.as_slice())) {
        Ok((b"GET", b"/metrics")) => {
            http::response("200 OK", "text/plain; version=0.0.4", &metrics.render(dir))
        }
        Ok((b"GET", b"/healthz")) if metrics.listeners_down.load(Ordering::Relaxed) > 0 => {
            http::response(
                "503 Service Unavailable",
                "text/plain",
                "a listener stopped\n",
            )
        }
        Ok((b"GET", b"/healthz")) if dir.view().snapshot().is_some() => {
            http::response("200 OK", "text/plain", "ok\n")
        }
        Ok((b"GET", b"/healthz")) => http::response(
            "503 Service Unavailable",
            "text/plain",
            "no snapshot loaded\n",
        ),
        Ok(_) => http::response("404 Not Found", "text/plain", "not found\n"),
        Err(http::HttpError::TooLarge) => http::response(
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n",
        ),
        Err(_) => http::response("400 Bad Request", "text/plain", "bad request\n"),
    };
    let _ = s.write_all(&reply).await;
}
