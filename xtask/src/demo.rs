//! `cargo xtask demo`: a three-node testbed telling, in plain words, how a connection between
//! pods on two nodes is admitted after the agents authenticated the pair by mutual TLS, with
//! no manual step, and how a pod whose node holds SVIDs from a CA nobody trusts is dropped —
//! with the audit lines that explain each. Tears everything down at the end.

use std::time::Duration;

use anyhow::{Result, bail};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    scenario::{Family, Scenario, counter, eventually, ok},
};

use crate::cargo;

const PORT: u16 = 8080;

#[derive(clap::Args)]
pub struct Args {}

fn say(step: &str) {
    println!("\n\x1b[1m▶ {step}\x1b[0m");
}

/// The audit lines of `node`'s agent log, shortened to their message and fields.
fn audit_lines(tb: &Testbed, node: &str, skip: usize) -> Vec<String> {
    tb.agent_log(node)
        .lines()
        .filter(|l| l.contains("portcullis::audit"))
        .skip(skip)
        .map(|l| {
            l.split_once("portcullis::audit: ")
                .map_or(l, |(_, rest)| rest)
                .to_owned()
        })
        .collect()
}

pub fn run(_args: Args) -> Result<i32> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let agent = cargo::agent_bin(None)?;
    let probe = cargo::probe_bin()?;
    say("Building a three-node cluster in network namespaces");
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("frontend")]),
            NodeSpec::new("node-2", vec![PodSpec::new("backend")]),
            NodeSpec::new("node-3", vec![PodSpec::new("intruder")]),
        ],
    };
    let opts = Options {
        agent_bin: Some(agent),
        log_level: "info".into(),
        authenticate: true,
        issuer_replicas: 2,
        ..Options::default()
    };
    let mut tb = Testbed::up(&spec, &opts)?;
    // node-3's agent gets SVIDs from a CA of its own, which nobody else trusts.
    let rogue = tb.state_dir().join("rogue-ca");
    tb.make_ca(&rogue)?;
    tb.use_ca("node-3", &rogue)?;
    let s = Scenario { tb: &tb, probe };
    for pod in ["frontend", "backend", "intruder"] {
        println!(
            "  {pod:<9} on {} at {:<11} is {}",
            tb.pod(pod).node,
            s.addr(pod, Family::V4),
            s.identity(pod)
        );
    }
    println!(
        "  two issuer replicas (198.18.0.250, .251) hold the only copy of the CA key, in a namespace of\n  \
         their own; node-1 and node-2 joined them with single-use tokens and got their pods' SVIDs;\n  \
         node-3's come from a CA nobody trusts"
    );
    println!(
        "  one portcullis agent per node; state and logs in {}",
        tb.state_dir().display()
    );

    let _server = s.serve("backend", PORT);
    let target = s.addr("backend", Family::V4);
    // The agents are ready once the issuer has signed their pods' SVIDs; proactive
    // authentication then proves the pair before anyone connects.
    let _ = eventually(Duration::from_secs(5), || {
        ["node-1", "node-2"]
            .iter()
            .all(|n| s.status(n)["agent"]["ready"] == true)
            && s.status("node-1")["auth"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    });
    say("frontend connects to backend:8080 — nobody has written any auth entry");
    let r = s.connect("frontend", target, PORT, 5000);
    if !ok(&r) {
        bail!("the connection was not admitted after authentication: {r}");
    }
    let ms = r["connect_ms"].as_f64().unwrap_or(0.0);
    if ms < 100.0 {
        println!(
            "  connected in {ms:.2} ms: the agents had already authenticated the pair by mutual TLS in the\n  \
             background (proactive authentication), so not even the first SYN was dropped"
        );
    } else {
        println!(
            "  connected in {ms:.0} ms: node-2 dropped the first SYN, the agents proved both workloads in their\n  \
             mutual-TLS node session, and the kernel's SYN retransmission found the auth entry"
        );
    }
    let _ = eventually(Duration::from_secs(2), || {
        !audit_lines(&tb, "node-2", 0).is_empty()
    });
    println!("  node-2's audit log:");
    for line in audit_lines(&tb, "node-2", 0) {
        println!("    {line}");
    }
    let r = s.connect("frontend", target, PORT, 3000);
    println!(
        "  a second connection: {} in {:.2} ms, straight through",
        if ok(&r) { "connected" } else { "FAILED" },
        r["connect_ms"].as_f64().unwrap_or(0.0)
    );

    say("intruder (node-3, untrusted CA) connects to backend:8080");
    let seen = audit_lines(&tb, "node-2", 0).len();
    let r = s.connect("intruder", target, PORT, 2500);
    if ok(&r) {
        bail!("the intruder got through: {r}");
    }
    println!(
        "  dropped: connect() gave up after {:.0} ms",
        r["elapsed_ms"].as_f64().unwrap_or(0.0)
    );
    let _ = eventually(Duration::from_secs(3), || {
        audit_lines(&tb, "node-2", seen).len() >= 2
    });
    println!("  node-2's audit log:");
    for line in audit_lines(&tb, "node-2", seen).iter().take(4) {
        println!("    {line}");
    }
    println!(
        "  node-2's kernel counted {} dropped connection attempts (drop_no_auth)",
        counter(&s.status("node-2"), "drop_no_auth")
    );

    say("What the issuer decided (its audit log)");
    for r in testbed::issuer::audit_records(&tb.issuer_audit_log()) {
        println!(
            "  {:<10} {:<7} node {:<7} {} {}",
            r["op"].as_str().unwrap_or(""),
            r["result"].as_str().unwrap_or(""),
            r["node"].as_str().unwrap_or(""),
            r["identity"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }

    say("What node-2's agent shows (`portcullis status`)");
    let (_, text) = s.portcullis("node-2", &["status"]);
    for line in text.lines() {
        println!("  {line}");
    }
    say("Tearing the testbed down");
    drop(_server);
    tb.down()?;
    println!("  done");
    Ok(0)
}
