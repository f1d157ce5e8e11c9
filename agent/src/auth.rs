//! The auth entry lifecycle, in one place: demand (datapath events), initiator scheduling with
//! its backoff ([`scheduler`]), entry writes, renewal, expiry, revalidation ([`revalidate`]),
//! re-proving, and proactive warm-up. The kernel's auth map is written only here, through
//! [`AuthMap`]; the flows entries admitted are cut only here, through [`FlowTable`].

mod entries;
mod grants;
pub mod revalidate;
mod scheduler;
#[cfg(test)]
mod tests;
mod timers;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::SystemTime,
};

use portcullis_common::{AUTH_ALL_PORTS, AuthKey, AuthValue, Endpoint};
use tokio::sync::watch;

use self::grants::Decisions;
pub use self::{
    entries::Entries,
    grants::{definitive, with_grant},
    revalidate::{Report, Scope},
    scheduler::{AddrPair, Scheduler},
};
use crate::{
    datapath::{AuthMap, DatapathError, FlowTable, NameMap},
    handshake::{Record, Role, Stage, View},
    identity::SpiffeId,
    inputs::Index,
    journal,
    policy::Policy,
    reason::Reason,
    registry::{Kind, Registry},
    status::{boot_ns, flow_addr},
};

/// Pairs examined per tick by proactive authentication.
const WARMUP_CHECKS: usize = 4096;
/// How often a due entry without flows is looked at again (proactive authentication off).
const RENEWAL_RECHECK_NS: u64 = 10_000_000_000;
/// How often the flow table is swept for idle UDP flows.
const UDP_SWEEP_NS: u64 = 5_000_000_000;

/// Why an auth entry a handshake earned was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the record names no pair")]
    NoPair,
    #[error("cannot number the pair: {0}")]
    Numbering(DatapathError),
    #[error("the pair is no longer in cluster state ({local} here, {remote} on {node})")]
    NotInCluster {
        local: SpiffeId,
        remote: SpiffeId,
        node: String,
    },
    #[error("{0}")]
    NotAuthorized(String),
    #[error("{0}")]
    Map(DatapathError),
}

impl WriteError {
    /// The reason the handshake's record carries: a policy refusal is `not_authorized`, a pair
    /// gone meanwhile an unknown peer, the rest internal.
    #[must_use]
    pub fn reason(&self) -> Reason {
        match self {
            Self::NotAuthorized(_) => Reason::NotAuthorized,
            Self::NotInCluster { .. } => Reason::UnknownPeer,
            Self::NoPair | Self::Numbering(_) | Self::Map(_) => Reason::Internal,
        }
    }
}

/// What the auth owner reads from the other owners.
pub struct Ctx<'a> {
    pub index: &'a Index,
    pub names: &'a Registry,
    /// What the endpoint maps hold.
    pub endpoints: &'a HashMap<IpAddr, Endpoint>,
    pub policy: &'a Arc<Policy>,
    pub view: &'a watch::Receiver<Option<Arc<View>>>,
}

pub struct Auth {
    node: String,
    entries: Entries,
    /// Present when an identity source is configured: without one, entries come only from
    /// `portcullis auth allow`.
    scheduler: Option<Scheduler>,
    decisions: Decisions,
    proactive: bool,
    proactive_per_tick: usize,
    warmup_cursor: usize,
    /// Warm-up stopped at its budget: it goes on as proofs finish, not only at the next tick.
    warming: bool,
    /// Due entries found without flows, and when to look at each again.
    renewal_checked: HashMap<AuthKey, u64>,
    /// Entry writes the kernel (or the numbering) refused, since start, and the latest why.
    refused: u64,
    refused_error: Option<String>,
    /// UDP flows idle for longer than this are cut (nanoseconds).
    udp_idle_ns: u64,
    /// When this agent started, in flow-seen units: a flow recorded by an earlier version of
    /// the programs carries no time (0), and counts as seen then.
    started_seen: u32,
    /// Entries to prove again, in order, and the same as a set.
    reprove_backlog: std::collections::VecDeque<AuthKey>,
    reproving: HashSet<AuthKey>,
    /// When the flow table was last swept for idle UDP flows.
    swept_at: u64,
    /// The entries found without pair keys at start have been sent to be proven again.
    unkeyed_proven: bool,
}

