//! Anti-spoofing beyond IP, end to end: the control packets a pod sends (ARP, ICMPv6
//! neighbour discovery and MLD) may only claim the pod's own addresses (or a link-local one),
//! and UDP, which cannot carry a connection MAC, stays bound to source addresses — a gap that
//! `cross_node_udp: deny` closes for the pods of a namespace. Frames are crafted with the
//! `forge` tool (AF_PACKET and raw IP sockets) inside the testbed's namespaces. Privileged:
//! run as root, one at a time (`cargo xtask test`). Without root these tests fail; they never
//! skip.

use std::{
    io::{BufRead, BufReader},
    net::Ipv6Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    scenario::{Family, Scenario, counter, eventually, last_json, ok, sock},
};

const PORT: u16 = 8080;
/// Where the backend echoes UDP (`probe udp-serve`).
const UDP_PORT: u16 = 5353;
/// Where the backend records every datagram it receives (`forge udp-listen`).
const TAP_PORT: u16 = 5300;

fn root() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the spoofing tests need root (they create namespaces, load eBPF and send raw frames); run them with `cargo xtask test` as root"
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

fn forge() -> &'static str {
    env!("CARGO_BIN_EXE_forge")
}

/// `frontend` and `bystander` on node-1, `backend` on node-2: frontend forges, claiming the
/// addresses of the other two.
fn control_spec() -> Spec {
    Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![PodSpec::new("frontend"), PodSpec::new("bystander")],
            ),
            NodeSpec::new("node-2", vec![PodSpec::new("backend")]),
        ],
    }
}

/// `forge ARGS`, as a command line.
fn forge_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec![forge()];
    full.extend_from_slice(args);
    full
}

/// Runs `forge` (`args`, `place` saying where) and returns its verdict, which must be `ok`.
fn verdict(mut cmd: Command, args: &[&str], place: &str) -> Value {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("running forge");
    let v = last_json(&out.stdout);
    assert!(ok(&v), "forge {args:?} {place} failed: {v}");
    v
}

/// Runs `forge ARGS` in `pod` and returns its verdict, which must be `ok`.
fn forge_in(tb: &Testbed, pod: &str, args: &[&str]) -> Value {
    verdict(tb.exec(pod, &forge_args(args)), args, &format!("in {pod}"))
}

/// Runs `forge ARGS` on node `node` itself (its namespace, outside any pod).
fn forge_on_node(tb: &Testbed, node: &str, args: &[&str]) -> Value {
    verdict(
        tb.exec_node(node, &forge_args(args)),
        args,
        &format!("on {node}"),
    )
}

/// `count` ARP messages (`op`: request or reply) from frontend's eth0 with sender protocol
/// address `sender` and target `target`; replies are counted for `wait_ms` if given (else
/// forge's default). The verdict.
fn arp_from_frontend(
    tb: &Testbed,
    (op, sender, target): (&str, &str, &str),
    count: &str,
    wait_ms: Option<&str>,
) -> Value {
    let mut args = vec![
        "arp",
        "--dev",
        "eth0",
        "--op",
        op,
        "--sender-ip",
        sender,
        "--target-ip",
        target,
        "--count",
        count,
    ];
    if let Some(w) = wait_ms {
        args.extend(["--wait-ms", w]);
    }
    forge_in(tb, "frontend", &args)
}

/// `count` ICMPv6 messages of `kind` (ns, na or mld) from frontend's eth0 with IPv6 source
/// `src`, about `target` if given, each carrying `marker`. The verdict.
fn nd_from_frontend(
    tb: &Testbed,
    (kind, src, target): (&str, &str, Option<&str>),
    count: &str,
    marker: u16,
) -> Value {
    let marker = marker.to_string();
    let mut args = vec![
        "nd", "--dev", "eth0", "--kind", kind, "--src", src, "--count", count, "--marker", &marker,
    ];
    if let Some(t) = target {
        args.extend(["--target", t]);
    }
    forge_in(tb, "frontend", &args)
}

