//! Node sessions: one mutual-TLS connection between two agents, authenticated by their node
//! SVIDs, carrying the workload proofs of every pair between them, in both directions and
//! concurrently. [`Sessions`] owns them: opens one when a proof needs it (one attempt per node
//! at a time, failures backed off), registers the ones peers open, replaces a session when
//! either node SVID renews, re-establishes a lost one, and closes idle ones.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls_pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::{Semaphore, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_rustls::TlsConnector;

use super::{
    Decider, Owner, Record, Role, Stage, View, WriteRefused, WriteRequest,
    proof::{self, Binding, Facts, Half},
    wire::{self, Message, Prove, Proven, Refuse, Reject},
};
use crate::{
    identity::SpiffeId,
    issuer::protocol::{node_id, node_of},
    reason::Reason,
    tls::{self, LocalSvid},
};

/// First delay before a failed session set-up is tried again; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A session with no proof either way for this long is closed (it is opened again on demand).
pub const IDLE: Duration = Duration::from_secs(15 * 60);
/// Proofs a peer may have under way in one session; beyond, it is answered `busy`.
pub const MAX_PROOFS: usize = 1024;
/// Answers kept for a `Reject` to name (the initiator rejects within its time limit).
const MAX_ANSWERED: usize = 8192;
/// A session is not used for new proofs once either node SVID expires within this, or within
/// half of what was left of it when the session came up, whichever is shorter (so that
/// short-lived SVIDs still get sessions that last).
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// How often sessions are looked over (stale, idle, nodes gone).
const SWEEP: Duration = Duration::from_secs(2);
/// Messages waiting to be written per session.
const OUTBOX: usize = 4096;

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// Workload chains already verified, so that the many proofs of one workload's pairs pay for
/// its chain once: keyed by the SHA-256 of the chain and the trust bundle's fingerprint, kept
/// until the leaf expires and for at most [`ChainCache::REUSE`] (so that an intermediate that
/// expires first is noticed). Only the chain is taken from here; every proof's signature is
/// still checked against the leaf's key.
#[derive(Default)]
pub struct ChainCache {
    verified: Mutex<HashMap<ChainKey, (SpiffeId, SystemTime, Instant)>>,
}

/// The SHA-256 of a chain, and the fingerprint of the bundle it was verified against.
type ChainKey = ([u8; 32], [u8; 32]);

impl ChainCache {
    /// Entries kept at most; the cache starts over beyond.
    const MAX: usize = 65_536;
    /// How long a verification is reused.
    const REUSE: Duration = Duration::from_secs(600);

    fn verify(
        &self,
        view: &View,
        chain: &[CertificateDer<'static>],
    ) -> Result<(SpiffeId, SystemTime), Reason> {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        for c in chain {
            hash.update(&u32::try_from(c.len()).unwrap_or(u32::MAX).to_be_bytes());
            hash.update(c);
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(hash.finish().as_ref());
        let key = (digest, view.trust.fingerprint);
        let now = SystemTime::now();
        let mut cache = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((id, not_after, at)) = cache.get(&key) {
            if *not_after > now && at.elapsed() < Self::REUSE {
                return Ok((id.clone(), *not_after));
            }
            cache.remove(&key);
        }
        drop(cache);
        let verified = view.chains.verify(chain)?;
        let mut cache = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= Self::MAX {
            cache.clear();
        }
        cache.insert(key, (verified.0.clone(), verified.1, Instant::now()));
        Ok(verified)
    }
}

/// A peer's answer to one of our proofs.
enum Answer {
    Proven(Proven),
    Refused(Reason),
    Lost,
}

/// What we answered a peer's proof with, kept so that its `Reject` can name the pair.
struct Answered {
    rec: Record,
    at: Instant,
}

/// One established node session.
pub struct Session {
    serial: u64,
    peer_node: Arc<str>,
    peer_addr: SocketAddr,
    peer_not_after: SystemTime,
    /// The serial of our node SVID it was established with.
    local_serial: String,
    opened_by_us: bool,
    binding: Binding,
    /// The peer's node SVID chain, and the trust bundle (fingerprint) it was last found to
    /// chain to: when the bundle changes, the chain is checked again before the session
    /// carries another proof.
    peer_chain: Vec<CertificateDer<'static>>,
    trusted_under: Mutex<[u8; 32]>,
    chains: Arc<ChainCache>,
    out: mpsc::Sender<Message>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    answered: Mutex<HashMap<u64, Answered>>,
    next_id: AtomicU64,
    /// Milliseconds since `born` of the last proof sent or received, and of the last frame
    /// received.
    born: Instant,
    born_wall: SystemTime,
    last_proof_ms: AtomicU64,
    /// Whether a proof went either way in it.
    used: std::sync::atomic::AtomicBool,
    last_rx_ms: AtomicU64,
    closed: watch::Sender<bool>,
    proofs: Arc<Semaphore>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer_node", &self.peer_node)
            .field("peer_addr", &self.peer_addr)
            .field("opened_by_us", &self.opened_by_us)
            .finish_non_exhaustive()
    }
}

impl Session {
    #[must_use]
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    #[must_use]
    pub fn peer_node(&self) -> &str {
        &self.peer_node
    }

