//! RFC 5321 mailbox parsing and normalization (DESIGN.md §3).
//!
//! One function, [`parse`], turns what a client or a source file wrote into a canonical
//! `(local, domain)` pair; [`fold_local_into`] then applies the case rule of the domain. The
//! same two steps run when a snapshot is built and when a query is answered, so equivalent
//! spellings always meet on one key.
//!
//! For ASCII input of ordinary length nothing is allocated: the canonical parts are written
//! into the caller's [`AddrBuf`] (stack memory). Only a non-ASCII local part (NFC) or an
//! internationalized domain (IDNA) take the heap.

use std::fmt;

use unicode_normalization::UnicodeNormalization;

/// Longest local part, in octets (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL: usize = 64;
/// Longest domain, in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest `local@domain`, in octets: a path is at most 256 octets including `<` and `>`.
pub const MAX_ADDRESS: usize = 254;
/// Inputs longer than this are refused before any parsing (room for a source route).
pub const MAX_INPUT: usize = 512;

/// Why an input is not a usable mailbox. Carries evidence, never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    #[error("empty address")]
    Empty,
    #[error("null path <> is not a recipient")]
    NullPath,
    #[error("input of {0} octets is longer than {MAX_INPUT}")]
    InputTooLong(usize),
    #[error("'<' without a matching '>'")]
    UnbalancedBrackets,
    #[error("malformed source route")]
    BadSourceRoute,
    #[error("no '@' between local part and domain")]
    NoAt,
    #[error("empty local part")]
    EmptyLocal,
    #[error("local part of {0} octets is longer than {MAX_LOCAL}")]
    LocalTooLong(usize),
    #[error("character {ch:?} at offset {offset} is not allowed in a local part")]
    BadLocalChar { ch: char, offset: usize },
    #[error("local part has a leading, trailing or doubled dot")]
    BadDots,
    #[error("quoted local part is not terminated")]
    UnterminatedQuote,
    #[error("text after the closing quote of the local part")]
    AfterQuote,
    #[error("empty domain")]
    EmptyDomain,
    #[error("domain of {0} octets is longer than {MAX_DOMAIN}")]
    DomainTooLong(usize),
    #[error("domain label is empty or longer than 63 octets")]
    BadLabel,
    #[error("character {ch:?} is not allowed in a domain")]
    BadDomainChar { ch: char },
    #[error("domain is not a valid internationalized domain name")]
    Idna,
    #[error("malformed address literal")]
    BadLiteral,
    #[error("address of {0} octets is longer than {MAX_ADDRESS}")]
    AddressTooLong(usize),
}

/// A parsed mailbox. `local` is canonical but keeps its case (the domain decides whether case
/// matters); `domain` is lowercase ASCII (A-labels), or an address literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr<'a> {
    pub local: &'a str,
    pub domain: &'a str,
    /// `domain` is an address literal such as `[192.0.2.1]`: never one of ours.
    pub literal: bool,
}

impl fmt::Display for Addr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

const STACK: usize = 2 * MAX_INPUT + 4;

/// Scratch memory for [`parse`]. Reuse one per thread or connection; it is 1 KiB of plain
/// bytes plus two strings that are only touched for non-ASCII input.
pub struct AddrBuf {
    /// Canonical local part followed by the lowercased domain, for the ASCII fast path.
    stack: [u8; STACK],
    /// NFC form of a non-ASCII local part.
    local_heap: String,
    /// IDNA result for a non-ASCII (or `xn--`) domain.
    domain_heap: String,
}

impl Default for AddrBuf {
    fn default() -> Self {
        AddrBuf {
            stack: [0; STACK],
            local_heap: String::new(),
            domain_heap: String::new(),
        }
    }
}

impl fmt::Debug for AddrBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AddrBuf")
    }
}

/// Parse and canonicalize one mailbox (see the module documentation and DESIGN.md §3).
pub fn parse<'b>(input: &str, buf: &'b mut AddrBuf) -> Result<Addr<'b>, AddrError> {
    let path = strip_envelope(input)?;
    let (local_in, domain_in) = split_at_domain(path)?;

    let (local_len, local_ascii) = write_local(local_in, &mut buf.stack)?;
    let domain_start = local_len;
    let (domain_len, literal, domain_fast) =
        write_domain(domain_in, &mut buf.stack[domain_start..])?;

    let AddrBuf {
        stack,
        local_heap,
        domain_heap,
    } = buf;
    let local_bytes = &stack[..local_len];
    let local: &str = if local_ascii {
        ascii_str(local_bytes)
    } else {
        let s = std::str::from_utf8(local_bytes).map_err(|_| AddrError::Empty)?;
        local_heap.clear();
        local_heap.extend(s.nfc());
        local_heap.as_str()
    };
    let domain: &str = if domain_fast {
        ascii_str(&stack[domain_start..domain_start + domain_len])
    } else {
        idna_domain(domain_in, domain_heap)?;
        domain_heap.as_str()
    };
    if local.len() > MAX_LOCAL {
        return Err(AddrError::LocalTooLong(local.len()));
    }
    if domain.len() > MAX_DOMAIN {
        return Err(AddrError::DomainTooLong(domain.len()));
    }
    let total = local.len() + 1 + domain.len();
    if total > MAX_ADDRESS {
        return Err(AddrError::AddressTooLong(total));
    }
    Ok(Addr {
        local,
        domain,
        literal,
    })
}

