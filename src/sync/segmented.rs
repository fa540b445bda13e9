//! Segmented mode (`[directory] segments = true`): the directory in service is a set of
//! segments (`directory::segments`), one per *group* of sources — sources that share an
//! accepted domain (by declaring it, or by listing addresses in it) are in one group —, so a
//! segment holds whole domains and everything that decides their answers. A changed source
//! file then rebuilds only its group: its sources are read again, merged, planned against
//! that group's segments in service (tombstones, guard, audit per address as always), built,
//! and published in a set that shares every other segment; only the new segments and the
//! index are written.
//!
//! The full build (at start, on SIGHUP or `rcptgate sync`, a live source due, `approve`,
//! tombstones deleted by hand, provisioning) reads and merges everything as in the single
//! mode and cuts the result into the groups' segments.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{Held, LoadError, Loader, Outcome, Report};
use crate::directory::{self, Snapshot};
use crate::sources::{Role, SourceData, derives_domain};
use crate::sync::lifecycle::{self, Plan};
use crate::sync::merge;

/// A source file's identity and version as the file system reports it: a file replaced or
/// rewritten changes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Stamp {
    len: u64,
    /// Modification time, nanoseconds since the epoch.
    modified: Option<u128>,
    ino: u64,
    ctime: (i64, i64),
}

/// The stamp of `path` now (`None` when it cannot be read: then it counts as changed).
pub(super) fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        modified: m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos()),
        ino: m.ino(),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// What the last build read of one source: enough to tell whether it changed, and which
/// domains tie it to other sources.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Summary {
    stamp: Option<Stamp>,
    /// Domains it makes accepted (declared, or derived from its addresses).
    declared: HashSet<Box<str>>,
    /// Domains its addresses are in.
    touched: HashSet<Box<str>>,
}

impl Summary {
    pub(super) fn of(d: &SourceData, stamp: Option<Stamp>) -> Summary {
        let mut s = Summary {
            stamp,
            ..Summary::default()
        };
        // An exceptions source's domain declarations are ignored by the merge.
        if d.role != Role::Exceptions {
            s.declared = d.domains.iter().map(|x| x.name.as_str().into()).collect();
            if d.derive_domains && d.role == Role::Directory {
                s.declared.extend(
                    d.entries
                        .iter()
                        .filter(|e| derives_domain(e.object))
                        .map(|e| e.domain.as_str().into()),
                );
            }
        }
        s.touched = d.entries.iter().map(|e| e.domain.as_str().into()).collect();
        s
    }

    /// The domains of this source that tie it to others: accepted ones it declares or lists
    /// addresses in.
    fn ties<'a>(&'a self, accepted: &'a HashSet<&str>) -> impl Iterator<Item = &'a str> + 'a {
        self.declared
            .iter()
            .chain(&self.touched)
            .map(|d| &**d)
            .filter(|d| accepted.contains(d))
    }
}

/// The groups of sources: per source, the smallest index of its group, given every summary
/// each source has (its last and, for a changed source, its new one: a group holds what
/// either ties together, so a source that leaves a group rebuilds it too).
fn groups(summaries: &[Vec<&Summary>]) -> Vec<usize> {
    let accepted: HashSet<&str> = summaries
        .iter()
        .flatten()
        .flat_map(|s| s.declared.iter().map(|d| &**d))
        .collect();
    let mut parent: Vec<usize> = (0..summaries.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, sums) in summaries.iter().enumerate() {
        for s in sums {
            for d in s.ties(&accepted) {
                let j = *first.entry(d).or_insert(i);
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent[a.max(b)] = a.min(b);
            }
        }
    }
    (0..summaries.len()).map(|i| root(&mut parent, i)).collect()
}

/// Per domain, the group of the sources that tie it (the key of its segment).
fn domain_groups(summaries: &[&Summary], group: &[usize]) -> HashMap<Box<str>, u64> {
    let accepted: HashSet<&str> = summaries
        .iter()
        .flat_map(|s| s.declared.iter().map(|d| &**d))
        .collect();
    let mut out = HashMap::new();
    for (i, s) in summaries.iter().enumerate() {
        for d in s.ties(&accepted) {
            out.entry(d.into()).or_insert(group[i] as u64);
        }
    }
    out
}

