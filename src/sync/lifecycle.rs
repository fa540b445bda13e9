//! What happens to addresses between two builds (DESIGN.md §6): the deletion guard, and
//! tombstones for addresses that disappear, with their removal times kept in a state file.
//!
//! [`plan`] compares the snapshot in service with a new build input in one streaming pass
//! (both in (domain, local part) order), adds a `tombstone` record for every address within
//! its grace period, and says whether the guard holds the build. It touches no file and reads
//! the time only from its argument, so tests drive it with any clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::GuardConfig;
use crate::directory::{BuildInput, DomainSpec, Hit, Kind, NONE, RecordSpec, Snapshot};

/// How many removed addresses a plan names (audit line, `rcptgate status`).
pub const SAMPLE: usize = 100;

/// One address that left the directory and is still accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// When it disappeared (Unix seconds).
    pub removed: u64,
    /// Kept until it returns or is deleted by hand (`rcptgate conflicts keep`).
    #[serde(default)]
    pub keep: bool,
    /// What it was, and where its mail went.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Its profile then.
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Its route then.
    pub route: Option<String>,
}

impl Tombstone {
    /// Seconds of grace left at `now` (`None` for a kept one).
    pub fn left(&self, now: u64, grace: u64) -> Option<u64> {
        (!self.keep).then(|| (self.removed.saturating_add(grace)).saturating_sub(now))
    }
}

/// What survives a restart: the tombstones, by `local@domain` as the snapshot stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format version of the state file.
    pub version: u32,
    /// The tombstones, by `local@domain`.
    pub tombstones: BTreeMap<String, Tombstone>,
    /// The last publish: what a restart that lost the persisted snapshot compares a first
    /// build with (the deletion guard must not be bypassed by losing a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_publish: Option<LastPublish>,
}

/// What the last publish put in service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastPublish {
    /// Its generation.
    pub generation: u64,
    /// Its live addresses (tombstones and exceptions not counted).
    pub live: u64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl State {
    /// The state file format this build writes.
    pub const VERSION: u32 = 1;

    /// Read the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<State, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        serde_json::from_str(&text).map_err(|e| StateError::Parse {
            path: path.display().to_string(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    }

    /// Write atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut me = self.clone();
        me.version = State::VERSION;
        let mut text = serde_json::to_vec_pretty(&me).unwrap_or_default();
        text.push(b'\n');
        crate::directory::write_atomic(path, &text).map_err(|e| StateError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// The earliest time a tombstone expires, if any can.
    pub fn next_expiry(&self, grace: u64) -> Option<u64> {
        self.tombstones
            .values()
            .filter(|t| !t.keep)
            .map(|t| t.removed.saturating_add(grace))
            .min()
    }
}

/// What a new build does to the directory in service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The state to save once the build is published.
    pub state: State,
    /// Addresses in service before (tombstones and exceptions not counted).
    pub live_before: u64,
    /// Live addresses the build removes (tombstoned or not) and the first [`SAMPLE`].
    pub removed: u64,
    /// The first [`SAMPLE`] removed addresses.
    pub removed_sample: Vec<String>,
    /// Live addresses new in this build, and the first [`SAMPLE`] (in address order; in
    /// source order for a first build, which adds all of them).
    pub added: u64,
    /// The first [`SAMPLE`] added addresses.
    pub added_sample: Vec<String>,
    /// Removed addresses that became tombstones in this build.
    pub tombstoned: u64,
    /// Tombstones whose grace ran out, and those whose address came back.
    pub expired: u64,
    /// The first [`SAMPLE`] tombstones whose grace ran out (for `explain`, via the audit log).
    pub expired_sample: Vec<String>,
    /// Tombstones whose address came back.
    pub returned: u64,
    /// Tombstone records added to the build.
    pub tombstones: u64,
    /// The guard holds this build's removals: it removes too much. The build is still
    /// published, with the addresses it would remove kept as they were.
    pub hold: bool,
    /// Held: every address whose removal waits for approval (kept in the build as it was).
    pub held_removals: Vec<String>,
    /// Removals that were approved beforehand (see [`plan_approved`]).
    pub approved: u64,
}

impl Plan {
    /// Why the guard holds the build, in words.
    pub fn hold_reason(&self, guard: &GuardConfig) -> String {
        format!(
            "removes {} of {} addresses ({:.1} %); limits are {} and {:.1} %",
            self.removed,
            self.live_before,
            self.removed as f64 * 100.0 / self.live_before.max(1) as f64,
            guard.max_deletions,
            guard.max_deletion_ratio * 100.0
        )
    }
}

fn is_live(kind: Kind) -> bool {
    !matches!(kind, Kind::Tombstone | Kind::Exception)
}

/// Compare `old` (in service) with `input` (the new build), decide the guard, and add the
/// tombstone records to `input`. `state` is the tombstones in force; the plan carries the
/// next one. The first build (nothing in service) is never held and tombstones nothing.
/// `adopt` takes tombstones of `old` that `state` does not know in again, from `now` (the
/// state file was lost); otherwise they were deleted and stay deleted.
pub fn plan(
    old: Option<&Snapshot>,
    input: &mut BuildInput,
    state: &State,
    now: u64,
    guard: &GuardConfig,
    adopt: bool,
) -> Plan {
    plan_approved(old, input, state, now, guard, adopt, &HashSet::new())
}

