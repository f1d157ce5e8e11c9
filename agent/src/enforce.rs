//! Enforcement state: which addresses the endpoint maps hold (every workload of cluster state,
//! and this node's own addresses), and which local pods' interfaces carry the programs.
//!
//! [`desired`] is the pure part: what the map should hold for one address, given the index,
//! the policy and the local pods' interfaces. [`Enforcer::sync`] applies it to the addresses a
//! change touched, and only to those; [`Enforcer::tick`] looks at what can change without
//! cluster state saying so (the node's own addresses, local pods' interfaces, pins removed from
//! outside), in time proportional to the node, not the cluster.
//!
//! A full map never stops the agent (fail closed): the node's and local pods' endpoints go in
//! first, making room by leaving out a remote peer if they must; a remote peer left out is an
//! unknown peer, dropped where enforced; what is left out is retried when room appears.

mod locals;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
};

use portcullis_common::{
    EP_ADMIT_HOST, EP_AUDIT, EP_ENFORCE, EP_HOST, EP_LOCAL, EP_MAC_AUDIT, EP_MAC_REQUIRE,
    EP_OTHER_PASS, EP_UDP_NODE_LOCAL, Endpoint,
};

pub use self::locals::{Iface, LocalState};
use crate::{
    config::PodInterfaces,
    datapath::{Attached, DatapathError, EndpointMap, Links, NameMap, route::Routes},
    inputs::{Changes, Index},
    policy::{self, MacMode, Mode, Policy},
    registry::{Kind, Registry},
};

/// The identity name of this node's own addresses (connections from the node: kubelet probes).
pub const HOST_IDENTITY: &str = "host";

/// The endpoint flags that carry a local pod's policy settings.
#[must_use]
pub fn policy_flags(s: policy::Settings) -> u32 {
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
    flags |= match s.syn_mac {
        MacMode::Require => EP_MAC_REQUIRE,
        MacMode::Audit => EP_MAC_AUDIT,
        MacMode::Off => 0,
    };
    if !s.cross_node_udp {
        flags |= EP_UDP_NODE_LOCAL;
    }
    flags
}

/// Why an address cluster state wants is not in the map.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Missing {
    /// The map is full.
    Full,
    /// Its workload (`label`) could not be numbered (`error`): the name map is full or refused.
    Unnumbered { label: String, error: String },
    /// The kernel refused the write for another reason; retried at each tick.
    Refused,
}

/// What the kernel refused, for `status` and the metrics.
#[derive(Debug, Default, Clone)]
pub struct Refusals {
    /// Endpoint writes refused, since start.
    pub endpoints: u64,
    /// Identity and node numbers the kernel refused to store, since start.
    pub names: u64,
    pub endpoint_error: Option<String>,
    pub name_error: Option<String>,
}

/// Why a workload's (or the node's) names could not be numbered.
#[derive(Debug)]
pub struct Unnumbered {
    /// The workload, or the node's address.
    pub label: String,
    pub error: String,
    /// The name map is full (rather than refusing for another reason).
    pub full: bool,
}

/// What the endpoint map should hold for `addr`. `numbers` gives the (identity, node) numbers
/// of a name pair, or why they cannot be had.
///
/// A workload's claim wins over the node's own address; a local workload is local (with its
/// interface and policy settings) only once its interface is known, and until then is known to
/// the kernel like any peer.
pub fn desired(
    addr: IpAddr,
    index: &Index,
    locals: &LocalState,
    policy: &Policy,
    host: bool,
    mut numbers: impl FnMut(&str, &str) -> Result<(u32, u32), DatapathError>,
) -> Result<Option<Endpoint>, Unnumbered> {
    let failed = |e: DatapathError, label: String| Unnumbered {
        label,
        full: e.is_full(),
        error: e.to_string(),
    };
    if let Some(w) = index.owner(&addr) {
        let (identity, node) =
            numbers(w.identity.as_str(), &w.node).map_err(|e| failed(e, w.label()))?;
        let mut ep = Endpoint {
            identity,
            node,
            ifindex: 0,
            flags: 0,
        };
        if *w.node == *index.here()
            && let Some(iface) = locals.interface(&w.namespace, &w.name)
        {
            ep.ifindex = iface.index;
            ep.flags = EP_LOCAL | policy_flags(policy.settings(&w.namespace, &w.identity));
        }
        return Ok(Some(ep));
    }
    if host {
        let (identity, node) = numbers(HOST_IDENTITY, index.here())
            .map_err(|e| failed(e, format!("this node's own address {addr}")))?;
        return Ok(Some(Endpoint {
            identity,
            node,
            ifindex: 0,
            flags: EP_HOST,
        }));
    }
    Ok(None)
}

