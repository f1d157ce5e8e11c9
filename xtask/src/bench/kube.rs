//! Cluster state from the Kubernetes API at scale: N realistic Pod objects (about 4 KB of JSON
//! each, managed fields and all) served by the wire-format API server of the testbed library,
//! listed in pages by node-1's agent. Measured: the time from the agent's start until it is
//! ready with every pod programmed, and its resident memory then.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{
    Options, Testbed,
    kube_api::{
        FakeApi, Kind, SCALE_CIDRS, realistic_node, realistic_pod, scale_pods, serve_in_netns,
    },
};

use super::{
    table::Table,
    util::{rss_kib, spec},
};

/// What one size measured.
pub struct Ready {
    pub pods: usize,
    /// From the agent's start until `status` says ready.
    pub ready_s: f64,
    pub rss_kib: u64,
}

/// The testbed, the API server with `n` pods on an API-only node plus the testbed's own two,
/// and node-1's agent pointed at it (not yet started).
pub struct World {
    pub tb: Testbed,
    pub api: FakeApi,
}

impl World {
    pub fn up(agent: &std::path::Path, n: usize) -> Result<Self> {
        let tb = Testbed::up(
            &spec(),
            &Options {
                agent_bin: Some(agent.to_owned()),
                log_level: "info".into(),
                agent_ready_timeout: Duration::from_secs(900),
                ..Options::without_agents()
            },
        )?;
        let n1 = tb.node("node-1").clone();
        let api = serve_in_netns(&n1.netns, (n1.ipv4, 0).into())?;
        for (i, name) in ["node-1", "node-2"].into_iter().enumerate() {
            api.apply(
                Kind::Node,
                realistic_node(
                    name,
                    tb.node(name).ipv4.into(),
                    &[&format!("198.18.{}.0/24", i + 1)],
                ),
            );
        }
        api.apply(
            Kind::Node,
            realistic_node("node-3", "198.18.0.250".parse()?, &SCALE_CIDRS),
        );
        let own = ["client", "server"].into_iter().enumerate().map(|(i, p)| {
            let info = tb.pod(p);
            realistic_pod(
                p,
                "default",
                &info.node,
                p,
                &[info.ipv4.into(), info.ipv6.into()],
                i,
            )
        });
        let own: Vec<Value> = own.collect();
        api.apply_all(Kind::Pod, own.into_iter().chain(scale_pods(n, "node-3", 2)));
        let url = api.url();
        tb.write_agent_config("node-1", |c| {
            c.cluster_state = None;
            c.extra.insert(
                "kubernetes".into(),
                serde_yaml::to_value(json!({"api_server": url, "trust_domain": "cluster.local"}))
                    .expect("a JSON value is YAML"),
            );
        })?;
        Ok(Self { tb, api })
    }

    /// node-1's status, or `None` while it does not answer.
    pub fn status(&self) -> Option<Value> {
        let out = self
            .tb
            .portcullis("node-1", &["status", "--output", "json"])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }
}

/// Starts node-1's agent against `n` pods and waits until it is ready.
pub fn ready(agent: &std::path::Path, n: usize) -> Result<Ready> {
    start(agent, n).map(|(_, r)| r)
}

/// Like [`ready`], keeping the world (testbed, API server, agent) for more measurements.
pub fn start(agent: &std::path::Path, n: usize) -> Result<(World, Ready)> {
    let mut w = World::up(agent, n)?;
    eprintln!(
        "kubernetes source: serving {} realistic pods",
        w.api.count(Kind::Pod)
    );
    let start = Instant::now();
    w.tb.start_agent("node-1")?;
    let status = loop {
        if let Some(s) = w.status()
            && s["agent"]["ready"].as_bool() == Some(true)
        {
            break s;
        }
        if start.elapsed() > Duration::from_secs(900) {
            bail!(
                "node-1's agent was not ready with {n} pods after 900 s; its log:\n{}",
                w.tb.agent_log("node-1")
            );
        }
        thread::sleep(Duration::from_millis(100));
    };
    let ready_s = start.elapsed().as_secs_f64();
    let pid = status["agent"]["pid"]
        .as_i64()
        .context("agent pid in status")?;
    let endpoints = status["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "endpoints"))
        .and_then(|m| m["entries"].as_u64())
        .unwrap_or(0);
    if (endpoints as usize) < n {
        bail!("node-1's agent is ready with {endpoints} endpoints, fewer than the {n} pods");
    }
    let rss_kib = rss_kib(pid)?;
    eprintln!(
        "  {n} pods: ready in {ready_s:.1} s, RSS {:.1} MiB",
        rss_kib as f64 / 1024.0
    );
    let ready = Ready {
        pods: n,
        ready_s,
        rss_kib,
    };
    Ok((w, ready))
}

/// `--kube-only N,N…`: time to ready and RSS at each size, one table row each as it comes.
pub fn only(agent: &std::path::Path, sizes: &[usize]) -> Result<i32> {
    let table = Table::new([
        "Pod objects in the API",
        "agent start → ready (s)",
        "agent RSS (MiB)",
    ]);
    print!("{}", table.finish());
    for n in sizes {
        let r = ready(agent, *n)?;
        let mut row = Table::rows();
        row.row([
            r.pods.to_string(),
            format!("{:.1}", r.ready_s),
            format!("{:.1}", r.rss_kib as f64 / 1024.0),
        ]);
        print!("{}", row.finish());
    }
    Ok(0)
}
