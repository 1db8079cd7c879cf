//! The http check: `GET path` over plain HTTP/1.1 answers the expected status, and the expected
//! text if one is set.

use std::{net::SocketAddr, pin::pin, time::Duration};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::{
    Request,
    body::Incoming,
    header::{CONNECTION, HOST},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::probe::{describe_chain, describe_io, within};

/// How much of a body is searched for the expected text: health pages are small, and a
/// backend streaming an endless body must not keep the check busy.
pub(super) const BODY_LIMIT: usize = 64 * 1024;

/// What a healthy answer looks like.
pub(super) struct Expect<'a> {
    pub status: u16,
    /// Text the body contains (in its first `BODY_LIMIT` bytes).
    pub body: Option<&'a str>,
}

/// `Err` is the failure's detail.
pub(super) async fn check(
    addr: SocketAddr,
    path: &str,
    expect: &Expect<'_>,
    timeout: Duration,
) -> Result<String, String> {
    within(timeout, exchange(addr, path, expect)).await?
}

async fn exchange(addr: SocketAddr, path: &str, expect: &Expect<'_>) -> Result<String, String> {
    let request = Request::get(path)
        .header(HOST, addr.to_string())
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build a request for {path:?}: {e}"))?;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| describe_io(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| describe_chain(&e))?;

    // The connection future moves the bytes for the request and the response body; it has
    // to be polled alongside them, in this task so that a timeout drops both together.
    let mut connection = pin!(connection);
    let mut connection_done = false;
    let mut answer = pin!(async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| describe_chain(&e))?;
        judge(response, expect).await
    });
    loop {
        tokio::select! {
            result = &mut answer => return result,
            // Its errors also reach `send_request` or the body, which word them in context.
            _ = &mut connection, if !connection_done => connection_done = true,
        }
    }
}

async fn judge(response: hyper::Response<Incoming>, expect: &Expect<'_>) -> Result<String, String> {
    let status = response.status().as_u16();
    if status != expect.status {
        return Err(format!("HTTP {status} (expected {})", expect.status));
    }
    let Some(needle) = expect.body else {
        return Ok(format!("HTTP {status}"));
    };
    let (body, complete) = read_body(response.into_body()).await?;
    if contains(&body, needle.as_bytes()) {
        Ok(format!("HTTP {status}, body has {needle:?}"))
    } else if complete {
        Err(format!("body lacks {needle:?}"))
    } else {
        Err(format!(
            "body lacks {needle:?} in its first {} KiB",
            BODY_LIMIT / 1024
        ))
    }
}

