//! The Postfix socketmap protocol (socketmap_table(5)): one netstring request `name key`, one
//! netstring reply `OK data`, `NOTFOUND `, `TEMP reason` or `PERM reason`.
//!
//! Maps served (DESIGN.md §7):
//! - `recipients` (`relay_recipient_maps`): known address -> `OK <kind>`; unknown in a domain we
//!   own -> `NOTFOUND ` (Postfix answers 550 5.1.1); directory not loaded, stale, or a domain
//!   the directory does not hold -> `TEMP` (see below); a syntax error -> `NOTFOUND `.
//! - `transport` (`transport_maps`): the recipient's route -> `OK <nexthop>`, else `NOTFOUND `
//!   so Postfix falls back to its own transport; `TEMP` when the directory cannot answer.
//! - `profile`: the recipient's profile -> `OK <name>`, else `NOTFOUND `.
//!
//! - `tls_policy` (`smtp_tls_policy_maps`): the next hop's DANE policy (`OK dane-only`,
//!   `OK dane`, `OK encrypt`, `OK fingerprint match=…`, `NOTFOUND `, `TEMP reason`) from
//!   [`crate::dane`]; `PERM` when no `[dane]` section is configured (Postfix then defers
//!   rather than sends without the policy).
//!
//! A domain that is not in the directory is `NOTFOUND ` for `transport` and `profile` (neutral),
//! but `TEMP` for `recipients`: Postfix only asks that map for its relay domains, and
//! `NOTFOUND ` there is a permanent reject that the directory never said.

use super::netstring;
use crate::directory::{Reject, Snapshot, Verdict};

/// Longest request payload accepted (DESIGN.md §7).
pub const MAX_REQUEST: usize = 10_000;
/// Longest reply payload Postfix accepts.
pub const MAX_REPLY: usize = 100_000;

/// The maps rcptgate serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapName {
    /// `recipients`: for `relay_recipient_maps`.
    Recipients,
    /// `transport`: the next hop, for `transport_maps`.
    Transport,
    /// `profile`: the recipient's profile.
    Profile,
    /// `tls_policy`: the outbound TLS policy of a next hop, for `smtp_tls_policy_maps`
    /// (DESIGN.md §8; answered by [`crate::dane`], not by the directory).
    TlsPolicy,
}

impl MapName {
    /// The map a request names, if it is one of ours.
    pub fn parse(name: &[u8]) -> Option<MapName> {
        match name {
            b"recipients" => Some(MapName::Recipients),
            b"transport" => Some(MapName::Transport),
            b"profile" => Some(MapName::Profile),
            b"tls_policy" => Some(MapName::TlsPolicy),
            _ => None,
        }
    }
}

/// One lookup request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// `None` for a map name we do not serve (answered with `PERM`).
    pub map: Option<MapName>,
    /// The map's name as sent.
    pub name: &'a [u8],
    /// The lookup key.
    pub key: &'a [u8],
}

/// A reply, before framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `OK value`.
    Ok(&'a str),
    /// `NOTFOUND `.
    NotFound,
    /// `TEMP reason`: try again later.
    Temp(&'a str),
    /// `PERM reason`: a configuration error.
    Perm(&'a str),
}

/// Split a request payload into map name and key (`name <space> key`).
pub fn parse_request(payload: &[u8]) -> Option<Request<'_>> {
    let sp = payload.iter().position(|&b| b == b' ')?;
    let (name, key) = (&payload[..sp], &payload[sp + 1..]);
    Some(Request {
        map: MapName::parse(name),
        name,
        key,
    })
}

/// Decode one request from buffered bytes (see [`netstring::decode`]).
pub fn decode(buf: &[u8]) -> Result<netstring::Decoded<'_>, netstring::NetstringError> {
    netstring::decode(buf, MAX_REQUEST)
}

/// Append the framed reply. Data longer than Postfix accepts becomes a `TEMP` reply.
pub fn encode_reply(reply: Reply<'_>, out: &mut Vec<u8>) {
    let (tag, text) = match reply {
        Reply::Ok(d) => ("OK ", d),
        Reply::NotFound => ("NOTFOUND ", ""),
        Reply::Temp(r) => ("TEMP ", r),
        Reply::Perm(r) => ("PERM ", r),
    };
    if tag.len() + text.len() > MAX_REPLY {
        return encode_reply(Reply::Temp("reply too long"), out);
    }
    let mut payload = Vec::with_capacity(tag.len() + text.len());
    payload.extend_from_slice(tag.as_bytes());
    payload.extend_from_slice(text.as_bytes());
    netstring::encode(&payload, out);
}

