//! The SVID issuer: it signs an SVID for identity X to node N only if cluster state places a
//! workload with identity X on N, and refuses everything else with a reason in its audit log.
//! The first tests attack a real issuer process on loopback with a client of their own (real
//! TLS, keys and CSRs made in the test); the testbed tests run agents whose only source of
//! SVIDs is a pair of issuer replicas holding the only copy of the CA key. Privileged (the
//! testbed tests need root): run with `cargo xtask test`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    ClusterFile, ClusterNode, NodeSpec, Options, PodSpec, Spec, Testbed, Workload,
    issuer::{self, Credential, Session, Standalone},
    scenario::{Family, Scenario, eventually, ok},
};

const TD: &str = "cluster.local";
const DB: &str = "spiffe://cluster.local/ns/prod/sa/db";
const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";

fn bin() -> PathBuf {
    PathBuf::from(
        std::env::var_os("PORTCULLIS_BIN").expect("PORTCULLIS_BIN: run through `cargo xtask test`"),
    )
}

fn node(name: &str, i: u8) -> ClusterNode {
    ClusterNode {
        name: name.into(),
        address: SocketAddr::new(std::net::Ipv4Addr::new(198, 18, 0, i).into(), 4181),
        extra: Default::default(),
    }
}

fn workload(name: &str, sa: &str, node: &str, addr: &str) -> Workload {
    Workload {
        name: name.into(),
        namespace: "prod".into(),
        service_account: sa.into(),
        node: node.into(),
        addresses: vec![addr.parse().unwrap()],
        spiffe_id: None,
        extra: Default::default(),
    }
}

/// Three nodes; web runs on node-1, db only on node-2.
fn cluster(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.yaml");
    ClusterFile {
        trust_domain: TD.into(),
        nodes: vec![node("node-1", 1), node("node-2", 2), node("node-3", 3)],
        workloads: vec![
            workload("web-0", "web", "node-1", "198.18.1.2"),
            workload("db-0", "db", "node-2", "198.18.2.2"),
        ],
        extra: Default::default(),
    }
    .store(&path)
    .unwrap();
    path
}

fn standalone(dir: &Path, extra: &str) -> Standalone {
    Standalone::make_ca(&bin(), dir, TD).unwrap();
    let state = cluster(dir);
    Standalone::bootstrap(&bin(), dir, &state, extra).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A node joins with a fresh join token and returns its node SVID.
fn joined(iss: &Standalone, name: &str) -> Credential {
    let token = iss.enroll(name, None).unwrap();
    let (answer, key) = issuer::join(iss.addr, TD, name, &token).unwrap();
    assert_eq!(
        issuer::outcome(&answer),
        "signed",
        "{name} could not join: {answer}"
    );
    issuer::credential(&answer, &key).unwrap()
}

fn leaf_facts(chain_pem: &str) -> (Vec<String>, bool, u64) {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let names = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect()
        })
        .unwrap_or_default();
    let ca = cert
        .basic_constraints()
        .unwrap()
        .is_some_and(|b| b.value.ca);
    let life = u64::try_from(
        cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(),
    )
    .unwrap();
    (names, ca, life)
}

/// What an attacker tried and got: every attempt must be refused with `code`, and show in the
/// audit log.
#[derive(Default)]
struct Tally {
    tried: usize,
    got: usize,
}

impl Tally {
    fn expect(&mut self, what: &str, answer: &Value, code: &str) {
        self.tried += 1;
        if issuer::outcome(answer) == "signed" {
            self.got += 1;
        }
        assert_eq!(issuer::outcome(answer), code, "{what}: {answer}");
        assert!(
            answer["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{what}: no reason: {answer}"
        );
    }
}

#[test]
fn the_issuer_signs_for_a_workload_on_the_asking_node_and_refuses_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let iss = standalone(dir.path(), "");
    let node2 = joined(&iss, "node-2");

    // The honest case: db runs on node-2. The certificate is built by the issuer: one name,
    // not a CA, a one-hour life.
    let answer = issuer::sign(iss.addr, Some(&node2), DB).unwrap();
    assert_eq!(issuer::outcome(&answer), "signed", "{answer}");
    let (names, ca, life) = leaf_facts(answer["chain"].as_str().unwrap());
    assert_eq!(names, vec![format!("URI(\"{DB}\")")]);
    assert!(!ca);
    assert!((3600..=3660).contains(&life), "lifetime {life} s");

