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
    #[serde(default, rename = "service")]
    pub services: Vec<RawService>,
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
