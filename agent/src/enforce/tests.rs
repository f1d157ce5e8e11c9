use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use portcullis_common::{EP_ENFORCE, EP_HOST, EP_LOCAL};

use super::*;
use crate::{
    datapath::memory::{FakeRoutes, Maps},
    identity::SpiffeId,
    inputs::{Node, Workload},
};

/// `portcullis-cni`'s claim of interface `veth8` (index 8) for pod `default/name`.
fn claim(name: &str) -> crate::cni::Claim {
    crate::cni::Claim {
        container_id: "c1".into(),
        namespace: "default".into(),
        name: name.into(),
        uid: String::new(),
        interface: "veth8".into(),
        ifindex: 8,
        netns: format!("/run/netns/{name}"),
        addresses: Vec::new(),
        added_unix_ms: 1,
    }
}

fn workload(name: &str, node: &str, addr: &str) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        identity: SpiffeId::for_service_account("td", "default", name).unwrap(),
        node: node.into(),
        addresses: vec![addr.parse().unwrap()],
    }
}

struct World {
    maps: Maps,
    names: Registry,
    index: Index,
    policy: Policy,
    e: Enforcer<FakeRoutes>,
}

impl World {
    fn new() -> Self {
        let mut index = Index::new("n1");
        index.set_trust_domain("td");
        for (n, a) in [("n1", "198.18.0.1:4181"), ("n2", "198.18.0.2:4181")] {
            index.set_node(Node {
                name: n.into(),
                address: a.parse().unwrap(),
            });
        }
        Self {
            maps: Maps::default(),
            names: Registry::load(Vec::new()),
            index,
            policy: Policy::default(),
            e: Enforcer::new(
                FakeRoutes {
                    host: vec!["198.18.0.1".parse().unwrap()],
                    ..FakeRoutes::default()
                },
                HashMap::new(),
                Vec::new(),
            ),
        }
    }

    fn apply(&mut self) -> Synced {
        let changes = self.index.take_changes();
        self.e.apply(
            &mut self.maps,
            &mut self.names,
            &self.index,
            &self.policy,
            &changes,
            false,
        )
    }

    fn tick(&mut self) -> Synced {
        self.e
            .tick(&mut self.maps, &mut self.names, &self.index, &self.policy)
    }

    fn ep(&self, addr: &str) -> Option<Endpoint> {
        self.maps
            .endpoints
            .get(&addr.parse::<IpAddr>().unwrap())
            .copied()
    }
}

#[test]
fn workloads_are_programmed_and_only_local_ones_attached() {
    let mut w = World::new();
    w.e.routes().pod("198.18.1.2", 7);
    w.index.upsert(workload("web", "n1", "198.18.1.2"));
    w.index.upsert(workload("api", "n2", "198.18.2.2"));
    w.tick();
    w.apply();
    let web = w.ep("198.18.1.2").expect("local endpoint");
    assert_eq!(web.flags & EP_LOCAL, EP_LOCAL);
    assert_eq!(web.flags & EP_ENFORCE, EP_ENFORCE);
    assert_eq!(web.ifindex, 7);
    let api = w.ep("198.18.2.2").expect("remote endpoint");
    assert_eq!(api.flags & EP_LOCAL, 0);
    assert_eq!(w.ep("198.18.0.1").map(|e| e.flags), Some(EP_HOST));
    assert_eq!(w.maps.links, [7].into());
    assert!(w.e.locals().pending().is_empty());
    // A change to a remote workload programs its new address and removes its old one; only
    // the old one can have flows that lost their footing.
    w.index.upsert(workload("api", "n2", "198.18.2.3"));
    let synced = w.apply();
    let touched: HashSet<IpAddr> = ["198.18.2.2".parse().unwrap()].into();
    assert_eq!(synced.changed, touched);
    assert_eq!((synced.set, synced.removed), (1, 1));
    assert!(w.ep("198.18.2.2").is_none());
    // The local pod leaves: released.
    w.index.remove("default", "web");
    w.apply();
    assert!(w.ep("198.18.1.2").is_none());
    assert!(w.maps.links.is_empty());
}

