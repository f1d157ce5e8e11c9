//! Cluster state from the Kubernetes API: Pods and Nodes (and, optionally, the policy: the
//! `PortcullisPolicy` and `PortcullisClusterPolicy` objects, or the policy ConfigMap), each
//! through a kube-runtime watcher (list in pages, then watch with bookmarks; a
//! watch that expires with 410 Gone is answered by a fresh list, so no update is lost).
//!
//! Each watch event is applied at once, on the watcher's task, to [`KubeCluster`] (the pods'
//! and nodes' few fields the agent uses, and the rules that turn them into workloads), which
//! marks what the event affects; the core takes the resulting workload and node updates when
//! it is signalled. Nothing is queued per event, so a burst of events costs one signal and one
//! pass over what changed, and a watcher's stream is never held up by the core: its store
//! sees the end of a list only by being polled.
//!
//! RBAC needed: get/list/watch on pods and nodes, and on the policy objects (or on configmaps in
//! the policy's namespace); the issuer also updates the policy objects' `status`.

mod cluster;
mod objects;

use std::{
    collections::{BTreeSet, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures_util::TryStreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::Notify;

pub use self::{
    cluster::{KubeCluster, Refusal, Refusals, Updates},
    objects::{NodeObject, PodObject},
};
use crate::policy::{
    Policy,
    crd::{Decoded, ObjectKey, PolicyResource, PortcullisClusterPolicy, PortcullisPolicy, key_of},
    objects::PolicyObjects,
};

/// The key of the policy ConfigMap that holds the policy document.
pub const POLICY_KEY: &str = "policy.yaml";

/// Where to find the API server and what to read from it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KubeConfig {
    /// `None`: in-cluster configuration (service account), or the kubeconfig.
    pub api_server: Option<String>,
    pub trust_domain: String,
    /// The port every agent accepts handshakes on (at its node's InternalIP).
    pub handshake_port: u16,
    /// `(namespace, name)` of the policy ConfigMap.
    pub policy_configmap: Option<(String, String)>,
    /// The policy comes from the `PortcullisPolicy` and `PortcullisClusterPolicy` objects.
    pub policy_resources: bool,
    /// This is the issuer, the one writer of the policy objects' status: queue every change of
    /// one for [`StatusFeed`]. Not a setting of the file.
    #[serde(skip)]
    pub write_policy_status: bool,
    /// A pod's addresses must lie in its node's `spec.podCIDRs` (when it has any). Off for
    /// CNIs whose address management ignores them.
    pub check_pod_cidrs: bool,
}

impl KubeConfig {
    /// The policy comes from the API server (the policy objects or a ConfigMap).
    #[must_use]
    pub fn policy_from_kube(&self) -> bool {
        self.policy_resources || self.policy_configmap.is_some()
    }
}

/// Tells the core that something changed. Raising it never waits, and any number of raises
/// before the core looks again wake it once: a watcher's stream is polled however slowly the
/// core works. (A list of thousands of objects arrives as thousands of events before the core
/// runs even once: a bounded queue of one message per event would fill, stop the stream that
/// must finish the list, and the core, waiting for that list, would never run.)
#[derive(Debug, Clone, Default)]
pub struct Changed(Arc<Notify>);

impl Changed {
    pub fn raise(&self) {
        self.0.notify_one();
    }

    /// Returns at once if raised since the last wait, else at the next raise.
    pub async fn wait(&self) {
        self.0.notified().await;
    }
}

/// What the watchers have applied, shared between their tasks and the core.
#[derive(Debug)]
struct Shared {
    cluster: KubeCluster,
    /// Per watcher: whether its first list is complete.
    listed: [bool; WATCHERS],
    /// Keys seen during the list under way, per watcher (a re-list after 410 Gone removes what
    /// it did not see).
    relisting: [Option<HashSet<String>>; WATCHERS],
    /// The policy ConfigMap's latest text (`None`: no such ConfigMap or key), when it changed
    /// since the core last took it.
    policy: Option<Option<String>>,
    /// The policy objects.
    objects: PolicyObjects,
    /// The objects changed since the core last took them.
    objects_changed: bool,
    /// For the issuer: keys of the objects changed since the status writer last took them.
    status_queue: Option<BTreeSet<ObjectKey>>,
    status_changed: Arc<Notify>,
    /// A watcher stopped for good: cluster state is no longer followed.
    stopped: Option<&'static str>,
}

const PODS: usize = 0;
const NODES: usize = 1;
const CONFIGMAP: usize = 2;
const POLICIES: usize = 3;
const CLUSTER_POLICIES: usize = 4;
const WATCHERS: usize = 5;
const WATCHER_NAMES: [&str; WATCHERS] = [
    "pods",
    "nodes",
    "configmap",
    "portcullispolicies",
    "portcullisclusterpolicies",
];

/// The policy, as the Kubernetes source last saw it.
#[derive(Debug)]
pub enum PolicyInput {
    /// The ConfigMap's text (`None`: no such ConfigMap, or no such key in it).
    Text(Option<String>),
    Objects(PolicyObjects),
}

/// One changed policy object, for the status writer.
#[derive(Debug)]
pub enum ChangedObject {
    Namespaced(PortcullisPolicy),
    Cluster(PortcullisClusterPolicy),
}

/// The issuer's view of policy objects that changed.
#[derive(Clone)]
pub struct StatusFeed {
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
}

impl StatusFeed {
    /// Returns at once if something changed since the last wait, else at the next change.
    pub async fn wait(&self) {
        self.changed.notified().await;
    }

    /// The objects changed since the last call, as they are now (deleted ones are left out).
    #[must_use]
    pub fn take(&self) -> Vec<ChangedObject> {
        let mut s = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let keys = s
            .status_queue
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        fn object<K: PolicyResource>(s: &Shared, key: &ObjectKey) -> Option<K> {
            match &K::stored(&s.objects).get(key)?.object {
                Ok(o) => Some(o.clone()),
                Err(e) => {
                    tracing::warn!(object = %crate::policy::crd::label(key), error = %e, "a policy object this version cannot read: no status written");
                    None
                }
            }
        }
        keys.into_iter()
            .filter_map(|key| match key.0 {
                Some(_) => object(&s, &key).map(ChangedObject::Namespaced),
                None => object(&s, &key).map(ChangedObject::Cluster),
            })
            .collect()
    }

    /// Looks at `key` again at the next [`Self::take`] (a write that failed).
    pub fn requeue(&self, key: ObjectKey) {
        let mut s = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(q) = &mut s.status_queue {
            q.insert(key);
        }
        drop(s);
        self.changed.notify_one();
    }
}

/// The agent's handle on the watchers.
pub struct KubeSource {
    shared: Arc<Mutex<Shared>>,
    changed: Changed,
    config: KubeConfig,
    description: String,
    /// The API client the watchers use (the issuer's TokenReviews go through it too).
    client: Client,
}

impl KubeSource {
    /// Starts the watchers on the current tokio runtime.
    pub async fn start(config: KubeConfig) -> anyhow::Result<Self> {
        let client = match &config.api_server {
            Some(url) => {
                let uri = url
                    .parse()
                    .map_err(|e| anyhow::anyhow!("kubernetes.api_server `{url}`: {e}"))?;
                Client::try_from(kube::Config::new(uri))?
            }
            None => Client::try_default().await.map_err(|e| {
                anyhow::anyhow!("no Kubernetes API configuration (in-cluster or kubeconfig): {e}")
            })?,
        };
        let description = format!(
            "kubernetes API {}",
            config.api_server.as_deref().unwrap_or("(in-cluster)")
        );
        let shared = Arc::new(Mutex::new(Shared {
            cluster: KubeCluster::new(
                &config.trust_domain,
                config.handshake_port,
                config.check_pod_cidrs,
            ),
            listed: [
                false,
                false,
                config.policy_configmap.is_none(),
                !config.policy_resources,
                !config.policy_resources,
            ],
            relisting: Default::default(),
            policy: None,
            objects: PolicyObjects::default(),
            objects_changed: false,
            status_queue: config.write_policy_status.then(BTreeSet::new),
            status_changed: Arc::new(Notify::new()),
            stopped: None,
        }));
        let changed = Changed::default();
        let wc = || watcher::Config::default().any_semantic();
        let api_client = client.clone();
        tokio::spawn(drive(
            PODS,
            watcher(Api::<PodObject>::all(client.clone()), wc()),
            shared.clone(),
            changed.clone(),
        ));
        tokio::spawn(drive(
            NODES,
            watcher(Api::<NodeObject>::all(client.clone()), wc()),
            shared.clone(),
            changed.clone(),
        ));
        if let Some((ns, name)) = &config.policy_configmap {
            let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
            tokio::spawn(drive(
                CONFIGMAP,
                watcher(api, wc().fields(&format!("metadata.name={name}"))),
                shared.clone(),
                changed.clone(),
            ));
        }
        if config.policy_resources {
            tokio::spawn(drive(
                POLICIES,
                watcher(Api::<Decoded<PortcullisPolicy>>::all(client.clone()), wc()),
                shared.clone(),
                changed.clone(),
            ));
            tokio::spawn(drive(
                CLUSTER_POLICIES,
                watcher(
                    Api::<Decoded<PortcullisClusterPolicy>>::all(client.clone()),
                    wc(),
                ),
                shared.clone(),
                changed.clone(),
            ));
        }
        Ok(Self {
            shared,
            changed,
            config,
            description,
            client: api_client,
        })
    }

    #[must_use]
    pub fn description(&self) -> &str {
        &self.description
    }

    #[must_use]
    pub fn config(&self) -> &KubeConfig {
        &self.config
    }

    /// The API client the watchers use.
    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Raised whenever a watcher applied something.
    #[must_use]
    pub fn changed(&self) -> Changed {
        self.changed.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A watcher task that panicked while holding the lock leaves plain data behind.
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether every first list is complete (nothing is taken before: a partial view would
    /// revoke pairs).
    #[must_use]
    pub fn ready(&self) -> bool {
        self.lock().listed.iter().all(|l| *l)
    }

    /// Waits until the first lists are complete.
    pub async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let ready = tokio::time::timeout(limit, async {
            loop {
                if self.ready() {
                    return Ok(());
                }
                if let Some(what) = self.lock().stopped {
                    anyhow::bail!("the Kubernetes watcher of {what} stopped");
                }
                self.changed.wait().await;
            }
        })
        .await;
        // The core takes the state at its first poll.
        self.changed.raise();
        match ready {
            Ok(r) => r,
            Err(_) => {
                let missing: Vec<&str> = {
                    let s = self.lock();
                    (0..WATCHERS)
                        .filter(|w| !s.listed[*w])
                        .map(|w| WATCHER_NAMES[w])
                        .collect()
                };
                anyhow::bail!(
                    "no complete list of {} from the {} within {}s",
                    missing.join(", "),
                    self.description,
                    limit.as_secs()
                )
            }
        }
    }

    /// The workload and node updates since the last call, and the policy if it changed.
    pub fn take(&self) -> (Updates, Option<PolicyInput>) {
        let mut s = self.lock();
        if !s.listed.iter().all(|l| *l) {
            return (Updates::default(), None);
        }
        let policy = if self.config.policy_resources {
            std::mem::take(&mut s.objects_changed).then(|| PolicyInput::Objects(s.objects.clone()))
        } else {
            s.policy.take().map(PolicyInput::Text)
        };
        (s.cluster.take_updates(), policy)
    }

    /// The policy objects' changes, for the issuer's status writer (`None` unless
    /// `write_policy_status`).
    #[must_use]
    pub fn status_feed(&self) -> Option<StatusFeed> {
        let s = self.lock();
        s.status_queue.as_ref()?;
        Some(StatusFeed {
            shared: self.shared.clone(),
            changed: s.status_changed.clone(),
        })
    }

    /// Pods left out of cluster state now, and counts since start.
    #[must_use]
    pub fn refusals(&self) -> Refusals {
        self.lock().cluster.refusals().clone()
    }

    /// Why cluster state is no longer followed, if it is not.
    #[must_use]
    pub fn stopped(&self) -> Option<&'static str> {
        self.lock().stopped
    }

    /// Where the policy comes from, for its errors.
    #[must_use]
    pub fn policy_label(&self) -> Option<PathBuf> {
        if self.config.policy_resources {
            return Some(PathBuf::from(
                "PortcullisPolicy and PortcullisClusterPolicy objects",
            ));
        }
        let (ns, name) = self.config.policy_configmap.as_ref()?;
        Some(PathBuf::from(format!(
            "configmap {ns}/{name} key {POLICY_KEY}"
        )))
    }
}

/// An object a watcher delivers, applied to the shared state.
trait Watched: Sized {
    /// A key unique among the objects of its watcher.
    fn key(&self) -> String;
    fn apply(self, s: &mut Shared);
    fn delete(self, s: &mut Shared);
    /// Removes, at the end of a re-list, an object the list did not show.
    fn forget(key: &str, s: &mut Shared);
}

impl Watched for PodObject {
    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.meta.namespace.as_deref().unwrap_or("default"),
            self.meta.name.as_deref().unwrap_or("")
        )
    }

    fn apply(self, s: &mut Shared) {
        s.cluster.apply_pod(self);
    }

    fn delete(self, s: &mut Shared) {
        s.cluster.delete_pod(&self);
    }

    fn forget(key: &str, s: &mut Shared) {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        let mut pod = PodObject::default();
        pod.meta.namespace = Some(ns.to_owned());
        pod.meta.name = Some(name.to_owned());
        s.cluster.delete_pod(&pod);
    }
}

