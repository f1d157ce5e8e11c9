//! Handshakes per second on loopback: portcullis's agent-to-agent handshake (mutual TLS 1.3
//! with SPIFFE checks, cluster-state checks and one request/answer exchange) against a bare
//! rustls mutual TLS 1.3 handshake loop with the same kind of keys, in the same run; and SVID
//! issuance time. Prints one JSON object. Run by `cargo xtask bench`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use portcullis_agent::{
    handshake::{self, Owner, StaticDirectory, View, WriteRequest},
    identity::{SpiffeId, ca::Ca, store::Svid, svid},
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
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const A: &str = "198.18.1.2";
const B: &str = "198.18.2.2";

fn svid(ca: &Ca, id: &str) -> Svid {
    let id = SpiffeId::parse(id).expect("SPIFFE ID");
    let issued = ca.issue(&id, Duration::from_secs(3600)).expect("issue");
    let info = svid::check_leaf(&issued.cert_der, SystemTime::now()).expect("valid SVID");
    Svid::new(vec![issued.cert_der], issued.key_der, info)
}

/// A bare rustls pair: the same CA and key type, DNS-named leaves, webpki's own verifiers.
fn bare_configs(dir: &std::path::Path) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let _ = dir;
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
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])
        .expect("tls13")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    let mut server = server;
    // Full handshakes on both sides, as portcullis does (no resumption).
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let (chain, key) = leaf("client.bench");
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client config");
    let mut client = client;
    client.resumption = rustls::client::Resumption::disabled();
    (Arc::new(server), Arc::new(client))
}

async fn bare(count: u32, dir: &std::path::Path) -> f64 {
    let (server, client) = bare_configs(dir);
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
    let start = Instant::now();
    for _ in 0..count {
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
    f64::from(count) / start.elapsed().as_secs_f64()
}

async fn ours(count: u32, ca: &Ca) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let owners: HashMap<IpAddr, Owner> = [
        (
            A.parse().expect("addr"),
            Owner {
                id: SpiffeId::parse("spiffe://td/ns/default/sa/a").expect("id"),
                node: "node-a".into(),
            },
        ),
        (
            B.parse().expect("addr"),
            Owner {
                id: SpiffeId::parse("spiffe://td/ns/default/sa/b").expect("id"),
                node: "node-b".into(),
            },
        ),
    ]
    .into();
    let nodes: HashMap<String, SocketAddr> = [
        ("node-a".into(), "127.0.0.1:1".parse().expect("addr")),
        ("node-b".into(), listener.local_addr().expect("addr")),
    ]
    .into();
    let trust = Trust::new(
        "td",
        &[CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("pem")],
    )
    .expect("trust");
    let view_a = Arc::new(
        View::build(
            "node-a",
            trust.clone(),
            Arc::new(StaticDirectory {
                owners: owners.clone(),
                nodes: nodes.clone(),
            }),
            &[svid(ca, "spiffe://td/ns/default/sa/a")],
            Arc::new(Policy::default()),
        )
        .expect("view"),
    );
    let view_b = Arc::new(
        View::build(
            "node-b",
            trust,
            Arc::new(StaticDirectory { owners, nodes }),
            &[svid(ca, "spiffe://td/ns/default/sa/b")],
            Arc::new(Policy::default()),
        )
        .expect("view"),
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel::<WriteRequest>(64);
    tokio::spawn(async move {
        while let Some((_, reply)) = rx.recv().await {
            let _ = reply.send(Ok(()));
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            let (view, tx) = (view_b.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = handshake::respond(view, tcp, peer, Duration::from_secs(5), tx).await;
            });
        }
    });
    let start = Instant::now();
    for _ in 0..count {
        let rec = handshake::initiate(
            view_a.clone(),
            A.parse().expect("addr"),
            B.parse().expect("addr"),
            Duration::from_secs(5),
        )
        .await;
        assert!(rec.result.is_ok(), "handshake failed: {rec:?}");
    }
    f64::from(count) / start.elapsed().as_secs_f64()
}

fn main() {
    let count: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init("td", &dir.path().join("ca")).expect("ca");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut bare_runs = Vec::new();
    let mut ours_runs = Vec::new();
    // Alternate, so that drift on a shared machine hits both alike.
    for _ in 0..3 {
        bare_runs.push(rt.block_on(bare(count, dir.path())));
        ours_runs.push(rt.block_on(ours(count, &ca)));
    }
    let id = SpiffeId::parse("spiffe://td/ns/default/sa/bench").expect("id");
    let n = 200;
    let start = Instant::now();
    for _ in 0..n {
        ca.issue(&id, Duration::from_secs(3600)).expect("issue");
    }
    let issue_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, o) = (
        median(&mut bare_runs.clone()),
        median(&mut ours_runs.clone()),
    );
    println!(
        "{}",
        serde_json::json!({
            "handshakes_per_run": count,
            "bare_rustls_per_sec": bare_runs,
            "portcullis_per_sec": ours_runs,
            "median": { "bare_rustls_per_sec": b, "portcullis_per_sec": o },
            "ratio_to_bare": o / b,
            "svid_issue_us": issue_us,
        })
    );
}
