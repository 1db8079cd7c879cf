//! Batched map access: `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_UPDATE_BATCH` (Linux 5.6).
//!
//! aya 0.14 reads and writes a map one element per syscall, which made the control plane's
//! cost grow with capacity rather than with work: reading the connection table took two
//! syscalls per flow (seconds for a million), writing a Maglev region one syscall per slot
//! (tens of milliseconds between a health verdict and the data path seeing it). The batch
//! commands move thousands of elements per syscall. aya has no API for them (neither 0.14 nor
//! the releases after it, which also need a newer Rust than this project builds with), so this
//! module makes the syscall itself on the fd of aya's `MapData`.
//!
//! Every function checks the map's type and its key and value sizes against the Rust types
//! first: the kernel copies `key_size * count` bytes into the buffers handed to it, so a
//! mismatch would be a buffer overflow, not just wrong data. When the kernel has no batch
//! command for the map (before 5.6, or a map type without one), the functions return
//! [`BatchError::Unsupported`] before anything was read or written, so that callers can fall
//! back to per-element calls (see `dataplane::maps`).

use std::{fmt, io, mem::size_of, os::fd::{AsFd as _, AsRawFd as _}};

use aya::{
    Pod,
    maps::{MapData, MapError, MapType},
};

/// Elements per lookup call on a hash map when the caller has no better idea: 8,192 flows are
/// 512 KiB of buffers, and a million flows take 128 calls.
pub const HASH_BATCH: usize = 8192;
/// Largest batch a hash walk grows to when a bucket does not fit (`ENOSPC`). A bucket holds a
/// handful of entries at most; this bounds the buffers should the kernel keep refusing.
const MAX_HASH_BATCH: usize = 1 << 20;
/// Elements per call on arrays and per update call: a whole Maglev region (65,537 slots) in
/// one or two calls, with buffers of a few hundred KiB.
const CHUNK: usize = 1 << 16;
/// Calls in a row that may end in a transient error without moving on before giving up.
const MAX_STALLS: u32 = 16;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel's internal "operation not supported" (include/linux/errno.h): `bpf_map_do_batch`
/// returns it to userspace for a map type without the batch operation.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h):
///
/// ```c
/// struct { /* struct used by BPF_MAP_*_BATCH commands */
///     __aligned_u64 in_batch;   /* start batch, NULL to start from beginning */
///     __aligned_u64 out_batch;  /* output: next start batch */
///     __aligned_u64 keys;
///     __aligned_u64 values;
///     __u32         count;      /* input/output: # of elements */
///     __u32         map_fd;
///     __u64         elem_flags;
///     __u64         flags;
/// } batch;
/// ```
///
/// The kernel rejects (EINVAL) a non-zero byte past `flags` within the size it is given, so
/// exactly this struct's size is passed.
#[repr(C)]
#[derive(Debug, Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

// The uapi layout, checked at compile time: a wrong offset would have the kernel read a
// pointer out of a count, or write the count somewhere else.
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(BatchAttr, in_batch) == 0);
    assert!(offset_of!(BatchAttr, out_batch) == 8);
    assert!(offset_of!(BatchAttr, keys) == 16);
    assert!(offset_of!(BatchAttr, values) == 24);
    assert!(offset_of!(BatchAttr, count) == 32);
    assert!(offset_of!(BatchAttr, map_fd) == 36);
    assert!(offset_of!(BatchAttr, elem_flags) == 40);
    assert!(offset_of!(BatchAttr, flags) == 48);
    assert!(size_of::<BatchAttr>() == 56);
};

/// Which batch command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Lookup,
    Update,
}

impl Command {
    fn code(self) -> libc::c_long {
        match self {
            Command::Lookup => BPF_MAP_LOOKUP_BATCH,
            Command::Update => BPF_MAP_UPDATE_BATCH,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Lookup => "BPF_MAP_LOOKUP_BATCH",
            Command::Update => "BPF_MAP_UPDATE_BATCH",
        })
    }
}

