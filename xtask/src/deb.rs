//! `cargo xtask deb`: a Debian package of the daemon, built with dpkg-deb from a staged tree.
//!
//! dpkg-deb rather than cargo-deb: the package is a handful of files whose places Debian
//! policy fixes, plus maintainer scripts that must be exactly what the operations guide says
//! (an upgrade restarts the daemon over its pins, a removal detaches the program); staging
//! them here keeps all of that in one reviewable place with no tool to install.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use crate::{setup, util};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write the .deb into [default: <target>/debian]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Package this mim-lb binary instead of building the release one (the tests package the
    /// binary they test)
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
}

/// Where the daemon lives in the package: a system administration command.
const SBIN: &str = "/usr/sbin/mim-lb";
/// Where the manual install of `dist/mim-lb.service` puts it.
const MANUAL_BIN: &str = "/usr/local/bin/mim-lb";
const CONFIG: &str = "/etc/mim-lb/mim-lb.toml";

pub fn main(args: Args) -> Result<ExitCode> {
    let binary = match args.binary {
        Some(b) => b,
        None => {
            setup::ensure()?;
            util::run(util::cargo().args(["build", "--release", "--package", "mim-lb"]))?;
            util::target_directory()?.join("release").join("mim-lb")
        }
    };
    let out = match args.out {
        Some(o) => o,
        None => util::target_directory()?.join("debian"),
    };
    let deb = build(&binary, &out)?;
    println!("{}", deb.display());
    Ok(ExitCode::SUCCESS)
}