/// [`plan`], where the removal of the addresses in `approved` (`local@domain` as the snapshot
/// stores them) was approved: they neither count towards the guard nor are kept.
///
/// When the guard holds the build, the build still carries everything safe (additions and
/// changes): every address it would remove is put back as it is in `old` (kind, owner,
/// profile, route) and listed in [`Plan::held_removals`], so it answers as before until the
/// removal is approved.
pub fn plan_approved(
    old: Option<&Snapshot>,
    input: &mut BuildInput,
    state: &State,
    now: u64,
    guard: &GuardConfig,
    adopt: bool,
    approved: &HashSet<String>,
) -> Plan {
    let grace = guard.deletion_grace.as_secs();
    let mut p = Plan {
        state: state.clone(),
        ..Plan::default()
    };
    let inp: &BuildInput = input;
    // Domains by name, as ranks: (rank, local part) sorts like the snapshot's cursor.
    let (by_name, rank) = crate::directory::name_order(&inp.domains);
    let rank_of: HashMap<&str, u32> = inp
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), rank[i]))
        .collect();
    let mut keys: Vec<(u32, &[u8], Kind)> = inp
        .records
        .iter()
        .map(|r| (rank[r.domain as usize], r.local.as_bytes(), r.kind))
        .collect();
    // Sorted for the walk beside the old snapshot and for finding tombstones; a first
    // build without tombstones needs neither.
    if old.is_some() || !state.tombstones.is_empty() {
        keys.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    }
    let find = |domain: &str, local: &[u8]| -> Option<Kind> {
        let r = *rank_of.get(domain)?;
        keys.binary_search_by(|k| (k.0, k.1).cmp(&(r, local)))
            .ok()
            .map(|i| keys[i].2)
    };

    let note_added = |p: &mut Plan, k: &(u32, &[u8], Kind)| {
        if is_live(k.2) {
            p.added += 1;
            if p.added_sample.len() < SAMPLE {
                let d = &inp.domains[by_name[k.0 as usize] as usize].name;
                p.added_sample
                    .push(format!("{}@{d}", String::from_utf8_lossy(k.1)));
            }
        }
    };
    // Removed live addresses: (address, what it was, removed by an exception).
    let mut gone: Vec<(String, Hit, bool)> = Vec::new();
    // Removals the guard holds: put back as they were.
    let mut keep: Vec<(String, Hit)> = Vec::new();
    if let Some(old) = old {
        let mut cur = old.cursor();
        let mut j = 0usize;
        let (mut domain, mut local) = (String::new(), Vec::<u8>::new());
        let mut domain_rank: Option<u32> = None;
        while let Some((d, l)) = cur.next_address() {
            if d != domain {
                domain.clear();
                domain.push_str(d);
                domain_rank = rank_of.get(d).copied();
            }
            local.clear();
            local.extend_from_slice(l);
            let Some(hit) = cur.hit() else { continue };
            // The new record for this address, if any (ranks grow with names, so the
            // new keys are walked once, in step with the cursor).
            let now_kind = domain_rank.and_then(|r| {
                let here = (r, local.as_slice());
                while j < keys.len() && (keys[j].0, keys[j].1) < here {
                    note_added(&mut p, &keys[j]);
                    j += 1;
                }
                let k = keys.get(j).filter(|k| (k.0, k.1) == here).map(|k| k.2);
                if k.is_some() {
                    j += 1;
                }
                k
            });
            let address = || format!("{}@{domain}", String::from_utf8_lossy(&local));
            if hit.kind == Kind::Tombstone {
                if !adopt {
                    continue;
                }
                // A tombstone the state file does not know (state lost): keep it, from now.
                p.state
                    .tombstones
                    .entry(address())
                    .or_insert_with(|| Tombstone {
                        removed: now,
                        keep: false,
                        kind: Kind::User.as_str().into(),
                        profile: old.profile(&hit).map(Into::into),
                        route: old.route(&hit).map(Into::into),
                    });
                continue;
            }
            if !is_live(hit.kind) {
                continue;
            }
            p.live_before += 1;
            if now_kind.is_some_and(is_live) || now_kind == Some(Kind::Tombstone) {
                continue;
            }
            p.removed += 1;
            let address = address();
            if p.removed_sample.len() < SAMPLE {
                p.removed_sample.push(address.clone());
            }
            if approved.contains(&address) {
                p.approved += 1;
            }
            gone.push((address, hit, now_kind.is_some()));
        }
        for k in &keys[j..] {
            note_added(&mut p, k);
        }
        let counted = p.removed - p.approved;
        p.hold = p.live_before > 0
            && (counted > guard.max_deletions
                || counted as f64 > guard.max_deletion_ratio * p.live_before as f64);
        for (address, hit, excepted) in gone {
            if p.hold && !approved.contains(&address) {
                keep.push((address, hit));
                continue;
            }
            // Removed by an exception: gone at once, never a tombstone.
            if !excepted && grace > 0 && !p.state.tombstones.contains_key(&address) {
                p.tombstoned += 1;
                p.state.tombstones.insert(
                    address,
                    Tombstone {
                        removed: now,
                        keep: false,
                        kind: hit.kind.as_str().into(),
                        profile: old.profile(&hit).map(Into::into),
                        route: old.route(&hit).map(Into::into),
                    },
                );
            }
        }
    } else {
        for k in &keys {
            note_added(&mut p, k);
        }
    }

    // Tombstones in force: drop the returned, the excepted and the expired; serve the rest.
    let domains: HashMap<&str, u32> = inp
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i as u32))
        .collect();
    let mut serve = Vec::new();
    p.state.tombstones.retain(|address, t| {
        let Some((local, domain)) = address.rsplit_once('@') else {
            return false;
        };
        match find(domain, local.as_bytes()) {
            Some(Kind::Exception) => return false,
            Some(k) if is_live(k) => {
                p.returned += 1;
                return false;
            }
            _ => {}
        }
        if grace == 0 || (!t.keep && now >= t.removed.saturating_add(grace)) {
            p.expired += 1;
            if p.expired_sample.len() < SAMPLE {
                p.expired_sample.push(address.clone());
            }
            return false;
        }
        // A tombstone whose domain is no longer accepted waits in the state file (it is
        // served again if the domain returns within the grace period).
        if let Some(&d) = domains.get(domain) {
            serve.push((d, local.to_owned(), t.profile.clone(), t.route.clone()));
        }
        true
    });
    // Where a tombstone comes from, for `explain` (not the first source's name).
    let tomb_source = (!serve.is_empty()).then(|| {
        input.sources.push(TOMBSTONE.into());
        input.sources.len() as u32 - 1
    });
    for (d, local, profile, route) in serve {
        let mut r = RecordSpec::new(d, local, Kind::Tombstone);
        r.source = tomb_source.unwrap_or(0);
        r.profile = profile.as_deref().map_or(NONE, |s| input.strings.intern(s));
        r.route = route.as_deref().map_or(NONE, |s| input.strings.intern(s));
        input.records.push(r);
        p.tombstones += 1;
    }
    if let Some(old) = old {
        keep_as_before(old, input, &keep);
    }
    p.held_removals = keep.into_iter().map(|(a, _)| a).collect();
    p
}