/// What went wrong in a batch call.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The kernel has no such command for this map (EINVAL before Linux 5.6, ENOTSUPP for a
    /// map type without it). Nothing was read or written.
    #[error("{command} is not supported by this kernel for this map ({source})")]
    Unsupported { command: Command, source: io::Error },
    #[error("{command}: {source}")]
    Syscall { command: Command, source: io::Error },
    #[error("{command}: {source}, {tries} times in a row without progress")]
    Stalled { command: Command, tries: u32, source: io::Error },
    #[error("{command}: reading the map's description: {source}")]
    Info { command: Command, source: MapError },
    #[error("{command}: the map is {map_type:?}; these calls handle {expected}")]
    MapType { command: Command, map_type: MapType, expected: &'static str },
    #[error("{command}: the map's {what} size is {map} bytes, the Rust type's {rust}")]
    Size { command: Command, what: &'static str, map: u32, rust: usize },
    #[error("{command}: elements {start}..{end} do not fit in the map's {max_entries} entries")]
    OutOfRange { command: Command, start: u32, end: u64, max_entries: u32 },
    #[error("{command}: {keys} keys but {values} values")]
    Lengths { command: Command, keys: usize, values: usize },
    #[error("{command}: the kernel returned element {found} where {expected} was due")]
    UnexpectedKey { command: Command, expected: u32, found: u32 },
}

impl BatchError {
    /// Whether the per-element path should be used instead (nothing was read or written).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, BatchError::Unsupported { .. })
    }
}

/// For callers whose error type is aya's (`director::read_pinned_flows`): the `BatchError`
/// travels as the inner error of `MapError::IoError`, which displays it unchanged and gives
/// it back through `io::Error::get_ref` and `downcast_ref`.
impl From<BatchError> for MapError {
    fn from(e: BatchError) -> Self {
        MapError::IoError(io::Error::other(e))
    }
}

/// Every entry of a hash or LRU hash map, `batch` entries per call at first.
///
/// The kernel walks the map bucket by bucket, copying each bucket whole under its lock, and
/// ends a call before a bucket that does not fit in what is left of the buffer. A bucket
/// larger than the whole buffer (`ENOSPC`) makes the walk retry it with a buffer twice as
/// large. `ENOENT` marks the end of the walk; the entries of that last call are kept.
/// Entries added, replaced or evicted during the walk may be missing or seen in either
/// state, but unlike the per-element walk (`BPF_MAP_GET_NEXT_KEY`), which starts again from
/// the first bucket when the key it stands on is deleted, the walk never goes back.
pub fn lookup_hash<K: Pod, V: Pod>(map: &MapData, batch: usize) -> Result<Vec<(K, V)>, BatchError> {
    let command = Command::Lookup;
    check_map::<K, V>(map, command, &[MapType::Hash, MapType::LruHash], "hash and LRU hash maps")?;
    let mut batch = batch.clamp(1, MAX_HASH_BATCH);
    let (mut keys, mut values) = (zeroed::<K>(batch), zeroed::<V>(batch));
    let mut found = Vec::new();
    // A hash map's batch token is the u32 index of the next bucket to read.
    let mut token: Option<[u32; 2]> = None;
    let mut stalls = 0;
    loop {
        let mut next = [0u32; 2];
        let (result, count) = lookup_call(map, token.as_ref(), &mut next, &mut keys, &mut values);
        found.extend(keys[..count].iter().copied().zip(values[..count].iter().copied()));
        let Err(err) = result else {
            token = Some(next);
            stalls = 0;
            continue;
        };
        match err.raw_os_error() {
            Some(libc::ENOENT) => return Ok(found),
            Some(libc::ENOSPC) if batch < MAX_HASH_BATCH => {
                // The same bucket again (the token stays), with room for it.
                batch = (batch * 2).min(MAX_HASH_BATCH);
                (keys, values) = (zeroed(batch), zeroed(batch));
            }
            _ if is_transient(&err) => {
                // The kernel reports where it stopped even then.
                stalls = if count > 0 || token != Some(next) { 0 } else { stalls + 1 };
                if stalls > MAX_STALLS {
                    return Err(BatchError::Stalled { command, tries: stalls, source: err });
                }
                token = Some(next);
            }
            _ if token.is_none() && found.is_empty() && is_unsupported(&err) => {
                return Err(BatchError::Unsupported { command, source: err });
            }
            _ => return Err(BatchError::Syscall { command, source: err }),
        }
    }
}

