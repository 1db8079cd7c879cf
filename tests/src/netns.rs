//! Network namespace plumbing: unique names, creation and removal through `ip`, running code
//! and commands inside a namespace, and removal of namespaces left behind by dead test runs.

use std::collections::HashSet;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

/// Every namespace a lab creates starts with this, followed by `<pid in hex>-`, so that
/// [`cleanup_stale_labs`] can tell whether the test process that made it is still alive.
pub const NS_PREFIX: &str = "mimlb-";

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A fresh lab id, `<pid hex>-<counter hex><random byte hex>`: the pid lets stale labs be
/// found, the counter separates labs of one process, and the random byte keeps a recycled pid
/// from producing a name that a dead run's leftovers still hold.
pub(crate) fn new_lab_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}{:02x}", std::process::id(), n, random_u64() as u8)
}

/// Good enough randomness for names and subnets; `RandomState` is seeded from the OS, which
/// spares a dependency.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn netns_path(ns: &str) -> String {
    format!("{NETNS_DIR}/{ns}")
}

/// Whether a named namespace (one made with `ip netns add`) exists.
pub fn netns_exists(ns: &str) -> bool {
    Path::new(&netns_path(ns)).exists()
}

/// Names of all `ip netns` namespaces.
pub fn list_netns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in dir {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn open_netns(ns: &str) -> Result<File> {
    File::open(netns_path(ns)).with_context(|| format!("opening network namespace {ns:?}"))
}

/// Runs `f` on a new thread that has joined network namespace `ns`, and returns its result.
///
/// Only that thread moves, so the caller's thread keeps its namespace. Sockets created inside
/// `f` stay in `ns` for their whole life and may be returned and used from any thread. A
/// panic inside `f` is resumed on the caller's thread, so assertions behave as usual.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = open_netns(ns)?;
    thread::scope(|scope| {
        let handle = thread::Builder::new()
            .name(thread_name(ns))
            .spawn_scoped(scope, move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {ns:?}"))?;
                Ok(f())
            })
            .context("spawning a thread")?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Like [`in_netns`] but for a long-lived thread: returns once the thread is inside `ns`.
pub fn spawn_in_netns<T, F>(ns: &str, name: &str, f: F) -> Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = open_netns(ns)?;
    let (tx, rx) = mpsc::sync_channel::<nix::Result<()>>(1);
    let ns_owned = ns.to_owned();
    let handle = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let entered = setns(&file, CloneFlags::CLONE_NEWNET);
            drop(file);
            let failed = entered.is_err();
            let _ = tx.send(entered);
            if failed {
                // The caller gets the error; the thread must not run `f` in the wrong namespace.
                panic!("setns into {ns_owned:?} failed");
            }
            f()
        })
        .context("spawning a thread")?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(anyhow!(e).context(format!("setns into {ns:?}")))
        }
        Err(_) => Err(anyhow!("thread for {ns:?} died before entering it")),
    }
}

fn thread_name(ns: &str) -> String {
    // Linux keeps 15 bytes of a thread name; the tail of a lab namespace is the useful part.
    let tail: String = ns.chars().rev().take(15).collect();
    tail.chars().rev().collect()
}

/// Makes `cmd`, once spawned, run inside `ns`: the child joins the namespace between fork and
/// exec. Unlike `ip netns exec`, `/sys` is not remounted, so `/sys/fs/bpf` stays visible (and
/// `/sys/class/net` shows the caller's namespace); netlink and ioctls follow the new namespace.
pub fn enter_netns_on_spawn(cmd: &mut Command, ns: &str) -> Result<()> {
    let fd: OwnedFd = open_netns(ns)?.into();
    // SAFETY: the hook runs in the forked child before exec and calls only setns(2), which is
    // async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// `program args...` as one shell-like string for error messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `program args...` inside `ns` to completion and returns its stdout. The error holds
/// the namespace, the command line, the exit status and stderr.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    run_in_with_env(ns, program, args, &[])
}

