//! What operators see: `status`, the admin socket's access control, Prometheus metrics, the
//! JSON audit trail, and `doctor`. Privileged: run as root, one at a time (`cargo xtask
//! test`). Without root these tests fail.

use std::{
    collections::HashMap, os::unix::process::CommandExt, path::PathBuf, process::Command,
    time::Duration,
};

use serde_json::Value;
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    scenario::{Family, Scenario, counter, eventually, ok},
};

const PORT: u16 = 8080;

fn up() -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "these tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    // Reactive authentication only: a first connection then produces a drop to count, and
    // handshakes happen when a test connects, not in the background.
    Testbed::up(
        &spec,
        &Options {
            authenticate: true,
            proactive: Some(false),
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("testbed up: {e:#}"))
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

/// Parses Prometheus/OpenMetrics text into `name{labels}` → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        out.insert(key.to_owned(), v);
    }
    out
}

#[test]
fn status_lists_the_pair_and_the_flow_and_counts_drops() {
    let tb = up();
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    assert!(
        ok(&s.connect("client", s.addr("server", Family::V4), PORT, 5000)),
        "connection failed"
    );
    let st = s.status("node-2");
    let (client, server) = (s.identity("client"), s.identity("server"));
    assert!(
        st["auth"].as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["local"] == server.as_str() && e["remote"] == client.as_str())),
        "no pair: {}",
        st["auth"]
    );
    assert!(
        st["flows"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["local_identity"] == server.as_str()
                && f["remote_identity"] == client.as_str())),
        "no flow with both identities: {}",
        st["flows"]
    );
    assert_eq!(st["agent"]["ready"], true, "not ready: {}", st["agent"]);
    assert!(
        counter(&st, "drop_no_auth") >= 1,
        "the cold connection's first SYN drop was not counted"
    );
    let (success, text) = s.portcullis("node-2", &["status", "flows"]);
    assert!(
        success && text.contains(&client) && text.contains("inbound"),
        "status flows: {text}"
    );
    let (success, text) = s.portcullis("node-2", &["status", "auth", "--output", "json"]);
    let auth: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status auth JSON: {e}: {text}"));
    assert!(
        success && auth.as_array().is_some_and(|a| !a.is_empty()),
        "status auth: {text}"
    );
}

#[test]
fn the_admin_socket_refuses_other_users() {
    let tb = up();
    let bin = tb.info().agent_bin.clone().expect("agent binary");
    let sock = tb.node("node-1").admin_socket.clone();
    let as_nobody = || {
        let mut c = Command::new(&bin);
        c.args(["--admin-socket"])
            .arg(&sock)
            .args(["status", "--output", "json"]);
        // SAFETY: setgid/setuid in the child before exec; no allocation.
        unsafe {
            c.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.output().expect("running portcullis as nobody")
    };
    // The file mode keeps others out…
    let out = as_nobody();
    assert!(
        !out.status.success(),
        "a non-root user read the status: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // …and so do the peer credentials, even if the file mode were loosened.
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).expect("chmod")
    };
    mode(&sock, 0o666);
    if let Some(dir) = sock.parent() {
        mode(dir, 0o755);
    }
    let out = as_nobody();
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("auth"),
        "peer-credential check let a non-root user in"
    );
    let refused = eventually(Duration::from_secs(3), || {
        tb.agent_log("node-1").contains("admin connection refused")
    });
    assert!(refused, "the agent did not log the refusal");
}

