//! Attacks on the node sessions of protocol version 2, with the tests crate's own client of
//! the protocol (`testbed::session`: real TLS, frames and proofs built from the wire format,
//! not from the agent's code): what a peer without a node SVID learns, and what a node that
//! holds its own node SVID can make another node believe about workloads that cluster state
//! places elsewhere. Privileged: run as root, one at a time (`cargo xtask test`). Without root
//! these tests fail.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    issuer::{self, Credential},
    scenario::{Family, Scenario, counter, eventually, ok},
    session::{self, Answer, Connect, Identity, Proof, Session},
};

const PORT: u16 = 8080;
const TD: &str = "cluster.local";

fn root() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the session attack tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
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

fn node_id(node: &str) -> String {
    format!("spiffe://{TD}/portcullis/node/{node}")
}

/// Where `node` accepts sessions, by cluster state.
fn session_addr(tb: &Testbed, node: &str) -> SocketAddr {
    tb.cluster()
        .expect("reading cluster state")
        .nodes
        .iter()
        .find(|n| n.name == node)
        .unwrap_or_else(|| panic!("{node} is not in cluster state"))
        .address
}

/// Every workload identity cluster state knows.
fn workload_ids(tb: &Testbed) -> Vec<String> {
    tb.cluster()
        .expect("reading cluster state")
        .workloads
        .iter()
        .map(|w| {
            w.spiffe_id.clone().unwrap_or_else(|| {
                format!("spiffe://{TD}/ns/{}/sa/{}", w.namespace, w.service_account)
            })
        })
        .collect()
}

fn wait_ready(s: &Scenario<'_>, nodes: &[&str]) {
    for node in nodes {
        assert!(
            eventually(Duration::from_secs(20), || s.status(node)["agent"]["ready"]
                == true),
            "{node} did not become ready: {}",
            s.status(node)
        );
    }
}

