//! The sans-IO half of DANE (RFC 7672, DESIGN.md §8): what a `smtp_tls_policy_maps` key
//! names, which TLSA records an SMTP client can use, how one domain's DNS facts become a
//! policy, and how a policy is written for Postfix. No DNS and no sockets here: every
//! function is unit-tested with plain values and fuzzed (`fuzz/fuzz_targets/dane.rs`).

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

/// Longest key accepted (a domain is at most 253 bytes; brackets and a port add 8).
pub const MAX_KEY: usize = 270;

/// What a `smtp_tls_policy_maps` key names. Postfix looks the next hop up verbatim: the
/// recipient domain, or a transport's next hop with its brackets and a non-default port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Target {
    /// The domain (MX lookup) or the host (`[host]`: no MX lookup), lower case A-labels,
    /// without a trailing dot.
    pub name: String,
    /// The TCP port: TLSA records live at `_PORT._tcp.HOST`.
    pub port: u16,
    /// Whether the MX records of `name` are looked up (false for `[host]`).
    pub mx: bool,
}

/// Why a key names nothing DANE can apply to (answered `NOTFOUND `: the MTA's own default).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum KeyError {
    #[error("empty key")]
    Empty,
    #[error("key longer than {MAX_KEY} bytes")]
    TooLong,
    #[error("an IP address has no DANE records")]
    IpLiteral,
    #[error("bad port {0:?}")]
    Port(String),
    #[error("not a domain name: {0}")]
    Name(String),
}

/// Parse a policy-table key: `example.com`, `example.com:587`, `[mx.example.com]`,
/// `[mx.example.com]:587`. Names are folded to lower case A-labels (IDNA) without the
/// trailing dot.
pub fn parse_key(key: &[u8]) -> Result<Target, KeyError> {
    if key.len() > MAX_KEY {
        return Err(KeyError::TooLong);
    }
    let key = std::str::from_utf8(key)
        .map_err(|_| KeyError::Name("not UTF-8".into()))?
        .trim();
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    let (host, port, mx) = if let Some(rest) = key.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| KeyError::Name("'[' without ']'".into()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| KeyError::Port(p.into()))?,
            ),
        };
        (host, port, false)
    } else {
        match key.rsplit_once(':') {
            Some((h, p)) => (h, Some(p), true),
            None => (key, None, true),
        }
    };
    let port = match port {
        None => 25,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| KeyError::Port(p.into()))?,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.parse::<IpAddr>().is_ok()
        || host
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("ipv6:"))
    {
        return Err(KeyError::IpLiteral);
    }
    let name = crate::address::normalize_domain(host).map_err(|e| KeyError::Name(e.to_string()))?;
    if name.is_empty() || name.starts_with('[') || !name.contains('.') && name.len() > 63 {
        return Err(KeyError::Name(host.into()));
    }
    Ok(Target { name, port, mx })
}

/// The `_PORT._tcp.HOST.` name where a host's TLSA records live (absolute).
pub fn tlsa_name(host: &str, port: u16) -> String {
    format!("_{port}._tcp.{host}.")
}

/// One TLSA record (RFC 6698).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Tlsa {
    /// 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE.
    pub usage: u8,
    /// 0 the full certificate, 1 its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0 the data itself, 1 SHA-256, 2 SHA-512.
    pub matching: u8,
    /// The association data.
    #[serde(serialize_with = "hex_ser")]
    pub data: Vec<u8>,
}

fn hex_ser<S: serde::Serializer>(d: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(d))
}

