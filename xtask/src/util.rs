//! Running other programs so that a failure names the exact command line that failed.
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Output, Stdio};
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

/// The workspace root, fixed at compile time: xtask only ever runs from this workspace, and
/// the nested cargo commands must see the workspace's `.cargo/config.toml`.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// Where `cargo install` and rustup put their binaries.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// PATH for every child. A freshly installed bpf-linker lands in cargo's bin directory, and
/// rustc (several processes down, under aya-build) finds the linker only through PATH; a shell
/// that never sourced `~/.cargo/env` would otherwise build fine up to the final link.
fn child_path() -> &'static Option<OsString> {
    static PATH: OnceLock<Option<OsString>> = OnceLock::new();
    PATH.get_or_init(|| {
        let current = std::env::var_os("PATH").unwrap_or_default();
        let bin = cargo_bin_dir()?;
        if std::env::split_paths(&current).any(|p| p == bin) {
            return None;
        }
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
        dirs.push(bin);
        std::env::join_paths(dirs).ok()
    })
}

fn search_dirs() -> Vec<PathBuf> {
    let path = child_path()
        .clone()
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    // bpftool, ip and sysctl live in sbin, which a non-root PATH often lacks.
    for sbin in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(sbin)) {
            dirs.push(PathBuf::from(sbin));
        }
    }
    dirs
}

/// The executable `name` would resolve to for our children, if any.
pub fn find_program(name: &str) -> Option<PathBuf> {
    search_dirs().into_iter().map(|d| d.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// A command whose children see the PATH that `find_program` searched.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(path) = child_path() {
        cmd.env("PATH", path);
    }
    cmd
}

/// The cargo that is running xtask (so the same toolchain builds everything), started in the
/// workspace root.
pub fn cargo() -> Command {
    let mut cmd = command(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn quote(word: &OsStr) -> String {
    let plain = !word.is_empty()
        && word
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(b));
    let text = word.to_string_lossy();
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The command as a shell line, with the variables it sets explicitly (PATH excepted: it is
/// set on every child and would drown the line).
pub fn describe(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter(|(k, _)| *k != "PATH")
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), quote(v?))))
        .collect();
    // Show how cargo was invoked, not the toolchain-internal path that CARGO points to.
    let program = cmd.get_program();
    let shown = if Some(program) == std::env::var_os("CARGO").as_deref() {
        OsStr::new("cargo")
    } else {
        program
    };
    words.push(quote(shown));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn announce(cmd: &Command) {
    eprintln!("==> {}", describe(cmd));
}

/// Runs with inherited stdio and returns how it ended; only failing to start is an error.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    announce(cmd);
    cmd.status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))
}

/// Runs with inherited stdio; a non-zero exit is an error naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("`{}` failed ({})", describe(cmd), st);
    }
    Ok(())
}

/// Runs quietly and hands back everything, whatever the exit status.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))
}

/// Runs quietly and returns stdout; a non-zero exit is an error carrying the command's stderr.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", describe(cmd)))
}

/// Replaces this process with the command, so signals (Ctrl-C) reach it directly and its exit
/// status is ours. Returns only on failure.
pub fn exec(cmd: &mut Command) -> anyhow::Error {
    announce(cmd);
    let err = cmd.exec();
    anyhow::Error::new(err).context(format!("could not run `{}`", describe(cmd)))
}

/// Where cargo puts build output; CARGO_TARGET_DIR or the config can move it away from
/// `<workspace>/target`.
pub fn target_directory() -> Result<PathBuf> {
    let json = stdout_of(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&json).context("parsing `cargo metadata` output")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` output has no target_directory")?;
    Ok(PathBuf::from(dir))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The exit code a shell would report for a child that ended this way.
pub fn exit_code(status: ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        (None, None) => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_what_a_shell_would_misread() {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "it's", "a b", ""]);
        assert_eq!(
            describe(&cmd),
            r"DEBIAN_FRONTEND=noninteractive apt-get install -y 'it'\''s' 'a b' ''"
        );
    }

    #[test]
    fn exit_code_follows_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), ExitCode::from(3));
        assert_eq!(
            exit_code(ExitStatus::from_raw(libc::SIGINT)),
            ExitCode::from(130)
        );
    }
}