/// One batch of `n` forged control messages from frontend, sent by `send`: node-1 must count
/// exactly `n` more `drop_spoofed`, and the forger must get no answer. `desc` (a JSON object)
/// describes the batch; it goes into `outcomes` with the forger's verdict and the counter's
/// growth. `what` names the batch in the messages.
fn forged_batch(
    s: &Scenario<'_>,
    n: u64,
    (what, mut desc): (&str, Value),
    outcomes: &mut Vec<Value>,
    send: impl FnOnce() -> Value,
) {
    let before = counter(&s.status("node-1"), "drop_spoofed");
    let r = send();
    let after = settle(s, "node-1", "drop_spoofed", before + n);
    desc["forge"] = r.clone();
    desc["drop_spoofed_delta"] = json!(after - before);
    outcomes.push(desc);
    assert_eq!(
        after - before,
        n,
        "{what}: drop_spoofed on node-1 went {before} → {after}: {outcomes:?}"
    );
    assert_eq!(r["replies"], 0, "the node answered a {what}: {r}");
}

/// A `forge icmp6-listen` or `forge udp-listen` in the background: the JSON lines it prints,
/// collected as they come. Killed on drop.
struct Tap {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Tap {
    fn start(mut cmd: Command) -> Tap {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning forge");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        out.read_line(&mut first).expect("reading forge");
        assert!(
            first.contains("listening"),
            "forge did not start listening: {first:?}"
        );
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().expect("tap lines").push(v);
                }
            }
        });
        Tap { child, lines }
    }

    /// How many lines so far satisfy `f`.
    fn count(&self, f: impl Fn(&Value) -> bool) -> usize {
        self.lines
            .lock()
            .expect("tap lines")
            .iter()
            .filter(|v| f(v))
            .count()
    }

    fn all(&self) -> Vec<Value> {
        self.lines.lock().expect("tap lines").clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The link-local address of `pod`'s eth0.
fn link_local(tb: &Testbed, pod: &str) -> Ipv6Addr {
    let out = tb
        .run_in(
            pod,
            &[
                "ip", "-j", "-6", "addr", "show", "dev", "eth0", "scope", "link",
            ],
        )
        .expect("ip addr show");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    v[0]["addr_info"]
        .as_array()
        .and_then(|a| a.iter().find_map(|i| i["local"].as_str()?.parse().ok()))
        .unwrap_or_else(|| panic!("{pod} has no link-local address: {v}"))
}

/// Waits (up to 3 s: the pod's frames reach the programs through the node's backlog) until
/// counter `name` on `node` is at least `want`, and returns its value.
fn settle(s: &Scenario<'_>, node: &str, name: &str, want: u64) -> u64 {
    let mut last = 0;
    eventually(Duration::from_secs(3), || {
        last = counter(&s.status(node), name);
        last >= want
    });
    // What arrives late still counts: read again after the last frame surely went through.
    thread::sleep(Duration::from_millis(200));
    last.max(counter(&s.status(node), name))
}

/// Empties frontend's neighbour caches (both families) and the node's for frontend's veth, so
/// that the next connections resolve addresses again, then opens a real TCP connection to
/// backend in each family. Returns the verdicts.
fn connect_with_fresh_neighbours(s: &Scenario<'_>) -> Vec<Value> {
    let tb = s.tb;
    let veth = tb.pod("frontend").host_veth.clone();
    for family in ["-4", "-6"] {
        tb.run_in("frontend", &["ip", family, "neigh", "flush", "dev", "eth0"])
            .expect("flushing the pod's neighbours");
        let out = tb
            .exec_node("node-1", &["ip", family, "neigh", "flush", "dev", &veth])
            .output()
            .expect("flushing the node's neighbours");
        assert!(
            out.status.success(),
            "ip neigh flush on node-1: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    [Family::V4, Family::V6]
        .into_iter()
        .map(|f| s.connect("frontend", s.addr("backend", f), PORT, 5000))
        .collect()
}

/// Asserts that the real connections of [`connect_with_fresh_neighbours`] after the forged
/// `what` all succeeded, and that node-1 counted none of their packets (the pod's own address
/// resolution) as spoofed: `spoofed` is how many `drop_spoofed` it counted meanwhile.
fn assert_still_connects(connections: &[Value], spoofed: u64, what: &str, outcome: &Value) {
    for (c, family) in connections.iter().zip(["IPv4", "IPv6"]) {
        assert!(
            ok(c),
            "{family}: a real connection after the forged {what} failed: {outcome}"
        );
    }
    assert_eq!(
        spoofed, 0,
        "the pod's own address resolution was counted as spoofed: {outcome}"
    );
}

fn v4(s: &Scenario<'_>, pod: &str) -> String {
    s.addr(pod, Family::V4).to_string()
}

fn v6(s: &Scenario<'_>, pod: &str) -> String {
    s.addr(pod, Family::V6).to_string()
}

/// ARP that claims another pod's IPv4 address (a local one, whose traffic the node would then
/// send to the attacker, or a remote one) is dropped on the attacker's node as `drop_spoofed`,
/// requests and gratuitous replies alike, and the node answers none of the requests. ARP with
/// the pod's own address, and probes (sender 0.0.0.0), pass and are answered; afterwards
/// address resolution and real TCP connections over both families still work.
#[test]
fn arp_claiming_another_pods_address_is_dropped_and_the_pods_own_arp_passes() {
    let tb = up(&control_spec(), &Options::default());
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    s.allow("backend", "frontend");
    let node_ip = tb.node("node-1").ipv4.to_string();
    let (own, bystander, backend) = (v4(&s, "frontend"), v4(&s, "bystander"), v4(&s, "backend"));
    const N: u64 = 3;
    let n = N.to_string();

    // Forged: each batch must add exactly N to drop_spoofed, and get no answer.
    let forged = [
        ("request", &bystander, &backend),
        ("reply", &bystander, &node_ip),
        ("request", &backend, &node_ip),
        ("reply", &backend, &own),
    ];
    let start = counter(&s.status("node-1"), "drop_spoofed");
    let mut outcomes = Vec::new();
    for (k, &(op, sender, target)) in forged.iter().enumerate() {
        forged_batch(
            &s,
            N,
            (
                &format!("forged ARP {op} #{k} claiming {sender}"),
                json!({"op": op, "sender": sender, "target": target}),
            ),
            &mut outcomes,
            || arp_from_frontend(&tb, (op, sender, target), &n, Some("1000")),
        );
    }
    let forged_total = counter(&s.status("node-1"), "drop_spoofed") - start;

    // Genuine: the pod's own address, and a probe. Requests are answered (proxy ARP for the
    // remote pod, the node's own address for the probe), and nothing is counted as spoofed.
    let before = s.status("node-1");
    // Asked of the pod's gateway (on a directly wired node, proxy ARP answers for the remote
    // pod).
    let gateway = tb
        .gateway_v4("frontend")
        .expect("frontend's gateway")
        .map_or_else(|| backend.clone(), |g| g.to_string());
    let asked = arp_from_frontend(&tb, ("request", &own, &gateway), &n, None);
    let probed = arp_from_frontend(&tb, ("request", "0.0.0.0", &node_ip), &n, None);
    let announced = arp_from_frontend(&tb, ("reply", &own, &node_ip), &n, None);
    let control_before = counter(&before, "pass_control");
    let control_after = settle(&s, "node-1", "pass_control", control_before + 3 * N);
    let spoofed_after_genuine = counter(&s.status("node-1"), "drop_spoofed");

    let connections = connect_with_fresh_neighbours(&s);
    let spoofed_end = counter(&s.status("node-1"), "drop_spoofed");
    let outcome = json!({
        "forged": outcomes,
        "forged_dropped": forged_total,
        "own_request": asked,
        "probe": probed,
        "own_reply": announced,
        "pass_control_delta": control_after - control_before,
        "drop_spoofed_by_genuine": spoofed_after_genuine - counter(&before, "drop_spoofed"),
        "connections": connections,
        "drop_spoofed_by_connections": spoofed_end - spoofed_after_genuine,
    });
    eprintln!("arp outcome: {outcome}");
    assert_eq!(forged_total, N * forged.len() as u64, "{outcome}");
    assert_eq!(
        asked["replies"], N,
        "requests with the pod's own address were not all answered: {outcome}"
    );
    assert_eq!(
        probed["replies"], N,
        "ARP probes (sender 0.0.0.0) were not all answered: {outcome}"
    );
    assert!(
        control_after - control_before >= 3 * N,
        "the genuine ARP was not counted as pass_control: {outcome}"
    );
    assert_eq!(
        spoofed_after_genuine,
        counter(&before, "drop_spoofed"),
        "genuine ARP was counted as spoofed: {outcome}"
    );
    assert_still_connects(
        &connections,
        spoofed_end - spoofed_after_genuine,
        "ARP",
        &outcome,
    );
}

/// Neighbour solicitations, advertisements and MLD reports whose IPv6 source is another pod's
/// global address (a local pod's or a remote one's) are dropped on the attacker's node as
/// `drop_spoofed`: the node's stack never receives them (a raw ICMPv6 socket on the pod's host
/// interface sees none) and answers no solicitation. The same messages from the pod's
/// link-local address (and an advertisement of its own global address from that address) pass
/// as `pass_control`, reach the node and are answered; real TCP connections over both
/// families still work afterwards.
#[test]
fn neighbour_discovery_and_mld_from_another_pods_address_are_dropped_and_link_local_passes() {
    let tb = up(&control_spec(), &Options::default());
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    s.allow("backend", "frontend");
    let veth = tb.pod("frontend").host_veth.clone();
    let tap = Tap::start(tb.exec_node(
        "node-1",
        &[forge(), "icmp6-listen", "--dev", &veth, "--seconds", "150"],
    ));
    let ll = link_local(&tb, "frontend").to_string();
    let (own, bystander, backend) = (v6(&s, "frontend"), v6(&s, "bystander"), v6(&s, "backend"));
    const N: u64 = 2;
    let n = N.to_string();
    let seen =
        |tap: &Tap, src: &str, marker: u16| tap.count(|v| v["src"] == src && v["marker"] == marker);

    // Forged: (kind, source, marker). The advertisements claim the source address as theirs.
    let forged: Vec<(&str, &str, u16)> = vec![
        ("ns", &bystander, 101),
        ("ns", &backend, 102),
        ("na", &bystander, 103),
        ("na", &backend, 104),
        ("mld", &bystander, 105),
        ("mld", &backend, 106),
    ];
    let start = counter(&s.status("node-1"), "drop_spoofed");
    let mut outcomes = Vec::new();
    for &(kind, src, marker) in &forged {
        forged_batch(
            &s,
            N,
            (
                &format!("forged {kind} from {src}"),
                json!({"kind": kind, "src": src}),
            ),
            &mut outcomes,
            || nd_from_frontend(&tb, (kind, src, None), &n, marker),
        );
    }
    let forged_total = counter(&s.status("node-1"), "drop_spoofed") - start;

    // Genuine: from the pod's link-local address, and an advertisement of the pod's own
    // global address from that address.
    let gateway = tb
        .gateway_v6("frontend")
        .expect("frontend's gateway")
        .to_string();
    let genuine: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("ns", &ll, Some(&gateway), 201),
        ("na", &ll, Some(&own), 202),
        ("mld", &ll, None, 203),
        ("na", &own, None, 204),
    ];
    let before = s.status("node-1");
    let mut answered = Vec::new();
    for &(kind, src, target, marker) in &genuine {
        answered.push(nd_from_frontend(&tb, (kind, src, target), &n, marker));
    }
    let control_before = counter(&before, "pass_control");
    let control_after = settle(
        &s,
        "node-1",
        "pass_control",
        control_before + N * genuine.len() as u64,
    );
    let spoofed_after_genuine = counter(&s.status("node-1"), "drop_spoofed");
    // Every genuine message reaches the node's stack (the tap is behind the programs).
    let arrived = eventually(Duration::from_secs(3), || {
        genuine
            .iter()
            .all(|(_, src, _, m)| seen(&tap, src, *m) as u64 >= N)
    });

    let connections = connect_with_fresh_neighbours(&s);
    let spoofed_end = counter(&s.status("node-1"), "drop_spoofed");
    let leaked: Vec<Value> = forged
        .iter()
        .filter(|(_, src, m)| seen(&tap, src, *m) > 0)
        .map(|(kind, src, m)| json!({"kind": kind, "src": src, "marker": m}))
        .collect();
    let outcome = json!({
        "forged": outcomes,
        "forged_dropped": forged_total,
        "forged_reaching_the_node": leaked,
        "genuine": answered,
        "genuine_reaching_the_node": genuine.iter().map(|(k, src, _, m)| json!({"kind": k, "src": src, "seen": seen(&tap, src, *m)})).collect::<Vec<_>>(),
        "pass_control_delta": control_after - control_before,
        "drop_spoofed_by_genuine": spoofed_after_genuine - counter(&before, "drop_spoofed"),
        "connections": connections,
        "drop_spoofed_by_connections": spoofed_end - spoofed_after_genuine,
    });
    eprintln!("nd outcome: {outcome}");
    assert_eq!(forged_total, N * forged.len() as u64, "{outcome}");
    assert!(
        leaked.is_empty(),
        "forged messages reached node-1's stack: {outcome}"
    );
    assert!(
        arrived,
        "genuine link-local messages did not all reach node-1's stack: {outcome}"
    );
    assert!(
        answered[0]["replies"].as_u64() >= Some(1),
        "the node did not answer a solicitation from the pod's link-local address: {outcome}"
    );
    assert_eq!(
        spoofed_after_genuine,
        counter(&before, "drop_spoofed"),
        "genuine neighbour discovery was counted as spoofed: {outcome}"
    );
    assert!(
        control_after - control_before >= N * genuine.len() as u64,
        "the genuine messages were not counted as pass_control: {outcome}"
    );
    assert_still_connects(
        &connections,
        spoofed_end - spoofed_after_genuine,
        "messages",
        &outcome,
    );
}

/// Every setting at its default: any authenticated peer, on any port.
const DEFAULT_POLICY: &str = "name: spoofing-test\n";
/// Backend's namespace refuses UDP from other nodes.
const DENY_POLICY: &str = "name: spoofing-test\nnamespaces:\n  store: { cross_node_udp: deny }\n";

fn udp_send(s: &Scenario<'_>, from: &str, to: &str, family: Family, count: u32) -> Value {
    s.probe(
        from,
        &[
            "udp-send",
            "--to",
            &sock(s.addr(to, family), UDP_PORT),
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "400",
        ],
    )
}

/// Sends one datagram from node-3 with `from`'s address (source port `sport`) to backend's
/// tap, with a payload naming `tag`.
fn forge_udp(s: &Scenario<'_>, from: &str, family: Family, sport: u16, tag: &str) -> Value {
    forge_on_node(
        s.tb,
        "node-3",
        &[
            "udp",
            "--from",
            &sock(s.addr(from, family), sport),
            "--to",
            &sock(s.addr("backend", family), TAP_PORT),
            "--payload",
            tag,
        ],
    )
}

/// UDP cannot carry a connection MAC, so it stays bound to source addresses: with the default
/// policy, a datagram that root on node-3 forges with the source address of frontend (an
/// authenticated pod of node-1) reaches backend on node-2 — the documented gap. With
/// `cross_node_udp: deny` in backend's namespace, genuine UDP from frontend (another node) is
/// dropped as `drop_policy`, the forged datagram no longer arrives either, and UDP from a pod
/// on backend's own node still passes (as does TCP from frontend).
#[test]
fn udp_is_bound_to_addresses_until_cross_node_udp_deny_keeps_it_on_the_node() {
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("frontend")]),
            NodeSpec::new(
                "node-2",
                vec![
                    PodSpec::new("backend").namespace("store"),
                    PodSpec::new("neighbour"),
                ],
            ),
            NodeSpec::new("node-3", vec![]),
        ],
    };
    let opts = Options {
        authenticate: true,
        policy: Some(DEFAULT_POLICY.to_owned()),
        ..Options::default()
    };
    let tb = up(&spec, &opts);
    let s = scenario(&tb);
    let _echo = s.udp_serve("backend", UDP_PORT);
    let _server = s.serve("backend", PORT);
    let tap = Tap::start(s.tb.exec(
        "backend",
        &[
            forge(),
            "udp-listen",
            "--port",
            &TAP_PORT.to_string(),
            "--seconds",
            "150",
        ],
    ));
    let families = [Family::V4, Family::V6];

    // The pairs authenticate (proactively, or on the first datagram) and UDP flows both ways.
    for from in ["frontend", "neighbour"] {
        for family in families {
            let mut last = Value::Null;
            let flows = eventually(Duration::from_secs(30), || {
                last = udp_send(&s, from, "backend", family, 1);
                ok(&last)
            });
            assert!(
                flows,
                "{family:?}: UDP from {from} to backend never got through under the default policy: {last} / {}",
                s.status("node-2")["auth"]
            );
        }
    }

    // The gap: node-3 forges frontend's address, node-2 admits by address.
    let before = s.status("node-2");
    let mut gap = Vec::new();
    for (family, sport) in [(Family::V4, 41001), (Family::V6, 41002)] {
        let tag = format!("forged-{family:?}-allow");
        let sent = forge_udp(&s, "frontend", family, sport, &tag);
        let want = sock(s.addr("frontend", family), sport);
        let arrived = eventually(Duration::from_secs(3), || {
            tap.count(|v| v["payload"] == tag.as_str() && v["from"] == want.as_str()) == 1
        });
        gap.push(json!({"family": format!("{family:?}"), "sent": sent, "arrived": arrived}));
    }
    let admitted =
        counter(&s.status("node-2"), "pass_authenticated") - counter(&before, "pass_authenticated");
    let gap_outcome = json!({"forged": gap, "pass_authenticated_delta": admitted,
                             "tap": tap.all()});
    eprintln!("udp gap (documented): {gap_outcome}");
    for g in &gap {
        assert_eq!(
            g["arrived"], true,
            "with cross_node_udp: allow, a datagram forged from node-3 with frontend's address should be admitted by address (the documented gap): {gap_outcome}"
        );
    }
    assert!(
        admitted >= 2,
        "the forged datagrams were not admitted as authenticated: {gap_outcome}"
    );

    // Closing it: backend's namespace refuses UDP from other nodes.
    tb.set_policy(DENY_POLICY).expect("writing the policy");
    let mut last = Value::Null;
    let applied = eventually(Duration::from_secs(20), || {
        last = udp_send(&s, "frontend", "backend", Family::V4, 1);
        !ok(&last)
    });
    assert!(
        applied,
        "cross_node_udp: deny never took effect on node-2: {last} / policy state {}",
        s.status("node-2")["agent"]
    );
    let mut denied = Vec::new();
    for family in families {
        let before = counter(&s.status("node-2"), "drop_policy");
        let r = udp_send(&s, "frontend", "backend", family, 3);
        let after = settle(&s, "node-2", "drop_policy", before + 3);
        denied.push(json!({"family": format!("{family:?}"), "udp_send": r,
                           "drop_policy_delta": after - before}));
    }
    let before = counter(&s.status("node-2"), "drop_policy");
    let mut forged_after = Vec::new();
    for (family, sport) in [(Family::V4, 41003), (Family::V6, 41004)] {
        let tag = format!("forged-{family:?}-deny");
        forge_udp(&s, "frontend", family, sport, &tag);
        forged_after.push(tag);
    }
    let forged_dropped = settle(&s, "node-2", "drop_policy", before + 2) - before;
    thread::sleep(Duration::from_millis(500));
    let forged_arrived: Vec<&String> = forged_after
        .iter()
        .filter(|t| tap.count(|v| v["payload"] == t.as_str()) > 0)
        .collect();
    let same_node: Vec<Value> = families
        .iter()
        .map(|f| udp_send(&s, "neighbour", "backend", *f, 3))
        .collect();
    let tcp = s.connect("frontend", s.addr("backend", Family::V4), PORT, 5000);
    let outcome = json!({
        "gap": gap_outcome,
        "denied": denied,
        "forged_after_deny_dropped": forged_dropped,
        "forged_after_deny_arrived": forged_arrived,
        "same_node_udp": same_node,
        "cross_node_tcp": tcp,
    });
    eprintln!("udp outcome: {outcome}");
    for d in &denied {
        assert!(
            !ok(&d["udp_send"]) && d["udp_send"]["received"] == 0,
            "cross-node UDP from frontend got through with cross_node_udp: deny: {outcome}"
        );
        assert_eq!(
            d["drop_policy_delta"], 3,
            "each refused datagram must count once as drop_policy: {outcome}"
        );
    }
    assert_eq!(
        forged_dropped, 2,
        "the forged datagrams were not dropped as drop_policy: {outcome}"
    );
    assert!(
        forged_arrived.is_empty(),
        "a forged datagram still arrived with cross_node_udp: deny: {outcome}"
    );
    for (r, family) in same_node.iter().zip(families) {
        assert!(
            ok(r),
            "{family:?}: UDP from a pod on backend's own node was refused: {outcome}"
        );
    }
    assert!(
        ok(&tcp),
        "TCP from frontend was refused by a UDP setting: {outcome}"
    );
}
