//! Segmented mode (`[directory] segments = true`): the directory in service is a set of
//! segments (`directory::segments`), one per *group* of sources — sources that share an
//! accepted domain (by declaring it, or by listing addresses in it) are in one group —, so a
//! segment holds whole domains and everything that decides their answers. A changed source
//! file then rebuilds only its group: its sources are read again, merged, planned against
//! that group's segments in service (tombstones, guard, audit per address as always), built,
//! and published in a set that shares every other segment; only the new segments and the
//! index are written.
//!
//! A full build (the first, SIGHUP, `rcptgate sync`, a start without the sources'
//! summaries) goes group by group on a pool of threads within `[directory] build_memory`,
//! each segment written as built. With a live source to sync, `approve`, tombstones deleted
//! by hand, provisioning or a lost set, the full build of the single mode runs instead and
//! its result is cut into the groups' segments.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{Diagnosed, LoadError, Loader, Outcome, Report, finish_source};
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

/// Add `name` to `set`, copying it only when it is new (one domain has many addresses).
fn add_name(set: &mut HashSet<Box<str>>, name: &str) {
    if !set.contains(name) {
        set.insert(name.into());
    }
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
                for e in d.entries.iter().filter(|e| derives_domain(e.object)) {
                    add_name(&mut s.declared, &e.domain);
                }
            }
        }
        for e in &d.entries {
            add_name(&mut s.touched, &e.domain);
        }
        // Kept for every source: no spare capacity (a table collected from one item per
        // address was sized for them, not for its few domains: 280 KB per 10,000 addresses).
        s.declared.shrink_to_fit();
        s.touched.shrink_to_fit();
        s
    }

    /// The summary of a MAP file from a scan of its lines' domains (`mapfile::scan_domains`),
    /// without parsing its records: what the full build needs to form the groups before it
    /// reads each group's files. It may tie more than the parse would (a refused line still
    /// names its domain), never less. `None` for other formats, and for a file that cannot
    /// be read, is not UTF-8 or has no end marker (its parse says why).
    pub(super) fn scan(s: &crate::config::SourceConfig, stamp: Option<Stamp>) -> Option<Summary> {
        if s.format != crate::sources::Format::Map {
            return None;
        }
        let (mut declared, touched) = scan_map(&s.path)?;
        if s.role == Role::Exceptions {
            declared.clear();
        } else if !s.domains.is_empty() {
            // Configured domains replace the file's (as `finish_source` does).
            declared = s.domains.iter().map(|d| d.as_str().into()).collect();
        }
        Some(Summary {
            stamp,
            declared,
            touched,
        })
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

/// [`Summary::scan`] of the sources at `todo`, on every core (a full build's first pass:
/// reading through the text of every MAP file).
fn scan_all(
    sources: &[crate::config::SourceConfig],
    todo: &[usize],
    stamps: &[Option<Stamp>],
) -> HashMap<usize, Option<Summary>> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let chunk = todo.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&i| (i, Summary::scan(&sources[i], stamps[i].clone())))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // A scan that panicked leaves its files to be read in full (no summary).
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The declared and touched domains of the MAP file at `path`, from a scan of its lines
/// (`mapfile::scan_domains`); `None` when it cannot be read, is not UTF-8 or has no end
/// marker (its parse then says why).
fn scan_map(
    path: &Path,
) -> Option<(
    crate::sources::mapfile::Domains,
    crate::sources::mapfile::Domains,
)> {
    let bytes = std::fs::read(path).ok()?;
    let text = crate::sources::decode_utf8(&Arc::from(""), &bytes).ok()?;
    crate::sources::mapfile::scan_domains(text)
}

