//! portcullis testbed: a simulated Kubernetes cluster on one machine, made of network
//! namespaces, veths and a bridge, with per-node agents and per-pod cgroups.
//!
//! ```no_run
//! use testbed::{Options, Spec, Testbed};
//! let tb = Testbed::up(&Spec::two_nodes(1), &Options::without_agents()).expect("testbed");
//! let server = tb.pod("n2-pod1").ipv4;
//! let status = tb.exec("n1-pod1", &["ping", "-c1", &server.to_string()]).status().expect("ping");
//! assert!(status.success());
//! // dropping `tb` removes everything
//! ```
//!
//! Everything the testbed creates is named with the prefix `pc<id>` (id: 4 hex digits), so
//! leftovers of a crashed run are found and removed by [`down_by_prefix`]. It never changes
//! the root network namespace and uses only 198.18.0.0/15 and fd00::/8 (plus fe80::1).

mod agent;
pub mod bpfmap;
pub mod cgroup;
pub mod cli;
pub mod cluster;
pub mod cmd;
pub mod cni;
pub mod container;
pub mod info;
pub mod issuer;
pub mod kube_api;
pub mod netns;
pub mod packet;
mod pods;
pub mod process;
pub mod scenario;
pub mod session;
pub mod spec;
mod teardown;
mod testbed;

pub use agent::ensure_bpffs;
pub use cluster::{AgentConfig, ClusterFile, ClusterNode, Workload};
pub use cni::Wiring;
pub use info::{NodeInfo, PodInfo, STATE_ROOT, TestbedInfo};
pub use spec::{NodeSpec, PodSpec, Spec};
pub use teardown::{down_by_prefix, leftovers, teardown_id};
pub use testbed::{AGENT_PORT, Options, Testbed, command_in};
