//! A test client of the agents' node sessions (protocol version 2), written from the wire
//! format and not from the agent's code: the tests crate does not depend on the agent crate,
//! so that a mistake shared by both sides cannot hide itself.
//!
//! A node session is TLS 1.3 with ALPN `portcullis/2` and server name
//! `node.portcullis.invalid`; both sides present their node SVID. After the handshake, frames
//! `u32 BE length | u8 version (2) | u8 kind | JSON body` carry workload proofs: Prove (1),
//! Proven (2), Refuse (3), Reject (4). The initiator signs, with its workload's key, a
//! transcript bound to the session by a TLS exporter (label `EXPORTER-portcullis-proof`).
//!
//! The client is the attacker's as much as the honest node's: it presents whatever chain and
//! key it is given (or none), sends any server name and ALPN, accepts whatever the server
//! presents, and records every certificate and every byte it receives, so that a test can
//! assert what an unauthenticated peer learns. [`Session::connect`] can open the TCP
//! connection from inside a testbed namespace (a helper thread that `setns`es; the socket keeps
//! its namespace afterwards), so the source address is that namespace's.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use serde_json::{Value, json};

use crate::{issuer::Credential, netns};

/// The ALPN protocol of node sessions.
pub const ALPN: &[u8] = b"portcullis/2";
/// Version 1's ALPN (one TLS handshake per pair, workload SVIDs in TLS).
pub const ALPN_V1: &[u8] = b"portcullis/1";
/// The server name a node session asks for.
pub const SERVER_NAME: &str = "node.portcullis.invalid";
/// The exporter label of the value every proof transcript contains.
pub const PROOF_LABEL: &[u8] = b"EXPORTER-portcullis-proof";
/// The exporter label of the pair keys' secret.
pub const KEY_LABEL: &[u8] = b"EXPORTER-portcullis-pair-key";
/// The protocol version in every frame.
pub const VERSION: u8 = 2;
pub const KIND_PROVE: u8 = 1;
pub const KIND_PROVEN: u8 = 2;
pub const KIND_REFUSE: u8 = 3;
pub const KIND_REJECT: u8 = 4;
/// The acceptor's first frame, once it has checked the opener's node SVID.
pub const KIND_READY: u8 = 5;
/// Bytes of a proof nonce.
pub const NONCE_LEN: usize = 16;
/// The largest frame (after the length) the agent accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// The schemes a workload key may sign a proof with (TLS 1.3's, no SHA-1, no PKCS#1 v1.5).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A certificate chain (leaf first) and the leaf's key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .context("the chain PEM")?;
        if chain.is_empty() {
            bail!("no certificate in the chain PEM");
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("the key PEM")?;
        Ok(Self { chain, key })
    }

    /// An issuer's answer, with the key its CSR was made with.
    pub fn from_credential(c: &Credential) -> Result<Self> {
        Self::from_pem(&c.chain_pem, &c.key_pem)
    }

    /// The leaf's one SPIFFE ID (URI SAN).
    pub fn spiffe_id(&self) -> Result<String> {
        let leaf = self.chain.first().context("empty chain")?;
        let ids = uri_sans(leaf);
        match &ids[..] {
            [id] => Ok(id.clone()),
            _ => bail!("the leaf has URI SANs {ids:?}, not exactly one"),
        }
    }

    /// The chain as a proof carries it: DER, hex, leaf first.
    pub fn chain_hex(&self) -> Vec<String> {
        self.chain.iter().map(|c| hex(c)).collect()
    }

    /// Signs `msg` with the leaf's key in one of the schemes proofs allow.
    pub fn sign(&self, msg: &[u8]) -> Result<(u16, Vec<u8>)> {
        let key = provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| anyhow!("loading the workload key: {e}"))?;
        let signer = key
            .choose_scheme(SCHEMES)
            .context("the key signs in none of the proof schemes")?;
        let scheme = u16::from(signer.scheme());
        let sig = signer
            .sign(msg)
            .map_err(|e| anyhow!("signing the transcript: {e}"))?;
        Ok((scheme, sig))
    }
}

