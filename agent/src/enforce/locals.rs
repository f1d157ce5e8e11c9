//! This node's pods: the host-side interface of each, and the programs attached to it.
//!
//! A pod's interface is the one `portcullis-cni` claimed for it on ADD (see [`crate::cni`]),
//! while that interface exists. Without a claim, and only with `pod_interfaces: auto`, it is
//! found by route lookup, and a bridge (shared by every pod on it) is refused. A lookup that fails for a pod whose interface is known and still
//! exists does not release the pod: its programs stay and it stays enforced (the failure is
//! shown in `status` and the lookup retried at every tick). Only an interface that is gone, or
//! a route that now leads elsewhere, changes the pod's interface.
//!
//! A claimed interface is never detached here: it stays held (default-deny, or our programs
//! with no endpoint behind them, which drop everything) until DEL releases it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    time::SystemTime,
};

use crate::{
    cni::{self, BadClaim, Claim},
    config::PodInterfaces,
    datapath::{
        Attached, Links,
        route::{Interface, Routes},
    },
    identity::SpiffeId,
    inputs::{Index, WorkloadKey},
};

/// An interface with our programs, for `status`.
#[derive(Debug, Clone)]
pub struct Iface {
    pub key: WorkloadKey,
    pub workload: String,
    pub identity: SpiffeId,
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub attached: Attached,
}

#[derive(Debug)]
struct Local {
    identity: SpiffeId,
    addresses: Vec<IpAddr>,
    iface: Option<Interface>,
    /// Why its interface is not known, or why the last lookup failed while the interface
    /// stays in use.
    problem: Option<String>,
}

/// The claims `portcullis-cni` recorded, re-read when their directory changes.
#[derive(Debug, Default)]
struct Claims {
    dir: Option<PathBuf>,
    /// The directory's modification time when last read.
    stamp: Option<SystemTime>,
    by_pod: BTreeMap<WorkloadKey, Claim>,
    bad: Vec<BadClaim>,
    error: Option<String>,
    /// Whether the claims were read at least once (or there is no directory to read): until
    /// then no pinned link may be taken for a leftover.
    read: bool,
}

impl Claims {
    /// Reads the claims again if the directory changed (or `force`); whether it did.
    fn reload(&mut self, force: bool) -> bool {
        let Some(dir) = &self.dir else {
            self.read = true;
            return false;
        };
        let stamp = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
        if !force && stamp.is_some() && stamp == self.stamp {
            return false;
        }
        match cni::read_claims(dir) {
            Ok((by_pod, bad)) => {
                self.stamp = stamp;
                self.read = true;
                for b in bad.iter().filter(|b| !self.bad.contains(b)) {
                    tracing::warn!(claim = %b.path.display(), error = %b.error, "unreadable portcullis-cni claim; skipped");
                }
                let changed = by_pod != self.by_pod;
                self.by_pod = by_pod;
                self.bad = bad;
                self.error = None;
                changed
            }
            Err(e) => {
                if crate::journal::is_new(&mut self.error, e.to_string()) {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot read the portcullis-cni claims; keeping the last ones");
                }
                false
            }
        }
    }

    /// The claimed interface of `key` (whose cluster-state addresses are `addresses`, if it is
    /// a workload), while it exists: `Err` says why not. A claim whose addresses are none of
    /// the workload's is refused: a stale or mistaken claim must not give a pod's identity to
    /// another pod's interface.
    fn interface(
        &self,
        key: &WorkloadKey,
        addresses: Option<&[IpAddr]>,
        routes: &impl Routes,
    ) -> Option<Result<Interface, String>> {
        let c = self.by_pod.get(key)?;
        if let Some(addresses) = addresses
            && !c.addresses.is_empty()
            && !c.addresses.iter().any(|a| addresses.contains(a))
        {
            return Some(Err(format!(
                "portcullis-cni recorded {:?} for it on {}, cluster state has {addresses:?}",
                c.addresses, c.interface
            )));
        }
        Some(
            if routes.interface(c.ifindex).as_deref() == Some(c.interface.as_str()) {
                Ok(Interface {
                    index: c.ifindex,
                    name: c.interface.clone(),
                })
            } else {
                Err(format!(
                    "the interface portcullis-cni recorded for it, {} (index {}), is gone",
                    c.interface, c.ifindex
                ))
            },
        )
    }
}

