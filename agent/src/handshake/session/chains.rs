//! Workload chains verified once per bundle, for the many proofs of one workload.

use super::*;

/// Workload chains already verified, so that the many proofs of one workload's pairs pay for
/// its chain once: keyed by the SHA-256 of the chain and the trust bundle's fingerprint, kept
/// until the leaf expires and for at most [`ChainCache::REUSE`] (so that an intermediate that
/// expires first is noticed). Only the chain is taken from here; every proof's signature is
/// still checked against the leaf's key.
#[derive(Default)]
pub struct ChainCache {
    verified: Mutex<HashMap<ChainKey, (SpiffeId, SystemTime, Instant)>>,
}

/// The SHA-256 of a chain, and the fingerprint of the bundle it was verified against.
type ChainKey = ([u8; 32], [u8; 32]);

impl ChainCache {
    /// Entries kept at most; the cache starts over beyond.
    const MAX: usize = 65_536;
    /// How long a verification is reused.
    const REUSE: Duration = Duration::from_secs(600);

    pub(super) fn verify(
        &self,
        view: &View,
        chain: &[CertificateDer<'static>],
    ) -> Result<(SpiffeId, SystemTime), Reason> {
        let key = (tls::digest(chain), view.trust.fingerprint);
        let now = SystemTime::now();
        let mut cache = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((id, not_after, at)) = cache.get(&key) {
            if *not_after > now && at.elapsed() < Self::REUSE {
                return Ok((id.clone(), *not_after));
            }
            cache.remove(&key);
        }
        drop(cache);
        let verified = view.chains.verify(chain)?;
        let mut cache = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= Self::MAX {
            cache.clear();
        }
        cache.insert(key, (verified.0.clone(), verified.1, Instant::now()));
        Ok(verified)
    }
}