/// The URI SANs of a certificate: every `[6] IA5String` (a URI GeneralName) whose value is a
/// `spiffe://` URI. A DER scan, enough for SVIDs (the tests crate has no X.509 parser).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let pat = b"spiffe://";
    let mut i = 0;
    while let Some(p) = find(&der[i..], pat).map(|p| p + i) {
        // Short-form length (< 128) or `0x81 len`.
        let (tag_at, len) = if p >= 2 && der[p - 2] == 0x86 && der[p - 1] < 0x80 {
            (Some(p - 2), usize::from(der[p - 1]))
        } else if p >= 3 && der[p - 3] == 0x86 && der[p - 2] == 0x81 {
            (Some(p - 3), usize::from(der[p - 1]))
        } else {
            (None, 0)
        };
        if tag_at.is_some() && p + len <= der.len() {
            out.push(String::from_utf8_lossy(&der[p..p + len]).into_owned());
        }
        i = p + 1;
    }
    out
}

/// Every `spiffe://…` string in `bytes` (up to the first byte that cannot be part of a URI):
/// what an observer of those bytes could read as an identity.
pub fn spiffe_strings(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(p) = find(&bytes[i..], b"spiffe://").map(|p| p + i) {
        let end = bytes[p..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(b)))
            .map_or(bytes.len(), |e| p + e);
        out.push(String::from_utf8_lossy(&bytes[p..end]).into_owned());
        i = p + 1;
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd hex length");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .with_context(|| format!("not hex: {s:?}"))
        })
        .collect()
}

/// A fresh random nonce.
pub fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    provider()
        .secure_random
        .fill(&mut n)
        .map_err(|_| anyhow!("no randomness"))?;
    Ok(n)
}

/// Version 1's server name for a pod address: the address in hex, then
/// `.v4.addr.portcullis.invalid` (or `.v6.`).
pub fn v1_server_name(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{}.v4.addr.portcullis.invalid", hex(&a.octets())),
        IpAddr::V6(a) => format!("{}.v6.addr.portcullis.invalid", hex(&a.octets())),
    }
}

/// Which half of a proof a transcript is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Initiator,
    Responder,
    /// Not signed: the input of the pair keys.
    Keys,
}

/// What a proof is about, as the transcript names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub initiator_id: String,
    pub responder_id: String,
    pub initiator_addr: IpAddr,
    pub responder_addr: IpAddr,
    /// The responder fills in the node of the session's SVID.
    pub initiator_node: String,
    pub responder_node: String,
}

/// The bytes a workload signs: `portcullis/2 workload proof\0`, the half (`initiator\0`,
/// `responder\0` or `pair keys\0`), the session's proof exporter (32 bytes), the six facts
/// each as `u16 BE length | UTF-8` (initiator id, responder id, initiator address, responder
/// address, initiator node, responder node; addresses in their canonical text form), the
/// initiator's nonce, and (responder and keys) the responder's.
pub fn transcript(
    half: Half,
    proof_exporter: &[u8; 32],
    facts: &Facts,
    initiator_nonce: &[u8],
    responder_nonce: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"portcullis/2 workload proof\0");
    out.extend_from_slice(match half {
        Half::Initiator => b"initiator\0".as_slice(),
        Half::Responder => b"responder\0",
        Half::Keys => b"pair keys\0",
    });
    out.extend_from_slice(proof_exporter);
    let (ia, ra) = (
        facts.initiator_addr.to_string(),
        facts.responder_addr.to_string(),
    );
    for field in [
        facts.initiator_id.as_str(),
        &facts.responder_id,
        &ia,
        &ra,
        &facts.initiator_node,
        &facts.responder_node,
    ] {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&field.as_bytes()[..usize::from(len)]);
    }
    out.extend_from_slice(initiator_nonce);
    if let Some(n) = responder_nonce {
        out.extend_from_slice(n);
    }
    out
}

