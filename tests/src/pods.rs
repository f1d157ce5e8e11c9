//! Pods: creating their namespace, veth, addresses, routes and cgroup; adding and removing
//! them at runtime.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cni::{Call, Wiring};
use crate::info::{NodeInfo, PodInfo};
use crate::spec::{self, PodSpec};
use crate::testbed::Testbed;
use crate::{cgroup, cmd, netns};

impl Testbed {
    /// Creates a pod: its namespace, interface, addresses and routes, and cgroup.
    pub(crate) fn setup_pod(&mut self, node_name: &str, spec: &PodSpec) -> Result<PodInfo> {
        let pod = self.plan_pod(node_name, spec)?;
        self.wire_pod(&pod.name).map(|(pod, _)| pod)
    }

    /// Chooses a pod's names and addresses and records it (so that teardown finds whatever
    /// is made of it); nothing is created yet.
    fn plan_pod(&mut self, node_name: &str, spec: &PodSpec) -> Result<PodInfo> {
        spec::check_name(&spec.name)?;
        if self.info.pods.iter().any(|p| p.name == spec.name)
            || self.info.nodes.iter().any(|n| n.name == spec.name)
        {
            bail!(
                "name {:?} is already taken in testbed {}",
                spec.name,
                self.info.id
            );
        }
        let node = self.info.node(node_name)?.clone();
        // The next index after the highest in use, so a removed pod's addresses are not
        // immediately handed to a new pod (stale state would be confusing in tests); wraps
        // around to the first free one when the subnet's end is reached.
        let used: Vec<u32> = self
            .info
            .pods
            .iter()
            .filter(|p| p.node == node_name)
            .map(|p| p.index)
            .collect();
        let max = used.iter().copied().max().unwrap_or(0);
        let index = if (max as usize) < spec::MAX_PODS_PER_NODE {
            max + 1
        } else {
            (1..=spec::MAX_PODS_PER_NODE as u32)
                .find(|j| !used.contains(j))
                .with_context(|| {
                    format!(
                        "node {node_name} is full ({} pods)",
                        spec::MAX_PODS_PER_NODE
                    )
                })?
        };
        let global_index = self.info.next_pod_index;
        self.info.next_pod_index += 1;
        let host = index + 1;
        let p = &self.info.prefix;
        let pod = PodInfo {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            service_account: spec.effective_service_account().to_string(),
            enroll: spec.enroll,
            node: node_name.to_string(),
            index,
            global_index,
            netns: format!("{p}-{}", spec.name),
            ipv4: Ipv4Addr::new(
                198,
                18,
                u8::try_from(node.index).context("node index")?,
                u8::try_from(host).context("pod index")?,
            ),
            ipv6: format!("fd00:18:{:x}::{host:x}", node.index)
                .parse()
                .context("pod address")?,
            // With CNI wiring, the plugin names the host end (and this is replaced).
            host_veth: format!("{p}p{global_index}"),
            cgroup: node.pods_cgroup.join(&spec.name),
            container_id: format!("{p}-{}-{global_index}", spec.name),
        };
        netns::check_ifname(&pod.host_veth)?;
        self.info.pods.push(pod.clone());
        Ok(pod)
    }

    /// Makes what [`Self::plan_pod`] recorded: the namespace, then the interface (directly,
    /// or by CNI ADD through the node's network list), then the cgroup. Returns the pod and
    /// how long making its interface took (the CNI ADD, as a runtime would time it).
    fn wire_pod(&mut self, name: &str) -> Result<(PodInfo, Duration)> {
        let pod = self.info.pod(name)?.clone();
        let node = self.info.node(&pod.node)?.clone();
        netns::add(&pod.netns)?;
        let took = if node.wiring.is_cni() {
            let (host_veth, took) = self.cni_add(&node, &pod)?;
            if let Some(p) = self.info.pods.iter_mut().find(|p| p.name == name) {
                p.host_veth = host_veth;
            }
            took
        } else {
            let started = Instant::now();
            plumb(&node.netns, &pod)?;
            started.elapsed()
        };
        cgroup::create(&pod.cgroup)?;
        Ok((self.info.pod(name)?.clone(), took))
    }