    let mut t = Tally::default();
    t.expect(
        "web runs on node-1 only",
        &issuer::sign(iss.addr, Some(&node2), WEB).unwrap(),
        "not_on_node",
    );
    t.expect(
        "nobody runs this identity",
        &issuer::sign(
            iss.addr,
            Some(&node2),
            "spiffe://cluster.local/ns/prod/sa/admin",
        )
        .unwrap(),
        "no_such_identity",
    );
    t.expect(
        "no client certificate",
        &issuer::sign(iss.addr, None, DB).unwrap(),
        "no_credential",
    );
    t.expect(
        "a node SVID through the workload route",
        &issuer::sign(
            iss.addr,
            Some(&node2),
            "spiffe://cluster.local/portcullis/node/node-1",
        )
        .unwrap(),
        "bad_identity",
    );

    // A credential of the attacker's own making: a CA of its own, a leaf naming node-2.
    let rogue = tempfile::tempdir().unwrap();
    Standalone::make_ca(&bin(), rogue.path(), TD).unwrap();
    let mut c = std::process::Command::new(bin());
    c.args(["ca", "issue", "--ca"])
        .arg(rogue.path().join("ca"))
        .args([
            "--spiffe-id",
            "spiffe://cluster.local/portcullis/node/node-2",
            "--out",
        ])
        .arg(rogue.path().join("leaf"));
    assert!(c.status().unwrap().success());
    let forged = Credential {
        chain_pem: std::fs::read_to_string(rogue.path().join("leaf/svid.pem")).unwrap(),
        key_pem: std::fs::read_to_string(rogue.path().join("leaf/svid.key")).unwrap(),
    };
    t.expect(
        "a node SVID from another CA",
        &issuer::sign(iss.addr, Some(&forged), DB).unwrap(),
        "bad_credential",
    );

    // CSRs asking for more than the one name.
    let ask = |csr: String| {
        Session::open(iss.addr, Some(&node2))
            .unwrap()
            .ask(&json!({"op": "sign", "identity": DB, "csr": csr}))
            .unwrap()
    };
    let (_, extra) = issuer::csr(DB, |p| {
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/prod/sa/web".try_into().unwrap(),
        ));
    });
    t.expect("a CSR with an extra SAN", &ask(extra), "csr_extra_names");
    let (_, dns) = issuer::csr(DB, |p| {
        p.subject_alt_names
            .push(rcgen::SanType::DnsName("db.prod".try_into().unwrap()));
    });
    t.expect("a CSR with a DNS SAN", &ask(dns), "csr_extra_names");
    let (_, ca) = issuer::csr(DB, |p| {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    });
    t.expect("a CSR asking for CA rights", &ask(ca), "csr_ca_rights");
    let (_, signer) = issuer::csr(DB, |p| {
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign]
    });
    t.expect(
        "a CSR asking to sign certificates",
        &ask(signer),
        "csr_ca_rights",
    );

    // Join tokens: single use, bound to their node, unforgeable.
    let token = iss.enroll("node-3", None).unwrap();
    let (first, _) = issuer::join(iss.addr, TD, "node-3", &token).unwrap();
    assert_eq!(issuer::outcome(&first), "signed", "{first}");
    t.expect(
        "a replayed join token",
        &issuer::join(iss.addr, TD, "node-3", &token).unwrap().0,
        "token_used",
    );
    let other = iss.enroll("node-1", None).unwrap();
    t.expect(
        "node-1's token used for node-2",
        &issuer::join(iss.addr, TD, "node-2", &other).unwrap().0,
        "token_node",
    );
    let mut bytes = other.into_bytes();
    let last = bytes.len() - 1;
    bytes[last] = if bytes[last] == b'0' { b'1' } else { b'0' };
    let forged_token = String::from_utf8(bytes).unwrap();
    t.expect(
        "a forged join token",
        &issuer::join(iss.addr, TD, "node-1", &forged_token)
            .unwrap()
            .0,
        "token_unknown",
    );
    t.expect(
        "a join for a node not in cluster state",
        &issuer::join(iss.addr, TD, "node-9", &iss.enroll("node-9", None).unwrap())
            .unwrap()
            .0,
        "unknown_node",
    );
    let short = iss.enroll("node-1", Some("1s")).unwrap();
    thread::sleep(Duration::from_millis(2100));
    t.expect(
        "an expired join token",
        &issuer::join(iss.addr, TD, "node-1", &short).unwrap().0,
        "token_expired",
    );
    eprintln!(
        "attacker: {} attempts, {} certificates obtained",
        t.tried, t.got
    );
    assert_eq!(t.got, 0);

    // Every decision is an audit record with its node, identity, result and reason.
    let records = issuer::audit_records(&iss.audit);
    let refused: Vec<&Value> = records
        .iter()
        .filter(|r| r["result"] == "refused")
        .collect();
    assert_eq!(
        refused.len(),
        t.tried,
        "one audit record per refusal: {records:#?}"
    );
    assert!(
        refused
            .iter()
            .all(|r| !r["reason"].as_str().unwrap_or("").is_empty())
    );
    assert!(
        records
            .iter()
            .any(|r| r["result"] == "signed" && r["node"] == "node-2" && r["identity"] == DB),
        "{records:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r["code"] == "not_on_node" && r["node"] == "node-2" && r["identity"] == WEB),
        "{records:#?}"
    );
}

