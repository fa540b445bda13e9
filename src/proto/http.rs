//! The little HTTP the metrics port needs: one request head (`GET /metrics HTTP/1.1` and
//! headers), one response, then the connection closes.

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;

/// Why an HTTP request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum HttpError {
    #[error("request head longer than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request line")]
    BadRequestLine,
}

/// A parsed request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    /// The method (`GET`).
    pub method: &'a [u8],
    /// The path without its query string.
    pub path: &'a [u8],
}

/// `Ok(None)` until the whole head (ending in an empty line) is buffered.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head<'_>>, HttpError> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n"));
    let Some(end) = end else {
        return if buf.len() > MAX_HEAD {
            Err(HttpError::TooLarge)
        } else {
            Ok(None)
        };
    };
    // However it arrived (one read can bring more than the limit).
    if end > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = buf[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[..line_end]);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequestLine);
    };
    if method.is_empty() || !target.starts_with(b"/") || !version.starts_with(b"HTTP/1.") {
        return Err(HttpError::BadRequestLine);
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or(target);
    Ok(Some(Head { method, path }))
}

/// A complete response that closes the connection.
pub fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let get = b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n";
        for cut in 0..get.len() {
            assert_eq!(parse_head(&get[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(
            parse_head(get),
            Ok(Some(Head {
                method: b"GET",
                path: b"/metrics"
            }))
        );
        assert_eq!(
            parse_head(b"GET /healthz HTTP/1.0\n\n"),
            Ok(Some(Head {
                method: b"GET",
                path: b"/healthz"
            }))
        );
        assert_eq!(parse_head(b"GET\r\n\r\n"), Err(HttpError::BadRequestLine));
        assert_eq!(
            parse_head(b"GET metrics HTTP/1.1\r\n\r\n"),
            Err(HttpError::BadRequestLine)
        );
        assert_eq!(
            parse_head(b"GET / SMTP/1.0\r\n\r\n"),
            Err(HttpError::BadRequestLine)
        );
        assert_eq!(
            parse_head(&vec![b'x'; MAX_HEAD + 1]),
            Err(HttpError::TooLarge)
        );
        // Regression: a head over the limit that arrives whole, in one read, is refused too.
        let big = format!(
            "GET /nope HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert_eq!(parse_head(big.as_bytes()), Err(HttpError::TooLarge));
        let r = response("200 OK", "text/plain", "ok\n");
        assert_eq!(
            r,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
    }
}
