//! Carrying out the schedule on the lab and the daemon, one step at a time, and checking
//! after each that the daemon's status agrees with what was done. Steps run one after
//! another and each waits for its effect (a dead master `down`, a revived one back), so a
//! master never dies while no daemon runs and no two deaths' windows depend on each other.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mim_lb::status::Status;

use super::flows::{Pool, Shorts};
use super::judge::{Death, judge_flatness, judge_flow_ends, judge_short_failures};
use super::plan::{MasterModel, Rng, Step, apply, next_step};
use super::report::SoakReport;
use super::sampler::{Sampler, Watched};
use super::{FLOWS_PER_MASTER, SoakSpec, TCP_PORT, TIMERS, UDP_PORT, soak_config};
use crate::Lab;
use crate::gateway::Gateway;

const SERVICES: [&str; 2] = ["tcp-7000", "udp-7001"];
/// The run stops taking steps this long before its deadline, so the last step's effects are
/// seen by the traffic before it stops.
const TAIL: Duration = Duration::from_secs(5);

pub(super) struct Soak {
    spec: SoakSpec,
    lab: Lab,
    gw: Gateway,
    models: Vec<MasterModel>,
    t0: Instant,
    sampler: Sampler,
    pool: Pool,
    run: usize,
    run_started: Instant,
    deaths: Vec<Death>,
    /// (when, what) of every step, and of every broken invariant found while stepping.
    pub(super) log: Vec<(Duration, String)>,
    pub(super) violations: Vec<(Duration, String)>,
    detections: Vec<Duration>,
    recoveries: Vec<Duration>,
    invalid_reloads: u64,
}