    fn since_born(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.used.store(true, Ordering::Relaxed);
        self.last_proof_ms
            .store(self.since_born(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(
            self.since_born()
                .saturating_sub(self.last_proof_ms.load(Ordering::Relaxed)),
        )
    }

    fn silent_for(&self) -> Duration {
        Duration::from_millis(
            self.since_born()
                .saturating_sub(self.last_rx_ms.load(Ordering::Relaxed)),
        )
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Closes the connection; proofs waiting for answers fail as transient.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Whether new proofs may use it: open, our node SVID unchanged, neither node SVID
    /// about to expire.
    fn usable(&self, view: &View) -> bool {
        let now = SystemTime::now();
        let fresh = |not_after: SystemTime| {
            let left_then = not_after.duration_since(self.born_wall).unwrap_or_default();
            not_after > now + EXPIRY_MARGIN.min(left_then / 2)
        };
        !self.is_closed()
            && view
                .node_creds
                .as_ref()
                .is_some_and(|n| n.svid.serial == self.local_serial && fresh(n.svid.not_after))
            && fresh(self.peer_not_after)
    }

    /// Whether the peer's node SVID still chains to the bundle of `view` (checked again only
    /// when the bundle changed). A session whose peer's certificate lost its trust is closed
    /// and carries no further proof: the peer may hold a newer node SVID, so the proof goes to
    /// a new session, which checks whatever the peer presents now.
    pub(super) fn still_trusted(&self, view: &View) -> bool {
        let mut under = self
            .trusted_under
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *under == view.trust.fingerprint {
            return true;
        }
        if view.chains.verify(&self.peer_chain).is_ok() {
            *under = view.trust.fingerprint;
            return true;
        }
        drop(under);
        self.close();
        false
    }

    async fn send(&self, msg: Message) -> Result<(), Reason> {
        self.out.send(msg).await.map_err(|_| Reason::SessionClosed)
    }

    /// Our half of a proof for (`local` at `local_addr`, `remote` at `remote_addr`), then the
    /// peer's, checked; the entry's expiry on success. `rec` gets what was learnt.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn prove(
        &self,
        view: &View,
        svid: &LocalSvid,
        local: &Owner,
        remote: &Owner,
        local_addr: IpAddr,
        remote_addr: IpAddr,
        rec: &mut Record,
    ) -> Result<SystemTime, Reason> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let nonce = proof::nonce()?;
        let facts = Facts {
            initiator_id: local.id.as_str(),
            responder_id: remote.id.as_str(),
            initiator_addr: local_addr,
            responder_addr: remote_addr,
            initiator_node: &view.node,
            responder_node: &self.peer_node,
        };
        let t = proof::transcript(Half::Initiator, &self.binding, &facts, &nonce, None);
        let (scheme, signature) = proof::sign(&svid.key, &t)?;
        let (tx, rx) = oneshot::channel();
        self.lock_pending().insert(id, tx);
        self.touch();
        let prove = Prove {
            id,
            nonce: wire::hex(&nonce),
            initiator_addr: local_addr,
            responder_addr: remote_addr,
            responder_id: remote.id.to_string(),
            chain: svid.key.cert.iter().map(|c| wire::hex(c)).collect(),
            scheme,
            signature: wire::hex(&signature),
        };
        let answer = {
            let mut guard = PendingGuard { session: self, id };
            if let Err(e) = self.send(Message::Prove(prove)).await {
                guard.forget();
                return Err(e);
            }
            let a = rx.await.unwrap_or(Answer::Lost);
            guard.id = u64::MAX;
            a
        };
        let proven = match answer {
            Answer::Proven(p) => p,
            Answer::Refused(reason) => {
                rec.decided_by = Decider::Peer;
                rec.detail = Some(format!("refused by {}: {reason}", self.peer_node));
                return Err(peer_refusal(reason));
            }
            Answer::Lost => return Err(Reason::SessionClosed),
        };
        self.touch();
        let checked = (|| {
            let chain = decode_chain(&proven.chain)?;
            let (peer_id, peer_not_after) = self.chains.verify(view, &chain)?;
            rec.remote_id = Some(peer_id.clone());
            if peer_id != remote.id {
                return Err(Reason::IdentityMismatch);
            }
            let nonce_r = wire::unhex(&proven.nonce)?;
            if nonce_r.len() != proof::NONCE_LEN {
                return Err(Reason::Protocol);
            }
            let t = proof::transcript(
                Half::Responder,
                &self.binding,
                &facts,
                &nonce,
                Some(&nonce_r),
            );
            let leaf = chain.first().ok_or(Reason::NoCertificate)?;
            proof::verify(leaf, proven.scheme, &t, &wire::unhex(&proven.signature)?)?;
            if !view.policy.decide(&local.id, &peer_id).authorized() {
                rec.detail = Some(view.policy.denial(&local.id, &peer_id));
                return Err(Reason::NotAuthorized);
            }
            rec.keys = Some(proof::pair_keys(
                &self.binding,
                &facts,
                &nonce,
                &nonce_r,
                true,
            ));
            rec.remote_chain = Some(Arc::new(chain));
            Ok(svid.not_after.min(peer_not_after))
        })();
        if let Err(reason) = checked {
            rec.decided_by = Decider::Us;
            // The responder wrote its entry before answering: have it removed.
            let _ = self.send(Message::Reject(Reject { id, reason })).await;
        }
        checked
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Answer>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_answered(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Answered>> {
        self.answered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember_answer(&self, id: u64, rec: Record) {
        let mut a = self.lock_answered();
        if a.len() >= MAX_ANSWERED {
            let cutoff = Instant::now() - Duration::from_secs(60);
            a.retain(|_, v| v.at > cutoff);
            if a.len() >= MAX_ANSWERED {
                // All fresh: this answer cannot be rejected later, its entry lasts until it
                // expires or is proven again.
                return;
            }
        }
        a.insert(
            id,
            Answered {
                rec,
                at: Instant::now(),
            },
        );
    }
}

/// Forgets a pending proof whose future was dropped (its time limit), so the table does not
/// keep it.
struct PendingGuard<'a> {
    session: &'a Session,
    id: u64,
}

impl PendingGuard<'_> {
    fn forget(&mut self) {
        self.session.lock_pending().remove(&self.id);
        self.id = u64::MAX;
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.id != u64::MAX {
            self.session.lock_pending().remove(&self.id);
        }
    }
}

/// A peer's refusal of our workload's certificate is, on our side, that the peer rejected it
/// (its own record says why); other reasons are the peer's as they are.
fn peer_refusal(reason: Reason) -> Reason {
    match reason {
        Reason::Malformed
        | Reason::Expired
        | Reason::NotYetValid
        | Reason::NoUriSan
        | Reason::MultipleUriSans
        | Reason::NotSpiffe
        | Reason::WrongTrustDomain
        | Reason::CaAsLeaf
        | Reason::NoDigitalSignature
        | Reason::ChainTooLong
        | Reason::UntrustedChain
        | Reason::NoCertificate => Reason::PeerRejectedCertificate,
        r => r,
    }
}

fn decode_chain(chain: &[String]) -> Result<Vec<CertificateDer<'static>>, Reason> {
    if chain.is_empty() {
        return Err(Reason::NoCertificate);
    }
    if chain.len() > crate::identity::svid::MAX_CHAIN {
        return Err(Reason::ChainTooLong);
    }
    chain
        .iter()
        .map(|c| wire::unhex(c).map(CertificateDer::from))
        .collect()
}

enum Slot {
    /// A set-up under way; its outcome is sent here.
    Connecting(watch::Receiver<Option<Outcome>>),
    /// The last set-up failed: no new one before `retry_at`.
    Down {
        retry_at: Instant,
        reason: Reason,
        detail: Option<String>,
    },
}

#[derive(Default)]
struct State {
    /// Every established session, by serial.
    all: HashMap<u64, Arc<Session>>,
    /// The session proofs to each node use.
    preferred: HashMap<Arc<str>, u64>,
    /// Set-ups under way or backing off, per node.
    slots: HashMap<Arc<str>, Slot>,
    /// The last backoff per node, until a set-up succeeds.
    backoff: HashMap<Arc<str>, Duration>,
}

/// Counters for metrics and status.
#[derive(Debug, Default)]
pub struct Counts {
    pub opened: AtomicU64,
    pub accepted: AtomicU64,
}

/// The node sessions of this agent.
pub struct Sessions {
    views: watch::Receiver<Option<Arc<View>>>,
    records: mpsc::Sender<Record>,
    writes: mpsc::Sender<WriteRequest>,
    /// Bounds a session set-up and each proof.
    timeout: Duration,
    state: Mutex<State>,
    next_serial: AtomicU64,
    chains: Arc<ChainCache>,
    pub counts: Counts,
    me: Weak<Sessions>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("up", &self.up())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// Starts the owner of sessions (and its sweeper, on the current runtime).
    pub fn new(
        views: watch::Receiver<Option<Arc<View>>>,
        records: mpsc::Sender<Record>,
        writes: mpsc::Sender<WriteRequest>,
        timeout: Duration,
    ) -> Arc<Self> {
        let s = Arc::new_cyclic(|me| Self {
            views,
            records,
            writes,
            timeout,
            state: Mutex::default(),
            next_serial: AtomicU64::new(1),
            chains: Arc::default(),
            counts: Counts::default(),
            me: me.clone(),
        });
        tokio::spawn(sweep(Arc::downgrade(&s)));
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sessions established now.
    #[must_use]
    pub fn up(&self) -> usize {
        self.lock().all.len()
    }

    /// The peer nodes of the sessions up now, with whether we opened each.
    #[must_use]
    pub fn peers(&self) -> Vec<(String, SocketAddr, bool)> {
        let mut v: Vec<_> = self
            .lock()
            .all
            .values()
            .map(|s| (s.peer_node.to_string(), s.peer_addr, s.opened_by_us))
            .collect();
        v.sort();
        v
    }

    /// Closes every session (tests: a lost connection).
    pub fn close_all(&self) {
        for s in self.lock().all.values() {
            s.close();
        }
    }

    /// A usable session to `node`: the preferred one, or a new one (one set-up per node at a
    /// time; while a failed one backs off, its reason at once).
    pub async fn session(
        &self,
        view: &Arc<View>,
        node: &str,
        timeout: Duration,
    ) -> Result<Arc<Session>, (Reason, Option<String>)> {
        let mut rx = {
            let mut st = self.lock();
            if let Some(s) = st.preferred.get(node).and_then(|serial| st.all.get(serial))
                && s.usable(view)
            {
                return Ok(s.clone());
            }
            let key: Arc<str> = node.into();
            match st.slots.get(node) {
                Some(Slot::Connecting(rx)) => rx.clone(),
                Some(Slot::Down {
                    retry_at,
                    reason,
                    detail,
                    ..
                }) if Instant::now() < *retry_at => return Err((*reason, detail.clone())),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    st.slots.insert(key.clone(), Slot::Connecting(rx.clone()));
                    let (me, view) = (self.me.upgrade(), view.clone());
                    tokio::spawn(async move {
                        let Some(me) = me else { return };
                        let outcome = me.open(&view, &key, timeout).await;
                        me.opened(&view, &key, &outcome);
                        tx.send_replace(Some(outcome));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                return outcome;
            }
            if rx.changed().await.is_err() {
                return Err((Reason::Internal, None));
            }
        }
    }

    /// Books the outcome of a set-up we started. Both agents use the session the node of the
    /// smaller name opened, so that two set-ups racing each other end in one session in use.
    fn opened(&self, view: &View, node: &Arc<str>, outcome: &Outcome) {
        let mut st = self.lock();
        match outcome {
            Ok(s) => {
                st.slots.remove(node);
                st.backoff.remove(node);
                if s.is_closed() {
                    // Lost already (`ended` has run): nothing to keep.
                    return;
                }
                st.all.insert(s.serial, s.clone());
                let keep_theirs = **node < *view.node
                    && st
                        .preferred
                        .get(node)
                        .and_then(|serial| st.all.get(serial))
                        .is_some_and(|p| !p.opened_by_us && p.usable(view));
                if !keep_theirs {
                    st.preferred.insert(node.clone(), s.serial);
                }
            }
            Err((reason, detail)) => {
                let backoff = st
                    .backoff
                    .get(node)
                    .map_or(FIRST_BACKOFF, |b| (*b * 2).min(MAX_BACKOFF));
                st.backoff.insert(node.clone(), backoff);
                st.slots.insert(
                    node.clone(),
                    Slot::Down {
                        retry_at: Instant::now() + backoff,
                        reason: *reason,
                        detail: detail.clone(),
                    },
                );
            }
        }
    }

    /// Opens a session to `node`, records the outcome.
    async fn open(
        &self,
        view: &Arc<View>,
        node: &Arc<str>,
        timeout: Duration,
    ) -> Result<Arc<Session>, (Reason, Option<String>)> {
        let start = std::time::Instant::now();
        let mut rec = Record::new(Role::Initiator, Stage::Session);
        rec.remote_node = Some(node.to_string());
        let result = match tokio::time::timeout(timeout, self.connect(view, node, &mut rec)).await {
            Ok(r) => r,
            Err(_) => Err(Reason::Timeout),
        };
        rec.took = start.elapsed();
        let outcome = match result {
            Ok(s) => {
                rec.result = Ok(s.peer_not_after);
                self.counts.opened.fetch_add(1, Ordering::Relaxed);
                Ok(s)
            }
            Err(reason) => {
                rec.result = Err(reason);
                Err((reason, rec.detail.clone()))
            }
        };
        let _ = self.records.send(rec).await;
        outcome
    }

    async fn connect(
        &self,
        view: &Arc<View>,
        node: &Arc<str>,
        rec: &mut Record,
    ) -> Result<Arc<Session>, Reason> {
        let creds = view.node_creds.as_ref().ok_or(Reason::NoNodeSvid)?;
        let addr = view
            .directory
            .node_address(node)
            .ok_or(Reason::UnknownPeer)?;
        rec.peer = Some(addr);
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|_| Reason::Unreachable)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(tls::SESSION_SERVER_NAME)
            .map_err(|_| Reason::Internal)?;
        let stream = TlsConnector::from(creds.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let r = tls_failure(rec, &e, Reason::Tls);
                let alert = tls::rustls_error(&e).and_then(|e| match e {
                    rustls::Error::AlertReceived(a) => Some(*a),
                    _ => None,
                });
                if matches!(
                    alert,
                    Some(
                        rustls::AlertDescription::AccessDenied
                            | rustls::AlertDescription::NoApplicationProtocol
                    )
                ) {
                    // A version 1 agent speaks only `portcullis/1`, and finds no workload
                    // address in our server name.
                    rec.detail = Some(format!(
                        "{node} refused the session ({}): a version 1 agent (one TLS handshake per pair) answers so, and should be upgraded; an alert before the session is up is not authenticated, so it may also have been forged on the path",
                        rec.detail.as_deref().unwrap_or("an alert")
                    ));
                    return Reason::Version;
                }
                r
            })?;
        let conn = stream.get_ref().1;
        if conn.alpn_protocol() != Some(tls::ALPN) {
            rec.detail = Some("the peer did not agree to ALPN portcullis/2".to_owned());
            return Err(Reason::Version);
        }
        let certs = conn.peer_certificates().ok_or(Reason::NoCertificate)?;
        let leaf = crate::identity::svid::check_leaf(
            certs.first().ok_or(Reason::NoCertificate)?,
            SystemTime::now(),
        )?;
        let expected = node_id(&view.trust.trust_domain, node).map_err(|_| Reason::Internal)?;
        rec.remote_id = Some(leaf.id.clone());
        if leaf.id != expected {
            rec.detail = Some(format!(
                "the agent at {addr} presented {}, not {expected}",
                leaf.id
            ));
            return Err(Reason::NotANode);
        }
        let binding = Binding::export(conn)?;
        let local_serial = creds.svid.serial.clone();
        let not_after = leaf.not_after;
        let peer_chain = certs.to_vec();
        let mut stream = stream;
        // In TLS 1.3 our side of the handshake is done before the peer has judged our
        // certificate: nothing is sent before its `Ready`, and its refusal (an alert) comes
        // here instead.
        match read_first(&mut stream, rec).await? {
            Message::Ready(r) if r.node == **node => {}
            Message::Ready(r) => {
                rec.detail = Some(format!("{node} said it is {}", r.node));
                return Err(Reason::Protocol);
            }
            _ => {
                rec.detail = Some("the first frame was not Ready".to_owned());
                return Err(Reason::Protocol);
            }
        }
        Ok(self.start(
            tokio_rustls::TlsStream::Client(stream),
            Established {
                peer_node: node.clone(),
                peer_addr: addr,
                peer_not_after: not_after,
                peer_chain,
                trusted_under: view.trust.fingerprint,
                local_serial,
                opened_by_us: true,
                binding,
            },
        ))
    }

    /// Takes a connection a peer opened, after the listener's limits: TLS with node SVIDs,
    /// then the session. Returns the record of the set-up.
    pub(super) async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Record {
        let start = std::time::Instant::now();
        let mut rec = Record::new(Role::Responder, Stage::Session);
        rec.peer = Some(peer);
        let result = match tokio::time::timeout(
            self.timeout,
            self.accept_inner(tcp, peer, &mut rec),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Reason::Timeout),
        };
        rec.result = result;
        rec.took = start.elapsed();
        rec
    }

