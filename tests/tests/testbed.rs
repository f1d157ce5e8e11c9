//! Privileged tests of the testbed itself (no agents): the simulated cluster's plumbing, and
//! that teardown leaves nothing behind. They need root and fail (not skip) without it.
//!
//! Run: `cargo test -p portcullis-tests -- --test-threads=1` as root.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use testbed::{Options, PodSpec, Spec, Testbed, leftovers, process};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

fn require_root() {
    assert!(
        process::is_root(),
        "these tests build network namespaces and cgroups: run them as root"
    );
}

fn up(spec: &Spec, opts: &Options) -> Testbed {
    require_root();
    Testbed::up(spec, opts).unwrap_or_else(|e| panic!("Testbed::up failed: {e:#}"))
}

/// A `probe serve` in a pod; killed (and reaped) on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(tb: &Testbed, pod: &str, port: u16) -> Server {
    let mut child = tb
        .exec(
            pod,
            &[
                PROBE,
                "serve",
                "--port",
                &port.to_string(),
                "--seconds",
                "120",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start probe serve in {pod}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    // The thread keeps draining the server's stdout so it never blocks on a full pipe; it
    // ends when the server does.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let server = Server(child);
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("probe serve in {pod} did not report ready: {e}"));
    assert!(
        first.contains("\"ok\":true"),
        "probe serve in {pod} failed: {first}"
    );
    server
}

/// Runs a probe client in `pod`; panics with its output unless it reports ok.
fn probe_ok(tb: &Testbed, pod: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec![PROBE];
    full.extend_from_slice(args);
    let out = tb
        .exec(pod, &full)
        .output()
        .unwrap_or_else(|e| panic!("cannot run probe in {pod}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "probe {args:?} in {pod}: bad output {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && v["ok"] == true,
        "probe {args:?} in {pod} failed: {stdout}"
    );
    v
}

fn root_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(str::trim)
        .collect();
    names.sort();
    names.join(" ")
}

fn assert_gone(id: &str) {
    let left = leftovers(id);
    assert!(left.is_empty(), "testbed {id} left things behind: {left:?}");
}

#[test]
fn pods_on_different_nodes_talk_over_ipv4_and_ipv6() {
    let links_before = root_links();
    let tb = up(&Spec::two_nodes(2), &Options::without_agents());
    let id = tb.id().to_string();
    assert_eq!(
        root_links(),
        links_before,
        "the root namespace's interfaces changed"
    );

    let server = tb.pod("n2-pod1").clone();
    assert_eq!(server.ipv4.to_string(), "198.18.2.2");
    assert_eq!(server.ipv6.to_string(), "fd00:18:2::2");
    assert_eq!(tb.pod("n1-pod2").ipv4.to_string(), "198.18.1.3");
    assert_eq!(
        testbed::netns::sysctl_get(&tb.node("node-1").netns, "net.ipv4.ip_forward")
            .expect("sysctl"),
        "1"
    );

    let _srv = serve(&tb, "n2-pod1", 8080);
    let v4 = format!("{}:8080", server.ipv4);
    let v6 = format!("[{}]:8080", server.ipv6);
    for to in [&v4, &v6] {
        let r = probe_ok(
            &tb,
            "n1-pod1",
            &["connect", "--to", to, "--timeout-ms", "5000"],
        );
        assert!(r["connect_ms"].as_f64().is_some(), "{r}");
        // The client's own address must be its pod address: no NAT anywhere.
        let local = r["local"].as_str().expect("local");
        assert!(
            local.starts_with("198.18.1.2:") || local.starts_with("[fd00:18:1::2]:"),
            "unexpected source {local}"
        );
        // Same node, different pod; and from the node itself (host network).
        probe_ok(&tb, "n2-pod2", &["connect", "--to", to]);
        let out = tb
            .exec_node("node-1", &[PROBE, "connect", "--to", to])
            .output()
            .expect("probe on node");
        assert!(
            out.status.success(),
            "node-1 cannot reach {to}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let r = probe_ok(&tb, "n1-pod2", &["send", "--to", to, "--bytes", "4000000"]);
        assert_eq!(r["server_bytes"], 4_000_000, "{r}");
    }
    // A paced transfer (what the tests that restart agents mid-flow rely on).
    let r = probe_ok(
        &tb,
        "n1-pod1",
        &["send", "--to", &v6, "--bytes", "200000", "--seconds", "1"],
    );
    assert!(
        r["elapsed_ms"].as_f64().expect("elapsed") >= 900.0,
        "pacing did not pace: {r}"
    );
    // Nothing listens on 8081: a refusal, reported as such.
    let out = tb
        .exec(
            "n1-pod1",
            &[PROBE, "connect", "--to", &format!("{}:8081", server.ipv4)],
        )
        .output()
        .expect("probe");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout).contains("refused"),
        "{out:?}"
    );

    drop(_srv);
    drop(tb);
    assert_gone(&id);
    assert_eq!(
        root_links(),
        links_before,
        "the root namespace's interfaces changed"
    );
}

