//! Sources of directory data (DESIGN.md §5). Each parser turns text into [`SourceData`]:
//! accepted domains, address entries and diagnostics, every one with its location. Parsers
//! know nothing of FSTs; [`crate::sync::merge()`] joins sources into a build input.

pub mod ad;
pub mod csv;
pub mod graph;
pub mod ldap;
pub mod ldap_check;
pub mod ldif;
pub mod mapfile;
pub mod postfix;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::address::{self, AddrBuf, AddrError};
use crate::directory::Kind;

/// Where something was read: `file:line:column` (column 0 = whole line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file (or source name).
    pub file: Arc<str>,
    /// 1-based line; 0 when not from a file.
    pub line: u32,
    /// 1-based column; 0 when unknown.
    pub column: u32,
}

impl Location {
    /// A location in `file`.
    pub fn new(file: &Arc<str>, line: u32, column: u32) -> Location {
        Location {
            file: file.clone(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}", self.file),
            (l, 0) => write!(f, "{}:{l}", self.file),
            (l, c) => write!(f, "{}:{l}:{c}", self.file),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
/// How bad a diagnostic is.
pub enum Severity {
    /// The entry is kept.
    Warning,
    /// The entry is skipped.
    Error,
}

/// A problem found in a source, with its location and (for directory data) the DN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// How bad.
    pub severity: Severity,
    /// Where.
    pub loc: Location,
    /// The directory object, for LDIF and LDAP.
    pub dn: Option<Box<str>>,
    /// What is wrong, in words.
    pub message: String,
    /// The address text it is about, when an address was refused (for `explain`).
    pub subject: Option<Box<str>>,
}

impl Diagnostic {
    /// An error: the entry is skipped.
    pub fn error(loc: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            loc,
            dn: None,
            message: message.into(),
            subject: None,
        }
    }

    /// The same, naming the address text that was refused.
    pub fn with_subject(mut self, subject: &str) -> Diagnostic {
        self.subject = Some(Box::from(subject));
        self
    }

    /// A warning: the entry is kept.
    pub fn warning(loc: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(loc, message)
        }
    }

    /// The same, naming the directory object.
    pub fn with_dn(mut self, dn: Option<&str>) -> Diagnostic {
        self.dn = dn.map(Box::from);
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{}: {sev}: {}", self.loc, self.message)?;
        if let Some(dn) = &self.dn {
            write!(f, " (dn: {dn})")?;
        }
        Ok(())
    }
}

/// One address of one directory object, as a source states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Canonical local part, case kept (the domain decides folding at merge time).
    pub local: String,
    /// Normalized domain (shared by the entries of a domain: a file of one customer's
    /// addresses names a few domains thousands of times).
    pub domain: Arc<str>,
    /// `Alias` for a non-primary address; otherwise the object's kind.
    pub kind: Kind,
    /// Kind of the owning object (decides whether its domain is derived as accepted).
    pub object: Kind,
    /// Normalized primary address of the owning object, when it is not this address.
    pub owner: Option<String>,
    /// Its profile, if it has its own.
    pub profile: Option<String>,
    /// Its route, if it has its own.
    pub route: Option<String>,
    /// `key=value` pairs joined by TAB (P13N:, UCFG: keys we do not interpret).
    pub attributes: Option<String>,
    /// Where it was read.
    pub loc: Location,
    /// Its directory object, for LDIF and LDAP.
    pub dn: Option<Box<str>>,
}

impl Entry {
    /// An address of an object of kind `object`; `owner` is the object's primary address
    /// when this one is an alias (the entry's kind is then `Alias`).
    pub fn new(
        local: String,
        domain: impl Into<Arc<str>>,
        object: Kind,
        owner: Option<String>,
        loc: Location,
        dn: Option<&str>,
    ) -> Entry {
        Entry {
            local,
            domain: domain.into(),
            kind: if owner.is_some() { Kind::Alias } else { object },
            object,
            owner,
            profile: None,
            route: None,
            attributes: None,
            loc,
            dn: dn.map(Box::from),
        }
    }