impl Watched for NodeObject {
    fn key(&self) -> String {
        self.meta.name.clone().unwrap_or_default()
    }

    fn apply(self, s: &mut Shared) {
        s.cluster.apply_node(&self);
    }

    fn delete(self, s: &mut Shared) {
        if let Some(name) = &self.meta.name {
            s.cluster.delete_node(name);
        }
    }

    fn forget(key: &str, s: &mut Shared) {
        s.cluster.delete_node(key);
    }
}

impl Watched for ConfigMap {
    fn key(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }

    fn apply(self, s: &mut Shared) {
        let text = self.data.and_then(|mut d| d.remove(POLICY_KEY));
        s.policy = Some(text);
    }

    fn delete(self, s: &mut Shared) {
        s.policy = Some(None);
    }

    fn forget(_key: &str, s: &mut Shared) {
        s.policy = Some(None);
    }
}

impl Shared {
    fn object_changed(&mut self, key: ObjectKey) {
        self.objects_changed = true;
        if let Some(q) = &mut self.status_queue {
            q.insert(key);
            self.status_changed.notify_one();
        }
    }
}

/// The watcher's key of a policy object: `namespace/name`, or `name` (cluster-scoped: a
/// namespaced key always has a `/`, a name never does).
fn key_string((ns, name): &ObjectKey) -> String {
    match ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.clone(),
    }
}