/// The origin of a tombstone.
const TOMBSTONE: &str = "tombstone: removed from the sources, accepted until its grace period ends";

/// The origin of an address kept because its removal is held.
const KEPT: &str = "kept: removal held by the deletion guard";

/// Put the addresses whose removal the guard holds back into `input` as `old` has them, with
/// their domain when the build lost it; an exception record for one of them gives way until
/// the removal is approved.
fn keep_as_before(old: &Snapshot, input: &mut BuildInput, keep: &[(String, Hit)]) {
    if keep.is_empty() {
        return;
    }
    let mut domains: HashMap<String, u32> = input
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.clone(), i as u32))
        .collect();
    let source = input.sources.len() as u32;
    input.sources.push(KEPT.into());
    for (address, hit) in keep {
        let Some((local, domain)) = address.rsplit_once('@') else {
            continue;
        };
        let d = match domains.get(domain) {
            Some(&d) => d,
            None => {
                let Some(info) = old.domain_info(hit.domain) else {
                    continue;
                };
                let mut intern = |s: Option<&str>| s.map_or(NONE, |s| input.strings.intern(s));
                let spec = DomainSpec {
                    name: info.name.to_owned(),
                    customer: intern(info.customer),
                    profile: intern(info.profile),
                    route: intern(info.route),
                    accept_all: info.accept_all,
                    keep_case: info.keep_case,
                };
                let d = input.domains.len() as u32;
                input.domains.push(spec);
                domains.insert(domain.to_owned(), d);
                d
            }
        };
        let mut r = RecordSpec::new(d, local, hit.kind);
        r.profile = old.profile(hit).map_or(NONE, |s| input.strings.intern(s));
        r.route = old.route(hit).map_or(NONE, |s| input.strings.intern(s));
        if let Ok(Some(info)) = old.record_info(address, hit) {
            r.owner = info.owner.map(Into::into);
            // Where it came from before it was kept (kept again: the same).
            let origin = info
                .origin
                .strip_prefix(KEPT)
                .and_then(|o| o.strip_prefix(" ("))
                .and_then(|o| o.strip_suffix(')'))
                .unwrap_or(&info.origin);
            r.dn = Some(origin.into());
            r.attributes = info.attributes.map(Into::into);
        }
        r.source = source;
        match input
            .records
            .iter()
            .position(|x| x.domain == d && *x.local == *local)
        {
            // Only an exception can be there: the address was removed.
            Some(i) => input.records[i] = r,
            None => input.records.push(r),
        }
    }
}
