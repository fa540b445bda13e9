//! The milter protocol as an MTA speaks it to a filter (Sendmail's libmilter, `mfdef.h`;
//! Postfix's `smtpd_milters`), sans-IO: frames of a 4-byte big-endian length (the command
//! byte included), then the command byte and its data; commands decoded, replies encoded,
//! options negotiated. Nothing here touches a socket (DESIGN.md §7).
//!
//! Strings on the wire end in a NUL byte; a command whose strings do not is refused, as are
//! frames longer than [`MAX_FRAME`] and lists longer than [`MAX_MACROS`] / [`MAX_ARGS`].

/// The protocol version rcptgate speaks (Postfix since 2.6 and Sendmail 8.14 speak 6).
pub const VERSION: u32 = 6;
/// The oldest version accepted (Sendmail 8.12, Postfix before 2.6).
pub const MIN_VERSION: u32 = 2;
/// The longest frame accepted, command byte included. Body chunks are at most 64 KiB (larger
/// ones are never negotiated); header lines are bounded by the MTA.
pub const MAX_FRAME: usize = 256 * 1024;
/// Macros in one `SMFIC_MACRO` frame.
pub const MAX_MACROS: usize = 128;
/// Arguments of one `SMFIC_MAIL` or `SMFIC_RCPT` (the address, then ESMTP parameters).
pub const MAX_ARGS: usize = 64;

/// Command bytes, MTA to filter (`SMFIC_*`).
pub mod command {
    /// `SMFIC_ABORT`: forget the current message.
    pub const ABORT: u8 = b'A';
    /// `SMFIC_BODY`: a chunk of the body.
    pub const BODY: u8 = b'B';
    /// `SMFIC_CONNECT`: the SMTP client connected.
    pub const CONNECT: u8 = b'C';
    /// `SMFIC_MACRO`: macros for the command that follows.
    pub const MACRO: u8 = b'D';
    /// `SMFIC_BODYEOB`: end of the message.
    pub const END_OF_MESSAGE: u8 = b'E';
    /// `SMFIC_HELO`.
    pub const HELO: u8 = b'H';
    /// `SMFIC_QUIT_NC`: the next message belongs to a new SMTP connection.
    pub const QUIT_NEW_CONNECTION: u8 = b'K';
    /// `SMFIC_HEADER`: one header.
    pub const HEADER: u8 = b'L';
    /// `SMFIC_MAIL`: MAIL FROM, a new message.
    pub const MAIL: u8 = b'M';
    /// `SMFIC_EOH`: end of the headers.
    pub const END_OF_HEADERS: u8 = b'N';
    /// `SMFIC_OPTNEG`: option negotiation, first on every connection.
    pub const OPTNEG: u8 = b'O';
    /// `SMFIC_QUIT`: close the connection.
    pub const QUIT: u8 = b'Q';
    /// `SMFIC_RCPT`: RCPT TO.
    pub const RCPT: u8 = b'R';
    /// `SMFIC_DATA`: the DATA command.
    pub const DATA: u8 = b'T';
    /// `SMFIC_UNKNOWN`: an SMTP command the MTA does not know.
    pub const UNKNOWN: u8 = b'U';
}

/// Reply bytes, filter to MTA (`SMFIR_*`), as far as rcptgate sends them.
pub mod reply {
    /// `SMFIR_ACCEPT`: accept the message, no more callbacks for it.
    pub const ACCEPT: u8 = b'a';
    /// `SMFIR_CONTINUE`: go on.
    pub const CONTINUE: u8 = b'c';
    /// `SMFIR_ADDHEADER`: add a header at end of message.
    pub const ADD_HEADER: u8 = b'h';
    /// `SMFIR_CHGHEADER`: change (an empty value deletes) the n-th header of a name.
    pub const CHANGE_HEADER: u8 = b'm';
    /// `SMFIR_REJECT`: reject (the recipient at RCPT, else the message).
    pub const REJECT: u8 = b'r';
    /// `SMFIR_TEMPFAIL`: temporary failure.
    pub const TEMPFAIL: u8 = b't';
    /// `SMFIR_REPLYCODE`: answer with this SMTP reply.
    pub const REPLY_CODE: u8 = b'y';
    /// `SMFIC_OPTNEG` back to the MTA: the options the filter takes.
    pub const OPTNEG: u8 = b'O';
}