impl Auth {
    #[must_use]
    pub fn new(
        node: &str,
        entries: Entries,
        scheduler: Option<Scheduler>,
        proactive: bool,
        proactive_per_tick: u32,
    ) -> Self {
        Self {
            node: node.to_owned(),
            entries,
            scheduler,
            decisions: Decisions::default(),
            proactive,
            proactive_per_tick: proactive_per_tick as usize,
            warmup_cursor: 0,
            warming: false,
            renewal_checked: HashMap::new(),
            refused: 0,
            refused_error: None,
            udp_idle_ns: 120_000_000_000,
            swept_at: 0,
            unkeyed_proven: false,
            started_seen: portcullis_common::seen_units(boot_ns()),
            reprove_backlog: std::collections::VecDeque::new(),
            reproving: HashSet::new(),
        }
    }

    /// Sets how long a UDP flow may stay idle before it is cut.
    #[must_use]
    pub fn with_udp_idle(mut self, idle: std::time::Duration) -> Self {
        self.udp_idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    #[must_use]
    pub fn entries(&self) -> &Entries {
        &self.entries
    }

    /// Entries removed since the last call (their numbers may have lost their last user).
    pub fn take_removed(&mut self) -> Vec<AuthKey> {
        self.entries.take_removed()
    }

    /// Entry writes refused since start, and the latest reason.
    #[must_use]
    pub fn refused(&self) -> (u64, Option<&str>) {
        (self.refused, self.refused_error.as_deref())
    }

    /// Handshakes not started because too many were waiting for a slot.
    #[must_use]
    pub fn deferred(&self) -> u64 {
        self.scheduler.as_ref().map_or(0, Scheduler::deferred)
    }

    fn refuse(&mut self, why: String) -> String {
        self.refused += 1;
        self.refused_error = Some(why.clone());
        why
    }

    /// Whether `key` pairs a workload of this node with a workload of cluster state.
    #[must_use]
    pub fn in_cluster(&self, ctx: &Ctx<'_>, key: &AuthKey) -> bool {
        let name = |kind, n| ctx.names.lookup(kind, n);
        let (Some(local), Some(remote), Some(node)) = (
            name(Kind::Identity, key.local_identity),
            name(Kind::Identity, key.remote_identity),
            name(Kind::Node, key.remote_node),
        ) else {
            return false;
        };
        ctx.index.has_pair(local, &self.node) && ctx.index.has_pair(remote, node)
    }

    /// The addresses of `key`'s pair by cluster state: ours first.
    fn addresses(&self, ctx: &Ctx<'_>, key: &AuthKey) -> Option<AddrPair> {
        let name = |kind, n| ctx.names.lookup(kind, n);
        let local = ctx
            .index
            .address_of(name(Kind::Identity, key.local_identity)?, &self.node)?;
        let remote = ctx.index.address_of(
            name(Kind::Identity, key.remote_identity)?,
            name(Kind::Node, key.remote_node)?,
        )?;
        Some((local, remote))
    }

    /// Asks for the pair of addresses to be authenticated (a datapath event, a renewal).
    /// The node sessions proofs go through.
    pub fn set_sessions(&mut self, sessions: Arc<crate::handshake::Sessions>) {
        if let Some(s) = self.scheduler.as_mut() {
            s.set_sessions(sessions);
        }
    }

    pub fn want(&mut self, ctx: &Ctx<'_>, pair: AddrPair) -> bool {
        self.scheduler
            .as_mut()
            .is_some_and(|s| s.want(pair, ctx.view))
    }

    /// Writes the auth entry a successful handshake earned.
    pub fn write<M: AuthMap + NameMap>(
        &mut self,
        maps: &mut M,
        names: &mut Registry,
        index: &Index,
        policy: &Arc<Policy>,
        rec: &Record,
    ) -> Result<(), WriteError> {
        let (Some(local), Some(remote), Some(node), Ok(expires)) =
            (&rec.local_id, &rec.remote_id, &rec.remote_node, rec.result)
        else {
            return Err(WriteError::NoPair);
        };
        let numbered = (|| {
            Ok::<_, DatapathError>(AuthKey {
                local_identity: names.intern(maps, Kind::Identity, local.as_str())?,
                remote_identity: names.intern(maps, Kind::Identity, remote.as_str())?,
                remote_node: names.intern(maps, Kind::Node, node)?,
                kind: 0,
            })
        })();
        let key = match numbered {
            Ok(k) => k,
            Err(e) => {
                let e = WriteError::Numbering(e);
                self.refuse(e.to_string());
                tracing::error!(error = %e, "auth entry not written; the pair is not admitted");
                return Err(e);
            }
        };
        // Cluster state may have changed while the handshake ran (a pod deleted): revalidation
        // has then already run, and would not see an entry written now.
        if !(index.has_pair(local.as_str(), &self.node) && index.has_pair(remote.as_str(), node)) {
            names.release(Kind::Identity, key.local_identity);
            names.release(Kind::Identity, key.remote_identity);
            names.release(Kind::Node, key.remote_node);
            return Err(WriteError::NotInCluster {
                local: local.clone(),
                remote: remote.clone(),
                node: node.clone(),
            });
        }
        // The policy may have changed since the handshake evaluated it.
        let decided;
        let decision =
            match self
                .decisions
                .get(policy, names, key.local_identity, key.remote_identity)
            {
                Some(d) => d,
                None => {
                    decided = policy.decide(local, remote);
                    &decided
                }
            };
        if !decision.authorized() {
            return Err(WriteError::NotAuthorized(policy.denial(local, remote)));
        }
        let now = boot_ns();
        let left = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let value = with_grant(
            AuthValue {
                expires_ns: now + u64::try_from(left.as_nanos()).unwrap_or(u64::MAX / 2),
                created_ns: now,
                ..AuthValue::default()
            },
            &decision.inbound,
        );
        self.renewal_checked.remove(&key);
        self.entries
            .insert_keyed(
                maps,
                key,
                value,
                rec.keys.clone(),
                rec.remote_chain.clone(),
                rec.role == Role::Responder,
            )
            .map_err(|e| {
            let why = self.refuse(e.to_string());
            // One line per refusal is bounded by the handshake rate, which is limited.
            tracing::error!(error = %why, local = %local, remote = %remote, "auth entry not written; the pair is not admitted");
            WriteError::Map(e)
        })
    }

    /// A finished proof: its retry schedule (ours), and a definitive failure decided inside an
    /// authenticated session revokes the pair. For our own proofs that is a refusal from the
    /// peer or our check of its half; for the peer's, only its rejection of our answer (whose
    /// pair we checked when we answered): a peer cannot revoke pairs by naming them, and no
    /// TLS alert, reset or timeout revokes anything.
    pub fn finished<M: AuthMap + FlowTable>(&mut self, maps: &mut M, ctx: &Ctx<'_>, rec: &Record) {
        if rec.stage != Stage::Proof {
            return;
        }
        let key = match rec.role {
            Role::Responder => {
                if !rec.revokes() {
                    return;
                }
                let (Some(local), Some(remote), Some(node)) =
                    (&rec.local_id, &rec.remote_id, &rec.remote_node)
                else {
                    return;
                };
                let (Some(li), Some(ri), Some(rn)) = (
                    ctx.names.id_of(Kind::Identity, local.as_str()),
                    ctx.names.id_of(Kind::Identity, remote.as_str()),
                    ctx.names.id_of(Kind::Node, node),
                ) else {
                    return;
                };
                if rec.result == Err(Reason::PeerRejectedCertificate) {
                    self.reprove_with_peer(ctx, rec);
                }
                AuthKey {
                    local_identity: li,
                    remote_identity: ri,
                    remote_node: rn,
                    kind: 0,
                }
            }
            Role::Initiator => {
                let (Some(l), Some(r)) = (rec.local_addr, rec.remote_addr) else {
                    return;
                };
                if let Some(s) = self.scheduler.as_mut() {
                    s.finished((l, r), rec.result.map(drop));
                }
                if self.warming {
                    self.warm_up(ctx, boot_ns());
                }
                if !rec.revokes() {
                    return;
                }
                let (Some(lw), Some(rw)) = (ctx.index.owner(&l), ctx.index.owner(&r)) else {
                    return;
                };
                // Only the pair the proof was about: an address that changed hands meanwhile
                // names another pair, which this session did not decide.
                if rec.local_id.as_ref() != Some(&lw.identity)
                    || rec.expected_remote.as_ref() != Some(&rw.identity)
                    || rec.remote_node.as_deref() != Some(&*rw.node)
                {
                    return;
                }
                let (Some(li), Some(ri), Some(rn)) = (
                    ctx.names.id_of(Kind::Identity, lw.identity.as_str()),
                    ctx.names.id_of(Kind::Identity, rw.identity.as_str()),
                    ctx.names.id_of(Kind::Node, &rw.node),
                ) else {
                    return;
                };
                AuthKey {
                    local_identity: li,
                    remote_identity: ri,
                    remote_node: rn,
                    kind: 0,
                }
            }
        };
        let Err(reason) = rec.result else { return };
        match self.entries.remove(maps, &key) {
            Ok(true) => {
                let cut = cut_flows(maps, |_, v| v.pair() == key).unwrap_or(0);
                journal::audit_revoked(ctx.names, &key, "proof refused", reason.as_str(), cut);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "revoking a pair whose proof was refused"),
        }
    }

    /// Checks the entries and flows `scope` selects against cluster state and policy, and
    /// removes or cuts what lost its footing.
    pub fn revalidate<M: AuthMap + FlowTable>(
        &mut self,
        maps: &mut M,
        ctx: &Ctx<'_>,
        scope: Scope<'_>,
        cause: &str,
    ) -> Result<Report, DatapathError> {
        let started = std::time::Instant::now();
        let keys: Vec<AuthKey> = match scope {
            Scope::All => self.entries.iter().map(|(k, _)| *k).collect(),
            Scope::Touched { pairs, .. } => {
                let mut keys = HashSet::new();
                for (identity, node) in pairs {
                    let Some(i) = ctx.names.id_of(Kind::Identity, identity) else {
                        continue;
                    };
                    if **node == *self.node {
                        keys.extend(self.entries.of_local(i));
                    }
                    if let Some(n) = ctx.names.id_of(Kind::Node, node) {
                        keys.extend(self.entries.of_remote(i, n));
                    }
                }
                keys.into_iter().collect()
            }
        };
        let mut report = Report {
            entries_checked: keys.len(),
            ..Report::default()
        };
        let mut changed: HashSet<AuthKey> = HashSet::new();
        for k in keys {
            let Some(v) = self.entries.get(&k).copied() else {
                continue;
            };
            // `Some(Some(value))`: authorized, with the value its grant gives the entry;
            // `Some(None)`: in cluster state, not authorized; `None`: not in cluster state.
            let decision = if self.in_cluster(ctx, &k) {
                self.decisions
                    .get(ctx.policy, ctx.names, k.local_identity, k.remote_identity)
                    .map(|d| d.authorized().then(|| with_grant(v, &d.inbound)))
            } else {
                None
            };
            match decision {
                Some(Some(want)) => {
                    if want != v {
                        self.entries.insert(maps, k, want)?;
                        report.regranted += 1;
                        changed.insert(k);
                    }
                }
                decision => {
                    self.entries.remove(maps, &k)?;
                    let reason = match (decision, self.ids(ctx, &k)) {
                        (Some(_), Some((l, r))) => ctx.policy.denial(&l, &r),
                        _ => "the pair is no longer in cluster state".to_owned(),
                    };
                    changed.insert(k);
                    report.revoked.push((k, reason));
                }
            }
        }
        let endpoints = ctx.endpoints;
        let entries = &self.entries;
        let (checked, cut) = match scope {
            Scope::All => cut_counting(maps, |k, v| {
                !revalidate::flow_stands(endpoints, entries, k, v)
            })?,
            Scope::Touched { addrs, .. } if addrs.is_empty() && changed.is_empty() => (0, 0),
            Scope::Touched { addrs, .. } => cut_counting(maps, |k, v| {
                revalidate::flow_touched(addrs, &changed, k, v)
                    && !revalidate::flow_stands(endpoints, entries, k, v)
            })?,
        };
        (report.flows_checked, report.flows_cut) = (checked, cut);
        let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        for (k, reason) in &report.revoked {
            journal::audit_revoked(ctx.names, k, cause, reason, 0);
        }
        if !report.revoked.is_empty() || report.flows_cut > 0 || report.regranted > 0 {
            tracing::info!(target: "portcullis::audit", event = "revalidated", cause, entries_revoked = report.revoked.len(), entries_regranted = report.regranted, flows_cut = report.flows_cut, took_us, "auth entries and flows revalidated");
        }
        Ok(report)
    }

    fn ids(&self, ctx: &Ctx<'_>, k: &AuthKey) -> Option<(SpiffeId, SpiffeId)> {
        let id = |n| SpiffeId::parse(ctx.names.lookup(Kind::Identity, n)?).ok();
        Some((id(k.local_identity)?, id(k.remote_identity)?))
    }

    /// Proves again, as initiator, every entry `select` picks, with or without flows; our own
    /// attempts then decide (a definitive failure revokes). The entries join a backlog that is
    /// drained as the scheduler has room (at once, and at each tick), so none is dropped when
    /// there are more of them than handshakes may wait. Returns how many joined it.
    pub fn reprove(&mut self, ctx: &Ctx<'_>, select: impl Fn(&AuthKey) -> bool) -> usize {
        let keys: Vec<AuthKey> = self
            .entries
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| select(k) && !self.reproving.contains(k))
            .collect();
        let n = keys.len();
        for k in keys {
            self.reproving.insert(k);
            self.reprove_backlog.push_back(k);
        }
        self.drain_reproofs(ctx);
        n
    }

