//! The daemon side of the control socket. Connections are served concurrently, each request
//! is handed to the daemon's event loop (which owns all state) and answered when it replies,
//! so a slow client never holds up health checks or other clients.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::protocol::{MAX_REQUEST, Request, Response};

/// A request waiting for the event loop's answer.
pub type Pending = (Request, oneshot::Sender<Response>);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("creating {dir} for the control socket: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("listening on the control socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
}

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the socket (mode 0600, replacing a stale file: the caller holds the instance lock, so
/// no live daemon owns it) and returns the listener.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::Dir { dir: dir.to_owned(), source })?;
    }
    let bind_err = |source| ServerError::Bind { path: path.to_owned(), source };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_err(e)),
        _ => {}
    }
    // Created with a umask that leaves nothing for group and others, so there is no moment
    // at which another user could connect.
    // SAFETY: umask(2) cannot fail; the previous mask is restored right after.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener.map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Accepts connections until the event loop goes away.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Pending>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, requests).await {
                log::debug!("control socket: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, requests: mpsc::Sender<Pending>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    let mut line = String::new();
    let response = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Response::error("no request within 5 s"),
        Ok(Err(e)) => Response::error(format!("reading the request: {e}")),
        Ok(Ok(_)) if !line.ends_with('\n') => Response::error("the request must be one line of JSON under 64 KiB"),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::error(format!("not a valid request: {e}")),
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if requests.send((request, tx)).await.is_err() {
                    Response::error("the daemon is shutting down")
                } else {
                    rx.await.unwrap_or_else(|_| Response::error("the daemon is shutting down"))
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|e| format!(r#"{{"ok":false,"error":"{e}"}}"#).into_bytes());
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}
