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
mod chains;
mod io;
mod prove;
mod respond;
mod setup;

pub use self::chains::ChainCache;
use self::{
    io::{read_loop, write_loop},
    prove::{decode_chain, peer_refusal},
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
    /// about to expire, the peer's still trusted by the bundle.
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
            && self.still_trusted(view)
    }

    /// Whether the peer's node SVID still chains to the bundle of `view` (checked again only
    /// when the bundle changed). A session whose peer's certificate lost its trust is closed
    /// and carries no further proof: the peer may hold a newer node SVID, so the proof goes to
    /// a new session, which checks whatever the peer presents now.
    fn still_trusted(&self, view: &View) -> bool {
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