/// Root on node-3: it holds node-3's credential, and has stolen node-2's node SVID after it
/// expired; node-2 is then deleted from cluster state.
#[test]
fn a_compromised_node_gets_nothing_that_belongs_to_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let iss = standalone(dir.path(), "node_svid_ttl_secs: 10\n");
    let node3 = joined(&iss, "node-3");
    let stolen = joined(&iss, "node-2");
    let mut t = Tally::default();
    t.expect(
        "node-3 asks for db, which runs on node-2 only",
        &issuer::sign(iss.addr, Some(&node3), DB).unwrap(),
        "not_on_node",
    );
    // The stolen SVID works while valid (it is node-2's): it is the expiry that must hold.
    thread::sleep(Duration::from_secs(11));
    t.expect(
        "node-3 presents node-2's expired node SVID",
        &issuer::sign(iss.addr, Some(&stolen), DB).unwrap(),
        "bad_credential",
    );
    let renew = |cred: &Credential| {
        let (_, csr) = issuer::csr("spiffe://cluster.local/portcullis/node/node-2", |_| {});
        Session::open(iss.addr, Some(cred))
            .unwrap()
            .ask(&json!({"op": "renew_node", "csr": csr}))
            .unwrap()
    };
    t.expect(
        "renewing an expired node SVID",
        &renew(&stolen),
        "bad_credential",
    );

    // A valid node SVID of a node deleted from cluster state buys nothing.
    let node2 = joined(&iss, "node-2");
    let path = dir.path().join("cluster.yaml");
    let mut c = ClusterFile::load(&path).unwrap();
    c.nodes.retain(|n| n.name != "node-2");
    c.workloads.retain(|w| w.node != "node-2");
    c.store(&path).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            issuer::outcome(&issuer::sign(iss.addr, Some(&node2), DB).unwrap()) != "signed"
        }),
        "the issuer kept signing for a deleted node"
    );
    t.expect(
        "a deleted node asks for a workload SVID",
        &issuer::sign(iss.addr, Some(&node2), DB).unwrap(),
        "unknown_node",
    );
    t.expect(
        "a deleted node renews its node SVID",
        &renew(&node2),
        "unknown_node",
    );
    eprintln!(
        "compromised node-3: {} attempts, {} certificates obtained",
        t.tried, t.got
    );
    assert_eq!(t.got, 0);
    let records = issuer::audit_records(&iss.audit);
    assert!(
        records.iter().any(|r| r["code"] == "bad_credential"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("node/node-2"))),
        "the audit record names the credential presented: {records:#?}"
    );
}