/// What a sync changed, for revalidation.
#[derive(Debug, Default)]
pub struct Synced {
    /// Addresses whose endpoint changed or went: flows of theirs may have lost their footing.
    /// (A new endpoint cannot take a flow's footing away: a flow to an address that had none
    /// was recorded as to an unknown peer, and stands whatever the address becomes.)
    pub changed: HashSet<IpAddr>,
    pub set: usize,
    pub removed: usize,
}

#[derive(Debug, Default)]
pub struct Enforcer<R = crate::datapath::route::Netlink> {
    /// The host's routing, asked for local pods' interfaces and the node's addresses.
    routes: R,
    /// What the endpoint maps hold, mirrored.
    programmed: HashMap<IpAddr, Endpoint>,
    /// The node's own addresses, as last listed.
    host: HashSet<IpAddr>,
    /// Whether they were listed at all (before, an adopted endpoint of the node must not be
    /// taken for one that went).
    host_listed: bool,
    host_error: Option<String>,
    /// Interfaces of the local endpoints the map holds, with how many addresses each: the
    /// interfaces that want programs.
    local_ifaces: HashMap<u32, usize>,
    locals: LocalState,
    missing: BTreeMap<IpAddr, Missing>,
    refusals: Refusals,
    /// Pinned links found at start that no local pod claimed yet.
    leftover_pins: Vec<u32>,
}

impl<R: Routes> Enforcer<R> {
    /// Starts from what the kernel already holds (a restart adopts it).
    #[must_use]
    pub fn new(routes: R, programmed: HashMap<IpAddr, Endpoint>, leftover_pins: Vec<u32>) -> Self {
        let mut local_ifaces = HashMap::new();
        for ep in programmed.values().filter(|e| e.flags & EP_LOCAL != 0) {
            *local_ifaces.entry(ep.ifindex).or_insert(0) += 1;
        }
        Self {
            routes,
            programmed,
            host: HashSet::new(),
            host_listed: false,
            host_error: None,
            local_ifaces,
            locals: LocalState::default(),
            missing: BTreeMap::new(),
            refusals: Refusals::default(),
            leftover_pins,
        }
    }

    /// Where local pods' interfaces come from (see [`LocalState::new`]).
    #[must_use]
    pub fn with_pod_interfaces(mut self, mode: PodInterfaces, cni_state_dir: PathBuf) -> Self {
        self.locals = LocalState::new(mode, cni_state_dir);
        self
    }

    /// `portcullis-cni` recorded a claim or removed one: read them now, and bring endpoints
    /// and links in line.
    pub fn claims_changed<M: EndpointMap + NameMap + Links>(
        &mut self,
        maps: &mut M,
        names: &mut Registry,
        index: &Index,
        policy: &Policy,
    ) -> Synced {
        self.locals.reload_claims();
        self.tick(maps, names, index, policy)
    }

    #[must_use]
    pub fn routes(&self) -> &R {
        &self.routes
    }

    #[must_use]
    pub fn endpoint(&self, addr: &IpAddr) -> Option<&Endpoint> {
        self.programmed.get(addr)
    }

    #[must_use]
    pub fn programmed(&self) -> &HashMap<IpAddr, Endpoint> {
        &self.programmed
    }

    #[must_use]
    pub fn locals(&self) -> &LocalState {
        &self.locals
    }

    #[must_use]
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// Addresses cluster state wants that the map does not hold.
    #[must_use]
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    /// Workloads (and the node itself) left unnumbered.
    #[must_use]
    pub fn unnumbered(&self) -> usize {
        self.missing
            .values()
            .filter_map(|m| match m {
                Missing::Unnumbered { label, .. } => Some(label),
                _ => None,
            })
            .collect::<HashSet<_>>()
            .len()
    }

