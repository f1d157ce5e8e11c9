//! What the agent is told about the world: cluster state (from a file or the Kubernetes API)
//! and the authorization policy (from a file or a ConfigMap). This module owns both sources,
//! their last good values and their errors, and the [`Index`] of the cluster; it hands the
//! rest of the agent *changes* ([`Changes`]), never whole states to compare.
//!
//! The file source decodes the whole file when it changes (that stays proportional to the
//! file) and applies it to the index workload by workload, which records only what differs;
//! the Kubernetes source applies each watch event as it comes. Either way the work downstream
//! is proportional to what changed.

pub mod cluster_file;
pub mod index;
pub mod kube;
mod watched;

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::{Duration, Instant},
};

pub use self::{
    cluster_file::ClusterState,
    index::{Changes, Index, Node, Workload, WorkloadKey},
    kube::{KubeConfig, KubeSource},
    watched::Watched,
};
use crate::{
    handshake::{Directory, Owner},
    input::InputError,
    policy::Policy,
};

/// Where cluster state comes from.
pub enum ClusterSource {
    File(Watched<ClusterState>),
    Kube(KubeSource),
}

impl ClusterSource {
    #[must_use]
    pub fn file(path: PathBuf) -> Self {
        Self::File(Watched::with_parser(path, ClusterState::parse))
    }

    /// What the status and the log call it.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::File(f) => f.path().display().to_string(),
            Self::Kube(k) => k.description().to_owned(),
        }
    }
}

/// What one [`Inputs::poll`] brought.
#[derive(Debug, Default)]
pub struct Update {
    pub changes: Changes,
    /// The policy was replaced by a different one.
    pub policy: bool,
    /// Reading, decoding and comparing a changed cluster-state file (zero for the Kubernetes
    /// source, whose events are decoded as they arrive).
    pub decode: Duration,
}

impl Update {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && !self.policy
    }
}

/// The index, shared with the handshake tasks (which look up who owns an address); only
/// [`Inputs`] writes it.
pub type SharedIndex = Arc<RwLock<Index>>;

impl Directory for RwLock<Index> {
    fn owner(&self, addr: &IpAddr) -> Option<Owner> {
        let ix = self
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ix.owner(addr).map(|w| Owner {
            id: w.identity.clone(),
            node: w.node.clone(),
        })
    }

    fn node_address(&self, node: &str) -> Option<SocketAddr> {
        let ix = self
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ix.node(node).map(|n| n.address)
    }
}

pub struct Inputs {
    index: SharedIndex,
    source: ClusterSource,
    /// A valid cluster state has been applied.
    loaded: bool,
    cluster_error: Option<String>,
    policy: Arc<Policy>,
    policy_file: Option<Watched<Policy>>,
    policy_error: Option<String>,
    /// The policy comes from the Kubernetes source (a ConfigMap or the policy objects) rather
    /// than a file.
    policy_from_kube: bool,
    /// The policy objects in force and awaiting acceptance, when they are the source.
    policy_objects: Option<String>,
}

