//! `mim-lb prepare-backend` on real namespaces: masters that start as plain hosts are
//! prepared by the real CLI, and then take direct-routed traffic for the VIP without ever
//! claiming it on the wire; runs are idempotent, dry runs change nothing, and undo puts the
//! namespace back exactly as it was.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mim_lb_tests::capture::{ETH_P_ARP, FrameInfo, IPPROTO_ICMPV6};
use mim_lb_tests::netns::enter_netns_on_spawn;
use mim_lb_tests::{Capture, Lab, LabSpec, in_netns, mac_to_string, tcp_ask, udp_ask};

const DUT: &str = env!("CARGO_BIN_EXE_mim-lb-dut");
const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(3);
const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
const ARP_REPLY: u16 = 2;

/// A lab whose masters are plain hosts: no VIP on `lo`, no ARP settings.
fn plain_lab(masters: usize, vips: usize) -> Lab {
    Lab::new(LabSpec { masters, ipv6: true, vips, prepare_masters: false, slaves: 0, directors: 1, router: false })
        .expect("building the lab")
}

/// A state directory of its own for each use, removed on drop (also when a test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("mim-lb-prepare-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }

    /// Names of the state files in it (the lock file does not count).
    fn state_files(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.0) else { return Vec::new() };
        dir.map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".json"))
            .collect()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `mim-lb-dut prepare-backend ARGS --state-dir DIR` inside `ns`.
fn run_dut(ns: &str, args: &[&str], state: &TempDir) -> Output {
    let mut cmd = Command::new(DUT);
    cmd.arg("prepare-backend")
        .args(args)
        .args(["--state-dir", state.path()])
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null());
    enter_netns_on_spawn(&mut cmd, ns).unwrap();
    mim_lb_tests::output_within(&mut cmd, mim_lb_tests::RUN_TIMEOUT).expect("running mim-lb-dut")
}

/// [`run_dut`] that must succeed; returns stdout.
fn prepare(ns: &str, args: &[&str], state: &TempDir) -> String {
    let out = run_dut(ns, args, state);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "prepare-backend {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- prepare-backend {}\n{stdout}", args.join(" "));
    stdout
}

/// [`run_dut`] that must fail; returns stderr.
fn prepare_fails(ns: &str, args: &[&str], state: &TempDir) -> String {
    let out = run_dut(ns, args, state);
    assert!(!out.status.success(), "prepare-backend {args:?} succeeded: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lines(out: &str) -> Vec<&str> {
    out.lines().collect()
}

/// Everything of a namespace that prepare-backend could touch or disturb: every interface and
/// address, every route of every table, and every readable `net.ipv4.conf.*` and
/// `net.ipv6.conf.*` setting of every interface.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    links: String,
    addresses: String,
    routes: String,
    sysctls: BTreeMap<String, String>,
}

fn snapshot(lab: &Lab, ns: &str) -> Snapshot {
    let ip = |args: &[&str]| lab.run_in(ns, "ip", args).unwrap();
    let sysctls = in_netns(ns, || {
        let mut values = BTreeMap::new();
        for tree in ["/proc/sys/net/ipv4/conf", "/proc/sys/net/ipv6/conf"] {
            for conf in std::fs::read_dir(tree).unwrap() {
                let conf = conf.unwrap().path();
                for setting in std::fs::read_dir(&conf).unwrap() {
                    let path = setting.unwrap().path();
                    // Some are write-only or unreadable until set (stable_secret).
                    if let Ok(value) = std::fs::read_to_string(&path) {
                        values.insert(path.display().to_string(), value.trim().to_owned());
                    }
                }
            }
        }
        values
    })
    .unwrap();
    Snapshot {
        links: ip(&["-o", "link", "show"]),
        addresses: ip(&["-o", "addr", "show"]),
        routes: ip(&["-4", "route", "show", "table", "all"])
            + &ip(&["-6", "route", "show", "table", "all"]),
        sysctls,
    }
}

fn sysctl(snap: &Snapshot, conf: &str, knob: &str) -> i32 {
    snap.sysctls[&format!("/proc/sys/net/ipv4/conf/{conf}/{knob}")].parse().unwrap()
}

/// The value in force on `dev`: the kernel takes the larger of `all` and the interface's own.
fn in_force(snap: &Snapshot, dev: &str, knob: &str) -> i32 {
    sysctl(snap, "all", knob).max(sysctl(snap, dev, knob))
}

