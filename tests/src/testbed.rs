//! The `Testbed`: a simulated cluster of nodes and pods in network namespaces.
//!
//! Layout (id `1a2b`, so prefix `pc1a2b`):
//! - netns `pc1a2b-fabric` holds bridge `br0`; each node's eth0 is a veth whose other end
//!   (`pc1a2bn<i>`) is a port of the bridge. Nodes are 198.18.0.i/24 and fd00:18::i/64.
//! - netns `pc1a2b-<node>`: forwarding on, routes to the other nodes' pod subnets
//!   (198.18.k.0/24, fd00:18:k::/64) via their node address.
//! - netns `pc1a2b-<pod>`: eth0 with 198.18.i.(j+1)/32 and fd00:18:i::(j+1)/128, default routes
//!   `dev eth0` (v4, answered by proxy ARP on the host end) and `via fe80::1` (v6); the host end
//!   `pc1a2bp<N>` lives in the node namespace with a /32 and a /128 route to the pod — the
//!   layout of a Calico-style CNI.
//! - cgroups `<cg2>/pc1a2b/<node>/{agent,host,pods/<pod>}`; state in
//!   `/run/portcullis-testbed/pc1a2b/`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cluster::{AgentConfig, ClusterFile, ClusterNode};
use crate::cni::Wiring;
use crate::info::{self, BPFFS_ROOT, NodeInfo, PodInfo, TestbedInfo};
use crate::spec::Spec;
use crate::{cgroup, cmd, netns, process, teardown};

/// The port every agent listens on (on its node address) for peer agents.
pub const AGENT_PORT: u16 = 4181;
/// Name of the bridge inside the fabric namespace.
pub const BRIDGE: &str = "br0";

#[derive(Debug, Clone)]
pub struct Options {
    /// Start one agent per node (default true).
    pub agents: bool,
    /// The `portcullis` binary; falls back to env `PORTCULLIS_BIN`.
    pub agent_bin: Option<PathBuf>,
    /// `log_level` in the agent configs.
    pub log_level: String,
    /// Give the agents identities: a CA is created (`portcullis ca init`) in the state
    /// directory and every agent mints its pods' SVIDs from it and authenticates pairs by
    /// handshake. Off, the agents only enforce (auth entries by `portcullis auth allow`).
    pub authenticate: bool,
    /// `identity.svid_ttl_secs` in the agent configs (with `authenticate`); with issuers,
    /// the issuers' `svid_ttl_secs` and `node_svid_ttl_secs`.
    pub svid_ttl_secs: Option<u64>,
    /// With `authenticate`: run this many issuer replicas (in a namespace of their own,
    /// holding the only copy of the CA key) and give the agents identity source `issuer`,
    /// each node enrolled by join token. 0: every agent holds the CA (source `ca`).
    pub issuer_replicas: usize,
    /// `handshake.proactive` in the agent configs (with `authenticate`); `None`: the agent's
    /// default (on).
    pub proactive: Option<bool>,
    /// An authorization policy (YAML text) for every agent, written to `policy.yaml` in the
    /// state directory ([`Testbed::set_policy`] edits it); `None`: no policy file.
    pub policy: Option<String>,
    /// `poll_interval_ms` in the agent configs; `None`: the agent's default.
    pub poll_interval_ms: Option<u64>,
    /// `first_connection.syn_rto_ms` in the agent configs (0: the SYN timeout program off);
    /// `None`: the agent's default. The program always attaches to the node's pods cgroup.
    pub syn_rto_ms: Option<u32>,
    pub trust_domain: String,
    /// Start agents in a session of their own (setsid), for testbeds that outlive their
    /// creator (`cargo xtask testbed up`).
    pub detach_agents: bool,
    /// How long to wait for an agent's admin socket to appear.
    pub agent_ready_timeout: Duration,
    /// How every node's pods are wired; `None`: as a cluster's nodes are, through the
    /// reference CNI plugins with `portcullis-cni` chained after them, `ptp` on odd nodes and
    /// `bridge` on even ones.
    pub wiring: Option<Wiring>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agents: true,
            agent_bin: None,
            log_level: "debug".into(),
            authenticate: false,
            svid_ttl_secs: None,
            issuer_replicas: 0,
            proactive: None,
            policy: None,
            poll_interval_ms: None,
            syn_rto_ms: None,
            trust_domain: "cluster.local".into(),
            detach_agents: false,
            agent_ready_timeout: Duration::from_secs(20),
            wiring: None,
        }
    }
}

