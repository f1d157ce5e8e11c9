//! Key-bound admission, end to end: the source node appends a connection MAC (a TCP option
//! keyed with the pair's key from a real proof) to every SYN an enrolled pod sends to a keyed
//! peer, and the destination node admits a new TCP connection of that pair only with a MAC that
//! verifies. Genuine connections (both families, a retransmitted SYN, continuous connections
//! across key rotations) pass; SYNs forged with an authenticated pod's address from another
//! node, from the pod's own node outside the pod, and from the fabric are dropped for want of a
//! MAC; a MAC copied onto another connection is dropped as bad; policy `syn_mac: audit` admits
//! and reports, `off` admits silently. Every testbed authenticates pairs by real handshakes
//! (never `auth allow`, whose entries stay address-bound). Privileged: run as root, one at a
//! time (`cargo xtask test`). Without root these tests fail.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use portcullis_common::mac;
use serde_json::Value;
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    scenario::{Family, Scenario, counter, eventually, last_json, ok, sock},
};

const PORT: u16 = 8080;
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn up(spec: &Spec, opts: &Options) -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the connection MAC tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
    Testbed::up(spec, opts).unwrap_or_else(|e| panic!("testbed up: {e:#}"))
}

/// `frontend` on node-1, `backend` (and `more` pods) on node-2, and an empty node-3 if `spare`.
fn spec(spare: bool, more: Vec<PodSpec>) -> Spec {
    let mut node2 = vec![PodSpec::new("backend")];
    node2.extend(more);
    let mut nodes = vec![
        NodeSpec::new("node-1", vec![PodSpec::new("frontend")]),
        NodeSpec::new("node-2", node2),
    ];
    if spare {
        nodes.push(NodeSpec::new("node-3", vec![]));
    }
    Spec { nodes }
}

fn authenticated() -> Options {
    Options {
        authenticate: true,
        ..Options::default()
    }
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

/// The auth entry of `node` for (`local` pod, `remote` pod).
fn entry(s: &Scenario<'_>, node: &str, local: &str, remote: &str) -> Option<Value> {
    let (l, r) = (s.identity(local), s.identity(remote));
    s.status(node)["auth"]
        .as_array()?
        .iter()
        .find(|e| e["local"] == l.as_str() && e["remote"] == r.as_str())
        .cloned()
}

/// The fingerprint of the key `node` signs `local`'s SYNs to `remote` with, if its entry is
/// keyed (written by a proof).
fn key_out(s: &Scenario<'_>, node: &str, local: &str, remote: &str) -> Option<String> {
    entry(s, node, local, remote).and_then(|e| e["key_out"].as_str().map(str::to_owned))
}

/// Waits until both nodes hold a keyed entry of the pair (`a`, `b`), written by a real proof
/// (proactive authentication, or a handshake a first connection started).
fn wait_keyed(s: &Scenario<'_>, a: &str, b: &str) {
    let (na, nb) = (s.tb.pod(a).node.clone(), s.tb.pod(b).node.clone());
    assert!(
        eventually(Duration::from_secs(20), || key_out(s, &na, a, b).is_some()
            && key_out(s, &nb, b, a).is_some()),
        "the pair ({a}, {b}) has no keyed entries on both nodes: {} / {}",
        s.status(&na)["auth"],
        s.status(&nb)["auth"]
    );
}

/// Counter `name` of `after` minus that of `before`.
fn delta(after: &Value, before: &Value, name: &str) -> u64 {
    counter(after, name)
        .checked_sub(counter(before, name))
        .unwrap_or_else(|| panic!("counter {name} went down"))
}

/// Waits until counter `name` on `node` grew by at least `want` since `before`; returns the
/// status then.
fn grown(s: &Scenario<'_>, node: &str, before: &Value, name: &str, want: u64) -> Value {
    let mut st = s.status(node);
    let deadline = Instant::now() + Duration::from_secs(5);
    while delta(&st, before, name) < want && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        st = s.status(node);
    }
    st
}

/// Asserts that counter `name` grew by at least `want` from `before` to `after`; `what` says
/// what it means if not.
fn grew_by(after: &Value, before: &Value, name: &str, want: u64, what: &str) {
    let d = delta(after, before, name);
    assert!(
        d >= want,
        "{what} ({name} grew by {d}, not at least {want}): {}",
        after["counters"]
    );
}

/// Asserts that none of the counters `names` moved from `before` to `after`; `what` names
/// the traffic in between.
fn none_counted(after: &Value, before: &Value, names: &[&str], what: &str) {
    for name in names {
        assert_eq!(
            delta(after, before, name),
            0,
            "{what}: counted as {name}: {}",
            after["counters"]
        );
    }
}

