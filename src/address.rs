//! RFC 5321 mailbox parsing and normalization (DESIGN.md §3).
//!
//! One function, [`parse`], turns what a client or a source file wrote into a canonical
//! `(local, domain)` pair; [`fold_local_into`] then applies the case rule of the domain. The
//! same two steps run when a snapshot is built and when a query is answered, so equivalent
//! spellings always meet on one key.
//!
//! For ASCII input nothing is allocated: the canonical parts are the input itself when it is
//! already canonical, or are written into the caller's reusable [`AddrBuf`]. Only a non-ASCII
//! local part (NFC) or an internationalized domain (IDNA) allocate.

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
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum AddrError {
    #[error("empty address")]
    Empty,
    #[error("address is not UTF-8 text")]
    NotText,
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
    /// The local part.
    pub local: &'a str,
    /// The domain (A-labels, lowercase), or the address literal.
    pub domain: &'a str,
    /// `domain` is an address literal such as `[192.0.2.1]`: never one of ours.
    pub literal: bool,
}

impl fmt::Display for Addr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Scratch memory for [`parse`]. Reuse one per thread or connection: its two strings are
/// allocated once, at their final capacity, so parsing never allocates for ASCII input.
pub struct AddrBuf {
    /// Canonical local part when it differs from the input (quoted, or NFC of non-ASCII).
    local: String,
    /// Lowercased or IDNA-converted domain when it differs from the input.
    domain: String,
}

impl AddrBuf {
    /// An empty buffer that allocates only when an address needs it (a quoted or non-ASCII
    /// local part, a domain with capitals, A-labels or a literal), then keeps the memory;
    /// [`Default`] allocates up front.
    pub const fn new() -> AddrBuf {
        AddrBuf {
            local: String::new(),
            domain: String::new(),
        }
    }
}

impl Default for AddrBuf {
    fn default() -> Self {
        AddrBuf {
            local: String::with_capacity(2 * MAX_INPUT + 4),
            domain: String::with_capacity(MAX_INPUT + 4),
        }
    }
}

impl fmt::Debug for AddrBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AddrBuf")
    }
}

const ATEXT: u8 = 1;
const LDH: u8 = 2;
const UPPER: u8 = 4;

/// Character classes of ASCII bytes (bytes >= 0x80 have none).
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        let alnum = c.is_ascii_alphanumeric();
        let special = matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'/'
                | b'='
                | b'?'
                | b'^'
                | b'_'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'~'
        );
        if alnum || special {
            t[i] |= ATEXT;
        }
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' {
            t[i] |= LDH;
        }
        if c.is_ascii_uppercase() {
            t[i] |= UPPER;
        }
        i += 1;
    }
    t
};

/// Parse and canonicalize one mailbox (see the module documentation and DESIGN.md §3).
pub fn parse<'a>(input: &'a str, buf: &'a mut AddrBuf) -> Result<Addr<'a>, AddrError> {
    let path = strip_envelope(input)?;
    let (local_in, domain_in) = split_at_domain(path)?;
    let AddrBuf { local, domain } = buf;
    let local = canonical_local(local_in, local)?;
    let (domain, literal) = canonical_domain(domain_in, domain)?;
    within_limits(Addr {
        local,
        domain,
        literal,
    })
}

/// `addr` when its parts and the whole are within the RFC 5321 limits.
fn within_limits(addr: Addr<'_>) -> Result<Addr<'_>, AddrError> {
    if addr.local.len() > MAX_LOCAL {
        return Err(AddrError::LocalTooLong(addr.local.len()));
    }
    if addr.domain.len() > MAX_DOMAIN {
        return Err(AddrError::DomainTooLong(addr.domain.len()));
    }
    let total = addr.local.len() + 1 + addr.domain.len();
    if total > MAX_ADDRESS {
        return Err(AddrError::AddressTooLong(total));
    }
    Ok(addr)
}

/// [`parse`] of an address expected in `domain` (a canonical domain name, as
/// [`normalize_domain`] returns it): when `input` is a plain `local@domain` and `domain` a
/// lowercase host name, the domain is not canonicalized again, only the local part. The
/// result is always the one [`parse`] gives (any other input or domain goes through it); for
/// the many addresses of one domain in a directory file.
pub fn parse_in_domain<'a>(
    input: &'a str,
    domain: &'a str,
    buf: &'a mut AddrBuf,
) -> Result<Addr<'a>, AddrError> {
    let Some(local_in) = local_before(input, domain) else {
        return parse(input, buf);
    };
    let local = canonical_local(local_in, &mut buf.local)?;
    within_limits(Addr {
        local,
        domain,
        literal: false,
    })
}