#[derive(Debug, Default)]
pub struct LocalState {
    locals: BTreeMap<WorkloadKey, Local>,
    /// `pod_interfaces: cni`: no route lookup, claims only.
    claims_only: bool,
    claims: Claims,
    /// The interfaces held for claims, as of the last [`Self::take_held`].
    held: HashSet<u32>,
    attached: BTreeMap<u32, Iface>,
    /// Why attaching to an interface failed, per workload, until it succeeds.
    attach_errors: HashMap<WorkloadKey, String>,
}

fn label(key: &WorkloadKey) -> String {
    format!("{}/{}", key.0, key.1)
}

impl LocalState {
    /// Local pods' interfaces from `portcullis-cni`'s claims in `dir` and, with
    /// [`PodInterfaces::Auto`], by route lookup for pods without one.
    #[must_use]
    pub fn new(mode: PodInterfaces, dir: PathBuf) -> Self {
        Self {
            claims_only: mode == PodInterfaces::Cni,
            claims: Claims {
                dir: Some(dir),
                ..Claims::default()
            },
            ..Self::default()
        }
    }

    /// Reads the claims now (the plugin asked); whether they changed.
    pub fn reload_claims(&mut self) -> bool {
        self.claims.reload(true)
    }

    /// Interfaces held for a claim (that exist), never detached until the claim goes; and
    /// those held at the last call that no claim holds any more.
    pub fn take_held(&mut self, routes: &impl Routes) -> (Vec<Interface>, Vec<u32>) {
        let claimed: Vec<Interface> = self
            .claims
            .by_pod
            .keys()
            .filter_map(|k| self.claims.interface(k, None, routes)?.ok())
            .collect();
        let now: HashSet<u32> = claimed.iter().map(|i| i.index).collect();
        let gone = self.held.difference(&now).copied().collect();
        self.held = now;
        (claimed, gone)
    }

    /// Whether the claims were read (so that a pinned link no claim holds is a leftover).
    #[must_use]
    pub fn claims_read(&self) -> bool {
        self.claims.read
    }

    /// What the agent tells the plugin about the pod of container `container_id`: whether it
    /// is enforced, and if not why.
    #[must_use]
    pub fn enrollment(&self, container_id: &str) -> (bool, String) {
        let Some((key, claim)) = self
            .claims
            .by_pod
            .iter()
            .find(|(_, c)| c.container_id == container_id)
        else {
            return (
                false,
                format!(
                    "no claim of container {container_id} (or a later container of its pod replaced it)"
                ),
            );
        };
        let Some(l) = self.locals.get(key) else {
            return (
                false,
                format!(
                    "{} is not a workload of this node in cluster state yet",
                    label(key)
                ),
            );
        };
        if self
            .attached
            .get(&claim.ifindex)
            .is_some_and(|a| a.key == *key)
        {
            return (true, format!("enforced on {}", claim.interface));
        }
        let why = self
            .attach_errors
            .get(key)
            .cloned()
            .or_else(|| l.problem.clone())
            .unwrap_or_else(|| "its endpoint is not programmed yet".to_owned());
        (false, why)
    }

    /// Claimed pods that are no local workload (yet): their interfaces are held in
    /// default-deny.
    #[must_use]
    pub fn held(&self) -> Vec<(String, String)> {
        self.claims
            .by_pod
            .iter()
            .filter(|(k, _)| !self.locals.contains_key(*k))
            .map(|(k, c)| (label(k), c.interface.clone()))
            .collect()
    }

    /// The interface of local workload `namespace/name`, once found.
    #[must_use]
    pub fn interface(&self, namespace: &str, name: &str) -> Option<&Interface> {
        self.locals
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(|l| l.iface.as_ref())
    }

