//! `cargo xtask fuzz`: builds the libFuzzer targets in `fuzz/` with coverage instrumentation
//! (what `cargo fuzz build --sanitizer none` does, without needing cargo-fuzz) and runs each for
//! a bounded time from its seed corpus. New inputs go to `<target>/fuzz/corpus/<name>`, crashes
//! to `<target>/fuzz/artifacts/<name>`; the command fails when any target finds one.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::cargo;

/// Every target in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 8] = [
    "spiffe_id",
    "svid",
    "handshake_message",
    "config",
    "cluster_state",
    "policy",
    "kube_objects",
    "datapath_event",
];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Only these targets (default: all).
    targets: Vec<String>,
}

const HOST: &str = "x86_64-unknown-linux-gnu";

/// Instrumentation flags for the fuzzed code (SanitizerCoverage for libFuzzer), with debug
/// assertions and overflow checks on so that arithmetic slips are found as crashes.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

fn root() -> Result<PathBuf> {
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has a parent directory")?
        .to_owned())
}

/// Builds every target; returns the directory holding the binaries.
pub fn build() -> Result<PathBuf> {
    let root = root()?;
    let target_dir = cargo::target_dir()?.join("fuzz");
    eprintln!("building the fuzz targets (instrumented, release)…");
    // `--target` keeps the flags off build scripts and proc macros, as cargo-fuzz does; the
    // agent's eBPF build sets its own flags.
    let status = cargo::cargo()
        .current_dir(root.join("fuzz"))
        .args([
            "build",
            "--release",
            "--bins",
            "--target",
            HOST,
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        .status()
        .context("running cargo build for fuzz/")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    Ok(target_dir.join(HOST).join("release"))
}

/// One target's run.
pub struct Outcome {
    pub target: String,
    pub execs: u64,
    pub seconds: f64,
    pub corpus: usize,
    pub crashed: bool,
}

/// Runs `target` for `seconds`: its seeds, plus what earlier runs on this machine found.
pub fn run_one(bin_dir: &Path, target: &str, seconds: u32) -> Result<Outcome> {
    let root = root()?;
    let work = cargo::target_dir()?.join("fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    for d in [&corpus, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let seeds = root.join("fuzz").join("corpus").join(target);
    let started = Instant::now();
    let out = Command::new(bin_dir.join(target))
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .arg(&seeds)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let stat = |name: &str| -> u64 {
        log.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
            .unwrap_or(0)
    };
    let crashed = !out.status.success();
    if crashed {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "fuzz target {target} failed ({}); the input is in {}:\n{}",
            out.status,
            artifacts.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(Outcome {
        target: target.to_owned(),
        execs: stat("stat::number_of_executed_units"),
        seconds: started.elapsed().as_secs_f64(),
        corpus: std::fs::read_dir(&corpus).map_or(0, Iterator::count),
        crashed,
    })
}

/// Builds and runs `targets` (all when empty) for `seconds` each, printing a table; `Ok(false)`
/// when some target found a failing input.
pub fn fuzz(targets: &[String], seconds: u32) -> Result<bool> {
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target `{t}`; the targets: {}", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    let bins = build()?;
    let mut outcomes = Vec::new();
    for (i, t) in chosen.iter().enumerate() {
        eprintln!("[{}/{}] fuzzing {t} for {seconds} s…", i + 1, chosen.len());
        outcomes.push(run_one(&bins, t, seconds)?);
    }
    println!(
        "{:<18} {:>8} {:>12} {:>10} {:>8}  result",
        "target", "seconds", "executions", "exec/s", "corpus"
    );
    for o in &outcomes {
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let rate = o.execs as f64 / o.seconds.max(0.001);
        println!(
            "{:<18} {:>8.0} {:>12} {:>10.0} {:>8}  {}",
            o.target,
            o.seconds,
            o.execs,
            rate,
            o.corpus,
            if o.crashed { "FAILED" } else { "ok" }
        );
    }
    Ok(outcomes.iter().all(|o| !o.crashed))
}

pub fn run(args: Args) -> Result<i32> {
    Ok(if fuzz(&args.targets, args.seconds)? {
        0
    } else {
        1
    })
}
