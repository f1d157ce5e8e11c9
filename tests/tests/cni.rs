//! `portcullis-cni`, chained after the reference CNI plugins (`ptp` on node-1, `bridge` on
//! node-2) and run as a container runtime runs it: a pod is held in default-deny from its ADD
//! on, enrolled when the agent can, and on a bridge each pod is enforced on its own veth.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed, Wiring,
    cni::{Call, PluginError, exec_plugin},
    scenario::{Family, Scenario, counter, eventually, ok},
};

const PORT: u16 = 8080;

/// Only `client` may reach `server` and `neighbor` (a rule restricts the destinations it
/// names): the two bridge neighbours may not reach each other.
const POLICY: &str = "\
name: cni-policy
rules:
  - name: client-to-bridge-pods
    from: [\"spiffe://cluster.local/ns/default/sa/client\"]
    to: [\"spiffe://cluster.local/ns/default/sa/server\", \"spiffe://cluster.local/ns/default/sa/neighbor\"]
";

fn up(policy: Option<&str>) -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the CNI tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
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
                vec![PodSpec::new("server"), PodSpec::new("neighbor")],
            ),
        ],
    };
    let tb = Testbed::up(
        &spec,
        &Options {
            authenticate: true,
            policy: policy.map(str::to_owned),
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    assert_eq!(tb.node("node-1").wiring, Wiring::Ptp);
    assert_eq!(tb.node("node-2").wiring, Wiring::Bridge);
    tb
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

/// The agent's view of `pod`'s interface in status, if it enforces one.
fn interface<'a>(status: &'a Value, pod: &str) -> Option<&'a Value> {
    status["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i["workload"] == format!("default/{pod}"))
}

/// Both hooks of the pod's host interface hold a pinned link (the agent's pin paths).
fn pinned(tb: &Testbed, pod: &str) -> bool {
    let p = tb.pod(pod);
    let node = tb.node(&p.node);
    let Ok(ifindex) = testbed::netns::ifindex(&node.netns, &p.host_veth) else {
        return false;
    };
    ["to_pod", "from_pod"].iter().all(|h| {
        node.bpffs_dir
            .join("links")
            .join(format!("{ifindex}-{h}"))
            .exists()
    })
}

#[test]
fn a_pod_created_while_the_agent_is_down_is_held_in_default_deny_then_enrolled_when_it_starts() {
    let mut tb = up(None);
    tb.stop_agent("node-2").expect("stopping node-2's agent");
    let (late, add_took) = tb
        .add_pod_timed("node-2", PodSpec::new("late"))
        .expect("CNI ADD with the agent down");
    assert!(
        add_took < Duration::from_secs(2),
        "ADD waited {add_took:?} for an agent that is down"
    );
    assert!(
        pinned(&tb, "late"),
        "ADD left {} without programs",
        late.host_veth
    );
    let s = scenario(&tb);
    let _server = s.serve("late", PORT);
    let target = s.addr("late", Family::V4);
    // Held: nobody reaches it, not even a peer that will be authenticated, in either family.
    assert!(
        !ok(&s.connect("client", target, PORT, 1000)),
        "a held pod was reached"
    );
    assert!(
        !ok(&s.connect("client", s.addr("late", Family::V6), PORT, 1000)),
        "a held pod was reached over IPv6"
    );
    assert!(!ok(&s.connect("outsider", target, PORT, 1000)));
    tb.start_agent("node-2").expect("starting node-2's agent");
    let ready = Instant::now();
    let s = scenario(&tb);
    let mut reached = None;
    while ready.elapsed() < Duration::from_secs(5) {
        if ok(&s.connect("client", target, PORT, 200)) {
            reached = Some(ready.elapsed());
            break;
        }
    }
    let reached = reached
        .expect("the authenticated peer never reached the pod enrolled after the agent started");
    eprintln!(
        "ADD with the agent down: {add_took:?}; reachable {reached:?} after the agent was ready"
    );
    assert!(
        reached < Duration::from_secs(1),
        "the pod became reachable {reached:?} after the agent was ready"
    );
    let st = s.status("node-2");
    let i = interface(&st, "late").expect("status lists the enrolled pod");
    assert_eq!(i["interface"], late.host_veth.as_str());
    assert_eq!(
        i["attached"], "adopted",
        "the agent adopted the link ADD pinned"
    );
    assert!(
        !ok(&s.connect("outsider", target, PORT, 1000)),
        "an unauthenticated peer got through"
    );
}

#[test]
fn a_pod_created_while_the_agent_runs_is_enforced_before_its_first_packet() {
    let mut tb = up(None);
    let before = scenario(&tb).status("node-2");
    let (late, enforced_after) = tb
        .add_pod_timed("node-2", PodSpec::new("late"))
        .expect("CNI ADD with the agent up");
    let s = scenario(&tb);
    // The first packet, right after ADD returned: from an unauthenticated peer, dropped.
    let _server = s.serve("late", PORT);
    let target = s.addr("late", Family::V4);
    assert!(
        !ok(&s.connect("outsider", target, PORT, 1000)),
        "the first connection got through"
    );
    let st = s.status("node-2");
    let i = interface(&st, "late").expect("ADD returned before the agent enforced the pod");
    assert_eq!(
        i["interface"],
        late.host_veth.as_str(),
        "enforced on the pod's own veth"
    );
    assert!(
        counter(&st, "drop_unknown_peer") > counter(&before, "drop_unknown_peer"),
        "the drop was not counted: {}",
        st["counters"]
    );
    assert!(
        eventually(Duration::from_secs(5), || ok(
            &s.connect("client", target, PORT, 1000)
        )),
        "the authenticated peer does not reach the new pod"
    );
    drop(_server);
    drop(s);
    // The same chain without portcullis-cni (a pod outside enforcement), for comparison.
    let (_, plain_took) = tb
        .add_pod_timed("node-2", PodSpec::new("plain").enroll(false))
        .expect("CNI ADD without portcullis-cni");
    eprintln!(
        "CNI ADD to enforced (the ADD's own duration, agent up): {enforced_after:?}; the same ADD without portcullis-cni: {plain_took:?}"
    );
    // DEL releases it.
    tb.remove_pod("late").expect("CNI DEL");
    let s = scenario(&tb);
    assert!(
        eventually(Duration::from_secs(3), || interface(
            &s.status("node-2"),
            "late"
        )
        .is_none()),
        "status still lists the deleted pod"
    );
}

/// Two pods of different identities on one bridge are enforced each on its own veth: the
/// neighbor, authenticated but not authorized, reaches neither the server nor, by claiming
/// the server's address, anyone else; the authorized client does.
#[test]
fn pods_of_different_identities_on_one_bridge_are_kept_apart() {
    let tb = up(Some(POLICY));
    let s = scenario(&tb);
    let server = s.addr("server", Family::V4);
    let _server = s.serve("server", PORT);
    let _neighbor = s.serve("neighbor", PORT);
    let st = s.status("node-2");
    for pod in ["server", "neighbor"] {
        let i = interface(&st, pod).unwrap_or_else(|| panic!("{pod} is not enforced: {st}"));
        assert_eq!(
            i["interface"],
            tb.pod(pod).host_veth.as_str(),
            "{pod} on its veth"
        );
        assert_ne!(i["interface"], "cni0", "{pod} enforced on the bridge");
    }
    assert!(
        eventually(Duration::from_secs(5), || ok(
            &s.connect("client", server, PORT, 1000)
        )),
        "the authorized client does not reach the server across the fabric"
    );
    for (from, to) in [("neighbor", "server"), ("server", "neighbor")] {
        for family in [Family::V4, Family::V6] {
            assert!(
                !ok(&s.connect(from, s.addr(to, family), PORT, 1000)),
                "{from} reached {to} over the bridge ({family:?})"
            );
        }
    }
    assert!(!ok(&s.connect("outsider", server, PORT, 1000)));
    // The neighbor claiming the server's address is dropped at its own veth.
    let before = counter(&s.status("node-2"), "drop_spoofed");
    let spoof = s.probe(
        "neighbor",
        &[
            "connect",
            "--to",
            &format!("{}:{PORT}", s.addr("client", Family::V4)),
            "--from",
            &server.to_string(),
            "--freebind",
            "--timeout-ms",
            "500",
        ],
    );
    assert!(!ok(&spoof), "a spoofed connection got through: {spoof}");
    assert!(
        counter(&s.status("node-2"), "drop_spoofed") > before,
        "the spoofed SYN was not dropped as spoofed"
    );
}

fn plugin_bin() -> PathBuf {
    let agent = PathBuf::from(std::env::var_os("PORTCULLIS_BIN").expect("PORTCULLIS_BIN"));
    agent.with_file_name("portcullis-cni")
}

/// Runs `portcullis-cni` once on `node` with `conf` (the list's name and version added).
fn run(
    tb: &Testbed,
    node: &str,
    command: &str,
    container_id: &str,
    pod: &str,
    conf: &Value,
) -> Result<Option<Value>, PluginError> {
    let n = tb.node(node);
    let netns = testbed::netns::path(&tb.pod(pod).netns);
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}");
    let call = Call::for_pod(command, container_id, &netns, &args);
    exec_plugin(
        &n.netns,
        &n.host_cgroup,
        &plugin_bin(),
        "/usr/lib/cni",
        &call,
        conf,
    )
    .expect("running portcullis-cni")
}

