//! The connections each master holds, in the spirit of `ipvsadm -Ln`'s ActiveConn and
//! InActConn. A status call or a scrape reads no table: the counts come from reads the daemon
//! makes anyway, on their own schedule.
//!
//! - Active TCP connections: the data path notes every TCP packet it forwards in the master's
//!   active-connection sketch (`ACTIVE_SKETCH`, HyperLogLog registers, one write only when a
//!   register grows), in one of seven generations. Every second ([`SKETCH_FLIP`]) the daemon
//!   moves the data path to the next generation and estimates, per master, the distinct
//!   connections that sent a packet in the six complete ones, the last 6 s (holding [`ACTIVE_WINDOW`])
//!   ([`estimate`]). This counts every connection, recorded or not, whichever slot
//!   it is on: exactly zero when none sent a packet, within about 13% beyond (a few
//!   connections below a hundred).
//! - UDP flows (active while alive) and inactive TCP connections (recorded, idle longer than
//!   the window, not yet expired) come from a read of the connection table
//!   ([`count_records`]). A TCP connection that has no record (it is on a slot that kept its
//!   master) and is idle is not seen at all: it is neither active nor inactive.

use std::{collections::HashMap, time::Duration};

use mim_lb_common::{
    FlowEntry, FlowKey, PROTO_TCP,
    limits::{SKETCH_GENERATIONS, SKETCH_REGISTERS},
};

use super::{Director, DirectorError, sweep::is_live};

/// A TCP connection that sent a packet within the last window counts as active; a recorded
/// one whose last packet is older (plus the data path's refresh slack) as inactive. Several
/// times the data path's once-a-second refresh of a record, so a connection exchanging a
/// packet every second or two is active.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(5);

/// How long after the start of a read that took `read_took` the next read for the counts
/// begins: ten times the read, so the reading thread is busy a tenth of the time at most
/// (a third of a second for a million flows: counts every 3.5 s), and between one second
/// (small tables) and 30 s.
pub fn next_count_in(read_took: Duration) -> Duration {
    (read_took * 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// What one master holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub active: u64,
    pub inactive: u64,
}

/// Counts of a read of the connection table, by backend id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldCounts {
    /// When the read began (`CLOCK_MONOTONIC` ns): the counts speak for that moment.
    pub read_ns: u64,
    pub by_backend: HashMap<u32, Held>,
}

/// Counts the recorded flows of a read begun at `read_ns`, by the backend each names: UDP
/// flows alive (active) and TCP flows idle longer than the window but not expired (inactive).
/// Active TCP connections are the sketch's ([`Director::rotate_active_sketch`]). Pure: the
/// daemon runs it on the reading thread, so the event loop never walks the table for it.
pub fn count_records(flows: &[(FlowKey, FlowEntry)], read_ns: u64, tcp_idle: Duration, udp_idle: Duration) -> HeldCounts {
    let mut by_backend: HashMap<u32, Held> = HashMap::new();
    for (key, flow) in flows {
        let tcp = key.proto == PROTO_TCP;
        let idle = if tcp { tcp_idle } else { udp_idle };
        if !is_live(flow, 0, read_ns, idle) {
            continue;
        }
        let held = by_backend.entry(flow.backend_id).or_default();
        if !tcp {
            held.active += 1;
        } else if !is_live(flow, 0, read_ns, ACTIVE_WINDOW) {
            held.inactive += 1;
        }
    }
    HeldCounts { read_ns, by_backend }
}

/// HyperLogLog's estimate of the distinct flows noted in `registers` (Flajolet et al. 2007,
/// with its small-range correction, linear counting, which is what keeps small counts close
/// and zero exact).
pub fn estimate(registers: &[u8; SKETCH_REGISTERS]) -> u64 {
    let m = SKETCH_REGISTERS as f64;
    let zeros = registers.iter().filter(|r| **r == 0).count();
    if zeros == SKETCH_REGISTERS {
        return 0;
    }
    // alpha_64 = 0.709.
    let raw = 0.709 * m * m / registers.iter().map(|r| (-f64::from(*r)).exp2()).sum::<f64>();
    let e = if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw };
    e.round().max(1.0) as u64
}

/// `counts` with the active TCP connections of the sketch added.
pub fn with_tcp_active(counts: &HeldCounts, tcp_active: &HashMap<u32, u64>) -> HeldCounts {
    let mut combined = counts.clone();
    for (id, n) in tcp_active {
        combined.by_backend.entry(*id).or_default().active += n;
    }
    combined
}

/// How often the sketch moves to its next generation: each count covers the
/// `SKETCH_GENERATIONS - 1` complete generations, which hold the last [`ACTIVE_WINDOW`].
pub const SKETCH_FLIP: Duration = Duration::from_secs(1);

