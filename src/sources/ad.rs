//! The Active Directory entry mapper, shared by LDIF files and the live LDAPS source.
//!
//! From one directory object (`mail`, `proxyAddresses`, `objectClass`, `userAccountControl`,
//! `msExchRecipientTypeDetails`) to the addresses it receives mail at:
//! - `proxyAddresses`: `SMTP:` is the primary, `smtp:` are aliases, other prefixes (`X500:`,
//!   `SIP:`, `EUM:`, …) are ignored; without an `SMTP:` value, `mail` is the primary.
//! - kind from `msExchRecipientTypeDetails` when present, else from `objectClass`.
//! - a disabled account (`userAccountControl` bit 0x2) that is mail-enabled is a shared
//!   mailbox: kept always when Exchange says so, else kept unless `include_disabled = false`.
//! - `userPrincipalName` is a login name and never becomes a recipient.

use std::sync::Arc;

use super::{Diagnostic, Entry, Location, directory_address, join_key};
use crate::directory::Kind;

#[derive(Debug, Clone)]
/// How Active Directory entries map to recipients.
pub struct AdOptions {
    /// Keep mail-enabled disabled accounts that Exchange does not mark as shared.
    pub include_disabled: bool,
}

impl Default for AdOptions {
    fn default() -> Self {
        AdOptions {
            include_disabled: true,
        }
    }
}

/// One directory object: its DN and attribute values, each with the line it came from
/// (0 when not from a file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirEntry {
    /// Its distinguished name.
    pub dn: String,
    /// Line in the LDIF file (0 for live LDAP).
    pub line: u32,
    /// Attributes: (name, value, line).
    pub attrs: Vec<(String, String, u32)>,
}

impl DirEntry {
    /// Values of an attribute, compared case-insensitively (servers vary the casing).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, u32)> + 'a {
        self.attrs
            .iter()
            .filter(move |(n, _, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v, l)| (v.as_str(), *l))
    }

    /// The first value of an attribute (case-insensitive name).
    pub fn first(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v, _)| v.as_str())
    }
}

/// What the mapper decided for an object.
#[derive(Debug, Default)]
pub struct Mapped {
    /// The recipients.
    pub entries: Vec<Entry>,
    /// What was skipped or doubtful, with its DN.
    pub diagnostics: Vec<Diagnostic>,
    /// Why the object gives no addresses (no mail attributes, computer, disabled, ...).
    pub skipped: Option<&'static str>,
    /// The addresses it would have had, when it is skipped for a reason other than having
    /// none (for `explain`).
    pub excluded: Vec<crate::directory::explain::Excluded>,
}