/// Build the segments of `input`, one per group of `summaries` (one per configured source,
/// in order; a domain no summary ties — kept by the guard — goes with `fallback`).
pub(super) fn build_segments(
    input: directory::BuildInput,
    summaries: &[&Summary],
    fallback: u64,
) -> Result<Vec<Arc<Snapshot>>, LoadError> {
    let single: Vec<Vec<&Summary>> = summaries.iter().map(|s| vec![*s]).collect();
    let group = groups(&single);
    let of = domain_groups(summaries, &group);
    directory::split_by(input, |d| {
        of.get(d.name.as_str()).copied().unwrap_or(fallback)
    })
    .into_iter()
    // A group left with no domain (its files emptied) has no segment.
    .filter(|input| !input.domains.is_empty())
    .map(|input| {
        let (bytes, _) = directory::build(input)?;
        Ok(Arc::new(Snapshot::from_bytes(bytes)?))
    })
    .collect()
}

/// The summaries file of a set at `snapshot`: what the set in service was built from, so a
/// restart goes on with incremental builds (a file that does not match the configuration's
/// sources is ignored, and the first build is a full one).
fn summaries_path(snapshot: &Path) -> std::path::PathBuf {
    let mut name = snapshot.file_name().unwrap_or_default().to_os_string();
    name.push(".sources.json");
    snapshot.with_file_name(name)
}

#[derive(Serialize, Deserialize)]
struct SummariesFile {
    /// What of the configuration decides a source's data (see [`sources_key`]).
    sources: String,
    /// The generation these summaries were the sources of.
    generation: u64,
    summaries: HashMap<String, Summary>,
}

