//! Credentials: the local workloads' SVIDs and the trust bundle (kept by the
//! [`Store`](crate::identity::store::Store)), and the TLS view handshakes use, published on a
//! `watch` channel by this one writer. Until a valid bundle and SVIDs exist, handshakes fail
//! closed.

pub mod issuer;

use std::{collections::BTreeSet, sync::Arc};

use tokio::sync::watch;

use crate::{
    config::{Identity, IdentitySource},
    handshake::{Directory, View},
    identity::{
        SpiffeId,
        store::{Source, Store},
    },
    inputs::Index,
    policy::Policy,
    status::IdentityInfo,
};

/// What a refresh changed.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// Local identities whose SVID is new or was replaced.
    pub rotated: Vec<SpiffeId>,
    /// The trust bundle changed.
    pub bundle: bool,
}

pub struct Creds {
    node: String,
    config: Option<Identity>,
    store: Option<Store>,
    /// Why the identity source or bundle is (partly) unusable, as last logged.
    problems: Vec<String>,
    view_tx: watch::Sender<Option<Arc<View>>>,
    view_rx: watch::Receiver<Option<Arc<View>>>,
    /// Raised when the issuer task obtained SVIDs: the core refreshes at once rather than at
    /// its next tick, so that a handshake waiting for one does not wait a poll interval.
    arrived: crate::inputs::kube::Changed,
}

impl Creds {
    #[must_use]
    pub fn new(node: &str, config: Option<Identity>) -> Self {
        let (view_tx, view_rx) = watch::channel(None);
        Self {
            node: node.to_owned(),
            config,
            store: None,
            problems: Vec::new(),
            view_tx,
            view_rx,
            arrived: crate::inputs::kube::Changed::default(),
        }
    }

    /// Raised when new SVIDs wait to be loaded (source `issuer`).
    #[must_use]
    pub fn arrived(&self) -> crate::inputs::kube::Changed {
        self.arrived.clone()
    }

    /// Whether an identity source is configured (without one the agent enforces but never
    /// authenticates).
    #[must_use]
    pub fn configured(&self) -> bool {
        self.config.is_some()
    }

    #[must_use]
    pub fn view(&self) -> &watch::Receiver<Option<Arc<View>>> {
        &self.view_rx
    }

    #[must_use]
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// Brings the SVIDs of the local workloads and the bundle up to date, and publishes a new
    /// view when they, or the policy (`republish`), changed.
    pub fn refresh(
        &mut self,
        index: &Index,
        directory: &Arc<dyn Directory>,
        policy: &Arc<Policy>,
        republish: bool,
    ) -> Refreshed {
        let Some(identity) = &self.config else {
            return Refreshed::default();
        };
        if self.store.is_none() {
            let source = match &identity.source {
                IdentitySource::Ca { dir, svid_ttl_secs } => {
                    tracing::warn!(
                        ca = %dir.display(),
                        "identity source `ca`: this node holds the CA key, so root on it can mint any identity of the trust domain; use source `issuer` on a cluster"
                    );
                    Source::Ca {
                        dir: dir.clone(),
                        ttl: std::time::Duration::from_secs(*svid_ttl_secs),
                    }
                }
                IdentitySource::Files { dir } => Source::Files { dir: dir.clone() },
                IdentitySource::Issuer { addresses, attest } => {
                    Source::Issuer(issuer::IssuerHandle::start(issuer::Settings {
                        node: self.node.clone(),
                        trust_domain: index.trust_domain().to_owned(),
                        addresses: addresses.clone(),
                        attest: attest.clone(),
                        bundle: identity.trust_bundle.clone(),
                        arrived: self.arrived.clone(),
                    }))
                }
            };
            let node = crate::issuer::protocol::node_id(index.trust_domain(), &self.node)
                .map_err(|e| format!("node name `{}` as a SPIFFE ID: {e}", self.node));
            match node.and_then(|node| {
                let mut store =
                    Store::new(source, identity.trust_bundle.clone(), index.trust_domain())?;
                store.set_node(node);
                Ok(store)
            }) {
                Ok(store) => self.store = Some(store),
                Err(e) => {
                    if self.problems.first() != Some(&e) {
                        tracing::error!(error = %e, "identity source unusable; handshakes fail closed until it is fixed");
                    }
                    self.problems = vec![e];
                    return Refreshed::default();
                }
            }
        }
        let Some(store) = self.store.as_mut() else {
            return Refreshed::default();
        };
        let wanted: BTreeSet<SpiffeId> = index
            .local_workloads()
            .map(|w| w.identity.clone())
            .collect();
        let changes = store.refresh(&wanted);
        if store.problems != self.problems {
            for p in &store.problems {
                tracing::warn!(problem = %p, "identity");
            }
            self.problems.clone_from(&store.problems);
        }
        for id in &changes.rotated {
            let svid = store.svids().find(|s| &s.id == id);
            tracing::info!(identity = %id, serial = svid.map_or("", |s| s.serial.as_str()), "SVID loaded");
        }
        if changes.any() || republish || self.view_rx.borrow().is_none() {
            self.publish(index.trust_domain(), directory, policy);
        }
        Refreshed {
            rotated: changes.rotated,
            bundle: changes.bundle,
        }
    }