fn parse_key(key: &str) -> ObjectKey {
    match key.split_once('/') {
        Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
        None => (None, key.to_owned()),
    }
}

/// Both kinds of policy object, decoded or not (one this version cannot read is kept, and
/// keeps the policy in force from changing: see `objects::Assembled::unusable`).
impl<K: PolicyResource> Watched for Decoded<K> {
    fn key(&self) -> String {
        key_string(&key_of(&self.meta))
    }

    fn apply(self, s: &mut Shared) {
        let key = key_of(&self.meta);
        s.object_changed(key.clone());
        K::stored_mut(&mut s.objects).insert(key, self);
    }

    fn delete(self, s: &mut Shared) {
        Self::forget(&self.key(), s);
    }

    fn forget(key: &str, s: &mut Shared) {
        let key = parse_key(key);
        if K::stored_mut(&mut s.objects).remove(&key).is_some() {
            s.object_changed(key);
        }
    }
}

/// Keys the cluster holds for watcher `which`, to remove at the end of a re-list those the new
/// list did not show.
fn known_keys(which: usize, s: &Shared) -> Vec<String> {
    match which {
        PODS => s
            .cluster
            .pod_keys()
            .into_iter()
            .map(|(ns, name)| format!("{ns}/{name}"))
            .collect(),
        NODES => s.cluster.node_names(),
        POLICIES => s.objects.namespaced.keys().map(key_string).collect(),
        CLUSTER_POLICIES => s.objects.cluster.keys().map(key_string).collect(),
        _ => Vec::new(),
    }
}