fn handshakes(s: &Scenario<'_>, node: &str) -> Vec<Value> {
    s.status(node)["handshakes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The records of `node` about the session set up from `peer` (the client's TCP address).
fn session_records(s: &Scenario<'_>, node: &str, peer: SocketAddr) -> Vec<Value> {
    handshakes(s, node)
        .into_iter()
        .filter(|h| h["stage"] == "session" && h["peer"] == peer.to_string())
        .collect()
}

fn entries(s: &Scenario<'_>, node: &str) -> Vec<Value> {
    s.status(node)["auth"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn has_entry(s: &Scenario<'_>, node: &str, local: &str, remote: &str, remote_node: &str) -> bool {
    entries(s, node)
        .iter()
        .any(|e| e["local"] == local && e["remote"] == remote && e["remote_node"] == remote_node)
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parsing a certificate");
    cert.subject_alternative_name()
        .expect("SAN extension")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn not_after_unix(der: &[u8]) -> u64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parsing a certificate");
    u64::try_from(cert.validity().not_after.timestamp()).expect("not_after")
}

fn is_ca(der: &[u8]) -> bool {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parsing a certificate");
    cert.basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca)
}

/// Checks a chain a server presented is `node`'s node SVID (chained to the bundle, leaf naming
/// the node, its expiry the one `node`'s status reports, nothing else but CA certificates) and
/// that no certificate in it names any other SPIFFE ID.
fn assert_node_svid(tb: &Testbed, s: &Scenario<'_>, node: &str, chain: &[Vec<u8>], case: &str) {
    let bundle = std::fs::read_to_string(tb.bundle_path()).expect("reading the bundle");
    let ders: Vec<_> = chain
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
        .collect();
    session::chain_trusted(&bundle, &ders).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    let leaf = chain
        .first()
        .unwrap_or_else(|| panic!("{case}: no certificate"));
    assert_eq!(
        uri_sans(leaf),
        vec![node_id(node)],
        "{case}: the leaf's URI SANs"
    );
    let reported = s.status(node)["node_svid_not_after_unix"].as_u64();
    assert_eq!(
        Some(not_after_unix(leaf)),
        reported,
        "{case}: the leaf is not {node}'s current node SVID"
    );
    for (i, c) in chain.iter().enumerate().skip(1) {
        assert!(is_ca(c), "{case}: certificate {i} of the chain is not a CA");
        assert!(
            uri_sans(c).is_empty(),
            "{case}: certificate {i} names {:?}",
            uri_sans(c)
        );
    }
    // Every `spiffe://` in the certificates' bytes is the node's URI SAN, nowhere else.
    let occurrences: usize = chain.iter().map(|c| session::spiffe_strings(c).len()).sum();
    assert_eq!(
        occurrences, 1,
        "{case}: the certificates contain `spiffe://` {occurrences} times"
    );
}

/// One way to knock at a session port without a certificate.
struct Case {
    name: &'static str,
    server_name: String,
    /// ALPN offered.
    alpn: Vec<Vec<u8>>,
    /// Whether TLS gets as far as the server's certificate.
    tls: bool,
    /// The reasons the server may record.
    reasons: &'static [&'static str],
}

/// A TLS client with no certificate, on node-1, at node-2's session address: with the session
/// server name and with version 1's server name for the server pod (which named the workload
/// whose SVID a version 1 responder presented). It must be sent node-2's node SVID and nothing
/// else, learn no workload identity in any byte, and be refused; node-2 goes on authenticating
/// real pods.
#[test]
fn an_unauthenticated_tls_client_learns_no_workload_identity() {
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
            ..Options::default()
        },
    );
    let s = scenario(&tb);
    wait_ready(&s, &["node-1", "node-2"]);
    let target = session_addr(&tb, "node-2");
    let workloads = workload_ids(&tb);
    assert_eq!(workloads.len(), 2, "{workloads:?}");
    let v1_name = session::v1_server_name(IpAddr::V4(tb.pod("server").ipv4));
    let ns = tb.node("node-1").netns.clone();
    let case = |name: &'static str, sni: &str, alpn: &[&[u8]], tls: bool, reasons| Case {
        name,
        server_name: sni.to_owned(),
        alpn: alpn.iter().map(|a| a.to_vec()).collect(),
        tls,
        reasons,
    };
    let cases = [
        case(
            "session server name, portcullis/2",
            session::SERVER_NAME,
            &[session::ALPN],
            true,
            &["no_certificate", "tls"],
        ),
        case(
            "version 1 name of the server pod, portcullis/2",
            &v1_name,
            &[session::ALPN],
            true,
            &["no_certificate", "tls"],
        ),
        case(
            "version 1 name of the server pod, portcullis/1",
            &v1_name,
            &[session::ALPN_V1],
            false,
            &["version"],
        ),
        case(
            "version 1 name of the server pod, no ALPN",
            &v1_name,
            &[],
            false,
            &["version"],
        ),
    ];
    let mut report = Vec::new();
    for Case {
        name: case,
        server_name: name,
        alpn,
        tls: tls_expected,
        reasons,
    } in cases
    {
        let how = Connect {
            netns: Some(ns.clone()),
            server_name: name.clone(),
            alpn,
            identity: None,
            timeout: Duration::from_secs(5),
        };
        let mut c = Session::connect(target, &how).unwrap_or_else(|e| panic!("{case}: {e:#}"));
        let handshake = c.handshake();
        // A refused client may still try to talk: nothing must come back but the end.
        let ended = if handshake.is_ok() {
            let _ = c.send_frame(session::KIND_PROVE, &json!({"id": 1}));
            c.read_until_closed(Duration::from_secs(5))
        } else {
            None
        };
        let certs: Vec<Vec<u8>> = c.server_certs().iter().map(|d| d.to_vec()).collect();
        let raw = c.raw_received();
        let plain = c.plaintext_received().to_vec();
        eprintln!(
            "{case}: handshake {:?}, then {ended:?}; {} certificates, {} bytes received, {} bytes of application data",
            handshake.as_ref().map_err(|e| format!("{e:#}")),
            certs.len(),
            raw.len(),
            plain.len()
        );
        if tls_expected {
            assert!(
                handshake.is_ok(),
                "{case}: the TLS handshake did not reach its end on the client's side: {handshake:?}"
            );
            assert_node_svid(&tb, &s, "node-2", &certs, case);
            let ended = ended.as_deref().unwrap_or_else(|| {
                panic!("{case}: the server kept an unauthenticated session open")
            });
            assert!(
                ended.contains("TLS") || ended.contains("Eof") || ended.contains("Reset"),
                "{case}: the session ended with {ended}"
            );
        } else {
            assert!(
                certs.is_empty(),
                "{case}: the server presented certificates before agreeing to portcullis/2"
            );
            assert!(handshake.is_err(), "{case}: the TLS handshake completed");
        }
        assert!(
            plain.is_empty(),
            "{case}: the server sent application data to an unauthenticated client: {:?}",
            String::from_utf8_lossy(&plain)
        );
        // Outside the (decrypted) certificates, no byte received names any identity at all;
        // in them, only node-2's node SVID does.
        let in_clear = session::spiffe_strings(&raw).len() + session::spiffe_strings(&plain).len();
        assert_eq!(in_clear, 0, "{case}: `spiffe://` in the bytes received");
        let named: Vec<String> = certs.iter().flat_map(|c| uri_sans(c)).collect();
        assert!(
            named.iter().all(|id| *id == node_id("node-2")),
            "{case}: the certificates name {named:?}"
        );
        for w in &workloads {
            let contains = |b: &[u8]| b.windows(w.len()).any(|x| x == w.as_bytes());
            assert!(
                !contains(&raw) && !contains(&plain) && !certs.iter().any(|c| contains(c)),
                "{case}: the client learnt {w}"
            );
        }
        // node-2's record of the refused session, by the client's own TCP address.
        let peer = c.local_addr();
        assert_eq!(peer.ip(), IpAddr::V4(tb.node("node-1").ipv4), "{case}");
        let mut recs = Vec::new();
        let recorded = eventually(Duration::from_secs(5), || {
            recs = session_records(&s, "node-2", peer);
            !recs.is_empty()
        });
        assert!(
            recorded,
            "{case}: node-2 has no session record for {peer}: {:?}",
            handshakes(&s, "node-2")
        );
        assert_eq!(recs.len(), 1, "{case}: {recs:?}");
        let r = &recs[0];
        assert_eq!(r["role"], "responder", "{case}: {r}");
        assert_eq!(r["result"], "failed", "{case}: {r}");
        assert!(
            reasons.iter().any(|x| r["reason"] == *x),
            "{case}: refused with {}, not one of {reasons:?}: {r}",
            r["reason"]
        );
        assert!(
            r["local"].is_null() && r["remote"].is_null(),
            "{case}: the record names identities: {r}"
        );
        report.push(json!({
            "case": case,
            "server_name": name,
            "certificates": certs.len(),
            "bytes_received": raw.len(),
            "ended": ended,
            "node_2_reason": r["reason"],
            "workload_ids_learnt": 0,
        }));
    }
    eprintln!(
        "unauthenticated clients: {}",
        serde_json::to_string_pretty(&report).unwrap()
    );
    // node-2 still authenticates real pods.
    let _server = s.serve("server", PORT);
    let r = s.connect("client", s.addr("server", Family::V4), PORT, 5000);
    assert!(ok(&r), "client → server after the attempts: {r}");
    let (client, server) = (s.identity("client"), s.identity("server"));
    assert!(
        eventually(Duration::from_secs(5), || has_entry(
            &s, "node-2", &server, &client, "node-1"
        )),
        "node-2 has no entry for the real pair: {:?}",
        entries(&s, "node-2")
    );
}

