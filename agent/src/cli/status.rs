use std::{fmt::Write as _, process::ExitCode};

use super::Target;
use crate::{
    admin::{self, Request, Response},
    datapath::PinnedView,
    registry::Registry,
    status::{self, AgentInfo, Status},
};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Show what the agent enforces: interfaces, auth entries, flows with both identities,
/// counters and recent events. When the agent is down, reads the pinned maps, says so, and
/// exits non-zero.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show one section only: `auth` (every auth entry) or `flows` (every tracked connection
    /// with both SPIFFE IDs — an `ss` for identities).
    #[arg(value_enum)]
    section: Option<Section>,
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Section {
    Auth,
    Flows,
}

pub fn execute(target: &Target, args: &Args) -> anyhow::Result<ExitCode> {
    let (status, code) = match admin::call(&target.admin_socket, &Request::Status) {
        Ok(Response::Status(s)) => (*s, ExitCode::SUCCESS),
        Ok(Response::Error { message }) => anyhow::bail!("the agent answered: {message}"),
        Ok(other) => anyhow::bail!("unexpected answer: {other:?}"),
        Err(e) => {
            eprintln!("portcullis: the agent is not answering ({e}); reading the pinned maps");
            (offline(target)?, ExitCode::FAILURE)
        }
    };
    match (args.section, args.output) {
        (None, Output::Json) => println!("{}", serde_json::to_string_pretty(&status)?),
        (None, Output::Text) => print!("{}", render(&status)),
        (Some(Section::Auth), Output::Json) => {
            println!("{}", serde_json::to_string_pretty(&status.auth)?)
        }
        (Some(Section::Flows), Output::Json) => {
            println!("{}", serde_json::to_string_pretty(&status.flows)?)
        }
        (Some(section), Output::Text) => print!("{}", render_section(&status, section)),
    }
    Ok(code)
}

fn offline(target: &Target) -> anyhow::Result<Status> {
    let view = PinnedView::open(&target.bpffs_dir)?;
    let registry = Registry::load(view.names()?);
    let now = status::boot_ns();
    let (auth, flows) = (view.auth_entries()?, view.flows()?);
    Ok(Status {
        agent: AgentInfo {
            running: false,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            node: target.config.as_ref().map(|c| c.node.clone()),
            pid: None,
            uptime_secs: None,
            config: target
                .config
                .as_ref()
                .map(|c| c.source.display().to_string()),
            cluster_state: target.config.as_ref().map(|c| {
                c.cluster_state
                    .as_ref()
                    .map_or_else(|| "kubernetes API".to_owned(), |p| p.display().to_string())
            }),
            cluster_error: None,
            bpffs_dir: target.bpffs_dir.display().to_string(),
            mode: String::new(),
            policy: None,
            policy_error: None,
            first_connection: None,
            identity_source: String::new(),
            ready: false,
            not_ready: vec!["the agent is down".to_owned()],
        },
        interfaces: Vec::new(),
        pending: Vec::new(),
        held: Vec::new(),
        counters: status::counters(view.counters()?),
        maps: Vec::new(),
        auth_total: auth.len() as u64,
        flows_total: flows.len() as u64,
        auth: status::auth_entries(&registry, auth, now, &|_| None),
        flows: status::flows(&registry, flows, now),
        events: Vec::new(),
        events_total: 0,
        events_dropped: 0,
        handshakes_deferred: 0,
        identities: Vec::new(),
        identity_problems: Vec::new(),
        node_svid_not_after_unix: None,
        handshakes: Vec::new(),
        sessions: Vec::new(),
        cluster_refusals: None,
        workloads: 0,
        names_reclaimed: 0,
    })
}

