//! The fuzzer's loop: frames from the generator through the live program (BPF_PROG_TEST_RUN,
//! maps filled by the real control plane), every outcome checked against the oracle.
//!
//! Checked on every frame: the verdict is the one of the reason the oracle names; a frame
//! sent to a master (XDP_TX) is the input with only the destination MAC (the master the
//! control plane's table names for the flow, one of the service's configured masters) and
//! the source MAC (the gateway's) changed; any other frame leaves the program unchanged; the
//! kernel runs every frame (no verifier or run error).
//!
//! "Counted under exactly one reason": reading the per-reason counters costs 32 map lookups,
//! several times the run of one frame, so it is checked exactly per batch (each reason's
//! packet and byte deltas equal the oracle's count for the batch, whose total is the batch's
//! frame count) and per frame on a sample (one in `sample_every`: exactly one counter moved,
//! by one packet of the frame's length, and it is the oracle's reason). Together they leave no
//! room for a frame counted twice or not at all, or under another reason, unless two frames
//! of one batch outside the sample swap reasons of the same verdict.
//!
//! Batch `n` of a run from seed `S` uses seed `S + n`, and a batch depends only on its seed:
//! `--seed S+n` replays it from its first frame. The connection table carries over between
//! batches (bounded by its LRU size); no check depends on it, because the config never
//! changes during a run, so every flow stays on the master its slot names.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use mim_lb_common::{Counter, limits::REASON_SLOTS, reason};

use super::generate::{Generator, Step};
use super::oracle::{Expected, Oracle};
use super::services::{self, Service};
use crate::testrun::{GATEWAY_MAC, ProgramUnderTest, verdict_name};

/// The program and the oracle forget the fragments' first parts together this often: a batch
/// then depends only on its seed, and no record comes near the program's 2 s timeout (a
/// thousand frames take milliseconds), which the oracle does not model.
const FORGET_FRAGMENTS_EVERY: u64 = 1024;

/// Connection table entries: small, so that LRU eviction is exercised and the state a run
/// builds up stays bounded.
const FLOW_TABLE: u32 = 4096;

pub struct Fuzzer {
    prog: ProgramUnderTest,
    services: Vec<Service>,
    out: Vec<u8>,
}

/// One frame on which the program broke an invariant.
#[derive(Debug)]
pub struct Violation {
    pub batch_seed: u64,
    pub index: u64,
    pub what: String,
    pub steps: Vec<Step>,
    pub frame: Vec<u8>,
    pub output: Vec<u8>,
    pub expected: Expected,
    pub verdict: u32,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "frame {} of batch seed {}: {}", self.index, self.batch_seed, self.what)?;
        writeln!(
            f,
            "  expected: {} ({}){}",
            reason::name(self.expected.reason),
            verdict_name(reason::verdict(self.expected.reason)),
            self.expected.target.map(|t| format!(", to a master of service #{} for {}:{}", t.service, t.client, t.client_port)).unwrap_or_default()
        )?;
        writeln!(f, "  got: {}", verdict_name(self.verdict))?;
        writeln!(f, "  made by: {:?}", self.steps)?;
        writeln!(f, "  input  ({} bytes): {}", self.frame.len(), hex(&self.frame))?;
        writeln!(f, "  output ({} bytes): {}", self.output.len(), hex(&self.output))?;
        write!(f, "  replay: cargo xtask fuzz --seed {} --frames {}", self.batch_seed, self.index + 1)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one batch did.
pub struct Batch {
    pub seed: u64,
    pub frames: u64,
    /// Frames per reason, as the oracle named them and the counters confirmed.
    pub reasons: Vec<u64>,
    pub elapsed: Duration,
}

impl Fuzzer {
    /// The live program with the fuzzer's services applied by the real control plane.
    pub fn new() -> Result<Self> {
        let services = services::table();
        let mut prog = ProgramUnderTest::with_flow_table(&services::config(&services), FLOW_TABLE)?;
        // No slot marked as changed: each flow goes to the master its slot names.
        prog.settle();
        Ok(Fuzzer { prog, services, out: vec![0; 4096] })
    }

    /// Runs `frames` frames from `seed`; the first violations (up to 5) are the error.
    pub fn batch(&mut self, seed: u64, frames: u64, sample_every: u64) -> Result<Batch> {
        let started = Instant::now();
        let services = std::mem::take(&mut self.services);
        let result = self.batch_of(&services, seed, frames, sample_every);
        self.services = services;
        let reasons = result?;
        Ok(Batch { seed, frames, reasons, elapsed: started.elapsed() })
    }