/// Applies one watcher event under the lock.
fn on_event<K: Watched>(which: usize, ev: watcher::Event<K>, s: &mut Shared) {
    match ev {
        watcher::Event::Init => {
            tracing::debug!(watcher = which, "listing");
            s.relisting[which] = Some(HashSet::new());
        }
        watcher::Event::InitApply(obj) => {
            if let Some(seen) = &mut s.relisting[which] {
                seen.insert(obj.key());
            }
            obj.apply(s);
        }
        watcher::Event::InitDone => {
            let seen = s.relisting[which].take().unwrap_or_default();
            if which == CONFIGMAP && seen.is_empty() {
                s.policy = Some(None);
            }
            if which == POLICIES || which == CLUSTER_POLICIES {
                // The first list of none is a policy too (the default).
                s.objects_changed = true;
            }
            for key in known_keys(which, s) {
                if !seen.contains(&key) {
                    K::forget(&key, s);
                }
            }
            if !s.listed[which] {
                tracing::info!(watcher = which, "list complete; watching");
            }
            s.listed[which] = true;
        }
        watcher::Event::Apply(obj) => obj.apply(s),
        watcher::Event::Delete(obj) => obj.delete(s),
    }
}

/// Runs one watcher to completion (never, normally), applying its events and logging its
/// errors (the watcher backs off and retries by itself: a 410 Gone becomes a fresh list).
async fn drive<K, S>(which: usize, stream: S, shared: Arc<Mutex<Shared>>, changed: Changed)
where
    K: Watched,
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let stream = stream.default_backoff();
    futures_util::pin_mut!(stream);
    let name = WATCHER_NAMES[which];
    loop {
        match stream.try_next().await {
            Ok(Some(ev)) => {
                let mut s = shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                on_event(which, ev, &mut s);
                drop(s);
                changed.raise();
            }
            Ok(None) => {
                tracing::error!(
                    watcher = name,
                    "a Kubernetes watcher stopped; cluster state is no longer followed"
                );
                shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .stopped = Some(name);
                changed.raise();
                return;
            }
            Err(e) => {
                let not_served = matches!(&e,
                    watcher::Error::InitialListFailed(kube::Error::Api(s))
                    | watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 404);
                if (which == POLICIES || which == CLUSTER_POLICIES) && not_served {
                    tracing::error!(watcher = name, error = %e, "the policy resources are not served: install their definitions (`portcullis crds | kubectl apply -f -`, deploy/crds.yaml); retrying with backoff");
                } else {
                    tracing::warn!(watcher = name, error = %e, "Kubernetes watch failed; retrying with backoff");
                }
            }
        }
        // Keep the loop from spinning if the stream yields errors back to back.
        tokio::task::yield_now().await;
    }
}

