//! "Why was this recipient rejected (or accepted)?" — what the build left out, kept in the
//! snapshot's cold `excluded` section, and [`Snapshot::explain`], which walks the DESIGN §4
//! steps for one address and says which decided, with the record and every claim for a
//! hit, and for a miss why: not our domain (and the domains near it), left out of a source
//! (with the reason and where), an exception, or nowhere (with the closest addresses of the
//! domain, found with the FST's Levenshtein automaton).
//!
//! The section: `u32` number of reasons, then per reason (`u8` code, `u64` count); then the
//! records, sorted by address, at most [`CAP`] per reason: `u16` length + address, `u8`
//! reason, `u16` length + origin, `u16` length + detail. Bounded, so ≤ 1 byte per address
//! at 10M.

use serde::Serialize;

use super::snapshot::Snapshot;
use super::{Kind, LookupOptions, Match, Reject, Tempfail, Verdict};
use crate::address::{self, AddrBuf};

/// Records kept per reason (the counts are complete).
pub const CAP: usize = 20_000;

/// Why the build left an address out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Reason {
    /// The source's text is not a valid address.
    InvalidSyntax = 1,
    /// A disabled account, with `include_disabled = false`.
    Disabled = 2,
    /// A guest (`userType = Guest`) of a Graph source.
    Guest = 3,
    /// A group that is not mail-enabled.
    NotMailEnabled = 4,
    /// An object that is not a recipient (a computer, …).
    NotRecipient = 5,
    /// Claimed by another owner, who kept it.
    ConflictLost = 6,
    /// In a domain that is not accepted (a contact elsewhere, a typo in the source).
    DomainNotAccepted = 7,
    /// Listed in an exceptions source: rejected whatever the directory says.
    Exception = 8,
}

impl Reason {
    /// From the stored code.
    pub fn from_code(c: u8) -> Option<Reason> {
        Some(match c {
            1 => Reason::InvalidSyntax,
            2 => Reason::Disabled,
            3 => Reason::Guest,
            4 => Reason::NotMailEnabled,
            5 => Reason::NotRecipient,
            6 => Reason::ConflictLost,
            7 => Reason::DomainNotAccepted,
            8 => Reason::Exception,
            _ => return None,
        })
    }

    /// In words.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::InvalidSyntax => "the source's text is not a valid address",
            Reason::Disabled => "a disabled account, and include_disabled = false",
            Reason::Guest => "a guest account (include_guests = false)",
            Reason::NotMailEnabled => "a group that is not mail-enabled",
            Reason::NotRecipient => "an object that is not a user, group, contact or public folder",
            Reason::ConflictLost => "claimed by two owners; the other kept it",
            Reason::DomainNotAccepted => "its domain is not an accepted domain",
            Reason::Exception => "listed in an exceptions source",
        }
    }
}

/// One thing the build left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Excluded {
    /// The address (normalized when it parses, else the source's text in lower case).
    pub address: String,
    /// Why.
    pub reason: Reason,
    /// Where (`file:line:column`, `source (DN)`).
    pub origin: String,
    /// More (the parse error, who kept a conflicting address).
    pub detail: String,
}

/// The section's bytes for these exclusions: every reason counted, at most [`CAP`] kept each.
pub fn encode(mut list: Vec<Excluded>) -> Vec<u8> {
    let mut counts: std::collections::BTreeMap<Reason, u64> = Default::default();
    for e in &list {
        *counts.entry(e.reason).or_default() += 1;
    }
    list.sort_by(|a, b| a.address.cmp(&b.address).then(a.reason.cmp(&b.reason)));
    let mut kept: std::collections::BTreeMap<Reason, usize> = Default::default();
    list.retain(|e| {
        let k = kept.entry(e.reason).or_default();
        *k += 1;
        *k <= CAP
    });
    let mut out = Vec::new();
    out.extend_from_slice(&(counts.len() as u32).to_le_bytes());
    for (r, n) in &counts {
        out.push(*r as u8);
        out.extend_from_slice(&n.to_le_bytes());
    }
    let put = |out: &mut Vec<u8>, s: &str| {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        // Cut at a character boundary.
        let mut n = b.len();
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&s.as_bytes()[..n]);
    };
    for e in &list {
        put(&mut out, &e.address);
        out.push(e.reason as u8);
        put(&mut out, &e.origin);
        put(&mut out, &e.detail);
    }
    out
}

