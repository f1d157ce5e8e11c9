//! The issuer's Kubernetes attestor end to end: a standalone `portcullis issuer` process whose
//! cluster state, TokenReviews and bound-pod reads all come from `testbed::kube_api`, the local
//! server that speaks the Kubernetes API's real wire format, because no real API server runs
//! on these machines. An agent's projected service-account token gets it the SVID of the node
//! its pod runs on and nothing else; every other token, whoever minted it, gets nothing, and
//! each refusal is an audit record. Unprivileged: loopback only, no namespaces.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::{Value, json};
use testbed::{
    issuer::{self, Credential, Session, Standalone},
    kube_api::{FakeApi, Kind, TokenFacts, object_uid, realistic_node, realistic_pod},
};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

const TD: &str = "cluster.local";
/// The attestor's defaults: the agents' service account and the tokens' audience.
const AGENT_NS: &str = "portcullis";
const AGENT_SA: &str = "portcullis";
const AUDIENCE: &str = "portcullis-issuer";
const DB: &str = "spiffe://cluster.local/ns/prod/sa/db";

fn bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_BIN")
        .expect("PORTCULLIS_BIN: run through `cargo xtask test`")
        .into()
}

/// Node `node-<i>` at 198.18.0.i, its pods in 198.18.i.0/24.
fn node_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, i)
}

fn node_id(node: &str) -> String {
    format!("spiffe://{TD}/portcullis/node/{node}")
}

