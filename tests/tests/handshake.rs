//! Mutual TLS between agents, end to end: agents with a CA mint SVIDs for their pods and
//! authenticate pairs by handshake when the datapath asks, with no manual step. Privileged:
//! run as root, one at a time (`cargo xtask test`). Without root these tests fail.

use std::{path::PathBuf, thread, time::Duration};

use serde_json::Value;
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    scenario::{Family, Scenario, eventually, ok},
};

const PORT: u16 = 8080;

fn up_with(opts: Options) -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the handshake tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    Testbed::up(&spec, &opts).unwrap_or_else(|e| panic!("testbed up: {e:#}"))
}

fn up() -> Testbed {
    up_with(Options {
        authenticate: true,
        ..Options::default()
    })
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

fn handshakes(s: &Scenario<'_>, node: &str) -> Vec<Value> {
    s.status(node)["handshakes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn has_entry(s: &Scenario<'_>, node: &str, local: &str, remote: &str, remote_node: &str) -> bool {
    s.status(node)["auth"].as_array().is_some_and(|es| {
        es.iter().any(|e| {
            e["local"] == local && e["remote"] == remote && e["remote_node"] == remote_node
        })
    })
}

/// Reactive authentication alone: the first SYN is dropped, the drop starts the handshake, and
/// the kernel's retransmission is admitted.
#[test]
fn pods_on_two_nodes_connect_with_no_manual_step() {
    let tb = up_with(Options {
        authenticate: true,
        proactive: Some(false),
        ..Options::default()
    });
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    for family in [Family::V4, Family::V6] {
        let r = s.connect("client", s.addr("server", family), PORT, 5000);
        assert!(
            ok(&r),
            "{family:?}: the first connection was not admitted after authentication: {r}"
        );
        eprintln!(
            "{family:?}: cold first connection took {} ms",
            r["connect_ms"]
        );
    }
    let (client, server) = (s.identity("client"), s.identity("server"));
    assert!(
        has_entry(&s, "node-2", &server, &client, "node-1"),
        "node-2 has no entry: {}",
        s.status("node-2")["auth"]
    );
    assert!(
        has_entry(&s, "node-1", &client, &server, "node-2"),
        "node-1 has no entry: {}",
        s.status("node-1")["auth"]
    );
    for node in ["node-1", "node-2"] {
        let hs = handshakes(&s, node);
        assert!(
            hs.iter().any(|h| h["result"] == "ok"),
            "{node}: no successful handshake: {hs:?}"
        );
        let ids = s.status(node)["identities"].clone();
        assert!(
            ids.as_array()
                .is_some_and(|i| i.len() == 1 && i[0]["serial"].is_string()),
            "{node}: identities {ids}"
        );
    }
    // The audit trail names both identities and both nodes.
    let log = tb.agent_log("node-2");
    assert!(
        log.lines().any(|l| l.contains("portcullis::audit")
            && l.contains("handshake ok")
            && l.contains(&client)
            && l.contains("node-1")),
        "no audit record of the handshake in node-2's log"
    );
    // Later connections find the entry: no drop at all.
    let before = s.status("node-2")["counters"]["drop_no_auth"].as_u64();
    assert!(
        ok(&s.connect("client", s.addr("server", Family::V4), PORT, 1000)),
        "a warm connection failed"
    );
    assert_eq!(
        s.status("node-2")["counters"]["drop_no_auth"].as_u64(),
        before,
        "a warm connection was dropped first"
    );
}

#[test]
fn a_node_with_svids_from_a_foreign_ca_never_gets_its_pods_through() {
    let mut tb = up();
    let foreign = tb.state_dir().join("foreign-ca");
    tb.make_ca(&foreign).expect("creating the foreign CA");
    tb.use_ca("node-1", &foreign)
        .expect("restarting the agent with the foreign CA");
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    for _ in 0..3 {
        let r = s.connect("client", s.addr("server", Family::V4), PORT, 1500);
        assert!(!ok(&r), "a pod of the foreign-CA node got through: {r}");
    }
    let untrusted = |node: &str| {
        handshakes(&s, node).iter().any(|h| {
            h["result"] == "failed"
                && (h["reason"] == "untrusted_chain" || h["reason"] == "peer_rejected_certificate")
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || untrusted("node-1")
            && untrusted("node-2")),
        "failure not recorded on both sides"
    );
    for node in ["node-1", "node-2"] {
        let log = tb.agent_log(node);
        assert!(
            log.lines().any(|l| l.contains("portcullis::audit")
                && l.contains("handshake failed")
                && (l.contains("untrusted_chain") || l.contains("peer_rejected_certificate"))),
            "{node}: the reason is not in the audit log"
        );
    }
    assert!(
        s.status("node-2")["auth"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "node-2 wrote an entry: {}",
        s.status("node-2")["auth"]
    );
}

#[test]
fn the_responder_refuses_to_prove_an_address_it_does_not_host() {
    let mut tb = up();
    // node-1's view of the cluster (a copy of the shared file) has a workload on node-2 that
    // node-2 does not know about.
    let copy = tb.state_dir().join("cluster-node-1.yaml");
    let mut cluster = tb.cluster().expect("reading cluster state");
    let mut ghost = tb.pod("server").workload();
    ghost.name = "ghost".into();
    ghost.service_account = "ghost".into();
    ghost.addresses = vec!["198.18.2.99".parse().unwrap()];
    cluster.upsert_workload(ghost);
    cluster.store(&copy).expect("writing node-1's cluster file");
    tb.stop_agent("node-1").expect("stopping node-1's agent");
    tb.write_agent_config("node-1", |c| c.cluster_state = Some(copy.clone()))
        .expect("pointing node-1 at its own cluster file");
    tb.start_agent("node-1").expect("restarting node-1's agent");
    let s = scenario(&tb);
    let r = s.connect("client", "198.18.2.99".parse().unwrap(), PORT, 1500);
    assert!(!ok(&r), "connected to an address nobody hosts: {r}");
    let refused = |node: &str| {
        handshakes(&s, node)
            .iter()
            .any(|h| h["result"] == "failed" && h["reason"] == "not_hosted")
    };
    assert!(
        eventually(Duration::from_secs(5), || refused("node-1")
            && refused("node-2")),
        "not_hosted not recorded on both sides: {:?} / {:?}",
        handshakes(&s, "node-1"),
        handshakes(&s, "node-2")
    );
}

#[test]
fn a_transfer_runs_across_svid_rotation_and_entry_renewal_without_reset() {
    let tb = up_with(Options {
        authenticate: true,
        svid_ttl_secs: Some(10),
        ..Options::default()
    });
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    assert!(
        ok(&s.connect("client", target, PORT, 5000)),
        "first connection failed"
    );
    let serial = s.status("node-2")["identities"][0]["serial"].clone();
    let ok_count = |node: &str| {
        handshakes(&s, node)
            .iter()
            .filter(|h| h["result"] == "ok")
            .count()
    };
    let before = ok_count("node-1") + ok_count("node-2");
    let transfer = s.transfer("client", target, PORT, 24000000, 14, 5000);
    let result = transfer.finish();
    assert!(
        ok(&result),
        "the transfer did not survive rotation and renewal: {result}"
    );
    let st = s.status("node-2");
    assert_ne!(
        st["identities"][0]["serial"], serial,
        "the SVID was not rotated in 14 s with a 10 s TTL"
    );
    let after = ok_count("node-1") + ok_count("node-2");
    assert!(
        after > before,
        "the entry was not renewed while the flow lived ({before} successful handshakes before, {after} after)"
    );
    assert!(
        ok(&s.connect("client", target, PORT, 1000)),
        "a new connection after renewal failed"
    );
}

#[test]
fn traffic_keeps_flowing_through_a_ca_rotation_via_the_bundle() {
    let tb = up();
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    assert!(
        ok(&s.connect("client", target, PORT, 5000)),
        "first connection failed"
    );
    let transfer = s.transfer("client", target, PORT, 16000000, 10, 5000);
    let serial = |node: &str| s.status(node)["identities"][0]["serial"].clone();
    let serials = [serial("node-1"), serial("node-2")];
    let old = std::fs::read_to_string(tb.bundle_path()).expect("reading the bundle");
    let new_dir = tb.state_dir().join("new-ca");
    tb.make_ca(&new_dir).expect("creating the new CA");
    let new = std::fs::read_to_string(new_dir.join("ca.pem")).expect("reading the new CA");
    // 1. Trust both roots.
    std::fs::write(tb.bundle_path(), format!("{old}{new}")).expect("writing old+new bundle");
    thread::sleep(Duration::from_secs(1));
    // 2. Issue from the new CA: both nodes replace their SVIDs, then re-authenticate.
    let switched = std::time::Instant::now();
    for f in ["ca.key", "ca.pem"] {
        std::fs::copy(new_dir.join(f), tb.ca_dir().join(f)).expect("switching the CA");
    }
    let reissued = eventually(Duration::from_secs(5), || {
        ["node-1", "node-2"]
            .iter()
            .zip(&serials)
            .all(|(n, old)| serial(n) != *old)
    });
    assert!(reissued, "the SVIDs were not re-issued by the new CA");
    // Each node's entry was written again since the switch (by a handshake with new SVIDs).
    let fresh = |node: &str| {
        s.status(node)["auth"].as_array().is_some_and(|es| {
            !es.is_empty()
                && es.iter().all(|e| {
                    e["age_secs"]
                        .as_u64()
                        .is_some_and(|a| a <= switched.elapsed().as_secs())
                })
        })
    };
    let rotated = eventually(Duration::from_secs(5), || {
        fresh("node-1") && fresh("node-2")
    });
    assert!(
        rotated,
        "the pairs were not re-authenticated with the new CA's SVIDs"
    );
    // 3. Trust only the new root.
    std::fs::write(tb.bundle_path(), &new).expect("writing new-only bundle");
    thread::sleep(Duration::from_secs(1));
    let r = s.connect("client", target, PORT, 5000);
    assert!(ok(&r), "a connection after the rotation failed: {r}");
    let result = transfer.finish();
    assert!(
        ok(&result),
        "the transfer did not survive the CA rotation: {result}\nnode-1: {}\nnode-2: {}\nidentity log:\n{}",
        s.status("node-1")["handshakes"],
        s.status("node-2")["handshakes"],
        ["node-1", "node-2"]
            .iter()
            .flat_map(|n| tb
                .agent_log(n)
                .lines()
                .filter(|l| l.contains("SVID")
                    || l.contains("identity")
                    || l.contains("bundle")
                    || l.contains("revoked"))
                .map(|l| format!("{n}: {l}"))
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// With proactive authentication (the default) the agents authenticate the pair before any
/// connection asks: the first connection is not dropped at all.
#[test]
fn with_proactive_authentication_a_first_connection_waits_for_nothing() {
    let tb = up();
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let (client, server) = (s.identity("client"), s.identity("server"));
    let warm = eventually(Duration::from_secs(10), || {
        has_entry(&s, "node-2", &server, &client, "node-1")
            && has_entry(&s, "node-1", &client, &server, "node-2")
    });
    assert!(
        warm,
        "the pair was not authenticated in the background: {}",
        s.status("node-2")["auth"]
    );
    let r = s.connect("client", s.addr("server", Family::V4), PORT, 500);
    assert!(ok(&r), "the first connection failed: {r}");
    let ms = r["connect_ms"].as_f64().unwrap_or(f64::MAX);
    eprintln!("first connection with proactive authentication: {ms} ms");
    assert!(ms < 100.0, "the first connection waited {ms} ms");
    assert_eq!(
        s.status("node-2")["counters"]["drop_no_auth"],
        0,
        "a SYN was dropped"
    );
}

/// Cold first connection for a new pair, in the three settings side by side (same run): both
/// mechanisms off (the first SYN is dropped and the kernel retransmits after 1 s, Cilium's
/// behaviour), the SYN timeout program alone (the retransmission comes after `syn_rto_ms`), and
/// proactive authentication (the pair is authenticated before anyone connects).
#[test]
fn cold_first_connection_latency_in_three_settings() {
    let settings: [(&str, Option<bool>, Option<u32>); 3] = [
        ("both off", Some(false), Some(0)),
        ("SYN timeout only", Some(false), Some(20)),
        ("proactive", Some(true), Some(20)),
    ];
    let mut results = Vec::new();
    for (name, proactive, syn_rto_ms) in settings {
        let tb = up_with(Options {
            authenticate: true,
            proactive,
            syn_rto_ms,
            ..Options::default()
        });
        let s = scenario(&tb);
        let _server = s.serve("server", PORT);
        if proactive == Some(true) {
            let (c, sv) = (s.identity("client"), s.identity("server"));
            assert!(
                eventually(Duration::from_secs(10), || has_entry(
                    &s, "node-1", &c, &sv, "node-2"
                ) && has_entry(
                    &s, "node-2", &sv, &c, "node-1"
                )),
                "{name}: the pair was not authenticated in the background"
            );
        }
        let r = s.connect("client", s.addr("server", Family::V4), PORT, 5000);
        assert!(ok(&r), "{name}: the first connection failed: {r}");
        let ms = r["connect_ms"].as_f64().unwrap_or(f64::MAX);
        if name == "SYN timeout only" {
            let fc = s.status("node-1")["agent"]["first_connection"].clone();
            assert!(
                fc.as_str().is_some_and(|f| f.contains("SYN retried after")),
                "{fc}"
            );
        }
        results.push((name, ms));
    }
    eprintln!("cold first connection, connect() to established:");
    for (name, ms) in &results {
        eprintln!("  {name:<18} {ms:>8.2} ms");
    }
    let [(_, off), (_, syn), (_, proactive)] = results[..] else {
        unreachable!()
    };
    assert!(
        off >= 900.0,
        "with both off the first SYN should wait for the 1 s retransmission, took {off} ms"
    );
    assert!(
        syn < 300.0,
        "with the SYN timeout program the first connection took {syn} ms"
    );
    assert!(
        proactive < 100.0,
        "with proactive authentication the first connection took {proactive} ms"
    );
}

/// A CA removed from the trust bundle takes its SVIDs' pairs down: every entry is proven again
/// at once, the pair whose SVID is no longer trusted is revoked on both nodes, and its running
/// transfer is cut.
#[test]
fn a_ca_removed_from_the_bundle_revokes_its_pairs_and_cuts_their_flows() {
    let mut tb = up();
    let old = std::fs::read_to_string(tb.bundle_path()).expect("reading the bundle");
    let new_dir = tb.state_dir().join("node-2-ca");
    tb.make_ca(&new_dir).expect("creating node-2's CA");
    let new = std::fs::read_to_string(new_dir.join("ca.pem")).expect("reading node-2's CA");
    std::fs::write(tb.bundle_path(), format!("{old}{new}")).expect("writing old+new bundle");
    // node-2 issues from its own CA; both nodes trust both CAs through the shared bundle.
    tb.stop_agent("node-2").expect("stopping node-2");
    let (dir, bundle) = (
        new_dir.to_string_lossy().into_owned(),
        tb.bundle_path().to_string_lossy().into_owned(),
    );
    tb.write_agent_config("node-2", |c| {
        let mut identity = serde_yaml::Mapping::new();
        identity.insert("source".into(), "ca".into());
        identity.insert("dir".into(), dir.into());
        identity.insert("trust_bundle".into(), bundle.into());
        c.extra
            .insert("identity".into(), serde_yaml::Value::Mapping(identity));
    })
    .expect("node-2's config");
    tb.start_agent("node-2").expect("starting node-2");
    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    let target = s.addr("server", Family::V4);
    assert!(
        eventually(Duration::from_secs(10), || ok(
            &s.connect("client", target, PORT, 1000)
        )),
        "the pair did not authenticate across the two CAs"
    );
    let transfer = s.transfer("client", target, PORT, 400_000_000, 20, 2000);
    thread::sleep(Duration::from_secs(1));
    // Drop node-2's CA from the bundle.
    std::fs::write(tb.bundle_path(), &old).expect("writing old-only bundle");
    let (client, server) = (s.identity("client"), s.identity("server"));
    assert!(
        eventually(Duration::from_secs(5), || !has_entry(
            &s, "node-1", &client, &server, "node-2"
        ) && !has_entry(
            &s, "node-2", &server, &client, "node-1"
        )),
        "the untrusted pair kept its entries: {} / {}\nnode-2's handshakes: {}",
        s.status("node-1")["auth"],
        s.status("node-2")["auth"],
        s.status("node-2")["handshakes"]
    );
    let result = transfer.finish();
    assert!(
        !ok(&result),
        "the transfer of the untrusted pair went on: {result}"
    );
    assert!(
        !ok(&s.connect("client", target, PORT, 1500)),
        "a new connection of the untrusted pair succeeded"
    );
    assert!(
        tb.agent_log("node-1").contains("auth entry revoked"),
        "no revocation audit record on node-1"
    );
}