/// Lower-case hex.
pub fn hex(d: &[u8]) -> String {
    let mut s = String::with_capacity(d.len() * 2);
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl Tlsa {
    /// Why an SMTP client cannot use this record (RFC 7672 §3.1), or `None` if it can:
    /// only DANE-TA(2) and DANE-EE(3), a known selector, and a digest of the right length.
    pub fn unusable(&self) -> Option<&'static str> {
        match self.usage {
            0 | 1 => return Some("PKIX usages (0, 1) are not used for SMTP (RFC 7672 §3.1.3)"),
            2 | 3 => {}
            _ => return Some("unknown certificate usage"),
        }
        if self.selector > 1 {
            return Some("unknown selector");
        }
        match (self.matching, self.data.len()) {
            (0, n) if n > 0 => None,
            (1, 32) | (2, 64) => None,
            (1 | 2, _) => Some("digest length does not match the matching type"),
            (0, _) => Some("empty association data"),
            _ => Some("unknown matching type"),
        }
    }

    /// Presentation form: `3 1 1 ab12…`.
    pub fn display(&self) -> String {
        format!(
            "{} {} {} {}",
            self.usage,
            self.selector,
            self.matching,
            hex(&self.data)
        )
    }
}

/// How sure DNS is of an answer (RFC 4035 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Validated from the trust anchor.
    Secure,
    /// Provably unsigned.
    Insecure,
}

/// What DNS said about one MX host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// The host name (lower case, no trailing dot).
    pub name: String,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// Whether its address records are signed (TLSA is only looked up when they are).
    pub address_security: Option<Security>,
    /// Its TLSA records (empty: none, or not looked up).
    pub tlsa: Vec<Tlsa>,
    /// Whether the TLSA RRset (or its absence) is signed.
    pub tlsa_security: Option<Security>,
    /// A temporary failure for this host (bogus, timeout, SERVFAIL): the domain's decision
    /// is `TEMP`.
    pub failure: Option<String>,
}

impl Host {
    /// A host with no facts yet.
    pub fn new(name: &str) -> Host {
        Host {
            name: name.to_owned(),
            addresses: Vec::new(),
            address_security: None,
            tlsa: Vec::new(),
            tlsa_security: None,
            failure: None,
        }
    }

    /// Signed TLSA records this host has, usable or not.
    fn secure_tlsa(&self) -> bool {
        self.tlsa_security == Some(Security::Secure) && !self.tlsa.is_empty()
    }

    /// The usable records (only of a secure RRset).
    pub fn usable(&self) -> impl Iterator<Item = &Tlsa> {
        self.tlsa
            .iter()
            .filter(move |t| self.secure_tlsa() && t.unusable().is_none())
    }
}

/// The TLS policy of a next hop (DESIGN.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Secure MX, every host has usable TLSA: `dane-only`.
    DaneOnly,
    /// Secure MX, some hosts have usable (or unusable) TLSA: `dane`.
    Dane,
    /// Secure MX, every host has TLSA and none is usable: `encrypt`.
    Encrypt,
    /// No DANE (insecure domain, or signed without TLSA): `NOTFOUND `, the MTA's default.
    None,
    /// DNS could not say (bogus, SERVFAIL, timeout): `TEMP`, never a silent downgrade.
    Temp,
}

impl Level {
    /// The policy keyword (`dane-only`, …; `none` and `temp` are not Postfix levels).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::DaneOnly => "dane-only",
            Level::Dane => "dane",
            Level::Encrypt => "encrypt",
            Level::None => "none",
            Level::Temp => "temp",
        }
    }

    /// How much protection the level gives, to tell a weakening refresh.
    pub fn strength(self) -> u8 {
        match self {
            Level::DaneOnly => 3,
            Level::Dane => 2,
            Level::Encrypt => 1,
            Level::None | Level::Temp => 0,
        }
    }
}

/// How the policy is written for the MTA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rendering {
    /// `dane-only` / `dane` / `encrypt`: the MTA validates DNSSEC itself.
    #[default]
    Dane,
    /// `fingerprint match=…` from the validated DANE-EE records, for MTAs without a
    /// validating resolver; hosts with only DANE-TA fall back to `dane`.
    Fingerprint,
}

