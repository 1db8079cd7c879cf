//! A small packet capture: an AF_PACKET socket on one interface of one namespace that records
//! the addresses of each frame, e.g. to prove that answers come straight from a master.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{in_netns, spawn_in_netns};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Frames a capture keeps unless told otherwise.
pub const DEFAULT_MAX_FRAMES: usize = 100_000;
/// How long a capture runs at most unless told otherwise; it stops recording after that.
pub const DEFAULT_MAX_TIME: Duration = Duration::from_secs(120);

/// What was seen of one frame. Fields that do not apply to the frame are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    /// Sent by this interface (rather than received).
    pub outgoing: bool,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub ethertype: u16,
    /// IP source, or for ARP the sender protocol address.
    pub src_ip: Option<IpAddr>,
    /// IP destination, or for ARP the target protocol address.
    pub dst_ip: Option<IpAddr>,
    /// IP protocol / IPv6 next header (first header only, no extension header walk).
    pub l4_proto: Option<u8>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    pub tcp_flags: Option<u8>,
    /// ICMP or ICMPv6 type.
    pub icmp_type: Option<u8>,
    /// ARP operation (1 request, 2 reply).
    pub arp_op: Option<u16>,
    /// Frame length on the wire.
    pub len: usize,
}

impl FrameInfo {
    pub const TCP_SYN: u8 = 0x02;
    pub const TCP_RST: u8 = 0x04;
    pub const TCP_ACK: u8 = 0x10;

    pub fn is_tcp(&self) -> bool {
        self.l4_proto == Some(IPPROTO_TCP)
    }

    pub fn is_udp(&self) -> bool {
        self.l4_proto == Some(IPPROTO_UDP)
    }
}

/// Formats a MAC the usual way, for messages.
pub fn mac_to_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A running capture. Recording starts before [`Capture::start`] returns, so traffic sent
/// afterwards is seen. Stops at [`Capture::stop`], on drop, after its frame limit or its time
/// limit, whichever comes first.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<FrameInfo>>>,
}

impl Capture {
    /// Captures on `ifname` inside `ns` with the default limits.
    pub fn start(ns: &str, ifname: &str) -> Result<Capture> {
        Capture::start_with_limits(ns, ifname, DEFAULT_MAX_FRAMES, DEFAULT_MAX_TIME)
    }

    pub fn start_with_limits(
        ns: &str,
        ifname: &str,
        max_frames: usize,
        max_time: Duration,
    ) -> Result<Capture> {
        let ifname_owned = ifname.to_owned();
        let socket = in_netns(ns, move || packet_socket(&ifname_owned))?
            .with_context(|| format!("capturing on {ifname} in {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_for_thread = Arc::clone(&stop);
        let thread = spawn_in_netns(ns, "mimlb-capture", move || {
            record(socket, &stop_for_thread, max_frames, max_time)
        })?;
        Ok(Capture { stop, thread: Some(thread) })
    }

    /// Stops recording and returns the frames seen, oldest first.
    pub fn stop(mut self) -> Vec<FrameInfo> {
        self.finish()
    }

    fn finish(&mut self) -> Vec<FrameInfo> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.finish();
    }
}

/// An AF_PACKET socket bound to one interface. It is created listening to no protocol and
/// only then bound with ETH_P_ALL, so no frame from another interface slips in between.
fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let c_name = std::ffi::CString::new(ifname)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname:?} here");
    }
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; zeroes are valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("binding the AF_PACKET socket");
    }
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
    let bufsize: libc::c_int = 8 << 20;
    // SAFETY: setsockopt with correctly sized option values.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        // Bursts of hundreds of connections must not overflow the queue while the reader
        // thread is descheduled; FORCE works past rmem_max since we run with CAP_NET_ADMIN.
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bufsize as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    Ok(fd)
}

fn record(fd: OwnedFd, stop: &AtomicBool, max_frames: usize, max_time: Duration) -> Vec<FrameInfo> {
    let deadline = Instant::now() + max_time;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 256];
    // After stop, read on until the socket has been quiet for one receive timeout (at most
    // DRAIN): frames of the last exchange are often still queued, or in a softirq backlog,
    // when stop is called.
    const DRAIN: Duration = Duration::from_millis(300);
    let mut quiet = false;
    let mut drain_until: Option<Instant> = None;
    while frames.len() < max_frames && Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            let until = *drain_until.get_or_insert_with(|| Instant::now() + DRAIN);
            if quiet || Instant::now() >= until {
                break;
            }
        }
        // SAFETY: sockaddr_ll is plain data; zeroes are valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut sll_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // Only headers matter; MSG_TRUNC makes the call return the full length anyway.
        // SAFETY: `buf` and `sll` are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut sll_len,
            )
        };
        quiet = n < 0;
        if n < 0 {
            continue;
        }
        let len = n as usize;
        let outgoing = sll.sll_pkttype == libc::PACKET_OUTGOING;
        if let Some(info) = parse_frame(&buf[..len.min(buf.len())], len, outgoing) {
            frames.push(info);
        }
    }
    frames
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses the Ethernet, IP/ARP and TCP/UDP/ICMP headers of a frame; `None` if too short.
pub fn parse_frame(data: &[u8], wire_len: usize, outgoing: bool) -> Option<FrameInfo> {
    if data.len() < 14 {
        return None;
    }
    let mut info = FrameInfo {
        outgoing,
        dst_mac: data[0..6].try_into().ok()?,
        src_mac: data[6..12].try_into().ok()?,
        ethertype: be16(data, 12)?,
        src_ip: None,
        dst_ip: None,
        l4_proto: None,
        src_port: None,
        dst_port: None,
        tcp_flags: None,
        icmp_type: None,
        arp_op: None,
        len: wire_len,
    };
    let l3 = &data[14..];
    let l4 = match info.ethertype {
        ETH_P_IPV4 if l3.len() >= 20 => {
            let ihl = usize::from(l3[0] & 0x0f) * 4;
            info.l4_proto = Some(l3[9]);
            info.src_ip = Some(IpAddr::V4(Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15])));
            info.dst_ip = Some(IpAddr::V4(Ipv4Addr::new(l3[16], l3[17], l3[18], l3[19])));
            l3.get(ihl..)
        }
        ETH_P_IPV6 if l3.len() >= 40 => {
            info.l4_proto = Some(l3[6]);
            let src: [u8; 16] = l3[8..24].try_into().ok()?;
            let dst: [u8; 16] = l3[24..40].try_into().ok()?;
            info.src_ip = Some(IpAddr::V6(Ipv6Addr::from(src)));
            info.dst_ip = Some(IpAddr::V6(Ipv6Addr::from(dst)));
            l3.get(40..)
        }
        ETH_P_ARP if l3.len() >= 28 => {
            info.arp_op = be16(l3, 6);
            info.src_ip = Some(IpAddr::V4(Ipv4Addr::new(l3[14], l3[15], l3[16], l3[17])));
            info.dst_ip = Some(IpAddr::V4(Ipv4Addr::new(l3[24], l3[25], l3[26], l3[27])));
            None
        }
        _ => None,
    };
    if let (Some(l4), Some(proto)) = (l4, info.l4_proto) {
        match proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                info.src_port = be16(l4, 0);
                info.dst_port = be16(l4, 2);
                if proto == IPPROTO_TCP {
                    info.tcp_flags = l4.get(13).copied();
                }
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => info.icmp_type = l4.first().copied(),
            _ => {}
        }
    }
    Some(info)
}