/// Append the lookup form of a canonical local part to `out`: lowercased unless `keep_case`
/// (Active Directory compares addresses case-insensitively), NFC for non-ASCII.
pub fn fold_local_into(local: &str, keep_case: bool, out: &mut Vec<u8>) {
    if keep_case {
        out.extend_from_slice(local.as_bytes());
    } else if local.is_ascii() {
        out.extend(local.bytes().map(|b| b.to_ascii_lowercase()));
    } else {
        let lower: String = local.to_lowercase().nfc().collect();
        out.extend_from_slice(lower.as_bytes());
    }
}

/// Fold into a fixed buffer without allocating for ASCII; returns the length written, or
/// `None` if the folded form does not fit (only possible for non-ASCII input).
pub fn fold_local_into_slice(local: &str, keep_case: bool, out: &mut [u8]) -> Option<usize> {
    if keep_case || local.is_ascii() {
        let dst = out.get_mut(..local.len())?;
        for (d, s) in dst.iter_mut().zip(local.bytes()) {
            *d = if keep_case { s } else { s.to_ascii_lowercase() };
        }
        Some(local.len())
    } else {
        let lower: String = local.to_lowercase().nfc().collect();
        let dst = out.get_mut(..lower.len())?;
        dst.copy_from_slice(lower.as_bytes());
        Some(lower.len())
    }
}

/// The normalized `local@domain` string with the default (case-insensitive) rule. Allocates;
/// for build time, tests and display, not for the lookup path.
pub fn normalize(input: &str) -> Result<String, AddrError> {
    let mut buf = AddrBuf::default();
    let addr = parse(input, &mut buf)?;
    let mut out = Vec::with_capacity(addr.local.len() + addr.domain.len() + 1);
    fold_local_into(addr.local, false, &mut out);
    out.push(b'@');
    out.extend_from_slice(addr.domain.as_bytes());
    String::from_utf8(out).map_err(|_| AddrError::Empty)
}

/// Normalize a bare domain (as it appears in a `DOMAIN:` record or a config file).
pub fn normalize_domain(input: &str) -> Result<String, AddrError> {
    let d = input.trim();
    let mut stack = [0u8; MAX_INPUT + 4];
    if d.len() > MAX_INPUT {
        return Err(AddrError::DomainTooLong(d.len()));
    }
    let (len, _literal, fast) = write_domain(d, &mut stack)?;
    if fast {
        Ok(ascii_str(&stack[..len]).to_owned())
    } else {
        let mut s = String::new();
        idna_domain(d, &mut s)?;
        Ok(s)
    }
}

/// Position of the first subaddress separator in a (folded) local part, if stripping it
/// leaves a non-empty base. Quoted local parts are never split.
pub fn subaddress_split(local: &[u8], separators: &[u8]) -> Option<usize> {
    if separators.is_empty() || local.first() == Some(&b'"') {
        return None;
    }
    local
        .iter()
        .position(|b| separators.contains(b))
        .filter(|&p| p > 0)
}

fn ascii_str(bytes: &[u8]) -> &str {
    // Only ASCII bytes are ever written on the fast paths; from_utf8 cannot fail then.
    std::str::from_utf8(bytes).unwrap_or("")
}

