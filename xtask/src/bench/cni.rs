//! CNI ADD with `portcullis-cni` chained, against the same chain without it, measured in the
//! same run on the same node: the time a runtime's ADD takes, which with the plugin is the
//! time until the pod is enforced (ADD returns once the agent enforces it). On a `ptp` node
//! and a `bridge` node of one testbed, pods are added one at a time with the agent up, an
//! enrolled pod (full chain) and a pod outside enforcement (chain without the plugin)
//! alternately, so that both see the same machine. Then the agent of each node is stopped, one
//! more pod is added (ADD does not wait for an agent that is down), and the time from the
//! agent's start to that pod being enforced is taken.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{NodeSpec, Options, PodSpec, Spec, Testbed, Wiring};

use super::{
    table::{Section, Table},
    util::{num, percentile},
};

/// Pods of each kind added per node.
fn pods(quick: bool) -> usize {
    if quick { 3 } else { 40 }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sample(v: &[f64]) -> Value {
    json!({"median": percentile(v, 50.0), "p99": percentile(v, 99.0), "samples": v})
}

/// Whether the agent on `node` lists `pod` among its enforced interfaces.
fn enforced(tb: &Testbed, node: &str, pod: &str) -> Result<bool> {
    let out = tb
        .portcullis(node, &["status", "--output", "json"])
        .output()
        .context("running portcullis status")?;
    let st: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok(st["interfaces"]
        .as_array()
        .is_some_and(|is| is.iter().any(|i| i["workload"] == format!("default/{pod}"))))
}

fn measure_node(tb: &mut Testbed, node: &str, n: usize) -> Result<Value> {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    // The CNI ADD alone, as the runtime runs it (the testbed's own steps, such as writing
    // the pod into cluster state first, are outside it).
    for k in 0..n {
        let (_, took) = tb
            .add_pod_timed(node, PodSpec::new(format!("{node}-e{k}")))
            .with_context(|| format!("adding an enrolled pod on {node}"))?;
        with.push(ms(took));
        let (_, took) = tb
            .add_pod_timed(node, PodSpec::new(format!("{node}-p{k}")).enroll(false))
            .with_context(|| format!("adding a pod outside enforcement on {node}"))?;
        without.push(ms(took));
    }
    for k in 0..n {
        let pod = format!("{node}-e{k}");
        if !enforced(tb, node, &pod)? {
            bail!("{pod} is not enforced after its ADD returned");
        }
    }
    // With the agent down: ADD returns without waiting, the pod is held, and enforced once
    // the agent is back.
    tb.stop_agent(node)?;
    let late = format!("{node}-late");
    let (_, took) = tb.add_pod_timed(node, PodSpec::new(late.clone()))?;
    let add_down = ms(took);
    let started = Instant::now();
    tb.start_agent(node)?;
    let ready = ms(started.elapsed());
    let limit = Instant::now() + Duration::from_secs(30);
    while !enforced(tb, node, &late)? {
        if Instant::now() > limit {
            bail!("{late} was not enforced within 30 s of its agent starting");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let enrolled = ms(started.elapsed());
    Ok(json!({
        "node": node,
        "wiring": format!("{:?}", tb.node(node).wiring).to_lowercase(),
        "add_with_plugin_ms": sample(&with),
        "add_without_plugin_ms": sample(&without),
        "add_agent_down_ms": add_down,
        "agent_start_to_ready_ms": ready,
        "agent_start_to_enforced_ms": enrolled,
    }))
}

pub fn run(agent: &Path, quick: bool) -> Result<Vec<Value>> {
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", Vec::new()),
            NodeSpec::new("node-2", Vec::new()),
        ],
    };
    let mut tb = Testbed::up(
        &spec,
        &Options {
            agent_bin: Some(agent.to_owned()),
            log_level: "info".into(),
            wiring: None,
            ..Options::default()
        },
    )?;
    if tb.node("node-1").wiring != Wiring::Ptp || tb.node("node-2").wiring != Wiring::Bridge {
        bail!("expected node-1 wired by ptp and node-2 by bridge");
    }
    let n = pods(quick);
    let mut rows = Vec::new();
    for node in ["node-1", "node-2"] {
        eprintln!("CNI ADD: {n} + {n} pods on {node}…");
        rows.push(measure_node(&mut tb, node, n)?);
    }
    Ok(rows)
}

fn table(rows: &[Value], n: usize) -> String {
    let mut t = Table::new([
        "CNI ADD, one pod at a time (agent up)",
        "with portcullis-cni: ADD → enforced, median / p99 (ms)",
        "without it, same node, median / p99 (ms)",
        "added by portcullis-cni, median (ms)",
        "ADD, agent down (ms)",
        "agent start → held pod enforced (ms)",
    ]);
    for r in rows {
        let (w, o) = (&r["add_with_plugin_ms"], &r["add_without_plugin_ms"]);
        t.row([
            format!(
                "{} ({}, {n} + {n} pods)",
                r["node"].as_str().unwrap_or("?"),
                r["wiring"].as_str().unwrap_or("?")
            ),
            format!("{:.1} / {:.1}", num(&w["median"]), num(&w["p99"])),
            format!("{:.1} / {:.1}", num(&o["median"]), num(&o["p99"])),
            format!("{:.1}", num(&w["median"]) - num(&o["median"])),
            format!("{:.1}", num(&r["add_agent_down_ms"])),
            format!("{:.0}", num(&r["agent_start_to_enforced_ms"])),
        ]);
    }
    t.finish()
}

pub fn section(agent: &Path, quick: bool) -> Result<Section> {
    let rows = run(agent, quick)?;
    Ok(Section::default()
        .md(table(&rows, pods(quick)))
        .json("cni_add", Value::Array(rows)))
}

/// `--cni-only`: the table and the measurement's JSON.
pub fn only(agent: &Path, quick: bool) -> Result<i32> {
    let rows = run(agent, quick)?;
    println!("{}", table(&rows, pods(quick)));
    println!("{}", Value::Array(rows));
    Ok(0)
}
