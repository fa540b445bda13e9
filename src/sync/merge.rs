//! Merge sources into one build input: accepted domains, one record per address, and every
//! conflict reported (DESIGN.md §6, first two points).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault};

use crate::address;
use crate::directory::explain::{Excluded, Reason};
use crate::directory::{BuildInput, DomainSpec, Interner, Kind, NONE, RecordSpec};
use crate::sources::{
    self, Diagnostic, Prehashed, Role, Severity, SourceData, derives_domain, join_key,
};

/// One address claimed by two owners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The address.
    pub address: String,
    /// The owner that keeps it.
    pub kept_owner: String,
    /// Where the kept claim came from.
    pub kept_origin: String,
    /// The owner that lost it.
    pub dropped_owner: String,
    /// Where the lost claim came from.
    pub dropped_origin: String,
    /// Why the kept claim won.
    pub rule: &'static str,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: claimed by {} ({}) and {} ({}); kept {} ({})",
            self.address,
            self.kept_owner,
            self.kept_origin,
            self.dropped_owner,
            self.dropped_origin,
            self.kept_owner,
            self.rule
        )
    }
}

/// The result of a merge: what to build, and what to tell the administrator.
#[derive(Debug, Default)]
pub struct Merged {
    pub(crate) input: BuildInput,
    /// Entries skipped or doubtful.
    pub diagnostics: Vec<Diagnostic>,
    /// Addresses claimed by two owners.
    pub conflicts: Vec<Conflict>,
    /// Entries whose domain is not accepted (typically contacts elsewhere): not an error.
    pub outside_domains: usize,
    /// Addresses listed again by the same owner (another source, or the same one).
    pub duplicates: usize,
    /// Records from additions and exceptions sources (those that replaced a directory
    /// record are counted in `overridden` too).
    pub additions: usize,
    /// Records from exceptions sources.
    pub exceptions: usize,
    /// Directory records replaced by additions or exceptions.
    pub overridden: usize,
}

impl Merged {
    /// Addresses the build will hold.
    pub fn addresses(&self) -> usize {
        self.input.records.len()
    }

    /// Accepted domains the build will hold.
    pub fn domains(&self) -> usize {
        self.input.domains.len()
    }

    /// Build the snapshot image (checked, ready to write or load); the merge's diagnostics
    /// and conflicts stay here.
    pub fn build(
        &mut self,
    ) -> Result<(Vec<u8>, crate::directory::BuildStats), crate::directory::BuildError> {
        crate::directory::build(std::mem::take(&mut self.input))
    }

    /// Build one snapshot image per customer (the domains without a customer make one of
    /// their own): the segments of a set (see `directory::segments`), built one after
    /// another.
    pub fn build_segments(
        &mut self,
    ) -> Result<Vec<(Vec<u8>, crate::directory::BuildStats)>, crate::directory::BuildError> {
        crate::directory::split_by_customer(std::mem::take(&mut self.input))
            .into_iter()
            .map(crate::directory::build)
            .collect()
    }
}

/// Bookkeeping per record for conflict resolution: which entry of which source made it.
#[derive(Debug, Clone, Copy)]
struct Claim {
    source: u32,
    entry: u32,
    primary: bool,
    role: Role,
}

fn entry_of<'a>(sources: &'a [SourceData], c: &Claim) -> &'a sources::Entry {
    &sources[c.source as usize].entries[c.entry as usize]
}

/// The primary address of the object that claims the address (itself for a primary).
fn owner_of(sources: &[SourceData], c: &Claim) -> String {
    let e = entry_of(sources, c);
    e.owner
        .clone()
        .unwrap_or_else(|| join_key(&e.local, &e.domain))
}

fn origin_of(sources: &[SourceData], c: &Claim) -> String {
    let e = entry_of(sources, c);
    match &e.dn {
        Some(dn) => format!("{} ({dn})", e.loc),
        None => e.loc.to_string(),
    }
}

