//! Faults, end to end: an agent killed again and again under load, a peer agent cut off, a
//! stalled agent under a SYN flood from thousands of enrolled sources. Each case counts its
//! outcomes and prints them as one JSON line (`fault outcome: {…}`). Privileged: run as root,
//! one at a time (`cargo xtask test`; `cargo xtask soak` runs the restart loop for longer).
//! Without root these tests fail; they never skip.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    cluster::Workload,
    scenario::{Family, Scenario, eventually, last_json, ok},
};

const PORT: u16 = 8080;

fn root() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the fault tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
}

fn up(spec: &Spec, opts: &Options) -> Testbed {
    root();
    Testbed::up(spec, opts).unwrap_or_else(|e| panic!("testbed up: {e:#}"))
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

fn report(case: &str, outcome: &Value) {
    eprintln!(
        "fault outcome: {}",
        json!({ "case": case, "outcome": outcome })
    );
}

fn counters(s: &Value) -> BTreeMap<String, u64> {
    s["counters"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// The agent on node-2 is SIGKILLed and restarted `PORTCULLIS_RESTART_ROUNDS` times (5 here,
/// 20 and more in `cargo xtask soak`) while three long transfers run and, in every outage and
/// after every restart, an authenticated and an unauthenticated connection are attempted.
#[test]
fn restart_loop_resets_no_authenticated_flow_and_admits_nothing_unauthenticated() {
    let rounds: u32 = std::env::var("PORTCULLIS_RESTART_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![PodSpec::new("client"), PodSpec::new("other")],
            ),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    let mut tb = up(&spec, &Options::default());
    let target = scenario(&tb).addr("server", Family::V4);
    let _server = scenario(&tb).serve("server", PORT);
    scenario(&tb).allow("server", "client");
    // Long enough to span every round (about 2 s each), paced so that they are mid-stream.
    let seconds = 4 + 2 * rounds;
    let transfers: Vec<_> = (0..3)
        .map(|_| scenario(&tb).transfer("client", target, PORT, 4_000_000, seconds, 5000))
        .collect();
    thread::sleep(Duration::from_secs(1));
    let before = scenario(&tb).status("node-2");
    let flows_before = before["flows"].as_array().map_or(0, Vec::len);
    assert!(
        flows_before >= 3,
        "the transfers' flows are not tracked: {}",
        before["flows"]
    );
    let (mut auth_ok, mut auth_failed, mut unauth_admitted, mut unauth_dropped) = (0, 0, 0, 0);
    let mut attempt = |s: &Scenario<'_>| {
        if ok(&s.connect("client", target, PORT, 2000)) {
            auth_ok += 1;
        } else {
            auth_failed += 1;
        }
        if ok(&s.connect("other", target, PORT, 300)) {
            unauth_admitted += 1;
        } else {
            unauth_dropped += 1;
        }
    };
    let started = Instant::now();
    let mut restart_ms = Vec::new();
    for _ in 0..rounds {
        tb.kill_agent("node-2").expect("SIGKILL the agent");
        attempt(&scenario(&tb));
        let t = Instant::now();
        tb.start_agent("node-2").expect("restarting the agent");
        restart_ms.push(t.elapsed().as_millis() as u64);
        attempt(&scenario(&tb));
    }
    let s = scenario(&tb);
    let after = s.status("node-2");
    let results: Vec<Value> = transfers.into_iter().map(|t| t.finish()).collect();
    let transfers_ok = results.iter().filter(|r| ok(r)).count();
    let outcome = json!({
        "rounds": rounds,
        "seconds": started.elapsed().as_secs_f64(),
        "restart_ms_max": restart_ms.iter().max(),
        "transfers_ok": transfers_ok,
        "transfers": results.len(),
        "authenticated_ok": auth_ok,
        "authenticated_failed": auth_failed,
        "unauthenticated_admitted": unauth_admitted,
        "unauthenticated_dropped": unauth_dropped,
    });
    report("restart_loop", &outcome);
    assert_eq!(
        transfers_ok,
        results.len(),
        "a transfer was reset across the restarts: {results:?}"
    );
    assert_eq!(auth_failed, 0, "{outcome}");
    assert_eq!(unauth_admitted, 0, "{outcome}");
    // State is consistent afterwards: the entry, the links, and counters that only grew.
    assert_eq!(
        after["auth"].as_array().map(Vec::len),
        Some(1),
        "{}",
        after["auth"]
    );
    assert!(
        after["interfaces"]
            .as_array()
            .is_some_and(|is| !is.is_empty() && is.iter().all(|i| i["attached"] == "adopted")),
        "{}",
        after["interfaces"]
    );
    let (b, a) = (counters(&before), counters(&after));
    for (name, v) in &b {
        assert!(
            a.get(name).is_some_and(|n| n >= v),
            "counter {name} went back from {v} to {:?}",
            a.get(name)
        );
    }
    assert!(
        a["drop_no_auth"] >= b["drop_no_auth"] + u64::from(rounds),
        "the unauthenticated attempts were not counted: {b:?} → {a:?}"
    );
}

/// Runs `nft` in node `node`'s namespace.
fn nft(tb: &Testbed, node: &str, script: &str) {
    let out = tb
        .exec_node(node, &["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .expect("running nft");
    assert!(
        out.status.success(),
        "nft on {node} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Handshakes node-2 initiated for pairs with `local`, newest last.
fn initiated(s: &Scenario<'_>, node: &str, local: &str) -> Vec<Value> {
    s.status(node)["handshakes"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter(|h| h["role"] == "initiator" && h["local"] == local)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The agents of node-1 and node-2 cannot reach each other (node-1 drops what comes to or
/// from the handshake port): neither can authenticate a new pair across them. New pairs fail closed with bounded, backed-off attempts and no event storm, the entry
/// made before the partition keeps admitting its pair, and when the port opens again a new
/// connection authenticates by itself.
#[test]
fn a_partitioned_peer_fails_closed_with_backoff_and_recovers_by_itself() {
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![PodSpec::new("client"), PodSpec::new("early")],
            ),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    let tb = up(
        &spec,
        &Options {
            authenticate: true,
            proactive: Some(false),
            ..Options::default()
        },
    );
    let s = scenario(&tb);
    let target = s.addr("server", Family::V4);
    let _server = s.serve("server", PORT);
    assert!(
        ok(&s.connect("early", target, PORT, 5000)),
        "the pair made before the partition did not authenticate"
    );
    let port = tb
        .cluster()
        .expect("cluster state")
        .nodes
        .iter()
        .find(|n| n.name == "node-1")
        .expect("node-1 in cluster state")
        .address
        .port();
    nft(
        &tb,
        "node-1",
        &format!(
            "table inet pcfault {{\n  chain input {{\n    type filter hook input priority -10;\n    tcp dport {port} drop\n    tcp sport {port} drop\n  }}\n}}\n"
        ),
    );
    let server_id = s.identity("server");
    let events_before = s.status("node-2")["events_total"].as_u64().unwrap_or(0);
    let started = Instant::now();
    // Demand for 12 s: a connection attempt every 2 s, each of which the kernel drops.
    let mut admitted_during = 0;
    while started.elapsed() < Duration::from_secs(12) {
        if ok(&s.connect("client", target, PORT, 2000)) {
            admitted_during += 1;
        }
    }
    let window = started.elapsed().as_secs_f64();
    // Both ends of the pair ask: node-2 on the dropped SYN, node-1 on the outbound one.
    let attempts: Vec<Value> = initiated(&s, "node-2", &server_id)
        .into_iter()
        .filter(|h| h["remote"] == s.identity("client"))
        .collect();
    let client_attempts: Vec<Value> = initiated(&s, "node-1", &s.identity("client"))
        .into_iter()
        .filter(|h| h["remote"] == server_id)
        .collect();
    let events = s.status("node-2")["events_total"].as_u64().unwrap_or(0) - events_before;
    let early_ok = ok(&s.connect("early", target, PORT, 2000));
    nft(&tb, "node-1", "delete table inet pcfault\n");
    let healed = Instant::now();
    let recovered = eventually(Duration::from_secs(60), || {
        ok(&s.connect("client", target, PORT, 3000))
    });
    let outcome = json!({
        "partition_seconds": window,
        "admitted_during_partition": admitted_during,
        "handshake_attempts": attempts.len(),
        "attempt_reasons": attempts.iter().map(|h| h["reason"].clone()).collect::<Vec<_>>(),
        "client_node_attempts": client_attempts.len(),
        "events": events,
        "existing_pair_admitted": early_ok,
        "recovered": recovered,
        "recovery_seconds": healed.elapsed().as_secs_f64(),
    });
    report("partitioned_peer", &outcome);
    assert_eq!(
        admitted_during, 0,
        "fail open during the partition: {outcome}"
    );
    for a in [&attempts, &client_attempts] {
        assert!(
            !a.is_empty() && a.iter().all(|h| h["result"] == "failed"),
            "{outcome}"
        );
        // Each attempt waits out handshake.timeout_ms (3 s) and then backs off: about four
        // in 12 s. Unbounded retrying would show dozens.
        assert!(a.len() <= 6, "retries not bounded: {outcome}");
    }
    // The kernel signals a pair at most every 100 ms.
    assert!(
        (events as f64) <= window * 10.0 + 5.0,
        "event storm: {outcome}"
    );
    assert!(
        early_ok,
        "the entry made before the partition lapsed: {outcome}"
    );
    assert!(recovered, "no recovery after the partition: {outcome}");
}

/// Node-3's pods (20,000 identities, cluster state only; node-3's agent is stopped) flood
/// node-2's server with SYNs while node-2's agent is frozen: the ring buffer overflows. Every
/// dropped SYN is accounted for (rate-limited, lost, or delivered), the agent answers as soon
/// as it is thawed, its log is not flooded, and a legitimate pair still authenticates.
#[test]
fn a_syn_flood_from_many_enrolled_sources_is_counted_and_a_legitimate_pair_still_authenticates() {
    const SOURCES: u32 = 20_000;
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
            NodeSpec::new("node-3", vec![]),
        ],
    };
    let mut tb = up(
        &spec,
        &Options {
            authenticate: true,
            proactive: Some(false),
            ..Options::default()
        },
    );
    tb.stop_agent("node-3").expect("stopping node-3's agent");
    let first: Ipv6Addr = "fd00:18:3::1:0".parse().unwrap();
    tb.write_cluster_json(|c| {
        for k in 0..SOURCES {
            c.workloads.push(Workload {
                name: format!("flood-{k}"),
                namespace: "flood".into(),
                service_account: format!("f{k}"),
                node: "node-3".into(),
                addresses: vec![IpAddr::V6(Ipv6Addr::from(
                    u128::from(first) + u128::from(k),
                ))],
                spiffe_id: None,
                extra: BTreeMap::new(),
            });
        }
    })
    .expect("writing cluster state");
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let server = s.addr("server", Family::V6);
    assert!(
        eventually(Duration::from_secs(30), || {
            s.status("node-2")["maps"].as_array().is_some_and(|ms| {
                ms.iter().any(|m| {
                    m["name"] == "endpoints" && m["entries"].as_u64() >= Some(u64::from(SOURCES))
                })
            })
        }),
        "node-2 did not program the flood sources: {}",
        s.status("node-2")["maps"]
    );
    let before = s.status("node-2");
    tb.pause_agent("node-2").expect("SIGSTOP node-2's agent");
    let s = scenario(&tb);
    let flood =
        s.tb.exec_node(
            "node-3",
            &[
                s.probe.to_str().unwrap(),
                "flood",
                "--to",
                &format!("[{server}]:{PORT}"),
                "--sources",
                &first.to_string(),
                "--count",
                &SOURCES.to_string(),
                "--packets",
                &(2 * SOURCES).to_string(),
                "--seconds",
                "20",
            ],
        )
        .output()
        .expect("running probe flood");
    let flood = last_json(&flood.stdout);
    tb.resume_agent("node-2").expect("SIGCONT node-2's agent");
    let s = scenario(&tb);
    assert!(ok(&flood), "the flood tool failed: {flood}");
    let t = Instant::now();
    let thawed = s.status("node-2");
    let status_ms = t.elapsed().as_millis() as u64;
    // Every dropped SYN is rate-limited, lost, or delivered to the agent (which may drop it
    // when busy, and counts that too).
    let delta = |st: &Value, name: &str| {
        counters(st).get(name).copied().unwrap_or(0)
            - counters(&before).get(name).copied().unwrap_or(0)
    };
    let field = |st: &Value, name: &str| {
        st[name].as_u64().unwrap_or(0) - before[name].as_u64().unwrap_or(0)
    };
    let mut last = Value::Null;
    let balanced = eventually(Duration::from_secs(30), || {
        last = s.status("node-2");
        delta(&last, "drop_no_auth")
            == delta(&last, "event_rate_limited")
                + delta(&last, "event_lost")
                + field(&last, "events_total")
                + field(&last, "events_dropped")
    });
    let log = std::fs::read_to_string(&tb.node("node-2").log_file).unwrap_or_default();
    let event_lines = log.lines().filter(|l| l.contains("datapath event")).count();
    let legit = Instant::now();
    let authenticated = eventually(Duration::from_secs(60), || {
        ok(&s.connect("client", s.addr("server", Family::V6), PORT, 3000))
    });
    let after = s.status("node-2");
    let outcome = json!({
        "sources": SOURCES,
        "flood": flood,
        "syns_dropped": delta(&last, "drop_no_auth"),
        "events_rate_limited": delta(&last, "event_rate_limited"),
        "events_lost": delta(&last, "event_lost"),
        "events_delivered": field(&last, "events_total"),
        "events_dropped_by_agent": field(&last, "events_dropped"),
        "handshakes_deferred": field(&after, "handshakes_deferred"),
        "accounted": balanced,
        "status_ms_after_thaw": status_ms,
        "log_lines_of_events": event_lines,
        "legitimate_pair_authenticated": authenticated,
        "legitimate_seconds": legit.elapsed().as_secs_f64(),
    });
    report("syn_flood", &outcome);
    assert!(
        delta(&last, "drop_no_auth") >= u64::from(SOURCES),
        "the flood did not reach the server: {outcome}"
    );
    assert!(
        delta(&last, "event_lost") > 0,
        "the ring buffer never filled: {outcome}"
    );
    assert!(balanced, "dropped SYNs unaccounted for: {outcome}");
    assert!(status_ms < 5000, "the agent was slow to answer: {outcome}");
    assert!(event_lines < 2000, "the event log was flooded: {outcome}");
    assert!(
        authenticated,
        "the legitimate pair did not authenticate: {outcome}"
    );
    assert_eq!(
        thawed["agent"]["pid"].as_u64(),
        after["agent"]["pid"].as_u64(),
        "the agent restarted under the flood"
    );
}