fn vips(lab: &Lab) -> (IpAddr, IpAddr) {
    (lab.vip4().into(), lab.vip6().unwrap().into())
}

/// What the balancer does with its MAC rewrite: the client sends frames for `vip` straight to
/// master `i`. Then a TCP connection to the VIP must be answered by that master, from its own
/// MAC, with the VIP as source.
fn check_direct_routing(lab: &Lab, i: usize, vip: IpAddr) {
    let client = lab.client_ns();
    let mac = mac_to_string(&lab.master_mac(i));
    let vip_text = vip.to_string();
    lab.run_in(
        client,
        "ip",
        &["neigh", "replace", &vip_text, "lladdr", &mac, "dev", "eth0", "nud", "permanent"],
    )
    .unwrap();
    let capture = Capture::start(client, "eth0").unwrap();
    let name = in_netns(client, || tcp_ask(SocketAddr::new(vip, PORT), T)).unwrap();
    let frames = capture.stop();
    lab.run_in(client, "ip", &["neigh", "del", &vip_text, "dev", "eth0"]).unwrap();
    let name = name.unwrap_or_else(|e| panic!("TCP to {vip}:{PORT} through master {i}: {e:#}"));
    assert_eq!(name, lab.master_name(i), "{vip}:{PORT} answered by the wrong master");
    let answers: Vec<&FrameInfo> = frames
        .iter()
        .filter(|f| !f.outgoing && f.is_tcp() && f.src_ip == Some(vip) && f.src_port == Some(PORT))
        .collect();
    assert!(!answers.is_empty(), "no answer from {vip}:{PORT} captured");
    for f in answers {
        assert_eq!(
            f.src_mac,
            lab.master_mac(i),
            "answer from {vip} came from {}",
            mac_to_string(&f.src_mac)
        );
        assert_eq!(f.dst_mac, lab.client_mac());
    }
}

/// Makes the client resolve both VIPs afresh (ARP, neighbour solicitation) and returns what it
/// saw. The lab's gateway holds the VIPs on its eth0 and answers, as a director would.
fn resolve_vips(lab: &Lab) -> Vec<FrameInfo> {
    let client = lab.client_ns();
    // Only non-permanent entries are flushed; the tests delete their static ones themselves.
    lab.run_in(client, "ip", &["neigh", "flush", "dev", "eth0"]).unwrap();
    let (v4, v6) = vips(lab);
    let capture = Capture::start(client, "eth0").unwrap();
    in_netns(client, || {
        // Nothing listens on the gateway, so these fail; only the resolution matters.
        let _ = udp_ask(SocketAddr::new(v4, PORT), None, Duration::from_millis(300));
        let _ = udp_ask(SocketAddr::new(v6, PORT), None, Duration::from_millis(300));
    })
    .unwrap();
    capture.stop()
}

fn arp_replies_for(frames: &[FrameInfo], vip: IpAddr) -> Vec<&FrameInfo> {
    frames
        .iter()
        .filter(|f| {
            !f.outgoing
                && f.ethertype == ETH_P_ARP
                && f.arp_op == Some(ARP_REPLY)
                && f.src_ip == Some(vip)
        })
        .collect()
}

/// Neighbour advertisements for the VIP: Linux sends a solicited one from the target address.
fn advertisements_for(frames: &[FrameInfo], vip: IpAddr) -> Vec<&FrameInfo> {
    frames
        .iter()
        .filter(|f| !f.outgoing && f.l4_proto == Some(IPPROTO_ICMPV6))
        .filter(|f| f.icmp_type == Some(ICMPV6_NEIGHBOR_ADVERTISEMENT) && f.src_ip == Some(vip))
        .collect()
}