    /// Local workloads not (fully) enforced, and why: no interface yet, attaching failed, or
    /// their names could not be numbered (the name map is full).
    #[must_use]
    pub fn pending(&self, index: &Index) -> Vec<(String, String)> {
        let mut out = self.locals.pending();
        for (addr, m) in &self.missing {
            if let Missing::Unnumbered { label, error } = m
                && index.owner(addr).is_some_and(|w| *w.node == *index.here())
                && !out.iter().any(|(l, _)| l == label)
            {
                out.push((label.clone(), format!("cannot be numbered: {error}")));
            }
        }
        out
    }

    /// Counts `ep` in or out of the interfaces that want programs.
    fn note_local(&mut self, ep: Option<&Endpoint>, add: bool) {
        let Some(ep) = ep.filter(|e| e.flags & EP_LOCAL != 0) else {
            return;
        };
        if add {
            *self.local_ifaces.entry(ep.ifindex).or_insert(0) += 1;
        } else if let Some(n) = self.local_ifaces.get_mut(&ep.ifindex) {
            *n -= 1;
            if *n == 0 {
                self.local_ifaces.remove(&ep.ifindex);
            }
        }
    }

    /// Applies a change of cluster state or policy: the addresses it touched, and with a
    /// policy change every local pod's (their endpoints carry its settings).
    pub fn apply<M: EndpointMap + NameMap + Links>(
        &mut self,
        maps: &mut M,
        names: &mut Registry,
        index: &Index,
        policy: &Policy,
        changes: &Changes,
        policy_changed: bool,
    ) -> Synced {
        let mut addrs: HashSet<IpAddr> = changes.addrs.clone();
        // The node's own addresses before anything else: an adopted endpoint of the node must
        // not look like one that went (that would cut the node's connections to its pods).
        if !self.host_listed || changes.all {
            addrs.extend(self.host_addresses());
        }
        if changes.all {
            addrs.extend(index.workloads().flat_map(|w| w.addresses.iter().copied()));
            addrs.extend(self.programmed.keys().copied());
            addrs.extend(self.host.iter().copied());
        }
        if changes.local || changes.all || policy_changed {
            addrs.extend(self.locals.refresh(index, &self.routes));
        }
        if policy_changed {
            addrs.extend(self.locals.addresses());
        }
        let synced = self.sync(maps, names, index, policy, addrs);
        self.links(maps);
        synced
    }

    /// What can change without cluster state saying so: the node's own addresses, local pods'
    /// interfaces, links whose pins were removed, and writes to retry.
    pub fn tick<M: EndpointMap + NameMap + Links>(
        &mut self,
        maps: &mut M,
        names: &mut Registry,
        index: &Index,
        policy: &Policy,
    ) -> Synced {
        let mut addrs = self.host_addresses();
        addrs.extend(self.locals.refresh(index, &self.routes));
        addrs.extend(
            self.missing
                .iter()
                .filter(|(_, m)| !matches!(m, Missing::Full))
                .map(|(a, _)| *a),
        );
        let synced = self.sync(maps, names, index, policy, addrs);
        self.links(maps);
        synced
    }

    /// Lists the node's own addresses; returns those that came or went.
    fn host_addresses(&mut self) -> HashSet<IpAddr> {
        match self.routes.local_addresses() {
            Ok(now) => {
                self.host_error = None;
                self.host_listed = true;
                let now: HashSet<IpAddr> = now.into_iter().collect();
                let touched = now.symmetric_difference(&self.host).copied().collect();
                self.host = now;
                touched
            }
            Err(e) => {
                // Keep what is programmed rather than cut probes over a transient failure.
                if crate::journal::is_new(&mut self.host_error, e.to_string()) {
                    tracing::warn!(error = %e, "cannot list this node's addresses; keeping the last ones");
                }
                if !self.host_listed {
                    self.host = self
                        .programmed
                        .iter()
                        .filter(|(_, ep)| ep.flags & EP_HOST != 0)
                        .map(|(a, _)| *a)
                        .collect();
                }
                HashSet::new()
            }
        }
    }

