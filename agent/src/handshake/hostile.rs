//! Hostile input on the session port (protocol version 2): each case is refused with its
//! reason on the responder's record, the connection is closed, no workload identity is shown
//! to an unauthenticated peer, and the responder goes on serving valid sessions and proofs.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    sign::CertifiedKey,
};
use rustls_pki_types::pem::PemObject;
use time::{Duration as D, OffsetDateTime};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::{
    Limits, Record, Stage, View,
    proof::{self, Binding, Facts, Half},
    tests::{self, A, B, C, ID_A, ID_B, Side, directory, node_svid, owners, side_with, svid},
    wire::{self, Message, Prove, hex},
};
use crate::{
    identity::{ca::Ca, svid::tests::TestCa},
    policy::Policy,
    reason::Reason,
    tls::{self, Trust},
};

const NODE_A: &str = "spiffe://td/portcullis/node/node-a";
const NODE_B: &str = "spiffe://td/portcullis/node/node-b";
/// The server name a version 1 initiator asked for: the responder workload's address (B).
const V1_SNI: &str = "c6120202.v4.addr.portcullis.invalid";
/// How long a test waits for the responder to close a connection it refused.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// An honest `node-a` (hosting A) and the responder under test, `node-b` (hosting B; C is
/// on node-b too, without an SVID). Both trust the cluster CA and a second CA that issues
/// leaves with chosen defects.
struct Bed {
    a: Side,
    b: Side,
    ca: Ca,
    test_ca: TestCa,
    _dir: tempfile::TempDir,
}

async fn bed(limits: Limits) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init("td", dir.path()).unwrap();
    let test_ca = TestCa::new("td");
    let (a, _) = side_with(tests::limits()).await;
    let (b, _) = side_with(limits).await;
    let nodes: HashMap<String, SocketAddr> =
        [("node-a".into(), a.addr), ("node-b".into(), b.addr)].into();
    let trust = Trust::new(
        "td",
        &[
            CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap(),
            test_ca.der.clone(),
        ],
    )
    .unwrap();
    let view = |node: &str, workload: &str| {
        View::build(
            node,
            trust.clone(),
            directory(owners(), &nodes),
            Some(&node_svid(&ca, node)),
            &[svid(&ca, workload)],
            Arc::new(Policy::default()),
        )
        .unwrap()
    };
    a.views.send_replace(Some(Arc::new(view("node-a", ID_A))));
    b.views.send_replace(Some(Arc::new(view("node-b", ID_B))));
    Bed {
        a,
        b,
        ca,
        test_ca,
        _dir: dir,
    }
}

impl Bed {
    /// The responder's next session record, which must be a refusal.
    async fn refused(&mut self) -> Record {
        let rec = self.b.next_session().await;
        assert!(
            rec.result.is_err(),
            "a hostile connection was accepted: {rec:?}"
        );
        assert!(rec.keys.is_none(), "{rec:?}");
        rec
    }

    /// node-a opens a new session to the responder (its old one closed first, so that the
    /// listener itself is tested, not a session that was up before) and proves A to B; both
    /// sides' records say it worked.
    async fn still_serves(&mut self) {
        let opened = self.a.sessions.counts.opened.load(Ordering::Relaxed);
        self.a.sessions.close_all();
        let rec = self.a.prove(A, B).await;
        assert!(
            rec.result.is_ok(),
            "a valid proof failed afterwards: {rec:?}"
        );
        assert_eq!(rec.remote_id.as_ref().map(|i| i.as_str()), Some(ID_B));
        assert!(
            self.a.sessions.counts.opened.load(Ordering::Relaxed) > opened,
            "no new session was opened"
        );
        // The responder's records of it: the session (perhaps more than one, if node-a's
        // background reconnect raced the proof) and the proof; nothing refused.
        let (mut session, mut proven) = (false, false);
        while !(session && proven) {
            let r = tokio::time::timeout(Duration::from_secs(5), self.b.records.recv())
                .await
                .expect("no record of the valid proof within 5 s")
                .expect("records closed");
            assert!(
                r.result.is_ok(),
                "the responder refused a valid peer: {r:?}"
            );
            assert_eq!(r.remote_node.as_deref(), Some("node-a"), "{r:?}");
            match r.stage {
                Stage::Session => session = true,
                Stage::Proof => {
                    assert_eq!(r.remote_id.as_ref().map(|i| i.as_str()), Some(ID_A));
                    assert!(r.keys.is_some(), "{r:?}");
                    proven = true;
                }
            }
        }
    }
}

