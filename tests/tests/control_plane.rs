//! The control plane's answers to what the kernel and the network do under it: a pod whose route
//! lookup fails stays enforced; idle UDP flows are cut; pods in mode `off` fill no flow table.
//! Each case prints its counted outcome as a `control-plane outcome: {…}` line. Privileged: run
//! as root (`cargo xtask test`).

use std::{
    net::IpAddr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed, Wiring,
    bpfmap::PinnedMap,
    scenario::{Family, Scenario, eventually, ok},
};

const PORT: u16 = 8080;

fn up(spec: &Spec, opts: &Options) -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the control-plane tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
    Testbed::up(spec, opts).unwrap_or_else(|e| panic!("testbed up: {e:#}"))
}

fn pair() -> Spec {
    Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
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
        "control-plane outcome: {}",
        json!({ "case": case, "outcome": outcome })
    );
}

/// `(flags, ifindex)` of `addr` in node `node`'s kernel endpoint map.
fn endpoint(tb: &Testbed, node: &str, addr: IpAddr) -> Option<(u32, u32)> {
    let (name, key) = match addr {
        IpAddr::V4(a) => ("PC_EP_V4", a.octets().to_vec()),
        IpAddr::V6(a) => ("PC_EP_V6", a.octets().to_vec()),
    };
    let map = PinnedMap::open(&tb.node(node).bpffs_dir.join("maps").join(name))
        .unwrap_or_else(|e| panic!("opening {node}'s {name}: {e:#}"));
    let v = map.lookup(&key).expect("endpoint lookup")?;
    let word = |i: usize| u32::from_ne_bytes(v[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    Some((word(3), word(2)))
}

/// The interface `status` lists for `workload` on `node`.
fn interface(s: &Scenario<'_>, node: &str, workload: &str) -> Option<Value> {
    s.status(node)["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i["workload"] == workload)
        .cloned()
}

/// A route lookup that fails for a live pod used to program the pod as a remote peer and
/// detach its programs: an unenforced pod, until the lookup worked again. Now the pod stays
/// enforced on the interface it had (which still exists), `status` says why, and the lookup is
/// retried until it works.
///
/// Route lookup is how a directly wired node (no `portcullis-cni` records) finds interfaces.
#[test]
fn a_failing_route_lookup_keeps_a_live_pod_enforced() {
    let tb = up(
        &pair(),
        &Options {
            wiring: Some(Wiring::Direct),
            ..Options::default()
        },
    );
    let s = scenario(&tb);
    let server = tb.pod("server").clone();
    let label = "default/server";
    let before = interface(&s, "node-2", label).expect("server is not enforced to begin with");
    let ifindex = u32::try_from(before["ifindex"].as_u64().expect("ifindex")).expect("u32");
    let v4 = IpAddr::V4(server.ipv4);
    assert_eq!(
        endpoint(&tb, "node-2", v4).map(|(f, i)| (f & 1, i)),
        Some((1, ifindex)),
        "server's endpoint is not local to begin with"
    );
    let route = |verb: &str| {
        let st = tb
            .exec_node(
                "node-2",
                &[
                    "ip",
                    "route",
                    verb,
                    &format!("{}/32", server.ipv4),
                    "dev",
                    &server.host_veth,
                ],
            )
            .status()
            .expect("ip route");
        assert!(st.success(), "ip route {verb} failed");
        let st = tb
            .exec_node(
                "node-2",
                &[
                    "ip",
                    "-6",
                    "route",
                    verb,
                    &format!("{}/128", server.ipv6),
                    "dev",
                    &server.host_veth,
                ],
            )
            .status()
            .expect("ip -6 route");
        assert!(st.success(), "ip -6 route {verb} failed");
    };
    route("del");
    let mut during = Value::Null;
    let reported = eventually(Duration::from_secs(10), || {
        during = interface(&s, "node-2", label).unwrap_or(Value::Null);
        during["problem"]
            .as_str()
            .is_some_and(|p| p.contains("still enforcing"))
    });
    // A few more ticks under the failing lookup.
    thread::sleep(Duration::from_secs(2));
    let ep_during = endpoint(&tb, "node-2", v4);
    let links = tb.node("node-2").bpffs_dir.join("links");
    let pinned = ["to_pod", "from_pod"]
        .iter()
        .all(|h| links.join(format!("{ifindex}-{h}")).exists());
    let still_listed =
        interface(&s, "node-2", label).is_some_and(|i| i["ifindex"] == before["ifindex"]);
    route("add");
    let cleared = eventually(Duration::from_secs(10), || {
        interface(&s, "node-2", label).is_some_and(|i| i["problem"].is_null())
    });
    // Enforcement is whole: without an entry the client is dropped, with one it connects.
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    let unauthenticated = ok(&s.connect("client", target, PORT, 1000));
    s.allow("server", "client");
    let authenticated = ok(&s.connect("client", target, PORT, 3000));
    let outcome = json!({
        "problem_reported": reported,
        "problem": during["problem"],
        "endpoint_during": ep_during,
        "links_pinned_during": pinned,
        "listed_during": still_listed,
        "problem_cleared": cleared,
        "unauthenticated_admitted": unauthenticated,
        "authenticated_admitted": authenticated,
    });
    report("route_lookup_failure", &outcome);
    assert!(reported, "status does not say the lookup fails: {outcome}");
    assert_eq!(
        ep_during.map(|(f, i)| (f & 1, i)),
        Some((1, ifindex)),
        "the pod was programmed as non-local while its lookup failed: {outcome}"
    );
    assert!(
        pinned && still_listed,
        "the pod's programs were detached: {outcome}"
    );
    assert!(
        cleared,
        "the problem stayed after the route came back: {outcome}"
    );
    assert!(
        !unauthenticated && authenticated,
        "enforcement is not whole again: {outcome}"
    );
}

/// UDP has no end of connection: a UDP flow lived in the flow table, admitting its 5-tuple,
/// for as long as the table kept it. Now one idle for `flows.udp_idle_secs` is cut like any
/// other flow, and the pair's next datagram is a new connection, admitted by its entry.
#[test]
fn an_idle_udp_flow_is_cut_and_the_next_datagram_is_admitted_again() {
    let tb = up(&pair(), &Options::default());
    for n in ["node-1", "node-2"] {
        tb.write_agent_config(n, |c| {
            c.extra.insert(
                "flows".into(),
                serde_yaml::to_value(json!({"udp_idle_secs": 10})).expect("yaml"),
            );
        })
        .expect("agent config");
    }
    let mut tb = tb;
    for n in ["node-1", "node-2"] {
        tb.stop_agent(n).expect("stopping the agent");
        tb.start_agent(n)
            .expect("starting the agent with the idle timeout");
    }
    let s = scenario(&tb);
    let udp_port = 5353;
    let _echo = s.udp_serve("server", udp_port);
    let target = s.addr("server", Family::V4);
    s.allow("server", "client");
    let send = || {
        s.probe(
            "client",
            &[
                "udp-send",
                "--to",
                &testbed::scenario::sock(target, udp_port),
                "--count",
                "1",
                "--timeout-ms",
                "2000",
            ],
        )
    };
    let first = send();
    let udp_flows = |node: &str| {
        s.status(node)["flows"].as_array().map_or(0, |fs| {
            fs.iter()
                .filter(|f| {
                    f["proto"] == "udp" && f["local"].as_str().is_some_and(|l| l.ends_with(":5353"))
                })
                .count()
        })
    };
    let recorded = udp_flows("node-2");
    let t = Instant::now();
    let cut = eventually(Duration::from_secs(40), || udp_flows("node-2") == 0);
    let cut_after_s = t.elapsed().as_secs_f64();
    let again = send();
    let log = tb.agent_log("node-2");
    let outcome = json!({
        "first": first,
        "flows_recorded": recorded,
        "cut": cut,
        "cut_after_seconds": cut_after_s,
        "again": again,
        "logged": log.contains("idle UDP flows cut"),
    });
    report("udp_idle", &outcome);
    assert!(
        ok(&first) && recorded == 1,
        "the first datagram made no flow: {outcome}"
    );
    assert!(cut, "the idle UDP flow was never cut: {outcome}");
    assert!(
        cut_after_s >= 5.0,
        "the flow was cut before it was idle: {outcome}"
    );
    assert!(ok(&again), "the next datagram was not admitted: {outcome}");
    assert!(
        log.contains("idle UDP flows cut"),
        "the agent did not say it cut idle flows"
    );
}

/// Pods in mode `off` (kube-system, as shipped) are admitted everything: recording a flow per
/// connection for them filled the node's shared flow table (a pod spraying a DNS server evicted
/// other pods' idle connections). They now record none, and their traffic still passes both
/// ways.
#[test]
fn a_pod_in_mode_off_records_no_flows() {
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new(
                "node-2",
                vec![
                    PodSpec::new("dns").namespace("kube-system"),
                    PodSpec::new("server"),
                ],
            ),
        ],
    };
    let tb = up(
        &spec,
        &Options {
            policy: Some(
                "name: shipped\nmode: enforce\nnamespaces:\n  kube-system: { mode: off }\n".into(),
            ),
            ..Options::default()
        },
    );
    let s = scenario(&tb);
    let _dns = s.serve("dns", PORT);
    let target = s.addr("dns", Family::V4);
    let mut admitted = 0;
    for _ in 0..30 {
        if ok(&s.connect("client", target, PORT, 2000)) {
            admitted += 1;
        }
    }
    let dns_identity = s.identity("dns");
    let st = s.status("node-2");
    let dns_flows = st["flows"].as_array().map_or(0, |fs| {
        fs.iter()
            .filter(|f| f["local_identity"] == dns_identity.as_str())
            .count()
    });
    let mode = interface(&s, "node-2", "kube-system/dns").map(|i| i["mode"].clone());
    let outcome = json!({
        "connections": 30,
        "admitted": admitted,
        "flows_of_the_unenforced_pod": dns_flows,
        "mode": mode,
        "pass_unenforced": st["counters"]["pass_unenforced"],
    });
    report("mode_off_flows", &outcome);
    assert_eq!(
        mode,
        Some(json!("off")),
        "the pod is not in mode off: {outcome}"
    );
    assert_eq!(
        admitted, 30,
        "connections to an unenforced pod failed: {outcome}"
    );
    assert_eq!(dns_flows, 0, "the unenforced pod recorded flows: {outcome}");
}