/// Remove whitespace, angle brackets and a source route; refuse over-long input early.
fn strip_envelope(input: &str) -> Result<&str, AddrError> {
    let mut s = input.trim_matches(|c: char| c.is_ascii_whitespace());
    if s.len() > MAX_INPUT {
        return Err(AddrError::InputTooLong(s.len()));
    }
    if let Some(rest) = s.strip_prefix('<') {
        s = rest.strip_suffix('>').ok_or(AddrError::UnbalancedBrackets)?;
        if s.is_empty() {
            return Err(AddrError::NullPath);
        }
    } else if s.ends_with('>') {
        return Err(AddrError::UnbalancedBrackets);
    }
    if s.starts_with('@') {
        // A-d-l ":" — domains in the route never contain ':' outside an address literal.
        let mut depth = 0u32;
        let colon = s.char_indices().find_map(|(i, c)| match c {
            '[' => {
                depth += 1;
                None
            }
            ']' => {
                depth = depth.saturating_sub(1);
                None
            }
            ':' if depth == 0 => Some(i),
            _ => None,
        });
        let colon = colon.ok_or(AddrError::BadSourceRoute)?;
        let route = &s[..colon];
        if route
            .split(',')
            .any(|hop| hop.len() < 2 || !hop.starts_with('@'))
        {
            return Err(AddrError::BadSourceRoute);
        }
        s = &s[colon + 1..];
    }
    if s.is_empty() {
        return Err(AddrError::Empty);
    }
    Ok(s)
}

/// Split at the `@` that ends the local part: after a quoted string, or the last `@`.
fn split_at_domain(path: &str) -> Result<(&str, &str), AddrError> {
    let bytes = path.as_bytes();
    if bytes.first() == Some(&b'"') {
        let mut i = 1;
        loop {
            match bytes.get(i) {
                None => return Err(AddrError::UnterminatedQuote),
                Some(b'\\') => i += 2,
                Some(b'"') => break,
                Some(_) => i += 1,
            }
        }
        let local = &path[..=i];
        let rest = &path[i + 1..];
        return match rest.strip_prefix('@') {
            Some(domain) => Ok((local, domain)),
            None if rest.is_empty() => Err(AddrError::NoAt),
            None => Err(AddrError::AfterQuote),
        };
    }
    let at = path.rfind('@').ok_or(AddrError::NoAt)?;
    Ok((&path[..at], &path[at + 1..]))
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

fn is_dot_atom(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&b| b == b'.')
            .all(|atom| !atom.is_empty() && atom.iter().all(|&b| is_atext(b)))
}

/// Write the canonical local part into `out`; returns (length, is ASCII).
fn write_local(local: &str, out: &mut [u8]) -> Result<(usize, bool), AddrError> {
    if local.is_empty() {
        return Err(AddrError::EmptyLocal);
    }
    let bytes = local.as_bytes();
    if bytes[0] != b'"' {
        if let Some((offset, ch)) = local
            .char_indices()
            .find(|&(_, c)| !(c == '.' || (c.is_ascii() && is_atext(c as u8)) || !c.is_ascii()))
        {
            return Err(AddrError::BadLocalChar { ch, offset });
        }
        if !is_dot_atom(bytes) {
            return Err(AddrError::BadDots);
        }
        if bytes.len() > MAX_LOCAL * 4 {
            return Err(AddrError::LocalTooLong(bytes.len()));
        }
        out[..bytes.len()].copy_from_slice(bytes);
        return Ok((bytes.len(), local.is_ascii()));
    }
    // Quoted string: unescape into `out`, then decide whether quotes are needed at all.
    let inner = &local[1..local.len() - 1];
    let mut n = 0;
    let mut chars = inner.char_indices();
    while let Some((i, c)) = chars.next() {
        let c = if c == '\\' {
            match chars.next() {
                Some((_, e)) => e,
                None => return Err(AddrError::UnterminatedQuote),
            }
        } else if c == '"' {
            return Err(AddrError::BadLocalChar { ch: c, offset: i + 1 });
        } else {
            c
        };
        if c.is_ascii() && !(' '..='~').contains(&c) {
            return Err(AddrError::BadLocalChar { ch: c, offset: i + 1 });
        }
        let mut tmp = [0u8; 4];
        let enc = c.encode_utf8(&mut tmp).as_bytes();
        if n + enc.len() > MAX_LOCAL * 4 {
            return Err(AddrError::LocalTooLong(n + enc.len()));
        }
        out[n..n + enc.len()].copy_from_slice(enc);
        n += enc.len();
    }
    if n == 0 {
        return Err(AddrError::EmptyLocal);
    }
    let ascii = out[..n].is_ascii();
    if is_dot_atom(&out[..n]) {
        return Ok((n, ascii));
    }
    // Keep the quotes; escape only what must be escaped, so the form is canonical.
    let mut canon = [0u8; 2 * MAX_LOCAL * 4 + 2];
    let mut m = 0;
    canon[m] = b'"';
    m += 1;
    for &b in &out[..n] {
        if b == b'"' || b == b'\\' {
            canon[m] = b'\\';
            m += 1;
        }
        canon[m] = b;
        m += 1;
    }
    canon[m] = b'"';
    m += 1;
    out[..m].copy_from_slice(&canon[..m]);
    Ok((m, ascii))
}

