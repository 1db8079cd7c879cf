//! The daemon side of the control socket. Connections are served concurrently, each request
//! is handed to the daemon's event loop (which owns all state) and answered when it replies,
//! so a slow client never holds up health checks or other clients.

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
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
    #[error(
        "{path} is {what}, not a socket: mim-lb only replaces a control socket that nobody listens on; \
         move it away or set another control_socket"
    )]
    NotASocket { path: PathBuf, what: &'static str },
    #[error(
        "something is listening on the control socket {path}: another mim-lb (whose lock file was removed?) \
         or another program; stop it or set another control_socket"
    )]
    InUse { path: PathBuf },
    #[error("checking what is at the control socket path {path}: {source}")]
    Probe { path: PathBuf, source: std::io::Error },
    #[error("removing the stale control socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: std::io::Error },
}

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the socket (mode 0600) and returns the listener.
pub async fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::Dir { dir: dir.to_owned(), source })?;
    }
    remove_stale(path).await?;
    let bind_err = |source| ServerError::Bind { path: path.to_owned(), source };
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

/// Removes what is at `path` only if it is a socket that refuses connections: what a daemon
/// that died leaves behind. The instance lock keeps out a second daemon, but not a program
/// listening there, a mim-lb whose lock file was deleted, or a file put there by mistake,
/// none of which is ours to delete.
async fn remove_stale(path: &Path) -> Result<(), ServerError> {
    let probe_err = |source| ServerError::Probe { path: path.to_owned(), source };
    let file_type = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(probe_err(e)),
    };
    if !file_type.is_socket() {
        return Err(ServerError::NotASocket { path: path.to_owned(), what: describe(file_type) });
    }
    // The connect does not block: a listener whose queue is full answers EAGAIN, and is as
    // alive as one that accepts.
    match UnixStream::connect(path).await {
        Ok(_) => Err(ServerError::InUse { path: path.to_owned() }),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(ServerError::InUse { path: path.to_owned() }),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale { path: path.to_owned(), source })
        }
        Err(e) => Err(probe_err(e)),
    }
}

fn describe(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_file() {
        "a regular file"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device"
    } else {
        "something else"
    }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A directory of its own for one test, removed with everything in it when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("mim-lb-control-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("creating a scratch directory");
            Scratch(dir)
        }

        fn socket(&self) -> PathBuf {
            self.0.join("control.sock")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn is_socket(path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let scratch = Scratch::new();
        let path = scratch.socket();
        // Bound and closed without removing the file, as by a daemon that was killed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(is_socket(&path));
        let listener = bind(&path).await.unwrap();
        let (accepted, connected) = tokio::join!(listener.accept(), UnixStream::connect(&path));
        accepted.unwrap();
        connected.unwrap();
    }

    #[tokio::test]
    async fn a_regular_file_is_refused_and_left_alone() {
        let scratch = Scratch::new();
        let path = scratch.socket();
        std::fs::write(&path, "not a socket\n").unwrap();
        let err = bind(&path).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("{} is a regular file, not a socket", path.display())), "{text}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket\n");
    }

    #[tokio::test]
    async fn a_directory_is_refused_and_left_alone() {
        let scratch = Scratch::new();
        let path = scratch.socket();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("keep"), "").unwrap();
        let err = bind(&path).await.unwrap_err();
        assert!(err.to_string().contains("is a directory, not a socket"), "{err}");
        assert!(path.join("keep").exists());
    }

    #[tokio::test]
    async fn a_symbolic_link_is_refused_even_to_a_stale_socket() {
        let scratch = Scratch::new();
        let path = scratch.socket();
        let target = scratch.0.join("elsewhere.sock");
        drop(std::os::unix::net::UnixListener::bind(&target).unwrap());
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = bind(&path).await.unwrap_err();
        assert!(err.to_string().contains("is a symbolic link, not a socket"), "{err}");
        assert_eq!(std::fs::read_link(&path).unwrap(), target);
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_and_keeps_working() {
        let scratch = Scratch::new();
        let path = scratch.socket();
        let live = UnixListener::bind(&path).unwrap();
        let err = bind(&path).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("listening"), "{text}");
        // The probe's connection is the first in the queue; another still reaches the listener.
        let (_probe, _) = live.accept().await.unwrap();
        let (accepted, connected) = tokio::join!(live.accept(), UnixStream::connect(&path));
        accepted.unwrap();
        connected.unwrap();
    }
}
