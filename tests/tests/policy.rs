//! The authorization policy, end to end: both agents evaluate it, the kernel enforces its ports
//! and modes, and an edit (or a workload leaving cluster state) takes access away from running
//! connections. Privileged: run as root (`cargo xtask test`). Without root these tests fail.

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    scenario::{Family, Scenario, Server, Transfer, counter, eventually, ok, sock},
};

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const UDP_PORT: u16 = 5353;

/// `client` may reach the `shop` and `payments` namespaces on 8080/tcp and 5353/udp;
/// `payments` may reach `default`. Nobody else may reach those destinations, so the pair
/// (intruder, server) is authorized in neither direction, while (intruder, ledger) is
/// authorized only from ledger to intruder. `payments` is in audit mode.
const POLICY: &str = "\
name: testbed-policy
namespaces:
  payments: { mode: audit }
rules:
  - name: client-to-shop
    from: [\"spiffe://cluster.local/ns/default/sa/client\"]
    to: [\"spiffe://cluster.local/ns/shop/*\", \"spiffe://cluster.local/ns/payments/*\"]
    ports: [\"8080/tcp\", \"5353/udp\"]
  - name: payments-to-default
    from: [\"spiffe://cluster.local/ns/payments/*\"]
    to: [\"spiffe://cluster.local/ns/default/*\"]
";

fn up(poll_interval_ms: Option<u64>) -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the policy tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![PodSpec::new("client"), PodSpec::new("intruder")],
            ),
            NodeSpec::new(
                "node-2",
                vec![
                    PodSpec::new("server").namespace("shop"),
                    PodSpec::new("ledger").namespace("payments"),
                ],
            ),
        ],
    };
    let opts = Options {
        authenticate: true,
        policy: Some(POLICY.to_owned()),
        poll_interval_ms,
        ..Options::default()
    };
    Testbed::up(&spec, &opts).unwrap_or_else(|e| panic!("testbed up: {e:#}"))
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

fn has_entry(s: &Scenario<'_>, node: &str, local: &str, remote: &str) -> bool {
    s.status(node)["auth"].as_array().is_some_and(|es| {
        es.iter()
            .any(|e| e["local"] == local && e["remote"] == remote)
    })
}

/// Waits until proactive authentication has written the (client, server) entries on both nodes.
fn warm(s: &Scenario<'_>, a: &str, b: &str) {
    let (ia, ib) = (s.identity(a), s.identity(b));
    let (na, nb) = (s.tb.pod(a).node.clone(), s.tb.pod(b).node.clone());
    assert!(
        eventually(Duration::from_secs(10), || has_entry(s, &na, &ia, &ib)
            && has_entry(s, &nb, &ib, &ia)),
        "the pair ({a}, {b}) was not authenticated: {} / {}",
        s.status(&na)["auth"],
        s.status(&nb)["auth"]
    );
}

/// A server in `server`, the pair (client, server) authenticated, and a long transfer from the
/// client under way for two seconds: what the revocation tests take away.
fn running_transfer(s: &Scenario<'_>) -> (Server, std::net::IpAddr, Transfer) {
    let server = s.serve("server", PORT);
    warm(s, "client", "server");
    let target = s.addr("server", Family::V4);
    let transfer = s.transfer("client", target, PORT, 400_000_000, 20, 2000);
    thread::sleep(Duration::from_secs(2));
    (server, target, transfer)
}

fn handshakes(s: &Scenario<'_>, node: &str) -> Vec<Value> {
    s.status(node)["handshakes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn udp_echo(s: &Scenario<'_>, from: &str, to: &str) -> Value {
    s.probe(
        from,
        &[
            "udp-send",
            "--to",
            &sock(s.addr(to, Family::V4), UDP_PORT),
            "--count",
            "5",
            "--timeout-ms",
            "500",
        ],
    )
}

#[test]
fn a_forbidden_pair_is_dropped_on_every_attempt_while_the_allowed_pair_and_port_connect() {
    let tb = up(None);
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let _other = s.serve("server", OTHER_PORT);
    warm(&s, "client", "server");
    for family in [Family::V4, Family::V6] {
        let r = s.connect("client", s.addr("server", family), PORT, 2000);
        assert!(ok(&r), "{family:?}: the allowed pair did not connect: {r}");
    }
    for attempt in 0..3 {
        let r = s.connect("intruder", s.addr("server", Family::V4), PORT, 1500);
        assert!(
            !ok(&r),
            "attempt {attempt}: the forbidden pair connected: {r}"
        );
    }
    // The allowed pair, on a port the rule does not grant: dropped by the entry's ports.
    let before = counter(&s.status("node-2"), "drop_policy");
    let r = s.connect("client", s.addr("server", Family::V4), OTHER_PORT, 1500);
    assert!(!ok(&r), "a port outside the rule was admitted: {r}");
    assert!(
        counter(&s.status("node-2"), "drop_policy") > before,
        "the port refusal was not counted as drop_policy"
    );
    // Both agents refused the forbidden pair, naming the policy.
    let refused = |node: &str| {
        handshakes(&s, node)
            .iter()
            .any(|h| h["result"] == "failed" && h["reason"] == "not_authorized")
    };
    assert!(
        eventually(Duration::from_secs(5), || refused("node-1")
            && refused("node-2")),
        "not_authorized not recorded on both nodes: {:?} / {:?}",
        handshakes(&s, "node-1"),
        handshakes(&s, "node-2")
    );
    for node in ["node-1", "node-2"] {
        let log = tb.agent_log(node);
        assert!(
            log.contains("not authorized by policy `testbed-policy`")
                || log.contains("refused by the"),
            "{node}'s audit log does not explain the refusal"
        );
    }
    let intruder = s.identity("intruder");
    assert!(
        !has_entry(&s, "node-2", &s.identity("server"), &intruder),
        "the unauthorized pair got an entry"
    );
}

#[test]
fn audit_mode_admits_the_forbidden_connection_and_reports_a_would_be_drop() {
    let tb = up(None);
    let s = scenario(&tb);
    let _ledger = s.serve("ledger", PORT);
    let r = s.connect("intruder", s.addr("ledger", Family::V4), PORT, 3000);
    assert!(ok(&r), "audit mode dropped the connection: {r}");
    let st = s.status("node-2");
    assert!(
        counter(&st, "pass_audit") >= 1,
        "no pass_audit counted: {}",
        st["counters"]
    );
    let would_drop = |st: &Value| {
        st["events"].as_array().is_some_and(|es| {
            es.iter().any(|e| {
                e["kind"] == "would_drop" && e["remote"] == s.identity("intruder").as_str()
            })
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || would_drop(&s.status("node-2"))),
        "no would_drop event in status: {}",
        s.status("node-2")["events"]
    );
    assert!(
        tb.agent_log("node-2").contains("would_drop"),
        "no would_drop audit record"
    );
    let ledger = s.status("node-2")["interfaces"]
        .as_array()
        .and_then(|is| {
            is.iter()
                .find(|i| i["workload"] == "payments/ledger")
                .cloned()
        })
        .expect("ledger's interface in status");
    assert_eq!(ledger["mode"], "audit", "{ledger}");
}

/// The time from the policy file being replaced to the first dropped packet of the revoked
/// flow, and the agent's own time from reading the edit to the maps being updated.
#[test]
fn a_policy_edit_cuts_a_running_transfer_and_restoring_the_rule_readmits() {
    let tb = up(Some(50));
    let s = scenario(&tb);
    let (_server, target, transfer) = running_transfer(&s);
    let drops = |st: &Value| counter(st, "drop_no_flow");
    let before = drops(&s.status("node-2"));
    let revoked = POLICY.replace(
        "from: [\"spiffe://cluster.local/ns/default/sa/client\"]",
        "from: [\"spiffe://cluster.local/ns/default/sa/intruder\"]",
    );
    assert_ne!(revoked, POLICY);
    let t0 = Instant::now();
    tb.set_policy(&revoked).expect("editing the policy");
    let mut cut_after = None;
    while t0.elapsed() < Duration::from_secs(5) {
        if drops(&s.status("node-2")) > before {
            cut_after = Some(t0.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let cut_after = cut_after.expect("no packet of the revoked flow was dropped within 5 s");
    let result = transfer.finish();
    assert!(
        !ok(&result),
        "the transfer survived the revocation: {result}"
    );
    let agent_us = revalidation_us(&tb.agent_log("node-2"));
    eprintln!(
        "revocation: first packet dropped {:.1} ms after the policy file was replaced (file poll every 50 ms); the agent took {agent_us} µs from reading the edit to the maps being updated",
        cut_after.as_secs_f64() * 1000.0
    );
    assert!(
        agent_us < 100_000,
        "revalidation took {agent_us} µs, over the 100 ms goal"
    );
    assert!(
        !has_entry(&s, "node-1", &s.identity("client"), &s.identity("server")),
        "node-1 kept the revoked pair's entry"
    );
    let r = s.connect("client", target, PORT, 1500);
    assert!(
        !ok(&r),
        "a new connection of the revoked pair succeeded: {r}"
    );
    tb.set_policy(POLICY).expect("restoring the policy");
    assert!(
        eventually(Duration::from_secs(15), || ok(
            &s.connect("client", target, PORT, 1000)
        )),
        "restoring the rule did not readmit the pair"
    );
}

/// The `took_us` of the agent's last `revalidated` audit record.
fn revalidation_us(log: &str) -> u64 {
    log.lines()
        .rev()
        .filter(|l| l.contains("revalidated"))
        .find_map(|l| {
            let at = l.find("took_us=")? + "took_us=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .expect("no revalidated record with took_us in the agent log")
}

#[test]
fn deleting_a_workload_from_cluster_state_cuts_its_flows_on_the_peer_node() {
    let tb = up(Some(50));
    let s = scenario(&tb);
    let (_server, _, transfer) = running_transfer(&s);
    let client_addr = s.addr("client", Family::V4).to_string();
    let flows_of_client = |st: &Value| {
        st["flows"].as_array().map_or(0, |fs| {
            fs.iter()
                .filter(|f| {
                    f["remote"]
                        .as_str()
                        .is_some_and(|r| r.starts_with(&client_addr))
                })
                .count()
        })
    };
    assert!(
        flows_of_client(&s.status("node-2")) > 0,
        "node-2 tracks no flow of the client"
    );
    tb.write_cluster(|c| c.workloads.retain(|w| w.name != "client"))
        .expect("removing the client from cluster state");
    assert!(
        eventually(Duration::from_secs(3), || flows_of_client(
            &s.status("node-2")
        ) == 0),
        "node-2 kept the removed workload's flows: {}",
        s.status("node-2")["flows"]
    );
    let result = transfer.finish();
    assert!(
        !ok(&result),
        "the removed workload's transfer went on: {result}"
    );
}

#[test]
fn udp_between_an_allowed_pair_works_and_between_a_forbidden_pair_does_not() {
    let tb = up(None);
    let s = scenario(&tb);
    let _echo = s
        .probe_cmd(
            "server",
            &[
                "udp-serve",
                "--port",
                &UDP_PORT.to_string(),
                "--seconds",
                "120",
            ],
        )
        .spawn()
        .map(ChildGuard)
        .expect("starting udp-serve");
    warm(&s, "client", "server");
    let r = eventually(Duration::from_secs(5), || {
        ok(&udp_echo(&s, "client", "server"))
    });
    assert!(r, "the allowed pair's datagrams got no echo");
    let r = udp_echo(&s, "intruder", "server");
    assert!(!ok(&r), "the forbidden pair's datagrams were echoed: {r}");
    assert_eq!(r["received"], 0, "{r}");
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connections from the node itself (kubelet probes) are admitted by default and refused once
/// the namespace restricts them; ICMP echo is "another protocol" that policy drops by default
/// and can let through.
#[test]
fn node_traffic_and_other_protocols_follow_the_policy() {
    let tb = up(Some(100));
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    warm(&s, "client", "server");
    let server = s.addr("server", Family::V4);
    let from_node = || s.connect_from_node("node-2", None, server, PORT, 1000);
    let ping = || {
        tb.exec(
            "client",
            &["ping", "-c", "1", "-W", "1", &server.to_string()],
        )
        .output()
        .expect("ping")
        .status
        .success()
    };
    let r = from_node();
    assert!(
        ok(&r),
        "a connection from the node was refused by default: {r}"
    );
    assert!(counter(&s.status("node-2"), "pass_host") >= 1);
    assert!(
        !ping(),
        "ICMP echo passed with other_protocols at its default (drop)"
    );

    let edited = POLICY
        .replace(
            "name: testbed-policy\n",
            "name: testbed-policy\nother_protocols: pass\n",
        )
        .replace(
            "  payments: { mode: audit }\n",
            "  payments: { mode: audit }\n  shop: { node_traffic: deny }\n",
        );
    assert_ne!(edited, POLICY);
    tb.set_policy(&edited).expect("editing the policy");
    assert!(
        eventually(Duration::from_secs(5), || !ok(&from_node())),
        "node traffic was still admitted after `node_traffic: deny`"
    );
    assert!(counter(&s.status("node-2"), "drop_policy") >= 1);
    assert!(
        eventually(Duration::from_secs(5), ping),
        "ICMP echo still dropped with other_protocols: pass"
    );
}

/// An ICMP error that belongs to an admitted flow passes both programs: a datagram to a port
/// with no listener comes back as "port unreachable", which the sender sees as refused.
#[test]
fn icmp_errors_of_admitted_flows_pass() {
    let tb = up(None);
    let s = scenario(&tb);
    warm(&s, "client", "server");
    let r = udp_echo(&s, "client", "server");
    assert!(!ok(&r), "nobody listens, yet there was an echo: {r}");
    assert_eq!(
        r["recv_error"], "refused",
        "the ICMP port unreachable did not reach the sender: {r}"
    );
    assert!(counter(&s.status("node-2"), "pass_other") >= 1);
    assert!(counter(&s.status("node-1"), "pass_other") >= 1);
}

/// A workload re-labelled (another service account, so another SPIFFE ID) loses what its old
/// identity was allowed: its connections are cut on the peer node, and its new identity, which
/// the policy does not admit, cannot connect.
#[test]
fn relabelling_a_workload_cuts_its_flows_and_its_new_identity_is_judged_afresh() {
    let tb = up(Some(50));
    let s = scenario(&tb);
    let (_server, target, transfer) = running_transfer(&s);
    tb.write_cluster(|c| {
        for w in &mut c.workloads {
            if w.name == "client" {
                w.service_account = "renamed".into();
            }
        }
    })
    .expect("re-labelling the client");
    let result = transfer.finish();
    assert!(
        !ok(&result),
        "the re-labelled workload's transfer went on: {result}"
    );
    let old = s.identity("client");
    assert!(
        eventually(Duration::from_secs(3), || !has_entry(
            &s,
            "node-2",
            &s.identity("server"),
            &old
        )),
        "node-2 kept the old identity's entry"
    );
    let r = s.connect("client", target, PORT, 1500);
    assert!(
        !ok(&r),
        "the new identity, which no rule admits, connected: {r}"
    );
}