    fn publish(
        &mut self,
        trust_domain: &str,
        directory: &Arc<dyn Directory>,
        policy: &Arc<Policy>,
    ) {
        let Some(store) = &self.store else { return };
        let Some(bundle) = store.bundle() else {
            self.view_tx.send_replace(None);
            return;
        };
        let trust = match crate::tls::Trust::new(trust_domain, bundle) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "trust bundle unusable");
                self.view_tx.send_replace(None);
                return;
            }
        };
        let node_svid = store.node_svid();
        let svids: Vec<_> = store
            .svids()
            .filter(|s| Some(&s.id) != node_svid.map(|n| &n.id))
            .cloned()
            .collect();
        match View::build(
            &self.node,
            trust,
            directory.clone(),
            node_svid,
            &svids,
            policy.clone(),
        ) {
            Ok(view) => {
                self.view_tx.send_replace(Some(Arc::new(view)));
            }
            Err(e) => tracing::error!(error = %e, "cannot build the handshake configuration"),
        }
    }

    /// A handshake needs the SVID of `id` now (issuer source: asked for first).
    pub fn urgent(&self, id: &SpiffeId) {
        if let Some(store) = &self.store {
            store.urgent(id);
        }
    }

    /// When the node SVID expires, once there is one.
    #[must_use]
    pub fn node_svid_not_after(&self) -> Option<std::time::SystemTime> {
        self.store.as_ref()?.node_svid().map(|s| s.not_after)
    }

    /// Why handshakes cannot run for every local workload yet.
    #[must_use]
    pub fn not_ready(&self, index: &Index) -> Vec<String> {
        if self.config.is_none() {
            return Vec::new();
        }
        let Some(store) = &self.store else {
            return vec!["identity source unusable".to_owned()];
        };
        let mut out = Vec::new();
        if store.bundle().is_none() {
            out.push("no trust bundle".to_owned());
        }
        if store.node_svid().is_none() {
            out.push(format!("no node SVID for {}", self.node));
        }
        for w in index.local_workloads() {
            if !store.svids().any(|s| s.id == w.identity) {
                out.push(format!("no SVID for {}", w.identity));
            }
        }
        out
    }

    /// The local SVIDs, for `status`.
    #[must_use]
    pub fn identities(&self) -> Vec<IdentityInfo> {
        let Some(store) = &self.store else {
            return Vec::new();
        };
        let now = tokio::time::Instant::now();
        let node = store.node_svid().map(|n| n.id.clone());
        let mut out: Vec<IdentityInfo> = store
            .svids()
            .filter(|s| Some(&s.id) != node.as_ref())
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
