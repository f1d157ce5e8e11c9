//! What a testbed should contain: nodes and their pods (YAML, serde).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Node i (1-based) owns 198.18.i.0/24, so this is the largest node count.
pub const MAX_NODES: usize = 200;
/// Pod j of a node gets host part j+1 in the node's /24 (.2 … .254).
pub const MAX_PODS_PER_NODE: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub nodes: Vec<NodeSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    /// Kubernetes namespace of the workload.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Defaults to the pod name.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Whether the pod appears as a workload in cluster.yaml (an unenrolled pod is one the
    /// agent does not know: traffic from/to it is the "plaintext outsider" case).
    #[serde(default = "default_true")]
    pub enroll: bool,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_true() -> bool {
    true
}

impl PodSpec {
    /// An enrolled pod in namespace `default` whose service account is its name.
    pub fn new(name: impl Into<String>) -> Self {
        PodSpec {
            name: name.into(),
            namespace: default_namespace(),
            service_account: None,
            enroll: true,
        }
    }

    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    pub fn service_account(mut self, sa: impl Into<String>) -> Self {
        self.service_account = Some(sa.into());
        self
    }

    pub fn enroll(mut self, enroll: bool) -> Self {
        self.enroll = enroll;
        self
    }

    pub fn effective_service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }
}

impl NodeSpec {
    pub fn new(name: impl Into<String>, pods: Vec<PodSpec>) -> Self {
        NodeSpec {
            name: name.into(),
            pods,
        }
    }
}

impl Spec {
    /// `node-1` and `node-2`, with pods `n1-pod1…` and `n2-pod1…`.
    pub fn two_nodes(pods_per_node: usize) -> Spec {
        let nodes = (1..=2)
            .map(|n| NodeSpec {
                name: format!("node-{n}"),
                pods: (1..=pods_per_node)
                    .map(|p| PodSpec::new(format!("n{n}-pod{p}")))
                    .collect(),
            })
            .collect();
        Spec { nodes }
    }

    pub fn from_yaml(text: &str) -> Result<Spec> {
        let spec: Spec = serde_yaml::from_str(text).context("invalid testbed spec")?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn load(path: &Path) -> Result<Spec> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Spec::from_yaml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks names are usable (they end up in netns names, cgroup paths and file names) and
    /// unique, and that the counts fit the address plan.
    pub fn validate(&self) -> Result<()> {
        if self.nodes.is_empty() {
            bail!("a testbed needs at least one node");
        }
        if self.nodes.len() > MAX_NODES {
            bail!(
                "at most {MAX_NODES} nodes (the address plan gives node i the subnet 198.18.i.0/24)"
            );
        }
        let mut nodes = HashSet::new();
        let mut pods = HashSet::new();
        for node in &self.nodes {
            check_name(&node.name)?;
            if !nodes.insert(node.name.as_str()) {
                bail!("duplicate node name {:?}", node.name);
            }
            if node.pods.len() > MAX_PODS_PER_NODE {
                bail!(
                    "node {}: at most {MAX_PODS_PER_NODE} pods per node",
                    node.name
                );
            }
            for pod in &node.pods {
                check_name(&pod.name)?;
                if !pods.insert(pod.name.as_str()) {
                    bail!(
                        "duplicate pod name {:?} (pod names are unique across the testbed)",
                        pod.name
                    );
                }
            }
        }
        for n in &nodes {
            if pods.contains(n) {
                bail!("{n:?} is both a node and a pod name (both name a network namespace)");
            }
        }
        if nodes.contains("fabric") || pods.contains("fabric") {
            bail!("\"fabric\" is reserved for the namespace holding the bridge");
        }
        Ok(())
    }
}

/// A DNS label, like Kubernetes object names: lowercase alphanumerics and '-', 1..=40 chars
/// here (shorter than DNS's 63 to keep paths and socket names comfortably short).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "invalid name {name:?}: use 1-40 chars of [a-z0-9-], not starting or ending with '-'"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults() {
        let spec = Spec::from_yaml(
            "nodes:\n  - name: node-1\n    pods:\n      - name: client\n        enroll: false\n  - name: node-2\n    pods: [ { name: server, namespace: prod } ]\n",
        )
        .expect("valid spec");
        let client = &spec.nodes[0].pods[0];
        assert_eq!(client.namespace, "default");
        assert_eq!(client.effective_service_account(), "client");
        assert!(!client.enroll);
        assert_eq!(spec.nodes[1].pods[0].namespace, "prod");
        assert!(spec.nodes[1].pods[0].enroll);
    }

    #[test]
    fn rejects_duplicates_and_bad_names() {
        assert!(
            Spec::from_yaml("nodes: [{name: a, pods: [{name: x}]}, {name: b, pods: [{name: x}]}]")
                .is_err()
        );
        assert!(Spec::from_yaml("nodes: [{name: Node_1}]").is_err());
        assert!(Spec::from_yaml("nodes: []").is_err());
        Spec::two_nodes(2).validate().expect("two_nodes is valid");
    }
}
