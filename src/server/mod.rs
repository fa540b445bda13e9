//! Thin tokio listeners for the Postfix policy and socketmap protocols (DESIGN.md §7). All
//! parsing lives in [`crate::proto`]; this module only moves bytes, bounds every wait and
//! every buffer, caps connections and drains on shutdown.
//!
//! `serve(listener, protocol, ctx, shutdown)` is the single entry point, for TCP and unix
//! sockets alike; tests spawn it on `127.0.0.1:0`.

pub mod control;
pub mod metrics;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::address::AddrBuf;
use crate::directory::Directory;
use crate::proto::{milter, netstring, policy, socketmap};

/// Which protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The milter protocol (`smtpd_milters`, Sendmail's `INPUT_MAIL_FILTER`).
    Milter,
    /// Postfix policy delegation (`check_policy_service`).
    Policy,
    /// Postfix socketmap tables.
    Socketmap,
}

/// Per-listener limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; further clients wait in the accept queue.
    pub max_connections: usize,
    /// A connection that starts no request for this long is closed.
    pub idle_timeout: Duration,
    /// A request must be complete this long after its first byte, however slowly the rest
    /// trickles in (a slow client cannot hold its slot).
    pub request_timeout: Duration,
    /// Every reply must be written within this (a client that stops reading is closed).
    pub write_timeout: Duration,
    /// On shutdown, connections in flight get this long to finish, then are closed.
    pub drain_timeout: Duration,
    /// Limits of one policy request.
    pub policy: policy::Limits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            policy: policy::Limits::default(),
        }
    }
}

/// What every connection needs.
#[derive(Debug)]
pub struct Context {
    /// The directory answers come from.
    pub directory: Arc<Directory>,
    /// Reply texts.
    pub texts: policy::Texts,
    /// Limits.
    pub limits: Limits,
    /// Counters.
    pub metrics: Arc<metrics::Metrics>,
    /// What the milter adds to messages.
    pub milter: MilterOptions,
    /// The DANE engine behind the `tls_policy` socketmap map (`None`: not configured).
    pub dane: Option<crate::dane::Dane>,
}

/// What the milter frontend adds to a message for each accepted recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MilterOptions {
    /// The header name (`X-Rcptgate-Profile`); `None` adds none. Incoming headers of this
    /// name are deleted, so a sender cannot choose its own profile.
    pub header: Option<String>,
    /// The header names the customer and the route too.
    pub details: bool,
}

