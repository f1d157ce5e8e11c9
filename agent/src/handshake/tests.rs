//! Node sessions and workload proofs between two agents' views on loopback.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls_pki_types::pem::PemObject;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};

use super::*;
use crate::identity::ca::Ca;

pub(crate) const A: &str = "198.18.1.2";
pub(crate) const B: &str = "198.18.2.2";
pub(crate) const C: &str = "198.18.2.3";
pub(crate) const ID_A: &str = "spiffe://td/ns/default/sa/a";
pub(crate) const ID_B: &str = "spiffe://td/ns/default/sa/b";
pub(crate) const ID_C: &str = "spiffe://td/ns/default/sa/c";

pub(crate) fn svid(ca: &Ca, id: &str) -> Svid {
    let id = SpiffeId::parse(id).unwrap();
    let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
    let info = crate::identity::svid::check_leaf(&issued.cert_der, SystemTime::now()).unwrap();
    Svid::new(vec![issued.cert_der], issued.key_der, info)
}

pub(crate) fn node_svid(ca: &Ca, node: &str) -> Svid {
    svid(ca, &format!("spiffe://td/portcullis/node/{node}"))
}

pub(crate) fn owner(id: &str, node: &str) -> Owner {
    Owner {
        id: SpiffeId::parse(id).unwrap(),
        node: node.into(),
    }
}

pub(crate) fn owners() -> HashMap<IpAddr, Owner> {
    [
        (A.parse().unwrap(), owner(ID_A, "node-a")),
        (B.parse().unwrap(), owner(ID_B, "node-b")),
        (C.parse().unwrap(), owner(ID_C, "node-b")),
    ]
    .into()
}

pub(crate) fn trust(cas: &[&Ca]) -> Trust {
    let roots: Vec<_> = cas
        .iter()
        .map(|ca| {
            rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()
        })
        .collect();
    Trust::new("td", &roots).unwrap()
}

/// One agent's side: its view (replaceable), its sessions, its listener, and what it records
/// and writes.
pub(crate) struct Side {
    pub views: watch::Sender<Option<Arc<View>>>,
    pub sessions: Arc<Sessions>,
    pub records: mpsc::Receiver<Record>,
    pub writes: Arc<std::sync::Mutex<Vec<Record>>>,
    pub addr: SocketAddr,
}

impl Side {
    pub(crate) fn view(&self) -> Arc<View> {
        self.views.borrow().clone().unwrap()
    }

    /// The next proof record (session set-up records skipped).
    pub(crate) async fn next_proof(&mut self) -> Record {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(5), self.records.recv())
                .await
                .expect("no record within 5 s")
                .expect("records closed");
            if r.stage == Stage::Proof {
                return r;
            }
        }
    }

    pub(crate) async fn next_session(&mut self) -> Record {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(5), self.records.recv())
                .await
                .expect("no record within 5 s")
                .expect("records closed");
            if r.stage == Stage::Session {
                return r;
            }
        }
    }

    pub(crate) async fn prove(&self, local: &str, remote: &str) -> Record {
        initiate(
            self.sessions.clone(),
            self.view(),
            local.parse().unwrap(),
            remote.parse().unwrap(),
            Duration::from_secs(5),
        )
        .await
    }
}

/// Starts an agent side listening on loopback, with `limits`.
pub(crate) async fn side_with(limits: Limits) -> (Side, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (views, views_rx) = watch::channel(None);
    let (record_tx, records) = mpsc::channel(4096);
    let (write_tx, mut write_rx) = mpsc::channel::<WriteRequest>(64);
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w = writes.clone();
    tokio::spawn(async move {
        while let Some((rec, reply)) = write_rx.recv().await {
            w.lock().unwrap().push(rec);
            let _ = reply.send(Ok(()));
        }
    });
    let sessions = Sessions::new(views_rx, record_tx.clone(), write_tx, limits.timeout);
    let side = Side {
        views,
        sessions: sessions.clone(),
        records,
        writes,
        addr,
    };
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(serve(listener, sessions, record_tx, limits));
    (side, l2)
}

pub(crate) fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(5),
        max_concurrent: 64,
        peer_rate: 10_000,
        peer_burst: 10_000,
    }
}

/// Two agents, `node-a` (hosting A) and `node-b` (hosting B and C), each with its node SVID.
pub(crate) struct Pair {
    pub a: Side,
    pub b: Side,
    pub ca: Ca,
    pub nodes: HashMap<String, SocketAddr>,
    _dir: tempfile::TempDir,
}