/// The local part of `input` when [`parse`] would take it as the text before `@domain` with
/// nothing to strip and `domain` canonical as it is: no envelope, quotes or source route at
/// the start, `domain` a valid lowercase host name without A-labels (which [`parse`]
/// converts), within the limits. `None` otherwise.
fn local_before<'a>(input: &'a str, domain: &str) -> Option<&'a str> {
    let first = *input.as_bytes().first()?;
    if input.len() > MAX_INPUT
        || first == b'"'
        || first == b'<'
        || first == b'@'
        || first.is_ascii_whitespace()
        || domain.len() > MAX_DOMAIN
    {
        return None;
    }
    // A host name `parse` keeps as it is: valid LDH labels (`check_ldh`, as `parse` checks
    // them), no uppercase and no A-label (`parse` converts those).
    if check_ldh(domain.as_bytes()) != Ok((false, false)) {
        return None;
    }
    let local = input.strip_suffix(domain)?.strip_suffix('@')?;
    Some(local)
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
///
/// The RFC 5321 limits apply to the address as given; case folding can lengthen a local part
/// (`İ`, two octets, lowercases to `i̇`, three), so the normalized form of a local part at the
/// 64-octet limit can be longer, and is then a key rather than an address that passes the
/// limit again.
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
    if d.len() > MAX_INPUT {
        return Err(AddrError::DomainTooLong(d.len()));
    }
    let mut scratch = String::new();
    let (out, _literal) = canonical_domain(d, &mut scratch)?;
    if out.len() > MAX_DOMAIN {
        return Err(AddrError::DomainTooLong(out.len()));
    }
    Ok(out.to_owned())
}

/// Position of the first subaddress separator in a (folded) local part, if stripping it
/// leaves a non-empty base. Quoted local parts are never split.
pub fn subaddress_split(local: &[u8], separators: &[u8]) -> Option<usize> {
    if separators.is_empty() || local.first() == Some(&b'"') {
        return None;
    }
    // One separator (`+`, the usual setting) is a byte search.
    let found = match separators {
        [one] => local.iter().position(|b| b == one),
        _ => local.iter().position(|b| separators.contains(b)),
    };
    found.filter(|&p| p > 0)
}

/// Remove whitespace, angle brackets and a source route; refuse over-long input early.
fn strip_envelope(input: &str) -> Result<&str, AddrError> {
    let mut s = input.trim_matches(|c: char| c.is_ascii_whitespace());
    if s.len() > MAX_INPUT {
        return Err(AddrError::InputTooLong(s.len()));
    }
    if let Some(rest) = s.strip_prefix('<') {
        s = rest
            .strip_suffix('>')
            .ok_or(AddrError::UnbalancedBrackets)?;
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

fn is_dot_atom(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&b| b == b'.').all(|atom| {
            !atom.is_empty()
                && atom
                    .iter()
                    .all(|&b| b >= 0x80 || CLASS[b as usize] & ATEXT != 0)
        })
}

/// The canonical local part: the input itself for a plain dot-atom (case kept), else built in
/// `scratch` (quoted strings, NFC of non-ASCII).
fn canonical_local<'a>(local: &'a str, scratch: &'a mut String) -> Result<&'a str, AddrError> {
    let bytes = local.as_bytes();
    match bytes.first() {
        None => return Err(AddrError::EmptyLocal),
        Some(b'"') => return quoted_local(local, scratch),
        Some(_) => {}
    }
    let ascii = check_dot_atom(bytes)?;
    if bytes.len() > MAX_LOCAL * 4 {
        return Err(AddrError::LocalTooLong(bytes.len()));
    }
    if ascii
        || unicode_normalization::is_nfc_quick(local.chars())
            == unicode_normalization::IsNormalized::Yes
    {
        return Ok(local);
    }
    scratch.clear();
    scratch.extend(local.nfc());
    // NFC can map a non-ASCII character to a forbidden ASCII one (U+037E GREEK QUESTION MARK
    // is canonically ';'): the normalized form must pass the same rules.
    check_dot_atom(scratch.as_bytes())?;
    Ok(scratch.as_str())
}

/// Dot-atom rules (atext or non-ASCII, no leading, trailing or doubled dot); returns whether
/// the text is ASCII.
fn check_dot_atom(bytes: &[u8]) -> Result<bool, AddrError> {
    let mut prev_dot = true;
    let mut ascii = true;
    for (offset, &c) in bytes.iter().enumerate() {
        if c == b'.' {
            if prev_dot {
                return Err(AddrError::BadDots);
            }
            prev_dot = true;
            continue;
        }
        prev_dot = false;
        if c >= 0x80 {
            ascii = false;
        } else if CLASS[c as usize] & ATEXT == 0 {
            return Err(AddrError::BadLocalChar {
                ch: c as char,
                offset,
            });
        }
    }
    if prev_dot {
        return Err(AddrError::BadDots);
    }
    Ok(ascii)
}

/// A quoted local part: unescaped; unquoted when it is a dot-atom, else re-quoted with only
/// the necessary escapes, so every spelling has one canonical form. Built in `scratch`
/// without allocating for ASCII (its capacity covers the longest form).
fn quoted_local<'a>(local: &str, scratch: &'a mut String) -> Result<&'a str, AddrError> {
    let inner = &local[1..local.len() - 1];
    scratch.clear();
    let mut chars = inner.char_indices();
    while let Some((i, c)) = chars.next() {
        let c = if c == '\\' {
            match chars.next() {
                Some((_, e)) => e,
                None => return Err(AddrError::UnterminatedQuote),
            }
        } else if c == '"' {
            return Err(AddrError::BadLocalChar {
                ch: c,
                offset: i + 1,
            });
        } else {
            c
        };
        if c.is_ascii() && !(' '..='~').contains(&c) {
            return Err(AddrError::BadLocalChar {
                ch: c,
                offset: i + 1,
            });
        }
        scratch.push(c);
        if scratch.len() > MAX_LOCAL * 4 {
            return Err(AddrError::LocalTooLong(scratch.len()));
        }
    }
    if scratch.is_empty() {
        return Err(AddrError::EmptyLocal);
    }
    if !scratch.is_ascii() {
        let nfc: String = scratch.nfc().collect();
        scratch.clear();
        scratch.push_str(&nfc);
    }
    if is_dot_atom(scratch.as_bytes()) {
        return Ok(scratch.as_str());
    }
    // Append the quoted form after the content, then drop the content.
    let n = scratch.len();
    scratch.push('"');
    let mut from = 0;
    for i in 0..n {
        let b = scratch.as_bytes()[i];
        if b == b'"' || b == b'\\' {
            scratch.extend_from_within(from..i);
            scratch.push('\\');
            scratch.push(b as char);
            from = i + 1;
        }
    }
    scratch.extend_from_within(from..n);
    scratch.push('"');
    scratch.drain(..n);
    Ok(scratch.as_str())
}

