//! The entry lifecycle against in-memory maps.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use portcullis_common::{
    AF_INET, AUTH_KEYED, AUTH_PREVIOUS_KEYS, EP_ENFORCE, EP_LOCAL, Endpoint, FLOW_INBOUND, FlowKey,
    FlowValue, IPPROTO_TCP, IPPROTO_UDP,
};
use tokio::sync::watch;

use super::*;
use crate::{
    datapath::memory::Maps,
    inputs::{Node, Workload},
    policy::Grant,
};

struct World {
    maps: Maps,
    names: Registry,
    index: Index,
    endpoints: HashMap<IpAddr, Endpoint>,
    policy: Arc<Policy>,
    view: watch::Receiver<Option<Arc<View>>>,
    auth: Auth,
}

const WEB: &str = "198.18.1.2";
const API: &str = "198.18.2.2";
const DB: &str = "198.18.2.3";

fn workload(name: &str, node: &str, addr: &str) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        identity: SpiffeId::for_service_account("td", "default", name).unwrap(),
        node: node.into(),
        addresses: vec![addr.parse().unwrap()],
    }
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
        index.upsert(workload("web", "n1", WEB));
        index.upsert(workload("api", "n2", API));
        index.upsert(workload("db", "n2", DB));
        index.take_changes();
        let (_tx, view) = watch::channel(None);
        let mut w = Self {
            maps: Maps::default(),
            names: Registry::load(Vec::new()),
            index,
            endpoints: HashMap::new(),
            policy: Arc::new(Policy::default()),
            view,
            auth: Auth::new("n1", Entries::default(), None, false, 16),
        };
        // The endpoints as the enforcer would program them.
        for (name, node, addr, local) in [
            ("web", "n1", WEB, true),
            ("api", "n2", API, false),
            ("db", "n2", DB, false),
        ] {
            let ep = Endpoint {
                identity: w.id(name),
                node: w.node(node),
                ifindex: if local { 7 } else { 0 },
                flags: if local { EP_LOCAL | EP_ENFORCE } else { 0 },
            };
            w.endpoints.insert(addr.parse().unwrap(), ep);
        }
        w
    }

    fn id(&mut self, name: &str) -> u32 {
        let id = format!("spiffe://td/ns/default/sa/{name}");
        self.names
            .intern(&mut self.maps, Kind::Identity, &id)
            .unwrap()
    }

    fn node(&mut self, name: &str) -> u32 {
        self.names.intern(&mut self.maps, Kind::Node, name).unwrap()
    }

    fn key(&mut self, local: &str, remote: &str) -> AuthKey {
        AuthKey {
            local_identity: self.id(local),
            remote_identity: self.id(remote),
            remote_node: self.node("n2"),
            kind: 0,
        }
    }

    /// An entry for (web, `remote`) valid for `secs` from now, and an inbound flow of it.
    fn admitted(&mut self, remote: &str, remote_addr: &str, port: u16, secs: i64) -> AuthKey {
        let key = self.key("web", remote);
        let now = boot_ns();
        let expires = now.saturating_add_signed(secs * 1_000_000_000);
        let value = with_grant(
            AuthValue {
                created_ns: now.saturating_sub(1_000_000_000),
                expires_ns: expires,
                ..AuthValue::default()
            },
            &Grant::All,
        );
        self.auth
            .entries
            .insert(&mut self.maps, key, value)
            .unwrap();
        self.flow(remote_addr, port, IPPROTO_TCP, key, 0);
        key
    }

    fn flow(&mut self, remote_addr: &str, port: u16, proto: u8, key: AuthKey, seen: u32) {
        let mut k = FlowKey {
            local_port: 8080,
            remote_port: port,
            proto,
            family: AF_INET,
            ..FlowKey::default()
        };
        k.local_addr[..4].copy_from_slice(&WEB.parse::<std::net::Ipv4Addr>().unwrap().octets());
        k.remote_addr[..4]
            .copy_from_slice(&remote_addr.parse::<std::net::Ipv4Addr>().unwrap().octets());
        self.maps.flows.insert(
            k,
            FlowValue {
                local_identity: key.local_identity,
                remote_identity: key.remote_identity,
                remote_node: key.remote_node,
                flags: FLOW_INBOUND,
                created_ns: 0,
                ifindex: 7,
                seen,
            },
        );
    }

    fn revalidate(&mut self, scope: Scope<'_>) -> Report {
        let ctx = Ctx {
            index: &self.index,
            names: &self.names,
            endpoints: &self.endpoints,
            policy: &self.policy,
            view: &self.view,
        };
        self.auth
            .revalidate(&mut self.maps, &ctx, scope, "test")
            .unwrap()
    }

    fn tick(&mut self) {
        let ctx = Ctx {
            index: &self.index,
            names: &self.names,
            endpoints: &self.endpoints,
            policy: &self.policy,
            view: &self.view,
        };
        self.auth.tick(&mut self.maps, &ctx);
    }
}