/// Elements `start..start + len` of an array map, in order.
pub fn lookup_array<V: Pod>(map: &MapData, start: u32, len: u32) -> Result<Vec<V>, BatchError> {
    let command = Command::Lookup;
    let max_entries = check_map::<u32, V>(map, command, &[MapType::Array], "array maps")?;
    let end = u64::from(start) + u64::from(len);
    if end > u64::from(max_entries) {
        return Err(BatchError::OutOfRange { command, start, end, max_entries });
    }
    let len = len as usize;
    let chunk = len.clamp(1, CHUNK);
    let (mut keys, mut values) = (zeroed::<u32>(chunk), zeroed::<V>(chunk));
    let mut found = Vec::with_capacity(len);
    // An array's batch token is the last index read; the walk goes on after it, so a range
    // that does not start at 0 starts "after" the index before it.
    let mut token = start.checked_sub(1).map(|before| [before, 0]);
    let mut stalls = 0;
    while found.len() < len {
        let want = (len - found.len()).min(chunk);
        let mut next = [0u32; 2];
        let (result, count) = lookup_call(map, token.as_ref(), &mut next, &mut keys[..want], &mut values[..want]);
        for (i, &key) in keys[..count].iter().enumerate() {
            let expected = start + (found.len() + i) as u32;
            if key != expected {
                return Err(BatchError::UnexpectedKey { command, expected, found: key });
            }
        }
        found.extend_from_slice(&values[..count]);
        // The kernel writes the token only when it read something.
        if count > 0 {
            token = Some(next);
        }
        let Err(err) = result else { continue };
        match err.raw_os_error() {
            // The end of the array: only reached early if the map shrank, which arrays cannot.
            Some(libc::ENOENT) if found.len() == len => {}
            _ if is_transient(&err) => {
                stalls = if count > 0 { 0 } else { stalls + 1 };
                if stalls > MAX_STALLS {
                    return Err(BatchError::Stalled { command, tries: stalls, source: err });
                }
            }
            _ if found.is_empty() && is_unsupported(&err) => return Err(BatchError::Unsupported { command, source: err }),
            _ => return Err(BatchError::Syscall { command, source: err }),
        }
    }
    Ok(found)
}

/// Writes `values[i]` at `keys[i]` for every `i`, in order (a key given twice ends with its
/// last value, as with one update per element). Returns the number of elements written,
/// `keys.len()`. Hash maps get their entries created or replaced (`BPF_ANY`).
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Result<usize, BatchError> {
    let command = Command::Update;
    if keys.len() != values.len() {
        return Err(BatchError::Lengths { command, keys: keys.len(), values: values.len() });
    }
    check_map::<K, V>(map, command, &[MapType::Array, MapType::Hash, MapType::LruHash], "array, hash and LRU hash maps")?;
    let mut done = 0;
    let mut stalls = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(CHUNK);
        let (result, count) = update_call(map, &keys[done..done + n], &values[done..done + n]);
        done += count;
        let Err(err) = result else { continue };
        if is_transient(&err) {
            // Resume after the elements the kernel wrote.
            stalls = if count > 0 { 0 } else { stalls + 1 };
            if stalls > MAX_STALLS {
                return Err(BatchError::Stalled { command, tries: stalls, source: err });
            }
        } else if done == 0 && is_unsupported(&err) {
            return Err(BatchError::Unsupported { command, source: err });
        } else {
            return Err(BatchError::Syscall { command, source: err });
        }
    }
    Ok(done)
}

/// Checks that the map is of one of `types` and that its keys and values are exactly `K` and
/// `V` in size. Returns its number of entries.
fn check_map<K, V>(map: &MapData, command: Command, types: &[MapType], expected: &'static str) -> Result<u32, BatchError> {
    let info = map.info().map_err(|source| BatchError::Info { command, source })?;
    let map_type = info.map_type().map_err(|source| BatchError::Info { command, source })?;
    // Per-CPU maps are left out on purpose: their values take one rounded-up slot per
    // possible CPU in the buffers.
    if !types.contains(&map_type) {
        return Err(BatchError::MapType { command, map_type, expected });
    }
    for (what, map_size, rust) in [("key", info.key_size(), size_of::<K>()), ("value", info.value_size(), size_of::<V>())] {
        if map_size as usize != rust {
            return Err(BatchError::Size { command, what, map: map_size, rust });
        }
    }
    Ok(info.max_entries())
}

/// One BPF_MAP_LOOKUP_BATCH of up to `keys.len()` elements after `token` (from the start
/// when `None`). Returns the call's result and how many elements it copied into the buffers.
fn lookup_call<K: Pod, V: Pod>(
    map: &MapData,
    token: Option<&[u32; 2]>,
    next: &mut [u32; 2],
    keys: &mut [K],
    values: &mut [V],
) -> (io::Result<()>, usize) {
    debug_assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        in_batch: token.map_or(0, |t| t.as_ptr() as u64),
        out_batch: next.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at buffers that live until the call returns: `keys` and `values`
    // hold `count` elements each, whose sizes check_map matched to the map's key and value
    // sizes (per-CPU maps excluded), so the kernel writes within them; the tokens are 8 bytes,
    // at least the 4-byte bucket index (hash maps) or key (arrays) the kernel copies; any
    // bytes the kernel writes are valid K and V, which are Pod.
    let result = unsafe { sys_bpf(Command::Lookup, &mut attr) };
    let count = copied(&result, attr.count, keys.len());
    (result, count)
}

