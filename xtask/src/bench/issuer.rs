//! The SVID issuer (`portcullis issuer`) on this machine.
//!
//! 1. Throughput: one issuer (loopback, bootstrap attestor, the default `info` log and an audit
//!    log) over a cluster file of [`NODES`] nodes × [`PER_NODE`] workloads, each workload with
//!    a service account of its own (3,000 distinct identities, none shared between nodes).
//!    Every simulated node joins with a token of its own, then asks for its 30 workload SVIDs
//!    over one connection; nodes run in parallel threads. The CSRs (a fresh P-256 key each)
//!    are made before the timed round, and that client-side cost is timed on its own. The
//!    client sets TCP_NODELAY, as the agent's does.
//! 2. Restart: the issuer SIGKILLed and started again; the nodes keep the node SVIDs they
//!    had (agents hold theirs in memory across an issuer restart) and ask again for all 3,000
//!    workload SVIDs: the time from the process start until it listens, and from `restart`'s
//!    return until the last SVID.
//! 3. Agents: a two-node testbed with identity source `ca` (every agent holds the CA) against
//!    source `issuer` (one replica), alternating: `Testbed::up` until both agents report
//!    `ready` (which needs an SVID for every local workload), then one agent restarted until
//!    it is ready again.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::ffi::OsStrExt as _,
    path::Path,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{
    ClusterFile, ClusterNode, Options, Testbed, Workload,
    issuer::{self, Credential, Session, Standalone},
};

use super::{
    table::Table,
    util::{cpu_ns, percentile, spec},
};

const TD: &str = "cluster.local";
const NODES: usize = 100;
const PER_NODE: usize = 30;
const SVIDS: usize = NODES * PER_NODE;
/// Client threads (simulated nodes at a time) of the throughput rounds.
const CONCURRENCY: [usize; 3] = [1, 8, 16];
/// Client threads of the joins and of the re-signing after a restart.
const RESTART_CONCURRENCY: usize = 16;
/// Rounds per concurrency, and restarts.
const REPS: usize = 3;
/// Testbed runs per identity source.
const TESTBED_RUNS: usize = 5;

fn node_name(n: usize) -> String {
    format!("node-{n:03}")
}

fn identity(n: usize, i: usize) -> String {
    format!("spiffe://{TD}/ns/bench/sa/n{n:03}-w{i:02}")
}

fn octet(v: usize) -> u8 {
    u8::try_from(v).expect("an address octet")
}

/// Nodes at 198.18.0.x (then 198.18.1.x…), node `n`'s pods at 198.19.n.(i+1): never
/// contacted.
fn cluster_file(path: &Path) -> Result<()> {
    let nodes = (0..NODES)
        .map(|n| ClusterNode {
            name: node_name(n),
            address: SocketAddr::new(
                Ipv4Addr::new(198, 18, octet(n / 250), octet(n % 250 + 1)).into(),
                4181,
            ),
            extra: Default::default(),
        })
        .collect();
    let workloads = (0..NODES)
        .flat_map(|n| {
            (0..PER_NODE).map(move |i| Workload {
                name: format!("n{n:03}-w{i:02}-0"),
                namespace: "bench".into(),
                service_account: format!("n{n:03}-w{i:02}"),
                node: node_name(n),
                addresses: vec![Ipv4Addr::new(198, 19, octet(n), octet(i + 1)).into()],
                spiffe_id: None,
                extra: Default::default(),
            })
        })
        .collect();
    ClusterFile {
        trust_domain: TD.into(),
        nodes,
        workloads,
        extra: Default::default(),
    }
    .store(path)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// This process's CPU time so far (every thread, the finished ones included), seconds.
fn own_cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The pid of the `portcullis issuer run --config <config>` process.
fn issuer_pid(config: &Path) -> Option<i64> {
    let want = config.as_os_str().as_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i64 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let ours = args.windows(2).any(|w| w[0] == b"issuer" && w[1] == b"run")
            && args.windows(2).any(|w| w[0] == b"--config" && w[1] == want);
        ours.then_some(pid)
    })
}

