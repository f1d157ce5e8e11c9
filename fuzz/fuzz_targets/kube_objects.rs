//! Pods and Nodes as the Kubernetes source decodes them from the API server's JSON (only the
//! fields it keeps), applied one by one and turned into workloads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_agent::inputs::kube::{KubeCluster, NodeObject, PodObject};
use serde::Deserialize;

#[derive(Deserialize)]
struct Objects {
    #[serde(default)]
    pods: Vec<PodObject>,
    #[serde(default)]
    nodes: Vec<NodeObject>,
    /// Indexes of pods deleted after everything was applied.
    #[serde(default)]
    deleted: Vec<usize>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(objects) = serde_json::from_slice::<Objects>(data) else {
        return;
    };
    let mut cluster = KubeCluster::new("cluster.local", 4181, true);
    for n in &objects.nodes {
        cluster.apply_node(n);
    }
    for p in &objects.pods {
        cluster.apply_pod(p.clone());
    }
    for i in &objects.deleted {
        if let Some(p) = objects.pods.get(*i) {
            cluster.delete_pod(p);
        }
    }
    let updates = cluster.take_updates();
    // Whatever the objects say, an address belongs to one workload.
    let mut seen = std::collections::HashSet::new();
    for (_, w) in &updates.workloads {
        for a in w.iter().flat_map(|w| &w.addresses) {
            assert!(seen.insert(*a), "address {a} given to two workloads");
        }
    }
});
