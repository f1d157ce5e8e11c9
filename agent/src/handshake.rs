//! Agent-to-agent authentication, protocol version 2 (see `docs/PROTOCOL.md`).
//!
//! Two agents hold one node session ([`session`]): a mutual TLS 1.3 connection authenticated
//! by their node SVIDs. Nothing about any workload crosses the wire before both nodes are
//! authenticated. Inside it, a pair of workloads is authenticated by a workload proof
//! ([`proof`]): each side sends its workload's SVID chain and a signature with the workload's
//! key over a transcript bound to the session and to the pair; each checks the other's chain,
//! that cluster state puts that workload on the node the session authenticated, and its
//! policy; both write their entries and derive the pair's keys. A refusal is a message inside
//! the session; a TLS alert, a reset or a timeout is never more than a transient failure.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::oneshot;

#[cfg(test)]
mod hostile;
mod listener;
pub mod proof;
pub mod session;
#[cfg(test)]
pub(crate) mod tests;
pub mod wire;

pub use self::{
    listener::{Limits, serve},
    proof::PairKeys,
    session::Sessions,
};
use crate::{
    identity::{SpiffeId, store::Svid},
    policy::Policy,
    reason::Reason,
    tls::{self, LocalSvid, Trust},
};

/// Who owns an address, by cluster state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub id: SpiffeId,
    pub node: Arc<str>,
}

/// Cluster state as a proof asks it: who owns an address, where a node accepts sessions.
/// The agent's index answers it live, so that a change of cluster state reaches proofs
/// without rebuilding anything.
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

/// The node SVID and the session configurations made from it.
pub struct NodeCreds {
    pub svid: LocalSvid,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// Everything sessions and proofs need to know: the credentials and policy as one immutable
/// snapshot that the agent's core republishes whenever they change, and cluster state through
/// the live [`Directory`].
pub struct View {
    pub node: String,
    pub trust: Trust,
    pub directory: Arc<dyn Directory>,
    /// The local workloads' SVIDs.
    pub svids: HashMap<SpiffeId, LocalSvid>,
    /// The authorization policy both sides evaluate.
    pub policy: Arc<Policy>,
    /// None until the node has its SVID: no session can be opened or accepted before.
    pub node_creds: Option<NodeCreds>,
    /// Checks the workload chains proofs carry.
    pub chains: tls::ClientChain,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("node", &self.node)
            .field("svids", &self.svids.keys().collect::<Vec<_>>())
            .field(
                "node_svid",
                &self.node_creds.as_ref().map(|n| &n.svid.serial),
            )
            .field("policy", &self.policy.name)
            .finish_non_exhaustive()
    }
}

impl View {
    /// Builds the snapshot: rustls keys for the SVIDs, and the session configurations for the
    /// node SVID.
    pub fn build(
        node: &str,
        trust: Trust,
        directory: Arc<dyn Directory>,
        node_svid: Option<&Svid>,
        svids: &[Svid],
        policy: Arc<Policy>,
    ) -> Result<Self, tls::TlsError> {
        let svids: HashMap<SpiffeId, LocalSvid> = svids
            .iter()
            .map(|s| Ok((s.id.clone(), tls::local_svid(s)?)))
            .collect::<Result<_, tls::TlsError>>()?;
        let node_creds = match node_svid {
            Some(s) => {
                let svid = tls::local_svid(s)?;
                Some(NodeCreds {
                    server: tls::session_server_config(&trust, &svid)?,
                    client: tls::session_client_config(&trust, &svid)?,
                    svid,
                })
            }
            None => None,
        };
        Ok(Self {
            chains: tls::ClientChain::new(&trust)?,
            node: node.to_owned(),
            trust,
            directory,
            svids,
            policy,
            node_creds,
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

/// What a record is about: a node session being set up, or one workload proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Session,
    Proof,
}

impl Stage {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Proof => "proof",
        }
    }
}

/// Who decided a failure, which says what it may cause: only a decision made inside an
/// authenticated node session (ours, or the peer's refusal message) may revoke a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decider {
    /// The transport: no session, a TLS alert, a reset, a timeout. Always transient.
    Transport,
    /// Our own check of what the peer proved inside the session.
    Us,
    /// The peer's authenticated refusal inside the session.
    Peer,
}

impl Decider {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Transport => "transport",
            Self::Us => "us",
            Self::Peer => "peer",
        }
    }
}