    /// Makes the map hold [`desired`] for each of `addrs`: the node's and local pods' first,
    /// then the rest. Removals come first, as they make room.
    fn sync<M: EndpointMap + NameMap>(
        &mut self,
        maps: &mut M,
        names: &mut Registry,
        index: &Index,
        policy: &Policy,
        addrs: HashSet<IpAddr>,
    ) -> Synced {
        let mut out = Synced::default();
        let mut wanted: Vec<(IpAddr, Endpoint)> = Vec::new();
        // The node's and local pods' names are numbered first, so that a full name map leaves
        // out a remote peer, never them.
        let mut addrs: Vec<IpAddr> = addrs.into_iter().collect();
        addrs.sort_by_key(|a| {
            !(self.host.contains(a) || index.owner(a).is_some_and(|w| *w.node == *index.here()))
        });
        for addr in addrs {
            let host = self.host.contains(&addr);
            let want = desired(addr, index, &self.locals, policy, host, |id, node| {
                Ok((
                    names.intern(maps, Kind::Identity, id)?,
                    names.intern(maps, Kind::Node, node)?,
                ))
            });
            match want {
                Ok(Some(ep)) => {
                    if self.programmed.get(&addr) == Some(&ep) {
                        self.missing.remove(&addr);
                    } else {
                        wanted.push((addr, ep));
                    }
                }
                Ok(None) => {
                    self.missing.remove(&addr);
                    if self.programmed.contains_key(&addr) {
                        self.remove(maps, addr, &mut out);
                    }
                }
                Err(u) => {
                    if !u.full {
                        self.refusals.names += 1;
                    }
                    self.refusals.name_error = Some(u.error.clone());
                    // Never leave an address with a previous owner's identity.
                    if self.programmed.contains_key(&addr) {
                        self.remove(maps, addr, &mut out);
                    }
                    self.missing.insert(
                        addr,
                        Missing::Unnumbered {
                            label: u.label,
                            error: u.error,
                        },
                    );
                }
            }
        }
        // The node's and local pods' first: a full map leaves out a remote peer, never them.
        wanted.sort_by_key(|(_, ep)| ep.flags & (EP_LOCAL | EP_HOST) == 0);
        let mut full = [false; 2];
        for (addr, ep) in wanted {
            self.set(maps, addr, ep, &mut full, &mut out);
        }
        // Room made by removals is offered to what a full map left out.
        if out.removed > 0 {
            let waiting: Vec<IpAddr> = self
                .missing
                .iter()
                .filter(|(_, m)| matches!(m, Missing::Full))
                .map(|(a, _)| *a)
                .take(out.removed)
                .collect();
            if !waiting.is_empty() {
                let more = self.sync(maps, names, index, policy, waiting.into_iter().collect());
                out.changed.extend(more.changed);
                out.set += more.set;
                out.removed += more.removed;
            }
        }
        out
    }

    fn remove(&mut self, maps: &mut impl EndpointMap, addr: IpAddr, out: &mut Synced) {
        match maps.remove_endpoint(addr) {
            Ok(()) => {
                let old = self.programmed.remove(&addr);
                self.note_local(old.as_ref(), false);
                out.changed.insert(addr);
                out.removed += 1;
                tracing::info!(target: "portcullis::audit", event = "endpoint_removed", %addr, "endpoint removed from cluster state");
            }
            Err(e) => {
                tracing::error!(error = %e, %addr, "cannot remove an endpoint; retrying at the next tick");
                self.missing.insert(addr, Missing::Refused);
            }
        }
    }

    fn set(
        &mut self,
        maps: &mut impl EndpointMap,
        addr: IpAddr,
        ep: Endpoint,
        full: &mut [bool; 2],
        out: &mut Synced,
    ) {
        let family = usize::from(addr.is_ipv6());
        let known = self.programmed.contains_key(&addr);
        let first = ep.flags & (EP_LOCAL | EP_HOST) != 0;
        // Once a map is full, a new remote address is not tried again in this pass.
        if !known && full[family] && !first {
            self.missing.insert(addr, Missing::Full);
            return;
        }
        let mut result = maps.set_endpoint(addr, &ep);
        if first
            && result.as_ref().is_err_and(DatapathError::is_full)
            && self.evict_remote(maps, addr.is_ipv6(), out)
        {
            result = maps.set_endpoint(addr, &ep);
        }
        match result {
            Ok(()) => {
                let old = self.programmed.insert(addr, ep);
                self.note_local(old.as_ref(), false);
                self.note_local(Some(&ep), true);
                self.missing.remove(&addr);
                if known {
                    out.changed.insert(addr);
                }
                out.set += 1;
            }
            Err(e) => {
                full[family] |= e.is_full();
                self.refusals.endpoints += 1;
                self.refusals.endpoint_error = Some(e.to_string());
                if known {
                    // Never leave an address with its previous owner's identity.
                    self.remove(maps, addr, out);
                }
                let why = if e.is_full() {
                    Missing::Full
                } else {
                    Missing::Refused
                };
                self.missing.insert(addr, why);
            }
        }
    }