    async fn accept_inner(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        rec: &mut Record,
    ) -> Result<SystemTime, Reason> {
        let _ = tcp.set_nodelay(true);
        let Some(view) = self.views.borrow().clone() else {
            return Err(Reason::NoNodeSvid);
        };
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(|e| tls_failure(rec, &e, Reason::Protocol))?;
        let offered: Vec<Vec<u8>> = start
            .client_hello()
            .alpn()
            .map(|a| a.map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        let creds = view.node_creds.as_ref().ok_or(Reason::NoNodeSvid)?;
        if !offered.iter().any(|a| a == tls::ALPN) {
            rec.detail = Some(if offered.iter().any(|a| a == tls::ALPN_V1) {
                "the peer speaks protocol version 1 (one TLS handshake per pair); upgrade it"
                    .to_owned()
            } else {
                "the peer did not offer ALPN portcullis/2".to_owned()
            });
            if !offered.is_empty() {
                // rustls answers a client whose protocols are all foreign with the
                // `no_application_protocol` alert, so the peer learns why too.
                let _ = start.into_stream(creds.server.clone()).await;
            }
            return Err(Reason::Version);
        }
        let stream = start
            .into_stream(creds.server.clone())
            .await
            .map_err(|e| tls_failure(rec, &e, Reason::Tls))?;
        let conn = stream.get_ref().1;
        let certs = conn.peer_certificates().ok_or(Reason::NoCertificate)?;
        let leaf = crate::identity::svid::check_leaf(
            certs.first().ok_or(Reason::NoCertificate)?,
            SystemTime::now(),
        )?;
        rec.remote_id = Some(leaf.id.clone());
        let Some(node) = node_of(&leaf.id).map(str::to_owned) else {
            rec.detail = Some(format!("{} is not a node SVID", leaf.id));
            return Err(Reason::NotANode);
        };
        rec.remote_node = Some(node.clone());
        if view.directory.node_address(&node).is_none() {
            rec.detail = Some(format!("node {node} is not in cluster state"));
            return Err(Reason::NotANode);
        }
        let binding = Binding::export(conn)?;
        let peer_chain = certs.to_vec();
        let not_after = leaf.not_after;
        let mut stream = stream;
        let ready = Message::Ready(wire::Ready {
            node: view.node.clone(),
        });
        wire::write_all(&mut stream, &[ready])
            .await
            .map_err(|_| Reason::SessionClosed)?;
        let session = self.start(
            tokio_rustls::TlsStream::Server(stream),
            Established {
                peer_node: node.as_str().into(),
                peer_addr: peer,
                peer_not_after: not_after,
                peer_chain,
                trusted_under: view.trust.fingerprint,
                local_serial: creds.svid.serial.clone(),
                opened_by_us: false,
                binding,
            },
        );
        self.counts.accepted.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        // A peer's new session replaces the one it opened before (a reconnect, a rotation).
        let older: Vec<u64> = st
            .all
            .values()
            .filter(|s| !s.opened_by_us && *s.peer_node == *node)
            .map(|s| s.serial)
            .collect();
        for serial in older {
            if let Some(s) = st.all.get(&serial) {
                s.close();
            }
        }
        if session.is_closed() {
            return Err(Reason::SessionClosed);
        }
        st.all.insert(session.serial, session.clone());
        // Both agents use the session the node of the smaller name opened.
        let ours_usable = st
            .preferred
            .get(node.as_str())
            .and_then(|serial| st.all.get(serial))
            .is_some_and(|p| p.opened_by_us && p.usable(&view));
        if !ours_usable || node.as_str() < view.node.as_str() {
            st.preferred.insert(node.as_str().into(), session.serial);
        }
        Ok(not_after)
    }

    /// Starts the reader and writer of an established connection.
    fn start<S>(&self, stream: S, e: Established) -> Arc<Session>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (out, outbox) = mpsc::channel(OUTBOX);
        let (closed, closed_rx) = watch::channel(false);
        let session = Arc::new(Session {
            serial: self.next_serial.fetch_add(1, Ordering::Relaxed),
            peer_node: e.peer_node,
            peer_addr: e.peer_addr,
            peer_not_after: e.peer_not_after,
            local_serial: e.local_serial,
            opened_by_us: e.opened_by_us,
            binding: e.binding,
            peer_chain: e.peer_chain,
            trusted_under: Mutex::new(e.trusted_under),
            chains: self.chains.clone(),
            out,
            pending: Mutex::default(),
            answered: Mutex::default(),
            next_id: AtomicU64::new(1),
            born: Instant::now(),
            born_wall: SystemTime::now(),
            last_proof_ms: AtomicU64::new(0),
            used: std::sync::atomic::AtomicBool::new(false),
            last_rx_ms: AtomicU64::new(0),
            closed,
            proofs: Arc::new(Semaphore::new(MAX_PROOFS)),
        });
        let (rd, wr) = tokio::io::split(stream);
        tokio::spawn(write_loop(wr, outbox, closed_rx.clone()));
        let me = self.me.clone();
        tokio::spawn(read_loop(me, session.clone(), rd, closed_rx));
        session
    }

