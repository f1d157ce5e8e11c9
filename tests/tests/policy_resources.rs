//! The policy as custom resources (`PortcullisPolicy`, `PortcullisClusterPolicy`), end to end,
//! against a server speaking the Kubernetes API's wire format (no API server can run on these
//! machines; see `testbed::kube_api`): the issuer checks each object and writes its status;
//! the agents, watching the same objects, enforce the accepted generations in the kernel.
//! Privileged: run as root (`cargo xtask test`).

use std::{
    net::TcpListener,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    issuer::Standalone,
    kube_api::{FakeApi, Kind, realistic_node, serve_in_netns},
    scenario::{Family, Scenario, counter, eventually, ok},
};

const TD: &str = "cluster.local";
const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;

fn pod_object(tb: &Testbed, pod: &str) -> Value {
    let p = tb.pod(pod);
    json!({
        "metadata": {"name": p.name, "namespace": p.namespace,
                     "creationTimestamp": "2026-12-01T00:00:00Z", "labels": {"app": p.name}},
        "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                 "containers": [{"name": "main", "image": "registry.invalid/app:1"}]},
        "status": {"phase": "Running", "podIP": p.ipv4.to_string(),
                   "podIPs": [{"ip": p.ipv4.to_string()}, {"ip": p.ipv6.to_string()}]}
    })
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// The object's `Accepted` condition, once the issuer wrote one for `generation`.
fn accepted(api: &FakeApi, kind: Kind, ns: &str, name: &str, generation: i64) -> Option<Value> {
    let o = api.get(kind, ns, name)?;
    let c = o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    (c["observedGeneration"] == generation && o["status"]["observedGeneration"] == generation)
        .then_some(c)
}

fn wait_accepted(api: &FakeApi, kind: Kind, ns: &str, name: &str, generation: i64) -> Value {
    let mut got = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            got = accepted(api, kind, ns, name, generation);
            got.is_some()
        }),
        "the issuer wrote no status for generation {generation} of {ns}/{name}: {:?}",
        api.get(kind, ns, name)
    );
    got.expect("condition")
}

/// Waits until both agents' status names `fragment` in the policy in force.
fn wait_agents(s: &Scenario<'_>, fragment: &str) {
    wait_agents_field(s, "policy", fragment);
}

/// Waits until both agents' status reports `fragment` in its policy error.
fn wait_agents_error(s: &Scenario<'_>, fragment: &str) {
    wait_agents_field(s, "policy_error", fragment);
}

fn wait_agents_field(s: &Scenario<'_>, field: &str, fragment: &str) {
    for node in ["node-1", "node-2"] {
        assert!(
            eventually(Duration::from_secs(10), || {
                s.status(node)["agent"][field]
                    .as_str()
                    .is_some_and(|p| p.contains(fragment))
            }),
            "{node}'s agent does not show `{fragment}` in its {field}: {}",
            s.status(node)["agent"]
        );
    }
}

fn connects(s: &Scenario<'_>, from: &str, to: &str, port: u16) -> bool {
    ok(&s.connect(from, s.addr(to, Family::V4), port, 1500))
}

