//! LDIF content files (RFC 2849), as `ldifde -f` or `ldapsearch -LLL` write them, mapped
//! through the AD entry mapper ([`super::ad`]).

use std::sync::Arc;

use base64::Engine;

use super::ad::{self, AdOptions, DirEntry};
use super::{Diagnostic, Format, Location, SourceData};

/// Longest logical (unfolded) line accepted.
pub const MAX_LOGICAL_LINE: usize = 1 << 20;

/// Parse an LDIF file and map its entries.
pub fn parse(name: &Arc<str>, text: &str, opts: &AdOptions) -> SourceData {
    let mut out = SourceData::new(name, Format::Ldif);
    let (entries, diags) = parse_entries(name, text);
    out.diagnostics = diags;
    for e in &entries {
        let m = ad::map_entry(e, name, opts);
        out.entries.extend(m.entries);
        out.diagnostics.extend(m.diagnostics);
        out.excluded.extend(m.excluded);
    }
    out
}

/// Split LDIF text into directory entries; malformed entries are reported and skipped.
pub fn parse_entries(name: &Arc<str>, text: &str) -> (Vec<DirEntry>, Vec<Diagnostic>) {
    let mut entries = Vec::new();
    let mut diags = Vec::new();
    let mut current: Option<DirEntry> = None;
    let mut broken = false;
    let mut seen_entry = false;

    let finish = |cur: &mut Option<DirEntry>, broken: &mut bool, entries: &mut Vec<DirEntry>| {
        if let Some(e) = cur.take()
            && !*broken
        {
            entries.push(e);
        }
        *broken = false;
    };

    for (lineno, logical) in logical_lines(text) {
        let at = |col: usize| Location::new(name, lineno, col as u32);
        let Some(line) = logical else {
            finish(&mut current, &mut broken, &mut entries);
            continue;
        };
        if line.len() > MAX_LOGICAL_LINE {
            diags.push(Diagnostic::error(
                at(0),
                "line longer than 1 MiB; entry skipped",
            ));
            broken = true;
            continue;
        }
        let Some(colon) = line.find(':') else {
            diags.push(Diagnostic::error(
                at(1),
                format!("expected 'attribute: value', found {:?}", truncate(&line)),
            ));
            broken = true;
            continue;
        };
        let attr = line[..colon].split(';').next().unwrap_or("").trim();
        let rest = &line[colon + 1..];
        let value = if let Some(b64) = rest.strip_prefix(':') {
            match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(s) => s,
                    // Binary attributes (objectGUID, objectSid, ...) are not ours to read.
                    Err(_) => continue,
                },
                Err(_) => {
                    diags.push(Diagnostic::error(
                        at(colon + 3),
                        format!("attribute {attr}: invalid base64"),
                    ));
                    broken = true;
                    continue;
                }
            }
        } else if rest.starts_with('<') {
            diags.push(Diagnostic::error(
                at(colon + 2),
                format!("attribute {attr}: URL values are not supported"),
            ));
            broken = true;
            continue;
        } else {
            rest.trim_start_matches(' ').to_owned()
        };
        if attr.eq_ignore_ascii_case("dn") {
            finish(&mut current, &mut broken, &mut entries);
            current = Some(DirEntry {
                dn: value,
                line: lineno,
                attrs: Vec::new(),
            });
            seen_entry = true;
            continue;
        }
        if attr.eq_ignore_ascii_case("version") && !seen_entry {
            continue;
        }
        let Some(entry) = current.as_mut() else {
            diags.push(Diagnostic::error(
                at(1),
                format!("attribute {attr} before any 'dn:' line"),
            ));
            continue;
        };
        if attr.eq_ignore_ascii_case("changetype") {
            if !value.eq_ignore_ascii_case("add") {
                diags.push(
                    Diagnostic::error(
                        at(1),
                        format!("changetype {value} is not directory content; entry skipped"),
                    )
                    .with_dn(Some(&entry.dn)),
                );
                broken = true;
            }
            continue;
        }
        if attr.is_empty() {
            diags.push(Diagnostic::error(at(1), "empty attribute name").with_dn(Some(&entry.dn)));
            broken = true;
            continue;
        }
        entry.attrs.push((attr.to_owned(), value, lineno));
    }
    finish(&mut current, &mut broken, &mut entries);
    (entries, diags)
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(60);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Unfold continuation lines; yields (first physical line number, logical line) and `None`
/// for the blank lines that separate entries. Comments (and their continuations) are dropped.
fn logical_lines(text: &str) -> impl Iterator<Item = (u32, Option<String>)> + '_ {
    let mut lines = text.split('\n').enumerate().peekable();
    std::iter::from_fn(move || {
        loop {
            let (i, raw) = lines.next()?;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let lineno = i as u32 + 1;
            if line.is_empty() {
                return Some((lineno, None));
            }
            let comment = line.starts_with('#');
            let mut logical = if comment {
                String::new()
            } else {
                line.to_owned()
            };
            while let Some((_, next)) = lines.peek() {
                let next = next.strip_suffix('\r').unwrap_or(next);
                let Some(cont) = next.strip_prefix(' ') else {
                    break;
                };
                if !comment && logical.len() <= MAX_LOGICAL_LINE {
                    logical.push_str(cont);
                }
                lines.next();
            }
            if comment {
                continue;
            }
            return Some((lineno, Some(logical)));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Kind;

    #[test]
    fn folding_base64_comments_and_mapping() {
        let text = "version: 1\n# export\n\
dn: CN=Alice,OU=AADDC Users,DC=corp,DC=example\n\
objectClass: top\nobjectClass: user\n\
proxyAddresses: SMTP:alice@corp.exa\n mple\n\
proxyAddresses:: c210cDphbGljZS5zbWl0aEBjb3JwLmV4YW1wbGU=\n\
objectGUID:: AAECAwQFBgcICQoLDA0ODw==\n\
\n\
dn: CN=Bad,DC=corp,DC=example\n\
changetype: modify\n\
mail: bad@corp.example\n";
        let name: Arc<str> = Arc::from("t.ldif");
        let s = parse(&name, text, &AdOptions::default());
        let got: Vec<(String, Kind)> = s
            .entries
            .iter()
            .map(|e| (format!("{}@{}", e.local, e.domain), e.kind))
            .collect();
        assert_eq!(
            got,
            vec![
                ("alice@corp.example".to_string(), Kind::User),
                ("alice.smith@corp.example".to_string(), Kind::Alias)
            ]
        );
        assert_eq!(s.entries[0].loc.to_string(), "t.ldif:6");
        assert_eq!(s.diagnostics.len(), 1);
        assert!(
            s.diagnostics[0]
                .to_string()
                .starts_with("t.ldif:12:1: error: changetype modify"),
            "{}",
            s.diagnostics[0]
        );
    }

    #[test]
    fn malformed_lines() {
        let name: Arc<str> = Arc::from("t.ldif");
        let text = "mail: orphan@corp.example\n\ndn: CN=X\nno colon here\nmail: x@corp.example\n\ndn: CN=Y\nmail:: !!!\n";
        let (entries, diags) = parse_entries(&name, text);
        assert!(entries.is_empty());
        let msgs: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(msgs[0].starts_with("t.ldif:1:1: error: attribute mail before any 'dn:'"));
        assert!(msgs[1].starts_with("t.ldif:4:1: error: expected 'attribute: value'"));
        assert!(msgs[2].starts_with("t.ldif:8:7: error: attribute mail: invalid base64"));
    }
}