    /// A session ended: forget it, fail what waited for it, and open a new one if it was
    /// ours, in use and not superseded (with backoff). A session replaced by a newer one
    /// (a node SVID renewed, the peer's newer session preferred) is not opened again.
    fn ended(&self, session: &Arc<Session>) {
        session.close();
        for (_, tx) in session.lock_pending().drain() {
            let _ = tx.send(Answer::Lost);
        }
        let mut st = self.lock();
        st.all.remove(&session.serial);
        let was_preferred = st.preferred.get(&session.peer_node) == Some(&session.serial);
        if was_preferred {
            st.preferred.remove(&session.peer_node);
        }
        drop(st);
        let recently_used = session.used.load(Ordering::Relaxed) && session.idle_for() < IDLE;
        if session.opened_by_us && was_preferred && recently_used {
            let (me, node) = (self.me.clone(), session.peer_node.clone());
            tokio::spawn(async move { reconnect(me, node).await });
        }
    }

    /// Our answer to a peer's proof: checks, our entry, our half.
    async fn answer(&self, session: Arc<Session>, p: Prove) {
        let start = std::time::Instant::now();
        let mut rec = Record::new(Role::Responder, Stage::Proof);
        rec.peer = Some(session.peer_addr);
        rec.remote_node = Some(session.peer_node.to_string());
        rec.local_addr = Some(p.responder_addr);
        rec.remote_addr = Some(p.initiator_addr);
        rec.decided_by = Decider::Us;
        let id = p.id;
        let outcome = match tokio::time::timeout(
            self.timeout,
            self.answer_inner(&session, p, &mut rec),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Reason::Timeout),
        };
        rec.took = start.elapsed();
        match outcome {
            Ok((expires, proven)) => {
                rec.result = Ok(expires);
                session.remember_answer(id, rec.clone());
                let sent =
                    tokio::time::timeout(self.timeout, session.send(Message::Proven(proven))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    // The entry stays until it expires or is revalidated away; the
                    // initiator, without an answer, retries.
                    rec.detail = Some("the session closed before the answer was sent".to_owned());
                }
            }
            Err(reason) => {
                rec.result = Err(reason);
                let _ = tokio::time::timeout(
                    self.timeout,
                    session.send(Message::Refuse(Refuse { id, reason })),
                )
                .await;
            }
        }
        let _ = self.records.send(rec).await;
    }