/// Why a connection ended early (logged by the caller; other connections are unaffected).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum ConnError {
    #[error("policy protocol: {0}")]
    Policy(#[from] policy::PolicyError),
    #[error("socketmap protocol: {0}")]
    Netstring(#[from] netstring::NetstringError),
    #[error("milter protocol: {0}")]
    Milter(#[from] milter::MilterError),
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("request not complete within {0:?}")]
    RequestTimeout(Duration),
    #[error("reply not written within {0:?} (the client stopped reading)")]
    WriteTimeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Something that accepts connections: a TCP or a unix listener.
pub trait Accept {
    /// A connected client.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next client.
    fn accept(&self) -> impl std::future::Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

#[cfg(unix)]
impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// After a failed `accept` (out of descriptors, most often): wait a little so the loop does
/// not spin, and log at most once a second. Every accept loop uses it.
pub(crate) async fn accept_backoff(what: &str, e: &io::Error) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LOGGED.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(listener = what, error = %e, "{what}: accept failed: {e}; backing off");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Accept and serve connections until `shutdown` turns true; then stop accepting at once (the
/// listener is closed, so new clients are refused rather than left waiting) and give the
/// connections in flight `drain_timeout` to finish the request they are on.
pub async fn serve<L: Accept>(
    listener: L,
    protocol: Protocol,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(ctx.limits.max_connections.max(1)));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(io::Error::other)?,
            _ = shutdown.changed() => break,
        };
        let stream = tokio::select! {
            s = listener.accept() => s,
            _ = shutdown.changed() => break,
        };
        let stream = match stream {
            Ok(s) => s,
            // Out of descriptors or a client that went away: keep serving the others.
            Err(e) => {
                accept_backoff(&format!("{protocol:?}"), &e).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        let stop = shutdown.clone();
        conns.spawn(async move {
            if let Err(e) = handle(stream, protocol, &ctx, stop).await {
                tracing::info!(?protocol, error = %e, "{protocol:?} connection closed: {e}");
            }
            drop(permit);
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = tokio::time::timeout(ctx.limits.drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?protocol,
            open = conns.len(),
            "{protocol:?}: closing {} connection(s) still open after {:?}",
            conns.len(),
            ctx.limits.drain_timeout
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// Serve one connection: decode every complete request in the buffer, answer it, read more.
/// Every wait is bounded: `idle_timeout` before a request starts, `request_timeout` from its
/// first byte to its end, `write_timeout` for each reply.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    protocol: Protocol,
    ctx: &Context,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    if protocol == Protocol::Milter {
        return handle_milter(stream, ctx, shutdown).await;
    }
    let _open = ctx.metrics.connection(protocol);
    let limits = &ctx.limits;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut scratch = AddrBuf::default();
    // When the first byte of the request not yet complete arrived.
    let mut request_started: Option<tokio::time::Instant> = None;
    let mut tls_key: Option<Vec<u8>> = None;
    let mut timer = ReadTimer::new(limits);
    let mut stopping = std::pin::pin!(stopped(shutdown.clone()));
    loop {
        loop {
            out.clear();
            let started = std::time::Instant::now();
            let consumed = match protocol {
                Protocol::Policy => answer_policy(&buf, ctx, &mut scratch, &mut out)?,
                Protocol::Socketmap => {
                    answer_socketmap(&buf, ctx, &mut scratch, &mut out, &mut tls_key)?
                }
                Protocol::Milter => return Err(ConnError::Io(io::Error::other("not a milter"))),
            };
            let Some((consumed, verdict)) = consumed else {
                break;
            };
            // A TLS policy that is not cached: wait for DNS (bounded by the engine's
            // decision timeout), whatever the client sends meanwhile stays buffered.
            if let (Some(key), Some(dane)) = (tls_key.take(), &ctx.dane) {
                let answer = dane.policy(&key).await;
                encode_tls_policy(answer.rendered(), &mut out);
            }
            ctx.metrics
                .observe(protocol, verdict.as_ref(), started.elapsed());
            tokio::time::timeout(limits.write_timeout, stream.write_all(&out))
                .await
                .map_err(|_| ConnError::WriteTimeout(limits.write_timeout))??;
            buf.drain(..consumed);
            // What is left arrived with the last read: a new request starts there.
            request_started = None;
        }
        if *shutdown.borrow() && buf.is_empty() {
            return Ok(());
        }
        let idle = buf.is_empty();
        tokio::select! {
            biased;
            more = read_bounded(&mut stream, &mut buf, &mut request_started, limits, &mut timer) => {
                if !more? {
                    return Ok(());
                }
            }
            // Between requests, a shutdown ends the connection at once.
            () = &mut stopping, if idle => return Ok(()),
        }
    }
}

/// Serve one milter connection: a [`milter::Session`] per connection, fed every complete
/// frame; the same bounds as the other protocols on every wait. On shutdown a connection in
/// the middle of a message is answered `SMFIR_TEMPFAIL` (never an accept) and closed.
async fn handle_milter<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    ctx: &Context,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let _open = ctx.metrics.connection(Protocol::Milter);
    let limits = &ctx.limits;
    let mut session = milter::Session::new(milter::SessionOptions {
        headers: ctx.milter.header.iter().cloned().collect(),
    });
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut scratch = AddrBuf::default();
    let mut request_started: Option<tokio::time::Instant> = None;
    let mut timer = ReadTimer::new(limits);
    let mut stopping = std::pin::pin!(stopped(shutdown.clone()));
    loop {
        while let milter::Decoded::Frame {
            command,
            data,
            consumed,
        } = milter::decode(&buf)?
        {
            let cmd = milter::parse(command, data)?;
            let negotiating = session.negotiated().is_none();
            let started = std::time::Instant::now();
            let mut verdicts = Vec::new();
            let step = session.on_command(cmd, &mut |rcpt: &str| {
                let (verdict, answer) = judge_rcpt(ctx, rcpt, &mut scratch);
                verdicts.push(verdict);
                answer
            })?;
            for v in &verdicts {
                ctx.metrics
                    .observe(Protocol::Milter, Some(v), started.elapsed());
            }
            if negotiating && let Some(n) = session.negotiated() {
                note_negotiation(ctx, n);
            }
            let replies = match step {
                milter::Step::Close => return Ok(()),
                milter::Step::Reply(r) => r,
            };
            out.clear();
            for r in &replies {
                milter::encode(&r.as_reply(), &mut out);
            }
            if !out.is_empty() {
                tokio::time::timeout(limits.write_timeout, stream.write_all(&out))
                    .await
                    .map_err(|_| ConnError::WriteTimeout(limits.write_timeout))??;
            }
            buf.drain(..consumed);
            request_started = None;
        }
        if *shutdown.borrow() {
            if session.in_message() {
                out.clear();
                milter::encode(&milter::Reply::TempFail, &mut out);
                let _ = tokio::time::timeout(limits.write_timeout, stream.write_all(&out)).await;
            }
            return Ok(());
        }
        tokio::select! {
            biased;
            more = read_bounded(&mut stream, &mut buf, &mut request_started, limits, &mut timer) => {
                if !more? {
                    return Ok(());
                }
            }
            // The loop's top answers a message in progress with a temporary failure.
            () = &mut stopping => {
                if !*shutdown.borrow() {
                    // The sender is gone without asking for a stop, so none can come: end
                    // the connection, as the other protocols do.
                    return Ok(());
                }
            }
        }
    }
}

/// Say in the log when an MTA gets less than the full milter (an old version, or no header
/// actions while headers are configured).
fn note_negotiation(ctx: &Context, n: milter::Negotiated) {
    if n.version < milter::VERSION {
        tracing::info!(
            version = n.version,
            "milter client speaks protocol version {}; rcptgate speaks it too",
            n.version
        );
    }
    if ctx.milter.header.is_some() && !n.can_manage_headers() {
        tracing::warn!(
            "milter client does not allow adding and changing headers: recipients are judged, no profile headers are added (and forged ones are not removed)"
        );
    }
}

/// The milter's answer for one recipient (as the MTA sent it, brackets and all), rendered
/// like every frontend's verdict (DESIGN.md §4): 550 / 501 / 451 replies, nothing for
/// accepted and not-ours recipients; an accepted one gets its header value.
fn judge_rcpt(
    ctx: &Context,
    rcpt: &str,
    scratch: &mut AddrBuf,
) -> (crate::directory::Verdict, milter::RcptAnswer) {
    use crate::directory::{Reject, Verdict};
    let view = ctx.directory.view();
    let verdict = view.lookup_bytes(rcpt.as_bytes(), scratch);
    note_tombstone(ctx, rcpt.as_bytes(), &verdict);
    let t = &ctx.texts;
    let reply = match verdict {
        Verdict::Reject(Reject::UnknownUser | Reject::Exception) => {
            Some(format!("550 5.1.1 {}", t.unknown))
        }
        Verdict::Reject(Reject::Syntax(_)) => Some(format!("501 5.1.3 {}", t.syntax)),
        Verdict::Tempfail(_) => Some(format!("451 4.3.0 {}", t.tempfail)),
        Verdict::Accept(_) | Verdict::NotOurs => None,
    };
    let headers = match (&verdict, &ctx.milter.header, view.snapshot()) {
        (Verdict::Accept(hit), Some(_), Some(snap)) => {
            let addr = rcpt.trim().trim_start_matches('<').trim_end_matches('>');
            let mut value = format!("{}; rcpt=<{addr}>", snap.profile(hit).unwrap_or("none"));
            if ctx.milter.details {
                if let Some(c) = snap.customer(hit) {
                    value.push_str(&format!("; customer={c}"));
                }
                if let Some(r) = snap.route(hit) {
                    value.push_str(&format!("; route={r}"));
                }
            }
            vec![value]
        }
        _ => Vec::new(),
    };
    (verdict, milter::RcptAnswer { reply, headers })
}

/// Resolves once a stop is asked for (or the sender is gone). A connection pins one for its
/// life, so waiting between requests registers no new waiter each time.
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The one timer of a connection's reads, kept for the connection's life. Each read moves
/// its deadline; a later deadline (the next idle wait, after every request) is not written to
/// the timer but checked when the timer fires, which then waits again for what is left. So a
/// request that arrives whole costs no timer registration (DESIGN.md §7: every wait bounded).
struct ReadTimer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl ReadTimer {
    fn new(limits: &Limits) -> ReadTimer {
        ReadTimer {
            sleep: Box::pin(tokio::time::sleep(limits.idle_timeout)),
        }
    }
}

/// Read more bytes into `buf`, every wait bounded: `idle_timeout` while no request has
/// started, `request_timeout` from a request's first byte (`started`) however slowly the rest
/// comes. `Ok(false)` at the end of the stream.
async fn read_bounded<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    started: &mut Option<tokio::time::Instant>,
    limits: &Limits,
    timer: &mut ReadTimer,
) -> Result<bool, ConnError> {
    let now = tokio::time::Instant::now();
    let deadline = if buf.is_empty() {
        now + limits.idle_timeout
    } else {
        *started.get_or_insert(now) + limits.request_timeout
    };
    if deadline < timer.sleep.deadline() {
        timer.sleep.as_mut().reset(deadline);
    }
    buf.reserve(4096);
    loop {
        tokio::select! {
            biased;
            read = stream.read_buf(buf) => {
                return match read {
                    Ok(0) => Ok(false),
                    Ok(_) => Ok(true),
                    Err(e) => Err(e.into()),
                };
            }
            () = timer.sleep.as_mut() => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(if buf.is_empty() {
                        ConnError::Idle(limits.idle_timeout)
                    } else {
                        ConnError::RequestTimeout(limits.request_timeout)
                    });
                }
                // Armed for an earlier wait: wait for this one's deadline.
                timer.sleep.as_mut().reset(deadline);
            }
        }
    }
}

/// What answering one request gives: bytes consumed, and the verdict if there was a lookup.
type Answered = Option<(usize, Option<crate::directory::Verdict>)>;

/// Log (at most once a second) that a recipient was accepted only as a tombstone: mail for
/// someone removed from the directory, which the administrator should look at.
fn note_tombstone(ctx: &Context, rcpt: &[u8], verdict: &crate::directory::Verdict) {
    if let crate::directory::Verdict::Accept(hit) = verdict
        && hit.kind == crate::directory::Kind::Tombstone
        && ctx.metrics.log_tombstone_now()
    {
        let rcpt = String::from_utf8_lossy(&rcpt[..rcpt.len().min(320)]);
        tracing::warn!(
            "accepted {rcpt} as a tombstone (removed from the directory; see rcptgate conflicts)"
        );
    }
}

/// Answer the first policy request in `buf`; `None` if it is not complete yet.
fn answer_policy(
    buf: &[u8],
    ctx: &Context,
    scratch: &mut AddrBuf,
    out: &mut Vec<u8>,
) -> Result<Answered, ConnError> {
    let policy::Decoded::Request { request, consumed } = policy::decode(buf, &ctx.limits.policy)?
    else {
        return Ok(None);
    };
    // A request without a recipient is no verdict at all (DESIGN.md §4 step 2).
    let verdict =
        (policy::is_rcpt(&request) && !request.recipient.trim_ascii().is_empty()).then(|| {
            ctx.directory
                .view()
                .lookup_bytes(request.recipient, scratch)
        });
    if let Some(v) = &verdict {
        note_tombstone(ctx, request.recipient, v);
    }
    policy::encode_reply(verdict.as_ref(), &ctx.texts, out);
    Ok(Some((consumed, verdict)))
}

/// Write a DANE answer as a socketmap reply.
fn encode_tls_policy(r: &crate::dane::Rendered, out: &mut Vec<u8>) {
    use crate::dane::Rendered;
    let reply = match r {
        Rendered::Ok(v) => socketmap::Reply::Ok(v),
        Rendered::NotFound => socketmap::Reply::NotFound,
        Rendered::Temp(t) => socketmap::Reply::Temp(t),
    };
    socketmap::encode_reply(reply, out);
}

/// Answer the first socketmap request in `buf`; `None` if it is not complete yet. A
/// `tls_policy` request whose decision is not cached leaves its key in `tls_key` and
/// nothing in `out`: the caller waits for the DANE engine.
fn answer_socketmap(
    buf: &[u8],
    ctx: &Context,
    scratch: &mut AddrBuf,
    out: &mut Vec<u8>,
    tls_key: &mut Option<Vec<u8>>,
) -> Result<Answered, ConnError> {
    let netstring::Decoded::Frame { payload, consumed } = socketmap::decode(buf)? else {
        return Ok(None);
    };
    let view = ctx.directory.view();
    let mut looked_up = None;
    let reply = match socketmap::parse_request(payload) {
        None => socketmap::Reply::Perm("malformed request"),
        Some(socketmap::Request { map: None, .. }) => socketmap::Reply::Perm("unknown map"),
        Some(socketmap::Request {
            map: Some(socketmap::MapName::TlsPolicy),
            key,
            ..
        }) => match &ctx.dane {
            None => {
                socketmap::Reply::Perm("tls_policy needs a [dane] section in the configuration")
            }
            Some(dane) => match dane.cached(key) {
                Some(answer) => {
                    encode_tls_policy(answer.rendered(), out);
                    return Ok(Some((consumed, None)));
                }
                None => {
                    *tls_key = Some(key.to_vec());
                    return Ok(Some((consumed, None)));
                }
            },
        },
        Some(socketmap::Request {
            map: Some(map),
            key,
            ..
        }) => {
            let verdict = view.lookup_bytes(key, scratch);
            if map == socketmap::MapName::Recipients {
                note_tombstone(ctx, key, &verdict);
            }
            looked_up = Some(verdict);
            socketmap::reply_for(map, &verdict, view.snapshot())
        }
    };
    socketmap::encode_reply(reply, out);
    Ok(Some((consumed, looked_up)))
}

/// Bind one listener (a stale unix socket file is replaced) and serve it until shutdown.
/// Returns the bound address (the port when `:0` was asked for) and the serving task.
pub async fn bind_and_serve(
    addr: &crate::config::ListenAddr,
    protocol: Protocol,
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<(String, tokio::task::JoinHandle<io::Result<()>>)> {
    match addr {
        crate::config::ListenAddr::Tcp(a) => {
            let l = tokio::net::TcpListener::bind(a).await?;
            let bound = l.local_addr()?.to_string();
            Ok((bound, tokio::spawn(serve(l, protocol, ctx, shutdown))))
        }
        #[cfg(unix)]
        crate::config::ListenAddr::Unix(path) => {
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                std::fs::remove_file(path)?;
            }
            let l = tokio::net::UnixListener::bind(path)?;
            // Postfix's smtpd runs as its own user: like Postfix's own sockets the file is
            // open to all, and the directory it lives in decides who can reach it.
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
            Ok((
                format!("unix:{}", path.display()),
                tokio::spawn(serve(l, protocol, ctx, shutdown)),
            ))
        }
        #[cfg(not(unix))]
        crate::config::ListenAddr::Unix(_) => {
            Err(io::Error::other("unix sockets need a unix system"))
        }
    }
}
