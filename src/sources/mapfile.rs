//! The MAP format that directory-sync agents upload to email-security gateways.
//!
//! ```text
//! 12345|contoso.com<TAB>DOMAIN:<TAB>contoso.com[<TAB>key=value...]
//! 12345|contoso.com<TAB>DIR:<TAB>alice@contoso.com
//! 12345|contoso.com<TAB>MAP:<TAB>al@contoso.com<TAB>alice@contoso.com
//! 12345|contoso.com<TAB>PROFILE:<TAB>alice@contoso.com<TAB>executives
//! 12345|contoso.com<TAB>UCFG:<TAB>alice@contoso.com<TAB>route=smtp:[mx.onprem.example]:25
//! 12345|contoso.com<TAB>P13N:<TAB>alice@contoso.com<TAB>lang=de
//! ++++
//! ```
//! Only addresses with a `DIR:` record are accepted. The last line must be `++++`; without it
//! the file is an upload in progress or cut off, and it is refused as a whole.
//!
//! rcptgate extensions, all optional: `DOMAIN:` fields `accept_all=yes`, `keep_case=yes`,
//! `profile=NAME`, `route=NEXTHOP`; `UCFG:` key `kind=group|shared|contact|public_folder`;
//! lines starting with `#` are comments.

use std::collections::hash_map::Entry as Slot;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::Arc;

use super::{
    Diagnostic, DomainDecl, Entry, Format, Location, Prehashed, SourceData, SourceError,
    directory_address_in, directory_address_in_domain, join_key, parse_flag,
};
use crate::address::{self, AddrBuf};
use crate::directory::Kind;

/// The end-of-data marker.
pub const TRAILER: &str = "++++";
/// Longest line accepted (a line longer than this is an error, not a crash).
pub const MAX_LINE: usize = 64 * 1024;

/// Per-address settings gathered from MAP:, PROFILE:, UCFG: and P13N: records.
#[derive(Default)]
struct Extra {
    owner: Option<(String, Location)>,
    profile: Option<String>,
    route: Option<String>,
    kind: Option<Kind>,
    attributes: Vec<String>,
    loc: Option<Location>,
}

struct Dir {
    local: String,
    /// Index in the parse's table of line domains.
    domain: u32,
    loc: Location,
}

/// The `DIR:` records of a file by their folded `local@domain` key, without a copy of the key:
/// a seeded hash of it to the first record with that hash, chained through `next`.
struct DirIndex {
    hasher: foldhash::fast::RandomState,
    heads: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    next: Vec<u32>,
    /// Scratch for a candidate's key.
    scratch: Vec<u8>,
}

impl DirIndex {
    fn new(capacity: usize) -> DirIndex {
        DirIndex {
            hasher: Default::default(),
            heads: HashMap::with_capacity_and_hasher(capacity, Default::default()),
            next: Vec::with_capacity(capacity),
            scratch: Vec::with_capacity(128),
        }
    }

    /// The record whose folded key is `key`.
    fn find(&mut self, key: &[u8], dirs: &[Dir], domains: &[String]) -> Option<usize> {
        let head = self.heads.get(&self.hasher.hash_one(key)).copied()?;
        chain(&self.next, &mut self.scratch, head, key, dirs, domains)
    }

    /// The record whose folded key is `key`, or `None` after recording that the next record,
    /// `dirs[dirs.len()]`, has it.
    fn find_or_insert(&mut self, key: &[u8], dirs: &[Dir], domains: &[String]) -> Option<usize> {
        let index = dirs.len() as u32;
        debug_assert_eq!(self.next.len(), dirs.len());
        match self.heads.entry(self.hasher.hash_one(key)) {
            Slot::Vacant(v) => {
                v.insert(index);
                self.next.push(u32::MAX);
                None
            }
            Slot::Occupied(mut o) => {
                let head = *o.get();
                let (next, scratch) = (&self.next, &mut self.scratch);
                if let Some(i) = chain(next, scratch, head, key, dirs, domains) {
                    return Some(i);
                }
                o.insert(index);
                self.next.push(head);
                None
            }
        }
    }
}

