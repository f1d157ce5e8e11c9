//! Protocol version 2's rates on loopback, in the same run: sequential full mutual TLS 1.3
//! handshakes through a bare rustls loop (what version 1 paid for every pair of workloads),
//! against workload proofs inside one established node session between two agents' `Sessions`
//! (what version 2 pays per pair), one at a time and 64 in flight; new node sessions (TLS with
//! node SVIDs, then one proof); and SVID issuance time. Prints one JSON object. Run by `cargo
//! xtask bench`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use portcullis_agent::{
    handshake::{self, Limits, Owner, Record, Sessions, StaticDirectory, View, WriteRequest},
    identity::{SpiffeId, ca::Ca, store::Svid, svid},
    issuer::protocol::node_id,
    policy::Policy,
    tls::{self, Trust},
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
    version::TLS13,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// node-a's one workload, the initiator of every proof.
const A: &str = "198.18.1.2";
/// node-b's workloads, at 198.18.2.10 onwards: one per proof in flight.
const B_WORKLOADS: u8 = 64;
/// Proofs in flight in the concurrent measurement.
const IN_FLIGHT: u32 = 64;
const TIMEOUT: Duration = Duration::from_secs(10);

fn b_addr(k: u8) -> IpAddr {
    IpAddr::from([198, 18, 2, 10 + k])
}

fn b_id(k: u8) -> String {
    format!("spiffe://td/ns/default/sa/b{k}")
}

fn svid(ca: &Ca, id: &SpiffeId) -> Svid {
    let issued = ca.issue(id, Duration::from_secs(3600)).expect("issue");
    let info = svid::check_leaf(&issued.cert_der, SystemTime::now()).expect("valid SVID");
    Svid::new(vec![issued.cert_der], issued.key_der, info)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A bare rustls pair: the same kind of CA and keys (ECDSA P-256), DNS-named leaves, webpki's
/// own verifiers.
fn bare_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
    };
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).expect("root");
    let roots = Arc::new(roots);
    let provider = tls::provider();
    let (chain, key) = leaf("server.bench");
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .expect("verifier");
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])
        .expect("tls13")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    // Full handshakes on both sides, as version 1 did for every pair (no resumption).
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let (chain, key) = leaf("client.bench");
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client config");
    client.resumption = rustls::client::Resumption::disabled();
    (Arc::new(server), Arc::new(client))
}