/// Checks that `leaf`'s key made `sig` over `msg` in `scheme` (one of the proof schemes).
pub fn verify(leaf: &CertificateDer<'_>, scheme: u16, msg: &[u8], sig: &[u8]) -> Result<()> {
    let scheme = SignatureScheme::from(scheme);
    if !SCHEMES.contains(&scheme) {
        bail!("{scheme:?} is not a proof scheme");
    }
    // rustls builds a `DigitallySignedStruct` only from the wire (`scheme u16 | sig u16-len`).
    use rustls::internal::msgs::codec::{Codec, Reader};
    let mut wire = Vec::with_capacity(sig.len() + 4);
    wire.extend_from_slice(&u16::from(scheme).to_be_bytes());
    wire.extend_from_slice(&u16::try_from(sig.len())?.to_be_bytes());
    wire.extend_from_slice(sig);
    let dss = DigitallySignedStruct::read(&mut Reader::init(&wire))
        .map_err(|e| anyhow!("encoding the signature: {e:?}"))?;
    rustls::crypto::verify_tls13_signature(
        msg,
        leaf,
        &dss,
        &provider().signature_verification_algorithms,
    )
    .map(drop)
    .map_err(|e| anyhow!("the signature does not verify: {e}"))
}

/// Checks a chain (leaf first) against a trust bundle (PEM): signatures, validity and usage, as
/// webpki does for a TLS server (a missing DNS name is not an error: SVIDs have none).
pub fn chain_trusted(bundle_pem: &str, chain: &[CertificateDer<'static>]) -> Result<()> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    let (leaf, rest) = chain.split_first().context("empty chain")?;
    match v.verify_server_cert(
        leaf,
        rest,
        &ServerName::try_from(SERVER_NAME)?,
        &[],
        UnixTime::now(),
    ) {
        Ok(_)
        | Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) => Ok(()),
        Err(e) => bail!("the chain does not verify against the bundle: {e}"),
    }
}

