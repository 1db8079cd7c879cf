//! Placeholder with the agreed interface; replaced by the health branch.
use std::{fmt, net::IpAddr, time::Duration};

use crate::config::{HealthCheck, ServiceKey};

pub struct Target { pub service: ServiceKey, pub address: IpAddr, pub port: u16, pub check: HealthCheck }
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict { Up, Down }
#[derive(Clone, Debug)]
pub struct CheckOutcome { pub ok: bool, pub latency: Duration, pub detail: String }
#[derive(Clone, Debug)]
pub struct Report { pub service: ServiceKey, pub address: IpAddr, pub check: &'static str, pub outcome: CheckOutcome, pub verdict: Verdict, pub transition: bool, pub streak: u32 }
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { write!(f, "{} check of {}: {}", self.check, self.address, self.outcome.detail) }
}
pub struct HealthChecker;
impl HealthChecker {
    pub fn new(_reports: tokio::sync::mpsc::Sender<Report>) -> Self { HealthChecker }
    pub fn set_targets(&mut self, _targets: Vec<(Target, Verdict)>) {}
    pub fn shutdown(&mut self) {}
}