/// A workload leaving cluster state costs a look at its own entries and flows only: its
/// entry is revoked and its flows cut, the others are not even checked.
#[test]
fn a_workload_leaving_revokes_only_its_entries_and_flows() {
    let mut w = World::new();
    let api = w.admitted("api", API, 40_000, 3600);
    let db = w.admitted("db", DB, 40_001, 3600);
    w.index.remove("default", "api");
    w.endpoints.remove(&API.parse().unwrap());
    let changes = w.index.take_changes();
    let report = w.revalidate(Scope::Touched {
        pairs: &changes.pairs,
        addrs: &changes.addrs,
    });
    assert_eq!(report.entries_checked, 1);
    assert_eq!(report.revoked.len(), 1);
    assert_eq!(report.revoked[0].0, api);
    assert_eq!(report.flows_cut, 1);
    assert!(w.maps.auth.contains_key(&db) && !w.maps.auth.contains_key(&api));
    assert_eq!(w.maps.flows.len(), 1);
    // Nothing touched: nothing looked at, not even the flow table.
    let none = std::collections::HashSet::new();
    let report = w.revalidate(Scope::Touched {
        pairs: &std::collections::HashSet::new(),
        addrs: &none,
    });
    assert_eq!((report.entries_checked, report.flows_checked), (0, 0));
}

/// An entry that expires takes the flows it admitted with it: renewal keeps live pairs'
/// entries fresh, so an expiry means the pair could not be proven again (before, the entry
/// went and its connections carried on).
#[test]
fn an_expired_entry_takes_its_flows_with_it() {
    let mut w = World::new();
    let gone = w.admitted("api", API, 40_000, -1);
    let kept = w.admitted("db", DB, 40_001, 3600);
    w.tick();
    assert!(!w.maps.auth.contains_key(&gone) && w.maps.auth.contains_key(&kept));
    assert_eq!(w.maps.flows.len(), 1, "the expired pair's flow was not cut");
    assert!(w.maps.flows.values().all(|v| v.pair() == kept));
}

/// UDP flows idle past the timeout are cut; live ones and TCP flows are not.
#[test]
fn idle_udp_flows_are_cut() {
    let mut w = World::new();
    w.auth =
        Auth::new("n1", Entries::default(), None, false, 16).with_udp_idle(Duration::from_secs(30));
    let key = w.key("web", "api");
    let now = portcullis_common::seen_units(boot_ns());
    w.flow(API, 5353, IPPROTO_UDP, key, now - 60);
    w.flow(API, 5354, IPPROTO_UDP, key, now);
    w.flow(API, 40_000, IPPROTO_TCP, key, 0);
    w.auth.sweep_udp(&mut w.maps, boot_ns());
    let left: Vec<u16> = w.maps.flows.keys().map(|k| k.remote_port).collect();
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&5353), "{left:?}");
    // A flow recorded by an earlier version of the programs carries no time: it counts as
    // seen when this agent started, not as idle since boot.
    w.flow(API, 5355, IPPROTO_UDP, key, 0);
    w.auth.sweep_udp(&mut w.maps, boot_ns());
    assert!(
        w.maps.flows.keys().any(|k| k.remote_port == 5355),
        "cut at the upgrade"
    );
    w.auth.sweep_udp(
        &mut w.maps,
        boot_ns() + Duration::from_secs(60).as_nanos() as u64,
    );
    assert!(
        !w.maps.flows.keys().any(|k| k.remote_port == 5355),
        "never cut"
    );
}

