//! The agent-to-agent handshake (see `docs/PROTOCOL.md`): over TCP, TLS 1.3 with mutual SVID
//! authentication, then one request and one answer in length-prefixed frames.
//!
//! The initiator presents its local workload's SVID and names, in SNI, the remote address it
//! wants proven; the responder presents the SVID of the workload that owns that address on its
//! node, or refuses (`access_denied`) when it hosts none. After TLS, the initiator sends
//! `Hello` (its node, its workload's address, the address it asked for); each side checks the
//! other's SPIFFE ID against the identity cluster state gives that address and node, and both
//! write their own auth entry, valid until the earlier `notAfter` of the two SVIDs. One
//! handshake serves both directions.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

mod listener;

pub use self::listener::{Limits, serve};
use crate::{
    identity::{SpiffeId, store::Svid, svid},
    policy::Policy,
    reason::Reason,
    tls::{self, LocalSvid, Trust},
};

/// Protocol version carried in every frame.
pub const VERSION: u8 = 1;
/// Largest frame body accepted, in bytes.
pub const MAX_FRAME: usize = 16 * 1024;

const KIND_HELLO: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub initiator_node: String,
    pub initiator_addr: IpAddr,
    pub responder_addr: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    /// Unix milliseconds until which the responder's entry admits the pair.
    pub expires_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    pub reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Accept(Accept),
    Refuse(Refuse),
}

impl Message {
    /// `u32` big-endian length of what follows, `u8` version, `u8` kind, JSON body.
    pub fn encode(&self) -> BytesMut {
        let (kind, body) = match self {
            Self::Hello(m) => (KIND_HELLO, serde_json::to_vec(m)),
            Self::Accept(m) => (KIND_ACCEPT, serde_json::to_vec(m)),
            Self::Refuse(m) => (KIND_REFUSE, serde_json::to_vec(m)),
        };
        // Serializing these plain structs cannot fail.
        let body = body.unwrap_or_default();
        let mut buf = BytesMut::with_capacity(6 + body.len());
        buf.put_u32(u32::try_from(body.len() + 2).unwrap_or(u32::MAX));
        buf.put_u8(VERSION);
        buf.put_u8(kind);
        buf.put_slice(&body);
        buf
    }

    /// Decodes one frame's content (after the length prefix).
    pub fn decode(mut frame: &[u8]) -> Result<Self, Reason> {
        if frame.len() < 2 {
            return Err(Reason::Protocol);
        }
        let version = frame.get_u8();
        if version != VERSION {
            return Err(Reason::Version);
        }
        let kind = frame.get_u8();
        let bad = |_| Reason::Protocol;
        Ok(match kind {
            KIND_HELLO => Self::Hello(serde_json::from_slice(frame).map_err(bad)?),
            KIND_ACCEPT => Self::Accept(serde_json::from_slice(frame).map_err(bad)?),
            KIND_REFUSE => Self::Refuse(serde_json::from_slice(frame).map_err(bad)?),
            _ => return Err(Reason::Protocol),
        })
    }
}

pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<(), Reason> {
    w.write_all(&msg.encode())
        .await
        .map_err(|_| Reason::Protocol)?;
    w.flush().await.map_err(|_| Reason::Protocol)
}

/// A read failure: a TLS alert the peer sent (in TLS 1.3 a server rejects the client's
/// certificate only after the client has finished its side, so the client learns it here), or
/// else a protocol error.
fn read_error(e: &std::io::Error) -> Reason {
    match tls::rustls_error(e).map(tls::reason_of) {
        Some(Reason::Tls) | None => Reason::Protocol,
        Some(r) => r,
    }
}

pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, Reason> {
    let len = r.read_u32().await.map_err(|e| read_error(&e))? as usize;
    if !(2..=MAX_FRAME).contains(&len) {
        return Err(Reason::Protocol);
    }
    let mut frame = vec![0; len];
    r.read_exact(&mut frame)
        .await
        .map_err(|_| Reason::Protocol)?;
    Message::decode(&frame)
}

/// Who owns an address, by cluster state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub id: SpiffeId,
    pub node: Arc<str>,
}

/// Cluster state as a handshake asks it: who owns an address, where a node accepts
/// handshakes. The agent's index answers it live, so that a change of cluster state reaches
/// handshakes without rebuilding anything.
pub trait Directory: Send + Sync {
    fn owner(&self, addr: &IpAddr) -> Option<Owner>;
    fn node_address(&self, node: &str) -> Option<SocketAddr>;
}

/// A fixed directory (tests, benchmarks).
#[derive(Debug, Default, Clone)]
pub struct StaticDirectory {
    pub owners: HashMap<IpAddr, Owner>,
    pub nodes: HashMap<String, SocketAddr>,
}

impl Directory for StaticDirectory {
    fn owner(&self, addr: &IpAddr) -> Option<Owner> {
        self.owners.get(addr).cloned()
    }

    fn node_address(&self, node: &str) -> Option<SocketAddr> {
        self.nodes.get(node).copied()
    }
}

/// Everything a handshake needs to know: the credentials and policy as one immutable snapshot
/// that the agent's core republishes whenever they change, and cluster state through the live
/// [`Directory`].
pub struct View {
    pub node: String,
    pub trust: Trust,
    pub directory: Arc<dyn Directory>,
    pub svids: HashMap<SpiffeId, LocalSvid>,
    /// The authorization policy both sides evaluate.
    pub policy: Arc<Policy>,
    pub server: Arc<rustls::ServerConfig>,
    /// A client configuration per local identity, built once per snapshot.
    pub clients: HashMap<SpiffeId, Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("node", &self.node)
            .field("svids", &self.svids.keys().collect::<Vec<_>>())
            .field("policy", &self.policy.name)
            .finish_non_exhaustive()
    }
}

