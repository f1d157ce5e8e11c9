//! Node sessions under transport faults, end to end: forged TLS alerts and resets between two
//! agents (a TCP proxy this test runs in front of each agent's session listener), many pairs
//! over one session and a session's connection killed under a transfer (`ss -K`), and the pair
//! keys both sides derive. A TLS alert, a reset or a timeout is a transient failure: it is
//! retried, it revokes nothing and it never touches a running flow. Privileged: run as root,
//! one at a time (`cargo xtask test`). Without root these tests fail; they never skip.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    AGENT_PORT, NodeSpec, Options, PodSpec, Spec, Testbed, netns,
    scenario::{Family, Scenario, eventually, ok},
};

const PORT: u16 = 8080;
/// Where the proxy in front of a node's session listener listens (on the node's address);
/// cluster state sends peers there, and the agent listens on [`AGENT_PORT`] behind it.
const PROXY_PORT: u16 = 4182;
/// TLS alert descriptions.
const ACCESS_DENIED: u8 = 49;
const BAD_CERTIFICATE: u8 = 42;

fn root() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the session fault tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
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
        "session fault outcome: {}",
        json!({ "case": case, "outcome": outcome })
    );
}

/// A metric of node `node`'s agent, summed over the series of `name` whose labels contain
/// every one of `labels`.
fn metric(tb: &Testbed, node: &str, name: &str, labels: &[&str]) -> u64 {
    let text = tb.agent_http(node, "/metrics");
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{node}: /metrics did not answer: {text}"
    );
    text.lines()
        .filter(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && labels.iter().all(|x| l.contains(x))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// The auth entry (`local`, `remote`, `remote_node`) in a status, if there is one.
fn entry(st: &Value, local: &str, remote: &str, remote_node: &str) -> Option<Value> {
    list(&st["auth"])
        .into_iter()
        .find(|e| e["local"] == local && e["remote"] == remote && e["remote_node"] == remote_node)
}

/// The sessions a status shows with node `peer`.
fn sessions_with(st: &Value, peer: &str) -> Vec<Value> {
    list(&st["sessions"])
        .into_iter()
        .filter(|s| s["node"] == peer)
        .collect()
}

/// Handshake records of a status for which `f` holds.
fn records(st: &Value, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    list(&st["handshakes"]).into_iter().filter(f).collect()
}

/// Audit lines of node `node`'s log that revoked the entry of `a` and `b` (either way).
fn revocations(tb: &Testbed, node: &str, a: &str, b: &str) -> Vec<String> {
    tb.agent_log(node)
        .lines()
        .filter(|l| l.contains("auth entry revoked") && l.contains(a) && l.contains(b))
        .map(str::to_owned)
        .collect()
}

/// Reasons a failure of the transport may show: none of them is a decision about a pair.
/// `peer_rejected_certificate` and `version` are what a forged `bad_certificate` and
/// `access_denied` alert read as (rustls reports the alert it received).
const TRANSPORT_REASONS: &[&str] = &[
    "tls",
    "protocol",
    "timeout",
    "unreachable",
    "session_closed",
    "version",
    "peer_rejected_certificate",
];

// ---------------------------------------------------------------------------------------
// The proxy.

/// What the proxy does to one new connection instead of relaying it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Relays the ClientHello, then answers it with a forged plaintext fatal alert record
    /// (`15 03 03 00 02 02 <description>`) sent to both ends, and closes.
    Alert(u8),
    /// Relays the ClientHello, then resets both ends (SO_LINGER 0 and close) when the server's
    /// first flight arrives: a reset in the middle of the TLS handshake.
    ResetHandshake,
}

/// What the proxy did, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Did {
    /// A connection relayed (until it ended).
    Relayed,
    Fault(Fault),
    /// A relayed connection reset on demand ([`Proxy::reset_established`]).
    ResetEstablished,
}

struct Control {
    faults: Mutex<VecDeque<Fault>>,
    /// Bumped to reset every connection being relayed.
    generation: AtomicU64,
    stop: AtomicBool,
    log: Mutex<Vec<(Instant, Did)>>,
}

impl Control {
    fn did(&self, what: Did) {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((Instant::now(), what));
    }
}