/// Reads until the peer closes (end of stream or an error), bounded; what was read.
async fn read_until_closed<R: AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(CLOSE_WITHIN, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the responder kept a hostile connection open"
    );
    data
}

/// Sends `bytes` on a plain TCP connection, half-closes, and returns what came back before the
/// responder closed.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The responder may close before it has read everything.
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    read_until_closed(&mut s).await
}

/// Asserts that `bytes` are nothing but TLS alert records (or nothing): no handshake message,
/// so no certificate, reached the peer.
fn only_alerts(what: &str, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        assert!(bytes.len() >= 5, "{what}: a truncated record {bytes:?}");
        assert_eq!(
            bytes[0], 0x15,
            "{what}: the responder sent a non-alert record"
        );
        let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        assert!(
            bytes.len() >= 5 + len,
            "{what}: a truncated alert {bytes:?}"
        );
        bytes = &bytes[5 + len..];
    }
}

/// The URI SANs of a certificate.
fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The certificate chains a client was shown, one per handshake.
type Shown = Arc<Mutex<Vec<Vec<CertificateDer<'static>>>>>;

/// Records the chain the server presents and accepts it (after checking the server's
/// signature with its key): these tests are about what the responder shows and makes of us.
#[derive(Debug)]
struct Recording {
    provider: Arc<CryptoProvider>,
    shown: Shown,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        self.shown.lock().unwrap().push(chain);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client certificate chain and its key.
type Presented = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(key.serialize_der().into())
}

/// A TLS 1.3 client offering `alpn` (none: no ALPN), presenting `cert` (none: no client
/// certificate), that records what it is shown into `shown`.
fn client(alpn: &[&[u8]], cert: Option<Presented>, shown: &Shown) -> Arc<ClientConfig> {
    let provider = tls::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording {
            provider,
            shown: shown.clone(),
        }));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// What a TLS client got from the responder.
#[derive(Debug)]
struct Attempt {
    /// Whether the client's side of the handshake completed (in TLS 1.3 the client finishes
    /// first: the server's refusal of its certificate comes on the next read).
    handshake: Result<(), String>,
    /// Application data received before the responder closed.
    data: Vec<u8>,
}

/// A TLS handshake with `config` asking for `name`, then reads until the responder closes.
async fn attempt(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Attempt {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connected =
        tokio::time::timeout(CLOSE_WITHIN, TlsConnector::from(config).connect(name, tcp))
            .await
            .expect("the responder held a TLS handshake open");
    match connected {
        Err(e) => Attempt {
            handshake: Err(e.to_string()),
            data: Vec::new(),
        },
        Ok(mut tls) => Attempt {
            handshake: Ok(()),
            data: read_until_closed(&mut tls).await,
        },
    }
}

fn session_name() -> ServerName<'static> {
    ServerName::try_from(tls::SESSION_SERVER_NAME).unwrap()
}

