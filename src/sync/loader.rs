//! Building a new snapshot from the configured sources and putting it in service
//! (DESIGN.md §1): a build that fails, or that looks wrong, never replaces the snapshot in
//! service.

use std::sync::Arc;

use crate::config::Config;
use crate::directory::{self, Directory, Snapshot};
use crate::sources::{self, Severity};
use crate::sync::merge;

/// How many added and removed addresses an audit line lists by name.
pub const SAMPLE: usize = 100;

/// What one successful publish put in service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub generation: u64,
    /// Addresses added and removed against the snapshot it replaced.
    pub added: u64,
    pub removed: u64,
    /// The first [`SAMPLE`] of each, for the audit line.
    pub added_sample: Vec<String>,
    pub removed_sample: Vec<String>,
    pub addresses: u64,
    pub domains: u32,
    pub conflicts: usize,
    pub errors: usize,
    pub warnings: usize,
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
    #[error("new build has no addresses while {0} are in service; kept the snapshot in service")]
    Empty(u64),
}

/// Put the persisted snapshot in service, if there is one. Returns its generation.
pub fn open_persisted(cfg: &Config, dir: &Directory) -> Result<Option<u64>, LoadError> {
    let Some(path) = cfg.snapshot.as_deref().filter(|p| p.exists()) else {
        return Ok(None);
    };
    let snap = Snapshot::open(path)?;
    let generation = snap.generation();
    dir.publish(Arc::new(snap));
    Ok(Some(generation))
}

/// Build from every configured source, persist, and publish. Any refused source, build error
/// or an empty result over a non-empty directory leaves the directory as it was.
pub fn rebuild(cfg: &Config, dir: &Directory) -> Result<Published, LoadError> {
    let mut data = Vec::with_capacity(cfg.sources.len());
    for s in &cfg.sources {
        data.push(sources::load(&s.spec())?);
    }
    let (in_service, generation) = {
        let view = dir.view();
        let snap = view.snapshot();
        (
            snap.map_or(0, |s| s.record_count()),
            snap.map_or(0, |s| s.generation()) + 1,
        )
    };
    let merged = merge(&data, generation);
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
    let conflicts = merged.conflicts.len();
    if merged.input.records.is_empty() && in_service > 0 {
        return Err(LoadError::Empty(in_service));
    }
    let (bytes, _stats) = directory::build(merged.input)?;
    let snap = match cfg.snapshot.as_deref() {
        Some(path) => {
            // Check before it replaces the persisted file, then serve the mapped file.
            Snapshot::from_bytes(bytes.clone())?;
            directory::write_atomic(path, &bytes)?;
            Snapshot::open(path)?
        }
        None => Snapshot::from_bytes(bytes)?,
    };
    let (mut added, mut removed) = (0u64, 0u64);
    let (mut added_sample, mut removed_sample) = (Vec::new(), Vec::new());
    match dir.view().snapshot() {
        Some(old) => directory::diff(old, &snap, |c| match c {
            directory::Change::Added(a) => {
                added += 1;
                if added_sample.len() < SAMPLE {
                    added_sample.push(a.to_owned());
                }
            }
            directory::Change::Removed(r) => {
                removed += 1;
                if removed_sample.len() < SAMPLE {
                    removed_sample.push(r.to_owned());
                }
            }
        }),
        None => added = snap.record_count(),
    }
    let published = Published {
        generation: snap.generation(),
        added,
        removed,
        added_sample,
        removed_sample,
        addresses: snap.record_count(),
        domains: snap.domain_count(),
        conflicts,
        errors,
        warnings,
    };
    let old = dir.publish(Arc::new(snap));
    // Drop the old snapshot here, off the request path.
    drop(old);
    Ok(published)
}