/// Follow a chain of `DirIndex` from `head` to the record whose key is `key`.
fn chain(
    next: &[u32],
    scratch: &mut Vec<u8>,
    head: u32,
    key: &[u8],
    dirs: &[Dir],
    domains: &[String],
) -> Option<usize> {
    let mut at = head;
    while at != u32::MAX {
        let d = &dirs[at as usize];
        scratch.clear();
        append_key(&d.local, &domains[d.domain as usize], scratch);
        if scratch.as_slice() == key {
            return Some(at as usize);
        }
        at = next[at as usize];
    }
    None
}

/// An address field `v` (at 0-based column `c`) as `directory_address` parsed it, checked to
/// be in the line's domain.
fn in_line_domain<L, D: AsRef<str>>(
    v: &str,
    c: usize,
    parsed: Result<(L, D), (usize, String)>,
    line_domain: &str,
    at: &dyn Fn(usize) -> Location,
) -> Result<(L, D), Diagnostic> {
    let (local, domain) = parsed.map_err(|(off, why)| {
        Diagnostic::error(at(c + off), format!("invalid address {v:?}: {why}")).with_subject(v)
    })?;
    if domain.as_ref() != line_domain {
        return Err(Diagnostic::error(
            at(c),
            format!("address {v:?} is not in the line's domain {line_domain}"),
        ));
    }
    Ok((local, domain))
}

/// Append the folded `local@domain` join key (as [`super::join_key`] makes it) to `out`.
fn append_key(local: &str, domain: &str, out: &mut Vec<u8>) {
    address::fold_local_into(local, false, out);
    out.push(b'@');
    out.extend_from_slice(domain.as_bytes());
}

