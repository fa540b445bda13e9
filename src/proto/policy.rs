//! The Postfix policy delegation protocol (SMTPD_POLICY_README): a request is `name=value`
//! lines ended by an empty line; the reply is `action=...` and an empty line. Many requests
//! share one connection.
//!
//! Answers for `protocol_state=RCPT` (DESIGN.md §7): accept -> `DUNNO` (later restrictions
//! still run), unknown -> `550 5.1.1 <text>` (not `REJECT`, which Postfix sends as 554),
//! syntax -> `501 5.1.3 <text>`, tempfail -> `DEFER_IF_PERMIT 4.3.0 <text>`, not ours ->
//! `DUNNO`. Any other state -> `DUNNO`.

use crate::directory::{Reject, Verdict};

/// Size limits for one request. A request over a limit closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Whole request, in bytes (Postfix sends ~1 KiB for 29 attributes).
    pub max_request: usize,
    /// One `name=value` line.
    pub max_line: usize,
    /// Attributes per request.
    pub max_attributes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request: 32 * 1024,
            max_line: 8 * 1024,
            max_attributes: 256,
        }
    }
}

/// A protocol violation: log it and close that connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum PolicyError {
    #[error("request longer than {0} bytes")]
    TooLarge(usize),
    #[error("line {line} longer than {max} bytes")]
    LineTooLong { line: usize, max: usize },
    #[error("more than {0} attributes")]
    TooManyAttributes(usize),
    #[error("line {line} is not name=value")]
    BadLine { line: usize },
    #[error("request is not request=smtpd_access_policy")]
    NotAPolicyRequest,
}

/// The attributes rcptgate uses; the rest are checked for form and skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request<'a> {
    /// `protocol_state` (`RCPT`, `DATA`, …).
    pub protocol_state: &'a [u8],
    /// `recipient`: the address to judge.
    pub recipient: &'a [u8],
    /// `sender`.
    pub sender: &'a [u8],
    /// `client_address`.
    pub client_address: &'a [u8],
    /// `queue_id`.
    pub queue_id: &'a [u8],
    /// `instance`: the same for every request of one message.
    pub instance: &'a [u8],
}

/// One decoding step over the bytes buffered so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// More bytes are needed.
    Incomplete,
    /// One complete request.
    Request {
        /// The request's attributes.
        request: Request<'a>,
        /// Bytes it took from the buffer.
        consumed: usize,
    },
}

/// Decode the first request in `buf`.
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, PolicyError> {
    let mut req = Request::default();
    let mut is_policy = false;
    let mut at = 0;
    let mut attrs = 0;
    for line_no in 1.. {
        let rest = &buf[at..];
        let Some(nl) = memchr::memchr(b'\n', rest) else {
            if rest.len() > limits.max_line {
                return Err(PolicyError::LineTooLong {
                    line: line_no,
                    max: limits.max_line,
                });
            }
            if buf.len() > limits.max_request {
                return Err(PolicyError::TooLarge(limits.max_request));
            }
            return Ok(Decoded::Incomplete);
        };
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        at += nl + 1;
        if line.len() > limits.max_line {
            return Err(PolicyError::LineTooLong {
                line: line_no,
                max: limits.max_line,
            });
        }
        if at > limits.max_request {
            return Err(PolicyError::TooLarge(limits.max_request));
        }
        if line.is_empty() {
            if !is_policy {
                return Err(PolicyError::NotAPolicyRequest);
            }
            return Ok(Decoded::Request {
                request: req,
                consumed: at,
            });
        }
        attrs += 1;
        if attrs > limits.max_attributes {
            return Err(PolicyError::TooManyAttributes(limits.max_attributes));
        }
        let eq = memchr::memchr(b'=', line)
            .filter(|&p| p > 0)
            .ok_or(PolicyError::BadLine { line: line_no })?;
        let (name, value) = (&line[..eq], &line[eq + 1..]);
        match name {
            b"request" => is_policy = value == b"smtpd_access_policy",
            b"protocol_state" => req.protocol_state = value,
            b"recipient" => req.recipient = value,
            b"sender" => req.sender = value,
            b"client_address" => req.client_address = value,
            b"queue_id" => req.queue_id = value,
            b"instance" => req.instance = value,
            _ => {}
        }
    }
    Ok(Decoded::Incomplete)
}

/// Reply texts (configurable; these are the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Texts {
    /// After `550 5.1.1`.
    pub unknown: String,
    /// After `501 5.1.3`.
    pub syntax: String,
    /// After `4.3.0` in a deferral.
    pub tempfail: String,
}

impl Default for Texts {
    fn default() -> Self {
        Texts {
            unknown: "User unknown".into(),
            syntax: "Bad recipient address syntax".into(),
            tempfail: "Recipient directory unavailable, try again later".into(),
        }
    }
}

/// True when the request is for a recipient (the only state rcptgate judges).
pub fn is_rcpt(req: &Request<'_>) -> bool {
    req.protocol_state.eq_ignore_ascii_case(b"RCPT")
}

