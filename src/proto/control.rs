//! The control socket's protocol (sans-IO): one command line in, one JSON line out, then the
//! daemon closes the connection. Only `rcptgate status`, `approve` and `conflicts` speak it,
//! over a unix socket only its owner can open.
//!
//! ```text
//! status | approve | conflicts | reload | delete ADDRESS... | keep ADDRESS...
//! ```

/// The longest command line accepted, newline included.
pub const MAX_LINE: usize = 16 * 1024;
/// At most this many addresses in one `delete` or `keep`.
pub const MAX_ARGS: usize = 256;

/// One control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The service's state.
    Status,
    /// Apply the removals the deletion guard holds.
    Approve,
    /// Tombstones and conflicting claims.
    Conflicts,
    /// Rebuild now (files re-read, LDAP when due) and answer what it did.
    Reload,
    /// Drop these tombstones now.
    Delete(Vec<String>),
    /// Keep these tombstones until their address returns or they are deleted.
    Keep(Vec<String>),
    /// Why these addresses get the answer they get.
    Explain(Vec<String>),
    /// Fetch one object of an LDAP source now and publish it: (source, object: a DN, user
    /// principal name or address; the rest of the line, so a DN may hold spaces).
    Provision(String, String),
}

/// Why a control command line is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum ControlError {
    #[error("command line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("command is not UTF-8 text")]
    NotText,
    #[error(
        "unknown command {0:?} (status, approve, conflicts, reload, delete, keep, explain, provision)"
    )]
    Unknown(String),
    #[error("{0} needs its arguments (explain ADDRESS…; provision SOURCE OBJECT)")]
    NoArgs(&'static str),
    #[error("{0} takes no arguments")]
    ExtraArgs(&'static str),
    #[error("more than {MAX_ARGS} addresses")]
    TooManyArgs,
}

/// The first command in `buf`, or `None` while its line is incomplete.
pub fn decode(buf: &[u8]) -> Result<Option<Command>, ControlError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Err(ControlError::TooLong)
        } else {
            Ok(None)
        };
    };
    if end >= MAX_LINE {
        return Err(ControlError::TooLong);
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ControlError::NotText)?;
    let mut words = line.trim_end_matches('\r').split_ascii_whitespace();
    let verb = words.next().unwrap_or("");
    let args: Vec<String> = words.map(str::to_owned).collect();
    if args.len() > MAX_ARGS {
        return Err(ControlError::TooManyArgs);
    }
    let bare = |name: &'static str, c: Command| {
        if args.is_empty() {
            Ok(Some(c))
        } else {
            Err(ControlError::ExtraArgs(name))
        }
    };
    match verb {
        "status" => bare("status", Command::Status),
        "approve" => bare("approve", Command::Approve),
        "conflicts" => bare("conflicts", Command::Conflicts),
        "reload" => bare("reload", Command::Reload),
        "delete" if args.is_empty() => Err(ControlError::NoArgs("delete")),
        "keep" if args.is_empty() => Err(ControlError::NoArgs("keep")),
        "provision" if args.len() < 2 => Err(ControlError::NoArgs("provision")),
        "provision" => Ok(Some(Command::Provision(
            args[0].clone(),
            args[1..].join(" "),
        ))),
        "explain" if args.is_empty() => Err(ControlError::NoArgs("explain")),
        "explain" => Ok(Some(Command::Explain(args))),
        "delete" => Ok(Some(Command::Delete(args))),
        "keep" => Ok(Some(Command::Keep(args))),
        other => Err(ControlError::Unknown(other.chars().take(40).collect())),
    }
}

/// The command line for `cmd` (what the CLI sends).
pub fn encode(cmd: &Command) -> String {
    if let Command::Provision(source, object) = cmd {
        return format!("provision {source} {object}\n");
    }
    let (verb, args): (&str, &[String]) = match cmd {
        Command::Status => ("status", &[]),
        Command::Approve => ("approve", &[]),
        Command::Conflicts => ("conflicts", &[]),
        Command::Reload => ("reload", &[]),
        Command::Delete(a) => ("delete", a),
        Command::Keep(a) => ("keep", a),
        Command::Explain(a) => ("explain", a),
        Command::Provision(..) => ("provision", &[]),
    };
    let mut line = verb.to_owned();
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for c in [
            Command::Status,
            Command::Approve,
            Command::Conflicts,
            Command::Reload,
            Command::Delete(vec!["a@b.example".into(), "c@d.example".into()]),
            Command::Keep(vec!["a@b.example".into()]),
        ] {
            let line = encode(&c);
            assert_eq!(decode(line.as_bytes()), Ok(Some(c.clone())));
            // Incomplete at every split.
            for cut in 0..line.len() {
                assert_eq!(
                    decode(&line.as_bytes()[..cut]),
                    Ok(None),
                    "{line:?} at {cut}"
                );
            }
        }
        assert_eq!(decode(b"status\r\n"), Ok(Some(Command::Status)));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(
            decode(b"reboot\n"),
            Err(ControlError::Unknown("reboot".into()))
        );
        assert_eq!(decode(b"delete\n"), Err(ControlError::NoArgs("delete")));
        assert_eq!(
            decode(b"status now\n"),
            Err(ControlError::ExtraArgs("status"))
        );
        assert_eq!(decode(b"\xff\n"), Err(ControlError::NotText));
        assert_eq!(decode(&[b'a'; MAX_LINE]), Err(ControlError::TooLong));
        let many = format!("keep {}\n", "a@b ".repeat(MAX_ARGS + 1));
        assert_eq!(decode(many.as_bytes()), Err(ControlError::TooManyArgs));
        assert_eq!(decode(b"\n"), Err(ControlError::Unknown(String::new())));
    }
}