/// What root on a node can take: a fresh join token for the node (the agent's own was spent
/// when it joined, and a node SVID lives in the agent's memory only; a root attacker reads
/// either), its node SVID, and the SVID of an identity the issuer signs for that node. All of
/// it from inside the node's network namespace, as the node would.
struct Stolen {
    node_svid: Identity,
    workload: Identity,
}

fn steal(tb: &Testbed, node: &str, identity: &str, refused_identity: Option<&str>) -> Stolen {
    let ns = tb.node(node).netns.clone();
    let iss = Testbed::issuer_addr(0);
    // The token file the agent joined with is spent.
    let spent = std::fs::read_to_string(tb.join_token_path(node)).expect("reading the token file");
    let answer = session::in_netns(&ns, || issuer::join(iss, TD, node, spent.trim()))
        .expect("joining with the spent token");
    assert_eq!(issuer::outcome(&answer.0), "token_used", "{}", answer.0);
    // A fresh one, where the node reads it (as the operator provisions a node).
    let token = tb.enroll(node).expect("enrolling");
    std::fs::write(tb.join_token_path(node), format!("{token}\n")).expect("writing the token");
    let token = std::fs::read_to_string(tb.join_token_path(node)).expect("reading the token");
    let (answer, key) =
        session::in_netns(&ns, || issuer::join(iss, TD, node, token.trim())).expect("joining");
    assert_eq!(
        issuer::outcome(&answer),
        "signed",
        "{node} could not join: {answer}"
    );
    let node_cred = issuer::credential(&answer, &key).expect("node credential");
    let ask = |id: &str| {
        let (key, csr) = issuer::csr(id, |_| {});
        let answer = session::in_netns(&ns, || {
            issuer::Session::open(iss, Some(&node_cred))?
                .ask(&json!({"op": "sign", "identity": id, "csr": csr}))
        })
        .expect("asking the issuer");
        (answer, key)
    };
    let (answer, key) = ask(identity);
    assert_eq!(
        issuer::outcome(&answer),
        "signed",
        "the issuer did not sign {identity} for {node}: {answer}"
    );
    let workload_cred: Credential = issuer::credential(&answer, &key).expect("workload credential");
    if let Some(other) = refused_identity {
        let (answer, _) = ask(other);
        assert_eq!(issuer::outcome(&answer), "not_on_node", "{answer}");
    }
    let stolen = Stolen {
        node_svid: Identity::from_credential(&node_cred).expect("node SVID"),
        workload: Identity::from_credential(&workload_cred).expect("workload SVID"),
    };
    assert_eq!(stolen.node_svid.spiffe_id().unwrap(), node_id(node));
    assert_eq!(stolen.workload.spiffe_id().unwrap(), identity);
    stolen
}