/// Write a lowercase ASCII domain into `out`. Returns (length, literal, fast) where `fast ==
/// false` means the domain needs IDNA processing instead (nothing useful was written).
fn write_domain(domain: &str, out: &mut [u8]) -> Result<(usize, bool, bool), AddrError> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_empty() {
        return Err(AddrError::EmptyDomain);
    }
    if d.len() > MAX_DOMAIN * 2 {
        return Err(AddrError::DomainTooLong(d.len()));
    }
    if d.starts_with('[') {
        let lit = write_literal(d, out)?;
        return Ok((lit, true, true));
    }
    if !d.is_ascii() {
        return Ok((0, false, false));
    }
    if out.len() < d.len() {
        return Err(AddrError::DomainTooLong(d.len()));
    }
    for (o, b) in out.iter_mut().zip(d.bytes()) {
        *o = b.to_ascii_lowercase();
    }
    let lower = &out[..d.len()];
    let mut needs_idna = false;
    for label in lower.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > 63 {
            return Err(AddrError::BadLabel);
        }
        if let Some(&b) = label
            .iter()
            .find(|&&b| !(b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(AddrError::BadDomainChar { ch: b as char });
        }
        if label[0] == b'-' || label[label.len() - 1] == b'-' {
            return Err(AddrError::BadDomainChar { ch: '-' });
        }
        needs_idna |= label.starts_with(b"xn--");
    }
    if d.len() > MAX_DOMAIN {
        return Err(AddrError::DomainTooLong(d.len()));
    }
    Ok((d.len(), false, !needs_idna))
}

fn write_literal(domain: &str, out: &mut [u8]) -> Result<usize, AddrError> {
    let inner = domain
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or(AddrError::BadLiteral)?;
    let ok = if let Some(v6) = inner
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("ipv6:"))
        .map(|_| &inner[5..])
    {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        inner.parse::<std::net::Ipv4Addr>().is_ok()
    };
    if !ok {
        return Err(AddrError::BadLiteral);
    }
    let dst = out
        .get_mut(..domain.len())
        .ok_or(AddrError::DomainTooLong(domain.len()))?;
    for (o, b) in dst.iter_mut().zip(domain.bytes()) {
        *o = b.to_ascii_lowercase();
    }
    Ok(domain.len())
}