/// Which DANE-EE digests the `fingerprint` rendering uses: the MTA's fingerprint digest
/// (Postfix `smtp_tls_fingerprint_digest`, SHA-256 by default since 3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Digest {
    /// Matching type 1.
    #[default]
    Sha256,
    /// Matching type 2.
    Sha512,
}

/// What one next hop's DNS said, decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The level.
    pub level: Level,
    /// Why, in words (the `TEMP` reason, or what the level rests on).
    pub reason: String,
    /// Whether the MX RRset (or the `[host]` itself) is signed.
    pub mx_security: Option<Security>,
    /// The hosts, in MX preference order.
    pub hosts: Vec<Host>,
    /// The smallest TTL of the records used, in seconds (before clamping).
    pub ttl: u32,
}

impl Decision {
    /// A decision that DNS could not make.
    pub fn temp(reason: impl Into<String>) -> Decision {
        Decision {
            level: Level::Temp,
            reason: reason.into(),
            mx_security: None,
            hosts: Vec::new(),
            ttl: 0,
        }
    }

    /// A domain without DANE.
    pub fn none(reason: impl Into<String>, mx_security: Option<Security>, ttl: u32) -> Decision {
        Decision {
            level: Level::None,
            reason: reason.into(),
            mx_security,
            hosts: Vec::new(),
            ttl,
        }
    }

    /// Decide from a secure MX RRset's hosts (DESIGN.md §8, RFC 7672 §2.2): a host that
    /// failed makes the whole decision `TEMP`; hosts without addresses are skipped.
    pub fn from_hosts(hosts: Vec<Host>, ttl: u32) -> Decision {
        if let Some(h) = hosts.iter().find(|h| h.failure.is_some()) {
            let why = h.failure.as_deref().unwrap_or("failed");
            let mut d = Decision::temp(format!("{}: {why}", h.name));
            d.mx_security = Some(Security::Secure);
            d.hosts = hosts;
            d.ttl = ttl;
            return d;
        }
        let reachable: Vec<&Host> = hosts.iter().filter(|h| !h.addresses.is_empty()).collect();
        let usable = reachable
            .iter()
            .filter(|h| h.usable().next().is_some())
            .count();
        let with_tlsa = reachable.iter().filter(|h| h.secure_tlsa()).count();
        let n = reachable.len();
        let (level, reason) = if n == 0 {
            (Level::None, "no MX host has an address".to_owned())
        } else if usable == n {
            (
                Level::DaneOnly,
                format!("secure MX, {usable} of {n} host(s) with usable TLSA"),
            )
        } else if usable > 0 || (with_tlsa > 0 && with_tlsa < n) {
            (
                Level::Dane,
                format!("secure MX, {usable} of {n} host(s) with usable TLSA"),
            )
        } else if with_tlsa == n {
            (
                Level::Encrypt,
                format!("secure MX, TLSA on all {n} host(s) but none usable"),
            )
        } else {
            (Level::None, "secure MX, no TLSA records".to_owned())
        };
        Decision {
            level,
            reason,
            mx_security: Some(Security::Secure),
            hosts,
            ttl,
        }
    }