    async fn answer_inner(
        &self,
        session: &Session,
        p: Prove,
        rec: &mut Record,
    ) -> Result<(SystemTime, Proven), Reason> {
        let Some(view) = self.views.borrow().clone() else {
            return Err(Reason::NoLocalSvid);
        };
        let local = view
            .local_owner(&p.responder_addr)
            .ok_or(Reason::NotHosted)?;
        rec.local_id = Some(local.id.clone());
        let svid = view.svids.get(&local.id).ok_or(Reason::NoLocalSvid)?;
        if p.responder_id != local.id.as_str() {
            rec.detail = Some(format!(
                "the initiator expected {} at {}",
                p.responder_id, p.responder_addr
            ));
            return Err(Reason::IdentityMismatch);
        }
        let chain = decode_chain(&p.chain)?;
        let (peer_id, peer_not_after) = session.chains.verify(&view, &chain)?;
        rec.remote_id = Some(peer_id.clone());
        rec.remote_chain = Some(Arc::new(chain.clone()));
        let initiator = view
            .directory
            .owner(&p.initiator_addr)
            .ok_or(Reason::UnknownInitiator)?;
        // The node is known by the key that authenticated the session, not by an address.
        if *initiator.node != *session.peer_node {
            rec.detail = Some(format!(
                "cluster state puts {} on {}, and this session is {}'s",
                p.initiator_addr, initiator.node, session.peer_node
            ));
            return Err(Reason::NodeMismatch);
        }
        if initiator.id != peer_id {
            return Err(Reason::IdentityMismatch);
        }
        let nonce_i = wire::unhex(&p.nonce)?;
        if nonce_i.len() != proof::NONCE_LEN {
            return Err(Reason::Protocol);
        }
        let facts = Facts {
            initiator_id: peer_id.as_str(),
            responder_id: local.id.as_str(),
            initiator_addr: p.initiator_addr,
            responder_addr: p.responder_addr,
            initiator_node: &session.peer_node,
            responder_node: &view.node,
        };
        let t = proof::transcript(Half::Initiator, &session.binding, &facts, &nonce_i, None);
        let leaf = chain.first().ok_or(Reason::NoCertificate)?;
        proof::verify(leaf, p.scheme, &t, &wire::unhex(&p.signature)?)?;
        if !view.policy.decide(&local.id, &peer_id).authorized() {
            rec.detail = Some(view.policy.denial(&local.id, &peer_id));
            return Err(Reason::NotAuthorized);
        }
        let expires = svid.not_after.min(peer_not_after);
        let nonce_r = proof::nonce()?;
        rec.keys = Some(proof::pair_keys(
            &session.binding,
            &facts,
            &nonce_i,
            &nonce_r,
            false,
        ));
        // Our entry first: the initiator's SYN may be on its way once it has our answer.
        let mut pending = rec.clone();
        pending.result = Ok(expires);
        let (tx, rx) = oneshot::channel();
        let stopped = || WriteRefused {
            reason: Reason::Internal,
            detail: "the agent stopped".to_owned(),
        };
        let written = match self.writes.send((pending, tx)).await {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        if let Err(e) = written {
            rec.detail = Some(e.detail);
            return Err(e.reason);
        }
        let t = proof::transcript(
            Half::Responder,
            &session.binding,
            &facts,
            &nonce_i,
            Some(&nonce_r),
        );
        let (scheme, signature) = proof::sign(&svid.key, &t)?;
        Ok((
            expires,
            Proven {
                id: p.id,
                nonce: wire::hex(&nonce_r),
                chain: svid.key.cert.iter().map(|c| wire::hex(c)).collect(),
                scheme,
                signature: wire::hex(&signature),
                expires_unix_ms: unix_ms(expires),
            },
        ))
    }

    /// The initiator rejected our answer: the entry we wrote for it goes.
    async fn rejected(&self, session: &Session, r: Reject) {
        let Some(answered) = session.lock_answered().remove(&r.id) else {
            return;
        };
        let mut rec = answered.rec;
        rec.result = Err(peer_refusal(r.reason));
        rec.decided_by = Decider::Peer;
        rec.keys = None;
        rec.detail = Some(format!(
            "{} rejected our proof: {}",
            session.peer_node, r.reason
        ));
        let _ = self.records.send(rec).await;
    }
}

type Outcome = Result<Arc<Session>, (Reason, Option<String>)>;

/// What a completed TLS handshake established, for [`Sessions::start`].
struct Established {
    peer_node: Arc<str>,
    peer_addr: SocketAddr,
    peer_not_after: SystemTime,
    peer_chain: Vec<CertificateDer<'static>>,
    trusted_under: [u8; 32],
    local_serial: String,
    opened_by_us: bool,
    binding: Binding,
}

/// Opens a lost session again, with backoff, a few times.
async fn reconnect(me: Weak<Sessions>, node: Arc<str>) {
    let mut delay = FIRST_BACKOFF;
    for _ in 0..6 {
        tokio::time::sleep(delay).await;
        let Some(sessions) = me.upgrade() else { return };
        let Some(view) = sessions.views.borrow().clone() else {
            return;
        };
        if view.directory.node_address(&node).is_none() {
            return;
        }
        let outcome: Outcome = sessions.session(&view, &node, sessions.timeout).await;
        if outcome.is_ok() {
            return;
        }
        delay = (delay * 2).min(MAX_BACKOFF);
    }
}

/// Looks over sessions: closes those not usable any more (a node SVID renewed or expiring, the
/// node gone from cluster state) once nothing waits on them, and idle ones.
async fn sweep(me: Weak<Sessions>) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(sessions) = me.upgrade() else { return };
        let Some(view) = sessions.views.borrow().clone() else {
            continue;
        };
        let mut st = sessions.lock();
        // Set-up state of nodes gone from cluster state goes with them.
        st.slots
            .retain(|node, _| view.directory.node_address(node).is_some());
        st.backoff
            .retain(|node, _| view.directory.node_address(node).is_some());
        for s in st.all.values() {
            let gone = view.directory.node_address(&s.peer_node).is_none();
            let stale = !s.usable(&view) && s.lock_pending().is_empty();
            let idle = s.idle_for() >= IDLE;
            // A peer that answers nothing for long is gone (its proofs time out meanwhile).
            let dead = !s.lock_pending().is_empty() && s.silent_for() > 2 * sessions.timeout;
            if gone || (stale && s.idle_for() > EXPIRY_MARGIN / 3) || idle || dead {
                s.close();
            }
        }
    }
}

