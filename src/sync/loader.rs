//! Building a new snapshot from the configured sources and putting it in service
//! (DESIGN.md §1, §6): a build that fails, or that looks wrong, never replaces the snapshot in
//! service. The [`Loader`] owns everything that outlives one build: the tombstone state, a
//! build held by the deletion guard, the last conflicts, and the audit log.

use std::collections::HashSet;
use std::path::PathBuf;

#[path = "segmented.rs"]
mod segmented;
use std::sync::Arc;

use serde_json::json;
use tracing::{error, info, warn};

use crate::config::{AuditConfig, Config};
use crate::directory::{self, Directory, Snapshot};
use crate::service::types::{
    BuildSummary, Claim, Conflicts, HeldStatus, MAX_DIAGNOSTICS, SourceSync, Status, TombstoneView,
};
use crate::sources::{self, Severity, SourceData, graph, ldap};
use crate::sync::lifecycle::{self, Plan, State, StateError};
use crate::sync::merge::{self, Conflict};

pub use crate::directory::{Clock, system_clock};
pub use segmented::group_files;

/// How many added and removed addresses an audit line lists by name.
pub const SAMPLE: usize = lifecycle::SAMPLE;

/// How many diagnostics a rebuild logs by text (the rest are counted; `status` and
/// `rcptgate check` show them all).
const LOGGED_DIAGNOSTICS: usize = 5;

/// What one build did, published or held.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The build's generation (in service unless the outcome is `Unchanged`).
    pub generation: u64,
    /// The lifecycle of the build: additions and removals (with samples), tombstones, the
    /// guard.
    pub plan: Plan,
    /// Addresses served, tombstones included.
    pub addresses: u64,
    /// Live addresses (tombstones and exceptions not counted).
    pub live: u64,
    /// Accepted domains.
    pub domains: u32,
    /// Addresses claimed by two owners.
    pub conflicts: usize,
    /// Entries skipped as invalid.
    pub errors: usize,
    /// Warnings about entries kept.
    pub warnings: usize,
    /// Published by `approve` after the guard held it.
    pub approved: bool,
    /// When the oldest data in the build was read (see [`Loader::data_time`]).
    pub data_time: u64,
}

/// The result of [`Loader::rebuild`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A new generation is in service.
    Published(Report),
    /// The build has the same content as the snapshot in service, which stays (no new
    /// generation); any hold is released.
    Unchanged(Report),
    /// The deletion guard holds the build's removals. Its additions and changes are in
    /// service (a new generation, unless there were none); the addresses it would remove
    /// answer as before until [`Loader::approve`].
    Held(Report),
}