/// A policy edit revalidates every entry: what it no longer authorizes is revoked, what it
/// narrows gets its new ports, and flows on ports no longer admitted are cut.
#[test]
fn a_policy_edit_revokes_and_regrants() {
    let mut w = World::new();
    let api = w.admitted("api", API, 40_000, 3600);
    let db = w.admitted("db", DB, 40_001, 3600);
    w.policy = Arc::new(
        Policy::parse(
            std::path::Path::new("p.yaml"),
            "name: p\nrules:\n  - name: api-to-web\n    from: [\"spiffe://td/ns/default/sa/api\"]\n    to: [\"spiffe://td/ns/default/sa/web\"]\n    ports: [9090]\n  - name: api-to-db\n    from: [\"spiffe://td/ns/default/sa/api\"]\n    to: [\"spiffe://td/ns/default/sa/db\"]\n",
        )
        .unwrap(),
    );
    let report = w.revalidate(Scope::All);
    assert_eq!(report.revoked.len(), 1, "{:?}", report.revoked);
    assert_eq!(report.revoked[0].0, db);
    assert!(
        report.revoked[0].1.contains("policy `p`"),
        "{}",
        report.revoked[0].1
    );
    assert_eq!(report.regranted, 1);
    assert_eq!(w.maps.auth[&api].nports, 1);
    // Both flows were on port 8080: neither stands.
    assert_eq!(report.flows_cut, 2);
    assert!(w.maps.flows.is_empty());
}

/// A handshake whose pair the policy refuses by the time its entry is written is recorded as
/// `not_authorized`, not as an internal error.
#[test]
fn a_denial_at_write_time_is_not_authorized() {
    let mut w = World::new();
    w.policy = Arc::new(
        Policy::parse(
            std::path::Path::new("p.yaml"),
            "name: p\nrules:\n  - name: db-only\n    from: [\"spiffe://td/ns/default/sa/db\"]\n    to: [\"spiffe://td/ns/default/sa/web\"]\n  - name: nothing-to-api\n    from: [\"spiffe://td/ns/default/sa/db\"]\n    to: [\"spiffe://td/ns/default/sa/api\"]\n",
        )
        .unwrap(),
    );
    let mut rec = Record::new(Role::Initiator, crate::handshake::Stage::Proof);
    rec.local_id = Some(SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap());
    rec.remote_id = Some(SpiffeId::parse("spiffe://td/ns/default/sa/api").unwrap());
    rec.remote_node = Some("n2".into());
    rec.result = Ok(SystemTime::now() + Duration::from_secs(600));
    let err = w
        .auth
        .write(&mut w.maps, &mut w.names, &w.index, &w.policy, &rec)
        .unwrap_err();
    assert_eq!(err.reason(), Reason::NotAuthorized, "{err}");
    assert!(w.maps.auth.is_empty());
    // The pair authorized: written, with its expiry.
    w.policy = Arc::new(Policy::default());
    w.auth
        .write(&mut w.maps, &mut w.names, &w.index, &w.policy, &rec)
        .unwrap();
    assert_eq!(w.maps.auth.len(), 1);
    // A pair that left cluster state meanwhile is refused.
    w.index.remove("default", "api");
    let err = w
        .auth
        .write(&mut w.maps, &mut w.names, &w.index, &w.policy, &rec)
        .unwrap_err();
    assert!(matches!(err, WriteError::NotInCluster { .. }), "{err}");
}

impl World {
    fn finished(&mut self, rec: &Record) {
        let ctx = Ctx {
            index: &self.index,
            names: &self.names,
            endpoints: &self.endpoints,
            policy: &self.policy,
            view: &self.view,
        };
        self.auth.finished(&mut self.maps, &ctx, rec);
    }
}

/// A proof of (web, api) that ended with `reason`, decided by `by`, from `role`'s side.
fn failed_proof(role: Role, reason: Reason, by: crate::handshake::Decider) -> Record {
    let mut rec = Record::new(role, crate::handshake::Stage::Proof);
    rec.local_addr = Some(WEB.parse().unwrap());
    rec.remote_addr = Some(API.parse().unwrap());
    rec.local_id = Some(SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap());
    rec.remote_id = Some(SpiffeId::parse("spiffe://td/ns/default/sa/api").unwrap());
    rec.expected_remote = rec.remote_id.clone();
    rec.remote_node = Some("n2".into());
    rec.result = Err(reason);
    rec.decided_by = by;
    rec
}