/// A failed route lookup for a pod whose interface is known and still exists keeps it
/// enforced (before, it was programmed as a remote peer and its programs detached).
#[test]
fn a_failing_route_lookup_keeps_an_attached_pod_enforced() {
    let mut w = World::new();
    w.tick();
    w.e.routes().pod("198.18.1.2", 7);
    w.index.upsert(workload("web", "n1", "198.18.1.2"));
    w.apply();
    assert_eq!(w.maps.links, [7].into());
    // The route goes; the interface stays.
    w.e.routes().routes.borrow_mut().clear();
    let synced = w.tick();
    assert!(synced.changed.is_empty(), "{:?}", synced.changed);
    let web = w.ep("198.18.1.2").unwrap();
    assert_eq!((web.flags & EP_LOCAL, web.ifindex), (EP_LOCAL, 7));
    assert_eq!(w.maps.links, [7].into(), "the programs were detached");
    let degraded = w.e.locals().degraded();
    assert_eq!(degraded.len(), 1);
    assert!(
        degraded[0].1.contains("still enforcing on veth7"),
        "{degraded:?}"
    );
    // The interface itself goes: now the pod waits for a new one.
    w.e.routes().links.borrow_mut().clear();
    w.tick();
    assert_eq!(w.ep("198.18.1.2").unwrap().flags & EP_LOCAL, 0);
    assert!(w.maps.links.is_empty());
    assert_eq!(w.e.locals().pending()[0].0, "default/web");
    // A new interface appears.
    w.e.routes().pod("198.18.1.2", 9);
    w.tick();
    assert_eq!(w.ep("198.18.1.2").unwrap().ifindex, 9);
    assert_eq!(w.maps.links, [9].into());
}

/// A full map leaves out a remote peer, never the node or a local pod, and the peer gets in
/// once there is room.
#[test]
fn a_full_map_leaves_out_a_remote_peer_and_retries_it_when_room_appears() {
    let mut w = World::new();
    w.maps.endpoint_capacity = Some(3);
    w.tick();
    for i in 2..6 {
        w.index
            .upsert(workload(&format!("r{i}"), "n2", &format!("198.18.2.{i}")));
    }
    w.apply();
    assert_eq!(w.maps.endpoints.len(), 3);
    assert_eq!(w.e.missing(), 2);
    // A local pod arrives at a full map: a remote peer makes room.
    w.e.routes().pod("198.18.1.2", 7);
    w.index.upsert(workload("web", "n1", "198.18.1.2"));
    w.apply();
    assert_eq!(
        w.ep("198.18.1.2").map(|e| e.flags & EP_LOCAL),
        Some(EP_LOCAL)
    );
    assert_eq!(w.ep("198.18.0.1").map(|e| e.flags), Some(EP_HOST));
    assert_eq!(w.e.missing(), 3);
    // Two remote peers leave: two of the left-out ones get in.
    let gone: Vec<String> = w
        .index
        .workloads()
        .filter(|x| x.node.as_ref() == "n2" && w.maps.endpoints.contains_key(&x.addresses[0]))
        .map(|x| x.name.clone())
        .collect();
    assert_eq!(gone.len(), 1);
    w.index.remove("default", &gone[0]);
    let other = w
        .index
        .workloads()
        .find(|x| x.node.as_ref() == "n2" && x.name != gone[0])
        .map(|x| x.name.clone())
        .unwrap();
    w.index.remove("default", &other);
    w.apply();
    assert_eq!(w.maps.endpoints.len(), 3);
    assert_eq!(w.e.missing(), 1);
}

#[test]
fn a_policy_change_rewrites_the_local_pods_settings_only() {
    let mut w = World::new();
    w.e.routes().pod("198.18.1.2", 7);
    w.index.upsert(workload("web", "n1", "198.18.1.2"));
    w.index.upsert(workload("api", "n2", "198.18.2.2"));
    w.apply();
    w.policy = Policy::parse(std::path::Path::new("p.yaml"), "name: p\nmode: audit\n").unwrap();
    let changes = w.index.take_changes();
    let synced = w.e.apply(
        &mut w.maps,
        &mut w.names,
        &w.index,
        &w.policy,
        &changes,
        true,
    );
    assert_eq!(synced.changed, ["198.18.1.2".parse().unwrap()].into());
    assert_eq!(
        w.ep("198.18.1.2").unwrap().flags & (EP_ENFORCE | portcullis_common::EP_AUDIT),
        portcullis_common::EP_AUDIT
    );
}

