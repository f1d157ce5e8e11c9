//! The auth map's entries, as the agent (their only writer: the programs only read them) keeps
//! them: indexed by local identity and by remote identity on a node, so that a change of one
//! workload finds its entries at once, and ordered by renewal and expiry time, so that the
//! timer finds the due ones without walking every entry.

use std::collections::{BTreeSet, HashMap, HashSet};

use portcullis_common::{AUTH_KEYED, AUTH_OLDER_KEY, AUTH_PREVIOUS_KEYS, AuthKey, AuthValue};

use crate::{
    datapath::{AuthMap, DatapathError},
    handshake::PairKeys,
};

/// How long after answering a proof the kernel goes on signing a pair's SYNs with the keys of
/// the proof before: the side that answers writes its entry first, and the peer, which writes
/// its own once it has checked the answer, verifies only with the keys it had until then. The
/// side that proved writes last and signs with the new keys at once.
pub const KEY_SWITCH_NS: u64 = 2_000_000_000;

/// When an entry should be renewed: at the start of the last third of its lifetime.
#[must_use]
pub fn renew_at(v: &AuthValue) -> u64 {
    let life = v.expires_ns.saturating_sub(v.created_ns);
    v.expires_ns - life / 3
}

#[derive(Debug, Default)]
pub struct Entries {
    map: HashMap<AuthKey, AuthValue>,
    by_local: HashMap<u32, HashSet<AuthKey>>,
    by_remote: HashMap<(u32, u32), HashSet<AuthKey>>,
    /// How many entries name each identity (either side) and each remote node.
    identity_refs: HashMap<u32, usize>,
    node_refs: HashMap<u32, usize>,
    renewals: BTreeSet<(u64, AuthKey)>,
    expiries: BTreeSet<(u64, AuthKey)>,
    /// Keys removed since the last [`Entries::take_removed`]: their numbers may be unused now.
    removed: Vec<AuthKey>,
    /// The peer workload chain each proven entry rests on, by its SHA-256, each chain kept
    /// once with a count of the entries that name it.
    entry_chain: HashMap<AuthKey, [u8; 32]>,
    chains: HashMap<[u8; 32], (Chain, usize)>,
}

/// A peer workload's certificate chain, leaf first.
pub type Chain = std::sync::Arc<Vec<rustls_pki_types::CertificateDer<'static>>>;

fn add(refs: &mut HashMap<u32, usize>, n: u32) {
    *refs.entry(n).or_default() += 1;
}

fn sub(refs: &mut HashMap<u32, usize>, n: u32) {
    if let Some(c) = refs.get_mut(&n) {
        *c -= 1;
        if *c == 0 {
            refs.remove(&n);
        }
    }
}

impl Entries {
    /// Starts from what the kernel holds (a restart adopts it).
    #[must_use]
    pub fn load(entries: Vec<(AuthKey, AuthValue)>) -> Self {
        let mut e = Self::default();
        for (k, v) in entries {
            e.remember(k, v);
        }
        e
    }

    fn remember(&mut self, k: AuthKey, v: AuthValue) {
        self.forget(&k);
        self.by_local.entry(k.local_identity).or_default().insert(k);
        self.by_remote
            .entry((k.remote_identity, k.remote_node))
            .or_default()
            .insert(k);
        add(&mut self.identity_refs, k.local_identity);
        add(&mut self.identity_refs, k.remote_identity);
        add(&mut self.node_refs, k.remote_node);
        self.renewals.insert((renew_at(&v), k));
        self.expiries.insert((v.expires_ns, k));
        self.map.insert(k, v);
    }

    fn forget(&mut self, k: &AuthKey) -> Option<AuthValue> {
        if let Some(h) = self.entry_chain.remove(k)
            && let Some((_, n)) = self.chains.get_mut(&h)
        {
            *n -= 1;
            if *n == 0 {
                self.chains.remove(&h);
            }
        }
        let v = self.map.remove(k)?;
        if let Some(s) = self.by_local.get_mut(&k.local_identity) {
            s.remove(k);
            if s.is_empty() {
                self.by_local.remove(&k.local_identity);
            }
        }
        let rk = (k.remote_identity, k.remote_node);
        if let Some(s) = self.by_remote.get_mut(&rk) {
            s.remove(k);
            if s.is_empty() {
                self.by_remote.remove(&rk);
            }
        }
        sub(&mut self.identity_refs, k.local_identity);
        sub(&mut self.identity_refs, k.remote_identity);
        sub(&mut self.node_refs, k.remote_node);
        self.renewals.remove(&(renew_at(&v), *k));
        self.expiries.remove(&(v.expires_ns, *k));
        Some(v)
    }