    /// True when this address is the primary address of its object.
    pub fn is_primary(&self) -> bool {
        self.owner.is_none()
    }
}

/// An accepted domain as a source declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDecl {
    /// The normalized domain.
    pub name: String,
    /// The customer it belongs to.
    pub customer: Option<String>,
    /// Default profile.
    pub profile: Option<String>,
    /// Default route.
    pub route: Option<String>,
    /// Accept every local part.
    pub accept_all: bool,
    /// Local parts are case-sensitive.
    pub keep_case: bool,
    /// Where it was declared.
    pub loc: Location,
}

impl DomainDecl {
    /// A domain with no options.
    pub fn new(name: String, loc: Location) -> DomainDecl {
        DomainDecl {
            name,
            customer: None,
            profile: None,
            route: None,
            accept_all: false,
            keep_case: false,
            loc,
        }
    }
}

/// The formats rcptgate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The MAP format of directory-sync agents.
    Map,
    /// A Postfix `key value` table.
    Postfix,
    /// `Export-Csv` output.
    Csv,
    /// An LDIF export of Active Directory.
    Ldif,
    /// A live directory (configured, not a file).
    Ldap,
    /// Microsoft Graph (Entra ID), configured, not a file.
    Graph,
}

impl Format {
    /// By name (`map`, `postfix`, `csv`, `ldif`, `ldap`).
    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "map" => Some(Format::Map),
            "postfix" => Some(Format::Postfix),
            "csv" => Some(Format::Csv),
            "ldif" | "ldf" => Some(Format::Ldif),
            "ldap" | "ldaps" => Some(Format::Ldap),
            "graph" => Some(Format::Graph),
            _ => None,
        }
    }

    /// Guess from a file name: `.map`, `.csv`, `.ldif`/`.ldf`; anything else is a Postfix table.
    pub fn from_path(path: &Path) -> Format {
        path.extension()
            .and_then(|e| e.to_str())
            .and_then(Format::parse)
            .unwrap_or(Format::Postfix)
    }

    /// The name (`map`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Map => "map",
            Format::Postfix => "postfix",
            Format::Csv => "csv",
            Format::Ldif => "ldif",
            Format::Ldap => "ldap",
            Format::Graph => "graph",
        }
    }
}

/// What a source's addresses mean (DESIGN.md §5, last point).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The directory itself.
    #[default]
    Directory,
    /// Accepted even when the directory lacks them (dynamic distribution groups, public
    /// folders, new hires between syncs); they win over the directory's record.
    Additions,
    /// Never accepted; they win over everything.
    Exceptions,
}

impl Role {
    /// By name (`directory`, `additions`, `exceptions`).
    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_lowercase().as_str() {
            "directory" => Some(Role::Directory),
            "additions" | "addition" => Some(Role::Additions),
            "exceptions" | "exception" => Some(Role::Exceptions),
            _ => None,
        }
    }

    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Directory => "directory",
            Role::Additions => "additions",
            Role::Exceptions => "exceptions",
        }
    }
}

/// What one source contributed.
#[derive(Debug, Clone)]
pub struct SourceData {
    /// The source's name.
    pub name: Arc<str>,
    /// Its format.
    pub format: Format,
    /// Set by whoever configured the source; `Directory` unless said otherwise.
    pub role: Role,
    /// Domains it declares.
    pub domains: Vec<DomainDecl>,
    /// Accept the domains of this source's users, groups and shared mailboxes even without a
    /// declaration (LDIF, CSV and Postfix tables have no domain records).
    pub derive_domains: bool,
    /// Its recipients.
    pub entries: Vec<Entry>,
    /// What was skipped or doubtful.
    pub diagnostics: Vec<Diagnostic>,
    /// Addresses the source lists but that are left out (disabled, guests, …), for
    /// `explain`.
    pub excluded: Vec<crate::directory::explain::Excluded>,
}

impl SourceData {
    /// An empty source.
    pub fn new(name: &Arc<str>, format: Format) -> SourceData {
        SourceData {
            name: name.clone(),
            format,
            role: Role::Directory,
            domains: Vec::new(),
            derive_domains: format != Format::Map,
            entries: Vec::new(),
            diagnostics: Vec::new(),
            excluded: Vec::new(),
        }
    }

