//! `testbed.json`: the description of a testbed that outlives the process that built it, so
//! that `cargo xtask testbed …` can inspect, enter and remove a testbed made by someone else.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::cni::Wiring;
use crate::{cgroup, cluster, netns};

/// Parent of every testbed's state directory.
pub const STATE_ROOT: &str = "/run/portcullis-testbed";
/// Where bpffs is (or gets) mounted; each testbed pins under `<this>/pc<id>/`.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestbedInfo {
    /// 4 lowercase hex digits.
    pub id: String,
    /// `pc<id>`: every name the testbed creates starts with it.
    pub prefix: String,
    /// Pid of the process that built the testbed (informational).
    pub creator_pid: u32,
    pub state_dir: PathBuf,
    pub cluster_file: PathBuf,
    /// `<cgroup2 mount>/pc<id>`.
    pub cgroup_root: PathBuf,
    /// `/sys/fs/bpf/pc<id>`.
    pub bpffs_root: PathBuf,
    pub fabric_netns: String,
    pub bridge: String,
    /// The agent binary, also used as the admin CLI client.
    pub agent_bin: Option<PathBuf>,
    /// Whether agents were started by `up`.
    pub agents: bool,
    pub trust_domain: String,
    /// Counter for host veth names `pc<id>p<N>`; never reused within a testbed.
    pub next_pod_index: u32,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// 1-based; the node's addresses and pod subnets derive from it.
    pub index: u32,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub pod_cidr_v4: String,
    pub pod_cidr_v6: String,
    /// The fabric-side end of the node's eth0 (inside the fabric namespace, on the bridge).
    pub fabric_veth: String,
    /// `<cg2>/pc<id>/<node>`: everything of this node lives below.
    pub cgroup: PathBuf,
    pub agent_cgroup: PathBuf,
    pub pods_cgroup: PathBuf,
    /// Where `exec_node` puts processes (host-network processes of the node).
    pub host_cgroup: PathBuf,
    pub agent_config: PathBuf,
    pub admin_socket: PathBuf,
    pub log_file: PathBuf,
    pub pid_file: PathBuf,
    pub bpffs_dir: PathBuf,
    /// The agent's address as published in cluster.yaml.
    pub agent_address: SocketAddr,
    /// How its pods are wired.
    #[serde(default)]
    pub wiring: Wiring,
    /// With CNI wiring: the network list (`net.d/`), IPAM state, cached results and
    /// `portcullis-cni`'s claims, all below this directory.
    #[serde(default)]
    pub cni_dir: PathBuf,
}

impl NodeInfo {
    /// The network configuration list the node's runtime uses.
    pub fn conflist(&self) -> PathBuf {
        self.cni_dir.join("net.d").join("10-testbed.conflist")
    }

