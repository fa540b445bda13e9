//! Commands that work on files, without the daemon: `compile`, `check`, `lookup`, `diff`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use rcptgate::directory::{self, Match, Reject};
use rcptgate::sync::merge;
use rcptgate::{Directory, LookupOptions, Snapshot, Verdict};

use super::{load_sources, no_refused, print_diagnostics};

/// Merge and build in memory, quietly.
fn build_from(specs: &[String], generation: u64) -> Result<Snapshot> {
    let (srcs, refused) = load_sources(specs);
    no_refused(&refused, "nothing built")?;
    let mut merged = merge(&srcs, generation);
    let (bytes, _) = merged.build().context("building the snapshot")?;
    Snapshot::from_bytes(bytes).context("loading the built snapshot")
}

pub fn compile(
    specs: &[String],
    output: &Path,
    generation: u64,
    segments: bool,
) -> Result<ExitCode> {
    let t = Instant::now();
    let (stats, merge_time, errors, warnings, conflicts) = if segments {
        let (stats, count, merge_time, errors, warnings, conflicts) =
            compile_segments(specs, output, generation)?;
        println!(
            "wrote {} ({count} segment(s) in {}, {} bytes)",
            output.display(),
            directory::segments::parts_dir(output).display(),
            stats.file_bytes
        );
        (stats, merge_time, errors, warnings, conflicts)
    } else {
        let (srcs, refused) = load_sources(specs);
        no_refused(&refused, "nothing written")?;
        let mut merged = merge(&srcs, generation);
        let (errors, warnings) = print_diagnostics(&srcs, &merged);
        let merge_time = t.elapsed();
        let (bytes, stats) = merged.build().context("building the snapshot")?;
        // Never write a file we cannot read back.
        Snapshot::verify(&bytes).context("verifying the built snapshot")?;
        directory::write_atomic(output, &bytes)?;
        println!("wrote {} ({} bytes)", output.display(), stats.file_bytes);
        (stats, merge_time, errors, warnings, merged.conflicts.len())
    };
    let n = stats.records.max(1) as f64;
    println!("addresses:   {}", stats.records);
    println!("domains:     {}", stats.domains);
    println!("conflicts:   {conflicts}");
    println!("errors:      {errors} (entries skipped), warnings: {warnings}");
    println!(
        "fst:         {} bytes, {:.2} bytes/address ({} shard(s))",
        stats.fst_bytes,
        stats.fst_bytes as f64 / n,
        stats.shards
    );
    println!(
        "miss filter: {} bytes, {:.2} bytes/address",
        stats.filter_bytes,
        stats.filter_bytes as f64 / n
    );
    println!(
        "hot:         {} bytes, {:.2} bytes/address (what a verdict needs)",
        stats.hot_bytes,
        stats.hot_bytes as f64 / n
    );
    println!(
        "cold:        {} bytes, {:.2} bytes/address (owner, origin, excluded)",
        stats.cold_bytes,
        stats.cold_bytes as f64 / n
    );
    println!(
        "build time:  {:.1} ms (parse+merge {:.1} ms, sort {:.1} ms, fst {:.1} ms, miss filter {:.1} ms)",
        (merge_time + stats.total_time).as_secs_f64() * 1e3,
        merge_time.as_secs_f64() * 1e3,
        stats.sort_time.as_secs_f64() * 1e3,
        stats.fst_time.as_secs_f64() * 1e3,
        stats.filter_time.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}

/// Write a set of segments at `output`, one per customer, reading the sources one group at a
/// time (sources that share a domain; see `group_files`): only one group's records are in
/// memory at once. The build's statistics summed over the segments, how many there are, the
/// time spent reading and merging, errors, warnings and conflicts.
fn compile_segments(
    specs: &[String],
    output: &Path,
    generation: u64,
) -> Result<(
    directory::BuildStats,
    usize,
    std::time::Duration,
    usize,
    usize,
    usize,
)> {
    let files: Vec<_> = specs
        .iter()
        .map(|s| rcptgate::sources::parse_spec(s))
        .collect();
    let group = rcptgate::sync::loader::group_files(&files).context("reading the sources")?;
    let mut roots = group.clone();
    roots.sort_unstable();
    roots.dedup();
    let mut sum = directory::BuildStats::default();
    let mut refs = Vec::new();
    let mut merge_time = std::time::Duration::ZERO;
    let (mut errors, mut warnings, mut conflicts) = (0, 0, 0);
    for root in roots {
        let t = Instant::now();
        let mine: Vec<String> = specs
            .iter()
            .zip(&group)
            .filter(|(_, g)| **g == root)
            .map(|(s, _)| s.clone())
            .collect();
        let (srcs, refused) = load_sources(&mine);
        no_refused(&refused, "nothing written")?;
        let mut merged = merge(&srcs, generation);
        let (e, w) = print_diagnostics(&srcs, &merged);
        drop(srcs);
        (errors, warnings, conflicts) =
            (errors + e, warnings + w, conflicts + merged.conflicts.len());
        merge_time += t.elapsed();
        for (bytes, s) in merged.build_segments().context("building the segments")? {
            refs.push(directory::segments::write_segment(output, &bytes)?);
            sum += &s;
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    directory::segments::write_index(output, generation, now, &refs)?;
    // Never leave a set we cannot read back.
    Snapshot::open(output).context("reading back the written set")?;
    Ok((sum, refs.len(), merge_time, errors, warnings, conflicts))
}

pub fn check(specs: &[String]) -> Result<ExitCode> {
    let (srcs, refused) = load_sources(specs);
    for e in &refused {
        eprintln!("{e}");
    }
    let merged = merge(&srcs, 0);
    let (errors, warnings) = print_diagnostics(&srcs, &merged);
    let errors = errors + refused.len();
    println!(
        "{} source(s): {} addresses, {} domains, {errors} error(s), {warnings} warning(s), {} conflict(s), {} refused",
        specs.len(),
        merged.addresses(),
        merged.domains(),
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
        && (&magic == b"RCPTGATE" || directory::segments::is_set(&magic));
    if is_snapshot {
        Ok(Snapshot::open(path).with_context(|| format!("opening snapshot {spec}"))?)
    } else {
        build_from(&[spec.to_owned()], 0)
    }
}

/// One line of `lookup` output (`--json` prints it as is).
#[derive(Debug, Serialize)]
struct LookupLine<'a> {
    input: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attributes: Option<String>,
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    matched: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

pub fn lookup(
    snapshot: Option<&Path>,
    specs: &[String],
    json: bool,
    options: LookupOptions,
    addresses: &[String],
) -> Result<ExitCode> {
    let dir = Directory::new(options);
    match snapshot {
        Some(p) => {
            let snap =
                Snapshot::open(p).with_context(|| format!("opening snapshot {}", p.display()))?;
            dir.publish(Arc::new(snap));
        }
        None if !specs.is_empty() => {
            dir.publish(Arc::new(build_from(specs, 0)?));
        }
        // Nothing loaded: every answer is a temporary failure, as the daemon would give.
        None => {}
    }
    let mut out = std::io::stdout().lock();
    for input in addresses {
        let answer = dir.lookup(input);
        let verdict = answer.verdict();
        let mut line = LookupLine {
            input,
            address: rcptgate::address::normalize(input).ok(),
            verdict: verdict.name(),
            code: verdict.code(),
            kind: None,
            owner: None,
            customer: answer.customer().map(Into::into),
            profile: answer.profile().map(Into::into),
            route: answer.route().map(Into::into),
            origin: None,
            attributes: None,
            matched: None,
            reason: None,
        };
        match verdict {
            Verdict::Accept(hit) => {
                line.kind = Some(hit.kind.as_str());
                if let Some(info) = answer.details(input) {
                    // A primary address owns itself: the matched key, without a +detail.
                    line.owner = info.owner.or_else(|| {
                        let (local, domain) = line.address.as_deref()?.rsplit_once('@')?;
                        let local = local.get(..usize::from(hit.local_len))?;
                        Some(format!("{local}@{domain}"))
                    });
                    line.origin = Some(info.origin);
                    line.attributes = info.attributes;
                }
                line.matched = match hit.matched {
                    Match::Subaddress => Some("subaddress"),
                    Match::Reserved => {
                        line.reason = Some("reserved local part (always_accept)".into());
                        Some("reserved")
                    }
                    _ => None,
                };
            }
            Verdict::Reject(Reject::Syntax(e)) => line.reason = Some(e.to_string()),
            Verdict::Reject(Reject::Exception) => {
                line.kind = Some("exception");
                line.reason = Some("listed by an exceptions source: never accepted".into());
            }
            Verdict::Tempfail(_) | Verdict::Reject(_) | Verdict::NotOurs => {
                line.reason = Some(verdict.text().into());
            }
        }
        if json {
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        } else {
            let mut text = format!("{input}: {}", line.verdict);
            if let Some(c) = line.code {
                text.push_str(&format!(" {c}"));
            }
            for (k, v) in [
                ("kind", line.kind.map(str::to_owned)),
                ("owner", line.owner),
                ("customer", line.customer),
                ("profile", line.profile),
                ("route", line.route),
                ("origin", line.origin),
                ("reason", line.reason),
            ] {
                if let Some(v) = v {
                    text.push_str(&format!(" {k}={v}"));
                }
            }
            writeln!(out, "{text}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn diff(old: &str, new: &str) -> Result<ExitCode> {
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