/// One BPF_MAP_UPDATE_BATCH of `keys.len()` elements. Returns the call's result and how many
/// elements it wrote.
fn update_call<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> (io::Result<()>, usize) {
    debug_assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: the kernel only reads `count` keys and values of the sizes check_map matched to
    // the map's, from buffers alive for the call; it writes nothing but `attr.count`.
    let result = unsafe { sys_bpf(Command::Update, &mut attr) };
    let count = copied(&result, attr.count, keys.len());
    (result, count)
}

/// How many elements a call processed. The kernel zeroes `count` first thing and writes the
/// number processed on the way out, except when it rejects the call before that (bad flags,
/// unknown command, no such operation: `count` is then still what was asked) or fails to
/// write it (EFAULT). Only the errors that come after the zeroing are trusted.
fn copied(result: &io::Result<()>, count: u32, asked: usize) -> usize {
    let trusted = match result {
        Ok(()) => true,
        Err(e) => matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOSPC)) || is_transient(e),
    };
    if trusted { (count as usize).min(asked) } else { 0 }
}

/// EINTR: an element vanished under an array walk too often; EAGAIN / EBUSY: a bucket lock
/// was contended. The kernel reports the elements done so far, and the call can resume.
fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY))
}

/// EINVAL: a kernel before 5.6 does not know the command; ENOTSUPP / EOPNOTSUPP: the map
/// type has no batch operation.
fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP))
}

/// # Safety
///
/// Every pointer in `attr` must be valid for what `command` does with it (see the callers).
unsafe fn sys_bpf(command: Command, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised `batch` member of union bpf_attr, alive for the
    // call, and its size is passed; the pointers inside it are the caller's to vouch for.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, command.code(), attr as *mut BatchAttr, size_of::<BatchAttr>())
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `n` all-zero elements: buffers the kernel writes into.
fn zeroed<T: Pod>(n: usize) -> Vec<T> {
    // SAFETY: `T` is Pod, so the all-zero bit pattern is a valid `T`.
    vec![unsafe { std::mem::zeroed::<T>() }; n]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: i32) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(code))
    }

    #[test]
    fn counts_are_trusted_only_where_the_kernel_wrote_them() {
        assert_eq!(copied(&Ok(()), 10, 10), 10);
        assert_eq!(copied(&err(libc::ENOENT), 3, 10), 3);
        assert_eq!(copied(&err(libc::EINTR), 4, 10), 4);
        // Rejected up front: `count` still holds the request.
        assert_eq!(copied(&err(libc::EINVAL), 10, 10), 0);
        assert_eq!(copied(&err(ENOTSUPP), 10, 10), 0);
        assert_eq!(copied(&err(libc::EFAULT), 10, 10), 0);
        // Never more than the buffers hold.
        assert_eq!(copied(&Ok(()), 11, 10), 10);
    }

    #[test]
    fn errors_are_sorted() {
        for code in [libc::EINVAL, ENOTSUPP, libc::EOPNOTSUPP] {
            assert!(is_unsupported(&io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [libc::EINTR, libc::EAGAIN, libc::EBUSY] {
            assert!(is_transient(&io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [libc::ENOENT, libc::ENOSPC, libc::EPERM, libc::EFAULT, libc::E2BIG] {
            let e = io::Error::from_raw_os_error(code);
            assert!(!is_unsupported(&e) && !is_transient(&e), "{code}");
        }
    }

    #[test]
    fn a_batch_error_survives_the_trip_through_maperror() {
        let e = BatchError::Unsupported { command: Command::Lookup, source: io::Error::from_raw_os_error(libc::EINVAL) };
        let text = e.to_string();
        let MapError::IoError(io) = MapError::from(e) else { panic!("not an IoError") };
        assert_eq!(io.to_string(), text);
        let inner = io.get_ref().and_then(|i| i.downcast_ref::<BatchError>()).expect("the BatchError inside");
        assert!(inner.is_unsupported());
    }
}
