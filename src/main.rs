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

/// Log the outcome of a rebuild; true when something was published.
fn log_rebuild(
    result: Result<rcptgate::sync::loader::Published, rcptgate::sync::loader::LoadError>,
) -> bool {
    match result {
        Ok(p) => {
            eprintln!(
                "rcptgate: published generation {}: {} addresses, {} domains, {} conflicts, {} errors, {} warnings",
                p.generation, p.addresses, p.domains, p.conflicts, p.errors, p.warnings
            );
            // One JSON audit line per publish.
            let audit = json!({
                "event": "publish",
                "time": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                "generation": p.generation,
                "addresses": p.addresses,
                "domains": p.domains,
                "conflicts": p.conflicts,
                "errors": p.errors,
                "warnings": p.warnings,
                "added": p.added,
                "removed": p.removed,
                "added_sample": p.added_sample,
                "removed_sample": p.removed_sample,
            });
            eprintln!("rcptgate: audit {audit}");
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
    use rcptgate::server::{self, Context, Protocol};
    use rcptgate::sync::loader;
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
        // Answers are definitive at once when a persisted snapshot exists.
        match loader::open_persisted(&cfg, &dir) {
            Ok(Some(g)) => eprintln!("rcptgate: serving persisted snapshot, generation {g}"),
            Ok(None) => eprintln!(
                "rcptgate: no persisted snapshot; temporary failures until the first build"
            ),
            Err(e) => eprintln!("rcptgate: persisted snapshot not used: {e}"),
        }
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
        let build = |cfg: rcptgate::config::Config, dir: Arc<Directory>| {
            tokio::task::spawn_blocking(move || loader::rebuild(&cfg, &dir))
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
        let rebuild = async |why: &str| -> Result<()> {
            eprintln!("rcptgate: {why}: rebuilding");
            if log_rebuild(build(cfg.clone(), dir.clone()).await?) {
                built_at.set(Some(now()));
                metrics.reloads_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                metrics.reloads_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        };
        rebuild("start").await?;
        let mut settle: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(
            cfg.max_age
                .map_or(std::time::Duration::from_secs(3600), |m| {
                    (m / 4).clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(10))
                }),
        );
        loop {
            tokio::select! {
                _ = hup.recv() => rebuild("SIGHUP").await?,
                // Debounce: every change moves the deadline; signals stay served meanwhile.
                Some(()) = changed.recv() => {
                    settle = Some(tokio::time::Instant::now() + cfg.debounce);
                }
                _ = async { if let Some(at) = settle { tokio::time::sleep_until(at).await } }, if settle.is_some() => {
                    settle = None;
                    rebuild("source changed").await?;
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
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        eprintln!("rcptgate: shutting down: finishing requests in flight");
        stop.send(true).ok();
        for t in tasks {
            t.await??;
        }
        eprintln!("rcptgate: stopped");
        Ok(ExitCode::SUCCESS)
    })
}