/// Stages the package tree under `out` and builds `mim-lb_<version>_<arch>.deb` there.
fn build(binary: &Path, out: &Path) -> Result<PathBuf> {
    let version = version()?;
    let arch = util::stdout_of(util::command("dpkg").arg("--print-architecture"))?.trim().to_owned();
    let name = format!("mim-lb_{version}_{arch}");
    let root = out.join(&name);
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let repo = util::workspace_root();

    install(&root, SBIN, &std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?, 0o755)?;
    // Debian ships binaries without debug symbols (dh_strip); the XDP object inside the binary
    // is data, which strip leaves alone.
    util::run(util::command("strip").args(["--strip-debug", "--strip-unneeded"]).arg(root.join(SBIN.trim_start_matches('/'))))?;
    let unit = std::fs::read_to_string(repo.join("dist/mim-lb.service")).context("reading dist/mim-lb.service")?;
    install(&root, "/usr/lib/systemd/system/mim-lb.service", packaged_unit(&unit).as_bytes(), 0o644)?;
    install(&root, CONFIG, &std::fs::read(repo.join("dist/mim-lb.toml"))?, 0o644)?;
    for doc in ["README.md", "OPERATIONS.md", "CONFIG.md"] {
        install(&root, &format!("/usr/share/doc/mim-lb/{doc}"), &std::fs::read(repo.join(doc))?, 0o644)?;
    }
    install(&root, "/usr/share/doc/mim-lb/examples/keepalived.conf", &std::fs::read(repo.join("dist/keepalived.conf"))?, 0o644)?;
    // Both halves of announcing the VIPs to an ECMP router (OPERATIONS.md, "Many directors
    // behind ECMP").
    for example in ["bird/director.conf", "bird/router.conf", "frr/director.conf", "frr/router.conf"] {
        let text = std::fs::read(repo.join("dist").join(example)).with_context(|| format!("reading dist/{example}"))?;
        install(&root, &format!("/usr/share/doc/mim-lb/examples/{example}"), &text, 0o644)?;
    }
    install(&root, "/usr/share/doc/mim-lb/copyright", COPYRIGHT.as_bytes(), 0o644)?;
    man_pages(binary, &root)?;
    completions(binary, &root)?;

    let installed_kib = du_kib(&root)?;
    install(&root, "/DEBIAN/control", control(&version, &arch, installed_kib).as_bytes(), 0o644)?;
    install(&root, "/DEBIAN/conffiles", format!("{CONFIG}\n").as_bytes(), 0o644)?;
    install(&root, "/DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    install(&root, "/DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    install(&root, "/DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;

    let deb = out.join(format!("{name}.deb"));
    util::run(util::command("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&root).arg(&deb))?;
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    Ok(deb)
}

/// The workspace's version, which the daemon reports too.
fn version() -> Result<String> {
    let json = util::stdout_of(util::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: serde_json::Value = serde_json::from_str(&json).context("parsing `cargo metadata` output")?;
    metadata["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "mim-lb"))
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .context("`cargo metadata` lists no mim-lb package")
}

/// Writes `bytes` at the absolute package path `path` under `root`.
fn install(root: &Path, path: &str, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dest = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().expect("a package path has a parent"))
        .with_context(|| format!("creating the directory of {}", dest.display()))?;
    std::fs::write(&dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dest.display()))
}

/// The pages `mim-lb man-pages` writes (from the CLI's definitions), gzipped as Debian wants.
fn man_pages(binary: &Path, root: &Path) -> Result<()> {
    let dir = root.join("usr/share/man/man8");
    util::run(util::command(binary).arg("man-pages").arg(&dir))?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        // -n: no name or time stamp, so the same input gives the same package.
        util::run(util::command("gzip").args(["-9n"]).arg(&path))?;
    }
    Ok(())
}

fn completions(binary: &Path, root: &Path) -> Result<()> {
    for (shell, path) in [
        ("bash", "/usr/share/bash-completion/completions/mim-lb"),
        ("zsh", "/usr/share/zsh/vendor-completions/_mim-lb"),
        ("fish", "/usr/share/fish/vendor_completions.d/mim-lb.fish"),
    ] {
        let script = util::capture(util::command(binary).args(["completions", shell]))?;
        if !script.status.success() {
            bail!("`{} completions {shell}` failed: {}", binary.display(), String::from_utf8_lossy(&script.stderr));
        }
        install(root, path, &script.stdout, 0o644)?;
    }
    Ok(())
}

fn du_kib(root: &Path) -> Result<u64> {
    let out = util::stdout_of(util::command("du").args(["-sk", "--apparent-size"]).arg(root))?;
    out.split_whitespace().next().and_then(|n| n.parse().ok()).context("parsing du output")
}

/// `dist/mim-lb.service` as the package installs it: the binary in /usr/sbin, and no manual
/// install steps in its header.
pub fn packaged_unit(unit: &str) -> String {
    let mut out = String::from("# systemd unit for the mim-lb director, installed by the mim-lb Debian package.\n");
    let mut header = true;
    for line in unit.lines() {
        if header && line.starts_with('#') {
            // The manual steps ("install -m ...", "systemctl daemon-reload ...") do not apply;
            // the explanation of restarts and detaching does.
            let manual = line.starts_with("# systemd unit") || line.contains("Install:") || line.starts_with("#   ");
            if !manual {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        header = false;
        out.push_str(&line.replace(MANUAL_BIN, SBIN));
        out.push('\n');
    }
    out
}

fn control(version: &str, arch: &str, installed_kib: u64) -> String {
    format!(
        "Package: mim-lb\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: mim-lb developers <mim-lb@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: libc6\n\
         Recommends: bpftool\n\
         Suggests: keepalived, bird2 | frr\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://github.com/mim-lb/mim-lb\n\
         Description: XDP packet director for a group of identical servers\n \
         mim-lb makes a group of master servers look like one: clients connect to one\n \
         address and port (the VIP) and every new connection lands on a live master,\n \
         chosen by consistent hashing in an XDP program that rewrites MAC addresses\n \
         (LVS direct routing). Established connections stay on their master through\n \
         health changes, reloads and daemon restarts.\n"
    )
}

/// After unpacking. A fresh install starts nothing: the gateway's config must be written
/// first. An upgrade restarts a running daemon, which takes over the pinned maps and swaps
/// its program in without losing a flow (the unit runs it with --keep-pinned).
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    if [ -n "$2" ]; then
        systemctl try-restart mim-lb.service || true
    fi
fi
if [ "$1" = configure ] && [ -z "$2" ]; then
    echo "mim-lb: edit /etc/mim-lb/mim-lb.toml, check it with 'mim-lb check --config /etc/mim-lb/mim-lb.toml'," >&2
    echo "mim-lb: then start it with 'systemctl enable --now mim-lb'." >&2
fi
exit 0
"#;

/// Before removal (not before an upgrade): stop the daemon and take the program off the
/// interface. A program left attached with no daemon would keep sending new flows to masters
/// that die, with no health checks to take them out.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop mim-lb.service || true
    fi
    if [ -f /etc/mim-lb/mim-lb.toml ]; then
        /usr/sbin/mim-lb detach --config /etc/mim-lb/mim-lb.toml || true
    fi
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
exit 0
"#;

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: mim-lb\n\
\n\
Files: *\n\
Copyright: the mim-lb developers\n\
License: MIT or Apache-2.0\n \
The daemon may be used under either license. The XDP program it loads into the\n \
kernel is licensed \"Dual MIT/GPL\". The Apache license is in\n \
/usr/share/common-licenses/Apache-2.0; the MIT license follows.\n \
.\n \
Permission is hereby granted, free of charge, to any person obtaining a copy of\n \
this software and associated documentation files (the \"Software\"), to deal in\n \
the Software without restriction, including without limitation the rights to\n \
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of\n \
the Software, and to permit persons to whom the Software is furnished to do so,\n \
subject to the following conditions:\n \
.\n \
The above copyright notice and this permission notice shall be included in all\n \
copies or substantial portions of the Software.\n \
.\n \
THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR\n \
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS\n \
FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR\n \
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN\n \
AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION\n \
WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_runs_the_packaged_binary_and_keeps_every_setting() {
        let unit = std::fs::read_to_string(util::workspace_root().join("dist/mim-lb.service")).unwrap();
        let packaged = packaged_unit(&unit);
        assert!(!packaged.contains(MANUAL_BIN), "{packaged}");
        assert!(packaged.contains(&format!("ExecStart={SBIN} run --config {CONFIG} --keep-pinned")), "{packaged}");
        assert!(!packaged.contains("install -m"), "manual install steps left in:\n{packaged}");
        // Every setting line of the unit is kept, with only the binary's path changed.
        for line in unit.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(packaged.contains(&line.replace(MANUAL_BIN, SBIN)), "lost {line:?}");
        }
    }

    #[test]
    fn control_fields_are_well_formed() {
        let text = control("1.2.3", "amd64", 42);
        for line in text.lines() {
            assert!(line.starts_with(' ') || line.contains(": "), "bad control line {line:?}");
        }
        assert!(text.ends_with('\n'));
        assert!(text.contains("Version: 1.2.3\n") && text.contains("Installed-Size: 42\n"));
    }
}