/// Parse a whole MAP file. `Err` when the file must be refused (no `++++` trailer).
pub fn parse(name: &Arc<str>, text: &str) -> Result<SourceData, SourceError> {
    let mut out = SourceData::new(name, Format::Map);
    // Sized for a file of directory lines (~50 bytes each), the common case.
    let lines_guess = text.len() / 50;
    let mut dirs: Vec<Dir> = Vec::with_capacity(lines_guess);
    let mut dir_index = DirIndex::new(lines_guess);
    // The line domains seen, by index (a `Dir` names its domain by index).
    let mut line_domains: Vec<String> = Vec::new();
    let mut line_domain_ids: FastMap<String, u32> = new_map(0);
    let mut abuf = AddrBuf::default();
    let mut key: Vec<u8> = Vec::with_capacity(128);
    let mut extra: FastMap<String, Extra> = new_map(0);
    let mut declared: FastMap<String, usize> = new_map(0);
    let mut undeclared: FastMap<String, Location> = new_map(0);
    let mut fields: Vec<(&str, usize)> = Vec::with_capacity(8);
    // Each raw line domain normalized once (not once per line: the lines of a domain need not
    // come together): its index in `line_domains`, or why it is invalid.
    let mut raw_domains: FastMap<&str, Result<u32, String>> = new_map(0);
    let mut last_raw: Option<(&str, u32)> = None;
    let mut trailer: Option<u32> = None;
    let mut last_line = 0;

    for (i, raw) in split_bytes(text, b'\n').enumerate() {
        let lineno = i as u32 + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let at = |col: usize| Location::new(name, lineno, col as u32 + 1);
        let whole = || Location::new(name, lineno, 0);
        if line.trim().is_empty() {
            continue;
        }
        last_line = lineno;
        if let Some(t) = trailer {
            out.diagnostics.push(Diagnostic::error(
                whole(),
                format!("data after the {TRAILER} end marker on line {t}; ignored"),
            ));
            continue;
        }
        if line.trim() == TRAILER {
            trailer = Some(lineno);
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.len() > MAX_LINE {
            out.diagnostics.push(Diagnostic::error(
                whole(),
                format!("line of {} bytes is longer than {MAX_LINE}", line.len()),
            ));
            continue;
        }
        split_fields(line, &mut fields);
        let Some(&(head, head_col)) = fields.first() else {
            continue;
        };
        let Some((customer, line_domain)) = head.split_once('|') else {
            out.diagnostics.push(Diagnostic::error(
                at(head_col),
                "line does not start with CUSTOMERID|domain",
            ));
            continue;
        };
        let customer = customer.trim();
        if customer.is_empty() {
            out.diagnostics
                .push(Diagnostic::error(at(head_col), "empty customer ID"));
            continue;
        }
        let dom_col = head_col + customer.len() + 1;
        // A domain's lines usually come in runs: the last line's domain is kept at hand.
        let id = match last_raw {
            Some((raw, id)) if raw == line_domain => id,
            _ => match raw_domains.entry(line_domain).or_insert_with(|| {
                let d = address::normalize_domain(line_domain).map_err(|e| e.to_string())?;
                let next = line_domains.len() as u32;
                let id = *line_domain_ids.entry(d).or_insert_with_key(|d| {
                    line_domains.push(d.clone());
                    next
                });
                Ok(id)
            }) {
                Ok(id) => {
                    last_raw = Some((line_domain, *id));
                    *id
                }
                Err(e) => {
                    out.diagnostics.push(Diagnostic::error(
                        at(dom_col),
                        format!("invalid domain {line_domain:?}: {e}"),
                    ));
                    continue;
                }
            },
        };
        let (line_domain, line_domain_id): (&str, u32) = (&line_domains[id as usize], id);
        let Some(&(rtype, rcol)) = fields.get(1) else {
            out.diagnostics.push(Diagnostic::error(
                at(line.len()),
                "missing record type (DOMAIN:, DIR:, MAP:, PROFILE:, UCFG:, P13N:)",
            ));
            continue;
        };
        let args = &fields[2..];
        let arg = |n: usize| args.get(n).copied();
        let need = |n: usize, what: &str| -> Result<(&str, usize), Diagnostic> {
            match arg(n) {
                Some((v, c)) if !v.is_empty() => Ok((v, c)),
                _ => Err(Diagnostic::error(
                    at(line.len()),
                    format!("{rtype} record needs {what}"),
                )),
            }
        };
        // The join key of an address field that must belong to the line's domain.
        let addr = |(v, c): (&str, usize), abuf: &mut AddrBuf| -> Result<String, Diagnostic> {
            let parsed = directory_address_in_domain(v, line_domain, abuf);
            let (l, d) = in_line_domain(v, c, parsed, line_domain, &at)?;
            Ok(join_key(l, d))
        };
        let result: Result<(), Diagnostic> = (|| {
            match rtype {
                "DOMAIN:" => {
                    let (v, c) = need(0, "the domain")?;
                    let d = address::normalize_domain(v).map_err(|e| {
                        Diagnostic::error(at(c), format!("invalid domain {v:?}: {e}"))
                    })?;
                    if d != line_domain {
                        return Err(Diagnostic::error(
                            at(c),
                            format!("DOMAIN: {d} differs from the line's domain {line_domain}"),
                        ));
                    }
                    if let Some(&first) = declared.get(&d) {
                        let first_loc = &out.domains[first].loc;
                        return Err(Diagnostic::warning(
                            at(rcol),
                            format!("domain {d} declared again (first on {first_loc}); ignored"),
                        ));
                    }
                    let mut decl = DomainDecl::new(d.clone(), at(rcol));
                    decl.customer = Some(customer.to_owned());
                    for &(kv, c) in &args[1..] {
                        domain_option(&mut decl, kv).map_err(|m| Diagnostic::warning(at(c), m))?;
                    }
                    declared.insert(d, out.domains.len());
                    out.domains.push(decl);
                }
                "DIR:" => {
                    // The `addr` checks without a copy of the address until it is kept.
                    let (v, c) = need(0, "an address")?;
                    let parsed = directory_address_in_domain(v, line_domain, &mut abuf);
                    let (local, domain) = in_line_domain(v, c, parsed, line_domain, &at)?;
                    key.clear();
                    append_key(local, domain, &mut key);
                    if let Some(first) = dir_index.find_or_insert(&key, &dirs, &line_domains) {
                        return Err(Diagnostic::warning(
                            at(rcol),
                            format!(
                                "{} listed again (first on {}); ignored",
                                String::from_utf8_lossy(&key),
                                dirs[first].loc
                            ),
                        ));
                    }
                    if !declared.contains_key(domain) {
                        undeclared.entry(domain.to_owned()).or_insert_with(whole);
                    }
                    dirs.push(Dir {
                        local: local.to_owned(),
                        domain: line_domain_id,
                        loc: at(c),
                    });
                }
                "MAP:" => {
                    let alias = addr(need(0, "an alias address")?, &mut abuf)?;
                    let (pv, pc) = need(1, "a primary address")?;
                    let (pl, pd) = directory_address_in(pv, &mut abuf).map_err(|(off, why)| {
                        Diagnostic::error(at(pc + off), format!("invalid address {pv:?}: {why}"))
                    })?;
                    let owner = join_key(pl, pd);
                    let e = extra.entry(alias).or_default();
                    e.owner = Some((owner, at(pc)));
                    e.loc.get_or_insert(at(rcol));
                }
                "PROFILE:" => {
                    let key = addr(need(0, "an address")?, &mut abuf)?;
                    let (p, _) = need(1, "a profile name")?;
                    let e = extra.entry(key).or_default();
                    e.profile = Some(p.to_owned());
                    e.loc.get_or_insert(at(rcol));
                }
                "UCFG:" | "P13N:" => {
                    let key = addr(need(0, "an address")?, &mut abuf)?;
                    let e = extra.entry(key).or_default();
                    e.loc.get_or_insert(at(rcol));
                    for &(kv, c) in &args[1..] {
                        let Some((k, v)) = kv.split_once('=') else {
                            return Err(Diagnostic::error(
                                at(c),
                                format!("expected key=value, found {kv:?}"),
                            ));
                        };
                        match (rtype, k.trim()) {
                            ("UCFG:", "route") => e.route = Some(v.trim().to_owned()),
                            ("UCFG:", "kind") => {
                                e.kind = Some(Kind::parse(v.trim()).ok_or_else(|| {
                                    Diagnostic::error(at(c), format!("unknown kind {v:?}"))
                                })?)
                            }
                            _ => e.attributes.push(kv.to_owned()),
                        }
                    }
                }
                other => {
                    return Err(Diagnostic::error(
                        at(rcol),
                        format!(
                            "unknown record type {other:?} (expected DOMAIN:, DIR:, MAP:, PROFILE:, UCFG: or P13N:)"
                        ),
                    ));
                }
            }
            Ok(())
        })();
        if let Err(d) = result {
            out.diagnostics.push(d);
        }
    }

    if trailer.is_none() {
        return Err(SourceError::Refused(
            Location::new(name, last_line, 0),
            format!(
                "no {TRAILER} end marker: the file is incomplete (upload in progress or cut off); refused"
            ),
        ));
    }

    for (domain, loc) in &undeclared {
        if !declared.contains_key(domain) {
            out.diagnostics.push(Diagnostic::error(
                loc.clone(),
                format!("domain {domain} has DIR: records but no DOMAIN: record; its addresses are ignored"),
            ));
        }
    }

    // Each record's MAP:, PROFILE:, UCFG: and P13N: lines, by its DIR: line (those of a
    // DIR: line in an undeclared domain are left, as of no DIR: line).
    let is_declared: Vec<bool> = line_domains
        .iter()
        .map(|d| declared.contains_key(d))
        .collect();
    let mut extra_of: Vec<u32> = vec![u32::MAX; dirs.len()];
    let mut extras: Vec<(String, Extra)> = Vec::new();
    let mut orphans: Vec<(String, Location)> = Vec::new();
    for (key, x) in extra {
        match dir_index.find(key.as_bytes(), &dirs, &line_domains) {
            Some(i) if is_declared[dirs[i].domain as usize] => {
                extra_of[i] = extras.len() as u32;
                extras.push((key, x));
            }
            _ => orphans.extend(x.loc.map(|l| (key, l))),
        }
    }
    drop(dir_index);
    // One copy of each domain, shared by its entries.
    let shared: Vec<Arc<str>> = line_domains.iter().map(|d| Arc::from(d.as_str())).collect();
    out.entries.reserve(dirs.len());
    for (i, d) in dirs.into_iter().enumerate() {
        if !is_declared[d.domain as usize] {
            continue;
        }
        let (key, x) = match extras.get_mut(extra_of[i] as usize) {
            Some(e) => std::mem::take(e),
            None => Default::default(),
        };
        let object = x.kind.unwrap_or(Kind::User);
        let owner = x.owner.map(|(o, _)| o).filter(|o| *o != key);
        let domain = Arc::clone(&shared[d.domain as usize]);
        let mut e = Entry::new(d.local, domain, object, owner, d.loc, None);
        e.profile = x.profile;
        e.route = x.route;
        e.attributes = (!x.attributes.is_empty()).then(|| x.attributes.join("\t"));
        out.entries.push(e);
    }
    for (key, loc) in orphans {
        out.diagnostics.push(Diagnostic::warning(
            loc,
            format!("{key} has no DIR: record, so it is not accepted; record ignored"),
        ));
    }
    out.diagnostics.sort_by_key(|d| (d.loc.line, d.loc.column));
    Ok(out)
}

/// A set of domain names.
pub type Domains = HashSet<Box<str>>;

/// The domains of a MAP upload without parsing its records: those its `DOMAIN:` lines
/// declare, and the domain of every line. A superset of what [`parse`] makes of the same
/// text (a line it refuses still counts), at a fraction of its cost: enough to tell which
/// sources share domains before reading them for real. `None` for an upload without its end
/// marker (which [`parse`] refuses).
pub fn scan_domains(text: &str) -> Option<(Domains, Domains)> {
    let (mut declared, mut touched) = (HashSet::new(), HashSet::new());
    // Each raw line domain normalized once (`None`: invalid), by index; the last one's
    // index kept (a domain's lines usually come together).
    let mut normalized: Vec<Option<Box<str>>> = Vec::new();
    let mut index: FastMap<&str, usize> = new_map(0);
    let mut last: (&str, usize) = ("", usize::MAX);
    for raw in split_bytes(text, b'\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        // Only a line that does not start with a letter or digit can trim to the marker.
        if !line
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphanumeric)
            && line.trim() == TRAILER
        {
            return Some((declared, touched));
        }
        if line.starts_with('#') || line.len() > MAX_LINE {
            continue;
        }
        let (head, rest) = match memchr::memchr(b'\t', line.as_bytes()) {
            Some(t) => (&line[..t], &line[t + 1..]),
            None => (line, ""),
        };
        let Some((_, raw_domain)) = head.split_once('|') else {
            continue;
        };
        if raw_domain != last.0 || last.1 == usize::MAX {
            let i = *index.entry(raw_domain).or_insert_with(|| {
                let d = address::normalize_domain(raw_domain.trim_end_matches(' ')).ok();
                let d: Option<Box<str>> = d.map(String::into_boxed_str);
                if let Some(d) = &d {
                    touched.insert(d.clone());
                }
                normalized.push(d);
                normalized.len() - 1
            });
            last = (raw_domain, i);
        }
        if rest.starts_with("DOMAIN:")
            && let Some(Some(d)) = normalized.get(last.1)
            && rest.split('\t').next().map(|f| f.trim_end_matches(' ')) == Some("DOMAIN:")
        {
            declared.insert(d.clone());
        }
    }
    None
}

