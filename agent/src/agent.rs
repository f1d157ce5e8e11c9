//! The running agent: one task owns the datapath and all state, and handles, in turn, cluster
//! state changes (reconciliation), datapath events and admin requests. Nothing else writes the
//! maps, so there are no locks and no interleavings to reason about.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use portcullis_common::{
    AUTH_ALL_PORTS, AuthKey, AuthValue, Counter, EP_ADMIT_HOST, EP_AUDIT, EP_ENFORCE, EP_HOST,
    EP_LOCAL, EP_OTHER_PASS, EVENT_WOULD_DROP, Endpoint, Event, FLOW_HOST, FLOW_INBOUND, FlowKey,
    FlowValue, IDENTITY_NONE, MAX_PORT_RANGES, PortRange, capacity,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::SignalKind,
    sync::{mpsc, watch},
};

use crate::{
    admin::{self, Call, Request, Response},
    auth::{AddrPair, AuthManager},
    cluster::{ClusterState, FileSource},
    config::{Config, IdentitySource},
    datapath::{self, Attached, Datapath, DatapathError, route},
    handshake::{self, Owner, Record, Role, View, WriteRequest},
    identity::SpiffeId,
    identity::store::{Source, Store},
    kubernetes::KubeSource,
    policy::{self, Grant, Mode, Policy, PolicyFile},
    reason::Reason,
    registry::{Kind, Registry},
    status::{
        self, AgentInfo, EventRecord, HandshakeInfo, IdentityInfo, InterfaceInfo, MapFill, Status,
    },
};

/// Events kept for `status`.
const RECENT_EVENTS: usize = 256;
/// Pairs examined per tick by proactive authentication.
const PROACTIVE_CHECKS: usize = 4096;

/// Whether an entry is in the last third of its lifetime (time to renew it).
fn in_last_third(v: &AuthValue, now: u64) -> bool {
    let life = v.expires_ns.saturating_sub(v.created_ns);
    v.expires_ns > now && v.expires_ns - now < life / 3
}

/// Handshake outcomes kept for `status`.
const RECENT_HANDSHAKES: usize = 128;

/// Where cluster state (and, from Kubernetes, possibly the policy) comes from.
pub enum ClusterSource {
    File(FileSource),
    Kube(KubeSource),
}

impl ClusterSource {
    /// What the status and the log call it.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::File(f) => f.path().display().to_string(),
            Self::Kube(k) => k.description().to_owned(),
        }
    }

    /// Changes since the last call: cluster state, and a policy from Kubernetes.
    #[expect(clippy::type_complexity, reason = "two independent optional updates")]
    fn poll(
        &mut self,
    ) -> (
        Option<Result<ClusterState, String>>,
        Option<Result<Policy, String>>,
    ) {
        match self {
            Self::File(f) => (f.poll().map(|r| r.map_err(|e| e.to_string())), None),
            Self::Kube(k) => match k.poll() {
                Some(p) => (p.cluster.map(Ok), p.policy),
                None => (None, None),
            },
        }
    }
}

/// The identity name of this node's own addresses (connections from the node: kubelet probes).
pub const HOST_IDENTITY: &str = "host";

/// The endpoint flags that carry a local pod's policy settings.
fn policy_flags(s: policy::Settings) -> u32 {
    let mut flags = match s.mode {
        Mode::Enforce => EP_ENFORCE,
        Mode::Audit => EP_AUDIT,
        Mode::Off => 0,
    };
    if s.node_traffic {
        flags |= EP_ADMIT_HOST;
    }
    if s.other_protocols {
        flags |= EP_OTHER_PASS;
    }
    flags
}

/// An auth entry's value with the ports `grant` admits towards the local workload.
fn with_grant(mut v: AuthValue, grant: &Grant) -> AuthValue {
    v.flags &= !AUTH_ALL_PORTS;
    v.nports = 0;
    v.ports = [PortRange::default(); MAX_PORT_RANGES];
    match grant {
        Grant::None => {}
        Grant::All => v.flags |= AUTH_ALL_PORTS,
        Grant::Ports(ranges) => {
            // The loader refuses rules with more ranges than fit; several rules together can
            // still exceed it, and then the excess is not admitted (never widened).
            if ranges.len() > MAX_PORT_RANGES {
                tracing::warn!(
                    ranges = ranges.len(),
                    max = MAX_PORT_RANGES,
                    "a pair's rules admit more port ranges than an auth entry holds; the excess is not admitted"
                );
            }
            for (slot, r) in v.ports.iter_mut().zip(ranges) {
                *slot = *r;
            }
            v.nports = u32::try_from(ranges.len().min(MAX_PORT_RANGES)).unwrap_or(0);
        }
    }
    v
}

/// Writes the kernel refused. The agent carries on without them (fail closed: an endpoint left
/// out is an unknown peer, an auth entry left out admits nothing) and says so in the log,
/// `status` and the metrics.
#[derive(Debug, Default)]
struct Refusals {
    /// Addresses of cluster state not in the endpoint maps after the last reconciliation.
    endpoints_missing: usize,
    /// Endpoint writes refused, since start.
    endpoints: u64,
    /// Auth entries refused, since start.
    auth: u64,
    /// Identity and node numbers the kernel refused to store, since start.
    names: u64,
    /// Workloads (and the node itself) left unnumbered at the last reconciliation: the name
    /// map is full. Their addresses are among `endpoints_missing`.
    names_missing: usize,
    /// What the kernel said at the latest refusal, per map.
    endpoint_error: Option<String>,
    auth_error: Option<String>,
    name_error: Option<String>,
}

impl Refusals {
    /// Counts an auth entry the kernel (or the numbering) refused, keeps why, and returns it.
    fn auth_refused(&mut self, why: String) -> String {
        self.auth += 1;
        self.auth_error = Some(why.clone());
        why
    }
}

struct Iface {
    mode: Mode,
    name: String,
    workload: String,
    identity: String,
    addresses: Vec<IpAddr>,
    attached: Attached,
}

pub struct Agent {
    config: Config,
    started: Instant,
    dp: Datapath,
    registry: Registry,
    source: ClusterSource,
    /// Shared so that a reconciliation holds it without copying every workload.
    cluster: Option<Arc<ClusterState>>,
    cluster_error: Option<String>,
    /// What the endpoint maps hold, mirrored.
    programmed: HashMap<IpAddr, Endpoint>,
    /// Interfaces with our programs, by index.
    attached: BTreeMap<u32, Iface>,
    /// Pinned links found at start; those no local pod claims are removed once cluster state
    /// has been read.
    leftover_pins: Vec<u32>,
    pending: Vec<String>,
    /// Workloads whose interface lookup failed, with the reason last logged (log once).
    pending_reasons: HashMap<String, String>,
    events: VecDeque<EventRecord>,
    events_total: u64,
    /// Events `read_events` could not hand over (the agent's queue was full).
    pub events_dropped: Arc<AtomicU64>,
    /// The per-event log line, rate-limited like the audit log.
    event_log: AuditLimiter,
    /// Present when an identity source is configured.
    store: Option<Store>,
    auth: Option<AuthManager>,
    view_tx: watch::Sender<Option<Arc<View>>>,
    view_rx: watch::Receiver<Option<Arc<View>>>,
    /// Pairs to retry, and when.
    retries: Vec<(tokio::time::Instant, AddrPair)>,
    handshakes: VecDeque<HandshakeInfo>,
    store_problems: Vec<String>,
    pub metrics: Arc<std::sync::Mutex<crate::metrics::Metrics>>,
    audit: AuditLimiter,
    proactive_cursor: usize,
    policy: Arc<Policy>,
    policy_source: Option<PolicyFile>,
    policy_error: Option<String>,
    /// Why the node's own addresses could not be listed, last logged (log once).
    host_addr_error: Option<String>,
    /// What the sockops program does, for `status`.
    first_connection: String,
    refusals: Refusals,
    /// (identity, node) of every numbered workload of cluster state, as of the last
    /// reconciliation: an auth entry is written only for a pair still in it.
    enrolled: HashSet<(u32, u32)>,
    /// Remote workloads' share of `Refusals::endpoints_missing` and `names_missing`, as of the
    /// last reconciliation that walked them.
    remote_missing: (usize, usize),
    /// The next reconciliation walks every workload, not only the node's and local pods'.
    walk_all: bool,
    /// Why removed map pins could not be made again, last logged (log once).
    map_pin_error: Option<String>,
}