async fn write_loop<W: AsyncRead + AsyncWrite + Unpin>(
    mut wr: WriteHalf<W>,
    mut outbox: mpsc::Receiver<Message>,
    mut closed: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(64);
    loop {
        tokio::select! {
            n = outbox.recv_many(&mut batch, 64) => {
                if n == 0 {
                    break;
                }
                // A peer that stops reading must not hold the session once it is closed.
                let written = tokio::select! {
                    w = wire::write_all(&mut wr, &batch) => w.is_ok(),
                    () = closing(&mut closed) => false,
                };
                if !written {
                    break;
                }
                batch.clear();
            }
            () = closing(&mut closed) => break,
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::AsyncWriteExt::shutdown(&mut wr),
    )
    .await;
}

async fn read_loop<R: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    me: Weak<Sessions>,
    session: Arc<Session>,
    mut rd: ReadHalf<R>,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = wire::read_msg(&mut rd) => m,
            () = closing(&mut closed) => break,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(Reason::SessionClosed) => break,
            Err(reason) => {
                // A peer that breaks the framing loses its session, on record.
                if let Some(sessions) = me.upgrade() {
                    let role = if session.opened_by_us {
                        Role::Initiator
                    } else {
                        Role::Responder
                    };
                    let mut rec = Record::new(role, Stage::Session);
                    rec.peer = Some(session.peer_addr);
                    rec.remote_node = Some(session.peer_node.to_string());
                    rec.result = Err(reason);
                    rec.detail = Some("a malformed frame; the session is closed".to_owned());
                    let _ = sessions.records.send(rec).await;
                }
                break;
            }
        };
        session
            .last_rx_ms
            .store(session.since_born(), Ordering::Relaxed);
        let Some(sessions) = me.upgrade() else { break };
        match msg {
            Message::Prove(p) => {
                session.touch();
                let Ok(permit) = session.proofs.clone().try_acquire_owned() else {
                    let id = p.id;
                    // A peer that sends proofs faster than it reads answers loses its session.
                    if session
                        .out
                        .try_send(Message::Refuse(Refuse {
                            id,
                            reason: Reason::Busy,
                        }))
                        .is_err()
                    {
                        break;
                    }
                    continue;
                };
                let s = session.clone();
                tokio::spawn(async move {
                    sessions.answer(s, p).await;
                    drop(permit);
                });
            }
            Message::Proven(p) => {
                if let Some(tx) = session.lock_pending().remove(&p.id) {
                    let _ = tx.send(Answer::Proven(p));
                }
            }
            Message::Refuse(r) => {
                if let Some(tx) = session.lock_pending().remove(&r.id) {
                    let _ = tx.send(Answer::Refused(r.reason));
                }
            }
            Message::Reject(r) => sessions.rejected(&session, r).await,
            // Only the acceptor's first frame, read before the session started.
            Message::Ready(_) => {}
        }
    }
    if let Some(sessions) = me.upgrade() {
        sessions.ended(&session);
    }
}

/// The opener's first read: the acceptor's `Ready`, or its refusal as a TLS alert (recorded
/// with rustls's words; a transport failure like any before the session is up).
async fn read_first<S: AsyncRead + Unpin>(
    stream: &mut S,
    rec: &mut Record,
) -> Result<Message, Reason> {
    use tokio::io::AsyncReadExt as _;
    let len = stream
        .read_u32()
        .await
        .map_err(|e| tls_failure(rec, &e, Reason::SessionClosed))? as usize;
    if !(2..=wire::MAX_FRAME).contains(&len) {
        return Err(Reason::Protocol);
    }
    let mut frame = vec![0; len];
    stream
        .read_exact(&mut frame)
        .await
        .map_err(|e| tls_failure(rec, &e, Reason::SessionClosed))?;
    Message::decode(&frame)
}

/// Resolves once the session is closed.
async fn closing(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await.map(drop);
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