/// The master does not claim the VIPs: the client's ARP request and neighbour solicitation are
/// answered by the gateway alone, and nothing unicast comes from the master's MAC.
fn check_not_claimed(lab: &Lab, i: usize) {
    let frames = resolve_vips(lab);
    let (v4, v6) = vips(lab);
    let master = lab.master_mac(i);
    for (vip, answers) in
        [(v4, arp_replies_for(&frames, v4)), (v6, advertisements_for(&frames, v6))]
    {
        // The check can see answers at all: the gateway's is there.
        assert!(
            answers.iter().any(|f| f.src_mac == lab.gateway_mac()),
            "gateway did not answer for {vip}: {frames:#?}"
        );
        let from_master: Vec<_> = answers.iter().filter(|f| f.src_mac == master).collect();
        assert!(from_master.is_empty(), "master {i} claimed {vip}: {from_master:#?}");
    }
    // ARP replies and advertisements are unicast; multicast (MLD reports) is noise.
    let unicast: Vec<_> = frames
        .iter()
        .filter(|f| !f.outgoing && f.src_mac == master && f.dst_mac[0] & 1 == 0)
        .collect();
    assert!(unicast.is_empty(), "master {i} answered something: {unicast:#?}");
    // And the client's datagrams for the VIPs went to the gateway.
    for vip in [v4, v6] {
        let sent: Vec<_> =
            frames.iter().filter(|f| f.outgoing && f.is_udp() && f.dst_ip == Some(vip)).collect();
        assert!(!sent.is_empty(), "no datagram to {vip} captured");
        assert!(
            sent.iter().all(|f| f.dst_mac == lab.gateway_mac()),
            "{vip} did not resolve to the gateway: {sent:#?}"
        );
    }
}

fn on_lo(lab: &Lab, ns: &str) -> String {
    lab.run_in(ns, "ip", &["-o", "addr", "show", "dev", "lo"]).unwrap()
}

/// The whole life of a master: dry run, prepare, prepare again, traffic, undo.
#[test]
fn prepare_then_direct_routing_works_and_undo_restores_the_namespace() {
    let mut lab = plain_lab(2, 1);
    let state = TempDir::new("life");
    let ns = lab.master_ns(0).to_owned();
    let (v4, v6) = vips(&lab);
    let (v4s, v6s) = (v4.to_string(), v6.to_string());
    let vip_args = ["--vip", v4s.as_str(), "--vip", v6s.as_str()];
    let before = snapshot(&lab, &ns);
    assert!(!on_lo(&lab, &ns).contains(&v4s), "the lab's master is not plain");
    assert_eq!(sysctl(&before, "all", "arp_ignore"), 0);

    // A dry run prints exactly the changes, makes none, and leaves no state.
    let dry = prepare(&ns, &[&vip_args[..], &["--dry-run"][..]].concat(), &state);
    let expected = [
        "set net.ipv4.conf.all.arp_ignore 0 -> 1 (answer ARP only for addresses on the asking interface)".to_owned(),
        "set net.ipv4.conf.all.arp_announce 0 -> 2 (never use the VIP as the sender address of ARP requests)".to_owned(),
        format!("add {v4s}/32 to lo"),
        format!("add {v6s}/128 to lo"),
    ];
    assert_eq!(lines(&dry), [&expected[..], &["dry run: 4 changes not made".to_owned()]].concat());
    assert_eq!(snapshot(&lab, &ns), before, "the dry run changed the namespace");
    assert!(!Path::new(state.path()).exists(), "the dry run created the state directory");

    // The real run does and prints the same.
    let out = prepare(&ns, &vip_args, &state);
    let out = lines(&out);
    assert_eq!(out[..4], expected[..]);
    assert!(
        out[4].starts_with(&format!(
            "prepared for {v4s}, {v6s}: 4 changes; state in {}",
            state.path()
        )),
        "{out:?}"
    );
    assert_eq!(out.len(), 5);
    assert_eq!(state.state_files().len(), 1);
    let prepared = snapshot(&lab, &ns);
    let lo = on_lo(&lab, &ns);
    assert!(lo.contains(&format!("inet {v4s}/32 ")), "{lo}");
    assert!(lo.contains(&format!("inet6 {v6s}/128 ")), "{lo}");
    for dev in ["eth0", "default"] {
        assert_eq!(in_force(&prepared, dev, "arp_ignore"), 1);
        assert_eq!(in_force(&prepared, dev, "arp_announce"), 2);
        assert_ne!(in_force(&prepared, dev, "rp_filter"), 1);
    }

    // Again: nothing to do, and it says so; nothing changes, the state file included.
    let state_file = state.0.join(&state.state_files()[0]);
    let saved = std::fs::read_to_string(&state_file).unwrap();
    let again = prepare(&ns, &vip_args, &state);
    assert_eq!(
        lines(&again),
        vec![
            "arp_ignore, arp_announce and rp_filter are already right on every interface"
                .to_owned(),
            format!("{v4s}/32 is already on lo"),
            format!("{v6s}/128 is already on lo"),
            format!("no change: this host is already prepared for {v4s}, {v6s}"),
        ]
    );
    assert_eq!(snapshot(&lab, &ns), prepared);
    assert_eq!(std::fs::read_to_string(&state_file).unwrap(), saved);

    // Direct routing into the master works for both families, and only that master answers.
    lab.start_tcp_servers(PORT).unwrap();
    check_direct_routing(&lab, 0, v4);
    check_direct_routing(&lab, 0, v6);
    assert_eq!(lab.served(0).tcp_accepted, 2);
    assert_eq!(lab.served(1).tcp_accepted, 0);
    // And it never claims the VIPs: their resolution still ends at the gateway.
    check_not_claimed(&lab, 0);

    // Undo (a dry run first) puts everything back as it was before the first run.
    let undo_dry = prepare(&ns, &["--undo", "--dry-run"], &state);
    assert_eq!(snapshot(&lab, &ns), prepared);
    let undo = prepare(&ns, &["--undo"], &state);
    let restore = [
        format!("remove {v4s}/32 from lo"),
        format!("remove {v6s}/128 from lo"),
        "set net.ipv4.conf.all.arp_announce 2 -> 0 (restore the value from before prepare-backend)"
            .to_owned(),
        "set net.ipv4.conf.all.arp_ignore 1 -> 0 (restore the value from before prepare-backend)"
            .to_owned(),
    ];
    assert_eq!(
        lines(&undo_dry),
        [&restore[..], &["dry run: 4 changes not made".to_owned()]].concat()
    );
    assert_eq!(lines(&undo), [&restore[..], &["undone: 4 changes".to_owned()]].concat());
    assert_eq!(snapshot(&lab, &ns), before, "undo did not restore the namespace");
    assert_eq!(state.state_files(), Vec::<String>::new(), "undo left its state behind");
}

