//! Building a new snapshot from the configured sources and putting it in service
//! (DESIGN.md §1, §6): a build that fails, or that looks wrong, never replaces the snapshot in
//! service. The [`Loader`] owns everything that outlives one build: the tombstone state, a
//! build held by the deletion guard, the last conflicts, and the audit log.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use crate::config::{AuditConfig, Config};
use crate::directory::{self, Directory, Snapshot};
use crate::sources::{self, Severity, SourceData, ldap};
use crate::sync::lifecycle::{self, Plan, State, StateError};
use crate::sync::merge::{self, Conflict};

/// How many added and removed addresses an audit line lists by name.
pub const SAMPLE: usize = lifecycle::SAMPLE;

/// The time in Unix seconds; injectable so tests can move it.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

/// What one build did, published or held.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub generation: u64,
    /// The lifecycle of the build: additions and removals (with samples), tombstones, the
    /// guard.
    pub plan: Plan,
    /// Addresses served, tombstones included.
    pub addresses: u64,
    pub domains: u32,
    pub conflicts: usize,
    pub errors: usize,
    pub warnings: usize,
    /// Published by `approve` after the guard held it.
    pub approved: bool,
    /// When the oldest data in the build was read (see [`Loader::data_time`]).
    pub data_time: u64,
}

/// The result of [`Loader::rebuild`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Published(Report),
    /// The build has the same content as the snapshot in service, which stays (no new
    /// generation); any hold is released.
    Unchanged(Report),
    /// The deletion guard held the build; the snapshot in service stays.
    Held(Report),
}

