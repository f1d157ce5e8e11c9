//! `cargo xtask demo`: a two-node testbed showing, in plain words, a connection dropped for
//! want of authentication, an auth entry being added, the same connection succeeding, and
//! where the drop was counted. Tears everything down at the end.

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

pub fn run(_args: Args) -> Result<i32> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let agent = cargo::agent_bin(None)?;
    let probe = cargo::probe_bin()?;
    say(
        "Building a two-node cluster in network namespaces: `frontend` on node-1, `backend` on node-2",
    );
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("frontend")]),
            NodeSpec::new("node-2", vec![PodSpec::new("backend")]),
        ],
    };
    let tb = Testbed::up(
        &spec,
        &Options {
            agent_bin: Some(agent),
            log_level: "info".into(),
            ..Options::default()
        },
    )?;
    let s = Scenario { tb: &tb, probe };
    let (frontend, backend) = (s.identity("frontend"), s.identity("backend"));
    println!("  frontend {} = {frontend}", s.addr("frontend", Family::V4));
    println!("  backend  {} = {backend}", s.addr("backend", Family::V4));
    println!(
        "  one portcullis agent per node; state and logs in {}",
        tb.state_dir().display()
    );

    let _server = s.serve("backend", PORT);
    let target = s.addr("backend", Family::V4);
    say("frontend connects to backend:8080, with no auth entry for the pair");
    let r = s.connect("frontend", target, PORT, 1500);
    if ok(&r) {
        bail!("the connection got through without authentication: {r}");
    }
    println!(
        "  dropped: connect() gave up ({}) after {:.0} ms — the SYN never reached backend",
        r["kind"].as_str().unwrap_or("failed"),
        r["elapsed_ms"].as_f64().unwrap_or(0.0)
    );
    let status = s.status("node-2");
    println!(
        "  node-2's kernel counted it: drop_no_auth = {}",
        counter(&status, "drop_no_auth")
    );
    let _ = eventually(Duration::from_secs(3), || {
        !s.status("node-2")["events"]
            .as_array()
            .is_none_or(Vec::is_empty)
    });
    if let Some(e) = s.status("node-2")["events"]
        .as_array()
        .and_then(|e| e.last())
    {
        let f = |k: &str| e[k].as_str().unwrap_or("?").to_owned();
        println!(
            "  and told its agent: {} ({}) {} -> {}",
            f("kind"),
            f("reason"),
            f("remote_addr"),
            f("local_addr")
        );
        println!(
            "    pair: {} <- {} @ {}",
            f("local"),
            f("remote"),
            f("remote_node")
        );
    }

    say("Adding the auth entry (backend <- frontend @ node-1) through node-2's agent");
    println!(
        "  $ portcullis auth allow --local {backend} --remote {frontend} --remote-node node-1"
    );
    print!("  {}", s.allow("backend", "frontend"));

    say("frontend connects again");
    let r = s.connect("frontend", target, PORT, 3000);
    if !ok(&r) {
        bail!("the authenticated connection failed: {r}");
    }
    println!("  connected in {} ms", r["connect_ms"]);

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