/// Protocol flags (`SMFIP_*`): steps the filter does not want, and replies it will not send.
pub mod step {
    /// No `SMFIC_CONNECT`.
    pub const NO_CONNECT: u32 = 0x1;
    /// No `SMFIC_HELO`.
    pub const NO_HELO: u32 = 0x2;
    /// No `SMFIC_MAIL`.
    pub const NO_MAIL: u32 = 0x4;
    /// No `SMFIC_RCPT`.
    pub const NO_RCPT: u32 = 0x8;
    /// No `SMFIC_BODY`.
    pub const NO_BODY: u32 = 0x10;
    /// No `SMFIC_HEADER`.
    pub const NO_HEADERS: u32 = 0x20;
    /// No `SMFIC_EOH`.
    pub const NO_END_OF_HEADERS: u32 = 0x40;
    /// No reply to `SMFIC_HEADER`.
    pub const NO_REPLY_HEADER: u32 = 0x80;
    /// No `SMFIC_UNKNOWN`.
    pub const NO_UNKNOWN: u32 = 0x100;
    /// No `SMFIC_DATA`.
    pub const NO_DATA: u32 = 0x200;
    /// The MTA sends rejected recipients too (`SMFIP_RCPT_REJ`).
    pub const RCPT_REJECTED: u32 = 0x800;
    /// No reply to `SMFIC_CONNECT`.
    pub const NO_REPLY_CONNECT: u32 = 0x1000;
    /// No reply to `SMFIC_HELO`.
    pub const NO_REPLY_HELO: u32 = 0x2000;
    /// No reply to `SMFIC_MAIL`.
    pub const NO_REPLY_MAIL: u32 = 0x4000;
    /// No reply to `SMFIC_RCPT`.
    pub const NO_REPLY_RCPT: u32 = 0x8000;
    /// No reply to `SMFIC_DATA`.
    pub const NO_REPLY_DATA: u32 = 0x10000;
    /// No reply to `SMFIC_UNKNOWN`.
    pub const NO_REPLY_UNKNOWN: u32 = 0x20000;
    /// No reply to `SMFIC_EOH`.
    pub const NO_REPLY_END_OF_HEADERS: u32 = 0x40000;
    /// No reply to `SMFIC_BODY`.
    pub const NO_REPLY_BODY: u32 = 0x80000;
}

/// Action flags (`SMFIF_*`): what the filter may change at end of message.
pub mod action {
    /// Add headers.
    pub const ADD_HEADERS: u32 = 0x1;
    /// Change or delete headers.
    pub const CHANGE_HEADERS: u32 = 0x10;
}

/// Why bytes from the MTA are refused; the connection is closed (the MTA then applies its
/// `milter_default_action`, which should be `tempfail`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MilterError {
    /// A frame of length 0 (there is no command byte).
    #[error("empty frame")]
    EmptyFrame,
    /// A frame longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is longer than {MAX_FRAME}")]
    TooLarge(usize),
    /// A command byte rcptgate does not know.
    #[error("unknown command {0:?}")]
    UnknownCommand(char),
    /// The command's data is not what the protocol says.
    #[error("malformed {command:?} command: {what}")]
    Malformed {
        /// The command byte.
        command: char,
        /// What is wrong.
        what: &'static str,
    },
    /// More than [`MAX_MACROS`] macros or [`MAX_ARGS`] arguments.
    #[error("{0:?} command has too many entries")]
    TooMany(char),
    /// A command that is not legal where the connection is.
    #[error("protocol state: {0}")]
    OutOfOrder(&'static str),
    /// The MTA speaks a version older than [`MIN_VERSION`].
    #[error("milter protocol version {0} is not supported (at least {MIN_VERSION})")]
    UnsupportedVersion(u32),
}

/// The result of [`decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// More bytes are needed.
    Incomplete,
    /// One complete frame.
    Frame {
        /// The command byte.
        command: u8,
        /// Its data.
        data: &'a [u8],
        /// Bytes the frame took from the buffer.
        consumed: usize,
    },
}

/// The first frame in `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, MilterError> {
    let Some(len) = buf.get(..4) else {
        return Ok(Decoded::Incomplete);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len == 0 {
        return Err(MilterError::EmptyFrame);
    }
    if len > MAX_FRAME {
        return Err(MilterError::TooLarge(len));
    }
    match (buf.get(4), buf.get(5..4 + len)) {
        (Some(&command), Some(data)) => Ok(Decoded::Frame {
            command,
            data,
            consumed: 4 + len,
        }),
        _ => Ok(Decoded::Incomplete),
    }
}

/// Append one frame: `data` after its command byte, behind their length (what an MTA sends;
/// [`encode`] builds replies with it).
pub fn frame(command: u8, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&((data.len() + 1) as u32).to_be_bytes());
    out.push(command);
    out.extend_from_slice(data);
}