/// A restarted agent adopts the node's endpoints: its first pass must not take them for
/// addresses that went (that would cut the node's connections to its pods for a moment).
#[test]
fn the_first_pass_keeps_the_adopted_endpoints_of_the_node() {
    let mut w = World::new();
    let host: IpAddr = "198.18.0.1".parse().unwrap();
    let adopted = Endpoint {
        identity: w
            .names
            .intern(&mut w.maps, Kind::Identity, HOST_IDENTITY)
            .unwrap(),
        node: w.names.intern(&mut w.maps, Kind::Node, "n1").unwrap(),
        ifindex: 0,
        flags: EP_HOST,
    };
    w.maps.endpoints.insert(host, adopted);
    w.e = Enforcer::new(
        FakeRoutes {
            host: vec![host],
            ..FakeRoutes::default()
        },
        [(host, adopted)].into(),
        Vec::new(),
    );
    let synced = w.apply();
    assert_eq!(w.ep("198.18.0.1"), Some(adopted));
    assert!(synced.changed.is_empty(), "{:?}", synced.changed);
    assert_eq!(synced.removed, 0);
}

/// With the name map nearly full, the node's and a local pod's names are numbered before
/// remote ones; a local pod that cannot be numbered is shown as not enforced.
#[test]
fn a_nearly_full_name_map_numbers_local_pods_first_and_says_when_it_cannot() {
    let mut w = World::new();
    // Leave room for the node's two names, a local identity and one more.
    for i in 0..portcullis_common::capacity::NAMES as usize - 4 {
        w.names
            .intern(
                &mut w.maps,
                Kind::Identity,
                &format!("spiffe://td/filler/{i}"),
            )
            .unwrap();
    }
    w.e.routes().pod("198.18.1.2", 7);
    for i in 0..20 {
        w.index.upsert(workload(
            &format!("r{i}"),
            "n2",
            &format!("198.18.2.{}", i + 2),
        ));
    }
    w.index.upsert(workload("web", "n1", "198.18.1.2"));
    w.apply();
    assert_eq!(
        w.ep("198.18.1.2").map(|e| e.flags & EP_LOCAL),
        Some(EP_LOCAL),
        "the local pod was left unnumbered"
    );
    assert!(
        w.ep("198.18.0.1").is_some(),
        "the node's address was left unnumbered"
    );
    assert!(w.e.missing() >= 19, "{} left out", w.e.missing());
    assert!(w.e.locals().pending().is_empty());
    // A second local pod finds the map full: it is not enforced, and says so.
    w.e.routes().pod("198.18.1.3", 8);
    w.index.upsert(workload("late", "n1", "198.18.1.3"));
    w.apply();
    let pending = w.e.pending(&w.index);
    assert!(
        pending
            .iter()
            .any(|(l, why)| l == "default/late" && why.contains("cannot be numbered")),
        "{pending:?}"
    );
}