    /// The DANE-EE digests of the rendering's type, if every reachable host has one (the
    /// `fingerprint` rendering's condition), as `AA:BB:…` strings.
    pub fn fingerprints(&self, digest: Digest) -> Option<Vec<String>> {
        let want = match digest {
            Digest::Sha256 => 1,
            Digest::Sha512 => 2,
        };
        let mut out: Vec<String> = Vec::new();
        for h in self.hosts.iter().filter(|h| !h.addresses.is_empty()) {
            let mut any = false;
            for t in h.usable().filter(|t| t.usage == 3 && t.matching == want) {
                any = true;
                let fp = t
                    .data
                    .iter()
                    .map(|b| format!("{b:02X}"))
                    .collect::<Vec<_>>()
                    .join(":");
                if !out.contains(&fp) {
                    out.push(fp);
                }
            }
            if !any {
                return None;
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// The socketmap answer for this decision: `OK <policy>`, `NOTFOUND ` or `TEMP reason`.
    pub fn render(&self, rendering: Rendering, digest: Digest) -> Rendered {
        match self.level {
            Level::None => Rendered::NotFound,
            Level::Temp => Rendered::Temp(format!("DANE: {}", self.reason)),
            Level::DaneOnly if rendering == Rendering::Fingerprint => {
                match self.fingerprints(digest) {
                    Some(fps) => Rendered::Ok(format!("fingerprint match={}", fps.join("|"))),
                    None => Rendered::Ok("dane-only".into()),
                }
            }
            level => Rendered::Ok(level.as_str().into()),
        }
    }
}

/// A decision written for the MTA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    /// `OK value`.
    Ok(String),
    /// `NOTFOUND `.
    NotFound,
    /// `TEMP reason`.
    Temp(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(usage: u8, selector: u8, matching: u8, len: usize) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data: vec![0xab; len],
        }
    }

    fn host(name: &str, tlsa: Vec<Tlsa>) -> Host {
        Host {
            addresses: vec!["127.0.0.1".parse().expect("ip")],
            address_security: Some(Security::Secure),
            tlsa_security: Some(Security::Secure),
            tlsa,
            ..Host::new(name)
        }
    }

    #[test]
    fn keys() {
        let k = |s: &str| parse_key(s.as_bytes());
        assert_eq!(
            k("Example.COM."),
            Ok(Target {
                name: "example.com".into(),
                port: 25,
                mx: true
            })
        );
        assert_eq!(
            k("[mx.example.com]:587"),
            Ok(Target {
                name: "mx.example.com".into(),
                port: 587,
                mx: false
            })
        );
        assert_eq!(
            k("example.com:2525").map(|t| (t.port, t.mx)),
            Ok((2525, true))
        );
        assert_eq!(k("[mx.example.com]").map(|t| t.port), Ok(25));
        assert_eq!(
            k("bücher.example").map(|t| t.name),
            Ok("xn--bcher-kva.example".into())
        );
        assert_eq!(k("[192.0.2.1]:25"), Err(KeyError::IpLiteral));
        assert_eq!(k("[ipv6:2001:db8::1]"), Err(KeyError::IpLiteral));
        assert_eq!(k("  "), Err(KeyError::Empty));
        assert!(matches!(k("example.com:0"), Err(KeyError::Port(_))));
        assert!(matches!(k("example.com:x"), Err(KeyError::Port(_))));
        assert!(matches!(k("[mx.example.com"), Err(KeyError::Name(_))));
        assert!(matches!(k("[mx]x"), Err(KeyError::Port(_))));
        assert!(matches!(k("a b.example"), Err(KeyError::Name(_))));
        assert!(parse_key(b"\xff.example").is_err());
        assert_eq!(k(&"a".repeat(300)), Err(KeyError::TooLong));
        assert_eq!(tlsa_name("mx.example.com", 25), "_25._tcp.mx.example.com.");
    }

    #[test]
    fn usable_records() {
        assert_eq!(t(3, 1, 1, 32).unusable(), None);
        assert_eq!(t(2, 0, 2, 64).unusable(), None);
        assert_eq!(t(3, 0, 0, 300).unusable(), None);
        assert!(t(0, 0, 1, 32).unusable().is_some());
        assert!(t(1, 1, 1, 32).unusable().is_some());
        assert!(t(4, 1, 1, 32).unusable().is_some());
        assert!(t(3, 2, 1, 32).unusable().is_some());
        assert!(t(3, 1, 1, 31).unusable().is_some());
        assert!(t(3, 1, 2, 32).unusable().is_some());
        assert!(t(3, 1, 3, 32).unusable().is_some());
        assert!(t(3, 1, 0, 0).unusable().is_some());
        assert_eq!(t(3, 1, 1, 2).display(), "3 1 1 abab");
    }

    #[test]
    fn the_design_table() {
        let level = |hosts: Vec<Host>| Decision::from_hosts(hosts, 300).level;
        let ee = || vec![t(3, 1, 1, 32)];
        assert_eq!(
            level(vec![host("a", ee()), host("b", ee())]),
            Level::DaneOnly
        );
        assert_eq!(level(vec![host("a", ee()), host("b", vec![])]), Level::Dane);
        assert_eq!(
            level(vec![
                host("a", vec![t(1, 1, 1, 32)]),
                host("b", vec![t(0, 0, 1, 32)])
            ]),
            Level::Encrypt
        );
        // Unusable TLSA on one host, none on the other: per-host levels, so `dane`.
        assert_eq!(
            level(vec![host("a", vec![t(1, 1, 1, 32)]), host("b", vec![])]),
            Level::Dane
        );
        assert_eq!(level(vec![host("a", vec![])]), Level::None);
        // Insecure TLSA counts as none.
        let mut h = host("a", ee());
        h.tlsa_security = Some(Security::Insecure);
        assert_eq!(level(vec![h]), Level::None);
        // A host without addresses is skipped; none at all: no policy.
        let mut gone = host("b", vec![]);
        gone.addresses.clear();
        assert_eq!(level(vec![host("a", ee()), gone.clone()]), Level::DaneOnly);
        assert_eq!(level(vec![gone]), Level::None);
        // One failed host: TEMP for the domain, naming it.
        let mut bad = host("mxbad", ee());
        bad.failure = Some("TLSA bogus".into());
        let d = Decision::from_hosts(vec![host("a", ee()), bad], 300);
        assert_eq!(d.level, Level::Temp);
        assert_eq!(d.reason, "mxbad: TLSA bogus");
    }

    #[test]
    fn renderings() {
        let mut ee = t(3, 1, 1, 32);
        ee.data = (0..32).collect();
        let d = Decision::from_hosts(vec![host("a", vec![ee.clone(), t(2, 1, 1, 32)])], 300);
        assert_eq!(
            d.render(Rendering::Dane, Digest::Sha256),
            Rendered::Ok("dane-only".into())
        );
        let Rendered::Ok(fp) = d.render(Rendering::Fingerprint, Digest::Sha256) else {
            panic!("fingerprint")
        };
        assert_eq!(
            fp,
            "fingerprint match=00:01:02:03:04:05:06:07:08:09:0A:0B:0C:0D:0E:0F:10:11:12:13:14:15:16:17:18:19:1A:1B:1C:1D:1E:1F"
        );
        // No SHA-512 DANE-EE record: the `fingerprint` rendering falls back to `dane-only`.
        assert_eq!(
            d.render(Rendering::Fingerprint, Digest::Sha512),
            Rendered::Ok("dane-only".into())
        );
        // A host with only DANE-TA: `dane-only`.
        let d2 = Decision::from_hosts(
            vec![host("a", vec![ee.clone()]), host("b", vec![t(2, 1, 1, 32)])],
            300,
        );
        assert_eq!(
            d2.render(Rendering::Fingerprint, Digest::Sha256),
            Rendered::Ok("dane-only".into())
        );
        // Two hosts with the same key: one fingerprint.
        let d3 = Decision::from_hosts(vec![host("a", vec![ee.clone()]), host("b", vec![ee])], 1);
        assert_eq!(d3.fingerprints(Digest::Sha256).map(|f| f.len()), Some(1));
        assert_eq!(
            Decision::temp("timeout").render(Rendering::Dane, Digest::Sha256),
            Rendered::Temp("DANE: timeout".into())
        );
        assert_eq!(
            Decision::none("insecure", Some(Security::Insecure), 60)
                .render(Rendering::Fingerprint, Digest::Sha256),
            Rendered::NotFound
        );
    }
}