/// One decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `SMFIC_OPTNEG`: what the MTA offers.
    OptNeg {
        /// Its protocol version.
        version: u32,
        /// Actions it allows ([`action`]).
        actions: u32,
        /// Steps it can skip ([`step`]).
        protocol: u32,
    },
    /// `SMFIC_MACRO`: macros for the command `for_command`.
    Macro {
        /// The command they belong to.
        for_command: u8,
        /// (name, value) pairs, names as sent (`{rcpt_addr}` or `i`).
        macros: Vec<(&'a [u8], &'a [u8])>,
    },
    /// `SMFIC_CONNECT` (its data is not used).
    Connect,
    /// `SMFIC_HELO` (its data is not used).
    Helo,
    /// `SMFIC_MAIL`: the sender, then ESMTP parameters.
    Mail {
        /// The arguments.
        args: Vec<&'a [u8]>,
    },
    /// `SMFIC_RCPT`: the recipient (`<local@domain>`), then ESMTP parameters.
    Rcpt {
        /// The arguments.
        args: Vec<&'a [u8]>,
    },
    /// `SMFIC_HEADER`.
    Header {
        /// The header's name.
        name: &'a [u8],
        /// Its value.
        value: &'a [u8],
    },
    /// `SMFIC_EOH`.
    EndOfHeaders,
    /// `SMFIC_BODY` (a chunk, not used).
    Body,
    /// `SMFIC_BODYEOB`.
    EndOfMessage,
    /// `SMFIC_ABORT`.
    Abort,
    /// `SMFIC_QUIT`.
    Quit,
    /// `SMFIC_QUIT_NC`.
    QuitNewConnection,
    /// `SMFIC_DATA`.
    Data,
    /// `SMFIC_UNKNOWN` (not used).
    Unknown,
}

/// The NUL-terminated strings of `data`; every one must be terminated.
fn strings(data: &[u8], command: u8, max: usize) -> Result<Vec<&[u8]>, MilterError> {
    let Some(body) = data.strip_suffix(&[0]) else {
        return Err(MilterError::Malformed {
            command: char::from(command),
            what: "strings are not NUL-terminated",
        });
    };
    let parts: Vec<&[u8]> = body.split(|&b| b == 0).collect();
    if parts.len() > max {
        return Err(MilterError::TooMany(char::from(command)));
    }
    Ok(parts)
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Decode the command of one frame.
pub fn parse(command: u8, data: &[u8]) -> Result<Command<'_>, MilterError> {
    use self::command as c;
    let malformed = |what| MilterError::Malformed {
        command: char::from(command),
        what,
    };
    Ok(match command {
        c::OPTNEG => {
            let (Some(version), Some(actions), Some(protocol)) =
                (u32_at(data, 0), u32_at(data, 4), u32_at(data, 8))
            else {
                return Err(malformed("shorter than 12 bytes"));
            };
            Command::OptNeg {
                version,
                actions,
                protocol,
            }
        }
        c::MACRO => {
            let Some((&for_command, rest)) = data.split_first() else {
                return Err(malformed("no command byte"));
            };
            let parts = if rest.is_empty() {
                Vec::new()
            } else {
                strings(rest, command, 2 * MAX_MACROS)?
            };
            if parts.len() % 2 != 0 {
                return Err(malformed("a macro name without a value"));
            }
            Command::Macro {
                for_command,
                macros: parts.chunks_exact(2).map(|p| (p[0], p[1])).collect(),
            }
        }
        c::CONNECT => Command::Connect,
        c::HELO => Command::Helo,
        c::MAIL | c::RCPT => {
            let args = strings(data, command, MAX_ARGS)?;
            if args.first().is_none_or(|a| a.is_empty()) {
                return Err(malformed("no address"));
            }
            if command == c::MAIL {
                Command::Mail { args }
            } else {
                Command::Rcpt { args }
            }
        }
        c::HEADER => {
            let parts = strings(data, command, 2)?;
            let [name, value] = parts[..] else {
                return Err(malformed("not a name and a value"));
            };
            Command::Header { name, value }
        }
        c::END_OF_HEADERS => Command::EndOfHeaders,
        c::BODY => Command::Body,
        c::END_OF_MESSAGE => Command::EndOfMessage,
        c::ABORT => Command::Abort,
        c::QUIT => Command::Quit,
        c::QUIT_NEW_CONNECTION => Command::QuitNewConnection,
        c::DATA => Command::Data,
        c::UNKNOWN => Command::Unknown,
        other => return Err(MilterError::UnknownCommand(char::from(other))),
    })
}

/// One reply to the MTA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `SMFIR_CONTINUE`.
    Continue,
    /// `SMFIR_ACCEPT`.
    Accept,
    /// `SMFIR_TEMPFAIL`.
    TempFail,
    /// `SMFIR_REPLYCODE` with an SMTP reply such as `550 5.1.1 User unknown`.
    ReplyCode(&'a str),
    /// `SMFIR_ADDHEADER`.
    AddHeader {
        /// The header's name.
        name: &'a str,
        /// Its value.
        value: &'a str,
    },
    /// `SMFIR_CHGHEADER`: the `index`-th (from 1) header named `name` gets `value`; an
    /// empty value deletes it.
    ChangeHeader {
        /// Which occurrence of the name, from 1.
        index: u32,
        /// The header's name.
        name: &'a str,
        /// Its new value.
        value: &'a str,
    },
    /// `SMFIC_OPTNEG` back: what the filter takes.
    OptNeg(Negotiated),
}

/// Append `s` as a NUL-terminated string, with NUL, CR and LF (which would break the frame
/// or the SMTP reply) made spaces.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend(s.bytes().map(|b| match b {
        0 | b'\r' | b'\n' => b' ',
        b => b,
    }));
    out.push(0);
}