/// The groups that source files make, as the segmented daemon forms them (sources sharing an
/// accepted domain are one group): per file, the index of the first file of its group. A MAP
/// file's domains come from a scan of its lines; other formats are read for them (and
/// dropped). For building a set group by group, e.g. `rcptgate compile --segments`.
pub fn group_files(files: &[(crate::sources::Format, &Path)]) -> Result<Vec<usize>, LoadError> {
    let mut sums = Vec::with_capacity(files.len());
    for &(format, path) in files {
        let scanned = (format == crate::sources::Format::Map)
            .then(|| scan_map(path))
            .flatten();
        let sum = match scanned {
            Some((declared, touched)) => Summary {
                stamp: None,
                declared,
                touched,
            },
            None => Summary::of(&crate::sources::load(format, path)?, None),
        };
        sums.push(sum);
    }
    let refs: Vec<Vec<&Summary>> = sums.iter().map(|s| vec![s]).collect();
    Ok(groups(&refs))
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

/// Build the segment images of `input`, one per group of `summaries` (one per configured
/// source, in order; a domain no summary ties — kept by the guard — goes with `fallback`).
pub(super) fn build_segments(
    input: directory::BuildInput,
    summaries: &[&Summary],
    fallback: u64,
) -> Result<Vec<Vec<u8>>, LoadError> {
    let single: Vec<Vec<&Summary>> = summaries.iter().map(|s| vec![*s]).collect();
    let group = groups(&single);
    let of = domain_groups(summaries, &group);
    directory::split_by(input, |d| {
        of.get(d.name.as_str()).copied().unwrap_or(fallback)
    })
    .into_iter()
    // A group left with no domain (its files emptied) has no segment.
    .filter(|input| !input.domains.is_empty())
    .map(|input| Ok(directory::build(input)?.0))
    .collect()
}

/// A source of a group's build: read already (a changed file, a live source's last sync), or
/// a file the group's thread reads.
enum GroupSource {
    Read(SourceData),
    File,
}

/// One group's build, handed to the pool: its sources, its segments in service (with the
/// set's generation and time; `None` on a first build), the tombstones in its domains and
/// the memory reserved for it.
struct Job {
    root: usize,
    sources: Vec<(crate::config::SourceConfig, GroupSource)>,
    old: Option<(Vec<Arc<Snapshot>>, u64, u64)>,
    state: lifecycle::State,
    reserved: u64,
}

/// What every group's build shares.
struct GroupContext<'a> {
    generation: u64,
    now: u64,
    guard: &'a crate::config::GuardConfig,
    /// Where new segments are written as built (full builds); otherwise they are kept in
    /// memory and written with the set.
    write_to: Option<&'a Path>,
}

/// What a group's build did.
struct GroupDone {
    /// The summaries of the files it read.
    summaries: Vec<(String, Summary)>,
    plan: Plan,
    live: u64,
    diagnosed: Diagnosed,
    conflicts: Vec<merge::Conflict>,
    done: Done,
}

/// What became of a group's segments.
enum Done {
    /// They came out as they are in service: they stay.
    Same,
    /// Written to the set's directory (read on first use).
    Written(Vec<directory::segments::SegmentRef>),
    /// Kept in memory (no snapshot path, or an incremental build that writes the set after).
    Built(Vec<Arc<Snapshot>>),
}

/// One group's build: read its files, merge, plan against its segments in service
/// (tombstones, guard), build its segments, compare them with those in service, and write
/// or load them.
fn build_group(job: Job, ctx: &GroupContext) -> Result<GroupDone, LoadError> {
    let mut data = Vec::with_capacity(job.sources.len());
    let mut summaries = Vec::new();
    for (s, input) in job.sources {
        let d = match input {
            GroupSource::Read(d) => d,
            GroupSource::File => {
                let st = stamp(&s.path);
                let mut d = crate::sources::load(s.format, &s.path)?;
                finish_source(&mut d, &s);
                // Read again now: what this build is made of.
                summaries.push((s.name.clone(), Summary::of(&d, st)));
                d
            }
        };
        data.push((s.name, d));
    }
    let (names, data): (Vec<String>, Vec<SourceData>) = data.into_iter().unzip();
    let (old_sub, before) = match job.old {
        Some((parts, generation, created)) => {
            let mut before: Vec<_> = parts.iter().map(|p| p.content_digest()).collect();
            before.sort();
            (
                Some(Snapshot::assemble(parts, generation, created)?),
                Some(before),
            )
        }
        None => (None, None),
    };
    let mut merged = merge::merge(&data, ctx.generation);
    let diagnosed = Diagnosed::of(&data, &merged);
    // The segments are cut by what each source ties now.
    let now_sums: Vec<Summary> = names
        .iter()
        .zip(&data)
        .map(|(name, d)| {
            summaries
                .iter()
                .find(|(n, _)| n == name)
                .map_or_else(|| Summary::of(d, None), |(_, s)| s.clone())
        })
        .collect();
    drop(data);
    let plan = lifecycle::plan_approved(
        old_sub.as_ref(),
        &mut merged.input,
        &job.state,
        ctx.now,
        ctx.guard,
        false,
        &HashSet::new(),
    );
    let live = super::live_records(&merged.input);
    let conflicts = std::mem::take(&mut merged.conflicts);
    let sums: Vec<&Summary> = now_sums.iter().collect();
    let images = build_segments(merged.input, &sums, u64::MAX)?;
    let done = match &before {
        Some(before)
            if {
                let mut after = images
                    .iter()
                    .map(|b| Snapshot::digest_of(b))
                    .collect::<Result<Vec<_>, _>>()?;
                after.sort();
                &after == before
            } =>
        {
            Done::Same
        }
        _ => match ctx.write_to {
            Some(path) => Done::Written(
                images
                    .iter()
                    .map(|image| directory::segments::write_segment(path, image))
                    .collect::<Result<_, _>>()?,
            ),
            None => Done::Built(load_segments(images)?),
        },
    };
    Ok(GroupDone {
        summaries,
        plan,
        live,
        diagnosed,
        conflicts,
        done,
    })
}