    /// Starts the backlog's handshakes while the scheduler takes them.
    fn drain_reproofs(&mut self, ctx: &Ctx<'_>) {
        while self.scheduler.as_ref().is_some_and(|s| !s.saturated()) {
            let Some(k) = self.reprove_backlog.pop_front() else {
                break;
            };
            self.reproving.remove(&k);
            if self.entries.get(&k).is_none() {
                continue;
            }
            if let Some(pair) = self.addresses(ctx, &k) {
                // Already under way or backing off: that attempt proves it.
                self.want(ctx, pair);
            }
        }
    }

    /// Entries waiting to be proven again.
    #[must_use]
    pub fn reproofs_waiting(&self) -> usize {
        self.reprove_backlog.len()
    }

    /// A peer node rejected the SVID we presented for one of our workloads (its trust bundle
    /// changed, say): our entries of that workload with that node may rest on trust that is
    /// gone, so we prove them again ourselves.
    fn reprove_with_peer(&mut self, ctx: &Ctx<'_>, rec: &Record) {
        let (Some(local_id), Some(node)) = (&rec.local_id, &rec.remote_node) else {
            return;
        };
        let (Some(l), Some(n)) = (
            ctx.names.id_of(Kind::Identity, local_id.as_str()),
            ctx.names.id_of(Kind::Node, node),
        ) else {
            return;
        };
        self.reprove(ctx, |k| k.local_identity == l && k.remote_node == n);
    }