/// Waits until counter `name` on node-2 grew by `want` since `before`, asserts that it grew
/// by exactly `want` and that none of `unmoved` moved; `what` names the packets counted.
/// Returns node-2's status then.
fn counted_exactly(
    s: &Scenario<'_>,
    before: &Value,
    (name, want): (&str, u64),
    unmoved: &[&str],
    what: &str,
) -> Value {
    let after = grown(s, "node-2", before, name, want);
    assert_eq!(
        delta(&after, before, name),
        want,
        "{what}: not counted {want} times as {name} on node-2: {}",
        after["counters"]
    );
    none_counted(&after, before, unmoved, what);
    after
}

/// Status events of `node` of `kind` and `reason` with `remote` pod as the remote identity.
fn events(s: &Scenario<'_>, node: &str, kind: &str, reason: &str, remote: &str) -> u64 {
    let id = s.identity(remote);
    s.status(node)["events"].as_array().map_or(0, |es| {
        es.iter()
            .filter(|e| e["kind"] == kind && e["reason"] == reason && e["remote"] == id.as_str())
            .map(|e| e["count"].as_u64().unwrap_or(1))
            .sum()
    })
}

/// Asserts that node-2 reports an event of `kind` naming `reason` and frontend within `limit`.
fn assert_reported(s: &Scenario<'_>, kind: &str, reason: &str, limit: Duration) {
    assert!(
        eventually(limit, || events(s, "node-2", kind, reason, "frontend") >= 1),
        "no {kind} event naming {reason} and frontend on node-2: {}",
        s.status("node-2")["events"]
    );
}

/// The MAC address of `node`'s eth0 (what the fabric delivers the node's frames to).
fn node_mac(tb: &Testbed, node: &str) -> String {
    link_mac(&tb.node(node).netns, "eth0")
}

/// The MAC address of interface `dev` in network namespace `netns`.
fn link_mac(netns: &str, dev: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", "dev", dev])
        .output()
        .expect("running ip");
    assert!(out.status.success(), "ip link show: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    v[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no MAC address of {dev} in {netns}: {v}"))
        .to_owned()
}

/// `probe ARGS` in the fabric namespace (the bridge every node's eth0 is plugged into: no
/// address, no route; an attacker on the wire), in a cgroup of the testbed's own.
fn fabric_probe(s: &Scenario<'_>, args: &[&str]) -> Command {
    let cg = s.tb.info().cgroup_root.join("mac-fabric");
    testbed::cgroup::create(&cg).expect("creating the fabric probe's cgroup");
    let mut full = vec![s.probe.to_string_lossy().into_owned()];
    full.extend(args.iter().map(|a| (*a).to_owned()));
    let mut c = testbed::command_in(&s.tb.info().fabric_netns, &cg, &full)
        .expect("a command in the fabric namespace");
    c.stdout(Stdio::piped()).stderr(Stdio::inherit());
    c
}

/// `probe inject` from the fabric onto node-2's port: SYNs from `from` to `to:PORT`, with
/// `extra` options of the mode; its report.
fn inject_on_fabric(s: &Scenario<'_>, from: (IpAddr, u16), to: IpAddr, extra: &[&str]) -> Value {
    let (iface, mac) = (
        s.tb.node("node-2").fabric_veth.clone(),
        node_mac(s.tb, "node-2"),
    );
    let (from, to) = (sock(from.0, from.1), sock(to, PORT));
    let mut args = vec![
        "inject",
        "--iface",
        &iface,
        "--dst-mac",
        &mac,
        "--from",
        &from,
        "--to",
        &to,
    ];
    args.extend_from_slice(extra);
    let out = fabric_probe(s, &args)
        .output()
        .expect("running probe inject");
    last_json(&out.stdout)
}

/// Forged SYNs from node-3 (raw socket, source `from`): `packets` of them, each from another
/// source port, to `to:PORT`.
fn flood_from_node3(s: &Scenario<'_>, from: IpAddr, to: IpAddr, packets: u64) {
    let r = s.probe_node(
        "node-3",
        &[
            "flood",
            "--to",
            &sock(to, PORT),
            "--sources",
            &from.to_string(),
            "--count",
            "1",
            "--packets",
            &packets.to_string(),
            "--seconds",
            "5",
        ],
    );
    assert!(
        ok(&r) && r["sent"].as_u64() == Some(packets),
        "the flood from node-3 failed: {r}"
    );
}

/// `packets` SYNs forged on node-3 with `from` as their source (see [`flood_from_node3`]),
/// which node-2 must count exactly once each as `name` and never as any of `unmoved`; `what`
/// says under what setting, in the messages.
fn forged_on_node3_count(
    s: &Scenario<'_>,
    (from, to): (IpAddr, IpAddr),
    (name, packets): (&str, u64),
    unmoved: &[&str],
    what: &str,
) {
    let before = s.status("node-2");
    flood_from_node3(s, from, to, packets);
    counted_exactly(
        s,
        &before,
        (name, packets),
        unmoved,
        &format!("{what}: {packets} SYNs forged on node-3 from {from} to {to}"),
    );
}