/// Append the reply for a verdict (or `DUNNO` when `verdict` is `None`: not a RCPT request).
pub fn encode_reply(verdict: Option<&Verdict>, texts: &Texts, out: &mut Vec<u8>) {
    out.extend_from_slice(b"action=");
    let (code, text) = match verdict {
        Some(Verdict::Reject(Reject::UnknownUser | Reject::Exception)) => {
            ("550 5.1.1 ", texts.unknown.as_str())
        }
        Some(Verdict::Reject(Reject::Syntax(_))) => ("501 5.1.3 ", texts.syntax.as_str()),
        Some(Verdict::Tempfail(_)) => ("DEFER_IF_PERMIT 4.3.0 ", texts.tempfail.as_str()),
        Some(Verdict::Accept(_) | Verdict::NotOurs) | None => ("DUNNO", ""),
    };
    out.extend_from_slice(code.as_bytes());
    // A reply is one line: never let configured text break the framing.
    out.extend(
        text.bytes()
            .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::AddrError;
    use crate::directory::{Hit, Kind, Match, Tempfail};

    const REQ: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
client_address=192.0.2.1\nclient_name=mail.example\nhelo_name=mail.example\n\
sender=a@example.net\nrecipient=Bob@Contoso.com\nrecipient_count=0\nqueue_id=\n\
instance=1a2b.5f3c.0\nsize=0\n\n";

    #[test]
    fn a_postfix_request_in_every_split() {
        let limits = Limits::default();
        for cut in 0..REQ.len() {
            assert_eq!(
                decode(&REQ[..cut], &limits),
                Ok(Decoded::Incomplete),
                "cut {cut}"
            );
        }
        let mut two = REQ.to_vec();
        two.extend_from_slice(REQ);
        let Ok(Decoded::Request { request, consumed }) = decode(&two, &limits) else {
            panic!("one request expected");
        };
        assert_eq!(consumed, REQ.len());
        assert_eq!(request.recipient, b"Bob@Contoso.com");
        assert_eq!(request.sender, b"a@example.net");
        assert_eq!(request.instance, b"1a2b.5f3c.0");
        assert!(is_rcpt(&request));
        // Chunks of every size, as a server reading a socket would see them.
        for chunk in 1..=REQ.len() {
            let mut buf = Vec::new();
            let mut done = 0;
            for piece in two.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Ok(Decoded::Request { consumed, .. }) = decode(&buf, &limits) {
                    buf.drain(..consumed);
                    done += 1;
                }
            }
            assert_eq!((done, buf.len()), (2, 0), "chunk {chunk}");
        }
    }

    #[test]
    fn malformed_and_oversized_requests() {
        let limits = Limits {
            max_request: 200,
            max_line: 50,
            max_attributes: 4,
        };
        let cases: &[(&[u8], PolicyError)] = &[
            (
                b"request=smtpd_access_policy\nnoequals\n\n",
                PolicyError::BadLine { line: 2 },
            ),
            (b"=value\n\n", PolicyError::BadLine { line: 1 }),
            (b"request=other\n\n", PolicyError::NotAPolicyRequest),
            (b"\n", PolicyError::NotAPolicyRequest),
            (
                b"a=1\nb=2\nc=3\nd=4\ne=5\n",
                PolicyError::TooManyAttributes(4),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                decode(input, &limits).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long_line = vec![b'x'; 51];
        assert_eq!(
            decode(&long_line, &limits),
            Err(PolicyError::LineTooLong { line: 1, max: 50 })
        );
        let mut big = Vec::new();
        for i in 0..3 {
            big.extend_from_slice(format!("n{i}={}\n", "v".repeat(45)).as_bytes());
        }
        let limits = Limits {
            max_attributes: 100,
            ..limits
        };
        assert_eq!(decode(&big, &limits), Ok(Decoded::Incomplete));
        // 49-byte lines: the fifth takes the request past 200 bytes before its end.
        for i in 3..5 {
            big.extend_from_slice(format!("n{i}={}\n", "v".repeat(45)).as_bytes());
        }
        assert_eq!(decode(&big, &limits), Err(PolicyError::TooLarge(200)));
    }

    #[test]
    fn replies() {
        let texts = Texts::default();
        let hit = Hit {
            kind: Kind::User,
            matched: Match::Exact,
            local_len: 3,
            domain: 0,
            attrs: 0,
            generation: 1,
        };
        let cases: Vec<(Option<Verdict>, &str)> = vec![
            (Some(Verdict::Accept(hit)), "action=DUNNO\n\n"),
            (Some(Verdict::NotOurs), "action=DUNNO\n\n"),
            (None, "action=DUNNO\n\n"),
            (
                Some(Verdict::Reject(Reject::UnknownUser)),
                "action=550 5.1.1 User unknown\n\n",
            ),
            (
                Some(Verdict::Reject(Reject::Syntax(AddrError::NoAt))),
                "action=501 5.1.3 Bad recipient address syntax\n\n",
            ),
            (
                Some(Verdict::Tempfail(Tempfail::NotLoaded)),
                "action=DEFER_IF_PERMIT 4.3.0 Recipient directory unavailable, try again later\n\n",
            ),
        ];
        for (v, want) in cases {
            let mut out = Vec::new();
            encode_reply(v.as_ref(), &texts, &mut out);
            assert_eq!(String::from_utf8_lossy(&out), want);
        }
        let evil = Texts {
            unknown: "no\nsuch\r\nuser".into(),
            ..Texts::default()
        };
        let mut out = Vec::new();
        encode_reply(Some(&Verdict::Reject(Reject::UnknownUser)), &evil, &mut out);
        assert_eq!(out, b"action=550 5.1.1 no such  user\n\n");
    }
}
