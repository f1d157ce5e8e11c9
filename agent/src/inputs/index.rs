//! The cluster as the agent knows it: nodes and workloads, indexed the ways lookups need
//! (address → workload, identity on a node → workloads, this node's workloads), and updated one
//! workload at a time. Each update records what it touched in [`Changes`], so that the owners
//! downstream (endpoints, auth entries, credentials) redo only that.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::RandomState},
    hash::BuildHasher,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use hashbrown::HashTable;

use serde::Serialize;

use crate::identity::SpiffeId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    /// Where this node's agent accepts handshakes.
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    #[serde(serialize_with = "as_str")]
    pub identity: SpiffeId,
    /// Shared with every workload of the node.
    pub node: Arc<str>,
    pub addresses: Vec<IpAddr>,
}

fn as_str<S: serde::Serializer>(id: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(id.as_str())
}

impl Workload {
    /// `namespace/name`, as logs and `status` name a workload.
    #[must_use]
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    #[must_use]
    pub fn key(&self) -> WorkloadKey {
        (self.namespace.clone(), self.name.clone())
    }
}

/// `(namespace, name)`.
pub type WorkloadKey = (String, String);

/// What a batch of updates touched. Consumers recompute these from the index's current state,
/// so the order of the updates inside a batch does not matter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Addresses whose owner may differ from before.
    pub addrs: HashSet<IpAddr>,
    /// `(identity, node)` whose set of workloads changed.
    pub pairs: HashSet<(Arc<str>, Arc<str>)>,
    /// A workload of this node appeared, changed or left.
    pub local: bool,
    /// A node appeared, left, or changed its handshake address.
    pub nodes: bool,
    /// Workloads added, changed or removed.
    pub workloads: usize,
    /// Everything may have changed (the first state, a new trust domain).
    pub all: bool,
}

impl Changes {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.all && !self.nodes && !self.local && self.workloads == 0 && self.addrs.is_empty()
    }

    /// Whether `(identity, node)` was touched.
    #[must_use]
    pub fn touches(&self, identity: &str, node: &str) -> bool {
        self.all || self.pairs.contains(&(Arc::from(identity), Arc::from(node)))
    }
}

type Slot = u32;

/// Whether the workload at `slot` is `namespace/name`.
fn is_named(slots: &[Option<Workload>], slot: Slot, namespace: &str, name: &str) -> bool {
    slots[slot as usize]
        .as_ref()
        .is_some_and(|w| w.namespace == namespace && w.name == name)
}

#[derive(Debug, Default)]
pub struct Index {
    /// This agent's node.
    here: String,
    trust_domain: String,
    nodes: BTreeMap<String, Node>,
    /// One `Arc` per node name, shared by its workloads.
    node_names: HashMap<String, Arc<str>>,
    /// Stable positions: a workload keeps its slot while it exists, so a cursor over them
    /// (proactive authentication) makes progress while the cluster changes.
    slots: Vec<Option<Workload>>,
    free: Vec<Slot>,
    /// `(namespace, name)` → slot, hashed by the workload's own strings (a table of slots, so
    /// the names are not stored twice).
    by_key: HashTable<Slot>,
    hasher: RandomState,
    count: usize,
    by_addr: HashMap<IpAddr, Slot>,
    /// identity → node → workloads.
    by_identity: HashMap<Arc<str>, HashMap<Arc<str>, Vec<Slot>>>,
    locals: BTreeSet<Slot>,
    changes: Changes,
}

impl Index {
    #[must_use]
    pub fn new(here: &str) -> Self {
        Self {
            here: here.to_owned(),
            ..Self::default()
        }
    }