impl Inputs {
    /// Starts from `source`; a policy file, if any, must be valid to start.
    pub fn new(
        node: &str,
        source: ClusterSource,
        policy_path: Option<PathBuf>,
    ) -> Result<Self, InputError> {
        let (policy, policy_file) = match policy_path {
            None => (Policy::default(), None),
            Some(path) => {
                let mut src = Watched::with_parser(path.clone(), Policy::parse);
                match src.poll() {
                    Some(Ok(p)) => (p, Some(src)),
                    Some(Err(e)) => return Err(e),
                    None => return Err(InputError::file(&path, "could not be read")),
                }
            }
        };
        tracing::info!(policy = %policy.name, mode = policy.defaults.mode.as_str(), rules = policy.rules.len(), "policy loaded");
        let policy_from_kube =
            matches!(&source, ClusterSource::Kube(k) if k.config().policy_from_kube());
        let mut index = Index::new(node);
        if let ClusterSource::Kube(k) = &source {
            index.set_trust_domain(&k.config().trust_domain);
        }
        Ok(Self {
            index: Arc::new(RwLock::new(index)),
            source,
            loaded: false,
            cluster_error: None,
            policy: Arc::new(policy),
            policy_file,
            policy_error: None,
            policy_from_kube,
            policy_objects: None,
        })
    }

    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn index_mut(&self) -> RwLockWriteGuard<'_, Index> {
        self.index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The index itself, for readers in other tasks (the issuer's connections).
    #[must_use]
    pub fn shared_index(&self) -> SharedIndex {
        self.index.clone()
    }

    /// Who owns which address, for the handshake tasks.
    #[must_use]
    pub fn directory(&self) -> Arc<dyn Directory> {
        self.index.clone()
    }

    #[must_use]
    pub fn source(&self) -> &ClusterSource {
        &self.source
    }

    #[must_use]
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    #[must_use]
    pub fn cluster_error(&self) -> Option<&str> {
        self.cluster_error.as_deref()
    }

    #[must_use]
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    #[must_use]
    pub fn policy_error(&self) -> Option<&str> {
        self.policy_error.as_deref()
    }

    /// Where the policy comes from: its file, or its ConfigMap; `None` for the default.
    #[must_use]
    pub fn policy_source(&self) -> Option<String> {
        if let Some(f) = &self.policy_file {
            return Some(f.path().display().to_string());
        }
        match &self.source {
            ClusterSource::Kube(k) if self.policy_from_kube => {
                k.policy_label().map(|l| match &self.policy_objects {
                    Some(objects) => format!("{}: {objects}", l.display()),
                    None => l.display().to_string(),
                })
            }
            _ => None,
        }
    }

    /// Takes what changed in both sources since the last call and applies it to the index.
    pub fn poll(&mut self) -> Update {
        let mut update = Update::default();
        let mut kube_policy = None;
        match &mut self.source {
            ClusterSource::File(file) => {
                let started = Instant::now();
                if let Some(result) = file.poll() {
                    match result {
                        Ok(state) => {
                            let mut ix = self
                                .index
                                .write()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            apply_file(&mut ix, state);
                            tracing::info!(
                                source = %file.path().display(),
                                nodes = ix.nodes().count(),
                                workloads = ix.len(),
                                local = ix.local_count(),
                                "cluster state loaded"
                            );
                            // The issuer reads cluster state as no node (`here` empty).
                            if !ix.here().is_empty() && ix.node(ix.here()).is_none() {
                                tracing::warn!(node = %ix.here(), "this node is not in cluster state; no local pod will be enforced");
                            }
                            drop(ix);
                            // Decoding a large document leaves the allocator holding memory
                            // the agent no longer uses: give it back, so RSS reflects what is
                            // live.
                            // SAFETY: glibc's malloc_trim has no preconditions.
                            unsafe { libc::malloc_trim(0) };
                            self.loaded = true;
                            self.cluster_error = None;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cluster state rejected; the last good state stays in force");
                            self.cluster_error = Some(e.to_string());
                        }
                    }
                    update.decode = started.elapsed();
                }
            }
            ClusterSource::Kube(kube) => {
                let (updates, text) = kube.take();
                kube_policy = text;
                let mut ix = self
                    .index
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for (name, node) in updates.nodes {
                    match node {
                        Some(n) => ix.set_node(n),
                        None => ix.remove_node(&name),
                    }
                }
                for ((ns, name), w) in updates.workloads {
                    match w {
                        Some(w) => ix.upsert(w),
                        None => ix.remove(&ns, &name),
                    }
                }
                if kube.ready() && !self.loaded {
                    tracing::info!(
                        source = kube.description(),
                        nodes = ix.nodes().count(),
                        workloads = ix.len(),
                        local = ix.local_count(),
                        "cluster state loaded"
                    );
                    self.loaded = true;
                }
                drop(ix);
                self.cluster_error = kube.stopped().map(|w| {
                    format!(
                        "the Kubernetes watcher of {w} stopped; cluster state is no longer followed"
                    )
                });
            }
        }
        update.changes = self.index_mut().take_changes();
        if update.changes.all || update.changes.workloads > 0 {
            let ix = self.index();
            tracing::debug!(
                nodes = ix.nodes().count(),
                workloads = ix.len(),
                local = ix.local_count(),
                changed = update.changes.workloads,
                "cluster state updated"
            );
        }
        update.policy = self.poll_policy(kube_policy);
        update
    }

    fn poll_policy(&mut self, kube_policy: Option<kube::PolicyInput>) -> bool {
        let result = if self.policy_from_kube {
            let ClusterSource::Kube(k) = &self.source else {
                return false;
            };
            match kube_policy {
                None => return false,
                Some(kube::PolicyInput::Text(text)) => {
                    let label = k.policy_label().unwrap_or_default();
                    kube::parse_policy(&label, text)
                }
                Some(kube::PolicyInput::Objects(objects)) => {
                    let a =
                        crate::policy::objects::from_objects(&objects, &k.config().trust_domain);
                    if a.unusable.is_empty() {
                        self.policy_objects = Some(a.describe());
                        self.policy_error = None;
                        return self.replace_policy(a.policy);
                    }
                    // Leaving an object out could open what its rules close: the policy in
                    // force (and its description) stays until every object is usable again.
                    let error = format!(
                        "the policy in force stays unchanged; unusable here: {}",
                        a.unusable.join("; ")
                    );
                    if self.policy_error.as_ref() != Some(&error) {
                        tracing::error!(error = %error, "policy objects this agent cannot use");
                    }
                    self.policy_error = Some(error);
                    return false;
                }
            }
        } else {
            match self.policy_file.as_mut().and_then(Watched::poll) {
                Some(r) => r,
                None => return false,
            }
        };
        match result {
            Ok(p) => {
                self.policy_error = None;
                self.replace_policy(p)
            }
            Err(e) => {
                tracing::error!(error = %e, "policy rejected; the last good policy stays in force");
                self.policy_error = Some(e.to_string());
                false
            }
        }
    }

    /// Puts `p` in force; whether it differs from the policy in force.
    fn replace_policy(&mut self, p: Policy) -> bool {
        if *self.policy == p {
            tracing::debug!(policy = %p.name, "policy read again, unchanged");
            return false;
        }
        tracing::info!(policy = %p.name, mode = p.defaults.mode.as_str(), rules = p.rules.len(), "policy loaded");
        self.policy = Arc::new(p);
        true
    }

    /// The Kubernetes source's refusals (pods left out), if that is the source.
    #[must_use]
    pub fn refusals(&self) -> Option<kube::Refusals> {
        match &self.source {
            ClusterSource::Kube(k) => Some(k.refusals()),
            ClusterSource::File(_) => None,
        }
    }
}

/// Applies a decoded cluster-state file: what differs from the index is upserted, what the file
/// no longer has is removed.
fn apply_file(ix: &mut Index, state: ClusterState) {
    ix.set_trust_domain(&state.trust_domain);
    let gone: Vec<String> = ix
        .nodes()
        .filter(|n| !state.nodes.contains_key(&n.name))
        .map(|n| n.name.clone())
        .collect();
    for name in gone {
        ix.remove_node(&name);
    }
    for node in state.nodes.into_values() {
        ix.set_node(node);
    }
    let kept: HashSet<(&str, &str)> = state
        .workloads
        .iter()
        .map(|w| (w.namespace.as_str(), w.name.as_str()))
        .collect();
    let gone: Vec<WorkloadKey> = ix
        .workloads()
        .filter(|w| !kept.contains(&(w.namespace.as_str(), w.name.as_str())))
        .map(|w| w.key())
        .collect();
    drop(kept);
    for (ns, name) in gone {
        ix.remove(&ns, &name);
    }
    for w in state.workloads {
        ix.upsert(w);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_file_edit_touches_only_the_workload_it_changes() {
        let mut ix = Index::new("node-1");
        let parse = |t: &str| ClusterState::parse(Path::new("c.yaml"), t).unwrap();
        apply_file(&mut ix, parse(cluster_file::tests::GOOD));
        let first = ix.take_changes();
        assert!(first.all && first.local && first.nodes);
        assert_eq!(first.workloads, 3);
        apply_file(
            &mut ix,
            parse(&cluster_file::tests::GOOD.replace("198.18.2.3", "198.18.2.4")),
        );
        let c = ix.take_changes();
        assert!(!c.all && !c.local && !c.nodes);
        assert_eq!(c.workloads, 1);
        let addrs: HashSet<IpAddr> = ["198.18.2.3", "198.18.2.4"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(c.addrs, addrs);
        // A workload removed from the file leaves the index.
        let without = cluster_file::tests::GOOD.replace(
            "  - name: plain\n    node: node-2\n    addresses: [198.18.2.3]\n",
            "",
        );
        apply_file(&mut ix, parse(&without));
        assert_eq!(ix.take_changes().workloads, 1);
        assert_eq!(ix.len(), 2);
    }
}