/// Why nothing was published; the snapshot in service (if any) stays.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("source refused: {0}")]
    Source(#[from] sources::SourceError),
    #[error("build failed: {0}")]
    Build(#[from] directory::BuildError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] directory::SnapshotError),
    #[error("state file: {0}")]
    State(#[from] StateError),
    #[error("new build has no addresses while {0} are in service; kept the snapshot in service")]
    Empty(u64),
    #[error("no build is held")]
    NothingHeld,
    #[error("{0}: no such tombstone")]
    NoTombstone(String),
    #[error("source {0}: {1}")]
    Ldap(String, ldap::LdapError),
}

/// For each source of a build, where its data goes back to: (LDAP source name, when it was
/// read, its USN mark); `None` for files.
type Back = Option<(String, u64, Option<ldap::UsnMark>)>;

/// A build the guard held, kept until approved or replaced.
#[derive(Debug)]
struct Held {
    bytes: Vec<u8>,
    report: Report,
    since: u64,
}

/// One append-only JSON-lines audit log, rotated by size.
#[derive(Debug)]
struct Audit {
    cfg: Option<AuditConfig>,
}

impl Audit {
    fn write(&self, line: &serde_json::Value) {
        eprintln!("rcptgate: audit {line}");
        let Some(cfg) = &self.cfg else { return };
        if let Err(e) = append_rotated(cfg, &format!("{line}\n")) {
            eprintln!(
                "rcptgate: audit log {}: {e} (the line above is the record)",
                cfg.path.display()
            );
        }
    }
}

fn rotated(path: &std::path::Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Append `line`; first rotate (`log` -> `log.1` -> … -> `log.keep`) if it would grow the
/// file beyond `max_size`.
fn append_rotated(cfg: &AuditConfig, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let size = std::fs::metadata(&cfg.path).map_or(0, |m| m.len());
    if size > 0 && size + line.len() as u64 > cfg.max_size {
        if cfg.keep == 0 {
            std::fs::remove_file(&cfg.path)?;
        } else {
            for n in (1..cfg.keep).rev() {
                let from = rotated(&cfg.path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(&cfg.path, n + 1))?;
                }
            }
            std::fs::rename(&cfg.path, rotated(&cfg.path, 1))?;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.path)?;
    f.write_all(line.as_bytes())
}

/// Builds, guards and publishes; one per daemon (or test).
pub struct Loader {
    cfg: Config,
    dir: Arc<Directory>,
    clock: Clock,
    state: State,
    held: Option<Held>,
    conflicts: Vec<Conflict>,
    audit: Audit,
    last_error: Option<String>,
    /// No state file at start: tombstones found in the persisted snapshot are taken in
    /// again (from the first publish on, the state file is the truth).
    adopt_orphans: bool,
    /// The last good sync of each LDAP source, when it was read, and where an incremental
    /// sync continues from.
    ldap_cache: std::collections::HashMap<String, (SourceData, u64, Option<ldap::UsnMark>)>,
    /// When the oldest data of the snapshot in service was read.
    data_time: Option<u64>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("tombstones", &self.state.tombstones.len())
            .field("held", &self.held.is_some())
            .finish()
    }
}

impl Loader {
    /// Read the tombstone state. A state file that cannot be read is an error: starting
    /// without it would forget when the tombstones were made.
    pub fn new(cfg: Config, dir: Arc<Directory>, clock: Clock) -> Result<Loader, LoadError> {
        let state = match &cfg.guard.state {
            Some(p) => State::load(p)?,
            None => State::default(),
        };
        let adopt_orphans = cfg.guard.state.as_deref().is_none_or(|p| !p.exists());
        Ok(Loader {
            audit: Audit {
                cfg: cfg.audit.clone(),
            },
            cfg,
            dir,
            clock,
            state,
            held: None,
            conflicts: Vec::new(),
            last_error: None,
            adopt_orphans,
            ldap_cache: Default::default(),
            data_time: None,
        })
    }

    /// Put the persisted snapshot in service, if there is one, so answers are definitive at
    /// once. Returns its generation.
    pub fn open_persisted(&self) -> Result<Option<u64>, LoadError> {
        let Some(path) = self.cfg.snapshot.as_deref().filter(|p| p.exists()) else {
            return Ok(None);
        };
        let snap = Snapshot::open(path)?;
        let generation = snap.generation();
        self.dir.publish(Arc::new(snap));
        Ok(Some(generation))
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.dir
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The tombstones in force.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Conflicting claims of the last build.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// The build the guard holds, if any.
    pub fn held(&self) -> Option<&Report> {
        self.held.as_ref().map(|h| &h.report)
    }

    /// The earliest time a tombstone expires (the daemon rebuilds then).
    pub fn next_expiry(&self) -> Option<u64> {
        self.state
            .next_expiry(self.cfg.guard.deletion_grace.as_secs())
    }

    /// Build from every configured source; publish, or hold if the guard says so. Any
    /// refused source, build error or an empty result over a non-empty directory leaves the
    /// directory as it was.
    ///
    /// LDAP sources are synced when their last sync is older than their `interval` (or
    /// never happened); otherwise the data of the last sync is used, so a changed file does
    /// not cost a directory pull.
    pub fn rebuild(&mut self) -> Result<Outcome, LoadError> {
        let r = self.try_rebuild(false);
        self.last_error = r.as_ref().err().map(|e| e.to_string());
        r
    }

    /// Like [`Self::rebuild`], but sync every LDAP source now (SIGHUP, `rcptgate sync`).
    pub fn rebuild_synced(&mut self) -> Result<Outcome, LoadError> {
        let r = self.try_rebuild(true);
        self.last_error = r.as_ref().err().map(|e| e.to_string());
        r
    }

    /// True when an LDAP source is due for its next sync.
    pub fn sync_due(&self) -> bool {
        let now = (self.clock)();
        self.cfg.sources.iter().any(|s| {
            s.ldap.is_some()
                && self
                    .ldap_cache
                    .get(&s.name)
                    .is_none_or(|(_, at, _)| now >= at.saturating_add(s.interval.as_secs()))
        })
    }

    /// When the oldest data of the snapshot in service was read (LDAP syncs; files are read
    /// at every build). The daemon's `max_age` counts from here.
    pub fn data_time(&self) -> Option<u64> {
        self.data_time
    }

    /// Read every source: files always, LDAP when due (or `sync_all`).
    /// Read every source: files always, LDAP when due (or `sync_all`). The data of LDAP
    /// sources is moved out of the cache (not copied); [`Self::give_back`] returns it.
    #[allow(clippy::type_complexity)]
    fn read_sources(
        &mut self,
        sync_all: bool,
    ) -> Result<(Vec<SourceData>, u64, Vec<Back>), LoadError> {
        let now = (self.clock)();
        let mut oldest = now;
        let mut data = Vec::with_capacity(self.cfg.sources.len());
        let mut back = Vec::with_capacity(self.cfg.sources.len());
        let cfg = self.cfg.clone();
        for s in &cfg.sources {
            let loaded = match &s.ldap {
                None => sources::load(&s.spec())
                    .map(|d| (d, None))
                    .map_err(LoadError::from),
                Some(l) => {
                    let fresh = self
                        .ldap_cache
                        .get(&s.name)
                        .is_some_and(|(_, at, _)| now < at.saturating_add(s.interval.as_secs()));
                    match self.ldap_cache.remove(&s.name) {
                        Some((d, at, mark)) if fresh && !sync_all => {
                            oldest = oldest.min(at);
                            Ok((d, Some((s.name.clone(), at, mark))))
                        }
                        stale => {
                            let name: Arc<str> = Arc::from(s.name.as_str());
                            let started = std::time::Instant::now();
                            // SIGHUP (sync_all) asks for a full sync.
                            let prev = stale
                                .as_ref()
                                .filter(|_| !sync_all)
                                .and_then(|(d, _, m)| Some((d, m.as_ref()?)));
                            let took = || started.elapsed().as_secs_f64();
                            match ldap::sync(&name, l, prev, now, s.full_interval, |_| {}) {
                                Ok(ldap::Synced::Full(d, mark)) => {
                                    eprintln!(
                                        "rcptgate: {}: full sync: {} addresses from {} in {:.1} s",
                                        s.name,
                                        d.entries.len(),
                                        l.url,
                                        took()
                                    );
                                    Ok((d, Some((s.name.clone(), now, mark))))
                                }
                                Ok(ldap::Synced::Incremental {
                                    data,
                                    mark,
                                    changed,
                                }) => {
                                    eprintln!(
                                        "rcptgate: {}: incremental sync: {changed} changed object(s) up to USN {}, {} addresses, in {:.2} s",
                                        s.name,
                                        mark.usn,
                                        data.entries.len(),
                                        took()
                                    );
                                    Ok((data, Some((s.name.clone(), now, Some(mark)))))
                                }
                                Ok(ldap::Synced::Unchanged) => match stale {
                                    Some((d, _, mark)) => {
                                        Ok((d, Some((s.name.clone(), now, mark))))
                                    }
                                    None => Err(LoadError::Ldap(
                                        s.name.clone(),
                                        ldap::LdapError::Config(
                                            "internal: no change reported without earlier data"
                                                .into(),
                                        ),
                                    )),
                                },
                                Err(e) => {
                                    // Keep the last good sync for the next file change.
                                    if let Some(old) = stale {
                                        self.ldap_cache.insert(s.name.clone(), old);
                                    }
                                    Err(LoadError::Ldap(s.name.clone(), e))
                                }
                            }
                        }
                    }
                }
            };
            let (mut d, from) = match loaded {
                Ok(x) => x,
                Err(e) => {
                    self.give_back(data, back);
                    return Err(e);
                }
            };
            d.role = s.role;
            if !s.domains.is_empty() {
                let name: Arc<str> = Arc::from(s.name.as_str());
                d.domains = ldap::declared_domains(&s.domains, &name);
                d.derive_domains = false;
            }
            data.push(d);
            back.push(from);
        }
        Ok((data, oldest, back))
    }

    /// Put the LDAP sources' data back into the cache.
    fn give_back(&mut self, data: Vec<SourceData>, back: Vec<Back>) {
        for (d, from) in data.into_iter().zip(back) {
            if let Some((name, at, mark)) = from {
                self.ldap_cache.insert(name, (d, at, mark));
            }
        }
    }

    fn try_rebuild(&mut self, sync_all: bool) -> Result<Outcome, LoadError> {
        let (data, data_time, back) = self.read_sources(sync_all)?;
        let (in_service, generation) = self
            .dir
            .view()
            .snapshot()
            .map_or((0, 1), |s| (s.record_count(), s.generation() + 1));
        let mut merged = merge::merge(&data, generation);
        let (mut errors, mut warnings) = (0, 0);
        for d in data
            .iter()
            .flat_map(|s| s.diagnostics.iter())
            .chain(&merged.diagnostics)
        {
            match d.severity {
                Severity::Error => errors += 1,
                Severity::Warning => warnings += 1,
            }
            eprintln!("rcptgate: {d}");
        }
        for c in &merged.conflicts {
            eprintln!("rcptgate: conflict: {c}");
        }
        self.give_back(data, back);
        let view = self.dir.view();
        let old = view.snapshot();
        let live = merged
            .input
            .records
            .iter()
            .filter(|r| r.kind != directory::Kind::Exception)
            .count();
        if live == 0 && in_service > 0 {
            return Err(LoadError::Empty(in_service));
        }
        let now = (self.clock)();
        let plan = lifecycle::plan(
            old,
            &mut merged.input,
            &self.state,
            now,
            &self.cfg.guard,
            self.adopt_orphans,
        );
        let conflicts = std::mem::take(&mut merged.conflicts);
        let (bytes, stats) = directory::build(merged.input)?;
        let report = Report {
            generation,
            plan,
            addresses: stats.records as u64,
            domains: stats.domains as u32,
            conflicts: conflicts.len(),
            errors,
            warnings,
            approved: false,
            data_time,
        };
        let same =
            old.is_some_and(|o| Snapshot::digest_of(&bytes).is_ok_and(|d| d == o.content_digest()));
        drop(view);
        self.conflicts = conflicts;
        if same {
            if report.plan.state != self.state {
                if let Some(p) = &self.cfg.guard.state {
                    report.plan.state.save(p)?;
                }
                self.state = report.plan.state.clone();
            }
            self.held = None;
            self.adopt_orphans = false;
            self.data_time = Some(report.data_time);
            return Ok(Outcome::Unchanged(report));
        }
        if report.plan.hold {
            self.audit.write(&self.audit_line("held", &report));
            self.held = Some(Held {
                bytes,
                report: report.clone(),
                since: now,
            });
            return Ok(Outcome::Held(report));
        }
        self.publish(bytes, report).map(Outcome::Published)
    }

    /// Publish the build the guard holds.
    pub fn approve(&mut self) -> Result<Report, LoadError> {
        let held = self.held.take().ok_or(LoadError::NothingHeld)?;
        let mut report = held.report;
        report.approved = true;
        // A build generation may have been published since; the held one is still newer
        // than anything it was compared with only if nothing was. Rebuild then instead.
        let current = self.dir.view().snapshot().map_or(0, |s| s.generation());
        if current >= report.generation {
            return Err(LoadError::NothingHeld);
        }
        self.publish(held.bytes, report)
    }

    /// Persist the snapshot and the state, then put the snapshot in service.
    fn publish(&mut self, bytes: Vec<u8>, report: Report) -> Result<Report, LoadError> {
        let snap = match self.cfg.snapshot.as_deref() {
            Some(path) => {
                // Checked before it replaces the persisted file.
                Snapshot::verify(&bytes)?;
                directory::write_atomic(path, &bytes)?;
                Snapshot::open(path)?
            }
            None => Snapshot::from_bytes(bytes)?,
        };
        if let Some(p) = &self.cfg.guard.state {
            report.plan.state.save(p)?;
        }
        self.state = report.plan.state.clone();
        self.held = None;
        self.adopt_orphans = false;
        self.data_time = Some(report.data_time);
        let old = self.dir.publish(Arc::new(snap));
        // Drop the old snapshot here, off the request path.
        drop(old);
        let event = if report.approved {
            "approved"
        } else {
            "publish"
        };
        self.audit.write(&self.audit_line(event, &report));
        Ok(report)
    }

    fn audit_line(&self, event: &str, r: &Report) -> serde_json::Value {
        json!({
            "event": event,
            "time": (self.clock)(),
            "generation": r.generation,
            "sources": self.cfg.sources.iter().map(|s| json!({
                "name": s.name, "role": s.role.as_str(), "path": s.path.display().to_string(),
            })).collect::<Vec<_>>(),
            "addresses": r.addresses,
            "domains": r.domains,
            "conflicts": r.conflicts,
            "errors": r.errors,
            "warnings": r.warnings,
            "added": r.plan.added,
            "removed": r.plan.removed,
            "tombstoned": r.plan.tombstoned,
            "expired": r.plan.expired,
            "returned": r.plan.returned,
            "tombstones": r.plan.tombstones,
            "held": event == "held",
            "added_sample": r.plan.added_sample,
            "removed_sample": r.plan.removed_sample,
        })
    }

    /// Drop tombstones now (they are rejected from the next publish on, which this does).
    pub fn delete_tombstones(&mut self, addresses: &[String]) -> Result<Outcome, LoadError> {
        for a in addresses {
            if !self.state.tombstones.contains_key(a) {
                return Err(LoadError::NoTombstone(a.clone()));
            }
        }
        let mut next = self.state.clone();
        for a in addresses {
            next.tombstones.remove(a);
            if let Some(h) = &mut self.held {
                h.report.plan.state.tombstones.remove(a);
            }
        }
        if let Some(p) = &self.cfg.guard.state {
            next.save(p)?;
        }
        self.state = next;
        self.rebuild()
    }

    /// Keep tombstones until their address returns or they are deleted by hand.
    pub fn keep_tombstones(&mut self, addresses: &[String]) -> Result<(), LoadError> {
        let mut next = self.state.clone();
        for a in addresses {
            next.tombstones
                .get_mut(a)
                .ok_or_else(|| LoadError::NoTombstone(a.clone()))?
                .keep = true;
            if let Some(t) = self
                .held
                .as_mut()
                .and_then(|h| h.report.plan.state.tombstones.get_mut(a))
            {
                t.keep = true;
            }
        }
        if let Some(p) = &self.cfg.guard.state {
            next.save(p)?;
        }
        self.state = next;
        Ok(())
    }

    /// Everything `rcptgate status` shows, as JSON.
    pub fn status(&self) -> serde_json::Value {
        let now = (self.clock)();
        let view = self.dir.view();
        let snap = view.snapshot();
        let held = self.held.as_ref().map(|h| {
            json!({
                "generation": h.report.generation,
                "since": h.since,
                "reason": h.report.plan.hold_reason(&self.cfg.guard),
                "addresses_in_service": h.report.plan.live_before,
                "removed": h.report.plan.removed,
                "added": h.report.plan.added,
                "removed_sample": h.report.plan.removed_sample,
            })
        });
        json!({
            "time": now,
            "generation": snap.map(|s| s.generation()),
            "addresses": snap.map(|s| s.record_count()),
            "domains": snap.map(|s| s.domain_count()),
            "snapshot_age": snap.map(|s| now.saturating_sub(s.created_unix())),
            "stale": self.dir.is_stale(),
            "tombstones": self.state.tombstones.len(),
            "conflicts": self.conflicts.len(),
            "last_error": self.last_error,
            "held": held,
        })
    }

    /// Tombstones (with time left) and conflicting claims, as JSON.
    pub fn conflicts_json(&self) -> serde_json::Value {
        let now = (self.clock)();
        let grace = self.cfg.guard.deletion_grace.as_secs();
        json!({
            "tombstones": self.state.tombstones.iter().map(|(a, t)| json!({
                "address": a,
                "removed": t.removed,
                "left": t.left(now, grace),
                "keep": t.keep,
                "kind": t.kind,
                "route": t.route,
                "profile": t.profile,
            })).collect::<Vec<_>>(),
            "claims": self.conflicts.iter().map(|c| json!({
                "address": c.address,
                "kept_owner": c.kept_owner,
                "kept_origin": c.kept_origin,
                "dropped_owner": c.dropped_owner,
                "dropped_origin": c.dropped_origin,
                "rule": c.rule,
            })).collect::<Vec<_>>(),
        })
    }
}