fn interface_mode(s: &Scenario<'_>, node: &str, workload: &str) -> String {
    s.status(node)["interfaces"]
        .as_array()
        .and_then(|is| is.iter().find(|i| i["workload"] == workload))
        .map(|i| i["mode"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

#[test]
fn policy_objects_are_checked_by_the_issuer_and_their_accepted_generations_enforced() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the policy resource test needs root (namespaces, eBPF); run it with `cargo xtask test`"
    );
    let bin = PathBuf::from(std::env::var_os("PORTCULLIS_BIN").expect("PORTCULLIS_BIN"));
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
        ..Options::default()
    };
    let mut tb = Testbed::up(&spec, &opts).unwrap_or_else(|e| panic!("testbed up: {e:#}"));

    // One API server, reachable by the agents (in node-1's namespace) and by the issuer (on
    // this namespace's loopback).
    let n1 = tb.node("node-1").clone();
    let mut api = serve_in_netns(&n1.netns, (n1.ipv4, 0).into()).expect("fake API server");
    let local = api
        .also_serve(TcpListener::bind("127.0.0.1:0").expect("bind"))
        .expect("loopback listener");
    for (i, n) in ["node-1", "node-2"].iter().enumerate() {
        let cidr = format!("198.18.{}.0/24", i + 1);
        api.apply(
            Kind::Node,
            realistic_node(n, tb.node(n).ipv4.into(), &[&cidr]),
        );
    }
    for p in ["client", "intruder", "server", "ledger"] {
        api.apply(Kind::Pod, pod_object(&tb, p));
    }
    api.apply(
        Kind::ClusterPolicy,
        json!({"metadata": {"name": "default"},
               "spec": {"mode": "enforce", "nodeTraffic": "allow"}}),
    );

    // The issuer: the one writer of status.
    let dir = tempfile::tempdir().expect("tempdir");
    Standalone::make_ca(&bin, dir.path(), TD).expect("portcullis ca init");
    let _issuer = Standalone::start(
        &bin,
        dir.path(),
        &format!(
            "kubernetes:\n  api_server: http://{local}\n  trust_domain: {TD}\n  policy_resources: true\n  pod_cidrs: ignore\nattestor:\n  kind: kubernetes\n"
        ),
    )
    .unwrap_or_else(|e| panic!("starting the issuer: {e:#}"));

    // The agents move from the cluster-state file to the API server.
    let url = api.url();
    for n in ["node-1", "node-2"] {
        tb.stop_agent(n).expect("stopping the agent");
        tb.write_agent_config(n, |c| {
            c.cluster_state = None;
            c.extra.insert(
                "kubernetes".into(),
                serde_yaml::to_value(json!({"api_server": url, "trust_domain": TD,
                    "policy_resources": true, "pod_cidrs": "ignore"}))
                .expect("yaml"),
            );
        })
        .expect("agent config");
        tb.start_agent(n)
            .unwrap_or_else(|e| panic!("starting {n}'s agent: {e:#}"));
    }
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let _other = s.serve("server", OTHER_PORT);
    let _ledger = s.serve("ledger", PORT);

    // The cluster's defaults, accepted and in force; no rule selects the server yet.
    let c = wait_accepted(&api, Kind::ClusterPolicy, "", "default", 1);
    assert_eq!(c["status"], "True", "{c}");
    wait_agents(&s, "pccp default gen 1");
    assert!(
        eventually(Duration::from_secs(10), || connects(
            &s, "intruder", "server", PORT
        )),
        "with no rule selecting it, the server refused an authenticated peer"
    );

    // A namespace's object: only the client, only on 8080/tcp.
    let client = s.identity("client");
    let server = s.identity("server");
    api.apply(
        Kind::Policy,
        policy(
            "shop",
            "api",
            json!({"rules": [{"name": "client-only", "from": [client], "to": [server],
                              "ports": [{"port": PORT, "protocol": "TCP"}]}]}),
        ),
    );
    let applied = Instant::now();
    let c = wait_accepted(&api, Kind::Policy, "shop", "api", 1);
    let to_status = applied.elapsed();
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("Accepted")),
        "{c}"
    );
    let obj = api.get(Kind::Policy, "shop", "api").expect("object");
    assert_eq!(obj["status"]["rules"], 1, "{obj}");
    assert_eq!(obj["status"]["acceptedGeneration"], 1, "{obj}");
    wait_agents(&s, "pcp shop/api gen 1");
    // Measured, not asserted (to the 100 ms of the polls above): apply → status written by the
    // issuer → in force on both agents.
    eprintln!(
        "apply → Accepted in status: {} ms; → in force on both agents: {} ms",
        to_status.as_millis(),
        applied.elapsed().as_millis()
    );
    assert!(
        eventually(Duration::from_secs(10), || !connects(
            &s, "intruder", "server", PORT
        )),
        "the applied object did not take the intruder's access away"
    );
    assert!(
        connects(&s, "client", "server", PORT),
        "the rule's own source was refused"
    );
    assert!(
        !connects(&s, "client", "server", OTHER_PORT),
        "a port outside the rule was admitted"
    );

    // An invalid generation: refused with field and value; the agents keep generation 1, even
    // one restarted meanwhile (it reads the accepted spec from the status).
    api.apply(
        Kind::Policy,
        policy(
            "shop",
            "api",
            json!({"rules": [{"name": "client-only", "from": [client],
                              "to": [s.identity("ledger")],
                              "ports": [{"port": PORT, "protocol": "TCP"}]}]}),
        ),
    );
    let c = wait_accepted(&api, Kind::Policy, "shop", "api", 2);
    let message = c["message"].as_str().unwrap_or_default();
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("Invalid")),
        "{c}"
    );
    assert!(
        message.contains("spec.rules[0].to[0]")
            && message.contains(&s.identity("ledger"))
            && message.contains("outside namespace `shop`")
            && message.contains("keep generation 1"),
        "the refusal does not name the field and value: {message}"
    );
    let obj = api.get(Kind::Policy, "shop", "api").expect("object");
    assert_eq!(obj["status"]["acceptedGeneration"], 1, "{obj}");
    wait_agents(&s, "refused: pcp shop/api gen 2");
    tb.stop_agent("node-2").expect("stopping node-2's agent");
    tb.start_agent("node-2").expect("restarting node-2's agent");
    let s = scenario(&tb);
    wait_agents(&s, "in force: pccp default gen 1, pcp shop/api gen 1");
    assert!(
        !connects(&s, "intruder", "server", PORT),
        "the refused generation (or the restart) gave the intruder access"
    );
    assert!(
        eventually(Duration::from_secs(10), || connects(
            &s, "client", "server", PORT
        )),
        "the accepted generation's source lost access"
    );

    // A second namespace's objects merge with the first's: payments in audit mode, with a rule
    // of its own; shop's rule and mode stand.
    api.apply(
        Kind::Policy,
        policy(
            "payments",
            "default",
            json!({"mode": "audit", "rules": [{"from": [client]}]}),
        ),
    );
    wait_accepted(&api, Kind::Policy, "payments", "default", 1);
    wait_agents(&s, "pcp payments/default gen 1");
    assert!(
        eventually(Duration::from_secs(10), || interface_mode(
            &s,
            "node-2",
            "payments/ledger"
        ) == "audit"),
        "the ledger's interface is not in audit mode: {}",
        s.status("node-2")["interfaces"]
    );
    assert_eq!(interface_mode(&s, "node-2", "shop/server"), "enforce");
    let audits = counter(&s.status("node-2"), "pass_audit");
    assert!(
        connects(&s, "intruder", "ledger", PORT),
        "audit mode dropped the intruder's connection to the ledger"
    );
    assert!(
        counter(&s.status("node-2"), "pass_audit") > audits,
        "the audited connection was not reported"
    );
    assert!(
        !connects(&s, "intruder", "server", PORT),
        "the second namespace's object opened the first's"
    );

    // An object of a newer definition than these agents know (a real API server serving that
    // newer definition would store it): the watch goes on, and the policy in force stays,
    // since leaving the object out could open what it closes.
    api.apply(
        Kind::Policy,
        policy(
            "payments",
            "lockdown",
            json!({"rules": [{"from": ["*"], "ports": [{"port": PORT, "protocol": "SCTP"}]}]}),
        ),
    );
    wait_agents_error(&s, "pcp payments/lockdown: cannot be read");
    assert!(
        !connects(&s, "intruder", "server", PORT),
        "an unreadable object changed the policy in force"
    );
    api.delete(Kind::Policy, "payments", "lockdown");
    for node in ["node-1", "node-2"] {
        assert!(
            eventually(Duration::from_secs(10), || {
                s.status(node)["agent"]["policy_error"].is_null()
            }),
            "{node}'s agent did not follow the deletion: {}",
            s.status(node)["agent"]
        );
    }

    // Deleting shop's object: back to the cluster's defaults.
    api.delete(Kind::Policy, "shop", "api");
    assert!(
        eventually(Duration::from_secs(10), || {
            ["node-1", "node-2"].iter().all(|n| {
                s.status(n)["agent"]["policy"]
                    .as_str()
                    .is_some_and(|p| !p.contains("shop/api"))
            })
        }),
        "the deleted object is still in force"
    );
    assert!(
        eventually(Duration::from_secs(10), || connects(
            &s, "intruder", "server", PORT
        )),
        "after the object's deletion the server still refuses an authenticated peer"
    );
}