#[test]
fn teardown_kills_pod_processes_and_removes_everything() {
    let tb = up(&Spec::two_nodes(1), &Options::without_agents());
    let id = tb.id().to_string();
    let info = tb.info().clone();
    assert!(info.state_dir.join("testbed.json").is_file());
    assert!(info.state_dir.join("cluster.yaml").is_file());
    assert!(info.state_dir.join("node-1.yaml").is_file());
    assert!(info.cgroup_root.join("node-1/agent").is_dir());
    assert!(tb.pod("n2-pod1").cgroup.ends_with("node-2/pods/n2-pod1"));
    // A stray process (not a Child we keep) must be killed through the cgroup at teardown.
    let child = tb
        .exec("n1-pod1", &["sleep", "300"])
        .spawn()
        .expect("sleep in pod");
    let pid = child.id();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup of sleep");
    assert!(
        cg.contains(&format!("/pc{id}/node-1/pods/n1-pod1")),
        "sleep is not in the pod cgroup: {cg}"
    );
    let pod_ns = std::fs::metadata(format!("/run/netns/pc{id}-n1-pod1"))
        .expect("pod netns")
        .ino();
    let proc_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("ns of sleep")
        .ino();
    assert_eq!(
        pod_ns, proc_ns,
        "sleep is not in the pod's network namespace"
    );
    drop(tb);
    assert_gone(&id);
    let mut child = child;
    let status = child.wait().expect("wait sleep");
    assert!(!status.success(), "sleep should have been killed");
}

#[test]
fn pods_come_and_go_at_runtime() {
    let mut tb = up(&Spec::two_nodes(1), &Options::without_agents());
    let late = tb
        .add_pod("node-2", PodSpec::new("late").service_account("late-sa"))
        .expect("add_pod");
    assert_eq!(late.ipv4.to_string(), "198.18.2.3");
    let w = tb.cluster().expect("cluster.yaml");
    let entry = w.workload("late").expect("late is enrolled");
    assert_eq!(entry.service_account, "late-sa");
    assert_eq!(
        entry.addresses,
        vec![late.ipv4.into(), std::net::IpAddr::from(late.ipv6)]
    );
    let hidden = tb
        .add_pod("node-1", PodSpec::new("hidden").enroll(false))
        .expect("add_pod");
    assert!(tb.cluster().expect("cluster").workload("hidden").is_none());
    assert_eq!(hidden.ipv4.to_string(), "198.18.1.3");

    let _srv = serve(&tb, "late", 9000);
    probe_ok(
        &tb,
        "hidden",
        &[
            "send",
            "--to",
            &format!("[{}]:9000", late.ipv6),
            "--bytes",
            "100000",
        ],
    );
    probe_ok(
        &tb,
        "n1-pod1",
        &["connect", "--to", &format!("{}:9000", late.ipv4)],
    );
    drop(_srv);

    tb.remove_pod("late").expect("remove_pod");
    assert!(tb.cluster().expect("cluster").workload("late").is_none());
    assert!(!std::path::Path::new(&format!("/run/netns/{}", late.netns)).exists());
    assert!(!late.cgroup.exists());
    let again = tb
        .add_pod("node-2", PodSpec::new("again"))
        .expect("add_pod");
    assert_ne!(
        again.host_veth, late.host_veth,
        "host veth names are never reused"
    );
    tb.write_cluster(|c| c.trust_domain = "example.org".into())
        .expect("write_cluster");
    assert_eq!(tb.cluster().expect("cluster").trust_domain, "example.org");
    let id = tb.id().to_string();
    drop(tb);
    assert_gone(&id);
}

