//! This node's pods: the host-side interface each one's addresses route through, and the
//! programs attached to it.
//!
//! An interface is found by route lookup. A lookup that fails for a pod whose interface is
//! known and still exists does not release the pod: its programs stay and it stays enforced
//! (the failure is shown in `status` and the lookup retried at every tick). Only an interface
//! that is gone, or a route that now leads elsewhere, changes the pod's interface.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use crate::{
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

#[derive(Debug, Default)]
pub struct LocalState {
    locals: BTreeMap<WorkloadKey, Local>,
    attached: BTreeMap<u32, Iface>,
    /// Why attaching to an interface failed, per workload, until it succeeds.
    attach_errors: HashMap<WorkloadKey, String>,
}

fn label(key: &WorkloadKey) -> String {
    format!("{}/{}", key.0, key.1)
}

impl LocalState {
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
            resolve(&key, l, routes);
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