/// Merge sources in order (earlier sources win ties). Directory sources first, then additions
/// (which replace the directory's record for the same address), then exceptions (which
/// replace everything). Only directory sources derive accepted domains from their addresses,
/// and exceptions sources declare none: one manual entry must never make a domain ours.
pub fn merge(sources: &[SourceData], generation: u64) -> Merged {
    let mut m = Merged::default();
    let mut strings = Interner::default();
    let mut domains: Vec<DomainSpec> = Vec::new();
    let mut domain_loc: Vec<String> = Vec::new();
    let mut by_name: foldhash::HashMap<String, u32> = foldhash::HashMapExt::new();

    let opt = |s: &mut Interner, v: &Option<String>| v.as_deref().map_or(NONE, |v| s.intern(v));
    for src in sources {
        if src.role == Role::Exceptions {
            if let Some(d) = src.domains.first() {
                m.diagnostics.push(Diagnostic::warning(
                    d.loc.clone(),
                    "an exceptions source does not declare accepted domains; ignored",
                ));
            }
            continue;
        }
        for d in &src.domains {
            if let Some(&i) = by_name.get(&d.name) {
                let first = &domains[i as usize];
                let cust = d
                    .customer
                    .as_deref()
                    .map(|c| strings.intern(c))
                    .unwrap_or(NONE);
                if cust != first.customer {
                    m.diagnostics.push(Diagnostic::warning(
                        d.loc.clone(),
                        format!(
                            "domain {} is also declared for another customer at {}; the first declaration is kept",
                            d.name, domain_loc[i as usize]
                        ),
                    ));
                }
                continue;
            }
            by_name.insert(d.name.clone(), domains.len() as u32);
            domain_loc.push(d.loc.to_string());
            domains.push(DomainSpec {
                name: d.name.clone(),
                customer: opt(&mut strings, &d.customer),
                profile: opt(&mut strings, &d.profile),
                route: opt(&mut strings, &d.route),
                accept_all: d.accept_all,
                keep_case: d.keep_case,
            });
        }
    }
    for src in sources
        .iter()
        .filter(|s| s.derive_domains && s.role == Role::Directory)
    {
        for e in src.entries.iter().filter(|e| derives_domain(e.object)) {
            if !by_name.contains_key(&*e.domain) {
                by_name.insert(e.domain.to_string(), domains.len() as u32);
                domain_loc.push(e.loc.to_string());
                domains.push(DomainSpec {
                    name: e.domain.to_string(),
                    customer: NONE,
                    profile: NONE,
                    route: NONE,
                    accept_all: false,
                    keep_case: false,
                });
            }
        }
    }

    // Records by (domain, folded local part): a hash of the key to the first record with
    // that hash, chained through `next`, so no key is allocated twice.
    let total: usize = sources.iter().map(|s| s.entries.len()).sum();
    let seed = foldhash::fast::RandomState::default();
    let mut heads: HashMap<u64, u32, BuildHasherDefault<Prehashed>> =
        HashMap::with_capacity_and_hasher(total, Default::default());
    let mut next: Vec<u32> = Vec::with_capacity(total);
    let mut records: Vec<RecordSpec> = Vec::with_capacity(total);
    let mut claims: Vec<Claim> = Vec::with_capacity(total);
    let mut local = Vec::with_capacity(128);
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_key(|&i| sources[i].role);
    let mut last_domain: Option<(&str, u32)> = None;
    let mut excluded: Vec<Excluded> = Vec::new();
    for src in sources {
        excluded.extend(src.excluded.iter().cloned());
        for d in src
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
        {
            if let Some(subject) = &d.subject {
                excluded.push(Excluded {
                    address: address::normalize(subject).unwrap_or_else(|_| subject.to_lowercase()),
                    reason: Reason::InvalidSyntax,
                    origin: match &d.dn {
                        Some(dn) => format!("{} ({dn})", d.loc),
                        None => d.loc.to_string(),
                    },
                    detail: d.message.clone(),
                });
            }
        }
    }
    for si in order {
        let src = &sources[si];
        for (ei, e) in src.entries.iter().enumerate() {
            // An object's addresses usually share a domain: look it up once.
            let d = match last_domain {
                Some((name, d)) if name == &*e.domain => d,
                _ => match by_name.get(&*e.domain) {
                    Some(&d) => {
                        last_domain = Some((&*e.domain, d));
                        d
                    }
                    None => {
                        m.outside_domains += 1;
                        if src.role == Role::Directory {
                            excluded.push(Excluded {
                                address: format!("{}@{}", e.local.to_lowercase(), e.domain),
                                reason: Reason::DomainNotAccepted,
                                origin: match &e.dn {
                                    Some(dn) => format!("{} ({dn})", e.loc),
                                    None => e.loc.to_string(),
                                },
                                detail: format!("a {} in {}", e.kind.as_str(), e.domain),
                            });
                        }
                        continue;
                    }
                },
            };
            local.clear();
            address::fold_local_into(&e.local, domains[d as usize].keep_case, &mut local);
            let h = key_hash(&seed, d, &local);
            let mut found = heads.get(&h).copied().unwrap_or(u32::MAX);
            while found != u32::MAX {
                let r = &records[found as usize];
                if r.domain == d && r.local.as_bytes() == local.as_slice() {
                    break;
                }
                found = next[found as usize];
            }
            let claim = Claim {
                source: si as u32,
                entry: ei as u32,
                primary: e.is_primary(),
                role: src.role,
            };
            match src.role {
                Role::Directory => {}
                Role::Additions => m.additions += 1,
                Role::Exceptions => {
                    m.exceptions += 1;
                    excluded.push(Excluded {
                        address: format!("{}@{}", String::from_utf8_lossy(&local), e.domain),
                        reason: Reason::Exception,
                        origin: origin_of(sources, &claim),
                        detail: String::new(),
                    });
                }
            }
            let record = |strings: &mut Interner| {
                let kind = match src.role {
                    Role::Directory => e.kind,
                    Role::Additions => Kind::Addition,
                    Role::Exceptions => Kind::Exception,
                };
                let mut rec =
                    RecordSpec::new(d, String::from_utf8_lossy(&local).into_owned(), kind);
                if src.role != Role::Exceptions {
                    rec.profile = opt(strings, &e.profile);
                    rec.route = opt(strings, &e.route);
                }
                rec.owner = e.owner.as_deref().map(Box::from);
                rec.source = si as u32;
                rec.line = e.loc.line;
                rec.dn = e.dn.clone();
                rec.attributes = e.attributes.as_deref().map(Box::from);
                rec
            };
            if found == u32::MAX {
                next.push(heads.insert(h, records.len() as u32).unwrap_or(u32::MAX));
                records.push(record(&mut strings));
                claims.push(claim);
                continue;
            }
            let i = found as usize;
            if claims[i].role < claim.role {
                // Additions beat the directory; exceptions beat both.
                m.overridden += 1;
                records[i] = record(&mut strings);
                claims[i] = claim;
                continue;
            }
            let (old_owner, new_owner) = (owner_of(sources, &claims[i]), owner_of(sources, &claim));
            if old_owner == new_owner || claim.role != Role::Directory {
                m.duplicates += 1;
                continue;
            }
            let address = format!("{}@{}", String::from_utf8_lossy(&local), e.domain);
            let new_wins = claim.primary && !claims[i].primary;
            let rule = if new_wins || claims[i].primary && !claim.primary {
                "its primary address"
            } else {
                "first by source order"
            };
            let (kept, dropped) = if new_wins {
                let old = std::mem::replace(&mut claims[i], claim);
                records[i] = record(&mut strings);
                ((new_owner, claims[i]), (old_owner, old))
            } else {
                ((old_owner, claims[i]), (new_owner, claim))
            };
            let c = Conflict {
                address,
                kept_owner: kept.0,
                kept_origin: origin_of(sources, &kept.1),
                dropped_owner: dropped.0,
                dropped_origin: origin_of(sources, &dropped.1),
                rule,
            };
            excluded.push(Excluded {
                address: c.address.clone(),
                reason: Reason::ConflictLost,
                origin: c.dropped_origin.clone(),
                detail: format!(
                    "claimed for {}; kept for {} ({}; {})",
                    c.dropped_owner, c.kept_owner, c.kept_origin, c.rule
                ),
            });
            m.conflicts.push(c);
        }
    }
    inherit_from_owners(&mut records, &domains);
    m.input = BuildInput {
        generation,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        strings,
        sources: sources.iter().map(|s| s.name.to_string()).collect(),
        domains,
        records,
        shards: 0,
        filter_keying: Default::default(),
        excluded,
    };
    m
}

