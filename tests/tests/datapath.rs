//! The kernel datapath, end to end: real programs, real TCX links, real agents, real TCP in a
//! two-node testbed. Privileged: run as root, one at a time (`cargo xtask test` does both).
//! Without root these tests fail; they never skip.

use std::{path::PathBuf, thread, time::Duration};

use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed, Wiring,
    scenario::{Family, Scenario, counter, eventually, ok, sock},
};

const PORT: u16 = 8080;

fn up() -> Testbed {
    up_wired(None)
}

/// The testbed of these tests, with every node wired by `wiring` (`None`: the default, `ptp`
/// on node-1 and `bridge` on node-2).
fn up_wired(wiring: Option<Wiring>) -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the datapath tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![PodSpec::new("client"), PodSpec::new("other")],
            ),
            NodeSpec::new(
                "node-2",
                vec![PodSpec::new("server"), PodSpec::new("late").enroll(false)],
            ),
        ],
    };
    Testbed::up(
        &spec,
        &Options {
            wiring,
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

fn unauthenticated_is_dropped_and_signalled(family: Family) {
    let tb = up();
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", family);
    let before = counter(&s.status("node-2"), "drop_no_auth");
    let r = s.connect("client", target, PORT, 1500);
    assert!(
        !ok(&r),
        "{family:?}: a connection without an auth entry got through: {r}"
    );
    assert_eq!(
        r["kind"], "timeout",
        "{family:?}: the SYN must be dropped silently, not refused: {r}"
    );

    let st = s.status("node-2");
    assert!(
        counter(&st, "drop_no_auth") > before,
        "{family:?}: drop not counted: {}",
        st["counters"]
    );
    let client_id = s.identity("client");
    let seen = eventually(Duration::from_secs(3), || {
        s.status("node-2")["events"].as_array().is_some_and(|evs| {
            evs.iter().any(|e| {
                e["kind"] == "denied"
                    && e["reason"] == "drop_no_auth"
                    && e["remote"] == client_id.as_str()
                    && e["remote_node"] == "node-1"
            })
        })
    });
    assert!(
        seen,
        "{family:?}: the agent on node-2 received no denied event: {}",
        s.status("node-2")["events"]
    );
    // The client's agent saw the connect() and was asked to authenticate early.
    let wanted = s.status("node-1")["events"]
        .as_array()
        .is_some_and(|evs| evs.iter().any(|e| e["kind"] == "auth_wanted"));
    assert!(
        wanted,
        "{family:?}: node-1 got no auth_wanted event: {}",
        s.status("node-1")["events"]
    );
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
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", family);
    s.allow("server", "client");
    let r = s.connect("client", target, PORT, 3000);
    assert!(
        ok(&r),
        "{family:?}: connection with an auth entry failed: {r}"
    );

    // A transfer paced over 8 s; revoke after 2 s.
    let transfer = s.transfer("client", target, PORT, 8000000, 8, 3000);
    thread::sleep(Duration::from_secs(2));
    let flows = s.status("node-2")["flows"].clone();
    let client_id = s.identity("client");
    assert!(
        flows.as_array().is_some_and(|fs| fs
            .iter()
            .any(|f| f["remote_identity"] == client_id.as_str() && f["direction"] == "inbound")),
        "{family:?}: the live flow is not listed with its identities: {flows}"
    );
    let said = s.revoke("server", "client");
    assert!(
        said.contains("removed the entry") && !said.contains(" 0 flow"),
        "{family:?}: revoke said: {said}"
    );
    let result = transfer.finish();
    assert!(
        !ok(&result),
        "{family:?}: the transfer survived revocation: {result}"
    );
    let r = s.connect("client", target, PORT, 1500);
    assert!(
        !ok(&r),
        "{family:?}: a new connection after revocation got through: {r}"
    );
    assert!(
        counter(&s.status("node-2"), "drop_no_flow") > 0,
        "{family:?}: the cut flow's packets were not counted"
    );
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
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", family);
    // `other` may connect; `client` tries to pass as `other` by sending from its address.
    s.allow("server", "other");
    let other = s.addr("other", family);
    assert!(
        ok(&s.connect("other", target, PORT, 3000)),
        "{family:?}: the genuine pod could not connect"
    );
    let add = match family {
        Family::V4 => vec![
            "ip".to_owned(),
            "-4".into(),
            "addr".into(),
            "add".into(),
            format!("{other}/32"),
            "dev".into(),
            "eth0".into(),
        ],
        Family::V6 => vec![
            "ip".to_owned(),
            "-6".into(),
            "addr".into(),
            "add".into(),
            format!("{other}/128"),
            "dev".into(),
            "eth0".into(),
            "nodad".into(),
        ],
    };
    let out = tb.exec("client", &add).output().expect("ip addr add");
    assert!(
        out.status.success(),
        "adding the spoofed address: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before_node1 = counter(&s.status("node-1"), "drop_spoofed");
    let before_node2 = counter(&s.status("node-2"), "pass_authenticated");
    let r = s.probe(
        "client",
        &[
            "connect",
            "--to",
            &sock(target, PORT),
            "--from",
            &other.to_string(),
            "--timeout-ms",
            "1500",
        ],
    );
    assert!(!ok(&r), "{family:?}: a spoofed connection got through: {r}");
    assert!(
        counter(&s.status("node-1"), "drop_spoofed") > before_node1,
        "{family:?}: spoofing not counted on node-1"
    );
    assert_eq!(
        counter(&s.status("node-2"), "pass_authenticated"),
        before_node2,
        "{family:?}: node-2 admitted something"
    );
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
    let target = scenario(&tb).addr("server", Family::V4);
    let _server = scenario(&tb).serve("server", PORT);
    scenario(&tb).allow("server", "client");
    let transfer = scenario(&tb).transfer("client", target, PORT, 16000000, 8, 5000);
    thread::sleep(Duration::from_secs(2));
    tb.kill_agent("node-2").expect("SIGKILL the agent");
    {
        let s = scenario(&tb);
        // During the outage: an unauthenticated peer is still dropped by the pinned programs.
        let r = s.connect("other", target, PORT, 1500);
        assert!(
            !ok(&r),
            "an unauthenticated connection got through while the agent was down: {r}"
        );
        // `status` still reads the pinned maps, says the agent is down, and exits non-zero.
        let (success, text) = s.portcullis("node-2", &["status"]);
        assert!(
            !success && text.contains("DOWN"),
            "status with the agent down: {text}"
        );
        assert!(
            text.contains(&s.identity("client")),
            "status from pins lost the identities: {text}"
        );
    }
    tb.start_agent("node-2").expect("restarting the agent");
    let s = scenario(&tb);
    let result = transfer.finish();
    assert!(
        ok(&result),
        "the transfer did not survive the agent restart: {result}"
    );
    let st = s.status("node-2");
    assert!(
        st["interfaces"]
            .as_array()
            .is_some_and(|is| !is.is_empty() && is.iter().all(|i| i["attached"] == "adopted")),
        "the restarted agent did not adopt the pinned links: {}",
        st["interfaces"]
    );
    assert_eq!(
        st["auth"].as_array().map(Vec::len),
        Some(1),
        "the auth entry did not survive: {}",
        st["auth"]
    );
    assert!(
        !ok(&s.connect("other", target, PORT, 1500)),
        "enforcement lapsed after the restart"
    );
    assert!(
        ok(&s.connect("client", target, PORT, 3000)),
        "the authenticated pair lost access after the restart"
    );
}

/// Found by route lookup (direct wiring: no `portcullis-cni` record), a pod is enforced once
/// cluster state names it and released when it no longer does. (With the plugin a pod is held
/// from its ADD on: `cni.rs`.)
#[test]
fn workload_added_to_and_removed_from_cluster_state_is_enrolled_and_released() {
    let tb = up_wired(Some(Wiring::Direct));
    let s = scenario(&tb);
    let _server = s.serve("late", PORT);
    let target = s.addr("late", Family::V4);
    assert!(
        ok(&s.connect("client", target, PORT, 3000)),
        "an unenrolled pod must not be enforced"
    );
    let workload = tb.pod("late").workload();
    tb.write_cluster(|c| c.upsert_workload(workload))
        .expect("adding the workload");
    let enrolled = eventually(Duration::from_secs(10), || {
        !ok(&s.connect("client", target, PORT, 500))
    });
    assert!(enrolled, "the added workload was not enforced within 10 s");
    assert!(
        s.status("node-2")["interfaces"]
            .as_array()
            .is_some_and(|is| is.iter().any(|i| i["workload"] == "default/late")),
        "status does not list the new interface"
    );
    tb.write_cluster(|c| {
        c.remove_workload("late");
    })
    .expect("removing the workload");
    let released = eventually(Duration::from_secs(10), || {
        ok(&s.connect("client", target, PORT, 500))
    });
    assert!(
        released,
        "the removed workload was not released within 10 s"
    );
}

/// A bad edit of the cluster file is reported with file, line and field, and the last good
/// state stays in force.
#[test]
fn bad_cluster_edit_is_reported_and_the_last_good_state_stays() {
    let tb = up();
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    let path = tb.info().cluster_file.clone();
    let good = std::fs::read_to_string(&path).expect("reading cluster.yaml");
    let bad = good.replacen("node: node-2", "node: node-9", 1);
    assert_ne!(bad, good, "the edit must change something");
    std::fs::write(&path, &bad).expect("writing the bad edit");
    let reported = eventually(Duration::from_secs(5), || {
        s.status("node-2")["agent"]["cluster_error"].is_string()
    });
    assert!(reported, "the bad edit was not reported");
    let err = s.status("node-2")["agent"]["cluster_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        err.contains("cluster.yaml:") && err.contains(".node") && err.contains("node-9"),
        "the error does not name file, line, field and value: {err}"
    );
    assert!(
        !ok(&s.connect("client", target, PORT, 1000)),
        "enforcement lapsed after a bad edit"
    );
    assert!(
        s.status("node-2")["interfaces"]
            .as_array()
            .is_some_and(|i| !i.is_empty()),
        "the last good state was dropped"
    );
}

/// `portcullis uninstall` refuses while the agent runs; once it is stopped, it detaches the
/// programs and removes every pin, and traffic flows unenforced.
#[test]
fn uninstall_detaches_everything_and_removes_the_pins() {
    let mut tb = up();
    let target = scenario(&tb).addr("server", Family::V4);
    let _server = scenario(&tb).serve("server", PORT);
    assert!(
        !ok(&scenario(&tb).connect("client", target, PORT, 1000)),
        "not enforcing before uninstall"
    );
    let (success, text) = scenario(&tb).portcullis("node-2", &["uninstall"]);
    assert!(
        !success && text.contains("running"),
        "uninstall must refuse while the agent runs: {text}"
    );
    tb.stop_agent("node-2").expect("stopping the agent");
    // Stopping leaves enforcement in place.
    assert!(
        !ok(&scenario(&tb).connect("client", target, PORT, 1000)),
        "stopping the agent lifted enforcement"
    );
    let (success, text) = scenario(&tb).portcullis("node-2", &["uninstall"]);
    assert!(success, "uninstall failed: {text}");
    let dir = tb.node("node-2").bpffs_dir.clone();
    assert!(
        !dir.exists(),
        "{} still exists after uninstall",
        dir.display()
    );
    assert!(
        ok(&scenario(&tb).connect("client", target, PORT, 3000)),
        "traffic still blocked after uninstall"
    );
}

/// With `datapath_log: true`, the kernel programs' aya-log records reach the agent's log.
#[test]
fn datapath_log_reaches_the_agent_log_when_enabled() {
    let mut tb = up();
    tb.stop_agent("node-2").expect("stopping the agent");
    tb.write_agent_config("node-2", |c| {
        c.extra
            .insert("datapath_log".into(), serde_yaml::Value::Bool(true));
    })
    .expect("enabling datapath_log");
    tb.start_agent("node-2").expect("restarting the agent");
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    assert!(
        !ok(&s.connect("client", s.addr("server", Family::V4), PORT, 1000)),
        "not enforcing"
    );
    let logged = eventually(Duration::from_secs(5), || {
        tb.agent_log("node-2")
            .contains("portcullis: drop, reason 4")
    });
    assert!(
        logged,
        "no datapath log line in the agent log:\n{}",
        tb.agent_log("node-2")
    );
}

/// Pins left by a version with another map layout are not adopted blindly: the agent refuses to
/// start and says what to do when the map holds state nothing derives again (the flow table);
/// the auth map and the counters, which are derived again, are replaced.
#[test]
fn pinned_maps_of_an_incompatible_layout_are_refused_with_the_remedy_or_replaced() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the datapath tests need root; run them with `cargo xtask test` as root"
    );
    let spec = Spec {
        nodes: vec![NodeSpec::new("node-1", vec![PodSpec::new("client")])],
    };
    let mut tb = Testbed::up(&spec, &Options::without_agents())
        .unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    testbed::ensure_bpffs().expect("bpffs");
    let maps = tb.node("node-1").bpffs_dir.join("maps");
    std::fs::create_dir_all(&maps).expect("maps dir");
    let create = |name: &str, kind: &str, key: &str, value: &str| {
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(maps.join(name))
            .args([
                "type", kind, "key", key, "value", value, "entries", "16", "name", name,
            ])
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "bpftool map create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The auth map before pair keys moved into it (88-byte values), and a flow table of an
    // older layout (16-byte values).
    create("PC_AUTH", "hash", "16", "88");
    create("PC_FLOWS", "lru_hash", "40", "16");
    let err = tb
        .start_agent("node-1")
        .expect_err("the agent adopted maps of another layout");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("incompatible version")
            && msg.contains("PC_FLOWS")
            && msg.contains("portcullis uninstall"),
        "{msg}"
    );
    std::fs::remove_file(maps.join("PC_FLOWS")).expect("remove the old flow table");
    tb.start_agent("node-1")
        .unwrap_or_else(|e| panic!("the old auth map was not replaced: {e:#}"));
    let out = std::process::Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(maps.join("PC_AUTH"))
        .output()
        .expect("bpftool");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!(
            "value {}B",
            std::mem::size_of::<portcullis_common::AuthValue>()
        )),
        "PC_AUTH is still the old map: {shown}"
    );
    assert!(
        tb.agent_log("node-1")
            .contains("a pinned map of an earlier layout was replaced"),
        "the replacement is not logged:\n{}",
        tb.agent_log("node-1")
    );
}
