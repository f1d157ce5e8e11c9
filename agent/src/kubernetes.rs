//! Cluster state from the Kubernetes API: Pods (addresses, node, namespace, service account →
//! SPIFFE ID), Nodes (handshake address) and, optionally, the policy ConfigMap, each through a
//! kube-runtime watcher (list, then watch with bookmarks; a watch that expires with 410 Gone is
//! answered by a fresh list, so no update is lost) and a reflector store. Whenever a store
//! changes, a new [`ClusterState`] (and policy) is built and published; the agent's core picks it
//! up at once.
//!
//! RBAC needed: get/list/watch on pods and nodes, and on configmaps in the policy's namespace.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures_util::TryStreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::{Notify, watch};

use crate::{
    cluster::{ClusterState, Node as ClusterNode, Workload},
    identity::SpiffeId,
    policy::Policy,
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
}

/// What the watchers publish.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub cluster: Option<ClusterState>,
    /// `None` until the ConfigMap is seen (or when none is configured).
    pub policy: Option<Result<Policy, String>>,
    /// Pods left out of cluster state, with why (for the log).
    pub skipped: Vec<String>,
}

/// The agent's handle on the watchers.
pub struct KubeSource {
    rx: watch::Receiver<Published>,
    notify: Arc<Notify>,
    description: String,
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
        let (tx, rx) = watch::channel(Published::default());
        let notify = Arc::new(Notify::new());
        tokio::spawn(run(client, config, tx, notify.clone()));
        Ok(Self {
            rx,
            notify,
            description,
        })
    }

    /// Wakes whenever something new was published.
    #[must_use]
    pub fn notify(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    #[must_use]
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The latest publication, if it changed since the last call.
    pub fn poll(&mut self) -> Option<Published> {
        if self.rx.has_changed().unwrap_or(false) {
            Some(self.rx.borrow_and_update().clone())
        } else {
            None
        }
    }

    /// Waits until the first cluster state was built from complete lists.
    pub async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let ready = tokio::time::timeout(limit, self.rx.wait_for(|p| p.cluster.is_some()))
            .await
            .map(|r| r.map(drop));
        match ready {
            Ok(Ok(())) => {
                // Leave it marked as changed so that the first poll returns it.
                self.rx.mark_changed();
                Ok(())
            }
            Ok(Err(_)) => anyhow::bail!("the Kubernetes watchers stopped"),
            Err(_) => anyhow::bail!(
                "no complete list of pods and nodes from the {} within {}s",
                self.description,
                limit.as_secs()
            ),
        }
    }
}

/// Tells the builder that a store changed. Raising it never waits, and any number of raises
/// before the builder looks again wake it once: a watcher's stream is polled however slowly the
/// builder works. (A list of thousands of objects arrives as thousands of events before the
/// builder runs even once: a bounded queue of one message per event would fill, stop the stream
/// that must finish the list, and the builder, waiting for that list, would never run.)
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

async fn run(
    client: Client,
    config: KubeConfig,
    tx: watch::Sender<Published>,
    notify: Arc<Notify>,
) {
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let (cms, cm_writer) = reflector::store::<ConfigMap>();
    let changed = Changed::default();
    let mut drivers = tokio::task::JoinSet::new();

    let pod_stream = reflector(
        pod_writer,
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        ),
    );
    drivers.spawn(drive("pods", pod_stream, changed.clone()));
    let node_stream = reflector(
        node_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        ),
    );
    drivers.spawn(drive("nodes", node_stream, changed.clone()));
    if let Some((ns, name)) = &config.policy_configmap {
        let cm_stream = reflector(
            cm_writer,
            watcher(
                Api::<ConfigMap>::namespaced(client.clone(), ns),
                watcher::Config::default()
                    .any_semantic()
                    .fields(&format!("metadata.name={name}")),
            ),
        );
        drivers.spawn(drive("configmap", cm_stream, changed.clone()));
    } else {
        drop(cm_writer);
    }
    // Nothing is published before the first complete lists: a partial view would revoke pairs.
    let _ = pods.wait_until_ready().await;
    let _ = nodes.wait_until_ready().await;
    if config.policy_configmap.is_some() {
        let _ = cms.wait_until_ready().await;
    }
    let mut last_skipped: Vec<String> = Vec::new();
    loop {
        let pod_list: Vec<Arc<Pod>> = pods.state();
        let node_list: Vec<Arc<Node>> = nodes.state();
        let (cluster, skipped) = build(&config, &pod_list, &node_list);
        if skipped != last_skipped {
            for s in &skipped {
                tracing::info!(pod = %s, "pod left out of cluster state");
            }
            last_skipped.clone_from(&skipped);
        }
        let policy = config.policy_configmap.as_ref().and_then(|(ns, name)| {
            let cm = cms
                .state()
                .into_iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))?;
            let label = PathBuf::from(format!("configmap {ns}/{name} key {POLICY_KEY}"));
            Some(match cm.data.as_ref().and_then(|d| d.get(POLICY_KEY)) {
                Some(text) => Policy::parse(&label, text).map_err(|e| e.to_string()),
                None => Err(format!("{}: no key `{POLICY_KEY}`", label.display())),
            })
        });
        tx.send_if_modified(|p| {
            let new = Published {
                cluster: Some(cluster),
                policy,
                skipped,
            };
            let changed = p.cluster != new.cluster || p.policy != new.policy;
            *p = new;
            changed
        });
        notify.notify_one();
        // Coalesce bursts: rebuild at most once per change batch.
        tokio::select! {
            () = changed.wait() => {}
            _ = drivers.join_next() => {
                tracing::error!("a Kubernetes watcher stopped; cluster state is no longer followed");
                return;
            }
        }
    }
}