#[test]
fn metrics_are_prometheus_text_matching_events() {
    let tb = up();
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    assert!(
        ok(&s.connect("client", s.addr("server", Family::V4), PORT, 5000)),
        "connection failed"
    );
    let response = tb.agent_http("node-2", "/metrics");
    assert!(response.starts_with("HTTP/1.1 200"), "metrics: {response}");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let m = parse_metrics(body);
    let st = s.status("node-2");
    let ok_handshakes: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("portcullis_proofs_total{") && k.contains("result=\"ok\""))
        .map(|(_, v)| v)
        .sum();
    let status_ok = st["handshakes"].as_array().map_or(0, |h| {
        h.iter()
            .filter(|h| h["result"] == "ok" && h["stage"] == "proof")
            .count()
    });
    assert_eq!(
        ok_handshakes as usize, status_ok,
        "handshake counts differ: {m:?}"
    );
    let drops = m
        .get("portcullis_datapath_packets_total{verdict=\"drop\",reason=\"no_auth\"}")
        .copied()
        .unwrap_or(-1.0);
    assert_eq!(
        drops as u64,
        counter(&st, "drop_no_auth"),
        "drop counters differ"
    );
    assert_eq!(m.get("portcullis_ready"), Some(&1.0));
    // One node session carried the proofs; it is counted, and its set-up too.
    assert!(
        m.get("portcullis_sessions").is_some_and(|v| *v >= 1.0),
        "no session up: {m:?}"
    );
    assert!(
        m.iter().any(
            |(k, v)| k.starts_with("portcullis_session_establishments_total{")
                && k.contains("result=\"ok\"")
                && *v >= 1.0
        ),
        "no session establishment counted: {m:?}"
    );
    assert!(
        m.keys()
            .any(|k| k.starts_with("portcullis_proof_duration_seconds_bucket")),
        "no latency histogram"
    );
    assert!(
        m.keys()
            .any(|k| k.starts_with("portcullis_svid_expiry_seconds{")),
        "no SVID expiry"
    );
    assert!(
        tb.agent_http("node-2", "/healthz")
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        tb.agent_http("node-2", "/readyz")
            .starts_with("HTTP/1.1 200")
    );
}

#[test]
fn audit_records_are_json_with_the_documented_fields() {
    let mut tb = up();
    for node in ["node-1", "node-2"] {
        tb.stop_agent(node).expect("stopping the agent");
        tb.write_agent_config(node, |c| {
            c.extra.insert("log_format".into(), "json".into());
        })
        .expect("json logs");
        tb.start_agent(node).expect("starting the agent");
    }
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    assert!(
        ok(&s.connect("client", s.addr("server", Family::V4), PORT, 5000)),
        "connection failed"
    );
    let records = || -> Vec<Value> {
        tb.agent_log("node-2")
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "portcullis::audit" && v["event"] == "handshake")
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(3), || !records().is_empty()),
        "no JSON audit record in:\n{}",
        tb.agent_log("node-2")
    );
    for r in records() {
        for field in [
            "event",
            "role",
            "stage",
            "result",
            "reason",
            "local",
            "remote",
            "local_node",
            "remote_node",
            "peer",
            "took_ms",
        ] {
            assert!(!r[field].is_null(), "audit record without `{field}`: {r}");
        }
    }
    assert!(
        records().iter().any(|r| r["result"] == "ok"
            && r["stage"] == "proof"
            && r["remote"] == s.identity("client").as_str()),
        "{:?}",
        records()
    );
}

#[test]
fn doctor_passes_here_and_names_the_remedy_when_bpffs_is_missing() {
    let tb = up();
    let bin = tb.info().agent_bin.clone().expect("agent binary");
    let config = tb.node("node-1").agent_config.clone();
    let bin_s = bin.to_string_lossy().into_owned();
    let config_s = config.to_string_lossy().into_owned();
    let out = tb
        .exec_node("node-1", &[&bin_s, "--config", &config_s, "doctor"])
        .output()
        .expect("doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor failed on this machine:\n{text}"
    );
    assert!(
        text.contains("node-2") && text.contains("reachable"),
        "peers not checked:\n{text}"
    );
    // In a mount namespace of its own, with bpffs unmounted.
    let script = format!("umount -l /sys/fs/bpf && exec {bin_s} --config {config_s} doctor");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "doctor passed without bpffs:\n{text}"
    );
    assert!(
        text.contains("FAIL bpffs") && text.contains("remedy: mount -t bpf bpffs /sys/fs/bpf"),
        "no named remedy:\n{text}"
    );
}

