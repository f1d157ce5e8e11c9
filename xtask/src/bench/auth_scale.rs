//! Control plane with many auth entries: `locals × remotes` pairs written into node-1's agent
//! through its admin API (the call a workload proof's result takes into the map, without the
//! node session or the proofs: `warmup` measures those), the agent's resident memory with
//! them, and revocation at that scale: a policy edit that revokes one local workload's pairs,
//! timed by the agent (its walk over every entry and flow) and from the file write.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{Options, Testbed};

use super::{
    table::{Section, Table},
    util::{log_field, num, rss_kib, scale_workload, spec},
};

const TD: &str = "cluster.local";

fn local_id(i: usize) -> String {
    format!("spiffe://{TD}/ns/scale/sa/l{i}")
}

fn remote_id(j: usize) -> String {
    format!("spiffe://{TD}/ns/remote/sa/r{j}")
}

/// Admits every pair: no rules.
const OPEN: &str = "name: bench\nmode: enforce\n";

/// Local workload `l0` accepts only `r0`, and every remote accepts only `l1`: the pairs of `l0`
/// with the other remotes lose their authorization in both directions; all others keep theirs.
fn restricted() -> String {
    format!(
        "name: bench\nmode: enforce\nrules:\n  - name: l0-from-r0\n    from: [\"{}\"]\n    to: [\"{}\"]\n  - name: remotes-from-l1\n    from: [\"{}\"]\n    to: [\"spiffe://{TD}/ns/remote/*\"]\n",
        remote_id(0),
        local_id(0),
        local_id(1),
    )
}

/// Sends admin requests over as few connections as the agent's per-connection byte limit
/// allows, checking each answer.
fn admin_batch(socket: &Path, requests: impl Iterator<Item = Value>) -> Result<usize> {
    // Under the agent's 64 KiB per-connection limit, with room to spare.
    const PER_CONNECTION_BYTES: usize = 48 * 1024;
    let mut sent = 0;
    let mut requests = requests.peekable();
    while requests.peek().is_some() {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut bytes = 0;
        while let Some(req) = requests.next_if(|_| bytes < PER_CONNECTION_BYTES) {
            let mut line = serde_json::to_vec(&req)?;
            line.push(b'\n');
            bytes += line.len();
            writer.write_all(&line)?;
            let mut answer = String::new();
            reader.read_line(&mut answer)?;
            let answer: Value = serde_json::from_str(&answer)
                .with_context(|| format!("admin answer {answer:?}"))?;
            if answer["result"] != "allowed" {
                bail!("admin request {req} answered {answer}");
            }
            sent += 1;
        }
    }
    Ok(sent)
}

/// The last `auth entries and flows revalidated` record of node-1 that revoked entries:
/// (entries revoked, the agent's time in µs).
fn revalidated(tb: &Testbed) -> Option<(u64, u64)> {
    tb.agent_log("node-1")
        .lines()
        .filter(|l| l.contains("auth entries and flows revalidated"))
        .filter_map(|l| Some((log_field(l, "entries_revoked=")?, log_field(l, "took_us=")?)))
        .rfind(|(revoked, _)| *revoked > 0)
}

