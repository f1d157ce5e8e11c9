//! The initiator's half of a workload proof.

use super::*;

impl Session {
    /// Our half of a proof for (`local` at `local_addr`, `remote` at `remote_addr`), then the
    /// peer's, checked; the entry's expiry on success. `rec` gets what was learnt.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::handshake) async fn prove(
        &self,
        view: &View,
        svid: &LocalSvid,
        local: &Owner,
        remote: &Owner,
        local_addr: IpAddr,
        remote_addr: IpAddr,
        rec: &mut Record,
    ) -> Result<SystemTime, Reason> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let nonce = proof::nonce()?;
        let facts = Facts {
            initiator_id: local.id.as_str(),
            responder_id: remote.id.as_str(),
            initiator_addr: local_addr,
            responder_addr: remote_addr,
            initiator_node: &view.node,
            responder_node: &self.peer_node,
        };
        let t = proof::transcript(Half::Initiator, &self.binding, &facts, &nonce, None);
        let (scheme, signature) = proof::sign(&svid.key, &t)?;
        let (tx, rx) = oneshot::channel();
        self.lock_pending().insert(id, tx);
        self.touch();
        let prove = Prove {
            id,
            nonce: wire::hex(&nonce),
            initiator_addr: local_addr,
            responder_addr: remote_addr,
            responder_id: remote.id.to_string(),
            chain: svid.key.cert.iter().map(|c| wire::hex(c)).collect(),
            scheme,
            signature: wire::hex(&signature),
        };
        let answer = {
            let mut guard = PendingGuard { session: self, id };
            if let Err(e) = self.send(Message::Prove(prove)).await {
                guard.forget();
                return Err(e);
            }
            let a = rx.await.unwrap_or(Answer::Lost);
            guard.id = u64::MAX;
            a
        };
        let proven = match answer {
            Answer::Proven(p) => p,
            Answer::Refused(reason) => {
                rec.decided_by = Decider::Peer;
                rec.detail = Some(format!("refused by {}: {reason}", self.peer_node));
                return Err(peer_refusal(reason));
            }
            Answer::Lost => return Err(Reason::SessionClosed),
        };
        self.touch();
        let checked = (|| {
            let chain = decode_chain(&proven.chain)?;
            let (peer_id, peer_not_after) = self.chains.verify(view, &chain)?;
            rec.remote_id = Some(peer_id.clone());
            if peer_id != remote.id {
                return Err(Reason::IdentityMismatch);
            }
            let nonce_r = wire::unhex(&proven.nonce)?;
            if nonce_r.len() != proof::NONCE_LEN {
                return Err(Reason::Protocol);
            }
            let t = proof::transcript(
                Half::Responder,
                &self.binding,
                &facts,
                &nonce,
                Some(&nonce_r),
            );
            let leaf = chain.first().ok_or(Reason::NoCertificate)?;
            proof::verify(leaf, proven.scheme, &t, &wire::unhex(&proven.signature)?)?;
            if !view.policy.decide(&local.id, &peer_id).authorized() {
                rec.detail = Some(view.policy.denial(&local.id, &peer_id));
                return Err(Reason::NotAuthorized);
            }
            rec.keys = Some(proof::pair_keys(
                &self.binding,
                &facts,
                &nonce,
                &nonce_r,
                true,
            ));
            rec.remote_chain = Some(Arc::new(chain));
            Ok(svid.not_after.min(peer_not_after))
        })();
        if let Err(reason) = checked {
            rec.decided_by = Decider::Us;
            // The responder wrote its entry before answering: have it removed.
            let _ = self.send(Message::Reject(Reject { id, reason })).await;
        }
        checked
    }
}

/// A peer's refusal of our workload's certificate is, on our side, that the peer rejected it
/// (its own record says why); other reasons are the peer's as they are.
pub(super) fn peer_refusal(reason: Reason) -> Reason {
    match reason {
        Reason::Malformed
        | Reason::Expired
        | Reason::NotYetValid
        | Reason::NoUriSan
        | Reason::MultipleUriSans
        | Reason::NotSpiffe
        | Reason::WrongTrustDomain
        | Reason::CaAsLeaf
        | Reason::NoDigitalSignature
        | Reason::ChainTooLong
        | Reason::UntrustedChain
        | Reason::NoCertificate => Reason::PeerRejectedCertificate,
        r => r,
    }
}

pub(super) fn decode_chain(chain: &[String]) -> Result<Vec<CertificateDer<'static>>, Reason> {
    if chain.is_empty() {
        return Err(Reason::NoCertificate);
    }
    if chain.len() > crate::identity::svid::MAX_CHAIN {
        return Err(Reason::ChainTooLong);
    }
    chain
        .iter()
        .map(|c| wire::unhex(c).map(CertificateDer::from))
        .collect()
}