/// Memory a group's build takes, estimated from its source files' bytes: parsed entries,
/// the merge, the sorted records and the segment images together peaked at 7.7 times the
/// text of a 1M-address MAP file of the benchmark's generator (see README); with a margin.
pub(super) const BUILD_MEMORY_PER_FILE_BYTE: u64 = 12;

fn estimate(file_bytes: u64) -> u64 {
    file_bytes
        .saturating_mul(BUILD_MEMORY_PER_FILE_BYTE)
        .max(1 << 20)
}

/// Whether a group of `bytes` may start beside groups holding `used`: when it fits, or when
/// nothing else is in progress (a group larger than the budget runs alone).
fn fits(used: u64, bytes: u64, budget: u64) -> bool {
    used == 0 || used.saturating_add(bytes) <= budget
}

/// The `build_memory` budget of a segmented build: groups in progress reserve their
/// estimate; a group waits until it fits beside the others, and runs alone when it does not
/// fit at all (a group cannot be split).
struct BuildPool {
    budget: u64,
    in_use: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
}

impl BuildPool {
    fn new(budget: u64) -> BuildPool {
        BuildPool {
            budget,
            in_use: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Wait until `bytes` fit (or nothing else is in progress), and take them.
    fn reserve(&self, bytes: u64) -> u64 {
        let mut used = self
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while !fits(*used, bytes, self.budget) {
            used = self
                .freed
                .wait(used)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *used = used.saturating_add(bytes);
        bytes
    }

    fn release(&self, bytes: u64) {
        let mut used = self
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *used = used.saturating_sub(bytes);
        self.freed.notify_all();
    }
}

/// Load built segment images (checked).
pub(super) fn load_segments(images: Vec<Vec<u8>>) -> Result<Vec<Arc<Snapshot>>, LoadError> {
    images
        .into_iter()
        .map(|bytes| Ok(Arc::new(Snapshot::from_bytes(bytes)?)))
        .collect()
}

/// Add one group's plan to the plan of the whole build (its state is set afterwards).
fn add_plan(total: &mut Plan, p: Plan) {
    let sample = |v: &mut Vec<String>, more: Vec<String>| {
        let room = lifecycle::SAMPLE.saturating_sub(v.len());
        v.extend(more.into_iter().take(room));
    };
    total.live_before += p.live_before;
    total.removed += p.removed;
    sample(&mut total.removed_sample, p.removed_sample);
    total.added += p.added;
    sample(&mut total.added_sample, p.added_sample);
    total.tombstoned += p.tombstoned;
    total.expired += p.expired;
    sample(&mut total.expired_sample, p.expired_sample);
    total.returned += p.returned;
    total.tombstones += p.tombstones;
    total.hold |= p.hold;
    total.held_removals.extend(p.held_removals);
    total.approved += p.approved;
}

/// The summaries file of a set at `snapshot`: what the set in service was built from, so a
/// restart goes on with incremental builds (a file that does not match the configuration's
/// sources is ignored, and the first build is a full one).
pub(super) fn summaries_path(snapshot: &Path) -> std::path::PathBuf {
    let mut name = snapshot.file_name().unwrap_or_default().to_os_string();
    name.push(".sources.json");
    snapshot.with_file_name(name)
}

#[derive(Serialize, Deserialize)]
struct SummariesFile<S = HashMap<String, Summary>> {
    /// What of the configuration decides a source's data (see [`sources_key`]).
    sources: String,
    /// The generation these summaries were the sources of.
    generation: u64,
    summaries: S,
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
            // Written from where they are (a copy was as large as them).
            summaries: &self.summaries,
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
    /// tombstones whose grace is over), one group after another. `all`: every file is read
    /// again (SIGHUP, `rcptgate sync`, a start without the sources' summaries), still one
    /// group at a time, so only one group's records are in memory at once and each new
    /// segment is written as soon as it is built.
    ///
    /// `None` when the full build of the single mode must run instead: not in segmented
    /// mode, a live source (due, or any with `all`), a hold, an approval, a provisioning or
    /// tombstones deleted by hand, or a persisted set lost while its state file says what was
    /// in service (that first build is guarded as a whole).
    pub(super) fn try_incremental(&mut self, all: bool) -> Result<Option<Outcome>, LoadError> {
        let cfg = self.cfg.clone();
        let n = cfg.sources.len();
        let live = |i: usize| cfg.sources[i].ldap.is_some() || cfg.sources[i].graph.is_some();
        if !cfg.segments
            || self.held.is_some()
            || !self.approved.is_empty()
            || self.approve_lost
            || (all && (0..n).any(live))
            || (!all && self.sync_due())
            || (!all
                && cfg
                    .sources
                    .iter()
                    .any(|s| !self.summaries.contains_key(&s.name)))
        {
            return Ok(None);
        }
        let dir = self.dir.clone();
        let view = dir.view();
        let old = view.snapshot();
        // A set in service; or nothing in service and nothing ever published (a first build).
        let old = match old {
            Some(s) if s.is_set() => Some(s),
            None if all && self.state.last_publish.is_none() => None,
            _ => return Ok(None),
        };
        let last_live = self.state.last_publish.map_or(0, |l| l.live);
        let now = (self.clock)();
        let grace = cfg.guard.deletion_grace.as_secs();
        // When the oldest data was read: live sources' last syncs, files now.
        let oldest = cfg
            .sources
            .iter()
            .filter_map(|s| self.ldap_cache.get(&s.name).map(|(_, at, _)| *at))
            .fold(now, u64::min);

        // The files that changed since the set was built (every file with `all`): their new
        // summaries, and their data while only a few are read (with `all`, each is read
        // again in its group's turn, so they are not all in memory at once).
        let mut fresh: HashMap<usize, Summary> = HashMap::new();
        let mut kept: HashMap<usize, SourceData> = HashMap::new();
        // Each file's stamp before it is read (a change while it is read shows next time).
        let stamps: Vec<Option<Stamp>> = (0..n)
            .map(|i| {
                if live(i) {
                    None
                } else {
                    stamp(&cfg.sources[i].path)
                }
            })
            .collect();
        let unchanged = |i: usize| {
            let known = self.summaries.get(&cfg.sources[i].name);
            stamps[i].is_some() && known.is_some_and(|k| k.stamp == stamps[i])
        };
        // A full build scans the MAP files it cannot take as they were on every core first.
        self.read_all |= all;
        let mut scanned = if all {
            let todo: Vec<usize> = (0..n).filter(|&i| !live(i) && !unchanged(i)).collect();
            scan_all(&cfg.sources, &todo, &stamps)
        } else {
            HashMap::new()
        };
        for (i, s) in cfg.sources.iter().enumerate() {
            if live(i) {
                continue;
            }
            let now_stamp = stamps[i].clone();
            if !all && unchanged(i) {
                continue;
            }
            if all {
                // Only the groups are needed now: each file is read in its group's turn.
                // An unchanged file ties what it tied; a MAP file's domains come from a scan.
                let old = self.summaries.get(&s.name);
                let sum = match old {
                    Some(o) if unchanged(i) => Some(o.clone()),
                    _ => scanned.remove(&i).flatten(),
                };
                if let Some(sum) = sum {
                    fresh.insert(i, sum);
                    continue;
                }
            }
            let d = self.load_file(s)?;
            fresh.insert(i, Summary::of(&d, now_stamp));
            if !all {
                kept.insert(i, d);
            }
        }
        let expiring: HashSet<String> = self
            .state
            .tombstones
            .iter()
            .filter(|(_, t)| !t.keep && (grace == 0 || now >= t.removed.saturating_add(grace)))
            .filter_map(|(a, _)| a.rsplit_once('@').map(|(_, d)| d.to_owned()))
            .collect();
        if !all && fresh.is_empty() && expiring.is_empty() {
            let Some(old) = old else {
                return Ok(None);
            };
            // Every segment is read (a no-op once done): one that cannot be read (replaced or
            // damaged on disk) makes this a full build, which writes a whole set again.
            if old.segments().is_none() {
                return Ok(None);
            }
            // The sources are what the set in service was built from.
            self.set_fresh(Some(oldest));
            return Ok(Some(Outcome::Unchanged(Report {
                generation: old.generation(),
                plan: Plan {
                    state: self.state.clone(),
                    live_before: last_live,
                    ..Plan::default()
                },
                addresses: old.record_count(),
                live: last_live,
                domains: old.domain_count(),
                conflicts: self.conflicts.len(),
                errors: 0,
                warnings: 0,
                approved: false,
                data_time: oldest,
            })));
        }

        // The groups, over what every source tied before and what the changed ones tie now.
        let empty = Summary::default();
        let (group, roots, mut group_domains) = {
            let refs: Vec<Vec<&Summary>> = (0..n)
                .map(|i| {
                    let old = self.summaries.get(&cfg.sources[i].name).unwrap_or(&empty);
                    match fresh.get(&i) {
                        Some(new) => vec![old, new],
                        None => vec![old],
                    }
                })
                .collect();
            let group = groups(&refs);
            let mut hit: HashSet<usize> = fresh.keys().map(|&i| group[i]).collect();
            for (i, sums) in refs.iter().enumerate() {
                let ties_expiring = sums.iter().any(|s| {
                    s.declared
                        .iter()
                        .chain(&s.touched)
                        .any(|d| expiring.contains(&**d))
                });
                if ties_expiring {
                    hit.insert(group[i]);
                }
            }
            // Every domain each rebuilt group ties, before and now.
            let mut domains: HashMap<usize, HashSet<Box<str>>> = HashMap::new();
            for (i, sums) in refs
                .iter()
                .enumerate()
                .filter(|(i, _)| hit.contains(&group[*i]))
            {
                let d = domains.entry(group[i]).or_default();
                for s in sums {
                    d.extend(s.declared.iter().chain(&s.touched).cloned());
                }
            }
            let mut roots: Vec<usize> = hit.into_iter().collect();
            roots.sort_unstable();
            (group, roots, domains)
        };
        for (i, sum) in fresh {
            self.summaries.insert(cfg.sources[i].name.clone(), sum);
        }

        let generation = old.map_or(1, |o| o.generation() + 1);
        let mut state = self.state.clone();
        let mut plan = Plan::default();
        let mut live_now = 0u64;
        let mut diagnosed = Diagnosed::default();
        let mut replaced: HashSet<usize> = HashSet::new();
        let mut built: Vec<Arc<Snapshot>> = Vec::new();
        let mut written: Vec<directory::segments::SegmentRef> = Vec::new();
        let mut scope: HashSet<Box<str>> = HashSet::new();
        let mut conflicts = Vec::new();
        let ctx = GroupContext {
            generation,
            now,
            guard: &cfg.guard,
            write_to: match (all, cfg.snapshot.as_deref()) {
                (true, Some(path)) => Some(path),
                _ => None,
            },
        };
        // Each group is read, merged, planned and built by a pool of threads, one group per
        // thread (groups share no domain, so their plans are independent); a group starts
        // only when its estimated memory fits the budget beside the groups in progress (or
        // when none is). What the groups did is combined here, in the groups' order.
        let pool = BuildPool::new(cfg.build_memory);
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(roots.len())
            .max(1);
        let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(0);
        let job_rx = std::sync::Mutex::new(job_rx);
        let (done_tx, done_rx) =
            std::sync::mpsc::channel::<(usize, Result<GroupDone, LoadError>)>();
        let failed = std::sync::atomic::AtomicBool::new(false);
        let mut sent: Vec<(usize, HashSet<usize>, HashSet<Box<str>>)> = Vec::new();
        // Each group's sources (one pass, not one per group).
        let mut members_of: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, &g) in group.iter().enumerate() {
            members_of.entry(g).or_default().push(i);
        }
        let dispatched = std::thread::scope(|sc| {
            for _ in 0..workers {
                let (job_rx, done_tx, pool, ctx, failed) =
                    (&job_rx, done_tx.clone(), &pool, &ctx, &failed);
                sc.spawn(move || {
                    loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let (root, reserved) = (job.root, job.reserved);
                        let r = build_group(job, ctx);
                        pool.release(reserved);
                        if r.is_err() {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        if done_tx.send((root, r)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(done_tx);
            let dispatch = || -> Option<()> {
                for root in roots {
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        return Some(());
                    }
                    let members = members_of.remove(&root).unwrap_or_default();
                    let domains = group_domains.remove(&root).unwrap_or_default();
                    // Live sources' data as last synced; files are read by the group's thread
                    // (changed ones read already are handed over).
                    let mut sources = Vec::with_capacity(members.len());
                    for &i in &members {
                        let s = &cfg.sources[i];
                        let input = match kept.remove(&i) {
                            Some(d) => GroupSource::Read(d),
                            None if live(i) => {
                                let (d, _, _) = self.ldap_cache.get(&s.name)?;
                                let mut d = d.clone();
                                finish_source(&mut d, s);
                                GroupSource::Read(d)
                            }
                            None => GroupSource::File,
                        };
                        sources.push((s.clone(), input));
                    }
                    // The segments in service that hold any of those domains: replaced as a
                    // whole (a segment that cannot be read makes this a full build).
                    let mine: HashSet<usize> = match old {
                        Some(o) => domains.iter().filter_map(|d| o.segment_of(d)).collect(),
                        None => HashSet::new(),
                    };
                    let old_parts = mine
                        .iter()
                        .map(|&p| old.and_then(|o| o.segment(p)))
                        .collect::<Option<Vec<_>>>()?;
                    let in_scope = |address: &str| {
                        address
                            .rsplit_once('@')
                            .is_some_and(|(_, d)| domains.contains(d))
                    };
                    let sub_state = lifecycle::State {
                        tombstones: state
                            .tombstones
                            .iter()
                            .filter(|(a, _)| in_scope(a))
                            .map(|(a, t)| (a.clone(), t.clone()))
                            .collect(),
                        version: state.version,
                        last_publish: state.last_publish,
                    };
                    // Estimated from the files' sizes as the last build saw them.
                    let file_bytes: u64 = members
                        .iter()
                        .map(|&i| {
                            self.summaries
                                .get(&cfg.sources[i].name)
                                .and_then(|s| s.stamp.as_ref())
                                .map_or(0, |st| st.len)
                        })
                        .sum();
                    let reserved = pool.reserve(estimate(file_bytes));
                    sent.push((root, mine, domains));
                    let job = Job {
                        root,
                        sources,
                        old: old.map(|o| (old_parts, o.generation(), o.created_unix())),
                        state: sub_state,
                        reserved,
                    };
                    if job_tx.send(job).is_err() {
                        return Some(());
                    }
                }
                Some(())
            };
            let r = dispatch();
            // No more jobs: the workers finish what they hold and stop.
            drop(job_tx);
            r
        });
        let mut results: HashMap<usize, GroupDone> = HashMap::new();
        for (root, r) in done_rx {
            results.insert(root, r?);
        }
        if dispatched.is_none() {
            return Ok(None);
        }
        for (root, mine, domains) in sent {
            let Some(g) = results.remove(&root) else {
                // A worker that stopped without an answer (it panicked).
                return Err(LoadError::Build(directory::BuildError::Internal(
                    "a segment build stopped without a result".into(),
                )));
            };
            for (name, sum) in g.summaries {
                self.summaries.insert(name, sum);
            }
            let in_scope = |address: &str| {
                address
                    .rsplit_once('@')
                    .is_some_and(|(_, d)| domains.contains(d))
            };
            let mut p = g.plan;
            state.tombstones.retain(|a, _| !in_scope(a));
            state
                .tombstones
                .extend(std::mem::take(&mut p.state.tombstones));
            add_plan(&mut plan, p);
            live_now += g.live;
            diagnosed.add(g.diagnosed);
            conflicts.extend(g.conflicts);
            match g.done {
                // The group's segments have the same content: they stay (nothing written).
                Done::Same => {}
                Done::Written(refs) => {
                    written.extend(refs);
                    replaced.extend(mine);
                }
                Done::Built(parts) => {
                    built.extend(parts);
                    replaced.extend(mine);
                }
            }
            scope.extend(domains);
        }
        let (errors, warnings) = self.note_diagnostics(diagnosed);
        let same = old.is_some() && replaced.is_empty();
        if live_now == 0 && all && old.is_some_and(|o| o.record_count() > 0) {
            return Err(LoadError::Empty(old.map_or(0, |o| o.record_count())));
        }
        let dir_path = cfg.snapshot.as_deref().map(directory::segments::parts_dir);
        let set = directory::segments::with_parts(
            old,
            &replaced,
            built,
            written,
            dir_path.as_deref(),
            generation,
            now,
        )?;
        drop(view);

        // Tombstones whose grace is over in a domain no source ties any more: nothing serves
        // them; they leave the state.
        let untied: Vec<String> = state
            .tombstones
            .iter()
            .filter(|(a, t)| {
                !t.keep
                    && (grace == 0 || now >= t.removed.saturating_add(grace))
                    && a.rsplit_once('@').is_some_and(|(_, d)| !scope.contains(d))
                    && set
                        .domain_index(a.rsplit_once('@').map_or("", |(_, d)| d))
                        .is_none()
            })
            .map(|(a, _)| a.clone())
            .collect();
        for a in untied {
            state.tombstones.remove(&a);
            plan.expired += 1;
        }
        plan.state = state;
        let in_scope = |address: &str| {
            address
                .rsplit_once('@')
                .is_some_and(|(_, d)| scope.contains(d))
        };
        self.conflicts.retain(|c| !in_scope(&c.address));
        self.conflicts.extend(conflicts);
        let report = Report {
            generation,
            live: last_live.saturating_sub(plan.live_before) + live_now,
            addresses: set.record_count(),
            domains: set.domain_count(),
            conflicts: self.conflicts.len(),
            errors,
            warnings,
            approved: false,
            data_time: oldest,
            plan,
        };
        self.finish_build(|| Ok(set), report, same, now).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source's summary keeps tables the size of its domains, not of its addresses (they
    /// are kept for every source of the directory).
    #[test]
    fn a_summary_is_the_size_of_its_domains() {
        let mut text = String::new();
        for d in 0..2 {
            text.push_str(&format!("1|d{d}.example\tDOMAIN:\td{d}.example\n"));
            for i in 0..5000 {
                text.push_str(&format!("1|d{d}.example\tDIR:\tu{i}@d{d}.example\n"));
            }
        }
        text.push_str("++++\n");
        let data = crate::sources::parse_text(crate::sources::Format::Map, &"t.map".into(), &text)
            .expect("parsed");
        assert_eq!(data.entries.len(), 10_000);
        let s = Summary::of(&data, None);
        assert_eq!((s.declared.len(), s.touched.len()), (2, 2));
        assert!(s.touched.capacity() < 16, "{}", s.touched.capacity());
        assert!(s.declared.capacity() < 16, "{}", s.declared.capacity());
    }

    #[test]
    fn a_group_starts_when_it_fits_or_runs_alone() {
        assert!(fits(0, 5 << 30, 1 << 30), "too large: alone");
        assert!(fits(512 << 20, 512 << 20, 1 << 30));
        assert!(!fits(512 << 20, (512 << 20) + 1, 1 << 30));
        assert!(!fits(1, u64::MAX, u64::MAX - 1));
        assert_eq!(estimate(0), 1 << 20);
        assert_eq!(estimate(1 << 20), BUILD_MEMORY_PER_FILE_BYTE << 20);
        assert_eq!(estimate(u64::MAX), u64::MAX);
        // What is reserved is given back.
        let pool = BuildPool::new(1 << 30);
        let a = pool.reserve(600 << 20);
        pool.release(a);
        let b = pool.reserve(900 << 20);
        pool.release(b);
        assert_eq!(*pool.in_use.lock().expect("lock"), 0);
    }
}