impl Director {
    /// Moves the active-connection sketch to its next generation (zeroed first, so each speaks
    /// only for its own second) and estimates, for every backend in use, the TCP connections
    /// that sent a packet in the complete generations: the last [`ACTIVE_WINDOW`].
    pub fn rotate_active_sketch(&mut self) -> Result<HashMap<u32, u64>, DirectorError> {
        let ids: Vec<u32> = self.dataplane.maps_ro().backends()?.into_iter().map(|(id, _)| id).collect();
        let next = (self.dataplane.maps_ro().sketch_gen()? + 1) % SKETCH_GENERATIONS;
        let mut maps = self.dataplane.maps();
        for id in &ids {
            maps.clear_active_sketch(next, *id)?;
        }
        maps.set_sketch_gen(next)?;
        let ro = self.dataplane.maps_ro();
        ids.into_iter()
            .map(|id| {
                let mut union = [0u8; SKETCH_REGISTERS];
                for generation in (0..SKETCH_GENERATIONS).filter(|g| *g != next) {
                    for (u, r) in union.iter_mut().zip(ro.active_sketch(generation, id)?.registers) {
                        *u = (*u).max(r);
                    }
                }
                Ok((id, estimate(&union)))
            })
            .collect()
    }

    /// Zeroes every generation of the sketch of every backend in use: after a start, what
    /// they hold is of an unknown time.
    pub fn clear_active_sketches(&mut self) -> Result<(), DirectorError> {
        let ids: Vec<u32> = self.dataplane.maps_ro().backends()?.into_iter().map(|(id, _)| id).collect();
        let mut maps = self.dataplane.maps();
        for generation in 0..SKETCH_GENERATIONS {
            for id in &ids {
                maps.clear_active_sketch(generation, *id)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use mim_lb_common::{PROTO_UDP, hash};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(proto: u8, backend_id: u32, last_seen_ns: u64) -> (FlowKey, FlowEntry) {
        let key = FlowKey { proto, ..FlowKey::default() };
        (key, FlowEntry { backend_id, service_id: 0, slot: 0, flags: 0, last_seen_ns })
    }

    #[test]
    fn udp_flows_are_active_while_alive_tcp_records_inactive_when_idle_and_gone_when_expired() {
        let idle = Duration::from_secs(100);
        let flows = [
            flow(PROTO_TCP, 1, 1000 * S),      // seen now
            flow(PROTO_TCP, 1, 994 * S),       // within the window and the refresh slack
            flow(PROTO_TCP, 1, 990 * S),       // idle
            flow(PROTO_TCP, 1, 800 * S),       // expired
            flow(PROTO_UDP, 2, 950 * S),       // UDP: alive is active
            flow(PROTO_UDP, 2, 800 * S),       // expired
        ];
        let counts = count_records(&flows, 1000 * S, idle, idle);
        // Active TCP connections are the sketch's: a recent record adds nothing here.
        assert_eq!(counts.by_backend[&1], Held { active: 0, inactive: 1 });
        assert_eq!(counts.by_backend[&2], Held { active: 1, inactive: 0 });
        assert_eq!(counts.read_ns, 1000 * S);
    }

    /// The estimate against the truth: exact at zero and one, close for small counts, within
    /// three standard errors (3 x 13%) for large ones, over flows hashed as the data path
    /// hashes them.
    #[test]
    fn the_estimate_is_exact_at_zero_and_close_beyond() {
        let sketch_of = |n: u32| {
            let mut r = [0u8; SKETCH_REGISTERS];
            for i in 0..n {
                let flow = hash::flow_hash(4, &[0x0a00_0001 + i, 0, 0, 0], &[0x0a00_0064, 0, 0, 0], (i as u16).wrapping_add(1024), 7000, 6);
                let (index, rank) = hash::sketch_register(flow);
                r[index as usize] = r[index as usize].max(rank);
            }
            r
        };
        assert_eq!(estimate(&sketch_of(0)), 0);
        assert_eq!(estimate(&sketch_of(1)), 1);
        for n in [3u32, 10, 30] {
            let e = estimate(&sketch_of(n)) as f64;
            assert!((e - f64::from(n)).abs() <= (f64::from(n) * 0.2).max(1.0), "{n} flows estimated {e}");
        }
        for n in [300u32, 3000, 100_000] {
            let e = estimate(&sketch_of(n)) as f64;
            assert!((e / f64::from(n) - 1.0).abs() < 0.39, "{n} flows estimated {e}");
        }
        // Repeats of a flow are one flow.
        let mut r = sketch_of(5);
        let again = sketch_of(5);
        for (a, b) in r.iter_mut().zip(again) {
            *a = (*a).max(b);
        }
        assert_eq!(estimate(&r), estimate(&sketch_of(5)));
    }

    #[test]
    fn counting_reads_keep_the_reading_thread_busy_a_tenth_of_the_time_within_bounds() {
        assert_eq!(next_count_in(Duration::from_millis(3)), Duration::from_secs(1));
        assert_eq!(next_count_in(Duration::from_millis(350)), Duration::from_millis(3500));
        assert_eq!(next_count_in(Duration::from_secs(10)), Duration::from_secs(30));
    }
}