/// Proves that the no-claim check can fail: a VIP put on lo by hand, without the ARP settings,
/// is answered by the master. prepare-backend keeps that address (and says so), stops the
/// claim, and its undo leaves the address that was there before it.
#[test]
fn a_vip_put_on_lo_by_hand_is_claimed_until_prepared() {
    let lab = plain_lab(1, 1);
    let state = TempDir::new("by-hand");
    let ns = lab.master_ns(0).to_owned();
    let (v4, v6) = vips(&lab);
    let (v4s, v6s) = (v4.to_string(), v6.to_string());
    let v4_lo = format!("{v4s}/32");
    let v6_lo = format!("{v6s}/128");
    lab.run_in(&ns, "ip", &["addr", "add", &v4_lo, "dev", "lo"]).unwrap();
    lab.run_in(&ns, "ip", &["addr", "add", &v6_lo, "dev", "lo", "nodad"]).unwrap();
    let before = snapshot(&lab, &ns);

    let frames = resolve_vips(&lab);
    let claims = arp_replies_for(&frames, v4);
    assert!(
        claims.iter().any(|f| f.src_mac == lab.master_mac(0)),
        "with arp_ignore=0 the master should answer ARP for a VIP on lo: {frames:#?}"
    );
    // IPv6 needs no setting: neighbour discovery answers only for addresses of the asking
    // interface, so a VIP on lo is not claimed even now.
    assert!(
        advertisements_for(&frames, v6).iter().all(|f| f.src_mac != lab.master_mac(0)),
        "{frames:#?}"
    );

    let out = prepare(&ns, &["--vip", &v4s, "--vip", &v6s], &state);
    assert!(out.contains(&format!("{v4_lo} is already on lo\n")), "{out}");
    assert!(out.contains("set net.ipv4.conf.all.arp_ignore 0 -> 1"), "{out}");
    assert!(!out.contains("add "), "{out}");
    check_not_claimed(&lab, 0);

    let undo = prepare(&ns, &["--undo"], &state);
    assert!(
        undo.contains(&format!(
            "leave {v4_lo} on lo: it was there before prepare-backend first ran"
        )),
        "{undo}"
    );
    assert!(
        undo.contains(&format!(
            "leave {v6_lo} on lo: it was there before prepare-backend first ran"
        )),
        "{undo}"
    );
    assert!(undo.contains(&format!("warning: {v4s} stays on lo")), "{undo}");
    assert!(!undo.contains("remove "), "{undo}");
    assert_eq!(snapshot(&lab, &ns), before);
}