/// A TCP proxy in a node's network namespace, from `listen` to `upstream`, that relays
/// connections byte for byte unless told to hurt the next ones. Stopped (and every connection
/// closed) on drop.
struct Proxy {
    name: String,
    ctl: Arc<Control>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(name: &str, netns_name: &str, listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let ns = netns::open(netns_name).unwrap_or_else(|e| panic!("{e:#}"));
        let ctl = Arc::new(Control {
            faults: Mutex::default(),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            log: Mutex::default(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let c = ctl.clone();
        // The thread enters the node's namespace for good; the sockets it makes, and those of
        // the threads it starts (they inherit its namespace), live there.
        let accept = thread::Builder::new()
            .name(format!("proxy-{name}"))
            .spawn(move || {
                let listener = netns::setns(&ns).and_then(|()| {
                    let l = TcpListener::bind(listen)?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                });
                let listener = match listener {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut conns: Vec<JoinHandle<()>> = Vec::new();
                while !c.stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let c = c.clone();
                            conns.push(thread::spawn(move || handle(&c, client, upstream)));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                    conns.retain(|h| !h.is_finished());
                }
                for h in conns {
                    let _ = h.join();
                }
            })
            .expect("spawning the proxy");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the proxy thread did not report")
            .unwrap_or_else(|e| panic!("proxy {name} on {listen} in {netns_name}: {e}"));
        Proxy {
            name: name.to_owned(),
            ctl,
            accept: Some(accept),
        }
    }

    /// The next new connections get these faults, one each, in order.
    fn inject(&self, faults: &[Fault]) {
        self.ctl
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(faults);
    }

    /// Faults not yet used.
    fn pending(&self) -> usize {
        self.ctl
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    fn clear(&self) {
        self.ctl
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Resets every connection being relayed now.
    fn reset_established(&self) {
        self.ctl.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn log(&self) -> Vec<(Instant, Did)> {
        self.ctl
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn count(&self, what: &Did) -> usize {
        self.log().iter().filter(|(_, d)| d == what).count()
    }

    fn summary(&self) -> Value {
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for (_, d) in self.log() {
            *by.entry(format!("{d:?}")).or_default() += 1;
        }
        json!({ "proxy": self.name, "did": by, "faults_left": self.pending() })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Closes `s` with a reset: SO_LINGER 0, then close.
fn rst(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// One read of whatever arrives within `limit`.
fn read_some(s: &TcpStream, limit: Duration) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(limit))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = (&*s).read(&mut buf)?;
    if n == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    buf.truncate(n);
    s.set_read_timeout(None)?;
    Ok(buf)
}

fn handle(ctl: &Control, client: TcpStream, upstream: SocketAddr) {
    let generation = ctl.generation.load(Ordering::SeqCst);
    let fault = ctl
        .faults
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop_front();
    let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
        rst(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let Some(fault) = fault else {
        relay(ctl, client, up, generation);
        return;
    };
    ctl.did(Did::Fault(fault));
    let limit = Duration::from_secs(3);
    // The ClientHello goes through, so that the server is mid-handshake too.
    let hello = read_some(&client, limit).and_then(|h| (&up).write_all(&h));
    if hello.is_err() {
        rst(client);
        rst(up);
        return;
    }
    // The server's first flight (ServerHello…) is not relayed.
    let _ = read_some(&up, limit);
    match fault {
        Fault::Alert(description) => {
            let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description];
            let _ = (&client).write_all(&alert);
            let _ = (&up).write_all(&alert);
            let _ = client.shutdown(Shutdown::Write);
            // Let the client read it and close first (a close with unread data is a reset).
            let mut sink = [0u8; 4096];
            let _ = client.set_read_timeout(Some(Duration::from_secs(1)));
            while matches!((&client).read(&mut sink), Ok(n) if n > 0) {}
            drop(client);
            rst(up);
        }
        Fault::ResetHandshake => {
            rst(client);
            rst(up);
        }
    }
}

/// Relays both ways until both ends are done, an error (passed on as a reset), a stop, or
/// [`Proxy::reset_established`].
fn relay(ctl: &Control, client: TcpStream, up: TcpStream, generation: u64) {
    let mut socks = [&client, &up];
    let mut open = [true, true];
    let mut buf = vec![0u8; 64 * 1024];
    let reset = loop {
        if ctl.stop.load(Ordering::Relaxed) {
            break true;
        }
        if ctl.generation.load(Ordering::SeqCst) != generation {
            ctl.did(Did::ResetEstablished);
            break true;
        }
        if !open[0] && !open[1] {
            break false;
        }
        let mut fds: Vec<libc::pollfd> = socks
            .iter()
            .zip(open)
            .map(|(s, o)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: if o { libc::POLLIN } else { 0 },
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            break true;
        }
        let mut failed = false;
        for i in 0..2 {
            if !open[i] || fds[i].revents == 0 {
                continue;
            }
            match socks[i].read(&mut buf) {
                Ok(0) => {
                    open[i] = false;
                    let _ = socks[1 - i].shutdown(Shutdown::Write);
                }
                Ok(k) => {
                    if socks[1 - i].write_all(&buf[..k]).is_err() {
                        failed = true;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => failed = true,
            }
        }
        if failed {
            break true;
        }
    };
    if reset {
        rst(client);
        rst(up);
    } else {
        ctl.did(Did::Relayed);
    }
}

/// Puts a proxy in front of every node's session listener: each agent listens on
/// [`AGENT_PORT`] (`handshake.port`) and cluster state gives peers the proxy's port. The agents
/// restart to bind there, with proactive authentication on.
fn behind_proxies(tb: &mut Testbed) -> BTreeMap<String, Proxy> {
    let nodes: Vec<_> = tb.info().nodes.clone();
    let mut proxies = BTreeMap::new();
    for n in &nodes {
        let ip = n.ipv4.into();
        proxies.insert(
            n.name.clone(),
            Proxy::start(
                &n.name,
                &n.netns,
                SocketAddr::new(ip, PROXY_PORT),
                SocketAddr::new(ip, AGENT_PORT),
            ),
        );
    }
    for n in &nodes {
        tb.stop_agent(&n.name).expect("stopping an agent");
        tb.write_agent_config(&n.name, |c| {
            let mut handshake = serde_yaml::Mapping::new();
            handshake.insert("port".into(), u64::from(AGENT_PORT).into());
            handshake.insert("proactive".into(), true.into());
            c.extra
                .insert("handshake".into(), serde_yaml::Value::Mapping(handshake));
        })
        .expect("the agent's handshake port");
    }
    tb.write_cluster(|c| {
        for n in &mut c.nodes {
            n.address.set_port(PROXY_PORT);
        }
    })
    .expect("cluster state: the proxies' ports");
    for n in &nodes {
        tb.start_agent(&n.name).expect("restarting an agent");
    }
    proxies
}

// ---------------------------------------------------------------------------------------

/// Forged TLS alerts (access_denied, bad_certificate) and resets (of an established session,
/// and in the middle of a session's TLS handshake) between the agents of node-1 and node-2,
/// while a long transfer of an authenticated pair runs and its entries are re-proven (a trust
/// bundle change): the set-ups fail with transport reasons and are retried, the proofs of the
/// pair fail and are retried, nothing is revoked, the transfer goes on undisturbed, and once
/// the proxies behave a session is set up again and a new pair authenticates over it.
#[test]
fn forged_alerts_and_resets_are_retried_and_revoke_nothing() {
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    // Nothing is authenticated before the proxies are in place.
    let mut tb = up(
        &spec,
        &Options {
            authenticate: true,
            proactive: Some(false),
            ..Options::default()
        },
    );
    // Declared after the testbed: dropped (stopped) before it.
    let proxies = behind_proxies(&mut tb);
    let s = scenario(&tb);
    let (client, server) = (s.identity("client"), s.identity("server"));
    // node-1's sessions to node-2 go through the proxy in node-2's namespace, and back.
    let to_node2 = &proxies["node-2"];
    let to_node1 = &proxies["node-1"];
    let proxy2 = format!("{}:{PROXY_PORT}", tb.node("node-2").ipv4);
    let authenticated = eventually(Duration::from_secs(15), || {
        entry(&s.status("node-1"), &client, &server, "node-2").is_some()
            && entry(&s.status("node-2"), &server, &client, "node-1").is_some()
    });
    assert!(
        authenticated,
        "the pair was not authenticated through the proxies: {} / {}\n{}",
        s.status("node-1")["handshakes"],
        s.status("node-2")["handshakes"],
        to_node2.summary()
    );
    let st1 = s.status("node-1");
    let via = sessions_with(&st1, "node-2");
    assert!(
        via.iter()
            .any(|x| x["direction"] == "opened" && x["peer"] == proxy2.as_str()),
        "node-1's session to node-2 does not go through the proxy at {proxy2}: {via:?}"
    );
    let keys_before = entry(&st1, &client, &server, "node-2").expect("node-1's entry");

    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    let seconds = 30;
    let transfer_started = Instant::now();
    let transfer = s.transfer("client", target, PORT, 30_000_000, seconds, 2000);
    assert!(
        eventually(Duration::from_secs(3), || !list(
            &s.status("node-2")["flows"]
        )
        .is_empty()),
        "the transfer's flow is not tracked"
    );
    // Set-ups either way: node-1 may end up using the session node-2 opened.
    let established = || {
        metric(
            &tb,
            "node-1",
            "portcullis_session_establishments_total",
            &["result=\"ok\""],
        )
    };
    let established_before = established();
    let failed_before = metric(
        &tb,
        "node-1",
        "portcullis_session_establishments_total",
        &["role=\"initiator\"", "result=\"failed\""],
    );

    // The next set-ups either way meet these, one each; then the established sessions are
    // reset, and every entry is re-proven (a CA added to the bundle: trust is unchanged).
    let faults = [
        Fault::Alert(ACCESS_DENIED),
        Fault::ResetHandshake,
        Fault::Alert(BAD_CERTIFICATE),
        Fault::ResetHandshake,
    ];
    to_node2.inject(&faults);
    to_node1.inject(&faults);
    let faults_at = Instant::now();
    to_node2.reset_established();
    to_node1.reset_established();
    let extra_ca = tb.state_dir().join("extra-ca");
    tb.make_ca(&extra_ca).expect("making a second CA");
    let bundle = std::fs::read_to_string(tb.bundle_path()).expect("reading the bundle");
    let extra = std::fs::read_to_string(extra_ca.join("ca.pem")).expect("reading the extra CA");
    std::fs::write(tb.bundle_path(), format!("{bundle}{extra}")).expect("writing the bundle");
    // node-1 opens sessions to node-2 again (it lost its own, and it re-proves its entry):
    // every fault queued for it is used.
    let drained = eventually(Duration::from_secs(25), || to_node2.pending() == 0);
    let drained_after = faults_at.elapsed();
    assert!(
        drained,
        "node-1 did not try to set up sessions again within 25 s: {}",
        to_node2.summary()
    );
    // Whatever node-2 did not use is dropped: from now on the proxies behave.
    to_node1.clear();
    let recovered = eventually(Duration::from_secs(40), || {
        !sessions_with(&s.status("node-1"), "node-2").is_empty()
            && established() > established_before
    });
    let recovered_after = faults_at.elapsed();
    let established_delta = established() - established_before;
    let st1 = s.status("node-1");
    let st2 = s.status("node-2");
    assert!(
        recovered,
        "node-1 did not set up a session to node-2 again: {}\n{}",
        st1["handshakes"],
        to_node2.summary()
    );
    assert!(
        to_node2.count(&Did::ResetEstablished) >= 1,
        "node-1's session through the proxy was not reset: {}",
        to_node2.summary()
    );
    for f in faults {
        assert!(
            to_node2.count(&Did::Fault(f)) >= 1,
            "{f:?} was not used: {}",
            to_node2.summary()
        );
    }

    // The set-ups failed for transport reasons, each fault visible as such.
    let session_failures = |st: &Value| {
        records(st, |h| {
            h["stage"] == "session" && h["result"] == "failed" && h["role"] == "initiator"
        })
    };
    let failed1 = session_failures(&st1);
    let reasons1: Vec<&str> = failed1
        .iter()
        .filter_map(|h| h["reason"].as_str())
        .collect();
    assert!(
        failed1.len() >= faults.len(),
        "node-1 recorded {} failed set-ups for the {} faults it met: {failed1:?}",
        failed1.len(),
        faults.len()
    );
    for h in failed1.iter().chain(session_failures(&st2).iter()) {
        assert!(
            h["reason"]
                .as_str()
                .is_some_and(|r| TRANSPORT_REASONS.contains(&r)),
            "a session set-up failed for a reason other than the transport: {h}"
        );
    }
    for expected in ["version", "peer_rejected_certificate", "tls"] {
        assert!(
            reasons1.contains(&expected),
            "no failed set-up with reason {expected} on node-1: {failed1:?}"
        );
    }
    let failed_metric = metric(
        &tb,
        "node-1",
        "portcullis_session_establishments_total",
        &["role=\"initiator\"", "result=\"failed\""],
    ) - failed_before;
    assert!(
        failed_metric >= faults.len() as u64,
        "portcullis_session_establishments_total{{result=\"failed\"}} grew by {failed_metric}"
    );
    // The pair's proofs failed and were retried; none revoked anything.
    let pair_proofs = records(&st1, |h| {
        h["stage"] == "proof"
            && h["role"] == "initiator"
            && h["local"] == client.as_str()
            && h["remote"] == server.as_str()
    });
    let proofs_failed: Vec<&Value> = pair_proofs
        .iter()
        .filter(|h| h["result"] == "failed")
        .collect();
    assert!(
        proofs_failed.len() >= 2,
        "the pair's re-proof was not retried over the failing set-ups: {pair_proofs:?}"
    );
    for h in &proofs_failed {
        assert!(
            h["reason"]
                .as_str()
                .is_some_and(|r| TRANSPORT_REASONS.contains(&r)),
            "a proof failed for a reason other than the transport: {h}"
        );
    }
    assert!(
        entry(&st1, &client, &server, "node-2").is_some(),
        "node-1 lost the pair's entry: {}",
        st1["auth"]
    );
    assert!(
        entry(&st2, &server, &client, "node-1").is_some(),
        "node-2 lost the pair's entry: {}",
        st2["auth"]
    );
    for node in ["node-1", "node-2"] {
        let revoked = revocations(&tb, node, &client, &server);
        assert!(revoked.is_empty(), "{node} revoked the pair: {revoked:?}");
    }

    // The re-proof the bundle change asked for gets through once the transport is back: the
    // entry's keys are new on both sides, and the same.
    let reproven = eventually(Duration::from_secs(15), || {
        let (a, b) = (s.status("node-1"), s.status("node-2"));
        match (
            entry(&a, &client, &server, "node-2"),
            entry(&b, &server, &client, "node-1"),
        ) {
            (Some(a), Some(b)) => {
                a["key_out"] != keys_before["key_out"]
                    && a["key_out"].is_string()
                    && a["key_out"] == b["key_in"]
                    && a["key_in"] == b["key_out"]
            }
            _ => false,
        }
    });
    assert!(
        reproven,
        "the pair was not re-proven after the faults: {}\n{}",
        s.status("node-1")["handshakes"],
        s.status("node-2")["auth"]
    );

    // A new pair authenticates over a new session.
    tb.add_pod("node-1", PodSpec::new("late"))
        .expect("adding a pod");
    let s = scenario(&tb);
    let late = s.identity("late");
    let late_ok = eventually(Duration::from_secs(15), || {
        entry(&s.status("node-1"), &late, &server, "node-2").is_some()
            && entry(&s.status("node-2"), &server, &late, "node-1").is_some()
    });
    assert!(
        late_ok,
        "a new pair did not authenticate after the faults: {}",
        s.status("node-1")["handshakes"]
    );
    assert!(
        ok(&s.connect("late", target, PORT, 2000)),
        "the new pair does not connect"
    );
    let transfer_running = transfer_started.elapsed() < Duration::from_secs(seconds.into());
    let result = transfer.finish();
    let transfer_secs = transfer_started.elapsed().as_secs_f64();
    let st1 = s.status("node-1");
    let outcome = json!({
        "faults_used_after_s": drained_after.as_secs_f64(),
        "session_back_after_s": recovered_after.as_secs_f64(),
        "node1_failed_setups": reasons1,
        "node1_failed_setups_metric": failed_metric,
        "node1_failed_accepts": records(&st1, |h| h["stage"] == "session" && h["role"] == "responder" && h["result"] == "failed").iter().map(|h| json!([h["reason"], h["detail"]])).collect::<Vec<_>>(),
        "node2_failed_setups": session_failures(&st2).iter().map(|h| h["reason"].clone()).collect::<Vec<_>>(),
        "pair_proofs": pair_proofs.iter().map(|h| json!([h["result"], h["reason"], h["took_ms"]])).collect::<Vec<_>>(),
        "sessions_established_during": established_delta,
        "sessions": [st1["sessions"].clone(), st2["sessions"].clone()],
        "proxies": [to_node2.summary(), to_node1.summary()],
        "transfer": result,
        "transfer_secs": transfer_secs,
        "entry_before": keys_before,
        "entry_after": entry(&st1, &client, &server, "node-2"),
    });
    report("forged_alerts_and_resets", &outcome);
    assert!(
        transfer_running,
        "the faults and the recovery outlasted the transfer (the test's timing): {outcome}"
    );
    assert!(
        ok(&result),
        "the transfer was reset or stalled past its 2 s I/O bound: {outcome}"
    );
    assert!(
        result["elapsed_ms"]
            .as_f64()
            .is_some_and(|ms| ms < f64::from(seconds) * 1000.0 + 3000.0),
        "the transfer stalled: {outcome}"
    );
    for node in ["node-1", "node-2"] {
        let revoked = revocations(&tb, node, &client, &server);
        assert!(revoked.is_empty(), "{node} revoked the pair: {revoked:?}");
    }
}

/// The pairs (a on node-1, b on node-2) of `clients` × `servers` that lack an entry on either
/// side.
fn missing_pairs(s: &Scenario<'_>, clients: &[String], servers: &[String]) -> Vec<String> {
    let (st1, st2) = (s.status("node-1"), s.status("node-2"));
    let mut missing = Vec::new();
    for c in clients {
        for v in servers {
            let (ci, vi) = (s.identity(c), s.identity(v));
            if entry(&st1, &ci, &vi, "node-2").is_none() {
                missing.push(format!("node-1: {c} → {v}"));
            }
            if entry(&st2, &vi, &ci, "node-1").is_none() {
                missing.push(format!("node-2: {v} → {c}"));
            }
        }
    }
    missing
}

/// Successful session set-ups of node `node`'s agent in `role` (initiator: opened,
/// responder: accepted).
fn setups(tb: &Testbed, node: &str, role: &str) -> u64 {
    metric(
        tb,
        node,
        "portcullis_session_establishments_total",
        &[&format!("role=\"{role}\""), "result=\"ok\""],
    )
}

fn total_setups(tb: &Testbed, node: &str) -> u64 {
    setups(tb, node, "initiator") + setups(tb, node, "responder")
}

/// Successful proofs of node `node`'s agent in `role`.
fn proofs(tb: &Testbed, node: &str, role: &str) -> u64 {
    metric(
        tb,
        node,
        "portcullis_proofs_total",
        &[&format!("role=\"{role}\""), "result=\"ok\""],
    )
}

/// Counts sessions by direction.
fn directions(sessions: &[Value]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for x in sessions {
        *by.entry(x["direction"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    by
}

/// Four pods on each of two nodes, proactive authentication: all 16 pairs are proven over one
/// node session (not one connection per pair). Killing that session's TCP connection (`ss -K`)
/// under a transfer leaves the entries and the transfer alone; node-1 sets the session up
/// again within a few seconds, and new pairs are proven over it.
#[test]
fn one_session_carries_many_pairs_and_survives_a_killed_connection() {
    const N: usize = 4;
    let clients: Vec<String> = (1..=N).map(|i| format!("c{i}")).collect();
    let servers: Vec<String> = (1..=N).map(|i| format!("s{i}")).collect();
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", clients.iter().map(PodSpec::new).collect()),
            NodeSpec::new("node-2", servers.iter().map(PodSpec::new).collect()),
        ],
    };
    let mut tb = up(
        &spec,
        &Options {
            authenticate: true,
            ..Options::default()
        },
    );
    let s = scenario(&tb);
    let started = Instant::now();
    let all = eventually(Duration::from_secs(30), || {
        missing_pairs(&s, &clients, &servers).is_empty()
    });
    let all_after = started.elapsed();
    assert!(
        all,
        "not every pair was authenticated: {:?}\n{}",
        missing_pairs(&s, &clients, &servers),
        s.status("node-1")["handshakes"]
    );
    let (st1, st2) = (s.status("node-1"), s.status("node-2"));
    let (with2, with1) = (sessions_with(&st1, "node-2"), sessions_with(&st2, "node-1"));
    // node-1 proves every cross pair (the lower node initiates): one record each, all over
    // the same session peer.
    let cross_proofs: Vec<Value> = records(&st1, |h| {
        h["stage"] == "proof"
            && h["role"] == "initiator"
            && h["result"] == "ok"
            && h["remote_node"] == "node-2"
    });
    let peers: std::collections::BTreeSet<String> = cross_proofs
        .iter()
        .map(|h| h["peer"].as_str().unwrap_or("?").to_owned())
        .collect();
    let counts = json!({
        "pairs": N * N,
        "authenticated_after_s": all_after.as_secs_f64(),
        "node1_sessions_with_node2": with2,
        "node2_sessions_with_node1": with1,
        "node1_sessions_all": st1["sessions"],
        "node1_setups_opened": setups(&tb, "node-1", "initiator"),
        "node1_setups_accepted": setups(&tb, "node-1", "responder"),
        "node2_setups_opened": setups(&tb, "node-2", "initiator"),
        "node2_setups_accepted": setups(&tb, "node-2", "responder"),
        "node1_proofs_initiated_ok": proofs(&tb, "node-1", "initiator"),
        "node2_proofs_answered_ok": proofs(&tb, "node-2", "responder"),
        "node1_cross_proof_records": cross_proofs.len(),
        "cross_proof_peers": peers,
        "node1_sessions_gauge": metric(&tb, "node-1", "portcullis_sessions", &[]),
    });
    report("many_pairs_one_session", &counts);
    assert!(
        !with2.is_empty() && !with1.is_empty(),
        "no session between node-1 and node-2: {counts}"
    );
    for (node, sessions) in [("node-1", &with2), ("node-2", &with1)] {
        assert!(
            directions(sessions).values().all(|n| *n <= 1),
            "{node} holds more than one session per direction with its peer: {counts}"
        );
    }
    assert_eq!(
        cross_proofs.len(),
        N * N,
        "node-1 did not prove each cross pair exactly once: {counts}"
    );
    let cross_setups = records(&st1, |h| {
        h["stage"] == "session"
            && h["role"] == "initiator"
            && h["result"] == "ok"
            && h["remote_node"] == "node-2"
    });
    assert_eq!(
        cross_setups.len(),
        1,
        "node-1 set up more than one session with node-2 for {} pairs: {cross_setups:?}\n{counts}",
        N * N
    );
    assert_eq!(
        peers.len(),
        1,
        "the cross pairs were proven over more than one peer address: {counts}"
    );
    // One set-up per peer node (a session to its own node included, for the pairs of local
    // pods), not one per pair.
    for node in ["node-1", "node-2"] {
        let n = setups(&tb, node, "initiator") + setups(&tb, node, "responder");
        assert!(
            n <= 4,
            "{node} set up {n} sessions for {} pairs: {counts}",
            N * N
        );
    }
    assert!(
        proofs(&tb, "node-1", "initiator") >= (N * N) as u64
            && proofs(&tb, "node-2", "responder") >= (N * N) as u64,
        "the proofs of every pair are not counted: {counts}"
    );

    // Kill the session's connection under a transfer.
    let _server = s.serve("s1", PORT);
    let target = s.addr("s1", Family::V4);
    let seconds = 12;
    let transfer = s.transfer("c1", target, PORT, 12_000_000, seconds, 2000);
    thread::sleep(Duration::from_secs(1));
    let keys = |st: &Value| -> BTreeMap<String, Value> {
        list(&st["auth"])
            .into_iter()
            .filter(|e| e["remote_node"] == "node-2")
            .map(|e| {
                (
                    format!("{} → {}", e["local"], e["remote"]),
                    json!([e["key_out"], e["key_in"]]),
                )
            })
            .collect()
    };
    let keys_before = keys(&s.status("node-1"));
    let (setups1, setups2) = (total_setups(&tb, "node-1"), total_setups(&tb, "node-2"));
    let node2 = tb.node("node-2").ipv4.to_string();
    let out = tb
        .exec_node(
            "node-1",
            &["ss", "-K", "-tn", "state", "established", "dst", &node2],
        )
        .output()
        .expect("running ss -K");
    let killed_at = Instant::now();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ss -K failed (does the kernel have CONFIG_INET_DIAG_DESTROY?): {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let killed = text
        .lines()
        .filter(|l| l.contains(&format!("{node2}:")))
        .count();
    assert!(
        killed >= 1,
        "ss -K found no connection between node-1 and node-2 to kill: {text}"
    );
    let back = eventually(Duration::from_secs(10), || {
        total_setups(&tb, "node-1") > setups1
            && !sessions_with(&s.status("node-1"), "node-2").is_empty()
            && !sessions_with(&s.status("node-2"), "node-1").is_empty()
    });
    let back_after = killed_at.elapsed();
    assert!(
        back,
        "the session was not set up again within 10 s of the kill: {}\n{}",
        s.status("node-1")["sessions"],
        s.status("node-1")["handshakes"]
    );
    let st1 = s.status("node-1");
    let keys_after = keys(&st1);
    let setups_after = (total_setups(&tb, "node-1"), total_setups(&tb, "node-2"));

    // New pairs are proven over the new session, without another set-up.
    tb.add_pod("node-1", PodSpec::new("c5"))
        .expect("adding a pod");
    let s = scenario(&tb);
    let late = ["c5".to_owned()];
    let new_ok = eventually(Duration::from_secs(15), || {
        missing_pairs(&s, &late, &servers).is_empty()
    });
    let st1 = s.status("node-1");
    let c5 = s.identity("c5");
    let c5_proofs: Vec<Value> = records(&st1, |h| {
        h["stage"] == "proof"
            && h["role"] == "initiator"
            && h["local"] == c5.as_str()
            && h["remote_node"] == "node-2"
    });
    let setups_final = (total_setups(&tb, "node-1"), total_setups(&tb, "node-2"));
    let result = transfer.finish();
    let outcome = json!({
        "killed_connections": killed,
        "ss_output": text,
        "session_back_after_s": back_after.as_secs_f64(),
        "setups_before_kill": [setups1, setups2],
        "setups_after_reconnect": setups_after,
        "setups_after_new_pairs": setups_final,
        "sessions_after": [st1["sessions"].clone(), s.status("node-2")["sessions"].clone()],
        "c5_proofs": c5_proofs.iter().map(|h| json!([h["result"], h["reason"], h["peer"]])).collect::<Vec<_>>(),
        "transfer": result,
    });
    report("killed_session_connection", &outcome);
    assert_eq!(
        keys_after, keys_before,
        "entries were touched by the session loss: {outcome}"
    );
    assert!(
        new_ok,
        "the new pod's pairs were not authenticated over the new session: {:?}\n{outcome}",
        missing_pairs(&s, &late, &servers)
    );
    // Each new pair proven once, over the session; node-2 may refuse a first attempt before
    // it has read the new pod from cluster state (`unknown_initiator`), then the retry passes.
    let c5_ok: std::collections::BTreeSet<String> = c5_proofs
        .iter()
        .filter(|h| h["result"] == "ok")
        .map(|h| h["remote"].to_string())
        .collect();
    assert!(
        c5_ok.len() == N
            && c5_proofs
                .iter()
                .all(|h| h["result"] == "ok" || h["reason"] == "unknown_initiator"),
        "the new pairs' proofs: {outcome}"
    );
    assert_eq!(
        setups_final, setups_after,
        "new pairs set up sessions of their own instead of using the one re-established: {outcome}"
    );
    assert!(
        ok(&result),
        "the transfer was reset or stalled by the session loss: {outcome}"
    );
    assert!(
        ok(&s.connect("c5", target, PORT, 2000)),
        "the new pair does not connect"
    );
}

/// The entry's pair keys of (`local` on node-1, `remote` on node-2) on both sides, read
/// node-1, node-2, node-1: `None` unless both have an entry with keys and node-1's did not
/// change meanwhile.
fn key_snapshot(s: &Scenario<'_>, local: &str, remote: &str) -> Option<[String; 4]> {
    let keys = |e: &Value| -> Option<(String, String)> {
        Some((
            e["key_out"].as_str()?.to_owned(),
            e["key_in"].as_str()?.to_owned(),
        ))
    };
    let a = keys(&entry(&s.status("node-1"), local, remote, "node-2")?)?;
    let b = keys(&entry(&s.status("node-2"), remote, local, "node-1")?)?;
    let again = keys(&entry(&s.status("node-1"), local, remote, "node-2")?)?;
    (a == again).then_some([a.0, a.1, b.0, b.1])
}

fn matching(k: &[String; 4]) -> bool {
    let [a_out, a_in, b_out, b_in] = k;
    a_out == b_in && a_in == b_out && a_out != a_in
}

/// After a pair authenticates, node-1's entry's outbound key is node-2's inbound key for the
/// reverse entry and the other way round, and the two directions differ. SVIDs of 10 s are
/// renewed every 5 s, and each renewal re-proves the pair: its keys change on both sides, and
/// still match. A mismatch is allowed only for the moment between the responder's write and
/// the initiator's.
#[test]
fn both_sides_derive_the_same_pair_keys_and_a_renewal_rotates_them() {
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    let tb = up(
        &spec,
        &Options {
            authenticate: true,
            svid_ttl_secs: Some(10),
            ..Options::default()
        },
    );
    let s = scenario(&tb);
    let (client, server) = (s.identity("client"), s.identity("server"));
    let mut first = None;
    let got = eventually(Duration::from_secs(15), || {
        first = key_snapshot(&s, &client, &server);
        first.is_some()
    });
    assert!(
        got,
        "the pair has no entry with keys on both sides: {} / {}",
        s.status("node-1")["auth"],
        s.status("node-2")["auth"]
    );
    let first = first.expect("a snapshot");
    assert!(
        matching(&first),
        "the two sides' keys do not match: node-1 (out, in) = ({}, {}), node-2 (out, in) = ({}, {})",
        first[0],
        first[1],
        first[2],
        first[3]
    );
    // Watch the keys across renewals: every state seen, when first and last.
    let watch_for = Duration::from_secs(16);
    let start = Instant::now();
    let mut states: Vec<([String; 4], Duration, Duration)> = Vec::new();
    while start.elapsed() < watch_for {
        if let Some(k) = key_snapshot(&s, &client, &server) {
            let now = start.elapsed();
            match states.last_mut() {
                Some((last, _, seen)) if *last == k => *seen = now,
                _ => states.push((k, now, now)),
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    let generations: std::collections::BTreeSet<&String> =
        states.iter().map(|(k, _, _)| &k[0]).collect();
    let mismatches: Vec<&([String; 4], Duration, Duration)> =
        states.iter().filter(|(k, _, _)| !matching(k)).collect();
    let outcome = json!({
        "first": first,
        "states": states.iter().map(|(k, a, b)| json!({
            "keys": k, "matching": matching(k), "from_s": a.as_secs_f64(), "to_s": b.as_secs_f64(),
        })).collect::<Vec<_>>(),
        "node1_key_generations": generations.len(),
        "node1_proofs": records(&s.status("node-1"), |h| h["stage"] == "proof").iter().map(|h| json!([h["role"], h["result"], h["reason"]])).collect::<Vec<_>>(),
        "node1_session_setups_ok": metric(&tb, "node-1", "portcullis_session_establishments_total", &["result=\"ok\""]),
    });
    report("pair_keys", &outcome);
    assert!(
        generations.len() >= 3,
        "the keys were not renewed twice in {watch_for:?} with 10 s SVIDs: {outcome}"
    );
    assert!(
        states
            .iter()
            .any(|(k, _, _)| matching(k) && k[0] != first[0] && k[2] != first[2]),
        "no renewal with new, matching keys on both sides: {outcome}"
    );
    // A mismatch seen twice 1 s apart is no passing moment: the two sides use different keys.
    assert!(
        mismatches
            .iter()
            .all(|(_, from, to)| to.saturating_sub(*from) < Duration::from_secs(1)),
        "the sides kept different keys for the pair: {outcome}"
    );
    for (k, _, _) in &states {
        assert!(
            k[0] != k[1] && k[2] != k[3],
            "an entry uses the same key both ways: {outcome}"
        );
    }
}