pub(crate) fn directory(
    owners: HashMap<IpAddr, Owner>,
    nodes: &HashMap<String, SocketAddr>,
) -> Arc<dyn Directory> {
    Arc::new(StaticDirectory {
        owners,
        nodes: nodes.clone(),
    })
}

impl Pair {
    pub(crate) async fn new() -> Self {
        Self::with(owners(), owners(), [Policy::default(), Policy::default()]).await
    }

    pub(crate) async fn with(
        a_owners: HashMap<IpAddr, Owner>,
        b_owners: HashMap<IpAddr, Owner>,
        policies: [Policy; 2],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init("td", dir.path()).unwrap();
        let (a, _) = side_with(limits()).await;
        let (b, _) = side_with(limits()).await;
        let nodes: HashMap<String, SocketAddr> =
            [("node-a".into(), a.addr), ("node-b".into(), b.addr)].into();
        let [pa, pb] = policies;
        let view_a = View::build(
            "node-a",
            trust(&[&ca]),
            directory(a_owners, &nodes),
            Some(&node_svid(&ca, "node-a")),
            &[svid(&ca, ID_A)],
            Arc::new(pa),
        )
        .unwrap();
        let view_b = View::build(
            "node-b",
            trust(&[&ca]),
            directory(b_owners, &nodes),
            Some(&node_svid(&ca, "node-b")),
            &[svid(&ca, ID_B)],
            Arc::new(pb),
        )
        .unwrap();
        a.views.send_replace(Some(Arc::new(view_a)));
        b.views.send_replace(Some(Arc::new(view_b)));
        Self {
            a,
            b,
            ca,
            nodes,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn a_proof_authenticates_both_workloads_and_both_derive_the_same_keys() {
    let mut p = Pair::new().await;
    let i = p.a.prove(A, B).await;
    assert!(i.result.is_ok(), "initiator: {i:?}");
    let r = p.b.next_proof().await;
    assert!(r.result.is_ok(), "responder: {r:?}");
    assert_eq!(i.remote_id.as_ref().map(SpiffeId::as_str), Some(ID_B));
    assert_eq!(r.remote_id.as_ref().map(SpiffeId::as_str), Some(ID_A));
    assert_eq!(r.remote_node.as_deref(), Some("node-a"));
    assert_eq!(
        i.result.unwrap(),
        r.result.unwrap(),
        "both sides agree on the expiry"
    );
    let (ki, kr) = (i.keys.clone().unwrap(), r.keys.clone().unwrap());
    assert_eq!(ki.outbound, kr.inbound);
    assert_eq!(ki.inbound, kr.outbound);
    // The responder asked the core to write its entry before answering, with the same keys.
    let written = p.b.writes.lock().unwrap().clone();
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].keys, Some(kr.clone()));
    // A renewal is a new proof in the same session, with new keys.
    let again = p.a.prove(A, B).await;
    assert!(again.result.is_ok(), "{again:?}");
    assert_ne!(
        again.keys.unwrap().outbound,
        ki.outbound,
        "a renewal rotates the keys"
    );
    assert_eq!(
        p.a.sessions
            .counts
            .opened
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(p.b.sessions.up(), 1);
}

#[tokio::test]
async fn one_session_carries_many_concurrent_proofs_in_both_directions() {
    let mut owners_ = owners();
    let mut svids_b = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init("td", dir.path()).unwrap();
    for k in 0..50u8 {
        let id = format!("spiffe://td/ns/default/sa/b{k}");
        owners_.insert(
            format!("198.18.2.{}", 10 + k).parse().unwrap(),
            owner(&id, "node-b"),
        );
        svids_b.push(svid(&ca, &id));
    }
    let (a, _) = side_with(limits()).await;
    let (mut b, _) = side_with(limits()).await;
    let nodes: HashMap<String, SocketAddr> =
        [("node-a".into(), a.addr), ("node-b".into(), b.addr)].into();
    a.views.send_replace(Some(Arc::new(
        View::build(
            "node-a",
            trust(&[&ca]),
            directory(owners_.clone(), &nodes),
            Some(&node_svid(&ca, "node-a")),
            &[svid(&ca, ID_A)],
            Arc::new(Policy::default()),
        )
        .unwrap(),
    )));
    b.views.send_replace(Some(Arc::new(
        View::build(
            "node-b",
            trust(&[&ca]),
            directory(owners_, &nodes),
            Some(&node_svid(&ca, "node-b")),
            &svids_b,
            Arc::new(Policy::default()),
        )
        .unwrap(),
    )));
    let a = Arc::new(a);
    let mut tasks = Vec::new();
    for k in 0..50u8 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            a.prove(A, &format!("198.18.2.{}", 10 + k)).await
        }));
    }
    // And the other way at the same time: node-b uses the session node-a opened.
    let back = b.prove("198.18.2.10", A).await;
    for t in tasks {
        let rec = t.await.unwrap();
        assert!(rec.result.is_ok(), "{rec:?}");
    }
    assert!(back.result.is_ok(), "{back:?}");
    let opened = a
        .sessions
        .counts
        .opened
        .load(std::sync::atomic::Ordering::Relaxed)
        + b.sessions
            .counts
            .opened
            .load(std::sync::atomic::Ordering::Relaxed);
    assert!(opened <= 2, "{opened} sessions opened for one node pair");
    let _ = b.next_proof().await;
}

