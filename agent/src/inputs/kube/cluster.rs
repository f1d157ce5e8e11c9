//! Pods and Nodes from the API turned into workloads, one object at a time, by rules a kubelet
//! cannot bend:
//!
//! - a pod's address must lie in its node's `spec.podCIDRs` (when the node has any) and must
//!   not be an address of its own node. (Another node's addresses are not a reason to refuse:
//!   each kubelet writes its own Node's addresses, and one listing a pod's address there must
//!   not take that pod out of cluster state. Another node's address lies outside the pod's
//!   node's CIDRs anyway.);
//! - mirror pods (static pods the kubelet itself reports) are left out: they carry no service
//!   account, and their kubelet could name any namespace;
//! - an address belongs to the oldest live pod that claims it (by creation time, then
//!   namespace and name, so every agent decides alike), a terminating pod included: a new pod
//!   gets a reused address only once the old one is gone from the API;
//! - host-network pods, finished pods and pods not scheduled or without an address yet are not
//!   workloads (and not refusals: nothing is wrong with them).
//!
//! Each change marks what it affects (the pod; the pods that claim the same addresses; a node's
//! pods), and [`KubeCluster::take_updates`] derives only those again.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::objects::{NodeObject, PodObject};
use crate::{
    identity::SpiffeId,
    inputs::index::{Node, Workload, WorkloadKey},
};

/// Why a pod is not (or not wholly) a workload, when something is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    MirrorPod,
    UnknownNode { node: String },
    BadAddress { addr: String },
    OutsidePodCidrs { addr: IpAddr, node: String },
    NodeAddress { addr: IpAddr, node: String },
    AddressInUse { addr: IpAddr, by: String },
    Identity { error: String },
}

impl Refusal {
    /// The label of its kind, for counts in `status` and the metrics.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::MirrorPod => "mirror_pod",
            Self::UnknownNode { .. } => "unknown_node",
            Self::BadAddress { .. } => "bad_address",
            Self::OutsidePodCidrs { .. } => "outside_pod_cidrs",
            Self::NodeAddress { .. } => "node_address",
            Self::AddressInUse { .. } => "address_in_use",
            Self::Identity { .. } => "identity",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MirrorPod => f.write_str("a mirror pod (no service account of its own)"),
            Self::UnknownNode { node } => {
                write!(f, "node `{node}` is unknown or has no InternalIP")
            }
            Self::BadAddress { addr } => write!(f, "`{addr}` is not an IP address"),
            Self::OutsidePodCidrs { addr, node } => {
                write!(f, "address {addr} is outside node {node}'s podCIDRs")
            }
            Self::NodeAddress { addr, node } => write!(f, "address {addr} is node {node}'s"),
            Self::AddressInUse { addr, by } => {
                write!(f, "address {addr} is still {by}'s (an older pod)")
            }
            Self::Identity { error } => write!(f, "{error}"),
        }
    }
}

#[derive(Debug, Clone)]
struct NodeFacts {
    /// The handshake address: the InternalIP, IPv4 preferred.
    address: Option<IpAddr>,
    all_ips: Vec<IpAddr>,
    /// `(network, prefix length)`; empty: the node has none, no check.
    cidrs: Vec<(IpAddr, u8)>,
}

/// What the agent keeps of a Pod: a few dozen bytes, its strings shared with the other pods of
/// its namespace, node and service account.
#[derive(Debug)]
struct PodFacts {
    namespace: Arc<str>,
    name: Arc<str>,
    /// Creation time, in Unix seconds: the oldest claim on an address wins.
    created: Option<i64>,
    node: Option<Arc<str>>,
    service_account: Arc<str>,
    mirror: bool,
    /// Host network, or finished (`Succeeded`, `Failed`): not a workload, nothing wrong.
    inert: bool,
    ips: Box<[IpAddr]>,
    /// The first address that is not an IP, as written.
    bad_ip: Option<Box<str>>,
    /// The addresses it claims (valid ones, while it is a candidate).
    claims: Box<[IpAddr]>,
}

