//! Flow sync: directors tell each other the flows that identical Maglev tables cannot
//! reproduce, so that a flow survives the move to another director (a VRRP failover, an ECMP
//! change). `wire` is the datagram, `engine` the protocol; the daemon does the I/O and applies
//! what arrives through the director (`director::shared`).

pub mod engine;
pub mod multicast;
pub mod runner;
pub mod wire;