#[tokio::test]
async fn a_lost_session_is_opened_again_and_proofs_go_on() {
    let p = Pair::new().await;
    assert!(p.a.prove(A, B).await.result.is_ok());
    p.a.sessions.close_all();
    // The reconnect happens in the background, with backoff; the next proof may also open it.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if p.a.sessions.up() == 1
            && p.a
                .sessions
                .counts
                .opened
                .load(std::sync::atomic::Ordering::Relaxed)
                == 2
        {
            ok = true;
            break;
        }
    }
    assert!(
        ok,
        "the lost session was not opened again: {:?}",
        p.a.sessions.peers()
    );
    let rec = p.a.prove(A, B).await;
    assert!(rec.result.is_ok(), "{rec:?}");
}

#[tokio::test]
async fn a_node_svid_renewal_moves_proofs_to_a_new_session() {
    let p = Pair::new().await;
    assert!(p.a.prove(A, B).await.result.is_ok());
    let old = p.a.view();
    let renewed = View::build(
        "node-a",
        old.trust.clone(),
        old.directory.clone(),
        Some(&node_svid(&p.ca, "node-a")),
        &[svid(&p.ca, ID_A)],
        old.policy.clone(),
    )
    .unwrap();
    p.a.views.send_replace(Some(Arc::new(renewed)));
    let rec = p.a.prove(A, B).await;
    assert!(rec.result.is_ok(), "{rec:?}");
    assert_eq!(
        p.a.sessions
            .counts
            .opened
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let _ = &p.nodes;
}

#[tokio::test]
async fn a_foreign_ca_fails_the_session_and_nothing_is_decided() {
    let mut p = Pair::new().await;
    let dir = tempfile::tempdir().unwrap();
    let foreign = Ca::init("td", dir.path()).unwrap();
    let old = p.a.view();
    p.a.views.send_replace(Some(Arc::new(
        View::build(
            "node-a",
            old.trust.clone(),
            old.directory.clone(),
            Some(&node_svid(&foreign, "node-a")),
            &[svid(&foreign, ID_A)],
            old.policy.clone(),
        )
        .unwrap(),
    )));
    let i = p.a.prove(A, B).await;
    assert!(i.result.is_err(), "{i:?}");
    assert_eq!(i.decided_by, Decider::Transport, "{i:?}");
    assert!(
        !i.revokes(),
        "a session that never came up decides nothing: {i:?}"
    );
    let r = p.b.next_session().await;
    assert_eq!(r.result, Err(Reason::UntrustedChain), "{r:?}");
}

#[tokio::test]
async fn refusals_inside_the_session_carry_their_reason_and_may_revoke() {
    let mut p = Pair::new().await;
    // C is on node-b, but node-b has no SVID for it.
    let i = p.a.prove(A, C).await;
    assert_eq!(i.result, Err(Reason::NoLocalSvid), "{i:?}");
    assert_eq!(i.decided_by, Decider::Peer);
    assert!(!i.revokes(), "a missing SVID is transient");
    assert_eq!(p.b.next_proof().await.result, Err(Reason::NoLocalSvid));
    // An address node-b does not host: refused with `not_hosted`, which revokes.
    let mut stale = owners();
    stale.insert("198.18.2.9".parse().unwrap(), owner(ID_B, "node-b"));
    let old = p.a.view();
    p.a.views.send_replace(Some(Arc::new(
        View::build(
            "node-a",
            old.trust.clone(),
            directory(stale, &p.nodes),
            Some(&node_svid(&p.ca, "node-a")),
            &[svid(&p.ca, ID_A)],
            old.policy.clone(),
        )
        .unwrap(),
    )));
    let i = p.a.prove(A, "198.18.2.9").await;
    assert_eq!(i.result, Err(Reason::NotHosted), "{i:?}");
    assert!(i.revokes());
    assert_eq!(p.b.next_proof().await.result, Err(Reason::NotHosted));
}

#[tokio::test]
async fn a_workload_cluster_state_puts_on_another_node_is_refused_as_node_mismatch() {
    // node-b believes A lives on node-c; node-a's session proves it anyway.
    let mut b_owners = owners();
    b_owners.insert(A.parse().unwrap(), owner(ID_A, "node-c"));
    let mut p = Pair::with(owners(), b_owners, [Policy::default(), Policy::default()]).await;
    let i = p.a.prove(A, B).await;
    assert_eq!(i.result, Err(Reason::NodeMismatch), "{i:?}");
    let r = p.b.next_proof().await;
    assert_eq!(r.result, Err(Reason::NodeMismatch), "{r:?}");
    assert!(
        r.detail.as_deref().unwrap_or("").contains("node-c"),
        "{r:?}"
    );
    assert!(p.b.writes.lock().unwrap().is_empty(), "no entry written");
}

#[tokio::test]
async fn an_identity_that_does_not_own_the_address_is_refused() {
    // A's agent wrongly believes A belongs to C, and proves C's SVID for it.
    let dir = tempfile::tempdir().unwrap();
    let _ = dir;
    let mut stale = owners();
    stale.insert(A.parse().unwrap(), owner(ID_C, "node-a"));
    let mut p = Pair::with(stale, owners(), [Policy::default(), Policy::default()]).await;
    let old = p.a.view();
    p.a.views.send_replace(Some(Arc::new(
        View::build(
            "node-a",
            old.trust.clone(),
            old.directory.clone(),
            Some(&node_svid(&p.ca, "node-a")),
            &[svid(&p.ca, ID_C)],
            old.policy.clone(),
        )
        .unwrap(),
    )));
    let i = p.a.prove(A, B).await;
    assert_eq!(i.result, Err(Reason::IdentityMismatch), "{i:?}");
    assert_eq!(p.b.next_proof().await.result, Err(Reason::IdentityMismatch));
}

fn b_only_from_c() -> Policy {
    Policy::parse(
        std::path::Path::new("p.yaml"),
        "name: strict\nrules:\n  - name: c-to-b\n    from: [\"spiffe://td/ns/default/sa/c\"]\n    to: [\"spiffe://td/ns/default/sa/b\"]\n  - name: c-to-a\n    from: [\"spiffe://td/ns/default/sa/c\"]\n    to: [\"spiffe://td/ns/default/sa/a\"]\n",
    )
    .unwrap()
}

#[tokio::test]
async fn an_unauthorized_pair_is_refused_by_either_side_with_the_policy_named() {
    // The responder's policy refuses.
    let mut p = Pair::with(owners(), owners(), [Policy::default(), b_only_from_c()]).await;
    let i = p.a.prove(A, B).await;
    assert_eq!(i.result, Err(Reason::NotAuthorized), "{i:?}");
    assert_eq!(i.decided_by, Decider::Peer);
    let r = p.b.next_proof().await;
    assert_eq!(r.result, Err(Reason::NotAuthorized));
    assert!(
        r.detail.as_deref().unwrap_or("").contains("strict"),
        "{r:?}"
    );
    // The initiator's own policy refuses: nothing is sent.
    let p = Pair::with(owners(), owners(), [b_only_from_c(), Policy::default()]).await;
    let i = p.a.prove(A, B).await;
    assert_eq!(i.result, Err(Reason::NotAuthorized), "{i:?}");
    assert!(
        i.detail.as_deref().unwrap_or("").contains("strict"),
        "{i:?}"
    );
    assert_eq!(
        p.a.sessions.up(),
        0,
        "no session for a pair our policy refuses"
    );
}

#[tokio::test]
async fn a_rejected_answer_is_reported_to_the_responder_to_revoke() {
    // node-b's workload SVID is from a CA node-a does not trust (node-b's own bundle has both).
    let mut p = Pair::new().await;
    let dir = tempfile::tempdir().unwrap();
    let foreign = Ca::init("td", dir.path()).unwrap();
    let old = p.b.view();
    p.b.views.send_replace(Some(Arc::new(
        View::build(
            "node-b",
            trust(&[&p.ca, &foreign]),
            old.directory.clone(),
            Some(&node_svid(&p.ca, "node-b")),
            &[svid(&foreign, ID_B)],
            old.policy.clone(),
        )
        .unwrap(),
    )));
    let i = p.a.prove(A, B).await;
    assert_eq!(i.result, Err(Reason::UntrustedChain), "{i:?}");
    assert_eq!(i.decided_by, Decider::Us);
    assert!(i.revokes());
    // node-b answered (and wrote its entry), then learnt of the rejection.
    let answered = p.b.next_proof().await;
    assert!(answered.result.is_ok(), "{answered:?}");
    let rejected = p.b.next_proof().await;
    assert_eq!(
        rejected.result,
        Err(Reason::PeerRejectedCertificate),
        "{rejected:?}"
    );
    assert_eq!(rejected.decided_by, Decider::Peer);
    assert!(rejected.revokes());
    assert_eq!(rejected.local_id.as_ref().map(SpiffeId::as_str), Some(ID_B));
}

#[tokio::test]
async fn a_bundle_that_drops_the_peer_nodes_ca_moves_proofs_to_a_new_session() {
    let mut p = Pair::new().await;
    let dir = tempfile::tempdir().unwrap();
    let other = Ca::init("td", dir.path()).unwrap();
    // node-b's node SVID comes from a second CA that both bundles hold.
    let (old_a, old_b) = (p.a.view(), p.b.view());
    p.b.views.send_replace(Some(Arc::new(
        View::build(
            "node-b",
            trust(&[&p.ca, &other]),
            old_b.directory.clone(),
            Some(&node_svid(&other, "node-b")),
            &[svid(&p.ca, ID_B)],
            old_b.policy.clone(),
        )
        .unwrap(),
    )));
    let (a_node, a_svid) = (node_svid(&p.ca, "node-a"), svid(&p.ca, ID_A));
    let both = |p: &Pair| {
        View::build(
            "node-a",
            trust(&[&p.ca, &other]),
            old_a.directory.clone(),
            Some(&a_node),
            std::slice::from_ref(&a_svid),
            old_a.policy.clone(),
        )
        .unwrap()
    };
    p.a.views.send_replace(Some(Arc::new(both(&p))));
    let first = p.a.prove(A, B).await;
    assert!(first.result.is_ok(), "{first:?}");
    let _ = p.b.next_proof().await;
    // node-a's bundle drops that CA: the session node-b authenticated with it carries no more
    // proofs; a new one is set up, and checks what node-b presents now.
    let before =
        p.a.sessions
            .counts
            .opened
            .load(std::sync::atomic::Ordering::Relaxed);
    p.a.views.send_replace(Some(Arc::new(
        View::build(
            "node-a",
            trust(&[&p.ca]),
            old_a.directory.clone(),
            Some(&a_node),
            std::slice::from_ref(&a_svid),
            old_a.policy.clone(),
        )
        .unwrap(),
    )));
    let i = p.a.prove(A, B).await;
    assert_eq!(i.result, Err(Reason::UntrustedChain), "{i:?}");
    assert_eq!(
        i.decided_by,
        Decider::Transport,
        "a set-up failure decides nothing: {i:?}"
    );
    assert!(!i.revokes(), "{i:?}");
    assert_eq!(
        p.a.sessions
            .counts
            .opened
            .load(std::sync::atomic::Ordering::Relaxed),
        before,
        "the failed set-up is not counted as opened"
    );
    // node-b renews its node SVID from the trusted CA: the next proof gets a session again.
    let old_b = p.b.view();
    p.b.views.send_replace(Some(Arc::new(
        View::build(
            "node-b",
            old_b.trust.clone(),
            old_b.directory.clone(),
            Some(&node_svid(&p.ca, "node-b")),
            &[svid(&p.ca, ID_B)],
            old_b.policy.clone(),
        )
        .unwrap(),
    )));
    let mut ok = false;
    for _ in 0..100 {
        let r = p.a.prove(A, B).await;
        if r.result.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "no session after node-b's renewal");
}
