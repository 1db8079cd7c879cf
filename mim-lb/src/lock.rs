//! One daemon per control socket and per pin directory. Two daemons sharing either would
//! fight: over the socket, or over the maps and the attachment (the second would take over
//! the first one's program and remove its pins when it stops).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// Held for the daemon's life (and by `mim-lb detach` while it works): `flock`s on a lock
/// file next to the control socket and on the pin directory itself (a directory on bpffs can
/// hold no lock file, but it can be locked). The kernel drops both when the process dies.
pub struct InstanceLock {
    _socket: File,
    _pins: File,
}

impl InstanceLock {
    pub fn acquire(control_socket: &Path, pin_dir: &Path) -> Result<InstanceLock> {
        let mut path = control_socket.as_os_str().to_owned();
        path.push(".lock");
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let socket = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        lock(&socket, &path, || format!("with control socket {}", control_socket.display()))?;

        std::fs::create_dir_all(pin_dir).with_context(|| {
            format!("creating the pin directory {} (is a bpf filesystem mounted there?)", pin_dir.display())
        })?;
        let pins = File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
        lock(&pins, pin_dir, || format!("with pin_dir {}", pin_dir.display()))?;
        Ok(InstanceLock { _socket: socket, _pins: pins })
    }
}

fn lock(file: &File, path: &Path, what: impl Fn() -> String) -> Result<()> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another mim-lb is running {} (it holds a lock on {})", what(), path.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}