/// Takes whatever the server presents and keeps a copy of it.
#[derive(Debug)]
struct Capture {
    provider: Arc<CryptoProvider>,
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = lock(&self.seen);
        seen.push(end_entity.clone().into_owned());
        seen.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The server must hold the key of what it presented (TLS 1.3 CertificateVerify).
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TCP stream, recording every byte read from it.
struct Recording {
    tcp: TcpStream,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl Read for Recording {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.tcp.read(buf)?;
        lock(&self.raw).extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Recording {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The network namespace (a name under /run/netns) to open the TCP connection from;
    /// `None`: this thread's.
    pub netns: Option<String>,
    pub server_name: String,
    /// ALPN protocols offered, in order (empty: no ALPN extension).
    pub alpn: Vec<Vec<u8>>,
    /// The client certificate chain and key; `None`: no client certificate.
    pub identity: Option<Identity>,
    /// Bounds the TCP connect and every read.
    pub timeout: Duration,
}

impl Connect {
    /// What an honest node does: SNI `node.portcullis.invalid`, ALPN `portcullis/2`,
    /// presenting `identity`.
    pub fn node(netns: Option<&str>, identity: Option<Identity>) -> Self {
        Self {
            netns: netns.map(str::to_owned),
            server_name: SERVER_NAME.to_owned(),
            alpn: vec![ALPN.to_vec()],
            identity,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Runs `f` in a thread that entered network namespace `ns` (only that thread moves; sockets
/// it makes stay in `ns` wherever they are used afterwards).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let fd = netns::open(ns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            netns::setns(&fd).with_context(|| format!("setns into {ns}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("the thread in {ns} panicked"))?
    })
}

/// A frame as received.
#[derive(Debug, Clone)]
pub struct Frame {
    pub version: u8,
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The answer to a Prove.
#[derive(Debug, Clone)]
pub enum Answer {
    Proven {
        id: u64,
        nonce: Vec<u8>,
        chain: Vec<CertificateDer<'static>>,
        scheme: u16,
        signature: Vec<u8>,
        expires_unix_ms: u64,
    },
    Refuse {
        id: u64,
        reason: String,
    },
    Reject {
        id: u64,
        reason: String,
    },
    /// A frame that is none of these, or not well formed.
    Other(Frame),
    /// No frame: the connection ended, or the read failed (what happened, in words).
    Closed(String),
}

impl Answer {
    /// `proven`, `refuse:<reason>`, `reject:<reason>`, `other`, `closed`: for tallies.
    pub fn summary(&self) -> String {
        match self {
            Self::Proven { .. } => "proven".to_owned(),
            Self::Refuse { reason, .. } => format!("refuse:{reason}"),
            Self::Reject { reason, .. } => format!("reject:{reason}"),
            Self::Other(f) => format!("other(kind {}, version {})", f.kind, f.version),
            Self::Closed(why) => format!("closed({why})"),
        }
    }

    fn id(&self) -> Option<u64> {
        match self {
            Self::Proven { id, .. } | Self::Refuse { id, .. } | Self::Reject { id, .. } => {
                Some(*id)
            }
            _ => None,
        }
    }

    fn parse(f: Frame) -> Self {
        let Some(v) = f.json() else {
            return Self::Other(f);
        };
        let id = v["id"].as_u64();
        let reason = v["reason"].as_str().map(str::to_owned);
        match (f.kind, id, reason) {
            (KIND_REFUSE, Some(id), Some(reason)) => Self::Refuse { id, reason },
            (KIND_REJECT, Some(id), Some(reason)) => Self::Reject { id, reason },
            (KIND_PROVEN, Some(id), _) => {
                let proven = (|| -> Result<Self> {
                    let chain = v["chain"]
                        .as_array()
                        .context("chain")?
                        .iter()
                        .map(|c| {
                            c.as_str()
                                .context("chain entry")
                                .and_then(unhex)
                                .map(CertificateDer::from)
                        })
                        .collect::<Result<_>>()?;
                    Ok(Self::Proven {
                        id,
                        nonce: unhex(v["nonce"].as_str().context("nonce")?)?,
                        chain,
                        scheme: u16::try_from(v["scheme"].as_u64().context("scheme")?)?,
                        signature: unhex(v["signature"].as_str().context("signature")?)?,
                        expires_unix_ms: v["expires_unix_ms"].as_u64().context("expiry")?,
                    })
                })();
                proven.unwrap_or(Self::Other(f))
            }
            _ => Self::Other(f),
        }
    }
}

/// One Prove as sent: its id, nonce and the facts its transcript named.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: u64,
    pub nonce: [u8; NONCE_LEN],
    pub facts: Facts,
}

/// A Prove to send: `workload` proves itself at `initiator_addr` to `responder_id` at
/// `responder_addr`. The signature covers `facts` (whose `initiator_id` is the workload
/// chain's; a forger may name whatever it likes in the other facts).
#[derive(Debug, Clone)]
pub struct Proof {
    pub initiator_addr: IpAddr,
    pub responder_addr: IpAddr,
    pub responder_id: String,
    /// The initiator node the transcript names (the responder puts the node of the session's
    /// SVID there: sign with anything else and the signature does not verify).
    pub initiator_node: String,
    pub responder_node: String,
}

/// One node session (or an attempt at one), from the client's side.
pub struct Session {
    conn: ClientConnection,
    sock: Recording,
    raw: Arc<Mutex<Vec<u8>>>,
    certs: Arc<Mutex<Vec<CertificateDer<'static>>>>,
    plaintext: Vec<u8>,
    local: SocketAddr,
    next_id: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("local", &self.local)
            .field("handshaking", &self.conn.is_handshaking())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Opens the TCP connection (from `how.netns` if given) and prepares TLS; nothing is sent
    /// yet. [`Session::handshake`] runs the TLS handshake.
    pub fn connect(addr: SocketAddr, how: &Connect) -> Result<Self> {
        let provider = provider();
        let certs = Arc::new(Mutex::new(Vec::new()));
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Capture {
                provider,
                seen: certs.clone(),
            }));
        let mut config = match &how.identity {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols.clone_from(&how.alpn);
        config.resumption = rustls::client::Resumption::disabled();
        let conn = ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(how.server_name.clone())?,
        )?;
        let timeout = how.timeout;
        let open = move || -> Result<TcpStream> {
            TcpStream::connect_timeout(&addr, timeout)
                .with_context(|| format!("connecting to {addr}"))
        };
        let tcp = match &how.netns {
            Some(ns) => in_netns(ns, open)?,
            None => open()?,
        };
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        tcp.set_nodelay(true)?;
        let local = tcp.local_addr()?;
        let raw = Arc::new(Mutex::new(Vec::new()));
        Ok(Self {
            conn,
            sock: Recording {
                tcp,
                raw: raw.clone(),
            },
            raw,
            certs,
            plaintext: Vec::new(),
            local,
            next_id: 1,
        })
    }

    /// Runs the TLS handshake to its end from the client's side. In TLS 1.3 the client is done
    /// once it sent its Finished: a server that refuses the client's certificate says so
    /// afterwards, at the first read.
    pub fn handshake(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.conn.is_handshaking() {
            if Instant::now() > deadline {
                bail!("the TLS handshake did not end within 30 s");
            }
            match self.conn.complete_io(&mut self.sock) {
                Ok((0, 0)) if self.conn.is_handshaking() => {
                    bail!("the server closed the connection during the handshake")
                }
                Ok(_) => {}
                Err(e) => bail!("TLS handshake: {}", describe(&e)),
            }
        }
        Ok(())
    }

    /// Connects and completes the handshake, checks the server agreed to `portcullis/2`, and
    /// waits for its `Ready` (the acceptor's verdict on our node SVID).
    pub fn open(addr: SocketAddr, how: &Connect) -> Result<Self> {
        let mut s = Self::connect(addr, how)?;
        s.handshake()?;
        if s.alpn() != Some(ALPN) {
            bail!(
                "the server agreed to ALPN {:?}, not portcullis/2",
                s.alpn().map(String::from_utf8_lossy)
            );
        }
        s.ready()?;
        Ok(s)
    }

    /// Reads the acceptor's `Ready`: the name of the node it says it is.
    pub fn ready(&mut self) -> Result<String> {
        let f = self
            .recv()
            .map_err(|e| anyhow::anyhow!("no Ready from the acceptor: {e}"))?;
        if f.version != 2 || f.kind != KIND_READY {
            bail!(
                "the first frame was kind {} version {}, not Ready",
                f.kind,
                f.version
            );
        }
        let v = f.json().context("Ready is not JSON")?;
        v["node"]
            .as_str()
            .map(str::to_owned)
            .context("Ready names no node")
    }

    /// The local address of the TCP connection (its source address, as the server sees it).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn alpn(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The certificates the server presented (leaf first), as far as the handshake got.
    pub fn server_certs(&self) -> Vec<CertificateDer<'static>> {
        lock(&self.certs).clone()
    }

