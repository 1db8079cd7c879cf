//! What prepare-backend changed, kept on disk so that `--undo` can put things back.
//!
//! One file per network namespace (`netns-<inode>.json` under the state directory), because
//! everything prepare-backend touches (addresses on `lo`, `net.ipv4.conf.*`) belongs to a
//! namespace, and several masters may share one filesystem (containers, the test lab). The
//! file holds a [`Ledger`]: the VIPs prepared (and whether prepare-backend added them or found
//! them), and for each setting changed the value it had *before the first change* and the value
//! set. Later runs add to the ledger but never overwrite a recorded original, so prepare, prepare
//! again, undo restores what was there at first.
//!
//! Inode numbers of namespaces are reused once a namespace is gone, and the initial
//! namespace's inode is the same after a reboot, when every change prepare-backend made is
//! gone. So the file also records the namespace's identity (boot id and netns cookie, which are
//! never reused within a boot); a file whose identity does not match is stale and is treated
//! as absent.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sysctl::SysctlKey;
use super::vip::Vip;

/// Where state files go unless `--state-dir` says otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/mim-lb/prepare-backend";

/// Bumped when the file format changes incompatibly; other versions are refused, not guessed.
pub const FORMAT_VERSION: u32 = 1;

/// A VIP prepare-backend was asked to prepare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRecord {
    pub vip: Vip,
    /// prepare-backend put it on `lo` (false: it was there already, and undo leaves it).
    pub added: bool,
}

/// A setting prepare-backend changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysctlRecord {
    #[serde(flatten)]
    pub key: SysctlKey,
    /// The value before prepare-backend first changed it.
    pub original: i32,
    /// The value prepare-backend last set.
    pub set: i32,
}

/// Everything undo needs to know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Sorted by VIP.
    pub vips: Vec<VipRecord>,
    /// In the order the settings were first changed.
    pub sysctls: Vec<SysctlRecord>,
}

impl Ledger {
    pub fn is_empty(&self) -> bool {
        self.vips.is_empty() && self.sysctls.is_empty()
    }

    pub fn vip(&self, vip: Vip) -> Option<&VipRecord> {
        self.vips.iter().find(|r| r.vip == vip)
    }

    /// Records that `vip` is prepared. `added` only ever turns true: a VIP found on `lo` by a
    /// later run may well be the one an earlier run added.
    pub fn record_vip(&mut self, vip: Vip, added: bool) {
        match self.vips.iter_mut().find(|r| r.vip == vip) {
            Some(r) => r.added |= added,
            None => {
                self.vips.push(VipRecord { vip, added });
                self.vips.sort_by_key(|r| r.vip);
            }
        }
    }

    pub fn forget_vip(&mut self, vip: Vip) {
        self.vips.retain(|r| r.vip != vip);
    }

    /// Records that `key` is being changed from `from` to `to`, keeping an earlier original.
    pub fn record_sysctl(&mut self, key: &SysctlKey, from: i32, to: i32) {
        match self.sysctls.iter_mut().find(|r| r.key == *key) {
            Some(r) => r.set = to,
            None => self.sysctls.push(SysctlRecord { key: key.clone(), original: from, set: to }),
        }
    }
}

/// Which network namespace a ledger belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    /// Inode of the namespace (`stat -L /proc/thread-self/ns/net`): names the file.
    pub inode: u64,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// SO_NETNS_COOKIE: unique per namespace within a boot (0 if the kernel is older than 5.14).
    pub cookie: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    netns: NetnsId,
    ledger: Ledger,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("identifying this network namespace: {what}: {source}")]
    Netns { what: &'static str, source: io::Error },
    #[error(
        "{path} is not a prepare-backend state file ({source}); move it away to start over \
         (the values from before prepare-backend that it recorded are then lost)"
    )]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("{path} has format version {found}, this mim-lb understands {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io { what, path: path.to_owned(), source }
}

impl NetnsId {
    /// The namespace of the calling thread.
    pub fn current() -> Result<NetnsId, StateError> {
        let inode = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(|source| StateError::Netns { what: "stat /proc/thread-self/ns/net", source })?
            .ino();
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map_err(|source| StateError::Netns { what: "reading the boot id", source })?
            .trim()
            .to_owned();
        Ok(NetnsId { inode, boot_id, cookie: netns_cookie()? })
    }
}

fn netns_cookie() -> Result<u64, StateError> {
    let err = |what| move |source| StateError::Netns { what, source };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("socket")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writing and sized as the option expects.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Kernels before 5.14: the inode and boot id must do.
        if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
            return Ok(0);
        }
        return Err(err("SO_NETNS_COOKIE")(e));
    }
    Ok(cookie)
}

/// What [`Store::load`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No state file for this namespace.
    Missing,
    /// A file for a namespace that no longer exists (an earlier boot, or a deleted namespace
    /// whose inode this one reuses); nothing it records applies here.
    Stale,
    Found(Ledger),
}

/// The state file of one network namespace.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    netns: NetnsId,
}

/// Held while prepare-backend runs, so that two runs in one namespace cannot lose each other's
/// records. Released when dropped (the kernel drops a flock with its file).
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] File);