/// `locals` workloads on node-1 and `remotes` on node-2 added to cluster state, without
/// interfaces (their identities are all the agent needs for entries); waits until node-1 has
/// loaded them.
fn add_workloads(tb: &Testbed, locals: usize, remotes: usize) -> Result<()> {
    tb.write_cluster_json(|c| {
        for i in 0..locals {
            let (name, address) = (
                format!("l{i}"),
                Ipv4Addr::new(198, 19, 200, (i % 250 + 1) as u8),
            );
            c.workloads.push(scale_workload(
                &name,
                "scale",
                &name,
                "node-1",
                address.into(),
            ));
        }
        for j in 0..remotes {
            let (name, address) = (
                format!("r{j}"),
                Ipv4Addr::new(198, 19, (j / 250) as u8, (j % 250 + 1) as u8),
            );
            c.workloads.push(scale_workload(
                &name,
                "remote",
                &name,
                "node-2",
                address.into(),
            ));
        }
    })?;
    // The testbed's own two pods, and ours.
    let loaded = format!("workloads={}", locals + remotes + 2);
    let applied = Instant::now();
    while !tb
        .agent_log("node-1")
        .lines()
        .any(|l| l.contains("cluster state loaded") && l.contains(&loaded))
    {
        if applied.elapsed() > Duration::from_secs(60) {
            bail!("node-1 did not load the scale workloads within 60 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `locals × remotes` entries written, then the revoking policy edit.
pub fn run(agent: &Path, locals: usize, remotes: usize) -> Result<Value> {
    let tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            log_level: "info".into(),
            policy: Some(OPEN.into()),
            poll_interval_ms: Some(50),
            ..Options::default()
        },
    )?;
    add_workloads(&tb, locals, remotes)?;
    let socket = tb.info().node("node-1")?.admin_socket.clone();
    let pid = i64::from(tb.info().agent_pid("node-1").context("node-1 agent pid")?);
    let rss_before = rss_kib(pid)?;
    let n = locals * remotes;
    let started = Instant::now();
    let written = admin_batch(
        &socket,
        (0..locals).flat_map(|i| {
            (0..remotes).map(move |j| {
                json!({"op": "auth_allow", "local": local_id(i), "remote": remote_id(j),
                       "remote_node": "node-2", "ttl_secs": 3600})
            })
        }),
    )?;
    let write_s = started.elapsed().as_secs_f64();
    if written != n {
        bail!("wrote {written} of {n} auth entries");
    }
    let rss_after = rss_kib(pid)?;

    let edit = Instant::now();
    tb.set_policy(&restricted())?;
    let (revoked, took_us) = loop {
        if let Some(r) = revalidated(&tb) {
            break r;
        }
        if edit.elapsed() > Duration::from_secs(60) {
            bail!("node-1 did not revalidate within 60 s of the policy edit");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let wall_ms = edit.elapsed().as_secs_f64() * 1000.0;
    if revoked as usize != remotes - 1 {
        bail!(
            "the policy edit revoked {revoked} entries, expected {}",
            remotes - 1
        );
    }
    #[expect(clippy::cast_precision_loss, reason = "rates and milliseconds")]
    Ok(json!({
        "entries": n,
        "write_s": write_s,
        "entries_per_s": n as f64 / write_s,
        "rss_kib_before": rss_before,
        "rss_kib": rss_after,
        "revoked": revoked,
        "revoke_agent_ms": took_us as f64 / 1000.0,
        "revoke_wall_ms": wall_ms,
        "poll_interval_ms": 50,
    }))
}

/// The full run's measurement (`--quick`: 10 × 100 pairs), with its table.
pub fn section(agent: &Path, quick: bool) -> Result<Section> {
    let (locals, remotes) = if quick { (10, 100) } else { (100, 1_000) };
    eprintln!(
        "control plane: {} auth entries, then a policy edit revoking {}…",
        locals * remotes,
        remotes - 1
    );
    let auth = run(agent, locals, remotes)?;
    eprintln!(
        "  {} entries written at {:.0}/s, RSS {:.1} → {:.1} MiB; revocation: {:.1} ms in the agent, {:.0} ms from the file write",
        auth["entries"],
        num(&auth["entries_per_s"]),
        num(&auth["rss_kib_before"]) / 1024.0,
        num(&auth["rss_kib"]) / 1024.0,
        num(&auth["revoke_agent_ms"]),
        num(&auth["revoke_wall_ms"]),
    );
    let mut t = Table::new([
        "auth entries written through the admin API".to_owned(),
        "entries/s".to_owned(),
        "agent RSS before → after (MiB)".to_owned(),
        format!(
            "policy edit revoking {} of them: agent (ms)",
            auth["revoked"]
        ),
        format!(
            "file write → revoked (ms, {} ms poll)",
            auth["poll_interval_ms"]
        ),
    ]);
    t.row([
        auth["entries"].to_string(),
        format!("{:.0}", num(&auth["entries_per_s"])),
        format!(
            "{:.1} → {:.1}",
            num(&auth["rss_kib_before"]) / 1024.0,
            num(&auth["rss_kib"]) / 1024.0
        ),
        format!("{:.1}", num(&auth["revoke_agent_ms"])),
        format!("{:.0}", num(&auth["revoke_wall_ms"])),
    ]);
    Ok(Section::default().md(t.finish()).json("auth_scale", auth))
}

/// `--auth-only`: 100 × 1,000 pairs; prints the measurement's JSON.
pub fn only(agent: &Path) -> Result<i32> {
    println!("{}", run(agent, 100, 1_000)?);
    Ok(0)
}