/// Starts `probe replay` on the fabric side of node-2's eth0, opens one genuine connection
/// from frontend to backend (whose signed SYN the probe captures), and returns the probe's
/// verdict: the captured SYN and the altered copies (`variants`) it wrote towards node-2.
fn replay(s: &Scenario<'_>, family: Family, variants: &str) -> Value {
    let backend = s.addr("backend", family);
    let to = sock(backend, PORT);
    let iface = s.tb.node("node-2").fabric_veth.clone();
    let mut child = fabric_probe(
        s,
        &[
            "replay",
            "--iface",
            &iface,
            "--to",
            &to,
            "--variants",
            variants,
            "--timeout-ms",
            "8000",
        ],
    )
    .spawn()
    .expect("spawning probe replay");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("reading probe replay");
    assert!(
        line.contains("sniffing"),
        "probe replay did not start: {line:?}"
    );
    let genuine = s.connect("frontend", backend, PORT, 3000);
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("reading probe replay");
    let _ = child.wait();
    assert!(
        ok(&genuine),
        "{family:?}: the genuine connection failed: {genuine}"
    );
    let v = last_json(format!("{line}{rest}").as_bytes());
    assert!(ok(&v), "{family:?}: probe replay failed: {v}");
    v
}

/// `CLOCK_REALTIME` now, in connection MAC time units.
fn now_units() -> u32 {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    mac::time_units(u64::try_from(ns).expect("ns fit"))
}