/// Append the frame of `reply` to `out`.
pub fn encode(reply: &Reply<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match reply {
        Reply::Continue => out.push(self::reply::CONTINUE),
        Reply::Accept => out.push(self::reply::ACCEPT),
        Reply::TempFail => out.push(self::reply::TEMPFAIL),
        Reply::ReplyCode(text) => {
            out.push(self::reply::REPLY_CODE);
            put_str(out, text);
        }
        Reply::AddHeader { name, value } => {
            out.push(self::reply::ADD_HEADER);
            put_str(out, name);
            put_str(out, value);
        }
        Reply::ChangeHeader { index, name, value } => {
            out.push(self::reply::CHANGE_HEADER);
            out.extend_from_slice(&index.to_be_bytes());
            put_str(out, name);
            put_str(out, value);
        }
        Reply::OptNeg(n) => {
            out.push(self::reply::OPTNEG);
            out.extend_from_slice(&n.version.to_be_bytes());
            out.extend_from_slice(&n.actions.to_be_bytes());
            out.extend_from_slice(&n.protocol.to_be_bytes());
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// The options agreed with an MTA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The version both speak.
    pub version: u32,
    /// Actions the filter will use ([`action`]).
    pub actions: u32,
    /// Steps skipped and replies not sent ([`step`]).
    pub protocol: u32,
}

impl Negotiated {
    /// The MTA sends this step.
    pub fn sends(&self, skip_flag: u32) -> bool {
        self.protocol & skip_flag == 0
    }

    /// The MTA expects a reply to this step.
    pub fn wants_reply(&self, no_reply_flag: u32) -> bool {
        self.protocol & no_reply_flag == 0
    }

    /// Header actions (add, and change to delete forged ones) are allowed.
    pub fn can_manage_headers(&self) -> bool {
        let both = action::ADD_HEADERS | action::CHANGE_HEADERS;
        self.actions & both == both
    }
}

/// What to take of an MTA's offer: every step rcptgate has no use for is skipped (connect,
/// HELO, body, unknown commands, DATA; the headers too unless `manage_headers`), replies it
/// would only send as `CONTINUE` are dropped where the MTA allows it, and the header actions
/// are asked for when `manage_headers`. An MTA that does not offer the header actions gets a
/// filter that manages no headers ([`Negotiated::can_manage_headers`] says so); one older than
/// [`MIN_VERSION`] is refused.
pub fn negotiate(
    version: u32,
    actions: u32,
    protocol: u32,
    manage_headers: bool,
) -> Result<Negotiated, MilterError> {
    if version < MIN_VERSION {
        return Err(MilterError::UnsupportedVersion(version));
    }
    let mut skip = step::NO_CONNECT
        | step::NO_HELO
        | step::NO_BODY
        | step::NO_UNKNOWN
        | step::NO_DATA
        | step::NO_REPLY_CONNECT
        | step::NO_REPLY_HELO
        | step::NO_REPLY_DATA
        | step::NO_REPLY_UNKNOWN
        | step::NO_REPLY_BODY
        | step::NO_REPLY_END_OF_HEADERS
        | step::NO_REPLY_HEADER;
    let mut want_actions = 0;
    if manage_headers && actions & (action::ADD_HEADERS | action::CHANGE_HEADERS) != 0 {
        want_actions = action::ADD_HEADERS | action::CHANGE_HEADERS;
    } else {
        skip |= step::NO_HEADERS | step::NO_END_OF_HEADERS;
    }
    Ok(Negotiated {
        version: version.min(VERSION),
        actions: want_actions & actions,
        protocol: skip & protocol,
    })
}

/// What the filter says of one recipient (the frontend's lookup, rendered): the SMTP reply
/// to give at RCPT (`None`: go on), and the header values the message gets for it at end of
/// message when it is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptAnswer {
    /// `550 5.1.1 User unknown`, `501 5.1.3 …`, `451 4.3.0 …`, or `None` to go on.
    pub reply: Option<String>,
    /// One value per configured header name (in [`SessionOptions::headers`] order); empty
    /// for a rejected recipient or one that gets no headers.
    pub headers: Vec<String>,
}

/// How sessions behave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Header names rcptgate manages: any incoming header of these names is deleted, and
    /// each accepted recipient adds one of each. Empty: headers are not touched (and not
    /// asked for).
    pub headers: Vec<String>,
}

/// Where a connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before `SMFIC_OPTNEG`.
    Negotiate,
    /// Between messages.
    Idle,
    /// After `SMFIC_MAIL`: recipients, then headers and the end of the message.
    Message,
    /// After `SMFIC_QUIT` or an error: nothing more is read.
    Closed,
}

/// What to do after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these replies (possibly none) and read on.
    Reply(Vec<OwnedReply>),
    /// Close the connection (after `SMFIC_QUIT`).
    Close,
}

