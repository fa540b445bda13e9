//! A small SMTP receiver that answers RCPT TO from rcptgate: `250 2.1.5` for recipients the
//! directory accepts, `550 5.1.1` for unknown ones, `501 5.1.3` for addresses that are not
//! mailboxes, `451 4.3.0` whenever the directory is unsure (not loaded yet, data too old),
//! and `554 5.7.1` (relay denied) for domains that are not ours. Messages are read and
//! discarded. The SMTP codec is `smtp-proto`; rcptgate brings the directory.
//!
//! ```sh
//! cargo run --example smtp_receiver -- config/rcptgate.toml 127.0.0.1:2525
//! ```

use std::sync::Arc;
use std::time::Duration;

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver, RequestReceiver};
use smtp_proto::{Error as SmtpError, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use rcptgate::{Directory, Reject, Service, Verdict};

/// A client quiet for this long is disconnected.
const IDLE: Duration = Duration::from_secs(300);
/// Recipients per message.
const MAX_RCPT: usize = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let config = args.next().unwrap_or_else(|| "config/rcptgate.toml".into());
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:2525".into());
    let service = Service::start(rcptgate::Config::load(config.as_ref())?).await?;
    let listener = TcpListener::bind(&listen).await?;
    // Tests read this line to find the port when `:0` was asked for.
    println!("listening on {}", listener.local_addr()?);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let dir = service.directory().clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, dir).await {
                        eprintln!("session: {e}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    service.shutdown().await;
    Ok(())
}

/// What a session is reading.
enum Reading {
    Commands(RequestReceiver),
    Data(DummyDataReceiver),
}

async fn session(mut stream: TcpStream, dir: Arc<Directory>) -> std::io::Result<()> {
    stream.write_all(b"220 rcptgate-example ESMTP\r\n").await?;
    let mut reading = Reading::Commands(RequestReceiver::default());
    let mut recipients: Vec<String> = Vec::new();
    let mut mail = false;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match tokio::time::timeout(IDLE, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                stream.write_all(b"421 4.4.2 Idle timeout\r\n").await?;
                return Ok(());
            }
        };
        let mut bytes = buf[..n].iter();
        let mut out = Vec::new();
        loop {
            match &mut reading {
                Reading::Data(data) => {
                    if !data.ingest(&mut bytes) {
                        break;
                    }
                    out.extend_from_slice(
                        format!(
                            "250 2.0.0 Ok: message for {} recipient(s) discarded\r\n",
                            recipients.len()
                        )
                        .as_bytes(),
                    );
                    recipients.clear();
                    mail = false;
                    reading = Reading::Commands(RequestReceiver::default());
                }
                Reading::Commands(commands) => {
                    let reply: &str = match commands.ingest(&mut bytes) {
                        Err(SmtpError::NeedsMoreData { .. }) => break,
                        Ok(Request::Ehlo { .. }) => {
                            "250-rcptgate-example\r\n250-PIPELINING\r\n250 8BITMIME"
                        }
                        Ok(Request::Helo { .. }) => "250 rcptgate-example",
                        Ok(Request::Mail { .. }) => {
                            mail = true;
                            recipients.clear();
                            "250 2.1.0 Ok"
                        }
                        Ok(Request::Rcpt { .. }) if !mail => "503 5.5.1 MAIL first",
                        Ok(Request::Rcpt { .. }) if recipients.len() >= MAX_RCPT => {
                            "452 4.5.3 Too many recipients"
                        }
                        Ok(Request::Rcpt { to }) => {
                            let (reply, accepted) = rcpt_reply(&dir, &to.address);
                            if accepted {
                                recipients.push(to.address.into_owned());
                            }
                            out.extend_from_slice(reply.as_bytes());
                            out.extend_from_slice(b"\r\n");
                            continue;
                        }
                        Ok(Request::Data) if recipients.is_empty() => {
                            "554 5.5.1 No valid recipients"
                        }
                        Ok(Request::Data) => {
                            let data = DataReceiver::new();
                            reading = Reading::Data(DummyDataReceiver::new_data(&data));
                            "354 End data with <CR><LF>.<CR><LF>"
                        }
                        Ok(Request::Rset) => {
                            mail = false;
                            recipients.clear();
                            "250 2.0.0 Ok"
                        }
                        Ok(Request::Noop { .. }) => "250 2.0.0 Ok",
                        Ok(Request::Quit) => {
                            out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                            stream.write_all(&out).await?;
                            return Ok(());
                        }
                        Ok(_) => "502 5.5.1 Command not implemented",
                        Err(SmtpError::ResponseTooLong) => "500 5.5.6 Line too long",
                        Err(SmtpError::UnknownCommand) => "500 5.5.2 Unknown command",
                        Err(SmtpError::InvalidRecipientAddress) => {
                            "501 5.1.3 Bad recipient address syntax"
                        }
                        Err(_) => "501 5.5.4 Syntax error",
                    };
                    out.extend_from_slice(reply.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
    }
}

/// The reply for one recipient, and whether it was accepted.
fn rcpt_reply(dir: &Directory, rcpt: &str) -> (String, bool) {
    let answer = dir.lookup(rcpt);
    match answer.verdict() {
        Verdict::Accept(hit) => {
            // Where an MTA would route it, from the same generation as the verdict.
            let route = answer.route().unwrap_or("default");
            (format!("250 2.1.5 Ok ({} via {route})", hit.kind), true)
        }
        Verdict::Reject(Reject::Syntax(_)) => {
            ("501 5.1.3 Bad recipient address syntax".into(), false)
        }
        Verdict::Reject(_) => ("550 5.1.1 User unknown".into(), false),
        Verdict::Tempfail(_) => (
            "451 4.3.0 Directory unavailable, try again later".into(),
            false,
        ),
        Verdict::NotOurs => ("554 5.7.1 Relay access denied".into(), false),
    }
}