/// `CapEff` of every thread of `pid`, from `/proc/<pid>/task/*/status`.
fn thread_caps(pid: i32) -> Vec<(String, u64)> {
    let mut caps = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("reading /proc/<pid>/task") {
        let task = task.expect("task entry").path();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(u64::MAX);
        caps.push((task.display().to_string(), eff));
    }
    caps
}

/// Once set up, every thread of the agent holds CAP_BPF and CAP_NET_ADMIN and nothing else,
/// and the agent still does what it does after that: attach to a pod that appears later,
/// authenticate a pair, write and cut entries.
#[test]
fn the_agent_keeps_only_cap_bpf_and_cap_net_admin_once_set_up() {
    const KEPT: u64 = 1 << 12 | 1 << 39;
    let mut tb = up();
    let pid = tb.agent_pid("node-2").expect("node-2's agent pid");
    let mut last = Vec::new();
    assert!(
        eventually(Duration::from_secs(15), || {
            last = thread_caps(pid);
            !last.is_empty() && last.iter().all(|(_, eff)| *eff == KEPT)
        }),
        "threads with other capabilities than {KEPT:#x}: {last:x?}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "no_new_privs is not set"
    );
    tb.add_pod("node-2", PodSpec::new("late"))
        .expect("adding a pod");
    let s = scenario(&tb);
    let _server = s.serve("late", PORT);
    let late = s.addr("late", Family::V4);
    // It puts its programs on the new pod's interface: into the links `portcullis-cni`
    // pinned on ADD (adopted), or attached anew on a directly wired node…
    let mut st = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            st = s.status("node-2");
            st["interfaces"].as_array().is_some_and(|is| {
                is.iter().any(|i| {
                    i["interface"] == tb.pod("late").host_veth.as_str()
                        && i["addresses"].to_string().contains(&late.to_string())
                })
            })
        }),
        "no programs on the new pod's interface: {}\n{}",
        st["interfaces"],
        tb.agent_log("node-2")
    );
    // …and authenticates the pair, writing its entry.
    assert!(
        eventually(Duration::from_secs(20), || ok(
            &s.connect("client", late, PORT, 3000)
        )),
        "with its capabilities dropped the agent did not admit the new pod's pair"
    );
    let st = s.status("node-2");
    assert!(
        st["auth"]
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e["local"] == s.identity("late"))),
        "no entry for the new pod: {}",
        st["auth"]
    );
}

/// With the log at debug level, nothing of a private key reaches the log, `status` (text and
/// JSON) or the metrics: neither a PEM marker nor any line of the CA key's base64.
#[test]
fn no_private_key_material_reaches_logs_status_or_metrics() {
    let tb = up();
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    assert!(
        eventually(Duration::from_secs(10), || ok(
            &s.connect("client", target, PORT, 3000)
        )),
        "the pair did not authenticate"
    );
    let key = std::fs::read_to_string(tb.ca_dir().join("ca.key")).expect("reading the CA key");
    let key_lines: Vec<&str> = key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .collect();
    assert!(!key_lines.is_empty(), "the CA key has no body: {key}");
    let mut outputs = Vec::new();
    for node in ["node-1", "node-2"] {
        outputs.push((
            format!("{node} log"),
            std::fs::read_to_string(&tb.node(node).log_file).unwrap_or_default(),
        ));
        outputs.push((format!("{node} status"), s.portcullis(node, &["status"]).1));
        outputs.push((
            format!("{node} status json"),
            s.portcullis(node, &["status", "--output", "json"]).1,
        ));
        outputs.push((format!("{node} metrics"), tb.agent_http(node, "/metrics")));
    }
    for (what, text) in &outputs {
        assert!(text.len() > 100, "{what} is (nearly) empty: {text}");
        for marker in ["PRIVATE KEY", "-----BEGIN"] {
            assert!(!text.contains(marker), "{what} contains {marker:?}");
        }
        for line in &key_lines {
            assert!(!text.contains(line), "{what} contains a line of the CA key");
        }
    }
}
