//! The agent's Kubernetes watcher against a local server that speaks the API's real list/watch
//! wire format (no API server can run on these machines; see `testbed::kube_api`): pods and
//! nodes appearing, changing and disappearing reach the kernel's endpoint map, and a watch that
//! expires (410 Gone) recovers by listing again without losing an update. Privileged: run as
//! root (`cargo xtask test`).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    kube_api::{
        FakeApi, Kind, SCALE_CIDRS, realistic_node, realistic_pod, scale_address, scale_pods,
        serve_in_netns,
    },
    scenario::eventually,
};

/// A Node at `ip` (198.18.0.i), whose pods are in 198.18.i.0/24 as the testbed places them.
fn node(name: &str, ip: Ipv4Addr) -> Value {
    let cidr = format!("198.18.{}.0/24", ip.octets()[3]);
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip.to_string()},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

fn pod(name: &str, namespace: &str, node: &str, ips: &[String]) -> Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": "2026-11-23T00:00:00Z",
                     "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": name,
                 "containers": [{"name": "main", "image": "registry.invalid/app:1"}]},
        "status": {"phase": "Running", "podIP": ips[0],
                   "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
    })
}

/// IPv4 addresses in a node agent's endpoint map, read from the kernel with bpftool.
fn endpoints_v4(tb: &Testbed, node: &str) -> Vec<Ipv4Addr> {
    let map = tb.node(node).bpffs_dir.join("maps/PC_EP_V4");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        map.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    entries
        .iter()
        .filter_map(|e| {
            let key: Vec<u8> = e["key"]
                .as_array()?
                .iter()
                .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
                .collect();
            (key.len() == 4).then(|| Ipv4Addr::new(key[0], key[1], key[2], key[3]))
        })
        .collect()
}

#[test]
fn pods_and_nodes_from_the_api_reach_the_maps_and_an_expired_watch_loses_nothing() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the Kubernetes watcher test needs root (namespaces, eBPF); run it with `cargo xtask test`"
    );
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    let mut tb = Testbed::up(&spec, &Options::without_agents())
        .unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    let n1 = tb.node("node-1").clone();
    let api: FakeApi = serve_in_netns(&n1.netns, (n1.ipv4, 0).into()).expect("fake API server");
    for n in ["node-1", "node-2"] {
        api.apply(Kind::Node, node(n, tb.node(n).ipv4));
    }
    for p in ["client", "server"] {
        let info = tb.pod(p).clone();
        api.apply(
            Kind::Pod,
            pod(
                p,
                "default",
                &info.node,
                &[info.ipv4.to_string(), info.ipv6.to_string()],
            ),
        );
    }
    // A pod on the host network is not a workload.
    let mut host = pod(
        "kube-proxy",
        "kube-system",
        "node-1",
        &[n1.ipv4.to_string()],
    );
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(Kind::Pod, host);
    for n in ["node-1", "node-2"] {
        let url = api.url();
        tb.write_agent_config(n, |c| {
            c.cluster_state = None;
            c.extra.insert(
                "kubernetes".into(),
                serde_yaml::to_value(json!({"api_server": url, "trust_domain": "cluster.local"}))
                    .expect("yaml"),
            );
        })
        .expect("agent config");
        tb.start_agent(n)
            .unwrap_or_else(|e| panic!("starting {n}'s agent: {e:#}"));
    }
    let client = tb.pod("client").ipv4;
    let server = tb.pod("server").ipv4;
    let has = |addr: Ipv4Addr| endpoints_v4(&tb, "node-1").contains(&addr);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        assert!(
            eventually(Duration::from_secs(5), f),
            "{what}; node-1's endpoint map: {:?}",
            endpoints_v4(&tb, "node-1")
        );
    };
    wait("the listed pods did not reach the map", &|| {
        has(client) && has(server)
    });
    assert!(
        endpoints_v4(&tb, "node-2").contains(&client),
        "node-2's agent did not learn node-1's pod"
    );

    // Appearing, changing, disappearing.
    let late: Ipv4Addr = "198.18.2.77".parse().expect("addr");
    let moved: Ipv4Addr = "198.18.2.78".parse().expect("addr");
    api.apply(
        Kind::Pod,
        pod("late", "shop", "node-2", &[late.to_string()]),
    );
    wait("an added pod did not reach the map", &|| has(late));
    api.apply(
        Kind::Pod,
        pod("late", "shop", "node-2", &[moved.to_string()]),
    );
    wait("a changed pod address did not reach the map", &|| {
        has(moved) && !has(late)
    });
    api.delete(Kind::Pod, "shop", "late");
    wait("a deleted pod stayed in the map", &|| !has(moved));

    // A node disappearing takes its pods with it (no handshake address), and comes back.
    api.delete(Kind::Node, "", "node-2");
    wait("the pods of a deleted node stayed", &|| !has(server));
    api.apply(Kind::Node, node("node-2", tb.node("node-2").ipv4));
    wait("the pods of a returning node did not come back", &|| {
        has(server)
    });

    // The watch expires (410 Gone); an update made meanwhile arrives through the new list.
    let lists_before = pod_lists(&api);
    api.expire();
    let after: Ipv4Addr = "198.18.2.79".parse().expect("addr");
    api.apply(
        Kind::Pod,
        pod("after-expiry", "shop", "node-2", &[after.to_string()]),
    );
    wait("an update made across a 410 was lost", &|| has(after));
    assert!(
        pod_lists(&api) > lists_before,
        "the agent did not list again after the 410: {:?}",
        api.requests()
    );
    let status = Command::new(tb.info().agent_bin.clone().expect("agent binary"))
        .args(["status", "--output", "json", "--config"])
        .arg(&tb.node("node-1").agent_config)
        .output()
        .expect("status");
    let status: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert!(
        status["agent"]["cluster_state"]
            .as_str()
            .is_some_and(|c| c.contains("kubernetes API")),
        "{}",
        status["agent"]
    );
    assert_eq!(status["interfaces"][0]["workload"], "default/client");
}

