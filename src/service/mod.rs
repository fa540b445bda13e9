//! The directory as a running service: started from a [`Config`] on the caller's tokio
//! runtime, it loads the persisted snapshot, rebuilds when a source file changes, syncs LDAP
//! sources on their interval, expires tombstones, refreshes data before `max_age` runs out,
//! keeps the audit log, and answers control operations through its [`Handle`].
//!
//! Nothing on the serving path waits for it: lookups go to the [`Directory`] (lock-free),
//! while every rebuild and sync runs as a blocking task, one at a time. The service's own
//! loop keeps answering status requests and shutdown while a two-minute LDAP sync runs. A
//! rebuild that panics is caught and logged; the snapshot in service stays.
//!
//! The service reads no signals and prints nothing: it logs through `tracing`, and the
//! caller decides what SIGHUP or SIGTERM mean ([`Handle::sync`], [`Handle::shutdown`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = rcptgate::Config::load("config/rcptgate.toml".as_ref())?;
//! let service = rcptgate::Service::start(config).await?;
//! let answer = service.directory().lookup("alice@contoso.com");
//! println!("{} via {:?}", answer.verdict().name(), answer.route());
//! service.shutdown().await;
//! # Ok(()) }
//! ```

pub mod time;
pub mod types;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::directory::{Clock, Directory, LookupOptions, system_clock};
use crate::proto::control::Command;
use crate::server::metrics::Metrics;
use crate::sync::loader::{LoadError, Loader, Outcome, Report};
pub use types::{
    Approved, BuildSummary, Claim, Conflicts, HeldStatus, Rebuilt, Reply, Running, SourceSync,
    Status, TombstoneView,
};

/// Why the service could not start, or an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The tombstone state could not be read (starting without it would forget removal
    /// times).
    #[error("{0}")]
    Load(#[from] LoadError),
    /// The source files cannot be watched.
    #[error("watching the source files: {0}")]
    Watch(#[from] notify::Error),
    /// The service has stopped.
    #[error("the service has stopped")]
    Stopped,
    /// The `[dane]` resolver cannot be built (a bad trust anchor, no name servers).
    #[error("DANE: {0}")]
    Dane(String),
    /// The operation ran and failed (the snapshot in service stays).
    #[error("{0}")]
    Failed(String),
}

/// Starts the service; see the [module documentation](self).
#[derive(Debug)]
pub struct Service;

impl Service {
    /// Start the service with the system clock and its own metrics. Must be called from
    /// within a tokio runtime (the service's tasks are spawned on it). Returns once the
    /// persisted snapshot (if any) is in service; the first build runs in the background
    /// ([`Handle::reload`] waits for one).
    pub async fn start(config: Config) -> Result<Handle, ServiceError> {
        Service::builder(config).start().await
    }

    /// A service with a clock or metrics of the caller's.
    pub fn builder(config: Config) -> Builder {
        Builder {
            config,
            clock: None,
            metrics: None,
        }
    }
}

/// Options for [`Service::builder`].
pub struct Builder {
    config: Config,
    clock: Option<Clock>,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// The clock for tombstones, `max_age` and schedules (tests move it).
    pub fn clock(mut self, clock: Clock) -> Builder {
        self.clock = Some(clock);
        self
    }

    /// Counters and gauges to update (the daemon shares them with its listeners).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Builder {
        self.metrics = Some(metrics);
        self
    }

    /// Start; see [`Service::start`].
    pub async fn start(self) -> Result<Handle, ServiceError> {
        let cfg = self.config;
        let clock = self.clock.unwrap_or_else(system_clock);
        let metrics = self.metrics.unwrap_or_default();
        let dir = Arc::new(Directory::with_clock(
            LookupOptions {
                separators: cfg.separators.as_bytes().into(),
                always_accept: cfg.always_accept.clone(),
            },
            clock.clone(),
        ));
        dir.set_max_age(cfg.max_age);
        let dane = match &cfg.dane {
            None => None,
            Some(d) => {
                let engine = crate::dane::Dane::new(d.clone())
                    .map_err(|e| ServiceError::Dane(e.to_string()))?;
                let _ = metrics.dane.set(engine.clone());
                Some(engine)
            }
        };
        let mut loader = Loader::new(cfg.clone(), dir.clone(), clock)?;
        // Answers are definitive at once when a persisted snapshot exists.
        match loader.open_persisted() {
            Ok(Some(g)) => info!(generation = g, "serving persisted snapshot, generation {g}"),
            Ok(None) => {
                info!("no persisted snapshot; temporary failures until the first build")
            }
            Err(e) => warn!(error = %e, "persisted snapshot not used: {e}"),
        }
        let (events_tx, events) = mpsc::unbounded_channel();
        let watcher = watch_sources(&cfg, events_tx)?;
        // Unbounded: messages are small, and a signal must never be dropped; every job that
        // waits is one entry (rebuild requests merge).
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Shared {
            loader: Arc::new(Mutex::new(loader)),
            cache: Arc::default(),
            metrics: metrics.clone(),
            dir: dir.clone(),
            dane: dane.clone().filter(|d| d.config().warm_routes),
        };
        // The cache and the gauges as the persisted snapshot left them.
        shared.after_job();
        let listeners = Arc::new(Mutex::new(Vec::new()));
        let actor = Actor {
            cfg,
            listeners: listeners.clone(),
            shared,
            rx,
            events,
            _watcher: watcher,
            running: None,
            queue: Vec::new(),
        };
        let task = tokio::spawn(actor.run());
        tx.send(Msg::Rebuild {
            reason: "start".into(),
            sync_all: false,
            reply: None,
        })
        .map_err(|_| ServiceError::Stopped)?;
        Ok(Handle {
            dir,
            dane,
            metrics,
            listeners,
            tx,
            task: Arc::new(tokio::sync::Mutex::new(Some(task))),
        })
    }
}