/// An agent pod of the DaemonSet (host network, so its address is its node's) on node-`i`.
fn agent_pod(name: &str, i: u8, k: usize) -> Value {
    let ip = node_ip(i);
    let mut pod = realistic_pod(
        name,
        AGENT_NS,
        &format!("node-{i}"),
        AGENT_SA,
        &[IpAddr::V4(ip)],
        k,
    );
    pod["spec"]["hostNetwork"] = json!(true);
    pod["spec"]["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    pod["status"]["hostIP"] = json!(ip.to_string());
    pod["status"]["hostIPs"] = json!([{"ip": ip.to_string()}]);
    pod
}

/// A projected token of `ns/sa` for `audience`, bound to pod `ns/pod` (with the uid the API
/// server stamps on it unless `pod_uid` says otherwise) and, on clusters from 1.30, to `node`.
fn token(ns: &str, sa: &str, audience: &str, pod: Option<&str>, node: Option<&str>) -> TokenFacts {
    TokenFacts {
        namespace: ns.into(),
        service_account: sa.into(),
        audiences: vec![audience.into()],
        pod_name: pod.map(str::to_owned),
        pod_uid: pod.map(|p| object_uid(Kind::Pod, ns, p)),
        node_name: node.map(str::to_owned),
        node_uid: node.map(|n| object_uid(Kind::Node, "", n)),
    }
}

/// `attest` with `token` and a fresh key, the CSR naming `node`'s identity.
fn attest(addr: SocketAddr, token: &str, node: &str) -> (Value, KeyPair) {
    let (key, csr) = issuer::csr(&node_id(node), |_| {});
    let answer = Session::open(addr, None)
        .and_then(|mut s| s.ask(&json!({"op": "attest", "token": token, "csr": csr})))
        .unwrap_or_else(|e| panic!("attest with token {token}: {e:#}"));
    (answer, key)
}

/// The leaf of a signed answer: its URI SANs, its notAfter (Unix seconds), whether it is a CA.
fn leaf(answer: &Value) -> (Vec<String>, i64, bool) {
    let pem = answer["chain"]
        .as_str()
        .unwrap_or_else(|| panic!("no chain in {answer}"));
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate in the chain")
        .expect("PEM");
    let (_, cert) = X509Certificate::from_der(&der).expect("the leaf parses");
    let uris = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => (*u).to_owned(),
                    other => format!("not a URI: {other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    (uris, cert.validity().not_after.timestamp(), cert.is_ca())
}

/// One decision the test asked for, as the audit log must record it.
struct Asked {
    what: &'static str,
    op: &'static str,
    /// Made by someone with no right to a certificate.
    attacker: bool,
    answer: Value,
    /// A fragment the refusal's reason must name (the datum it was refused on), if any.
    names: Option<String>,
}

#[test]
fn kubernetes_attestation_gives_the_agent_its_node_svid_and_refuses_every_other_token() {
    let bin = bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::serve(TcpListener::bind("127.0.0.1:0").expect("bind")).expect("fake API");

    // The cluster: three nodes, the DaemonSet's agent pods, and a workload on node-2.
    for i in 1..=3u8 {
        let cidr = format!("198.18.{i}.0/24");
        api.apply(
            Kind::Node,
            realistic_node(&format!("node-{i}"), node_ip(i).into(), &[&cidr]),
        );
    }
    api.apply(Kind::Pod, agent_pod("portcullis-abc", 3, 1));
    api.apply(Kind::Pod, agent_pod("portcullis-def", 2, 2));
    api.apply(Kind::Pod, agent_pod("portcullis-ghi", 1, 3));
    api.apply(
        Kind::Pod,
        realistic_pod(
            "db-0",
            "prod",
            "node-2",
            "db",
            &[IpAddr::V4(Ipv4Addr::new(198, 18, 2, 10))],
            4,
        ),
    );
    // An agent pod that was deleted (its node drained), whose token outlives it.
    api.apply(Kind::Pod, agent_pod("portcullis-gone", 3, 5));
    api.delete(Kind::Pod, AGENT_NS, "portcullis-gone");

    let agent = |pod, node| token(AGENT_NS, AGENT_SA, AUDIENCE, Some(pod), node);
    // The agent on node-3, on a cluster whose reviews name the node.
    api.add_token("tok-agent-node-3", agent("portcullis-abc", Some("node-3")));
    // The agent on node-2, on an older cluster: the review names only the pod.
    api.add_token(
        "tok-agent-node-2-old-cluster",
        agent("portcullis-def", None),
    );
    // Tokens an attacker holds.
    api.add_token(
        "tok-db",
        token("prod", "db", AUDIENCE, Some("db-0"), Some("node-2")),
    );
    api.add_token(
        "tok-default",
        token("default", "default", AUDIENCE, None, None),
    );
    api.add_token(
        "tok-vault",
        token(
            AGENT_NS,
            AGENT_SA,
            "vault",
            Some("portcullis-abc"),
            Some("node-3"),
        ),
    );
    // Names node-3, but the pod it is bound to runs on node-2.
    api.add_token("tok-other-node", agent("portcullis-def", Some("node-3")));
    api.add_token("tok-pod-gone", agent("portcullis-gone", Some("node-3")));
    // Bound to an earlier pod of that name: the pod there now has another uid.
    let stale_uid = "0b5e7f3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    api.add_token(
        "tok-pod-replaced",
        TokenFacts {
            pod_uid: Some(stale_uid.into()),
            ..agent("portcullis-ghi", Some("node-1"))
        },
    );

    // The issuer lists pods and nodes before it listens: the cluster is there already.
    Standalone::make_ca(&bin, dir.path(), TD).expect("portcullis ca init");
    let srv = Standalone::start(
        &bin,
        dir.path(),
        &format!(
            "kubernetes:\n  api_server: {}\n  trust_domain: {TD}\nattestor:\n  kind: kubernetes\n",
            api.url()
        ),
    )
    .unwrap_or_else(|e| panic!("starting the issuer: {e:#}"));
    let addr = srv.addr;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut asked: Vec<Asked> = Vec::new();

    // The agent on node-3 gets node-3's SVID, and nothing beyond it.
    let (answer, key3) = attest(addr, "tok-agent-node-3", "node-3");
    assert_eq!(issuer::outcome(&answer), "signed", "{answer}");
    let (uris, not_after, is_ca) = leaf(&answer);
    assert_eq!(uris, [node_id("node-3")], "the node SVID's SANs");
    assert!(!is_ca, "a node SVID is not a CA");
    let claimed = answer["not_after_unix"].as_u64().expect("not_after_unix");
    assert_eq!(
        i64::try_from(claimed).ok(),
        Some(not_after),
        "not_after_unix is not the certificate's"
    );
    assert!(
        claimed > now,
        "the node SVID expired already: {claimed} <= {now}"
    );
    let node3: Credential = issuer::credential(&answer, &key3).expect("credential");
    asked.push(Asked {
        what: "the agent's token",
        op: "attest",
        attacker: false,
        answer,
        names: None,
    });

    // With it, node-3 cannot have the SVID of a workload that runs only on node-2.
    let answer = issuer::sign(addr, Some(&node3), DB).expect("sign as node-3");
    asked.push(Asked {
        what: "node-3 asking for db (on node-2)",
        op: "sign",
        attacker: true,
        answer,
        names: Some("node-3".into()),
    });

    // Tokens that must not get a node SVID, each with the node its holder would like.
    for (what, tok, node, names) in [
        (
            "a token of another service account (prod/db)",
            "tok-db",
            "node-2",
            "system:serviceaccount:prod:db",
        ),
        (
            "a token of another service account (default/default)",
            "tok-default",
            "node-1",
            "system:serviceaccount:default:default",
        ),
        (
            "the agents' token minted for another audience",
            "tok-vault",
            "node-3",
            "vault",
        ),
        (
            "a token naming node-3 bound to a pod on node-2",
            "tok-other-node",
            "node-3",
            "node-2",
        ),
        (
            "a token bound to a pod that no longer exists",
            "tok-pod-gone",
            "node-3",
            "portcullis-gone",
        ),
        (
            "a token no API server issued",
            "tok-forged",
            "node-3",
            "invalid bearer token",
        ),
        (
            "a token bound to a pod since replaced (another uid)",
            "tok-pod-replaced",
            "node-1",
            stale_uid,
        ),
    ] {
        let (answer, _) = attest(addr, tok, node);
        asked.push(Asked {
            what,
            op: "attest",
            attacker: true,
            answer,
            names: Some(names.to_owned()),
        });
    }

    // An older cluster: the node is the bound pod's spec.nodeName, read from the API.
    let (answer, key2) = attest(addr, "tok-agent-node-2-old-cluster", "node-2");
    assert_eq!(issuer::outcome(&answer), "signed", "{answer}");
    assert_eq!(
        leaf(&answer).0,
        [node_id("node-2")],
        "the fallback's node SVID"
    );
    let node2 = issuer::credential(&answer, &key2).expect("credential");
    asked.push(Asked {
        what: "the agent's token on an older cluster",
        op: "attest",
        attacker: false,
        answer,
        names: None,
    });
    // ... and node-2 may have db's SVID: the refusal to node-3 was about the node.
    let answer = issuer::sign(addr, Some(&node2), DB).expect("sign as node-2");
    assert_eq!(issuer::outcome(&answer), "signed", "{answer}");
    assert_eq!(leaf(&answer).0, [DB]);
    asked.push(Asked {
        what: "node-2 asking for db",
        op: "sign",
        attacker: false,
        answer,
        names: None,
    });

    // A join token means nothing to an issuer that attests by service-account token.
    let (_, csr) = issuer::csr(&node_id("node-1"), |_| {});
    let answer = Session::open(addr, None)
        .and_then(|mut s| {
            s.ask(
                &json!({"op": "join", "node": "node-1", "token": "pc-join-0123456789", "csr": csr}),
            )
        })
        .expect("join");
    asked.push(Asked {
        what: "a join request",
        op: "join",
        attacker: true,
        answer,
        names: None,
    });

    // Every answer as expected.
    let expected = |a: &Asked| match (a.op, a.attacker) {
        ("sign", true) => "not_on_node",
        ("join", _) => "wrong_attestor",
        (_, true) => "token_review",
        (_, false) => "signed",
    };
    let got: Vec<(&str, String)> = asked
        .iter()
        .map(|a| (a.what, issuer::outcome(&a.answer)))
        .collect();
    let want: Vec<(&str, String)> = asked
        .iter()
        .map(|a| (a.what, expected(a).to_owned()))
        .collect();
    let reasons: Vec<&Value> = asked.iter().map(|a| &a.answer["reason"]).collect();
    for (a, (_, outcome)) in asked.iter().zip(&got) {
        eprintln!(
            "{}: {outcome} {}",
            a.what,
            a.answer["reason"].as_str().unwrap_or("")
        );
    }
    assert_eq!(got, want, "reasons: {reasons:#?}");
    for a in &asked {
        if let Some(names) = &a.names {
            let reason = a.answer["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains(names.as_str()),
                "{}: the reason does not name `{names}`: {reason}",
                a.what
            );
        }
    }
    let attacker_signed = asked
        .iter()
        .filter(|a| a.attacker && issuer::outcome(&a.answer) == "signed")
        .count();
    let attacker_tries = asked.iter().filter(|a| a.attacker).count();
    eprintln!(
        "issuer_kube outcome: {}",
        json!({"attacker_attempts": attacker_tries, "attacker_signed": attacker_signed,
               "reviews": api.reviews()})
    );
    assert_eq!(attacker_signed, 0, "the attacker got certificates");

    // One TokenReview per attest, and none for the join; the fallback read the bound pod.
    let attests = asked.iter().filter(|a| a.op == "attest").count();
    assert_eq!(
        api.reviews(),
        attests,
        "reviews of {:?}",
        api.reviewed_tokens()
    );
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/portcullis/pods/portcullis-def")),
        "the issuer never read the older cluster's bound pod: {requests:?}"
    );

    // Every decision is an audit record, in order, each refusal with its code and reason.
    let records = issuer::audit_records(&srv.audit);
    assert_eq!(records.len(), asked.len(), "audit records: {records:#?}");
    for (a, r) in asked.iter().zip(&records) {
        let code = expected(a);
        assert_eq!(r["op"], a.op, "{}: {r}", a.what);
        assert!(
            r["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{}: {r}",
            a.what
        );
        assert!(
            r["time_unix"].as_u64().is_some_and(|t| t >= now),
            "{}: {r}",
            a.what
        );
        if code == "signed" {
            assert_eq!(r["result"], "signed", "{}: {r}", a.what);
            assert_eq!(r["code"], "", "{}: {r}", a.what);
        } else {
            assert_eq!(r["result"], "refused", "{}: {r}", a.what);
            assert_eq!(r["code"], code, "{}: {r}", a.what);
            assert_eq!(r["reason"], a.answer["reason"], "{}: {r}", a.what);
            assert!(
                r["reason"].as_str().is_some_and(|s| !s.is_empty()),
                "{}: a refusal without a reason: {r}",
                a.what
            );
        }
    }
    // The signed attests name the node and identity they were signed for; refused ones none.
    let signed_nodes: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["op"] == "attest" && r["result"] == "signed")
        .map(|r| {
            (
                r["node"].as_str().unwrap_or("?"),
                r["identity"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    let (n3, n2) = (node_id("node-3"), node_id("node-2"));
    assert_eq!(
        signed_nodes,
        [("node-3", n3.as_str()), ("node-2", n2.as_str())]
    );
    assert!(
        records
            .iter()
            .filter(|r| r["op"] == "attest" && r["result"] == "refused")
            .all(|r| r["node"] == "" && r["identity"] == ""),
        "a refused attest was recorded as some node's: {records:#?}"
    );
    assert!(
        records.iter().any(|r| r["op"] == "sign"
            && r["node"] == "node-3"
            && r["identity"] == DB
            && r["code"] == "not_on_node"),
        "{records:#?}"
    );
}