    /// Writes an entry by hand (`portcullis auth allow`): every port, for `ttl_secs`.
    pub fn allow<M: AuthMap>(
        &mut self,
        maps: &mut M,
        key: AuthKey,
        ttl_secs: u64,
    ) -> Result<(), DatapathError> {
        let now = boot_ns();
        let value = AuthValue {
            expires_ns: now.saturating_add(ttl_secs.saturating_mul(1_000_000_000)),
            created_ns: now,
            flags: AUTH_ALL_PORTS,
            ..AuthValue::default()
        };
        self.entries
            .insert(maps, key, value)
            .inspect_err(|e| drop(self.refuse(e.to_string())))
    }

    /// Removes an entry by hand and cuts its pair's flows: `(entry removed, flows cut)`.
    /// After a trust-bundle change, checks here, without the network, what the entries rest
    /// on: the peer workload chains their proofs verified (`chain_ok`) and the local
    /// workloads' own SVIDs (`local_untrusted`: the local identities whose SVID the bundle no
    /// longer trusts). An entry resting on an untrusted chain, or of an untrusted local
    /// workload, is revoked and its flows cut. Returns the pairs revoked.
    pub fn recheck_trust<M: AuthMap + FlowTable>(
        &mut self,
        maps: &mut M,
        names: &Registry,
        chain_ok: impl Fn(&entries::Chain) -> bool,
        local_untrusted: &HashSet<u32>,
    ) -> usize {
        let untrusted: HashSet<[u8; 32]> = self
            .entries
            .peer_chains()
            .filter(|(_, c)| !chain_ok(c))
            .map(|(h, _)| *h)
            .collect();
        let mut keys = self.entries.resting_on(&untrusted);
        keys.extend(
            self.entries
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| local_untrusted.contains(&k.local_identity)),
        );
        keys.sort_unstable_by_key(|k| (k.local_identity, k.remote_identity, k.remote_node));
        keys.dedup();
        let mut revoked = 0;
        for key in keys {
            match self.entries.remove(maps, &key) {
                Ok(true) => {
                    revoked += 1;
                    let cut = cut_flows(maps, |_, v| v.pair() == key).unwrap_or(0);
                    journal::audit_revoked(
                        names,
                        &key,
                        "trust bundle changed",
                        Reason::UntrustedChain.as_str(),
                        cut,
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "revoking a pair the bundle no longer trusts"),
            }
        }
        revoked
    }