/// Runs `nft -f -` with `script` in node `node`'s network namespace.
fn nft(tb: &Testbed, node: &str, script: &str) -> String {
    let mut child = tb
        .exec_node(node, &["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("writing the nft script");
    let out = child.wait_with_output().expect("waiting for nft");
    assert!(
        out.status.success(),
        "nft on {node} failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many packets the rule of table `inet pcmac` dropped on `node`.
fn nft_dropped(tb: &Testbed, node: &str) -> u64 {
    let text = nft(tb, node, "list table inet pcmac\n");
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {text}"))
}

/// Genuine connections of an authenticated pair, IPv4 and IPv6: node-1 signs each SYN
/// (`pass_signed`), node-2 admits it (`pass_authenticated`), and nothing is refused for a MAC.
/// Then a SYN that node-1 signed is lost behind node-1's pod interface (a firewall rule in
/// node-1's namespace drops it on its way to eth0): the kernel's retransmission, same ISN, is
/// signed again and admitted.
#[test]
fn genuine_connections_are_signed_and_admitted_in_both_families_and_when_retransmitted() {
    let tb = up(&spec(false, vec![]), &authenticated());
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    wait_keyed(&s, "frontend", "backend");
    for family in FAMILIES {
        let (b1, b2) = (s.status("node-1"), s.status("node-2"));
        let r = s.connect("frontend", s.addr("backend", family), PORT, 3000);
        assert!(ok(&r), "{family:?}: the genuine connection failed: {r}");
        let (a1, a2) = (s.status("node-1"), s.status("node-2"));
        grew_by(
            &a1,
            &b1,
            "pass_signed",
            1,
            &format!("{family:?}: node-1 did not sign the SYN"),
        );
        none_counted(
            &a1,
            &b1,
            &["pass_unsigned"],
            &format!("{family:?}: the SYN"),
        );
        grew_by(
            &a2,
            &b2,
            "pass_authenticated",
            1,
            &format!("{family:?}: node-2 did not admit the connection by its entry"),
        );
    }

    for family in FAMILIES {
        let target = s.addr("backend", family);
        let (b1, b2) = (s.status("node-1"), s.status("node-2"));
        nft(
            &tb,
            "node-1",
            &format!(
                "table inet pcmac {{\n chain pcmac_forward {{\n  type filter hook forward priority 0; policy accept;\n  tcp dport {PORT} tcp flags & (syn | ack) == syn counter drop\n }}\n}}\n"
            ),
        );
        let child = s
            .probe_cmd(
                "frontend",
                &[
                    "connect",
                    "--to",
                    &sock(target, PORT),
                    "--timeout-ms",
                    "6000",
                ],
            )
            .spawn()
            .expect("spawning probe connect");
        let signed_once = eventually(Duration::from_secs(3), || {
            delta(&s.status("node-1"), &b1, "pass_signed") >= 1
        });
        let dropped = nft_dropped(&tb, "node-1");
        nft(&tb, "node-1", "delete table inet pcmac\n");
        let r = last_json(&child.wait_with_output().expect("probe connect").stdout);
        assert!(
            signed_once,
            "{family:?}: node-1 never signed the first SYN: {}",
            s.status("node-1")["counters"]
        );
        assert!(
            dropped >= 1,
            "{family:?}: the rule dropped no SYN ({dropped})"
        );
        assert!(
            ok(&r),
            "{family:?}: the retransmitted SYN was not admitted: {r}"
        );
        assert!(
            r["connect_ms"].as_f64().is_some_and(|ms| ms >= 500.0),
            "{family:?}: the connection did not need a retransmission: {r}"
        );
        let (a1, a2) = (s.status("node-1"), s.status("node-2"));
        grew_by(
            &a1,
            &b1,
            "pass_signed",
            2,
            &format!("{family:?}: the retransmission was not signed again"),
        );
        grew_by(
            &a2,
            &b2,
            "pass_authenticated",
            1,
            &format!("{family:?}: node-2 did not admit the retransmission"),
        );
    }
    for node in ["node-1", "node-2"] {
        let st = s.status(node);
        for name in ["drop_no_mac", "drop_bad_mac"] {
            assert_eq!(
                counter(&st, name),
                0,
                "{node} refused a genuine SYN as {name}: {}",
                st["counters"]
            );
        }
    }
}

/// Reactive authentication with MACs: the first SYN of a cold pair leaves node-1 unsigned (no
/// entry yet) and is dropped by node-2 as `drop_no_auth`; the drop starts the handshake, and the
/// retransmission — same ISN, now signed with the keys of the proof — is admitted. No SYN of
/// the connection is refused for its MAC.
#[test]
fn a_cold_first_connection_is_admitted_on_its_signed_retransmission() {
    let tb = up(
        &spec(false, vec![]),
        &Options {
            proactive: Some(false),
            ..authenticated()
        },
    );
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    let (b1, b2) = (s.status("node-1"), s.status("node-2"));
    let r = s.connect("frontend", s.addr("backend", Family::V4), PORT, 6000);
    assert!(ok(&r), "the cold first connection failed: {r}");
    let (a1, a2) = (s.status("node-1"), s.status("node-2"));
    grew_by(
        &a2,
        &b2,
        "drop_no_auth",
        1,
        "the first SYN was not dropped as drop_no_auth (was the pair warm?)",
    );
    grew_by(
        &a1,
        &b1,
        "pass_signed",
        1,
        "the retransmission was not signed",
    );
    grew_by(
        &a2,
        &b2,
        "pass_authenticated",
        1,
        "node-2 did not admit the retransmission by its entry",
    );
    none_counted(
        &a2,
        &b2,
        &["drop_no_mac", "drop_bad_mac"],
        "a SYN of the cold connection",
    );
    assert!(
        key_out(&s, "node-1", "frontend", "backend").is_some(),
        "node-1's entry is not keyed: {}",
        s.status("node-1")["auth"]
    );
}

/// Short-lived connections, one every 10 ms, alternately IPv4 and IPv6, while the pair's
/// entries are proven again (10 s SVIDs): the fingerprint of node-1's signing key changes, and
/// not one connection fails or has a SYN refused, during the switch to the new keys or after.
#[test]
fn connections_opened_continuously_across_key_rotations_never_fail() {
    let tb = up(
        &spec(false, vec![]),
        &Options {
            svid_ttl_secs: Some(10),
            ..authenticated()
        },
    );
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    wait_keyed(&s, "frontend", "backend");
    let mut keys = vec![key_out(&s, "node-1", "frontend", "backend").expect("keyed entry")];
    let (b1, b2) = (s.status("node-1"), s.status("node-2"));
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut changed_at: Option<Instant> = None;
    let (mut attempted, mut failed, mut errors, mut slowest) = (0u64, 0u64, Vec::new(), 0f64);
    let mut round = 0usize;
    // Until 7 s after the first change: past the 5 s during which the old key still signs.
    while Instant::now() < deadline
        && !changed_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(7))
    {
        let family = FAMILIES[round % 2];
        round += 1;
        let mut child = s
            .probe_cmd(
                "frontend",
                &[
                    "cps",
                    "--to",
                    &sock(s.addr("backend", family), PORT),
                    "--seconds",
                    "2",
                    "--interval-ms",
                    "10",
                    "--keep-going",
                    "--timeout-ms",
                    "3000",
                ],
            )
            .spawn()
            .expect("spawning probe cps");
        loop {
            if let Some(k) = key_out(&s, "node-1", "frontend", "backend")
                && keys.last() != Some(&k)
            {
                keys.push(k);
                changed_at.get_or_insert_with(Instant::now);
            }
            if child.try_wait().expect("waiting for probe cps").is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        let r = last_json(&child.wait_with_output().expect("probe cps").stdout);
        let n = r["attempted"]
            .as_u64()
            .unwrap_or_else(|| panic!("probe cps: {r}"));
        attempted += n;
        failed += r["failed"].as_u64().unwrap_or(n);
        slowest = slowest.max(r["max_ms"].as_f64().unwrap_or(0.0));
        if !ok(&r) {
            errors.push(format!("{family:?}: {r}"));
        }
    }
    let (a1, a2) = (s.status("node-1"), s.status("node-2"));
    eprintln!(
        "{attempted} connections in {round} rounds, slowest {slowest} ms; key_out fingerprints {keys:?}"
    );
    assert!(
        keys.len() >= 2,
        "node-1's signing key never changed within 45 s of 10 s SVIDs: {keys:?}, {}",
        a1["auth"]
    );
    assert!(attempted >= 100, "only {attempted} connections attempted");
    assert_eq!(
        failed, 0,
        "{failed} of {attempted} connections failed across the key rotation: {errors:?}"
    );
    none_counted(
        &a2,
        &b2,
        &["drop_no_mac", "drop_bad_mac", "drop_no_auth"],
        "node-2, SYNs of the pair across the rotation",
    );
    grew_by(
        &a1,
        &b1,
        "pass_signed",
        attempted,
        &format!("node-1 did not sign a SYN for each of {attempted} connections"),
    );
    none_counted(&a1, &b1, &["pass_unsigned"], "node-1, SYNs of the pair");
}

/// SYNs carrying frontend's address, the pair (backend, frontend) authenticated and keyed, sent
/// by everything but frontend's own interface: node-3 (raw socket), node-1 itself outside the
/// pod (a socket bound to frontend's address with IP_FREEBIND: its SYN leaves through eth0,
/// never through the pod's interface, so it is never signed), and the fabric (a frame written
/// onto node-2's port). node-2 drops every one as `drop_no_mac` and admits none; the genuine
/// pair keeps connecting.
#[test]
fn forged_syns_with_an_authenticated_source_address_are_dropped_for_want_of_a_mac() {
    let tb = up(&spec(true, vec![]), &authenticated());
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    wait_keyed(&s, "frontend", "backend");
    let r = s.connect("frontend", s.addr("backend", Family::V4), PORT, 3000);
    assert!(ok(&r), "the genuine connection failed: {r}");
    for family in FAMILIES {
        let (frontend, backend) = (s.addr("frontend", family), s.addr("backend", family));

        forged_on_node3_count(
            &s,
            (frontend, backend),
            ("drop_no_mac", 10),
            &["pass_authenticated"],
            &format!("{family:?}"),
        );

        let before = s.status("node-2");
        let r = s.probe_node(
            "node-1",
            &[
                "connect",
                "--to",
                &sock(backend, PORT),
                "--from",
                &frontend.to_string(),
                "--freebind",
                "--timeout-ms",
                "1500",
            ],
        );
        assert!(
            !ok(&r) && r["kind"] == "timeout",
            "{family:?}: a connection from node-1's namespace with frontend's address was not dropped silently: {r}"
        );
        let after = grown(&s, "node-2", &before, "drop_no_mac", 1);
        let what = format!("{family:?}: the SYN from node-1 outside the pod");
        grew_by(
            &after,
            &before,
            "drop_no_mac",
            1,
            &format!("{what} was not dropped"),
        );
        none_counted(&after, &before, &["pass_authenticated"], &what);

        let before = s.status("node-2");
        let r = inject_on_fabric(&s, (frontend, 30000), backend, &["--count", "5"]);
        assert!(
            ok(&r) && r["sent"] == 5,
            "{family:?}: probe inject failed: {r}"
        );
        counted_exactly(
            &s,
            &before,
            ("drop_no_mac", 5),
            &["pass_authenticated"],
            &format!("{family:?}: 5 SYNs written on the fabric"),
        );
    }
    assert_reported(&s, "denied", "drop_no_mac", Duration::from_secs(3));
    assert_eq!(
        counter(&s.status("node-2"), "drop_bad_mac"),
        0,
        "a SYN without a MAC was counted as a bad MAC"
    );
    for family in FAMILIES {
        let before = s.status("node-2");
        let r = s.connect("frontend", s.addr("backend", family), PORT, 3000);
        assert!(
            ok(&r),
            "{family:?}: the genuine pair no longer connects after the forgeries: {r}"
        );
        grew_by(
            &s.status("node-2"),
            &before,
            "pass_authenticated",
            1,
            &format!("{family:?}: the genuine connection was not counted"),
        );
    }
}

/// An attacker on the fabric captures frontend's genuine, signed SYN to backend and writes
/// copies of it with the very same option bytes onto node-2's port: one from another source
/// port, one with another initial sequence number, one with a bit of the MAC flipped. Each is
/// dropped as `drop_bad_mac`; the genuine connection was admitted.
#[test]
fn a_mac_replayed_onto_another_connection_is_dropped() {
    let tb = up(&spec(false, vec![]), &authenticated());
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    wait_keyed(&s, "frontend", "backend");
    let node2_mac = node_mac(&tb, "node-2");
    for family in FAMILIES {
        let before = s.status("node-2");
        let v = replay(&s, family, "sport,seq,mac");
        let c = &v["captured"];
        eprintln!("{family:?}: captured {c}");
        assert_eq!(v["sent"], 3, "{family:?}: {v}");
        assert_eq!(
            c["tcp_header_len"].as_u64().map(|l| l % 4),
            Some(0),
            "{family:?}: {c}"
        );
        assert_eq!(c["dst_mac"], node2_mac.as_str(), "{family:?}: {c}");
        let stamp = c["time"]
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or_else(|| panic!("{family:?}: no time stamp in {c}"));
        assert!(
            mac::fresh(stamp, now_units()),
            "{family:?}: the genuine SYN's stamp {stamp} is not within the window of now ({})",
            now_units()
        );
        // The copies carry a MAC option: none is counted as drop_no_mac.
        let after = counted_exactly(
            &s,
            &before,
            ("drop_bad_mac", 3),
            &["drop_no_mac"],
            &format!("{family:?}: 3 replayed or altered SYNs"),
        );
        grew_by(
            &after,
            &before,
            "pass_authenticated",
            1,
            &format!("{family:?}: the genuine connection was not admitted by its entry"),
        );
    }
    assert_reported(&s, "denied", "drop_bad_mac", Duration::from_secs(3));
}

const AUDIT_POLICY: &str = "\
name: mac-policy
syn_mac: audit
namespaces:
  vault: { syn_mac: require }
";

const OFF_POLICY: &str = "\
name: mac-policy
syn_mac: off
namespaces:
  vault: { syn_mac: require }
";

/// `syn_mac` follows the destination pod's namespace. With `audit` for backend's namespace, SYNs
/// forged on node-3 with frontend's address and copies of a genuine MAC are admitted, counted
/// `pass_audit`, and reported as would-be drops naming `drop_no_mac` and `drop_bad_mac`, while
/// vault's namespace (`require`) still drops them. Switched to `off`, forged SYNs to backend are
/// admitted by the entry (`pass_authenticated`) with no audit count and no report.
#[test]
fn audit_mode_admits_and_reports_a_missing_or_bad_mac_and_off_admits_silently() {
    let tb = up(
        &spec(true, vec![PodSpec::new("vault").namespace("vault")]),
        &Options {
            policy: Some(AUDIT_POLICY.to_owned()),
            poll_interval_ms: Some(100),
            ..authenticated()
        },
    );
    let s = scenario(&tb);
    let _backend = s.serve("backend", PORT);
    let _vault = s.serve("vault", PORT);
    wait_keyed(&s, "frontend", "backend");
    wait_keyed(&s, "frontend", "vault");
    let frontend = s.addr("frontend", Family::V4);
    let (backend, vault) = (s.addr("backend", Family::V4), s.addr("vault", Family::V4));
    for to in [backend, vault] {
        let r = s.connect("frontend", to, PORT, 3000);
        assert!(ok(&r), "the genuine connection to {to} failed: {r}");
    }

    forged_on_node3_count(
        &s,
        (frontend, backend),
        ("pass_audit", 10),
        &["drop_no_mac"],
        "audit",
    );
    assert_reported(&s, "would_drop", "drop_no_mac", Duration::from_secs(5));
    assert!(
        eventually(Duration::from_secs(5), || tb
            .agent_log("node-2")
            .lines()
            .any(|l| l.contains("would_drop") && l.contains("drop_no_mac"))),
        "no would_drop audit record naming drop_no_mac in node-2's log"
    );

    // The destination's namespace decides: vault requires MACs.
    forged_on_node3_count(
        &s,
        (frontend, vault),
        ("drop_no_mac", 5),
        &["pass_audit"],
        "require (vault)",
    );

    // A bad MAC (copied onto another connection) in audit mode.
    thread::sleep(Duration::from_millis(300));
    let before = s.status("node-2");
    let v = replay(&s, Family::V4, "sport,seq");
    assert_eq!(v["sent"], 2, "{v}");
    counted_exactly(
        &s,
        &before,
        ("pass_audit", 2),
        &["drop_bad_mac"],
        "audit: 2 SYNs with a copied MAC",
    );
    assert_reported(&s, "would_drop", "drop_bad_mac", Duration::from_secs(5));

    tb.set_policy(OFF_POLICY).expect("switching syn_mac to off");
    // Until the agent applied it: a forged SYN is admitted by the entry rather than audited.
    let applied = eventually(Duration::from_secs(10), || {
        let before = s.status("node-2");
        flood_from_node3(&s, frontend, backend, 1);
        let mut admitted = false;
        eventually(Duration::from_secs(2), || {
            let after = s.status("node-2");
            admitted = delta(&after, &before, "pass_authenticated") >= 1;
            admitted || delta(&after, &before, "pass_audit") >= 1
        });
        admitted
    });
    assert!(
        applied,
        "syn_mac: off was not applied within 10 s: {}",
        s.status("node-2")["counters"]
    );
    thread::sleep(Duration::from_millis(300));
    let reports = events(&s, "node-2", "would_drop", "drop_no_mac", "frontend");
    forged_on_node3_count(
        &s,
        (frontend, backend),
        ("pass_authenticated", 10),
        &["pass_audit", "drop_no_mac", "drop_bad_mac"],
        "off",
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        events(&s, "node-2", "would_drop", "drop_no_mac", "frontend"),
        reports,
        "off reported a would-be drop: {}",
        s.status("node-2")["events"]
    );
    // vault still requires them.
    forged_on_node3_count(
        &s,
        (frontend, vault),
        ("drop_no_mac", 5),
        &[],
        "require (vault) after the edit",
    );
}

/// The MAC layout is checked against an implementation of its own: the test reads the pair's
/// keys from node-2's auth entry (as root on the host) and writes SYNs on the fabric carrying
/// options computed here. One with a fresh stamp under the verify key is admitted — nothing but
/// the key makes a SYN acceptable; one stamped two minutes early or late, or under the key of
/// the other direction, is dropped as `drop_bad_mac`.
#[test]
fn only_a_fresh_mac_under_the_pairs_key_for_that_direction_is_admitted() {
    let tb = up(&spec(false, vec![]), &authenticated());
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    wait_keyed(&s, "frontend", "backend");
    let keys = entry_keys(&tb, "node-2");
    let hex = |k: &[u8; 16]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
    for family in FAMILIES {
        let (frontend, backend) = (s.addr("frontend", family), s.addr("backend", family));
        let cases = [
            (
                hex(&keys.verify),
                0,
                "pass_authenticated",
                "a fresh MAC under the verify key",
            ),
            (
                hex(&keys.verify),
                -120,
                "drop_bad_mac",
                "a MAC stamped 2 min early",
            ),
            (
                hex(&keys.verify),
                120,
                "drop_bad_mac",
                "a MAC stamped 2 min late",
            ),
            (
                hex(&keys.sign),
                0,
                "drop_bad_mac",
                "a MAC under the other direction's key",
            ),
        ];
        for (i, (key, shift, counted, what)) in cases.iter().enumerate() {
            let before = s.status("node-2");
            let r = inject_on_fabric(
                &s,
                (frontend, 31000 + i as u16),
                backend,
                &["--mac-key", key, "--mac-shift-secs", &shift.to_string()],
            );
            assert!(ok(&r), "{family:?}: probe inject failed: {r}");
            let others: Vec<&str> = ["pass_authenticated", "drop_bad_mac", "drop_no_mac"]
                .into_iter()
                .filter(|c| c != counted)
                .collect();
            counted_exactly(
                &s,
                &before,
                (counted, 1),
                &others,
                &format!("{family:?}: {what}"),
            );
        }
    }
}

/// A SYN whose TCP header has no room left for the option (40 bytes of options already) leaves
/// node-1 unsigned, counted `pass_unsigned`, and node-2 drops it as `drop_no_mac`; one with 24
/// bytes of options is signed (a 60-byte header) and admitted. Both are raw frames the pod
/// writes on its own interface.
#[test]
fn a_syn_without_room_for_the_mac_leaves_unsigned_and_is_dropped_a_long_header_is_signed() {
    let tb = up(&spec(false, vec![]), &authenticated());
    let s = scenario(&tb);
    let _server = s.serve("backend", PORT);
    wait_keyed(&s, "frontend", "backend");
    let pod = tb.pod("frontend").clone();
    let gateway = link_mac(&tb.node(&pod.node).netns, &pod.host_veth);
    let nops = |n: usize| "01".repeat(n);
    for family in FAMILIES {
        let (frontend, backend) = (s.addr("frontend", family), s.addr("backend", family));
        for (i, (options, signed, counted)) in [
            (nops(40), "pass_unsigned", "drop_no_mac"),
            (nops(24), "pass_signed", "pass_authenticated"),
        ]
        .iter()
        .enumerate()
        {
            let (before1, before2) = (s.status("node-1"), s.status("node-2"));
            let r = s.probe(
                "frontend",
                &[
                    "inject",
                    "--iface",
                    "eth0",
                    "--dst-mac",
                    &gateway,
                    "--from",
                    &sock(frontend, 32000 + i as u16),
                    "--to",
                    &sock(backend, PORT),
                    "--option",
                    options,
                ],
            );
            assert!(ok(&r), "{family:?}: probe inject in the pod failed: {r}");
            let what = format!(
                "{family:?}: a SYN with {} bytes of options",
                options.len() / 2
            );
            let after1 = grown(&s, "node-1", &before1, signed, 1);
            grew_by(&after1, &before1, signed, 1, &what);
            counted_exactly(&s, &before2, (counted, 1), &["drop_bad_mac"], &what);
        }
    }
}

/// The keys of node's only keyed auth entry, read from its pinned map.
fn entry_keys(tb: &Testbed, node: &str) -> portcullis_common::EntryKeys {
    let values: Vec<portcullis_common::AuthValue> =
        bpftool_entries(&tb.node(node).bpffs_dir.join("maps/PC_AUTH"))
            .into_iter()
            .map(|(_, bytes)| {
                assert_eq!(
                    bytes.len(),
                    std::mem::size_of::<portcullis_common::AuthValue>()
                );
                // SAFETY: `AuthValue` is `repr(C)` plain data, every bit pattern valid, and
                // the bytes are exactly its size.
                unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
            })
            .filter(|v: &portcullis_common::AuthValue| v.flags & portcullis_common::AUTH_KEYED != 0)
            .collect();
    assert_eq!(values.len(), 1, "keyed entries of {node}: {values:?}");
    values[0].keys
}

/// An upgrade from the version before pair keys: node-2's agent is stopped while a transfer
/// runs, its auth map is swapped for one of that version's layout (88-byte values, the same
/// entries without keys), and the new agent started. It carries the entries over, so the
/// transfer's flow is not cut as unauthenticated; it proves them again, so the pair is keyed
/// once more and new connections are signed and verified.
#[test]
fn an_auth_map_of_the_layout_before_keys_is_carried_over_and_its_pairs_proven_again() {
    let mut tb = up(&spec(false, vec![]), &authenticated());
    let target = scenario(&tb).addr("backend", Family::V4);
    let _server = scenario(&tb).serve("backend", PORT);
    wait_keyed(&scenario(&tb), "frontend", "backend");
    let transfer = scenario(&tb).transfer("frontend", target, PORT, 2_000_000, 6, 5000);
    thread::sleep(Duration::from_millis(500));
    let before_key =
        key_out(&scenario(&tb), "node-2", "backend", "frontend").expect("node-2's entry is keyed");
    tb.kill_agent("node-2").expect("stopping node-2's agent");
    let pin = tb.node("node-2").bpffs_dir.join("maps/PC_AUTH");
    let entries = bpftool_entries(&pin);
    assert!(
        !entries.is_empty(),
        "node-2 has no auth entry to carry over"
    );
    std::fs::remove_file(&pin).expect("unpinning the auth map");
    let size = |n: usize| n.to_string();
    run_bpftool(&[
        "map",
        "create",
        pin.to_str().expect("a UTF-8 path"),
        "type",
        "hash",
        "key",
        &size(16),
        "value",
        &size(88),
        "entries",
        &size(1024),
        "name",
        "PC_AUTH",
    ]);
    for (k, v) in &entries {
        let mut args = vec![
            "map",
            "update",
            "pinned",
            pin.to_str().expect("a UTF-8 path"),
            "key",
        ];
        let (k, v): (Vec<String>, Vec<String>) = (
            k.iter().map(|b| format!("{b:02x}")).collect(),
            v[..88].iter().map(|b| format!("{b:02x}")).collect(),
        );
        args.push("hex");
        args.extend(k.iter().map(String::as_str));
        args.extend(["value", "hex"]);
        args.extend(v.iter().map(String::as_str));
        run_bpftool(&args);
    }
    tb.start_agent("node-2").expect("starting the new agent");
    let s = scenario(&tb);
    let carried = eventually(Duration::from_secs(10), || {
        key_out(&s, "node-2", "backend", "frontend").is_some_and(|k| k != before_key)
    });
    assert!(
        carried,
        "the carried-over entry was not proven again: {}",
        s.status("node-2")["auth"]
    );
    assert!(
        tb.agent_log("node-2").contains("carried_over=1")
            || tb.agent_log("node-2").contains("carried_over: 1"),
        "the agent did not say it carried the entry over:\n{}",
        tb.agent_log("node-2")
    );
    let r = transfer.finish();
    assert!(ok(&r), "the transfer was cut across the upgrade: {r}");
    let (before1, before2) = (s.status("node-1"), s.status("node-2"));
    let r = s.connect("frontend", target, PORT, 3000);
    assert!(ok(&r), "a new connection after the upgrade failed: {r}");
    grew_by(
        &s.status("node-1"),
        &before1,
        "pass_signed",
        1,
        "the new SYN was not signed",
    );
    let after2 = grown(&s, "node-2", &before2, "pass_authenticated", 1);
    grew_by(
        &after2,
        &before2,
        "pass_authenticated",
        1,
        "the new connection was not admitted",
    );
    none_counted(
        &after2,
        &before2,
        &["drop_no_mac", "drop_bad_mac"],
        "after the upgrade",
    );
}

fn run_bpftool(args: &[&str]) -> Vec<u8> {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The raw entries of a pinned hash map.
fn bpftool_entries(pin: &std::path::Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let out = run_bpftool(&[
        "-j",
        "map",
        "dump",
        "pinned",
        pin.to_str().expect("a UTF-8 path"),
    ]);
    let v: Value = serde_json::from_slice(&out).expect("bpftool -j output");
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .expect("bytes")
            .iter()
            .map(|b| {
                u8::from_str_radix(b.as_str().expect("a hex byte").trim_start_matches("0x"), 16)
                    .expect("a hex byte")
            })
            .collect()
    };
    v.as_array()
        .expect("a list of entries")
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect()
}