    /// Where `portcullis-cni` records its claims (the agent's `cni_state_dir`).
    pub fn cni_claims(&self) -> PathBuf {
        self.cni_dir.join("claims")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Whether the testbed lists it in cluster.yaml.
    pub enroll: bool,
    pub node: String,
    /// 1-based index within the node: the pod's addresses end in `index + 1`.
    pub index: u32,
    /// Testbed-wide index, used in the host veth name.
    pub global_index: u32,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Host end of the pod's veth, inside the node namespace.
    pub host_veth: String,
    pub cgroup: PathBuf,
    /// With CNI wiring: the sandbox's container ID (`CNI_CONTAINERID`).
    #[serde(default)]
    pub container_id: String,
}

impl PodInfo {
    pub fn workload(&self) -> cluster::Workload {
        cluster::Workload {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            node: self.node.clone(),
            addresses: vec![self.ipv4.into(), self.ipv6.into()],
            spiffe_id: None,
            extra: Default::default(),
        }
    }
}

impl TestbedInfo {
    pub fn json_path(&self) -> PathBuf {
        self.state_dir.join("testbed.json")
    }

    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).context("cannot serialize testbed.json")?;
        cluster::write_atomic(&self.json_path(), &text)
    }

    /// Reads the description of testbed `id` (`1a2b` or `pc1a2b`).
    pub fn load(id: &str) -> Result<TestbedInfo> {
        let id = normalize_id(id)?;
        let path = state_dir(&id).join("testbed.json");
        let text = std::fs::read(&path)
            .with_context(|| format!("no testbed {id}: cannot read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("invalid {}", path.display()))
    }

    /// `load(id)`, or with no id the only testbed there is.
    pub fn resolve(id: Option<&str>) -> Result<TestbedInfo> {
        if let Some(id) = id {
            return TestbedInfo::load(id);
        }
        let ids: Vec<String> = list_ids()
            .into_iter()
            .filter(|id| state_dir(id).join("testbed.json").exists())
            .collect();
        match ids.as_slice() {
            [one] => TestbedInfo::load(one),
            [] => bail!("no testbed found under {STATE_ROOT}"),
            many => bail!(
                "several testbeds exist ({}): say which with --id",
                many.join(", ")
            ),
        }
    }

    pub fn node(&self, name: &str) -> Result<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            format!(
                "testbed {} has no node {name:?} (nodes: {})",
                self.id,
                names(self.nodes.iter().map(|n| &n.name))
            )
        })
    }

    pub fn pod(&self, name: &str) -> Result<&PodInfo> {
        self.pods.iter().find(|p| p.name == name).with_context(|| {
            format!(
                "testbed {} has no pod {name:?} (pods: {})",
                self.id,
                names(self.pods.iter().map(|p| &p.name))
            )
        })
    }

    /// The agent pid recorded for `node`, if that process is still alive and still ours (a pid
    /// file can outlive its process, and the pid can be reused by an unrelated one).
    pub fn agent_pid(&self, node: &str) -> Option<i32> {
        let n = self.node(node).ok()?;
        let pid: i32 = std::fs::read_to_string(&n.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        pid_in_testbed(pid, &self.prefix).then_some(pid)
    }
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// Whether `pid` is alive and inside cgroup `…/pc<id>/…` (so signalling it is safe).
pub fn pid_in_testbed(pid: i32, prefix: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    // The v2 line is "0::/path"; hybrid machines also list v1 hierarchies, which we ignore.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false);
    !zombie
        && text.lines().any(|l| {
            l.strip_prefix("0::")
                .is_some_and(|p| p.split('/').any(|c| c == prefix))
        })
}

pub fn is_valid_id(id: &str) -> bool {
    id.len() == 4
        && id
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Accepts `1a2b` and `pc1a2b`.
pub fn normalize_id(id: &str) -> Result<String> {
    let bare = id.strip_prefix("pc").filter(|r| r.len() == 4).unwrap_or(id);
    if !is_valid_id(bare) {
        bail!("invalid testbed id {id:?}: expected 4 lowercase hex digits, e.g. 1a2b or pc1a2b");
    }
    Ok(bare.to_string())
}

pub fn prefix(id: &str) -> String {
    format!("pc{id}")
}

pub fn state_dir(id: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(prefix(id))
}

/// The id in a name such as `pc1a2b`, `pc1a2b-node-1` or `pc1a2bp7`.
pub fn id_of(name: &str) -> Option<String> {
    let rest = name.strip_prefix("pc")?;
    let id = rest.get(..4)?;
    let tail = &rest[4..];
    (is_valid_id(id) && (tail.is_empty() || tail.starts_with('-'))).then(|| id.to_string())
}

/// Ids of every testbed with anything left on this machine: state dirs, named netns, cgroup
/// dirs, bpffs dirs.
pub fn list_ids() -> Vec<String> {
    let mut ids = Vec::new();
    let mut dirs = vec![PathBuf::from(STATE_ROOT), PathBuf::from(BPFFS_ROOT)];
    if let Ok(cg) = cgroup::mount_point() {
        dirs.push(cg);
    }
    for dir in dirs {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            ids.extend(
                rd.flatten()
                    .filter_map(|e| id_of(&e.file_name().to_string_lossy())),
            );
        }
    }
    ids.extend(
        netns::list()
            .unwrap_or_default()
            .iter()
            .filter_map(|n| id_of(n)),
    );
    ids.sort();
    ids.dedup();
    ids
}

/// Picks a fresh id (random bits from /dev/urandom, time and pid as a fallback) and claims it
/// by creating its state directory: `mkdir` is atomic, so two processes building testbeds at
/// the same moment cannot get the same id. Ids with leftovers of any kind are skipped.
pub fn claim_new_id() -> Result<String> {
    std::fs::create_dir_all(STATE_ROOT).with_context(|| format!("cannot create {STATE_ROOT}"))?;
    let existing = list_ids();
    for attempt in 0u32..64 {
        let mut buf = [0u8; 2];
        let random = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
            .is_ok();
        if !random {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let mix =
                t.subsec_nanos() ^ std::process::id().rotate_left(7) ^ attempt.wrapping_mul(0x9e37);
            buf = [(mix >> 8) as u8, mix as u8];
        }
        let id = format!("{:02x}{:02x}", buf[0], buf[1]);
        if existing.contains(&id) {
            continue;
        }
        match std::fs::create_dir(state_dir(&id)) {
            Ok(()) => return Ok(id),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create {}", state_dir(&id).display()));
            }
        }
    }
    bail!("could not find an unused testbed id after 64 tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(id_of("pc1a2b-node-1").as_deref(), Some("1a2b"));
        assert_eq!(id_of("pc1a2b").as_deref(), Some("1a2b"));
        assert_eq!(id_of("pc1a2bp7"), None);
        assert_eq!(id_of("pcXYZW-node"), None);
        assert_eq!(normalize_id("pc00ff").expect("valid"), "00ff");
        assert!(normalize_id("00fg").is_err());
    }
}
