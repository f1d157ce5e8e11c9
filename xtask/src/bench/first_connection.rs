//! Cold first connection for a new pair: connect() to established, in four settings — no
//! enforcement; enforcement with neither proactive authentication nor the SYN timeout program
//! (the kernel's 1 s retransmission); the SYN timeout program only; proactive authentication.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{
    Options, Testbed,
    scenario::{Family, Scenario, eventually, ok},
};

use super::{
    datapath::COUNT_PORT,
    table::{Section, Table},
    util::spec,
};

/// The settings, in the table's order.
pub const SETTINGS: [&str; 4] = ["none", "both off", "SYN timeout only", "proactive"];

/// Cold first connection for a new pair: connect() to established, in one setting.
fn first_connection(agent: &Path, probe: &Path, setting: &str) -> Result<f64> {
    let (agents, proactive, syn) = match setting {
        "none" => (false, None, None),
        "both off" => (true, Some(false), Some(0)),
        "SYN timeout only" => (true, Some(false), Some(20)),
        _ => (true, Some(true), Some(20)),
    };
    let tb = Testbed::up(
        &spec(),
        &Options {
            agents,
            agent_bin: Some(agent.to_owned()),
            authenticate: true,
            proactive,
            syn_rto_ms: syn,
            log_level: "warn".into(),
            ..Options::default()
        },
    )?;
    let s = Scenario {
        tb: &tb,
        probe: probe.to_owned(),
    };
    let _server = s.serve("server", COUNT_PORT);
    if proactive == Some(true) {
        let warm = eventually(Duration::from_secs(10), || {
            s.status("node-2")["auth"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
                && s.status("node-1")["auth"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        });
        if !warm {
            bail!("proactive authentication did not warm the pair within 10 s");
        }
    }
    let r = s.connect("client", s.addr("server", Family::V4), COUNT_PORT, 5000);
    if !ok(&r) {
        bail!("first connection ({setting}): {r}");
    }
    r["connect_ms"].as_f64().context("connect_ms")
}

/// Every setting, each on a testbed of its own.
pub fn run(agent: &Path, probe: &Path) -> Result<Section> {
    eprintln!("cold first connection in four settings…");
    let mut first = Vec::new();
    for setting in SETTINGS {
        let ms = first_connection(agent, probe, setting)?;
        eprintln!("  {setting:<17} {ms:.2} ms");
        first.push(json!({"setting": setting, "connect_ms": ms}));
    }
    let mut t = Table::new([
        "cold first connection, new pair",
        "connect() to established (ms)",
    ]);
    for f in &first {
        t.row([
            f["setting"].as_str().unwrap_or("").to_owned(),
            format!("{:.2}", f["connect_ms"].as_f64().unwrap_or(f64::NAN)),
        ]);
    }
    Ok(Section::default()
        .md(t.finish())
        .json("first_connection", Value::Array(first)))
}