/// The reply for `map` given the verdict for its key and the snapshot that gave it.
pub fn reply_for<'s>(map: MapName, verdict: &Verdict, snap: Option<&'s Snapshot>) -> Reply<'s> {
    match (map, verdict) {
        (_, Verdict::Tempfail(_)) => Reply::Temp("directory unavailable"),
        (MapName::Recipients, Verdict::Accept(hit)) => Reply::Ok(hit.kind.as_str()),
        (MapName::Recipients, Verdict::NotOurs) => Reply::Temp("domain not in directory"),
        (
            MapName::Recipients,
            Verdict::Reject(Reject::UnknownUser | Reject::Exception | Reject::Syntax(_)),
        ) => Reply::NotFound,
        (MapName::Transport, Verdict::Accept(hit)) => snap
            .and_then(|s| s.route(hit))
            .map_or(Reply::NotFound, Reply::Ok),
        (MapName::Profile, Verdict::Accept(hit)) => snap
            .and_then(|s| s.profile(hit))
            .map_or(Reply::NotFound, Reply::Ok),
        (MapName::Transport | MapName::Profile, _) => Reply::NotFound,
        (MapName::TlsPolicy, _) => Reply::Perm("tls_policy is not a directory map"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::AddrError;
    use crate::directory::{Hit, Kind, Match, Tempfail};

    #[test]
    fn requests() {
        let r = parse_request(b"recipients alice@contoso.com").expect("request");
        assert_eq!(
            (r.map, r.key),
            (Some(MapName::Recipients), &b"alice@contoso.com"[..])
        );
        let r = parse_request(b"other x").expect("request");
        assert_eq!((r.map, r.name), (None, &b"other"[..]));
        assert_eq!(parse_request(b"nospace"), None);
        // Keys may contain spaces (quoted local parts): only the first space splits.
        let r = parse_request(b"transport \"a b\"@c.example").expect("request");
        assert_eq!(r.key, b"\"a b\"@c.example");
    }

    #[test]
    fn replies_are_framed() {
        let cases: &[(Reply<'_>, &[u8])] = &[
            (Reply::Ok("smtp:[mx]:25"), b"15:OK smtp:[mx]:25,"),
            (Reply::NotFound, b"9:NOTFOUND ,"),
            (
                Reply::Temp("directory unavailable"),
                b"26:TEMP directory unavailable,",
            ),
            (Reply::Perm("unknown map"), b"16:PERM unknown map,"),
        ];
        for (reply, want) in cases {
            let mut out = Vec::new();
            encode_reply(*reply, &mut out);
            assert_eq!(out, *want, "{reply:?}");
        }
        let long = "x".repeat(MAX_REPLY);
        let mut out = Vec::new();
        encode_reply(Reply::Ok(&long), &mut out);
        assert_eq!(out, b"19:TEMP reply too long,");
    }

    #[test]
    fn verdicts_to_replies_never_lose_mail() {
        let hit = Hit {
            kind: Kind::User,
            matched: Match::Exact,
            local_len: 5,
            domain: 0,
            attrs: 0,
            generation: 1,
        };
        let r = |m, v: Verdict| reply_for(m, &v, None);
        assert_eq!(
            r(MapName::Recipients, Verdict::Accept(hit)),
            Reply::Ok("user")
        );
        assert_eq!(
            r(MapName::Recipients, Verdict::Reject(Reject::UnknownUser)),
            Reply::NotFound
        );
        assert_eq!(
            r(
                MapName::Recipients,
                Verdict::Reject(Reject::Syntax(AddrError::NoAt))
            ),
            Reply::NotFound
        );
        for m in [MapName::Recipients, MapName::Transport, MapName::Profile] {
            for t in [Tempfail::NotLoaded, Tempfail::Stale, Tempfail::Internal] {
                assert!(
                    matches!(r(m, Verdict::Tempfail(t)), Reply::Temp(_)),
                    "{m:?} {t:?}"
                );
            }
        }
        assert!(matches!(
            r(MapName::Recipients, Verdict::NotOurs),
            Reply::Temp(_)
        ));
        assert_eq!(r(MapName::Transport, Verdict::NotOurs), Reply::NotFound);
        assert_eq!(
            r(MapName::Profile, Verdict::Reject(Reject::UnknownUser)),
            Reply::NotFound
        );
        // Without a snapshot to resolve names, an accepted recipient has no route to give.
        assert_eq!(r(MapName::Transport, Verdict::Accept(hit)), Reply::NotFound);
    }
}