#[test]
fn a_leaked_testbed_is_found_and_removed_by_prefix() {
    let tb = up(&Spec::two_nodes(1), &Options::without_agents());
    let id = tb.leak();
    assert!(testbed::info::list_ids().contains(&id));
    let attached = Testbed::attach(&id).expect("attach");
    assert_eq!(attached.pod("n2-pod1").ipv4.to_string(), "198.18.2.2");
    let mut stray = attached
        .exec("n2-pod1", &["sleep", "300"])
        .spawn()
        .expect("sleep");
    drop(attached); // an attached handle leaves the testbed alone
    assert!(!leftovers(&id).is_empty());
    let removed = testbed::down_by_prefix(Some(&id)).expect("down_by_prefix");
    assert_eq!(removed, vec![id.clone()]);
    assert_gone(&id);
    assert!(
        !stray.wait().expect("wait sleep").success(),
        "the stray process should have been killed"
    );
}

/// The agent plumbing, with a stand-in agent: a shell script that creates its admin socket
/// path (a plain file is enough for readiness) and sleeps.
#[test]
fn agents_start_in_their_node_and_stop() {
    require_root();
    let err = Testbed::up(
        &Spec::two_nodes(0),
        &Options {
            agent_bin: Some("/nonexistent/portcullis".into()),
            ..Options::default()
        },
    )
    .err()
    .expect("a missing agent binary is an error");
    assert!(
        format!("{err:#}").contains("/nonexistent/portcullis"),
        "{err:#}"
    );

    let dir = std::env::temp_dir().join(format!("pc-fake-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let fake = dir.join("fake-portcullis");
    std::fs::write(
        &fake,
        "#!/bin/sh\n# fake agent: run --config FILE\nsock=$(sed -n 's/^admin_socket: *//p' \"$3\")\necho \"fake agent $$ config $3\"\ntrap 'echo got TERM; exit 0' TERM\n: > \"$sock\"\nwhile :; do sleep 0.1; done\n",
    )
    .expect("write fake agent");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");

    let mut tb = up(
        &Spec::two_nodes(1),
        &Options {
            agent_bin: Some(fake.clone()),
            // The fake agent comes without a `portcullis-cni` beside it.
            wiring: Some(testbed::Wiring::Direct),
            ..Options::default()
        },
    );
    let id = tb.id().to_string();
    let node = tb.node("node-1").clone();
    let cfg = std::fs::read_to_string(&node.agent_config).expect("agent config");
    assert!(
        cfg.contains(&format!("bpffs_dir: /sys/fs/bpf/pc{id}/node-1")),
        "{cfg}"
    );
    assert!(
        cfg.contains(&format!(
            "cluster_state: /run/portcullis-testbed/pc{id}/cluster.yaml"
        )),
        "{cfg}"
    );
    let pid: u32 = std::fs::read_to_string(&node.pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("agent cgroup");
    assert!(
        cg.contains(&format!("/pc{id}/node-1/agent")),
        "agent not in its cgroup: {cg}"
    );
    let ns = std::fs::metadata(format!("/run/netns/{}", node.netns))
        .expect("netns")
        .ino();
    assert_eq!(
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .expect("ns")
            .ino(),
        ns,
        "agent not in node netns"
    );
    assert!(tb.agent_running("node-1"));

    let status = tb
        .stop_agent("node-1")
        .expect("stop_agent")
        .expect("our child");
    assert!(
        status.success(),
        "fake agent should exit 0 on SIGTERM: {status}"
    );
    assert!(
        tb.agent_log("node-1").contains("got TERM"),
        "log: {}",
        tb.agent_log("node-1")
    );
    assert!(!tb.agent_running("node-1"));
    tb.start_agent("node-1").expect("restart");
    tb.kill_agent("node-1").expect("kill_agent");
    assert!(!tb.agent_running("node-1"));
    assert!(tb.agent_running("node-2"));
    let admin = tb.portcullis("node-2", &["status"]);
    let args: Vec<_> = admin
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        args,
        vec![
            "--config".to_string(),
            tb.node("node-2")
                .agent_config
                .to_string_lossy()
                .into_owned(),
            "status".into()
        ]
    );
    drop(tb);
    assert_gone(&id);
    let _ = std::fs::remove_dir_all(&dir);
}