/// The first flight of a real TLS 1.3 ClientHello of a node session.
fn client_hello(bed: &Bed) -> Vec<u8> {
    let config = bed.a.view().node_creds.as_ref().unwrap().client.clone();
    let mut conn = rustls::ClientConnection::new(config, session_name()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

#[tokio::test]
async fn garbage_plaintext_http_and_a_truncated_client_hello_are_refused() {
    let mut bed = bed(tests::limits()).await;
    let mut hello = client_hello(&bed);
    hello.truncate(hello.len() / 2);
    for (what, bytes) in [
        ("garbage", b"\x00\x01\x02garbage\xff\xfe".to_vec()),
        (
            "plaintext HTTP",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("truncated ClientHello", hello),
        ("a version 2 frame before TLS", {
            let mut f = vec![0, 0, 0, 4, wire::VERSION, 1];
            f.extend_from_slice(b"{}");
            f
        }),
    ] {
        let answer = send_raw(bed.b.addr, &bytes).await;
        only_alerts(what, &answer);
        let rec = bed.refused().await;
        assert!(
            matches!(rec.result, Err(Reason::Protocol | Reason::Tls)),
            "{what}: {rec:?}"
        );
        assert_eq!(rec.remote_id, None, "{what}: {rec:?}");
        assert!(rec.detail.is_some(), "{what}: no detail on record");
        bed.still_serves().await;
    }
}

#[tokio::test]
async fn a_connection_that_never_completes_is_closed_at_the_time_limit() {
    let timeout = Duration::from_millis(300);
    let mut bed = bed(Limits {
        timeout,
        ..tests::limits()
    })
    .await;
    // Silent after connecting.
    let mut s = TcpStream::connect(bed.b.addr).await.unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut s).await;
    let took = started.elapsed();
    assert!(answer.is_empty(), "{answer:?}");
    assert!(
        took + Duration::from_millis(20) >= timeout && took < timeout + Duration::from_secs(1),
        "closed after {took:?}, the limit is {timeout:?}"
    );
    let rec = bed.refused().await;
    assert_eq!(rec.result, Err(Reason::Timeout), "{rec:?}");
    bed.still_serves().await;

    // A ClientHello dribbled a byte at a time, never finished within the limit.
    let hello = client_hello(&bed);
    let s = TcpStream::connect(bed.b.addr).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let dribble = tokio::spawn(async move {
        for b in hello {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let answer = read_until_closed(&mut rd).await;
    let took = started.elapsed();
    dribble.abort();
    only_alerts("dribbled ClientHello", &answer);
    assert!(
        took + Duration::from_millis(20) >= timeout && took < timeout + Duration::from_secs(1),
        "closed after {took:?}, the limit is {timeout:?}"
    );
    let rec = bed.refused().await;
    assert_eq!(rec.result, Err(Reason::Timeout), "{rec:?}");
    bed.still_serves().await;
}

#[tokio::test]
async fn idle_connections_beyond_the_limit_are_closed_at_once() {
    let timeout = Duration::from_millis(500);
    let mut bed = bed(Limits {
        timeout,
        max_concurrent: 4,
        ..tests::limits()
    })
    .await;
    let mut readers = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(bed.b.addr).await.unwrap();
        let connected = Instant::now();
        readers.push(tokio::spawn(async move {
            let answer = read_until_closed(&mut s).await;
            (connected.elapsed(), answer)
        }));
    }
    let (mut at_once, mut held) = (0, 0);
    for r in readers {
        let (took, answer) = r.await.unwrap();
        assert!(answer.is_empty(), "{answer:?}");
        if took < timeout / 2 {
            at_once += 1;
        } else {
            assert!(
                took < timeout + Duration::from_secs(1),
                "closed after {took:?}"
            );
            held += 1;
        }
    }
    assert_eq!(
        (at_once, held),
        (196, 4),
        "all but max_concurrent closed at once, those at the time limit"
    );
    let (mut busy, mut timed_out) = (0, 0);
    while busy + timed_out < 200 {
        let rec = bed.refused().await;
        match rec.result {
            Err(Reason::Busy) => {
                busy += 1;
                assert!(
                    rec.detail
                        .as_deref()
                        .is_some_and(|d| d.contains("handshake.max_concurrent")),
                    "{rec:?}"
                );
            }
            Err(Reason::Timeout) => timed_out += 1,
            _ => panic!("an idle connection refused with {rec:?}"),
        }
    }
    assert_eq!((busy, timed_out), (196, 4));
    bed.still_serves().await;
}

/// A TLS 1.2 ClientHello (no supported_versions extension) for a node session.
fn tls12_client_hello() -> Vec<u8> {
    fn len16(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap().to_be_bytes()
    }
    let sni = tls::SESSION_SERVER_NAME;
    let mut ext = Vec::new();
    let mut put = |kind: u16, body: &[u8]| {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&len16(body.len()));
        ext.extend_from_slice(body);
    };
    let mut name = vec![0u8];
    name.extend_from_slice(&len16(sni.len()));
    name.extend_from_slice(sni.as_bytes());
    let mut server_name = len16(name.len()).to_vec();
    server_name.extend_from_slice(&name);
    put(0x0000, &server_name);
    put(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // x25519, secp256r1
    put(0x000b, &[1, 0]); // uncompressed points
    put(0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // ecdsa p256, rsa-pss
    let mut protocol = vec![u8::try_from(tls::ALPN.len()).unwrap()];
    protocol.extend_from_slice(tls::ALPN);
    let mut alpn = len16(protocol.len()).to_vec();
    alpn.extend_from_slice(&protocol);
    put(0x0010, &alpn);
    let mut body = vec![3, 3]; // TLS 1.2
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 4, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE AES-GCM suites
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&len16(ext.len()));
    body.extend_from_slice(&ext);
    let mut hs = vec![1]; // ClientHello
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&len16(hs.len()));
    record.extend_from_slice(&hs);
    record
}

#[tokio::test]
async fn a_tls12_only_client_is_refused_with_version() {
    let mut bed = bed(tests::limits()).await;
    let answer = send_raw(bed.b.addr, &tls12_client_hello()).await;
    // A fatal protocol_version alert, and nothing else: no ServerHello, no certificate.
    only_alerts("TLS 1.2 ClientHello", &answer);
    assert_eq!(answer.get(5..), Some(&[2u8, 70][..]), "{answer:?}");
    let rec = bed.refused().await;
    assert_eq!(rec.result, Err(Reason::Version), "{rec:?}");
    assert!(
        rec.detail
            .as_deref()
            .is_some_and(|d| d.contains("incompatible")),
        "{rec:?}"
    );
    bed.still_serves().await;
}

#[tokio::test]
async fn a_version_1_client_is_refused_with_version_and_sees_no_certificate() {
    let mut bed = bed(tests::limits()).await;
    // As a version 1 initiator did: its workload's SVID, the responder workload's address
    // as server name, ALPN portcullis/1.
    let workload = svid(&bed.ca, ID_A);
    let cases: [(&str, &[&[u8]], &str); 2] = [
        ("version 1", &[tls::ALPN_V1], "protocol version 1"),
        ("no ALPN", &[], "did not offer ALPN portcullis/2"),
    ];
    for (what, alpn, detail) in cases {
        let shown = Shown::default();
        let config = client(
            alpn,
            Some((workload.chain.clone(), workload.key.clone_key())),
            &shown,
        );
        let got = attempt(bed.b.addr, config, ServerName::try_from(V1_SNI).unwrap()).await;
        assert!(got.handshake.is_err(), "{what}: {got:?}");
        assert!(got.data.is_empty(), "{what}: {got:?}");
        assert!(
            shown.lock().unwrap().is_empty(),
            "{what}: the responder showed its certificate to a client it refuses"
        );
        let rec = bed.refused().await;
        assert_eq!(rec.result, Err(Reason::Version), "{what}: {rec:?}");
        assert!(
            rec.detail.as_deref().is_some_and(|d| d.contains(detail)),
            "{what}: {rec:?}"
        );
        assert_eq!(rec.remote_id, None, "{what}: {rec:?}");
        bed.still_serves().await;
    }
}

#[tokio::test]
async fn an_unauthenticated_client_sees_only_the_node_svid_and_is_refused() {
    let mut bed = bed(tests::limits()).await;
    let names: [(&str, ServerName<'static>); 4] = [
        ("the session name", session_name()),
        (
            "a pod address, as in version 1",
            ServerName::try_from(V1_SNI).unwrap(),
        ),
        ("any name", ServerName::try_from("b.example").unwrap()),
        (
            "no SNI (an IP address)",
            ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into()),
        ),
    ];
    for (what, name) in names {
        let shown = Shown::default();
        let got = attempt(bed.b.addr, client(&[tls::ALPN], None, &shown), name).await;
        assert!(
            got.data.is_empty(),
            "{what}: data for a refused client: {got:?}"
        );
        let shown = shown.lock().unwrap().clone();
        assert_eq!(
            shown.len(),
            1,
            "{what}: {} certificate chains shown",
            shown.len()
        );
        let chain = &shown[0];
        assert_eq!(
            uri_sans(&chain[0]),
            [NODE_B],
            "{what}: the leaf is not node-b's SVID"
        );
        for cert in chain {
            for uri in uri_sans(cert) {
                assert!(
                    !uri.starts_with("spiffe://td/ns/"),
                    "{what}: a workload identity was shown: {uri}"
                );
            }
        }
        let rec = bed.refused().await;
        assert_eq!(rec.result, Err(Reason::NoCertificate), "{what}: {rec:?}");
        assert_eq!(rec.remote_id, None, "{what}: {rec:?}");
        bed.still_serves().await;
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// A leaf of `ca` for `id`, edited, with its key.
fn leaf(ca: &TestCa, id: &str, edit: impl FnOnce(&mut CertificateParams)) -> Presented {
    let (der, key) = ca.leaf_with_key(|p| {
        p.subject_alt_names = vec![uri(id)];
        edit(p);
    });
    (vec![der], pkcs8(&key))
}

fn expired(p: &mut CertificateParams) {
    p.not_before = OffsetDateTime::now_utc() - D::hours(2);
    p.not_after = OffsetDateTime::now_utc() - D::hours(1);
}

fn no_uri_san(p: &mut CertificateParams) {
    p.subject_alt_names = vec![SanType::DnsName("node-a.example".try_into().unwrap())];
}

fn ca_as_leaf(p: &mut CertificateParams) {
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
}

/// A leaf of `ca` for `id` followed by copies of `ca`: `n` certificates in all.
fn chain_of(ca: &TestCa, id: &str, n: usize) -> Presented {
    let (mut chain, key) = leaf(ca, id, |_| {});
    chain.extend(std::iter::repeat_n(ca.der.clone(), n - 1));
    (chain, key)
}

#[tokio::test]
async fn node_certificate_defects_fail_the_session_with_their_reason() {
    let mut bed = bed(tests::limits()).await;
    let untrusted = TestCa::new("td");
    let ca = &bed.test_ca;
    let workload = svid(&bed.ca, ID_A);
    let stranger = node_svid(&bed.ca, "node-z");
    let cases: Vec<(&str, Presented, &[Reason])> = vec![
        ("expired", leaf(ca, NODE_A, expired), &[Reason::Expired]),
        (
            "not yet valid",
            leaf(ca, NODE_A, |p| {
                p.not_before = OffsetDateTime::now_utc() + D::hours(1);
                p.not_after = OffsetDateTime::now_utc() + D::hours(2);
            }),
            &[Reason::NotYetValid],
        ),
        (
            "wrong trust domain",
            leaf(ca, "spiffe://elsewhere/portcullis/node/node-a", |_| {}),
            &[Reason::WrongTrustDomain],
        ),
        (
            "no URI SAN",
            leaf(ca, NODE_A, no_uri_san),
            &[Reason::NoUriSan],
        ),
        (
            "two URI SANs",
            leaf(ca, NODE_A, |p| {
                p.subject_alt_names = vec![uri(NODE_A), uri(NODE_B)];
            }),
            &[Reason::MultipleUriSans],
        ),
        (
            "CA certificate as leaf",
            leaf(ca, NODE_A, ca_as_leaf),
            &[Reason::CaAsLeaf],
        ),
        (
            "chain of 5",
            chain_of(ca, NODE_A, 5),
            &[Reason::ChainTooLong],
        ),
        // Past the largest handshake message rustls reads.
        (
            "chain of 400 kB",
            chain_of(ca, NODE_A, 400),
            &[Reason::Protocol, Reason::Tls],
        ),
        (
            "untrusted CA",
            leaf(&untrusted, NODE_A, |_| {}),
            &[Reason::UntrustedChain],
        ),
        (
            "a workload SVID",
            (workload.chain.clone(), workload.key.clone_key()),
            &[Reason::NotANode],
        ),
        (
            "the node SVID of a node not in cluster state",
            (stranger.chain.clone(), stranger.key.clone_key()),
            &[Reason::NotANode],
        ),
    ];
    for (what, cert, expected) in cases {
        let up = bed.b.sessions.up();
        let shown = Shown::default();
        let got = attempt(
            bed.b.addr,
            client(&[tls::ALPN], Some(cert), &shown),
            session_name(),
        )
        .await;
        assert!(
            got.data.is_empty(),
            "{what}: data for a refused client: {got:?}"
        );
        let rec = bed.refused().await;
        assert!(
            rec.result.is_err_and(|r| expected.contains(&r)),
            "{what}: expected one of {expected:?}, got {rec:?}"
        );
        assert!(rec.detail.is_some(), "{what}: {rec:?}");
        assert_eq!(bed.b.sessions.up(), up, "{what}: a session came up");
        bed.still_serves().await;
    }
    // The same CA's leaf without a defect opens a session: the refusals above were for the
    // defects.
    let shown = Shown::default();
    let mut tls = TlsConnector::from(client(
        &[tls::ALPN],
        Some(leaf(&bed.test_ca, NODE_A, |_| {})),
        &shown,
    ))
    .connect(
        session_name(),
        TcpStream::connect(bed.b.addr).await.unwrap(),
    )
    .await
    .unwrap();
    let rec = bed.b.next_session().await;
    assert!(rec.result.is_ok(), "{rec:?}");
    assert_eq!(rec.remote_node.as_deref(), Some("node-a"));
    let _ = tls.shutdown().await;
}

/// A node session opened by hand, presenting node-a's node SVID, to speak frames in.
struct Manual {
    tls: TlsStream<TcpStream>,
    binding: Binding,
}

impl Manual {
    async fn open(bed: &mut Bed) -> Self {
        let config = bed.a.view().node_creds.as_ref().unwrap().client.clone();
        let tcp = TcpStream::connect(bed.b.addr).await.unwrap();
        let tls = TlsConnector::from(config)
            .connect(session_name(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(tls::ALPN));
        let binding = Binding::export(tls.get_ref().1).unwrap();
        let rec = bed.b.next_session().await;
        assert!(rec.result.is_ok(), "{rec:?}");
        assert_eq!(rec.remote_node.as_deref(), Some("node-a"));
        let mut manual = Self { tls, binding };
        // The acceptor's first frame says it checked our node SVID.
        assert_eq!(
            manual.next().await,
            Ok(Message::Ready(wire::Ready {
                node: "node-b".into()
            }))
        );
        manual
    }

    async fn next(&mut self) -> Result<Message, Reason> {
        tokio::time::timeout(CLOSE_WITHIN, wire::read_msg(&mut self.tls))
            .await
            .expect("no answer within 5 s")
    }

    async fn send(&mut self, msg: Message) {
        wire::write_all(&mut self.tls, &[msg]).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
        self.tls.flush().await.unwrap();
    }
}

/// A workload's key and chain, to sign proofs with.
fn signer((chain, key): Presented) -> CertifiedKey {
    CertifiedKey::from_der(chain, key, &tls::provider()).unwrap()
}

/// node-a's proof that `initiator_id` at `initiator_addr` wants B, signed with `key` over the
/// transcript of `binding`; and its nonce.
fn prove(
    id: u64,
    binding: &Binding,
    key: &CertifiedKey,
    initiator_id: &str,
    initiator_addr: &str,
) -> (Prove, [u8; proof::NONCE_LEN]) {
    let nonce = proof::nonce().unwrap();
    let initiator_addr: IpAddr = initiator_addr.parse().unwrap();
    let facts = Facts {
        initiator_id,
        responder_id: ID_B,
        initiator_addr,
        responder_addr: B.parse().unwrap(),
        initiator_node: "node-a",
        responder_node: "node-b",
    };
    let t = proof::transcript(Half::Initiator, binding, &facts, &nonce, None);
    let (scheme, signature) = proof::sign(key, &t).unwrap();
    let p = Prove {
        id,
        nonce: hex(&nonce),
        initiator_addr,
        responder_addr: facts.responder_addr,
        responder_id: ID_B.to_owned(),
        chain: key.cert.iter().map(|c| hex(c)).collect(),
        scheme,
        signature: hex(&signature),
    };
    (p, nonce)
}

#[tokio::test]
async fn defective_proofs_inside_a_session_are_refused_with_their_reason() {
    let mut bed = bed(tests::limits()).await;
    let mut s = Manual::open(&mut bed).await;
    let untrusted = TestCa::new("td");
    let good = {
        let a = svid(&bed.ca, ID_A);
        signer((a.chain.clone(), a.key.clone_key()))
    };
    let defective = |what: &str, key: CertifiedKey| (what.to_owned(), key);
    let chains = [
        defective("expired", signer(leaf(&bed.test_ca, ID_A, expired))),
        defective("untrusted", signer(leaf(&untrusted, ID_A, |_| {}))),
        defective("no URI SAN", signer(leaf(&bed.test_ca, ID_A, no_uri_san))),
        defective("CA as leaf", signer(leaf(&bed.test_ca, ID_A, ca_as_leaf))),
        defective("chain of 5", signer(chain_of(&bed.test_ca, ID_A, 5))),
    ];
    let expected = [
        Reason::Expired,
        Reason::UntrustedChain,
        Reason::NoUriSan,
        Reason::CaAsLeaf,
        Reason::ChainTooLong,
    ];
    let mut cases: Vec<(String, Prove, Reason)> = Vec::new();
    let mut id = 0;
    let mut next_id = || {
        id += 1;
        id
    };
    for ((what, key), reason) in chains.into_iter().zip(expected) {
        cases.push((what, prove(next_id(), &s.binding, &key, ID_A, A).0, reason));
    }
    let (mut p, _) = prove(next_id(), &s.binding, &good, ID_A, A);
    p.chain = vec!["zz".into()];
    cases.push(("garbage hex".into(), p, Reason::Protocol));
    let (mut p, _) = prove(next_id(), &s.binding, &good, ID_A, A);
    p.chain = vec![hex(b"not a certificate")];
    cases.push(("not DER".into(), p, Reason::Malformed));
    let (mut p, _) = prove(next_id(), &s.binding, &good, ID_A, A);
    p.chain = vec![];
    cases.push(("no chain".into(), p, Reason::NoCertificate));
    let (mut p, _) = prove(next_id(), &s.binding, &good, ID_A, A);
    let mut sig = wire::unhex(&p.signature).unwrap();
    let last = sig.len() - 1;
    sig[last] ^= 1;
    p.signature = hex(&sig);
    cases.push(("a corrupted signature".into(), p, Reason::BadSignature));
    // A proof made for another session proves nothing in this one.
    let other = Binding {
        proof: [7; 32],
        keying: [7; 32],
    };
    let (p, _) = prove(next_id(), &other, &good, ID_A, A);
    cases.push((
        "a signature over another session".into(),
        p,
        Reason::BadSignature,
    ));
    // Signed by another workload's key than the chain's.
    let (mut p, _) = prove(next_id(), &s.binding, &good, ID_A, A);
    p.chain = signer(leaf(&bed.test_ca, ID_A, |_| {}))
        .cert
        .iter()
        .map(|c| hex(c))
        .collect();
    cases.push(("a signature by another key".into(), p, Reason::BadSignature));
    // C is on node-b by cluster state, not on node-a, whose session this is.
    let (p, _) = prove(next_id(), &s.binding, &good, ID_A, C);
    cases.push((
        "an initiator on another node".into(),
        p,
        Reason::NodeMismatch,
    ));
    let (p, _) = prove(next_id(), &s.binding, &good, ID_A, "198.18.1.99");
    cases.push(("an unknown initiator".into(), p, Reason::UnknownInitiator));
    let (mut p, _) = prove(next_id(), &s.binding, &good, ID_A, A);
    p.nonce = hex(&[1; 4]);
    cases.push(("a short nonce".into(), p, Reason::Protocol));
    for (what, p, reason) in cases {
        let id = p.id;
        s.send(Message::Prove(p)).await;
        match s.next().await {
            Ok(Message::Refuse(r)) => {
                assert_eq!((r.id, r.reason), (id, reason), "{what}");
            }
            m => panic!("{what}: answered {m:?}"),
        }
        let rec = bed.b.next_proof().await;
        assert_eq!(rec.result, Err(reason), "{what}: {rec:?}");
        assert_eq!(
            rec.remote_node.as_deref(),
            Some("node-a"),
            "{what}: {rec:?}"
        );
        assert!(rec.keys.is_none(), "{what}: {rec:?}");
        if reason == Reason::NodeMismatch {
            assert!(
                rec.detail.as_deref().is_some_and(|d| d.contains("node-b")),
                "{what}: {rec:?}"
            );
        }
        assert!(
            bed.b.writes.lock().unwrap().is_empty(),
            "{what}: an entry was written"
        );
    }
    // Answers nobody asked for are ignored, and the session goes on.
    s.send(Message::Refuse(wire::Refuse {
        id: 999,
        reason: Reason::Busy,
    }))
    .await;
    s.send(Message::Reject(wire::Reject {
        id: 998,
        reason: Reason::BadSignature,
    }))
    .await;
    // The same session still serves a valid proof: Proven, signed by B over this session.
    let (p, nonce) = prove(next_id(), &s.binding, &good, ID_A, A);
    let id = p.id;
    s.send(Message::Prove(p)).await;
    let proven = match s.next().await {
        Ok(Message::Proven(p)) => p,
        m => panic!("a valid proof answered {m:?}"),
    };
    assert_eq!(proven.id, id);
    let chain: Vec<CertificateDer<'static>> = proven
        .chain
        .iter()
        .map(|c| CertificateDer::from(wire::unhex(c).unwrap()))
        .collect();
    assert_eq!(uri_sans(&chain[0]), [ID_B]);
    let facts = Facts {
        initiator_id: ID_A,
        responder_id: ID_B,
        initiator_addr: A.parse().unwrap(),
        responder_addr: B.parse().unwrap(),
        initiator_node: "node-a",
        responder_node: "node-b",
    };
    let t = proof::transcript(
        Half::Responder,
        &s.binding,
        &facts,
        &nonce,
        Some(&wire::unhex(&proven.nonce).unwrap()),
    );
    let sig = wire::unhex(&proven.signature).unwrap();
    assert_eq!(proof::verify(&chain[0], proven.scheme, &t, &sig), Ok(()));
    let rec = bed.b.next_proof().await;
    assert!(rec.result.is_ok(), "{rec:?}");
    assert_eq!(bed.b.writes.lock().unwrap().len(), 1);
    drop(s);
    bed.still_serves().await;
}

#[tokio::test]
async fn a_malformed_frame_closes_the_session() {
    let mut bed = bed(tests::limits()).await;
    let frame = |version: u8, kind: u8, body: &[u8]| {
        let mut f = u32::try_from(body.len() + 2)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        f.extend_from_slice(&[version, kind]);
        f.extend_from_slice(body);
        f
    };
    let cases = [
        ("an unknown kind", frame(wire::VERSION, 9, b"{}")),
        ("bad JSON", frame(wire::VERSION, 1, b"{\"id\":")),
        (
            "an unknown field",
            frame(wire::VERSION, 3, br#"{"id":1,"reason":"busy","more":1}"#),
        ),
        ("a version 1 frame", frame(1, 1, b"{}")),
        ("a frame too short", vec![0, 0, 0, 1, wire::VERSION]),
        ("a frame too long", {
            let mut f = u32::try_from(wire::MAX_FRAME + 1)
                .unwrap()
                .to_be_bytes()
                .to_vec();
            f.extend_from_slice(&[wire::VERSION, 1]);
            f
        }),
    ];
    for (what, bytes) in cases {
        let mut s = Manual::open(&mut bed).await;
        s.send_raw(&bytes).await;
        assert_eq!(
            s.next().await,
            Err(Reason::SessionClosed),
            "{what}: the session was not closed"
        );
        let mut down = false;
        for _ in 0..100 {
            if bed.b.sessions.up() == 0 {
                down = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(down, "{what}: the responder still holds the session");
        // The loss is on record, with its reason; nothing else was decided.
        let lost = bed.b.next_session().await;
        let expected = if what == "a version 1 frame" {
            Reason::Version
        } else {
            Reason::Protocol
        };
        assert_eq!(lost.result, Err(expected), "{what}: {lost:?}");
        assert_eq!(lost.remote_node.as_deref(), Some("node-a"), "{what}");
        assert!(
            lost.detail
                .as_deref()
                .is_some_and(|d| d.contains("malformed")),
            "{what}: {lost:?}"
        );
    }
    // The next records are the valid proof's.
    bed.still_serves().await;
}

#[tokio::test]
async fn a_peer_over_its_connection_rate_is_refused_and_others_are_not() {
    let mut bed = bed(Limits {
        timeout: Duration::from_millis(500),
        max_concurrent: 64,
        peer_rate: 2,
        peer_burst: 5,
    })
    .await;
    // 20 connections at once from 127.0.0.1: the burst is admitted (and held idle), the rest
    // closed at once.
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(TcpStream::connect(bed.b.addr).await.unwrap());
    }
    // Another address is not held to 127.0.0.1's account.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = other.connect(bed.b.addr).await.unwrap();
    let (mut limited, mut timed_out, mut other_timed_out) = (0, 0, 0);
    while limited + timed_out < 21 {
        let rec = bed.refused().await;
        let from_other = rec
            .peer
            .is_some_and(|p| p.ip() == IpAddr::from([127, 0, 0, 2]));
        match rec.result {
            Err(Reason::RateLimited) => {
                assert!(!from_other, "127.0.0.2 was refused for 127.0.0.1's rate");
                limited += 1;
                assert!(
                    rec.detail
                        .as_deref()
                        .is_some_and(|d| d.contains("handshake.peer_rate")),
                    "{rec:?}"
                );
            }
            Err(Reason::Timeout) => {
                timed_out += 1;
                other_timed_out += usize::from(from_other);
            }
            _ => panic!("unexpected {rec:?}"),
        }
    }
    assert_eq!(limited, 15, "refusals for the 15 over the burst");
    assert_eq!(
        (timed_out, other_timed_out),
        (6, 1),
        "the burst and 127.0.0.2 held"
    );
    let mut buf = [0u8; 1];
    assert!(matches!(other.read(&mut buf).await, Ok(0) | Err(_)));
    for c in &mut conns {
        assert!(matches!(c.read(&mut buf).await, Ok(0) | Err(_)));
    }
    drop(conns);
    // The bucket refills at 2 per second: a valid session gets through again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    bed.still_serves().await;
}
