//! The XDP program of an earlier commit, built so that `cargo xtask bench` can measure it next
//! to the current one in the same run: absolute per-packet costs vary several-fold between
//! machines, so a goal stated against the old program can only be checked by a ratio of one
//! run.
//!
//! The object is built from the commit's own sources (`git archive`, so the working tree and
//! the repository are not touched), the way `mim-lb/build.rs` builds the current one through
//! aya-build: the same nightly toolchain, target, flags and bpf-linker, and the commit's own
//! `mim-lb-ebpf/build.rs` (which adds `+allows-misaligned-mem-access`). It is cached by commit
//! under the target directory, so only the first run pays for the build (about 30 s).
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::{setup, test, util};

/// The baseline of issue 7: the last commit before the data-path redesign (bd68b07, "flow
/// invariant": a SYN on a clean Maglev slot is no longer recorded, frames must be addressed to
/// the gateway's MAC, L4 parsing is bounded by the IP length). The per-packet goals
/// are ratios to this program's costs.
pub const COMMIT: &str = "91556f8";

/// Environment of the benchmark (`mim-lb-bench`'s `--baseline*` options read these): the
/// object, the commit it was built from, or why there is none.
pub const ENV_OBJECT: &str = "MIM_LB_BENCH_BASELINE";
pub const ENV_COMMIT: &str = "MIM_LB_BENCH_BASELINE_COMMIT";
pub const ENV_MISSING: &str = "MIM_LB_BENCH_BASELINE_MISSING";

/// Where the cache and the builds live, under the target directory.
const CACHE_DIR: &str = "bench-baseline";
/// Prefix of a build's scratch directory (`build-<pid hex>`), removed when the build ends and,
/// if xtask was killed, by the next build once that pid is gone.
const SCRATCH_PREFIX: &str = "build-";

/// The baseline object for [`COMMIT`], built now or found in the cache.
pub fn object() -> Result<PathBuf> {
    let full = util::stdout_of(
        util::command("git")
            .current_dir(util::workspace_root())
            .args([
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{COMMIT}^{{commit}}"),
            ]),
    )
    .with_context(|| {
        format!(
            "commit {COMMIT} is not in this checkout's git history (a shallow clone or a source \
             tarball?); `git fetch --unshallow` brings it"
        )
    })?;
    let full = full.trim();
    let cache = util::target_directory()?.join(CACHE_DIR);
    let object = cache.join(format!("{full}.mim-lb.o"));
    if object.is_file() {
        return Ok(object);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    remove_abandoned(&cache);
    eprintln!("xtask bench: building the baseline XDP program of {COMMIT} (cached afterwards)");
    let scratch = Scratch(cache.join(format!("{SCRATCH_PREFIX}{:x}", std::process::id())));
    let built = build(full, &scratch.0)?;
    // Copied under a name of its own, then renamed: a build killed half-way never leaves a
    // partial object where the next run would take it for a finished one.
    let partial = scratch.0.join("object.partial");
    std::fs::copy(&built, &partial).with_context(|| format!("copying {}", built.display()))?;
    std::fs::rename(&partial, &object)
        .with_context(|| format!("moving the object to {}", object.display()))?;
    Ok(object)
}

/// A build's scratch directory (sources and cargo's target directory), removed when dropped:
/// on success and on every error alike.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("xtask bench: warning: removing {}: {e}", self.0.display());
        }
    }
}

/// Removes the scratch directories of builds whose xtask is gone (killed before its `Drop`).
fn remove_abandoned(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|hex| u32::from_str_radix(hex, 16).ok());
        if owner.is_some_and(|pid| !test::alive(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Extracts `commit`'s tree into `scratch/src` and builds its XDP program there; returns the
/// object's path inside `scratch`.
fn build(commit: &str, scratch: &Path) -> Result<PathBuf> {
    let src = scratch.join("src");
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let tar = scratch.join("src.tar");
    util::stdout_of(
        util::command("git")
            .current_dir(util::workspace_root())
            .args(["archive", "--format=tar", "-o"])
            .arg(&tar)
            .arg(commit),
    )?;
    util::stdout_of(
        util::command("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&src),
    )?;

    // What aya-build 0.2 runs for mim-lb/build.rs (`aya_build::build_ebpf` with the default
    // toolchain): the same command, target and rustflags, for the program's binary only.
    let (target, arch) = bpf_target();
    let target_dir = scratch.join("target");
    let mut rustflags = OsString::from(format!("--cfg=bpf_target_arch=\"{arch}\""));
    for flag in ["-Cdebuginfo=2", "-Clink-arg=--btf"] {
        rustflags.push("\x1f");
        rustflags.push(flag);
    }
    let mut cmd = util::command("rustup");
    cmd.current_dir(&src)
        .args([
            "run",
            setup::NIGHTLY,
            "cargo",
            "build",
            "--locked",
            "--release",
            "--package",
            "mim-lb-ebpf",
        ])
        .args([
            "--bin",
            "mim-lb",
            "--target",
            target,
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // As aya-build does: a RUSTC or wrapper from the outer build would pick another compiler.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    util::run(&mut cmd)?;
    Ok(target_dir.join(target).join("release").join("mim-lb"))
}

/// The bpf target of this host's byte order, and the `bpf_target_arch` aya-ebpf is built for.
fn bpf_target() -> (&'static str, &'static str) {
    let target = if cfg!(target_endian = "big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    (target, std::env::consts::ARCH)
}

/// Whether the benchmark's arguments include the per-packet benchmark, the only one that
/// measures the baseline: it runs unless `--only` lists others alone. `--help` runs nothing.
pub fn wanted(args: &[OsString]) -> bool {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut lists = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--help" || a == "-h" {
            return false;
        }
        if a == "--only" {
            lists.extend(it.next().cloned());
        } else if let Some(list) = a.strip_prefix("--only=") {
            lists.push(list.to_owned());
        }
    }
    lists.is_empty()
        || lists
            .iter()
            .any(|l| l.split(',').any(|b| b.trim() == "per-packet"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted_for(line: &[&str]) -> bool {
        wanted(&line.iter().map(OsString::from).collect::<Vec<_>>())
    }

    #[test]
    fn baseline_is_built_only_when_per_packet_runs() {
        assert!(wanted_for(&[]));
        assert!(wanted_for(&["--json", "x.json"]));
        assert!(wanted_for(&["--only", "per-packet"]));
        assert!(wanted_for(&["--only=rebuild,per-packet"]));
        assert!(wanted_for(&["--only", "failover", "--only", "per-packet"]));
        assert!(!wanted_for(&["--only", "failover"]));
        assert!(!wanted_for(&["--only=rebuild,failover"]));
        assert!(!wanted_for(&["--help"]));
    }
}