/// Points node `n`'s agent at the fake API server instead of a cluster-state file.
fn use_api(tb: &Testbed, n: &str, api: &FakeApi) {
    let url = api.url();
    tb.write_agent_config(n, |c| {
        c.cluster_state = None;
        c.extra.insert(
            "kubernetes".into(),
            serde_yaml::to_value(json!({"api_server": url, "trust_domain": "cluster.local"}))
                .expect("yaml"),
        );
    })
    .expect("agent config");
}

/// Pods at the size users run: 10,000 realistic Pod objects (about 4 KB of JSON each, managed
/// fields and all) listed in pages through the API's wire format. The agent must become ready and
/// program every one of them; before the watcher's events stopped queueing ahead of the list's
/// end, an agent never became ready past about 60 pods.
#[test]
fn ten_thousand_realistic_pods_are_listed_in_pages_and_every_one_is_programmed() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the Kubernetes watcher test needs root (namespaces, eBPF); run it with `cargo xtask test`"
    );
    const PODS: usize = 10_000;
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    let mut tb = Testbed::up(
        &spec,
        &Options {
            // The debug agent, listing 40 MB of JSON before its admin socket appears.
            agent_ready_timeout: Duration::from_secs(300),
            ..Options::without_agents()
        },
    )
    .unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    let n1 = tb.node("node-1").clone();
    let api: FakeApi = serve_in_netns(&n1.netns, (n1.ipv4, 0).into()).expect("fake API server");
    for (i, n) in ["node-1", "node-2"].into_iter().enumerate() {
        api.apply(
            Kind::Node,
            realistic_node(
                n,
                tb.node(n).ipv4.into(),
                &[&format!("198.18.{}.0/24", i + 1)],
            ),
        );
    }
    // A third node that exists only in the API, holding the many pods (no traffic goes to it).
    api.apply(
        Kind::Node,
        realistic_node(
            "node-3",
            "198.18.0.250".parse().expect("addr"),
            &SCALE_CIDRS,
        ),
    );
    let mut want: HashSet<Ipv4Addr> = HashSet::new();
    let mut pods = Vec::with_capacity(PODS + 2);
    for (i, p) in ["client", "server"].into_iter().enumerate() {
        let info = tb.pod(p).clone();
        want.insert(info.ipv4);
        pods.push(realistic_pod(
            p,
            "default",
            &info.node,
            p,
            &[info.ipv4.into(), info.ipv6.into()],
            i,
        ));
    }
    pods.extend(scale_pods(PODS, "node-3", 0));
    want.extend((0..PODS).map(|i| match scale_address(i) {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!("the first 64,000 are IPv4"),
    }));
    api.apply_all(Kind::Pod, pods);
    assert_eq!(api.count(Kind::Pod), PODS + 2);
    use_api(&tb, "node-1", &api);
    let start = Instant::now();
    tb.start_agent("node-1")
        .unwrap_or_else(|e| panic!("starting node-1's agent: {e:#}"));
    let ready = eventually(Duration::from_secs(300), || {
        let out = tb
            .portcullis("node-1", &["status", "--output", "json"])
            .output()
            .expect("status");
        serde_json::from_slice::<Value>(&out.stdout)
            .is_ok_and(|s| s["agent"]["ready"].as_bool() == Some(true))
    });
    let took = start.elapsed();
    assert!(
        ready,
        "node-1's agent was not ready after {took:?}; its log:\n{}",
        tb.agent_log("node-1")
    );
    let programmed: HashSet<Ipv4Addr> = endpoints_v4(&tb, "node-1").into_iter().collect();
    let missing: Vec<&Ipv4Addr> = want.difference(&programmed).collect();
    assert!(
        missing.is_empty(),
        "{} of {} pod addresses are not in node-1's endpoint map, such as {:?}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(5)]
    );
    let requests = api.requests();
    let pod_pages = requests
        .iter()
        .filter(|r| r.contains("/api/v1/pods?") && !r.contains("watch=true"))
        .count();
    assert!(
        pod_pages >= PODS / 500 && requests.iter().any(|r| r.contains("continue=")),
        "the pods were not listed in pages: {pod_pages} list requests"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/api/v1/pods?") && r.contains("watch=true")),
        "the agent never opened the pod watch: {requests:?}"
    );
    eprintln!(
        "kubernetes outcome: {}",
        json!({"pods": PODS + 2, "ready_s": took.as_secs_f64(), "pod_list_pages": pod_pages,
               "endpoints_v4": programmed.len()})
    );
}