/// The outcome of one session set-up or one proof, as far as it got: the audit record, and
/// (on a proof's success) what to write into the auth map.
#[derive(Debug, Clone)]
pub struct Record {
    pub role: Role,
    pub stage: Stage,
    /// The peer agent's session address.
    pub peer: Option<SocketAddr>,
    pub local_addr: Option<IpAddr>,
    pub remote_addr: Option<IpAddr>,
    pub local_id: Option<SpiffeId>,
    pub remote_id: Option<SpiffeId>,
    /// The identity our proof asked the peer to prove (cluster state's, when it started).
    pub expected_remote: Option<SpiffeId>,
    pub remote_node: Option<String>,
    /// The entry's expiry on success.
    pub result: Result<SystemTime, Reason>,
    pub decided_by: Decider,
    /// More about a failure than `Reason` says (which policy, which rules).
    pub detail: Option<String>,
    /// The pair's keys on a proof's success.
    pub keys: Option<PairKeys>,
    /// The peer workload's chain the proof verified, kept with the entry so that a change of
    /// the trust bundle can check it again here, without the network.
    pub remote_chain: Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>>,
    pub took: Duration,
}

impl Record {
    pub(crate) fn new(role: Role, stage: Stage) -> Self {
        Self {
            role,
            stage,
            peer: None,
            local_addr: None,
            remote_addr: None,
            local_id: None,
            remote_id: None,
            expected_remote: None,
            remote_node: None,
            result: Err(Reason::Internal),
            decided_by: Decider::Transport,
            detail: None,
            keys: None,
            remote_chain: None,
            took: Duration::ZERO,
        }
    }

    /// Whether this failure removes the pair's entry: a proof's failure that another attempt
    /// cannot change, decided inside an authenticated session — for our own proof by the
    /// peer's refusal or our check of its half; for the peer's proof only by its rejection of
    /// our answer (whose pair we checked when we answered), so that a peer cannot revoke
    /// pairs by naming them.
    #[must_use]
    pub fn revokes(&self) -> bool {
        let decided = match self.role {
            Role::Initiator => self.decided_by != Decider::Transport,
            Role::Responder => self.decided_by == Decider::Peer,
        };
        self.stage == Stage::Proof && decided && self.result.is_err_and(crate::auth::definitive)
    }
}

/// Why the core did not write the entry a responder asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRefused {
    /// What the proof's record and the initiator are told (`not_authorized` for a policy
    /// that changed meanwhile, `internal` for a kernel refusal).
    pub reason: Reason,
    pub detail: String,
}

/// The responder's request to the core: write this entry, then tell me whether it worked.
pub type WriteRequest = (Record, oneshot::Sender<Result<(), WriteRefused>>);

/// Proves `local_addr`'s workload to the agent that hosts `remote_addr`, and has it proven,
/// inside the node session with that agent (opened first if there is none).
pub async fn initiate(
    sessions: Arc<Sessions>,
    view: Arc<View>,
    local_addr: IpAddr,
    remote_addr: IpAddr,
    timeout: Duration,
) -> Record {
    let start = std::time::Instant::now();
    let mut rec = Record::new(Role::Initiator, Stage::Proof);
    rec.local_addr = Some(local_addr);
    rec.remote_addr = Some(remote_addr);
    let result =
        tokio::time::timeout(timeout, initiate_inner(&sessions, &view, &mut rec, timeout)).await;
    rec.result = result.unwrap_or_else(|_| {
        rec.decided_by = Decider::Transport;
        Err(Reason::Timeout)
    });
    rec.took = start.elapsed();
    rec
}

async fn initiate_inner(
    sessions: &Arc<Sessions>,
    view: &Arc<View>,
    rec: &mut Record,
    timeout: Duration,
) -> Result<SystemTime, Reason> {
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
    rec.expected_remote = Some(remote.id.clone());
    let svid = view.svids.get(&local.id).ok_or(Reason::NoLocalSvid)?;
    if !view.policy.decide(&local.id, &remote.id).authorized() {
        // Nothing to ask the peer: our own policy refuses the pair.
        rec.decided_by = Decider::Us;
        rec.detail = Some(view.policy.denial(&local.id, &remote.id));
        return Err(Reason::NotAuthorized);
    }
    let session = sessions
        .session(view, &remote.node, timeout)
        .await
        .map_err(|(reason, detail)| {
            rec.detail = detail;
            reason
        })?;
    rec.peer = Some(session.peer_addr());
    session
        .prove(view, svid, &local, &remote, local_addr, remote_addr, rec)
        .await
}
