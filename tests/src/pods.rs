//! Pods: creating their namespace, veth, addresses, routes and cgroup; adding and removing
//! them at runtime.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::info::PodInfo;
use crate::spec::{self, PodSpec};
use crate::testbed::Testbed;
use crate::{cgroup, cmd, netns};

impl Testbed {
    /// Creates a pod's namespace, veth, addresses, routes and cgroup.
    pub(crate) fn setup_pod(&mut self, node_name: &str, spec: &PodSpec) -> Result<PodInfo> {
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
            host_veth: format!("{p}p{global_index}"),
            cgroup: node.pods_cgroup.join(&spec.name),
        };
        netns::check_ifname(&pod.host_veth)?;
        self.info.pods.push(pod.clone());
        netns::add(&pod.netns)?;
        plumb(&node.netns, &pod)?;
        cgroup::create(&pod.cgroup)?;
        Ok(pod)
    }

    /// Adds a pod at runtime; an enrolled pod (`spec.enroll`) is also added to cluster.yaml.
    pub fn add_pod(&mut self, node: &str, spec: PodSpec) -> Result<PodInfo> {
        let result = self.setup_pod(node, &spec);
        // Saved even on failure: the half-made pod is recorded, so teardown finds it.
        self.info.save()?;
        let pod = result?;
        if pod.enroll {
            self.write_cluster(|c| c.upsert_workload(pod.workload()))?;
        }
        Ok(pod)
    }

    /// Removes a pod: its workload entry, its processes, veth, namespace and cgroup.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let pod = self.info.pod(name)?.clone();
        let node = self.info.node(&pod.node)?.clone();
        self.write_cluster(|c| {
            c.remove_workload(name);
        })?;
        cgroup::kill_all(&pod.cgroup, Duration::from_secs(10))?;
        // Deleting the host end destroys the pair (and the node's routes through it) right
        // away; namespace destruction alone would happen asynchronously.
        cmd::ip_in(&node.netns, ["link", "del", &pod.host_veth])?;
        netns::del(&pod.netns)?;
        cgroup::remove_tree(&pod.cgroup)?;
        self.info.pods.retain(|p| p.name != name);
        self.info.save()
    }

    /// Deletes a pod's veth pair (its interface vanishes), leaving the pod otherwise as it is.
    pub fn unplug_pod(&self, name: &str) -> Result<()> {
        let pod = self.info.pod(name)?;
        let node = self.info.node(&pod.node)?;
        cmd::ip_in(&node.netns, ["link", "del", &pod.host_veth])?;
        Ok(())
    }

    /// Gives an unplugged pod a new veth pair with the same names and addresses (a new
    /// interface index).
    pub fn replug_pod(&self, name: &str) -> Result<()> {
        let pod = self.info.pod(name)?;
        let node = self.info.node(&pod.node)?;
        plumb(&node.netns, pod)
    }
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