/// Runs one watcher to completion (never, normally), logging its errors (the watcher backs off
/// and retries by itself: a 410 Gone becomes a fresh list) and raising `changed` at every
/// event. It never waits for the builder: the stream must go on being polled, for the store
/// sees the end of a list only through it.
async fn drive<K, S>(what: &'static str, stream: S, changed: Changed)
where
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let stream = stream.default_backoff();
    futures_util::pin_mut!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(ev)) => {
                if matches!(ev, watcher::Event::Init) {
                    tracing::debug!(what, "listing");
                }
                if matches!(ev, watcher::Event::InitDone) {
                    tracing::info!(what, "list complete; watching");
                }
                changed.raise();
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(what, error = %e, "Kubernetes watch failed; retrying with backoff");
            }
        }
        // Keep the loop from spinning if the stream yields errors back to back.
        tokio::task::yield_now().await;
    }
}

/// Cluster state from the stores: nodes by their InternalIP (IPv4 preferred), running pods
/// with addresses on a known node, not on the host network. Of two pods claiming one address,
/// the one not being deleted (else the newer) keeps it.
#[must_use]
pub fn build(
    config: &KubeConfig,
    pods: &[Arc<Pod>],
    nodes: &[Arc<Node>],
) -> (ClusterState, Vec<String>) {
    let mut out_nodes = BTreeMap::new();
    for n in nodes {
        let Some(name) = n.metadata.name.clone() else {
            continue;
        };
        let addrs: Vec<IpAddr> = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|a| {
                a.iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let Some(ip) = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) else {
            continue;
        };
        out_nodes.insert(
            name.clone(),
            ClusterNode {
                name,
                address: SocketAddr::new(*ip, config.handshake_port),
            },
        );
    }
    let mut skipped = Vec::new();
    let mut claimed: HashMap<IpAddr, (usize, bool, String)> = HashMap::new();
    let mut workloads: Vec<Workload> = Vec::new();
    let mut sorted: Vec<&Arc<Pod>> = pods.iter().collect();
    // Oldest first, so that a newer pod's claim on a reused address wins below.
    sorted.sort_by(|a, b| {
        (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            &a.metadata.namespace,
            &a.metadata.name,
        )
            .cmp(&(
                b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                &b.metadata.namespace,
                &b.metadata.name,
            ))
    });
    for p in sorted {
        let ns = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let name = p.metadata.name.clone().unwrap_or_default();
        let label = format!("{ns}/{name}");
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        if spec.and_then(|s| s.host_network) == Some(true) {
            continue;
        }
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
        if matches!(phase, "Succeeded" | "Failed") {
            continue;
        }
        let Some(node) = spec.and_then(|s| s.node_name.clone()) else {
            continue; // not scheduled yet
        };
        if !out_nodes.contains_key(&node) {
            skipped.push(format!(
                "{label}: node `{node}` has no InternalIP (or is unknown)"
            ));
            continue;
        }
        let mut addresses: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
            .unwrap_or_default();
        if addresses.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|i| i.parse().ok())
        {
            addresses.push(ip);
        }
        if addresses.is_empty() {
            continue; // no address yet
        }
        let sa = spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let identity = match SpiffeId::for_service_account(&config.trust_domain, &ns, &sa) {
            Ok(id) => id,
            Err(e) => {
                skipped.push(format!("{label}: {e}"));
                continue;
            }
        };
        let deleting = p.metadata.deletion_timestamp.is_some();
        let index = workloads.len();
        let mut kept = Vec::new();
        for a in addresses {
            if let Some((other, other_deleting, other_label)) = claimed.get(&a) {
                if !*other_deleting || deleting {
                    skipped.push(format!("{label}: address {a} is also {other_label}'s"));
                    continue;
                }
                // The other pod is being deleted: this one takes the address.
                skipped.push(format!("{other_label}: address {a} taken over by {label}"));
                workloads[*other].addresses.retain(|x| *x != a);
            }
            claimed.insert(a, (index, deleting, label.clone()));
            kept.push(a);
        }
        workloads.push(Workload {
            name,
            namespace: ns,
            identity,
            node: node.into(),
            addresses: kept,
        });
    }
    workloads.retain(|w| !w.addresses.is_empty());
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (
        ClusterState {
            trust_domain: config.trust_domain.clone(),
            nodes: out_nodes,
            workloads,
        },
        skipped,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Arc<Pod> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    fn cfg() -> KubeConfig {
        KubeConfig {
            api_server: None,
            trust_domain: "cluster.local".into(),
            handshake_port: 4181,
            policy_configmap: None,
        }
    }

    /// A list far longer than any queue between the watcher and the builder: the driver takes
    /// every event while nobody looks at the signal, and the signal then wakes the builder once.
    #[tokio::test(start_paused = true)]
    async fn a_long_list_is_taken_whole_while_the_builder_waits() {
        let events: Vec<Result<watcher::Event<Pod>, watcher::Error>> =
            std::iter::once(Ok(watcher::Event::Init))
                .chain((0..10_000).map(|i| {
                    let mut p = Pod::default();
                    p.metadata.name = Some(format!("p{i}"));
                    Ok(watcher::Event::InitApply(p))
                }))
                .chain(std::iter::once(Ok(watcher::Event::InitDone)))
                .collect();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = taken.clone();
        let stream =
            futures_util::StreamExt::inspect(futures_util::stream::iter(events), move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        let changed = Changed::default();
        tokio::time::timeout(
            Duration::from_secs(10),
            drive("pods", stream, changed.clone()),
        )
        .await
        .expect("the driver blocked before the end of the list");
        assert_eq!(taken.load(std::sync::atomic::Ordering::Relaxed), 10_002);
        tokio::time::timeout(Duration::from_millis(1), changed.wait())
            .await
            .expect("the builder is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(1), changed.wait())
                .await
                .is_err(),
            "10,002 raises wake the builder once"
        );
    }

    #[test]
    fn pods_and_nodes_become_cluster_state() {
        let nodes = vec![Arc::new(
            serde_json::from_value::<Node>(serde_json::json!({
                "metadata": {"name": "n1"},
                "status": {"addresses": [
                    {"type": "Hostname", "address": "n1"},
                    {"type": "InternalIP", "address": "fd00:18::1"},
                    {"type": "InternalIP", "address": "198.18.0.1"}
                ]}
            }))
            .unwrap(),
        )];
        let pods = vec![
            pod(serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"nodeName": "n1", "serviceAccountName": "frontend", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIPs": [{"ip": "198.18.1.2"}, {"ip": "fd00:18:1::2"}]}
            })),
            pod(serde_json::json!({
                "metadata": {"name": "probe", "namespace": "kube-system"},
                "spec": {"nodeName": "n1", "hostNetwork": true, "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": "198.18.0.1"}
            })),
            pod(serde_json::json!({
                "metadata": {"name": "done", "namespace": "shop"},
                "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                "status": {"phase": "Succeeded", "podIP": "198.18.1.9"}
            })),
            pod(serde_json::json!({
                "metadata": {"name": "elsewhere", "namespace": "shop"},
                "spec": {"nodeName": "n9", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": "198.18.9.2"}
            })),
            // An old pod being deleted and a new one reusing its address: the new one wins.
            pod(serde_json::json!({
                "metadata": {"name": "old", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z",
                             "deletionTimestamp": "2026-01-02T00:00:00Z"},
                "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": "198.18.1.3"}
            })),
            pod(serde_json::json!({
                "metadata": {"name": "new", "namespace": "shop", "creationTimestamp": "2026-01-02T00:00:00Z"},
                "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": "198.18.1.3"}
            })),
        ];
        let (c, skipped) = build(&cfg(), &pods, &nodes);
        assert_eq!(c.nodes["n1"].address, "198.18.0.1:4181".parse().unwrap());
        let names: Vec<&str> = c.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["new", "web"]);
        let web = &c.workloads[1];
        assert_eq!(
            web.identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/frontend"
        );
        assert_eq!(web.addresses.len(), 2);
        assert_eq!(
            c.workloads[0].identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/default"
        );
        assert!(
            skipped.iter().any(|s| s.contains("shop/elsewhere")),
            "{skipped:?}"
        );
        assert!(
            skipped.iter().any(|s| s.contains("taken over by shop/new")),
            "{skipped:?}"
        );
    }
}