/// The section's counts per reason, and an iterator over its raw records
/// (address, reason code, origin, detail). Malformed bytes end the reading (cold data is
/// checksummed; this only guards against a bug).
fn parse(bytes: &[u8]) -> (Vec<(Reason, u64)>, Records<'_>) {
    let mut r = crate::directory::format::Reader::new(bytes);
    let mut counts = Vec::new();
    let n = r.u32().unwrap_or(0);
    for _ in 0..n.min(256) {
        let (Some(c), Some(v)) = (r.take(1).map(|b| b[0]), r.u64()) else {
            return (counts, Records(crate::directory::format::Reader::new(&[])));
        };
        if let Some(reason) = Reason::from_code(c) {
            counts.push((reason, v));
        }
    }
    (counts, Records(r))
}

/// The records of the section, as stored.
struct Records<'a>(crate::directory::format::Reader<'a>);

impl<'a> Iterator for Records<'a> {
    type Item = (&'a [u8], u8, &'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        fn field<'b>(r: &mut crate::directory::format::Reader<'b>) -> Option<&'b [u8]> {
            let len = r
                .take(2)
                .and_then(|b| b.try_into().ok())
                .map(u16::from_le_bytes)?;
            r.take(usize::from(len))
        }
        let r = &mut self.0;
        Some((field(r)?, r.take(1)?[0], field(r)?, field(r)?))
    }
}

fn owned(address: &[u8], reason: Reason, origin: &[u8], detail: &[u8]) -> Excluded {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Excluded {
        address: text(address),
        reason,
        origin: text(origin),
        detail: text(detail),
    }
}

/// Read the section: (counts, records); an unknown reason ends the records.
pub fn decode(bytes: &[u8]) -> (Vec<(Reason, u64)>, Vec<Excluded>) {
    let (counts, records) = parse(bytes);
    let list = records
        .map_while(|(a, code, o, d)| Some(owned(a, Reason::from_code(code)?, o, d)))
        .collect();
    (counts, list)
}

/// The records of `address` in the section's bytes: only those are copied, and the scan
/// stops past the address (the records are sorted).
pub fn find(bytes: &[u8], address: &str) -> Vec<Excluded> {
    parse(bytes)
        .1
        .skip_while(|r| r.0 < address.as_bytes())
        .take_while(|r| r.0 == address.as_bytes())
        .filter_map(|(a, code, o, d)| Some(owned(a, Reason::from_code(code)?, o, d)))
        .collect()
}

/// The answer of `explain` for one address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Explanation {
    /// As asked.
    pub input: String,
    /// Normalized, when it parses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `accept`, `reject`, `tempfail`, `not_ours`.
    pub verdict: String,
    /// The SMTP code the frontends give.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The DESIGN §4 step that decided, in words.
    pub step: String,
    /// For a hit: `kind=… owner=… customer=… profile=… route=…`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// Every source line or DN that claimed the address (the winner first).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub claims: Vec<String>,
    /// Why sources' claims on it were left out.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub excluded: Vec<String>,
    /// Accepted domains near an unknown one.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub near_domains: Vec<String>,
    /// The closest addresses of the domain (a typo?).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub similar: Vec<String>,
    /// What the audit log says about its removal.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub history: Vec<String>,
}