impl Store {
    pub fn new(dir: &Path, netns: NetnsId) -> Store {
        Store { dir: dir.to_owned(), netns }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("netns-{}.json", self.netns.inode))
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("netns-{}.lock", self.netns.inode))
    }

    pub fn load(&self) -> Result<Loaded, StateError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
            Err(source) => return Err(StateError::Io { what: "reading", path, source }),
        };
        // The version first, so that a future format is reported as such, not as garbage.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let version: Version = serde_json::from_str(&text)
            .map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
        if version.version != FORMAT_VERSION {
            return Err(StateError::Version { path, found: version.version });
        }
        let file: StateFile = serde_json::from_str(&text)
            .map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
        if file.netns != self.netns {
            return Ok(Loaded::Stale);
        }
        Ok(Loaded::Found(file.ledger))
    }

    /// Writes the ledger atomically: to a temporary file in the same directory, flushed to
    /// disk, then renamed over the old one, so that a crash leaves the old or the new file,
    /// never half of one.
    pub fn save(&self, ledger: &Ledger) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let path = self.path();
        let tmp =
            self.dir.join(format!(".netns-{}.json.{}.tmp", self.netns.inode, std::process::id()));
        let file = StateFile {
            version: FORMAT_VERSION,
            netns: self.netns.clone(),
            ledger: ledger.clone(),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("a ledger always serializes");
        text.push('\n');
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(StateError::Io { what: "writing", path: tmp, source });
        }
        if let Err(source) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StateError::Io { what: "renaming a temporary file to", path, source });
        }
        self.sync_dir()
    }

    /// Removes the state file (nothing left to undo); a missing file is fine.
    pub fn remove(&self) -> Result<(), StateError> {
        let path = self.path();
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { what: "removing", path, source }),
        }
    }

    /// The rename (or removal) itself is durable only once the directory is.
    fn sync_dir(&self) -> Result<(), StateError> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err("syncing", &self.dir))
    }

    /// Takes the namespace's lock, waiting for another run to finish. Creates the directory.
    pub fn lock(&self) -> Result<Lock, StateError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(StateError::Io {
                what: "locking",
                path,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Lock(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare_backend::sysctl::Knob;

    fn vip(s: &str) -> Vip {
        s.parse().unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mim-lb-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn netns(cookie: u64) -> NetnsId {
        NetnsId { inode: 4026531840, boot_id: "b0".into(), cookie }
    }

    #[test]
    fn ledger_keeps_the_first_original_and_sorted_vips() {
        let mut l = Ledger::default();
        let key = SysctlKey::new("all", Knob::ArpIgnore);
        l.record_sysctl(&key, 0, 1);
        l.record_sysctl(&key, 3, 1);
        assert_eq!(l.sysctls, vec![SysctlRecord { key, original: 0, set: 1 }]);
        l.record_vip(vip("10.0.0.101"), true);
        l.record_vip(vip("10.0.0.100"), false);
        l.record_vip(vip("10.0.0.100"), true);
        l.record_vip(vip("10.0.0.101"), false);
        assert_eq!(
            l.vips,
            vec![
                VipRecord { vip: vip("10.0.0.100"), added: true },
                VipRecord { vip: vip("10.0.0.101"), added: true },
            ]
        );
        l.forget_vip(vip("10.0.0.100"));
        assert_eq!(l.vips.len(), 1);
        assert!(!l.is_empty());
    }

    #[test]
    fn round_trip_and_file_format() {
        let dir = temp_dir("roundtrip");
        let store = Store::new(&dir, netns(7));
        assert_eq!(store.load().unwrap(), Loaded::Missing);
        let mut ledger = Ledger::default();
        ledger.record_vip(vip("fd00::100"), true);
        ledger.record_vip(vip("10.0.0.100"), false);
        ledger.record_sysctl(&SysctlKey::new("eth0.100", Knob::RpFilter), 1, 2);
        store.save(&ledger).unwrap();
        assert_eq!(store.load().unwrap(), Loaded::Found(ledger.clone()));
        // Saving again replaces the file and leaves no temporary behind.
        store.save(&ledger).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["netns-4026531840.json".to_owned()]);
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("\"vip\": \"10.0.0.100\""), "{text}");
        assert!(text.contains("\"conf\": \"eth0.100\""), "{text}");
        assert!(text.contains("\"knob\": \"rp_filter\""), "{text}");
        store.remove().unwrap();
        store.remove().unwrap();
        assert_eq!(store.load().unwrap(), Loaded::Missing);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_of_another_namespace_or_format_is_not_used() {
        let dir = temp_dir("stale");
        Store::new(&dir, netns(7)).save(&Ledger::default()).unwrap();
        // Same inode (same file name), another cookie: a namespace that reused the inode.
        assert_eq!(Store::new(&dir, netns(8)).load().unwrap(), Loaded::Stale);
        // After a reboot cookies count from the start again, so the same inode and cookie can
        // come back: the boot id tells (the default directory under /run survives no reboot,
        // but a --state-dir on disk does).
        let rebooted = NetnsId { boot_id: "b1".into(), ..netns(7) };
        assert_eq!(Store::new(&dir, rebooted).load().unwrap(), Loaded::Stale);
        let store = Store::new(&dir, netns(7));
        std::fs::write(store.path(), "{\"version\": 99}").unwrap();
        assert!(matches!(store.load(), Err(StateError::Version { found: 99, .. })));
        std::fs::write(store.path(), "not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("is not a prepare-backend state file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identifies_this_namespace() {
        let a = NetnsId::current().unwrap();
        assert_eq!(a, NetnsId::current().unwrap());
        assert!(a.inode != 0 && !a.boot_id.is_empty());
    }
}
