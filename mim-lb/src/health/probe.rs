//! One check of one target: picks the checker for the kind, times it, and turns its result into
//! a [`CheckOutcome`]. Also the wording shared by the checkers.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::time::Instant;

use super::{CheckOutcome, Target, command, format_duration, http, tcp};
use crate::config::{CheckKind, ServiceKey};

/// Everything one check needs, fixed when the target's checks start.
#[derive(Clone, Debug)]
pub(super) struct Probe {
    pub service: ServiceKey,
    pub address: IpAddr,
    pub port: u16,
    pub kind: CheckKind,
    pub timeout: Duration,
}

impl Probe {
    /// `None` for targets that are not checked.
    pub fn for_target(target: &Target) -> Option<Probe> {
        if target.check.kind == CheckKind::None {
            return None;
        }
        Some(Probe {
            service: target.service,
            address: target.address,
            port: target.check_port(),
            kind: target.check.kind.clone(),
            timeout: target.check.timeout,
        })
    }

    /// Runs one check; it ends by `timeout` (plus the time to clean up a command).
    pub async fn run(&self) -> CheckOutcome {
        let start = Instant::now();
        let addr = SocketAddr::new(self.address, self.port);
        let result = match &self.kind {
            // Filtered out by `for_target`; answering rather than panicking keeps it harmless.
            CheckKind::None => Ok("not checked".to_owned()),
            CheckKind::Tcp => tcp::check(addr, self.timeout).await,
            CheckKind::Http {
                path,
                expect_status,
                expect_body,
            } => {
                let expect = http::Expect {
                    status: *expect_status,
                    body: expect_body.as_deref(),
                };
                http::check(addr, path, &expect, self.timeout).await
            }
            CheckKind::Command { argv } => {
                let backend = command::Backend {
                    address: self.address,
                    port: self.port,
                    service: self.service,
                };
                command::check(argv, &backend, self.timeout).await
            }
        };
        let latency = start.elapsed();
        match result {
            Ok(detail) => CheckOutcome {
                ok: true,
                latency,
                detail,
            },
            Err(detail) => CheckOutcome {
                ok: false,
                latency,
                detail,
            },
        }
    }
}

/// Runs `work` for at most `timeout`; the error is the detail of a timed-out check.
pub(super) async fn within<T>(
    timeout: Duration,
    work: impl Future<Output = T>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| timed_out(timeout))
}

pub(super) fn timed_out(timeout: Duration) -> String {
    format!("timed out after {}", format_duration(timeout))
}

/// "connection refused" rather than "Connection refused (os error 111)": details end up in
/// the middle of log lines, where the errno number only adds noise.
pub(super) fn describe_io(err: &io::Error) -> String {
    let text = err.to_string();
    if err.raw_os_error().is_none() {
        return text;
    }
    let text = match text.rfind(" (os error ") {
        Some(end) => &text[..end],
        None => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// An error and its causes, "outer: inner: innermost", with OS errors worded as above.
pub(super) fn describe_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let part = match e.downcast_ref::<io::Error>() {
            Some(io_err) => describe_io(io_err),
            None => e.to_string(),
        };
        // Wrappers often repeat their cause's text; saying it twice helps no one.
        if parts.last() != Some(&part) {
            parts.push(part);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_lose_their_number_and_capital() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(describe_io(&refused), "connection refused");
        let missing = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(describe_io(&missing), "no such file or directory");
    }

    #[test]
    fn other_errors_keep_their_text() {
        let custom = io::Error::other("Something Odd");
        assert_eq!(describe_io(&custom), "Something Odd");
    }

    #[test]
    fn chains_name_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("request failed")]
        struct Outer(#[source] io::Error);
        let err = Outer(io::Error::from_raw_os_error(libc::ECONNRESET));
        assert_eq!(
            describe_chain(&err),
            "request failed: connection reset by peer"
        );
    }
}