/// Split a line at TABs into `out`, keeping each field's 0-based byte column.
fn split_fields<'a>(line: &'a str, out: &mut Vec<(&'a str, usize)>) {
    out.clear();
    let mut col = 0;
    for f in split_bytes(line, b'\t') {
        out.push((f.trim_end_matches(' '), col));
        col += f.len() + 1;
    }
}

/// `text.split(sep as char)` for an ASCII `sep`, found with `memchr` (`str::split`'s search
/// for a `char`, one call per piece, was a sixth of the parse's samples in a profile).
fn split_bytes(text: &str, sep: u8) -> impl Iterator<Item = &str> {
    debug_assert!(sep.is_ascii());
    let mut start = 0;
    memchr::memchr_iter(sep, text.as_bytes())
        .chain(std::iter::once(text.len()))
        .map(move |end| {
            // An ASCII byte is never inside a UTF-8 sequence: both ends are char boundaries.
            let piece = &text[start..end];
            start = end + 1;
            piece
        })
}

/// The parser's tables: keyed by what an uploaded file says, so hashed with a seed of the
/// process's own (`foldhash`'s random state), not predictable from the file.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

fn new_map<K, V>(capacity: usize) -> FastMap<K, V> {
    HashMap::with_capacity_and_hasher(capacity, foldhash::fast::RandomState::default())
}