/// Sequential full mutual TLS 1.3 handshakes (and a one-byte exchange) per second.
async fn bare(count: u32, in_flight: u32) -> f64 {
    let (server, client) = bare_configs();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(server);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let mut b = [0u8; 1];
                    let _ = s.read_exact(&mut b).await;
                    let _ = s.write_all(&b).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    let connector = TlsConnector::from(client);
    let next = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (connector, next) = (connector.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let tcp = TcpStream::connect(addr).await.expect("connect");
                    tcp.set_nodelay(true).expect("nodelay");
                    let mut s = connector
                        .connect(ServerName::try_from("server.bench").expect("name"), tcp)
                        .await
                        .expect("handshake");
                    s.write_all(b"x").await.expect("write");
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.expect("read");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    f64::from(count) / start.elapsed().as_secs_f64()
}

/// One agent's side: its sessions and its listener's address; its records drained and its
/// entry writes answered `Ok` by tasks of its own.
async fn side() -> (Arc<Sessions>, watch::Sender<Option<Arc<View>>>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (views, views_rx) = watch::channel(None);
    let (record_tx, mut records) = mpsc::channel::<Record>(4096);
    let (write_tx, mut writes) = mpsc::channel::<WriteRequest>(1024);
    tokio::spawn(async move { while records.recv().await.is_some() {} });
    tokio::spawn(async move {
        while let Some((_, reply)) = writes.recv().await {
            let _ = reply.send(Ok(()));
        }
    });
    let sessions = Sessions::new(views_rx, record_tx.clone(), write_tx, TIMEOUT);
    let limits = Limits {
        timeout: TIMEOUT,
        max_concurrent: 64,
        peer_rate: 100_000,
        peer_burst: 100_000,
    };
    tokio::spawn(handshake::serve(
        listener,
        sessions.clone(),
        record_tx,
        limits,
    ));
    (sessions, views, addr)
}

/// Two agents on loopback: node-a hosting A, node-b hosting [`B_WORKLOADS`] workloads, each
/// with its node SVID from `ca`; node-a's sessions and view, from which proofs start.
struct Agents {
    sessions: Arc<Sessions>,
    view: Arc<View>,
    /// Keeps both views published.
    _views: [watch::Sender<Option<Arc<View>>>; 2],
}

impl Agents {
    async fn new(ca: &Ca) -> Self {
        let (sa, views_a, addr_a) = side().await;
        let (_, views_b, addr_b) = side().await;
        let id_a = SpiffeId::parse("spiffe://td/ns/default/sa/a").expect("id");
        let mut owners: HashMap<IpAddr, Owner> = HashMap::new();
        owners.insert(
            A.parse().expect("addr"),
            Owner {
                id: id_a.clone(),
                node: "node-a".into(),
            },
        );
        let mut svids_b = Vec::new();
        for k in 0..B_WORKLOADS {
            let id = SpiffeId::parse(&b_id(k)).expect("id");
            svids_b.push(svid(ca, &id));
            owners.insert(
                b_addr(k),
                Owner {
                    id,
                    node: "node-b".into(),
                },
            );
        }
        let nodes: HashMap<String, SocketAddr> =
            [("node-a".into(), addr_a), ("node-b".into(), addr_b)].into();
        let directory = Arc::new(StaticDirectory { owners, nodes });
        let trust = Trust::new(
            "td",
            &[CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("pem")],
        )
        .expect("trust");
        let node_svid = |node: &str| svid(ca, &node_id("td", node).expect("node id"));
        let view_a = Arc::new(
            View::build(
                "node-a",
                trust.clone(),
                directory.clone(),
                Some(&node_svid("node-a")),
                &[svid(ca, &id_a)],
                Arc::new(Policy::default()),
            )
            .expect("view"),
        );
        let view_b = Arc::new(
            View::build(
                "node-b",
                trust,
                directory,
                Some(&node_svid("node-b")),
                &svids_b,
                Arc::new(Policy::default()),
            )
            .expect("view"),
        );
        views_a.send_replace(Some(view_a.clone()));
        views_b.send_replace(Some(view_b));
        Self {
            sessions: sa,
            view: view_a,
            _views: [views_a, views_b],
        }
    }

    /// One proof A → node-b's workload `k`; panics unless it succeeds.
    async fn prove(&self, k: u8) {
        let rec = handshake::initiate(
            self.sessions.clone(),
            self.view.clone(),
            A.parse().expect("addr"),
            b_addr(k),
            TIMEOUT,
        )
        .await;
        assert!(rec.result.is_ok(), "proof failed: {rec:?}");
    }
}

/// Sequential proofs per second over one established session (opened by a first proof, not
/// timed), the pairs taken in turn.
async fn proofs(count: u32, ca: &Ca) -> f64 {
    let agents = Agents::new(ca).await;
    agents.prove(0).await;
    let start = Instant::now();
    for i in 0..count {
        agents.prove((i % u32::from(B_WORKLOADS)) as u8).await;
    }
    let rate = f64::from(count) / start.elapsed().as_secs_f64();
    assert_eq!(
        agents.sessions.counts.opened.load(Ordering::Relaxed),
        1,
        "the proofs opened more than one session"
    );
    rate
}

/// Proofs per second with [`IN_FLIGHT`] under way at once over one established session, each
/// of the in-flight proofs for a pair of its own.
async fn proofs_concurrent(total: u32, ca: &Ca) -> f64 {
    let agents = Arc::new(Agents::new(ca).await);
    agents.prove(0).await;
    let next = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|w| {
            let (agents, next) = (agents.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    agents.prove((w % u32::from(B_WORKLOADS)) as u8).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let rate = f64::from(total) / start.elapsed().as_secs_f64();
    assert_eq!(
        agents.sessions.counts.opened.load(Ordering::Relaxed),
        1,
        "the proofs opened more than one session"
    );
    rate
}

/// New node sessions per second, sequential: every session closed, then one proof, which
/// opens a new session (TLS 1.3 with the node SVIDs) and proves the pair in it.
async fn session_setups(count: u32, ca: &Ca) -> f64 {
    let agents = Agents::new(ca).await;
    agents.prove(0).await;
    let start = Instant::now();
    for _ in 0..count {
        agents.sessions.close_all();
        agents.prove(0).await;
    }
    let rate = f64::from(count) / start.elapsed().as_secs_f64();
    let opened = agents.sessions.counts.opened.load(Ordering::Relaxed);
    assert!(
        opened > u64::from(count),
        "{opened} sessions opened for {count} set-ups"
    );
    rate
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let count: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    // Enough for several waves of the proofs in flight.
    let concurrent = (count * 4).max(IN_FLIGHT * 4);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init("td", &dir.path().join("ca")).expect("ca");
    let (mut bare_runs, mut proof_runs, mut concurrent_runs, mut session_runs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut bare_concurrent_runs = Vec::new();
    // Alternate, so that drift on a shared machine hits every measurement alike; a runtime
    // per round, so that nothing of one round runs in the next.
    for _ in 0..3 {
        bare_runs.push(runtime().block_on(bare(count, 1)));
        bare_concurrent_runs.push(runtime().block_on(bare(concurrent, IN_FLIGHT)));
        proof_runs.push(runtime().block_on(proofs(count, &ca)));
        concurrent_runs.push(runtime().block_on(proofs_concurrent(concurrent, &ca)));
        session_runs.push(runtime().block_on(session_setups(count, &ca)));
    }
    let id = SpiffeId::parse("spiffe://td/ns/default/sa/bench").expect("id");
    let n = 200;
    let start = Instant::now();
    for _ in 0..n {
        ca.issue(&id, Duration::from_secs(3600)).expect("issue");
    }
    let issue_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let bc = median(&bare_concurrent_runs);
    let (b, p, c, s) = (
        median(&bare_runs),
        median(&proof_runs),
        median(&concurrent_runs),
        median(&session_runs),
    );
    println!(
        "{}",
        serde_json::json!({
            "handshakes_per_run": count,
            "concurrent_proofs_per_run": concurrent,
            "in_flight": IN_FLIGHT,
            "bare_rustls_per_sec": bare_runs,
            "bare_rustls_concurrent_per_sec": bare_concurrent_runs,
            "proofs_per_sec": proof_runs,
            "proofs_concurrent_per_sec": concurrent_runs,
            "session_setups_per_sec": session_runs,
            "median": {
                "bare_rustls_per_sec": b,
                "bare_rustls_concurrent_per_sec": bc,
                "proofs_per_sec": p,
                "proofs_concurrent_per_sec": c,
                "session_setups_per_sec": s,
            },
            "proofs_to_bare": p / b,
            "proofs_concurrent_to_bare": c / b,
            "proofs_concurrent_to_bare_concurrent": c / bc,
            "session_setups_to_bare": s / b,
            "svid_issue_us": issue_us,
        })
    );
}