    /// Makes room for the node's or a local pod's endpoint by leaving out a remote peer of the
    /// same family.
    fn evict_remote(&mut self, maps: &mut impl EndpointMap, v6: bool, out: &mut Synced) -> bool {
        let Some(victim) = self
            .programmed
            .iter()
            .find(|(a, ep)| a.is_ipv6() == v6 && ep.flags & (EP_LOCAL | EP_HOST) == 0)
            .map(|(a, _)| *a)
        else {
            return false;
        };
        if maps.remove_endpoint(victim).is_err() {
            return false;
        }
        let old = self.programmed.remove(&victim);
        self.note_local(old.as_ref(), false);
        self.missing.insert(victim, Missing::Full);
        out.changed.insert(victim);
        true
    }

    /// Attaches the programs to every local pod's interface whose endpoint is programmed, and
    /// detaches them from interfaces no local pod has any more.
    fn links(&mut self, links: &mut impl Links) {
        let wanted: HashSet<u32> = self.local_ifaces.keys().copied().collect();
        self.locals.attach(links, &wanted);
        let (claimed, unheld) = self.locals.take_held(&self.routes);
        // A held interface whose pins are gone (removed from outside, or by an agent that
        // took them for leftovers) gets our programs: with no endpoint behind them they drop
        // everything, as the plugin's did.
        for iface in &claimed {
            if !wanted.contains(&iface.index) && !links.pinned(iface.index) {
                match links.attach(iface) {
                    Ok(_) => {
                        tracing::warn!(interface = %iface.name, ifindex = iface.index, "a held interface had lost its links; holding it with ours")
                    }
                    Err(e) => {
                        tracing::error!(interface = %iface.name, ifindex = iface.index, error = %e, "a held interface lost its links and cannot be held again; retrying at the next tick")
                    }
                }
            }
        }
        let held: HashSet<u32> = claimed.iter().map(|i| i.index).collect();
        // Until the claims were read, a pinned link may be one a claim holds: keep it.
        let leftovers = if self.locals.claims_read() {
            std::mem::take(&mut self.leftover_pins)
        } else {
            Vec::new()
        };
        // Interfaces held for claims that are gone now are released like any other.
        let mut released: Vec<u32> = self
            .locals
            .attached_indices()
            .into_iter()
            .chain(leftovers)
            .chain(unheld)
            .filter(|i| !wanted.contains(i))
            .collect();
        released.sort_unstable();
        released.dedup();
        for index in released {
            if held.contains(&index) {
                // Its pod left cluster state (or is not in it yet) but still has its sandbox:
                // the links stay, and with no endpoint behind them they drop everything.
                if let Some(i) = self.locals.detached(index) {
                    tracing::info!(workload = %i.workload, interface = %i.name, ifindex = index, "no longer a workload; its interface stays held in default-deny until CNI DEL");
                }
                continue;
            }
            if let Err(e) = links.detach(index) {
                tracing::error!(ifindex = index, error = %e, "cannot detach; retrying at the next tick");
                continue;
            }
            match self.locals.detached(index) {
                Some(i) => {
                    tracing::info!(workload = %i.workload, interface = %i.name, ifindex = index, "released");
                }
                None => {
                    tracing::info!(ifindex = index, "removed a pinned link no local pod claims")
                }
            }
        }
    }
}

/// For status: how an interface got its programs.
#[must_use]
pub fn attached_str(a: Attached) -> &'static str {
    match a {
        Attached::Adopted => "adopted",
        Attached::New => "new",
    }
}

#[cfg(test)]
mod tests;
