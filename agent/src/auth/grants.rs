//! What the policy grants a pair, computed once per policy and pair, and what a handshake
//! failure means for it.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Arc,
};

use portcullis_common::{AUTH_ALL_PORTS, AuthValue, MAX_PORT_RANGES, PortRange};

use crate::{
    identity::SpiffeId,
    policy::{Decision, Grant, Policy},
    reason::Reason,
    registry::{Kind, Registry},
};

/// The policy's decision for each pair of identity numbers, computed once per policy, and the
/// parsed identity of each number.
#[derive(Debug, Default)]
pub(super) struct Decisions {
    policy: Option<Arc<Policy>>,
    cache: HashMap<(u32, u32), Decision>,
    ids: HashMap<u32, SpiffeId>,
}

/// Numbers are not reused, so old pairs and identities only take room: each cache starts over
/// past this many.
const CACHE_BOUND: usize = 1 << 20;

impl Decisions {
    pub(super) fn get(
        &mut self,
        policy: &Arc<Policy>,
        names: &Registry,
        local: u32,
        remote: u32,
    ) -> Option<&Decision> {
        if !self.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, policy)) {
            self.policy = Some(policy.clone());
            self.cache.clear();
        }
        if self.cache.len() >= CACHE_BOUND {
            self.cache.clear();
        }
        if self.ids.len() >= CACHE_BOUND {
            self.ids.clear();
        }
        match self.cache.entry((local, remote)) {
            Entry::Occupied(d) => Some(d.into_mut()),
            Entry::Vacant(slot) => {
                let mut id = |n: u32| -> Option<SpiffeId> {
                    if let Some(id) = self.ids.get(&n) {
                        return Some(id.clone());
                    }
                    let id = SpiffeId::parse(names.lookup(Kind::Identity, n)?).ok()?;
                    self.ids.insert(n, id.clone());
                    Some(id)
                };
                let (l, r) = (id(local)?, id(remote)?);
                Some(slot.insert(policy.decide(&l, &r)))
            }
        }
    }
}

/// An auth entry's value with the ports `grant` admits towards the local workload.
#[must_use]
pub fn with_grant(mut v: AuthValue, grant: &Grant) -> AuthValue {
    v.flags &= !AUTH_ALL_PORTS;
    v.nports = 0;
    v.ports = [PortRange::default(); MAX_PORT_RANGES];
    match grant {
        Grant::None => {}
        Grant::All => v.flags |= AUTH_ALL_PORTS,
        Grant::Ports(ranges) => {
            // The loader refuses rules with more ranges than fit; several rules together can
            // still exceed it, and then the excess is not admitted (never widened).
            if ranges.len() > MAX_PORT_RANGES {
                tracing::warn!(
                    ranges = ranges.len(),
                    max = MAX_PORT_RANGES,
                    "a pair's rules admit more port ranges than an auth entry holds; the excess is not admitted"
                );
            }
            for (slot, r) in v.ports.iter_mut().zip(ranges) {
                *slot = *r;
            }
            v.nports = u32::try_from(ranges.len().min(MAX_PORT_RANGES)).unwrap_or(0);
        }
    }
    v
}

/// Whether a proof's failure says the pair cannot be authenticated (as opposed to a failure
/// that a retry may overcome: time-outs, unreachable peers, a missing SVID, cluster state
/// that one side has not caught up with yet).
#[must_use]
pub fn definitive(reason: Reason) -> bool {
    !matches!(
        reason,
        Reason::Timeout
            | Reason::Unreachable
            | Reason::Tls
            | Reason::Protocol
            | Reason::Version
            | Reason::Internal
            | Reason::NoLocalSvid
            | Reason::UnknownPeer
            | Reason::Busy
            | Reason::RateLimited
            | Reason::UnknownInitiator
            | Reason::NoNodeSvid
            | Reason::NotANode
            | Reason::SessionClosed
    )
}