    /// Diagnostics that skipped an entry.
    pub fn errors(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }
}

/// A source that cannot be used at all (the snapshot in service must stay).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: error: {1}")]
    Refused(Location, String),
}

/// Parse text in the given format.
pub fn parse_text(format: Format, name: &Arc<str>, text: &str) -> Result<SourceData, SourceError> {
    match format {
        Format::Map => mapfile::parse(name, text),
        Format::Postfix => Ok(postfix::parse(name, text)),
        Format::Csv => csv::parse(name, text),
        Format::Ldif => Ok(ldif::parse(name, text, &ad::AdOptions::default())),
        Format::Ldap | Format::Graph => Err(SourceError::Refused(
            Location::new(name, 0, 0),
            "a live directory (LDAP, Graph) is not a file".into(),
        )),
    }
}

/// Read and parse a source file of the given format.
pub fn load(format: Format, path: &Path) -> Result<SourceData, SourceError> {
    let name: Arc<str> = Arc::from(path.display().to_string());
    let bytes = std::fs::read(path).map_err(|source| SourceError::Io {
        path: name.to_string(),
        source,
    })?;
    let text = decode_utf8(&name, &bytes)?;
    parse_text(format, &name, text)
}

/// A command-line source argument, `FORMAT:PATH` or `PATH` (format from the extension).
pub fn parse_spec(spec: &str) -> (Format, &Path) {
    match spec.split_once(':') {
        Some((f, p)) if let Some(format) = Format::parse(f) => (format, Path::new(p)),
        _ => (Format::from_path(Path::new(spec)), Path::new(spec)),
    }
}

/// UTF-8 text without a BOM, or an error that says where the first bad byte is.
pub fn decode_utf8<'a>(name: &Arc<str>, bytes: &'a [u8]) -> Result<&'a str, SourceError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() as u32 + 1;
        let col = good.iter().rev().take_while(|&&b| b != b'\n').count() as u32 + 1;
        SourceError::Refused(
            Location::new(name, line, col),
            "not UTF-8 text (export the file as UTF-8, e.g. Export-Csv -Encoding UTF8)".into(),
        )
    })
}

/// Exchange / Entra rules for an address stored in a directory (DESIGN.md §6), on top of RFC
/// 5321 syntax: no spaces or `< > ( ) ; , [ ] "` outside a quoted local part, no address
/// literal. Returns the canonical (local, domain) or the reason and the 0-based offset.
pub fn directory_address(raw: &str) -> Result<(String, String), (usize, String)> {
    thread_local! {
        // Parsing scratch for every source's addresses: allocated once per thread, not once
        // per address (its strings are sized for the longest input).
        static BUF: std::cell::RefCell<AddrBuf> = std::cell::RefCell::new(AddrBuf::default());
    }
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => {
            directory_address_in(raw, &mut buf).map(|(l, d)| (l.to_owned(), d.to_owned()))
        }
        // Not reentrant in practice; a nested call gets a buffer of its own.
        Err(_) => directory_address_in(raw, &mut AddrBuf::default())
            .map(|(l, d)| (l.to_owned(), d.to_owned())),
    })
}

/// [`directory_address`] into `buf`: the canonical local part and domain borrow from `raw`
/// or from `buf`, so nothing is allocated for an address already in canonical form.
pub fn directory_address_in<'a>(
    raw: &'a str,
    buf: &'a mut AddrBuf,
) -> Result<(&'a str, &'a str), (usize, String)> {
    directory_syntax(raw)?;
    directory_parts(address::parse(raw, buf))
}

/// [`directory_address_in`] of an address expected in `domain` (a line's canonical domain):
/// the same result, without canonicalizing the domain again when the address is a plain
/// `local@domain` (a directory file's many lines of one domain; `address::parse_in_domain`).
pub(crate) fn directory_address_in_domain<'a>(
    raw: &'a str,
    domain: &'a str,
    buf: &'a mut AddrBuf,
) -> Result<(&'a str, &'a str), (usize, String)> {
    directory_syntax(raw)?;
    directory_parts(address::parse_in_domain(raw, domain, buf))
}