/// node-3 is compromised: its agent is stopped and root on it holds node-3's node SVID and an
/// SVID of `web` (the issuer signs it for node-3, which runs web-3; node-1 runs web-1, of the
/// same identity). node-1's agent is stopped too, so that nothing honest ever proves web-1 to
/// node-2. From node-3's namespace, and then from node-1's (its TCP source address is node-1's),
/// the attacker opens a session to node-2 with node-3's node SVID and proves web at web-1's
/// addresses, correctly signed: node-2 refuses every proof with `node_mismatch`, writes no
/// entry, and web-1's connections to the server stay dropped. The same sessions prove web-3
/// (which is on node-3) successfully: the client is right, and it is the node check that holds.
#[test]
fn a_node_cannot_prove_a_workload_that_cluster_state_places_on_another_node() {
    let web = || PodSpec::new("web").service_account("web");
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![PodSpec {
                    name: "web-1".into(),
                    ..web()
                }],
            ),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
            NodeSpec::new(
                "node-3",
                vec![PodSpec {
                    name: "web-3".into(),
                    ..web()
                }],
            ),
        ],
    };
    let mut tb = up(
        &spec,
        &Options {
            authenticate: true,
            issuer_replicas: 1,
            // Nothing authenticates a pair before a connection asks.
            proactive: Some(false),
            // Edited below to show the entry with connection MACs off.
            policy: Some("syn_mac: require\n".into()),
            ..Options::default()
        },
    );
    let s = scenario(&tb);
    wait_ready(&s, &["node-1", "node-2", "node-3"]);
    drop(s);
    tb.stop_agent("node-1").expect("stopping node-1's agent");
    tb.stop_agent("node-3").expect("stopping node-3's agent");
    let s = scenario(&tb);
    let (web_id, server_id) = (s.identity("web-1"), s.identity("server"));
    assert_eq!(web_id, s.identity("web-3"));
    let stolen = steal(&tb, "node-3", &web_id, Some(&server_id));
    let target = session_addr(&tb, "node-2");
    let before = s.status("node-2");

    // The forgeries: web-1's addresses, from node-3's and node-1's namespaces, the transcript
    // naming node-3 (what node-2 computes, so the signature is right for this session) or
    // node-1 (what the forger would like node-2 to believe).
    let mut tried = 0;
    let mut answers: Vec<Value> = Vec::new();
    let mut got_through = 0;
    let mut sessions = Vec::new();
    for origin in ["node-3", "node-1"] {
        let ns = tb.node(origin).netns.clone();
        let mut c = Session::open(
            target,
            &Connect::node(Some(&ns), Some(stolen.node_svid.clone())),
        )
        .unwrap_or_else(|e| panic!("a session from {origin}'s namespace: {e:#}"));
        assert_eq!(
            c.local_addr().ip(),
            IpAddr::V4(tb.node(origin).ipv4),
            "the session's source address"
        );
        let certs: Vec<Vec<u8>> = c.server_certs().iter().map(|d| d.to_vec()).collect();
        assert_node_svid(&tb, &s, "node-2", &certs, "node-2's session certificate");
        sessions.push(c.local_addr());
        for family in [Family::V4, Family::V6] {
            for claimed in ["node-3", "node-1"] {
                let p = Proof {
                    initiator_addr: s.addr("web-1", family),
                    responder_addr: s.addr("server", family),
                    responder_id: server_id.clone(),
                    initiator_node: claimed.to_owned(),
                    responder_node: "node-2".to_owned(),
                };
                tried += 1;
                let (_, answer) = c
                    .prove(&stolen.workload, &p)
                    .unwrap_or_else(|e| panic!("sending a proof: {e:#}"));
                let case = format!(
                    "from {origin}'s address, web-1 at {}, transcript naming {claimed}",
                    p.initiator_addr
                );
                eprintln!("{case}: {}", answer.summary());
                if matches!(answer, Answer::Proven { .. }) {
                    got_through += 1;
                }
                answers.push(json!({"case": case, "answer": answer.summary()}));
                assert!(
                    matches!(&answer, Answer::Refuse { reason, .. } if reason == "node_mismatch"),
                    "{case}: answered {}",
                    answer.summary()
                );
            }
        }
    }
    // node-2's side: both sessions were node-3's, every proof refused for the node.
    for peer in &sessions {
        let recs = session_records(&s, "node-2", *peer);
        assert!(
            recs.iter().any(|r| r["role"] == "responder"
                && r["result"] == "ok"
                && r["remote_node"] == "node-3"
                && r["remote"] == node_id("node-3")),
            "node-2's session record for {peer}: {recs:?}"
        );
    }
    let refused = |s: &Scenario<'_>| {
        handshakes(s, "node-2")
            .into_iter()
            .filter(|h| {
                h["stage"] == "proof"
                    && h["role"] == "responder"
                    && h["result"] == "failed"
                    && h["reason"] == "node_mismatch"
                    && h["remote_node"] == "node-3"
            })
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(5), || refused(&s).len() == tried),
        "node-2 recorded {} node_mismatch refusals of {tried}: {:?}",
        refused(&s).len(),
        handshakes(&s, "node-2")
    );
    assert!(
        refused(&s).iter().all(|h| h["detail"]
            .as_str()
            .is_some_and(|d| d.contains("node-1") && d.contains("node-3"))),
        "the refusals do not say where cluster state puts web-1: {:?}",
        refused(&s)
    );
    let forged_entries: Vec<Value> = entries(&s, "node-2")
        .into_iter()
        .filter(|e| e["local"] == server_id && e["remote"] == web_id)
        .collect();
    got_through += forged_entries.len();
    assert!(
        forged_entries.is_empty(),
        "node-2 wrote entries for the forged pair: {forged_entries:?}"
    );
    // web-1's connections reach node-2 and are dropped there for want of an entry.
    let _server = s.serve("server", PORT);
    for family in [Family::V4, Family::V6] {
        let r = s.connect("web-1", s.addr("server", family), PORT, 1500);
        if ok(&r) {
            got_through += 1;
        }
        assert!(!ok(&r), "{family:?}: web-1 reached the server: {r}");
    }
    let drops = |st: &Value| st["counters"]["drop_no_auth"].as_u64().unwrap_or(0);
    assert!(
        drops(&s.status("node-2")) > drops(&before),
        "web-1's SYNs were not dropped by node-2"
    );
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "forged_proofs": tried,
            "answers": answers,
            "got_through": got_through,
        }))
        .unwrap()
    );
    assert_eq!(got_through, 0, "forgeries that got through");

    // The control: the same client, the same stolen credentials, proving web-3 (which cluster
    // state does put on node-3) from both addresses, is answered Proven, with a responder proof
    // that checks out.
    let bundle = std::fs::read_to_string(tb.bundle_path()).expect("reading the bundle");
    for origin in ["node-3", "node-1"] {
        let ns = tb.node(origin).netns.clone();
        let mut c = Session::open(
            target,
            &Connect::node(Some(&ns), Some(stolen.node_svid.clone())),
        )
        .unwrap_or_else(|e| panic!("a session from {origin}'s namespace: {e:#}"));
        let p = Proof {
            initiator_addr: s.addr("web-3", Family::V4),
            responder_addr: s.addr("server", Family::V4),
            responder_id: server_id.clone(),
            initiator_node: "node-3".to_owned(),
            responder_node: "node-2".to_owned(),
        };
        let (sent, answer) = c.prove(&stolen.workload, &p).expect("sending a proof");
        assert!(
            matches!(answer, Answer::Proven { .. }),
            "from {origin}'s address, web-3: {}",
            answer.summary()
        );
        assert_eq!(
            c.check_proven(&sent, &answer).expect("checking the Proven"),
            server_id
        );
        if let Answer::Proven { chain, .. } = &answer {
            session::chain_trusted(&bundle, chain).expect("the responder's chain");
        }
        eprintln!("control, from {origin}'s address, web-3: proven by {server_id}");
    }
    assert!(
        eventually(Duration::from_secs(5), || has_entry(
            &s, "node-2", &server_id, &web_id, "node-3"
        )),
        "node-2 did not write the entry for web-3: {:?}",
        entries(&s, "node-2")
    );
    // The entry holds the pair keys of the attacker's proof, which node-3's kernel does not
    // hold (its agent is stopped): web-3's SYN reaches node-2 unsigned and is dropped.
    let before_mac = counter(&s.status("node-2"), "drop_no_mac");
    let r = s.connect("web-3", s.addr("server", Family::V4), PORT, 1500);
    assert!(!ok(&r), "web-3 got in without a connection MAC: {r}");
    assert!(
        counter(&s.status("node-2"), "drop_no_mac") > before_mac,
        "web-3's unsigned SYN was not counted as drop_no_mac"
    );
    // Without connection MACs, the entry is node-3's pods' (the kernel takes the remote node
    // from the source address): web-3 gets in, web-1 still does not.
    tb.set_policy("syn_mac: off\n")
        .expect("turning connection MACs off");
    assert!(
        eventually(Duration::from_secs(5), || ok(&s.connect(
            "web-3",
            s.addr("server", Family::V4),
            PORT,
            1000
        ))),
        "web-3 → server with node-2's entry and syn_mac off"
    );
    let r = s.connect("web-1", s.addr("server", Family::V4), PORT, 1500);
    assert!(!ok(&r), "web-1 got in on node-3's entry: {r}");
    tb.set_policy("syn_mac: require\n")
        .expect("turning connection MACs on again");
    assert!(
        !has_entry(&s, "node-2", &server_id, &web_id, "node-1"),
        "{:?}",
        entries(&s, "node-2")
    );
    // node-2 still authenticates node-1's pods once node-1's own agent proves them.
    drop(s);
    tb.start_agent("node-1").expect("restarting node-1's agent");
    let s = scenario(&tb);
    wait_ready(&s, &["node-1"]);
    let r = s.connect("web-1", s.addr("server", Family::V4), PORT, 5000);
    assert!(ok(&r), "web-1 → server through node-1's own agent: {r}");
    assert!(
        has_entry(&s, "node-2", &server_id, &web_id, "node-1"),
        "{:?}",
        entries(&s, "node-2")
    );
}