/// Only a decision made inside an authenticated session revokes: a TLS alert, a reset or a
/// timeout (the transport) never does, whatever reason it carries; the peer's refusal and our
/// own check of its proof do; a responder revokes only on the initiator's rejection of its
/// answer.
#[test]
fn only_authenticated_refusals_revoke_and_transport_failures_never_do() {
    use crate::handshake::Decider::{Peer, Transport, Us};
    let cases = [
        (
            Role::Initiator,
            Reason::PeerRejectedCertificate,
            Transport,
            false,
        ),
        (Role::Initiator, Reason::UntrustedChain, Transport, false),
        (Role::Initiator, Reason::NotHosted, Transport, false),
        (Role::Initiator, Reason::Timeout, Peer, false),
        (Role::Initiator, Reason::SessionClosed, Us, false),
        (Role::Initiator, Reason::NotHosted, Peer, true),
        (Role::Initiator, Reason::BadSignature, Us, true),
        (Role::Responder, Reason::IdentityMismatch, Us, false),
        (Role::Responder, Reason::PeerRejectedCertificate, Peer, true),
    ];
    for (role, reason, by, revokes) in cases {
        let mut w = World::new();
        let key = w.admitted("api", API, 40000, 600);
        let rec = failed_proof(role, reason, by);
        assert_eq!(rec.revokes(), revokes, "{role:?} {reason:?} {by:?}");
        w.finished(&rec);
        assert_eq!(
            !w.maps.auth.contains_key(&key),
            revokes,
            "{role:?} {reason:?} decided by {by:?}: entry {}",
            if revokes { "kept" } else { "removed" }
        );
        assert_eq!(
            w.maps.flows.is_empty(),
            revokes,
            "{role:?} {reason:?} {by:?}: flows"
        );
    }
    // A refusal about a pair other than the one cluster state now has at those addresses (an
    // address reused while the proof ran) revokes nothing.
    let mut w = World::new();
    let key = w.admitted("api", API, 40000, 600);
    let mut rec = failed_proof(Role::Initiator, Reason::NotHosted, Peer);
    rec.expected_remote = Some(SpiffeId::parse("spiffe://td/ns/default/sa/db").unwrap());
    w.finished(&rec);
    assert!(
        w.maps.auth.contains_key(&key),
        "another pair's refusal revoked"
    );
    // A session that could not be set up is not about any pair.
    let mut w = World::new();
    let key = w.admitted("api", API, 40000, 600);
    let mut rec = failed_proof(Role::Initiator, Reason::NotHosted, Peer);
    rec.stage = crate::handshake::Stage::Session;
    w.finished(&rec);
    assert!(w.maps.auth.contains_key(&key));
}

/// A re-proven entry keeps the keys of the proof before, so that when both agents prove the
/// same pair at once and each keeps the other's proof last, a verifier holding both accepts
/// what the other side signs.
#[test]
fn a_re_proven_entry_keeps_the_previous_keys() {
    let mut w = World::new();
    let key = w.key("web", "api");
    let keys = |b: u8| crate::handshake::PairKeys {
        outbound: [b; 16],
        inbound: [b + 1; 16],
    };
    let value = AuthValue {
        expires_ns: boot_ns() + 60_000_000_000,
        created_ns: boot_ns(),
        ..AuthValue::default()
    };
    w.auth
        .entries
        .insert_keyed(&mut w.maps, key, value, Some(keys(1)), None, true)
        .unwrap();
    assert_eq!(w.auth.entries.pair_keys(&key), Some(keys(1)));
    assert_eq!(w.auth.entries.previous_pair_keys(&key), None);
    let first = w.maps.auth[&key];
    assert_eq!(
        first.flags & AUTH_KEYED,
        AUTH_KEYED,
        "the kernel entry holds the keys"
    );
    assert_eq!((first.keys.sign, first.keys.verify), ([1; 16], [2; 16]));
    w.auth
        .entries
        .insert_keyed(&mut w.maps, key, value, Some(keys(5)), None, true)
        .unwrap();
    assert_eq!(w.auth.entries.pair_keys(&key), Some(keys(5)));
    assert_eq!(w.auth.entries.previous_pair_keys(&key), Some(keys(1)));
    let second = w.maps.auth[&key];
    assert_eq!(second.flags & AUTH_PREVIOUS_KEYS, AUTH_PREVIOUS_KEYS);
    assert_eq!(
        (second.keys.sign_previous, second.keys.verify_previous),
        ([1; 16], [2; 16])
    );
    assert_eq!(
        second.keys.sign_from_ns,
        value.created_ns + super::entries::KEY_SWITCH_NS,
        "the kernel signs with the older key until the peer surely holds the new one"
    );
    // A restarted agent finds the keys in the kernel.
    let adopted = Entries::load(w.maps.auth.clone().into_iter().collect());
    assert_eq!(adopted.pair_keys(&key), Some(keys(5)));
    // Revoked: no keys left.
    w.auth.entries.remove(&mut w.maps, &key).unwrap();
    assert_eq!(w.auth.entries.pair_keys(&key), None);
}

