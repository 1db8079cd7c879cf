//! Map writes the kernel refuses, for tests of what the control plane does when a write fails
//! part-way through a change. Production code has no hook for this: while a [`FailingMap`]
//! lives, every file descriptor of this process that refers to the chosen map refers instead
//! to a one-entry array of the same key and value size, so the kernel answers every write past
//! index 0 with an error. Dropping it points the descriptors back at the real map.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use anyhow::{Context as _, Result, bail};

pub struct FailingMap {
    /// (descriptor number, a duplicate of what it referred to before).
    saved: Vec<(RawFd, OwnedFd)>,
    _stand_in: OwnedFd,
}

impl FailingMap {
    /// Points every descriptor of this process that refers to the map with id `map_id` at a
    /// one-entry array with values of `value_size` bytes.
    pub fn swap(map_id: u32, value_size: u32) -> Result<FailingMap> {
        let stand_in = create_array(value_size, 1)?;
        let mut saved = Vec::new();
        for fd in fds_of_map(map_id)? {
            // SAFETY: dup and dup2 on descriptors this process owns; the duplicate is owned here.
            let dup = unsafe { libc::dup(fd) };
            if dup < 0 {
                bail!("dup({fd}): {}", std::io::Error::last_os_error());
            }
            let dup = unsafe { OwnedFd::from_raw_fd(dup) };
            if unsafe { libc::dup2(stand_in.as_raw_fd(), fd) } < 0 {
                bail!("dup2 onto {fd}: {}", std::io::Error::last_os_error());
            }
            saved.push((fd, dup));
        }
        if saved.is_empty() {
            bail!("no descriptor of this process refers to map {map_id}");
        }
        Ok(FailingMap { saved, _stand_in: stand_in })
    }
}

impl Drop for FailingMap {
    fn drop(&mut self) {
        for (fd, dup) in &self.saved {
            // SAFETY: points the number back at the real map; `dup` stays owned and is closed.
            unsafe { libc::dup2(dup.as_raw_fd(), *fd) };
        }
    }
}

/// The descriptors of this process that refer to map `map_id` (from /proc/self/fdinfo).
fn fds_of_map(map_id: u32) -> Result<Vec<RawFd>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo").context("listing /proc/self/fdinfo")? {
        let entry = entry?;
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else { continue };
        let Ok(info) = std::fs::read_to_string(entry.path()) else { continue };
        if info.lines().any(|l| l.split_once(':').is_some_and(|(k, v)| k == "map_id" && v.trim() == map_id.to_string())) {
            found.push(fd);
        }
    }
    Ok(found)
}

/// A BPF array map of `entries` values of `value_size` bytes (BPF_MAP_CREATE).
fn create_array(value_size: u32, entries: u32) -> Result<OwnedFd> {
    // The leading members of `union bpf_attr` for BPF_MAP_CREATE; the kernel takes a shorter
    // attribute as zero-filled.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate { map_type: BPF_MAP_TYPE_ARRAY, key_size: 4, value_size, max_entries: entries, map_flags: 0 };
    // SAFETY: the attribute lives for the call and its size is passed with it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &attr as *const MapCreate, size_of::<MapCreate>()) };
    if fd < 0 {
        bail!("BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
