//! Revalidation: the auth entries and flows a change touched are checked against cluster state
//! and policy again, and what lost its footing goes — an entry whose pair left cluster state or
//! is no longer authorized is revoked (the others get the ports policy now grants), a flow
//! whose endpoint went or was re-labelled, whose entry was revoked, whose port is no longer
//! admitted, or that the node-traffic setting no longer admits is cut. Each node does this for
//! its own side, so a change that reaches both agents cuts both ends.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use portcullis_common::{
    AuthKey, EP_ADMIT_HOST, EP_ENFORCE, EP_LOCAL, Endpoint, FLOW_HOST, FLOW_INBOUND, FlowKey,
    FlowValue, IDENTITY_NONE,
};

use super::entries::Entries;
use crate::status::flow_addr;

/// What to look at again.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every entry and every flow: a policy edit, a trust-bundle change, the first state.
    All,
    /// The entries of these `(identity, node)` pairs and the flows of these addresses.
    Touched {
        pairs: &'a HashSet<(Arc<str>, Arc<str>)>,
        addrs: &'a HashSet<IpAddr>,
    },
}

/// What a revalidation did.
#[derive(Debug, Default)]
pub struct Report {
    /// Revoked entries, with why.
    pub revoked: Vec<(AuthKey, String)>,
    pub regranted: usize,
    pub flows_cut: usize,
    pub entries_checked: usize,
    pub flows_checked: usize,
}

/// Whether an established flow still has the footing it was admitted on.
#[must_use]
pub fn flow_stands(
    endpoints: &HashMap<IpAddr, Endpoint>,
    entries: &Entries,
    k: &FlowKey,
    v: &FlowValue,
) -> bool {
    let local_addr = flow_addr(k.family, &k.local_addr);
    let Some(local) = endpoints.get(&local_addr) else {
        return false;
    };
    // A pod replaced by one with the same address is a new pod: its predecessor's flows end.
    if local.flags & EP_LOCAL == 0
        || local.identity != v.local_identity
        || local.ifindex != v.ifindex
    {
        return false;
    }
    if v.remote_identity != IDENTITY_NONE {
        let remote_addr = flow_addr(k.family, &k.remote_addr);
        match endpoints.get(&remote_addr) {
            Some(r) if r.identity == v.remote_identity && r.node == v.remote_node => {}
            _ => return false,
        }
    }
    // Only the destination enforces: outbound flows, and pods not in mode `enforce`, keep.
    if local.flags & EP_ENFORCE == 0 || v.flags & FLOW_INBOUND == 0 {
        return true;
    }
    if v.flags & FLOW_HOST != 0 {
        return local.flags & EP_ADMIT_HOST != 0;
    }
    entries
        .get(&v.pair())
        .is_some_and(|a| a.admits(k.proto, k.local_port))
}

/// Whether `k`'s flow is one a touched-scope revalidation must look at.
#[must_use]
pub fn flow_touched(
    addrs: &HashSet<IpAddr>,
    pairs: &HashSet<AuthKey>,
    k: &FlowKey,
    v: &FlowValue,
) -> bool {
    pairs.contains(&v.pair())
        || addrs.contains(&flow_addr(k.family, &k.local_addr))
        || addrs.contains(&flow_addr(k.family, &k.remote_addr))
}