fn domain_option(decl: &mut DomainDecl, kv: &str) -> Result<(), String> {
    let Some((k, v)) = kv.split_once('=') else {
        return Err(format!("expected key=value, found {kv:?}; ignored"));
    };
    let flag =
        |v: &str| parse_flag(v).ok_or_else(|| format!("{k}: expected yes or no, found {v:?}"));
    match k.trim() {
        "accept_all" => decl.accept_all = flag(v)?,
        "keep_case" => decl.keep_case = flag(v)?,
        "profile" => decl.profile = Some(v.trim().to_owned()),
        "route" => decl.route = Some(v.trim().to_owned()),
        other => return Err(format!("unknown DOMAIN: option {other:?}; ignored")),
    }
    Ok(())
}

/// Write a source's addresses as a MAP upload (what sync agents send to gateways): a
/// `DOMAIN:` line per accepted domain, `DIR:` for every address in one, `MAP:` from alias to
/// primary, `UCFG: kind=` for everything but plain users, `++++` at the end. `domains` are
/// the accepted domains; without any, those of the source's users, groups and shared
/// mailboxes.
pub fn write(data: &SourceData, customer: &str, domains: &[String]) -> String {
    use std::collections::BTreeSet;
    use std::fmt::Write;
    let accepted: BTreeSet<&str> = if domains.is_empty() {
        data.entries
            .iter()
            .filter(|e| super::derives_domain(e.object))
            .map(|e| &*e.domain)
            .collect()
    } else {
        domains.iter().map(String::as_str).collect()
    };
    let mut out = String::new();
    let _ = writeln!(out, "# {} ({} entries)", data.name, data.entries.len());
    for d in &accepted {
        let _ = writeln!(out, "{customer}|{d}\tDOMAIN:\t{d}");
    }
    for e in data
        .entries
        .iter()
        .filter(|e| accepted.contains(&*e.domain))
    {
        let d = &e.domain;
        let addr = format!("{}@{d}", e.local);
        let _ = writeln!(out, "{customer}|{d}\tDIR:\t{addr}");
        if let Some(owner) = &e.owner {
            let _ = writeln!(out, "{customer}|{d}\tMAP:\t{addr}\t{owner}");
        }
        if !matches!(e.object, Kind::User) {
            let _ = writeln!(out, "{customer}|{d}\tUCFG:\t{addr}\tkind={}", e.object);
        }
    }
    out.push_str(TRAILER);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Severity;

    fn name() -> Arc<str> {
        Arc::from("test.map")
    }

    /// Settings of a DIR: line in a domain without a DOMAIN: line are settings of no DIR:
    /// line: warned about, whether they came before or after it.
    #[test]
    fn settings_of_an_undeclared_domain_are_warned_about() {
        let text = "1|one.test\tDOMAIN:\tone.test\n\
                    1|two.test\tMAP:\tx@two.test\ty@two.test\n\
                    1|two.test\tDIR:\ta@two.test\n\
                    1|two.test\tPROFILE:\ta@two.test\tp\n\
                    1|one.test\tDIR:\tb@one.test\n\
                    ++++\n";
        let s = parse(&name(), text).expect("complete");
        let said: Vec<String> = s.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(s.entries.len(), 1, "{said:?}");
        for want in [
            "test.map:2:12: warning: x@two.test has no DIR:",
            "test.map:3: error: domain two.test has DIR: records but no DOMAIN:",
            "test.map:4:12: warning: a@two.test has no DIR:",
        ] {
            assert!(
                said.iter().any(|d| d.starts_with(want)),
                "{want} in {said:?}"
            );
        }
    }

    proptest::proptest! {
        /// The memchr split gives the pieces `str::split` gives, for any text (separators
        /// first, last, doubled, beside multi-byte characters, or none).
        #[test]
        fn split_bytes_is_str_split(text in "[a\t\n\r é€😀|]{0,40}") {
            for sep in [b'\t', b'\n'] {
                let ours: Vec<&str> = split_bytes(&text, sep).collect();
                let std: Vec<&str> = text.split(char::from(sep)).collect();
                proptest::prop_assert_eq!(ours, std);
            }
        }
    }

    /// The scan finds every domain the parse declares or lists addresses in, and no more
    /// than the lines name (here with refused lines, a second domain, a domain without a
    /// `DOMAIN:` line and data after the end marker).
    #[test]
    fn the_domain_scan_covers_the_parse() {
        let text = "\
1|Contoso.COM\tDOMAIN:\tcontoso.com
1|contoso.com\tDIR:\talice@contoso.com
1|contoso.com\tDIR:\tbob@fabrikam.com
1|fabrikam.com \tDOMAIN:\tfabrikam.com\troute=smtp:[mx]:25
1|fabrikam.com\tDIR:\tcarol@fabrikam.com
# 1|commented.example\tDOMAIN:\tcommented.example
1|undeclared.example\tDIR:\tdave@undeclared.example
1|bad domain!\tDIR:\terin@x.example
no bar here
1|contoso.com\tMAP:\tal@contoso.com\talice@contoso.com
++++
1|after.example\tDOMAIN:\tafter.example
";
        let parsed = parse(&name(), text).expect("complete");
        let (declared, touched) = scan_domains(text).expect("complete");
        assert!(scan_domains("1|a.example\tDOMAIN:\ta.example\n").is_none());
        for d in &parsed.domains {
            assert!(declared.contains(d.name.as_str()), "{}", d.name);
        }
        for e in &parsed.entries {
            assert!(touched.contains(&*e.domain), "{}", e.domain);
        }
        let sorted = |s: &HashSet<Box<str>>| {
            let mut v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(sorted(&declared), ["contoso.com", "fabrikam.com"]);
        assert_eq!(
            sorted(&touched),
            ["contoso.com", "fabrikam.com", "undeclared.example"]
        );
    }

    #[test]
    fn every_record_type() {
        let text = "\
1|contoso.com\tDOMAIN:\tcontoso.com\troute=smtp:[mx.onprem.contoso.com]:25
1|contoso.com\tDIR:\talice@contoso.com
1|contoso.com\tDIR:\tal@contoso.com
1|contoso.com\tMAP:\tal@contoso.com\talice@contoso.com
1|contoso.com\tPROFILE:\talice@contoso.com\texecutives
1|contoso.com\tUCFG:\talice@contoso.com\troute=smtp:[cloud.example]:25\tquota=5
1|contoso.com\tP13N:\talice@contoso.com\tlang=de
1|contoso.com\tDIR:\tsales@contoso.com
1|contoso.com\tUCFG:\tsales@contoso.com\tkind=group
++++
";
        let s = parse(&name(), text).expect("complete");
        assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);
        assert_eq!(s.domains.len(), 1);
        assert_eq!(s.domains[0].customer.as_deref(), Some("1"));
        assert_eq!(
            s.domains[0].route.as_deref(),
            Some("smtp:[mx.onprem.contoso.com]:25")
        );
        let alice = &s.entries[0];
        assert_eq!((alice.local.as_str(), alice.kind), ("alice", Kind::User));
        assert_eq!(alice.profile.as_deref(), Some("executives"));
        assert_eq!(alice.route.as_deref(), Some("smtp:[cloud.example]:25"));
        assert_eq!(alice.attributes.as_deref(), Some("quota=5\tlang=de"));
        let al = &s.entries[1];
        assert_eq!(al.kind, Kind::Alias);
        assert_eq!(al.owner.as_deref(), Some("alice@contoso.com"));
        assert_eq!(s.entries[2].kind, Kind::Group);
        assert_eq!(alice.loc.to_string(), "test.map:2:20");
    }

    #[test]
    fn missing_trailer_is_refused() {
        let text = "1|contoso.com\tDOMAIN:\tcontoso.com\n1|contoso.com\tDIR:\ta@contoso.com\n";
        match parse(&name(), text) {
            Err(SourceError::Refused(loc, msg)) => {
                assert_eq!(loc.line, 2);
                assert!(msg.contains("++++"), "{msg}");
            }
            other => panic!("expected refusal, got {other:?}"),
        }
        // A cut-off upload: the marker is not alone on the last line.
        assert!(parse(&name(), "1|contoso.com\tDOMAIN:\tcontoso.com\n++").is_err());
    }

    #[test]
    fn malformed_lines_have_locations() {
        let text = "\
1|contoso.com\tDOMAIN:\tcontoso.com
no pipe here\tDIR:\ta@contoso.com
1|contoso.com\tDIR:\tbad address@contoso.com
1|contoso.com\tDIR:\tb@other.example
1|contoso.com\tBOGUS:\tx
1|contoso.com\tDIR:\tc@contoso.com
1|contoso.com\tDIR:\tC@contoso.com
1|contoso.com\tMAP:\tnodir@contoso.com\tc@contoso.com
2|fabrikam.com\tDIR:\tx@fabrikam.com
++++
1|contoso.com\tDIR:\tlate@contoso.com
";
        let s = parse(&name(), text).expect("complete");
        let msgs: Vec<String> = s.diagnostics.iter().map(|d| d.to_string()).collect();
        let has = |p: &str| msgs.iter().any(|m| m.starts_with(p));
        assert!(has("test.map:2:1: error: line does not start"), "{msgs:#?}");
        assert!(has("test.map:3:23: error: invalid address"), "{msgs:#?}");
        assert!(
            has("test.map:4:20: error: address \"b@other.example\" is not in"),
            "{msgs:#?}"
        );
        assert!(
            has("test.map:5:15: error: unknown record type"),
            "{msgs:#?}"
        );
        assert!(
            has("test.map:7:15: warning: c@contoso.com listed again"),
            "{msgs:#?}"
        );
        assert!(
            has("test.map:8:15: warning: nodir@contoso.com has no DIR:"),
            "{msgs:#?}"
        );
        assert!(
            has("test.map:9: error: domain fabrikam.com has DIR: records but no DOMAIN:"),
            "{msgs:#?}"
        );
        assert!(has("test.map:11: error: data after the ++++"), "{msgs:#?}");
        assert_eq!(s.entries.len(), 1);
        assert!(
            s.diagnostics
                .iter()
                .any(|d| d.severity == Severity::Warning)
        );
    }

    #[test]
    fn records_of_interleaved_domains_keep_their_domain() {
        // Domains declared after their DIR: lines, lines of two domains taking turns, the
        // same local part in both, and a MAP: line for each found by its folded key.
        let text = "\
1|contoso.com\tDIR:\tAnn@contoso.com
2|fabrikam.com\tDIR:\tann@fabrikam.com
1|CONTOSO.com\tDIR:\tbob@contoso.com
1|contoso.com\tDIR:\tann@CONTOSO.COM
2|fabrikam.com\tMAP:\tANN@fabrikam.com\tbob@fabrikam.com
1|contoso.com\tPROFILE:\tann@contoso.com\tsales
2|fabrikam.com\tDOMAIN:\tfabrikam.com
1|contoso.com\tDOMAIN:\tcontoso.com
++++
";
        let s = parse(&name(), text).expect("complete");
        let got: Vec<(String, String, Option<&str>, Option<&str>)> = s
            .entries
            .iter()
            .map(|e| {
                (
                    e.local.clone(),
                    e.domain.to_string(),
                    e.owner.as_deref(),
                    e.profile.as_deref(),
                )
            })
            .collect();
        let rec = |l: &str, d: &str, owner, profile| (l.to_owned(), d.to_owned(), owner, profile);
        assert_eq!(
            got,
            [
                rec("Ann", "contoso.com", None, Some("sales")),
                rec("ann", "fabrikam.com", Some("bob@fabrikam.com"), None),
                rec("bob", "contoso.com", None, None),
            ]
        );
        let msgs: Vec<String> = s.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            msgs,
            [
                "test.map:4:15: warning: ann@contoso.com listed again (first on test.map:1:20); ignored"
            ]
        );
    }

    #[test]
    fn crlf_and_idn_domains() {
        let text = "7|Bücher.example\tDOMAIN:\tbücher.example\r\n7|xn--bcher-kva.example\tDIR:\tJörg@BÜCHER.example\r\n++++\r\n";
        let s = parse(&name(), text).expect("complete");
        assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);
        assert_eq!(s.domains[0].name, "xn--bcher-kva.example");
        assert_eq!(&*s.entries[0].domain, "xn--bcher-kva.example");
        assert_eq!(s.entries[0].local, "Jörg");
    }
}
