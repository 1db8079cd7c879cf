//! The flow-sync datagram: what directors tell each other, byte for byte, and its
//! authentication. Pure: no sockets, no maps.
//!
//! A datagram is a header, a body, and an HMAC-SHA256 tag over both with the group's shared
//! key. Everything is big-endian, except flow keys, which carry the connection table's own
//! wire-order words as they are. Addresses name backends and services, never ids: two
//! directors number their backends independently.
//!
//! ```text
//! magic "MLBS" | version u8 | kind u8 | reserved u16 | sender u64 | seq u64 | body | tag [32]
//! ```
//! `sender` is the sending daemon's incarnation (its start time in ns since the epoch): a
//! restarted peer is a new one, and datagrams of an older incarnation are refused. The tag
//! also covers the recipient's address (not sent: each side knows it), so a datagram meant
//! for one director cannot be replayed to another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use mim_lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP};
use sha2::Sha256;

use crate::config::{Protocol, ServiceKey};

const MAGIC: &[u8; 4] = b"MLBS";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 1 + 2 + 8 + 8;
const TAG: usize = 32;
/// Largest datagram sent: fits a 1500-byte MTU with IPv6 and UDP headers.
pub const MAX_DATAGRAM: usize = 1400;
/// What [`Body::Stream`] adds around a change: its number and the change's kind.
const STREAM_HEADER: usize = 8 + 1;
/// Room for a body, also when it travels inside a [`Body::Stream`].
pub const MAX_BODY: usize = MAX_DATAGRAM - HEADER - TAG - STREAM_HEADER;

const KIND_HELLO: u8 = 1;
const KIND_RECORDS: u8 = 2;
const KIND_FORGET: u8 = 3;
const KIND_SEEN: u8 = 4;
const KIND_MARKS: u8 = 5;
const KIND_PULL: u8 = 6;
const KIND_PULL_END: u8 = 7;
const KIND_ACK: u8 = 8;
const KIND_CLEARED: u8 = 9;
const KIND_STREAM: u8 = 10;
const KIND_NACK: u8 = 11;
const KIND_BEACON: u8 = 12;

/// Shortest key accepted: 256 bits, what HMAC-SHA256 can use.
pub const MIN_KEY_BYTES: usize = 32;

/// A recorded flow and the master it is on, `age_ms` since it was last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireRecord {
    pub key: FlowKey,
    pub backend: IpAddr,
    pub age_ms: u32,
}

/// A marked Maglev slot: its master, and where its unrecorded flows go (`prev`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireMark {
    pub slot: u32,
    pub owner: Option<IpAddr>,
    pub prev: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Sent every heartbeat: whether the sender is ready, and each service's table digest
    /// (the first 8 bytes of [`crate::director::digest::table_digest`]).
    Hello { ready: bool, digests: Vec<(ServiceKey, [u8; 8])> },
    /// Flows recorded or still alive.
    Records(Vec<WireRecord>),
    /// Flows whose record was deleted.
    Forget(Vec<FlowKey>),
    /// Slots of `service` (a table of `table_size`) where an unrecorded flow went to the
    /// slot's previous master `age_ms` ago.
    Seen { service: ServiceKey, table_size: u32, slots: Vec<(u32, u32)> },
    /// The marked slots of `service` (part of a pull answer).
    Marks { service: ServiceKey, table_size: u32, marks: Vec<WireMark> },
    /// Marks the sender's sweep cleared (as they were): no flow needs them any more.
    Cleared { service: ServiceKey, table_size: u32, marks: Vec<WireMark> },
    /// "Send me everything": a director that starts.
    Pull,
    /// The end of a pull answer: every datagram of it before this one has been acknowledged.
    PullEnd { records: u64, marked_slots: u64 },
    /// Acknowledges the datagram numbered `seq`.
    Ack { seq: u64 },
    /// A change sent once to the directors' multicast group (`[sync] group`): the sender's
    /// `n`th since it started, numbered without gaps so that a receiver sees what it missed.
    /// Only [`Body::is_change`] bodies travel in one.
    Stream { n: u64, body: Box<Body> },
    /// "These numbers of your stream did not reach me": `(first, count)` ranges.
    Nack { ranges: Vec<(u64, u32)> },
    /// The group's heartbeat: [`Body::Hello`] plus the last number of the sender's stream, so
    /// that a receiver notices a lost change even when no other follows it.
    Beacon { ready: bool, stream_high: u64, digests: Vec<(ServiceKey, [u8; 8])> },
}