/// The addresses an object lists (`mail`, `SMTP:`/`smtp:` proxy addresses), valid ones only.
pub fn listed_addresses(entry: &DirEntry) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let proxies = entry.values("proxyAddresses").filter_map(|(v, _)| {
        let (p, a) = v.split_once(':')?;
        p.eq_ignore_ascii_case("smtp").then_some(a)
    });
    for v in entry.values("mail").map(|(v, _)| v).chain(proxies) {
        if let Ok((l, d)) = directory_address(v.trim()) {
            let a = join_key(&l, &d);
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// `explain` records for every address of a skipped object.
pub fn exclusions(
    entry: &DirEntry,
    file: &Arc<str>,
    reason: crate::directory::explain::Reason,
    detail: &str,
) -> Vec<crate::directory::explain::Excluded> {
    listed_addresses(entry)
        .into_iter()
        .map(|address| crate::directory::explain::Excluded {
            address,
            reason,
            origin: format!("{} ({})", Location::new(file, entry.line, 0), entry.dn),
            detail: detail.to_owned(),
        })
        .collect()
}

/// `msExchRecipientTypeDetails` values we recognise.
fn kind_from_exchange(v: u64) -> Option<Kind> {
    Some(match v {
        1 | 2 | 8 | 128 | 0x8000_0000 => Kind::User,
        4 | 16 | 32 | 0x2_0000_0000 | 0x4_0000_0000 | 0x8_0000_0000 => Kind::Shared,
        64 => Kind::Contact,
        256 | 512 | 1024 | 2048 | 0x10000000 | 0x40000000 => Kind::Group,
        4096 | 0x10_0000_0000 => Kind::PublicFolder,
        _ => return None,
    })
}

fn kind_from_classes(entry: &DirEntry) -> Option<Kind> {
    let mut kind = None;
    for (c, _) in entry.values("objectClass") {
        match c.to_ascii_lowercase().as_str() {
            "computer" => return None,
            "contact" => return Some(Kind::Contact),
            "group" | "groupofnames" | "groupofuniquenames" => kind = Some(Kind::Group),
            "msexchdynamicdistributionlist" => kind = Some(Kind::Group),
            "publicfolder" => kind = Some(Kind::PublicFolder),
            "user" | "person" | "inetorgperson" | "organizationalperson" => {
                kind = kind.or(Some(Kind::User))
            }
            _ => {}
        }
    }
    kind
}

/// Map one directory object to its addresses.
pub fn map_entry(entry: &DirEntry, file: &Arc<str>, opts: &AdOptions) -> Mapped {
    let mut out = Mapped::default();
    let dn = Some(entry.dn.as_str());
    let loc = |line: u32| Location::new(file, if line == 0 { entry.line } else { line }, 0);

    let exch = entry
        .first("msExchRecipientTypeDetails")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let exch_kind = exch.and_then(kind_from_exchange);
    let Some(mut kind) = exch_kind.or_else(|| kind_from_classes(entry)) else {
        out.skipped = Some("not a user, group, contact or public folder");
        out.excluded = exclusions(
            entry,
            file,
            crate::directory::explain::Reason::NotRecipient,
            "objectClass",
        );
        return out;
    };
    let disabled = entry
        .first("userAccountControl")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|uac| uac & 2 != 0);
    if disabled && matches!(kind, Kind::User) {
        if !opts.include_disabled {
            out.skipped = Some("disabled account (include_disabled = false)");
            out.excluded = exclusions(
                entry,
                file,
                crate::directory::explain::Reason::Disabled,
                "userAccountControl has ACCOUNTDISABLE",
            );
            return out;
        }
        // Exchange says "user mailbox": keep it as such; otherwise a disabled mail-enabled
        // account is how shared mailboxes look without Exchange attributes.
        if exch_kind.is_none() {
            kind = Kind::Shared;
        }
    }

    let mut primary: Option<(String, String, u32)> = None;
    let mut aliases: Vec<(String, String, u32)> = Vec::new();
    let parse = |v: &str, line: u32, out: &mut Mapped| -> Option<(String, String, u32)> {
        match directory_address(v.trim()) {
            Ok((l, d)) => Some((l, d, line)),
            Err((_, why)) => {
                out.diagnostics.push(
                    Diagnostic::error(loc(line), format!("invalid address {v:?}: {why}; skipped"))
                        .with_dn(dn)
                        .with_subject(v),
                );
                None
            }
        }
    };
    for (v, line) in entry.values("proxyAddresses") {
        let Some((prefix, addr)) = v.split_once(':') else {
            continue;
        };
        if prefix == "SMTP" {
            if primary.is_some() {
                out.diagnostics.push(
                    Diagnostic::warning(
                        loc(line),
                        format!("second primary SMTP:{addr}; kept as an alias"),
                    )
                    .with_dn(dn),
                );
                aliases.extend(parse(addr, line, &mut out));
            } else {
                primary = parse(addr, line, &mut out);
            }
        } else if prefix.eq_ignore_ascii_case("smtp") {
            aliases.extend(parse(addr, line, &mut out));
        }
    }
    if let Some((mail, line)) = entry.values("mail").next() {
        match (&primary, parse(mail, line, &mut out)) {
            (None, Some(m)) => primary = Some(m),
            (Some(p), Some(m)) if join_key(&p.0, &p.1) != join_key(&m.0, &m.1) => aliases.push(m),
            _ => {}
        }
    }
    let Some((pl, pd, pline)) = primary else {
        if !aliases.is_empty() {
            out.diagnostics.push(
                Diagnostic::warning(loc(0), "aliases without a primary address; skipped")
                    .with_dn(dn),
            );
        }
        out.skipped = Some("no mail address");
        return out;
    };
    let owner = join_key(&pl, &pd);
    let mk = |local, domain, line, owner| Entry::new(local, domain, kind, owner, loc(line), dn);
    out.entries.push(mk(pl, pd, pline, None));
    let mut seen = vec![owner.clone()];
    for (l, d, line) in aliases {
        let key = join_key(&l, &d);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        out.entries.push(mk(l, d, line, Some(owner.clone())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(attrs: &[(&str, &str)]) -> DirEntry {
        DirEntry {
            dn: "CN=Test,OU=AADDC Users,DC=corp,DC=example".into(),
            line: 10,
            attrs: attrs
                .iter()
                .enumerate()
                .map(|(i, (n, v))| (n.to_string(), v.to_string(), 11 + i as u32))
                .collect(),
        }
    }

    fn addrs(m: &Mapped) -> Vec<(String, Kind)> {
        m.entries
            .iter()
            .map(|e| (format!("{}@{}", e.local, e.domain), e.kind))
            .collect()
    }

    fn file() -> Arc<str> {
        Arc::from("x.ldif")
    }

    #[test]
    fn proxy_addresses_primary_aliases_and_noise() {
        let e = entry(&[
            ("objectClass", "user"),
            ("mail", "alice@corp.example"),
            ("proxyAddresses", "SMTP:Alice@corp.example"),
            ("proxyAddresses", "smtp:a.smith@corp.example"),
            ("proxyAddresses", "X500:/o=Org/ou=Exchange/cn=alice"),
            ("proxyAddresses", "SIP:alice@corp.example"),
            ("userPrincipalName", "alice.login@corp.example"),
        ]);
        let m = map_entry(&e, &file(), &AdOptions::default());
        assert_eq!(
            addrs(&m),
            vec![
                ("Alice@corp.example".into(), Kind::User),
                ("a.smith@corp.example".into(), Kind::Alias)
            ]
        );
        assert_eq!(m.entries[1].owner.as_deref(), Some("alice@corp.example"));
        assert_eq!(m.entries[1].loc.to_string(), "x.ldif:14");
    }

    #[test]
    fn disabled_accounts_and_exchange_types() {
        let shared = entry(&[
            ("objectClass", "user"),
            ("userAccountControl", "546"),
            ("mail", "info@corp.example"),
        ]);
        let m = map_entry(&shared, &file(), &AdOptions::default());
        assert_eq!(addrs(&m), vec![("info@corp.example".into(), Kind::Shared)]);
        let off = AdOptions {
            include_disabled: false,
        };
        assert!(map_entry(&shared, &file(), &off).entries.is_empty());
        let exch_shared = entry(&[
            ("objectClass", "user"),
            ("userAccountControl", "514"),
            ("msExchRecipientTypeDetails", "4"),
            ("mail", "desk@corp.example"),
        ]);
        let m = map_entry(&exch_shared, &file(), &off);
        assert_eq!(addrs(&m), vec![("desk@corp.example".into(), Kind::Shared)]);
        let room = entry(&[
            ("objectClass", "user"),
            ("msExchRecipientTypeDetails", "16"),
            ("mail", "room1@corp.example"),
        ]);
        assert_eq!(
            map_entry(&room, &file(), &off).entries[0].kind,
            Kind::Shared
        );
        let ddg = entry(&[
            ("objectClass", "msExchDynamicDistributionList"),
            ("msExchRecipientTypeDetails", "2048"),
            ("mail", "all@corp.example"),
        ]);
        assert_eq!(map_entry(&ddg, &file(), &off).entries[0].kind, Kind::Group);
        let pf = entry(&[
            ("objectClass", "publicFolder"),
            ("msExchRecipientTypeDetails", "4096"),
            ("mail", "pf@corp.example"),
        ]);
        assert_eq!(
            map_entry(&pf, &file(), &off).entries[0].kind,
            Kind::PublicFolder
        );
    }

    #[test]
    fn groups_contacts_computers_and_no_mail() {
        let g = entry(&[
            ("objectClass", "top"),
            ("objectClass", "group"),
            ("mail", "sales@corp.example"),
        ]);
        assert_eq!(
            map_entry(&g, &file(), &AdOptions::default()).entries[0].kind,
            Kind::Group
        );
        let c = entry(&[
            ("objectClass", "contact"),
            ("mail", "partner@elsewhere.example"),
        ]);
        assert_eq!(
            map_entry(&c, &file(), &AdOptions::default()).entries[0].kind,
            Kind::Contact
        );
        let pc = entry(&[
            ("objectClass", "user"),
            ("objectClass", "computer"),
            ("mail", "pc@corp.example"),
        ]);
        assert!(
            map_entry(&pc, &file(), &AdOptions::default())
                .entries
                .is_empty()
        );
        let nomail = entry(&[
            ("objectClass", "user"),
            ("userPrincipalName", "bob@corp.example"),
        ]);
        let m = map_entry(&nomail, &file(), &AdOptions::default());
        assert!(m.entries.is_empty());
        assert_eq!(m.skipped, Some("no mail address"));
    }

    #[test]
    fn bad_address_is_reported_with_line_and_dn() {
        let e = entry(&[
            ("objectClass", "user"),
            ("proxyAddresses", "SMTP:bad address@corp.example"),
            ("mail", "ok@corp.example"),
        ]);
        let m = map_entry(&e, &file(), &AdOptions::default());
        assert_eq!(addrs(&m), vec![("ok@corp.example".into(), Kind::User)]);
        let d = m.diagnostics[0].to_string();
        assert!(d.starts_with("x.ldif:12: error: invalid address"), "{d}");
        assert!(
            d.ends_with("(dn: CN=Test,OU=AADDC Users,DC=corp,DC=example)"),
            "{d}"
        );
    }
}
