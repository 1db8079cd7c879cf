//! Why the XDP program returned the verdict it did. Every packet is counted under exactly one
//! reason. Codes are stable: a code is never renumbered or reused once released, so dashboards
//! and old dumps keep their meaning. New reasons take the next free number.

/// Sent to a master with XDP_TX.
pub const FORWARDED: u32 = 0;
/// Passed: not IPv4 or IPv6 (ARP, LLDP, ...).
pub const NOT_IP: u32 = 1;
/// Passed: IP, but no service matches its destination address, port and protocol.
pub const NOT_A_SERVICE: u32 = 2;
/// Dropped: the service has no master that can take the packet.
pub const NO_BACKEND: u32 = 3;
/// Passed: a header is truncated or inconsistent; the kernel decides what to do with it.
pub const MALFORMED: u32 = 4;
/// Dropped: an IP fragment addressed to a VIP that has a service for the fragment's protocol
/// (UDP fragments to a TCP-only VIP are `NOT_A_SERVICE`) that cannot be sent where the rest of
/// its datagram goes: a later fragment with no record of its first fragment (it arrived first,
/// more than `FRAGMENT_TIMEOUT_NS` after it, or the record was evicted), one whose first
/// fragment's master no longer keeps flows, a first fragment too short to hold the ports, or
/// one to a port of the VIP where no service listens.
/// Dropping, never guessing, guarantees that no two parts of one datagram reach different
/// masters; the client's retransmission (or the application's) sends the datagram again.
pub const FRAGMENT: u32 = 5;
/// Passed: an IPv6 extension header the program does not walk (ESP, AH, mobility, ...), or a
/// chain longer than it walks.
pub const IPV6_EXTENSION: u32 = 6;
/// Passed: more VLAN tags than the two (802.1ad + 802.1Q) the program reads.
pub const VLAN_TOO_DEEP: u32 = 7;
/// Passed: IP but neither TCP nor UDP (ICMP to a VIP is answered by the gateway's kernel).
pub const NOT_TCP_UDP: u32 = 8;
/// Passed: the control plane has not finished filling the maps yet.
pub const NOT_READY: u32 = 9;
/// Dropped: the chosen backend id has no entry in the backend map (a control-plane bug).
pub const BACKEND_MISSING: u32 = 10;
/// Dropped: an internal map lookup failed where it cannot fail (a verifier-mandated check).
pub const INTERNAL: u32 = 11;

/// Dropped: addressed to a service, but not to the gateway's MAC address (unicast flooded by
/// a switch, promiscuous mode, another director's output on the same segment, multicast or
/// broadcast). Only frames sent to the gateway itself are forwarded, so no frame is forwarded
/// twice. Dropped rather than passed: the gateway's kernel holds the VIP, and in the moment
/// after the interface's MAC changes (frames already use the new MAC, the program does not
/// know it yet) it would answer established connections with resets; a dropped segment is
/// retransmitted.
pub const FOREIGN_MAC: u32 = 12;
/// Sent to a master with XDP_TX: an ICMP error (ICMPv4 destination unreachable or time
/// exceeded; ICMPv6 packet too big, destination unreachable or time exceeded) addressed to a
/// VIP whose quoted packet is a master's answer from a service (source VIP:port, destination a
/// client), sent to the master the flow client:port -> VIP:port is on now. Nothing recorded.
pub const ICMP_ERROR_FORWARDED: u32 = 13;
/// Passed: an ICMP error of a kind that is relayed, whose quote is too short to hold the
/// quoted packet's ports (less than its IP header plus 4 octets).
pub const ICMP_QUOTE_SHORT: u32 = 14;
/// Sent to a master with XDP_TX: the first fragment of a datagram (offset 0, ports present),
/// sent where the whole datagram would go and remembered in `FRAGMENTS` for the others.
pub const FRAGMENT_FIRST: u32 = 15;
/// Sent to a master with XDP_TX: a later fragment, sent to the master its datagram's first
/// fragment went to.
pub const FRAGMENT_FOLLOWED: u32 = 16;
/// Sent to a master with XDP_TX: a later TCP fragment with no record of its first fragment,
/// for a VIP whose only TCP service hashes the client address only (`maglev-source`), on a
/// slot whose every flow is on its master: sent by its source alone, where the first fragment
/// goes too (if it is for that service's port; one for another port is dropped as `FRAGMENT`).
pub const FRAGMENT_BY_SOURCE: u32 = 17;

/// Every reason with its stable name, for status output, metrics and tests.
pub const ALL: [(u32, &str); 18] = [
    (FORWARDED, "forwarded"),
    (NOT_IP, "not_ip"),
    (NOT_A_SERVICE, "not_a_service"),
    (NO_BACKEND, "no_backend"),
    (MALFORMED, "malformed"),
    (FRAGMENT, "fragment"),
    (IPV6_EXTENSION, "ipv6_extension"),
    (VLAN_TOO_DEEP, "vlan_too_deep"),
    (NOT_TCP_UDP, "not_tcp_udp"),
    (NOT_READY, "not_ready"),
    (BACKEND_MISSING, "backend_missing"),
    (INTERNAL, "internal"),
    (FOREIGN_MAC, "foreign_mac"),
    (ICMP_ERROR_FORWARDED, "icmp_error_forwarded"),
    (ICMP_QUOTE_SHORT, "icmp_quote_short"),
    (FRAGMENT_FIRST, "fragment_first"),
    (FRAGMENT_FOLLOWED, "fragment_followed"),
    (FRAGMENT_BY_SOURCE, "fragment_by_source"),
];

/// The stable name of a reason code.
pub fn name(code: u32) -> &'static str {
    let mut i = 0;
    while i < ALL.len() {
        if ALL[i].0 == code {
            return ALL[i].1;
        }
        i += 1;
    }
    "unknown"
}

/// What the simulation copy of the program returns instead of a verdict: this plus the reason
/// code (see `SIMULATE` in the program).
pub const SIMULATED: u32 = 1000;

/// XDP verdicts (the kernel's `enum xdp_action`), named here so both sides agree.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The verdict that goes with a reason: one table, used by the program to decide and by the
/// tests and tools to check.
#[inline(always)]
pub const fn verdict(code: u32) -> u32 {
    match code {
        FORWARDED | ICMP_ERROR_FORWARDED | FRAGMENT_FIRST | FRAGMENT_FOLLOWED | FRAGMENT_BY_SOURCE => XDP_TX,
        NO_BACKEND | FRAGMENT | BACKEND_MISSING | INTERNAL | FOREIGN_MAC => XDP_DROP,
        _ => XDP_PASS,
    }
}