/// On a bridge every pod's address routes through the bridge: with `pod_interfaces: cni` the
/// pod's interface is the veth `portcullis-cni` claimed, never the route's; a claimed
/// interface stays held (not detached) while its pod is no workload, and is released with
/// its claim.
#[test]
fn claimed_interfaces_win_over_routes_and_stay_held_until_the_claim_goes() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new();
    w.e = std::mem::take(&mut w.e).with_pod_interfaces(PodInterfaces::Cni, dir.path().into());
    // Both pods route through the bridge, index 3.
    w.e.routes().pod("198.18.1.2", 3);
    w.e.routes().pod("198.18.1.3", 3);
    w.e.routes().links.borrow_mut().insert(8, "veth8".into());
    w.index.upsert(workload("web", "n1", "198.18.1.2"));
    w.index.upsert(workload("db", "n1", "198.18.1.3"));
    w.apply();
    assert!(
        w.maps.links.is_empty(),
        "no claim: no interface, whatever the route says"
    );
    assert_eq!(w.e.locals().pending().len(), 2);
    let claim = claim("web");
    crate::cni::write_claim(dir.path(), &claim).unwrap();
    w.e.claims_changed(&mut w.maps, &mut w.names, &w.index, &w.policy);
    assert_eq!(w.maps.links, [8].into());
    assert_eq!(w.ep("198.18.1.2").unwrap().ifindex, 8);
    assert!(w.e.locals().enrollment("c1").0);
    assert_eq!(w.e.locals().pending()[0].0, "default/db");
    // The pod leaves cluster state before DEL: its endpoint goes, its links stay.
    w.index.remove("default", "web");
    w.apply();
    assert!(w.ep("198.18.1.2").is_none());
    assert_eq!(w.maps.links, [8].into(), "held until DEL");
    assert_eq!(
        w.e.locals().held(),
        [("default/web".to_owned(), "veth8".to_owned())]
    );
    assert!(!w.e.locals().enrollment("c1").0);
    // DEL: the claim goes, and so do the links.
    crate::cni::remove_claim(dir.path(), "c1").unwrap();
    w.e.claims_changed(&mut w.maps, &mut w.names, &w.index, &w.policy);
    assert!(w.maps.links.is_empty());
    assert!(w.e.locals().held().is_empty());
}

/// With `pod_interfaces: auto` a pod without a claim is found by route, unless the route leads
/// to a bridge; a claim, once there, wins.
#[test]
fn without_a_claim_a_route_through_a_bridge_is_refused_and_a_veth_route_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new();
    w.e = std::mem::take(&mut w.e).with_pod_interfaces(PodInterfaces::Auto, dir.path().into());
    w.e.routes().pod("198.18.1.2", 3);
    w.e.routes().bridges.borrow_mut().insert(3);
    w.e.routes().pod("198.18.1.9", 9);
    w.index.upsert(workload("web", "n1", "198.18.1.2"));
    w.index.upsert(workload("ptp", "n1", "198.18.1.9"));
    w.apply();
    assert_eq!(
        w.maps.links,
        [9].into(),
        "the veth route is taken, the bridge is not"
    );
    let pending = w.e.locals().pending();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].0, "default/web");
    assert!(pending[0].1.contains("bridge"), "{pending:?}");
    w.e.routes().links.borrow_mut().insert(8, "veth8".into());
    let claim = claim("web");
    crate::cni::write_claim(dir.path(), &claim).unwrap();
    w.e.claims_changed(&mut w.maps, &mut w.names, &w.index, &w.policy);
    assert_eq!(w.maps.links, [8, 9].into());
    assert!(w.e.locals().pending().is_empty());
}

/// Until the claims could be read, no pinned link is taken for a leftover (it may be one a
/// claim holds); and an interface held for a claim whose links vanished is held again with
/// ours, although its pod is no workload.
#[test]
fn pins_are_kept_until_claims_are_read_and_a_held_interface_that_lost_its_links_is_held_again() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let claims = dir.path().join("cni");
    let ghost = claim("ghost");
    crate::cni::write_claim(&claims, &ghost).unwrap();
    std::fs::set_permissions(&claims, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut w = World::new();
    w.maps.links.insert(9);
    w.e = Enforcer::new(
        FakeRoutes {
            host: vec!["198.18.0.1".parse().unwrap()],
            ..FakeRoutes::default()
        },
        HashMap::new(),
        vec![9],
    )
    .with_pod_interfaces(PodInterfaces::Auto, claims.clone());
    w.e.routes().links.borrow_mut().insert(8, "veth8".into());
    w.e.routes().links.borrow_mut().insert(9, "veth9".into());
    w.apply();
    assert_eq!(
        w.maps.links,
        [9].into(),
        "an unreadable claim directory released a pin"
    );
    std::fs::set_permissions(&claims, std::fs::Permissions::from_mode(0o700)).unwrap();
    w.e.claims_changed(&mut w.maps, &mut w.names, &w.index, &w.policy);
    assert_eq!(
        w.maps.links,
        [8].into(),
        "the leftover goes once the claims are read; the held interface without links gets ours"
    );
    assert_eq!(
        w.e.locals().held(),
        [("default/ghost".to_owned(), "veth8".to_owned())]
    );
}