/// The configured sources as they decide what a source's data is (name, kind, path, role,
/// declared domains, the directory settings of live sources).
fn sources_key(cfg: &crate::config::Config) -> String {
    let text = cfg
        .sources
        .iter()
        .map(|s| {
            format!(
                "{}|{:?}|{}|{:?}|{:?}|{:?}|{:?}",
                s.name,
                s.format,
                s.path.display(),
                s.role,
                s.domains,
                s.ldap,
                s.graph
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    // A checksum, not the text: nothing of the configuration is copied to disk.
    format!("{:08x}-{}", crc32fast::hash(text.as_bytes()), text.len())
}

impl Loader {
    /// Write the summaries beside the set (after its index: a crash in between leaves the
    /// older summaries, which only makes the next build read a file again).
    pub(super) fn save_summaries(&self, snapshot: &Path, generation: u64) {
        let file = SummariesFile {
            sources: sources_key(&self.cfg),
            generation,
            summaries: self.summaries.clone(),
        };
        let r = serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                directory::write_atomic(&summaries_path(snapshot), &bytes)
                    .map_err(std::io::Error::other)
            });
        if let Err(e) = r {
            tracing::warn!(error = %e, "writing the sources' summaries: {e}; the next start builds in full");
        }
    }

    /// Read the summaries of the set put in service at start (generation `generation`).
    pub(super) fn load_summaries(&mut self, snapshot: &Path, generation: u64) {
        let Ok(bytes) = std::fs::read(summaries_path(snapshot)) else {
            return;
        };
        match serde_json::from_slice::<SummariesFile>(&bytes) {
            // Older summaries are safe (a file changed since has another stamp and is read
            // again); newer ones are not (a set restored from a backup).
            Ok(f) if f.generation <= generation && f.sources == sources_key(&self.cfg) => {
                self.summaries = f.summaries;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the sources' summaries are unreadable ({e}); the first build is a full one")
            }
        }
    }

    /// The summaries of the configured sources, in order (`None` when one is missing).
    pub(super) fn summaries_in_order(&self) -> Option<Vec<&Summary>> {
        self.cfg
            .sources
            .iter()
            .map(|s| self.summaries.get(&s.name))
            .collect()
    }

    /// Segmented mode: rebuild only the groups of the source files that changed (and of the
    /// tombstones whose grace is over). `None` when this build must be a full one: not in
    /// segmented mode, no set in service yet, a live source due, a hold, an approval, a
    /// provisioning or tombstones deleted by hand.
    pub(super) fn try_incremental(&mut self) -> Result<Option<Outcome>, LoadError> {
        let cfg = self.cfg.clone();
        let n = cfg.sources.len();
        if !cfg.segments
            || std::mem::take(&mut self.force_full)
            || self.held.is_some()
            || !self.approved.is_empty()
            || self.approve_lost
            || self.sync_due()
            || cfg
                .sources
                .iter()
                .any(|s| !self.summaries.contains_key(&s.name))
        {
            return Ok(None);
        }
        let dir = self.dir.clone();
        let view = dir.view();
        let Some(old) = view.snapshot().filter(|s| s.is_set()) else {
            return Ok(None);
        };
        let Some(last) = self.state.last_publish else {
            return Ok(None);
        };
        let now = (self.clock)();
        let grace = cfg.guard.deletion_grace.as_secs();
        // When the oldest data was read: live sources' last syncs, files now.
        let oldest = cfg
            .sources
            .iter()
            .filter_map(|s| self.ldap_cache.get(&s.name).map(|(_, at, _)| *at))
            .fold(now, u64::min);
        let live = |i: usize| cfg.sources[i].ldap.is_some() || cfg.sources[i].graph.is_some();

        let mut fresh: HashMap<usize, (SourceData, Summary)> = HashMap::new();
        for (i, s) in cfg.sources.iter().enumerate() {
            if live(i) {
                continue;
            }
            let now_stamp = stamp(&s.path);
            if now_stamp.is_some()
                && self.summaries.get(&s.name).and_then(|x| x.stamp.clone()) == now_stamp
            {
                continue;
            }
            let d = self.load_file(s)?;
            let sum = Summary::of(&d, now_stamp);
            fresh.insert(i, (d, sum));
        }
        let expiring: HashSet<String> = self
            .state
            .tombstones
            .iter()
            .filter(|(_, t)| !t.keep && (grace == 0 || now >= t.removed.saturating_add(grace)))
            .filter_map(|(a, _)| a.rsplit_once('@').map(|(_, d)| d.to_owned()))
            .collect();
        if fresh.is_empty() && expiring.is_empty() {
            // The sources are what the set in service was built from.
            self.set_fresh(Some(oldest));
            return Ok(Some(Outcome::Unchanged(Report {
                generation: old.generation(),
                plan: Plan {
                    state: self.state.clone(),
                    live_before: last.live,
                    ..Plan::default()
                },
                addresses: old.record_count(),
                live: last.live,
                domains: old.domain_count(),
                conflicts: self.conflicts.len(),
                errors: 0,
                warnings: 0,
                approved: false,
                data_time: oldest,
            })));
        }

        // The groups, over what every source tied before and what the changed ones tie now.
        let olds = self.summaries_in_order().ok_or_else(|| {
            LoadError::Snapshot(directory::SnapshotError::Cold(
                "internal: no summary".into(),
            ))
        })?;
        let both: Vec<Vec<&Summary>> = (0..n)
            .map(|i| match fresh.get(&i) {
                Some((_, new)) => vec![olds[i], new],
                None => vec![olds[i]],
            })
            .collect();
        let group = groups(&both);
        let mut hit: HashSet<usize> = fresh.keys().map(|&i| group[i]).collect();
        for (i, sums) in both.iter().enumerate() {
            if sums.iter().any(|s| {
                s.declared
                    .iter()
                    .chain(&s.touched)
                    .any(|d| expiring.contains(&**d))
            }) {
                hit.insert(group[i]);
            }
        }
        let affected: Vec<usize> = (0..n).filter(|&i| hit.contains(&group[i])).collect();
        // Every domain the affected groups tie, before and now, and the tombstones' own.
        let mut domains: HashSet<Box<str>> = expiring.iter().map(|d| d.as_str().into()).collect();
        for &i in &affected {
            for s in &both[i] {
                domains.extend(s.declared.iter().cloned());
                domains.extend(s.touched.iter().cloned());
            }
        }
        let in_scope = |address: &str| {
            address
                .rsplit_once('@')
                .is_some_and(|(_, d)| domains.contains(d))
        };

        // Read the affected groups' other sources (files again, live ones from their last sync).
        let mut data = Vec::with_capacity(affected.len());
        let mut new_summaries: Vec<(String, Summary)> = Vec::new();
        for &i in &affected {
            let s = &cfg.sources[i];
            match fresh.remove(&i) {
                Some((d, sum)) => {
                    new_summaries.push((s.name.clone(), sum));
                    data.push(d);
                }
                None if live(i) => match self.ldap_cache.get(&s.name) {
                    Some((d, _, _)) => {
                        let mut d = d.clone();
                        self.finish_source(&mut d, s);
                        data.push(d);
                    }
                    None => return Ok(None),
                },
                None => {
                    let st = stamp(&s.path);
                    let d = self.load_file(s)?;
                    new_summaries.push((s.name.clone(), Summary::of(&d, st)));
                    data.push(d);
                }
            }
        }
        // Unaffected changed files (a changed file in no group: nothing it ties is accepted).
        for (i, (_, sum)) in fresh {
            new_summaries.push((cfg.sources[i].name.clone(), sum));
        }

        // The segments in service that hold any of those domains: replaced as a whole (a
        // segment that cannot be read makes this a full build).
        let replaced: HashSet<usize> = domains.iter().filter_map(|d| old.segment_of(d)).collect();
        let Some(replaced_parts) = replaced
            .iter()
            .map(|&p| old.segment(p))
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let old_sub = Snapshot::assemble(replaced_parts, old.generation(), old.created_unix())?;
        let generation = old.generation() + 1;
        let mut merged = merge::merge(&data, generation);
        let (errors, warnings) = self.note_diagnostics(&data, &merged);
        let mut sub_state = self.state.clone();
        sub_state.tombstones.retain(|a, _| in_scope(a));
        let mut plan = lifecycle::plan_approved(
            Some(&old_sub),
            &mut merged.input,
            &sub_state,
            now,
            &cfg.guard,
            false,
            &HashSet::new(),
        );
        let mut state = self.state.clone();
        state.tombstones.retain(|a, _| !in_scope(a));
        state
            .tombstones
            .extend(std::mem::take(&mut plan.state.tombstones));
        plan.state = state;
        let live_now = merged
            .input
            .records
            .iter()
            .filter(|r| {
                !matches!(
                    r.kind,
                    directory::Kind::Exception | directory::Kind::Tombstone
                )
            })
            .count() as u64;

        // The new segments, by the groups as they are now.
        for (name, sum) in new_summaries {
            self.summaries.insert(name, sum);
        }
        let now_sums: Vec<&Summary> = affected
            .iter()
            .filter_map(|&i| self.summaries.get(&cfg.sources[i].name))
            .collect();
        let built = build_segments(std::mem::take(&mut merged.input), &now_sums, u64::MAX)?;
        let mut before: Vec<_> = old_sub
            .segments()
            .unwrap_or_default()
            .iter()
            .map(|p| p.content_digest())
            .collect();
        let mut after: Vec<_> = built.iter().map(|p| p.content_digest()).collect();
        before.sort();
        after.sort();
        let same = before == after;
        let set = old.with_segments(&replaced, built, generation, now)?;
        drop(old_sub);
        drop(view);

        let conflicts = std::mem::take(&mut merged.conflicts);
        self.conflicts.retain(|c| !in_scope(&c.address));
        self.conflicts.extend(conflicts);
        let report = Report {
            generation,
            live: last.live.saturating_sub(plan.live_before) + live_now,
            addresses: set.record_count(),
            domains: set.domain_count(),
            conflicts: self.conflicts.len(),
            errors,
            warnings,
            approved: false,
            data_time: oldest,
            plan,
        };
        self.finish_build(set, report, same, now).map(Some)
    }

    /// Hold bookkeeping, then publish `snap` (or keep the snapshot in service when `same`).
    pub(super) fn finish_build(
        &mut self,
        snap: Snapshot,
        report: Report,
        same: bool,
        now: u64,
    ) -> Result<Outcome, LoadError> {
        let hold = report.plan.hold;
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
        let report = self.publish_snapshot(snap, report, fresh)?;
        Ok(if hold {
            Outcome::Held(report)
        } else {
            Outcome::Published(report)
        })
    }
}