impl Body {
    /// Whether the datagram is kept until acknowledged (and sent again until then).
    pub fn reliable(&self) -> bool {
        matches!(
            self,
            Body::Records(_) | Body::Forget(_) | Body::Seen { .. } | Body::Marks { .. } | Body::Cleared { .. } | Body::PullEnd { .. }
        )
    }

    /// Whether it is a change to the shared state, which goes to every peer as it happens
    /// (and so may travel in a [`Body::Stream`]).
    pub fn is_change(&self) -> bool {
        matches!(self, Body::Records(_) | Body::Forget(_) | Body::Seen { .. } | Body::Cleared { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub sender: u64,
    pub seq: u64,
    pub body: Body,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("too short")]
    Short,
    #[error("not a mim-lb sync datagram")]
    Magic,
    #[error("sync protocol version {0}, this build speaks 1")]
    Version(u8),
    #[error("the authentication tag does not match (another key, or altered)")]
    BadTag,
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// The group's shared key, ready to sign and check.
#[derive(Clone)]
pub struct Key(Hmac<Sha256>);

impl Key {
    /// A key of at least [`MIN_KEY_BYTES`] bytes.
    pub fn new(secret: &[u8]) -> Option<Key> {
        (secret.len() >= MIN_KEY_BYTES).then(|| Key(Hmac::new_from_slice(secret).expect("HMAC takes any key length")))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// The tag's start: the recipient's address.
fn mac_for(key: &Key, recipient: SocketAddr) -> Hmac<Sha256> {
    let mut mac = key.0.clone();
    let mut addr = Vec::with_capacity(ADDR_BYTES + 2);
    put_addr(&mut addr, Some(recipient.ip()));
    addr.extend_from_slice(&recipient.port().to_be_bytes());
    mac.update(&addr);
    mac
}

/// The datagram of `message` for `to`, signed. The caller keeps bodies within [`MAX_BODY`]
/// (see the `*_PER_DATAGRAM` constants).
pub fn encode(key: &Key, to: SocketAddr, message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind(&message.body));
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&message.sender.to_be_bytes());
    out.extend_from_slice(&message.seq.to_be_bytes());
    put_body(&mut out, &message.body);
    let mut mac = mac_for(key, to);
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

/// The message in `datagram`, if it is well formed and signed with `key` for `me`. The tag
/// is checked (in constant time) before anything else in the body is read.
pub fn decode(key: &Key, me: SocketAddr, datagram: &[u8]) -> Result<Message, WireError> {
    if datagram.len() < HEADER + TAG {
        return Err(WireError::Short);
    }
    if &datagram[..4] != MAGIC {
        return Err(WireError::Magic);
    }
    if datagram[4] != VERSION {
        return Err(WireError::Version(datagram[4]));
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG);
    let mut mac = mac_for(key, me);
    mac.update(signed);
    mac.verify_slice(tag).map_err(|_| WireError::BadTag)?;
    let mut r = Reader { buf: &signed[HEADER..] };
    let sender = u64::from_be_bytes(signed[8..16].try_into().expect("8 bytes"));
    let seq = u64::from_be_bytes(signed[16..24].try_into().expect("8 bytes"));
    let body = read_body(signed[5], &mut r)?;
    if !r.buf.is_empty() {
        return Err(WireError::Malformed("body (trailing bytes)"));
    }
    Ok(Message { sender, seq, body })
}

const SERVICE_BYTES: usize = 1 + 1 + 2 + 16;
const ADDR_BYTES: usize = 17;
const FLOW_KEY_BYTES: usize = 1 + 1 + 2 + 2 + 16 + 16;
const RECORD_BYTES: usize = FLOW_KEY_BYTES + ADDR_BYTES + 4;
/// A mark names its masters by index into the datagram's table of addresses.
const MARK_BYTES: usize = 4 + 1 + 1;
/// Addresses one datagram of marks may name (a service's marks name few: the masters).
pub const MARK_ADDRS_MAX: usize = 16;
const NO_ADDR: u8 = 0xff;

/// How many items of each kind fit one datagram.
pub const RECORDS_PER_DATAGRAM: usize = (MAX_BODY - 2) / RECORD_BYTES;
pub const FORGETS_PER_DATAGRAM: usize = (MAX_BODY - 2) / FLOW_KEY_BYTES;
pub const SEEN_PER_DATAGRAM: usize = (MAX_BODY - SERVICE_BYTES - 4 - 2) / 8;
pub const MARKS_PER_DATAGRAM: usize = (MAX_BODY - SERVICE_BYTES - 4 - 1 - MARK_ADDRS_MAX * ADDR_BYTES - 2) / MARK_BYTES;

/// `marks` cut into datagrams' worth: at most [`MARKS_PER_DATAGRAM`] each, naming at most
/// [`MARK_ADDRS_MAX`] addresses.
pub fn mark_chunks(marks: &[WireMark]) -> Vec<Vec<WireMark>> {
    let mut chunks = Vec::new();
    let mut chunk: Vec<WireMark> = Vec::new();
    let mut addrs: Vec<IpAddr> = Vec::new();
    for m in marks {
        let new: Vec<IpAddr> = [m.owner, m.prev].into_iter().flatten().filter(|a| !addrs.contains(a)).collect();
        let mut new = new;
        new.dedup();
        if chunk.len() == MARKS_PER_DATAGRAM || addrs.len() + new.len() > MARK_ADDRS_MAX {
            chunks.push(std::mem::take(&mut chunk));
            addrs.clear();
            new = [m.owner, m.prev].into_iter().flatten().collect();
            new.dedup();
        }
        addrs.extend(new);
        chunk.push(*m);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}
pub const DIGESTS_PER_DATAGRAM: usize = (MAX_BODY - 1 - 8 - 2) / (SERVICE_BYTES + 8);
/// Ranges one [`Body::Nack`] may carry.
pub const NACK_RANGES_PER_DATAGRAM: usize = (MAX_BODY - 2) / 12;

fn kind(body: &Body) -> u8 {
    match body {
        Body::Hello { .. } => KIND_HELLO,
        Body::Records(_) => KIND_RECORDS,
        Body::Forget(_) => KIND_FORGET,
        Body::Seen { .. } => KIND_SEEN,
        Body::Marks { .. } => KIND_MARKS,
        Body::Cleared { .. } => KIND_CLEARED,
        Body::Pull => KIND_PULL,
        Body::PullEnd { .. } => KIND_PULL_END,
        Body::Ack { .. } => KIND_ACK,
        Body::Stream { .. } => KIND_STREAM,
        Body::Nack { .. } => KIND_NACK,
        Body::Beacon { .. } => KIND_BEACON,
    }
}

fn put_digests(out: &mut Vec<u8>, digests: &[(ServiceKey, [u8; 8])]) {
    put_len(out, digests.len());
    for (service, digest) in digests {
        put_service(out, service);
        out.extend_from_slice(digest);
    }
}

fn put_body(out: &mut Vec<u8>, body: &Body) {
    match body {
        Body::Hello { ready, digests } => {
            out.push(*ready as u8);
            put_digests(out, digests);
        }
        Body::Beacon { ready, stream_high, digests } => {
            out.push(*ready as u8);
            out.extend_from_slice(&stream_high.to_be_bytes());
            put_digests(out, digests);
        }
        Body::Stream { n, body } => {
            assert!(body.is_change(), "only changes travel in a stream");
            out.extend_from_slice(&n.to_be_bytes());
            out.push(kind(body));
            put_body(out, body);
        }
        Body::Nack { ranges } => {
            put_len(out, ranges.len());
            for (first, count) in ranges {
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
        }
        Body::Records(records) => {
            put_len(out, records.len());
            for r in records {
                put_flow_key(out, &r.key);
                put_addr(out, Some(r.backend));
                out.extend_from_slice(&r.age_ms.to_be_bytes());
            }
        }
        Body::Forget(keys) => {
            put_len(out, keys.len());
            keys.iter().for_each(|k| put_flow_key(out, k));
        }
        Body::Seen { service, table_size, slots } => {
            put_service(out, service);
            out.extend_from_slice(&table_size.to_be_bytes());
            put_len(out, slots.len());
            for (slot, age) in slots {
                out.extend_from_slice(&slot.to_be_bytes());
                out.extend_from_slice(&age.to_be_bytes());
            }
        }
        Body::Marks { service, table_size, marks } | Body::Cleared { service, table_size, marks } => {
            put_service(out, service);
            out.extend_from_slice(&table_size.to_be_bytes());
            let mut addrs: Vec<IpAddr> = Vec::new();
            for a in marks.iter().flat_map(|m| [m.owner, m.prev]).flatten() {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
            assert!(addrs.len() <= MARK_ADDRS_MAX, "marks are cut by mark_chunks");
            out.push(addrs.len() as u8);
            addrs.iter().for_each(|a| put_addr(out, Some(*a)));
            let index = |a: Option<IpAddr>| a.and_then(|a| addrs.iter().position(|x| *x == a)).map_or(NO_ADDR, |i| i as u8);
            put_len(out, marks.len());
            for m in marks {
                out.extend_from_slice(&m.slot.to_be_bytes());
                out.push(index(m.owner));
                out.push(index(m.prev));
            }
        }
        Body::Pull => {}
        Body::PullEnd { records, marked_slots } => {
            out.extend_from_slice(&records.to_be_bytes());
            out.extend_from_slice(&marked_slots.to_be_bytes());
        }
        Body::Ack { seq } => out.extend_from_slice(&seq.to_be_bytes()),
    }
}

fn read_body(kind: u8, r: &mut Reader<'_>) -> Result<Body, WireError> {
    Ok(match kind {
        KIND_HELLO => {
            let ready = r.u8("hello")? != 0;
            Body::Hello { ready, digests: r.digests()? }
        }
        KIND_BEACON => {
            let ready = r.u8("beacon")? != 0;
            let stream_high = r.u64("beacon")?;
            Body::Beacon { ready, stream_high, digests: r.digests()? }
        }
        KIND_STREAM => {
            let n = r.u64("stream")?;
            let inner = r.u8("stream")?;
            if !matches!(inner, KIND_RECORDS | KIND_FORGET | KIND_SEEN | KIND_CLEARED) {
                return Err(WireError::Malformed("stream (not a change)"));
            }
            Body::Stream { n, body: Box::new(read_body(inner, r)?) }
        }
        KIND_NACK => {
            let n = r.u16("nack")? as usize;
            let mut ranges = Vec::with_capacity(n.min(NACK_RANGES_PER_DATAGRAM));
            for _ in 0..n {
                ranges.push((r.u64("nack")?, r.u32("nack")?));
            }
            Body::Nack { ranges }
        }
        KIND_RECORDS => {
            let n = r.u16("records")? as usize;
            let mut records = Vec::with_capacity(n.min(RECORDS_PER_DATAGRAM));
            for _ in 0..n {
                let key = r.flow_key()?;
                let backend = r.addr()?.ok_or(WireError::Malformed("record (no backend)"))?;
                records.push(WireRecord { key, backend, age_ms: r.u32("record")? });
            }
            Body::Records(records)
        }
        KIND_FORGET => {
            let n = r.u16("forget")? as usize;
            let mut keys = Vec::with_capacity(n.min(FORGETS_PER_DATAGRAM));
            for _ in 0..n {
                keys.push(r.flow_key()?);
            }
            Body::Forget(keys)
        }
        KIND_SEEN => {
            let service = r.service()?;
            let table_size = r.u32("seen")?;
            let n = r.u16("seen")? as usize;
            let mut slots = Vec::with_capacity(n.min(SEEN_PER_DATAGRAM));
            for _ in 0..n {
                slots.push((r.u32("seen")?, r.u32("seen")?));
            }
            Body::Seen { service, table_size, slots }
        }
        KIND_MARKS | KIND_CLEARED => {
            let service = r.service()?;
            let table_size = r.u32("marks")?;
            let naddr = r.u8("marks")? as usize;
            if naddr > MARK_ADDRS_MAX {
                return Err(WireError::Malformed("marks (addresses)"));
            }
            let mut addrs = Vec::with_capacity(naddr);
            for _ in 0..naddr {
                addrs.push(r.addr()?.ok_or(WireError::Malformed("marks (address)"))?);
            }
            let lookup = |i: u8| -> Result<Option<IpAddr>, WireError> {
                if i == NO_ADDR {
                    return Ok(None);
                }
                addrs.get(i as usize).copied().map(Some).ok_or(WireError::Malformed("mark (address index)"))
            };
            let n = r.u16("marks")? as usize;
            let mut marks = Vec::with_capacity(n.min(MARKS_PER_DATAGRAM));
            for _ in 0..n {
                let slot = r.u32("mark")?;
                let owner = lookup(r.u8("mark")?)?;
                let prev = lookup(r.u8("mark")?)?;
                marks.push(WireMark { slot, owner, prev });
            }
            if kind == KIND_MARKS { Body::Marks { service, table_size, marks } } else { Body::Cleared { service, table_size, marks } }
        }
        KIND_PULL => Body::Pull,
        KIND_PULL_END => Body::PullEnd { records: r.u64("pull end")?, marked_slots: r.u64("pull end")? },
        KIND_ACK => Body::Ack { seq: r.u64("ack")? },
        _ => return Err(WireError::Malformed("kind")),
    })
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u16::try_from(n).expect("bodies are split to fit a datagram").to_be_bytes());
}

fn put_service(out: &mut Vec<u8>, s: &ServiceKey) {
    out.push(match s.vip {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    });
    out.push(match s.protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    });
    out.extend_from_slice(&s.port.to_be_bytes());
    out.extend_from_slice(&addr16(s.vip));
}

fn put_addr(out: &mut Vec<u8>, a: Option<IpAddr>) {
    match a {
        None => out.extend_from_slice(&[0; ADDR_BYTES]),
        Some(a) => {
            out.push(if a.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 });
            out.extend_from_slice(&addr16(a));
        }
    }
}

fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The key's words and ports hold wire-order bytes in memory: sent as those bytes.
fn put_flow_key(out: &mut Vec<u8>, k: &FlowKey) {
    out.push(k.family);
    out.push(k.proto);
    out.extend_from_slice(&k.sport.to_ne_bytes());
    out.extend_from_slice(&k.dport.to_ne_bytes());
    k.src.iter().for_each(|w| out.extend_from_slice(&w.to_ne_bytes()));
    k.dst.iter().for_each(|w| out.extend_from_slice(&w.to_ne_bytes()));
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn ip(family: u8, b: [u8; 16], what: &'static str) -> Result<IpAddr, WireError> {
        match family {
            FAMILY_V4 if b[4..] == [0; 12] => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
            FAMILY_V6 => Ok(IpAddr::V6(Ipv6Addr::from(b))),
            _ => Err(WireError::Malformed(what)),
        }
    }

    fn digests(&mut self) -> Result<Vec<(ServiceKey, [u8; 8])>, WireError> {
        let n = self.u16("digests")? as usize;
        let mut digests = Vec::with_capacity(n.min(DIGESTS_PER_DATAGRAM));
        for _ in 0..n {
            digests.push((self.service()?, self.array::<8>("digest")?));
        }
        Ok(digests)
    }

    fn service(&mut self) -> Result<ServiceKey, WireError> {
        let family = self.u8("service")?;
        let protocol = match self.u8("service")? {
            PROTO_TCP => Protocol::Tcp,
            PROTO_UDP => Protocol::Udp,
            _ => return Err(WireError::Malformed("service protocol")),
        };
        let port = self.u16("service")?;
        let vip = Self::ip(family, self.array("service")?, "service address")?;
        Ok(ServiceKey { vip, port, protocol })
    }

    fn addr(&mut self) -> Result<Option<IpAddr>, WireError> {
        let family = self.u8("address")?;
        let b = self.array::<16>("address")?;
        if family == 0 {
            return if b == [0; 16] { Ok(None) } else { Err(WireError::Malformed("address")) };
        }
        Self::ip(family, b, "address").map(Some)
    }

    fn flow_key(&mut self) -> Result<FlowKey, WireError> {
        let family = self.u8("flow")?;
        let proto = self.u8("flow")?;
        if !matches!(family, FAMILY_V4 | FAMILY_V6) || !matches!(proto, PROTO_TCP | PROTO_UDP) {
            return Err(WireError::Malformed("flow"));
        }
        let sport = u16::from_ne_bytes(self.array("flow")?);
        let dport = u16::from_ne_bytes(self.array("flow")?);
        let mut src = [0u32; 4];
        let mut dst = [0u32; 4];
        for w in src.iter_mut().chain(dst.iter_mut()) {
            *w = u32::from_ne_bytes(self.array("flow")?);
        }
        Ok(FlowKey { src, dst, sport, dport, proto, family, _pad0: [0; 2] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new(&[7u8; 32]).unwrap()
    }

    fn to() -> SocketAddr {
        "10.0.0.3:7946".parse().unwrap()
    }

    fn web() -> ServiceKey {
        ServiceKey { vip: "10.0.0.100".parse().unwrap(), port: 7000, protocol: Protocol::Tcp }
    }

    fn flow(n: u16) -> FlowKey {
        FlowKey {
            src: [u32::from_ne_bytes([10, 9, 0, n as u8]), 0, 0, 0],
            dst: [u32::from_ne_bytes([10, 0, 0, 100]), 0, 0, 0],
            sport: (40000 + n).to_be(),
            dport: 7000u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad0: [0; 2],
        }
    }

    fn every_body() -> Vec<Body> {
        let v6: IpAddr = "fd00::11".parse().unwrap();
        vec![
            Body::Hello { ready: true, digests: vec![(web(), [1, 2, 3, 4, 5, 6, 7, 8])] },
            Body::Records(
                (0..RECORDS_PER_DATAGRAM as u16)
                    .map(|n| WireRecord { key: flow(n), backend: "10.0.0.11".parse().unwrap(), age_ms: n as u32 * 7 })
                    .collect(),
            ),
            Body::Forget((0..FORGETS_PER_DATAGRAM as u16).map(flow).collect()),
            Body::Seen { service: web(), table_size: 65537, slots: (0..SEEN_PER_DATAGRAM as u32).map(|s| (s, s * 3)).collect() },
            Body::Marks {
                service: ServiceKey { vip: "fd00::100".parse().unwrap(), port: 53, protocol: Protocol::Udp },
                table_size: 251,
                marks: (0..MARKS_PER_DATAGRAM as u32)
                    .map(|s| WireMark { slot: s, owner: Some(v6), prev: (s % 2 == 0).then_some(v6) })
                    .collect(),
            },
            Body::Cleared {
                service: web(),
                table_size: 65537,
                marks: vec![WireMark { slot: 9, owner: Some("10.0.0.12".parse().unwrap()), prev: Some("10.0.0.11".parse().unwrap()) }],
            },
            Body::Pull,
            Body::PullEnd { records: 12345, marked_slots: 99 },
            Body::Ack { seq: u64::MAX - 1 },
            Body::Beacon { ready: false, stream_high: 1 << 40, digests: vec![(web(), [8; 8]); DIGESTS_PER_DATAGRAM] },
            Body::Nack { ranges: (0..NACK_RANGES_PER_DATAGRAM as u64).map(|i| (i * 1000 + 1, i as u32 + 1)).collect() },
        ]
    }

    #[test]
    fn every_change_survives_the_round_trip_in_a_stream_and_fits_a_datagram() {
        for (i, body) in every_body().into_iter().filter(Body::is_change).enumerate() {
            let m = Message { sender: 5, seq: 9, body: Body::Stream { n: i as u64 + 1, body: Box::new(body) } };
            let bytes = encode(&key(), to(), &m);
            assert!(bytes.len() <= MAX_DATAGRAM, "{:?} takes {} bytes", m.body, bytes.len());
            assert_eq!(decode(&key(), to(), &bytes).unwrap(), m);
        }
    }

    #[test]
    fn a_stream_holding_anything_but_a_change_is_refused() {
        // Built by hand: the encoder refuses to write one.
        for inner in [KIND_HELLO, KIND_PULL, KIND_ACK, KIND_STREAM, KIND_MARKS, KIND_PULL_END] {
            let mut out = encode(&key(), to(), &Message { sender: 1, seq: 1, body: Body::Pull });
            out.truncate(out.len() - TAG);
            out[5] = KIND_STREAM;
            out.extend_from_slice(&7u64.to_be_bytes());
            out.push(inner);
            out.extend_from_slice(&[0; 16]);
            let mut mac = mac_for(&key(), to());
            mac.update(&out);
            out.extend_from_slice(&mac.finalize().into_bytes());
            assert_eq!(decode(&key(), to(), &out), Err(WireError::Malformed("stream (not a change)")), "inner kind {inner}");
        }
    }

    #[test]
    fn every_message_survives_the_round_trip_and_fits_a_datagram() {
        for (i, body) in every_body().into_iter().enumerate() {
            let m = Message { sender: 1_700_000_000_000_000_000, seq: i as u64 + 1, body };
            let bytes = encode(&key(), to(), &m);
            assert!(bytes.len() <= MAX_DATAGRAM, "{:?} takes {} bytes", m.body, bytes.len());
            assert_eq!(decode(&key(), to(), &bytes).unwrap(), m);
        }
    }

    #[test]
    fn marks_are_cut_to_fit_whatever_addresses_they_name() {
        let a = |n: u8| Some(IpAddr::from([10, 0, 0, n]));
        // Many masters: each datagram names at most MARK_ADDRS_MAX of them.
        let marks: Vec<WireMark> = (0..2000u32).map(|s| WireMark { slot: s, owner: a((s % 40) as u8), prev: a(200) }).collect();
        let chunks = mark_chunks(&marks);
        assert_eq!(chunks.concat(), marks);
        for c in &chunks {
            let m = Message { sender: 1, seq: 1, body: Body::Marks { service: web(), table_size: 65537, marks: c.clone() } };
            let bytes = encode(&key(), to(), &m);
            assert!(bytes.len() <= MAX_DATAGRAM);
            assert_eq!(decode(&key(), to(), &bytes).unwrap(), m);
        }
        // The common case (a drain: few masters) packs a datagram full.
        let few: Vec<WireMark> = (0..1000u32).map(|s| WireMark { slot: s, owner: a((s % 3) as u8), prev: a(9) }).collect();
        assert_eq!(mark_chunks(&few)[0].len(), MARKS_PER_DATAGRAM);
        const { assert!(MARKS_PER_DATAGRAM > 150) };
    }

    #[test]
    fn a_datagram_signed_with_another_key_or_altered_is_refused() {
        let m = Message { sender: 1, seq: 2, body: Body::Records(vec![WireRecord { key: flow(1), backend: "10.0.0.11".parse().unwrap(), age_ms: 5 }]) };
        let bytes = encode(&key(), to(), &m);
        let other = Key::new(&[8u8; 32]).unwrap();
        assert_eq!(decode(&other, to(), &bytes), Err(WireError::BadTag));
        // Every single flipped bit is caught: in the header, the body or the tag.
        for i in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[i] ^= 0x10;
            assert!(decode(&key(), to(), &altered).is_err(), "a flip at byte {i} was accepted");
        }
        assert_eq!(decode(&key(), to(), &bytes[..20]), Err(WireError::Short));
        // Signed for one director: refused by another (a replay across a group of three).
        assert_eq!(decode(&key(), "10.0.0.4:7946".parse().unwrap(), &bytes), Err(WireError::BadTag));
        assert!(Key::new(&[1u8; 31]).is_none(), "a key shorter than 256 bits");
    }

    #[test]
    fn a_signed_but_malformed_body_is_refused_not_misread() {
        // Signed with the right key, but a record with an unknown protocol and then garbage.
        let mut m = encode(&key(), to(), &Message { sender: 1, seq: 1, body: Body::Forget(vec![flow(1)]) });
        let body_at = HEADER + 2;
        m[body_at + 1] = 99; // proto
        let len = m.len();
        let mut signed = m[..len - TAG].to_vec();
        let mut mac = mac_for(&key(), to());
        mac.update(&signed);
        signed.extend_from_slice(&mac.finalize().into_bytes());
        assert_eq!(decode(&key(), to(), &signed), Err(WireError::Malformed("flow")));
    }
}
