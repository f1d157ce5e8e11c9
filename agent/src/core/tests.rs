//! The core over in-memory maps and routes, with a cluster-state file: changes in, maps out.

use std::{net::IpAddr, path::PathBuf};

use super::*;
use crate::{
    admin::{Request, Response},
    datapath::memory::{FakeRoutes, Maps},
};

const CLUSTER: &str = "\
trust_domain: td
nodes:
  - name: n1
    address: 198.18.0.1:4181
  - name: n2
    address: 198.18.0.2:4181
workloads:
  - name: web
    node: n1
    service_account: web
    addresses: [198.18.1.2]
  - name: api
    node: n2
    service_account: api
    addresses: [198.18.2.2]
";

struct Harness {
    dir: tempfile::TempDir,
    core: Core<Maps, FakeRoutes>,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
        let config_path = dir.path().join("agent.yaml");
        let config =
            Config::parse(&config_path, "node: n1\ncluster_state: cluster.yaml\n").unwrap();
        let routes = FakeRoutes::default();
        routes.pod("198.18.1.2", 7);
        let (records, _) = mpsc::channel(16);
        let core = Core::assemble(
            config,
            Maps::default(),
            routes,
            records,
            ClusterSource::file(dir.path().join("cluster.yaml")),
            Adopted::default(),
        )
        .unwrap();
        Self { dir, core }
    }

    fn cluster_path(&self) -> PathBuf {
        self.dir.path().join("cluster.yaml")
    }

    /// Rewrites the cluster-state file (with a new inode, so the change is seen at once).
    fn write_cluster(&self, text: &str) {
        let tmp = self.dir.path().join("cluster.yaml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.cluster_path()).unwrap();
    }

    fn allow(&mut self, local: &str, remote: &str) {
        let r = self.core.handle(Request::AuthAllow {
            local: format!("spiffe://td/ns/default/sa/{local}"),
            remote: format!("spiffe://td/ns/default/sa/{remote}"),
            remote_node: "n2".into(),
            ttl_secs: 600,
        });
        assert!(matches!(r, Response::Allowed { .. }), "{r:?}");
    }

    fn endpoint(&self, addr: &str) -> bool {
        self.core
            .dp
            .endpoints
            .contains_key(&addr.parse::<IpAddr>().unwrap())
    }
}

#[test]
fn cluster_state_reaches_the_maps_and_a_removal_revokes_its_pairs() {
    let mut h = Harness::new();
    h.core.tick();
    assert!(h.core.inputs().loaded());
    assert!(h.endpoint("198.18.1.2") && h.endpoint("198.18.2.2"));
    assert_eq!(h.core.dp.links, [7].into());
    h.allow("web", "api");
    assert_eq!(h.core.dp.auth.len(), 1);
    h.write_cluster(&CLUSTER.replace(
        "  - name: api\n    node: n2\n    service_account: api\n    addresses: [198.18.2.2]\n",
        "",
    ));
    h.core.tick();
    assert!(!h.endpoint("198.18.2.2"));
    assert!(
        h.core.dp.auth.is_empty(),
        "the pair that left kept its entry"
    );
    // Its identity's number is reclaimed with it.
    assert!(
        h.core
            .names
            .id_of(Kind::Identity, "spiffe://td/ns/default/sa/api")
            .is_none()
    );
    let status = h.core.status().unwrap();
    assert!(status.agent.ready, "{:?}", status.agent.not_ready);
    assert_eq!(status.workloads, 1);
    assert_eq!(status.names_reclaimed, 1);
}

/// A revalidation that fails (the kernel refuses a removal) is owed, not forgotten: it is
/// retried at the next tick, and the rest of the pass (endpoints, links, credentials) still
/// runs. Before, the failure returned from the pass after the new state had been stored, so
/// the pair kept its entry until it expired.
#[test]
fn a_failed_revalidation_is_retried_at_the_next_tick() {
    let mut h = Harness::new();
    h.core.tick();
    h.allow("web", "api");
    h.core.dp.fail_auth_removals = true;
    h.write_cluster(
        &CLUSTER
            .replace("[198.18.2.2]", "[198.18.2.9]")
            .replace("service_account: api", "service_account: other"),
    );
    h.core.tick();
    assert_eq!(
        h.core.dp.auth.len(),
        1,
        "the injected failure did not happen"
    );
    assert!(
        h.endpoint("198.18.2.9") && !h.endpoint("198.18.2.2"),
        "the rest of the pass did not run"
    );
    h.core.dp.fail_auth_removals = false;
    h.core.tick();
    assert!(
        h.core.dp.auth.is_empty(),
        "the failed revalidation was never retried"
    );
}
