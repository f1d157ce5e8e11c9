//! `cargo xtask testbed up|down|status|exec`: a simulated cluster to poke at by hand.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use testbed::{Options, Spec, Testbed, TestbedInfo, Wiring};

use crate::cargo;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a testbed and leave it running (agents detached); prints its id and layout.
    Up {
        /// Testbed spec (YAML); default: two nodes with two pods each.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Do not start agents (plumbing only).
        #[arg(long)]
        no_agents: bool,
        /// Agents enforce only: no issuer, no SVIDs, no handshakes (auth entries by
        /// `portcullis auth allow`). By default two issuer replicas hold the CA and every
        /// node joins them with a join token.
        #[arg(long)]
        no_identity: bool,
        /// The agent binary; default env PORTCULLIS_BIN, else `cargo build -p portcullis-agent`.
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// log_level written into the agent configs.
        #[arg(long, default_value = "debug")]
        log_level: String,
        /// How pods are wired on every node: `ptp` or `bridge` (the reference CNI plugins,
        /// with portcullis-cni chained), or `direct` (the testbed's own veths, no CNI);
        /// default: `ptp` on odd nodes and `bridge` on even ones.
        #[arg(long, value_parser = ["direct", "ptp", "bridge"])]
        wiring: Option<String>,
    },
    /// Remove a testbed (by id, e.g. 1a2b or pc1a2b) or all of them, also after a crash.
    Down {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// List the testbeds on this machine with their nodes, pods, addresses and agents.
    Status {
        id: Option<String>,
        /// Print testbed.json instead.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a pod's (or node's) network namespace and cgroup.
    Exec {
        /// Testbed id; optional when only one testbed exists.
        #[arg(long)]
        id: Option<String>,
        /// Pod name (or node name, for a host-network process of that node).
        target: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

/// Runs a testbed command; returns the process exit code.
pub fn run(args: Args) -> Result<i32> {
    match args.command {
        Cmd::Up {
            spec,
            no_agents,
            no_identity,
            agent_bin,
            log_level,
            wiring,
        } => up(
            spec,
            no_agents,
            no_identity,
            agent_bin,
            log_level,
            wiring.as_deref(),
        ),
        Cmd::Down { id, all } => down(id, all),
        Cmd::Status { id, json } => status(id, json),
        Cmd::Exec { id, target, cmd } => exec(id, &target, &cmd),
    }
}

fn up(
    spec: Option<PathBuf>,
    no_agents: bool,
    no_identity: bool,
    agent_bin: Option<PathBuf>,
    log_level: String,
    wiring: Option<&str>,
) -> Result<i32> {
    let wiring = match wiring {
        None if no_agents => Some(Wiring::Direct),
        None => None,
        Some("direct") => Some(Wiring::Direct),
        Some("ptp") => Some(Wiring::Ptp),
        Some("bridge") => Some(Wiring::Bridge),
        Some(other) => anyhow::bail!("--wiring {other}: not direct, ptp or bridge"),
    };
    let spec = match spec {
        Some(path) => Spec::load(&path)?,
        None => Spec::two_nodes(2),
    };
    let agent_bin = if no_agents {
        None
    } else {
        Some(cargo::agent_bin(agent_bin.as_deref())?)
    };
    let opts = Options {
        agents: !no_agents,
        agent_bin,
        log_level,
        authenticate: !no_identity,
        issuer_replicas: 2,
        detach_agents: true,
        wiring,
        ..Options::default()
    };
    let tb = Testbed::up(&spec, &opts)?;
    let info = tb.into_persistent();
    print_summary(&info);
    println!();
    println!(
        "enter a pod:   cargo xtask testbed exec --id {} {} -- bash",
        info.id,
        info.pods.first().map_or("POD", |p| &p.name)
    );
    println!("status:        cargo xtask testbed status {}", info.id);
    println!("remove:        cargo xtask testbed down {}", info.id);
    println!("id: {}", info.id);
    Ok(0)
}

fn down(id: Option<String>, all: bool) -> Result<i32> {
    let id = match (id, all) {
        (Some(id), _) => Some(id),
        (None, true) => None,
        (None, false) => {
            // Without an id, only the unambiguous case: exactly one testbed.
            let ids = testbed::info::list_ids();
            match ids.as_slice() {
                [one] => Some(one.clone()),
                [] => {
                    println!("no testbeds");
                    return Ok(0);
                }
                _ => anyhow::bail!("several testbeds ({}): give an id or --all", ids.join(", ")),
            }
        }
    };
    let removed = testbed::down_by_prefix(id.as_deref())?;
    if removed.is_empty() {
        println!("no testbeds");
    }
    for id in removed {
        println!("removed pc{id}");
    }
    Ok(0)
}

fn status(id: Option<String>, json: bool) -> Result<i32> {
    let ids = match id {
        Some(id) => vec![testbed::info::normalize_id(&id)?],
        None => testbed::info::list_ids(),
    };
    if ids.is_empty() {
        println!("no testbeds");
    }
    for id in ids {
        match TestbedInfo::load(&id) {
            Ok(info) if json => println!("{}", serde_json::to_string_pretty(&info)?),
            Ok(info) => print_summary(&info),
            Err(_) => {
                println!("pc{id}: no testbed.json (crashed?); leftovers:");
                for l in testbed::leftovers(&id) {
                    println!("  {l}");
                }
                println!("  remove with: cargo xtask testbed down {id}");
            }
        }
        println!();
    }
    Ok(0)
}

fn print_summary(info: &TestbedInfo) {
    println!(
        "testbed pc{} (state {}, created by pid {})",
        info.id,
        info.state_dir.display(),
        info.creator_pid
    );
    println!("  nodes:");
    for n in &info.nodes {
        let agent = if !info.agents && !n.pid_file.exists() {
            "no agent".to_string()
        } else {
            match info.agent_pid(&n.name) {
                Some(pid) => format!("agent pid {pid} alive"),
                None => format!("agent NOT running (log {})", n.log_file.display()),
            }
        };
        println!(
            "    {:<12} {:<15} {:<16} pods {} / {}  wired {:?}  netns {}  {agent}",
            n.name, n.ipv4, n.ipv6, n.pod_cidr_v4, n.pod_cidr_v6, n.wiring, n.netns
        );
    }
    println!("  pods:");
    for p in &info.pods {
        println!(
            "    {:<12} on {:<10} {:<15} {:<18} {}/{} sa={}{}  veth {}",
            p.name,
            p.node,
            p.ipv4,
            p.ipv6,
            p.namespace,
            p.name,
            p.service_account,
            if p.enroll { "" } else { " (not enrolled)" },
            p.host_veth
        );
    }
    println!("  cluster state: {}", info.cluster_file.display());
    if let Some(bin) = &info.agent_bin
        && let Some(n) = info.nodes.first()
    {
        println!(
            "  admin CLI:     {} --admin-socket {} …",
            bin.display(),
            n.admin_socket.display()
        );
    }
}

fn exec(id: Option<String>, target: &str, cmd: &[String]) -> Result<i32> {
    let info = TestbedInfo::resolve(id.as_deref())?;
    let tb = Testbed::attach(&info.id)?;
    let mut c = if info.pod(target).is_ok() {
        tb.try_exec(target, cmd)?
    } else if info.node(target).is_ok() {
        tb.try_exec_node(target, cmd)?
    } else {
        anyhow::bail!("testbed {} has no pod or node {target:?}", info.id);
    };
    let status = c
        .status()
        .with_context(|| format!("cannot run {:?}", cmd))?;
    // Shell convention: 128 + signal number for a command killed by a signal.
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
