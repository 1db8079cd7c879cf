//! Messages on the control socket. Each is one line of JSON; the field names are a stable
//! interface (scripts use `mim-lb status --json`, which prints `Response::status`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::status::{Simulation, Status};

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// The services, backends, states and counters.
    Status,
    /// No new flows for the backend; its established flows stay.
    Drain { service: String, backend: IpAddr },
    /// Undo drain or disable.
    Enable { service: String, backend: IpAddr },
    /// Take the backend out: its flows move to other masters.
    Disable { service: String, backend: IpAddr },
    /// Re-read the configuration file and apply the difference.
    Reload,
    /// Where a flow would go now, by running the live program on a synthetic packet.
    Simulate { flow: String },
    /// Whether this director may take the VIP: program attached, tables written, the peers'
    /// flow state pulled. `ok` true when ready, else `error` says what it waits for.
    Ready,
    /// Remove this director's VIP routes (`[announce]`), so the router stops sending it new
    /// traffic; it keeps forwarding what still arrives.
    Withdraw,
    /// Undo `withdraw`: announce again whatever the director can serve.
    Announce,
}

/// The answer. `ok` false comes with `error`; otherwise the field that fits the request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A sentence for the operator (what a command changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulation: Option<Simulation>,
}

impl Response {
    pub fn message(text: impl Into<String>) -> Response {
        Response { ok: true, message: Some(text.into()), ..Default::default() }
    }

    pub fn error(text: impl Into<String>) -> Response {
        Response { ok: false, error: Some(text.into()), ..Default::default() }
    }
}

/// Longest request line the server reads; anything longer is refused.
pub const MAX_REQUEST: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let drain = Request::Drain { service: "10.0.0.100:7000".into(), backend: "10.0.0.11".parse().unwrap() };
        assert_eq!(
            serde_json::to_string(&drain).unwrap(),
            r#"{"command":"drain","service":"10.0.0.100:7000","backend":"10.0.0.11"}"#
        );
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"command":"status"}"#);
        let back: Request = serde_json::from_str(r#"{"command":"simulate","flow":"10.0.0.1:4000-10.0.0.100:7000/tcp"}"#).unwrap();
        assert_eq!(back, Request::Simulate { flow: "10.0.0.1:4000-10.0.0.100:7000/tcp".into() });
        assert!(serde_json::from_str::<Request>(r#"{"command":"format-disk"}"#).is_err());
        assert_eq!(serde_json::to_string(&Request::Ready).unwrap(), r#"{"command":"ready"}"#);
        assert_eq!(serde_json::to_string(&Request::Withdraw).unwrap(), r#"{"command":"withdraw"}"#);
        assert_eq!(serde_json::to_string(&Request::Announce).unwrap(), r#"{"command":"announce"}"#);
    }

    #[test]
    fn responses_omit_what_they_do_not_carry() {
        assert_eq!(serde_json::to_string(&Response::error("no")).unwrap(), r#"{"ok":false,"error":"no"}"#);
        assert_eq!(serde_json::to_string(&Response::message("done")).unwrap(), r#"{"ok":true,"message":"done"}"#);
    }
}