/// The running service. Cheap to clone; every clone talks to the same service.
#[derive(Debug, Clone)]
pub struct Handle {
    dir: Arc<Directory>,
    dane: Option<crate::dane::Dane>,
    metrics: Arc<Metrics>,
    /// What the program running the service listens on (for `status`).
    listeners: Arc<Mutex<Vec<String>>>,
    tx: mpsc::UnboundedSender<Msg>,
    task: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Handle {
    /// The directory in service: hand it to every frontend; lookups on it never wait.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.dir
    }

    /// The DANE engine, when `[dane]` is configured: hand it to the socketmap listeners.
    pub fn dane(&self) -> Option<&crate::dane::Dane> {
        self.dane.as_ref()
    }

    /// The outbound TLS policy of a next hop (`example.com`, `[mx.example.com]:587`), as
    /// `smtp_tls_policy_maps` would get it: from the decision cache, else resolved (one
    /// resolution for every concurrent caller, bounded by `decision_timeout`). `None` when
    /// no `[dane]` section is configured.
    pub async fn tls_policy(&self, next_hop: &str) -> Option<crate::dane::PolicyAnswer> {
        Some(self.dane.as_ref()?.policy(next_hop.as_bytes()).await)
    }

    /// The service's counters and gauges.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Say what the program listens on (`policy 127.0.0.1:10040`); `status` lists it, so
    /// tools find a port that was bound as `:0`.
    pub fn announce_listener(&self, label: String) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(label);
    }

    /// Rebuild now, as a changed source file would (LDAP sources only when due), and wait
    /// for the result. Requests that arrive while a rebuild waits to start share it.
    pub async fn reload(&self) -> Result<Rebuilt, ServiceError> {
        self.rebuild("reload", false).await
    }

    /// Rebuild with a full sync of every LDAP source now (what SIGHUP means to the daemon).
    pub async fn sync(&self) -> Result<Rebuilt, ServiceError> {
        self.rebuild("sync", true).await
    }

    async fn rebuild(&self, reason: &str, sync_all: bool) -> Result<Rebuilt, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Rebuild {
                reason: reason.into(),
                sync_all,
                reply: Some(reply),
            })
            .map_err(|_| ServiceError::Stopped)?;
        rx.await
            .map_err(|_| ServiceError::Stopped)?
            .map_err(ServiceError::Failed)
    }

    /// Start a rebuild with a full sync and return at once (what the daemon does on
    /// SIGHUP); it joins a rebuild that waits to start.
    pub fn request_sync(&self, reason: &str) -> Result<(), ServiceError> {
        self.tx
            .send(Msg::Rebuild {
                reason: reason.into(),
                sync_all: true,
                reply: None,
            })
            .map_err(|_| ServiceError::Stopped)
    }

    /// The state of the service; answered at once, even while a sync runs.
    pub async fn status(&self) -> Result<Status, ServiceError> {
        match self.control(Command::Status).await {
            Reply::Status(s) => Ok(*s),
            other => Err(unexpected(other)),
        }
    }

    /// Tombstones and conflicting claims (what `rcptgate conflicts` and its CSV export
    /// show).
    pub async fn conflicts(&self) -> Result<Conflicts, ServiceError> {
        match self.control(Command::Conflicts).await {
            Reply::Conflicts(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Approve the removals the deletion guard holds.
    pub async fn approve(&self) -> Result<Approved, ServiceError> {
        match self.control(Command::Approve).await {
            Reply::Approved(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    /// Drop these tombstones now (addresses as the directory stores them).
    pub async fn delete(&self, addresses: Vec<String>) -> Result<(), ServiceError> {
        match self.control(Command::Delete(addresses)).await {
            Reply::Deleted { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Keep these tombstones until their address returns or they are deleted.
    pub async fn keep(&self, addresses: Vec<String>) -> Result<(), ServiceError> {
        match self.control(Command::Keep(addresses)).await {
            Reply::Kept { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Run one control command and return its typed reply (what the control socket
    /// sends).
    pub async fn control(&self, command: Command) -> Reply {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Control { command, reply }).is_err() {
            return Reply::Error {
                message: "the service has stopped".into(),
            };
        }
        rx.await.unwrap_or_else(|_| Reply::Error {
            message: "the service has stopped".into(),
        })
    }

    /// Stop: no new rebuilds start; one that runs gets a few seconds to finish, then is
    /// left to end on its own (it never publishes half a snapshot). The directory keeps
    /// answering from the snapshot in service for as long as it is held.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

fn unexpected(reply: Reply) -> ServiceError {
    match reply {
        Reply::Error { message } => ServiceError::Failed(message),
        other => ServiceError::Failed(format!("unexpected reply {other:?}")),
    }
}

/// What the handle asks of the service's loop.
enum Msg {
    Rebuild {
        reason: String,
        sync_all: bool,
        reply: Option<oneshot::Sender<Result<Rebuilt, String>>>,
    },
    Control {
        command: Command,
        reply: oneshot::Sender<Reply>,
    },
    Shutdown,
}

/// One unit of work on the loader.
enum Job {
    Rebuild {
        reason: String,
        sync_all: bool,
        waiters: Vec<oneshot::Sender<Result<Rebuilt, String>>>,
    },
    Control {
        op: LoaderOp,
        reply: oneshot::Sender<Reply>,
    },
}

/// A control operation that changes the loader.
#[derive(Debug)]
enum LoaderOp {
    /// Write the snapshot and state in service that a full disk kept in memory.
    Persist,
    Approve,
    Delete(Vec<String>),
    Keep(Vec<String>),
    /// Fetch one LDAP object now and publish it: (source, object).
    Provision(String, String),
}

/// What the blocking tasks share with the loop.
#[derive(Clone)]
struct Shared {
    /// The single writer of the snapshot, the state file and the audit log; locked only by
    /// the one job that runs.
    loader: Arc<Mutex<Loader>>,
    /// Status and conflicts as of the last job, so status never waits for a sync.
    cache: Arc<Mutex<(Status, Conflicts)>>,
    metrics: Arc<Metrics>,
    dir: Arc<Directory>,
    /// Resolves the routes' next hops after each rebuild (when `warm_routes`).
    dane: Option<crate::dane::Dane>,
}

impl Shared {
    /// Resolve the TLS policy of every route next hop in the snapshot ahead of mail.
    fn warm_dane(&self) {
        let Some(dane) = &self.dane else {
            return;
        };
        let view = self.dir.view();
        let Some(snap) = view.snapshot() else {
            return;
        };
        let targets: Vec<_> = snap
            .routes()
            .into_iter()
            .filter_map(crate::dane::route_target)
            .collect();
        dane.warm(targets);
    }

    /// Refresh the cached views and the gauges from the loader.
    fn after_job(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let l = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        let (status, conflicts) = (l.status(), l.conflicts_view());
        self.metrics
            .tombstones
            .store(status.tombstones as u64, Relaxed);
        self.metrics
            .held
            .store(u64::from(status.held.is_some()), Relaxed);
        self.metrics
            .held_removals
            .store(status.held.as_ref().map_or(0, |h| h.removed), Relaxed);
        self.metrics
            .persist_pending
            .store(u64::from(status.persist_error.is_some()), Relaxed);
        drop(l);
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = (status, conflicts);
    }

    /// Run `f` on the loader, catching a panic (the snapshot in service stays).
    fn with_loader<T>(&self, what: &str, f: impl FnOnce(&mut Loader) -> T) -> Result<T, String> {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut l = self.loader.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut l)
        }));
        let r = r.map_err(|p| {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            error!(panic = %why, "internal error: {what} panicked; the snapshot in service stays");
            format!("internal error: {what} panicked: {why}")
        });
        self.after_job();
        r
    }

    fn run(&self, job: Job) {
        use std::sync::atomic::Ordering::Relaxed;
        match job {
            Job::Rebuild {
                reason,
                sync_all,
                waiters,
            } => {
                info!(reason = %reason, sync_all, "{reason}: rebuilding");
                let r = self
                    .with_loader("rebuild", |l| {
                        if sync_all {
                            l.rebuild_synced()
                        } else {
                            l.rebuild()
                        }
                    })
                    .and_then(|r| r.map_err(|e| e.to_string()));
                // Counted before it is logged, so whoever reads the log sees it counted.
                match &r {
                    Ok(_) => self.metrics.reloads_ok.fetch_add(1, Relaxed),
                    Err(_) => self.metrics.reloads_failed.fetch_add(1, Relaxed),
                };
                let answer = r.map(|o| self.log_outcome(&o));
                if answer.is_ok() {
                    self.warm_dane();
                }
                if let Err(e) = &answer {
                    if self.dir.generation().is_some() {
                        error!(error = %e, "rebuild failed, snapshot in service kept: {e}");
                    } else {
                        error!(error = %e, "rebuild failed, nothing in service (temporary failures): {e}");
                    }
                }
                for w in waiters {
                    let _ = w.send(answer.clone());
                }
            }
            Job::Control { op, reply } => {
                let answer = self.control(op);
                let _ = reply.send(answer);
            }
        }
    }

    /// Log a rebuild's outcome and say it in a typed form.
    fn log_outcome(&self, o: &Outcome) -> Rebuilt {
        match o {
            Outcome::Published(r) => Rebuilt::Published {
                generation: r.generation,
                addresses: r.addresses,
            },
            Outcome::Unchanged(r) => {
                let generation = self.dir.generation().unwrap_or(r.generation);
                info!(
                    generation,
                    addresses = r.addresses,
                    "no change: generation {generation} stays in service"
                );
                Rebuilt::Unchanged { generation }
            }
            Outcome::Held(r) => {
                let generation = self.dir.generation().unwrap_or(r.generation);
                let removed = r.plan.held_removals.len() as u64;
                let guard = self
                    .loader
                    .lock()
                    .map(|l| r.plan.hold_reason(&l.config().guard))
                    .unwrap_or_default();
                warn!(
                    generation,
                    removed,
                    "deletion guard: holding the removals of generation {}: it {guard}; its additions and changes are in service (rcptgate status shows the removals, rcptgate approve applies them)",
                    r.generation
                );
                Rebuilt::Held {
                    generation,
                    removed,
                }
            }
        }
    }

    fn control(&self, op: LoaderOp) -> Reply {
        let out = match op {
            LoaderOp::Persist => self.with_loader("persist", |l| {
                l.retry_persist();
                Ok::<_, LoadError>(Reply::Rebuilt(Rebuilt::Unchanged {
                    generation: l.directory().generation().unwrap_or(0),
                }))
            }),
            LoaderOp::Approve => self.with_loader("approve", |l| {
                l.approve().map(|r: Report| {
                    Reply::Approved(Approved {
                        generation: l.directory().generation().unwrap_or(r.generation),
                        removed: r.plan.approved,
                    })
                })
            }),
            LoaderOp::Delete(a) => self.with_loader("delete", |l| {
                l.delete_tombstones(&a)
                    .map(|_| Reply::Deleted { addresses: a })
            }),
            LoaderOp::Keep(a) => self.with_loader("keep", |l| {
                l.keep_tombstones(&a).map(|_| Reply::Kept { addresses: a })
            }),
            LoaderOp::Provision(source, object) => self.with_loader("provision", |l| {
                l.provision(&source, &object).map(|(o, addresses)| {
                    let generation = match &o {
                        Outcome::Published(r) | Outcome::Held(r) => r.generation,
                        Outcome::Unchanged(r) => l.directory().generation().unwrap_or(r.generation),
                    };
                    Reply::Provisioned {
                        generation,
                        addresses,
                    }
                })
            }),
        };
        match out {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Reply::Error {
                message: e.to_string(),
            },
            Err(e) => Reply::Error { message: e },
        }
    }
}

/// Seconds between attempts to write a snapshot a full disk kept in memory.
const PERSIST_RETRY: u64 = 10;

/// The service's loop: the only owner of the job queue.
struct Actor {
    cfg: Config,
    listeners: Arc<Mutex<Vec<String>>>,
    shared: Shared,
    rx: mpsc::UnboundedReceiver<Msg>,
    events: mpsc::UnboundedReceiver<()>,
    /// Kept alive for as long as the loop runs.
    _watcher: notify::RecommendedWatcher,
    /// The job on the loader now: its task, what it is, since when.
    running: Option<(JoinHandle<()>, Running)>,
    /// Jobs waiting for the loader, in order; at most one rebuild waits (requests merge).
    queue: Vec<Job>,
}

impl Actor {
    fn now(&self) -> u64 {
        (self.shared.dir.clock())()
    }

    async fn run(mut self) {
        let mut settle: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When each scheduled kind of rebuild was last tried (Unix seconds).
        let (mut expiry_tried, mut sync_tried, mut refresh_tried) = (0u64, self.now(), 0u64);
        let mut persist_tried = 0u64;
        let retry_gap = self
            .cfg
            .sources
            .iter()
            .filter(|s| s.ldap.is_some() || s.graph.is_some())
            .map(|s| s.interval.as_secs())
            .min()
            .unwrap_or(60)
            .clamp(1, 60);
        loop {
            self.start_next();
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    None | Some(Msg::Shutdown) => break,
                    Some(Msg::Rebuild { reason, sync_all, reply }) => {
                        self.enqueue_rebuild(reason, sync_all, reply);
                    }
                    Some(Msg::Control { command, reply }) => self.control(command, reply),
                },
                Some(()) = self.events.recv() => {
                    // Debounce: every change moves the deadline.
                    settle = Some(tokio::time::Instant::now() + self.cfg.debounce);
                }
                _ = async { if let Some(at) = settle { tokio::time::sleep_until(at).await } }, if settle.is_some() => {
                    settle = None;
                    self.enqueue_rebuild("source changed".into(), false, None);
                }
                _ = async {
                    if let Some((task, _)) = &mut self.running {
                        let _ = task.await;
                    }
                }, if self.running.is_some() => {
                    self.running = None;
                }
                _ = tick.tick() => {
                    let now = self.now();
                    let (expiry, sync_due, data_time, persist) = match self.shared.loader.try_lock() {
                        Ok(l) => (l.next_expiry(), l.sync_due(), l.data_time(), l.persist_pending()),
                        // A job runs: look again at the next tick.
                        Err(_) => continue,
                    };
                    // The disk was full: write what is in service again, every 10 s.
                    if persist && now >= persist_tried + PERSIST_RETRY && self.queue.is_empty() {
                        persist_tried = now;
                        let (reply, _) = oneshot::channel();
                        self.queue.push(Job::Control { op: LoaderOp::Persist, reply });
                    }
                    // A tombstone's grace ran out: rebuild so it stops being accepted (at
                    // most once a minute while such rebuilds fail or are held).
                    if expiry.is_some_and(|t| t <= now) && now >= expiry_tried + 60 {
                        expiry_tried = now;
                        self.enqueue_rebuild("tombstone grace period over".into(), false, None);
                    }
                    // An LDAP source's interval is up.
                    if sync_due && now >= sync_tried + retry_gap {
                        sync_tried = now;
                        self.enqueue_rebuild("directory sync due".into(), false, None);
                    }
                    // Data half as old as max_age: read the sources again, so files that do
                    // not change stay fresh, and sources that fail are noticed in time.
                    if let (Some(max), Some(at)) = (self.cfg.max_age, data_time) {
                        let gap = (max.as_secs() / 24).max(60).min(max.as_secs() / 4);
                        if now >= at.saturating_add(max.as_secs() / 2) && now >= refresh_tried + gap {
                            refresh_tried = now;
                            self.enqueue_rebuild("refresh before max_age".into(), false, None);
                        }
                    }
                }
            }
        }
        self.stop().await;
    }

    /// Queue a rebuild, merging it into one already waiting.
    fn enqueue_rebuild(
        &mut self,
        reason: String,
        sync_all: bool,
        reply: Option<oneshot::Sender<Result<Rebuilt, String>>>,
    ) {
        for job in &mut self.queue {
            if let Job::Rebuild {
                sync_all: s,
                waiters,
                ..
            } = job
            {
                *s |= sync_all;
                waiters.extend(reply);
                return;
            }
        }
        self.queue.push(Job::Rebuild {
            reason,
            sync_all,
            waiters: reply.into_iter().collect(),
        });
    }

    /// Status and conflicts from the cache at once; everything else waits its turn.
    fn control(&mut self, command: Command, reply: oneshot::Sender<Reply>) {
        match command {
            Command::Status => {
                let _ = reply.send(Reply::Status(Box::new(self.status())));
            }
            Command::Conflicts => {
                let c = self
                    .shared
                    .cache
                    .lock()
                    .map(|c| c.1.clone())
                    .unwrap_or_default();
                let _ = reply.send(Reply::Conflicts(c));
            }
            Command::Reload => {
                let (tx, rx) = oneshot::channel();
                self.enqueue_rebuild("reload".into(), false, Some(tx));
                tokio::spawn(async move {
                    let r = match rx.await {
                        Ok(Ok(r)) => Reply::Rebuilt(r),
                        Ok(Err(e)) => Reply::Error { message: e },
                        Err(_) => Reply::Error {
                            message: "the service has stopped".into(),
                        },
                    };
                    let _ = reply.send(r);
                });
            }
            Command::Explain(addresses) => {
                let dir = self.shared.dir.clone();
                let audit = self.cfg.audit.clone();
                tokio::task::spawn_blocking(move || {
                    let view = dir.view();
                    let r = match view.snapshot() {
                        None => Reply::Error {
                            message:
                                "no snapshot in service yet: every answer is a temporary failure"
                                    .into(),
                        },
                        Some(snap) => {
                            let mut explanations: Vec<_> = addresses
                                .iter()
                                .map(|a| {
                                    let mut e = snap.explain(a, dir.options());
                                    if dir.is_stale() && e.verdict == "reject" {
                                        e.step = format!(
                                            "7: the data is older than max_age: unknown addresses are deferred (else {})",
                                            e.step
                                        );
                                        e.verdict = "tempfail".into();
                                    }
                                    e
                                })
                                .collect();
                            if let Some(cfg) = &audit {
                                let asked: Vec<&str> = explanations
                                    .iter()
                                    .map(|e| e.address.as_deref().unwrap_or(""))
                                    .collect();
                                let histories = crate::sync::audit_history(cfg, &asked);
                                for (e, h) in explanations.iter_mut().zip(histories) {
                                    if e.address.is_some() {
                                        e.history = h;
                                    }
                                }
                            }
                            Reply::Explained { explanations }
                        }
                    };
                    let _ = reply.send(r);
                });
            }
            Command::Approve => self.queue.push(Job::Control {
                op: LoaderOp::Approve,
                reply,
            }),
            Command::Delete(a) => self.queue.push(Job::Control {
                op: LoaderOp::Delete(a),
                reply,
            }),
            Command::Provision(source, object) => self.queue.push(Job::Control {
                op: LoaderOp::Provision(source, object),
                reply,
            }),
            Command::Keep(a) => self.queue.push(Job::Control {
                op: LoaderOp::Keep(a),
                reply,
            }),
        }
    }

    fn status(&self) -> Status {
        use std::sync::atomic::Ordering::Relaxed;
        let mut s = self
            .shared
            .cache
            .lock()
            .map(|c| c.0.clone())
            .unwrap_or_default();
        // The snapshot's figures are those of the last finished job, so they agree with
        // `last_build`, `held` and the rest; only what time changes is read now.
        let now = self.now();
        s.snapshot_age = s
            .snapshot_age
            .map(|a| a.saturating_add(now.saturating_sub(s.time)));
        s.time = now;
        s.data_age = self.shared.dir.data_time().map(|t| now.saturating_sub(t));
        s.stale = self.shared.dir.is_stale();
        s.running = self.running.as_ref().map(|(_, r)| r.clone());
        s.listeners = self.listeners.lock().map(|l| l.clone()).unwrap_or_default();
        s.reloads_ok = self.shared.metrics.reloads_ok.load(Relaxed);
        s.reloads_failed = self.shared.metrics.reloads_failed.load(Relaxed);
        s
    }

    /// Start the next job when none runs.
    fn start_next(&mut self) {
        if self.running.is_some() || self.queue.is_empty() {
            return;
        }
        let job = self.queue.remove(0);
        let what = match &job {
            Job::Rebuild { reason, .. } => reason.clone(),
            Job::Control { op, .. } => format!("{op:?}").to_lowercase(),
        };
        let shared = self.shared.clone();
        let task = tokio::task::spawn_blocking(move || shared.run(job));
        self.running = Some((
            task,
            Running {
                reason: what,
                since: self.now(),
            },
        ));
    }

    /// Fail what waits; give a running job a few seconds.
    async fn stop(mut self) {
        for job in self.queue.drain(..) {
            match job {
                Job::Rebuild { waiters, .. } => {
                    for w in waiters {
                        let _ = w.send(Err("the service is shutting down".into()));
                    }
                }
                Job::Control { reply, .. } => {
                    let _ = reply.send(Reply::Error {
                        message: "the service is shutting down".into(),
                    });
                }
            }
        }
        if let Some((task, running)) = self.running.take()
            && tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
        {
            warn!(
                job = %running.reason,
                "shutting down while {} runs; it is left to finish on its own",
                running.reason
            );
        }
        info!("directory service stopped");
    }
}

/// Watch the directories of the configured source files; send on every event that names
/// one of them. Source files are watched through their directories, so a file replaced by
/// rename, written in place, created or deleted is noticed alike.
fn watch_sources(
    cfg: &Config,
    tx: mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::Watcher;
    let files: Vec<PathBuf> = cfg
        .sources
        .iter()
        .filter(|s| s.ldap.is_none() && s.graph.is_none())
        .filter_map(|s| std::path::absolute(&s.path).ok())
        .collect();
    let wanted = files.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Only changes count: reading a source (as every rebuild does) raises access events.
        use notify::event::{EventKind, ModifyKind};
        if let Ok(ev) = ev
            && matches!(
                ev.kind,
                EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(
                        ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any
                    )
            )
            && ev.paths.iter().any(|p| wanted.contains(p))
        {
            let _ = tx.send(());
        }
    })?;
    let mut dirs: Vec<&std::path::Path> = files.iter().filter_map(|f| f.parent()).collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        watcher.watch(d, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}