fn render_section(s: &Status, section: Section) -> String {
    let mut o = String::new();
    match section {
        Section::Auth => {
            let _ = writeln!(
                o,
                "{:<48} {:<48} {:<12} {:>8} {:>12}  INBOUND PORTS",
                "LOCAL", "REMOTE", "NODE", "AGE", "EXPIRES IN"
            );
            for e in &s.auth {
                let _ = writeln!(
                    o,
                    "{:<48} {:<48} {:<12} {:>7}s {:>11}s  {}",
                    e.local,
                    e.remote,
                    e.remote_node,
                    e.age_secs,
                    e.expires_in_secs,
                    e.inbound_ports
                );
            }
        }
        Section::Flows => {
            let _ = writeln!(
                o,
                "{:<5} {:<9} {:<44} {:<44} {:<44} {:<44} {:<10}",
                "PROTO",
                "DIRECTION",
                "LOCAL",
                "REMOTE",
                "LOCAL IDENTITY",
                "REMOTE IDENTITY",
                "NODE"
            );
            for f in &s.flows {
                let _ = writeln!(
                    o,
                    "{:<5} {:<9} {:<44} {:<44} {:<44} {:<44} {:<10}",
                    f.proto,
                    f.direction,
                    f.local,
                    f.remote,
                    f.local_identity,
                    f.remote_identity,
                    f.remote_node
                );
            }
        }
    }
    o
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn render(s: &Status) -> String {
    let mut o = String::new();
    let a = &s.agent;
    let state = if a.running {
        "running"
    } else {
        "DOWN (read from pinned maps; enforcement continues)"
    };
    let _ = writeln!(o, "agent      {state}");
    let _ = writeln!(o, "node       {}", a.node.as_deref().unwrap_or("?"));
    let _ = writeln!(
        o,
        "mode       {}; identities from {}",
        a.mode,
        if a.identity_source.is_empty() {
            "?"
        } else {
            &a.identity_source
        }
    );
    if a.running {
        let health = if a.ready {
            "ready".to_owned()
        } else {
            format!("NOT READY: {}", a.not_ready.join("; "))
        };
        let _ = writeln!(o, "health     {health}");
    }
    if let Some(up) = a.uptime_secs {
        let _ = writeln!(o, "uptime     {up}s (pid {})", a.pid.unwrap_or(0));
    }
    let _ = writeln!(o, "bpffs      {}", a.bpffs_dir);
    if let Some(err) = &a.cluster_error {
        let _ = writeln!(o, "cluster    LAST EDIT REJECTED: {err}");
    }
    if let Some(p) = &a.policy {
        let _ = writeln!(o, "policy     {p}");
    }
    if let Some(err) = &a.policy_error {
        let _ = writeln!(o, "policy     LAST EDIT REJECTED: {err}");
    }
    if let Some(fc) = &a.first_connection {
        let _ = writeln!(o, "first conn {fc}");
    }
    if a.running {
        let _ = writeln!(
            o,
            "workloads  {} in cluster state{}",
            s.workloads,
            if s.names_reclaimed > 0 {
                format!("; {} numbers of names gone reclaimed", s.names_reclaimed)
            } else {
                String::new()
            }
        );
    }
    if let Some(r) = &s.cluster_refusals
        && (r.current > 0 || !r.total.is_empty())
    {
        let totals: Vec<String> = r.total.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            o,
            "refused    {} pods left out now (since start: {})",
            r.current,
            totals.join(", ")
        );
        for p in &r.pods {
            let _ = writeln!(o, "  {p}");
        }
        if r.current > r.pods.len() as u64 {
            let _ = writeln!(o, "  … and {} more", r.current - r.pods.len() as u64);
        }
    }
    let _ = writeln!(o, "\ninterfaces ({})", s.interfaces.len());
    for i in &s.interfaces {
        let addrs: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            o,
            "  {:<12} #{:<4} {:<24} {} [{}] ({}{})",
            i.interface,
            i.ifindex,
            i.workload,
            i.identity,
            addrs.join(", "),
            i.attached,
            if i.mode.is_empty() {
                String::new()
            } else {
                format!(", mode {}", i.mode)
            }
        );
        if let Some(p) = &i.problem {
            let _ = writeln!(o, "    PROBLEM: {p}");
        }
    }
    for p in &s.pending {
        let _ = writeln!(o, "  (waiting for the interface of {p})");
    }
    for h in &s.held {
        let _ = writeln!(
            o,
            "  {h}: held in default-deny (not a workload of this node in cluster state yet)"
        );
    }
    if !s.identities.is_empty() || !s.identity_problems.is_empty() {
        let _ = writeln!(o, "\nidentities ({})", s.identities.len());
        for i in &s.identities {
            let renew = i
                .renew_in_secs
                .map_or_else(String::new, |r| format!(", renewed in {r}s"));
            let left = i.not_after_unix.saturating_sub(now_unix());
            let _ = writeln!(
                o,
                "  {}   serial {}, expires in {left}s{renew}",
                i.id, i.serial
            );
        }
        if let Some(t) = s.node_svid_not_after_unix {
            let _ = writeln!(
                o,
                "  node SVID expires in {}s",
                t.saturating_sub(now_unix())
            );
        }
        let first = s.identities.iter().map(|i| i.not_after_unix).min();
        if let Some(t) = first {
            let _ = writeln!(
                o,
                "  first SVID expires in {}s",
                t.saturating_sub(now_unix())
            );
        }
        for p in &s.identity_problems {
            let _ = writeln!(o, "  PROBLEM: {p}");
        }
    }
    let _ = writeln!(o, "\nauth entries ({})", listed(s.auth.len(), s.auth_total));
    for e in &s.auth {
        let keys = match (&e.key_out, &e.key_in) {
            (Some(o), Some(i)) => format!(", keys out {o} in {i}"),
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "  {} <- {} @ {}   age {}s, expires in {}s, inbound ports {}{keys}",
            e.local, e.remote, e.remote_node, e.age_secs, e.expires_in_secs, e.inbound_ports
        );
    }
    if !s.sessions.is_empty() {
        let _ = writeln!(o, "\nnode sessions ({})", s.sessions.len());
        for x in &s.sessions {
            let _ = writeln!(o, "  {} at {} ({})", x.node, x.peer, x.direction);
        }
    }
    let _ = writeln!(o, "\nflows ({})", listed(s.flows.len(), s.flows_total));
    for f in &s.flows {
        let arrow = if f.direction == "inbound" { "<-" } else { "->" };
        let _ = writeln!(
            o,
            "  {} {} {arrow} {}   {} {arrow} {} @ {}",
            f.proto, f.local, f.remote, f.local_identity, f.remote_identity, f.remote_node
        );
    }
    if !s.maps.is_empty() {
        let _ = writeln!(o, "\nmaps");
        for m in &s.maps {
            let mut line = format!("  {:<10} {:>8} / {:<8}", m.name, m.entries, m.capacity);
            // An LRU map stays a little short of its capacity (per-CPU free lists).
            if m.entries.saturating_mul(100) >= m.capacity.saturating_mul(99) {
                line.push_str(if m.name == "flows" {
                    " FULL (evicting the least recently used)"
                } else {
                    " FULL"
                });
            }
            if m.missing > 0 {
                let _ = write!(line, " {} not programmed", m.missing);
            }
            if m.refused > 0 {
                let _ = write!(line, " {} refused", m.refused);
            }
            if m.evicted > 0 {
                let _ = write!(line, " {} evicted", m.evicted);
            }
            if let Some(e) = &m.error {
                let _ = write!(line, " ({e})");
            }
            let _ = writeln!(o, "{line}");
        }
    }
    let _ = writeln!(o, "\ncounters");
    for (name, value) in &s.counters {
        if *value > 0 {
            let _ = writeln!(o, "  {name:<22} {value}");
        }
    }
    if !s.handshakes.is_empty() {
        let _ = writeln!(o, "\nrecent sessions and proofs");
        for h in s.handshakes.iter().rev().take(10) {
            let reason = match (&h.reason, &h.decided_by) {
                (Some(r), Some(by)) => format!(" ({r}, decided by {by})"),
                (Some(r), None) => format!(" ({r})"),
                _ => String::new(),
            };
            let _ = writeln!(
                o,
                "  {} {} {}{reason}: {} <-> {} @ {}, {} ms",
                if h.stage.is_empty() {
                    "proof"
                } else {
                    &h.stage
                },
                h.role,
                h.result,
                h.local.as_deref().unwrap_or("-"),
                h.remote.as_deref().unwrap_or("-"),
                h.remote_node.as_deref().unwrap_or("-"),
                h.took_ms
            );
        }
    }
    let lost = s.counters.get("event_lost").copied().unwrap_or(0);
    if lost + s.events_dropped + s.handshakes_deferred > 0 {
        let _ = writeln!(
            o,
            "\noverload: {lost} events lost (ring buffer full), {} dropped (agent busy), {} proofs deferred",
            s.events_dropped, s.handshakes_deferred
        );
    }
    if !s.events.is_empty() {
        let _ = writeln!(o, "\nrecent events ({} in total)", s.events_total);
        for e in s.events.iter().rev().take(10) {
            let times = if e.count > 1 {
                format!(" ×{}", e.count)
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "  {} {}{times}: {} {} -> {} ({} <- {} @ {})",
                e.kind,
                e.reason,
                e.proto,
                e.remote_addr,
                e.local_addr,
                e.local,
                e.remote,
                e.remote_node
            );
        }
    }
    o
}

/// "N", or "N, the first M listed" when the agent listed only some.
fn listed(shown: usize, total: u64) -> String {
    if total > shown as u64 {
        format!("{total}, the first {shown} listed")
    } else {
        shown.to_string()
    }
}
