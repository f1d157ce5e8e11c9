//! The two files the testbed writes for the agents: the cluster state (`cluster.yaml`, watched
//! and reloaded by every agent) and the per-node agent config (`<node>.yaml`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Keys this struct does not know are kept (`extra`), so that a test can set fields the agent
/// grows later without the testbed dropping them on the next rewrite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub trust_domain: String,
    #[serde(default)]
    pub nodes: Vec<ClusterNode>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub name: String,
    /// The node agent's address (its node IP and port), where peers reach it.
    pub address: SocketAddr,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// The pod name.
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    /// Overrides the identity derived from namespace and service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,
}

impl ClusterFile {
    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.name == name)
    }

    pub fn workload_mut(&mut self, name: &str) -> Option<&mut Workload> {
        self.workloads.iter_mut().find(|w| w.name == name)
    }

    /// Removes the workload named `name`; returns whether there was one.
    pub fn remove_workload(&mut self, name: &str) -> bool {
        let before = self.workloads.len();
        self.workloads.retain(|w| w.name != name);
        self.workloads.len() != before
    }

    /// Adds `w`, replacing a workload of the same name.
    pub fn upsert_workload(&mut self, w: Workload) {
        match self.workload_mut(&w.name) {
            Some(old) => *old = w,
            None => self.workloads.push(w),
        }
    }

    pub fn load(path: &Path) -> Result<ClusterFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_yaml::from_str(&text)
            .with_context(|| format!("invalid cluster file {}", path.display()))
    }

    pub fn store(&self, path: &Path) -> Result<()> {
        let text = serde_yaml::to_string(self).context("cannot serialize the cluster file")?;
        write_atomic(path, text.as_bytes())
    }

    /// Stores the file in its JSON form (a YAML subset the agent decodes faster).
    pub fn store_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec(self).context("cannot serialize the cluster file")?;
        write_atomic(path, &text)
    }
}

/// The agent's config file, exactly what `portcullis run --config FILE` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentConfig {
    pub node: String,
    /// The cluster-state file; `None` when the agent reads Kubernetes instead (then `extra`
    /// carries a `kubernetes` section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_state: Option<PathBuf>,
    pub bpffs_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub log_level: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_yaml::from_str(&text)
            .with_context(|| format!("invalid agent config {}", path.display()))
    }

    pub fn store(&self, path: &Path) -> Result<()> {
        let text = serde_yaml::to_string(self).context("cannot serialize the agent config")?;
        write_atomic(path, text.as_bytes())
    }
}

/// Writes a file so that a reader (an agent watching it) sees either the old or the new
/// content, never a half-written one: write a temporary file next to it, fsync, rename over.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("path has no parent directory")?;
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_file_round_trips_unknown_keys() {
        let text = "trust_domain: cluster.local\nca_bundle: /x\nnodes:\n  - name: node-1\n    address: \"198.18.0.1:4181\"\nworkloads:\n  - name: client\n    namespace: default\n    service_account: client\n    node: node-1\n    addresses: [\"198.18.1.2\", \"fd00:18:1::2\"]\n";
        let c: ClusterFile = serde_yaml::from_str(text).expect("parses");
        assert_eq!(c.nodes[0].address, "198.18.0.1:4181".parse().expect("addr"));
        assert_eq!(
            c.workloads[0].addresses[1],
            "fd00:18:1::2".parse::<IpAddr>().expect("addr")
        );
        let again: ClusterFile =
            serde_yaml::from_str(&serde_yaml::to_string(&c).expect("ser")).expect("parses");
        assert_eq!(again, c);
        assert!(again.extra.contains_key("ca_bundle"));
    }
}