/// One key and CSR per workload, `csrs[node][i]`, made here: (the CSRs, seconds taken).
fn make_csrs() -> (Vec<Vec<String>>, f64) {
    let started = Instant::now();
    let csrs = (0..NODES)
        .map(|n| {
            (0..PER_NODE)
                .map(|i| issuer::csr(&identity(n, i), |_| {}).1)
                .collect()
        })
        .collect();
    (csrs, secs(started.elapsed()))
}

/// What one signing round measured.
struct Round {
    threads: usize,
    wall_s: f64,
    /// When the last SVID arrived.
    done: Instant,
    /// Per request (send → answer), ms.
    latencies_ms: Vec<f64>,
    /// Opening a connection (TCP and the TLS handshake with the node SVID), ms.
    opens_ms: Vec<f64>,
    /// `not_ready` answers (asked again after 5 ms).
    not_ready: usize,
    /// Requests answered after more than [`STALL_MS`], and how many of them were the first of
    /// their connection.
    stalls: usize,
    first_stalls: usize,
    issuer_cpu_s: f64,
    client_cpu_s: f64,
}

impl Round {
    fn per_s(&self) -> f64 {
        SVIDS as f64 / self.wall_s
    }

    fn issuer_us_per_svid(&self) -> f64 {
        self.issuer_cpu_s * 1e6 / SVIDS as f64
    }

    fn client_us_per_svid(&self) -> f64 {
        self.client_cpu_s * 1e6 / SVIDS as f64
    }

    fn json(&self) -> Value {
        json!({
            "client": "testbed::issuer::Session (TCP_NODELAY)",
            "threads": self.threads,
            "svids": SVIDS,
            "wall_s": self.wall_s,
            "svids_per_s": self.per_s(),
            "latency_ms_p50": percentile(&self.latencies_ms, 50.0),
            "latency_ms_p99": percentile(&self.latencies_ms, 99.0),
            "connect_ms_p50": percentile(&self.opens_ms, 50.0),
            "not_ready_answers": self.not_ready,
            "stalls_over_20ms": self.stalls,
            "stalls_first_on_connection": self.first_stalls,
            "issuer_cpu_us_per_svid": self.issuer_us_per_svid(),
            "client_cpu_us_per_svid": self.client_us_per_svid(),
        })
    }
}

/// What one node's thread collected.
#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    opens_ms: Vec<f64>,
    not_ready: usize,
    stalls: usize,
    first_stalls: usize,
}

/// A request slower than this is a stall (a timer, not work: the issuer's work is well under
/// a millisecond).
const STALL_MS: f64 = 20.0;

