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
    NodeSpec, Options, PodSpec, Spec, Testbed, Wiring,
    cluster::Workload,
    scenario::{Family, Scenario, Server, counter, eventually, last_json, ok, sock},
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

/// `client` on node-1 and `server` on node-2, and an empty node-3 if `spare`.
fn pair_spec(spare: bool) -> Spec {
    let mut nodes = vec![
        NodeSpec::new("node-1", vec![PodSpec::new("client")]),
        NodeSpec::new("node-2", vec![PodSpec::new("server")]),
    ];
    if spare {
        nodes.push(NodeSpec::new("node-3", vec![]));
    }
    Spec { nodes }
}

/// `server` listening on `PORT` and the pair (client → server) allowed by entry; asserts the
/// client connects. Returns the server and its address in `family`.
fn allowed_pair(s: &Scenario<'_>, family: Family) -> (Server, IpAddr) {
    let server = s.serve("server", PORT);
    let target = s.addr("server", family);
    s.allow("server", "client");
    assert!(
        ok(&s.connect("client", target, PORT, 3000)),
        "the allowed pair does not connect"
    );
    (server, target)
}

/// Agents that authenticate pairs by handshake, only on demand (no proactive authentication).
fn handshaking() -> Options {
    Options {
        authenticate: true,
        proactive: Some(false),
        ..Options::default()
    }
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

/// Counter `name` of status `st` minus that of status `before` (0 where absent).
fn counter_growth(st: &Value, before: &Value, name: &str) -> u64 {
    counters(st).get(name).copied().unwrap_or(0) - counters(before).get(name).copied().unwrap_or(0)
}

/// Top-level number `name` of status `st` minus that of status `before` (0 where absent).
fn field_growth(st: &Value, before: &Value, name: &str) -> u64 {
    st[name].as_u64().unwrap_or(0) - before[name].as_u64().unwrap_or(0)
}

/// Whether every SYN counted as `drop` from status `before` to `st` is accounted for as an
/// event: rate-limited, lost, delivered to the agent, or dropped by the agent when busy.
fn events_account_for(st: &Value, before: &Value, drop: &str) -> bool {
    let delta = |name: &str| counter_growth(st, before, name);
    let field = |name: &str| field_growth(st, before, name);
    delta(drop)
        == delta("event_rate_limited")
            + delta("event_lost")
            + field("events_total")
            + field("events_dropped")
}

/// The agent on node-2 is SIGKILLed and restarted `PORTCULLIS_RESTART_ROUNDS` times (5 here,
/// 20 and more in `cargo xtask soak`) while three long transfers run and, in every outage and
/// after every restart, an authenticated and an unauthenticated connection are attempted. The
/// pair is authenticated by a real proof, so every new connection needs a connection MAC: the
/// keys the restarted agent adopts from the kernel's entry keep verifying.
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
    // Only client may open connections to server: other's attempts are refused.
    let policy = "rules:\n  - from: [\"spiffe://cluster.local/ns/default/sa/client\"]\n    to: [\"spiffe://cluster.local/ns/default/sa/server\"]\n";
    let mut tb = up(
        &spec,
        &Options {
            authenticate: true,
            policy: Some(policy.into()),
            ..Options::default()
        },
    );
    let target = scenario(&tb).addr("server", Family::V4);
    let _server = scenario(&tb).serve("server", PORT);
    assert!(
        ok(&scenario(&tb).connect("client", target, PORT, 5000)),
        "the pair did not authenticate"
    );
    let signed_before = counter(&scenario(&tb).status("node-1"), "pass_signed");
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
    // State is consistent afterwards: the entries (client's admits every port, other's
    // nothing: only the reverse direction is authorized), the links, and counters that only
    // grew.
    let inbound = |pod: &str| {
        let id = s.identity(pod);
        after["auth"].as_array().and_then(|es| {
            es.iter()
                .find(|e| e["remote"] == id.as_str())
                .map(|e| e["inbound_ports"].clone())
        })
    };
    assert_eq!(
        (
            inbound("client"),
            inbound("other"),
            after["auth"].as_array().map(Vec::len)
        ),
        (Some(json!("all")), Some(json!("none")), Some(2)),
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
    let refused = |c: &BTreeMap<String, u64>| {
        c.get("drop_no_auth").copied().unwrap_or(0) + c.get("drop_policy").copied().unwrap_or(0)
    };
    assert!(
        refused(&a) >= refused(&b) + u64::from(rounds),
        "the unauthenticated attempts were not counted: {b:?} → {a:?}"
    );
    // Every authenticated connection was signed on node-1 and verified on node-2 with the
    // adopted keys.
    let mac_drops = |c: &BTreeMap<String, u64>| {
        c.get("drop_no_mac").copied().unwrap_or(0) + c.get("drop_bad_mac").copied().unwrap_or(0)
    };
    assert_eq!(mac_drops(&a), mac_drops(&b), "{b:?} → {a:?}");
    let signed = counter(&s.status("node-1"), "pass_signed") - signed_before;
    assert!(
        signed >= auth_ok as u64,
        "{signed} signed SYNs for {auth_ok} authenticated connections"
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
/// from the session port, both ways: the session node-1 opened for `early` stays up on
/// paper but carries nothing): neither can authenticate a new pair across them. New pairs fail closed with bounded, backed-off attempts and no event storm, the entry
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
    let tb = up(&spec, &handshaking());
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
            "table inet pcfault {{\n  chain input {{\n    type filter hook input priority -10;\n    tcp dport {port} drop\n    tcp sport {port} drop\n  }}\n  chain output {{\n    type filter hook output priority -10;\n    tcp dport {port} drop\n    tcp sport {port} drop\n  }}\n}}\n"
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
    let spec = pair_spec(true);
    let mut tb = up(&spec, &handshaking());
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
    let flood = s.probe_node(
        "node-3",
        &[
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
    );
    tb.resume_agent("node-2").expect("SIGCONT node-2's agent");
    let s = scenario(&tb);
    assert!(ok(&flood), "the flood tool failed: {flood}");
    let t = Instant::now();
    let thawed = s.status("node-2");
    let status_ms = t.elapsed().as_millis() as u64;
    // Every dropped SYN is rate-limited, lost, or delivered to the agent (which may drop it
    // when busy, and counts that too).
    let delta = |st: &Value, name: &str| counter_growth(st, &before, name);
    let field = |st: &Value, name: &str| field_growth(st, &before, name);
    let mut last = Value::Null;
    let balanced = eventually(Duration::from_secs(30), || {
        last = s.status("node-2");
        events_account_for(&last, &before, "drop_no_auth")
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

/// `Tcp: InSegs` of pod `pod`'s network namespace: every TCP segment its stack received, both
/// families.
fn tcp_in_segs(tb: &Testbed, pod: &str) -> u64 {
    let out = tb
        .run_in(pod, &["cat", "/proc/net/snmp"])
        .expect("reading /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no Tcp InSegs in {pod}'s /proc/net/snmp:\n{text}"))
}

/// Root on node-3 forges SYNs with the source address of `client` (node-1), whose pair with
/// `server` (node-2) is authenticated by a real proof, so that its entry is keyed: the forged
/// SYNs carry no connection MAC and not one is admitted. node-2 counts each exactly once as
/// `drop_no_mac` while its events stay rate-limited, the server's stack never sees them, and
/// the genuine client, whose SYNs node-1 signs, still connects. Both families.
#[test]
fn forged_syns_from_a_compromised_node_carry_no_mac_and_none_is_admitted() {
    const SYNS: u64 = 1_000;
    let tb = up(&pair_spec(true), &handshaking());
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let client_id = s.identity("client");
    let mut outcomes = Vec::new();
    for family in [Family::V4, Family::V6] {
        let target = s.addr("server", family);
        // A real proof: the first connection asks for it, its retransmitted SYN gets in.
        assert!(
            eventually(Duration::from_secs(30), || ok(
                &s.connect("client", target, PORT, 3000)
            )),
            "{family:?}: the pair did not authenticate: {}",
            s.status("node-2")["auth"]
        );
        let signed_before = counters(&s.status("node-1"))["pass_signed"];
        let genuine = s.connect("client", target, PORT, 3000);
        let signed_after = counters(&s.status("node-1"))["pass_signed"];
        assert!(
            ok(&genuine) && signed_after > signed_before,
            "{family:?}: the genuine SYN was not signed (pass_signed on node-1 {signed_before} → {signed_after}): {genuine}"
        );
        // Let the genuine connection's last segments settle before counting.
        thread::sleep(Duration::from_millis(300));
        let before = s.status("node-2");
        let proofs = |st: &Value| {
            st["handshakes"]
                .as_array()
                .map_or(0, |hs| hs.iter().filter(|h| h["stage"] == "proof").count())
        };
        let segs_before = tcp_in_segs(&tb, "server");
        let flood = s.probe_node(
            "node-3",
            &[
                "flood",
                "--to",
                &sock(target, PORT),
                "--sources",
                &s.addr("client", family).to_string(),
                "--count",
                "1",
                "--packets",
                &SYNS.to_string(),
                "--seconds",
                "20",
            ],
        );
        assert!(
            ok(&flood) && flood["sent"] == SYNS,
            "{family:?}: the flood tool failed: {flood}"
        );
        let delta = |st: &Value, name: &str| counter_growth(st, &before, name);
        let field = |st: &Value, name: &str| field_growth(st, &before, name);
        let mut last = Value::Null;
        eventually(Duration::from_secs(5), || {
            last = s.status("node-2");
            delta(&last, "drop_no_mac") >= SYNS
        });
        // Nothing more arrives afterwards: the count is exact, not a lower bound.
        thread::sleep(Duration::from_millis(500));
        let after = s.status("node-2");
        let segs = tcp_in_segs(&tb, "server") - segs_before;
        let event_seen = eventually(Duration::from_secs(5), || {
            s.status("node-2")["events"].as_array().is_some_and(|evs| {
                evs.iter().any(|e| {
                    e["kind"] == "denied"
                        && e["reason"] == "drop_no_mac"
                        && e["remote"] == client_id.as_str()
                })
            })
        });
        let balanced = eventually(Duration::from_secs(10), || {
            last = s.status("node-2");
            events_account_for(&last, &before, "drop_no_mac")
        });
        let flood_s = flood["seconds"].as_f64().unwrap_or(0.0);
        let signed_before = counters(&s.status("node-1"))["pass_signed"];
        let settled = s.status("node-2");
        let genuine_after = s.connect("client", target, PORT, 3000);
        let signed_after = counters(&s.status("node-1"))["pass_signed"];
        let during: BTreeMap<String, u64> = {
            let (a, b) = (counters(&s.status("node-2")), counters(&settled));
            a.iter()
                .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
                .filter(|(_, d)| *d > 0)
                .collect()
        };
        let outcome = json!({
            "family": format!("{family:?}"),
            "flood": flood,
            "drop_no_mac": delta(&after, "drop_no_mac"),
            "drop_bad_mac": delta(&after, "drop_bad_mac"),
            "drop_no_auth": delta(&after, "drop_no_auth"),
            "pass_authenticated": delta(&after, "pass_authenticated"),
            "pass_audit": delta(&after, "pass_audit"),
            "server_tcp_segments": segs,
            "events_delivered": field(&last, "events_total"),
            "events_rate_limited": delta(&last, "event_rate_limited"),
            "events_lost": delta(&last, "event_lost"),
            "denied_event_seen": event_seen,
            "accounted": balanced,
            "genuine_after": genuine_after,
            "genuine_after_signed": signed_after - signed_before,
            "node2_counters_during_genuine_after": during,
            "proofs_driven_by_the_flood": proofs(&settled).saturating_sub(proofs(&before)),
        });
        report("forged_syns_from_a_node", &outcome);
        assert_eq!(
            delta(&after, "drop_no_mac"),
            SYNS,
            "{family:?}: every forged SYN must count exactly once as drop_no_mac: {outcome}"
        );
        assert_eq!(
            delta(&after, "pass_authenticated"),
            0,
            "{family:?}: node-2 admitted forged SYNs: {outcome}"
        );
        assert_eq!(
            delta(&after, "pass_audit"),
            0,
            "{family:?}: node-2 let forged SYNs through in audit: {outcome}"
        );
        assert_eq!(
            segs, 0,
            "{family:?}: the server's stack received TCP segments during the flood: {outcome}"
        );
        assert!(
            event_seen,
            "{family:?}: no denied event naming drop_no_mac and the client: {outcome}"
        );
        assert!(
            balanced,
            "{family:?}: dropped SYNs unaccounted for in events: {outcome}"
        );
        // At most one event per pair every 100 ms, and a little slack.
        assert!(
            (field(&last, "events_total") as f64) <= flood_s * 10.0 + 5.0,
            "{family:?}: the forged SYNs were not rate-limited as events: {outcome}"
        );
        assert!(
            ok(&genuine_after) && signed_after > signed_before,
            "{family:?}: the genuine client no longer connects with a signed SYN: {outcome}"
        );
        // Forged SYNs must not drive proofs (each would rotate the pair's keys), and the
        // genuine client's next connection gets in at its first SYN.
        assert_eq!(
            proofs(&settled),
            proofs(&before),
            "{family:?}: the forged SYNs made node-2 prove the pair again: {outcome}"
        );
        assert!(
            during.keys().all(|k| !k.starts_with("drop_")),
            "{family:?}: node-2 dropped the genuine client's SYN after the flood: {outcome}"
        );
        outcomes.push(outcome);
    }
    report("forged_syns_from_a_node_all", &json!(outcomes));
}

/// The entry for kernel map `name` in a status.
fn map_of(status: &Value, name: &str) -> Value {
    status["maps"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A pod's workload as the testbed enrolled it.
fn workload_of(tb: &Testbed, pod: &str) -> Workload {
    tb.pod(pod).workload()
}

/// Cluster state grows past what the kernel maps hold: 262,144 more IPv6 addresses (node-3's,
/// whose agent is stopped) than the endpoint map has room for, and 131,072 more identities
/// than the name map has. The node's own and local pods' endpoints stay; what is left out is
/// a remote peer (dropped as unknown), counted in status; and reconciliation goes on: a
/// workload removed meanwhile is revoked and its live transfer cut. When cluster state
/// shrinks, everything is programmed again.
#[test]
fn full_endpoint_and_name_maps_leave_remote_peers_out_and_revocation_goes_on() {
    const FLOOD: u32 = 262_144;
    let spec = pair_spec(true);
    let mut tb = up(&spec, &Options::default());
    tb.stop_agent("node-3").expect("stopping node-3's agent");
    let s = scenario(&tb);
    let (_server, target) = allowed_pair(&s, Family::V6);
    let client = workload_of(&tb, "client");
    let first: Ipv6Addr = "fd00:18:3::1:0".parse().unwrap();
    let t = Instant::now();
    let mut cluster = tb.cluster().expect("reading cluster state");
    for k in 0..FLOOD {
        cluster.workloads.push(Workload {
            name: format!("bulk-{k}"),
            namespace: "bulk".into(),
            // Two workloads per identity: 131,072 identities.
            service_account: format!("b{}", k / 2),
            node: "node-3".into(),
            // Two addresses each: 524,288, twice what the IPv6 map holds.
            addresses: (0..2u128)
                .map(|i| IpAddr::V6(Ipv6Addr::from(u128::from(first) + 2 * u128::from(k) + i)))
                .collect(),
            spiffe_id: None,
            extra: BTreeMap::new(),
        });
    }
    tb.set_cluster_json(&cluster)
        .expect("writing cluster state");
    let mut full = Value::Null;
    let applied = eventually(Duration::from_secs(120), || {
        full = s.status("node-2");
        map_of(&full, "endpoints")["missing"].as_u64() > Some(0)
            && map_of(&full, "names")["missing"].as_u64() > Some(0)
    });
    let apply_s = t.elapsed().as_secs_f64();
    assert!(
        applied,
        "node-2 never reported the maps full: {}",
        full["maps"]
    );
    let endpoints = map_of(&full, "endpoints");
    let names = map_of(&full, "names");
    let still_connects = ok(&s.connect("client", target, PORT, 3000));
    let (text_ok, text) = s.portcullis("node-2", &["status"]);

    // A revocation while both maps are full: the client leaves cluster state mid-transfer.
    // The transfer is paced to outlast any plausible revocation (90 s), so that only a cut
    // ends it early: a slow machine then fails on the revocation's own bound, not on a race.
    let transfer = s.transfer("client", target, PORT, 90_000_000, 90, 3000);
    thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    cluster.workloads.retain(|w| w.name != client.name);
    tb.set_cluster_json(&cluster)
        .expect("removing the client from cluster state");
    let revoked = eventually(Duration::from_secs(80), || {
        s.status("node-2")["auth"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    let revoke_s = t.elapsed().as_secs_f64();
    let cut = transfer.finish();
    let refused_after_revocation = !ok(&s.connect("client", target, PORT, 1000));

    // Room again: the bulk goes, the client comes back.
    let t = Instant::now();
    cluster.workloads.retain(|w| w.namespace != "bulk");
    cluster.workloads.push(client.clone());
    tb.set_cluster_json(&cluster)
        .expect("shrinking cluster state");
    let mut recovered_status = Value::Null;
    let recovered = eventually(Duration::from_secs(120), || {
        recovered_status = s.status("node-2");
        map_of(&recovered_status, "endpoints")["missing"].as_u64() == Some(0)
            && map_of(&recovered_status, "endpoints")["entries"].as_u64() < Some(100)
    });
    let recover_s = t.elapsed().as_secs_f64();
    s.allow("server", "client");
    let reconnects = eventually(Duration::from_secs(20), || {
        ok(&s.connect("client", target, PORT, 2000))
    });
    let outcome = json!({
        "bulk_addresses": FLOOD,
        "bulk_identities": FLOOD / 2,
        "applied_seconds": apply_s,
        "endpoints": endpoints,
        "names": names,
        "allowed_pair_still_connects": still_connects,
        "revocation_seconds": revoke_s,
        "transfer_after_revocation": cut,
        "refused_after_revocation": refused_after_revocation,
        "recovered": recovered,
        "recovery_seconds": recover_s,
        "endpoints_after": map_of(&recovered_status, "endpoints"),
        "reconnects": reconnects,
    });
    report("full_endpoint_and_name_maps", &outcome);
    assert!(
        endpoints["entries"].as_u64() >= Some(u64::from(FLOOD)),
        "the IPv6 endpoint map did not fill: {outcome}"
    );
    assert!(
        endpoints["error"]
            .as_str()
            .is_some_and(|e| e.contains("full") || e.contains("os error 7")),
        "the refusal's cause is not shown: {outcome}"
    );
    assert_eq!(
        names["entries"].as_u64(),
        names["capacity"].as_u64(),
        "the name map did not fill: {outcome}"
    );
    assert!(
        still_connects,
        "a full map displaced an existing pair: {outcome}"
    );
    assert!(
        text_ok && text.contains("FULL") && text.contains("not programmed"),
        "`portcullis status` does not say the maps are full:\n{text}"
    );
    assert!(
        revoked,
        "the revocation did not happen while the maps were full: {outcome}"
    );
    assert!(
        !ok(&cut),
        "the revoked pair's transfer was not cut: {outcome}"
    );
    assert!(
        refused_after_revocation,
        "the revoked pair still connects: {outcome}"
    );
    assert!(recovered, "the maps did not recover: {outcome}");
    assert!(reconnects, "the pair did not come back: {outcome}");
    assert!(tb.agent_running("node-2") && tb.agent_running("node-1"));
}

/// Runs `probe map-fill` on the host against node `node`'s pinned map `map`.
fn map_fill(s: &Scenario<'_>, node: &str, map: &str, count: u32, delete: bool) -> Value {
    let pin = s.tb.node(node).bpffs_dir.join("maps").join(map);
    let mut cmd = std::process::Command::new(&s.probe);
    cmd.args(["map-fill", "--pin", pin.to_str().unwrap(), "--count"])
        .arg(count.to_string());
    if delete {
        cmd.arg("--delete");
    }
    let out = cmd.output().expect("running probe map-fill");
    last_json(&out.stdout)
}

/// The auth map full (node-2's, filled to capacity with entries of no pair): a handshake that
/// succeeds cannot be written, so the responder refuses it as `internal` with the kernel's
/// words, status counts the refusal, and the pair is not admitted. When there is room again,
/// the pair's next connection authenticates by itself.
#[test]
fn a_full_auth_map_refuses_the_pair_visibly_and_recovers() {
    let spec = pair_spec(false);
    let tb = up(&spec, &handshaking());
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    let filled = map_fill(&s, "node-2", "PC_AUTH", 200_000, false);
    assert!(
        ok(&filled) && filled["refused"] == 1,
        "could not fill node-2's auth map: {filled}"
    );
    let admitted_while_full = (0..3)
        .filter(|_| ok(&s.connect("client", target, PORT, 2000)))
        .count();
    let mut st = Value::Null;
    let counted = eventually(Duration::from_secs(20), || {
        st = s.status("node-2");
        map_of(&st, "auth")["refused"].as_u64() > Some(0)
    });
    let responder: Vec<Value> = st["handshakes"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter(|h| h["role"] == "responder")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let (text_ok, text) = s.portcullis("node-2", &["status"]);
    let emptied = map_fill(&s, "node-2", "PC_AUTH", 200_000, true);
    let t = Instant::now();
    let recovered = eventually(Duration::from_secs(60), || {
        ok(&s.connect("client", target, PORT, 2000))
    });
    let outcome = json!({
        "junk_entries": filled["done"],
        "admitted_while_full": admitted_while_full,
        "auth_map": map_of(&st, "auth"),
        "responder_handshakes": responder,
        "recovered": recovered,
        "recovery_seconds": t.elapsed().as_secs_f64(),
        "junk_removed": emptied["done"],
    });
    report("full_auth_map", &outcome);
    assert_eq!(
        admitted_while_full, 0,
        "admitted without an entry: {outcome}"
    );
    assert!(counted, "the refused write was not counted: {outcome}");
    assert!(
        map_of(&st, "auth")["error"]
            .as_str()
            .is_some_and(|e| e.contains("os error 7")),
        "the kernel's refusal is not shown: {outcome}"
    );
    assert!(
        responder.iter().any(|h| h["reason"] == "internal"
            && h["detail"]
                .as_str()
                .is_some_and(|d| d.contains("os error 7"))),
        "no responder handshake says why it failed: {outcome}"
    );
    assert!(
        text_ok && text.contains("refused"),
        "`portcullis status` does not show the refusals:\n{text}"
    );
    assert!(
        recovered,
        "the pair did not authenticate once there was room: {outcome}"
    );
}

/// A pod floods the flow table (320,000 SYNs from its own address to 320,000 different ports
/// of a peer; the table holds 262,144): the table fills and evicts the least recently used
/// flows. Status says so, nothing unauthenticated gets in, the agent keeps answering, and new
/// authenticated connections are made. What happens to a busy transfer and to a connection
/// idle during the flood is counted.
#[test]
fn a_flow_table_flood_evicts_visibly_and_admits_nothing_unauthenticated() {
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![
                    PodSpec::new("client"),
                    PodSpec::new("other"),
                    PodSpec::new("flooder"),
                ],
            ),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    let mut tb = up(&spec, &Options::default());
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    s.allow("server", "client");
    let busy = s.transfer("client", target, PORT, 20_000_000, 16, 3000);
    // Two bytes, eight seconds apart: the connection is idle while the flood runs.
    let idle = s
        .probe_cmd(
            "client",
            &[
                "send",
                "--to",
                &testbed::scenario::sock(target, PORT),
                "--bytes",
                "2",
                "--chunk",
                "1",
                "--seconds",
                "16",
                "--timeout-ms",
                "3000",
            ],
        )
        .spawn()
        .expect("spawning the idle connection");
    thread::sleep(Duration::from_secs(2));
    let before = s.status("node-1");
    let flooder = s.addr("flooder", Family::V4);
    let flood = s.probe(
        "flooder",
        &[
            "flood",
            "--to",
            &testbed::scenario::sock(target, 20_000),
            "--sources",
            &flooder.to_string(),
            "--count",
            "1",
            "--packets",
            "320000",
            "--ports",
            "7",
            "--seconds",
            "20",
        ],
    );
    let t = Instant::now();
    let during = s.status("node-1");
    let status_ms = t.elapsed().as_millis() as u64;
    let unauthenticated_admitted = ok(&s.connect("other", target, PORT, 1000));
    let new_authenticated = ok(&s.connect("client", target, PORT, 3000));
    let busy = busy.finish();
    let idle = last_json(&idle.wait_with_output().expect("idle connection").stdout);
    let after = s.status("node-1");
    let delta = |name: &str| {
        counters(&after).get(name).copied().unwrap_or(0)
            - counters(&before).get(name).copied().unwrap_or(0)
    };
    let (text_ok, text) = s.portcullis("node-1", &["status"]);
    let outcome = json!({
        "flood": flood,
        "flows": map_of(&during, "flows"),
        "status_ms": status_ms,
        "unauthenticated_admitted": unauthenticated_admitted,
        "new_authenticated_connection": new_authenticated,
        "busy_transfer": busy,
        "idle_connection": idle,
        "drop_no_flow": delta("drop_no_flow"),
        "drop_flow_table_full": delta("drop_flow_table_full"),
        "pass_outbound": delta("pass_outbound"),
        "evicted": map_of(&after, "flows")["evicted"],
    });
    report("flow_table_flood", &outcome);
    assert!(ok(&flood), "the flood tool failed: {outcome}");
    let flows = map_of(&during, "flows");
    assert!(
        flows["entries"].as_u64() >= flows["capacity"].as_u64().map(|c| c * 99 / 100),
        "the flow table did not fill: {outcome}"
    );
    assert!(
        text_ok && text.contains("evicting"),
        "`portcullis status` does not say the flow table is evicting:\n{text}"
    );
    // More flows than the table holds: the LRU evicted some, and they are counted.
    assert!(
        map_of(&after, "flows")["evicted"].as_u64().unwrap_or(0) > 0,
        "the evictions were not counted: {outcome}"
    );
    assert!(
        text.contains(" evicted"),
        "`portcullis status` does not show the evictions:\n{text}"
    );
    assert!(
        !unauthenticated_admitted,
        "an unauthenticated connection got in under the flood: {outcome}"
    );
    assert!(
        new_authenticated,
        "no new authenticated connection under a full flow table: {outcome}"
    );
    assert!(tb.agent_running("node-1"), "node-1's agent died");
}

/// Faults under a running agent, each with a clear account and recovery without a restart:
/// a pod's interface vanishes and comes back (new index); the agent's pinned links are removed
/// from bpffs (they take the programs with them); a pod is deleted while a handshake for it
/// is under way. And a SYN-timeout cgroup that does not exist stops the agent at start with
/// the path named, and it starts once the path exists. (Directly wired: an interface that
/// vanishes and comes back without CNI DEL and ADD is found again by route.)
#[test]
fn interface_loss_pin_loss_and_a_pod_deleted_mid_handshake_are_survived() {
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![
                    PodSpec::new("client"),
                    PodSpec::new("outsider").enroll(false),
                ],
            ),
            NodeSpec::new(
                "node-2",
                vec![PodSpec::new("server"), PodSpec::new("doomed")],
            ),
        ],
    };
    let mut tb = up(
        &spec,
        &Options {
            wiring: Some(Wiring::Direct),
            ..handshaking()
        },
    );
    let server_label = "default/server";
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    let enforced = |s: &Scenario<'_>| {
        ok(&s.connect("client", target, PORT, 3000))
            && !ok(&s.connect("outsider", target, PORT, 500))
    };
    assert!(enforced(&s), "the testbed does not enforce to begin with");
    let ifindex_before = s.status("node-2")["interfaces"]
        .as_array()
        .and_then(|is| is.iter().find(|i| i["workload"] == server_label))
        .map(|i| i["ifindex"].clone())
        .expect("server's interface is not attached");

    // 1. The interface vanishes (the pod stays in cluster state), then a new one appears.
    tb.unplug_pod("server").expect("deleting server's veth");
    let mut st = Value::Null;
    let noticed = eventually(Duration::from_secs(10), || {
        st = s.status("node-2");
        st["agent"]["pending"]
            .as_array()
            .or(st["pending"].as_array())
            .is_some_and(|p| p.iter().any(|w| w == server_label))
    });
    let pending_while_gone = st["pending"].clone();
    let ready_while_gone = st["agent"]["ready"].clone();
    tb.replug_pod("server").expect("re-creating server's veth");
    let t = Instant::now();
    let mut reattached = Value::Null;
    let back = eventually(Duration::from_secs(20), || {
        reattached = s.status("node-2");
        reattached["interfaces"]
            .as_array()
            .and_then(|is| is.iter().find(|i| i["workload"] == server_label))
            .is_some_and(|i| i["ifindex"] != ifindex_before)
    });
    let enforced_after_replug = back && enforced(&s);
    let replug_s = t.elapsed().as_secs_f64();

    // 2. The agent's pinned links are removed from under it.
    let links = tb.node("node-2").bpffs_dir.join("links");
    std::fs::remove_dir_all(&links).expect("removing node-2's pinned links");
    let t = Instant::now();
    let repinned = eventually(Duration::from_secs(10), || {
        std::fs::read_dir(&links).is_ok_and(|d| d.count() >= 2)
    });
    let repin_s = t.elapsed().as_secs_f64();
    let enforced_after_repin = repinned && enforced(&s);

    // 3. A pod deleted while a handshake for it waits on a frozen responder.
    let doomed = s.addr("doomed", Family::V4);
    let doomed_id = s.identity("doomed");
    tb.pause_agent("node-2").expect("SIGSTOP node-2's agent");
    let s = scenario(&tb);
    let attempt = s
        .probe_cmd(
            "client",
            &[
                "connect",
                "--to",
                &testbed::scenario::sock(doomed, PORT),
                "--timeout-ms",
                "3000",
            ],
        )
        .spawn()
        .expect("connecting to the doomed pod");
    thread::sleep(Duration::from_millis(700));
    let in_flight = s.status("node-1")["handshakes"].clone();
    drop(s);
    tb.remove_pod("doomed").expect("deleting the doomed pod");
    tb.resume_agent("node-2").expect("SIGCONT node-2's agent");
    let doomed_connect = last_json(&attempt.wait_with_output().expect("connect").stdout);
    let s = scenario(&tb);
    let entries_of_doomed = |node: &str| {
        s.status(node)["auth"].as_array().map_or(0, |a| {
            a.iter()
                .filter(|e| e["local"] == doomed_id.as_str() || e["remote"] == doomed_id.as_str())
                .count()
        })
    };
    let no_leftover = eventually(Duration::from_secs(15), || {
        entries_of_doomed("node-1") == 0 && entries_of_doomed("node-2") == 0
    });
    let handshakes_of_doomed: Vec<Value> = ["node-1", "node-2"]
        .iter()
        .flat_map(|n| {
            s.status(n)["handshakes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|h| h["local"] == doomed_id.as_str() || h["remote"] == doomed_id.as_str())
                .map(|h| json!({"role": h["role"], "result": h["result"], "reason": h["reason"]}))
                .collect::<Vec<_>>()
        })
        .collect();
    let enforced_after_delete = enforced(&s);
    let log = tb.agent_log("node-2");
    let panicked = log.contains("panicked");
    let outcome = json!({
        "interface_gone_noticed": noticed,
        "pending_while_gone": pending_while_gone,
        "ready_while_gone": ready_while_gone,
        "enforced_after_replug": enforced_after_replug,
        "replug_seconds": replug_s,
        "links_repinned": repinned,
        "repin_seconds": repin_s,
        "enforced_after_repin": enforced_after_repin,
        "handshakes_in_flight": in_flight.as_array().map_or(0, Vec::len),
        "connect_to_deleted_pod": doomed_connect,
        "no_entry_left_for_deleted_pod": no_leftover,
        "handshakes_of_deleted_pod": handshakes_of_doomed,
        "enforced_after_delete": enforced_after_delete,
        "agent_panicked": panicked,
    });
    report("runtime_faults", &outcome);
    assert!(
        noticed,
        "the vanished interface is not reported as pending: {outcome}"
    );
    assert!(
        log.contains("waiting for the pod's interface"),
        "the agent did not say it waits for the interface"
    );
    assert!(
        enforced_after_replug,
        "no enforcement on the new interface: {outcome}"
    );
    assert!(
        repinned,
        "the removed links were not pinned again: {outcome}"
    );
    assert!(
        log.contains("pinned links of an enforced interface vanished"),
        "the agent did not say the links vanished"
    );
    assert!(
        enforced_after_repin,
        "no enforcement after the links came back: {outcome}"
    );
    assert!(
        !ok(&doomed_connect),
        "a connection reached a deleted pod: {outcome}"
    );
    assert!(
        no_leftover,
        "an auth entry of the deleted pod remains: {outcome}"
    );
    assert!(
        enforced_after_delete,
        "enforcement broke after the deletion: {outcome}"
    );
    assert!(!panicked, "the agent panicked");
    drop(s);

    // 4. A SYN-timeout cgroup that does not exist: the agent refuses to start and names it.
    let missing = tb.node("node-2").pods_cgroup.join("no-such-cgroup");
    tb.stop_agent("node-2").expect("stopping node-2's agent");
    tb.write_agent_config("node-2", |c| {
        let fc = c
            .extra
            .entry("first_connection".to_owned())
            .or_insert_with(|| serde_yaml::Value::Mapping(serde_yaml::Mapping::new()));
        fc.as_mapping_mut()
            .expect("first_connection is a mapping")
            .insert("cgroup".into(), missing.display().to_string().into());
    })
    .expect("pointing the SYN timeout at a missing cgroup");
    let refused = tb.start_agent("node-2");
    let log = tb.agent_log("node-2");
    assert!(refused.is_err(), "the agent started without its cgroup");
    assert!(
        log.contains(&missing.display().to_string()),
        "the agent's error does not name the missing cgroup:\n{}",
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    testbed::cgroup::create(&missing).expect("creating the cgroup");
    tb.start_agent("node-2")
        .expect("the agent did not start once the cgroup existed");
    let s = scenario(&tb);
    assert!(
        enforced(&s),
        "no enforcement after the restart with the cgroup in place"
    );
    // The node's cgroup tree, this one included, goes with the testbed.
}

/// A session set-up metric of node `node`'s agent, summed over the series whose labels
/// contain every one of `labels`.
fn session_metric(tb: &Testbed, node: &str, labels: &[&str]) -> u64 {
    tb.agent_http(node, "/metrics")
        .lines()
        .filter(|l| {
            l.starts_with("portcullis_session_establishments_total{")
                && labels.iter().all(|x| l.contains(x))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// 10,000 connections opened to node-2's session port from another node and held idle: the
/// agent's descriptors stay bounded by its concurrency limit, every connection beyond it is
/// closed at once and counted (`busy`, `rate_limited`), the ones admitted end at the session
/// set-up time limit, and a legitimate pair from elsewhere still authenticates.
#[test]
fn ten_thousand_idle_handshake_connections_leave_descriptors_bounded() {
    const CONNECTIONS: u64 = 10_000;
    let spec = pair_spec(true);
    let mut tb = up(&spec, &handshaking());
    let pid = tb.agent_pid("node-2").expect("node-2's agent pid");
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let baseline = fds();
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let port = tb.node("node-2").agent_address.to_string();
    let started = Instant::now();
    let mut hold = s
        .probe_node_cmd(
            "node-3",
            &[
                "hold",
                "--to",
                &port,
                "--count",
                &CONNECTIONS.to_string(),
                "--seconds",
                "8",
                "--timeout-ms",
                "2000",
            ],
        )
        .spawn()
        .expect("spawning probe hold");
    let mut peak = baseline;
    let mut legit: Option<f64> = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    while hold.try_wait().expect("probe hold").is_none() && Instant::now() < deadline {
        peak = peak.max(fds());
        if legit.is_none() && started.elapsed() > Duration::from_secs(1) {
            let t = Instant::now();
            if ok(&s.connect("client", s.addr("server", Family::V4), PORT, 3000)) {
                legit = Some(t.elapsed().as_secs_f64());
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = hold.kill();
    let held = last_json(&hold.wait_with_output().expect("probe hold").stdout);
    let hold_s = started.elapsed().as_secs_f64();
    let after = fds();
    let legit = legit.or_else(|| {
        let t = Instant::now();
        eventually(Duration::from_secs(30), || {
            ok(&s.connect("client", s.addr("server", Family::V4), PORT, 3000))
        })
        .then(|| t.elapsed().as_secs_f64())
    });
    let busy = session_metric(&tb, "node-2", &["role=\"responder\"", "reason=\"busy\""]);
    let limited = session_metric(
        &tb,
        "node-2",
        &["role=\"responder\"", "reason=\"rate_limited\""],
    );
    let timeouts = session_metric(&tb, "node-2", &["role=\"responder\"", "reason=\"timeout\""]);
    let outcome = json!({
        "connections": CONNECTIONS,
        "hold": held,
        "hold_seconds": hold_s,
        "agent_fds_before": baseline,
        "agent_fds_peak": peak,
        "agent_fds_after": after,
        "refused_busy": busy,
        "refused_rate_limited": limited,
        "ended_by_time_limit": timeouts,
        "legitimate_pair_seconds": legit,
    });
    report("idle_handshake_connections", &outcome);
    assert!(ok(&held), "probe hold failed: {outcome}");
    assert_eq!(
        held["opened"].as_u64().unwrap_or(0) + held["failed"].as_u64().unwrap_or(0),
        CONNECTIONS,
        "not every connection was attempted: {outcome}"
    );
    assert!(
        held["opened"].as_u64() >= Some(CONNECTIONS * 9 / 10),
        "most connections were not even opened: {outcome}"
    );
    // 32 handshakes at once (the default), plus the agent's own descriptors and some slack
    // for connections being closed.
    assert!(
        peak <= baseline + 32 + 32,
        "descriptors grew with the idle connections: {outcome}"
    );
    assert_eq!(
        held["still_open"], 0,
        "connections were held past the handshake time limit: {outcome}"
    );
    assert!(
        busy + limited + timeouts >= held["opened"].as_u64().unwrap_or(0) * 9 / 10,
        "the closed connections were not counted: {outcome}"
    );
    assert!(
        legit.is_some(),
        "the legitimate pair did not authenticate: {outcome}"
    );
    assert!(tb.agent_running("node-2"), "node-2's agent died");
}

/// The node's own addresses change without any change to cluster state, and the agent follows
/// them between full walks of cluster state: an address added to node-2 is programmed as the
/// node's (its connections to a local pod are node traffic), one that a remote pod already
/// claims keeps the pod's claim, and both are removed again when they leave the node — while
/// the client's genuine connections go on.
#[test]
fn node_addresses_added_and_removed_at_runtime_are_followed_without_displacing_a_pod() {
    let spec = pair_spec(false);
    let tb = up(&spec, &Options::default());
    let s = scenario(&tb);
    let (_server, target) = allowed_pair(&s, Family::V4);
    let client = s.addr("client", Family::V4);
    let entries = |s: &Scenario<'_>| map_of(&s.status("node-2"), "endpoints")["entries"].as_u64();
    let before = entries(&s);
    let ip = |args: &[&str]| {
        let out = tb.exec_node("node-2", args).output().expect("running ip");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let from_node = |from: IpAddr| s.connect_from_node("node-2", Some(from), target, PORT, 1000);
    let pass_host = |s: &Scenario<'_>| counters(&s.status("node-2"))["pass_host"];

    // A new address of the node: programmed as the node's, without a cluster-state change.
    let added: IpAddr = "198.19.250.1".parse().unwrap();
    ip(&["ip", "addr", "add", "198.19.250.1/32", "dev", "lo"]);
    let t = Instant::now();
    let programmed = eventually(Duration::from_secs(10), || {
        entries(&s) == before.map(|n| n + 1)
    });
    let programmed_s = t.elapsed().as_secs_f64();
    let host_before = pass_host(&s);
    let node_conn = from_node(added);
    let host_after = pass_host(&s);

    // An address a remote pod claims, added to the node too: the pod's claim stays.
    ip(&["ip", "addr", "add", &format!("{client}/32"), "dev", "lo"]);
    thread::sleep(Duration::from_secs(2));
    let entries_with_claimed = entries(&s);
    let host_claimed_before = pass_host(&s);
    let claimed_conn = from_node(client);
    let host_claimed_after = pass_host(&s);

    // Both leave the node: the node's address is removed, the pod's claim stays.
    ip(&["ip", "addr", "del", &format!("{client}/32"), "dev", "lo"]);
    ip(&["ip", "addr", "del", "198.19.250.1/32", "dev", "lo"]);
    let t = Instant::now();
    let removed = eventually(Duration::from_secs(10), || entries(&s) == before);
    let removed_s = t.elapsed().as_secs_f64();
    thread::sleep(Duration::from_secs(1));
    let entries_after = entries(&s);
    let client_connects = ok(&s.connect("client", target, PORT, 3000));
    let outcome = json!({
        "endpoints_before": before,
        "programmed": programmed,
        "programmed_seconds": programmed_s,
        "node_connection": node_conn,
        "pass_host_delta": host_after - host_before,
        "endpoints_with_claimed_address": entries_with_claimed,
        "claimed_address_connection": claimed_conn,
        "pass_host_delta_claimed": host_claimed_after - host_claimed_before,
        "removed": removed,
        "removed_seconds": removed_s,
        "endpoints_after": entries_after,
        "client_connects": client_connects,
    });
    report("node_addresses_at_runtime", &outcome);
    assert!(before.is_some(), "no endpoint count in status: {outcome}");
    assert!(
        programmed,
        "a node address added at runtime was not programmed: {outcome}"
    );
    assert!(
        ok(&node_conn) && host_after > host_before,
        "a connection from the node's new address was not node traffic: {outcome}"
    );
    assert_eq!(
        entries_with_claimed,
        before.map(|n| n + 1),
        "an address a pod claims was programmed anew: {outcome}"
    );
    assert_eq!(
        host_claimed_after, host_claimed_before,
        "the node's claim displaced a remote pod's: {outcome}"
    );
    assert!(
        removed && entries_after == before,
        "the node's address was not removed, or the pod's claim went with it: {outcome}"
    );
    assert!(client_connects, "the client no longer connects: {outcome}");
}

/// The agent's map pins removed from bpffs while it runs (a clean-up gone wrong): the maps
/// live on through the agent's descriptors, and it pins them again, directory and all, so that
/// an agent killed and started after that finds the same state — the pair's auth entry and the
/// counters — instead of empty maps.
#[test]
fn map_pins_removed_at_runtime_are_pinned_again_and_a_restart_keeps_the_state() {
    let spec = pair_spec(false);
    let mut tb = up(&spec, &Options::default());
    let maps = tb.node("node-2").bpffs_dir.join("maps");
    let s = scenario(&tb);
    let (_server, target) = allowed_pair(&s, Family::V4);
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&maps)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let pins = listing();
    let before = s.status("node-2");
    let auth_before = before["auth_total"].as_u64();
    let passed_before = counters(&before)["pass_authenticated"];

    std::fs::remove_dir_all(&maps).expect("removing the map pins");
    let t = Instant::now();
    let repinned = eventually(Duration::from_secs(5), || listing() == pins);
    let repin_s = t.elapsed().as_secs_f64();
    let pinned_log = tb.agent_log("node-2").contains("pinned them again");
    drop(s);

    let killed = tb.kill_agent("node-2").expect("killing node-2's agent");
    tb.start_agent("node-2")
        .expect("starting node-2's agent again");
    let s = scenario(&tb);
    let after = s.status("node-2");
    let connects = ok(&s.connect("client", target, PORT, 3000));
    let outcome = json!({
        "pins": pins,
        "repinned": repinned,
        "repin_seconds": repin_s,
        "logged": pinned_log,
        "killed": format!("{killed:?}"),
        "auth_total_before": auth_before,
        "auth_total_after_restart": after["auth_total"],
        "pass_authenticated_before": passed_before,
        "pass_authenticated_after_restart": counters(&after)["pass_authenticated"],
        "connects_after_restart": connects,
    });
    report("map_pins_removed", &outcome);
    assert!(
        pins.len() >= 5 && pins.iter().any(|p| p == "PC_AUTH"),
        "the agent's map pins were not found: {outcome}"
    );
    assert!(
        repinned && pinned_log,
        "the removed map pins were not pinned again: {outcome}"
    );
    assert!(
        auth_before >= Some(1) && after["auth_total"].as_u64() == auth_before,
        "the restarted agent did not find the auth entries: {outcome}"
    );
    assert!(
        counters(&after)["pass_authenticated"] >= passed_before,
        "the counters were reset: {outcome}"
    );
    assert!(
        connects,
        "the pair does not connect after the restart: {outcome}"
    );
}