impl View {
    /// Builds the snapshot: rustls keys for the SVIDs, and a server configuration that presents,
    /// for the local address an initiator names, the SVID of the workload that owns it.
    pub fn build(
        node: &str,
        trust: Trust,
        directory: Arc<dyn Directory>,
        svids: &[Svid],
        policy: Arc<Policy>,
    ) -> Result<Self, tls::TlsError> {
        let svids: HashMap<SpiffeId, LocalSvid> = svids
            .iter()
            .map(|s| Ok((s.id.clone(), tls::local_svid(s)?)))
            .collect::<Result<_, tls::TlsError>>()?;
        let keys: HashMap<SpiffeId, Arc<rustls::sign::CertifiedKey>> = svids
            .iter()
            .map(|(id, s)| (id.clone(), s.key.clone()))
            .collect();
        let (dir, here) = (directory.clone(), node.to_owned());
        let hosted = tls::HostedKeys(Box::new(move |addr| {
            let owner = dir.owner(&addr).filter(|o| *o.node == *here)?;
            keys.get(&owner.id).cloned()
        }));
        let server = tls::server_config(&trust, hosted)?;
        let clients = svids
            .iter()
            .map(|(id, s)| Ok((id.clone(), tls::client_config(&trust, s)?)))
            .collect::<Result<_, tls::TlsError>>()?;
        Ok(Self {
            clients,
            node: node.to_owned(),
            trust,
            directory,
            svids,
            policy,
            server,
        })
    }

    /// The owner of `addr`, if it is a workload of this node.
    fn local_owner(&self, addr: &IpAddr) -> Option<Owner> {
        self.directory.owner(addr).filter(|o| *o.node == *self.node)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Initiator,
    Responder,
}

impl Role {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Initiator => "initiator",
            Self::Responder => "responder",
        }
    }
}

/// The outcome of one handshake, as far as it got: the audit record, and (on success) what to
/// write into the auth map.
#[derive(Debug, Clone)]
pub struct Record {
    pub role: Role,
    pub peer: Option<SocketAddr>,
    pub local_addr: Option<IpAddr>,
    pub remote_addr: Option<IpAddr>,
    pub local_id: Option<SpiffeId>,
    pub remote_id: Option<SpiffeId>,
    pub remote_node: Option<String>,
    /// The entry's expiry on success.
    pub result: Result<SystemTime, Reason>,
    /// More about a failure than `Reason` says (which policy, which rules).
    pub detail: Option<String>,
    pub took: Duration,
}

impl Record {
    pub(crate) fn new(role: Role) -> Self {
        Self {
            role,
            peer: None,
            local_addr: None,
            remote_addr: None,
            local_id: None,
            remote_id: None,
            remote_node: None,
            result: Err(Reason::Internal),
            detail: None,
            took: Duration::ZERO,
        }
    }
}

/// Why the core did not write the entry a responder asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRefused {
    /// What the handshake's record and the initiator are told (`not_authorized` for a policy
    /// that changed meanwhile, `internal` for a kernel refusal).
    pub reason: Reason,
    pub detail: String,
}

/// The responder's request to the core: write this entry, then tell me whether it worked.
pub type WriteRequest = (Record, oneshot::Sender<Result<(), WriteRefused>>);

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

fn peer_identity(
    certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    td: &str,
) -> Result<svid::LeafInfo, Reason> {
    let certs = certs.ok_or(Reason::NoCertificate)?;
    svid::check_chain(certs, td, SystemTime::now())
}

/// Proves `local_addr`'s workload to the agent that hosts `remote_addr`, and has it proven.
pub async fn initiate(
    view: Arc<View>,
    local_addr: IpAddr,
    remote_addr: IpAddr,
    timeout: Duration,
) -> Record {
    let start = std::time::Instant::now();
    let mut rec = Record::new(Role::Initiator);
    rec.local_addr = Some(local_addr);
    rec.remote_addr = Some(remote_addr);
    let result = tokio::time::timeout(timeout, initiate_inner(&view, &mut rec)).await;
    rec.result = result.unwrap_or(Err(Reason::Timeout));
    rec.took = start.elapsed();
    rec
}

