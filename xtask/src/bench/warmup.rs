//! Proactive warm-up between two nodes: `locals` workloads on node-1 and `remotes` on node-2
//! appear in cluster state at once, under a policy that authorizes every pair between the two
//! groups (and none within a group, nor the testbed's own pods), with proactive authentication
//! on and the agents' other settings at their defaults (release agent, identity source `ca`).
//! node-1, the node of the lower name, initiates every pair: one node session, then a
//! workload proof per pair, each writing the pair's entry on both nodes. Timed: from the
//! cluster-state write, and from the moment the later of the two agents had loaded it, until
//! both agents hold all `locals × remotes` entries (their status's `auth_total`, polled every
//! [`POLL`]).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{Options, Testbed};

use super::{
    table::{Section, Table},
    util::{cpu_ns, num, scale_workload, spec},
};

const TD: &str = "cluster.local";
/// How often both agents' entry counts are read.
const POLL: Duration = Duration::from_millis(100);
/// The agents' cluster-state poll interval (the agent's default is 500 ms): the time from the
/// file write includes up to one of it.
const POLL_INTERVAL_MS: u64 = 100;
/// Longest wait for the warm-up to complete.
const LIMIT: Duration = Duration::from_secs(120);
/// The full run's and `--warmup-only`'s size: the goal's.
pub const PAIRS: usize = 10_000;
/// The goal: that many pairs warm within this.
pub const GOAL_S: f64 = 5.0;

/// Every pair between the two groups, in both directions; nothing else (the last rule selects
/// every destination, the testbed's own pods included, and admits no one that exists).
fn policy() -> String {
    format!(
        "name: warmup\nmode: enforce\nrules:\n  - name: remotes-to-locals\n    from: [\"spiffe://{TD}/ns/remote/*\"]\n    to: [\"spiffe://{TD}/ns/scale/*\"]\n  - name: locals-to-remotes\n    from: [\"spiffe://{TD}/ns/scale/*\"]\n    to: [\"spiffe://{TD}/ns/remote/*\"]\n  - name: nothing-else\n    from: [\"spiffe://{TD}/ns/none/sa/none\"]\n    to: [\"*\"]\n"
    )
}

/// `pairs` as locals × remotes, as square as it divides (10,000: 100 × 100).
fn split(pairs: usize) -> (usize, usize) {
    let mut locals = pairs.isqrt().max(1);
    while !pairs.is_multiple_of(locals) {
        locals -= 1;
    }
    (locals, pairs / locals)
}

#[expect(clippy::cast_possible_truncation, reason = "octets of a bounded index")]
fn address(base: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, base + (i / 250) as u8, (i % 250 + 1) as u8)
}

/// The agent's status over its admin socket.
fn status(socket: &Path) -> Result<Value> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(b"{\"op\":\"status\"}\n")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    let v: Value = serde_json::from_str(&answer).context("status answer")?;
    if v["result"] != "status" {
        bail!("status answered {v}");
    }
    Ok(v)
}

/// Seconds since `t0`.
fn since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// The proof and session counters of a node's `/metrics`, as text lines.
fn counters(tb: &Testbed, node: &str) -> Vec<String> {
    tb.agent_http(node, "/metrics")
        .lines()
        .filter(|l| {
            l.starts_with("portcullis_proofs_total")
                || l.starts_with("portcullis_session_establishments_total")
                || l.starts_with("portcullis_handshakes_deferred_total")
        })
        .map(str::to_owned)
        .collect()
}

/// Polls both agents' entry counts every [`POLL`] until each holds `n`; when each did, in
/// seconds since `t0`.
fn wait_for_entries(
    tb: &Testbed,
    sockets: &[std::path::PathBuf],
    n: u64,
    t0: Instant,
) -> Result<[Option<f64>; 2]> {
    let mut done: [Option<f64>; 2] = [None, None];
    let mut entries = [0u64; 2];
    while done.iter().any(Option::is_none) {
        if t0.elapsed() > LIMIT {
            bail!(
                "{n} pairs not warm within {LIMIT:?}: entries {entries:?} (node-1, node-2); node-1's counters: {:?}",
                counters(tb, "node-1")
            );
        }
        let polled = Instant::now();
        for k in 0..2 {
            if done[k].is_some() {
                continue;
            }
            entries[k] = status(&sockets[k])?["auth_total"].as_u64().unwrap_or(0);
            if entries[k] >= n {
                done[k] = Some(since(t0));
            }
        }
        thread::sleep(POLL.saturating_sub(polled.elapsed()));
    }
    Ok(done)
}