/// After a trust-bundle change the entries are checked here: one resting on a peer chain the
/// bundle no longer trusts, or of a local workload whose own SVID it no longer trusts, is
/// revoked with its flows; the others stay.
#[test]
fn a_bundle_change_revokes_entries_resting_on_chains_it_no_longer_trusts() {
    use rustls_pki_types::CertificateDer;
    let mut w = World::new();
    let value = AuthValue {
        expires_ns: boot_ns() + 60_000_000_000,
        created_ns: boot_ns(),
        ..AuthValue::default()
    };
    let chain = |b: u8| Arc::new(vec![CertificateDer::from(vec![b; 8])]);
    let (api, db) = (w.key("web", "api"), w.key("web", "db"));
    w.auth
        .entries
        .insert_keyed(&mut w.maps, api, value, None, Some(chain(1)), false)
        .unwrap();
    w.auth
        .entries
        .insert_keyed(&mut w.maps, db, value, None, Some(chain(2)), false)
        .unwrap();
    w.flow(API, 40000, IPPROTO_TCP, api, 0);
    w.flow(DB, 40001, IPPROTO_TCP, db, 0);
    // Chain 1 is no longer trusted.
    let revoked = w.auth.recheck_trust(
        &mut w.maps,
        &w.names,
        |c| c[0].as_ref()[0] != 1,
        &std::collections::HashSet::new(),
    );
    assert_eq!(revoked, 1);
    assert!(!w.maps.auth.contains_key(&api));
    assert!(w.maps.auth.contains_key(&db));
    assert_eq!(
        w.maps.flows.len(),
        1,
        "the revoked pair's flow is cut, the other stays"
    );
    // Our own SVID of `web` is no longer trusted: its remaining entry goes too.
    let web = w.id("web");
    let revoked = w
        .auth
        .recheck_trust(&mut w.maps, &w.names, |_| true, &[web].into());
    assert_eq!(revoked, 1);
    assert!(w.maps.auth.is_empty() && w.maps.flows.is_empty());
}