async fn initiate_inner(view: &View, rec: &mut Record) -> Result<SystemTime, Reason> {
    let (local_addr, remote_addr) = (
        rec.local_addr.ok_or(Reason::Internal)?,
        rec.remote_addr.ok_or(Reason::Internal)?,
    );
    let local = view.local_owner(&local_addr).ok_or(Reason::UnknownPeer)?;
    rec.local_id = Some(local.id.clone());
    let remote = view
        .directory
        .owner(&remote_addr)
        .ok_or(Reason::UnknownPeer)?;
    rec.remote_node = Some(remote.node.to_string());
    // The identity we ask to be proven; replaced by the one the peer proves, if it gets that far.
    rec.remote_id = Some(remote.id.clone());
    let svid = view.svids.get(&local.id).ok_or(Reason::NoLocalSvid)?;
    let target = view
        .directory
        .node_address(&remote.node)
        .ok_or(Reason::UnknownPeer)?;
    rec.peer = Some(target);
    let tcp = TcpStream::connect(target)
        .await
        .map_err(|_| Reason::Unreachable)?;
    let _ = tcp.set_nodelay(true);
    let config = view
        .clients
        .get(&local.id)
        .ok_or(Reason::NoLocalSvid)?
        .clone();
    let name = rustls::pki_types::ServerName::try_from(tls::sni_for(remote_addr))
        .map_err(|_| Reason::Internal)?;
    let mut stream = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| tls_failure(rec, &e, Reason::Tls))?;
    let peer = peer_identity(
        stream.get_ref().1.peer_certificates(),
        &view.trust.trust_domain,
    )?;
    rec.remote_id = Some(peer.id.clone());
    if peer.id != remote.id {
        return Err(Reason::IdentityMismatch);
    }
    if !view.policy.decide(&local.id, &peer.id).authorized() {
        rec.detail = Some(view.policy.denial(&local.id, &peer.id));
        let reason = Reason::NotAuthorized;
        let _ = write_msg(&mut stream, &Message::Refuse(Refuse { reason })).await;
        return Err(reason);
    }
    let hello = Hello {
        initiator_node: view.node.clone(),
        initiator_addr: local_addr,
        responder_addr: remote_addr,
    };
    write_msg(&mut stream, &Message::Hello(hello)).await?;
    match read_msg(&mut stream).await? {
        Message::Accept(_) => {}
        Message::Refuse(r) => {
            if r.reason == Reason::NotAuthorized {
                rec.detail = Some("refused by the responder's policy".to_owned());
            }
            return Err(r.reason);
        }
        Message::Hello(_) => return Err(Reason::Protocol),
    }
    let _ = stream.shutdown().await;
    Ok(svid.not_after.min(peer.not_after))
}

/// Answers one initiator on `tcp`.
pub async fn respond(
    view: Arc<View>,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    core: tokio::sync::mpsc::Sender<WriteRequest>,
) -> Record {
    let start = std::time::Instant::now();
    let mut rec = Record::new(Role::Responder);
    rec.peer = Some(peer);
    let result = tokio::time::timeout(timeout, respond_inner(&view, tcp, &mut rec, &core)).await;
    rec.result = result.unwrap_or(Err(Reason::Timeout));
    rec.took = start.elapsed();
    rec
}

/// The reason for a failed TLS handshake, with rustls's own words as the record's detail.
fn tls_failure(rec: &mut Record, e: &std::io::Error, otherwise: Reason) -> Reason {
    match tls::rustls_error(e) {
        Some(err) => {
            rec.detail = Some(err.to_string());
            tls::reason_of(err)
        }
        None => {
            rec.detail = Some(e.to_string());
            otherwise
        }
    }
}

