//! One daemon per control socket: a lock file next to the socket, held for the daemon's life.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// Held for the daemon's life (and by `mim-lb detach`): a second daemon with the same control socket refuses to start
/// instead of sharing the maps.
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    pub fn acquire(control_socket: &Path) -> Result<InstanceLock> {
        let mut path = control_socket.as_os_str().to_owned();
        path.push(".lock");
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(InstanceLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "another mim-lb is running with control socket {} (it holds {})",
                control_socket.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

