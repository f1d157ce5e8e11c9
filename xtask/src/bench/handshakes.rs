//! Per-pair authentication rate: the agent crate's `handshake_bench` example, on loopback, in
//! the same run: sequential full mutual TLS 1.3 handshakes through a bare rustls loop (what
//! protocol version 1 paid for every pair of workloads), against version 2's workload proofs
//! inside one established node session between two agents' `Sessions`, one at a time and 64
//! in flight, and new node sessions (TLS with node SVIDs, then one proof); and SVID issuance
//! by the built-in CA.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{
    table::{Section, Table},
    util::{minmax, num},
};
use crate::cargo;

/// The goal: workload proofs per second at least this many times the full handshakes per
/// second of version 1 (sequential against sequential).
pub const GOAL_PROOFS_TO_BARE: f64 = 5.0;

/// The example built next to `agent` (`<dir>/examples/handshake_bench`), for an agent built
/// elsewhere than this checkout's target directory (`--agent`, PORTCULLIS_BIN): it measures
/// the same build as the agent, and the agent code of this checkout is not compiled.
fn sibling_example(agent: &Path) -> Option<PathBuf> {
    let ours = cargo::target_dir().ok()?;
    let agent = agent.canonicalize().ok()?;
    if agent.starts_with(ours.canonicalize().ok()?) {
        return None;
    }
    let example = agent.parent()?.join("examples").join("handshake_bench");
    example.is_file().then_some(example)
}

/// The command that runs the example with `count` handshakes per round: the agent's sibling
/// build when there is one, else `cargo run` from this checkout (release, or debug for
/// `--quick`).
fn command(agent: &Path, quick: bool, count: &str) -> Command {
    if let Some(example) = sibling_example(agent) {
        eprintln!(
            "  (the example built with the agent: {})",
            example.display()
        );
        let mut c = Command::new(example);
        c.arg(count);
        return c;
    }
    let mut c = cargo::cargo();
    c.args(["run", "-q"]);
    if !quick {
        c.arg("--release");
    }
    c.args([
        "-p",
        "portcullis-agent",
        "--example",
        "handshake_bench",
        "--",
        count,
    ]);
    c
}

/// `median [min–max]` of one of the example's series, per second.
fn rate(hs: &Value, key: &str) -> String {
    let (lo, hi) = minmax(&hs[key]);
    format!("{:.0} [{lo:.0}–{hi:.0}]", num(&hs["median"][key]))
}

/// Runs the example (300 handshakes, proofs and set-ups per round, 1,200 proofs with 64 in
/// flight; `--quick`: 50 and 256) and renders its table.
pub fn run(agent: &Path, quick: bool) -> Result<Section> {
    eprintln!("handshakes: bare rustls against workload proofs in a node session…");
    let count = if quick { "50" } else { "300" };
    let out = command(agent, quick, count)
        .stderr(Stdio::inherit())
        .output()
        .context("running the handshake benchmark")?;
    if !out.status.success() {
        bail!("the handshake benchmark failed ({})", out.status);
    }
    let hs: Value =
        serde_json::from_slice(out.stdout.trim_ascii()).context("handshake benchmark output")?;
    let mut t = Table::new([
        format!("per-pair authentication on loopback ({count} × 3 rounds, median [min–max])"),
        "per second".to_owned(),
        "ratio to bare rustls".to_owned(),
    ]);
    t.row([
        "bare rustls: full mutual TLS 1.3 handshake, sequential (version 1's cost per pair)"
            .to_owned(),
        rate(&hs, "bare_rustls_per_sec"),
        "1.00".to_owned(),
    ]);
    t.row([
        format!(
            "bare rustls: full mutual TLS 1.3 handshakes, {} in flight",
            hs["in_flight"]
        ),
        rate(&hs, "bare_rustls_concurrent_per_sec"),
        format!(
            "{:.2}",
            num(&hs["median"]["bare_rustls_concurrent_per_sec"])
                / num(&hs["median"]["bare_rustls_per_sec"])
        ),
    ]);
    t.row([
        "workload proof in an established node session, sequential".to_owned(),
        rate(&hs, "proofs_per_sec"),
        format!(
            "{:.2} (goal ≥ {GOAL_PROOFS_TO_BARE:.0})",
            num(&hs["proofs_to_bare"])
        ),
    ]);
    t.row([
        format!(
            "workload proofs, {} in flight in one session ({} per round)",
            hs["in_flight"], hs["concurrent_proofs_per_run"]
        ),
        rate(&hs, "proofs_concurrent_per_sec"),
        format!(
            "{:.2} ({:.2} × the handshakes in flight)",
            num(&hs["proofs_concurrent_to_bare"]),
            num(&hs["proofs_concurrent_to_bare_concurrent"])
        ),
    ]);
    t.row([
        "new node session (mutual TLS 1.3 with node SVIDs) and its first proof, sequential"
            .to_owned(),
        rate(&hs, "session_setups_per_sec"),
        format!("{:.2}", num(&hs["session_setups_to_bare"])),
    ]);
    let svid = format!(
        "SVID issuance (built-in CA, ECDSA P-256): {:.0} µs each\n",
        num(&hs["svid_issue_us"])
    );
    Ok(Section::default()
        .md(t.finish())
        .md(svid)
        .json("handshakes", hs))
}