/// The canonical domain: lowercase ASCII with A-labels, or an address literal (flagged).
/// Borrowed from the input when it is already canonical.
fn canonical_domain<'a>(
    domain: &'a str,
    scratch: &'a mut String,
) -> Result<(&'a str, bool), AddrError> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_empty() {
        return Err(AddrError::EmptyDomain);
    }
    if d.len() > MAX_DOMAIN * 2 {
        return Err(AddrError::DomainTooLong(d.len()));
    }
    if d.starts_with('[') {
        check_literal(d)?;
        scratch.clear();
        scratch.push_str(d);
        scratch.make_ascii_lowercase();
        return Ok((scratch.as_str(), true));
    }
    if !d.is_ascii() {
        return idna_domain(d, scratch).map(|s| (s, false));
    }
    let (upper, xn) = check_ldh(d.as_bytes())?;
    if xn {
        return idna_domain(d, scratch).map(|s| (s, false));
    }
    if d.len() > MAX_DOMAIN {
        return Err(AddrError::DomainTooLong(d.len()));
    }
    if !upper {
        return Ok((d, false));
    }
    scratch.clear();
    scratch.push_str(d);
    scratch.make_ascii_lowercase();
    Ok((scratch.as_str(), false))
}

/// Check an ASCII host name: LDH labels of 1-63 octets, no hyphen at either end. Returns
/// (has uppercase, has an `xn--` label).
fn check_ldh(b: &[u8]) -> Result<(bool, bool), AddrError> {
    let mut upper = false;
    let mut xn = false;
    let mut start = 0;
    for i in 0..=b.len() {
        let c = b.get(i).copied().unwrap_or(b'.');
        if c == b'.' {
            let label = &b[start..i];
            if label.is_empty() || label.len() > 63 {
                return Err(AddrError::BadLabel);
            }
            if label[0] == b'-' || label[label.len() - 1] == b'-' {
                return Err(AddrError::BadDomainChar { ch: '-' });
            }
            xn |= label.len() >= 4 && label[..4].eq_ignore_ascii_case(b"xn--");
            start = i + 1;
            continue;
        }
        let class = CLASS[c as usize];
        if class & LDH == 0 {
            if class & UPPER == 0 {
                return Err(AddrError::BadDomainChar { ch: c as char });
            }
            upper = true;
        }
    }
    Ok((upper, xn))
}

fn check_literal(d: &str) -> Result<(), AddrError> {
    let inner = d
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or(AddrError::BadLiteral)?;
    let ok = match inner.get(..5) {
        Some(p) if p.eq_ignore_ascii_case("ipv6:") => {
            inner[5..].parse::<std::net::Ipv6Addr>().is_ok()
        }
        _ => inner.parse::<std::net::Ipv4Addr>().is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(AddrError::BadLiteral)
    }
}