/// A second VIP set prepared later shares the settings: undoing one set keeps them, undoing
/// the last one restores the originals, and the namespace is as before.
#[test]
fn vip_sets_prepared_separately_are_undone_separately() {
    let lab = plain_lab(1, 2);
    let state = TempDir::new("sets");
    let ns = lab.master_ns(0).to_owned();
    let (a, b) = (lab.vips4()[0].to_string(), lab.vips4()[1].to_string());
    let before = snapshot(&lab, &ns);
    prepare(&ns, &["--vip", &a], &state);
    let second = prepare(&ns, &["--vip", &b], &state);
    assert_eq!(
        lines(&second)[..2],
        [
            "arp_ignore, arp_announce and rp_filter are already right on every interface"
                .to_owned(),
            format!("add {b}/32 to lo"),
        ]
    );
    let undo_a = prepare(&ns, &["--undo", "--vip", &a], &state);
    assert_eq!(
        lines(&undo_a),
        vec![
            format!(
                "keep the ARP and rp_filter settings: still needed by {b} (undo those too to restore them)"
            ),
            format!("remove {a}/32 from lo"),
            "undone: 1 change".to_owned(),
        ]
    );
    let mid = snapshot(&lab, &ns);
    assert_eq!(sysctl(&mid, "all", "arp_ignore"), 1);
    assert!(on_lo(&lab, &ns).contains(&format!("{b}/32")));
    prepare(&ns, &["--undo"], &state);
    assert_eq!(snapshot(&lab, &ns), before);
    assert_eq!(state.state_files(), Vec::<String>::new());
}

/// Without its state, undo still removes the VIPs it is given and says that the settings
/// cannot be restored; with the state back, a later undo finishes the job.
#[test]
fn undo_without_state_removes_the_vips_and_says_what_it_cannot_restore() {
    let lab = plain_lab(1, 1);
    let (state, empty) = (TempDir::new("with-state"), TempDir::new("no-state"));
    let ns = lab.master_ns(0).to_owned();
    let (v4, v6) = vips(&lab);
    let (v4s, v6s) = (v4.to_string(), v6.to_string());
    let before = snapshot(&lab, &ns);
    prepare(&ns, &["--vip", &v4s, "--vip", &v6s], &state);

    let err = prepare_fails(&ns, &["--undo"], &empty);
    assert!(
        err.contains("nothing to undo: no state for this network namespace and no --vip given"),
        "{err}"
    );
    let out = prepare(&ns, &["--undo", "--vip", &v4s, "--vip", &v6s], &empty);
    assert!(out.starts_with("no prepare-backend state for this network namespace ("), "{out}");
    assert!(out.contains("are unknown, so they are left as they are"), "{out}");
    assert!(out.contains("\n  net.ipv4.conf.all.arp_ignore = 1\n"), "{out}");
    assert!(
        out.contains(&format!(
            "remove {v4s}/32 from lo\nremove {v6s}/128 from lo\nundone: 2 changes"
        )),
        "{out}"
    );
    let lo = on_lo(&lab, &ns);
    assert!(!lo.contains(&v4s) && !lo.contains(&v6s), "{lo}");
    assert_eq!(
        sysctl(&snapshot(&lab, &ns), "all", "arp_ignore"),
        1,
        "settings changed without state"
    );

    let rest = prepare(&ns, &["--undo"], &state);
    assert!(rest.contains(&format!("{v4s}/32 is not on lo: nothing to remove")), "{rest}");
    assert_eq!(snapshot(&lab, &ns), before);
}