/// A reply that owns its strings (what a [`Session`] returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedReply {
    /// `SMFIR_CONTINUE`.
    Continue,
    /// `SMFIR_TEMPFAIL`.
    TempFail,
    /// `SMFIR_REPLYCODE`.
    ReplyCode(String),
    /// `SMFIR_ADDHEADER`.
    AddHeader(String, String),
    /// `SMFIR_CHGHEADER`: (index, name, value).
    ChangeHeader(u32, String, String),
    /// The option negotiation reply.
    OptNeg(Negotiated),
}

impl OwnedReply {
    /// The borrowed form [`encode`] takes.
    pub fn as_reply(&self) -> Reply<'_> {
        match self {
            OwnedReply::Continue => Reply::Continue,
            OwnedReply::TempFail => Reply::TempFail,
            OwnedReply::ReplyCode(t) => Reply::ReplyCode(t),
            OwnedReply::AddHeader(name, value) => Reply::AddHeader { name, value },
            OwnedReply::ChangeHeader(index, name, value) => Reply::ChangeHeader {
                index: *index,
                name,
                value,
            },
            OwnedReply::OptNeg(n) => Reply::OptNeg(*n),
        }
    }
}

/// One milter connection, sans-IO: feed it each command; it says what to reply. It knows
/// which commands are legal when (a command out of order is an error, and the connection is
/// closed), remembers the recipients accepted in the message in progress, and at end of
/// message deletes forged copies of the managed headers and adds one per accepted recipient.
#[derive(Debug)]
pub struct Session {
    options: SessionOptions,
    phase: Phase,
    negotiated: Option<Negotiated>,
    /// `{rcpt_addr}` from the macros sent just before the next `SMFIC_RCPT`.
    rcpt_macro: Option<String>,
    /// Header values of the recipients accepted in the message in progress.
    accepted: Vec<Vec<String>>,
    /// Occurrences of each managed header name seen in the message (same order as
    /// `options.headers`).
    seen: Vec<u32>,
}

impl Session {
    /// A new connection.
    pub fn new(options: SessionOptions) -> Session {
        let n = options.headers.len();
        Session {
            options,
            phase: Phase::Negotiate,
            negotiated: None,
            rcpt_macro: None,
            accepted: Vec::new(),
            seen: vec![0; n],
        }
    }

