//! Netstrings (`<length>:<payload>,`), the framing of Postfix socketmap tables.

/// Longest length prefix accepted, in digits (enough for any limit we use).
const MAX_DIGITS: usize = 9;

/// One decoding step over the bytes buffered so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// More bytes are needed; nothing is consumed.
    Incomplete,
    /// A whole netstring: its payload and how many bytes it took from the buffer.
    /// A complete frame.
    Frame {
        /// The payload between `len:` and `,`.
        payload: &'a [u8],
        /// Bytes the frame took from the buffer.
        consumed: usize,
    },
}

/// A stream that is not netstrings, or a frame over the limit: close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum NetstringError {
    #[error("netstring length is not a decimal number (byte {offset})")]
    BadLength { offset: usize },
    #[error("netstring of {len} bytes is longer than the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error("netstring does not end with ',' (byte {offset})")]
    MissingComma { offset: usize },
}

/// Decode the first netstring in `buf`, refusing payloads longer than `max`.
pub fn decode(buf: &[u8], max: usize) -> Result<Decoded<'_>, NetstringError> {
    let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits > MAX_DIGITS {
        return Err(NetstringError::BadLength { offset: MAX_DIGITS });
    }
    match buf.get(digits) {
        None => return Ok(Decoded::Incomplete),
        Some(b':') if digits > 0 => {}
        Some(_) => return Err(NetstringError::BadLength { offset: digits }),
    }
    let len = buf[..digits]
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    if len > max {
        return Err(NetstringError::TooLong { len, max });
    }
    let start = digits + 1;
    let end = start + len;
    match buf.get(end) {
        None => Ok(Decoded::Incomplete),
        Some(b',') => Ok(Decoded::Frame {
            payload: &buf[start..end],
            consumed: end + 1,
        }),
        Some(_) => Err(NetstringError::MissingComma { offset: end }),
    }
}

/// Append `payload` as a netstring.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(payload);
    out.push(b',');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected outcome: `None` for incomplete, else (payload, consumed).
    type Want = Result<Option<(&'static [u8], usize)>, NetstringError>;

    #[test]
    fn frames_errors_and_every_split() {
        let cases: &[(&[u8], Want)] = &[
            (b"5:hello,", Ok(Some((b"hello", 8)))),
            (b"0:,", Ok(Some((b"", 3)))),
            (b"5:hello,3:abc,", Ok(Some((b"hello", 8)))),
            (b"", Ok(None)),
            (b"12", Ok(None)),
            (b"5:hel", Ok(None)),
            (b"5:hello", Ok(None)),
            (b":x,", Err(NetstringError::BadLength { offset: 0 })),
            (b"5x", Err(NetstringError::BadLength { offset: 1 })),
            (b"1234567890:", Err(NetstringError::BadLength { offset: 9 })),
            (
                b"11:hello world,",
                Err(NetstringError::TooLong { len: 11, max: 10 }),
            ),
            (b"5:hello;", Err(NetstringError::MissingComma { offset: 7 })),
        ];
        for (input, want) in cases {
            let got = decode(input, 10).map(|d| match d {
                Decoded::Incomplete => None,
                Decoded::Frame { payload, consumed } => Some((payload, consumed)),
            });
            assert_eq!(&got, want, "input {:?}", String::from_utf8_lossy(input));
        }
        // Fed one prefix at a time, a frame is Incomplete until its last byte arrives.
        let whole = b"16:rcpt a@b.example,";
        for cut in 0..whole.len() {
            assert_eq!(
                decode(&whole[..cut], 100),
                Ok(Decoded::Incomplete),
                "cut {cut}"
            );
        }
        let mut out = Vec::new();
        encode(b"rcpt a@b.example", &mut out);
        assert_eq!(out, whole);
    }
}
