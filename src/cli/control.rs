//! Commands that talk to the running daemon over its control socket: `status`, `approve`,
//! `reload`, `conflicts`. The daemon answers with the library's typed replies.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use rcptgate::proto::control::Command as Ctl;
use rcptgate::service::Reply;
use rcptgate::service::time::{span, when};
use rcptgate::sources;

use super::control_socket;

#[derive(Subcommand, Debug)]
pub enum ConflictAction {
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

/// Send one command to the running daemon named by `config`; its answer, or why not.
fn control(config: &Path, cmd: &Ctl) -> Result<Reply> {
    let path = control_socket(config)?;
    let answer = rcptgate::server::control::request(&path, cmd).with_context(|| {
        format!(
            "talking to the daemon on {} (is `rcptgate serve` running, and are you its user?)",
            path.display()
        )
    })?;
    match answer {
        Reply::Error { message } => bail!("{message}"),
        other => Ok(other),
    }
}

fn unexpected(r: Reply) -> anyhow::Error {
    anyhow::anyhow!("the daemon answered something else: {r:?}")
}

pub fn status(config: &Path, as_json: bool) -> Result<ExitCode> {
    let Reply::Status(s) = control(config, &Ctl::Status)? else {
        bail!("the daemon did not answer with a status");
    };
    if as_json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let n = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    println!(
        "generation {}: {} addresses, {} domains{}, built {} ago, data read {} ago{}",
        n(s.generation),
        n(s.addresses),
        n(s.domains.map(u64::from)),
        s.segments
            .map_or(String::new(), |k| format!(" in {k} segments")),
        s.snapshot_age.map_or("-".into(), span),
        s.data_age.map_or("-".into(), span),
        if s.stale {
            " (STALE: unknown recipients are deferred)"
        } else {
            ""
        }
    );
    if let Some(r) = &s.running {
        println!(
            "running: {} since {} ({})",
            r.reason,
            when(r.since),
            span(s.time.saturating_sub(r.since))
        );
    }
    println!(
        "tombstones: {}, conflicting claims: {}, rebuilds: {} ok, {} failed",
        s.tombstones, s.conflicts, s.reloads_ok, s.reloads_failed
    );
    if let Some(e) = &s.last_error {
        println!("last rebuild failed: {e}");
    }
    if s.diagnostics > 0 {
        println!("last build: {} diagnostic(s):", s.diagnostics);
        for d in &s.diagnostic_lines {
            println!("  {d}");
        }
        if s.diagnostics > s.diagnostic_lines.len() {
            println!(
                "  ... {} more (rcptgate check lists them all)",
                s.diagnostics - s.diagnostic_lines.len()
            );
        }
    }
    if let Some(h) = &s.held {
        println!(
            "REMOVALS HELD by the deletion guard since {} (generation {} is in service with its additions and changes): it {}",
            when(h.since),
            h.generation,
            h.reason
        );
        println!(
            "  {} added; {} removals wait, among them:",
            h.added, h.removed
        );
        for a in h.removed_sample.iter().take(20) {
            println!("    {a}");
        }
        println!(
            "  apply them with: rcptgate approve --config {}",
            config.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn approve(config: &Path) -> Result<ExitCode> {
    match control(config, &Ctl::Approve)? {
        Reply::Approved(a) => {
            println!(
                "generation {} in service ({} addresses removed)",
                a.generation, a.removed
            );
            Ok(ExitCode::SUCCESS)
        }
        other => Err(unexpected(other)),
    }
}

pub fn reload(config: &Path) -> Result<ExitCode> {
    match control(config, &Ctl::Reload)? {
        Reply::Rebuilt(r) => {
            println!("{}", serde_json::to_string(&r)?);
            Ok(ExitCode::SUCCESS)
        }
        other => Err(unexpected(other)),
    }
}

pub fn conflicts(config: &Path, as_json: bool, action: Option<ConflictAction>) -> Result<ExitCode> {
    // Addresses as the directory stores them (normalized, case folded).
    let keys = |list: Vec<String>| -> Vec<String> {
        list.into_iter()
            .map(|a| match sources::directory_address(&a) {
                Ok((local, domain)) => sources::join_key(&local, &domain),
                Err(_) => a,
            })
            .collect()
    };
    let list = |config: &Path| match control(config, &Ctl::Conflicts)? {
        Reply::Conflicts(c) => Ok(c),
        other => Err(unexpected(other)),
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
            let c = list(config)?;
            match output {
                Some(p) => c.write_csv(
                    std::fs::File::create(&p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )?,
                None => c.write_csv(std::io::stdout().lock())?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let c = list(config)?;
    if as_json {
        println!("{}", serde_json::to_string(&c)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} tombstoned address(es) (removed from the directory, still accepted):",
        c.tombstones.len()
    );
    for t in &c.tombstones {
        let left = match t.left {
            Some(l) => format!("{} left", span(l)),
            None => "kept".into(),
        };
        println!(
            "  {}  removed {}  {}  was {}{}",
            t.address,
            when(t.removed),
            left,
            t.kind,
            t.route
                .as_deref()
                .map(|r| format!(", route {r}"))
                .unwrap_or_default()
        );
    }
    println!("{} address(es) claimed by two owners:", c.claims.len());
    for k in &c.claims {
        println!(
            "  {}: kept {} ({}), dropped {} ({}): {}",
            k.address, k.kept_owner, k.kept_origin, k.dropped_owner, k.dropped_origin, k.rule
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `explain`: from the running daemon (`--config`, with the audit log's history) or from a
/// snapshot file.
pub fn explain(
    config: Option<&Path>,
    snapshot: Option<&Path>,
    options: rcptgate::LookupOptions,
    addresses: &[String],
    as_json: bool,
) -> Result<ExitCode> {
    let list = match (config, snapshot) {
        (Some(c), None) => match control(c, &Ctl::Explain(addresses.to_vec()))? {
            Reply::Explained { explanations } => explanations,
            other => return Err(unexpected(other)),
        },
        (None, Some(p)) => {
            let snap =
                rcptgate::Snapshot::open(p).with_context(|| format!("opening {}", p.display()))?;
            addresses
                .iter()
                .map(|a| snap.explain(a, &options))
                .collect()
        }
        _ => bail!("give --config FILE (ask the running daemon) or --snapshot FILE"),
    };
    for e in &list {
        if as_json {
            println!("{}", serde_json::to_string(e)?);
            continue;
        }
        println!(
            "{}: {}{}",
            e.input,
            e.verdict,
            e.code
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        );
        if let Some(a) = e.address.as_deref().filter(|a| *a != e.input) {
            println!("  address    {a}");
        }
        println!("  step       {}", e.step);
        if let Some(r) = &e.record {
            println!("  record     {r}");
        }
        for c in &e.claims {
            println!("  claimed by {c}");
        }
        for x in &e.excluded {
            println!("  left out   {x}");
        }
        for h in &e.history {
            println!("  history    {h}");
        }
        if !e.near_domains.is_empty() {
            println!("  near       {}", e.near_domains.join(", "));
        }
        if !e.similar.is_empty() {
            println!("  did you mean {}", e.similar.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}