fn reverse_path_drops(lab: &Lab, ns: &str) -> u64 {
    let netstat = lab.run_in(ns, "cat", &["/proc/net/netstat"]).unwrap();
    let mut rows = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let at = names.split_whitespace().position(|n| n == "IPReversePathFilter").unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// On a host with strict reverse-path filtering (the RHEL default), a master whose route back
/// to the client leaves by another interface drops every DR request. prepare-backend makes it
/// loose, and the requests get through; strict again, and they are dropped.
#[test]
fn strict_rp_filter_is_made_loose_for_asymmetric_return_paths() {
    let mut lab = plain_lab(1, 1);
    let state = TempDir::new("rp");
    let ns = lab.master_ns(0).to_owned();
    let v4s = lab.vip4().to_string();
    let client = lab.client_addr4().to_string();
    mim_lb_tests::netns::set_sysctls(&ns, &[("net.ipv4.conf.all.rp_filter", "1")]).unwrap();

    let out = prepare(&ns, &["--vip", &v4s], &state);
    assert!(out.contains(
        "set net.ipv4.conf.all.rp_filter 1 -> 2 (loose reverse-path filter: accept requests whose route back leaves by another interface)\n"
    ), "{out}");

    // The master's route back to the client now leaves by a second interface.
    lab.run_in(&ns, "ip", &["link", "add", "side0", "type", "veth", "peer", "name", "side1"])
        .unwrap();
    lab.run_in(&ns, "ip", &["link", "set", "side0", "up"]).unwrap();
    lab.run_in(&ns, "ip", &["link", "set", "side1", "up"]).unwrap();
    lab.run_in(&ns, "ip", &["route", "add", &format!("{client}/32"), "dev", "side0"]).unwrap();
    lab.start_udp_servers(PORT).unwrap();
    let mac = mac_to_string(&lab.master_mac(0));
    lab.run_in(
        lab.client_ns(),
        "ip",
        &["neigh", "replace", &v4s, "lladdr", &mac, "dev", "eth0", "nud", "permanent"],
    )
    .unwrap();
    let send = || {
        in_netns(lab.client_ns(), || {
            // The answer leaves by side0 and never arrives; what counts is the master's side.
            let _ =
                udp_ask(SocketAddr::new(lab.vip4().into(), PORT), None, Duration::from_millis(200));
        })
        .unwrap()
    };

    let drops = reverse_path_drops(&lab, &ns);
    send();
    wait_for("the master to receive the datagram", || lab.served(0).udp_answered == 1);
    assert_eq!(reverse_path_drops(&lab, &ns), drops);

    // What the master does without prepare-backend's change: strict drops the request.
    mim_lb_tests::netns::set_sysctls(&ns, &[("net.ipv4.conf.all.rp_filter", "1")]).unwrap();
    send();
    wait_for("the reverse-path drop", || reverse_path_drops(&lab, &ns) == drops + 1);
    assert_eq!(lab.served(0).udp_answered, 1);
}

/// Refusals: a host that holds the VIP on a real interface (here the gateway, i.e. the wrong
/// machine), VIPs a config would reject, and non-root runs. None of them changes anything.
#[test]
fn refuses_the_wrong_host_bad_vips_and_non_root() {
    let lab = plain_lab(1, 1);
    let state = TempDir::new("refuse");
    let gw = lab.gateway_ns();
    let v4s = lab.vip4().to_string();
    let before = snapshot(&lab, gw);
    let err = prepare_fails(gw, &["--vip", &v4s], &state);
    assert!(
        err.contains(&format!("{v4s}/32 is on eth0: a master must hold the VIP only on lo")),
        "{err}"
    );
    assert!(err.contains(&format!("ip addr del {v4s}/32 dev eth0")), "{err}");
    assert_eq!(snapshot(&lab, gw), before);
    assert_eq!(state.state_files(), Vec::<String>::new());

    let ns = lab.master_ns(0);
    for (bad, why) in [
        ("127.0.0.1", "127.0.0.1 is a loopback address"),
        ("ff02::1", "ff02::1 is a multicast address"),
        ("0.0.0.0", "0.0.0.0 is the unspecified address"),
        ("10.0.0.0/24", "a VIP is a single address (/32) on lo"),
        ("vip.example", "is not an IP address"),
    ] {
        let err = prepare_fails(ns, &["--vip", bad], &state);
        assert!(err.contains(why), "--vip {bad}: {err}");
    }

    let mut cmd = Command::new(DUT);
    cmd.args(["prepare-backend", "--vip", &v4s, "--state-dir", state.path()])
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null());
    // Into the namespace first, then nobody: hooks run in the order they are added, and
    // std's own uid switch would come before both.
    enter_netns_on_spawn(&mut cmd, ns).unwrap();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = mim_lb_tests::output_within(&mut cmd, mim_lb_tests::RUN_TIMEOUT).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
    assert!(!on_lo(&lab, ns).contains(&v4s));
}