    /// Every byte read from the TCP connection so far (TLS records, encrypted or not).
    pub fn raw_received(&self) -> Vec<u8> {
        lock(&self.raw).clone()
    }

    /// Every application data byte received so far (decrypted).
    pub fn plaintext_received(&self) -> &[u8] {
        &self.plaintext
    }

    /// A TLS exporter of the session (RFC 8446 §7.5), no context.
    pub fn exporter(&self, label: &[u8]) -> Result<[u8; 32]> {
        self.conn
            .export_keying_material([0u8; 32], label, None)
            .map_err(|e| anyhow!("TLS exporter: {e}"))
    }

    /// The value every proof transcript of this session contains.
    pub fn proof_binding(&self) -> Result<[u8; 32]> {
        self.exporter(PROOF_LABEL)
    }

    /// Sends bytes as they are, inside TLS.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let mut s = rustls::Stream::new(&mut self.conn, &mut self.sock);
        s.write_all(bytes)
            .map_err(|e| anyhow!("{}", describe(&e)))?;
        s.flush().map_err(|e| anyhow!("{}", describe(&e)))
    }

    /// Sends one frame of `kind` with `body`.
    pub fn send_frame(&mut self, kind: u8, body: &Value) -> Result<()> {
        let body = serde_json::to_vec(body)?;
        let mut frame = Vec::with_capacity(body.len() + 6);
        frame.extend_from_slice(&u32::try_from(body.len() + 2)?.to_be_bytes());
        frame.push(VERSION);
        frame.push(kind);
        frame.extend_from_slice(&body);
        self.send_raw(&frame)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut s = rustls::Stream::new(&mut self.conn, &mut self.sock);
        s.read_exact(buf)?;
        self.plaintext.extend_from_slice(buf);
        Ok(())
    }