fn up(replicas: usize, ttl: Option<u64>, proactive: Option<bool>) -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the testbed tests need root; run them with `cargo xtask test` as root"
    );
    let spec = Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new(
                "node-2",
                vec![PodSpec::new("server"), PodSpec::new("server2")],
            ),
        ],
    };
    Testbed::up(
        &spec,
        &Options {
            authenticate: true,
            issuer_replicas: replicas,
            svid_ttl_secs: ttl,
            proactive,
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

fn serials(s: &Scenario<'_>, node: &str) -> Vec<String> {
    s.status(node)["identities"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i["serial"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

#[test]
fn agents_get_their_svids_from_the_issuer_and_no_agent_can_reach_the_ca_key() {
    let tb = up(2, None, None);
    let s = scenario(&tb);
    let _server = s.serve("server", 8080);
    let r = s.connect("client", s.addr("server", Family::V4), 8080, 5000);
    assert!(ok(&r), "no connection through issuer-signed SVIDs: {r}");
    let st = s.status("node-2");
    assert_eq!(st["agent"]["identity_source"], "issuer", "{st}");
    assert!(st["node_svid_not_after_unix"].as_u64().is_some(), "{st}");
    assert_eq!(st["identities"].as_array().map(Vec::len), Some(2), "{st}");

    // The issuer's own probes and metrics (replica 0 serves them on 127.0.0.1:9470 in its
    // namespace): every decision is counted.
    let get = |path: &str| {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/9470; printf 'GET {path} HTTP/1.1\\r\\nHost: issuer\\r\\n\\r\\n' >&3; cat <&3"
        );
        let cg = tb.info().cgroup_root.join("issuer");
        let out = testbed::command_in(
            &tb.issuer_netns(),
            &cg,
            &["timeout", "10", "bash", "-c", &script],
        )
        .unwrap()
        .output()
        .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        get("/readyz").starts_with("HTTP/1.1 200"),
        "{}",
        get("/readyz")
    );
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics");
    assert!(
        metrics
            .contains("portcullis_issuer_decisions_total{op=\"sign\",result=\"signed\",code=\"\"}")
            && metrics.contains("portcullis_issuer_ready 1"),
        "{metrics}"
    );

    // The key exists, inside the issuers' mount namespace only.
    let keeper = tb.issuer_keeper_pid().unwrap();
    let ca_dir = tb.issuer_ca_dir();
    let inside = PathBuf::from(format!("/proc/{keeper}/root"))
        .join(ca_dir.strip_prefix("/").unwrap())
        .join("ca/ca.key");
    let key =
        std::fs::read_to_string(&inside).unwrap_or_else(|e| panic!("{}: {e}", inside.display()));
    assert!(key.contains("PRIVATE KEY"));
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        std::fs::read_dir(&ca_dir).unwrap().next().is_none(),
        "{} is not empty outside the issuers' mount namespace",
        ca_dir.display()
    );
    // No file of the testbed holds it: configs, bundle, cluster state, tokens, logs.
    let mut files = Vec::new();
    files_under(tb.state_dir(), &mut files);
    assert!(files.len() > 5, "{files:?}");
    for f in &files {
        let text = std::fs::read(f).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        assert!(
            !text.contains(&key_body[..64]),
            "{} holds the CA key",
            f.display()
        );
        assert!(
            !text.contains("ca.key") || f.starts_with(tb.issuer_dir()),
            "{} names the CA key",
            f.display()
        );
    }
    // No agent has the issuers' mount in its view, nor an open file under it.
    for node in ["node-1", "node-2"] {
        let pid = tb.info().agent_pid(node).expect("agent pid");
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        assert!(
            !mounts.contains(&*ca_dir.to_string_lossy()),
            "the agent of {node} sees the CA mount"
        );
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                assert!(
                    !target.starts_with(&ca_dir),
                    "the agent of {node} has {} open",
                    target.display()
                );
            }
        }
    }
}

/// Short SVIDs (20 s, renewed at 10 s) and both replicas killed for 13 s: longer than a
/// renewal interval.
#[test]
fn with_the_issuer_down_flows_keep_flowing_and_renewals_resume_when_it_returns() {
    let mut tb = up(2, Some(20), Some(false));
    let s = scenario(&tb);
    let _server = s.serve("server", 8080);
    let _server2 = s.serve("server2", 8081);
    let target = s.addr("server", Family::V4);
    assert!(
        ok(&s.connect("client", target, 8080, 5000)),
        "first connection failed"
    );
    let before = serials(&s, "node-1");
    let transfer = s.transfer("client", target, 8080, 40_000_000, 20, 5000);
    drop(s);
    tb.kill_issuer(0).unwrap();
    tb.kill_issuer(1).unwrap();
    let down_at = Instant::now();
    let s = scenario(&tb);
    thread::sleep(Duration::from_secs(4));
    // A new pair whose SVIDs exist: client → server2 was never authenticated.
    let r = s.connect("client", s.addr("server2", Family::V4), 8081, 5000);
    assert!(
        ok(&r),
        "a new pair with existing SVIDs did not authenticate while the issuer was down: {r}"
    );
    while down_at.elapsed() < Duration::from_secs(13) {
        thread::sleep(Duration::from_millis(200));
    }
    let st = s.status("node-1");
    let problems = st["identity_problems"].to_string();
    assert!(
        problems.contains("no issuer reachable"),
        "the outage is not shown: {problems}"
    );
    assert!(
        st["agent"]["ready"] == true,
        "not ready while SVIDs are valid: {st}"
    );
    drop(s);
    tb.start_issuer(0).unwrap();
    tb.start_issuer(1).unwrap();
    let s = scenario(&tb);
    assert!(
        eventually(Duration::from_secs(6), || {
            let now = serials(&s, "node-1");
            !now.is_empty() && now.iter().all(|x| !before.contains(x))
        }),
        "renewals did not resume: serials {before:?} → {:?}",
        serials(&s, "node-1")
    );
    let result = transfer.finish();
    assert!(
        ok(&result),
        "the transfer did not survive the outage: {result}"
    );
    assert!(
        ok(&s.connect("client", target, 8080, 2000)),
        "a connection after the outage failed"
    );
}

#[test]
fn with_two_replicas_one_killed_nothing_is_noticed() {
    let mut tb = up(2, None, None);
    tb.kill_issuer(0).unwrap();
    // A restarted agent joins again and gets every SVID through the replica left.
    tb.stop_agent("node-2").unwrap();
    tb.start_agent("node-2").unwrap();
    let s = scenario(&tb);
    assert!(
        eventually(
            Duration::from_secs(10),
            || s.status("node-2")["agent"]["ready"] == true
        ),
        "the agent of node-2 did not become ready with one replica: {}",
        s.status("node-2")
    );
    let _server = s.serve("server", 8080);
    let r = s.connect("client", s.addr("server", Family::V4), 8080, 5000);
    assert!(ok(&r), "{r}");
    let records = issuer::audit_records(&tb.issuer_audit_log());
    assert!(
        records
            .iter()
            .any(|r| r["op"] == "join" && r["node"] == "node-2" && r["result"] == "signed"),
        "{records:#?}"
    );
}

/// The issuer away for longer than the SVIDs live: they expire and the node is not ready,
/// and once the operator has written a new join token and the issuer is back, the agent
/// proves its node again and recovers, with no restart.
#[test]
fn after_an_outage_longer_than_the_svids_live_a_new_join_token_brings_the_node_back() {
    let mut tb = up(1, Some(10), None);
    let s = scenario(&tb);
    assert!(
        eventually(
            Duration::from_secs(10),
            || s.status("node-1")["agent"]["ready"] == true
        ),
        "not ready at start: {}",
        s.status("node-1")
    );
    drop(s);
    tb.kill_issuer(0).unwrap();
    let s = scenario(&tb);
    assert!(
        eventually(
            Duration::from_secs(20),
            || s.status("node-1")["agent"]["ready"] == false
        ),
        "still ready with every SVID expired: {}",
        s.status("node-1")
    );
    drop(s);
    tb.start_issuer(0).unwrap();
    let s = scenario(&tb);
    // Its node SVID expired and its join token was used: the issuer refuses it.
    assert!(
        eventually(Duration::from_secs(10), || {
            s.status("node-1")["identity_problems"]
                .to_string()
                .contains("token_used")
        }),
        "the refusal of the spent token is not shown: {}",
        s.status("node-1")["identity_problems"]
    );
    let token = tb.enroll("node-1").unwrap();
    std::fs::write(tb.join_token_path("node-1"), format!("{token}\n")).unwrap();
    assert!(
        eventually(
            Duration::from_secs(20),
            || s.status("node-1")["agent"]["ready"] == true
        ),
        "the node did not come back with a new token: {}",
        s.status("node-1")
    );
}