/// UTS-46 to ASCII; the result must itself be a valid LDH domain.
fn idna_domain(domain: &str, out: &mut String) -> Result<(), AddrError> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    let ascii = idna::domain_to_ascii(d).map_err(|_| AddrError::Idna)?;
    let mut scratch = [0u8; MAX_DOMAIN * 2];
    let (len, _, _) = write_domain(&ascii, &mut scratch)?;
    out.clear();
    out.push_str(ascii_str(&scratch[..len]));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, AddrError> {
        normalize(s)
    }

    #[test]
    fn table_of_equivalent_spellings() {
        let cases: &[(&str, &str)] = &[
            ("alice@contoso.com", "alice@contoso.com"),
            ("Alice@Contoso.COM", "alice@contoso.com"),
            ("<alice@contoso.com>", "alice@contoso.com"),
            ("  <alice@contoso.com>  ", "alice@contoso.com"),
            ("alice@contoso.com.", "alice@contoso.com"),
            ("<@relay.example,@hop.example:alice@contoso.com>", "alice@contoso.com"),
            ("\"alice\"@contoso.com", "alice@contoso.com"),
            ("\"john.doe\"@contoso.com", "john.doe@contoso.com"),
            ("\"john\\.doe\"@contoso.com", "john.doe@contoso.com"),
            ("\"john doe\"@contoso.com", "\"john doe\"@contoso.com"),
            ("\"john..doe\"@contoso.com", "\"john..doe\"@contoso.com"),
            ("\"a\\\"b\"@contoso.com", "\"a\\\"b\"@contoso.com"),
            ("\"a\\b\"@contoso.com", "ab@contoso.com"),
            ("user@bücher.example", "user@xn--bcher-kva.example"),
            ("user@XN--BCHER-KVA.example", "user@xn--bcher-kva.example"),
            ("user@BÜCHER.example", "user@xn--bcher-kva.example"),
            ("Jörg@bücher.example", "jörg@xn--bcher-kva.example"),
            // NFD input (o + combining diaeresis) meets the NFC key.
            ("Jo\u{0308}rg@xn--bcher-kva.example", "jörg@xn--bcher-kva.example"),
            ("user+tag@contoso.com", "user+tag@contoso.com"),
            ("x@[192.0.2.1]", "x@[192.0.2.1]"),
            ("x@[IPv6:2001:db8::1]", "x@[ipv6:2001:db8::1]"),
            ("o'brien@contoso.com", "o'brien@contoso.com"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(*want), "input {input:?}");
        }
    }

    #[test]
    fn table_of_syntax_errors() {
        let cases: &[(&str, AddrError)] = &[
            ("", AddrError::Empty),
            ("<>", AddrError::NullPath),
            ("<alice@contoso.com", AddrError::UnbalancedBrackets),
            ("alice", AddrError::NoAt),
            ("@contoso.com", AddrError::BadSourceRoute),
            ("alice@", AddrError::EmptyDomain),
            (".alice@contoso.com", AddrError::BadDots),
            ("alice.@contoso.com", AddrError::BadDots),
            ("al..ice@contoso.com", AddrError::BadDots),
            ("al ice@contoso.com", AddrError::BadLocalChar { ch: ' ', offset: 2 }),
            ("a(b)@contoso.com", AddrError::BadLocalChar { ch: '(', offset: 1 }),
            ("a@b@contoso.com", AddrError::BadLocalChar { ch: '@', offset: 1 }),
            ("\"unterminated@contoso.com", AddrError::UnterminatedQuote),
            ("\"a\"b@contoso.com", AddrError::AfterQuote),
            ("\"\"@contoso.com", AddrError::EmptyLocal),
            ("alice@contoso..com", AddrError::BadLabel),
            ("alice@-contoso.com", AddrError::BadDomainChar { ch: '-' }),
            ("alice@con_toso.com", AddrError::BadDomainChar { ch: '_' }),
            ("alice@[300.1.1.1]", AddrError::BadLiteral),
            ("alice@xn--zz.example", AddrError::Idna),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), Err(*want), "input {input:?}");
        }
    }

    #[test]
    fn rfc5321_length_limits() {
        let l64 = "a".repeat(64);
        assert!(norm(&format!("{l64}@x.example")).is_ok());
        assert_eq!(
            norm(&format!("{l64}a@x.example")),
            Err(AddrError::LocalTooLong(65))
        );
        let label = "b".repeat(63);
        let domain = format!("{label}.{label}.{label}.{}", "c".repeat(60)); // 252 octets
        assert_eq!(domain.len(), 252);
        assert_eq!(
            norm(&format!("a@{domain}")),
            Ok(format!("a@{domain}")),
            "254 octets in all is the limit"
        );
        assert_eq!(
            norm(&format!("ab@{domain}")),
            Err(AddrError::AddressTooLong(255))
        );
        assert_eq!(
            norm(&format!("a@{}.example", "b".repeat(64))),
            Err(AddrError::BadLabel)
        );
        assert!(matches!(
            norm(&"x".repeat(600)),
            Err(AddrError::InputTooLong(600))
        ));
    }

    #[test]
    fn keep_case_only_when_asked() {
        let mut buf = AddrBuf::default();
        let a = parse("John.Doe@Contoso.com", &mut buf).expect("valid");
        assert_eq!(a.local, "John.Doe");
        assert_eq!(a.domain, "contoso.com");
        let mut out = Vec::new();
        fold_local_into(a.local, true, &mut out);
        assert_eq!(out, b"John.Doe");
        out.clear();
        fold_local_into(a.local, false, &mut out);
        assert_eq!(out, b"john.doe");
        let mut fixed = [0u8; 16];
        let n = fold_local_into_slice("ÄRGER", false, &mut fixed).expect("fits");
        assert_eq!(&fixed[..n], "ärger".as_bytes());
    }

    #[test]
    fn subaddress_separator() {
        assert_eq!(subaddress_split(b"user+tag", b"+"), Some(4));
        assert_eq!(subaddress_split(b"user-tag+x", b"+-"), Some(4));
        assert_eq!(subaddress_split(b"+tag", b"+"), None);
        assert_eq!(subaddress_split(b"user+tag", b""), None);
        assert_eq!(subaddress_split(b"\"user+tag\"", b"+"), None);
    }

    #[test]
    fn literals_are_flagged() {
        let mut buf = AddrBuf::default();
        let a = parse("postmaster@[127.0.0.1]", &mut buf).expect("valid");
        assert!(a.literal);
        let a = parse("postmaster@contoso.com", &mut buf).expect("valid");
        assert!(!a.literal);
    }

    #[test]
    fn domains_alone() {
        assert_eq!(normalize_domain("Bücher.Example.").as_deref(), Ok("xn--bcher-kva.example"));
        assert_eq!(normalize_domain("CONTOSO.com").as_deref(), Ok("contoso.com"));
        assert!(normalize_domain("bad domain").is_err());
    }
}
