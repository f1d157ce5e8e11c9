//! The responder's half of a workload proof, and a Reject of it.

use super::*;

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

impl Sessions {
    /// Our answer to a peer's proof: checks, our entry, our half.
    pub(super) async fn answer(&self, session: Arc<Session>, p: Prove) {
        let start = std::time::Instant::now();
        let mut rec = Record::new(Role::Responder, Stage::Proof);
        rec.peer = Some(session.peer_addr);
        rec.remote_node = Some(session.peer_node.to_string());
        rec.local_addr = Some(p.responder_addr);
        rec.remote_addr = Some(p.initiator_addr);
        rec.decided_by = Decider::Us;
        let id = p.id;
        let outcome = match tokio::time::timeout(
            self.timeout,
            self.answer_inner(&session, p, &mut rec),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Reason::Timeout),
        };
        rec.took = start.elapsed();
        match outcome {
            Ok((expires, proven)) => {
                rec.result = Ok(expires);
                session.remember_answer(id, rec.clone());
                let sent =
                    tokio::time::timeout(self.timeout, session.send(Message::Proven(proven))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    // The entry stays until it expires or is revalidated away; the
                    // initiator, without an answer, retries.
                    rec.detail = Some("the session closed before the answer was sent".to_owned());
                }
            }
            Err(reason) => {
                rec.result = Err(reason);
                let _ = tokio::time::timeout(
                    self.timeout,
                    session.send(Message::Refuse(Refuse { id, reason })),
                )
                .await;
            }
        }
        let _ = self.records.send(rec).await;
    }

    async fn answer_inner(
        &self,
        session: &Session,
        p: Prove,
        rec: &mut Record,
    ) -> Result<(SystemTime, Proven), Reason> {
        let Some(view) = self.views.borrow().clone() else {
            return Err(Reason::NoLocalSvid);
        };
        if !session.still_trusted(&view) {
            // The bundle no longer trusts the node SVID the peer set this session up with:
            // it may renew and open a new one; this one is closed.
            rec.detail = Some(format!(
                "{}'s node SVID in this session no longer chains to the trust bundle",
                session.peer_node
            ));
            return Err(Reason::SessionClosed);
        }
        let local = view
            .local_owner(&p.responder_addr)
            .ok_or(Reason::NotHosted)?;
        rec.local_id = Some(local.id.clone());
        let svid = view.svids.get(&local.id).ok_or(Reason::NoLocalSvid)?;
        if p.responder_id != local.id.as_str() {
            rec.detail = Some(format!(
                "the initiator expected {} at {}",
                p.responder_id, p.responder_addr
            ));
            return Err(Reason::IdentityMismatch);
        }
        let chain = decode_chain(&p.chain)?;
        let (peer_id, peer_not_after) = session.chains.verify(&view, &chain)?;
        rec.remote_id = Some(peer_id.clone());
        rec.remote_chain = Some(Arc::new(chain.clone()));
        let initiator = view
            .directory
            .owner(&p.initiator_addr)
            .ok_or(Reason::UnknownInitiator)?;
        // The node is known by the key that authenticated the session, not by an address.
        if *initiator.node != *session.peer_node {
            rec.detail = Some(format!(
                "cluster state puts {} on {}, and this session is {}'s",
                p.initiator_addr, initiator.node, session.peer_node
            ));
            return Err(Reason::NodeMismatch);
        }
        if initiator.id != peer_id {
            return Err(Reason::IdentityMismatch);
        }
        let nonce_i = wire::unhex(&p.nonce)?;
        if nonce_i.len() != proof::NONCE_LEN {
            return Err(Reason::Protocol);
        }
        let facts = Facts {
            initiator_id: peer_id.as_str(),
            responder_id: local.id.as_str(),
            initiator_addr: p.initiator_addr,
            responder_addr: p.responder_addr,
            initiator_node: &session.peer_node,
            responder_node: &view.node,
        };
        let t = proof::transcript(Half::Initiator, &session.binding, &facts, &nonce_i, None);
        let leaf = chain.first().ok_or(Reason::NoCertificate)?;
        proof::verify(leaf, p.scheme, &t, &wire::unhex(&p.signature)?)?;
        if !view.policy.decide(&local.id, &peer_id).authorized() {
            rec.detail = Some(view.policy.denial(&local.id, &peer_id));
            return Err(Reason::NotAuthorized);
        }
        let expires = svid.not_after.min(peer_not_after);
        let nonce_r = proof::nonce()?;
        rec.keys = Some(proof::pair_keys(
            &session.binding,
            &facts,
            &nonce_i,
            &nonce_r,
            false,
        ));
        // Our entry first: the initiator's SYN may be on its way once it has our answer.
        let mut pending = rec.clone();
        pending.result = Ok(expires);
        let (tx, rx) = oneshot::channel();
        let stopped = || WriteRefused {
            reason: Reason::Internal,
            detail: "the agent stopped".to_owned(),
        };
        let written = match self.writes.send((pending, tx)).await {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        if let Err(e) = written {
            rec.detail = Some(e.detail);
            return Err(e.reason);
        }
        let t = proof::transcript(
            Half::Responder,
            &session.binding,
            &facts,
            &nonce_i,
            Some(&nonce_r),
        );
        let (scheme, signature) = proof::sign(&svid.key, &t)?;
        Ok((
            expires,
            Proven {
                id: p.id,
                nonce: wire::hex(&nonce_r),
                chain: svid.key.cert.iter().map(|c| wire::hex(c)).collect(),
                scheme,
                signature: wire::hex(&signature),
                expires_unix_ms: unix_ms(expires),
            },
        ))
    }

    /// The initiator rejected our answer: the entry we wrote for it goes.
    pub(super) async fn rejected(&self, session: &Session, r: Reject) {
        let Some(answered) = session.lock_answered().remove(&r.id) else {
            return;
        };
        let mut rec = answered.rec;
        rec.result = Err(peer_refusal(r.reason));
        rec.decided_by = Decider::Peer;
        rec.keys = None;
        rec.detail = Some(format!(
            "{} rejected our proof: {}",
            session.peer_node, r.reason
        ));
        let _ = self.records.send(rec).await;
    }
}
