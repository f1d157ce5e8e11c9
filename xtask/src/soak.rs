//! `cargo xtask soak`: the fault suite's restart loop for many rounds (SIGKILL and restart of
//! an agent under load, counted outcomes), repeated; the CI run does 5 rounds once.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::cargo;

#[derive(clap::Args)]
pub struct Args {
    /// Agent restarts per run.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Runs, each on a fresh testbed.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
}

pub fn run(args: Args) -> Result<i32> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the soak test builds namespaces and loads eBPF programs: run it as root");
    }
    if args.rounds == 0 || args.repeat == 0 {
        bail!("--rounds and --repeat must be at least 1");
    }
    let bin = cargo::build_agent()?;
    let started = Instant::now();
    let mut failed = 0;
    for run in 1..=args.repeat {
        eprintln!(
            "== soak run {run}/{}: {} agent restarts under load",
            args.repeat, args.rounds
        );
        let mut child = cargo::cargo()
            .args([
                "test",
                "-p",
                "portcullis-tests",
                "--test",
                "faults",
                "--",
                "restart_loop",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PORTCULLIS_BIN", &bin)
            .env("PORTCULLIS_RESTART_ROUNDS", args.rounds.to_string())
            .stderr(Stdio::piped())
            .spawn()
            .context("running cargo test")?;
        let stderr = child.stderr.take().context("cargo test stderr")?;
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading cargo test output")?;
            // The counted outcome, and whatever explains a failure.
            if let Some(outcome) = line.strip_prefix("fault outcome: ") {
                println!("{outcome}");
            } else {
                eprintln!("{line}");
            }
        }
        if !child.wait().context("waiting for cargo test")?.success() {
            failed += 1;
        }
    }
    eprintln!(
        "== soak: {} of {} runs passed in {:.0} s",
        args.repeat - failed,
        args.repeat,
        started.elapsed().as_secs_f64()
    );
    Ok(i32::from(failed > 0))
}
