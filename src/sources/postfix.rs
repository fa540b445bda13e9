//! Postfix lookup tables in `relay_recipient_maps` style, for migration:
//!
//! ```text
//! # comment
//! alice@contoso.com     OK
//! @fabrikam.com         OK      <- every address in the domain
//! ```
//! A line that starts with whitespace continues the previous one (postmap(1)). The value is
//! not interpreted. Domains of the listed addresses become accepted domains.

use std::sync::Arc;

use super::{Diagnostic, DomainDecl, Entry, Format, Location, SourceData, directory_address};
use crate::address;
use crate::directory::Kind;

/// Parse a Postfix table; bad lines are reported and skipped.
pub fn parse(name: &Arc<str>, text: &str) -> SourceData {
    let mut out = SourceData::new(name, Format::Postfix);
    let mut logical: Vec<(u32, String)> = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t'])
            && let Some((_, prev)) = logical.last_mut()
        {
            prev.push(' ');
            prev.push_str(line.trim());
            continue;
        }
        logical.push((i as u32 + 1, line.to_owned()));
    }
    for (lineno, line) in logical {
        let at = |col: usize| Location::new(name, lineno, col as u32 + 1);
        let key = line.split_whitespace().next().unwrap_or("");
        let col = line.find(key).unwrap_or(0);
        if let Some(domain) = key.strip_prefix('@') {
            match address::normalize_domain(domain) {
                Ok(d) => {
                    let mut decl = DomainDecl::new(d, at(col));
                    decl.accept_all = true;
                    out.domains.push(decl);
                }
                Err(e) => out.diagnostics.push(Diagnostic::error(
                    at(col + 1),
                    format!("invalid domain {domain:?}: {e}"),
                )),
            }
            continue;
        }
        if !key.contains('@') {
            out.diagnostics.push(Diagnostic::error(
                at(col),
                format!("{key:?} is not a full address or @domain; ignored"),
            ));
            continue;
        }
        match directory_address(key) {
            Ok((local, domain)) => {
                out.entries
                    .push(Entry::new(local, domain, Kind::User, None, at(col), None))
            }
            Err((off, why)) => out.diagnostics.push(Diagnostic::error(
                at(col + off),
                format!("invalid address {key:?}: {why}"),
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_domains_continuations_and_errors() {
        let name: Arc<str> = Arc::from("relay_recipients");
        let text = "# migrated\nAlice@Contoso.com OK\n  continued\n@fabrikam.com OK\nbob OK\n  a b@contoso.com OK\n";
        let s = parse(&name, text);
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].local, "Alice");
        assert_eq!(s.entries[0].loc.to_string(), "relay_recipients:2:1");
        assert_eq!(s.domains.len(), 1);
        assert!(s.domains[0].accept_all);
        let msgs: Vec<String> = s.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(
            msgs[0].starts_with("relay_recipients:5:1: error: \"bob\""),
            "{msgs:?}"
        );
    }
}