async fn respond_inner(
    view: &View,
    tcp: TcpStream,
    rec: &mut Record,
    core: &tokio::sync::mpsc::Sender<WriteRequest>,
) -> Result<SystemTime, Reason> {
    let _ = tcp.set_nodelay(true);
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|e| tls_failure(rec, &e, Reason::Protocol))?;
    let asked = start
        .client_hello()
        .server_name()
        .and_then(tls::addr_from_sni);
    rec.local_addr = asked;
    let local = asked.and_then(|a| view.local_owner(&a));
    rec.local_id = local.as_ref().map(|o| o.id.clone());
    let hosted = local
        .as_ref()
        .is_some_and(|o| view.svids.contains_key(&o.id));
    let accepted = start.into_stream(view.server.clone()).await;
    if !hosted {
        // The resolver found no SVID and rustls has refused with `access_denied`.
        return Err(if local.is_some() {
            Reason::NoLocalSvid
        } else {
            Reason::NotHosted
        });
    }
    let mut stream = accepted.map_err(|e| tls_failure(rec, &e, Reason::Tls))?;
    let local = local.ok_or(Reason::NotHosted)?;
    let svid = view.svids.get(&local.id).ok_or(Reason::NoLocalSvid)?;
    let peer_cert = peer_identity(
        stream.get_ref().1.peer_certificates(),
        &view.trust.trust_domain,
    )?;
    rec.remote_id = Some(peer_cert.id.clone());
    let verdict = async {
        let hello = match read_msg(&mut stream).await? {
            Message::Hello(hello) => hello,
            Message::Refuse(r) => {
                rec.detail = Some(format!("refused by the initiator: {}", r.reason));
                return Err(r.reason);
            }
            Message::Accept(_) => return Err(Reason::Protocol),
        };
        rec.remote_addr = Some(hello.initiator_addr);
        rec.remote_node = Some(hello.initiator_node.clone());
        if Some(hello.responder_addr) != asked {
            return Err(Reason::Protocol);
        }
        let initiator = view
            .directory
            .owner(&hello.initiator_addr)
            .ok_or(Reason::UnknownInitiator)?;
        if *initiator.node != *hello.initiator_node {
            return Err(Reason::UnknownInitiator);
        }
        if initiator.id != peer_cert.id {
            return Err(Reason::IdentityMismatch);
        }
        let node_addr = view
            .directory
            .node_address(&hello.initiator_node)
            .ok_or(Reason::UnknownInitiator)?;
        if Some(node_addr.ip()) != rec.peer.map(|p| p.ip()) {
            return Err(Reason::NodeMismatch);
        }
        if !view.policy.decide(&local.id, &peer_cert.id).authorized() {
            rec.detail = Some(view.policy.denial(&local.id, &peer_cert.id));
            return Err(Reason::NotAuthorized);
        }
        Ok(svid.not_after.min(peer_cert.not_after))
    }
    .await;
    let expires = match verdict {
        Ok(t) => t,
        Err(reason) => {
            let _ = write_msg(&mut stream, &Message::Refuse(Refuse { reason })).await;
            return Err(reason);
        }
    };
    // Our entry first: the initiator's SYN may be on its way.
    let mut pending = rec.clone();
    pending.result = Ok(expires);
    let (tx, rx) = oneshot::channel();
    let stopped = || WriteRefused {
        reason: Reason::Internal,
        detail: "the agent stopped".to_owned(),
    };
    let written = match core.send((pending, tx)).await {
        Ok(()) => rx.await.unwrap_or_else(|_| Err(stopped())),
        Err(_) => Err(stopped()),
    };
    if let Err(e) = written {
        rec.detail = Some(e.detail);
        let _ = write_msg(&mut stream, &Message::Refuse(Refuse { reason: e.reason })).await;
        return Err(e.reason);
    }
    write_msg(
        &mut stream,
        &Message::Accept(Accept {
            expires_unix_ms: unix_ms(expires),
        }),
    )
    .await?;
    let _ = stream.shutdown().await;
    Ok(expires)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        let hello = Message::Hello(Hello {
            initiator_node: "n1".into(),
            initiator_addr: "198.18.1.2".parse().unwrap(),
            responder_addr: "fd00:18:2::2".parse().unwrap(),
        });
        for msg in [
            hello,
            Message::Accept(Accept {
                expires_unix_ms: 42,
            }),
            Message::Refuse(Refuse {
                reason: Reason::NotHosted,
            }),
        ] {
            let buf = msg.encode();
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            assert_eq!(len, buf.len() - 4);
            assert_eq!(Message::decode(&buf[4..]), Ok(msg));
        }
        assert_eq!(Message::decode(&[]), Err(Reason::Protocol));
        assert_eq!(
            Message::decode(&[2, KIND_ACCEPT, b'{', b'}']),
            Err(Reason::Version)
        );
        assert_eq!(
            Message::decode(&[VERSION, 9, b'{', b'}']),
            Err(Reason::Protocol)
        );
        assert_eq!(
            Message::decode(&[VERSION, KIND_ACCEPT, b'x']),
            Err(Reason::Protocol)
        );
    }

    pub(super) mod loopback {
        use std::time::Duration;

        use tokio::net::TcpListener;

        use super::super::*;
        use crate::identity::ca::Ca;

        pub(crate) const A: &str = "198.18.1.2";
        pub(crate) const B: &str = "198.18.2.2";
        const C: &str = "198.18.2.3";

        pub(crate) fn svid(ca: &Ca, id: &str) -> Svid {
            let id = SpiffeId::parse(id).unwrap();
            let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
            let info = svid::check_leaf(&issued.cert_der, SystemTime::now()).unwrap();
            Svid::new(vec![issued.cert_der], issued.key_der, info)
        }

        pub(crate) fn owners() -> HashMap<IpAddr, Owner> {
            let o = |id: &str, node: &str| Owner {
                id: SpiffeId::parse(id).unwrap(),
                node: node.into(),
            };
            [
                (
                    A.parse().unwrap(),
                    o("spiffe://td/ns/default/sa/a", "node-a"),
                ),
                (
                    B.parse().unwrap(),
                    o("spiffe://td/ns/default/sa/b", "node-b"),
                ),
                (
                    C.parse().unwrap(),
                    o("spiffe://td/ns/default/sa/c", "node-b"),
                ),
            ]
            .into()
        }

        /// Runs one handshake A → `target` between two views; returns (initiator, responder).
        async fn run(a_ca: &Ca, b_ca: &Ca, a_id: &str, target: &str) -> (Record, Record) {
            run_with(
                a_ca,
                b_ca,
                a_id,
                target,
                owners(),
                &[Policy::default(), Policy::default()],
            )
            .await
        }

        pub(crate) async fn run_with(
            a_ca: &Ca,
            b_ca: &Ca,
            a_id: &str,
            target: &str,
            a_owners: HashMap<IpAddr, Owner>,
            policies: &[Policy; 2],
        ) -> (Record, Record) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let nodes: HashMap<String, SocketAddr> = [
                ("node-a".into(), "127.0.0.1:1".parse().unwrap()),
                ("node-b".into(), listener.local_addr().unwrap()),
            ]
            .into();
            let trust = |ca: &Ca| {
                Trust::new(
                    "td",
                    &[
                        rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
                            .unwrap(),
                    ],
                )
                .unwrap()
            };
            let dir = |owners| {
                Arc::new(StaticDirectory {
                    owners,
                    nodes: nodes.clone(),
                }) as Arc<dyn Directory>
            };
            let view_a = View::build(
                "node-a",
                trust(a_ca),
                dir(a_owners),
                &[svid(a_ca, a_id)],
                Arc::new(policies[0].clone()),
            )
            .unwrap();
            let view_b = View::build(
                "node-b",
                trust(b_ca),
                dir(owners()),
                &[svid(b_ca, "spiffe://td/ns/default/sa/b")],
                Arc::new(policies[1].clone()),
            )
            .unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
            tokio::spawn(async move {
                while let Some((_, reply)) = rx.recv().await {
                    let _ = reply.send(Ok(()));
                }
            });
            let responder = tokio::spawn(async move {
                let (tcp, peer) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
                    .await
                    .expect("no connection")
                    .unwrap();
                respond(Arc::new(view_b), tcp, peer, Duration::from_secs(5), tx).await
            });
            let init = initiate(
                Arc::new(view_a),
                A.parse().unwrap(),
                target.parse().unwrap(),
                Duration::from_secs(5),
            )
            .await;
            (init, responder.await.unwrap())
        }

        use rustls_pki_types::pem::PemObject;

        #[tokio::test]
        async fn a_mutual_handshake_authenticates_both_sides() {
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::init("td", dir.path()).unwrap();
            let (i, r) = run(&ca, &ca, "spiffe://td/ns/default/sa/a", B).await;
            assert!(i.result.is_ok(), "initiator: {i:?}");
            assert!(r.result.is_ok(), "responder: {r:?}");
            assert_eq!(
                i.remote_id.as_ref().map(SpiffeId::as_str),
                Some("spiffe://td/ns/default/sa/b")
            );
            assert_eq!(
                r.remote_id.as_ref().map(SpiffeId::as_str),
                Some("spiffe://td/ns/default/sa/a")
            );
            assert_eq!(r.remote_node.as_deref(), Some("node-a"));
            assert_eq!(
                i.result.unwrap(),
                r.result.unwrap(),
                "both sides agree on the expiry"
            );
        }

        #[tokio::test]
        async fn a_foreign_ca_is_rejected_on_both_sides() {
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::init("td", &dir.path().join("1")).unwrap();
            let foreign = Ca::init("td", &dir.path().join("2")).unwrap();
            let (i, r) = run(&foreign, &ca, "spiffe://td/ns/default/sa/a", B).await;
            assert_eq!(i.result, Err(Reason::UntrustedChain), "initiator: {i:?}");
            assert_eq!(
                r.result,
                Err(Reason::PeerRejectedCertificate),
                "responder: {r:?}"
            );
        }

        #[tokio::test]
        async fn the_responder_refuses_an_address_it_does_not_host() {
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::init("td", dir.path()).unwrap();
            let (i, r) = run(&ca, &ca, "spiffe://td/ns/default/sa/a", C).await;
            assert_eq!(i.result, Err(Reason::NotHosted), "initiator: {i:?}");
            assert_eq!(r.result, Err(Reason::NoLocalSvid), "responder: {r:?}");
        }

        #[tokio::test]
        async fn an_identity_that_does_not_own_the_address_is_refused() {
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::init("td", dir.path()).unwrap();
            // A's agent wrongly believes A belongs to C, and presents C's SVID for it.
            let mut stale = owners();
            stale.insert(
                A.parse().unwrap(),
                Owner {
                    id: SpiffeId::parse("spiffe://td/ns/default/sa/c").unwrap(),
                    node: "node-a".into(),
                },
            );
            let (i, r) = run_with(
                &ca,
                &ca,
                "spiffe://td/ns/default/sa/c",
                B,
                stale,
                &[Policy::default(), Policy::default()],
            )
            .await;
            assert_eq!(r.result, Err(Reason::IdentityMismatch), "responder: {r:?}");
            assert_eq!(i.result, Err(Reason::IdentityMismatch), "initiator: {i:?}");
        }
    }

    /// A policy under which B accepts only C and opens nothing towards A: the pair (A, B) is
    /// authorized in neither direction.
    fn b_only_from_c() -> Policy {
        Policy::parse(
            std::path::Path::new("p.yaml"),
            "name: strict\nrules:\n  - name: c-to-b\n    from: [\"spiffe://td/ns/default/sa/c\"]\n    to: [\"spiffe://td/ns/default/sa/b\"]\n  - name: c-to-a\n    from: [\"spiffe://td/ns/default/sa/c\"]\n    to: [\"spiffe://td/ns/default/sa/a\"]\n",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn an_unauthorized_pair_is_refused_by_either_side_with_the_policy_named() {
        use loopback::*;
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::identity::ca::Ca::init("td", dir.path()).unwrap();
        let a = "spiffe://td/ns/default/sa/a";
        // Only the responder's policy forbids it.
        let (i, r) = run_with(
            &ca,
            &ca,
            a,
            B,
            owners(),
            &[Policy::default(), b_only_from_c()],
        )
        .await;
        assert_eq!(r.result, Err(Reason::NotAuthorized), "responder: {r:?}");
        assert!(
            r.detail
                .as_deref()
                .is_some_and(|d| d.contains("policy `strict`") && d.contains("c-to-b")),
            "{r:?}"
        );
        assert_eq!(i.result, Err(Reason::NotAuthorized), "initiator: {i:?}");
        // Only the initiator's policy forbids it: it says so instead of Hello.
        let (i, r) = run_with(
            &ca,
            &ca,
            a,
            B,
            owners(),
            &[b_only_from_c(), Policy::default()],
        )
        .await;
        assert_eq!(i.result, Err(Reason::NotAuthorized), "initiator: {i:?}");
        assert!(
            i.detail
                .as_deref()
                .is_some_and(|d| d.contains("policy `strict`")),
            "{i:?}"
        );
        assert_eq!(r.result, Err(Reason::NotAuthorized), "responder: {r:?}");
        assert!(
            r.detail.as_deref().is_some_and(|d| d.contains("initiator")),
            "{r:?}"
        );
    }

    /// Hostile input on the handshake port: each case is refused with a reason on record, and
    /// the responder goes on serving valid handshakes.
    mod hostile {
        use std::{net::SocketAddr, sync::Arc, time::Duration};

        use tokio::{
            io::{AsyncReadExt, AsyncWriteExt},
            net::{TcpListener, TcpStream},
            sync::{mpsc, watch},
        };

        use rcgen::KeyPair;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};

        use super::loopback::{A, B, owners, svid};
        use crate::{
            handshake::{Limits, Record, StaticDirectory, View, WriteRequest, initiate, serve},
            identity::{ca::Ca, svid::tests::TestCa},
            policy::Policy,
            reason::Reason,
            tls::Trust,
        };

        struct Server {
            addr: SocketAddr,
            records: mpsc::Receiver<Record>,
            client: Arc<View>,
            /// A second trusted CA, to issue leaves with chosen defects.
            test_ca: Arc<TestCa>,
            _dir: tempfile::TempDir,
        }

        async fn server(max_concurrent: u32, timeout: Duration) -> Server {
            server_with(Limits {
                timeout,
                max_concurrent,
                peer_rate: 10_000,
                peer_burst: 10_000,
            })
            .await
        }

        async fn server_with(limits: Limits) -> Server {
            use rustls_pki_types::pem::PemObject;
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::init("td", dir.path()).unwrap();
            let test_ca = Arc::new(TestCa::new("td"));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let nodes: std::collections::HashMap<String, SocketAddr> = [
                ("node-a".into(), "127.0.0.1:1".parse().unwrap()),
                ("node-b".into(), addr),
            ]
            .into();
            let trust = || {
                Trust::new(
                    "td",
                    &[
                        rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
                            .unwrap(),
                        test_ca.der.clone(),
                    ],
                )
                .unwrap()
            };
            let view = |node: &str, id: &str| {
                Arc::new(
                    View::build(
                        node,
                        trust(),
                        Arc::new(StaticDirectory {
                            owners: owners(),
                            nodes: nodes.clone(),
                        }),
                        &[svid(&ca, id)],
                        Arc::new(Policy::default()),
                    )
                    .unwrap(),
                )
            };
            let (_view_tx, views) =
                watch::channel(Some(view("node-b", "spiffe://td/ns/default/sa/b")));
            let (write_tx, mut write_rx) = mpsc::channel::<WriteRequest>(16);
            tokio::spawn(async move {
                while let Some((_, reply)) = write_rx.recv().await {
                    let _ = reply.send(Ok(()));
                }
            });
            let (record_tx, records) = mpsc::channel(1024);
            tokio::spawn(async move {
                let _keep = _view_tx;
                serve(listener, views, write_tx, record_tx, limits).await;
            });
            Server {
                addr,
                records,
                client: view("node-a", "spiffe://td/ns/default/sa/a"),
                test_ca,
                _dir: dir,
            }
        }

        impl Server {
            async fn next_record(&mut self) -> Record {
                tokio::time::timeout(Duration::from_secs(5), self.records.recv())
                    .await
                    .expect("no record within 5 s")
                    .expect("records closed")
            }

            async fn next_failure(&mut self) -> Reason {
                let rec = self.next_record().await;
                rec.result.expect_err("a hostile connection was accepted")
            }

            async fn still_serves(&mut self) {
                let rec = initiate(
                    self.client.clone(),
                    A.parse().unwrap(),
                    B.parse().unwrap(),
                    Duration::from_secs(5),
                )
                .await;
                assert!(
                    rec.result.is_ok(),
                    "a valid handshake failed afterwards: {rec:?}"
                );
                // The responder's own record of it.
                let r = tokio::time::timeout(Duration::from_secs(5), self.records.recv())
                    .await
                    .unwrap()
                    .unwrap();
                assert!(r.result.is_ok(), "{r:?}");
            }
        }

        /// Sends `bytes`, half-closes, and reads until the responder closes (bounded).
        async fn send_and_wait_close(addr: SocketAddr, bytes: &[u8]) {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(bytes).await.unwrap();
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
            assert!(
                closed.is_ok(),
                "the responder kept a hostile connection open"
            );
        }

        #[tokio::test]
        async fn garbage_plaintext_http_and_a_truncated_client_hello_are_refused() {
            let mut srv = server(8, Duration::from_secs(2)).await;
            let mut hello = Vec::new();
            {
                // The first bytes of a real TLS 1.3 ClientHello, cut short.
                let config = srv.client.clients.values().next().unwrap().clone();
                let name = rustls::pki_types::ServerName::try_from(crate::tls::sni_for(
                    B.parse().unwrap(),
                ))
                .unwrap();
                let mut conn = rustls::ClientConnection::new(config, name).unwrap();
                conn.write_tls(&mut hello).unwrap();
                hello.truncate(hello.len() / 2);
            }
            for (what, bytes) in [
                ("garbage", b"\x00\x01\x02garbage\xff\xfe".to_vec()),
                (
                    "plaintext HTTP",
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                ),
                ("truncated ClientHello", hello),
            ] {
                send_and_wait_close(srv.addr, &bytes).await;
                let reason = srv.next_failure().await;
                assert!(
                    matches!(reason, Reason::Protocol | Reason::Tls),
                    "{what}: refused with {reason:?}"
                );
                srv.still_serves().await;
            }
        }

        #[tokio::test]
        async fn a_connection_that_never_completes_is_closed_at_the_time_limit() {
            let mut srv = server(8, Duration::from_millis(300)).await;
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            let started = std::time::Instant::now();
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the responder held a silent connection open past its time limit");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
            assert!(started.elapsed() < Duration::from_secs(2));
            assert_eq!(srv.next_failure().await, Reason::Timeout);
            srv.still_serves().await;
        }

        #[tokio::test]
        async fn idle_connections_beyond_the_limit_are_closed_at_once() {
            let mut srv = server(4, Duration::from_millis(500)).await;
            let mut idle = Vec::new();
            for _ in 0..200 {
                idle.push(TcpStream::connect(srv.addr).await.unwrap());
            }
            // All but `max_concurrent` are closed without waiting for the time limit.
            let mut closed_at_once = 0;
            for s in &mut idle {
                let mut buf = [0u8; 1];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
                {
                    closed_at_once += 1;
                }
            }
            assert!(
                closed_at_once >= 196,
                "only {closed_at_once} of 200 closed at once"
            );
            drop(idle);
            // Each refusal is on record as `busy`; the ones that held a slot time out; then
            // the responder serves again.
            let (mut busy, mut held) = (0, 0);
            while held < 4 {
                match srv.next_failure().await {
                    Reason::Busy => busy += 1,
                    Reason::Timeout | Reason::Protocol => held += 1,
                    r => panic!("an idle connection refused with {r:?}"),
                }
            }
            assert!(busy >= 196, "only {busy} refusals on record");
            srv.still_serves().await;
        }

        /// A TLS 1.2 ClientHello (no supported_versions extension) naming a hosted address.
        fn tls12_client_hello() -> Vec<u8> {
            let sni = crate::tls::sni_for(B.parse().unwrap());
            let mut ext = Vec::new();
            let mut put = |kind: u16, body: &[u8]| {
                ext.extend_from_slice(&kind.to_be_bytes());
                ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
                ext.extend_from_slice(body);
            };
            let mut name = vec![0u8];
            name.extend_from_slice(&(sni.len() as u16).to_be_bytes());
            name.extend_from_slice(sni.as_bytes());
            let mut server_name = (name.len() as u16).to_be_bytes().to_vec();
            server_name.extend_from_slice(&name);
            put(0x0000, &server_name);
            put(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // x25519, secp256r1
            put(0x000b, &[1, 0]); // uncompressed points
            put(0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // ecdsa p256, rsa-pss
            let mut alpn = vec![0, 0, crate::tls::ALPN.len() as u8];
            alpn.extend_from_slice(crate::tls::ALPN);
            let alpn_len = (alpn.len() - 2) as u16;
            alpn[..2].copy_from_slice(&alpn_len.to_be_bytes());
            put(0x0010, &alpn);
            let mut body = vec![3, 3]; // TLS 1.2
            body.extend_from_slice(&[0x42; 32]); // random
            body.push(0); // no session id
            body.extend_from_slice(&[0, 4, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE AES-GCM suites
            body.extend_from_slice(&[1, 0]); // null compression
            body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
            body.extend_from_slice(&ext);
            let mut hs = vec![1]; // ClientHello
            hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
            hs.extend_from_slice(&body);
            let mut record = vec![0x16, 3, 1];
            record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
            record.extend_from_slice(&hs);
            record
        }

        #[tokio::test]
        async fn a_tls12_only_client_is_refused() {
            let mut srv = server(8, Duration::from_secs(2)).await;
            send_and_wait_close(srv.addr, &tls12_client_hello()).await;
            let rec = srv.next_record().await;
            assert_eq!(rec.result, Err(Reason::Version), "{rec:?}");
            assert!(
                rec.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("incompatible")),
                "{rec:?}"
            );
            srv.still_serves().await;
        }

        /// Accepts any responder: these tests are about what the responder makes of us.
        #[derive(Debug)]
        struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

        impl rustls::client::danger::ServerCertVerifier for AnyServer {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }

            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }

            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }

            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                self.0.signature_verification_algorithms.supported_schemes()
            }
        }

        /// A client certificate chain and its key.
        type Presented = (Vec<CertificateDer<'static>>, KeyPair);

        /// A TLS 1.3 handshake to the hosted address that presents `chain` (none: no client
        /// certificate), then waits for the responder to close.
        async fn present(addr: SocketAddr, chain: Option<Presented>) {
            let provider = crate::tls::provider();
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
            let mut config = match chain {
                Some((chain, key)) => builder
                    .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))
                    .unwrap(),
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![crate::tls::ALPN.to_vec()];
            let name =
                rustls::pki_types::ServerName::try_from(crate::tls::sni_for(B.parse().unwrap()))
                    .unwrap();
            let tcp = TcpStream::connect(addr).await.unwrap();
            // In TLS 1.3 the client finishes first; the refusal arrives on the next read.
            if let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
            {
                let mut sink = Vec::new();
                let closed =
                    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut sink)).await;
                assert!(closed.is_ok(), "the responder kept the connection open");
            }
        }

        #[tokio::test]
        async fn certificate_defects_on_the_wire_are_refused_with_their_reason() {
            use rcgen::{BasicConstraints, IsCa, SanType};
            use time::{Duration as D, OffsetDateTime};
            let mut srv = server(8, Duration::from_secs(2)).await;
            let ca = srv.test_ca.clone();
            let untrusted = TestCa::new("td");
            let uri = |s: &str| SanType::URI(s.try_into().unwrap());
            let leaf = |ca: &TestCa, edit: &dyn Fn(&mut rcgen::CertificateParams)| {
                let (der, key) = ca.leaf_with_key(|p| {
                    p.subject_alt_names = vec![uri("spiffe://td/ns/default/sa/a")];
                    edit(p);
                });
                Some((vec![der], key))
            };
            let good = leaf(&ca, &|_| {});
            // The leaf, then copies of its CA: `n` certificates in all.
            let chain_of = |n: usize| {
                let (der, key) = ca.leaf_with_key(|p| {
                    p.subject_alt_names = vec![uri("spiffe://td/ns/default/sa/a")];
                });
                let mut chain = vec![der];
                chain.extend(std::iter::repeat_n(ca.der.clone(), n - 1));
                Some((chain, key))
            };
            let (long, huge) = (chain_of(10), chain_of(400));
            let cases: Vec<(&str, Option<Presented>, &[Reason])> = vec![
                ("no client certificate", None, &[Reason::NoCertificate]),
                (
                    "untrusted CA",
                    leaf(&untrusted, &|_| {}),
                    &[Reason::UntrustedChain],
                ),
                (
                    "expired",
                    leaf(&ca, &|p| {
                        p.not_before = OffsetDateTime::now_utc() - D::hours(2);
                        p.not_after = OffsetDateTime::now_utc() - D::hours(1);
                    }),
                    &[Reason::Expired],
                ),
                (
                    "not yet valid",
                    leaf(&ca, &|p| {
                        p.not_before = OffsetDateTime::now_utc() + D::hours(1);
                        p.not_after = OffsetDateTime::now_utc() + D::hours(2);
                    }),
                    &[Reason::NotYetValid],
                ),
                (
                    "wrong trust domain",
                    leaf(&ca, &|p| {
                        p.subject_alt_names = vec![uri("spiffe://elsewhere/ns/default/sa/a")];
                    }),
                    &[Reason::WrongTrustDomain],
                ),
                (
                    "no URI SAN",
                    leaf(&ca, &|p| {
                        p.subject_alt_names =
                            vec![SanType::DnsName("a.example".try_into().unwrap())];
                    }),
                    &[Reason::NoUriSan],
                ),
                (
                    "two URI SANs",
                    leaf(&ca, &|p| {
                        p.subject_alt_names = vec![
                            uri("spiffe://td/ns/default/sa/a"),
                            uri("spiffe://td/ns/default/sa/b"),
                        ];
                    }),
                    &[Reason::MultipleUriSans],
                ),
                (
                    "CA certificate as leaf",
                    leaf(&ca, &|p| {
                        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                    }),
                    &[Reason::CaAsLeaf],
                ),
                ("chain of ten", long, &[Reason::ChainTooLong]),
                // Past the largest handshake message rustls reads.
                ("chain of 400 kB", huge, &[Reason::Protocol, Reason::Tls]),
            ];
            for (what, chain, expected) in cases {
                present(srv.addr, chain).await;
                let rec = srv.next_record().await;
                assert!(
                    rec.result.is_err_and(|r| expected.contains(&r)),
                    "{what}: expected one of {expected:?}, got {rec:?}"
                );
                srv.still_serves().await;
            }
            // The good leaf of the same CA gets through TLS; it is then refused for what it
            // claims (it is not node-a's workload at A by cluster state's say), not for its
            // certificate.
            present(srv.addr, good).await;
            let rec = srv.next_record().await;
            assert!(
                rec.result
                    .is_err_and(|r| !matches!(r, Reason::UntrustedChain | Reason::Tls)),
                "{rec:?}"
            );
        }

        #[tokio::test]
        async fn a_peer_over_its_handshake_rate_is_refused_and_others_are_not() {
            let mut srv = server_with(Limits {
                timeout: Duration::from_millis(500),
                max_concurrent: 64,
                peer_rate: 2,
                peer_burst: 5,
            })
            .await;
            // 20 connections at once from 127.0.0.1: the burst is admitted (and held idle),
            // the rest closed at once.
            let mut conns = Vec::new();
            for _ in 0..20 {
                conns.push(TcpStream::connect(srv.addr).await.unwrap());
            }
            // Another address is not held to 127.0.0.1's account.
            let other = tokio::net::TcpSocket::new_v4().unwrap();
            other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let mut other = other.connect(srv.addr).await.unwrap();
            let (mut limited, mut timed_out) = (0, 0);
            let mut other_refused = false;
            while timed_out < 6 {
                let rec = srv.next_record().await;
                match rec.result {
                    Err(Reason::RateLimited) => {
                        limited += 1;
                        other_refused |=
                            rec.peer.is_some_and(|p| p.ip().to_string() == "127.0.0.2");
                        assert!(
                            rec.detail
                                .as_deref()
                                .is_some_and(|d| d.contains("handshake.peer_rate")),
                            "{rec:?}"
                        );
                    }
                    Err(Reason::Timeout | Reason::Protocol) => timed_out += 1,
                    r => panic!("unexpected {r:?}"),
                }
            }
            assert_eq!(limited, 15, "refusals for the 15 over the burst");
            assert!(!other_refused, "127.0.0.2 was refused for 127.0.0.1's rate");
            let mut buf = [0u8; 1];
            assert!(matches!(other.read(&mut buf).await, Ok(0) | Err(_)));
            drop(conns);
            // The bucket refills at 2 per second: a valid handshake gets through again.
            tokio::time::sleep(Duration::from_millis(600)).await;
            srv.still_serves().await;
        }
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading_them() {
        let mut data: &[u8] = &[0, 1, 0, 0, VERSION];
        assert_eq!(read_msg(&mut data).await, Err(Reason::Protocol));
    }
}
