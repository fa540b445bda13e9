//! The `rcptgate` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};

use rcptgate::directory::{self, Directory, LookupOptions, Snapshot, Verdict};
use rcptgate::sources::{self, Severity, SourceData, SourceError};
use rcptgate::sync::{Merged, merge};

#[derive(Parser, Debug)]
#[command(
    name = "rcptgate",
    version,
    about = "Recipient validation for SMTP gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a snapshot file from sources (FORMAT:PATH or PATH; format from the extension:
    /// .map, .csv, .ldif/.ldf, anything else is a Postfix table).
    Compile {
        #[arg(required = true)]
        sources: Vec<String>,
        /// Where to write the snapshot (atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Generation number stored in the snapshot.
        #[arg(long, default_value_t = 1)]
        generation: u64,
    },
    /// Lint sources: invalid addresses, conflicts, missing trailer, each with its location.
    /// Exits non-zero when there are errors.
    Check {
        #[arg(required = true)]
        sources: Vec<String>,
    },
    /// Answer for addresses, from a snapshot file or from sources built in memory:
    /// `lookup --snapshot FILE ADDRESS...` or `lookup SOURCE... ADDRESS...` (leading
    /// arguments that name existing files are sources).
    Lookup {
        /// Snapshot file to read (instead of sources).
        #[arg(long)]
        snapshot: Option<PathBuf>,
        /// One JSON object per address.
        #[arg(long)]
        json: bool,
        /// Subaddress separators ("" disables subaddressing).
        #[arg(long, default_value = "+")]
        separators: String,
        /// [SOURCE...] ADDRESS...
        #[arg(required = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Addresses added and removed between two snapshots (or sources).
    Diff { old: String, new: String },
    /// Run the daemon: Postfix policy and socketmap services over the configured directory.
    /// SIGHUP rebuilds from the sources; SIGTERM finishes requests in flight and exits.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and exit (non-zero with the key and line on error).
    ConfigCheck {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// One full sync of the configured LDAP source(s), with progress and a summary;
    /// `--output FILE` writes the result as a MAP upload (so the sync can feed other
    /// gateways too).
    Sync {
        #[arg(long, short)]
        config: PathBuf,
        /// One full sync, then exit (the daemon syncs on its own schedule).
        #[arg(long)]
        once: bool,
        /// Only this source (by name).
        #[arg(long)]
        source: Option<String>,
        /// Write the addresses as a MAP file (atomically).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Customer ID for the MAP file.
        #[arg(long, default_value = "1")]
        customer: String,
    },
    /// Test the connection to each LDAP source step by step (resolve, connect, TLS and the
    /// server certificate with its expiry, bind, search per base DN, a few mapped entries),
    /// saying what to fix. Exit status 1 when a step fails.
    LdapTest {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this source (by name).
        #[arg(long)]
        source: Option<String>,
    },
    /// The running daemon's state: snapshot, tombstones, a build held by the deletion guard
    /// (with a sample of what it removes), the last error. Talks to `control.socket`.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Publish the build the deletion guard holds.
    Approve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The user conflicts view: tombstoned addresses (removal time, time left) and addresses
    /// claimed by two owners. Actions: `delete ADDRESS...` drops tombstones now, `keep
    /// ADDRESS...` keeps them until the address returns, `export` writes CSV.
    Conflicts {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<ConflictAction>,
    },
}

#[derive(Subcommand, Debug)]
enum ConflictAction {
    /// Drop these tombstones now: the addresses are rejected from the next publish on.
    Delete {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Never expire these tombstones (until the address returns or is deleted).
    Keep {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Tombstones and conflicting claims as CSV (to a file, or standard output).
    Export {
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile {
            sources,
            output,
            generation,
        } => compile(&sources, &output, generation),
        Command::Check { sources } => check(&sources),
        Command::Lookup {
            snapshot,
            json,
            separators,
            args,
        } => {
            let n = if snapshot.is_some() {
                0
            } else {
                args.iter().take_while(|a| names_file(a)).count()
            };
            let (srcs, addrs) = args.split_at(n);
            lookup(snapshot.as_deref(), srcs, json, &separators, addrs)
        }
        Command::Diff { old, new } => diff(&old, &new),
        Command::Serve { config } => serve(&config),
        Command::ConfigCheck { config } => rcptgate::config::Config::load(&config)
            .map(|c| {
                println!(
                    "{}: ok ({} source(s), {} policy and {} socketmap listener(s))",
                    config.display(),
                    c.sources.len(),
                    c.policy_listen.len(),
                    c.socketmap_listen.len()
                );
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Sync {
            config,
            once: _,
            source,
            output,
            customer,
        } => sync(&config, source.as_deref(), output.as_deref(), &customer),
        Command::LdapTest { config, source } => ldap_test(&config, source.as_deref()),
        Command::Status { config, json } => status(&config, json),
        Command::Approve { config } => approve(&config),
        Command::Conflicts {
            config,
            json,
            action,
        } => conflicts(&config, json, action),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rcptgate: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// True when `arg` is `PATH` or `FORMAT:PATH` of an existing file.
fn names_file(arg: &str) -> bool {
    let path = match arg.split_once(':') {
        Some((f, p)) if sources::Format::parse(f).is_some() => p,
        _ => arg,
    };
    Path::new(path).is_file()
}

/// Load every source; refused sources are returned separately (never half-used).
fn load_sources(specs: &[String]) -> (Vec<SourceData>, Vec<SourceError>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for spec in specs {
        match sources::load(spec) {
            Ok(s) => ok.push(s),
            Err(e) => refused.push(e),
        }
    }
    (ok, refused)
}

fn print_diagnostics(srcs: &[SourceData], merged: &Merged) -> (usize, usize) {
    let mut errors = 0;
    let mut warnings = 0;
    let all = srcs
        .iter()
        .flat_map(|s| s.diagnostics.iter())
        .chain(merged.diagnostics.iter());
    for d in all {
        match d.severity {
            Severity::Error => errors += 1,
            Severity::Warning => warnings += 1,
        }
        eprintln!("{d}");
    }
    for c in &merged.conflicts {
        eprintln!("conflict: {c}");
    }
    (errors, warnings)
}

/// Merge and build in memory.
fn build_from(
    specs: &[String],
    generation: u64,
    quiet: bool,
) -> Result<(Snapshot, directory::BuildStats, Merged)> {
    let (srcs, refused) = load_sources(specs);
    if let Some(e) = refused.first() {
        for e in &refused {
            eprintln!("{e}");
        }
        bail!("{} source(s) refused: {e}", refused.len());
    }
    let mut merged = merge(&srcs, generation);
    if !quiet {
        print_diagnostics(&srcs, &merged);
    }
    let input = std::mem::take(&mut merged.input);
    let (bytes, stats) = directory::build(input).context("building the snapshot")?;
    let snap = Snapshot::from_bytes(bytes).context("loading the built snapshot")?;
    Ok((snap, stats, merged))
}

fn compile(specs: &[String], output: &Path, generation: u64) -> Result<ExitCode> {
    let (srcs, refused) = load_sources(specs);
    for e in &refused {
        eprintln!("{e}");
    }
    if !refused.is_empty() {
        bail!("{} source(s) refused; nothing written", refused.len());
    }
    let t = Instant::now();
    let mut merged = merge(&srcs, generation);
    let (errors, warnings) = print_diagnostics(&srcs, &merged);
    let merge_time = t.elapsed();
    let input = std::mem::take(&mut merged.input);
    let (bytes, stats) = directory::build(input).context("building the snapshot")?;
    // Never write a file we cannot read back.
    Snapshot::from_bytes(bytes.clone()).context("verifying the built snapshot")?;
    directory::write_atomic(output, &bytes)?;
    let n = stats.records.max(1) as f64;
    println!("wrote {} ({} bytes)", output.display(), stats.file_bytes);
    println!("addresses:   {}", stats.records);
    println!("domains:     {}", stats.domains);
    println!("conflicts:   {}", merged.conflicts.len());
    println!("errors:      {errors} (entries skipped), warnings: {warnings}");
    println!(
        "fst:         {} bytes, {:.2} bytes/address ({} shard(s))",
        stats.fst_bytes,
        stats.fst_bytes as f64 / n,
        stats.shards
    );
    println!(
        "hot:         {} bytes, {:.2} bytes/address (what a verdict needs)",
        stats.hot_bytes,
        stats.hot_bytes as f64 / n
    );
    println!(
        "cold:        {} bytes, {:.2} bytes/address (owner, origin)",
        stats.cold_bytes,
        stats.cold_bytes as f64 / n
    );
    println!(
        "build time:  {:.1} ms (parse+merge {:.1} ms, sort {:.1} ms, fst {:.1} ms)",
        (merge_time + stats.total_time).as_secs_f64() * 1e3,
        merge_time.as_secs_f64() * 1e3,
        stats.sort_time.as_secs_f64() * 1e3,
        stats.fst_time.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}

fn check(specs: &[String]) -> Result<ExitCode> {
    let (srcs, refused) = load_sources(specs);
    for e in &refused {
        eprintln!("{e}");
    }
    let merged = merge(&srcs, 0);
    let (errors, warnings) = print_diagnostics(&srcs, &merged);
    let addresses = merged.input.records.len();
    let domains = merged.input.domains.len();
    let errors = errors + refused.len();
    println!(
        "{} source(s): {addresses} addresses, {domains} domains, {errors} error(s), {warnings} warning(s), {} conflict(s), {} refused",
        specs.len(),
        merged.conflicts.len(),
        refused.len()
    );
    Ok(if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn open_snapshot_or_sources(spec: &str) -> Result<Snapshot> {
    let path = Path::new(spec);
    let mut magic = [0u8; 8];
    let is_snapshot = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"RCPTGATE";
    if is_snapshot {
        Ok(Snapshot::open(path).with_context(|| format!("opening snapshot {spec}"))?)
    } else {
        Ok(build_from(&[spec.to_owned()], 0, true)?.0)
    }
}

fn lookup(
    snapshot: Option<&Path>,
    specs: &[String],
    json: bool,
    separators: &str,
    addresses: &[String],
) -> Result<ExitCode> {
    let dir = Directory::new(LookupOptions {
        separators: separators.as_bytes().into(),
    });
    match snapshot {
        Some(p) => {
            let snap =
                Snapshot::open(p).with_context(|| format!("opening snapshot {}", p.display()))?;
            dir.publish(Arc::new(snap));
        }
        None if !specs.is_empty() => {
            dir.publish(Arc::new(build_from(specs, 0, true)?.0));
        }
        // Nothing loaded: every answer is a temporary failure, as the daemon would give.
        None => {}
    }
    let view = dir.view();
    let mut out = std::io::stdout().lock();
    for input in addresses {
        let verdict = dir.lookup(input);
        let mut obj = Map::new();
        obj.insert("input".into(), json!(input));
        if let Ok(n) = rcptgate::address::normalize(input) {
            obj.insert("address".into(), json!(n));
        }
        obj.insert("verdict".into(), json!(verdict.name()));
        if let Some(code) = verdict.code() {
            obj.insert("code".into(), json!(code));
        }
        match verdict {
            Verdict::Accept(hit) => {
                obj.insert("kind".into(), json!(hit.kind.as_str()));
                if let Some(snap) = view.snapshot() {
                    if let Ok(Some(info)) = snap.record_info(input, &hit) {
                        // A primary address owns itself: the matched key, without a +detail.
                        let owner = info.owner.or_else(|| {
                            let addr = obj.get("address")?.as_str()?;
                            let (local, domain) = addr.rsplit_once('@')?;
                            let local = local.get(..usize::from(hit.local_len))?;
                            Some(format!("{local}@{domain}"))
                        });
                        if let Some(o) = owner {
                            obj.insert("owner".into(), json!(o));
                        }
                        obj.insert("origin".into(), json!(info.origin));
                        if let Some(a) = info.attributes {
                            obj.insert("attributes".into(), json!(a));
                        }
                    }
                    for (k, v) in [
                        ("customer", snap.customer(&hit)),
                        ("profile", snap.profile(&hit)),
                        ("route", snap.route(&hit)),
                    ] {
                        if let Some(v) = v {
                            obj.insert(k.into(), json!(v));
                        }
                    }
                }
                if hit.matched == directory::Match::Subaddress {
                    obj.insert("match".into(), json!("subaddress"));
                }
            }
            Verdict::Reject(directory::Reject::Syntax(e)) => {
                obj.insert("reason".into(), json!(e.to_string()));
            }
            Verdict::Reject(directory::Reject::Exception) => {
                obj.insert("kind".into(), json!("exception"));
                obj.insert(
                    "reason".into(),
                    json!("listed by an exceptions source: never accepted"),
                );
            }
            Verdict::Tempfail(_) | Verdict::Reject(_) | Verdict::NotOurs => {
                obj.insert("reason".into(), json!(verdict.text()));
            }
        }
        if json {
            writeln!(out, "{}", Value::Object(obj))?;
        } else {
            let mut line = format!("{input}: {}", verdict.name());
            if let Some(c) = verdict.code() {
                line.push_str(&format!(" {c}"));
            }
            for k in [
                "kind", "owner", "customer", "profile", "route", "origin", "reason",
            ] {
                if let Some(v) = obj.get(k).and_then(|v| v.as_str()) {
                    line.push_str(&format!(" {k}={v}"));
                }
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn diff(old: &str, new: &str) -> Result<ExitCode> {
    let a = open_snapshot_or_sources(old)?;
    let b = open_snapshot_or_sources(new)?;
    let mut out = std::io::stdout().lock();
    let (mut added, mut removed) = (0u64, 0u64);
    let mut failed = None;
    directory::diff(&a, &b, |c| {
        let line = match c {
            directory::Change::Added(x) => {
                added += 1;
                writeln!(out, "+ {x}")
            }
            directory::Change::Removed(x) => {
                removed += 1;
                writeln!(out, "- {x}")
            }
        };
        if let Err(e) = line {
            failed.get_or_insert(e);
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    writeln!(
        out,
        "{added} added, {removed} removed ({} -> {} addresses; {} -> {} bytes hot)",
        a.record_count(),
        b.record_count(),
        a.hot_bytes(),
        b.hot_bytes()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Log the outcome of a rebuild; true when the build was good (published or held).
fn log_rebuild(
    result: &Result<rcptgate::sync::loader::Outcome, rcptgate::sync::loader::LoadError>,
    guard: &rcptgate::config::GuardConfig,
) -> bool {
    use rcptgate::sync::loader::Outcome;
    match result {
        Ok(Outcome::Published(p)) => {
            eprintln!(
                "rcptgate: published generation {}: {} addresses, {} domains, {} conflicts, {} errors, {} warnings; {} removed, {} tombstoned, {} tombstones expired, {} in force{}",
                p.generation,
                p.addresses,
                p.domains,
                p.conflicts,
                p.errors,
                p.warnings,
                p.plan.removed,
                p.plan.tombstoned,
                p.plan.expired,
                p.plan.tombstones,
                if p.approved { " (approved)" } else { "" }
            );
            true
        }
        Ok(Outcome::Unchanged(p)) => {
            eprintln!(
                "rcptgate: no change: generation {} stays in service ({} addresses)",
                p.generation - 1,
                p.addresses
            );
            true
        }
        Ok(Outcome::Held(p)) => {
            eprintln!(
                "rcptgate: deletion guard: holding generation {}: it {}; the snapshot in service stays (rcptgate status shows it, rcptgate approve publishes it)",
                p.generation,
                p.plan.hold_reason(guard)
            );
            true
        }
        Err(e) => {
            eprintln!("rcptgate: rebuild failed, snapshot in service kept: {e}");
            false
        }
    }
}

/// Watch the directories of the configured source files; send on every event that names
/// one of them.
fn watch_sources(
    cfg: &rcptgate::config::Config,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let files: Vec<PathBuf> = cfg
        .sources
        .iter()
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
    })
    .context("starting the file watcher")?;
    let mut dirs: Vec<&Path> = files.iter().filter_map(|f| f.parent()).collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        watcher
            .watch(d, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", d.display()))?;
    }
    Ok(watcher)
}

fn serve(config: &Path) -> Result<ExitCode> {
    use rcptgate::proto::control::Command as Ctl;
    use rcptgate::server::{self, Context, Protocol};
    use rcptgate::sync::loader::{self, LoadError, Loader, Outcome};
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::signal::unix::{SignalKind, signal};

    let cfg = rcptgate::config::Config::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let dir = Arc::new(Directory::new(LookupOptions {
            separators: cfg.separators.as_bytes().into(),
        }));
        let loader = Loader::new(cfg.clone(), dir.clone(), loader::system_clock())
            .context("reading the tombstone state")?;
        // Answers are definitive at once when a persisted snapshot exists.
        match loader.open_persisted() {
            Ok(Some(g)) => eprintln!("rcptgate: serving persisted snapshot, generation {g}"),
            Ok(None) => eprintln!(
                "rcptgate: no persisted snapshot; temporary failures until the first build"
            ),
            Err(e) => eprintln!("rcptgate: persisted snapshot not used: {e}"),
        }
        let loader = Arc::new(std::sync::Mutex::new(loader));
        let metrics = Arc::new(rcptgate::server::metrics::Metrics::default());
        let ctx = Arc::new(Context {
            directory: dir.clone(),
            texts: cfg.texts.clone(),
            limits: cfg.limits.clone(),
            metrics: metrics.clone(),
        });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for (protocol, addrs) in [
            (Protocol::Policy, &cfg.policy_listen),
            (Protocol::Socketmap, &cfg.socketmap_listen),
        ] {
            for a in addrs {
                let (bound, task) =
                    server::bind_and_serve(a, protocol, ctx.clone(), stop_rx.clone())
                        .await
                        .with_context(|| format!("listening on {a}"))?;
                eprintln!(
                    "rcptgate: {} listening on {bound}",
                    match protocol {
                        Protocol::Policy => "policy",
                        Protocol::Socketmap => "socketmap",
                    }
                );
                tasks.push(task);
            }
        }
        if let Some(addr) = cfg.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            eprintln!("rcptgate: metrics listening on {}", l.local_addr()?);
            tasks.push(tokio::spawn(rcptgate::server::metrics::serve(
                l,
                metrics.clone(),
                dir.clone(),
                stop_rx.clone(),
            )));
        }
        let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel::<server::control::Request>(16);
        if let Some(path) = &cfg.control {
            let l = server::control::bind(path)
                .with_context(|| format!("control socket {}", path.display()))?;
            eprintln!("rcptgate: control socket {}", path.display());
            tasks.push(tokio::spawn(server::control::serve(
                l,
                ctl_tx.clone(),
                stop_rx.clone(),
            )));
        }
        drop(ctl_tx);
        // Every loader operation runs off the runtime, one at a time (the loader is the
        // single writer of the snapshot, the state file and the audit log).
        let with_loader = |f: Box<dyn FnOnce(&mut Loader) -> Value + Send>| {
            let loader = loader.clone();
            tokio::task::spawn_blocking(move || match loader.lock() {
                Ok(mut l) => f(&mut l),
                Err(_) => json!({"ok": false, "error": "internal error: loader poisoned"}),
            })
        };
        let update_gauges = |l: &Loader| {
            metrics.tombstones.store(l.state().tombstones.len() as u64, Relaxed);
            metrics.held.store(u64::from(l.held().is_some()), Relaxed);
            metrics
                .held_removals
                .store(l.held().map_or(0, |h| h.plan.removed), Relaxed);
        };
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Source files are watched through their directories, so a file replaced by rename,
        // written in place, created or deleted is noticed alike.
        let (changed_tx, mut changed) = tokio::sync::mpsc::unbounded_channel::<()>();
        let _watcher = watch_sources(&cfg, changed_tx)?;
        // When the directory in service was built (for max_age).
        let built_at = std::cell::Cell::new(dir.view().snapshot().map(|s| s.created_unix()));
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let guard = cfg.guard.clone();
        // `sync_all`: sync every LDAP source now (SIGHUP), not only those due.
        let rebuild = async |why: &str, sync_all: bool| -> Result<()> {
            eprintln!("rcptgate: {why}: rebuilding");
            let guard = guard.clone();
            let counters = metrics.clone();
            let r = with_loader(Box::new(move |l: &mut Loader| {
                let r = if sync_all { l.rebuild_synced() } else { l.rebuild() };
                // Counted before it is logged, so whoever reads the log sees it counted.
                match &r {
                    Ok(_) => counters.reloads_ok.fetch_add(1, Relaxed),
                    Err(_) => counters.reloads_failed.fetch_add(1, Relaxed),
                };
                let good = log_rebuild(&r, &guard);
                // max_age counts from when the data in service was read.
                let since = match &r {
                    Ok(Outcome::Published(p) | Outcome::Unchanged(p)) => Some(p.data_time),
                    _ => None,
                };
                json!({"good": good, "since": since})
            }))
            .await?;
            if r["good"] == json!(true) {
                built_at.set(Some(r["since"].as_u64().unwrap_or_else(now)));
            }
            Ok(())
        };
        rebuild("start", false).await?;
        let expiry_tried = std::cell::Cell::new(0u64);
        let sync_tried = std::cell::Cell::new(now());
        let retry_gap = cfg
            .sources
            .iter()
            .filter(|s| s.ldap.is_some())
            .map(|s| s.interval.as_secs())
            .min()
            .unwrap_or(60)
            .min(60);
        if let Ok(l) = loader.lock() {
            update_gauges(&l);
        }
        let mut settle: Option<tokio::time::Instant> = None;
        // Often enough for max_age, tombstone expiry and the shortest LDAP interval.
        let mut tick = tokio::time::interval(
            cfg.sources
                .iter()
                .filter(|s| s.ldap.is_some())
                .map(|s| s.interval / 2)
                .chain(cfg.max_age.map(|m| m / 4))
                .chain([std::time::Duration::from_secs(10)])
                .min()
                .unwrap_or(std::time::Duration::from_secs(10))
                .max(std::time::Duration::from_millis(100)),
        );
        loop {
            tokio::select! {
                _ = hup.recv() => rebuild("SIGHUP", true).await?,
                // Debounce: every change moves the deadline; signals stay served meanwhile.
                Some(()) = changed.recv() => {
                    settle = Some(tokio::time::Instant::now() + cfg.debounce);
                }
                _ = async { if let Some(at) = settle { tokio::time::sleep_until(at).await } }, if settle.is_some() => {
                    settle = None;
                    rebuild("source changed", false).await?;
                }
                Some((cmd, reply)) = ctl_rx.recv() => {
                    let guard = cfg.guard.clone();
                    let answer = with_loader(Box::new(move |l: &mut Loader| {
                        let err = |e: LoadError| json!({"ok": false, "error": e.to_string()});
                        match cmd {
                            Ctl::Status => {
                                let mut s = l.status();
                                s["ok"] = json!(true);
                                s
                            }
                            Ctl::Conflicts => {
                                let mut s = l.conflicts_json();
                                s["ok"] = json!(true);
                                s
                            }
                            Ctl::Approve => match l.approve() {
                                Ok(r) => {
                                    log_rebuild(&Ok(Outcome::Published(r.clone())), &guard);
                                    json!({"ok": true, "generation": r.generation, "removed": r.plan.removed})
                                }
                                Err(e) => err(e),
                            },
                            Ctl::Delete(a) => match l.delete_tombstones(&a) {
                                Ok(o) => {
                                    log_rebuild(&Ok(o), &guard);
                                    json!({"ok": true, "deleted": a})
                                }
                                Err(e) => err(e),
                            },
                            Ctl::Keep(a) => match l.keep_tombstones(&a) {
                                Ok(()) => json!({"ok": true, "kept": a}),
                                Err(e) => err(e),
                            },
                        }
                    })).await?;
                    let _ = reply.send(answer);
                }
                _ = tick.tick() => {
                    let stale = match (cfg.max_age, built_at.get()) {
                        (Some(max), Some(at)) => now().saturating_sub(at) > max.as_secs(),
                        _ => false,
                    };
                    if stale != dir.is_stale() {
                        dir.set_stale(stale);
                        eprintln!("rcptgate: {}", if stale {
                            "no successful build for longer than max_age: unknown recipients are now deferred (4xx)"
                        } else {
                            "directory fresh again: unknown recipients are rejected (550)"
                        });
                    }
                    // A tombstone's grace ran out: rebuild so it stops being accepted (at most
                    // once a minute while such rebuilds fail or are held).
                    let due = loader.lock().ok().and_then(|l| l.next_expiry()).is_some_and(|t| t <= now());
                    if due && now() >= expiry_tried.get() + 60 {
                        expiry_tried.set(now());
                        rebuild("tombstone grace period over", false).await?;
                    }
                    // An LDAP source's interval is up (at most one attempt a minute while
                    // syncs fail; the snapshot in service stays meanwhile).
                    let sync = loader.lock().is_ok_and(|l| l.sync_due());
                    if sync && now() >= sync_tried.get() + retry_gap {
                        sync_tried.set(now());
                        rebuild("directory sync due", false).await?;
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
            if let Ok(l) = loader.lock() {
                update_gauges(&l);
            }
        }
        eprintln!("rcptgate: shutting down: finishing requests in flight");
        stop.send(true).ok();
        for t in tasks {
            t.await??;
        }
        if let Some(path) = &cfg.control {
            let _ = std::fs::remove_file(path);
        }
        eprintln!("rcptgate: stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Send one command to the running daemon named by `config`; its answer, or why not.
fn control(config: &Path, cmd: &rcptgate::proto::control::Command) -> Result<Value> {
    let cfg = rcptgate::config::Config::load(config)?;
    let Some(path) = cfg.control else {
        bail!(
            "{}: no control socket configured (set [control] socket = \"/run/rcptgate/control.sock\")",
            config.display()
        );
    };
    let answer = rcptgate::server::control::request(&path, cmd).with_context(|| {
        format!(
            "talking to the daemon on {} (is `rcptgate serve` running, and are you its user?)",
            path.display()
        )
    })?;
    if answer["ok"] != json!(true) {
        bail!(
            "{}",
            answer["error"]
                .as_str()
                .unwrap_or("the daemon refused the command")
        );
    }
    Ok(answer)
}

fn when(unix: u64) -> String {
    let d = unix / 86_400;
    let (h, m, s) = (unix % 86_400 / 3600, unix % 3600 / 60, unix % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}Z")
}

fn span(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}m {}s", s / 60, s % 60),
    }
}

fn status(config: &Path, as_json: bool) -> Result<ExitCode> {
    let s = control(config, &rcptgate::proto::control::Command::Status)?;
    if as_json {
        println!("{s}");
        return Ok(ExitCode::SUCCESS);
    }
    let n = |k: &str| s[k].as_u64().map_or("-".to_owned(), |v| v.to_string());
    println!(
        "generation {}: {} addresses, {} domains, built {} ago{}",
        n("generation"),
        n("addresses"),
        n("domains"),
        s["snapshot_age"].as_u64().map_or("-".into(), span),
        if s["stale"] == json!(true) {
            " (STALE: unknown recipients are deferred)"
        } else {
            ""
        }
    );
    println!(
        "tombstones: {}, conflicting claims: {}",
        n("tombstones"),
        n("conflicts")
    );
    if let Some(e) = s["last_error"].as_str() {
        println!("last rebuild failed: {e}");
    }
    let h = &s["held"];
    if h.is_object() {
        println!(
            "HELD by the deletion guard since {}: generation {} {}",
            h["since"].as_u64().map_or("-".into(), when),
            h["generation"],
            h["reason"].as_str().unwrap_or("")
        );
        println!("  {} added; removes, among others:", h["added"]);
        for a in h["removed_sample"]
            .as_array()
            .into_iter()
            .flatten()
            .take(20)
        {
            println!("    {}", a.as_str().unwrap_or(""));
        }
        println!(
            "  publish it with: rcptgate approve --config {}",
            config.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn approve(config: &Path) -> Result<ExitCode> {
    let a = control(config, &rcptgate::proto::control::Command::Approve)?;
    println!(
        "published generation {} ({} addresses removed)",
        a["generation"], a["removed"]
    );
    Ok(ExitCode::SUCCESS)
}

fn conflicts(config: &Path, as_json: bool, action: Option<ConflictAction>) -> Result<ExitCode> {
    use rcptgate::proto::control::Command as Ctl;
    // Addresses as the directory stores them (normalized, case folded).
    let keys = |list: Vec<String>| -> Vec<String> {
        list.into_iter()
            .map(|a| match sources::directory_address(&a) {
                Ok((local, domain)) => sources::join_key(&local, &domain),
                Err(_) => a,
            })
            .collect()
    };
    match action {
        Some(ConflictAction::Delete { addresses }) => {
            control(config, &Ctl::Delete(keys(addresses)))?;
            println!("deleted; the addresses are rejected from now on");
            return Ok(ExitCode::SUCCESS);
        }
        Some(ConflictAction::Keep { addresses }) => {
            control(config, &Ctl::Keep(keys(addresses)))?;
            println!("kept until the addresses return to the directory or are deleted");
            return Ok(ExitCode::SUCCESS);
        }
        Some(ConflictAction::Export { output }) => {
            let c = control(config, &Ctl::Conflicts)?;
            let mut w = csv_writer(output.as_deref())?;
            w.write_record([
                "type",
                "address",
                "removed",
                "left_seconds",
                "keep",
                "kind",
                "route",
                "owner",
                "origin",
                "other_owner",
                "other_origin",
                "rule",
            ])?;
            let s = |v: &Value| match v {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            for t in c["tombstones"].as_array().into_iter().flatten() {
                let removed = t["removed"].as_u64().map(when).unwrap_or_default();
                w.write_record([
                    "tombstone".into(),
                    s(&t["address"]),
                    removed,
                    s(&t["left"]),
                    s(&t["keep"]),
                    s(&t["kind"]),
                    s(&t["route"]),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ])?;
            }
            for k in c["claims"].as_array().into_iter().flatten() {
                w.write_record([
                    "claim".into(),
                    s(&k["address"]),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    s(&k["kept_owner"]),
                    s(&k["kept_origin"]),
                    s(&k["dropped_owner"]),
                    s(&k["dropped_origin"]),
                    s(&k["rule"]),
                ])?;
            }
            w.flush()?;
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let c = control(config, &Ctl::Conflicts)?;
    if as_json {
        println!("{c}");
        return Ok(ExitCode::SUCCESS);
    }
    let tombs = c["tombstones"].as_array().cloned().unwrap_or_default();
    println!(
        "{} tombstoned address(es) (removed from the directory, still accepted):",
        tombs.len()
    );
    for t in &tombs {
        let left = match t["left"].as_u64() {
            Some(l) => format!("{} left", span(l)),
            None => "kept".into(),
        };
        println!(
            "  {}  removed {}  {}  was {}{}",
            t["address"].as_str().unwrap_or(""),
            t["removed"].as_u64().map(when).unwrap_or_default(),
            left,
            t["kind"].as_str().unwrap_or(""),
            t["route"]
                .as_str()
                .map(|r| format!(", route {r}"))
                .unwrap_or_default()
        );
    }
    let claims = c["claims"].as_array().cloned().unwrap_or_default();
    println!("{} address(es) claimed by two owners:", claims.len());
    for k in &claims {
        println!(
            "  {}: kept {} ({}), dropped {} ({}): {}",
            k["address"].as_str().unwrap_or(""),
            k["kept_owner"].as_str().unwrap_or(""),
            k["kept_origin"].as_str().unwrap_or(""),
            k["dropped_owner"].as_str().unwrap_or(""),
            k["dropped_origin"].as_str().unwrap_or(""),
            k["rule"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn csv_writer(output: Option<&Path>) -> Result<csv::Writer<Box<dyn Write>>> {
    let out: Box<dyn Write> = match output {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout()),
    };
    Ok(csv::Writer::from_writer(out))
}

fn sync(
    config: &Path,
    only: Option<&str>,
    output: Option<&Path>,
    customer: &str,
) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let cfg = rcptgate::config::Config::load(config)?;
    let picked: Vec<_> = cfg
        .sources
        .iter()
        .filter(|s| s.ldap.is_some() && only.is_none_or(|n| n == s.name))
        .collect();
    if picked.is_empty() {
        bail!(
            "{}: no LDAP source{}",
            config.display(),
            only.map(|n| format!(" named {n:?}")).unwrap_or_default()
        );
    }
    if output.is_some() && picked.len() > 1 {
        bail!("--output writes one source: pick it with --source NAME");
    }
    let tty = std::io::stderr().is_terminal();
    for s in picked {
        let Some(l) = &s.ldap else { continue };
        let name: Arc<str> = Arc::from(s.name.as_str());
        eprintln!(
            "rcptgate: {}: syncing {} ({} base DN(s))",
            s.name,
            l.url,
            l.bases.len()
        );
        let mut last_line = Instant::now();
        let mut last = sources::ldap::Progress::default();
        let data = sources::ldap::fetch(&name, l, |p| {
            last = p;
            let rate = p.entries as f64 / p.elapsed.as_secs_f64().max(1e-3);
            let line = format!(
                "  {} entries, {} pages, {:.0} entries/s, {:.1} s",
                p.entries,
                p.pages,
                rate,
                p.elapsed.as_secs_f64()
            );
            if tty {
                eprint!("\r{line}   ");
            } else if p.pages == 1 || last_line.elapsed().as_secs() >= 2 {
                eprintln!("{line}");
                last_line = Instant::now();
            }
        })
        .with_context(|| format!("source {}", s.name))?;
        if tty {
            eprintln!();
        }
        let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
        for e in &data.entries {
            *kinds.entry(e.kind.as_str()).or_default() += 1;
        }
        let mut domains: Vec<&str> = data.entries.iter().map(|e| e.domain.as_str()).collect();
        domains.sort_unstable();
        domains.dedup();
        for d in &data.diagnostics {
            eprintln!("rcptgate: {d}");
        }
        println!(
            "{}: {} entries in {} page(s), {:.1} s: {} addresses in {} domain(s) ({}); {} diagnostics",
            s.name,
            last.entries,
            last.pages,
            last.elapsed.as_secs_f64(),
            data.entries.len(),
            domains.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            data.diagnostics.len()
        );
        if let Some(out) = output {
            let text = sources::mapfile::write(&data, customer, &s.domains);
            directory::write_atomic(out, text.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ldap_test(config: &Path, only: Option<&str>) -> Result<ExitCode> {
    use rcptgate::sources::ldap_check::{self, Status};
    let cfg = rcptgate::config::Config::load(config)?;
    let mut failed = false;
    let mut any = false;
    for s in cfg
        .sources
        .iter()
        .filter(|s| only.is_none_or(|n| n == s.name))
    {
        let Some(l) = &s.ldap else { continue };
        any = true;
        println!("{} ({}):", s.name, l.url);
        for step in ldap_check::run(l) {
            let tag = match step.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => {
                    failed = true;
                    "FAIL"
                }
            };
            println!("  {tag}  {:<12} {}", step.name, step.detail);
            if let Some(f) = step.fix {
                println!("        fix: {f}");
            }
        }
    }
    if !any {
        bail!("{}: no LDAP source to test", config.display());
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