/// Edit distance (for domain names; short strings).
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Snapshot {
    /// Why `input` gets the answer it gets (see the [module documentation](self)). Reads
    /// the cold sections (checked on first use).
    pub fn explain(&self, input: &str, options: &LookupOptions) -> Explanation {
        let mut e = Explanation {
            input: input.to_owned(),
            ..Explanation::default()
        };
        let mut buf = AddrBuf::default();
        let verdict = self.lookup(input, options, &mut buf);
        e.verdict = match &verdict {
            Verdict::Accept(_) => "accept",
            Verdict::Reject(_) => "reject",
            Verdict::Tempfail(_) => "tempfail",
            Verdict::NotOurs => "not_ours",
        }
        .into();
        e.code = verdict.code().map(str::to_owned);
        let parsed = address::normalize(input).ok();
        e.address = parsed.clone();
        let key = parsed
            .clone()
            .unwrap_or_else(|| input.trim().trim_matches(['<', '>']).to_lowercase());
        let excluded = self.excluded_for(&key);
        e.excluded = excluded
            .iter()
            .filter(|x| x.reason != Reason::Exception)
            .map(|x| {
                format!(
                    "{}: {}{} ({})",
                    x.origin,
                    x.reason.describe(),
                    if x.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", x.detail)
                    },
                    serde_json::to_value(x.reason)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                )
            })
            .collect();
        let domain = parsed
            .as_deref()
            .and_then(|a| a.rsplit_once('@'))
            .map(|(_, d)| d.to_owned())
            .or_else(|| key.rsplit_once('@').map(|(_, d)| d.to_owned()));
        match &verdict {
            Verdict::Tempfail(t) => {
                e.step = match t {
                    Tempfail::NotLoaded => "1: no snapshot loaded yet",
                    Tempfail::Stale => {
                        "7: the data is older than max_age: unknown addresses are deferred"
                    }
                    Tempfail::Internal => "internal error: deferred",
                }
                .into();
            }
            Verdict::Reject(Reject::Syntax(err)) => {
                e.step = format!("2: syntax error in a domain we own: {err}");
            }
            Verdict::NotOurs => {
                e.step = if parsed.is_none() {
                    "2/3: not an address we can parse, in a domain that is not ours: neutral".into()
                } else {
                    "3: the domain is not an accepted domain: neutral (relay control decides)"
                        .into()
                };
                if let Some(d) = &domain {
                    let mut near: Vec<(usize, String)> = (0..self.domain_count())
                        .filter_map(|i| self.domain_info(i))
                        .map(|info| info.name.to_owned())
                        .map(|n| (distance(&n, d), n))
                        .filter(|(k, _)| *k <= 2)
                        .collect();
                    near.sort();
                    e.near_domains = near.into_iter().take(5).map(|(_, n)| n).collect();
                }
            }
            Verdict::Accept(hit) => {
                e.step = match (hit.kind, hit.matched) {
                    (Kind::Tombstone, _) => {
                        "6: a tombstone: removed from the sources, accepted for the grace period"
                            .into()
                    }
                    (_, Match::Exact) => "4: the address is in the directory".into(),
                    (_, Match::Subaddress) => {
                        "4: the address without its +detail is in the directory".into()
                    }
                    (_, Match::AcceptAll) => {
                        "5: the domain accepts every address (accept_all)".into()
                    }
                    (_, Match::Reserved) => {
                        "5: a reserved local part (always_accept), accepted in every domain we own"
                            .into()
                    }
                };
                let mut rec = format!("kind={}", hit.kind.as_str());
                let info = self.record_info(input, hit).ok().flatten();
                if let Some(o) = info.as_ref().and_then(|i| i.owner.as_deref()) {
                    rec.push_str(&format!(" owner={o}"));
                }
                for (k, v) in [
                    ("customer", self.customer(hit)),
                    ("profile", self.profile(hit)),
                    ("route", self.route(hit)),
                ] {
                    if let Some(v) = v {
                        rec.push_str(&format!(" {k}={v}"));
                    }
                }
                e.record = Some(rec);
                if let Some(i) = info {
                    e.claims.push(i.origin);
                }
                for x in excluded.iter().filter(|x| x.reason == Reason::ConflictLost) {
                    e.claims.push(format!("{} (lost: {})", x.origin, x.detail));
                }
                // The conflict's losers are claims of a hit, not exclusions.
                e.excluded.retain(|l| !l.ends_with("(conflict_lost)"));
            }
            Verdict::Reject(Reject::Exception) => {
                e.step = "4: listed in an exceptions source: rejected whatever the directory says"
                    .into();
                for x in excluded.iter().filter(|x| x.reason == Reason::Exception) {
                    e.claims.push(x.origin.clone());
                }
            }
            Verdict::Reject(Reject::UnknownUser) => {
                e.step = if e.excluded.is_empty() {
                    "8: not in any source, not a tombstone: 550 User unknown".into()
                } else {
                    "8: not in the directory: a source listed it, but the build left it out (see excluded)".into()
                };
                if let (Some(a), Some(d)) = (&parsed, &domain) {
                    let local = a.rsplit_once('@').map_or("", |(l, _)| l);
                    e.similar = self.similar(local, d, 5);
                }
            }
        }
        e
    }

    /// Everything the build left out under this address (a scan that only allocates for
    /// the records that match; the list is sorted, so it stops past the address).
    pub fn excluded_for(&self, address: &str) -> Vec<Excluded> {
        match self.segments() {
            Some(parts) => parts.iter().flat_map(|p| p.excluded_for(address)).collect(),
            None => find(self.excluded_bytes(), address),
        }
    }

    /// Read (and check) the `excluded` section now, so the first `explain` does not wait on
    /// the disk; the loader does it after every build.
    pub fn prefetch_excluded(&self) {
        match self.segments() {
            Some(parts) => parts.iter().for_each(|p| p.prefetch_excluded()),
            None => drop(self.excluded_bytes()),
        }
    }

    /// How many addresses the build left out, by reason.
    pub fn excluded_counts(&self) -> Vec<(Reason, u64)> {
        let Some(parts) = self.segments() else {
            return decode(self.excluded_bytes()).0;
        };
        let mut sum: Vec<(Reason, u64)> = Vec::new();
        for (r, n) in parts.iter().flat_map(|p| p.excluded_counts()) {
            match sum.iter_mut().find(|(s, _)| *s == r) {
                Some((_, m)) => *m += n,
                None => sum.push((r, n)),
            }
        }
        sum.sort_by_key(|&(r, _)| r as u8);
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_round_trips_and_is_capped() {
        let mut list: Vec<Excluded> = (0..CAP + 10)
            .map(|i| Excluded {
                address: format!("u{i:06}@contoso.com"),
                reason: Reason::Disabled,
                origin: format!("ad (CN=u{i})"),
                detail: String::new(),
            })
            .collect();
        list.push(Excluded {
            address: "bad..x@contoso.com".into(),
            reason: Reason::InvalidSyntax,
            origin: "dir.map:3:17".into(),
            detail: "consecutive dots".into(),
        });
        let bytes = encode(list);
        let (counts, records) = decode(&bytes);
        assert_eq!(
            counts,
            [
                (Reason::InvalidSyntax, 1),
                (Reason::Disabled, CAP as u64 + 10)
            ]
        );
        assert_eq!(records.len(), CAP + 1);
        assert_eq!(records[0].address, "bad..x@contoso.com");
        assert_eq!(records[0].detail, "consecutive dots");
        // Truncated bytes end the list, never panic.
        for cut in [0, 3, 7, 20, bytes.len() / 2] {
            let _ = decode(&bytes[..cut]);
        }
    }

    #[test]
    fn distances() {
        assert_eq!(distance("contoso.com", "contoso.com"), 0);
        assert_eq!(distance("contosso.com", "contoso.com"), 1);
        assert_eq!(distance("cnotoso.com", "contoso.com"), 2);
    }
}
