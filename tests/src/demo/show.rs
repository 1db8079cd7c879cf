//! The live part of the demo: while traffic flows, take in finished requests, ask mim-lb for
//! its status several times a second, and show both; wait for mim-lb to change a master's
//! state; tell what happens as events.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use mim_lb::status::{BackendStatus, Status};

use super::signals;
use super::tally::Tally;
use super::traffic::Traffic;
use super::view::{Frame, LiveView, MasterRow};
use crate::gateway::Gateway;

/// How often the live view and mim-lb's status are refreshed.
pub const TICK: Duration = Duration::from_millis(50);
/// How long mim-lb may take to mark a master down or up before the demo says it did not.
pub const STATE_CHANGE_LIMIT: Duration = Duration::from_secs(10);

/// Traffic on screen, with what mim-lb says about each master.
pub struct Show<'a> {
    pub gateway: &'a Gateway,
    pub traffic: Traffic,
    pub tally: Tally,
    pub view: Box<dyn LiveView>,
    pub rate: u32,
    /// When the traffic started: the live view's clock.
    pub t0: Instant,
    /// The masters' names and addresses (to find them in mim-lb's status).
    pub names: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// The master whose service the story kills.
    pub killed: usize,
}

impl Show<'_> {
    /// Takes in finished requests, asks mim-lb for its status, and redraws.
    pub fn tick(&mut self) -> Result<Status> {
        signals::check()?;
        for outcome in self.traffic.finished() {
            self.tally.record(&outcome);
        }
        let status = self.gateway.query_status().context("asking mim-lb for its status")?;
        let frame = self.frame(&status, Instant::now());
        self.view.frame(&frame);
        Ok(status)
    }

    pub fn backend<'s>(&self, status: &'s Status, master: usize) -> Option<&'s BackendStatus> {
        status.services.iter().flat_map(|s| &s.backends).find(|b| b.address == self.addresses[master])
    }

    pub fn state(&self, status: &Status, master: usize) -> String {
        self.backend(status, master).map_or_else(|| "?".to_owned(), |b| b.state.clone())
    }

    pub fn frame(&self, status: &Status, now: Instant) -> Frame {
        let total = self.tally.counts(self.t0, None);
        let last = self.tally.last_second(now);
        Frame {
            elapsed: now - self.t0,
            rate: self.rate,
            requests: total.requests,
            failed: total.failed,
            last_second_requests: last.requests,
            last_second_failed: last.failed,
            masters: (0..self.names.len())
                .map(|k| MasterRow {
                    name: self.names[k].clone(),
                    address: self.addresses[k].to_string(),
                    state: self.state(status, k),
                    total: total.per_master[k],
                    last_second: last.per_master[k],
                })
                .collect(),
        }
    }

    /// Shows traffic for `duration`.
    pub fn run_for(&mut self, duration: Duration) -> Result<()> {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.tick()?;
            signals::sleep(TICK)?;
        }
        Ok(())
    }

    /// Shows traffic until mim-lb's status gives `master` a state for which `wanted` holds,
    /// for at most [`STATE_CHANGE_LIMIT`] after `since`; returns when that was seen and the
    /// status of that moment. `each` runs after every tick (for events).
    pub fn run_until_state(
        &mut self,
        master: usize,
        wanted: impl Fn(&str) -> bool,
        since: Instant,
        mut each: impl FnMut(&mut Self),
    ) -> Result<Option<(Instant, Status)>> {
        loop {
            let status = self.tick()?;
            let now = Instant::now();
            each(self);
            if wanted(&self.state(&status, master)) {
                return Ok(Some((now, status)));
            }
            if now >= since + STATE_CHANGE_LIMIT {
                return Ok(None);
            }
            signals::sleep(TICK)?;
        }
    }

    /// A line above the live view, timed from `since`.
    pub fn event(&mut self, since: Instant, text: &str) {
        let at = Instant::now().saturating_duration_since(since);
        self.view.event(&format!("      +{:.2} s  {text}", at.as_secs_f64()));
    }

    /// Shows mim-lb's own log line about `backend` changing state, the first one after log
    /// line `since`. The daemon logs the change before it answers the status that showed it,
    /// so the line is there or about to be; if it is not, there is nothing to show.
    pub fn log_event(&mut self, since: usize, backend: IpAddr) {
        let needle = format!("backend {backend} of ");
        if let Ok(line) = self.gateway.proc().wait_for_line_since(since, &needle, Duration::from_secs(1)) {
            // env_logger's `[time LEVEL target] ` prefix says nothing here.
            let message = line.split_once("] ").map_or(line.as_str(), |(_, m)| m);
            self.view.event(&format!("               mim-lb logs: {message}"));
        }
    }
}

/// Polls mim-lb until every master is up.
pub fn wait_all_up(gateway: &Gateway) -> Result<()> {
    let deadline = Instant::now() + STATE_CHANGE_LIMIT;
    loop {
        let status = gateway.query_status().context("asking mim-lb for its status")?;
        if status.services.iter().all(|s| s.backends.iter().all(|b| b.state == "up")) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("not every master was up after {STATE_CHANGE_LIMIT:?}:\n{}", mim_lb::status::render(&status));
        }
        signals::sleep(TICK)?;
    }
}