/// UTS-46 to ASCII; the result must itself be a valid LDH domain.
fn idna_domain<'a>(d: &str, scratch: &'a mut String) -> Result<&'a str, AddrError> {
    let ascii = idna::domain_to_ascii(d).map_err(|_| AddrError::Idna)?;
    if !ascii.is_ascii() {
        return Err(AddrError::Idna);
    }
    check_ldh(ascii.as_bytes())?;
    scratch.clear();
    scratch.push_str(&ascii);
    scratch.make_ascii_lowercase();
    Ok(scratch.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_in_domain_takes_the_short_way_for_plain_addresses() {
        assert_eq!(
            local_before("Alice.B@contoso.com", "contoso.com"),
            Some("Alice.B")
        );
        assert_eq!(local_before("a@b@contoso.com", "contoso.com"), Some("a@b"));
        for (input, domain) in [
            ("\"a b\"@contoso.com", "contoso.com"),
            ("<a@contoso.com>", "contoso.com"),
            (" a@contoso.com", "contoso.com"),
            ("a@contoso.com", "CONTOSO.com"),
            ("a@xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("a@sub.contoso.com", "contoso.com"),
        ] {
            assert_eq!(local_before(input, domain), None, "{input}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// `parse_in_domain` answers what `parse` answers, for addresses in the domain and
        /// not (other domains, case, A-labels, literals, bad labels, quotes, envelopes,
        /// source routes, limits), whatever of it takes the short way.
        #[test]
        fn parse_in_domain_is_parse(
            head in proptest::sample::select(vec![
                "", "", "", "\"", "<", "@r.example:", " ", "\n", ".", "a.", "é", "\\", "x@",
            ]),
            local in proptest::prop_oneof![
                3 => "[a-z0-9.+-]{1,10}",
                1 => "[a-zA-Z0-9.+\"@<> é\u{300}\\;-]{0,12}",
            ],
            long in proptest::bool::weighted(0.05),
            domain in proptest::sample::select(vec![
                "contoso.com", "sub.contoso.com", "xn--bcher-kva.example", "Contoso.com",
                "contoso.com.", "contoso..com", "-x.com", "x-.com", "", ".", "[192.0.2.1]",
                "a.b-c.d0", "bücher.example", "xn--a.com", "sub.xn--zz.example",
            ]),
            in_domain in proptest::bool::weighted(0.8),
            tail in proptest::sample::select(vec![
                "@contoso.com", "@CONTOSO.com", "@contoso.com.", "contoso.com", "@contoso.com>",
                "@contoso.com ", "@",
            ]),
        ) {
            let local = if long { local.repeat(40) } else { local };
            let tail = if in_domain { format!("@{domain}") } else { tail.to_owned() };
            let input = format!("{head}{local}{tail}");
            let (mut a, mut b) = (AddrBuf::default(), AddrBuf::default());
            let fast = parse_in_domain(&input, domain, &mut a);
            let full = parse(&input, &mut b);
            proptest::prop_assert_eq!(fast, full, "{:?} in {:?}", input, domain);
        }
    }

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
            (
                "<@relay.example,@hop.example:alice@contoso.com>",
                "alice@contoso.com",
            ),
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
            (
                "Jo\u{0308}rg@xn--bcher-kva.example",
                "jörg@xn--bcher-kva.example",
            ),
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
            (
                "al ice@contoso.com",
                AddrError::BadLocalChar { ch: ' ', offset: 2 },
            ),
            (
                "a(b)@contoso.com",
                AddrError::BadLocalChar { ch: '(', offset: 1 },
            ),
            (
                "a@b@contoso.com",
                AddrError::BadLocalChar { ch: '@', offset: 1 },
            ),
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

    /// Found by the `address` fuzz target: NFC turned U+037E into ';', and the normalized
    /// address no longer parsed (normalization was not idempotent).
    #[test]
    fn nfc_that_yields_forbidden_ascii_is_a_syntax_error() {
        assert_eq!(
            norm("<ü\u{037e}.z*@1>"),
            Err(AddrError::BadLocalChar { ch: ';', offset: 2 })
        );
        // Quoted, the same character is fine and stays quoted after NFC.
        let n = norm("\"a\u{037e}b\"@x.example").expect("valid");
        assert_eq!(n, "\"a;b\"@x.example");
        assert_eq!(norm(&n), Ok(n.clone()));
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
        assert_eq!(
            normalize_domain("Bücher.Example.").as_deref(),
            Ok("xn--bcher-kva.example")
        );
        assert_eq!(
            normalize_domain("CONTOSO.com").as_deref(),
            Ok("contoso.com")
        );
        assert!(normalize_domain("bad domain").is_err());
    }
}