    /// Reads one frame (bounded by the read timeout); an error says how the connection ended.
    pub fn recv(&mut self) -> std::result::Result<Frame, String> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len).map_err(|e| describe(&e))?;
        let len = u32::from_be_bytes(len) as usize;
        if !(2..=MAX_FRAME).contains(&len) {
            return Err(format!("a frame of length {len}"));
        }
        let mut frame = vec![0u8; len];
        self.read_exact(&mut frame).map_err(|e| describe(&e))?;
        Ok(Frame {
            version: frame[0],
            kind: frame[1],
            body: frame[2..].to_vec(),
        })
    }

    /// Reads until the connection ends or `limit` passes; returns how it ended, or `None` if it
    /// was still open then. Application data received meanwhile is recorded.
    pub fn read_until_closed(&mut self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let mut s = rustls::Stream::new(&mut self.conn, &mut self.sock);
            match s.read(&mut buf) {
                Ok(0) => return Some("closed cleanly (close_notify)".to_owned()),
                Ok(n) => self.plaintext.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Some(describe(&e)),
            }
        }
        None
    }

    /// The Prove for `p`, signed by `workload` over this session's binding.
    pub fn prove_frame(&mut self, workload: &Identity, p: &Proof) -> Result<(Sent, Value)> {
        let id = self.next_id;
        self.next_id += 1;
        let nonce = nonce()?;
        let facts = Facts {
            initiator_id: workload.spiffe_id()?,
            responder_id: p.responder_id.clone(),
            initiator_addr: p.initiator_addr,
            responder_addr: p.responder_addr,
            initiator_node: p.initiator_node.clone(),
            responder_node: p.responder_node.clone(),
        };
        let t = transcript(
            Half::Initiator,
            &self.proof_binding()?,
            &facts,
            &nonce,
            None,
        );
        let (scheme, signature) = workload.sign(&t)?;
        let body = json!({
            "id": id,
            "nonce": hex(&nonce),
            "initiator_addr": p.initiator_addr,
            "responder_addr": p.responder_addr,
            "responder_id": p.responder_id,
            "chain": workload.chain_hex(),
            "scheme": scheme,
            "signature": hex(&signature),
        });
        Ok((Sent { id, nonce, facts }, body))
    }

    /// Sends a Prove and reads the answer to it (frames about other proofs, at most 16, are
    /// skipped).
    pub fn prove(&mut self, workload: &Identity, p: &Proof) -> Result<(Sent, Answer)> {
        let (sent, body) = self.prove_frame(workload, p)?;
        self.send_frame(KIND_PROVE, &body)?;
        Ok((sent.clone(), self.answer_to(sent.id)))
    }

    /// Reads until the answer to proof `id` (at most 16 other frames are skipped).
    pub fn answer_to(&mut self, id: u64) -> Answer {
        for _ in 0..16 {
            match self.recv() {
                // The server's own proofs in this session are not answers.
                Ok(f) if f.kind == KIND_PROVE => {}
                Ok(f) => {
                    let a = Answer::parse(f);
                    if a.id() == Some(id) || matches!(a, Answer::Other(_)) {
                        return a;
                    }
                }
                Err(why) => return Answer::Closed(why),
            }
        }
        Answer::Closed(format!("no answer to proof {id} within 16 frames"))
    }

    /// Checks a Proven as an honest initiator does: the nonce, and the responder workload's
    /// signature over the responder transcript. Returns the responder's SPIFFE ID. (Whether
    /// the chain is trusted is [`chain_trusted`]'s business.)
    pub fn check_proven(&self, sent: &Sent, answer: &Answer) -> Result<String> {
        let Answer::Proven {
            nonce,
            chain,
            scheme,
            signature,
            ..
        } = answer
        else {
            bail!("not a Proven: {}", answer.summary());
        };
        if nonce.len() != NONCE_LEN {
            bail!("a responder nonce of {} bytes", nonce.len());
        }
        let leaf = chain.first().context("a Proven without a chain")?;
        let t = transcript(
            Half::Responder,
            &self.proof_binding()?,
            &sent.facts,
            &sent.nonce,
            Some(nonce),
        );
        verify(leaf, *scheme, &t, signature)?;
        match &uri_sans(leaf)[..] {
            [id] => Ok(id.clone()),
            other => bail!("the responder's leaf has URI SANs {other:?}"),
        }
    }

    /// Sends a Reject for proof `id`.
    pub fn reject(&mut self, id: u64, reason: &str) -> Result<()> {
        self.send_frame(KIND_REJECT, &json!({"id": id, "reason": reason}))
    }
}