/// Every node asks, over one connection with its node SVID, for its 30 workload SVIDs
/// (`threads` nodes at a time); every answer must be `signed`.
fn sign_all(
    addr: SocketAddr,
    pid: Option<i64>,
    creds: &[Credential],
    csrs: &[Vec<String>],
    threads: usize,
) -> Result<Round> {
    let next = AtomicUsize::new(0);
    let issuer_before = pid.and_then(|p| cpu_ns(p).ok());
    let client_before = own_cpu_s();
    let started = Instant::now();
    let tallies: Vec<Result<Tally>> = thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<Tally> {
                    let mut t = Tally::default();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= NODES {
                            return Ok(t);
                        }
                        let opened = Instant::now();
                        let mut session = Session::open(addr, Some(&creds[n]))?;
                        t.opens_ms.push(secs(opened.elapsed()) * 1e3);
                        for (i, csr) in csrs[n].iter().enumerate() {
                            let id = identity(n, i);
                            let req = json!({"op": "sign", "identity": id, "csr": csr});
                            let deadline = Instant::now() + Duration::from_secs(30);
                            loop {
                                let asked = Instant::now();
                                let answer = session.ask(&req)?;
                                let ms = secs(asked.elapsed()) * 1e3;
                                t.latencies_ms.push(ms);
                                if ms > STALL_MS {
                                    t.stalls += 1;
                                    t.first_stalls += usize::from(i == 0);
                                }
                                match issuer::outcome(&answer).as_str() {
                                    "signed"
                                        if answer["chain"]
                                            .as_str()
                                            .is_some_and(|c| c.contains("BEGIN CERTIFICATE")) =>
                                    {
                                        break;
                                    }
                                    "not_ready" if Instant::now() < deadline => {
                                        t.not_ready += 1;
                                        thread::sleep(Duration::from_millis(5));
                                    }
                                    _ => bail!("{id} for {}: {answer}", node_name(n)),
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    let done = Instant::now();
    let wall_s = secs(done - started);
    let client_cpu_s = own_cpu_s() - client_before;
    let issuer_cpu_s = match (issuer_before, pid.and_then(|p| cpu_ns(p).ok())) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e9,
        _ => f64::NAN,
    };
    let mut r = Round {
        threads,
        wall_s,
        done,
        latencies_ms: Vec::new(),
        opens_ms: Vec::new(),
        not_ready: 0,
        stalls: 0,
        first_stalls: 0,
        issuer_cpu_s,
        client_cpu_s,
    };
    for t in tallies {
        let t = t?;
        r.latencies_ms.extend(t.latencies_ms);
        r.opens_ms.extend(t.opens_ms);
        r.not_ready += t.not_ready;
        r.stalls += t.stalls;
        r.first_stalls += t.first_stalls;
    }
    if r.latencies_ms.len() < SVIDS {
        bail!("{} answers for {SVIDS} SVIDs", r.latencies_ms.len());
    }
    Ok(r)
}

/// A token per node (`portcullis issuer enroll`, a process each), then every node joins,
/// [`RESTART_CONCURRENCY`] at a time: (node SVIDs, enroll ms each, join wall s).
fn join_all(iss: &Standalone) -> Result<(Vec<Credential>, f64, f64)> {
    let started = Instant::now();
    let tokens = (0..NODES)
        .map(|n| iss.enroll(&node_name(n), None))
        .collect::<Result<Vec<_>>>()?;
    let enroll_ms = secs(started.elapsed()) * 1e3 / NODES as f64;
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let joined: Vec<Result<Vec<(usize, Credential)>>> = thread::scope(|s| {
        let workers: Vec<_> = (0..RESTART_CONCURRENCY)
            .map(|_| {
                s.spawn(|| -> Result<Vec<(usize, Credential)>> {
                    let mut out = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= NODES {
                            return Ok(out);
                        }
                        let name = node_name(n);
                        let (key, csr) =
                            issuer::csr(&format!("spiffe://{TD}/portcullis/node/{name}"), |_| {});
                        let answer = Session::open(iss.addr, None)?.ask(
                            &json!({"op": "join", "node": name, "token": tokens[n], "csr": csr}),
                        )?;
                        if issuer::outcome(&answer) != "signed" {
                            bail!("{} could not join: {answer}", node_name(n));
                        }
                        out.push((n, issuer::credential(&answer, &key)?));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a join thread panicked")))
            })
            .collect()
    });
    let join_s = secs(started.elapsed());
    let mut creds: Vec<Option<Credential>> = vec![None; NODES];
    for j in joined {
        for (n, c) in j? {
            creds[n] = Some(c);
        }
    }
    let creds = creds
        .into_iter()
        .enumerate()
        .map(|(n, c)| c.with_context(|| format!("{} has no node SVID", node_name(n))))
        .collect::<Result<Vec<_>>>()?;
    Ok((creds, enroll_ms, join_s))
}

/// Parts 1 and 2, in `dir`.
fn standalone(agent: &Path, dir: &Path) -> Result<Value> {
    Standalone::make_ca(agent, dir, TD)?;
    let state = dir.join("cluster.yaml");
    cluster_file(&state)?;
    let mut iss = Standalone::bootstrap(agent, dir, &state, "")?;
    let mut pid = issuer_pid(&iss.config);
    eprintln!(
        "issuer: {NODES} nodes × {PER_NODE} workloads, listening on {} (pid {pid:?})",
        iss.addr
    );
    let (creds, enroll_ms, join_s) = join_all(&iss)?;
    eprintln!(
        "  {NODES} tokens ({enroll_ms:.1} ms per `issuer enroll`), {NODES} joins in {:.0} ms",
        join_s * 1e3
    );
    let mut csr_s = Vec::new();
    let mut rounds = Vec::new();
    for threads in CONCURRENCY {
        let mut reps = Vec::new();
        for _ in 0..REPS {
            let (csrs, made) = make_csrs();
            csr_s.push(made);
            let r = sign_all(iss.addr, pid, &creds, &csrs, threads)?;
            eprintln!(
                "  {threads:>2} at a time: {SVIDS} SVIDs in {:.0} ms = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} over {STALL_MS} ms; CPU per SVID: issuer {:.0} µs, client {:.0} µs",
                r.wall_s * 1e3,
                r.per_s(),
                percentile(&r.latencies_ms, 50.0),
                percentile(&r.latencies_ms, 99.0),
                r.stalls,
                r.issuer_us_per_svid(),
                r.client_us_per_svid(),
            );
            reps.push(r);
        }
        reps.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
        let mid = reps.swap_remove(reps.len() / 2);
        rounds.push(mid);
    }
    let csr_us = median(&csr_s) * 1e6 / SVIDS as f64;

    let mut restarts = Vec::new();
    for _ in 0..REPS {
        let (csrs, made) = make_csrs();
        csr_s.push(made);
        iss.stop();
        let addr = iss.addr;
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let (listening, returned) = thread::scope(|s| -> Result<(Option<Instant>, Instant)> {
            let probe = s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                        return Some(Instant::now());
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                None
            });
            let r = iss.restart();
            let returned = Instant::now();
            stop.store(true, Ordering::Relaxed);
            let listening = probe.join().unwrap_or(None);
            r.map(|()| (listening, returned))
        })?;
        let listening = listening.unwrap_or(returned);
        pid = issuer_pid(&iss.config);
        let r = sign_all(iss.addr, pid, &creds, &csrs, RESTART_CONCURRENCY)?;
        let row = json!({
            "start_to_listening_ms": secs(listening - started) * 1e3,
            "start_to_restart_returned_ms": secs(returned - started) * 1e3,
            "restart_returned_to_last_svid_ms": secs(r.done - returned) * 1e3,
            "listening_to_last_svid_ms": secs(r.done - listening) * 1e3,
            "resign": r.json(),
        });
        eprintln!(
            "  restart: listening {:.0} ms after the start (restart returned at {:.0} ms); {SVIDS} SVIDs again {:.0} ms after it returned ({} not_ready answers)",
            row["start_to_listening_ms"].as_f64().unwrap_or(f64::NAN),
            row["start_to_restart_returned_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            row["restart_returned_to_last_svid_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r.not_ready,
        );
        restarts.push(row);
    }
    let audit_lines = std::fs::read_to_string(&iss.audit)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let log_bytes = std::fs::metadata(dir.join("issuer.log")).map_or(0, |m| m.len());
    drop(iss);
    let med = |k: &str| {
        median(
            &restarts
                .iter()
                .filter_map(|r| r[k].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    Ok(json!({
        "nodes": NODES,
        "workloads_per_node": PER_NODE,
        "identities": "one service account per workload: 3,000 distinct identities",
        "cpus": thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "client_key_csr_us": csr_us,
        "enroll_ms": enroll_ms,
        "joins": NODES,
        "join_threads": RESTART_CONCURRENCY,
        "join_wall_ms": join_s * 1e3,
        "rounds": rounds.iter().map(Round::json).collect::<Vec<_>>(),
        "restart": {
            "runs": restarts,
            "start_to_listening_ms": med("start_to_listening_ms"),
            "start_to_restart_returned_ms": med("start_to_restart_returned_ms"),
            "restart_returned_to_last_svid_ms": med("restart_returned_to_last_svid_ms"),
            "listening_to_last_svid_ms": med("listening_to_last_svid_ms"),
        },
        "audit_records": audit_lines,
        "issuer_log_bytes": log_bytes,
    }))
}

/// Whether `node`'s agent says it is ready with at least one SVID.
fn ready(tb: &Testbed, node: &str) -> bool {
    let Ok(out) = tb
        .portcullis(node, &["status", "--output", "json"])
        .output()
    else {
        return false;
    };
    let Ok(st) = serde_json::from_slice::<Value>(&out.stdout) else {
        return false;
    };
    st["agent"]["ready"] == true && st["identities"].as_array().is_some_and(|a| !a.is_empty())
}

fn wait_ready(tb: &Testbed, nodes: &[&str], what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut waiting: Vec<&str> = nodes.to_vec();
    while !waiting.is_empty() {
        waiting.retain(|n| !ready(tb, n));
        if Instant::now() > deadline {
            bail!(
                "{what}: {waiting:?} not ready within 60 s; node-1's log:\n{}",
                tb.agent_log("node-1")
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Seconds since midnight of an agent log line's timestamp (`2026-01-01T12:00:00.123456Z`).
fn log_time_s(line: &str) -> Option<f64> {
    let t = line
        .split_whitespace()
        .next()?
        .split_once('T')?
        .1
        .trim_end_matches('Z');
    let mut f = t.split(':');
    let (h, m, s): (f64, f64, f64) = (
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// From node-1's last `node SVID obtained` (its agent's log) to the last `SVID loaded` after
/// it (the workload SVIDs in use), and from the issuer's last signing for node-1 before that
/// (the issuer's log) to the same: ms.
fn svid_wait_ms(agent_log: &str, issuer_log: &str) -> (Option<f64>, Option<f64>) {
    let mut span: Option<(f64, Option<f64>)> = None;
    for l in agent_log.lines() {
        if l.contains("node SVID obtained") {
            span = log_time_s(l).map(|t| (t, None));
        } else if l.contains("SVID loaded")
            && let Some((_, loaded)) = span.as_mut()
        {
            *loaded = log_time_s(l);
        }
    }
    let Some((obtained, Some(loaded))) = span else {
        return (None, None);
    };
    let signed = issuer_log
        .lines()
        .filter(|l| l.contains("op=\"sign\" node=\"node-1\"") && l.contains("result=\"signed\""))
        .filter_map(log_time_s)
        .filter(|t| *t >= obtained - 1.0 && *t <= loaded)
        .reduce(f64::max);
    (
        Some((loaded - obtained) * 1e3),
        signed.map(|t| (loaded - t) * 1e3),
    )
}

/// One testbed run with `replicas` issuers (0: source `ca`): seconds until `up` returned and
/// until both agents were ready; then node-1's agent restarted until ready (seconds), and,
/// with issuers, what one `issuer enroll` (part of every agent start) takes.
fn testbed_run(agent: &Path, replicas: usize) -> Result<Value> {
    let started = Instant::now();
    let mut tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            log_level: "info".into(),
            authenticate: true,
            issuer_replicas: replicas,
            ..Options::default()
        },
    )?;
    let up = started.elapsed();
    let kind = if replicas > 0 { "issuer" } else { "ca" };
    wait_ready(&tb, &["node-1", "node-2"], kind)?;
    let ready_s = secs(started.elapsed());
    let issuer_log = |tb: &Testbed| {
        std::fs::read_to_string(tb.issuer_dir().join("issuer0.log")).unwrap_or_default()
    };
    let wait_up = svid_wait_ms(&tb.agent_log("node-1"), &issuer_log(&tb));
    let enroll_ms = if replicas > 0 {
        let t = Instant::now();
        tb.enroll("node-1")?;
        Some(secs(t.elapsed()) * 1e3)
    } else {
        None
    };
    tb.stop_agent("node-1")?;
    let restarted = Instant::now();
    tb.start_agent("node-1")?;
    wait_ready(&tb, &["node-1"], kind)?;
    let restart_s = secs(restarted.elapsed());
    let wait_restart = svid_wait_ms(&tb.agent_log("node-1"), &issuer_log(&tb));
    let source = tb
        .portcullis("node-1", &["status", "--output", "json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .map(|s| s["agent"]["identity_source"].clone())
        .unwrap_or(Value::Null);
    drop(tb);
    eprintln!(
        "  {kind}: up {:.2} s, both ready {ready_s:.2} s, node-1 restart → ready {:.0} ms{}",
        secs(up),
        restart_s * 1e3,
        match (wait_up, wait_restart) {
            ((Some(a), Some(sa)), (Some(b), Some(sb))) => format!(
                " (node-1: node SVID → workload SVIDs loaded {a:.0} ms, {sa:.0} ms of it after the issuer signed; after the restart {b:.0} ms, {sb:.0} ms)"
            ),
            _ => String::new(),
        }
    );
    Ok(json!({
        "source": source,
        "up_s": secs(up),
        "ready_s": ready_s,
        "agent_restart_ms": restart_s * 1e3,
        "enroll_ms": enroll_ms,
        "node1_node_svid_to_svids_loaded_ms": wait_up.0,
        "node1_signed_to_svids_loaded_ms": wait_up.1,
        "node1_restart_node_svid_to_svids_loaded_ms": wait_restart.0,
        "node1_restart_signed_to_svids_loaded_ms": wait_restart.1,
    }))
}

/// Part 3: [`TESTBED_RUNS`] runs of each source, alternating.
fn agents(agent: &Path) -> Result<Value> {
    eprintln!("agents: two-node testbed, identity source ca against issuer, alternating…");
    let mut runs: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..TESTBED_RUNS {
        for (k, replicas) in [0, 1].into_iter().enumerate() {
            runs[k].push(testbed_run(agent, replicas)?);
        }
    }
    let med = |k: usize, key: &str| {
        median(
            &runs[k]
                .iter()
                .filter_map(|r| r[key].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let summary = |k: usize| {
        json!({
            "up_s": med(k, "up_s"),
            "ready_s": med(k, "ready_s"),
            "agent_restart_ms": med(k, "agent_restart_ms"),
            "enroll_ms": med(k, "enroll_ms"),
            "node1_node_svid_to_svids_loaded_ms": med(k, "node1_node_svid_to_svids_loaded_ms"),
            "node1_restart_node_svid_to_svids_loaded_ms": med(k, "node1_restart_node_svid_to_svids_loaded_ms"),
            "node1_signed_to_svids_loaded_ms": med(k, "node1_signed_to_svids_loaded_ms"),
            "node1_restart_signed_to_svids_loaded_ms": med(k, "node1_restart_signed_to_svids_loaded_ms"),
            "runs": runs[k],
        })
    };
    Ok(json!({"ca": summary(0), "issuer": summary(1)}))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// `--issuer-only`: the table, a note and the JSON on stdout.
pub fn only(agent: &Path) -> Result<i32> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("portcullis-bench-issuer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let standalone = standalone(agent, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let s = standalone?;
    let a = agents(agent)?;

    let mut t = Table::new(["issuer on this machine", "measured", "detail"]);
    t.row([
        "client: a P-256 key and its CSR".to_owned(),
        format!("{:.0} µs each", f(&s["client_key_csr_us"])),
        "made before every timed round, outside its time".to_owned(),
    ]);
    t.row([
        format!("{NODES} node joins, {RESTART_CONCURRENCY} at a time"),
        format!("{:.0} ms", f(&s["join_wall_ms"])),
        format!(
            "a token each made before (`issuer enroll`, {:.1} ms a process)",
            f(&s["enroll_ms"])
        ),
    ]);
    for r in s["rounds"].as_array().map_or(&[][..], Vec::as_slice) {
        t.row([
            format!(
                "{SVIDS} workload SVIDs, {} node{} at a time (one connection each)",
                r["threads"],
                if r["threads"] == 1 { "" } else { "s" }
            ),
            format!("**{:.0} SVIDs/s**", f(&r["svids_per_s"])),
            format!(
                "per request p50 {:.2} ms, p99 {:.2} ms; CPU per SVID: issuer {:.0} µs, client {:.0} µs",
                f(&r["latency_ms_p50"]),
                f(&r["latency_ms_p99"]),
                f(&r["issuer_cpu_us_per_svid"]),
                f(&r["client_cpu_us_per_svid"]),
            ),
        ]);
    }
    let rs = &s["restart"];
    t.row([
        "issuer restart: process start → listening".to_owned(),
        format!("{:.0} ms", f(&rs["start_to_listening_ms"])),
        format!(
            "SIGKILL, then a new process (CA, serving SVID, cluster file read); polled every ms; `restart()` returned at {:.0} ms",
            f(&rs["start_to_restart_returned_ms"])
        ),
    ]);
    t.row([
        format!("issuer restart: `restart()` returned → all {SVIDS} SVIDs signed again"),
        format!("{:.0} ms", f(&rs["restart_returned_to_last_svid_ms"])),
        format!(
            "node SVIDs kept from before; {RESTART_CONCURRENCY} nodes at a time; {:.0} ms from listening",
            f(&rs["listening_to_last_svid_ms"])
        ),
    ]);
    let (ca, is) = (&a["ca"], &a["issuer"]);
    t.row([
        "2-node testbed up → both agents ready: source ca / issuer".to_owned(),
        format!(
            "{:.2} s / {:.2} s (×{:.2})",
            f(&ca["ready_s"]),
            f(&is["ready_s"]),
            f(&is["ready_s"]) / f(&ca["ready_s"])
        ),
        format!(
            "medians of {TESTBED_RUNS}, alternating; `Testbed::up` itself {:.2} s / {:.2} s (the issuer's namespace, CA and replica included)",
            f(&ca["up_s"]),
            f(&is["up_s"])
        ),
    ]);
    t.row([
        "agent restart → ready: source ca / issuer".to_owned(),
        format!(
            "{:.0} ms / {:.0} ms (×{:.2})",
            f(&ca["agent_restart_ms"]),
            f(&is["agent_restart_ms"]),
            f(&is["agent_restart_ms"]) / f(&ca["agent_restart_ms"])
        ),
        format!(
            "node-1, SIGTERM then start; with the issuer a fresh join (the testbed's `issuer enroll`, {:.0} ms of it)",
            f(&is["enroll_ms"])
        ),
    ]);
    let wait_runs: Vec<String> = is["runs"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|r| {
            format!(
                "{:.0}/{:.0}",
                f(&r["node1_signed_to_svids_loaded_ms"]),
                f(&r["node1_restart_signed_to_svids_loaded_ms"])
            )
        })
        .collect();
    t.row([
        "source issuer: node SVID obtained → workload SVIDs loaded (node-1's log)".to_owned(),
        format!(
            "{:.0} ms / {:.0} ms after a restart",
            f(&is["node1_node_svid_to_svids_loaded_ms"]),
            f(&is["node1_restart_node_svid_to_svids_loaded_ms"])
        ),
        format!(
            "medians; of which after the issuer had signed the last of them (its log), by run (start/restart): {} ms",
            wait_runs.join(", ")
        ),
    ]);
    let best = s["rounds"]
        .as_array()
        .and_then(|r| r.iter().map(|r| f(&r["svids_per_s"])).reduce(f64::max))
        .unwrap_or(f64::NAN);
    let issuer_us = s["rounds"]
        .as_array()
        .and_then(|r| r.last())
        .map_or(f64::NAN, |r| f(&r["issuer_cpu_us_per_svid"]));
    println!("\n{}", t.finish());
    println!(
        "`cargo xtask bench --issuer-only` in {:.0} s, on {} CPUs shared by the issuer and its clients (the clients: this xtask process, a debug build; the issuer: {}). One issuer over {NODES} nodes × {PER_NODE} workloads, each workload with a service account of its own ({SVIDS} distinct identities); every answer checked `signed`. Best rate {best:.0} SVIDs/s; the issuer's own CPU, {issuer_us:.0} µs an SVID, would allow about {:.0}/s a core.\n",
        secs(started.elapsed()),
        s["cpus"],
        agent.display(),
        1e6 / issuer_us,
    );
    println!("{}", json!({"issuer": s, "agents": a}));
    Ok(0)
}