    /// The options agreed, once negotiated.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated
    }

    /// Inside a message (a shutdown answers such a connection `SMFIR_TEMPFAIL`).
    pub fn in_message(&self) -> bool {
        self.phase == Phase::Message
    }

    fn reset_message(&mut self) {
        self.rcpt_macro = None;
        self.accepted.clear();
        self.seen.iter_mut().for_each(|n| *n = 0);
    }

    /// Handle one command; `judge` answers for a recipient address (as the MTA sent it,
    /// brackets included).
    pub fn on_command(
        &mut self,
        cmd: Command<'_>,
        judge: &mut dyn FnMut(&str) -> RcptAnswer,
    ) -> Result<Step, MilterError> {
        let out_of_order = |what| MilterError::Malformed { command: '?', what };
        if self.phase == Phase::Closed {
            return Err(out_of_order("command after the connection was closed"));
        }
        let cont = |n: Option<Negotiated>, flag: u32| {
            if n.is_none_or(|n| n.wants_reply(flag)) {
                vec![OwnedReply::Continue]
            } else {
                Vec::new()
            }
        };
        let n = self.negotiated;
        let replies = match (self.phase, cmd) {
            (
                Phase::Negotiate,
                Command::OptNeg {
                    version,
                    actions,
                    protocol,
                },
            ) => {
                let agreed =
                    negotiate(version, actions, protocol, !self.options.headers.is_empty())?;
                self.negotiated = Some(agreed);
                self.phase = Phase::Idle;
                vec![OwnedReply::OptNeg(agreed)]
            }
            (Phase::Negotiate, _) => return Err(out_of_order("a command before OPTNEG")),
            (_, Command::OptNeg { .. }) => return Err(out_of_order("OPTNEG twice")),
            (
                _,
                Command::Macro {
                    for_command,
                    macros,
                },
            ) => {
                if for_command == command::RCPT {
                    self.rcpt_macro = macros
                        .iter()
                        .find(|(k, _)| *k == b"{rcpt_addr}")
                        .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
                }
                Vec::new()
            }
            (_, Command::Quit) => {
                self.phase = Phase::Closed;
                return Ok(Step::Close);
            }
            (_, Command::QuitNewConnection) => {
                self.reset_message();
                self.phase = Phase::Idle;
                Vec::new()
            }
            (_, Command::Abort) => {
                self.reset_message();
                self.phase = Phase::Idle;
                Vec::new()
            }
            (Phase::Idle, Command::Connect) => cont(n, step::NO_REPLY_CONNECT),
            (Phase::Idle, Command::Helo) => cont(n, step::NO_REPLY_HELO),
            (Phase::Idle | Phase::Message, Command::Unknown) => cont(n, step::NO_REPLY_UNKNOWN),
            (Phase::Idle | Phase::Message, Command::Mail { .. }) => {
                self.reset_message();
                self.phase = Phase::Message;
                cont(n, step::NO_REPLY_MAIL)
            }
            (Phase::Message, Command::Rcpt { args }) => {
                let arg = String::from_utf8_lossy(args.first().copied().unwrap_or_default());
                let macro_addr = self.rcpt_macro.take();
                // The argument is what the client sent; `{rcpt_addr}` when it is unusable.
                let rcpt = if arg.trim_matches(['<', '>', ' ']).is_empty() {
                    macro_addr.unwrap_or_default()
                } else {
                    arg.into_owned()
                };
                let answer = judge(&rcpt);
                match answer.reply {
                    Some(code) => vec![OwnedReply::ReplyCode(code)],
                    None => {
                        if !answer.headers.is_empty() {
                            self.accepted.push(answer.headers);
                        }
                        cont(n, step::NO_REPLY_RCPT)
                    }
                }
            }
            (Phase::Message, Command::Data) => cont(n, step::NO_REPLY_DATA),
            (Phase::Message, Command::Header { name, .. }) => {
                if let Some(i) = self
                    .options
                    .headers
                    .iter()
                    .position(|h| h.as_bytes().eq_ignore_ascii_case(name))
                {
                    self.seen[i] += 1;
                }
                cont(n, step::NO_REPLY_HEADER)
            }
            (Phase::Message, Command::EndOfHeaders) => cont(n, step::NO_REPLY_END_OF_HEADERS),
            (Phase::Message, Command::Body) => cont(n, step::NO_REPLY_BODY),
            (Phase::Message, Command::EndOfMessage) => {
                let mut out = Vec::new();
                if n.is_some_and(|n| n.can_manage_headers()) {
                    // Forged copies first, highest index first so the others keep theirs.
                    for (name, &count) in self.options.headers.iter().zip(&self.seen) {
                        for index in (1..=count).rev() {
                            out.push(OwnedReply::ChangeHeader(index, name.clone(), String::new()));
                        }
                    }
                    for values in &self.accepted {
                        for (name, value) in self.options.headers.iter().zip(values) {
                            out.push(OwnedReply::AddHeader(name.clone(), value.clone()));
                        }
                    }
                }
                out.push(OwnedReply::Continue);
                self.reset_message();
                self.phase = Phase::Idle;
                out
            }
            _ => return Err(out_of_order("a command out of order")),
        };
        Ok(Step::Reply(replies))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(command: u8, data: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        super::frame(command, data, &mut f);
        f
    }

    #[test]
    fn frames_at_every_split() {
        let mut stream = Vec::new();
        let optneg = [0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0x1f, 0xff, 0xff];
        stream.extend(frame(command::OPTNEG, &optneg));
        stream.extend(frame(
            command::MACRO,
            b"R{rcpt_addr}\0alice@contoso.com\0{rcpt_host}\0\0",
        ));
        stream.extend(frame(command::RCPT, b"<alice@contoso.com>\0NOTIFY=NEVER\0"));
        stream.extend(frame(command::QUIT, b""));
        let expected = vec![
            Command::OptNeg {
                version: 6,
                actions: 0x1ff,
                protocol: 0x1fffff,
            },
            Command::Macro {
                for_command: b'R',
                macros: vec![
                    (&b"{rcpt_addr}"[..], &b"alice@contoso.com"[..]),
                    (&b"{rcpt_host}"[..], &b""[..]),
                ],
            },
            Command::Rcpt {
                args: vec![&b"<alice@contoso.com>"[..], &b"NOTIFY=NEVER"[..]],
            },
            Command::Quit,
        ];
        // Fed one prefix at a time: nothing is decoded before its frame is whole.
        for cut in 0..=stream.len() {
            let mut at = 0;
            let mut got = Vec::new();
            while let Decoded::Frame {
                command,
                data,
                consumed,
            } = decode(&stream[at..cut]).expect("decodes")
            {
                got.push(parse(command, data).expect("parses"));
                at += consumed;
            }
            assert_eq!(got[..], expected[..got.len()], "cut {cut}");
            if cut == stream.len() {
                assert_eq!(got, expected);
            }
        }
    }

    #[test]
    fn bad_frames_and_commands_are_errors() {
        assert_eq!(decode(&[0, 0, 0, 0]), Err(MilterError::EmptyFrame));
        let big = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(decode(&big), Err(MilterError::TooLarge(MAX_FRAME + 1)));
        assert_eq!(decode(&[0, 0]), Ok(Decoded::Incomplete));
        assert_eq!(parse(b'Z', b""), Err(MilterError::UnknownCommand('Z')));
        assert!(matches!(
            parse(command::OPTNEG, &[0, 0, 0, 6]),
            Err(MilterError::Malformed { .. })
        ));
        assert!(matches!(
            parse(command::RCPT, b"<a@b>"),
            Err(MilterError::Malformed { .. })
        ));
        assert!(matches!(
            parse(command::RCPT, b"\0"),
            Err(MilterError::Malformed { .. })
        ));
        assert!(matches!(
            parse(command::HEADER, b"Subject\0"),
            Err(MilterError::Malformed { .. })
        ));
        assert!(matches!(
            parse(command::MACRO, b"R{odd}\0"),
            Err(MilterError::Malformed { .. })
        ));
        let many = "x\0".repeat(MAX_ARGS + 1);
        assert_eq!(
            parse(command::RCPT, many.as_bytes()),
            Err(MilterError::TooMany('R'))
        );
        assert_eq!(
            parse(command::HEADER, b"X-A\0v\0"),
            Ok(Command::Header {
                name: b"X-A",
                value: b"v"
            })
        );
        assert_eq!(
            parse(command::MACRO, b"C"),
            Ok(Command::Macro {
                for_command: b'C',
                macros: Vec::new()
            })
        );
    }

    #[test]
    fn replies_are_framed() {
        let cases: Vec<(Reply<'_>, &[u8])> = vec![
            (Reply::Continue, b"\0\0\0\x01c"),
            (Reply::TempFail, b"\0\0\0\x01t"),
            (Reply::Accept, b"\0\0\0\x01a"),
            (
                Reply::ReplyCode("550 5.1.1 User\r\nunknown"),
                b"\0\0\0\x19y550 5.1.1 User  unknown\0",
            ),
            (
                Reply::AddHeader {
                    name: "X-P",
                    value: "std",
                },
                b"\0\0\0\x09hX-P\0std\0",
            ),
            (
                Reply::ChangeHeader {
                    index: 2,
                    name: "X-P",
                    value: "",
                },
                b"\0\0\0\x0am\0\0\0\x02X-P\0\0",
            ),
            (
                Reply::OptNeg(Negotiated {
                    version: 6,
                    actions: 0x11,
                    protocol: 0x3,
                }),
                b"\0\0\0\x0dO\0\0\0\x06\0\0\0\x11\0\0\0\x03",
            ),
        ];
        for (reply, bytes) in cases {
            let mut out = Vec::new();
            encode(&reply, &mut out);
            assert_eq!(out, bytes, "{reply:?}");
            // What we send decodes as one frame of the right length.
            assert!(
                matches!(decode(&out), Ok(Decoded::Frame { consumed, .. }) if consumed == out.len())
            );
        }
    }

    #[test]
    fn negotiation_asks_only_for_what_is_needed() {
        // Postfix 3.x offers version 6, every action and every step flag.
        let n = negotiate(6, 0x1ff, 0x1f_ffff, true).expect("ok");
        assert_eq!(n.version, 6);
        assert!(n.can_manage_headers());
        assert!(!n.sends(step::NO_CONNECT) && !n.sends(step::NO_BODY));
        assert!(n.sends(step::NO_RCPT) && n.sends(step::NO_MAIL));
        assert!(n.sends(step::NO_HEADERS));
        assert!(n.wants_reply(step::NO_REPLY_RCPT));
        assert!(!n.wants_reply(step::NO_REPLY_HEADER));
        // Without header management, the headers are skipped too.
        let n = negotiate(6, 0x1ff, 0x1f_ffff, false).expect("ok");
        assert!(!n.sends(step::NO_HEADERS) && n.actions == 0);
        // An old MTA (version 2, the seven old step flags, no header actions): no header
        // management, nothing asked that it did not offer.
        let n = negotiate(2, 0, 0x7f, true).expect("ok");
        assert_eq!(n.version, 2);
        assert!(!n.can_manage_headers());
        assert_eq!(n.protocol & !0x7f, 0);
        // A newer one: we speak 6.
        assert_eq!(
            negotiate(7, 0x1ff, 0x1f_ffff, true).map(|n| n.version),
            Ok(6)
        );
        assert_eq!(
            negotiate(1, 0, 0, true),
            Err(MilterError::UnsupportedVersion(1))
        );
    }

    fn judge(rcpt: &str) -> RcptAnswer {
        match rcpt {
            "<alice@contoso.com>" => RcptAnswer {
                reply: None,
                headers: vec!["executives; rcpt=<alice@contoso.com>".into()],
            },
            "<carol@contoso.com>" => RcptAnswer {
                reply: None,
                headers: vec!["standard; rcpt=<carol@contoso.com>".into()],
            },
            "<someone@gmail.com>" => RcptAnswer {
                reply: None,
                headers: Vec::new(),
            },
            "<nobody@contoso.com>" => RcptAnswer {
                reply: Some("550 5.1.1 User unknown".into()),
                headers: Vec::new(),
            },
            other => panic!("unexpected {other}"),
        }
    }

    fn run(s: &mut Session, cmd: Command<'_>) -> Result<Step, MilterError> {
        s.on_command(cmd, &mut judge)
    }

    fn optneg() -> Command<'static> {
        Command::OptNeg {
            version: 6,
            actions: 0x1ff,
            protocol: 0x1f_ffff,
        }
    }

    #[test]
    fn a_message_rejects_unknown_recipients_and_tags_the_others() {
        let mut s = Session::new(SessionOptions {
            headers: vec!["X-Rcptgate-Profile".into()],
        });
        let Ok(Step::Reply(r)) = run(&mut s, optneg()) else {
            panic!("negotiation");
        };
        assert!(matches!(r[..], [OwnedReply::OptNeg(n)] if n.can_manage_headers()));
        let mail = Command::Mail {
            args: vec![b"<sender@example.org>"],
        };
        assert_eq!(
            run(&mut s, mail),
            Ok(Step::Reply(vec![OwnedReply::Continue]))
        );
        for (rcpt, want) in [
            ("<alice@contoso.com>", OwnedReply::Continue),
            (
                "<nobody@contoso.com>",
                OwnedReply::ReplyCode("550 5.1.1 User unknown".into()),
            ),
            ("<carol@contoso.com>", OwnedReply::Continue),
            ("<someone@gmail.com>", OwnedReply::Continue),
        ] {
            let cmd = Command::Rcpt {
                args: vec![rcpt.as_bytes()],
            };
            assert_eq!(run(&mut s, cmd), Ok(Step::Reply(vec![want])), "{rcpt}");
        }
        // Two forged copies of the managed header, in any case; headers get no reply.
        for name in ["X-Rcptgate-Profile", "Subject", "x-rcptgate-profile"] {
            let cmd = Command::Header {
                name: name.as_bytes(),
                value: b"forged",
            };
            assert_eq!(run(&mut s, cmd), Ok(Step::Reply(Vec::new())));
        }
        assert_eq!(
            run(&mut s, Command::EndOfHeaders),
            Ok(Step::Reply(Vec::new()))
        );
        let Ok(Step::Reply(eom)) = run(&mut s, Command::EndOfMessage) else {
            panic!("end of message");
        };
        let h = "X-Rcptgate-Profile".to_owned();
        assert_eq!(
            eom,
            vec![
                OwnedReply::ChangeHeader(2, h.clone(), String::new()),
                OwnedReply::ChangeHeader(1, h.clone(), String::new()),
                OwnedReply::AddHeader(h.clone(), "executives; rcpt=<alice@contoso.com>".into()),
                OwnedReply::AddHeader(h, "standard; rcpt=<carol@contoso.com>".into()),
                OwnedReply::Continue,
            ]
        );
        // The next message starts clean; an abort forgets the message.
        let mail = Command::Mail { args: vec![b"<>"] };
        run(&mut s, mail).expect("mail");
        let rcpt = Command::Rcpt {
            args: vec![b"<alice@contoso.com>"],
        };
        run(&mut s, rcpt).expect("rcpt");
        assert_eq!(run(&mut s, Command::Abort), Ok(Step::Reply(Vec::new())));
        assert!(!s.in_message());
        assert_eq!(run(&mut s, Command::Quit), Ok(Step::Close));
    }

    #[test]
    fn the_macro_stands_in_for_an_unusable_argument() {
        let mut s = Session::new(SessionOptions::default());
        run(&mut s, optneg()).expect("negotiate");
        run(&mut s, Command::Mail { args: vec![b"<>"] }).expect("mail");
        let m = Command::Macro {
            for_command: b'R',
            macros: vec![(b"{rcpt_addr}", b"<alice@contoso.com>")],
        };
        assert_eq!(run(&mut s, m), Ok(Step::Reply(Vec::new())));
        let r = Command::Rcpt { args: vec![b"<>"] };
        assert_eq!(run(&mut s, r), Ok(Step::Reply(vec![OwnedReply::Continue])));
        // Without managed headers nothing is added at the end.
        assert_eq!(
            run(&mut s, Command::EndOfMessage),
            Ok(Step::Reply(vec![OwnedReply::Continue]))
        );
    }

    #[test]
    fn commands_out_of_order_are_errors() {
        let mut s = Session::new(SessionOptions::default());
        assert!(
            run(
                &mut s,
                Command::Mail {
                    args: vec![b"<a@b>"]
                }
            )
            .is_err()
        );
        let mut s = Session::new(SessionOptions::default());
        run(&mut s, optneg()).expect("negotiate");
        assert!(run(&mut s, optneg()).is_err());
        let mut s = Session::new(SessionOptions::default());
        run(&mut s, optneg()).expect("negotiate");
        let r = Command::Rcpt {
            args: vec![b"<alice@contoso.com>"],
        };
        assert!(run(&mut s, r).is_err(), "RCPT before MAIL");
        let mut s = Session::new(SessionOptions::default());
        run(&mut s, optneg()).expect("negotiate");
        assert!(run(&mut s, Command::EndOfMessage).is_err());
        assert_eq!(run(&mut s, Command::Quit), Ok(Step::Close));
        assert!(run(&mut s, Command::Abort).is_err(), "after QUIT");
    }
}