    /// Writes (or renews) an entry in the kernel, then here.
    pub fn insert(
        &mut self,
        maps: &mut impl AuthMap,
        k: AuthKey,
        v: AuthValue,
    ) -> Result<(), DatapathError> {
        maps.allow_pair(&k, &v)?;
        self.remember(k, v);
        Ok(())
    }

    /// Writes an entry with the pair keys its proof derived and the peer chain it verified.
    /// The entry's value holds the keys (the kernel signs and checks SYNs with them, and a
    /// restarted agent finds them there), with those of the proof before and the verify key of
    /// the one before that: when both agents prove the same pair at once, each writes the two
    /// proofs in its own order, and the three keys cover what the other side may sign with.
    /// `answered`: this side answered the proof, so it writes first and keeps signing with
    /// the keys before for [`KEY_SWITCH_NS`].
    pub fn insert_keyed(
        &mut self,
        maps: &mut impl AuthMap,
        k: AuthKey,
        mut v: AuthValue,
        keys: Option<PairKeys>,
        chain: Option<Chain>,
        answered: bool,
    ) -> Result<(), DatapathError> {
        if let Some(keys) = keys {
            v.flags |= AUTH_KEYED;
            v.keys.sign = keys.outbound;
            v.keys.verify = keys.inbound;
            if let Some(before) = self.map.get(&k).filter(|b| b.flags & AUTH_KEYED != 0) {
                v.flags |= AUTH_PREVIOUS_KEYS;
                v.keys.sign_previous = before.keys.sign;
                v.keys.verify_previous = before.keys.verify;
                if answered {
                    v.keys.sign_from_ns = v.created_ns.saturating_add(KEY_SWITCH_NS);
                }
                if before.flags & AUTH_PREVIOUS_KEYS != 0 {
                    v.flags |= AUTH_OLDER_KEY;
                    v.keys.verify_older = before.keys.verify_previous;
                }
            }
        }
        self.insert(maps, k, v)?;
        if let Some(chain) = chain {
            let h = crate::tls::digest(&chain);
            self.chains.entry(h).or_insert((chain, 0)).1 += 1;
            self.entry_chain.insert(k, h);
        }
        Ok(())
    }

    /// The distinct peer chains entries rest on.
    pub fn peer_chains(&self) -> impl Iterator<Item = (&[u8; 32], &Chain)> {
        self.chains.iter().map(|(h, (c, _))| (h, c))
    }

    /// The entries that rest on the peer chains in `hashes`.
    #[must_use]
    pub fn resting_on(&self, hashes: &std::collections::HashSet<[u8; 32]>) -> Vec<AuthKey> {
        self.entry_chain
            .iter()
            .filter(|(_, h)| hashes.contains(*h))
            .map(|(k, _)| *k)
            .collect()
    }

    /// The pair keys of an entry, if a proof wrote it.
    #[must_use]
    pub fn pair_keys(&self, k: &AuthKey) -> Option<PairKeys> {
        self.map
            .get(k)
            .filter(|v| v.flags & AUTH_KEYED != 0)
            .map(|v| PairKeys {
                outbound: v.keys.sign,
                inbound: v.keys.verify,
            })
    }

    /// The keys of the proof before the current one, if the entry was proven twice.
    #[must_use]
    pub fn previous_pair_keys(&self, k: &AuthKey) -> Option<PairKeys> {
        self.map
            .get(k)
            .filter(|v| v.flags & AUTH_PREVIOUS_KEYS != 0)
            .map(|v| PairKeys {
                outbound: v.keys.sign_previous,
                inbound: v.keys.verify_previous,
            })
    }