/// Reads up to `BODY_LIMIT` bytes; `true` with them if that was the whole body.
async fn read_body(mut body: Incoming) -> Result<(BytesMut, bool), String> {
    let mut data = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the body: {}", describe_chain(&e)))?;
        if let Some(chunk) = frame.data_ref() {
            let room = BODY_LIMIT - data.len();
            if chunk.len() > room {
                data.extend_from_slice(&chunk[..room]);
                return Ok((data, false));
            }
            data.extend_from_slice(chunk);
        }
    }
    Ok((data, true))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::test_support::{Server, closed_port, response};

    const TIMEOUT: Duration = Duration::from_secs(2);

    const OK_BODY: Expect<'static> = Expect {
        status: 200,
        body: Some("ok"),
    };

    #[tokio::test]
    async fn the_expected_status_and_body_pass() {
        let server = Server::start("127.0.0.1:0", response("200 OK", "all ok\n")).await;
        let result = check(server.addr, "/health?full=1", &OK_BODY, TIMEOUT).await;
        assert_eq!(result, Ok("HTTP 200, body has \"ok\"".to_owned()));

        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        let head = requests[0].to_ascii_lowercase();
        assert!(
            head.starts_with("get /health?full=1 http/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nhost: {}\r\n", server.addr)),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    }

    #[tokio::test]
    async fn ipv6_hosts_are_bracketed() {
        let server = Server::start("[::1]:0", response("200 OK", "")).await;
        let expect = Expect {
            status: 200,
            body: None,
        };
        assert_eq!(
            check(server.addr, "/", &expect, TIMEOUT).await,
            Ok("HTTP 200".to_owned())
        );
        let head = server.requests()[0].to_ascii_lowercase();
        assert!(
            head.contains(&format!("\r\nhost: [::1]:{}\r\n", server.addr.port())),
            "{head}"
        );
    }

    #[tokio::test]
    async fn another_status_fails() {
        let server = Server::start("127.0.0.1:0", response("503 Service Unavailable", "ok")).await;
        let result = check(server.addr, "/", &OK_BODY, TIMEOUT).await;
        assert_eq!(result, Err("HTTP 503 (expected 200)".to_owned()));
    }

    #[tokio::test]
    async fn an_unusual_expected_status_is_honoured() {
        let server = Server::start("127.0.0.1:0", response("204 No Content", "")).await;
        let expect = Expect {
            status: 204,
            body: None,
        };
        assert_eq!(
            check(server.addr, "/", &expect, TIMEOUT).await,
            Ok("HTTP 204".to_owned())
        );
        let expect = Expect {
            status: 200,
            body: None,
        };
        let result = check(server.addr, "/", &expect, TIMEOUT).await;
        assert_eq!(result, Err("HTTP 204 (expected 200)".to_owned()));
    }

    #[tokio::test]
    async fn a_body_without_the_text_fails() {
        let server = Server::start("127.0.0.1:0", response("200 OK", "degraded")).await;
        let result = check(server.addr, "/", &OK_BODY, TIMEOUT).await;
        assert_eq!(result, Err("body lacks \"ok\"".to_owned()));
    }

    #[tokio::test]
    async fn only_the_first_64_kib_of_a_body_are_searched() {
        let late = format!("{}ok", "x".repeat(BODY_LIMIT));
        let server = Server::start("127.0.0.1:0", response("200 OK", &late)).await;
        let result = check(server.addr, "/", &OK_BODY, TIMEOUT).await;
        assert_eq!(
            result,
            Err("body lacks \"ok\" in its first 64 KiB".to_owned())
        );

        let early = format!("{}ok", "x".repeat(BODY_LIMIT - 2));
        let server = Server::start("127.0.0.1:0", response("200 OK", &early)).await;
        assert!(check(server.addr, "/", &OK_BODY, TIMEOUT).await.is_ok());
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_cut_at_the_timeout() {
        let server = Server::start("127.0.0.1:0", None).await;
        let timeout = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let result = check(server.addr, "/", &OK_BODY, timeout).await;
        let took = start.elapsed();
        assert_eq!(result, Err("timed out after 300 ms".to_owned()));
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "{took:?}"
        );
        // It did get as far as sending the request.
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let addr = closed_port("127.0.0.1").await;
        let result = check(addr, "/", &OK_BODY, TIMEOUT).await;
        assert_eq!(result, Err("connection refused".to_owned()));
    }

    #[tokio::test]
    async fn a_connection_closed_without_an_answer_fails_and_says_so() {
        let server = Server::start("127.0.0.1:0", Some(Vec::new())).await;
        let result = check(server.addr, "/", &OK_BODY, TIMEOUT).await;
        let detail = result.unwrap_err();
        assert!(detail.contains("closed"), "{detail}");
    }

    #[tokio::test]
    async fn garbage_instead_of_http_fails() {
        let server = Server::start("127.0.0.1:0", Some(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec())).await;
        let result = check(server.addr, "/", &OK_BODY, TIMEOUT).await;
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn contains_finds_text_anywhere() {
        assert!(contains(b"status: ok", b"ok"));
        assert!(contains(b"ok", b"ok"));
        assert!(!contains(b"o", b"ok"));
        assert!(contains(b"anything", b""));
    }
}
