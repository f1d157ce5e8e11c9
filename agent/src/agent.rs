//! The running agent: one task owns the datapath and all state, and handles, in turn, cluster
//! state changes (reconciliation), datapath events and admin requests. Nothing else writes the
//! maps, so there are no locks and no interleavings to reason about.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::IpAddr,
    time::Instant,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use portcullis_common::{
    AuthKey, AuthValue, Counter, EP_LOCAL, EVENT_AUTH_WANTED, Endpoint, Event,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::SignalKind,
    sync::mpsc,
};

use crate::{
    admin::{self, Call, Request, Response},
    cluster::{ClusterState, FileSource},
    config::Config,
    datapath::{self, Attached, Datapath, DatapathError, route},
    identity::SpiffeId,
    registry::{Kind, Registry},
    status::{self, AgentInfo, EventRecord, InterfaceInfo, Status},
};

/// Events kept for `status`.
const RECENT_EVENTS: usize = 256;

struct Iface {
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
    source: FileSource,
    cluster: Option<ClusterState>,
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
}

impl Agent {
    pub fn new(config: Config) -> anyhow::Result<(Self, datapath::Channels)> {
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
        let source = FileSource::new(config.cluster_state.clone());
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
            },
            channels,
        ))
    }

    /// Re-reads cluster state if it changed and makes the datapath match it.
    pub fn reconcile(&mut self) -> Result<(), DatapathError> {
        if let Some(result) = self.source.poll() {
            match result {
                Ok(state) => {
                    tracing::info!(
                        file = %self.source.path().display(),
                        nodes = state.nodes.len(),
                        workloads = state.workloads.len(),
                        local = state.local_workloads(&self.config.node).count(),
                        "cluster state loaded"
                    );
                    if !state.nodes.contains_key(&self.config.node) {
                        tracing::warn!(node = %self.config.node, "this node is not in cluster state; no local pod will be enforced");
                    }
                    self.cluster = Some(state);
                    self.cluster_error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cluster state rejected; the last good state stays in force");
                    self.cluster_error = Some(e.to_string());
                }
            }
        }
        let Some(cluster) = self.cluster.clone() else {
            return Ok(());
        };
        let mut desired: HashMap<IpAddr, Endpoint> = HashMap::new();
        let mut ifaces: BTreeMap<u32, Iface> = BTreeMap::new();
        let mut pending = Vec::new();
        for w in &cluster.workloads {
            let identity =
                self.registry
                    .intern(&mut self.dp, Kind::Identity, w.identity.as_str())?;
            let node = self.registry.intern(&mut self.dp, Kind::Node, &w.node)?;
            let local = w.node == self.config.node;
            let label = format!("{}/{}", w.namespace, w.name);
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
                            ep.flags = EP_LOCAL;
                            self.pending_reasons.remove(&label);
                            let entry = ifaces.entry(iface.index).or_insert_with(|| Iface {
                                name: iface.name.clone(),
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
        self.pending = pending;

        // Endpoints before links: a program must find its pod's endpoint from the first packet.
        for (addr, ep) in &desired {
            if self.programmed.get(addr) != Some(ep) {
                self.dp.set_endpoint(*addr, ep)?;
                self.programmed.insert(*addr, *ep);
            }
        }
        let gone: Vec<IpAddr> = self
            .programmed
            .keys()
            .filter(|a| !desired.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            self.dp.remove_endpoint(addr)?;
            self.programmed.remove(&addr);
            let cut = self.dp.cut_flows(|k, _| {
                status::flow_addr(k.family, &k.local_addr) == addr
                    || status::flow_addr(k.family, &k.remote_addr) == addr
            })?;
            tracing::info!(%addr, flows_cut = cut, "endpoint removed from cluster state");
        }

        for (index, mut iface) in ifaces {
            if let Some(existing) = self.attached.get_mut(&index) {
                existing.workload = iface.workload;
                existing.identity = iface.identity;
                existing.addresses = iface.addresses;
                continue;
            }
            let how = self.dp.attach(&route::Interface {
                index,
                name: iface.name.clone(),
            })?;
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
            self.dp.detach(index)?;
            if let Some(iface) = self.attached.remove(&index) {
                tracing::info!(workload = %iface.workload, interface = %iface.name, ifindex = index, "released");
            } else {
                tracing::info!(ifindex = index, "removed a pinned link no local pod claims");
            }
        }
        self.leftover_pins.clear();
        Ok(())
    }

    pub fn on_event(&mut self, ev: &Event) {
        self.events_total += 1;
        let reason = Counter::from_u32(ev.reason).map_or("unknown", Counter::name);
        let record = EventRecord {
            kind: if ev.kind == EVENT_AUTH_WANTED {
                "auth_wanted"
            } else {
                "denied"
            }
            .to_owned(),
            reason: reason.to_owned(),
            local: self.registry.name(Kind::Identity, ev.local_identity),
            remote: self.registry.name(Kind::Identity, ev.remote_identity),
            remote_node: self.registry.name(Kind::Node, ev.remote_node),
            proto: status::proto_name(ev.flow.proto),
            local_addr: status::sock(
                status::flow_addr(ev.flow.family, &ev.flow.local_addr),
                ev.flow.local_port,
            ),
            remote_addr: status::sock(
                status::flow_addr(ev.flow.family, &ev.flow.remote_addr),
                ev.flow.remote_port,
            ),
            #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
            boot_time_secs: ev.time_ns as f64 / 1e9,
        };
        tracing::info!(
            kind = %record.kind, %reason, local = %record.local, remote = %record.remote,
            remote_node = %record.remote_node, proto = %record.proto,
            from = %record.remote_addr, to = %record.local_addr,
            "datapath event"
        );
        if self.events.len() == RECENT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(record);
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
        };
        self.dp.allow_pair(&key, &value)?;
        tracing::info!(%local, %remote, %remote_node, ttl_secs, "auth entry written by hand");
        Ok(Response::Allowed {
            expires_in_secs: ttl_secs,
        })
    }

    fn revoke(&mut self, local: &str, remote: &str, remote_node: &str) -> anyhow::Result<Response> {
        let key = self.pair(local, remote, remote_node)?;
        let entry_removed = self.dp.revoke_pair(&key)?;
        let flows_cut = self.dp.cut_flows(|_, v| v.pair() == key)?;
        tracing::info!(%local, %remote, %remote_node, entry_removed, flows_cut, "auth entry revoked by hand");
        Ok(Response::Revoked {
            entry_removed,
            flows_cut,
        })
    }

    /// Removes auth entries that have expired: the kernel already ignores them.
    pub fn expire(&mut self) -> Result<usize, DatapathError> {
        let now = status::boot_ns();
        let mut n = 0;
        for (k, v) in self.dp.auth_entries()? {
            if v.expires_ns <= now && self.dp.revoke_pair(&k)? {
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        let now = status::boot_ns();
        Ok(Status {
            agent: AgentInfo {
                running: true,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                node: Some(self.config.node.clone()),
                pid: Some(std::process::id()),
                uptime_secs: Some(self.started.elapsed().as_secs()),
                config: Some(self.config.source.display().to_string()),
                cluster_state: Some(self.config.cluster_state.display().to_string()),
                cluster_error: self.cluster_error.clone(),
                bpffs_dir: self.config.bpffs_dir.display().to_string(),
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
                })
                .collect(),
            pending: self.pending.clone(),
            counters: status::counters(self.dp.counters()?),
            auth: status::auth_entries(&self.registry, self.dp.auth_entries()?, now),
            flows: status::flows(&self.registry, self.dp.flows()?, now),
            events: self.events.iter().cloned().collect(),
            events_total: self.events_total,
        })
    }
}

/// Runs the agent until SIGTERM or SIGINT. Enforcement stays in place after it returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = ?config, "starting");
    admin::ensure_free(&config.admin_socket)?;
    let (mut agent, channels) = Agent::new(config.clone())?;
    agent.reconcile().context("first reconciliation")?;
    if agent.cluster.is_none() {
        anyhow::bail!(
            "no valid cluster state to start from: {}",
            agent.cluster_error.as_deref().unwrap_or("unknown error")
        );
    }

    let listener = admin::bind(&config.admin_socket)?;
    let (event_tx, mut event_rx) = mpsc::channel::<Event>(4096);
    tokio::spawn(read_events(channels.events, event_tx));
    if let Some(logger) = channels.logger {
        tokio::spawn(forward_datapath_log(logger));
    }
    let (call_tx, mut call_rx) = mpsc::channel::<Call>(64);
    tokio::spawn(admin::serve(listener, call_tx));

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
                match agent.expire() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "expired auth entries removed"),
                    Err(e) => tracing::warn!(error = %e, "removing expired auth entries failed"),
                }
            }
            Some(ev) = event_rx.recv() => agent.on_event(&ev),
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

async fn read_events(ring: RingBuf<MapData>, tx: mpsc::Sender<Event>) {
    // SAFETY: the ring buffer owns its descriptor and `fd` owns the ring buffer, so the
    // descriptor stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the event ring buffer; no datapath events will be seen");
            return;
        }
    };
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
            if item.len() < std::mem::size_of::<Event>() {
                tracing::warn!(len = item.len(), "short datapath event ignored");
                continue;
            }
            // SAFETY: the buffer holds at least size_of::<Event>() bytes written by the kernel
            // program as an `Event`; read_unaligned makes no alignment assumption.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
            if tx.try_send(ev).is_err() {
                tracing::warn!("agent busy: datapath event dropped");
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
