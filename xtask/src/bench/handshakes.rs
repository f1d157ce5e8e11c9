//! Handshake rate: the agent crate's `handshake_bench` example, which runs sequential mutual
//! TLS 1.3 handshakes on loopback through portcullis's handshake and through a bare rustls
//! loop (the ceiling), and times SVID issuance by the built-in CA.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{
    table::{Section, Table},
    util::minmax,
};
use crate::cargo;

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

/// Runs the example (300 handshakes per round; `--quick`: 50) and renders its table.
pub fn run(agent: &Path, quick: bool) -> Result<Section> {
    eprintln!("handshakes: portcullis against a bare rustls loop…");
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
    let (bl, bh) = minmax(&hs["bare_rustls_per_sec"]);
    let (ol, oh) = minmax(&hs["portcullis_per_sec"]);
    let mut t = Table::new([
        "handshakes",
        "bare rustls (/s)",
        "portcullis (/s)",
        "ratio to bare",
    ]);
    t.row([
        format!("mutual TLS 1.3 on loopback, sequential ({count} × 3, median [min–max])"),
        format!(
            "{:.0} [{bl:.0}–{bh:.0}]",
            hs["median"]["bare_rustls_per_sec"].as_f64().unwrap_or(0.0)
        ),
        format!(
            "{:.0} [{ol:.0}–{oh:.0}]",
            hs["median"]["portcullis_per_sec"].as_f64().unwrap_or(0.0)
        ),
        format!("{:.3}", hs["ratio_to_bare"].as_f64().unwrap_or(0.0)),
    ]);
    let svid = format!(
        "SVID issuance (built-in CA, ECDSA P-256): {:.0} µs each\n",
        hs["svid_issue_us"].as_f64().unwrap_or(0.0)
    );
    Ok(Section::default()
        .md(t.finish())
        .md(svid)
        .json("handshakes", hs))
}