    /// Removes an entry from the kernel, then here; `false` when there was none.
    pub fn remove(&mut self, maps: &mut impl AuthMap, k: &AuthKey) -> Result<bool, DatapathError> {
        let removed = maps.revoke_pair(k)?;
        let known = self.forget(k).is_some();
        if known || removed {
            self.removed.push(*k);
        }
        Ok(known || removed)
    }

    /// The keys removed since the last call.
    pub fn take_removed(&mut self) -> Vec<AuthKey> {
        std::mem::take(&mut self.removed)
    }

    #[must_use]
    pub fn get(&self, k: &AuthKey) -> Option<&AuthValue> {
        self.map.get(k)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&AuthKey, &AuthValue)> {
        self.map.iter()
    }

    /// Entries whose local identity is `identity`.
    #[must_use]
    pub fn of_local(&self, identity: u32) -> Vec<AuthKey> {
        self.by_local
            .get(&identity)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Entries whose remote workload is `identity` on `node`.
    #[must_use]
    pub fn of_remote(&self, identity: u32, node: u32) -> Vec<AuthKey> {
        self.by_remote
            .get(&(identity, node))
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    #[must_use]
    pub fn uses_identity(&self, identity: u32) -> bool {
        self.identity_refs.contains_key(&identity)
    }

    #[must_use]
    pub fn uses_node(&self, node: u32) -> bool {
        self.node_refs.contains_key(&node)
    }

    /// Entries in the last third of their lifetime at `now` (boot ns), not yet expired.
    pub fn due(&self, now: u64) -> impl Iterator<Item = AuthKey> + '_ {
        self.renewals
            .iter()
            .take_while(move |(t, _)| *t <= now)
            .map(|(_, k)| *k)
            .filter(move |k| self.map.get(k).is_some_and(|v| v.expires_ns > now))
    }

    /// Entries expired at `now`.
    #[must_use]
    pub fn expired(&self, now: u64) -> Vec<AuthKey> {
        self.expiries
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, k)| *k)
            .collect()
    }

    /// Whether `k` has an entry that is neither expired nor due for renewal at `now`.
    #[must_use]
    pub fn fresh(&self, k: &AuthKey, now: u64) -> bool {
        self.map
            .get(k)
            .is_some_and(|v| v.expires_ns > now && renew_at(v) > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::memory::Maps;

    fn key(l: u32, r: u32, n: u32) -> AuthKey {
        AuthKey {
            local_identity: l,
            remote_identity: r,
            remote_node: n,
            kind: 0,
        }
    }

    fn value(created: u64, expires: u64) -> AuthValue {
        AuthValue {
            created_ns: created,
            expires_ns: expires,
            ..AuthValue::default()
        }
    }

    #[test]
    fn entries_are_found_by_either_side_and_by_time() {
        let mut maps = Maps::default();
        let mut e = Entries::default();
        e.insert(&mut maps, key(1, 2, 7), value(0, 300)).unwrap();
        e.insert(&mut maps, key(1, 3, 7), value(0, 600)).unwrap();
        e.insert(&mut maps, key(4, 2, 7), value(0, 900)).unwrap();
        assert_eq!(e.of_local(1).len(), 2);
        assert_eq!(e.of_remote(2, 7).len(), 2);
        assert!(e.uses_identity(3) && e.uses_node(7) && !e.uses_identity(9));
        // Renewal at 2/3 of the life: 200, 400, 600.
        assert_eq!(e.due(250).collect::<Vec<_>>(), [key(1, 2, 7)]);
        assert!(e.fresh(&key(1, 3, 7), 250));
        assert_eq!(e.expired(600), [key(1, 2, 7), key(1, 3, 7)]);
        // Renewing moves the entry in both orders.
        e.insert(&mut maps, key(1, 2, 7), value(350, 1250)).unwrap();
        assert_eq!(e.due(399).count(), 0);
        assert!(e.expired(600).iter().all(|k| *k != key(1, 2, 7)));
        assert!(e.remove(&mut maps, &key(1, 3, 7)).unwrap());
        assert!(!e.uses_identity(3));
        assert_eq!(maps.auth.len(), 2);
        assert_eq!(e.len(), 2);
    }
}
