//! The cluster-state file, in both its YAML and its JSON form (decoded by different code).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis_agent::inputs::ClusterState;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(state) = ClusterState::parse(Path::new("cluster.yaml"), text)
    {
        // An accepted state is self-consistent: every workload's node exists.
        for w in &state.workloads {
            assert!(state.nodes.contains_key(&*w.node));
            assert!(!w.addresses.is_empty());
        }
    }
});