/// Why nothing was published; the snapshot in service (if any) stays.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A source could not be read or is incomplete.
    #[error("source refused: {0}")]
    Source(#[from] sources::SourceError),
    /// The snapshot could not be built.
    #[error("build failed: {0}")]
    Build(#[from] directory::BuildError),
    /// The snapshot could not be written or read back.
    #[error("snapshot: {0}")]
    Snapshot(#[from] directory::SnapshotError),
    /// The tombstone state file could not be read or written.
    #[error("state file: {0}")]
    State(#[from] StateError),
    /// The build came out empty over a non-empty directory.
    #[error("new build has no addresses while {0} are in service; kept the snapshot in service")]
    Empty(u64),
    /// `approve` with no removals held.
    #[error("no build is held")]
    NothingHeld,
    /// `delete` or `keep` of an address that is not a tombstone.
    #[error("{0}: no such tombstone")]
    NoTombstone(String),
    /// An LDAP source failed.
    #[error("source {0}: {1}")]
    Ldap(String, ldap::LdapError),
    /// A Microsoft Graph source failed.
    #[error("source {0}: {1}")]
    Graph(String, graph::GraphError),
}

/// A source's data as its configuration says: its role, and the accepted domains it is
/// configured with (instead of those of its addresses).
fn finish_source(d: &mut SourceData, s: &crate::config::SourceConfig) {
    d.role = s.role;
    if !s.domains.is_empty() {
        let name: Arc<str> = Arc::from(s.name.as_str());
        d.domains = ldap::declared_domains(&s.domains, &name);
        d.derive_domains = false;
    }
}

/// A build's diagnostics and conflicts counted, the first ones as text.
#[derive(Debug, Default)]
struct Diagnosed {
    errors: usize,
    warnings: usize,
    conflicts: usize,
    total: usize,
    lines: Vec<String>,
}

impl Diagnosed {
    fn of(data: &[SourceData], merged: &merge::Merged) -> Diagnosed {
        let mut out = Diagnosed::default();
        for d in data
            .iter()
            .flat_map(|s| s.diagnostics.iter())
            .chain(&merged.diagnostics)
        {
            match d.severity {
                Severity::Error => out.errors += 1,
                Severity::Warning => out.warnings += 1,
            }
            out.total += 1;
            if out.lines.len() < MAX_DIAGNOSTICS {
                out.lines.push(d.to_string());
            }
        }
        for c in &merged.conflicts {
            out.total += 1;
            out.conflicts += 1;
            if out.lines.len() < MAX_DIAGNOSTICS {
                out.lines.push(format!("conflict: {c}"));
            }
        }
        out
    }

    /// Another group's, after these.
    fn add(&mut self, other: Diagnosed) {
        self.errors += other.errors;
        self.warnings += other.warnings;
        self.conflicts += other.conflicts;
        self.total += other.total;
        let room = MAX_DIAGNOSTICS.saturating_sub(self.lines.len());
        self.lines.extend(other.lines.into_iter().take(room));
    }
}

/// Live addresses of a build input (tombstones and exceptions not counted).
fn live_records(input: &directory::BuildInput) -> u64 {
    input
        .records
        .iter()
        .filter(|r| {
            !matches!(
                r.kind,
                directory::Kind::Exception | directory::Kind::Tombstone
            )
        })
        .count() as u64
}

/// Where a live source's next sync starts.
#[derive(Debug, Clone)]
enum LiveMark {
    /// Active Directory's USN.
    Usn(ldap::UsnMark),
    /// Graph's delta links (and the objects they apply to).
    Delta(Box<graph::DeltaMark>),
}

impl LiveMark {
    fn usn(&self) -> Option<&ldap::UsnMark> {
        match self {
            LiveMark::Usn(m) => Some(m),
            LiveMark::Delta(_) => None,
        }
    }

    fn delta(&self) -> Option<&graph::DeltaMark> {
        match self {
            LiveMark::Delta(m) => Some(m),
            LiveMark::Usn(_) => None,
        }
    }
}

/// For each source of a build, where its data goes back to: (live source name, when it was
/// read, its mark); `None` for files.
type Back = Option<(String, u64, Option<LiveMark>)>;

/// Removals the guard holds, until approved or no longer wanted.
#[derive(Debug)]
struct Held {
    report: Report,
    since: u64,
    /// Held because the persisted snapshot was lost and this first build removes too much of
    /// what the state says was in service (nothing is published): why, in words.
    lost: Option<String>,
}

/// Why a first build after a lost snapshot is held, if it is: it removes more of the last
/// publish's addresses than the guard allows.
fn lost_snapshot_hold(
    guard: &crate::config::GuardConfig,
    last: lifecycle::LastPublish,
    live: u64,
) -> Option<String> {
    let removed = last.live.saturating_sub(live);
    (last.live > 0
        && (removed > guard.max_deletions
            || removed as f64 > guard.max_deletion_ratio * last.live as f64))
        .then(|| {
            format!(
                "the persisted snapshot is missing; the last publish (generation {}) had {} addresses and this build has {live} ({} fewer, {:.1} %)",
                last.generation,
                last.live,
                removed,
                removed as f64 * 100.0 / last.live as f64
            )
        })
}

/// One append-only JSON-lines audit log, rotated by size.
#[derive(Debug)]
struct Audit {
    cfg: Option<AuditConfig>,
}

impl Audit {
    fn write(&self, line: &serde_json::Value) {
        info!(target: "rcptgate::audit", record = %line, "audit");
        let Some(cfg) = &self.cfg else { return };
        if let Err(e) = append_rotated(cfg, &format!("{line}\n")) {
            error!(
                path = %cfg.path.display(),
                error = %e,
                record = %line,
                "audit log not written"
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
    /// Diagnostics of the last build: how many, and the first [`MAX_DIAGNOSTICS`].
    diagnostics: (usize, Vec<String>),
    /// Removals approved by [`Self::approve`], for the build it runs.
    approved: HashSet<String>,
    /// [`Self::approve`] of a first build held after a lost snapshot.
    approve_lost: bool,
    /// Why the snapshot or the state in service is not on disk yet (disk full, …); retried.
    persist_error: Option<String>,
    /// What the last good build did.
    last_build: Option<BuildSummary>,
    /// The last sync of each LDAP source, by name.
    syncs: std::collections::BTreeMap<String, SourceSync>,
    /// No state file at start: tombstones found in the persisted snapshot are taken in
    /// again (from the first publish on, the state file is the truth).
    adopt_orphans: bool,
    /// The last good sync of each LDAP source, when it was read, and where an incremental
    /// sync continues from.
    ldap_cache: std::collections::HashMap<String, (SourceData, u64, Option<LiveMark>)>,
    /// Segmented mode: what the last build read of each source, by name.
    summaries: std::collections::HashMap<String, segmented::Summary>,
    /// The next build must be a full one (tombstones deleted by hand, provisioning).
    force_full: bool,
    /// The build in progress reads every source: give the heap back to the system after it.
    read_all: bool,
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
        // Partial files of a process killed mid-write.
        let summaries = cfg.snapshot.as_deref().map(segmented::summaries_path);
        for p in [
            cfg.snapshot.as_deref(),
            cfg.guard.state.as_deref(),
            summaries.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            let mut n = directory::clean_temporaries(p);
            // Segment files of a set that no index names (a crash between writing them and
            // the index).
            n += directory::segments::collect_garbage(p);
            if n > 0 {
                info!(path = %p.display(), removed = n, "removed {n} partial file(s) left by an interrupted write");
            }
        }
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
            diagnostics: (0, Vec::new()),
            approved: HashSet::new(),
            approve_lost: false,
            persist_error: None,
            last_build: None,
            syncs: Default::default(),
            adopt_orphans,
            ldap_cache: Default::default(),
            summaries: Default::default(),
            force_full: false,
            read_all: false,
        })
    }

    /// Put the persisted snapshot in service, if there is one, so answers are definitive at
    /// once. Returns its generation. Its data counts as read when it was built.
    pub fn open_persisted(&mut self) -> Result<Option<u64>, LoadError> {
        let Some(path) = self.cfg.snapshot.as_deref().filter(|p| p.exists()) else {
            return Ok(None);
        };
        // A set of segments answers from its index at once; its segments are read on first
        // use, and all of them by the prefetch after the first build.
        let snap = Snapshot::open_lazy(path)?;
        let generation = snap.generation();
        if self.cfg.segments && snap.is_set() {
            let path = path.to_path_buf();
            self.load_summaries(&path, generation);
        }
        self.dir.set_data_time(snap.created_unix());
        self.dir.publish(Arc::new(snap));
        Ok(Some(generation))
    }

    /// The directory this loader publishes to.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.dir
    }

    /// The configuration it builds from.
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
        self.prefetch();
        r
    }

    /// Read the snapshot's `excluded` section now, in the job, so the first `explain`
    /// does not wait on the disk (a no-op once read).
    fn prefetch(&self) {
        let view = self.dir.view();
        if let Some(s) = view.snapshot() {
            s.prefetch_excluded();
        }
    }

    /// Like [`Self::rebuild`], but sync every LDAP source now (SIGHUP, `rcptgate sync`).
    pub fn rebuild_synced(&mut self) -> Result<Outcome, LoadError> {
        let r = self.try_rebuild(true);
        self.last_error = r.as_ref().err().map(|e| e.to_string());
        self.prefetch();
        r
    }

    /// True when an LDAP source is due for its next sync.
    pub fn sync_due(&self) -> bool {
        let now = (self.clock)();
        self.cfg.sources.iter().any(|s| {
            (s.ldap.is_some() || s.graph.is_some())
                && self
                    .ldap_cache
                    .get(&s.name)
                    .is_none_or(|(_, at, _)| now >= at.saturating_add(s.interval.as_secs()))
        })
    }

    /// When the oldest data of the snapshot in service was read (LDAP syncs; files are read
    /// at every build). The daemon's `max_age` counts from here.
    pub fn data_time(&self) -> Option<u64> {
        self.dir.data_time()
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
                None if s.graph.is_some() => self.read_graph(s, now, sync_all, &mut oldest),
                None => sources::load(s.format, &s.path)
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
                                .and_then(|(d, _, m)| Some((d, m.as_ref()?.usn()?)));
                            let took = || started.elapsed().as_secs_f64();
                            match ldap::sync(&name, l, prev, now, s.full_interval, |_| {}) {
                                Ok(ldap::Synced::Full(d, mark)) => {
                                    self.note_sync(&s.name, "full", now, d.entries.len(), 0);
                                    info!(
                                        source = %s.name,
                                        url = %l.url,
                                        addresses = d.entries.len(),
                                        seconds = took(),
                                        "{}: full sync: {} addresses from {} in {:.1} s",
                                        s.name,
                                        d.entries.len(),
                                        l.url,
                                        took()
                                    );
                                    Ok((d, Some((s.name.clone(), now, mark.map(LiveMark::Usn)))))
                                }
                                Ok(ldap::Synced::Incremental {
                                    data,
                                    mark,
                                    changed,
                                }) => {
                                    self.note_sync(
                                        &s.name,
                                        "incremental",
                                        now,
                                        data.entries.len(),
                                        changed,
                                    );
                                    info!(
                                        source = %s.name,
                                        changed,
                                        usn = mark.usn,
                                        addresses = data.entries.len(),
                                        seconds = took(),
                                        "{}: incremental sync: {changed} changed object(s) up to USN {}, {} addresses, in {:.2} s",
                                        s.name,
                                        mark.usn,
                                        data.entries.len(),
                                        took()
                                    );
                                    Ok((
                                        data,
                                        Some((s.name.clone(), now, Some(LiveMark::Usn(mark)))),
                                    ))
                                }
                                Ok(ldap::Synced::Unchanged) => match stale {
                                    Some((d, _, mark)) => {
                                        self.note_sync(
                                            &s.name,
                                            "unchanged",
                                            now,
                                            d.entries.len(),
                                            0,
                                        );
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
            finish_source(&mut d, s);
            data.push(d);
            back.push(from);
        }
        Ok((data, oldest, back))
    }

    /// Read a Graph source: its cached data while it is fresh (and no sync is asked for),
    /// else a delta or full sync; a failure keeps the last good data for the next build.
    fn read_graph(
        &mut self,
        s: &crate::config::SourceConfig,
        now: u64,
        sync_all: bool,
        oldest: &mut u64,
    ) -> Result<(SourceData, Back), LoadError> {
        let Some(g) = &s.graph else {
            return Err(LoadError::Graph(
                s.name.clone(),
                graph::GraphError::Config("not a Graph source".into()),
            ));
        };
        let fresh = self
            .ldap_cache
            .get(&s.name)
            .is_some_and(|(_, at, _)| now < at.saturating_add(s.interval.as_secs()));
        let name: Arc<str> = Arc::from(s.name.as_str());
        let stale = match self.ldap_cache.remove(&s.name) {
            Some((d, at, mark)) if fresh && !sync_all => {
                *oldest = (*oldest).min(at);
                return Ok((d, Some((s.name.clone(), at, mark))));
            }
            // After a restart: where the last run's delta sync left off.
            None => self.load_graph_state(&s.name).map(|m| {
                let (d, _) = graph::build_data(&name, g, &m.objects);
                (d, 0, Some(LiveMark::Delta(Box::new(m))))
            }),
            stale => stale,
        };
        let started = std::time::Instant::now();
        // SIGHUP (sync_all) asks for a full sync.
        let prev = stale
            .as_ref()
            .filter(|_| !sync_all)
            .and_then(|(_, _, m)| m.as_ref()?.delta());
        let back =
            |m: graph::DeltaMark| Some((s.name.clone(), now, Some(LiveMark::Delta(Box::new(m)))));
        match graph::sync(&name, g, prev, now, s.full_interval, |_| {}) {
            Ok(graph::Synced::Full(d, m)) => {
                self.save_graph_state(&s.name, &m);
                let n = d.entries.len();
                self.note_sync(&s.name, "full", now, n, 0);
                info!(
                    source = %s.name,
                    tenant = %g.tenant_id,
                    addresses = n,
                    seconds = started.elapsed().as_secs_f64(),
                    "{}: full Graph sync: {n} addresses from {} objects in {:.1} s",
                    s.name,
                    m.objects.len(),
                    started.elapsed().as_secs_f64()
                );
                Ok((d, back(m)))
            }
            Ok(graph::Synced::Incremental {
                data,
                mark,
                changed,
            }) => {
                self.save_graph_state(&s.name, &mark);
                let n = data.entries.len();
                self.note_sync(&s.name, "incremental", now, n, changed);
                info!(
                    source = %s.name,
                    changed,
                    addresses = n,
                    "{}: Graph delta sync: {changed} changed object(s), {n} addresses, in {:.2} s",
                    s.name,
                    started.elapsed().as_secs_f64()
                );
                Ok((data, back(mark)))
            }
            Ok(graph::Synced::Unchanged(mark)) => match stale {
                Some((d, _, _)) => {
                    self.note_sync(&s.name, "unchanged", now, d.entries.len(), 0);
                    Ok((d, back(mark)))
                }
                None => Err(LoadError::Graph(
                    s.name.clone(),
                    graph::GraphError::Config(
                        "internal: no change reported without earlier data".into(),
                    ),
                )),
            },
            Err(e) => {
                // Keep the last good sync for the next file change.
                if let Some(old) = stale {
                    self.ldap_cache.insert(s.name.clone(), old);
                }
                Err(LoadError::Graph(s.name.clone(), e))
            }
        }
    }

    /// Provision on demand: fetch one object of an LDAP source now (by DN, user principal
    /// name or address), put its addresses in that source's data in place of what it had,
    /// and rebuild — the same merge, guard, tombstones and audit as any build. The next full
    /// sync confirms or reverts it. Returns the build's outcome and the object's addresses.
    pub fn provision(
        &mut self,
        source: &str,
        object: &str,
    ) -> Result<(Outcome, Vec<String>), LoadError> {
        let fail = |m: String| LoadError::Ldap(source.to_owned(), ldap::LdapError::Config(m));
        let s = self
            .cfg
            .sources
            .iter()
            .find(|s| s.name == source)
            .cloned()
            .ok_or_else(|| fail(format!("no source named {source:?}")))?;
        if let Some(g) = &s.graph {
            return self.provision_graph(&s, g, object);
        }
        let Some(l) = &s.ldap else {
            return Err(fail(format!("{source} is not an LDAP or Graph source")));
        };
        let found = ldap::fetch_object(l, object)
            .map_err(|e| LoadError::Ldap(s.name.clone(), e))?
            .ok_or_else(|| fail(format!("{object}: no such object in the directory")))?;
        if found.base.is_none() {
            return Err(fail(format!(
                "{} is not under any of the source's base_dns: a sync never reads it",
                found.entry.dn
            )));
        }
        if !found.matches_filter {
            return Err(fail(format!(
                "{}: the source's filter does not select it: a sync never reads it",
                found.entry.dn
            )));
        }
        let file: Arc<str> = Arc::from(l.url.as_str());
        let m = crate::sources::ad::map_entry(
            &found.entry,
            &file,
            &crate::sources::ad::AdOptions {
                include_disabled: l.include_disabled,
            },
        );
        let Some((mut data, at, mark)) = self.ldap_cache.remove(&s.name) else {
            return Err(fail(format!(
                "{source} has not been synced yet: the first sync reads every object"
            )));
        };
        let dn = found.entry.dn.to_ascii_lowercase();
        let same =
            |d: &Option<Box<str>>| d.as_deref().is_some_and(|x| x.to_ascii_lowercase() == dn);
        data.entries.retain(|e| !same(&e.dn));
        data.diagnostics.retain(|d| !same(&d.dn));
        data.excluded
            .retain(|x| !x.origin.to_ascii_lowercase().ends_with(&format!("({dn})")));
        let addresses: Vec<String> = m
            .entries
            .iter()
            .map(|e| crate::sources::join_key(&e.local, &e.domain))
            .collect();
        data.entries.extend(m.entries);
        data.diagnostics.extend(m.diagnostics);
        data.excluded.extend(m.excluded);
        self.ldap_cache.insert(s.name.clone(), (data, at, mark));
        info!(
            source,
            dn = %found.entry.dn,
            addresses = addresses.len(),
            "{source}: provisioned {} on demand ({} address(es)); rebuilding",
            found.entry.dn,
            addresses.len()
        );
        self.force_full = true;
        let outcome = self.rebuild()?;
        Ok((outcome, addresses))
    }

    /// Provision on demand for a Graph source: the object goes into the source's kept
    /// objects (as a delta sync would put it) and the build runs.
    fn provision_graph(
        &mut self,
        s: &crate::config::SourceConfig,
        g: &graph::GraphConfig,
        object: &str,
    ) -> Result<(Outcome, Vec<String>), LoadError> {
        let fail = |m: String| LoadError::Graph(s.name.clone(), graph::GraphError::Config(m));
        let (key, o) = graph::fetch_object(g, object)
            .map_err(|e| LoadError::Graph(s.name.clone(), e))?
            .ok_or_else(|| fail(format!("{object}: no such user or group in the tenant")))?;
        if let Some(why) = graph::excluded(&key, &o, g) {
            return Err(fail(format!("{key}: {why}: a sync leaves it out")));
        }
        let Some((_, at, Some(LiveMark::Delta(mut mark)))) = self.ldap_cache.remove(&s.name) else {
            return Err(fail(format!(
                "{} has not been synced yet: the first sync reads every object",
                s.name
            )));
        };
        mark.objects.insert(key.clone(), o);
        let name: Arc<str> = Arc::from(s.name.as_str());
        let (data, _) = graph::build_data(&name, g, &mark.objects);
        let addresses: Vec<String> = data
            .entries
            .iter()
            .filter(|e| e.dn.as_deref().is_some_and(|d| d.starts_with(key.as_str())))
            .map(|e| crate::sources::join_key(&e.local, &e.domain))
            .collect();
        self.save_graph_state(&s.name, &mark);
        self.ldap_cache
            .insert(s.name.clone(), (data, at, Some(LiveMark::Delta(mark))));
        info!(
            source = %s.name,
            object = %key,
            addresses = addresses.len(),
            "{}: provisioned {key} on demand ({} address(es)); rebuilding",
            s.name,
            addresses.len()
        );
        self.force_full = true;
        let outcome = self.rebuild()?;
        Ok((outcome, addresses))
    }

    /// Where a Graph source's delta links and objects are kept across restarts: next to the
    /// snapshot (none without a snapshot path).
    fn graph_state_path(&self, source: &str) -> Option<std::path::PathBuf> {
        let snap = self.cfg.snapshot.as_ref()?;
        let mut p = snap.clone().into_os_string();
        p.push(format!(".graph-{source}.json"));
        Some(p.into())
    }

    fn load_graph_state(&self, source: &str) -> Option<graph::DeltaMark> {
        let path = self.graph_state_path(source)?;
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<graph::DeltaMark>(&text) {
            Ok(m) => {
                info!(source, path = %path.display(), "{source}: continuing from the delta links of the last run");
                Some(m)
            }
            Err(e) => {
                warn!(source, path = %path.display(), error = %e, "{}: unreadable ({e}); a full sync instead", path.display());
                None
            }
        }
    }

    fn save_graph_state(&self, source: &str, m: &graph::DeltaMark) {
        let Some(path) = self.graph_state_path(source) else {
            return;
        };
        if m.users.is_none() {
            let _ = std::fs::remove_file(&path);
            return;
        }
        let r = serde_json::to_vec(m)
            .map_err(|e| e.to_string())
            .and_then(|b| crate::directory::write_atomic(&path, &b).map_err(|e| e.to_string()));
        if let Err(e) = r {
            warn!(source, path = %path.display(), error = %e, "{}: not written ({e}); a restart will sync in full", path.display());
        }
    }

    /// Remember how an LDAP source was last synced (for `status`).
    fn note_sync(&mut self, source: &str, kind: &str, time: u64, addresses: usize, changed: u64) {
        self.syncs.insert(
            source.to_owned(),
            SourceSync {
                source: source.to_owned(),
                kind: kind.into(),
                time,
                addresses: addresses as u64,
                changed,
            },
        );
    }

    /// Put the LDAP sources' data back into the cache.
    fn give_back(&mut self, data: Vec<SourceData>, back: Vec<Back>) {
        for (d, from) in data.into_iter().zip(back) {
            if let Some((name, at, mark)) = from {
                self.ldap_cache.insert(name, (d, at, mark));
            }
        }
    }

    /// Read a file source, as [`Self::read_sources`] does.
    fn load_file(&self, s: &crate::config::SourceConfig) -> Result<SourceData, LoadError> {
        let mut d = sources::load(s.format, &s.path)?;
        finish_source(&mut d, s);
        Ok(d)
    }

    /// Keep and log a build's diagnostics and conflicts (all of them for `status`); its
    /// errors and warnings.
    fn note_diagnostics(&mut self, d: Diagnosed) -> (usize, usize) {
        // A summary, not every diagnostic again at every sync (`status` shows them).
        if d.total > 0 {
            warn!(
                errors = d.errors,
                warnings = d.warnings,
                conflicts = d.conflicts,
                first = ?&d.lines[..d.lines.len().min(LOGGED_DIAGNOSTICS)],
                "build diagnostics: {} error(s), {} warning(s), {} conflict(s) (rcptgate status shows them)",
                d.errors,
                d.warnings,
                d.conflicts
            );
        }
        self.diagnostics = (d.total, d.lines);
        (d.errors, d.warnings)
    }

    fn try_rebuild(&mut self, sync_all: bool) -> Result<Outcome, LoadError> {
        // Segmented mode: a failed build must not leave the files' new stamps behind (the
        // next build would take them for built), whether the incremental build or the full
        // one failed.
        let saved = self.cfg.segments.then(|| self.summaries.clone());
        let outcome = self.build_and_publish(sync_all);
        if let (Err(_), Some(saved)) = (&outcome, saved) {
            self.summaries = saved;
        }
        // What a build of every source read and merged is freed now; without this the
        // allocator keeps it (every worker thread's arena) and the process holds a full
        // build's worth of memory beside the directory in service for good. (Not after an
        // incremental build: what it freed is small and taken again by the next one, and a
        // trim walks the whole heap.)
        if std::mem::take(&mut self.read_all) {
            release_free_memory();
        }
        let outcome = outcome?;
        let (name, r) = match &outcome {
            Outcome::Published(r) => ("published", r),
            Outcome::Unchanged(r) => ("unchanged", r),
            Outcome::Held(r) => ("held", r),
        };
        self.last_build = Some(BuildSummary {
            outcome: name.into(),
            generation: self.dir.generation().unwrap_or(r.generation),
            addresses: r.addresses,
            added: r.plan.added,
            removed: r.plan.removed,
            tombstoned: r.plan.tombstoned,
            tombstones: r.plan.tombstones,
            time: (self.clock)(),
        });
        Ok(outcome)
    }

    fn build_and_publish(&mut self, sync_all: bool) -> Result<Outcome, LoadError> {
        // Segmented mode: the changed files' groups, or every group one after another
        // (SIGHUP and sync, or no summaries of what the set was built from).
        let forced = std::mem::take(&mut self.force_full);
        if self.cfg.segments && !forced {
            let unknown = self
                .cfg
                .sources
                .iter()
                .any(|s| !self.summaries.contains_key(&s.name));
            if let Some(outcome) = self.try_incremental(sync_all || unknown)? {
                return Ok(outcome);
            }
        }
        // Segmented mode: each file's stamp before it is read (a change while it is read
        // shows at the next build).
        let stamps: Vec<Option<segmented::Stamp>> = if self.cfg.segments {
            self.cfg
                .sources
                .iter()
                .map(|s| segmented::stamp(&s.path))
                .collect()
        } else {
            Vec::new()
        };
        self.read_all = true;
        let (data, data_time, back) = self.read_sources(sync_all)?;
        if self.cfg.segments {
            for ((s, d), st) in self.cfg.sources.iter().zip(&data).zip(stamps) {
                let live = s.ldap.is_some() || s.graph.is_some();
                let sum = segmented::Summary::of(d, if live { None } else { st });
                self.summaries.insert(s.name.clone(), sum);
            }
        }
        // Without a snapshot in service, generations go on from the last publish.
        let after_last = self.state.last_publish.map_or(1, |l| l.generation + 1);
        let (in_service, generation) = self
            .dir
            .view()
            .snapshot()
            .map_or((0, after_last), |s| (s.record_count(), s.generation() + 1));
        let mut merged = merge::merge(&data, generation);
        let (errors, warnings) = self.note_diagnostics(Diagnosed::of(&data, &merged));
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
        // The persisted snapshot is gone but the state says what was in service: a first
        // build that removes too much of that is held (nothing in service: every answer is a
        // temporary failure, nothing is bounced) until approved.
        if old.is_none()
            && !std::mem::take(&mut self.approve_lost)
            && let Some(last) = self.state.last_publish
            && let Some(reason) = lost_snapshot_hold(&self.cfg.guard, last, live as u64)
        {
            let report = Report {
                generation,
                plan: Plan {
                    state: self.state.clone(),
                    live_before: last.live,
                    removed: last.live.saturating_sub(live as u64),
                    hold: true,
                    ..Plan::default()
                },
                addresses: live as u64,
                live: live as u64,
                domains: merged.input.domains.len() as u32,
                conflicts: merged.conflicts.len(),
                errors,
                warnings,
                approved: false,
                data_time,
            };
            drop(view);
            warn!(
                generation = last.generation,
                live = last.live,
                new = live,
                "{reason}; nothing published until rcptgate approve"
            );
            let since = self.held.as_ref().map_or(now, |h| h.since);
            self.held = Some(Held {
                report: report.clone(),
                since,
                lost: Some(reason),
            });
            return Ok(Outcome::Held(report));
        }
        let approved = std::mem::take(&mut self.approved);
        let plan = lifecycle::plan_approved(
            old,
            &mut merged.input,
            &self.state,
            now,
            &self.cfg.guard,
            self.adopt_orphans,
            &approved,
        );
        let conflicts = std::mem::take(&mut merged.conflicts);
        let live_now = live_records(&merged.input);
        // The build, its size, and whether it has the content in service already.
        type Load = Box<dyn FnOnce() -> Result<Snapshot, LoadError>>;
        let (load, addresses, domains, same): (Load, u64, u32, bool) = if self.cfg.segments {
            // One segment per group of sources; a domain only the guard keeps goes with the
            // first group.
            let sums = self.summaries_in_order().unwrap_or_default();
            let images = segmented::build_segments(std::mem::take(&mut merged.input), &sums, 0)?;
            let parts = segmented::load_segments(images)?;
            let set = Snapshot::assemble(parts, generation, now)?;
            let same = old.is_some_and(|o| o.content_digest() == set.content_digest());
            let (a, d) = (set.record_count(), set.domain_count());
            (Box::new(move || Ok(set)), a, d, same)
        } else {
            let (bytes, stats) = directory::build(merged.input)?;
            let same = old.is_some_and(|o| {
                Snapshot::digest_of(&bytes).is_ok_and(|d| d == o.content_digest())
            });
            let load = move || -> Result<Snapshot, LoadError> {
                Snapshot::verify(&bytes)?;
                Ok(Snapshot::from_bytes(bytes)?)
            };
            (
                Box::new(load),
                stats.records as u64,
                stats.domains as u32,
                same,
            )
        };
        drop(view);
        let approved_now = !approved.is_empty() && plan.approved > 0;
        let report = Report {
            generation,
            plan,
            addresses,
            live: live_now,
            domains,
            conflicts: conflicts.len(),
            errors,
            warnings,
            approved: approved_now,
            data_time,
        };
        self.conflicts = conflicts;
        self.finish_build(load, report, same, now)
    }

    /// Hold bookkeeping, then publish the build (`snap` makes it; not called when `same`:
    /// the snapshot in service stays).
    fn finish_build(
        &mut self,
        snap: impl FnOnce() -> Result<Snapshot, LoadError>,
        report: Report,
        same: bool,
        now: u64,
    ) -> Result<Outcome, LoadError> {
        let hold = report.plan.hold;
        // A held build does not count as fresh data (max_age goes on counting).
        let fresh = (!hold).then_some(report.data_time);
        if hold {
            let since = self.held.as_ref().map_or(now, |h| h.since);
            self.held = Some(Held {
                report: report.clone(),
                since,
                lost: None,
            });
        } else {
            self.held = None;
        }
        if same {
            if report.plan.state != self.state {
                if let Some(p) = &self.cfg.guard.state {
                    report.plan.state.save(p)?;
                }
                self.state = report.plan.state.clone();
            }
            self.adopt_orphans = false;
            self.set_fresh(fresh);
            return Ok(if hold {
                Outcome::Held(report)
            } else {
                Outcome::Unchanged(report)
            });
        }
        let report = self.publish_snapshot(snap()?, report, fresh)?;
        Ok(if hold {
            Outcome::Held(report)
        } else {
            Outcome::Published(report)
        })
    }

    /// Write the state, then the snapshot in service; remember why if that fails.
    fn persist(&mut self) {
        let r = (|| -> Result<(), LoadError> {
            if let Some(p) = &self.cfg.guard.state {
                self.state.save(p)?;
            }
            if let Some(path) = &self.cfg.snapshot {
                let view = self.dir.view();
                match view.snapshot() {
                    // Only the segments not on disk yet, then the index.
                    Some(set) if set.is_set() => {
                        directory::segments::write(path, set)?;
                        self.save_summaries(path, set.generation());
                    }
                    Some(snap) => {
                        if let Some(image) = snap.image() {
                            directory::write_atomic(path, image)?;
                            // The segments of a set this file replaced.
                            let parts = directory::segments::parts_dir(path);
                            if parts.is_dir() {
                                let _ = std::fs::remove_dir_all(parts);
                            }
                        }
                    }
                    None => {}
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                if self.persist_error.take().is_some() {
                    info!("snapshot and state written to disk again");
                }
                self.reopen_persisted();
            }
            Err(e) => {
                error!(
                    error = %e,
                    "persisting failed: {e}; the new snapshot is in service from memory, and writing is retried"
                );
                self.persist_error = Some(e.to_string());
            }
        }
    }

    /// Serve the snapshot just written from its file: hot sections in memory (the FST in huge
    /// pages), cold sections read on demand, instead of the whole build image. The same
    /// generation; if the file cannot be read back, the image stays in service.
    fn reopen_persisted(&mut self) {
        let Some(path) = self.cfg.snapshot.as_deref() else {
            return;
        };
        let Some(generation) = self.dir.generation() else {
            return;
        };
        let dir = self.dir.clone();
        let reopened = match dir.view().snapshot() {
            // A set: only its segments built in memory are opened from their files.
            Some(set) if set.is_set() => directory::segments::reopen(path, set),
            _ => Snapshot::open(path),
        };
        match reopened {
            Ok(snap) if snap.generation() == generation => {
                drop(self.dir.publish(Arc::new(snap)));
            }
            Ok(snap) => warn!(
                path = %path.display(),
                "{} holds generation {}, not {generation}; serving the build from memory",
                path.display(),
                snap.generation()
            ),
            Err(e) => warn!(
                path = %path.display(),
                error = %e,
                "reading back {}: {e}; serving the build from memory",
                path.display()
            ),
        }
    }

    /// True while the snapshot or state in service is not on disk.
    pub fn persist_pending(&self) -> bool {
        self.persist_error.is_some()
    }

    /// Try again to write the state and the snapshot in service.
    pub fn retry_persist(&mut self) {
        if self.persist_error.is_some() {
            self.persist();
        }
    }

    /// Record in the directory when the data in service was read.
    fn set_fresh(&self, data_time: Option<u64>) {
        if let Some(t) = data_time {
            self.dir.set_data_time(t);
        }
    }

    /// Approve the removals the guard holds: rebuild now, with those removals allowed (a
    /// build that removes more than was approved, beyond the limits, is held again).
    pub fn approve(&mut self) -> Result<Report, LoadError> {
        let held = self.held.take().ok_or(LoadError::NothingHeld)?;
        self.approved = held.report.plan.held_removals.iter().cloned().collect();
        self.approve_lost = held.lost.is_some();
        let r = self.rebuild();
        self.approved.clear();
        self.approve_lost = false;
        match r {
            Ok(Outcome::Published(r) | Outcome::Unchanged(r) | Outcome::Held(r)) => Ok(r),
            Err(e) => {
                // Nothing changed: the removals are still held.
                self.held = Some(held);
                Err(e)
            }
        }
    }

    /// Put the snapshot in service and persist it with its state. The state is written first
    /// and the snapshot only after it: a restart that finds the new state beside the old
    /// snapshot plans the same removals again, with the same removal times, while the other
    /// way round it would forget tombstones. A persist that fails (disk full) does not hold
    /// back the publish: the build goes in service from memory, status and metrics say the
    /// disk is behind, and [`Self::retry_persist`] tries again.
    fn publish_snapshot(
        &mut self,
        snap: Snapshot,
        report: Report,
        fresh: Option<u64>,
    ) -> Result<Report, LoadError> {
        let mut state = report.plan.state.clone();
        state.last_publish = Some(lifecycle::LastPublish {
            generation: report.generation,
            live: report.live,
        });
        self.state = state;
        self.adopt_orphans = false;
        let old = self.dir.publish(Arc::new(snap));
        self.set_fresh(fresh);
        // Drop the old snapshot here, off the request path.
        drop(old);
        self.persist();
        let event = if report.plan.hold {
            "held"
        } else if report.approved {
            "approved"
        } else {
            "publish"
        };
        self.audit.write(&self.audit_line(event, &report));
        info!(
            generation = report.generation,
            addresses = report.addresses,
            domains = report.domains,
            conflicts = report.conflicts,
            errors = report.errors,
            warnings = report.warnings,
            removed = report.plan.removed,
            tombstoned = report.plan.tombstoned,
            expired = report.plan.expired,
            tombstones = report.plan.tombstones,
            held_removals = report.plan.held_removals.len(),
            approved = report.approved,
            "published generation {}: {} addresses, {} domains{}",
            report.generation,
            report.addresses,
            report.domains,
            if report.plan.hold {
                " (removals held by the deletion guard)"
            } else if report.approved {
                " (approved)"
            } else {
                ""
            }
        );
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
            "held_removals": r.plan.held_removals.len(),
            "added_sample": r.plan.added_sample,
            "removed_sample": r.plan.removed_sample,
            "expired_sample": r.plan.expired_sample,
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
        }
        if let Some(p) = &self.cfg.guard.state {
            next.save(p)?;
        }
        self.state = next;
        self.force_full = true;
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
        }
        if let Some(p) = &self.cfg.guard.state {
            next.save(p)?;
        }
        self.state = next;
        Ok(())
    }

    /// Everything `rcptgate status` shows (the service adds what runs now and the counters).
    pub fn status(&self) -> Status {
        let now = (self.clock)();
        let view = self.dir.view();
        let snap = view.snapshot();
        let held = self.held.as_ref().map(|h| HeldStatus {
            generation: h.report.generation,
            since: h.since,
            reason: h
                .lost
                .clone()
                .unwrap_or_else(|| h.report.plan.hold_reason(&self.cfg.guard)),
            addresses_in_service: h.report.plan.live_before,
            // After a lost snapshot the removals are counted against the last publish; they
            // have no names (the snapshot that had them is gone).
            removed: if h.lost.is_some() {
                h.report.plan.removed
            } else {
                h.report.plan.held_removals.len() as u64
            },
            added: h.report.plan.added,
            removed_sample: h
                .report
                .plan
                .held_removals
                .iter()
                .take(SAMPLE)
                .cloned()
                .collect(),
        });
        Status {
            time: now,
            generation: snap.map(|s| s.generation()),
            addresses: snap.map(|s| s.record_count()),
            domains: snap.map(|s| s.domain_count()),
            segments: snap.filter(|s| s.is_set()).map(Snapshot::segment_count),
            snapshot_age: snap.map(|s| now.saturating_sub(s.created_unix())),
            data_age: self.dir.data_time().map(|t| now.saturating_sub(t)),
            stale: self.dir.is_stale(),
            tombstones: self.state.tombstones.len(),
            conflicts: self.conflicts.len(),
            last_error: self.last_error.clone(),
            diagnostics: self.diagnostics.0,
            diagnostic_lines: self.diagnostics.1.clone(),
            held,
            last_build: self.last_build.clone(),
            persist_error: self.persist_error.clone(),
            syncs: self.syncs.values().cloned().collect(),
            ..Status::default()
        }
    }

    /// Tombstones (with time left) and conflicting claims.
    pub fn conflicts_view(&self) -> Conflicts {
        let now = (self.clock)();
        let grace = self.cfg.guard.deletion_grace.as_secs();
        Conflicts {
            tombstones: self
                .state
                .tombstones
                .iter()
                .map(|(a, t)| TombstoneView {
                    address: a.clone(),
                    removed: t.removed,
                    left: t.left(now, grace),
                    keep: t.keep,
                    kind: t.kind.clone(),
                    route: t.route.clone(),
                    profile: t.profile.clone(),
                })
                .collect(),
            claims: self
                .conflicts
                .iter()
                .map(|c| Claim {
                    address: c.address.clone(),
                    kept_owner: c.kept_owner.clone(),
                    kept_origin: c.kept_origin.clone(),
                    dropped_owner: c.dropped_owner.clone(),
                    dropped_origin: c.dropped_origin.clone(),
                    rule: c.rule.to_owned(),
                })
                .collect(),
        }
    }
}

/// Give the heap's free pages back to the system (glibc's `malloc_trim`: each arena, the
/// pool threads' included, returns the whole pages it holds free). Under another global
/// allocator (the daemon's mimalloc, which returns freed pages by itself after a short
/// delay) glibc's arenas hold next to nothing and this is cheap.
///
/// The crate's one `unsafe` block (a foreign call).
#[allow(unsafe_code)]
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and only walks glibc's own arenas under their
    // locks; it is safe to call from any thread at any time (memory allocated by another
    // allocator is not glibc's and is left alone).
    unsafe {
        libc::malloc_trim(0);
    }
}