impl Options {
    /// Options for a testbed with no agents (plain connectivity, or agents a test starts
    /// itself): wired directly, since no CNI plugin of ours runs where no agent does.
    pub fn without_agents() -> Self {
        Options {
            agents: false,
            wiring: Some(Wiring::Direct),
            ..Options::default()
        }
    }
}

/// A running testbed. Dropping it tears everything down (best effort, errors to stderr),
/// unless it was made persistent with [`Testbed::into_persistent`] or obtained with
/// [`Testbed::attach`].
pub struct Testbed {
    pub(crate) info: TestbedInfo,
    pub(crate) children: HashMap<String, Child>,
    /// How the agents are configured and started.
    pub(crate) opts: Options,
    persistent: bool,
}

impl Testbed {
    /// Builds the testbed described by `spec` and, if `opts.agents`, starts its agents. On
    /// failure everything built so far is removed again.
    pub fn up(spec: &Spec, opts: &Options) -> Result<Testbed> {
        if !process::is_root() {
            bail!("the testbed needs root (network namespaces, cgroups, bpffs); run as root");
        }
        spec.validate()?;
        let agent_bin = match (&opts.agent_bin, std::env::var_os("PORTCULLIS_BIN")) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(p)) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => None,
        };
        if opts.agents {
            let Some(bin) = &agent_bin else {
                bail!(
                    "agents requested but no agent binary: set Options::agent_bin or env PORTCULLIS_BIN"
                );
            };
            if !bin.is_file() {
                bail!("agent binary {} does not exist", bin.display());
            }
        }
        cmd::run(Command::new("ip").arg("-V")).context("`ip` (iproute2) is required")?;

        let cg2 = cgroup::mount_point()?;
        let id = info::claim_new_id()?;
        let prefix = info::prefix(&id);
        let state_dir = info::state_dir(&id);
        // The struct exists before anything is created, so that an error below (an early
        // return) drops it and so removes whatever was made.
        let mut tb = Testbed {
            info: TestbedInfo {
                id: id.clone(),
                prefix: prefix.clone(),
                creator_pid: std::process::id(),
                cluster_file: state_dir.join("cluster.yaml"),
                state_dir: state_dir.clone(),
                cgroup_root: cg2.join(&prefix),
                bpffs_root: Path::new(BPFFS_ROOT).join(&prefix),
                fabric_netns: format!("{prefix}-fabric"),
                bridge: BRIDGE.into(),
                agent_bin,
                agents: opts.agents,
                trust_domain: opts.trust_domain.clone(),
                next_pod_index: 1,
                nodes: Vec::new(),
                pods: Vec::new(),
            },
            children: HashMap::new(),
            opts: Options {
                authenticate: opts.authenticate && opts.agents,
                ..opts.clone()
            },
            persistent: false,
        };
        tb.info.save()?;
        cgroup::create(&tb.info.cgroup_root)?;

        let fabric = tb.info.fabric_netns.clone();
        netns::add(&fabric)?;
        cmd::ip_in_str(&fabric, "link add br0 type bridge mcast_snooping 0")?;
        cmd::ip_in_str(&fabric, "link set br0 up")?;

        for (i, node) in spec.nodes.iter().enumerate() {
            tb.add_node(&node.name, u32::try_from(i + 1).context("too many nodes")?)?;
        }
        tb.add_node_routes()?;
        for node in &spec.nodes {
            for pod in &node.pods {
                tb.setup_pod(&node.name, pod)?;
            }
        }
        tb.info.save()?;
        tb.write_initial_files()?;
        if opts.agents {
            let names: Vec<String> = tb.info.nodes.iter().map(|n| n.name.clone()).collect();
            for name in names {
                tb.start_agent(&name)?;
            }
        }
        Ok(tb)
    }

    /// A handle on a testbed built by another process (from its testbed.json). Dropping it
    /// leaves the testbed alone; [`Testbed::down`] removes it.
    pub fn attach(id: &str) -> Result<Testbed> {
        let info = TestbedInfo::load(id)?;
        Ok(Testbed {
            info,
            children: HashMap::new(),
            opts: Options {
                detach_agents: true,
                ..Options::default()
            },
            persistent: true,
        })
    }

    /// Keeps the testbed (and its agents) after this handle is gone; returns its description.
    pub fn into_persistent(mut self) -> TestbedInfo {
        self.persistent = true;
        // Dropping a `Child` neither kills nor waits for it: the agents keep running.
        self.children.clear();
        self.info.clone()
    }

    /// Same as [`Testbed::into_persistent`], returning only the id.
    pub fn leak(self) -> String {
        self.into_persistent().id
    }

    /// Tears the testbed down now, reporting errors instead of printing them.
    pub fn down(mut self) -> Result<()> {
        self.persistent = true; // Drop must not do it a second time.
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("teardown of {}: {}", self.info.prefix, errors.join("; "))
        }
    }

    pub fn id(&self) -> &str {
        &self.info.id
    }

    pub fn info(&self) -> &TestbedInfo {
        &self.info
    }

    pub fn state_dir(&self) -> &Path {
        &self.info.state_dir
    }

    /// Panics (with the list of nodes) if there is no such node: meant for tests.
    pub fn node(&self, name: &str) -> &NodeInfo {
        self.info.node(name).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Panics (with the list of pods) if there is no such pod: meant for tests.
    pub fn pod(&self, name: &str) -> &PodInfo {
        self.info.pod(name).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn add_node(&mut self, name: &str, index: u32) -> Result<()> {
        let p = &self.info.prefix;
        let ns = format!("{p}-{name}");
        let node_cg = self.info.cgroup_root.join(name);
        let sd = &self.info.state_dir;
        let ipv4 = Ipv4Addr::new(198, 18, 0, u8::try_from(index).context("node index")?);
        let ipv6: Ipv6Addr = format!("fd00:18::{index:x}")
            .parse()
            .context("node address")?;
        let node = NodeInfo {
            name: name.to_string(),
            index,
            netns: ns.clone(),
            ipv4,
            ipv6,
            pod_cidr_v4: format!("198.18.{index}.0/24"),
            pod_cidr_v6: format!("fd00:18:{index:x}::/64"),
            fabric_veth: format!("{p}n{index}"),
            agent_cgroup: node_cg.join("agent"),
            pods_cgroup: node_cg.join("pods"),
            host_cgroup: node_cg.join("host"),
            cgroup: node_cg,
            agent_config: sd.join(format!("{name}.yaml")),
            admin_socket: sd.join(format!("{name}.sock")),
            log_file: sd.join(format!("{name}.log")),
            pid_file: sd.join(format!("{name}.pid")),
            bpffs_dir: self.info.bpffs_root.join(name),
            agent_address: SocketAddr::new(ipv4.into(), AGENT_PORT),
            wiring: self.opts.wiring.unwrap_or(if index % 2 == 1 {
                Wiring::Ptp
            } else {
                Wiring::Bridge
            }),
            cni_dir: sd.join(format!("{name}-cni")),
        };
        netns::check_ifname(&node.fabric_veth)?;
        // Recorded before creation so that a failure halfway is still torn down by name.
        self.info.nodes.push(node.clone());
        netns::add(&ns)?;
        // Forwarding must be on before the pod veths exist: new interfaces copy the namespace
        // default, and proxy ARP only answers on interfaces that forward.
        netns::sysctl(
            &ns,
            &[
                ("net.ipv4.ip_forward".into(), "1".into()),
                ("net.ipv6.conf.all.forwarding".into(), "1".into()),
                ("net.ipv6.conf.default.forwarding".into(), "1".into()),
            ],
        )?;
        let fabric = &self.info.fabric_netns;
        // Both ends are created inside namespaces (fabric and node): nothing ever appears in
        // the root namespace, not even for a moment.
        cmd::ip_in(
            fabric,
            [
                "link",
                "add",
                &node.fabric_veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns,
            ],
        )?;
        cmd::ip_in(
            fabric,
            ["link", "set", &node.fabric_veth, "master", BRIDGE, "up"],
        )?;
        cmd::ip_in(&ns, ["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        cmd::ip_in(
            &ns,
            ["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"],
        )?;
        cmd::ip_in_str(&ns, "link set eth0 up")?;
        for cg in [&node.agent_cgroup, &node.pods_cgroup, &node.host_cgroup] {
            cgroup::create(cg)?;
        }
        if node.wiring.is_cni() {
            // No duplicate address detection on the interfaces the plugins make: a tentative
            // address would hold every new pod's IPv6 for a second or two.
            netns::sysctl(
                &ns,
                &[("net.ipv6.conf.default.accept_dad".into(), "0".into())],
            )?;
            self.write_network_list(&node)?;
        }
        Ok(())
    }

    /// The node's network configuration list: the reference plugin of its wiring with
    /// `host-local` addresses from the node's pod subnets (the pod's own asked for through the
    /// `ips` capability), and `portcullis-cni` chained after it (from the agent binary's
    /// directory) when the testbed runs agents: a pod made while the node's agent is down (or
    /// not started yet) is held. A testbed without agents is one without portcullis: no plugin.
    fn write_network_list(&self, node: &NodeInfo) -> Result<()> {
        let i = node.index;
        let ipam = serde_json::json!({
            "type": "host-local",
            "dataDir": node.cni_dir.join("ipam"),
            "ranges": [
                [{"subnet": node.pod_cidr_v4, "gateway": format!("198.18.{i}.1")}],
                [{"subnet": node.pod_cidr_v6, "gateway": format!("fd00:18:{i:x}::1")}],
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        });
        let main = match node.wiring {
            Wiring::Ptp => serde_json::json!({
                "type": "ptp", "ipMasq": false, "ipam": ipam, "capabilities": {"ips": true},
            }),
            Wiring::Bridge => serde_json::json!({
                "type": "bridge", "bridge": crate::cni::BRIDGE, "isGateway": true,
                "ipMasq": false, "hairpinMode": false, "ipam": ipam,
                "capabilities": {"ips": true},
            }),
            Wiring::Direct => bail!("node {} is wired directly, without CNI", node.name),
        };
        let mut plugins = vec![main];
        if self.opts.agents {
            plugins.push(serde_json::json!({
                "type": "portcullis-cni",
                "bpffsDir": node.bpffs_dir,
                "adminSocket": node.admin_socket,
                "stateDir": node.cni_claims(),
                "enrollTimeoutMs": crate::cni::ENROLL_TIMEOUT_MS,
            }));
        }
        let list = serde_json::json!({
            "cniVersion": crate::cni::CNI_VERSION,
            "name": format!("{}-{}", self.info.prefix, node.name),
            "plugins": plugins,
        });
        let path = node.conflist();
        std::fs::create_dir_all(path.parent().context("conflist dir")?)?;
        crate::cluster::write_atomic(&path, &serde_json::to_vec_pretty(&list)?)
    }

    /// The node's network list, with the directories its plugins are found in: the
    /// reference plugins, and `portcullis-cni` next to the agent binary.
    pub fn network_list(&self, node: &str) -> Result<crate::cni::NetworkList> {
        let node = self.info.node(node)?;
        let text = std::fs::read(node.conflist())
            .with_context(|| format!("reading {}", node.conflist().display()))?;
        let mut path = vec![PathBuf::from(crate::cni::REFERENCE_PLUGINS)];
        if let Some(dir) = self.info.agent_bin.as_ref().and_then(|b| b.parent()) {
            path.push(dir.to_owned());
        }
        Ok(crate::cni::NetworkList {
            list: serde_json::from_slice(&text)?,
            path,
            cache_dir: node.cni_dir.join("results"),
        })
    }

    /// Every node routes every other node's pod subnets to that node (a flat L2 fabric with
    /// static routes, like Calico without BGP). One `ip -batch` per node keeps it fast.
    fn add_node_routes(&self) -> Result<()> {
        for node in &self.info.nodes {
            let mut batch = String::new();
            for other in self.info.nodes.iter().filter(|o| o.name != node.name) {
                batch.push_str(&format!(
                    "route add {} via {}\n",
                    other.pod_cidr_v4, other.ipv4
                ));
                // No `-6` in batch lines: the family follows from the addresses.
                batch.push_str(&format!(
                    "route add {} via {}\n",
                    other.pod_cidr_v6, other.ipv6
                ));
            }
            ip_batch(&node.netns, &batch)?;
        }
        Ok(())
    }

    fn write_initial_files(&mut self) -> Result<()> {
        let cluster = ClusterFile {
            trust_domain: self.info.trust_domain.clone(),
            nodes: self
                .info
                .nodes
                .iter()
                .map(|n| ClusterNode {
                    name: n.name.clone(),
                    address: n.agent_address,
                    extra: Default::default(),
                })
                .collect(),
            workloads: self
                .info
                .pods
                .iter()
                .filter(|p| p.enroll)
                .map(PodInfo::workload)
                .collect(),
            extra: Default::default(),
        };
        cluster.store(&self.info.cluster_file)?;
        let mut extra = std::collections::BTreeMap::new();
        if self.issuers() {
            self.setup_issuers(self.opts.issuer_replicas)?;
            let mut identity = serde_yaml::Mapping::new();
            identity.insert("source".into(), "issuer".into());
            identity.insert(
                "issuer".into(),
                serde_yaml::Value::Sequence(
                    (0..self.opts.issuer_replicas)
                        .map(|k| Self::issuer_addr(k).to_string().into())
                        .collect(),
                ),
            );
            identity.insert("attestor".into(), "bootstrap".into());
            identity.insert(
                "trust_bundle".into(),
                self.bundle_path().to_string_lossy().into_owned().into(),
            );
            extra.insert("identity".to_owned(), serde_yaml::Value::Mapping(identity));
        } else if self.opts.authenticate {
            let ca = self.ca_dir();
            self.make_ca(&ca)?;
            let mut identity = serde_yaml::Mapping::new();
            identity.insert("source".into(), "ca".into());
            identity.insert("dir".into(), ca.to_string_lossy().into_owned().into());
            // The bundle is a file of its own, so that tests can rotate the CA through it.
            let bundle = self.bundle_path();
            std::fs::copy(ca.join("ca.pem"), &bundle)
                .with_context(|| format!("writing {}", bundle.display()))?;
            identity.insert(
                "trust_bundle".into(),
                bundle.to_string_lossy().into_owned().into(),
            );
            if let Some(ttl) = self.opts.svid_ttl_secs {
                identity.insert("svid_ttl_secs".into(), ttl.into());
            }
            extra.insert("identity".to_owned(), serde_yaml::Value::Mapping(identity));
        }
        if self.opts.authenticate
            && let Some(proactive) = self.opts.proactive
        {
            let mut handshake = serde_yaml::Mapping::new();
            handshake.insert("proactive".into(), proactive.into());
            extra.insert(
                "handshake".to_owned(),
                serde_yaml::Value::Mapping(handshake),
            );
        }
        if let Some(policy) = &self.opts.policy {
            self.set_policy(policy)?;
            extra.insert(
                "policy".to_owned(),
                self.policy_path().to_string_lossy().into_owned().into(),
            );
        }
        if let Some(ms) = self.opts.poll_interval_ms {
            extra.insert("poll_interval_ms".to_owned(), ms.into());
        }
        for n in &self.info.nodes {
            let mut extra = extra.clone();
            if n.wiring.is_cni() {
                // `pod_interfaces` stays the default, `auto`, as the DaemonSet ships it.
                extra.insert(
                    "cni_state_dir".to_owned(),
                    n.cni_claims().to_string_lossy().into_owned().into(),
                );
            }
            if self.issuers()
                && let Some(serde_yaml::Value::Mapping(identity)) = extra.get_mut("identity")
            {
                identity.insert(
                    "token_file".into(),
                    self.join_token_path(&n.name)
                        .to_string_lossy()
                        .into_owned()
                        .into(),
                );
            }
            let mut first_connection = serde_yaml::Mapping::new();
            first_connection.insert(
                "cgroup".into(),
                n.pods_cgroup.to_string_lossy().into_owned().into(),
            );
            if let Some(ms) = self.opts.syn_rto_ms {
                first_connection.insert("syn_rto_ms".into(), ms.into());
            }
            extra.insert(
                "first_connection".to_owned(),
                serde_yaml::Value::Mapping(first_connection),
            );
            AgentConfig {
                node: n.name.clone(),
                cluster_state: Some(self.info.cluster_file.clone()),
                bpffs_dir: n.bpffs_dir.clone(),
                admin_socket: n.admin_socket.clone(),
                log_level: self.opts.log_level.clone(),
                extra,
            }
            .store(&n.agent_config)?;
        }
        Ok(())
    }

    /// The policy file every agent reads (with `Options::policy`).
    pub fn policy_path(&self) -> PathBuf {
        self.info.state_dir.join("policy.yaml")
    }

    /// Replaces the policy file, atomically (as a ConfigMap update swaps it): every agent
    /// picks it up at its next poll.
    pub fn set_policy(&self, text: &str) -> Result<()> {
        let path = self.policy_path();
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
    }

    /// The testbed's CA (with `Options::authenticate`): `ca.pem`, `ca.key`.
    pub fn ca_dir(&self) -> PathBuf {
        self.info.state_dir.join("ca")
    }

    /// Restarts `node`'s agent with SVIDs from, and trust in, the CA in `dir` only (as a node
    /// of another trust root would have).
    pub fn use_ca(&mut self, node: &str, dir: &Path) -> Result<()> {
        self.stop_agent(node)?;
        let dir = dir.to_string_lossy().into_owned();
        self.write_agent_config(node, |c| {
            let mut identity = serde_yaml::Mapping::new();
            identity.insert("source".into(), "ca".into());
            identity.insert("trust_bundle".into(), format!("{dir}/ca.pem").into());
            identity.insert("dir".into(), dir.into());
            c.extra
                .insert("identity".into(), serde_yaml::Value::Mapping(identity));
        })?;
        self.start_agent(node)
    }

    /// The agents' trust bundle (with `Options::authenticate`).
    pub fn bundle_path(&self) -> PathBuf {
        self.info.state_dir.join("bundle.pem")
    }

    fn agent_bin(&self) -> Result<&PathBuf> {
        self.info
            .agent_bin
            .as_ref()
            .context("no agent binary known (Options::agent_bin / PORTCULLIS_BIN)")
    }

    /// Creates a CA for the testbed's trust domain in `dir` with `portcullis ca init`.
    pub fn make_ca(&self, dir: &Path) -> Result<()> {
        let bin = self.agent_bin()?;
        let mut c = Command::new(bin);
        c.args([
            "ca",
            "init",
            "--trust-domain",
            &self.info.trust_domain,
            "--out",
        ])
        .arg(dir);
        cmd::run(&mut c).map(drop)
    }

    /// Rewrites cluster.yaml atomically after `edit` changed it (agents watch the file).
    pub fn write_cluster(&self, edit: impl FnOnce(&mut ClusterFile)) -> Result<()> {
        let mut cluster = self.cluster()?;
        edit(&mut cluster);
        cluster.store(&self.info.cluster_file)
    }

    /// Like [`Testbed::write_cluster`], in the file's JSON form.
    pub fn write_cluster_json(&self, edit: impl FnOnce(&mut ClusterFile)) -> Result<()> {
        let mut cluster = self.cluster()?;
        edit(&mut cluster);
        cluster.store_json(&self.info.cluster_file)
    }

    /// Replaces cluster.yaml with `cluster`, in JSON form: for documents too large to read
    /// back and edit at every change.
    pub fn set_cluster_json(&self, cluster: &ClusterFile) -> Result<()> {
        cluster.store_json(&self.info.cluster_file)
    }

    /// The current content of cluster.yaml.
    pub fn cluster(&self) -> Result<ClusterFile> {
        ClusterFile::load(&self.info.cluster_file)
    }

    /// Rewrites a node's agent config (takes effect at the agent's next start).
    pub fn write_agent_config(
        &self,
        node: &str,
        edit: impl FnOnce(&mut AgentConfig),
    ) -> Result<()> {
        let path = &self.info.node(node)?.agent_config;
        let mut cfg = AgentConfig::load(path)?;
        edit(&mut cfg);
        cfg.store(path)
    }

    /// A command that runs in pod `pod`'s network namespace and cgroup. Panics if there is no
    /// such pod (see [`Testbed::try_exec`]).
    pub fn exec<S: AsRef<OsStr>>(&self, pod: &str, args: &[S]) -> Command {
        self.try_exec(pod, args)
            .unwrap_or_else(|e| panic!("exec in pod {pod}: {e:#}"))
    }

    pub fn try_exec<S: AsRef<OsStr>>(&self, pod: &str, args: &[S]) -> Result<Command> {
        let pod = self.info.pod(pod)?;
        command_in(&pod.netns, &pod.cgroup, args)
    }

    /// A command that runs in node `node`'s network namespace, in its `host` cgroup (a
    /// host-network process of that node). Panics if there is no such node.
    pub fn exec_node<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Command {
        self.try_exec_node(node, args)
            .unwrap_or_else(|e| panic!("exec on node {node}: {e:#}"))
    }

    /// GETs `path` from node `node`'s agent's metrics port (127.0.0.1:9464 in the node's
    /// namespace) and returns the whole response, status line included; bounded by 10 s.
    pub fn agent_http(&self, node: &str, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET {path} HTTP/1.1\\r\\nHost: agent\\r\\n\\r\\n' >&3; cat <&3"
        );
        let out = self
            .exec_node(node, &["timeout", "10", "bash", "-c", &script])
            .output()
            .expect("bash /dev/tcp");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_exec_node<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Result<Command> {
        let node = self.info.node(node)?;
        command_in(&node.netns, &node.host_cgroup, args)
    }

    /// Runs `args` in a pod to completion; fails unless it exits 0. Returns its output.
    pub fn run_in(&self, pod: &str, args: &[&str]) -> Result<Output> {
        let mut c = self.try_exec(pod, args)?;
        let out = cmd::output(&mut c)?;
        cmd::check(&c, &out).with_context(|| format!("in pod {pod}"))?;
        Ok(out)
    }

    /// `portcullis --config <node's agent config> ARGS…` in the root namespace: the CLI client
    /// of a node's agent (the config names its admin socket and bpffs directory). Panics if the node does not exist or no agent binary is known.
    pub fn portcullis<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Command {
        self.try_portcullis(node, args)
            .unwrap_or_else(|e| panic!("portcullis on node {node}: {e:#}"))
    }

    pub fn try_portcullis<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Result<Command> {
        let n = self.info.node(node)?;
        let bin = self.agent_bin()?;
        let mut c = Command::new(bin);
        c.arg("--config").arg(&n.agent_config).args(args);
        Ok(c)
    }

    /// Kills agents and removes everything; returns the problems met.
    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for (node, mut child) in self.children.drain() {
            if let Err(e) =
                process::terminate_child(&mut child, libc::SIGKILL, Duration::from_secs(10))
            {
                errors.push(format!("agent on {node}: {e:#}"));
            }
        }
        errors.extend(teardown::teardown_info(&self.info));
        errors
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        let errors = self.teardown();
        for e in &errors {
            eprintln!("testbed {}: teardown: {e}", self.info.prefix);
        }
    }
}

/// A command entering `netns` and `cgroup` (see [`process::enter`]).
pub fn command_in<S: AsRef<OsStr>>(netns: &str, cgroup: &Path, args: &[S]) -> Result<Command> {
    let (first, rest) = args.split_first().context("empty command line")?;
    let mut c = Command::new(first);
    c.args(rest);
    process::enter(&mut c, netns, cgroup, false)?;
    Ok(c)
}

/// `ip -n NETNS -batch -` with `lines` on stdin (one `ip` command per line).
fn ip_batch(netns: &str, lines: &str) -> Result<()> {
    use std::io::Write;
    use std::process::Stdio;
    if lines.is_empty() {
        return Ok(());
    }
    let mut c = Command::new("ip");
    c.args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot start `{}`", cmd::describe(&c)))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let write = stdin.write_all(lines.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().context("ip -batch")?;
    write.with_context(|| format!("writing to `{}`", cmd::describe(&c)))?;
    cmd::check(&c, &out).map_err(|e| anyhow::anyhow!("{e:#}\nbatch was:\n{lines}"))
}
