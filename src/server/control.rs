//! The control socket: a unix socket only its owner can open (mode 0600), one command per
//! connection. Commands go to the directory service ([`crate::service::Handle::control`]) and
//! its typed [`Reply`] comes back as one JSON line.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tracing::warn;

use crate::proto::control;
use crate::service::{Handle, Reply};

/// How long a client may take to send its command line, and to read the answer.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections served at once.
const MAX_CONNECTIONS: usize = 16;

/// Bind the control socket (a stale socket file is replaced) with owner-only permissions.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serve control connections until shutdown.
pub async fn serve(
    listener: UnixListener,
    service: Handle,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(io::Error::other)?,
            _ = shutdown.changed() => return Ok(()),
        };
        let stream = tokio::select! {
            s = listener.accept() => s,
            _ = shutdown.changed() => return Ok(()),
        };
        match stream {
            Ok((s, _)) => {
                let service = service.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(s, service).await {
                        warn!(error = %e, "control connection: {e}");
                    }
                    drop(permit);
                });
            }
            Err(e) => super::accept_backoff("control", &e).await,
        }
    }
}

async fn handle(mut s: UnixStream, service: Handle) -> io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    let decoded = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            match control::decode(&buf) {
                Ok(Some(c)) => return Ok(c),
                Err(e) => return Err(e.to_string()),
                Ok(None) => {}
            }
            buf.reserve(1024);
            match s.read_buf(&mut buf).await {
                Ok(0) => return Err("connection closed before a command".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no command within {READ_TIMEOUT:?}")));
    let answer = match decoded {
        Ok(cmd) => service.control(cmd).await,
        Err(message) => Reply::Error { message },
    };
    let mut line = serde_json::to_string(&answer).map_err(io::Error::other)?;
    line.push('\n');
    tokio::time::timeout(READ_TIMEOUT, async {
        s.write_all(line.as_bytes()).await?;
        s.shutdown().await
    })
    .await
    .map_err(|_| io::Error::other("the client did not read the answer"))?
}

/// Send one command to a daemon's control socket and return its answer (the CLI side).
pub fn request(path: &Path, cmd: &control::Command) -> io::Result<Reply> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    s.write_all(control::encode(cmd).as_bytes())?;
    let mut out = String::new();
    s.take(64 << 20).read_to_string(&mut out)?;
    serde_json::from_str(&out).map_err(|e| io::Error::other(format!("bad answer: {e}")))
}
