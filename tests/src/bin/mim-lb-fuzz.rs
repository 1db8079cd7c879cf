//! `cargo xtask fuzz`: the XDP program fuzzer (issue 10). Runs `--frames` frames through the
//! live program in batches of `--batch`, batch n from seed `--seed` + n, and stops at the
//! first batch with a violation, printing each violating frame and the command that replays
//! its batch. See `mim_lb_tests::fuzz` for what is generated and checked.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use mim_lb_common::reason;
use mim_lb_tests::fuzz::Fuzzer;

#[derive(Parser)]
#[command(about = "Fuzz the mim-lb XDP program through BPF_PROG_TEST_RUN")]
struct Args {
    /// Frames to run in all.
    #[arg(long, default_value_t = 10_000_000)]
    frames: u64,
    /// Seed of the first batch (batch n uses seed + n); random if not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Frames per batch: the unit of replay and of the exact counter check.
    #[arg(long, default_value_t = 100_000)]
    batch: u64,
    /// Check the reason counters around one frame in this many (0: only per batch).
    #[arg(long, default_value_t = 256)]
    sample_every: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match fuzz(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mim-lb-fuzz: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn fuzz(args: &Args) -> Result<()> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..u64::MAX / 2));
    let batch = args.batch.max(1);
    println!("mim-lb-fuzz: {} frames from seed {seed} in batches of {batch}", args.frames);
    let mut fuzzer = Fuzzer::new()?;
    let started = Instant::now();
    let mut totals = vec![0u64; reason::ALL.len()];
    let (mut done, mut n) = (0u64, 0u64);
    while done < args.frames {
        let frames = batch.min(args.frames - done);
        let b = fuzzer.batch(seed.wrapping_add(n), frames, args.sample_every)?;
        for (code, count) in b.reasons.iter().enumerate().take(totals.len()) {
            totals[code] += count;
        }
        done += frames;
        n += 1;
        println!(
            "batch seed {}: {} frames in {:.1}s ({:.0}/s); {done} of {} done",
            b.seed,
            b.frames,
            b.elapsed.as_secs_f64(),
            b.frames as f64 / b.elapsed.as_secs_f64(),
            args.frames
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "mim-lb-fuzz: passed: {done} frames, {n} batches (seeds {seed}..={}), {elapsed:.1}s, {:.0} frames/s",
        seed.wrapping_add(n.saturating_sub(1)),
        done as f64 / elapsed
    );
    for (code, name) in reason::ALL {
        println!("  {name:>22}: {}", totals[code as usize]);
    }
    Ok(())
}