    #[must_use]
    pub fn here(&self) -> &str {
        &self.here
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Starts over with `trust_domain` if it is not the current one: every workload and node is
    /// removed (their identities belong to another trust domain).
    pub fn set_trust_domain(&mut self, trust_domain: &str) {
        if self.trust_domain == trust_domain {
            return;
        }
        let keys: Vec<WorkloadKey> = self.workloads().map(|w| w.key()).collect();
        for k in keys {
            self.remove(&k.0, &k.1);
        }
        self.nodes.clear();
        self.node_names.clear();
        trust_domain.clone_into(&mut self.trust_domain);
        self.changes.all = true;
        self.changes.nodes = true;
    }

    /// What the updates since the last call touched.
    pub fn take_changes(&mut self) -> Changes {
        // Names of nodes that are gone and have no workloads left are dropped once they
        // outnumber the nodes.
        if self.node_names.len() > 2 * (self.nodes.len() + 16) {
            self.node_names.retain(|_, n| Arc::strong_count(n) > 1);
        }
        std::mem::take(&mut self.changes)
    }

    /// Marks everything as changed (the consumers' first pass).
    pub fn touch_all(&mut self) {
        self.changes.all = true;
    }

    /// The shared name of `node`, made on first sight.
    #[must_use]
    pub fn node_name(&mut self, node: &str) -> Arc<str> {
        if let Some(n) = self.node_names.get(node) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(node);
        self.node_names.insert(node.to_owned(), n.clone());
        n
    }

    pub fn set_node(&mut self, node: Node) {
        if self.nodes.get(&node.name) == Some(&node) {
            return;
        }
        let _shared = self.node_name(&node.name.clone());
        self.nodes.insert(node.name.clone(), node);
        self.changes.nodes = true;
    }

    pub fn remove_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.changes.nodes = true;
        }
    }

    fn slot_of(&self, namespace: &str, name: &str) -> Option<Slot> {
        let hash = self.hasher.hash_one((namespace, name));
        self.by_key
            .find(hash, |s| is_named(&self.slots, *s, namespace, name))
            .copied()
    }

    /// Adds or replaces a workload; a no-op when it is unchanged.
    pub fn upsert(&mut self, mut w: Workload) {
        w.node = self.node_name(&w.node);
        if let Some(slot) = self.slot_of(&w.namespace, &w.name) {
            if self.slots[slot as usize].as_ref() == Some(&w) {
                return;
            }
            self.unlink(slot);
            self.link(slot, w);
        } else {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.slots.push(None);
                Slot::try_from(self.slots.len() - 1).unwrap_or(Slot::MAX)
            });
            let hash = self
                .hasher
                .hash_one((w.namespace.as_str(), w.name.as_str()));
            self.count += 1;
            self.link(slot, w);
            let (slots, hasher) = (&self.slots, &self.hasher);
            self.by_key.insert_unique(hash, slot, |s| {
                slots[*s as usize].as_ref().map_or(0, |w| {
                    hasher.hash_one((w.namespace.as_str(), w.name.as_str()))
                })
            });
        }
        self.changes.workloads += 1;
    }

    pub fn remove(&mut self, namespace: &str, name: &str) {
        let hash = self.hasher.hash_one((namespace, name));
        let slots = &self.slots;
        let Ok(entry) = self
            .by_key
            .find_entry(hash, |s| is_named(slots, *s, namespace, name))
        else {
            return;
        };
        let (slot, _) = entry.remove();
        self.count -= 1;
        self.unlink(slot);
        self.free.push(slot);
        self.changes.workloads += 1;
    }

    fn touch(&mut self, w: &Workload) {
        self.changes.addrs.extend(w.addresses.iter().copied());
        self.changes
            .pairs
            .insert((w.identity.shared().clone(), w.node.clone()));
        if *w.node == *self.here {
            self.changes.local = true;
        }
    }

    fn link(&mut self, slot: Slot, w: Workload) {
        self.touch(&w);
        for a in &w.addresses {
            self.by_addr.insert(*a, slot);
        }
        self.by_identity
            .entry(w.identity.shared().clone())
            .or_default()
            .entry(w.node.clone())
            .or_default()
            .push(slot);
        if *w.node == *self.here {
            self.locals.insert(slot);
        }
        self.slots[slot as usize] = Some(w);
    }

    fn unlink(&mut self, slot: Slot) {
        let Some(w) = self.slots[slot as usize].take() else {
            return;
        };
        self.touch(&w);
        for a in &w.addresses {
            // Another workload may have taken the address in the same batch.
            if self.by_addr.get(a) == Some(&slot) {
                self.by_addr.remove(a);
            }
        }
        if let Some(nodes) = self.by_identity.get_mut(w.identity.as_str()) {
            if let Some(slots) = nodes.get_mut(&*w.node) {
                slots.retain(|s| *s != slot);
                if slots.is_empty() {
                    nodes.remove(&*w.node);
                }
            }
            if nodes.is_empty() {
                self.by_identity.remove(w.identity.as_str());
            }
        }
        self.locals.remove(&slot);
    }

    fn get(&self, slot: Slot) -> Option<&Workload> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// The workload that owns `addr`.
    #[must_use]
    pub fn owner(&self, addr: &IpAddr) -> Option<&Workload> {
        self.by_addr.get(addr).and_then(|s| self.get(*s))
    }

    #[must_use]
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.slot_of(namespace, name).and_then(|s| self.get(s))
    }

    #[must_use]
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// The node whose handshake address is at `ip`.
    #[must_use]
    pub fn node_at(&self, ip: IpAddr) -> Option<&Node> {
        self.nodes.values().find(|n| n.address.ip() == ip)
    }

    /// Whether a workload with `identity` runs on `node`.
    #[must_use]
    pub fn has_pair(&self, identity: &str, node: &str) -> bool {
        self.by_identity
            .get(identity)
            .is_some_and(|n| n.contains_key(node))
    }

    /// An address of a workload with `identity` on `node`.
    #[must_use]
    pub fn address_of(&self, identity: &str, node: &str) -> Option<IpAddr> {
        let slots = self.by_identity.get(identity)?.get(node)?;
        slots
            .iter()
            .find_map(|s| self.get(*s).and_then(|w| w.addresses.first().copied()))
    }

    /// Whether any workload has `identity`.
    #[must_use]
    pub fn identity_in_use(&self, identity: &str) -> bool {
        self.by_identity.contains_key(identity)
    }

    /// Whether `node` is a node of cluster state or has workloads.
    #[must_use]
    pub fn node_in_use(&self, node: &str) -> bool {
        self.nodes.contains_key(node) || self.by_identity.values().any(|n| n.contains_key(node))
    }

    /// This node's workloads.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Workload> {
        self.locals.iter().filter_map(|s| self.get(*s))
    }

    #[must_use]
    pub fn local_count(&self) -> usize {
        self.locals.len()
    }

    /// Every workload, in slot order.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.slots.iter().filter_map(Option::as_ref)
    }

    /// The workload in slot `i` (`None` for a free slot); slots run from 0 to
    /// [`Index::slot_count`].
    #[must_use]
    pub fn slot(&self, i: usize) -> Option<&Workload> {
        self.slots.get(i).and_then(Option::as_ref)
    }

    #[must_use]
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.count
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn workload(ns: &str, name: &str, sa: &str, node: &str, addrs: &[&str]) -> Workload {
        Workload {
            name: name.into(),
            namespace: ns.into(),
            identity: SpiffeId::for_service_account("td", ns, sa).unwrap(),
            node: node.into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn updates_touch_only_what_they_change() {
        let mut ix = Index::new("n1");
        ix.set_trust_domain("td");
        ix.take_changes();
        ix.upsert(workload("shop", "web", "web", "n1", &["198.18.1.2"]));
        ix.upsert(workload("shop", "api", "api", "n2", &["198.18.2.2"]));
        let c = ix.take_changes();
        assert_eq!(c.workloads, 2);
        assert!(c.local);
        assert!(c.touches("spiffe://td/ns/shop/sa/api", "n2"));
        // Unchanged: nothing touched.
        ix.upsert(workload("shop", "api", "api", "n2", &["198.18.2.2"]));
        assert!(ix.take_changes().is_empty());
        // A remote workload moves: both addresses touched, not local.
        ix.upsert(workload("shop", "api", "api", "n2", &["198.18.2.3"]));
        let c = ix.take_changes();
        assert!(!c.local);
        assert_eq!(c.addrs.len(), 2);
        assert!(ix.owner(&"198.18.2.2".parse().unwrap()).is_none());
        assert_eq!(
            ix.owner(&"198.18.2.3".parse().unwrap()).unwrap().name,
            "api"
        );
        assert_eq!(
            ix.address_of("spiffe://td/ns/shop/sa/api", "n2"),
            Some("198.18.2.3".parse().unwrap())
        );
        // An address handed over inside one batch, in either order, ends with its new owner.
        ix.upsert(workload("shop", "new", "api", "n2", &["198.18.2.3"]));
        ix.upsert(workload("shop", "api", "api", "n2", &["198.18.2.9"]));
        assert_eq!(
            ix.owner(&"198.18.2.3".parse().unwrap()).unwrap().name,
            "new"
        );
        ix.remove("shop", "api");
        assert!(
            ix.has_pair("spiffe://td/ns/shop/sa/api", "n2"),
            "`new` has it too"
        );
        ix.remove("shop", "new");
        assert!(!ix.identity_in_use("spiffe://td/ns/shop/sa/api"));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.local_workloads().count(), 1);
        // Slots are reused.
        ix.upsert(workload("shop", "x", "x", "n2", &["198.18.2.7"]));
        assert_eq!(ix.slot_count(), 3);
    }

    #[test]
    fn workloads_are_found_by_name_through_growth_removal_and_reuse() {
        let mut ix = Index::new("n1");
        ix.set_trust_domain("td");
        let addr = |i: usize| format!("198.18.{}.{}", i / 250, i % 250 + 1);
        // Same names in two namespaces, enough of them to grow the table several times.
        for i in 0..2000 {
            let ns = if i % 2 == 0 { "a" } else { "b" };
            ix.upsert(workload(
                ns,
                &format!("w{}", i / 2),
                "sa",
                "n2",
                &[&addr(i)],
            ));
        }
        assert_eq!(ix.len(), 2000);
        for i in (0..2000).step_by(3) {
            let ns = if i % 2 == 0 { "a" } else { "b" };
            ix.remove(ns, &format!("w{}", i / 2));
        }
        // Removing what is not there changes nothing.
        ix.remove("a", "missing");
        ix.remove("c", "w1");
        for i in 0..2000 {
            let ns = if i % 2 == 0 { "a" } else { "b" };
            let found = ix.workload(ns, &format!("w{}", i / 2));
            if i % 3 == 0 {
                assert!(found.is_none(), "{ns}/w{} was removed", i / 2);
            } else {
                let w = found.unwrap_or_else(|| panic!("{ns}/w{} is there", i / 2));
                assert_eq!(
                    (w.namespace.as_str(), w.addresses[0].to_string()),
                    (ns, addr(i))
                );
            }
        }
        // Removed slots are reused by new names, which are found like the others.
        let slots = ix.slot_count();
        ix.upsert(workload("c", "w0", "sa", "n2", &["198.19.0.1"]));
        assert_eq!(ix.slot_count(), slots);
        assert_eq!(
            ix.workload("c", "w0").unwrap().addresses[0].to_string(),
            "198.19.0.1"
        );
        assert!(ix.workload("a", "w0").is_none());
    }
}