impl Soak {
    pub(super) fn new(spec: &SoakSpec, lab: Lab, gw: Gateway, models: Vec<MasterModel>, t0: Instant, sampler: Sampler, pool: Pool) -> Soak {
        Soak {
            spec: spec.clone(),
            lab,
            gw,
            models,
            t0,
            sampler,
            pool,
            run: 0,
            run_started: Instant::now(),
            deaths: Vec::new(),
            log: Vec::new(),
            violations: Vec::new(),
            detections: Vec::new(),
            recoveries: Vec::new(),
            invalid_reloads: 0,
        }
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn violation(&mut self, what: String) {
        if self.spec.verbose {
            eprintln!("soak: +{:.1}s BROKEN: {what}", self.now().as_secs_f64());
        }
        self.violations.push((self.now(), what));
    }

    /// Steps until the deadline; a step that fails to run is a broken invariant (the daemon
    /// refused a valid command, or died) and ends the schedule, since what the daemon holds
    /// is then unknown.
    pub(super) fn run_schedule(&mut self, rng: &mut Rng, shorts: &Shorts) {
        let deadline = self.t0 + self.spec.duration;
        self.top_up();
        loop {
            let gap = rng.between(Duration::from_secs(2), Duration::from_secs(5));
            if Instant::now() + gap + TAIL >= deadline {
                break;
            }
            std::thread::sleep(gap);
            self.top_up();
            let restart_allowed = self.run_started.elapsed() >= self.spec.min_run();
            let step = next_step(rng, &self.models, restart_allowed);
            self.log.push((self.now(), step.label()));
            if self.spec.verbose {
                let [tok, tfail, uok, ufail] = shorts.progress();
                eprintln!(
                    "soak: +{:.1}s {} (short tcp {tok} ok {tfail} failed, udp {uok} ok {ufail} failed; long-lived {:?})",
                    self.now().as_secs_f64(),
                    step.label(),
                    self.pool.live_counts().values().sum::<usize>()
                );
            }
            let done = self.carry_out(&step);
            apply(&mut self.models, &step);
            if let Err(e) = done.and_then(|()| self.check_model(&step.label())) {
                self.violation(format!("{}: {e:#}", step.label()));
                break;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(left);
    }

    fn top_up(&mut self) {
        let wanted: Vec<usize> = (0..self.models.len()).filter(|&i| self.models[i].takes_new()).collect();
        let lab = &self.lab;
        if let Err(e) = self.pool.top_up(&wanted, FLOWS_PER_MASTER, &|name| lab.master_index(name)) {
            eprintln!("soak: opening long-lived flows: {e:#}");
        }
    }

    fn addr(&self, i: usize) -> IpAddr {
        self.lab.master_addr4(i).into()
    }

    fn carry_out(&mut self, step: &Step) -> Result<()> {
        match step {
            Step::Kill(i) => self.kill(*i),
            Step::Revive(i) => self.revive(*i),
            Step::Drain(i) => self.operator(*i, "drain", "-> draining"),
            Step::Enable(i) => self.operator(*i, "enable", "-> "),
            Step::Reweight { weights, by_signal } => self.reweight(weights, *by_signal),
            Step::InvalidReload { by_signal } => self.invalid_reload(*by_signal),
            Step::RestartKeepPinned => self.restart(false),
            Step::RestartAfterKill => self.restart(true),
        }
    }

    fn kill(&mut self, i: usize) -> Result<()> {
        let at = self.now();
        let stopped = self.lab.stop_servers(i, TCP_PORT) + self.lab.stop_servers(i, UDP_PORT);
        if stopped != 2 {
            bail!("master-{} had {stopped} services running, not 2", i + 1);
        }
        self.deaths.push(Death { master: i, at });
        let bound = TIMERS.detection_bound() + TIMERS.noise;
        let took = self.wait_state(i, "down", bound + Duration::from_secs(10))?;
        self.detections.push(took);
        if took > bound {
            self.violation(format!("master-{} was marked down {took:?} after it died (bound {bound:?})", i + 1));
        }
        Ok(())
    }

    fn revive(&mut self, i: usize) -> Result<()> {
        self.lab.start_tcp_server(i, TCP_PORT)?;
        self.lab.start_udp_server(i, UDP_PORT)?;
        let want = if self.models[i].drained { "draining" } else { "up" };
        let bound = TIMERS.recovery_bound() + TIMERS.noise;
        let took = self.wait_state(i, want, bound + Duration::from_secs(10))?;
        self.recoveries.push(took);
        if took > bound {
            self.violation(format!("master-{} was {want} {took:?} after it came back (bound {bound:?})", i + 1));
        }
        Ok(())
    }

    /// `mim-lb drain` or `enable` on both services, as an operator types it.
    fn operator(&mut self, i: usize, verb: &str, expect: &str) -> Result<()> {
        for service in SERVICES {
            let said = self.gw.ctl(&[verb, service, &self.addr(i).to_string()])?;
            if !said.contains(expect) {
                bail!("`mim-lb {verb} {service}` said {said:?}");
            }
        }
        Ok(())
    }

    fn reweight(&mut self, weights: &[u32], by_signal: bool) -> Result<()> {
        self.gw.write_config(&soak_config(&self.lab, weights))?;
        if by_signal {
            let since = self.gw.proc().line_count();
            self.gw.proc().signal(libc::SIGHUP)?;
            self.gw.proc().wait_for_line_since(since, "SIGHUP: applied", Duration::from_secs(10))?;
        } else {
            let said = self.gw.ctl(&["reload"])?;
            if !said.contains("applied") {
                bail!("`mim-lb reload` said {said:?}");
            }
        }
        Ok(())
    }

    /// A file the daemon must refuse (an unknown key, or a weight out of range, by turns):
    /// refused naming the key, and nothing changes. The valid file is put back afterwards.
    fn invalid_reload(&mut self, by_signal: bool) -> Result<()> {
        let weights: Vec<u32> = self.models.iter().map(|m| m.weight).collect();
        let valid = soak_config(&self.lab, &weights);
        self.invalid_reloads += 1;
        let (invalid, key) = if self.invalid_reloads.is_multiple_of(2) {
            (format!("bogus_key = 1\n{valid}"), "bogus_key")
        } else {
            let mut w = weights.clone();
            w[0] = 70_000;
            (soak_config(&self.lab, &w), "weight")
        };
        let before = settled(&self.gw.query_status()?);
        self.gw.write_config(&invalid)?;
        let refused = if by_signal {
            let since = self.gw.proc().line_count();
            self.gw.proc().signal(libc::SIGHUP)?;
            self.gw.proc().wait_for_line_since(since, "SIGHUP: reload rejected", Duration::from_secs(10))
        } else {
            match self.gw.ctl(&["reload"]) {
                Ok(said) => Err(anyhow::anyhow!("an invalid file was accepted: {said}")),
                Err(e) => Ok(format!("{e:#}")),
            }
        };
        self.gw.write_config(&valid)?;
        let refused = refused?;
        if !refused.contains(key) {
            bail!("the refusal does not name {key}: {refused}");
        }
        let after = settled(&self.gw.query_status()?);
        if before != after {
            bail!("a refused reload changed the backends: {before:?} -> {after:?}");
        }
        Ok(())
    }

    /// Stops the daemon (SIGTERM with `--keep-pinned`, or SIGKILL) and starts it again over
    /// the pins it left; the restart must reuse them.
    fn restart(&mut self, kill: bool) -> Result<()> {
        self.sampler.watch(None);
        if kill {
            self.gw.kill()?;
        } else {
            self.gw.stop()?;
        }
        if !self.gw.pin_dir().join("XDP_LINK").exists() {
            bail!("the stopped daemon left no link pin");
        }
        self.gw.restart(&mut self.lab, &["--keep-pinned"])?;
        self.run += 1;
        self.run_started = Instant::now();
        self.sampler.watch(Some(Watched { pid: self.gw.proc().pid(), run: self.run, since: self.run_started }));
        self.gw
            .proc()
            .wait_for_line("reusing the maps pinned under", Duration::from_secs(1))
            .context("the restarted daemon did not reuse the pins")?;
        Ok(())
    }

    /// Polls the status (every 20 ms) until master `i` is `state` in both services; returns
    /// how long that took.
    fn wait_state(&self, i: usize, state: &str, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let addr = self.addr(i);
        loop {
            let status = self.gw.query_status()?;
            let states: Vec<&str> = status
                .services
                .iter()
                .flat_map(|s| s.backends.iter().filter(|b| b.address == addr).map(|b| b.state.as_str()))
                .collect();
            if states.len() == SERVICES.len() && states.iter().all(|s| *s == state) {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                bail!("master-{} not {state} after {timeout:?}: {states:?}", i + 1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's status agrees with the model: every master in the state and with the
    /// weight the soak gave it, in both services.
    fn check_model(&self, after: &str) -> Result<()> {
        if !self.gw.running() {
            bail!("the daemon is not running after {after}:\n{}", self.gw.proc().tail(20));
        }
        let status = self.gw.query_status()?;
        for service in &status.services {
            for (i, m) in self.models.iter().enumerate() {
                let addr = self.addr(i);
                let b = service.backends.iter().find(|b| b.address == addr).with_context(|| format!("no {addr} in {}", service.name))?;
                if b.state != m.expected_state() || b.weight != m.weight {
                    bail!(
                        "{} master-{}: status says {} weight {} ({}), the soak expects {} weight {}",
                        service.name,
                        i + 1,
                        b.state,
                        b.weight,
                        b.reason,
                        m.expected_state(),
                        m.weight
                    );
                }
            }
        }
        Ok(())
    }

    pub(super) fn finish(self, shorts: super::flows::ShortOutcome) -> SoakReport {
        let Soak { spec, pool, sampler, deaths, log, violations, detections, recoveries, t0, gw, lab, .. } = self;
        let flows = pool.finish();
        let samples = sampler.finish();
        let elapsed = t0.elapsed();
        drop(gw);
        drop(lab);
        let judged_failures = judge_short_failures(&shorts.failures, &deaths, &TIMERS);
        let judged_ends = judge_flow_ends(&flows.ended, &deaths);
        let flatness = judge_flatness(&samples, spec.warm_up(), spec.limit_pct);
        SoakReport {
            seed: spec.seed,
            planned: spec.duration,
            elapsed,
            timers: TIMERS,
            warm_up: spec.warm_up(),
            limit_pct: spec.limit_pct,
            steps: log,
            step_violations: violations,
            deaths,
            detections,
            recoveries,
            shorts,
            judged_failures,
            flows,
            judged_ends,
            samples,
            flatness,
        }
    }
}

/// Each backend's address, state, weight and slots in each service: what a refused reload
/// must leave as it was.
fn settled(status: &Status) -> Vec<(String, IpAddr, String, u32, u32)> {
    status
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| (s.name.clone(), b.address, b.state.clone(), b.weight, b.slots)))
        .collect()
}