/// The key schedule across two nodes, as the kernel applies it (`EntryKeys::signing` on the
/// source node, `EntryKeys::verifies` on the destination): at every moment between and after
/// the writes of a re-proof, whatever one side signs a SYN with, the other accepts — also when
/// both agents first proved the pair at once and wrote the two proofs in opposite orders, and a
/// later proof comes within the switch delay. (While those two first proofs are half written,
/// a side with no earlier keys signs with the only keys it has, which the peer holds once it
/// writes its half, a moment later: a SYN sent in between is retransmitted.)
#[test]
fn what_one_node_signs_the_other_verifies_through_concurrent_and_successive_proofs() {
    use portcullis_common::mac;

    use super::entries::KEY_SWITCH_NS;

    let k = AuthKey {
        local_identity: 1,
        remote_identity: 2,
        remote_node: 3,
        kind: 0,
    };
    // Node A's entry (a, b) and node B's entry (b, a): one key per direction and proof.
    let (mut a, mut b) = (Entries::default(), Entries::default());
    let (mut ma, mut mb) = (Maps::default(), Maps::default());
    let a_to_b = |p: u8| [p; 16];
    let b_to_a = |p: u8| [p | 0x80; 16];
    // `answered`: the side answers the proof (writes first), else it proved it (writes last).
    let write = |e: &mut Entries, m: &mut Maps, on_a: bool, proof: u8, at: u64, answered: bool| {
        let keys = if on_a {
            crate::handshake::PairKeys {
                outbound: a_to_b(proof),
                inbound: b_to_a(proof),
            }
        } else {
            crate::handshake::PairKeys {
                outbound: b_to_a(proof),
                inbound: a_to_b(proof),
            }
        };
        let v = AuthValue {
            created_ns: at,
            expires_ns: at + 3_600_000_000_000,
            ..AuthValue::default()
        };
        e.insert_keyed(m, k, v, Some(keys), None, answered).unwrap();
    };
    let msg = mac::message(&mac::Syn {
        family: 4,
        src: [198, 18, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [198, 18, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport: 40000,
        dport: 8080,
        seq: 7,
        time: 1,
    });
    // Both directions, at `now`: the signer's MAC verifies at the other node.
    let agree = |ma: &Maps, mb: &Maps, now: u64, step: &str| {
        for (from, to, dir) in [(ma, mb, "A→B"), (mb, ma, "B→A")] {
            let s = from.auth[&k];
            let v = to.auth[&k];
            let tag = mac::siphash24(s.keys.signing(s.flags, now), &msg);
            assert!(
                v.keys.verifies(v.flags, &msg, tag),
                "{step}, {dir} at {now} ns: signed with a key the peer does not hold"
            );
        }
    };
    let ms = 1_000_000;
    // Proofs 1 (A initiates) and 2 (B initiates) at once: each side answers the other's first.
    write(&mut b, &mut mb, false, 1, 10 * ms, true); // B answers proof 1
    write(&mut a, &mut ma, true, 2, 11 * ms, true); // A answers proof 2
    write(&mut a, &mut ma, true, 1, 12 * ms, false); // A finishes proof 1
    write(&mut b, &mut mb, false, 2, 13 * ms, false); // B finishes proof 2
    // The two nodes now hold the proofs in opposite orders.
    assert_ne!(ma.auth[&k].keys.sign, mb.auth[&k].keys.verify);
    for t in [13 * ms, 13 * ms + KEY_SWITCH_NS] {
        agree(&ma, &mb, t, "both finished");
    }
    // Proof 3, by B, within the switch delay: A answers (writes) first.
    write(&mut a, &mut ma, true, 3, 100 * ms, true);
    agree(&ma, &mb, 100 * ms, "proof 3 answered");
    write(&mut b, &mut mb, false, 3, 101 * ms, false);
    for t in [101 * ms, 13 * ms + KEY_SWITCH_NS, 101 * ms + KEY_SWITCH_NS] {
        agree(&ma, &mb, t, "proof 3 finished");
    }
    // Proof 4, by A, long after: B answers first.
    let later = 200 * ms + 2 * KEY_SWITCH_NS;
    write(&mut b, &mut mb, false, 4, later, true);
    agree(&ma, &mb, later, "proof 4 answered");
    write(&mut a, &mut ma, true, 4, later + ms, false);
    for t in [later + ms, later + ms + KEY_SWITCH_NS] {
        agree(&ma, &mb, t, "proof 4 finished");
    }
    // B's entry alone is lost (revoked there); A's remains. Proof 5 by A: B answers with no
    // earlier keys (until A writes, a moment later, A's SYNs meet a key B no longer holds, as
    // they met no entry at all before), and A, which proved, signs with the new keys at once.
    b.remove(&mut mb, &k).unwrap();
    let again = later + 3 * KEY_SWITCH_NS;
    write(&mut b, &mut mb, false, 5, again, true);
    write(&mut a, &mut ma, true, 5, again + ms, false);
    agree(&ma, &mb, again + ms, "proof 5 finished");
    // The other way round, proof 6 by B after B lost its entry again: A answers and signs with
    // its keys before for the switch delay, which B no longer holds (SYNs from A in that
    // window are retransmitted); from then on both agree.
    b.remove(&mut mb, &k).unwrap();
    let last = again + 3 * KEY_SWITCH_NS;
    write(&mut a, &mut ma, true, 6, last, true);
    write(&mut b, &mut mb, false, 6, last + ms, false);
    agree(
        &ma,
        &mb,
        last + KEY_SWITCH_NS,
        "proof 6 finished, the switch delay passed",
    );
}
