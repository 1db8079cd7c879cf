//! The file as written: what serde reads before any rule is checked.
//!
//! Values whose rules we check ourselves (addresses, names of modes, numbers with ranges) are
//! read as plain strings and `i64`, so that a bad value becomes a problem naming its key,
//! collected with all the others, instead of a parse error that stops at the first one.
//! Unknown keys are still refused by serde, which names them and their line.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub interface: String,
    pub xdp_mode: Option<String>,
    pub pin_dir: Option<String>,
    pub flow_table_size: Option<i64>,
    pub max_services: Option<i64>,
    pub tcp_idle_timeout_s: Option<i64>,
    pub udp_idle_timeout_s: Option<i64>,
    pub control_socket: Option<String>,
    pub metrics_listen: Option<String>,
    #[serde(default, rename = "service")]
    pub services: Vec<RawService>,
    pub sync: Option<RawSync>,
    pub announce: Option<RawAnnounce>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAnnounce {
    pub table: i64,
    pub protocol: Option<i64>,
    pub withdraw_wait_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSync {
    pub listen: String,
    #[serde(default)]
    pub peers: Vec<String>,
    pub key_file: String,
    pub pull_timeout_s: Option<i64>,
    pub group: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub name: String,
    pub vip: String,
    pub port: i64,
    pub protocol: Option<String>,
    pub scheduler: Option<String>,
    pub table_size: Option<i64>,
    pub slow_start_s: Option<i64>,
    pub health: Option<RawHealth>,
    pub flap_damping: Option<RawFlapDamping>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackend {
    pub address: String,
    pub mac: Option<String>,
    pub weight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub check: Option<String>,
    pub interval_ms: Option<i64>,
    pub timeout_ms: Option<i64>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
    pub port: Option<i64>,
    pub path: Option<String>,
    pub expect_status: Option<i64>,
    pub expect_body: Option<String>,
    pub command: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFlapDamping {
    pub max_changes: Option<i64>,
    pub window_s: Option<i64>,
    pub hold_s: Option<i64>,
}
