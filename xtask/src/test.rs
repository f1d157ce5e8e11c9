//! `cargo xtask test`: every test. Unit tests first (no privileges needed), then the
//! privileged integration tests, one at a time, against a freshly built agent.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::cargo;

#[derive(clap::Args)]
pub struct Args {
    /// Only the unit tests (no root needed).
    #[arg(long)]
    unit_only: bool,
    /// Passed to the integration test binaries as a name filter.
    filter: Option<String>,
}

/// Seconds per fuzz target in the smoke round.
const FUZZ_SMOKE_SECONDS: u32 = 10;

/// Tallies cargo test's `test result:` lines.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    fn add_line(&mut self, line: &str) {
        // "test result: ok. 9 passed; 0 failed; 0 ignored; ..."
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.trim_end_matches('.').parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test ARGS`, echoing its output and counting results.
fn cargo_test(args: &[&str], envs: &[(&str, &std::path::Path)], tally: &mut Tally) -> Result<bool> {
    let mut cmd = cargo::cargo();
    cmd.arg("test").args(args).stdout(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("cannot run cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        tally.add_line(&line);
    }
    Ok(child.wait().context("waiting for cargo test")?.success())
}

pub fn run(args: Args) -> Result<i32> {
    let start = Instant::now();
    let mut tally = Tally::default();
    eprintln!("== unit tests");
    let unit_ok = cargo_test(
        &[
            "--workspace",
            "--exclude",
            "portcullis-ebpf",
            "--exclude",
            "portcullis-tests",
        ],
        &[],
        &mut tally,
    )?;
    let unit_secs = start.elapsed().as_secs_f64();
    let mut priv_ok = true;
    if !args.unit_only {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the integration tests load eBPF programs and build network namespaces: run as root \
                 (they fail rather than skip without privileges)"
            );
        }
        eprintln!("== building the agent");
        // Always the agent of this checkout, whatever PORTCULLIS_BIN says.
        let bin = cargo::build_agent()?;
        eprintln!("== privileged integration tests (agent: {})", bin.display());
        let mut test_args = vec!["-p", "portcullis-tests", "--", "--test-threads=1"];
        if let Some(f) = &args.filter {
            test_args.push(f);
        }
        priv_ok = cargo_test(&test_args, &[("PORTCULLIS_BIN", &bin)], &mut tally)?;
        if args.filter.is_none() {
            // The benchmarks' smoke run: it completes and writes a well-formed report with
            // every scenario (its numbers are not judged here).
            eprintln!("== benchmark smoke run: cargo xtask bench --quick");
            let out = cargo::target_dir()?.join("bench-smoke");
            let _ = std::fs::remove_dir_all(&out);
            let smoke = std::process::Command::new(std::env::current_exe()?)
                .args(["bench", "--quick", "--out"])
                .arg(&out)
                .env("PORTCULLIS_BIN", &bin)
                .status()
                .context("running cargo xtask bench --quick")?;
            let verdict = if smoke.success() {
                crate::bench::check_report(&out.join("bench.json"))
            } else {
                Err(anyhow::anyhow!(
                    "cargo xtask bench --quick failed ({smoke})"
                ))
            };
            match verdict {
                Ok(()) => {
                    println!("test bench_quick_writes_every_scenario ... ok");
                    tally.passed += 1;
                }
                Err(e) => {
                    println!("test bench_quick_writes_every_scenario ... FAILED: {e:#}");
                    tally.failed += 1;
                }
            }
        }
    }
    if args.filter.is_none() {
        // The fuzzing smoke round: every target builds and runs from its seeds for a few
        // seconds without a crash (`cargo xtask fuzz` runs them for longer).
        eprintln!("== fuzz smoke round: cargo xtask fuzz --seconds {FUZZ_SMOKE_SECONDS}");
        let bins = crate::fuzz::build()?;
        for t in crate::fuzz::TARGETS {
            let o = crate::fuzz::run_one(&bins, t, FUZZ_SMOKE_SECONDS)?;
            if o.crashed {
                println!("test fuzz_smoke_{t} ... FAILED ({} executions)", o.execs);
                tally.failed += 1;
            } else {
                println!("test fuzz_smoke_{t} ... ok ({} executions)", o.execs);
                tally.passed += 1;
            }
        }
    }
    let total = start.elapsed().as_secs_f64();
    eprintln!("== unit tests {unit_secs:.0}s, all tests {total:.0}s");
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    Ok(if unit_ok && priv_ok && tally.failed == 0 {
        0
    } else {
        1
    })
}