    pub fn revoke<M: AuthMap + FlowTable>(
        &mut self,
        maps: &mut M,
        key: &AuthKey,
    ) -> Result<(bool, usize), DatapathError> {
        let removed = self.entries.remove(maps, key)?;
        let cut = cut_flows(maps, |_, v| v.pair() == *key)?;
        Ok((removed, cut))
    }
}

/// Removes every flow `cut` selects; returns how many were cut.
pub fn cut_flows<M: FlowTable>(
    maps: &mut M,
    cut: impl FnMut(&portcullis_common::FlowKey, &portcullis_common::FlowValue) -> bool,
) -> Result<usize, DatapathError> {
    cut_counting(maps, cut).map(|(_, n)| n)
}

/// Like [`cut_flows`], also returning how many flows were looked at.
fn cut_counting<M: FlowTable>(
    maps: &mut M,
    mut cut: impl FnMut(&portcullis_common::FlowKey, &portcullis_common::FlowValue) -> bool,
) -> Result<(usize, usize), DatapathError> {
    let flows = maps.flows()?;
    let doomed: Vec<_> = flows
        .iter()
        .filter(|(k, v)| cut(k, v))
        .map(|(k, _)| *k)
        .collect();
    let n = maps.remove_flows(&doomed)?;
    Ok((flows.len(), n))
}

/// The address pair of a flow key, ours first.
#[must_use]
pub fn flow_pair(k: &portcullis_common::FlowKey) -> AddrPair {
    (
        flow_addr(k.family, &k.local_addr),
        flow_addr(k.family, &k.remote_addr),
    )
}