/// A session must be opened with a node SVID: a workload SVID, valid and trusted, is refused
/// `not_a_node` before any proof is read.
#[test]
fn a_session_opened_with_a_workload_svid_is_refused() {
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
            issuer_replicas: 1,
            proactive: Some(false),
            ..Options::default()
        },
    );
    let s = scenario(&tb);
    wait_ready(&s, &["node-1", "node-2"]);
    let (client_id, server_id) = (s.identity("client"), s.identity("server"));
    let stolen = steal(&tb, "node-1", &client_id, None);
    let target = session_addr(&tb, "node-2");
    let ns = tb.node("node-1").netns.clone();
    let mut c = Session::connect(
        target,
        &Connect::node(Some(&ns), Some(stolen.workload.clone())),
    )
    .expect("connecting");
    let handshake = c.handshake();
    assert!(
        handshake.is_ok(),
        "the TLS handshake with a trusted workload SVID: {handshake:?}"
    );
    let p = Proof {
        initiator_addr: s.addr("client", Family::V4),
        responder_addr: s.addr("server", Family::V4),
        responder_id: server_id.clone(),
        initiator_node: "node-1".to_owned(),
        responder_node: "node-2".to_owned(),
    };
    let answer = match c.prove_frame(&stolen.workload, &p) {
        Ok((sent, body)) => match c.send_frame(session::KIND_PROVE, &body) {
            Ok(()) => c.answer_to(sent.id),
            Err(e) => Answer::Closed(format!("{e:#}")),
        },
        Err(e) => panic!("building the proof: {e:#}"),
    };
    eprintln!(
        "a session with the workload SVID of {client_id}: {}",
        answer.summary()
    );
    assert!(
        matches!(answer, Answer::Closed(_)),
        "a proof was answered in a session opened with a workload SVID: {}",
        answer.summary()
    );
    let certs: Vec<Vec<u8>> = c.server_certs().iter().map(|d| d.to_vec()).collect();
    assert_node_svid(&tb, &s, "node-2", &certs, "node-2's session certificate");
    let peer = c.local_addr();
    let mut recs = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            recs = session_records(&s, "node-2", peer);
            !recs.is_empty()
        }),
        "node-2 has no record of the session from {peer}: {:?}",
        handshakes(&s, "node-2")
    );
    let r = &recs[0];
    assert!(
        r["role"] == "responder"
            && r["result"] == "failed"
            && r["reason"] == "not_a_node"
            && r["remote"] == client_id,
        "{r}"
    );
    assert!(
        !handshakes(&s, "node-2")
            .iter()
            .any(|h| h["stage"] == "proof" && h["role"] == "responder"),
        "node-2 read a proof: {:?}",
        handshakes(&s, "node-2")
    );
    assert!(
        !has_entry(&s, "node-2", &server_id, &client_id, "node-1"),
        "{:?}",
        entries(&s, "node-2")
    );
    // The node SVID of the same node opens a session (the refusal was the certificate's kind).
    let c = Session::open(
        target,
        &Connect::node(Some(&ns), Some(stolen.node_svid.clone())),
    )
    .expect("a session with node-1's node SVID");
    let peer = c.local_addr();
    assert!(
        eventually(Duration::from_secs(5), || session_records(
            &s, "node-2", peer
        )
        .iter()
        .any(|r| r["result"] == "ok" && r["remote_node"] == "node-1")),
        "{:?}",
        handshakes(&s, "node-2")
    );
}