/// Pod list requests served (not watches).
fn pod_lists(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| {
            r.contains("/api/v1/pods") && !r.contains("watch=true") && !r.contains("watch=1")
        })
        .count()
}

/// What a node's kubelet writes cannot bend cluster state: a pod claiming another node's pod
/// address, one claiming its node's address and a mirror pod are left out, each counted and
/// shown in `status`; a pod address listed in another Node's status does not take the pod out;
/// a terminating pod keeps its address until it is gone, and only then does the new pod that
/// was given it get it.
#[test]
fn a_kubelet_cannot_bend_cluster_state_and_a_reused_address_waits_for_the_old_pod() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the Kubernetes watcher test needs root (namespaces, eBPF); run it with `cargo xtask test`"
    );
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    let mut tb = Testbed::up(&spec, &Options::without_agents())
        .unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    let n1 = tb.node("node-1").clone();
    let api: FakeApi = serve_in_netns(&n1.netns, (n1.ipv4, 0).into()).expect("fake API server");
    for n in ["node-1", "node-2"] {
        api.apply(Kind::Node, node(n, tb.node(n).ipv4));
    }
    for p in ["client", "server"] {
        let info = tb.pod(p).clone();
        api.apply(
            Kind::Pod,
            pod(
                p,
                "default",
                &info.node,
                &[info.ipv4.to_string(), info.ipv6.to_string()],
            ),
        );
    }
    let server = tb.pod("server").ipv4;
    // node-1's kubelet reports node-2's pod address, its own node address, and a mirror pod,
    // and lists node-2's pod address among its own Node's addresses.
    api.apply(
        Kind::Pod,
        pod("thief", "shop", "node-1", &[server.to_string()]),
    );
    api.apply(
        Kind::Pod,
        pod("node-ip", "shop", "node-1", &[n1.ipv4.to_string()]),
    );
    let far = "198.18.2.70".to_owned();
    api.apply(
        Kind::Pod,
        pod("far", "shop", "node-2", std::slice::from_ref(&far)),
    );
    let mut listing = node("node-1", n1.ipv4);
    listing["status"]["addresses"]
        .as_array_mut()
        .expect("addresses")
        .push(json!({"type": "ExternalIP", "address": far}));
    api.apply(Kind::Node, listing);
    let mut mirror = pod("static", "shop", "node-1", &["198.18.1.50".to_owned()]);
    mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "0123abcd"});
    api.apply(Kind::Pod, mirror);
    // A terminating pod, and the new pod its address was given to.
    let reused = "198.18.2.60".to_owned();
    let mut old = pod("old", "shop", "node-2", std::slice::from_ref(&reused));
    old["metadata"]["creationTimestamp"] = json!("2026-11-22T00:00:00Z");
    old["metadata"]["deletionTimestamp"] = json!("2026-11-23T00:00:10Z");
    api.apply(Kind::Pod, old);
    api.apply(
        Kind::Pod,
        pod("new", "shop", "node-2", std::slice::from_ref(&reused)),
    );
    use_api(&tb, "node-1", &api);
    tb.start_agent("node-1")
        .unwrap_or_else(|e| panic!("starting node-1's agent: {e:#}"));
    let status = || {
        let out = tb
            .portcullis("node-1", &["status", "--output", "json"])
            .output()
            .expect("status");
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    let mut st = Value::Null;
    let refused = eventually(Duration::from_secs(10), || {
        st = status();
        st["cluster_refusals"]["current"].as_u64() == Some(4)
    });
    let totals = st["cluster_refusals"]["total"].clone();
    let pods = st["cluster_refusals"]["pods"].clone();
    let workloads_before = st["workloads"].as_u64();
    api.delete(Kind::Pod, "shop", "old");
    let handed_over = eventually(Duration::from_secs(10), || {
        st = status();
        st["cluster_refusals"]["current"].as_u64() == Some(3)
    });
    let (text_ok, text) = {
        let out = tb
            .portcullis("node-1", &["status"])
            .output()
            .expect("status");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let metrics = tb.agent_http("node-1", "/metrics");
    let outcome = json!({
        "refusals": totals,
        "pods": pods,
        "workloads_before": workloads_before,
        "workloads_after": st["workloads"],
        "handed_over": handed_over,
    });
    eprintln!("kubernetes outcome: {outcome}");
    assert!(refused, "the four bad pods were not refused: {outcome}");
    for kind in [
        "outside_pod_cidrs",
        "node_address",
        "mirror_pod",
        "address_in_use",
    ] {
        assert_eq!(totals[kind], 1, "{kind} not counted once: {outcome}");
    }
    assert!(
        pods.as_array().is_some_and(|p| p.iter().any(|l| l
            .as_str()
            .is_some_and(|l| l.starts_with("shop/thief") && l.contains("podCIDRs")))),
        "status does not name the pod and why: {outcome}"
    );
    // client, server, far (whose address node-1 lists as its own) and old.
    assert_eq!(workloads_before, Some(4), "{outcome}");
    assert!(
        handed_over,
        "the new pod never got the old one's address: {outcome}"
    );
    assert_eq!(st["workloads"], 4, "old gone, new in: {outcome}");
    assert!(
        endpoints_v4(&tb, "node-1").contains(&reused.parse().expect("addr")),
        "the reused address is not programmed"
    );
    assert!(
        endpoints_v4(&tb, "node-1").contains(&far.parse().expect("addr")),
        "node-1 listing far's address as its own took far out of cluster state"
    );
    assert!(text_ok && text.contains("pods left out now"), "{text}");
    assert!(
        metrics.contains("portcullis_cluster_refusals_total{reason=\"mirror_pod\"} 1"),
        "the refusals are not in the metrics:\n{metrics}"
    );
}
