//! Helpers shared by the tests of the checkers and of the checker loop.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpListener;

/// A loopback address (`ip` is "127.0.0.1" or "::1") nothing listens on: bound, then closed
/// again, so that connecting is refused at once.
pub(crate) async fn closed_port(ip: &str) -> SocketAddr {
    let ip: IpAddr = ip.parse().expect("a loopback address");
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("binding loopback");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}