/// Warms `locals × remotes` pairs; the measurement's JSON.
pub fn run(agent: &Path, locals: usize, remotes: usize) -> Result<Value> {
    if locals > 2500 || remotes > 2500 {
        bail!("at most 2,500 workloads a node (addresses 198.19.x.y)");
    }
    let mut tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            authenticate: true,
            proactive: Some(true),
            policy: Some(policy()),
            poll_interval_ms: Some(POLL_INTERVAL_MS),
            log_level: "info".into(),
            ..Options::default()
        },
    )?;
    let nodes = ["node-1", "node-2"];
    let sockets: Vec<_> = nodes
        .iter()
        .map(|n| Ok(tb.info().node(n)?.admin_socket.clone()))
        .collect::<Result<_>>()?;
    // Both agents up, with their identities, before the workloads appear.
    let ready = Instant::now();
    while !sockets
        .iter()
        .all(|s| status(s).is_ok_and(|v| v["identities"].as_array().is_some_and(|a| !a.is_empty())))
    {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!("the agents did not have their identities within 30 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let pids: Vec<i64> = nodes
        .iter()
        .map(|n| tb.agent_pid(n).map(i64::from).context("agent pid"))
        .collect::<Result<_>>()?;
    let cpu_before: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect::<Result<_>>()?;
    let logged: Vec<usize> = nodes.iter().map(|n| tb.agent_log(n).len()).collect();
    let n = locals * remotes;
    let workloads = locals + remotes + 2;

    let t0 = Instant::now();
    tb.write_cluster_json(|c| {
        for i in 0..locals {
            let name = format!("l{i}");
            c.workloads.push(scale_workload(
                &name,
                "scale",
                &name,
                "node-1",
                address(200, i).into(),
            ));
        }
        for j in 0..remotes {
            let name = format!("r{j}");
            c.workloads.push(scale_workload(
                &name,
                "remote",
                &name,
                "node-2",
                address(0, j).into(),
            ));
        }
    })?;
    let loaded_line = format!("workloads={workloads}");
    // The loads are watched on a thread of their own: a status request waits for the agent's
    // core, which is busy applying the very change being watched.
    let stop = AtomicBool::new(false);
    let (loaded, polled) = thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut loaded: [Option<f64>; 2] = [None, None];
            while loaded.iter().any(Option::is_none)
                && !stop.load(Ordering::Relaxed)
                && t0.elapsed() < LIMIT
            {
                for (k, node) in nodes.iter().enumerate() {
                    if loaded[k].is_none()
                        && tb.agent_log(node).get(logged[k]..).is_some_and(|log| {
                            log.lines().any(|l| {
                                l.contains("cluster state loaded") && l.contains(&loaded_line)
                            })
                        })
                    {
                        loaded[k] = Some(since(t0));
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
            loaded
        });
        let polled = wait_for_entries(&tb, &sockets, n as u64, t0);
        stop.store(true, Ordering::Relaxed);
        (watcher.join(), polled)
    });
    let done = polled?;
    let (Ok([Some(l1), Some(l2)]), [Some(d1), Some(d2)]) = (loaded, done) else {
        bail!(
            "the agents warmed the pairs without logging `cluster state loaded` with {loaded_line}"
        );
    };
    let cpu_s: Vec<f64> = pids
        .iter()
        .zip(&cpu_before)
        .map(|(p, before)| {
            #[expect(clippy::cast_precision_loss, reason = "seconds")]
            let s = cpu_ns(*p).map(|ns| ns.saturating_sub(*before) as f64 / 1e9);
            s
        })
        .collect::<Result<_>>()?;
    let warm = d1.max(d2);
    let from_loaded = warm - l1.max(l2);
    let st1 = status(&sockets[0])?;
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let per_s = n as f64 / from_loaded;
    Ok(json!({
        "pairs": n,
        "locals": locals,
        "remotes": remotes,
        "warm_s": from_loaded,
        "from_write_s": warm,
        "loaded_s": {"node-1": l1, "node-2": l2},
        "done_s": {"node-1": d1, "node-2": d2},
        "pairs_per_s": per_s,
        "agent_cpu_s": {"node-1": cpu_s[0], "node-2": cpu_s[1]},
        "sessions_node_1": st1["sessions"].as_array().map_or(0, Vec::len),
        "counters": {"node-1": counters(&tb, "node-1"), "node-2": counters(&tb, "node-2")},
        "poll_interval_ms": POLL_INTERVAL_MS,
        "status_poll_ms": POLL.as_millis(),
    }))
}

/// The full run's measurement (`--quick`: 10 × 10 pairs), with its table.
pub fn section(agent: &Path, quick: bool) -> Result<Section> {
    let (locals, remotes) = split(if quick { 100 } else { PAIRS });
    eprintln!("proactive warm-up: {locals} × {remotes} pairs between node-1 and node-2…");
    let w = run(agent, locals, remotes)?;
    eprintln!(
        "  {} pairs warm {:.2} s after both agents loaded them ({:.2} s from the file write), {:.0} pairs/s",
        w["pairs"],
        num(&w["warm_s"]),
        num(&w["from_write_s"]),
        num(&w["pairs_per_s"]),
    );
    Ok(Section::default().md(table(&w)).json("warmup", w))
}

fn table(w: &Value) -> String {
    let mut t = Table::new([
        "proactive warm-up, pairs between two nodes".to_owned(),
        format!("loaded by both → every entry on both (s, goal < {GOAL_S:.0} s)"),
        format!(
            "file write → every entry (s, {} ms poll)",
            w["poll_interval_ms"]
        ),
        "pairs/s".to_owned(),
        "agent CPU node-1 / node-2 (s)".to_owned(),
    ]);
    t.row([
        format!("{} ({} × {})", w["pairs"], w["locals"], w["remotes"]),
        format!("{:.2}", num(&w["warm_s"])),
        format!("{:.2}", num(&w["from_write_s"])),
        format!("{:.0}", num(&w["pairs_per_s"])),
        format!(
            "{:.2} / {:.2}",
            num(&w["agent_cpu_s"]["node-1"]),
            num(&w["agent_cpu_s"]["node-2"])
        ),
    ]);
    t.finish()
}

/// `--warmup-only [PAIRS]`: the table and the measurement's JSON.
pub fn only(agent: &Path, pairs: usize) -> Result<i32> {
    let (locals, remotes) = split(pairs);
    let w = run(agent, locals, remotes)?;
    println!("{}", table(&w));
    println!("{w}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_split_as_square_as_they_divide() {
        assert_eq!(split(10_000), (100, 100));
        assert_eq!(split(100), (10, 10));
        assert_eq!(split(7), (1, 7));
        assert_eq!(split(12), (3, 4));
    }
}
