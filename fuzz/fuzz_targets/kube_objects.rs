//! Pods and Nodes as the Kubernetes watcher decodes them from the API server's JSON, turned
//! into cluster state.
#![no_main]

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use libfuzzer_sys::fuzz_target;
use portcullis_agent::kubernetes::{KubeConfig, build};
use serde::Deserialize;

#[derive(Deserialize)]
struct Objects {
    #[serde(default)]
    pods: Vec<Pod>,
    #[serde(default)]
    nodes: Vec<Node>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(objects) = serde_json::from_slice::<Objects>(data) else {
        return;
    };
    let config = KubeConfig {
        api_server: None,
        trust_domain: "cluster.local".into(),
        handshake_port: 4181,
        policy_configmap: None,
    };
    let pods: Vec<Arc<Pod>> = objects.pods.into_iter().map(Arc::new).collect();
    let nodes: Vec<Arc<Node>> = objects.nodes.into_iter().map(Arc::new).collect();
    let (state, _skipped) = build(&config, &pods, &nodes);
    // Whatever the objects say, an address belongs to one workload and every workload's node
    // is a known node.
    let mut seen = std::collections::HashSet::new();
    for w in &state.workloads {
        assert!(state.nodes.contains_key(&*w.node));
        for a in &w.addresses {
            assert!(seen.insert(*a), "address {a} given to two workloads");
        }
    }
});