    /// Every local workload's addresses.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.locals
            .values()
            .flat_map(|l| l.addresses.iter().copied())
    }

    /// Brings the local workloads in line with the index and looks their interfaces up again;
    /// returns the addresses whose local endpoint may change.
    pub fn refresh(&mut self, index: &Index, routes: &impl Routes) -> HashSet<IpAddr> {
        let mut touched = HashSet::new();
        self.claims.reload(false);
        let now: BTreeMap<WorkloadKey, (SpiffeId, Vec<IpAddr>)> = index
            .local_workloads()
            .map(|w| (w.key(), (w.identity.clone(), w.addresses.clone())))
            .collect();
        self.locals.retain(|k, l| {
            let keep = now.contains_key(k);
            if !keep {
                touched.extend(l.addresses.iter().copied());
            }
            keep
        });
        self.attach_errors.retain(|k, _| now.contains_key(k));
        for (key, (identity, addresses)) in now {
            let l = self.locals.entry(key.clone()).or_insert_with(|| Local {
                identity: identity.clone(),
                addresses: Vec::new(),
                iface: None,
                problem: None,
            });
            if l.identity != identity || l.addresses != addresses {
                touched.extend(l.addresses.iter().copied());
                touched.extend(addresses.iter().copied());
                l.identity = identity;
                l.addresses = addresses;
            }
            let before = l.iface.clone();
            match self.claims.interface(&key, Some(&l.addresses), routes) {
                Some(Ok(iface)) => {
                    if l.iface.as_ref() != Some(&iface) {
                        tracing::info!(workload = %label(&key), interface = %iface.name, ifindex = iface.index, "the pod's interface, as portcullis-cni recorded it");
                    }
                    l.iface = Some(iface);
                    l.problem = None;
                }
                Some(Err(why)) if self.claims_only => {
                    l.iface = None;
                    l.problem = Some(why);
                }
                None if self.claims_only => {
                    l.iface = None;
                    l.problem = Some("portcullis-cni recorded no interface for it (pod_interfaces: cni): is portcullis-cni chained in the node's CNI configuration?".to_owned());
                }
                _ => resolve(&key, l, routes),
            }
            if l.iface != before {
                touched.extend(l.addresses.iter().copied());
            }
        }
        touched
    }

    /// Attaches the programs to the interfaces in `wanted` (those whose pod's endpoint is
    /// programmed as local) that lack them, and again to those whose pins vanished.
    pub fn attach(&mut self, links: &mut impl Links, wanted: &HashSet<u32>) {
        let unpinned: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !links.pinned(**i))
            .copied()
            .collect();
        for i in unpinned {
            if let Some(iface) = self.attached.remove(&i) {
                tracing::warn!(workload = %iface.workload, interface = %iface.name, ifindex = i, "the pinned links of an enforced interface vanished (and with them its programs); attaching again");
            }
        }
        for (key, l) in &self.locals {
            let Some(iface) = &l.iface else { continue };
            if !wanted.contains(&iface.index) {
                continue;
            }
            if self
                .attached
                .get(&iface.index)
                .is_some_and(|a| a.name != iface.name)
            {
                // The index of an interface that went, reused by another (whose links the
                // plugin pinned anew): attach again.
                self.attached.remove(&iface.index);
            }
            if let Some(a) = self.attached.get_mut(&iface.index) {
                // The same interface, perhaps a workload that changed.
                a.key.clone_from(key);
                a.workload = label(key);
                a.identity.clone_from(&l.identity);
                a.addresses.clone_from(&l.addresses);
                continue;
            }
            match links.attach(iface) {
                Ok(how) => {
                    tracing::info!(workload = %label(key), interface = %iface.name, ifindex = iface.index, attached = ?how, "enforcing");
                    self.attach_errors.remove(key);
                    self.attached.insert(
                        iface.index,
                        Iface {
                            key: key.clone(),
                            workload: label(key),
                            identity: l.identity.clone(),
                            name: iface.name.clone(),
                            addresses: l.addresses.clone(),
                            attached: how,
                        },
                    );
                }
                Err(e) => {
                    // An interface can vanish between its lookup and here (a pod deleted):
                    // that pod waits, the others go on.
                    let reason = e.to_string();
                    if self.attach_errors.get(key) != Some(&reason) {
                        tracing::warn!(workload = %label(key), interface = %iface.name, ifindex = iface.index, error = %reason, "cannot attach; retrying at the next tick");
                        self.attach_errors.insert(key.clone(), reason);
                    }
                }
            }
        }
    }

    #[must_use]
    pub fn attached_indices(&self) -> Vec<u32> {
        self.attached.keys().copied().collect()
    }

    /// Forgets the attachment of `ifindex` (its programs were detached).
    pub fn detached(&mut self, ifindex: u32) -> Option<Iface> {
        self.attached.remove(&ifindex)
    }

    pub fn interfaces(&self) -> impl Iterator<Item = (u32, &Iface)> {
        self.attached.iter().map(|(i, a)| (*i, a))
    }

    /// Local workloads not (fully) enforced, and why: no interface yet, or attaching failed.
    #[must_use]
    pub fn pending(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, l) in &self.locals {
            if l.iface.is_none() {
                let why = l
                    .problem
                    .clone()
                    .unwrap_or_else(|| "no interface yet".to_owned());
                out.push((label(key), why));
            } else if let Some(e) = self.attach_errors.get(key) {
                out.push((label(key), format!("cannot attach: {e}")));
            }
        }
        out
    }

    /// Local workloads that stay enforced on their known interface although its lookup fails.
    #[must_use]
    pub fn degraded(&self) -> Vec<(String, String)> {
        self.locals
            .iter()
            .filter(|(_, l)| l.iface.is_some())
            .filter_map(|(k, l)| Some((label(k), l.problem.clone()?)))
            .collect()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.locals.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.locals.is_empty()
    }
}