/// The longest a command run with [`run_in`] may take: a CLI call that hangs (a daemon expected
/// to refuse, a control request nobody answers) fails its test instead of hanging the suite.
pub const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// [`run_in`] with extra environment variables.
pub fn run_in_with_env(ns: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null());
    enter_netns_on_spawn(&mut cmd, ns)?;
    let out = output_within(&mut cmd, RUN_TIMEOUT).with_context(|| format!("in {ns}"))?;
    if !out.status.success() {
        bail!(
            "`{}` in {ns} failed ({}): {}",
            command_line(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` to completion with its stdout and stderr captured, like `Command::output`, but
/// for at most `timeout`: a command still running then is killed and the call fails, so no
/// test can hang on a child.
pub fn output_within(cmd: &mut Command, timeout: std::time::Duration) -> Result<std::process::Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().with_context(|| format!("starting `{}`", command_line(cmd)))?;
    wait_within(child, timeout).with_context(|| format!("`{}`", command_line(cmd)))
}

/// Waits for `child` (whose stdout and stderr are piped, if they are to be read) for at most
/// `timeout`, then kills it and fails.
pub fn wait_within(child: std::process::Child, timeout: std::time::Duration) -> Result<std::process::Output> {
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: kill(2) on the child's pid, which it keeps until it is reaped by the
            // thread above (so the pid cannot have been reused).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv();
            bail!("did not finish within {timeout:?}: killed")
        }
    }
}

/// Feeds `lines` to one `ip [-n ns] -batch -`, which is much faster than one `ip` per line.
/// With `force`, ip carries on past failing lines (still reporting failure at the end).
pub fn ip_batch(ns: Option<&str>, lines: &[String], force: bool) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    // Its own process group, so that a Ctrl-C meant for the lab's owner (which then removes
    // the lab) does not also kill the `ip` that is creating or removing it.
    cmd.process_group(0);
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting `ip` (is iproute2 installed?)")?;
    let script = lines.join("\n") + "\n";
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .context("writing to `ip -batch`")?;
    let out = child.wait_with_output().context("waiting for `ip -batch`")?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}\nbatch was:\n{}",
            command_line(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            script.trim_end()
        );
    }
    Ok(())
}

/// Creates the named namespaces with one `ip` run.
pub(crate) fn create_namespaces(names: &[String]) -> Result<()> {
    let lines: Vec<String> = names.iter().map(|n| format!("netns add {n}")).collect();
    ip_batch(None, &lines, false)
}

/// Removes the named namespaces that still exist. The kernel frees a namespace once nothing
/// (process, socket, open fd) refers to it any more; its veths go with it.
pub(crate) fn delete_namespaces(names: &[String]) -> Result<()> {
    let lines: Vec<String> = names
        .iter()
        .filter(|n| netns_exists(n))
        .map(|n| format!("netns del {n}"))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    ip_batch(None, &lines, true)
}

/// Writes `key=value` sysctls (dotted keys, as `sysctl` takes them) inside `ns`. Keys under
/// `net.ipv6` are skipped when the kernel has no IPv6, so IPv4-only labs still work there.
pub fn set_sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    in_netns(ns, || -> Result<()> {
        let have_v6 = Path::new("/proc/sys/net/ipv6").exists();
        for (key, value) in settings {
            if key.starts_with("net.ipv6.") && !have_v6 {
                continue;
            }
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value)
                .with_context(|| format!("sysctl {key}={value} in {ns}"))?;
        }
        Ok(())
    })?
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    // struct ifreq's union is 24 bytes on 64-bit; keep the full size for the kernel's copy.
    _pad: [u8; 16],
}

fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("interface name {ifname:?} too long")));
    }
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: plain socket(2); the fd is owned right away.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `sock` is a fresh fd that nothing else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    // SAFETY: `req` and `value` outlive the call and have the layout SIOCETHTOOL expects.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Turns TX checksum offload off on `ifname` in the calling thread's namespace (what
/// `ethtool -K IF tx off` does). veth otherwise leaves TCP checksums partial, and a frame that
/// native XDP bounces reaches its receiver with a bad checksum.
pub fn disable_tx_checksum(ifname: &str) -> Result<()> {
    ethtool_value(ifname, ETHTOOL_STXCSUM, 0)
        .map(|_| ())
        .with_context(|| format!("turning tx checksum offload off on {ifname}"))
}

/// Whether TX checksum offload is on for `ifname` in the calling thread's namespace.
pub fn tx_checksum_enabled(ifname: &str) -> Result<bool> {
    ethtool_value(ifname, ETHTOOL_GTXCSUM, 0)
        .map(|v| v != 0)
        .with_context(|| format!("reading tx checksum offload of {ifname}"))
}

/// The pid encoded in a lab namespace name, if `name` is one.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let hex = rest.split('-').next()?;
    i32::from_str_radix(hex, 16).ok().filter(|pid| *pid > 0)
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Kills every process whose network namespace is one of `inodes` (what `ip netns pids`
/// finds), so that a removed namespace is not kept alive by a daemon of a crashed run.
fn kill_processes_in(inodes: &HashSet<(u64, u64)>) {
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in proc_dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if inodes.contains(&(meta.dev(), meta.ino())) && pid != std::process::id() as i32 {
            // SAFETY: plain kill(2) of a process found in a dead lab's namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes `mimlb-*` namespaces whose creating process is gone (a test run that was killed or
/// aborted before its labs' `Drop` ran), after killing any process still inside them.
/// Returns how many namespaces were removed. Namespaces of live processes are left alone.
pub fn cleanup_stale_labs() -> Result<usize> {
    let stale: Vec<String> = list_netns()?
        .into_iter()
        .filter(|name| owner_pid(name).is_some_and(|pid| !pid_alive(pid)))
        .collect();
    if stale.is_empty() {
        return Ok(0);
    }
    let inodes: HashSet<(u64, u64)> = stale
        .iter()
        .filter_map(|name| std::fs::metadata(netns_path(name)).ok())
        .map(|meta| (meta.dev(), meta.ino()))
        .collect();
    kill_processes_in(&inodes);
    // Another run may be removing the same leftovers at this moment (two demos or test binaries
    // that start together): a namespace gone by the time `ip` gets to it is what was wanted.
    if let Err(e) = delete_namespaces(&stale) {
        let left: Vec<&String> = stale.iter().filter(|n| netns_exists(n)).collect();
        if !left.is_empty() {
            return Err(e.context(format!("{} stale namespaces are still there: {left:?}", left.len())));
        }
    }
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_lab_names() {
        assert_eq!(owner_pid("mimlb-1a2b-3f7-gw"), Some(0x1a2b));
        assert_eq!(owner_pid("mimlb-zz-1-gw"), None);
        assert_eq!(owner_pid("other-1a2b"), None);
    }

    #[test]
    fn lab_ids_are_unique_and_carry_the_pid() {
        let a = new_lab_id();
        let b = new_lab_id();
        assert_ne!(a, b);
        let name = format!("{NS_PREFIX}{a}-gw");
        assert_eq!(owner_pid(&name), Some(std::process::id() as i32));
    }
}
