//! The CLI side of the control socket.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::protocol::{Request, Response};

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no mim-lb daemon is running: nothing listens on {0} (start one with `mim-lb run`, or give --socket)")]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: the control socket is root's only (mode 0600); run this as root")]
    PermissionDenied(PathBuf),
    #[error("talking to the daemon on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the daemon on {path} sent an answer that is not a response: {detail}")]
    Protocol { path: PathBuf, detail: String },
}

/// How long a request may take: a reload rebuilds tables, which takes well under this.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request and waits for its response.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    request_within(socket, req, TIMEOUT)
}

/// [`request`] with its own limit on each read and write (a readiness probe must answer
/// within its caller's interval, and a daemon that is busy starting is not ready).
pub fn request_within(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let io = |source: std::io::Error| ClientError::Io { path: socket.to_owned(), source };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_owned())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.to_owned()),
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Protocol {
        path: socket.to_owned(),
        detail: e.to_string(),
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Protocol { path: socket.to_owned(), detail: "it closed the connection".into() });
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol { path: socket.to_owned(), detail: e.to_string() })
}
