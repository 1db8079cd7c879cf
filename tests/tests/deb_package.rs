//! The Debian package (`cargo xtask deb`), installed for real with dpkg in a container-like
//! namespace: a private mount namespace whose root is an overlay over this machine's root
//! (writes go to a tmpfs, so the machine's own files and dpkg database are never touched),
//! with no systemd, no /sys and a fresh /run and /tmp. The package of the binary under test
//! must install, hold a config `mim-lb check` accepts, its manual pages and completions,
//! reinstall over an edited config without touching it, remove (running `mim-lb detach`) with
//! its conffile kept, and purge.

use std::path::PathBuf;
use std::process::Command;

/// A scratch directory removed on drop, named after this process like the labs.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The xtask binary `cargo xtask test` built and runs from, next to the test binaries.
fn xtask_binary() -> PathBuf {
    let daemon = mim_lb_tests::gateway::mim_lb_binary();
    let xtask = daemon.with_file_name("xtask");
    assert!(
        xtask.exists(),
        "{} is missing: run the suite with `cargo xtask test`, which builds it",
        xtask.display()
    );
    xtask
}

/// What runs inside the namespace: mounts, then dpkg and the package's programs in a chroot.
/// Each step prints a marker line the test looks for; any failing step ends the script.
const IN_NAMESPACE: &str = r##"
set -eu
W=$1
mount -t tmpfs tmpfs "$W/layers"
mkdir -p "$W/layers/upper" "$W/layers/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/layers/upper,workdir=$W/layers/work" "$W/root"
mount -t proc proc "$W/root/proc"
mount --rbind /dev "$W/root/dev"
mount -t tmpfs tmpfs "$W/root/run"
mount -t tmpfs tmpfs "$W/root/tmp"
cp "$W/out/"*.deb "$W/root/tmp/mim-lb.deb"
exec chroot "$W/root" /bin/sh -eu -c '
# A machine that has mim-lb installed itself: removed from the overlay only.
if dpkg-query -W mim-lb >/dev/null 2>&1; then dpkg -P mim-lb >/dev/null; fi
test ! -e /usr/sbin/mim-lb && test ! -e /etc/mim-lb && echo "MARK clean"
dpkg -i /tmp/mim-lb.deb
dpkg-query -W -f "MARK status \${Status}\n" mim-lb
/usr/sbin/mim-lb --version | sed "s/^/MARK version /"
/usr/sbin/mim-lb check --config /etc/mim-lb/mim-lb.toml >/tmp/check.out && echo "MARK check ok"
head -1 /tmp/check.out
grep -q "^ExecStart=/usr/sbin/mim-lb run --config /etc/mim-lb/mim-lb.toml --keep-pinned" /usr/lib/systemd/system/mim-lb.service && echo "MARK unit"
zcat /usr/share/man/man8/mim-lb-drain.8.gz | grep -q "^.TH mim-lb-drain 8" && echo "MARK man"
grep -q simulate /usr/share/bash-completion/completions/mim-lb && echo "MARK bash completion"
test -s /usr/share/zsh/vendor-completions/_mim-lb && test -s /usr/share/fish/vendor_completions.d/mim-lb.fish && echo "MARK other completions"
E=/usr/share/doc/mim-lb/examples; grep -q "merge paths" $E/bird/router.conf && grep -q "krt_source" $E/bird/director.conf && grep -q maximum-paths $E/frr/router.conf && grep -q import-table $E/frr/director.conf && echo "MARK routing examples"
echo "# edited by the operator" >> /etc/mim-lb/mim-lb.toml
dpkg -i --force-confold /tmp/mim-lb.deb
grep -q "^# edited by the operator" /etc/mim-lb/mim-lb.toml && echo "MARK reinstall kept the edited config"
dpkg -r mim-lb
test ! -e /usr/sbin/mim-lb && test -f /etc/mim-lb/mim-lb.toml && echo "MARK removed, conffile kept"
dpkg -P mim-lb
test ! -e /etc/mim-lb/mim-lb.toml && echo "MARK purged"
'
"##;

#[test]
fn the_debian_package_installs_checks_its_example_config_and_purges() {
    let work = Scratch(std::env::temp_dir().join(format!("mimlb-{:x}-deb", std::process::id())));
    for dir in ["out", "layers", "root"] {
        std::fs::create_dir_all(work.0.join(dir)).unwrap();
    }
    let daemon = mim_lb_tests::gateway::mim_lb_binary();
    let built = Command::new(xtask_binary())
        .args(["deb", "--binary"])
        .arg(&daemon)
        .arg("--out")
        .arg(work.0.join("out"))
        .output()
        .unwrap();
    assert!(built.status.success(), "cargo xtask deb failed:\n{}", String::from_utf8_lossy(&built.stderr));

    let host_before = host_has_the_package();
    let script = work.0.join("in-namespace.sh");
    std::fs::write(&script, IN_NAMESPACE).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh"])
        .arg(&script)
        .arg(&work.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("exit {}\n--- stdout\n{stdout}--- stderr\n{stderr}", out.status);
    assert!(out.status.success(), "installing the package failed: {report}");
    let version = env!("CARGO_PKG_VERSION");
    for mark in [
        "MARK clean".to_owned(),
        "MARK status install ok installed".to_owned(),
        format!("MARK version mim-lb {version}"),
        "MARK check ok".to_owned(),
        "MARK unit".to_owned(),
        "MARK man".to_owned(),
        "MARK bash completion".to_owned(),
        "MARK other completions".to_owned(),
        "MARK routing examples".to_owned(),
        "MARK reinstall kept the edited config".to_owned(),
        "MARK removed, conffile kept".to_owned(),
        "MARK purged".to_owned(),
    ] {
        assert!(stdout.lines().any(|l| l == mark), "missing {mark:?}: {report}");
    }
    assert!(stdout.contains("config OK"), "mim-lb check did not accept the example config: {report}");
    // Removal runs `mim-lb detach` with the packaged config (here nothing is attached).
    assert!(
        stdout.contains("nothing is pinned under /sys/fs/bpf/mim-lb") || stderr.contains("nothing is pinned under /sys/fs/bpf/mim-lb"),
        "removing the package did not run mim-lb detach: {report}"
    );
    assert_eq!(host_has_the_package(), host_before, "the install or removal reached this machine's dpkg database");
}

/// Whether this machine's own dpkg database lists mim-lb.
fn host_has_the_package() -> bool {
    Command::new("dpkg-query").args(["-W", "mim-lb"]).output().is_ok_and(|o| o.status.success())
}
