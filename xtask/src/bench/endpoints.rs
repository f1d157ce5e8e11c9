//! Control plane at scale (`endpoint_scale`): `n` workloads (10 per service account) on node-2
//! are added to cluster state at once; the time until node-1's agent has programmed them all
//! (from its own `cluster state applied` record), its resident memory afterwards, and the CPU
//! it uses once nothing changes.

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{Options, Testbed, kube_api::scale_address, scenario::Scenario};

use super::{
    table::{Section, Table},
    util::{Applied, applied, cpu_seconds, rss_kib, scale_workload, spec},
};

/// What `endpoint_scale` measured.
pub struct Scale {
    /// The agent's own time (`took_ms`) for the reconciliation that programmed them.
    pub agent_ms: f64,
    /// From the cluster-state file write to programmed.
    pub wall_ms: f64,
    pub rss_kib: u64,
    /// The agent's CPU use afterwards, with nothing changing, in percent of one core.
    pub rest_cpu_pct: f64,
}

/// Waits (up to 300 s) for node-1's record of a reconciliation that set at least `n`
/// endpoints; returns its total time in ms.
fn programmed_ms(tb: &Testbed, n: usize) -> Result<f64> {
    let start = Instant::now();
    loop {
        let log = tb.agent_log("node-1");
        if let Some(a) =
            applied(&log).find(|a| a.endpoints_set.is_some_and(|set| set as usize >= n))
        {
            if let Some(line) = log.lines().rfind(|l| l.contains(Applied::MESSAGE)) {
                eprintln!(
                    "  agent: {}",
                    line.split("INFO").last().unwrap_or(line).trim()
                );
            }
            return Ok(a.total_ms());
        }
        if start.elapsed() > Duration::from_secs(300) {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "node-1 did not program {n} workloads' endpoints within 300 s; the end of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// One size: `n` workloads written at once, then `rest` with nothing changing.
pub fn endpoint_scale(agent: &Path, n: usize, rest: Duration) -> Result<Scale> {
    let tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            log_level: "info".into(),
            ..Options::default()
        },
    )?;
    // JSON, as generators of files this size write them (the agent's fast decoder).
    tb.write_cluster_json(|c| {
        for i in 0..n {
            // 198.19.0.0/16 holds 64,000 of them; the rest go to fd00:19::/96.
            let sa = format!("sa{}", i / 10);
            c.workloads.push(scale_workload(
                &format!("w{i}"),
                "scale",
                &sa,
                "node-2",
                scale_address(i),
            ));
        }
    })?;
    let start = Instant::now();
    let agent_ms = programmed_ms(&tb, n)?;
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let st = Scenario {
        tb: &tb,
        probe: PathBuf::new(),
    }
    .status("node-1");
    let pid = st["agent"]["pid"].as_i64().context("agent pid in status")?;
    let rss_kib = rss_kib(pid)?;
    let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
    thread::sleep(rest);
    let rest_cpu_pct = 100.0 * (cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64();
    Ok(Scale {
        agent_ms,
        wall_ms,
        rss_kib,
        rest_cpu_pct,
    })
}

/// The sizes of the full run (`--quick`: 1,000 only), with their table.
pub fn run(agent: &Path, quick: bool) -> Result<Section> {
    let counts: &[usize] = if quick {
        &[1_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let mut scale = Vec::new();
    for &n in counts {
        eprintln!("control plane: programming {n} endpoints…");
        let m = endpoint_scale(agent, n, Duration::from_secs(if quick { 2 } else { 5 }))?;
        #[expect(clippy::cast_precision_loss, reason = "MiB for display")]
        let rss_mib = m.rss_kib as f64 / 1024.0;
        eprintln!(
            "  {n} endpoints: {:.0} ms in the agent, {:.0} ms from the file write, RSS {rss_mib:.1} MiB, {:.1}% of a core at rest",
            m.agent_ms, m.wall_ms, m.rest_cpu_pct
        );
        scale.push(json!({
            "endpoints": n,
            "agent_ms": m.agent_ms,
            "wall_ms": m.wall_ms,
            "rss_kib": m.rss_kib,
            "rest_cpu_pct": m.rest_cpu_pct,
        }));
    }
    Ok(Section::default()
        .md(table(&scale))
        .json("endpoint_scale", Value::Array(scale)))
}

fn table(scale: &[Value]) -> String {
    let mut t = Table::new([
        "endpoints added to cluster state",
        "programmed by the agent (ms)",
        "file write → programmed (ms, incl. the 500 ms poll)",
        "agent RSS after (MiB)",
        "agent CPU at rest after (% of a core)",
    ]);
    let f = |s: &Value, k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    for s in scale {
        t.row([
            s["endpoints"].to_string(),
            format!("{:.0}", f(s, "agent_ms")),
            format!("{:.0}", f(s, "wall_ms")),
            format!("{:.1}", f(s, "rss_kib") / 1024.0),
            format!("{:.1}", f(s, "rest_cpu_pct")),
        ]);
    }
    t.finish()
}

/// `--scale-only N`: one size, 10 s at rest, one line of results.
pub fn only(agent: &Path, n: usize) -> Result<i32> {
    let m = endpoint_scale(agent, n, Duration::from_secs(10))?;
    #[expect(clippy::cast_precision_loss, reason = "MiB for display")]
    let rss_mib = m.rss_kib as f64 / 1024.0;
    println!(
        "{n} endpoints: {:.0} ms in the agent, {:.0} ms from the file write, RSS {rss_mib:.1} MiB, {:.1}% of a core at rest",
        m.agent_ms, m.wall_ms, m.rest_cpu_pct
    );
    Ok(0)
}