/// Parses the policy ConfigMap's text (`None`: no such ConfigMap, or no such key in it).
pub fn parse_policy(
    label: &std::path::Path,
    text: Option<String>,
) -> Result<Policy, crate::input::InputError> {
    match text {
        Some(text) => Policy::parse(label, &text),
        None => Err(crate::input::InputError::file(
            label,
            "no such ConfigMap, or no such key in it",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Mutex<Shared>> {
        Arc::new(Mutex::new(Shared {
            cluster: KubeCluster::new("cluster.local", 4181, true),
            listed: [false, false, true, true, true],
            relisting: Default::default(),
            policy: None,
            objects: PolicyObjects::default(),
            objects_changed: false,
            status_queue: None,
            status_changed: Arc::new(Notify::new()),
            stopped: None,
        }))
    }

    /// A list far longer than any queue between the watcher and the core: the driver takes
    /// every event while nobody looks at the signal, and the signal then wakes the core once.
    #[tokio::test(start_paused = true)]
    async fn a_long_list_is_taken_whole_while_the_core_waits() {
        let events: Vec<Result<watcher::Event<PodObject>, watcher::Error>> =
            std::iter::once(Ok(watcher::Event::Init))
                .chain((0..10_000).map(|i| {
                    let mut p = PodObject::default();
                    p.meta.name = Some(format!("p{i}"));
                    Ok(watcher::Event::InitApply(p))
                }))
                .chain(std::iter::once(Ok(watcher::Event::InitDone)))
                .chain(std::iter::once(Err(watcher::Error::NoResourceVersion)))
                .collect();
        let s = shared();
        let changed = Changed::default();
        let run = drive(
            PODS,
            futures_util::stream::iter(events),
            s.clone(),
            changed.clone(),
        );
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the driver blocked before the end of the list");
        {
            let st = s.lock().unwrap();
            assert!(st.listed[PODS]);
            assert_eq!(st.cluster.pod_keys().len(), 10_000);
        }
        tokio::time::timeout(Duration::from_millis(1), changed.wait())
            .await
            .expect("the core is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(1), changed.wait())
                .await
                .is_err(),
            "10,002 raises wake the core once"
        );
    }

    /// A re-list after 410 Gone removes the objects it no longer shows.
    #[test]
    fn a_relist_forgets_what_it_did_not_show() {
        let s = shared();
        let mut st = s.lock().unwrap();
        let pod = |name: &str| {
            let mut p = PodObject::default();
            p.meta.name = Some(name.into());
            p
        };
        on_event::<PodObject>(PODS, watcher::Event::Init, &mut st);
        on_event(PODS, watcher::Event::InitApply(pod("a")), &mut st);
        on_event(PODS, watcher::Event::InitApply(pod("b")), &mut st);
        on_event::<PodObject>(PODS, watcher::Event::InitDone, &mut st);
        on_event::<PodObject>(PODS, watcher::Event::Init, &mut st);
        on_event(PODS, watcher::Event::InitApply(pod("b")), &mut st);
        on_event::<PodObject>(PODS, watcher::Event::InitDone, &mut st);
        assert_eq!(st.cluster.pod_keys(), [("default".into(), "b".into())]);
    }
}