    fn batch_of(&mut self, services: &[Service], seed: u64, frames: u64, sample_every: u64) -> Result<Vec<u64>> {
        let mut oracle = Oracle::new(services, GATEWAY_MAC);
        let mut generator = Generator::new(services, seed);
        let mut want = vec![Counter::default(); REASON_SLOTS as usize];
        let mut violations = Vec::new();
        let before = self.prog.reasons()?;
        for index in 0..frames {
            if index % FORGET_FRAGMENTS_EVERY == 0 {
                self.prog.director.dataplane_mut().maps().clear_fragments()?;
                oracle.forget_fragments();
            }
            let made = generator.frame();
            let expected = oracle.classify(&made.bytes);
            let sampled = sample_every > 0 && index % sample_every == 0;
            let counters = if sampled { Some(self.prog.reasons()?) } else { None };
            let (verdict, what) = match self.run_one(&made.bytes) {
                Ok(verdict) => (verdict, self.judge(services, &made.bytes, verdict, &expected)),
                Err(e) => (u32::MAX, Some(format!("the kernel did not run the frame: {e:#}"))),
            };
            let what = what.or_else(|| {
                let before = counters?;
                let after = self.prog.reasons().ok()?;
                counted_once(&before, &after, expected.reason, made.bytes.len())
            });
            want[expected.reason as usize].packets += 1;
            want[expected.reason as usize].bytes += made.bytes.len() as u64;
            if let Some(what) = what {
                let output = self.out.clone();
                violations.push(Violation { batch_seed: seed, index, what, steps: made.steps, frame: made.bytes, output, expected, verdict });
                if violations.len() == 5 {
                    break;
                }
            }
        }
        if !violations.is_empty() {
            bail!("{}", violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n"));
        }
        let after = self.prog.reasons()?;
        check_batch_counters(&before, &after, &want, seed)?;
        Ok(want.iter().map(|c| c.packets).collect())
    }

    /// Runs the program once; `self.out` holds the output frame.
    fn run_one(&mut self, frame: &[u8]) -> Result<u32> {
        self.out.resize(frame.len() + 256, 0);
        let result = self
            .prog
            .director
            .dataplane()
            .program()
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut self.out), repeat: 1, ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        self.out.truncate(result.data_size_out as usize);
        Ok(result.return_value)
    }

    /// What is wrong with the program's answer to `frame`, if anything.
    fn judge(&self, services: &[Service], frame: &[u8], verdict: u32, expected: &Expected) -> Option<String> {
        let want = reason::verdict(expected.reason);
        if verdict != want {
            return Some(format!("verdict {} where {} is {}", verdict_name(verdict), reason::name(expected.reason), verdict_name(want)));
        }
        let out = &self.out;
        let Some(target) = expected.target else {
            return (out[..] != frame[..]).then(|| "a frame not sent to a master was changed".to_owned());
        };
        if out.len() != frame.len() || out[12..] != frame[12..] {
            return Some("a forwarded frame changed beyond its MAC addresses".to_owned());
        }
        if out[6..12] != GATEWAY_MAC {
            return Some("a forwarded frame's source MAC is not the gateway's".to_owned());
        }
        let service = &services[target.service];
        if !service.masters.iter().any(|(_, mac)| out[0..6] == mac[..]) {
            return Some(format!("sent to {}, not a master of service {}", hex(&out[0..6]), service.name));
        }
        let key = service.key();
        let master = self.prog.table_master(&key, target.client, target.client_port, service.port);
        let mac = master.map(|m| self.prog.master_mac(&key, m));
        (mac.map(|m| m[..] != out[0..6]).unwrap_or(true))
            .then(|| format!("sent to {}, where the table names {master:?} for the flow", hex(&out[0..6])))
    }
}

/// A sampled frame moved exactly one counter, by one packet of its length, under `code`.
fn counted_once(before: &[Counter], after: &[Counter], code: u32, len: usize) -> Option<String> {
    let moved: Vec<(usize, u64, u64)> = before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| a != b)
        .map(|(i, (b, a))| (i, a.packets.wrapping_sub(b.packets), a.bytes.wrapping_sub(b.bytes)))
        .collect();
    (moved != [(code as usize, 1, len as u64)]).then(|| {
        let named: Vec<String> = moved.iter().map(|(i, p, b)| format!("{} +{p} packets +{b} bytes", reason::name(*i as u32))).collect();
        format!("counted as [{}], not once under {}", named.join(", "), reason::name(code))
    })
}

/// The counters moved by the batch exactly as the oracle counted it, reason by reason.
fn check_batch_counters(before: &[Counter], after: &[Counter], want: &[Counter], seed: u64) -> Result<()> {
    let mut wrong = Vec::new();
    for (i, ((b, a), w)) in before.iter().zip(after).zip(want).enumerate() {
        let got = (a.packets - b.packets, a.bytes - b.bytes);
        if got != (w.packets, w.bytes) {
            wrong.push(format!("{}: counted {} packets/{} bytes, the oracle {}/{}", reason::name(i as u32), got.0, got.1, w.packets, w.bytes));
        }
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(anyhow!(
        "batch seed {seed}: the reason counters do not match the frames run:\n  {}\n  replay: cargo xtask fuzz --seed {seed}",
        wrong.join("\n  ")
    ))
}
