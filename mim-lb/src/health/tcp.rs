//! The tcp check: the backend accepts a connection.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use super::probe::{describe_io, within};

/// Connects to `addr` and closes again; `Err` is the failure's detail.
pub(super) async fn check(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let stream = within(timeout, TcpStream::connect(addr))
        .await?
        .map_err(|e| describe_io(&e))?;
    // An orderly close (FIN) rather than a reset: backends should not log an error per check.
    drop(stream);
    Ok("connected".to_owned())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use tokio::net::TcpListener;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn a_listening_port_is_reachable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(check(addr, TIMEOUT).await, Ok("connected".to_owned()));
        // The check really connected: the connection is waiting to be accepted.
        let accepted = tokio::time::timeout(TIMEOUT, listener.accept()).await;
        assert!(matches!(accepted, Ok(Ok(_))), "{accepted:?}");
    }

    #[tokio::test]
    async fn ipv6_loopback_works_too() {
        let listener = TcpListener::bind("[::1]:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(addr.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(check(addr, TIMEOUT).await, Ok("connected".to_owned()));
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let addr = crate::health::test_support::closed_port("127.0.0.1").await;
        assert_eq!(
            check(addr, TIMEOUT).await,
            Err("connection refused".to_owned())
        );
    }
}