/// A parsed address's (local, domain), or the reason and its offset.
fn directory_parts(
    r: Result<address::Addr<'_>, AddrError>,
) -> Result<(&str, &str), (usize, String)> {
    r.map(|a| (a.local, a.domain))
        .map_err(|e| (error_offset(&e), e.to_string()))
}

/// The rules of a directory address on top of RFC 5321 syntax (see [`directory_address`]).
fn directory_syntax(raw: &str) -> Result<(), (usize, String)> {
    // Bytes, not chars: every character looked for is ASCII, and no byte of a multi-byte
    // UTF-8 sequence is.
    const FORBIDDEN: [bool; 256] = {
        let mut t = [false; 256];
        let bad = b" \t<>();,[]\"";
        let mut i = 0;
        while i < bad.len() {
            t[bad[i] as usize] = true;
            i += 1;
        }
        t
    };
    let bytes = raw.as_bytes();
    // After a quoted local part (which may hold any of them), if there is one.
    let mut from = 0;
    if bytes.first() == Some(&b'"') {
        let mut prev_backslash = false;
        from = bytes.len();
        for (i, &b) in bytes.iter().enumerate().skip(1) {
            if b == b'"' && !prev_backslash {
                from = i + 1;
                break;
            }
            prev_backslash = b == b'\\' && !prev_backslash;
        }
    }
    if let Some(i) = bytes[from..]
        .iter()
        .position(|&b| FORBIDDEN[usize::from(b)])
    {
        let c = char::from(bytes[from + i]);
        return Err((
            from + i,
            format!("character {c:?} is not allowed in a directory address"),
        ));
    }
    if raw.starts_with('@') || raw.ends_with('@') {
        return Err((0, "address starts or ends with '@'".into()));
    }
    Ok(())
}

fn error_offset(e: &AddrError) -> usize {
    match e {
        AddrError::BadLocalChar { offset, .. } => *offset,
        _ => 0,
    }
}

/// A hasher for keys that are hashes already (seeded ones: the indexes of the MAP parser and
/// of the merge chain records by a hash of their key instead of holding a copy of it).
#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The default-folded `local@domain` join key for an address (case-insensitive).
pub fn join_key(local: &str, domain: &str) -> String {
    let mut out = Vec::with_capacity(local.len() + domain.len() + 1);
    address::fold_local_into(local, false, &mut out);
    out.push(b'@');
    out.extend_from_slice(domain.as_bytes());
    String::from_utf8(out).unwrap_or_default()
}

/// Parse a yes/no flag as written in map files and config.
pub fn parse_flag(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// The kinds whose domains a directory source makes accepted (never contacts).
pub fn derives_domain(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::User | Kind::Group | Kind::Shared | Kind::PublicFolder | Kind::Addition
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directory syntax rules as first written (over chars, quoted state kept).
    fn reference(raw: &str) -> Result<(), (usize, String)> {
        let mut quoted = false;
        let mut prev_backslash = false;
        for (i, c) in raw.char_indices() {
            if quoted {
                if c == '"' && !prev_backslash {
                    quoted = false;
                }
                prev_backslash = c == '\\' && !prev_backslash;
                continue;
            }
            match c {
                '"' if i == 0 => quoted = true,
                ' ' | '\t' | '<' | '>' | '(' | ')' | ';' | ',' | '[' | ']' | '"' => {
                    return Err((
                        i,
                        format!("character {c:?} is not allowed in a directory address"),
                    ));
                }
                _ => {}
            }
        }
        if raw.starts_with('@') || raw.ends_with('@') {
            return Err((0, "address starts or ends with '@'".into()));
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        #[test]
        fn directory_syntax_is_the_reference(raw in "[\"\\\\a@. <>();,\\[\\]\t é]{0,12}") {
            proptest::prop_assert_eq!(directory_syntax(&raw), reference(&raw));
        }
    }
}