impl PodFacts {
    fn key(&self) -> WorkloadKey {
        (self.namespace.to_string(), self.name.to_string())
    }

    /// The order of claims on an address: the oldest first, then by namespace and name, so every
    /// agent decides alike.
    fn rank(&self) -> (Option<i64>, &str, &str) {
        (self.created, &self.namespace, &self.name)
    }
}

/// Refusals of pods now in the API, and counts of every refusal since start.
#[derive(Debug, Default, Clone)]
pub struct Refusals {
    /// Pod → why, for the pods refused now.
    pub current: BTreeMap<String, Refusal>,
    /// Refusals made since start, by kind.
    pub total: BTreeMap<&'static str, u64>,
}

type PodId = u32;

/// The pods that list an address, and whether each claims it (listing an address that is
/// valid for it, while it is a candidate). Almost always one.
#[derive(Debug, Default)]
struct Holders(Vec<(PodId, bool)>);

#[derive(Debug)]
pub struct KubeCluster {
    trust_domain: String,
    handshake_port: u16,
    check_pod_cidrs: bool,
    /// Pods by id; a freed id is reused.
    pods: Vec<Option<PodFacts>>,
    free: Vec<PodId>,
    by_key: HashMap<(Arc<str>, Arc<str>), PodId>,
    by_node: HashMap<Arc<str>, HashSet<PodId>>,
    /// Address → the pods that list it.
    by_ip: HashMap<IpAddr, Holders>,
    nodes: HashMap<String, NodeFacts>,
    /// Shared strings: namespaces, names of nodes and service accounts.
    strings: HashSet<Arc<str>>,
    /// Identities made, by namespace and service account.
    identities: HashMap<(Arc<str>, Arc<str>), Result<SpiffeId, String>>,
    dirty_pods: HashSet<WorkloadKey>,
    dirty_nodes: HashSet<String>,
    refusals: Refusals,
}

/// What [`KubeCluster::take_updates`] hands the index.
#[derive(Debug, Default)]
pub struct Updates {
    pub workloads: Vec<(WorkloadKey, Option<Workload>)>,
    pub nodes: Vec<(String, Option<Node>)>,
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (net, len) = s.split_once('/')?;
    let net: IpAddr = net.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((net, len))
}