/// Looks up the interface of `l`'s addresses, keeping the known one while it exists and no
/// lookup says otherwise.
fn resolve(key: &WorkloadKey, l: &mut Local, routes: &impl Routes) {
    let mut failure = None;
    for addr in &l.addresses {
        match routes.lookup(*addr) {
            Ok(iface) if l.iface.as_ref() != Some(&iface) && routes.is_bridge(&iface) => {
                failure.get_or_insert(format!(
                    "{addr} routes through {}, a bridge every pod on it shares: the pod's own interface is known only from portcullis-cni (a pod started before the plugin was chained needs a restart)",
                    iface.name
                ));
            }
            Ok(iface) => {
                if l.iface.as_ref() != Some(&iface) {
                    tracing::info!(workload = %label(key), %addr, interface = %iface.name, ifindex = iface.index, "found the pod's interface");
                }
                if l.problem.take().is_some() && l.iface.is_some() {
                    tracing::info!(workload = %label(key), "the pod's interface lookup works again");
                }
                l.iface = Some(iface);
                return;
            }
            Err(e) => {
                failure.get_or_insert(format!("route lookup of {addr}: {e}"));
            }
        }
    }
    let Some(reason) = failure else { return };
    match &l.iface {
        Some(known) if routes.interface(known.index).as_deref() == Some(known.name.as_str()) => {
            let problem = format!(
                "{reason}; still enforcing on {} (index {}), retrying",
                known.name, known.index
            );
            if l.problem.as_ref() != Some(&problem) {
                tracing::warn!(workload = %label(key), problem = %problem, "the pod's interface lookup fails; it stays enforced on the interface it had");
                l.problem = Some(problem);
            }
        }
        _ => {
            if l.iface.take().is_some() || l.problem.as_ref() != Some(&reason) {
                tracing::info!(workload = %label(key), reason = %reason, "waiting for the pod's interface");
            }
            l.problem = Some(reason);
        }
    }
}