/// Records `now` as the latest of a recurring problem; true if it differs from the last one
/// (so that it is logged once, not at every reconciliation).
fn is_new(last: &mut Option<String>, now: String) -> bool {
    if last.as_ref() == Some(&now) {
        return false;
    }
    *last = Some(now);
    true
}

/// Audit records are rate-limited (a token bucket: `AUDIT_BURST` at once, `AUDIT_PER_SEC`
/// sustained) so that a flood of failing peers cannot fill a disk; what was suppressed is
/// counted and reported in the next record that gets through.
struct AuditLimiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

const AUDIT_BURST: f64 = 200.0;
const AUDIT_PER_SEC: f64 = 50.0;

impl AuditLimiter {
    fn new() -> Self {
        Self {
            tokens: AUDIT_BURST,
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// `Some(n)` when a record may be written now, `n` records having been suppressed before it.
    fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * AUDIT_PER_SEC)
            .min(AUDIT_BURST);
        self.last = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Agent {
    pub fn new(
        config: Config,
        records: mpsc::Sender<Record>,
        source: ClusterSource,
    ) -> anyhow::Result<(Self, datapath::Channels)> {
        let (dp, channels) =
            Datapath::open(&config.bpffs_dir, config.datapath_log).with_context(|| {
                format!("opening the datapath under {}", config.bpffs_dir.display())
            })?;
        let registry = Registry::load(dp.names()?);
        let programmed = dp.endpoints()?;
        let leftover_pins = dp.dirs().pinned_interfaces()?;
        let adopted_auth = dp.auth_entries()?.len();
        let adopted_flows = dp.flows()?.len();
        tracing::info!(
            bpffs_dir = %config.bpffs_dir.display(),
            endpoints = programmed.len(),
            auth_entries = adopted_auth,
            flows = adopted_flows,
            pinned_interfaces = leftover_pins.len(),
            "datapath loaded; pinned state adopted"
        );
        let (policy, policy_source) = match &config.policy {
            None => (Policy::default(), None),
            Some(path) => {
                let mut src = policy::file_source(path.clone());
                match src.poll() {
                    Some(Ok(p)) => (p, Some(src)),
                    Some(Err(e)) => {
                        return Err(anyhow::Error::new(e).context("no valid policy to start from"));
                    }
                    None => anyhow::bail!("policy {} could not be read", path.display()),
                }
            }
        };
        tracing::info!(policy = %policy.name, mode = policy.defaults.mode.as_str(), rules = policy.rules.len(), "policy loaded");
        let auth = config.identity.as_ref().map(|_| {
            AuthManager::new(
                config.handshake.max_concurrent,
                config.handshake.timeout,
                records,
            )
        });
        let (view_tx, view_rx) = watch::channel(None);
        Ok((
            Self {
                config,
                started: Instant::now(),
                dp,
                registry,
                source,
                cluster: None,
                cluster_error: None,
                programmed,
                attached: BTreeMap::new(),
                leftover_pins,
                pending: Vec::new(),
                pending_reasons: HashMap::new(),
                events: VecDeque::with_capacity(RECENT_EVENTS),
                events_total: 0,
                events_dropped: Arc::new(AtomicU64::new(0)),
                event_log: AuditLimiter::new(),
                store: None,
                auth,
                view_tx,
                view_rx,
                retries: Vec::new(),
                handshakes: VecDeque::with_capacity(RECENT_HANDSHAKES),
                store_problems: Vec::new(),
                metrics: Arc::new(std::sync::Mutex::new(crate::metrics::Metrics::new())),
                audit: AuditLimiter::new(),
                proactive_cursor: 0,
                policy: Arc::new(policy),
                policy_source,
                policy_error: None,
                host_addr_error: None,
                first_connection: String::new(),
                refusals: Refusals::default(),
                enrolled: HashSet::new(),
                remote_missing: (0, 0),
                walk_all: true,
                map_pin_error: None,
            },
            channels,
        ))
    }

    /// Re-reads cluster state if it changed and makes the datapath match it.
    pub fn reconcile(&mut self) -> Result<(), DatapathError> {
        let started = Instant::now();
        let mut cluster_changed = false;
        let (cluster_update, policy_update) = self.source.poll();
        let read_ms = started.elapsed().as_millis();
        if let Some(result) = cluster_update {
            match result {
                Ok(state) => {
                    tracing::info!(
                        source = %self.source.describe(),
                        nodes = state.nodes.len(),
                        workloads = state.workloads.len(),
                        local = state.local_workloads(&self.config.node).count(),
                        "cluster state loaded"
                    );
                    if !state.nodes.contains_key(&self.config.node) {
                        tracing::warn!(node = %self.config.node, "this node is not in cluster state; no local pod will be enforced");
                    }
                    cluster_changed = self.cluster.as_deref() != Some(&state);
                    self.cluster = Some(Arc::new(state));
                    self.cluster_error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cluster state rejected; the last good state stays in force");
                    self.cluster_error = Some(e.to_string());
                }
            }
        }
        let mut policy_changed = false;
        let policy_update = policy_update.or_else(|| {
            self.policy_source
                .as_mut()
                .and_then(|s| s.poll())
                .map(|r| r.map_err(|e| e.to_string()))
        });
        if let Some(result) = policy_update {
            match result {
                Ok(p) => {
                    tracing::info!(policy = %p.name, mode = p.defaults.mode.as_str(), rules = p.rules.len(), "policy loaded");
                    policy_changed = *self.policy != p;
                    self.policy = Arc::new(p);
                    self.policy_error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy rejected; the last good policy stays in force");
                    self.policy_error = Some(e.to_string());
                }
            }
        }
        let Some(cluster) = self.cluster.clone() else {
            return Ok(());
        };
        // Remote workloads' endpoints change only with cluster state, and the room a full map
        // lacks comes only from removals: a reconciliation walks them only then, or after an
        // error worth retrying. The node's own and local pods' endpoints (interfaces come and
        // go) are looked at every time.
        let walk_all = cluster_changed || policy_changed || self.walk_all;
        let mut retry = false;
        let mut desired: HashMap<IpAddr, Endpoint> = HashMap::new();
        let mut ifaces: BTreeMap<u32, Iface> = BTreeMap::new();
        let mut pending = Vec::new();
        // What a full map leaves out must be a remote peer (then an unknown peer, dropped),
        // never the node or a local pod: they are numbered and programmed first.
        let mut refused: Option<String> = None;
        // Endpoints and workloads left out: [the node and local pods, remote workloads].
        let mut missing = [self.host_endpoints(&mut desired, &mut refused), 0];
        let mut unnumbered = [usize::from(missing[0] > 0), 0];
        let mut enrolled = HashSet::new();
        let mut local_addrs = HashSet::new();
        let (here, elsewhere): (Vec<_>, Vec<_>) = cluster
            .workloads
            .iter()
            .filter(|w| walk_all || *w.node == *self.config.node)
            .partition(|w| *w.node == *self.config.node);
        for w in here.into_iter().chain(elsewhere) {
            let local = *w.node == *self.config.node;
            let share = usize::from(!local);
            let numbered = self
                .registry
                .intern(&mut self.dp, Kind::Identity, w.identity.as_str())
                .and_then(|i| Ok((i, self.registry.intern(&mut self.dp, Kind::Node, &w.node)?)));
            let (identity, node) = match numbered {
                Ok(n) => n,
                Err(e) => {
                    unnumbered[share] += 1;
                    if !matches!(e, DatapathError::Full { .. }) {
                        self.refusals.names += 1;
                        retry = true;
                    }
                    missing[share] += w.addresses.len();
                    let e = e.to_string();
                    if local {
                        let label = format!("{}/{}", w.namespace, w.name);
                        self.pending_reasons.insert(label.clone(), e.clone());
                        pending.push(label);
                    }
                    self.refusals.name_error = Some(e.clone());
                    refused.get_or_insert(e);
                    continue;
                }
            };
            enrolled.insert((identity, node));
            if local {
                local_addrs.extend(w.addresses.iter().copied());
            }
            // Only a local pod's endpoint carries its policy settings and has an interface.
            let (settings, label) = if local {
                (
                    policy_flags(self.policy.settings(&w.namespace, &w.identity)),
                    format!("{}/{}", w.namespace, w.name),
                )
            } else {
                (0, String::new())
            };
            for addr in &w.addresses {
                let mut ep = Endpoint {
                    identity,
                    node,
                    ifindex: 0,
                    flags: 0,
                };
                if local {
                    match route::lookup(*addr) {
                        Ok(iface) => {
                            ep.ifindex = iface.index;
                            ep.flags = EP_LOCAL | settings;
                            self.pending_reasons.remove(&label);
                            let entry = ifaces.entry(iface.index).or_insert_with(|| Iface {
                                name: iface.name.clone(),
                                mode: self.policy.settings(&w.namespace, &w.identity).mode,
                                workload: label.clone(),
                                identity: w.identity.to_string(),
                                addresses: Vec::new(),
                                attached: Attached::New,
                            });
                            entry.addresses.push(*addr);
                        }
                        Err(e) => {
                            let reason = e.to_string();
                            if self.pending_reasons.get(&label) != Some(&reason) {
                                tracing::info!(workload = %label, %addr, %reason, "waiting for the pod's interface");
                                self.pending_reasons.insert(label.clone(), reason);
                            }
                            if !pending.contains(&label) {
                                pending.push(label.clone());
                            }
                        }
                    }
                }
                desired.insert(*addr, ep);
            }
        }
        if !walk_all {
            // The node's claim on an address never displaces a remote pod's, walked or not.
            desired.retain(|a, ep| {
                ep.flags & EP_HOST == 0
                    || self
                        .programmed
                        .get(a)
                        .is_none_or(|p| p.flags & EP_HOST != 0)
            });
        }
        self.pending = pending;
        if walk_all {
            self.enrolled = enrolled;
            self.remote_missing.1 = unnumbered[1];
        } else {
            self.enrolled.extend(enrolled);
        }
        self.refusals.names_missing = unnumbered[0] + self.remote_missing.1;

        // Endpoints before links: a program must find its pod's endpoint from the first packet.
        // Removals first, as they make room. Without a walk of every workload, only the
        // node's own addresses can have gone.
        let (mut endpoints_set, mut endpoints_removed) = (0usize, 0usize);
        let gone: Vec<IpAddr> = self
            .programmed
            .iter()
            .filter(|(a, ep)| (walk_all || ep.flags & EP_HOST != 0) && !desired.contains_key(a))
            .map(|(a, _)| *a)
            .collect();
        for addr in gone {
            if let Err(e) = self.dp.remove_endpoint(addr) {
                tracing::error!(error = %e, %addr, "cannot remove an endpoint; retrying at the next reconciliation");
                retry = true;
                continue;
            }
            self.programmed.remove(&addr);
            endpoints_removed += 1;
            tracing::info!(target: "portcullis::audit", event = "endpoint_removed", %addr, "endpoint removed from cluster state");
        }
        // Per family (IPv4, IPv6): once a map is full, a new address is not tried again in
        // this pass; changing an address already there still works.
        let mut full = [false; 2];
        for node_or_local in [true, false] {
            for (addr, ep) in &desired {
                if (ep.flags & (EP_LOCAL | EP_HOST) != 0) != node_or_local
                    || self.programmed.get(addr) == Some(ep)
                {
                    continue;
                }
                let share = usize::from(!node_or_local && !local_addrs.contains(addr));
                let family = usize::from(addr.is_ipv6());
                let known = self.programmed.contains_key(addr);
                if !known && full[family] {
                    missing[share] += 1;
                    continue;
                }
                match self.dp.set_endpoint(*addr, ep) {
                    Ok(()) => {
                        self.programmed.insert(*addr, *ep);
                        endpoints_set += 1;
                    }
                    Err(e) => {
                        full[family] |= e.is_full();
                        retry |= !e.is_full();
                        self.refusals.endpoints += 1;
                        missing[share] += 1;
                        if known {
                            // Never leave an address with its previous owner's identity.
                            if self.dp.remove_endpoint(*addr).is_ok() {
                                self.programmed.remove(addr);
                            }
                        }
                        self.refusals.endpoint_error = Some(e.to_string());
                        refused.get_or_insert(e.to_string());
                    }
                }
            }
        }
        if walk_all {
            self.remote_missing.0 = missing[1];
        }
        // Room made without a walk (a node address gone) is offered to remote workloads next.
        self.walk_all = retry || (!walk_all && endpoints_removed > 0 && self.remote_missing.0 > 0);
        self.note_refusals(missing[0] + self.remote_missing.0, refused);
        let endpoints_changed = endpoints_set + endpoints_removed > 0;
        if endpoints_changed || cluster_changed || policy_changed {
            let why = if policy_changed {
                "policy changed"
            } else {
                "cluster state changed"
            };
            self.revalidate(why)?;
        }

        match self.dp.repin_maps() {
            Ok(maps) => {
                if !maps.is_empty() {
                    tracing::warn!(?maps, pins = %self.dp.dirs().maps.display(), "pinned maps vanished while the agent ran; pinned them again, so that a restart keeps their state");
                }
                self.map_pin_error = None;
            }
            Err(e) => {
                if is_new(&mut self.map_pin_error, e.to_string()) {
                    tracing::error!(error = %e, "pinned maps vanished and cannot be pinned again: enforcement goes on, but an agent started after this one would begin from empty maps; retrying at each reconciliation");
                }
            }
        }
        let unpinned: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !self.dp.pinned(**i))
            .copied()
            .collect();
        for index in unpinned {
            if let Some(iface) = self.attached.remove(&index) {
                tracing::warn!(workload = %iface.workload, interface = %iface.name, ifindex = index, pins = %self.dp.dirs().links.display(), "the pinned links of an enforced interface vanished (and with them its programs); attaching again");
            }
        }
        for (index, mut iface) in ifaces {
            if let Some(existing) = self.attached.get_mut(&index) {
                existing.workload = iface.workload;
                existing.mode = iface.mode;
                existing.identity = iface.identity;
                existing.addresses = iface.addresses;
                continue;
            }
            // An interface can vanish between its lookup and here (a pod deleted): that pod
            // waits, the others go on.
            let how = match self.dp.attach(&route::Interface {
                index,
                name: iface.name.clone(),
            }) {
                Ok(how) => how,
                Err(e) => {
                    let reason = e.to_string();
                    if self.pending_reasons.get(&iface.workload) != Some(&reason) {
                        tracing::warn!(workload = %iface.workload, interface = %iface.name, ifindex = index, error = %reason, "cannot attach; retrying at the next reconciliation");
                        self.pending_reasons.insert(iface.workload.clone(), reason);
                    }
                    if !self.pending.contains(&iface.workload) {
                        self.pending.push(iface.workload);
                    }
                    continue;
                }
            };
            iface.attached = how;
            tracing::info!(workload = %iface.workload, interface = %iface.name, ifindex = index, attached = ?how, "enforcing");
            self.attached.insert(index, iface);
        }
        let wanted: HashSet<u32> = desired
            .values()
            .filter(|e| e.flags & EP_LOCAL != 0)
            .map(|e| e.ifindex)
            .collect();
        let released: Vec<u32> = self
            .attached
            .keys()
            .chain(self.leftover_pins.iter())
            .filter(|i| !wanted.contains(i))
            .copied()
            .collect();
        for index in released {
            if let Err(e) = self.dp.detach(index) {
                tracing::error!(ifindex = index, error = %e, "cannot detach; retrying at the next reconciliation");
                continue;
            }
            if let Some(iface) = self.attached.remove(&index) {
                tracing::info!(workload = %iface.workload, interface = %iface.name, ifindex = index, "released");
            } else {
                tracing::info!(ifindex = index, "removed a pinned link no local pod claims");
            }
        }
        self.leftover_pins.clear();
        self.refresh_identities(&cluster, cluster_changed || policy_changed);
        if cluster_changed || endpoints_changed {
            if cluster_changed {
                // Decoding a large cluster-state document leaves the allocator holding memory
                // the agent no longer uses: give it back, so RSS reflects what is live.
                // SAFETY: glibc's malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
            }
            tracing::info!(
                endpoints = self.programmed.len(),
                endpoints_set,
                endpoints_removed,
                read_ms = u64::try_from(read_ms).unwrap_or(u64::MAX),
                took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "cluster state applied"
            );
        }
        Ok(())
    }

    /// Attaches (or removes) the sockops program that shortens the first SYN timeout of
    /// connections whose pair is still cold.
    pub fn setup_first_connection(&mut self) -> anyhow::Result<()> {
        let fc = self.config.first_connection.clone();
        if fc.syn_rto_ms == 0 {
            self.dp.detach_sock_ops()?;
            self.first_connection = "off (the kernel's 1 s SYN timeout)".to_owned();
            tracing::info!("first-connection SYN timeout program off");
            return Ok(());
        }
        let hz = match fc.kernel_hz {
            Some(hz) => hz,
            None => datapath::kernel_hz().map_err(|e| {
                anyhow::anyhow!("learning the kernel's HZ for the SYN timeout: {e}")
            })?,
        };
        let jiffies = (fc.syn_rto_ms * hz).div_ceil(1000).max(1);
        let cgroup = fc
            .cgroup
            .clone()
            .or_else(datapath::cgroup2_mount)
            .context("no cgroup v2 mount for the SYN timeout program; set first_connection.cgroup, or first_connection.syn_rto_ms: 0 to do without")?;
        self.dp.attach_sock_ops(&cgroup, jiffies).with_context(|| {
            format!("attaching the SYN timeout program to {}", cgroup.display())
        })?;
        self.first_connection = format!(
            "SYN retried after {} ms while a pair is cold ({jiffies} jiffies at HZ {hz}), on cgroup {}",
            u64::from(jiffies) * 1000 / u64::from(hz),
            cgroup.display()
        );
        tracing::info!(cgroup = %cgroup.display(), syn_rto_ms = fc.syn_rto_ms, hz, jiffies, "first-connection SYN timeout program attached");
        Ok(())
    }

    /// Adds this node's own addresses (not claimed by a pod) to `desired`, so that the kernel
    /// can tell connections from the node (kubelet probes) from unknown peers.
    /// Returns how many could not be numbered (the error in `refused`).
    fn host_endpoints(
        &mut self,
        desired: &mut HashMap<IpAddr, Endpoint>,
        refused: &mut Option<String>,
    ) -> usize {
        let addrs = match route::local_addresses() {
            Ok(a) => {
                self.host_addr_error = None;
                a
            }
            Err(e) => {
                if is_new(&mut self.host_addr_error, e.to_string()) {
                    tracing::warn!(error = %e, "cannot list this node's addresses; connections from the node are treated as from unknown peers");
                }
                // Keep what is programmed rather than cut probes over a transient failure.
                for (a, ep) in &self.programmed {
                    if ep.flags & EP_HOST != 0 {
                        desired.insert(*a, *ep);
                    }
                }
                return 0;
            }
        };
        let numbered = self
            .registry
            .intern(&mut self.dp, Kind::Identity, HOST_IDENTITY)
            .and_then(|i| {
                Ok((
                    i,
                    self.registry
                        .intern(&mut self.dp, Kind::Node, &self.config.node)?,
                ))
            });
        let (identity, node) = match numbered {
            Ok(n) => n,
            Err(e) => {
                if !matches!(e, DatapathError::Full { .. }) {
                    self.refusals.names += 1;
                }
                self.refusals.name_error = Some(e.to_string());
                refused.get_or_insert(e.to_string());
                return addrs.len();
            }
        };
        for a in addrs {
            // A pod's claim on an address (inserted later) wins over the node's.
            desired.insert(
                a,
                Endpoint {
                    identity,
                    node,
                    ifindex: 0,
                    flags: EP_HOST,
                },
            );
        }
        0
    }

    /// Whether `key` pairs a local workload with a workload of cluster state, as of the last
    /// reconciliation.
    fn in_cluster(&self, key: &AuthKey) -> bool {
        self.registry
            .id_of(Kind::Node, &self.config.node)
            .is_some_and(|n| self.enrolled.contains(&(key.local_identity, n)))
            && self
                .enrolled
                .contains(&(key.remote_identity, key.remote_node))
    }

    /// Records how many addresses of cluster state are not in the kernel, logging when that
    /// changes rather than at every reconciliation.
    fn note_refusals(&mut self, missing: usize, refused: Option<String>) {
        let before = self.refusals.endpoints_missing;
        self.refusals.endpoints_missing = missing;
        if missing == before {
            return;
        }
        if missing == 0 {
            tracing::info!("every endpoint of cluster state is programmed again");
        } else {
            tracing::warn!(
                missing,
                error = refused.as_deref().unwrap_or("-"),
                "endpoints of cluster state are not in the kernel; their addresses are treated as unknown peers (dropped where enforced) until there is room"
            );
        }
    }

    /// Makes the auth and flow maps agree with cluster state and policy: entries of pairs that
    /// no longer exist or are no longer authorized are removed and the others carry the ports
    /// policy now grants; flows that lost their footing are cut — an endpoint gone or
    /// re-labelled, an entry revoked, a port no longer admitted, connections from the node no
    /// longer admitted, or admitted unchecked (audit, off) to a pod now enforced. Each node
    /// does this for its own side, so a change that reaches both agents cuts both ends.
    fn revalidate(&mut self, why: &str) -> Result<(), DatapathError> {
        let started = Instant::now();
        if self.cluster.is_none() {
            return Ok(());
        }
        let mut valid: HashMap<AuthKey, AuthValue> = HashMap::new();
        let mut revoked = Vec::new();
        let mut regranted = 0;
        // Identities by number, parsed once: entries are pairs of far fewer identities.
        let mut parsed: HashMap<u32, Result<SpiffeId, crate::identity::SpiffeIdError>> =
            HashMap::new();
        for (k, v) in self.dp.auth_entries()? {
            let mut identity = |n: u32| {
                parsed
                    .entry(n)
                    .or_insert_with(|| SpiffeId::parse(&self.registry.name(Kind::Identity, n)))
                    .clone()
            };
            let local = identity(k.local_identity);
            let remote = identity(k.remote_identity);
            let decision = match (&local, &remote) {
                (Ok(l), Ok(r)) if self.in_cluster(&k) => Some(self.policy.decide(l, r)),
                _ => None,
            };
            match decision {
                Some(d) if d.authorized() => {
                    let want = with_grant(v, &d.inbound);
                    if want != v {
                        self.dp.allow_pair(&k, &want)?;
                        regranted += 1;
                    }
                    valid.insert(k, want);
                }
                _ => {
                    self.dp.revoke_pair(&k)?;
                    let reason = match (&local, &remote, decision) {
                        (Ok(l), Ok(r), Some(_)) => self.policy.denial(l, r),
                        _ => "the pair is no longer in cluster state".to_owned(),
                    };
                    revoked.push((k, reason));
                }
            }
        }
        let programmed = &self.programmed;
        let cut = self
            .dp
            .cut_flows(|k, v| !flow_stands(programmed, &valid, k, v))?;
        let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        for (k, reason) in &revoked {
            tracing::info!(
                target: "portcullis::audit",
                event = "revoked",
                local = %self.registry.name(Kind::Identity, k.local_identity),
                remote = %self.registry.name(Kind::Identity, k.remote_identity),
                remote_node = %self.registry.name(Kind::Node, k.remote_node),
                cause = why,
                reason = %reason,
                "auth entry revoked"
            );
        }
        if !revoked.is_empty() || cut > 0 || regranted > 0 {
            tracing::info!(target: "portcullis::audit", event = "revalidated", cause = why, entries_revoked = revoked.len(), entries_regranted = regranted, flows_cut = cut, took_us, "auth entries and flows revalidated");
        }
        Ok(())
    }

    /// Keeps local SVIDs and the trust bundle current, republishes the handshake view when
    /// anything changed, and re-authenticates pairs whose local SVID was replaced.
    fn refresh_identities(&mut self, cluster: &ClusterState, cluster_changed: bool) {
        let Some(identity) = &self.config.identity else {
            return;
        };
        if self.store.is_none() {
            let source = match &identity.source {
                IdentitySource::Ca { dir, svid_ttl_secs } => Source::Ca {
                    dir: dir.clone(),
                    ttl: std::time::Duration::from_secs(*svid_ttl_secs),
                },
                IdentitySource::Files { dir } => Source::Files { dir: dir.clone() },
            };
            match Store::new(source, identity.trust_bundle.clone(), &cluster.trust_domain) {
                Ok(store) => self.store = Some(store),
                Err(e) => {
                    if self.store_problems.first() != Some(&e) {
                        tracing::error!(error = %e, "identity source unusable; handshakes fail closed until it is fixed");
                    }
                    self.store_problems = vec![e];
                    return;
                }
            }
        }
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let wanted = cluster
            .local_workloads(&self.config.node)
            .map(|w| w.identity.clone())
            .collect();
        let changes = store.refresh(&wanted);
        if store.problems != self.store_problems {
            for p in &store.problems {
                tracing::warn!(problem = %p, "identity");
            }
            self.store_problems = store.problems.clone();
        }
        for id in &changes.rotated {
            let svid = store.svids().find(|s| &s.id == id);
            tracing::info!(identity = %id, serial = svid.map_or("", |s| s.serial.as_str()), "SVID loaded");
        }
        if !(changes.any() || cluster_changed) {
            return;
        }
        self.publish_view(cluster);
        if !changes.rotated.is_empty() {
            let rotated: HashSet<u32> = changes
                .rotated
                .iter()
                .filter_map(|id| self.registry.id_of(Kind::Identity, id.as_str()))
                .collect();
            if let Ok(entries) = self.dp.auth_entries() {
                self.renew(&entries, |key, _| rotated.contains(&key.local_identity));
            }
        }
        if changes.bundle {
            // Every entry, with or without flows: a pair whose SVIDs are no longer trusted
            // fails definitively and is revoked. Each node proves its own entries.
            let started = self.reprove(|_| true);
            tracing::info!(
                handshakes = started,
                "trust bundle changed: every auth entry is proven again"
            );
        }
    }

    /// Proves again, as initiator, every entry `select` picks, with or without flows; our own
    /// attempts then decide (a definitive failure revokes, see `revoke_failed`). Returns the
    /// number of handshakes started.
    fn reprove(&mut self, select: impl Fn(&AuthKey) -> bool) -> usize {
        let (Some(auth), Some(cluster)) = (self.auth.as_mut(), self.cluster.as_ref()) else {
            return 0;
        };
        let Ok(entries) = self.dp.auth_entries() else {
            return 0;
        };
        let id = |kind, name: &str| self.registry.id_of(kind, name);
        let mut local_addr: HashMap<u32, IpAddr> = HashMap::new();
        let mut remote_addr: HashMap<(u32, u32), IpAddr> = HashMap::new();
        for w in &cluster.workloads {
            let (Some(i), Some(n), Some(a)) = (
                id(Kind::Identity, w.identity.as_str()),
                id(Kind::Node, &w.node),
                w.addresses.first(),
            ) else {
                continue;
            };
            if *w.node == *self.config.node {
                local_addr.entry(i).or_insert(*a);
            }
            remote_addr.entry((i, n)).or_insert(*a);
        }
        let mut started = 0;
        for (k, _) in entries.iter().filter(|(k, _)| select(k)) {
            if let (Some(l), Some(r)) = (
                local_addr.get(&k.local_identity),
                remote_addr.get(&(k.remote_identity, k.remote_node)),
            ) && auth.want((*l, *r), &self.view_rx)
            {
                started += 1;
            }
        }
        started
    }

    /// A peer node rejected the SVID we presented for one of our workloads (its trust bundle
    /// changed, say): our entries of that workload with that node may rest on trust that is
    /// gone, so we prove them again ourselves.
    fn reprove_with_peer(&mut self, rec: &Record) {
        let (Some(local_id), Some(peer), Some(cluster)) =
            (&rec.local_id, rec.peer, self.cluster.as_ref())
        else {
            return;
        };
        let Some(node) = cluster.nodes.values().find(|n| n.address.ip() == peer.ip()) else {
            return;
        };
        let (Some(l), Some(n)) = (
            self.registry.id_of(Kind::Identity, local_id.as_str()),
            self.registry.id_of(Kind::Node, &node.name),
        ) else {
            return;
        };
        self.reprove(|k| k.local_identity == l && k.remote_node == n);
    }

    /// The auth key cluster state gives a pair of addresses (ours first).
    fn key_of_addrs(&self, local: IpAddr, remote: IpAddr) -> Option<AuthKey> {
        let cluster = self.cluster.as_ref()?;
        let owner = |a: IpAddr| cluster.workloads.iter().find(|w| w.addresses.contains(&a));
        let (l, r) = (owner(local)?, owner(remote)?);
        Some(AuthKey {
            local_identity: self.registry.id_of(Kind::Identity, l.identity.as_str())?,
            remote_identity: self.registry.id_of(Kind::Identity, r.identity.as_str())?,
            remote_node: self.registry.id_of(Kind::Node, &r.node)?,
            kind: 0,
        })
    }

    /// A handshake failed for a reason that another attempt would not change: the pair can
    /// no longer be authenticated, so its entry goes and its flows are cut.
    ///
    /// Only our own attempts count: a responder's addresses come from the initiator's `Hello`,
    /// and a peer must not be able to revoke pairs by naming them.
    fn revoke_failed(&mut self, rec: &Record) {
        if rec.role == Role::Responder && rec.result == Err(Reason::PeerRejectedCertificate) {
            self.reprove_with_peer(rec);
            return;
        }
        if rec.role != Role::Initiator {
            return;
        }
        let Err(reason) = rec.result else { return };
        if !definitive(reason) {
            return;
        }
        let (Some(l), Some(r)) = (rec.local_addr, rec.remote_addr) else {
            return;
        };
        let Some(key) = self.key_of_addrs(l, r) else {
            return;
        };
        let removed = match self.dp.revoke_pair(&key) {
            Ok(removed) => removed,
            Err(e) => {
                tracing::warn!(error = %e, "revoking a pair that failed its handshake");
                return;
            }
        };
        if !removed {
            return;
        }
        let cut = self.dp.cut_flows(|_, v| v.pair() == key).unwrap_or(0);
        tracing::info!(
            target: "portcullis::audit",
            event = "revoked",
            local = %self.registry.name(Kind::Identity, key.local_identity),
            remote = %self.registry.name(Kind::Identity, key.remote_identity),
            remote_node = %self.registry.name(Kind::Node, key.remote_node),
            cause = "handshake failed",
            reason = reason.as_str(),
            flows_cut = cut,
            "auth entry revoked: the pair can no longer be authenticated"
        );
    }

    fn publish_view(&mut self, cluster: &ClusterState) {
        let Some(store) = &self.store else { return };
        let Some(bundle) = store.bundle() else {
            self.view_tx.send_replace(None);
            return;
        };
        let trust = match crate::tls::Trust::new(&cluster.trust_domain, bundle) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "trust bundle unusable");
                self.view_tx.send_replace(None);
                return;
            }
        };
        let owners = cluster
            .workloads
            .iter()
            .flat_map(|w| {
                w.addresses.iter().map(move |a| {
                    (
                        *a,
                        Owner {
                            id: w.identity.clone(),
                            node: w.node.clone(),
                        },
                    )
                })
            })
            .collect();
        let nodes = cluster
            .nodes
            .values()
            .map(|n| (n.name.clone(), n.address))
            .collect();
        let svids: Vec<_> = store.svids().cloned().collect();
        match View::build(
            &self.config.node,
            trust,
            owners,
            nodes,
            &svids,
            self.policy.clone(),
        ) {
            Ok(view) => {
                self.view_tx.send_replace(Some(Arc::new(view)));
            }
            Err(e) => tracing::error!(error = %e, "cannot build the handshake configuration"),
        }
    }

    /// Starts a handshake for every pair with live flows whose auth entry `due` selects.
    fn renew(
        &mut self,
        entries: &[(AuthKey, AuthValue)],
        mut due: impl FnMut(&AuthKey, &AuthValue) -> bool,
    ) {
        let Some(auth) = self.auth.as_mut() else {
            return;
        };
        let due: HashSet<AuthKey> = entries
            .iter()
            .filter(|(k, v)| due(k, v))
            .map(|(k, _)| *k)
            .collect();
        // The flow map can be large: read it only when some entry is due.
        if due.is_empty() {
            return;
        }
        let Ok(flows) = self.dp.flows() else {
            return;
        };
        let mut started = HashSet::new();
        for (k, v) in flows {
            let pair = v.pair();
            if due.contains(&pair) && started.insert(pair) {
                let addrs = (
                    status::flow_addr(k.family, &k.local_addr),
                    status::flow_addr(k.family, &k.remote_addr),
                );
                auth.want(addrs, &self.view_rx);
            }
        }
    }

    /// Timer work: retries whose backoff has passed, removal of expired entries, renewal of
    /// entries in the last third of their lifetime while their pair still has flows, and
    /// proactive authentication.
    pub fn tick_auth(&mut self) {
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.retries = later;
        if let Some(auth) = self.auth.as_mut() {
            for (_, pair) in due {
                auth.want(pair, &self.view_rx);
            }
            auth.prune();
        }
        // One read of the auth map serves expiry, renewal and proactive authentication.
        let entries = match self.dp.auth_entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "reading the auth map failed");
                return;
            }
        };
        let now = status::boot_ns();
        let (expired, entries): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|(_, v)| v.expires_ns <= now);
        self.expire(&expired);
        self.renew(&entries, |_, v| in_last_third(v, now));
        self.proactive(&entries, now);
    }

    /// Proactive authentication: walks the pairs (local workload, workload of cluster state)
    /// and starts handshakes for those without a fresh entry, within `proactive_per_tick`
    /// handshakes and `PROACTIVE_CHECKS` pairs per tick (a cursor carries on where the last
    /// tick stopped). Of the two nodes of a pair, only the one with the lower (node, address)
    /// initiates: one handshake writes the entries of both.
    fn proactive(&mut self, entries: &[(AuthKey, AuthValue)], now: u64) {
        if !self.config.handshake.proactive || self.view_rx.borrow().is_none() {
            return;
        }
        let (Some(auth), Some(cluster)) = (self.auth.as_mut(), self.cluster.as_ref()) else {
            return;
        };
        let fresh: HashSet<AuthKey> = entries
            .iter()
            .filter(|(_, v)| v.expires_ns > now && !in_last_third(v, now))
            .map(|(k, _)| *k)
            .collect();
        let locals: Vec<&crate::cluster::Workload> =
            cluster.local_workloads(&self.config.node).collect();
        let n = cluster.workloads.len();
        let total = locals.len() * n;
        let budget = self.config.handshake.proactive_per_tick as usize;
        let (mut checked, mut started) = (0, 0);
        while checked < total.min(PROACTIVE_CHECKS) && started < budget {
            let i = self.proactive_cursor % total;
            self.proactive_cursor = self.proactive_cursor.wrapping_add(1);
            checked += 1;
            let (l, r) = (locals[i / n], &cluster.workloads[i % n]);
            if std::ptr::eq(l, r) {
                continue;
            }
            let (Some(la), Some(ra)) = (l.addresses.first(), r.addresses.first()) else {
                continue;
            };
            if (self.config.node.as_str(), *la) > (&*r.node, *ra) {
                continue;
            }
            let key = (
                self.registry.id_of(Kind::Identity, l.identity.as_str()),
                self.registry.id_of(Kind::Identity, r.identity.as_str()),
                self.registry.id_of(Kind::Node, &r.node),
            );
            if let (Some(local_identity), Some(remote_identity), Some(remote_node)) = key
                && fresh.contains(&AuthKey {
                    local_identity,
                    remote_identity,
                    remote_node,
                    kind: 0,
                })
            {
                continue;
            }
            if !self.policy.decide(&l.identity, &r.identity).authorized() {
                continue;
            }
            if auth.want((*la, *ra), &self.view_rx) {
                started += 1;
            }
        }
    }

    /// Writes the auth entry a successful handshake earned.
    pub fn write_entry(&mut self, rec: &Record) -> Result<(), String> {
        let (Some(local), Some(remote), Some(node), Ok(expires)) =
            (&rec.local_id, &rec.remote_id, &rec.remote_node, rec.result)
        else {
            return Err("the record names no pair".to_owned());
        };
        let key = match (|| {
            Ok::<_, DatapathError>(AuthKey {
                local_identity: self.registry.intern(
                    &mut self.dp,
                    Kind::Identity,
                    local.as_str(),
                )?,
                remote_identity: self.registry.intern(
                    &mut self.dp,
                    Kind::Identity,
                    remote.as_str(),
                )?,
                remote_node: self.registry.intern(&mut self.dp, Kind::Node, node)?,
                kind: 0,
            })
        })() {
            Ok(k) => k,
            Err(e) => {
                let e = self
                    .refusals
                    .auth_refused(format!("cannot number the pair: {e}"));
                tracing::error!(error = %e, "auth entry not written; the pair is not admitted");
                return Err(e);
            }
        };
        // Cluster state may have changed while the handshake ran (a pod deleted): revalidation
        // has then already run, and would not see an entry written now.
        if !self.in_cluster(&key) {
            return Err(format!(
                "the pair is no longer in cluster state ({local} here, {remote} on {node})"
            ));
        }
        // The policy may have changed since the handshake evaluated it.
        let decision = self.policy.decide(local, remote);
        if !decision.authorized() {
            return Err(self.policy.denial(local, remote));
        }
        let now = status::boot_ns();
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        let value = with_grant(
            AuthValue {
                expires_ns: now + u64::try_from(left.as_nanos()).unwrap_or(u64::MAX / 2),
                created_ns: now,
                ..AuthValue::default()
            },
            &decision.inbound,
        );
        self.dp.allow_pair(&key, &value).map_err(|e| {
            let e = self.refusals.auth_refused(e.to_string());
            // One line per refusal is bounded by the handshake rate, which is limited.
            tracing::error!(error = %e, local = %local, remote = %remote, "auth entry not written; the pair is not admitted");
            e
        })
    }

    /// A finished handshake: the initiator's entry is written here, the responder's was
    /// written before it answered. Either way, one audit record.
    pub fn on_record(&mut self, mut rec: Record) {
        if rec.role == Role::Initiator
            && rec.result.is_ok()
            && let Err(e) = self.write_entry(&rec)
        {
            rec.result = Err(Reason::Internal);
            rec.detail = Some(e);
        }
        if let Ok(m) = self.metrics.lock() {
            m.on_handshake(&rec);
        }
        self.revoke_failed(&rec);
        if let Some(suppressed) = self.audit.admit() {
            audit(&self.config.node, &rec, suppressed);
        }
        if rec.role == Role::Initiator
            && let (Some(l), Some(r), Some(auth)) =
                (rec.local_addr, rec.remote_addr, self.auth.as_mut())
            && let Some(delay) = auth.finished((l, r), rec.result.map(drop))
        {
            self.retries
                .push((tokio::time::Instant::now() + delay, (l, r)));
        }
        if self.handshakes.len() == RECENT_HANDSHAKES {
            self.handshakes.pop_front();
        }
        self.handshakes.push_back(HandshakeInfo::from_record(&rec));
    }

    pub fn on_event(&mut self, ev: &Event) {
        self.events_total += 1;
        let record = EventRecord::new(ev, |kind, n| self.registry.name(kind, n));
        // A flood of connection attempts must not become a flood of log lines.
        if let Some(suppressed_before) = self.event_log.admit() {
            tracing::info!(
                kind = %record.kind, reason = %record.reason, local = %record.local, remote = %record.remote,
                remote_node = %record.remote_node, proto = %record.proto,
                from = %record.remote_addr, to = %record.local_addr, suppressed_before,
                "datapath event"
            );
        }
        if ev.kind == EVENT_WOULD_DROP {
            self.would_drop(&record);
        }
        if self.events.len() == RECENT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(record);
        if ev.remote_identity != portcullis_common::IDENTITY_NONE
            && let Some(auth) = self.auth.as_mut()
        {
            let pair = (
                status::flow_addr(ev.flow.family, &ev.flow.local_addr),
                status::flow_addr(ev.flow.family, &ev.flow.remote_addr),
            );
            auth.want(pair, &self.view_rx);
        }
    }

    /// Mode `audit` admitted a connection that `enforce` would drop: one audit record, naming
    /// the policy when it is the policy that forbids the pair.
    fn would_drop(&mut self, rec: &EventRecord) {
        if let Ok(m) = self.metrics.lock() {
            m.on_would_drop(&rec.reason);
        }
        let Some(suppressed_before) = self.audit.admit() else {
            return;
        };
        let detail = match (SpiffeId::parse(&rec.local), SpiffeId::parse(&rec.remote)) {
            (Ok(l), Ok(r)) if !self.policy.decide(&l, &r).authorized() => {
                self.policy.denial(&l, &r)
            }
            (Ok(l), Ok(r)) if rec.reason == Counter::DropPolicy.name() => format!(
                "policy `{}` admits {} from {r}, not {} {}",
                self.policy.name,
                self.policy.grant(&r, &l),
                rec.proto,
                rec.local_addr
            ),
            _ => format!("reason {}", rec.reason),
        };
        tracing::info!(
            target: "portcullis::audit",
            event = "would_drop",
            reason = %rec.reason,
            local = %rec.local,
            remote = %rec.remote,
            remote_node = %rec.remote_node,
            proto = %rec.proto,
            from = %rec.remote_addr,
            to = %rec.local_addr,
            detail = %detail,
            suppressed_before,
            "mode audit admitted a connection that enforce would drop"
        );
    }

    pub fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Status => self.status().map(|s| Response::Status(Box::new(s))),
            Request::AuthAllow {
                local,
                remote,
                remote_node,
                ttl_secs,
            } => self.allow(&local, &remote, &remote_node, ttl_secs),
            Request::AuthRevoke {
                local,
                remote,
                remote_node,
            } => self.revoke(&local, &remote, &remote_node),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: format!("{e:#}"),
        })
    }

    fn pair(&mut self, local: &str, remote: &str, remote_node: &str) -> anyhow::Result<AuthKey> {
        let local = SpiffeId::parse(local).with_context(|| format!("local identity `{local}`"))?;
        let remote =
            SpiffeId::parse(remote).with_context(|| format!("remote identity `{remote}`"))?;
        if remote_node.is_empty() {
            anyhow::bail!("remote node must not be empty");
        }
        Ok(AuthKey {
            local_identity: self
                .registry
                .intern(&mut self.dp, Kind::Identity, local.as_str())?,
            remote_identity: self
                .registry
                .intern(&mut self.dp, Kind::Identity, remote.as_str())?,
            remote_node: self
                .registry
                .intern(&mut self.dp, Kind::Node, remote_node)?,
            kind: 0,
        })
    }

    fn allow(
        &mut self,
        local: &str,
        remote: &str,
        remote_node: &str,
        ttl_secs: u64,
    ) -> anyhow::Result<Response> {
        if ttl_secs == 0 {
            anyhow::bail!("ttl must be at least one second");
        }
        let key = self.pair(local, remote, remote_node)?;
        let now = status::boot_ns();
        let value = AuthValue {
            expires_ns: now.saturating_add(ttl_secs.saturating_mul(1_000_000_000)),
            created_ns: now,
            flags: AUTH_ALL_PORTS,
            ..AuthValue::default()
        };
        if let Err(e) = self.dp.allow_pair(&key, &value) {
            self.refusals.auth_refused(e.to_string());
            return Err(e.into());
        }
        tracing::info!(target: "portcullis::audit", event = "auth_allow", %local, %remote, %remote_node, ttl_secs, "auth entry written by hand");
        Ok(Response::Allowed {
            expires_in_secs: ttl_secs,
        })
    }

    fn revoke(&mut self, local: &str, remote: &str, remote_node: &str) -> anyhow::Result<Response> {
        let key = self.pair(local, remote, remote_node)?;
        let entry_removed = self.dp.revoke_pair(&key)?;
        let flows_cut = self.dp.cut_flows(|_, v| v.pair() == key)?;
        tracing::info!(target: "portcullis::audit", event = "auth_revoke", %local, %remote, %remote_node, entry_removed, flows_cut, "auth entry revoked by hand");
        Ok(Response::Revoked {
            entry_removed,
            flows_cut,
        })
    }

    /// Removes auth entries that have expired: the kernel already ignores them.
    fn expire(&mut self, expired: &[(AuthKey, AuthValue)]) {
        let mut removed = 0;
        for (k, _) in expired {
            match self.dp.revoke_pair(k) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "removing an expired auth entry failed"),
            }
        }
        if removed > 0 {
            tracing::info!(removed, "expired auth entries removed");
        }
    }

    /// Why the agent is not ready, if it is not: local workloads without programs (no
    /// interface yet), identities without SVIDs, no trust bundle.
    fn not_ready(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .pending
            .iter()
            .map(|w| format!("no interface yet for {w}"))
            .collect();
        if self.cluster.is_none() {
            out.push("no cluster state".to_owned());
        }
        if self.config.identity.is_some() {
            match &self.store {
                None => out.push("identity source unusable".to_owned()),
                Some(store) => {
                    if store.bundle().is_none() {
                        out.push("no trust bundle".to_owned());
                    }
                    if let Some(cluster) = &self.cluster {
                        for w in cluster.local_workloads(&self.config.node) {
                            if !store.svids().any(|s| s.id == w.identity) {
                                out.push(format!("no SVID for {}", w.identity));
                            }
                        }
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        let now = status::boot_ns();
        let not_ready = self.not_ready();
        let auth = self.dp.auth_entries()?;
        let flows = self.dp.flows()?;
        let counters = self.dp.counters()?;
        Ok(Status {
            agent: AgentInfo {
                running: true,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                node: Some(self.config.node.clone()),
                pid: Some(std::process::id()),
                uptime_secs: Some(self.started.elapsed().as_secs()),
                config: Some(self.config.source.display().to_string()),
                cluster_state: Some(self.source.describe()),
                cluster_error: self.cluster_error.clone(),
                bpffs_dir: self.config.bpffs_dir.display().to_string(),
                mode: self.policy.defaults.mode.as_str().to_owned(),
                policy: Some(match &self.config.policy {
                    Some(p) => format!("{} ({})", self.policy.name, p.display()),
                    None => "default (no policy file: any authenticated peer)".to_owned(),
                }),
                policy_error: self.policy_error.clone(),
                first_connection: Some(self.first_connection.clone()),
                identity_source: match self.config.identity.as_ref().map(|i| &i.source) {
                    Some(IdentitySource::Ca { .. }) => "ca",
                    Some(IdentitySource::Files { .. }) => "files",
                    None => "none",
                }
                .to_owned(),
                ready: not_ready.is_empty(),
                not_ready,
            },
            interfaces: self
                .attached
                .iter()
                .map(|(index, i)| InterfaceInfo {
                    workload: i.workload.clone(),
                    identity: i.identity.clone(),
                    interface: i.name.clone(),
                    ifindex: *index,
                    addresses: i.addresses.clone(),
                    attached: match i.attached {
                        Attached::Adopted => "adopted",
                        Attached::New => "new",
                    }
                    .to_owned(),
                    mode: i.mode.as_str().to_owned(),
                })
                .collect(),
            pending: self.pending.clone(),
            counters: status::counters(counters.clone()),
            maps: self.map_fill(auth.len(), flows.len(), &counters),
            auth_total: auth.len() as u64,
            flows_total: flows.len() as u64,
            auth: status::auth_entries(&self.registry, auth, now),
            flows: status::flows(&self.registry, flows, now),
            events: self.events.iter().cloned().collect(),
            events_total: self.events_total,
            events_dropped: self.events_dropped.load(Ordering::Relaxed),
            handshakes_deferred: self.auth.as_ref().map_or(0, AuthManager::deferred),
            identities: self.identities(),
            identity_problems: self.store_problems.clone(),
            handshakes: self.handshakes.iter().cloned().collect(),
        })
    }

    fn map_fill(&self, auth: usize, flows: usize, counters: &[(Counter, u64)]) -> Vec<MapFill> {
        let r = &self.refusals;
        let fill = |name: &str, entries: usize, capacity: u32, refused: u64| MapFill {
            name: name.to_owned(),
            entries: entries as u64,
            capacity: u64::from(capacity),
            refused,
            missing: 0,
            error: None,
        };
        let flows_refused = counters
            .iter()
            .find(|(c, _)| *c == Counter::DropFlowTableFull)
            .map_or(0, |(_, n)| *n);
        vec![
            MapFill {
                missing: r.endpoints_missing as u64,
                error: (r.endpoints_missing > 0 || r.endpoints > 0)
                    .then(|| r.endpoint_error.clone().or_else(|| r.name_error.clone()))
                    .flatten(),
                ..fill(
                    "endpoints",
                    self.programmed.len(),
                    capacity::ENDPOINTS * 2,
                    r.endpoints,
                )
            },
            MapFill {
                error: r.auth_error.clone(),
                ..fill("auth", auth, capacity::AUTH, r.auth)
            },
            fill("flows", flows, capacity::FLOWS, flows_refused),
            MapFill {
                missing: r.names_missing as u64,
                error: r.name_error.clone(),
                ..fill("names", self.registry.len(), capacity::NAMES, r.names)
            },
        ]
    }

    fn identities(&self) -> Vec<IdentityInfo> {
        let Some(store) = &self.store else {
            return Vec::new();
        };
        let now = tokio::time::Instant::now();
        let mut out: Vec<IdentityInfo> = store
            .svids()
            .map(|s| IdentityInfo {
                id: s.id.to_string(),
                serial: s.serial.clone(),
                not_after_unix: s
                    .not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
                renew_in_secs: store
                    .renew_at(&s.id)
                    .map(|t| t.saturating_duration_since(now).as_secs()),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

/// Whether a handshake failure says the pair cannot be authenticated (as opposed to a failure
/// that a retry may overcome: time-outs, unreachable peers, our own missing SVID).
fn definitive(reason: Reason) -> bool {
    !matches!(
        reason,
        Reason::Timeout
            | Reason::Unreachable
            | Reason::Tls
            | Reason::Protocol
            | Reason::Version
            | Reason::Internal
            | Reason::NoLocalSvid
            | Reason::UnknownPeer
            | Reason::Busy
            | Reason::RateLimited
    )
}

/// Whether an established flow still has the footing it was admitted on (see
/// [`Agent::revalidate`]).
fn flow_stands(
    programmed: &HashMap<IpAddr, Endpoint>,
    valid: &HashMap<AuthKey, AuthValue>,
    k: &FlowKey,
    v: &FlowValue,
) -> bool {
    let local_addr = status::flow_addr(k.family, &k.local_addr);
    let Some(local) = programmed.get(&local_addr) else {
        return false;
    };
    // A pod replaced by one with the same address is a new pod: its predecessor's flows end.
    if local.flags & EP_LOCAL == 0
        || local.identity != v.local_identity
        || local.ifindex != v.ifindex
    {
        return false;
    }
    if v.remote_identity != IDENTITY_NONE {
        let remote_addr = status::flow_addr(k.family, &k.remote_addr);
        match programmed.get(&remote_addr) {
            Some(r) if r.identity == v.remote_identity && r.node == v.remote_node => {}
            _ => return false,
        }
    }
    // Only the destination enforces: outbound flows, and pods not in mode `enforce`, keep.
    if local.flags & EP_ENFORCE == 0 || v.flags & FLOW_INBOUND == 0 {
        return true;
    }
    if v.flags & FLOW_HOST != 0 {
        return local.flags & EP_ADMIT_HOST != 0;
    }
    valid
        .get(&v.pair())
        .is_some_and(|a| a.admits(k.proto, k.local_port))
}

/// One structured audit record per handshake, on the `portcullis::audit` target.
fn audit(node: &str, rec: &Record, suppressed_before: u64) {
    let name = |id: &Option<SpiffeId>| {
        id.as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    };
    let (result, reason) = match rec.result {
        Ok(_) => ("ok", "-"),
        Err(r) => ("failed", r.as_str()),
    };
    tracing::info!(
        target: "portcullis::audit",
        event = "handshake",
        role = rec.role.as_str(),
        result,
        reason,
        local = %name(&rec.local_id),
        remote = %name(&rec.remote_id),
        local_node = node,
        remote_node = rec.remote_node.as_deref().unwrap_or("-"),
        peer = %rec.peer.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        took_ms = u64::try_from(rec.took.as_millis()).unwrap_or(u64::MAX),
        detail = rec.detail.as_deref().unwrap_or("-"),
        suppressed_before,
        "handshake {result}{}",
        if rec.result.is_err() { format!(": {reason}") } else { String::new() }
    );
}

/// Runs the agent until SIGTERM or SIGINT. Enforcement stays in place after it returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = ?config, "starting");
    admin::ensure_free(&config.admin_socket)?;
    let (record_tx, mut record_rx) = mpsc::channel::<Record>(1024);
    let (write_tx, mut write_rx) = mpsc::channel::<WriteRequest>(256);
    let (source, source_changed) = match (&config.cluster_state, &config.kubernetes) {
        (_, Some(k)) => {
            let mut kube = KubeSource::start(k.clone()).await?;
            tracing::info!(
                source = kube.description(),
                "waiting for the first complete lists of pods and nodes"
            );
            kube.wait_ready(Duration::from_secs(120)).await?;
            let notify = kube.notify();
            (ClusterSource::Kube(kube), Some(notify))
        }
        (Some(path), None) => (ClusterSource::File(FileSource::new(path.clone())), None),
        (None, None) => anyhow::bail!("no source of cluster state configured"),
    };
    let source_changed = source_changed.unwrap_or_else(|| Arc::new(tokio::sync::Notify::new()));
    let (mut agent, channels) = Agent::new(config.clone(), record_tx.clone(), source)?;
    agent.setup_first_connection()?;
    agent.reconcile().context("first reconciliation")?;
    if agent.cluster.is_none() {
        anyhow::bail!(
            "no valid cluster state to start from: {}",
            agent.cluster_error.as_deref().unwrap_or("unknown error")
        );
    }

    if config.identity.is_some() {
        let cluster = agent.cluster.as_ref().context("cluster state")?;
        let node = cluster.nodes.get(&config.node).with_context(|| {
            format!(
                "node `{}` is not in cluster state, so it has no handshake address",
                config.node
            )
        })?;
        let mut addr = node.address;
        if let Some(port) = config.handshake.port {
            addr.set_port(port);
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for handshakes on {addr}"))?;
        tracing::info!(%addr, "accepting handshakes");
        tokio::spawn(handshake::serve(
            listener,
            agent.view_rx.clone(),
            write_tx,
            record_tx,
            config.handshake.limits(),
        ));
    } else {
        tracing::warn!(
            "no identity configured: the agent enforces but does not authenticate (auth entries come only from `portcullis auth allow`)"
        );
        drop(write_tx);
    }
    let listener = admin::bind(&config.admin_socket)?;
    let (event_tx, mut event_rx) = mpsc::channel::<Event>(4096);
    tokio::spawn(read_events(
        channels.events,
        event_tx,
        agent.events_dropped.clone(),
    ));
    if let Some(logger) = channels.logger {
        tokio::spawn(forward_datapath_log(logger));
    }
    let (call_tx, mut call_rx) = mpsc::channel::<Call>(64);
    if let Some(addr) = config.metrics_addr {
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::metrics::serve(
            metrics_listener,
            agent.metrics.clone(),
            call_tx.clone(),
        ));
    }
    tokio::spawn(admin::serve(listener, call_tx));
    // Everything that needed more is done: programs loaded and attached, bpffs mounted,
    // sockets bound.
    match crate::caps::drop_all(crate::caps::WORKERS).await {
        Ok(()) => tracing::info!(kept = "CAP_BPF, CAP_NET_ADMIN", "capabilities dropped"),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot drop capabilities; the agent keeps those it was started with"
        ),
    }

    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tracing::info!(admin_socket = %config.admin_socket.display(), "ready");
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = agent.reconcile() {
                    tracing::error!(error = %e, "reconciliation failed; retrying at the next tick");
                }
                agent.tick_auth();
            }
            // Kubernetes changes apply at once, not at the next tick.
            () = source_changed.notified() => {
                if let Err(e) = agent.reconcile() {
                    tracing::error!(error = %e, "reconciliation failed; retrying at the next tick");
                }
            }
            Some(ev) = event_rx.recv() => agent.on_event(&ev),
            Some(rec) = record_rx.recv() => agent.on_record(rec),
            Some((rec, reply)) = write_rx.recv() => {
                let written = agent.write_entry(&rec);
                let _ = reply.send(written);
            }
            Some((req, reply)) = call_rx.recv() => {
                // The requester may have gone away; nothing to do about it.
                let _unanswered = reply.send(agent.handle(req));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping; programs stay attached and enforcing");
    if let Err(e) = std::fs::remove_file(&config.admin_socket) {
        tracing::warn!(error = %e, path = %config.admin_socket.display(), "could not remove the admin socket");
    }
    Ok(())
}

async fn read_events(ring: RingBuf<MapData>, tx: mpsc::Sender<Event>, dropped: Arc<AtomicU64>) {
    // SAFETY: the ring buffer owns its descriptor and `fd` owns the ring buffer, so the
    // descriptor stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the event ring buffer; no datapath events will be seen");
            return;
        }
    };
    // Dropped events are counted (status, metrics) and logged at most once a second.
    let mut warned = Instant::now() - Duration::from_secs(1);
    let mut unwarned = 0u64;
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "event ring buffer poll failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(ev) = status::decode_event(&item) else {
                tracing::warn!(len = item.len(), "short datapath event ignored");
                continue;
            };
            if tx.try_send(ev).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
                unwarned += 1;
                if warned.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(
                        dropped = unwarned,
                        "agent busy: datapath events dropped since the last warning"
                    );
                    (warned, unwarned) = (Instant::now(), 0);
                }
            }
        }
        guard.clear_ready();
    }
}

async fn forward_datapath_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: as for the event ring buffer: the logger owns its descriptor.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll the datapath log");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
