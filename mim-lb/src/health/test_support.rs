//! Helpers shared by the tests of the checkers and of the checker loop: loopback servers,
//! scratch directories, and watching processes die.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// A loopback address (`ip` is "127.0.0.1" or "::1") nothing listens on: bound, then closed
/// again, so that connecting is refused at once.
pub(crate) async fn closed_port(ip: &str) -> SocketAddr {
    let ip: IpAddr = ip.parse().expect("a loopback address");
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("binding loopback");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// A server answering every connection with `response` (raw bytes; `None`: never answers)
/// after reading the request head, which it keeps for inspection. Dropping it closes the
/// listener and every connection.
pub(crate) struct Server {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// `bind` is a loopback address, with port 0 for any.
    pub async fn start(bind: &str, response: Option<Vec<u8>>) -> Server {
        let listener = TcpListener::bind(bind).await.expect("binding loopback");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let head = read_head(&mut conn).await;
                seen.lock().expect("not poisoned").push(head);
                match &response {
                    Some(bytes) => {
                        let _ = conn.write_all(bytes).await;
                        let _ = conn.shutdown().await;
                    }
                    // Kept open, without a word, until the server is dropped.
                    None => held.push(conn),
                }
            }
        });
        Server {
            addr,
            requests,
            task,
        }
    }

    /// The request heads received so far (empty strings for connections that sent nothing).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("not poisoned").clone()
    }
}

async fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A complete HTTP/1.1 response.
pub(crate) fn response(status: &str, body: &str) -> Option<Vec<u8>> {
    Some(
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// A directory of its own for one test, removed with everything in it when dropped.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mim-lb-health-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> String {
        self.0
            .join(name)
            .to_str()
            .expect("temp paths are UTF-8 here")
            .to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `/bin/sh -c script arg0 args...`: inside the script `$0` is `arg0`.
pub(crate) fn sh(script: &str, arg0: &str, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["/bin/sh", "-c", script, arg0]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// The pids a script wrote to `path` on one line, once the line is complete.
pub(crate) async fn pids_in(path: &str) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(text) = fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text
                .split_whitespace()
                .map(|p| p.parse().expect("a pid"))
                .collect();
        }
        assert!(Instant::now() < deadline, "{path} was never written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Running, or stopped, but not dead. A killed process whose parent is gone stays a zombie
/// until init reaps it, which a container's init may never do: zombies count as gone.
pub(crate) fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
    }
}

/// Waits (a generous while: killing is asynchronous) for every pid to be gone.
pub(crate) async fn assert_all_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() > deadline {
            let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
            // Clean up before failing, so that a broken kill leaves no sleeps behind.
            for &p in &left {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            panic!("processes {left:?} survived");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