fn in_cidr(addr: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    let bits = |a: IpAddr| -> (u128, u32) {
        match a {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    };
    let ((a, fa), (n, fn_)) = (bits(addr), bits(net));
    if fa != fn_ {
        return false;
    }
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    a & mask == n & mask
}

impl KubeCluster {
    #[must_use]
    pub fn new(trust_domain: &str, handshake_port: u16, check_pod_cidrs: bool) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            handshake_port,
            check_pod_cidrs,
            pods: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            by_node: HashMap::new(),
            by_ip: HashMap::new(),
            nodes: HashMap::new(),
            strings: HashSet::new(),
            identities: HashMap::new(),
            dirty_pods: HashSet::new(),
            dirty_nodes: HashSet::new(),
            refusals: Refusals::default(),
        }
    }

    #[must_use]
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    #[must_use]
    pub fn pod_keys(&self) -> Vec<WorkloadKey> {
        self.pods.iter().flatten().map(PodFacts::key).collect()
    }

    #[must_use]
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    fn share(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    fn pod(&self, id: PodId) -> Option<&PodFacts> {
        self.pods.get(id as usize).and_then(Option::as_ref)
    }

    fn id_of(&self, pod: &PodObject) -> Option<PodId> {
        let ns: Arc<str> = pod.meta.namespace.as_deref().unwrap_or("default").into();
        let name: Arc<str> = pod.meta.name.as_deref().unwrap_or("").into();
        self.by_key.get(&(ns, name)).copied()
    }

    fn facts(&mut self, pod: &PodObject) -> PodFacts {
        let mut ips = Vec::with_capacity(pod.ips.len());
        let mut bad_ip = None;
        for raw in &pod.ips {
            match raw.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => {
                    bad_ip.get_or_insert_with(|| raw.as_str().into());
                }
            }
        }
        PodFacts {
            namespace: self.share(pod.meta.namespace.as_deref().unwrap_or("default")),
            name: pod.meta.name.as_deref().unwrap_or("").into(),
            created: pod.created().map(|t| t.0.as_second()),
            node: pod.node.as_deref().map(|n| self.share(n)),
            service_account: self.share(pod.service_account.as_deref().unwrap_or("default")),
            mirror: pod.is_mirror(),
            inert: pod.host_network || matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")),
            ips: ips.into(),
            bad_ip,
            claims: Box::new([]),
        }
    }

    pub fn apply_pod(&mut self, pod: PodObject) {
        if let Some(id) = self.id_of(&pod) {
            self.forget(id);
        }
        let facts = self.facts(&pod);
        let id = self.free.pop().unwrap_or_else(|| {
            self.pods.push(None);
            PodId::try_from(self.pods.len() - 1).unwrap_or(PodId::MAX)
        });
        self.by_key
            .insert((facts.namespace.clone(), facts.name.clone()), id);
        if let Some(node) = &facts.node {
            self.by_node.entry(node.clone()).or_default().insert(id);
        }
        for ip in &facts.ips {
            self.by_ip.entry(*ip).or_default().0.push((id, false));
        }
        self.dirty_pods.insert(facts.key());
        self.pods[id as usize] = Some(facts);
        self.claim(id);
    }

    pub fn delete_pod(&mut self, pod: &PodObject) {
        let key = (
            pod.meta
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            pod.meta.name.clone().unwrap_or_default(),
        );
        if let Some(id) = self.id_of(pod) {
            self.forget(id);
        }
        self.dirty_pods.insert(key);
    }

    /// Removes a pod from every index (its claims released, their next owners marked).
    fn forget(&mut self, id: PodId) {
        self.release(id);
        let Some(facts) = self.pods.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        self.by_key
            .remove(&(facts.namespace.clone(), facts.name.clone()));
        if let Some(node) = &facts.node
            && let Some(set) = self.by_node.get_mut(node)
        {
            set.remove(&id);
            if set.is_empty() {
                self.by_node.remove(node);
            }
        }
        for ip in &facts.ips {
            if let Some(h) = self.by_ip.get_mut(ip) {
                h.0.retain(|(p, _)| *p != id);
                if h.0.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        self.free.push(id);
    }

    /// Withdraws the pod's claims, marking the other claimants of those addresses.
    fn release(&mut self, id: PodId) {
        let Some(claims) = self
            .pods
            .get_mut(id as usize)
            .and_then(Option::as_mut)
            .map(|f| std::mem::take(&mut f.claims))
        else {
            return;
        };
        for addr in claims.iter() {
            let mut others = Vec::new();
            if let Some(h) = self.by_ip.get_mut(addr) {
                for (p, claims) in &mut h.0 {
                    if *p == id {
                        *claims = false;
                    } else if *claims {
                        others.push(*p);
                    }
                }
            }
            for p in others {
                if let Some(k) = self.pod(p).map(PodFacts::key) {
                    self.dirty_pods.insert(k);
                }
            }
        }
    }

    /// Whether the pod could be a workload at all, and the addresses it may claim.
    fn candidate(&self, facts: &PodFacts) -> Result<Option<Vec<IpAddr>>, Refusal> {
        if facts.mirror {
            return Err(Refusal::MirrorPod);
        }
        if facts.inert {
            return Ok(None);
        }
        let Some(node) = &facts.node else {
            return Ok(None);
        };
        let node_facts = self
            .nodes
            .get(&**node)
            .filter(|n| n.address.is_some())
            .ok_or_else(|| Refusal::UnknownNode {
                node: node.to_string(),
            })?;
        let mut valid = Vec::new();
        let mut first_error = facts.bad_ip.as_ref().map(|a| Refusal::BadAddress {
            addr: a.to_string(),
        });
        for addr in facts.ips.iter().copied() {
            let refusal = if node_facts.all_ips.contains(&addr) {
                Some(Refusal::NodeAddress {
                    addr,
                    node: node.to_string(),
                })
            } else if self.check_pod_cidrs
                && !node_facts.cidrs.is_empty()
                && !node_facts.cidrs.iter().any(|c| in_cidr(addr, *c))
            {
                Some(Refusal::OutsidePodCidrs {
                    addr,
                    node: node.to_string(),
                })
            } else {
                valid.push(addr);
                None
            };
            if first_error.is_none() {
                first_error = refusal;
            }
        }
        match first_error {
            Some(e) if valid.is_empty() => Err(e),
            _ => Ok(Some(valid)),
        }
    }

    /// Records the pod's claims on its valid addresses, marking their claimants.
    fn claim(&mut self, id: PodId) {
        let Some(facts) = self.pod(id) else { return };
        let claims = match self.candidate(facts) {
            Ok(Some(addrs)) => addrs,
            _ => Vec::new(),
        };
        for addr in &claims {
            let mut others = Vec::new();
            if let Some(h) = self.by_ip.get_mut(addr) {
                for (p, c) in &mut h.0 {
                    if *p == id {
                        *c = true;
                    } else if *c {
                        others.push(*p);
                    }
                }
            }
            for p in others {
                if let Some(k) = self.pod(p).map(PodFacts::key) {
                    self.dirty_pods.insert(k);
                }
            }
        }
        if let Some(f) = self.pods.get_mut(id as usize).and_then(Option::as_mut) {
            f.claims = claims.into();
        }
    }

    /// The pod that owns `addr`: of the pods claiming it, the oldest.
    fn owner(&self, addr: &IpAddr) -> Option<PodId> {
        self.by_ip
            .get(addr)?
            .0
            .iter()
            .filter(|(_, claims)| *claims)
            .filter_map(|(p, _)| Some((self.pod(*p)?.rank(), *p)))
            .min()
            .map(|(_, p)| p)
    }

    /// Re-derives the claims of every pod of `node`.
    fn reclaim(&mut self, node: &str) {
        let ids: HashSet<PodId> = self.by_node.get(node).cloned().unwrap_or_default();
        for id in ids {
            self.release(id);
            self.claim(id);
            if let Some(k) = self.pod(id).map(PodFacts::key) {
                self.dirty_pods.insert(k);
            }
        }
    }

    pub fn apply_node(&mut self, node: &NodeObject) {
        let Some(name) = node.meta.name.clone() else {
            return;
        };
        let facts = NodeFacts {
            address: node
                .internal_ips
                .iter()
                .find(|a| a.is_ipv4())
                .or(node.internal_ips.first())
                .copied(),
            all_ips: node.all_ips.clone(),
            cidrs: node
                .pod_cidrs
                .iter()
                .filter_map(|c| parse_cidr(c))
                .collect(),
        };
        let old = self.nodes.insert(name.clone(), facts.clone());
        self.node_changed(&name, old, Some(facts));
    }

    pub fn delete_node(&mut self, name: &str) {
        let old = self.nodes.remove(name);
        self.node_changed(name, old, None);
    }

    fn node_changed(&mut self, name: &str, old: Option<NodeFacts>, new: Option<NodeFacts>) {
        let unchanged = match (&old, &new) {
            (Some(o), Some(n)) => {
                o.address == n.address && o.all_ips == n.all_ips && o.cidrs == n.cidrs
            }
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        self.dirty_nodes.insert(name.to_owned());
        self.reclaim(name);
    }

    fn identity(&mut self, namespace: &Arc<str>, sa: &Arc<str>) -> Result<SpiffeId, String> {
        let td = &self.trust_domain;
        self.identities
            .entry((namespace.clone(), sa.clone()))
            .or_insert_with(|| {
                SpiffeId::for_service_account(td, namespace, sa).map_err(|e| e.to_string())
            })
            .clone()
    }

    /// The workload `key` is now, and why not when it is refused.
    fn derive(&mut self, key: &WorkloadKey) -> (Option<Workload>, Option<Refusal>) {
        let k: (Arc<str>, Arc<str>) = (key.0.as_str().into(), key.1.as_str().into());
        let Some(id) = self.by_key.get(&k).copied() else {
            return (None, None);
        };
        let Some(facts) = self.pod(id) else {
            return (None, None);
        };
        let addrs = match self.candidate(facts) {
            Err(r) => return (None, Some(r)),
            Ok(None) => return (None, None),
            Ok(Some(a)) if a.is_empty() => return (None, None),
            Ok(Some(a)) => a,
        };
        let mut owned = Vec::new();
        let mut lost = None;
        for addr in addrs {
            match self.owner(&addr) {
                Some(p) if p == id => owned.push(addr),
                Some(p) => {
                    let by = self
                        .pod(p)
                        .map_or_else(String::new, |o| format!("{}/{}", o.namespace, o.name));
                    lost.get_or_insert(Refusal::AddressInUse { addr, by });
                }
                None => {}
            }
        }
        if owned.is_empty() {
            return (None, lost);
        }
        let (ns, sa, node) = (
            facts.namespace.clone(),
            facts.service_account.clone(),
            facts.node.clone().unwrap_or_else(|| Arc::from("")),
        );
        let identity = match self.identity(&ns, &sa) {
            Ok(id) => id,
            Err(error) => return (None, Some(Refusal::Identity { error })),
        };
        (
            Some(Workload {
                name: key.1.clone(),
                namespace: key.0.clone(),
                identity,
                node,
                addresses: owned,
            }),
            lost,
        )
    }

    /// What changed since the last call: the workloads and nodes to upsert or remove.
    pub fn take_updates(&mut self) -> Updates {
        let mut out = Updates::default();
        for name in std::mem::take(&mut self.dirty_nodes) {
            let node = self
                .nodes
                .get(&name)
                .and_then(|f| f.address)
                .map(|ip| Node {
                    name: name.clone(),
                    address: SocketAddr::new(ip, self.handshake_port),
                });
            out.nodes.push((name, node));
        }
        for key in std::mem::take(&mut self.dirty_pods) {
            let (workload, refusal) = self.derive(&key);
            let label = format!("{}/{}", key.0, key.1);
            match refusal {
                Some(r) => {
                    if self.refusals.current.get(&label) != Some(&r) {
                        tracing::info!(pod = %label, reason = %r, "pod left out of cluster state, or some of its addresses");
                        *self.refusals.total.entry(r.kind()).or_default() += 1;
                        self.refusals.current.insert(label, r);
                    }
                }
                None => {
                    self.refusals.current.remove(&label);
                }
            }
            out.workloads.push((key, workload));
        }
        // Shared strings and identities nothing uses any more (namespaces, nodes, service
        // accounts gone) are dropped once they outnumber the pods.
        if self.strings.len() + self.identities.len() > 2 * (self.by_key.len() + 64) {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.identities
                .retain(|(ns, sa), _| Arc::strong_count(ns) > 2 || Arc::strong_count(sa) > 2);
        }
        if self.refusals.current.len() > 2 * (self.by_key.len() + 16) {
            // Refusals of pods that are gone are removed as they are derived; this only bounds
            // what a flood of deleted pods could leave behind.
            let live: HashSet<String> = self
                .pods
                .iter()
                .flatten()
                .map(|f| format!("{}/{}", f.namespace, f.name))
                .collect();
            self.refusals.current.retain(|k, _| live.contains(k));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> PodObject {
        serde_json::from_value(json).unwrap()
    }

    fn node(name: &str, ip: &str, cidrs: &[&str]) -> NodeObject {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDRs": cidrs},
            "status": {"addresses": [{"type": "Hostname", "address": name},
                                     {"type": "InternalIP", "address": "fd00:18::1"},
                                     {"type": "InternalIP", "address": ip}]}
        }))
        .unwrap()
    }

    fn running(ns: &str, name: &str, node: &str, created: &str, ips: &[&str]) -> PodObject {
        pod(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": {"nodeName": node, "serviceAccountName": name},
            "status": {"phase": "Running", "podIPs": ips.iter().map(|i| serde_json::json!({"ip": i})).collect::<Vec<_>>()}
        }))
    }

    fn workloads(c: &mut KubeCluster) -> BTreeMap<String, Vec<IpAddr>> {
        c.take_updates()
            .workloads
            .into_iter()
            .filter_map(|(k, w)| Some((format!("{}/{}", k.0, k.1), w?.addresses)))
            .collect()
    }

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-02T00:00:00Z";

    #[test]
    fn pods_and_nodes_become_workloads_and_nodes() {
        let mut c = KubeCluster::new("cluster.local", 4181, true);
        c.apply_node(&node(
            "n1",
            "198.18.0.1",
            &["198.18.1.0/24", "fd00:18:1::/64"],
        ));
        c.apply_pod(running(
            "shop",
            "web",
            "n1",
            T0,
            &["198.18.1.2", "fd00:18:1::2"],
        ));
        let mut hostnet = running("kube-system", "proxy", "n1", T0, &["198.18.0.1"]);
        hostnet.host_network = true;
        c.apply_pod(hostnet);
        let mut done = running("shop", "done", "n1", T0, &["198.18.1.9"]);
        done.phase = Some("Succeeded".into());
        c.apply_pod(done);
        c.apply_pod(running("shop", "elsewhere", "n9", T0, &["198.18.9.2"]));
        let u = c.take_updates();
        assert_eq!(
            u.nodes,
            [(
                "n1".to_owned(),
                Some(Node {
                    name: "n1".into(),
                    address: "198.18.0.1:4181".parse().unwrap()
                })
            )]
        );
        let ws: Vec<&Workload> = u.workloads.iter().filter_map(|(_, w)| w.as_ref()).collect();
        assert_eq!(ws.len(), 1);
        assert_eq!(
            ws[0].identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(ws[0].addresses.len(), 2);
        assert_eq!(
            c.refusals()
                .current
                .get("shop/elsewhere")
                .map(Refusal::kind),
            Some("unknown_node")
        );
        assert!(!c.refusals().current.contains_key("kube-system/proxy"));
        // Nothing changed: nothing to derive.
        assert!(c.take_updates().workloads.is_empty());
    }

    /// What a kubelet writes into its pods' status cannot take another node's pod address, a
    /// node's own address, or make a mirror pod a workload.
    #[test]
    fn a_kubelet_cannot_claim_addresses_outside_its_pod_cidrs_or_node_addresses() {
        let mut c = KubeCluster::new("cluster.local", 4181, true);
        c.apply_node(&node("n1", "198.18.0.1", &["198.18.1.0/24"]));
        c.apply_node(&node("n2", "198.18.0.2", &["198.18.2.0/24"]));
        c.apply_pod(running("shop", "api", "n2", T0, &["198.18.2.2"]));
        // n1's kubelet reports n2's pod address, its own node address, and a mirror pod.
        c.apply_pod(running("shop", "thief", "n1", T1, &["198.18.2.2"]));
        c.apply_pod(running("shop", "node-ip", "n1", T1, &["198.18.0.1"]));
        let mut mirror = running("shop", "static", "n1", T1, &["198.18.1.5"]);
        mirror.meta.annotations = Some([("kubernetes.io/config.mirror".into(), "x".into())].into());
        c.apply_pod(mirror);
        let ws = workloads(&mut c);
        assert_eq!(ws.keys().collect::<Vec<_>>(), ["shop/api"]);
        let kinds: BTreeMap<&str, &str> = c
            .refusals()
            .current
            .iter()
            .map(|(k, r)| (k.as_str(), r.kind()))
            .collect();
        assert_eq!(kinds["shop/thief"], "outside_pod_cidrs");
        assert_eq!(kinds["shop/node-ip"], "node_address");
        assert_eq!(kinds["shop/static"], "mirror_pod");
        assert_eq!(c.refusals().total.values().sum::<u64>(), 3);
        // n1's kubelet lists n2's pod address among its own Node's addresses: that does not
        // take the pod away from n2.
        let mut listing = node("n1", "198.18.0.1", &["198.18.1.0/24"]);
        listing.all_ips.push("198.18.2.2".parse().unwrap());
        c.apply_node(&listing);
        assert!(workloads(&mut c).is_empty(), "n2's pod was re-derived");
        c.apply_pod(running("shop", "api", "n2", T0, &["198.18.2.2"]));
        assert!(
            workloads(&mut c).contains_key("shop/api"),
            "n2's pod was taken out"
        );
        // A node without podCIDRs is not checked.
        c.apply_node(&node("n3", "198.18.0.3", &[]));
        c.apply_pod(running("shop", "free", "n3", T1, &["198.18.7.7"]));
        assert!(workloads(&mut c).contains_key("shop/free"));
    }

    /// A terminating pod keeps its address; the new pod that was given it gets it only once the
    /// old one is gone from the API.
    #[test]
    fn a_reused_address_passes_to_the_new_pod_only_once_the_old_one_is_gone() {
        let mut c = KubeCluster::new("cluster.local", 4181, true);
        c.apply_node(&node("n1", "198.18.0.1", &["198.18.1.0/24"]));
        let mut old = running("shop", "old", "n1", T0, &["198.18.1.3"]);
        old.meta.deletion_timestamp = old.meta.creation_timestamp.clone();
        c.apply_pod(old.clone());
        c.apply_pod(running("shop", "new", "n1", T1, &["198.18.1.3"]));
        let ws = workloads(&mut c);
        assert_eq!(ws.keys().collect::<Vec<_>>(), ["shop/old"]);
        assert_eq!(
            c.refusals().current.get("shop/new").map(Refusal::kind),
            Some("address_in_use")
        );
        c.delete_pod(&old);
        let u = c.take_updates();
        let got: BTreeMap<String, bool> = u
            .workloads
            .iter()
            .map(|(k, w)| (k.1.clone(), w.is_some()))
            .collect();
        assert_eq!(got, [("new".into(), true), ("old".into(), false)].into());
        assert!(c.refusals().current.is_empty());
    }

    /// A node's podCIDRs changing re-derives its pods, and only its pods.
    #[test]
    fn a_node_change_re_derives_its_pods() {
        let mut c = KubeCluster::new("cluster.local", 4181, true);
        c.apply_node(&node("n1", "198.18.0.1", &["198.18.1.0/24"]));
        c.apply_node(&node("n2", "198.18.0.2", &["198.18.2.0/24"]));
        c.apply_pod(running("shop", "a", "n1", T0, &["198.18.1.2"]));
        c.apply_pod(running("shop", "b", "n2", T0, &["198.18.2.2"]));
        c.take_updates();
        c.apply_node(&node("n1", "198.18.0.1", &["198.18.3.0/24"]));
        let u = c.take_updates();
        assert_eq!(u.workloads.len(), 1, "{u:?}");
        assert_eq!(u.workloads[0].0.1, "a");
        assert!(u.workloads[0].1.is_none());
        c.delete_node("n2");
        let u = c.take_updates();
        assert_eq!(u.nodes, [("n2".to_owned(), None)]);
        assert!(u.workloads.iter().all(|(_, w)| w.is_none()));
    }

    #[test]
    fn cidrs_contain_what_they_should() {
        let c = parse_cidr("198.18.1.0/24").unwrap();
        assert!(in_cidr("198.18.1.255".parse().unwrap(), c));
        assert!(!in_cidr("198.18.2.0".parse().unwrap(), c));
        assert!(!in_cidr("fd00::1".parse().unwrap(), c));
        let c6 = parse_cidr("fd00:18:1::/64").unwrap();
        assert!(in_cidr("fd00:18:1::2".parse().unwrap(), c6));
        assert!(!in_cidr("fd00:18:2::2".parse().unwrap(), c6));
        assert!(in_cidr(
            "10.0.0.1".parse().unwrap(),
            parse_cidr("0.0.0.0/0").unwrap()
        ));
        assert_eq!(parse_cidr("198.18.1.0/33"), None);
    }
}