#[test]
fn add_del_and_check_answer_as_the_cni_spec_says() {
    let mut tb = up(None);
    let node = tb.node("node-2").clone();
    let pod = tb.pod("server").clone();
    let list = tb.network_list("node-2").expect("node-2's network list");
    let mut conf = list.list["plugins"][1].clone();
    assert_eq!(conf["type"], "portcullis-cni");
    conf["name"] = list.list["name"].clone();
    conf["cniVersion"] = json!("1.0.0");
    let cached: Value = serde_json::from_slice(
        &std::fs::read(
            node.cni_dir
                .join("results")
                .join(format!("{}.json", pod.container_id)),
        )
        .expect("the runtime's cached result"),
    )
    .unwrap();
    let with_prev = |c: &Value, prev: Value| {
        let mut c = c.clone();
        c["prevResult"] = prev;
        c
    };

    let version = run(
        &tb,
        "node-2",
        "VERSION",
        "x",
        "server",
        &json!({"cniVersion": "1.0.0"}),
    )
    .expect("VERSION")
    .expect("VERSION prints the versions");
    let versions = version["supportedVersions"].to_string();
    assert!(
        versions.contains("\"1.0.0\"") && versions.contains("\"0.4.0\""),
        "{versions}"
    );

    let mut old = with_prev(&conf, cached.clone());
    old["cniVersion"] = json!("0.2.0");
    let e = run(&tb, "node-2", "ADD", "t1", "server", &old).expect_err("0.2.0");
    assert_eq!(e.code, 1, "wrong cniVersion: {e}");

    let e = run(&tb, "node-2", "ADD", "t1", "server", &conf).expect_err("no prevResult");
    assert_eq!(e.code, 7, "missing prevResult: {e}");
    let e = run(&tb, "node-2", "CHECK", "t1", "server", &conf).expect_err("no prevResult");
    assert_eq!(e.code, 7, "CHECK without prevResult: {e}");

    let unknown = with_prev(
        &conf,
        json!({"cniVersion": "1.0.0", "interfaces": [{"name": "pcnosuchif0"}, {"name": "eth0", "sandbox": "/run/netns/x"}]}),
    );
    let e = run(&tb, "node-2", "ADD", "t1", "server", &unknown).expect_err("unknown interface");
    assert_eq!(e.code, 100, "unknown interface: {e}");
    assert!(e.msg.contains("pcnosuchif0"), "{e}");

    let mut typo = with_prev(&conf, cached.clone());
    typo["bpfsDir"] = json!("/sys/fs/bpf");
    let e = run(&tb, "node-2", "ADD", "t1", "server", &typo).expect_err("unknown field");
    assert_eq!(e.code, 2, "unknown field: {e}");

    // CHECK on the enforced pod passes; with a link gone (agent stopped, so nothing puts it
    // back) it fails with our code.
    let check = with_prev(&conf, cached.clone());
    run(&tb, "node-2", "CHECK", &pod.container_id, "server", &check)
        .expect("CHECK of an enforced pod");
    tb.stop_agent("node-2").expect("stopping the agent");
    let ifindex = testbed::netns::ifindex(&node.netns, &pod.host_veth).expect("server's ifindex");
    let pin = node
        .bpffs_dir
        .join("links")
        .join(format!("{ifindex}-to_pod"));
    std::fs::remove_file(&pin).expect("removing a link pin");
    let e = run(&tb, "node-2", "CHECK", &pod.container_id, "server", &check)
        .expect_err("CHECK without a link");
    assert_eq!(
        e.code, 102,
        "CHECK of an interface without its programs: {e}"
    );
    // With `agentUnavailable: fail`, ADD while the agent is down fails "try again later" and
    // leaves nothing behind.
    let mut strict = check.clone();
    strict["agentUnavailable"] = json!("fail");
    let e = run(&tb, "node-2", "ADD", "t2", "server", &strict).expect_err("agent down, fail");
    assert_eq!(
        e.code, 11,
        "agent unavailable with agentUnavailable: fail: {e}"
    );
    assert!(
        !node.cni_claims().join("t2.json").exists(),
        "a failed ADD left its claim"
    );
    let from_pod = node
        .bpffs_dir
        .join("links")
        .join(format!("{ifindex}-from_pod"));
    assert!(
        from_pod.exists(),
        "a failed ADD removed a link it did not make"
    );
    assert!(!pin.exists(), "a failed ADD left the link it made");
    // ADD again (a runtime retrying), from a list of spec 0.4.0 this time, puts the missing
    // link back, default-deny, and passes the previous result on in the list's version.
    let mut v04 = check.clone();
    v04["cniVersion"] = json!("0.4.0");
    let passed = run(&tb, "node-2", "ADD", &pod.container_id, "server", &v04)
        .expect("ADD again")
        .expect("ADD prints the result");
    assert_eq!(passed["cniVersion"], "0.4.0");
    assert_eq!(
        passed["interfaces"], cached["interfaces"],
        "prevResult not passed on"
    );
    assert!(pin.exists(), "ADD did not pin the missing link");
    run(&tb, "node-2", "CHECK", &pod.container_id, "server", &check).expect("CHECK after ADD");
    // DEL removes the claim; twice is no error. The links stay to the agent (the interface
    // still exists): it releases them once it runs and no claim holds them.
    for _ in 0..2 {
        run(&tb, "node-2", "DEL", &pod.container_id, "server", &check).expect("DEL is idempotent");
    }
    assert!(pin.exists(), "DEL removed a link while the interface lives");
    tb.start_agent("node-2").expect("starting the agent");
    assert!(
        testbed::scenario::eventually(Duration::from_secs(5), || !pin.exists()),
        "the agent did not release the links of an interface no claim holds"
    );
    assert!(
        !node
            .cni_claims()
            .join(format!("{}.json", pod.container_id))
            .exists()
    );
    let e = run(&tb, "node-2", "CHECK", &pod.container_id, "server", &check)
        .expect_err("CHECK after DEL");
    assert_eq!(e.code, 3, "CHECK of a deleted container: {e}");
}