/// An I/O error from the TLS stream, with the rustls error inside if there is one.
fn describe(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("TLS: {tls}"),
        None => format!("{:?}: {e}", e.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transcript_has_the_documented_layout() {
        let facts = Facts {
            initiator_id: "spiffe://td/a".into(),
            responder_id: "spiffe://td/b".into(),
            initiator_addr: "198.18.1.2".parse().unwrap(),
            responder_addr: "fd00:18:2::2".parse().unwrap(),
            initiator_node: "node-1".into(),
            responder_node: "node-2".into(),
        };
        let t = transcript(Half::Initiator, &[7; 32], &facts, &[1; 16], None);
        let mut want = b"portcullis/2 workload proof\0initiator\0".to_vec();
        want.extend_from_slice(&[7; 32]);
        for f in [
            "spiffe://td/a",
            "spiffe://td/b",
            "198.18.1.2",
            "fd00:18:2::2",
            "node-1",
            "node-2",
        ] {
            want.extend_from_slice(&u16::try_from(f.len()).unwrap().to_be_bytes());
            want.extend_from_slice(f.as_bytes());
        }
        want.extend_from_slice(&[1; 16]);
        assert_eq!(t, want);
        let r = transcript(Half::Responder, &[7; 32], &facts, &[1; 16], Some(&[2; 16]));
        assert!(r.starts_with(b"portcullis/2 workload proof\0responder\0"));
        assert!(r.ends_with(&[2; 16]));
    }

    #[test]
    fn names_signatures_and_sans() {
        assert_eq!(
            v1_server_name("198.18.2.2".parse().unwrap()),
            "c6120202.v4.addr.portcullis.invalid"
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://td/ns/a/sa/b".try_into().unwrap(),
        )];
        let cert = p.self_signed(&key).unwrap();
        let id = Identity::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        assert_eq!(id.spiffe_id().unwrap(), "spiffe://td/ns/a/sa/b");
        let (scheme, sig) = id.sign(b"hello").unwrap();
        verify(&id.chain[0], scheme, b"hello", &sig).unwrap();
        assert!(verify(&id.chain[0], scheme, b"hellO", &sig).is_err());
        assert_eq!(
            spiffe_strings(b"xx spiffe://td/ns/a/sa/b\0yy"),
            vec!["spiffe://td/ns/a/sa/b".to_owned()]
        );
        assert_eq!(unhex(&hex(&[0, 0xff, 7])).unwrap(), vec![0, 0xff, 7]);
    }
}