    /// CNI ADD for `pod` as the node's runtime runs it; returns the host-side interface the
    /// result names. A pod the agents do not know (not enrolled) stands for a workload outside
    /// enforcement, so its chain leaves `portcullis-cni` out.
    fn cni_add(&self, node: &NodeInfo, pod: &PodInfo) -> Result<(String, Duration)> {
        netns::sysctl(
            &pod.netns,
            &[
                ("net.ipv6.conf.all.accept_dad".into(), "0".into()),
                ("net.ipv6.conf.default.accept_dad".into(), "0".into()),
            ],
        )?;
        let mut list = self.network_list(&node.name)?;
        if !pod.enroll
            && let Some(plugins) = list.list["plugins"].as_array_mut()
        {
            plugins.retain(|p| p["type"] != "portcullis-cni");
        }
        let (netns_path, args) = (netns::path(&pod.netns), pod_args(pod));
        let call = Call::for_pod("ADD", &pod.container_id, &netns_path, &args);
        let runtime = serde_json::json!({
            "ips": [format!("{}/24", pod.ipv4), format!("{}/64", pod.ipv6)],
        });
        let started = Instant::now();
        let result = list
            .add(&node.netns, &node.host_cgroup, &call, &runtime)?
            .map_err(|e| anyhow::anyhow!("CNI ADD of pod {} on {}: {e}", pod.name, node.name))?;
        let took = started.elapsed();
        let bridge = (node.wiring == Wiring::Bridge).then_some(crate::cni::BRIDGE);
        let host = crate::cni::host_interface(&result, bridge).with_context(|| {
            format!(
                "the CNI result for pod {} names no host interface: {result}",
                pod.name
            )
        })?;
        Ok((host, took))
    }

    /// CNI DEL for `pod` (through the node's list, in reverse order).
    fn cni_del(&self, node: &NodeInfo, pod: &PodInfo) -> Result<()> {
        let list = self.network_list(&node.name)?;
        let (netns_path, args) = (netns::path(&pod.netns), pod_args(pod));
        let call = Call::for_pod("DEL", &pod.container_id, &netns_path, &args);
        list.del(&node.netns, &node.host_cgroup, &call)?
            .map_err(|e| anyhow::anyhow!("CNI DEL of pod {} on {}: {e}", pod.name, node.name))
    }

    /// Adds a pod at runtime; an enrolled pod (`spec.enroll`) is added to cluster.yaml first,
    /// as a pod is in the API before its sandbox is made.
    pub fn add_pod(&mut self, node: &str, spec: PodSpec) -> Result<PodInfo> {
        self.add_pod_timed(node, spec).map(|(pod, _)| pod)
    }

    /// [`Self::add_pod`], with how long making the pod's interface took: the CNI ADD of its
    /// node's network list (which, with `portcullis-cni`, returns once the pod is enforced).
    pub fn add_pod_timed(&mut self, node: &str, spec: PodSpec) -> Result<(PodInfo, Duration)> {
        let planned = self.plan_pod(node, &spec);
        // Saved even on failure: the half-made pod is recorded, so teardown finds it.
        self.info.save()?;
        let pod = planned?;
        if pod.enroll {
            self.write_cluster(|c| c.upsert_workload(pod.workload()))?;
        }
        let wired = self.wire_pod(&pod.name);
        self.info.save()?;
        wired
    }