/// The hash of a record key in the merge index: `foldhash`, seeded per process. Keys come
/// from uploaded files (at a provider, one customer's upload may share a build with others):
/// an unseeded hash would let a file of crafted addresses put them all on one chain and make
/// the merge quadratic.
fn key_hash(hasher: &foldhash::fast::RandomState, domain: u32, local: &[u8]) -> u64 {
    hasher.hash_one((domain, local))
}

/// An alias delivers to its owner's mailbox: without a profile or route of its own it takes
/// the owner's (user-based routing must not split one mailbox across two next hops).
fn inherit_from_owners(records: &mut [RecordSpec], domains: &[DomainSpec]) {
    // Only primaries with a profile or route of their own have anything to give (directory
    // syncs usually have none: routes come from domains and map files).
    let primaries: HashMap<String, usize> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.owner.is_none() && (r.profile != NONE || r.route != NONE))
        .map(|(i, r)| (join_key(&r.local, &domains[r.domain as usize].name), i))
        .collect();
    if primaries.is_empty() {
        return;
    }
    for i in 0..records.len() {
        let Some(owner) = records[i].owner.as_deref() else {
            continue;
        };
        let Some(&j) = primaries.get(owner) else {
            continue;
        };
        let (profile, route) = (records[j].profile, records[j].route);
        let r = &mut records[i];
        if r.profile == NONE {
            r.profile = profile;
        }
        if r.route == NONE {
            r.route = route;
        }
    }
}
