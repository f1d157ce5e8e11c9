//! The kernel datapath, end to end: real programs, real TCX links, real agents, real TCP in a
//! two-node testbed. Privileged: run as root, one at a time (`cargo xtask test` does both).
//! Without root these tests fail; they never skip.

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use testbed::{Options, PodSpec, Spec, Testbed};

const PORT: u16 = 8080;

#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

fn spec() -> Spec {
    Spec {
        nodes: vec![
            testbed::NodeSpec::new("node-1", vec![PodSpec::new("client"), PodSpec::new("other")]),
            testbed::NodeSpec::new("node-2", vec![PodSpec::new("server"), PodSpec::new("late").enroll(false)]),
        ],
    }
}

fn up() -> Testbed {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the datapath tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
    Testbed::up(&spec(), &Options::default()).unwrap_or_else(|e| panic!("testbed up: {e:#}"))
}

fn addr(tb: &Testbed, pod: &str, family: Family) -> IpAddr {
    let p = tb.pod(pod);
    match family {
        Family::V4 => IpAddr::V4(p.ipv4),
        Family::V6 => IpAddr::V6(p.ipv6),
    }
}

fn sock(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn identity(tb: &Testbed, pod: &str) -> String {
    let p = tb.pod(pod);
    format!("spiffe://cluster.local/ns/{}/sa/{}", p.namespace, p.service_account)
}

/// A `probe serve` in a pod, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(tb: &Testbed, pod: &str) -> Server {
    let mut child = tb
        .exec(pod, &[env!("CARGO_BIN_EXE_probe"), "serve", "--port", &PORT.to_string(), "--seconds", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning probe serve");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("reading probe serve");
    assert!(line.contains("listening"), "probe serve did not start: {line:?}");
    Server(child)
}

fn probe(tb: &Testbed, pod: &str, args: &[&str]) -> Value {
    let mut full = vec![env!("CARGO_BIN_EXE_probe")];
    full.extend_from_slice(args);
    let out = tb.exec(pod, &full).stderr(Stdio::inherit()).output().expect("running probe");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_else(|| panic!("probe {args:?} printed nothing"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("probe output {last:?}: {e}"))
}

fn connect(tb: &Testbed, from: &str, to: IpAddr, timeout_ms: u32) -> Value {
    probe(tb, from, &["connect", "--to", &sock(to, PORT), "--timeout-ms", &timeout_ms.to_string()])
}

fn ok(v: &Value) -> bool {
    v["ok"].as_bool() == Some(true)
}

fn portcullis(tb: &Testbed, node: &str, args: &[&str]) -> (bool, String) {
    let out = tb.portcullis(node, args).output().expect("running portcullis");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn status(tb: &Testbed, node: &str) -> Value {
    let (success, text) = portcullis(tb, node, &["status", "--output", "json"]);
    assert!(success, "status on {node} failed: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON: {e}: {text}"))
}

fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {}", s["counters"]))
}

/// Lets `remote_pod` (on `remote_node`) connect to `local_pod` on `node`.
fn allow(tb: &Testbed, node: &str, local_pod: &str, remote_pod: &str) {
    let remote_node = tb.pod(remote_pod).node.clone();
    let (success, text) = portcullis(
        tb,
        node,
        &["auth", "allow", "--local", &identity(tb, local_pod), "--remote", &identity(tb, remote_pod), "--remote-node", &remote_node, "--ttl", "600"],
    );
    assert!(success, "auth allow failed: {text}");
}

fn revoke(tb: &Testbed, node: &str, local_pod: &str, remote_pod: &str) -> String {
    let remote_node = tb.pod(remote_pod).node.clone();
    let (success, text) = portcullis(
        tb,
        node,
        &["auth", "revoke", "--local", &identity(tb, local_pod), "--remote", &identity(tb, remote_pod), "--remote-node", &remote_node],
    );
    assert!(success, "auth revoke failed: {text}");
    text
}

/// Polls `f` every 100 ms for up to `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}

fn unauthenticated_is_dropped_and_signalled(family: Family) {
    let tb = up();
    let _server = serve(&tb, "server");
    let target = addr(&tb, "server", family);
    let before = counter(&status(&tb, "node-2"), "drop_no_auth");
    let r = connect(&tb, "client", target, 1500);
    assert!(!ok(&r), "{family:?}: a connection without an auth entry got through: {r}");
    assert_eq!(r["kind"], "timeout", "{family:?}: the SYN must be dropped silently, not refused: {r}");

    let s = status(&tb, "node-2");
    assert!(counter(&s, "drop_no_auth") > before, "{family:?}: drop not counted: {}", s["counters"]);
    let client_id = identity(&tb, "client");
    let seen = eventually(Duration::from_secs(3), || {
        status(&tb, "node-2")["events"].as_array().is_some_and(|evs| {
            evs.iter().any(|e| e["kind"] == "denied" && e["reason"] == "drop_no_auth" && e["remote"] == client_id.as_str() && e["remote_node"] == "node-1")
        })
    });
    assert!(seen, "{family:?}: the agent on node-2 received no denied event: {}", status(&tb, "node-2")["events"]);
    // The client's agent saw the connect() and asked for authentication early.
    let wanted = status(&tb, "node-1")["events"].as_array().is_some_and(|evs| evs.iter().any(|e| e["kind"] == "auth_wanted"));
    assert!(wanted, "{family:?}: node-1 got no auth_wanted event: {}", status(&tb, "node-1")["events"]);
}

#[test]
fn v4_unauthenticated_connection_is_dropped_and_signalled() {
    unauthenticated_is_dropped_and_signalled(Family::V4);
}

#[test]
fn v6_unauthenticated_connection_is_dropped_and_signalled() {
    unauthenticated_is_dropped_and_signalled(Family::V6);
}

fn entry_admits_and_revocation_cuts(family: Family) {
    let tb = up();
    let _server = serve(&tb, "server");
    let target = addr(&tb, "server", family);
    allow(&tb, "node-2", "server", "client");
    let r = connect(&tb, "client", target, 3000);
    assert!(ok(&r), "{family:?}: connection with an auth entry failed: {r}");

    // A transfer paced over 8 s; revoke after 2 s.
    let transfer = tb
        .exec("client", &[env!("CARGO_BIN_EXE_probe"), "send", "--to", &sock(target, PORT), "--bytes", "8000000", "--seconds", "8", "--timeout-ms", "3000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning probe send");
    thread::sleep(Duration::from_secs(2));
    let flows = status(&tb, "node-2")["flows"].clone();
    let client_id = identity(&tb, "client");
    assert!(
        flows.as_array().is_some_and(|fs| fs.iter().any(|f| f["remote_identity"] == client_id.as_str() && f["direction"] == "inbound")),
        "{family:?}: the live flow is not listed with its identities: {flows}"
    );
    let said = revoke(&tb, "node-2", "server", "client");
    assert!(said.contains("removed the entry") && !said.contains(" 0 flow"), "{family:?}: revoke said: {said}");
    let out = transfer.wait_with_output().expect("waiting for probe send");
    let text = String::from_utf8_lossy(&out.stdout);
    let result: Value = serde_json::from_str(text.lines().last().unwrap_or("{}")).expect("probe send JSON");
    assert!(!ok(&result), "{family:?}: the transfer survived revocation: {result}");
    let r = connect(&tb, "client", target, 1500);
    assert!(!ok(&r), "{family:?}: a new connection after revocation got through: {r}");
    assert!(counter(&status(&tb, "node-2"), "drop_no_flow") > 0, "{family:?}: the cut flow's packets were not counted");
}

#[test]
fn v4_auth_entry_admits_and_revocation_cuts_the_established_flow() {
    entry_admits_and_revocation_cuts(Family::V4);
}

#[test]
fn v6_auth_entry_admits_and_revocation_cuts_the_established_flow() {
    entry_admits_and_revocation_cuts(Family::V6);
}

fn spoofed_source_is_dropped(family: Family) {
    let tb = up();
    let _server = serve(&tb, "server");
    let target = addr(&tb, "server", family);
    // `other` may connect; `client` tries to pass as `other` by sending from its address.
    allow(&tb, "node-2", "server", "other");
    let other = addr(&tb, "other", family);
    assert!(ok(&connect(&tb, "other", target, 3000)), "{family:?}: the genuine pod could not connect");
    let (prefix, extra) = match family {
        Family::V4 => ("32", vec!["-4"]),
        Family::V6 => ("128", vec!["-6"]),
    };
    let mut args: Vec<String> = extra.into_iter().map(str::to_owned).collect();
    args.extend(["addr", "add", &format!("{other}/{prefix}"), "dev", "eth0", "nodad"].map(str::to_owned));
    if matches!(family, Family::V4) {
        args.pop();
    }
    let mut ip = vec!["ip".to_owned()];
    ip.extend(args);
    let out = tb.exec("client", &ip).output().expect("ip addr add");
    assert!(out.status.success(), "adding the spoofed address: {}", String::from_utf8_lossy(&out.stderr));
    let before_node1 = counter(&status(&tb, "node-1"), "drop_spoofed");
    let before_node2 = counter(&status(&tb, "node-2"), "pass_authenticated");
    let r = probe(&tb, "client", &["connect", "--to", &sock(target, PORT), "--from", &other.to_string(), "--timeout-ms", "1500"]);
    assert!(!ok(&r), "{family:?}: a spoofed connection got through: {r}");
    assert!(counter(&status(&tb, "node-1"), "drop_spoofed") > before_node1, "{family:?}: spoofing not counted on node-1");
    assert_eq!(counter(&status(&tb, "node-2"), "pass_authenticated"), before_node2, "{family:?}: node-2 admitted something");
}

#[test]
fn v4_spoofed_source_is_dropped() {
    spoofed_source_is_dropped(Family::V4);
}

#[test]
fn v6_spoofed_source_is_dropped() {
    spoofed_source_is_dropped(Family::V6);
}

#[test]
fn agent_killed_and_restarted_mid_transfer_resets_nothing_and_keeps_enforcing() {
    let mut tb = up();
    let _server = serve(&tb, "server");
    let target = addr(&tb, "server", Family::V4);
    allow(&tb, "node-2", "server", "client");
    let transfer = tb
        .exec("client", &[env!("CARGO_BIN_EXE_probe"), "send", "--to", &sock(target, PORT), "--bytes", "16000000", "--seconds", "8", "--timeout-ms", "5000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning probe send");
    thread::sleep(Duration::from_secs(2));
    tb.kill_agent("node-2").expect("SIGKILL the agent");
    // During the outage: an unauthenticated peer is still dropped by the pinned programs.
    let r = connect(&tb, "other", target, 1500);
    assert!(!ok(&r), "an unauthenticated connection got through while the agent was down: {r}");
    // `status` still reads the pinned maps, says the agent is down, and exits non-zero.
    let (success, text) = portcullis(&tb, "node-2", &["status"]);
    assert!(!success && text.contains("DOWN"), "status with the agent down: {text}");
    tb.start_agent("node-2").expect("restarting the agent");
    let out = transfer.wait_with_output().expect("waiting for probe send");
    let text = String::from_utf8_lossy(&out.stdout);
    let result: Value = serde_json::from_str(text.lines().last().unwrap_or("{}")).expect("probe send JSON");
    assert!(ok(&result), "the transfer did not survive the agent restart: {result}");
    let s = status(&tb, "node-2");
    assert!(
        s["interfaces"].as_array().is_some_and(|is| !is.is_empty() && is.iter().all(|i| i["attached"] == "adopted")),
        "the restarted agent did not adopt the pinned links: {}",
        s["interfaces"]
    );
    assert_eq!(s["auth"].as_array().map(Vec::len), Some(1), "the auth entry did not survive: {}", s["auth"]);
    assert!(!ok(&connect(&tb, "other", target, 1500)), "enforcement lapsed after the restart");
    assert!(ok(&connect(&tb, "client", target, 3000)), "the authenticated pair lost access after the restart");
}

#[test]
fn workload_added_to_and_removed_from_cluster_state_is_enrolled_and_released() {
    let tb = up();
    let _server = serve(&tb, "late");
    let target = addr(&tb, "late", Family::V4);
    assert!(ok(&connect(&tb, "client", target, 3000)), "an unenrolled pod must not be enforced");
    let workload = tb.pod("late").workload();
    tb.write_cluster(|c| c.upsert_workload(workload)).expect("adding the workload");
    let enrolled = eventually(Duration::from_secs(10), || !ok(&connect(&tb, "client", target, 500)));
    assert!(enrolled, "the added workload was not enforced within 10 s");
    assert!(
        status(&tb, "node-2")["interfaces"].as_array().is_some_and(|is| is.iter().any(|i| i["workload"] == "default/late")),
        "status does not list the new interface"
    );
    tb.write_cluster(|c| {
        c.remove_workload("late");
    })
    .expect("removing the workload");
    let released = eventually(Duration::from_secs(10), || ok(&connect(&tb, "client", target, 500)));
    assert!(released, "the removed workload was not released within 10 s");
}