    /// Removes a pod: its workload entry, its processes, interface (CNI DEL), namespace and
    /// cgroup.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let pod = self.info.pod(name)?.clone();
        let node = self.info.node(&pod.node)?.clone();
        self.write_cluster(|c| {
            c.remove_workload(name);
        })?;
        cgroup::kill_all(&pod.cgroup, Duration::from_secs(10))?;
        if node.wiring.is_cni() {
            self.cni_del(&node, &pod)?;
        } else {
            // Deleting the host end destroys the pair (and the node's routes through it) right
            // away; namespace destruction alone would happen asynchronously.
            cmd::ip_in(&node.netns, ["link", "del", &pod.host_veth])?;
        }
        netns::del(&pod.netns)?;
        cgroup::remove_tree(&pod.cgroup)?;
        self.info.pods.retain(|p| p.name != name);
        self.info.save()
    }

    /// The IPv4 gateway of `pod`'s default route, if its node is CNI-wired (a directly wired
    /// pod has none: the host end answers ARP for every address by proxy ARP).
    pub fn gateway_v4(&self, pod: &str) -> Result<Option<Ipv4Addr>> {
        let node = self.info.node(&self.info.pod(pod)?.node)?;
        Ok(node
            .wiring
            .is_cni()
            .then(|| Ipv4Addr::new(198, 18, u8::try_from(node.index).unwrap_or(u8::MAX), 1)))
    }

    /// The IPv6 gateway of `pod`'s default route: `fe80::1` on the host end of a directly
    /// wired pod, the subnet's first address on a CNI-wired one.
    pub fn gateway_v6(&self, pod: &str) -> Result<std::net::Ipv6Addr> {
        let node = self.info.node(&self.info.pod(pod)?.node)?;
        Ok(if node.wiring.is_cni() {
            format!("fd00:18:{:x}::1", node.index).parse()?
        } else {
            "fe80::1".parse()?
        })
    }

    /// Deletes a pod's veth pair (its interface vanishes), leaving the pod otherwise as it is.
    pub fn unplug_pod(&self, name: &str) -> Result<()> {
        let pod = self.info.pod(name)?;
        let node = self.info.node(&pod.node)?;
        cmd::ip_in(&node.netns, ["link", "del", &pod.host_veth])?;
        Ok(())
    }

    /// Gives an unplugged pod a new veth pair with the same names and addresses (a new
    /// interface index). Only for directly wired nodes (a CNI sandbox is not re-plugged).
    pub fn replug_pod(&self, name: &str) -> Result<()> {
        let pod = self.info.pod(name)?;
        let node = self.info.node(&pod.node)?;
        if node.wiring.is_cni() {
            bail!(
                "replug_pod needs a directly wired node; {} is wired by {:?} (Options::wiring)",
                node.name,
                node.wiring
            );
        }
        plumb(&node.netns, pod)
    }
}

/// `CNI_ARGS` as the kubelet passes them.
fn pod_args(pod: &PodInfo) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=uid-{}",
        pod.namespace, pod.name, pod.container_id, pod.global_index
    )
}

/// The veth pair between node namespace `node_ns` and the pod, its addresses and routes.
fn plumb(node_ns: &str, pod: &PodInfo) -> Result<()> {
    let (ns, hv) = (&pod.netns, &pod.host_veth);
    cmd::ip_in(
        node_ns,
        [
            "link", "add", hv, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ],
    )?;
    // proxy_arp: the pod ARPs for every destination (its default route has no gateway) and
    // the host end answers with its own MAC. proxy_delay 0: otherwise the kernel delays
    // proxy replies to broadcast requests by up to 0.8 s.
    netns::sysctl(
        node_ns,
        &[
            (format!("net.ipv4.conf.{hv}.proxy_arp"), "1".into()),
            (format!("net.ipv4.neigh.{hv}.proxy_delay"), "0".into()),
        ],
    )?;
    cmd::ip_in(node_ns, ["addr", "add", "fe80::1/64", "dev", hv, "nodad"])?;
    cmd::ip_in(node_ns, ["link", "set", hv, "up"])?;
    cmd::ip_in(
        ns,
        ["addr", "add", &format!("{}/32", pod.ipv4), "dev", "eth0"],
    )?;
    cmd::ip_in(
        ns,
        [
            "addr",
            "add",
            &format!("{}/128", pod.ipv6),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    cmd::ip_in_str(ns, "link set eth0 up")?;
    cmd::ip_in_str(ns, "route add default dev eth0")?;
    cmd::ip_in_str(ns, "-6 route add default via fe80::1 dev eth0")?;
    cmd::ip_in(
        node_ns,
        ["route", "add", &format!("{}/32", pod.ipv4), "dev", hv],
    )?;
    cmd::ip_in(
        node_ns,
        [
            "-6",
            "route",
            "add",
            &format!("{}/128", pod.ipv6),
            "dev",
            hv,
        ],
    )?;
    Ok(())
}
