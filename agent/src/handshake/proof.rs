//! Workload proofs: what each side signs with its workload's key, how the other side checks it,
//! and the pair keys both sides derive. Everything is bound to the node session through two
//! TLS exporters (RFC 8446 §7.5) of our own labels, so a proof made in one session proves
//! nothing in another.

use std::net::IpAddr;

use ring::{digest, hkdf};
use rustls::{SignatureScheme, sign::CertifiedKey};
use rustls_pki_types::CertificateDer;

use crate::reason::Reason;

/// Exporter label of the value every proof's transcript includes.
pub const PROOF_LABEL: &[u8] = b"EXPORTER-portcullis-proof";
/// Exporter label of the secret pair keys are derived from.
pub const KEY_LABEL: &[u8] = b"EXPORTER-portcullis-pair-key";
/// Bytes of a proof nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes of a pair key.
pub const KEY_LEN: usize = 16;

/// What a node session contributes to proofs: both exporters, computed once when it is up.
#[derive(Clone)]
pub struct Binding {
    pub proof: [u8; 32],
    pub keying: [u8; 32],
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Binding")
    }
}

impl Binding {
    /// Both exporters of an established TLS connection.
    pub fn export<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Self, Reason> {
        let proof = conn
            .export_keying_material([0u8; 32], PROOF_LABEL, None)
            .map_err(|_| Reason::Tls)?;
        let keying = conn
            .export_keying_material([0u8; 32], KEY_LABEL, None)
            .map_err(|_| Reason::Tls)?;
        Ok(Self { proof, keying })
    }
}

/// The facts a proof is about, as each side names them: the initiator's and responder's
/// workloads, their addresses, their nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts<'a> {
    pub initiator_id: &'a str,
    pub responder_id: &'a str,
    pub initiator_addr: IpAddr,
    pub responder_addr: IpAddr,
    pub initiator_node: &'a str,
    pub responder_node: &'a str,
}

/// Which half of a proof a transcript is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Initiator,
    Responder,
    /// Not signed: the input of the pair keys.
    Keys,
}

/// The bytes a workload signs: a context string, the half, the session's proof exporter, each
/// fact length-prefixed, the initiator's nonce, and (responder and keys) the responder's.
#[must_use]
pub fn transcript(
    half: Half,
    binding: &Binding,
    facts: &Facts<'_>,
    initiator_nonce: &[u8],
    responder_nonce: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"portcullis/2 workload proof\0");
    out.extend_from_slice(match half {
        Half::Initiator => b"initiator\0",
        Half::Responder => b"responder\0",
        Half::Keys => b"pair keys\0",
    });
    out.extend_from_slice(&binding.proof);
    let (ia, ra) = (
        facts.initiator_addr.to_string(),
        facts.responder_addr.to_string(),
    );
    for field in [
        facts.initiator_id,
        facts.responder_id,
        &ia,
        &ra,
        facts.initiator_node,
        facts.responder_node,
    ] {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&field.as_bytes()[..usize::from(len)]);
    }
    out.extend_from_slice(initiator_nonce);
    if let Some(n) = responder_nonce {
        out.extend_from_slice(n);
    }
    out
}

/// The schemes a workload key may sign proofs with (TLS 1.3's, no SHA-1, no PKCS#1 v1.5).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
];

/// Signs `msg` with the workload's key: the scheme's code and the signature.
pub fn sign(key: &CertifiedKey, msg: &[u8]) -> Result<(u16, Vec<u8>), Reason> {
    let signer = key.key.choose_scheme(SCHEMES).ok_or(Reason::Internal)?;
    let scheme = u16::from(signer.scheme());
    let sig = signer.sign(msg).map_err(|_| Reason::Internal)?;
    Ok((scheme, sig))
}

/// Checks that the key of `leaf` (already verified against the bundle) signed `msg`.
pub fn verify(
    leaf: &CertificateDer<'_>,
    scheme: u16,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), Reason> {
    let scheme = SignatureScheme::from(scheme);
    if !SCHEMES.contains(&scheme) {
        return Err(Reason::BadSignature);
    }
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, a)| *a)
        .ok_or(Reason::BadSignature)?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|_| Reason::Malformed)?;
    algs.iter()
        .any(|alg| cert.verify_signature(*alg, msg, sig).is_ok())
        .then_some(())
        .ok_or(Reason::BadSignature)
}

/// The two keys of a pair, from one side's point of view.
#[derive(Clone, PartialEq, Eq)]
pub struct PairKeys {
    /// For connections this side's workload opens to the other.
    pub outbound: [u8; KEY_LEN],
    /// For connections the other side's workload opens to this side's.
    pub inbound: [u8; KEY_LEN],
}

impl std::fmt::Debug for PairKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairKeys")
            .field("outbound", &fingerprint(&self.outbound))
            .field("inbound", &fingerprint(&self.inbound))
            .finish()
    }
}

/// A short public name of a key (the first 8 bytes of its SHA-256, hex), for status and
/// logs: equal keys have equal fingerprints, and it does not reveal the key.
#[must_use]
pub fn fingerprint(key: &[u8]) -> String {
    super::wire::hex(&digest::digest(&digest::SHA256, key).as_ref()[..8])
}

struct Len16;

impl hkdf::KeyType for Len16 {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

/// Both directions' keys of a pair: HKDF-SHA256 over the session's keying exporter, with the
/// SHA-256 of the keys transcript and the direction as info. Both sides compute the same two
/// keys; `initiator` says which one is this side's outbound key.
#[must_use]
pub fn pair_keys(
    binding: &Binding,
    facts: &Facts<'_>,
    initiator_nonce: &[u8],
    responder_nonce: &[u8],
    initiator: bool,
) -> PairKeys {
    let t = transcript(
        Half::Keys,
        binding,
        facts,
        initiator_nonce,
        Some(responder_nonce),
    );
    let hash = digest::digest(&digest::SHA256, &t);
    let prk =
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"portcullis/2 pair keys").extract(&binding.keying);
    let derive = |dir: &[u8]| {
        let mut key = [0u8; KEY_LEN];
        let info = [hash.as_ref(), dir];
        // Expanding 16 bytes from SHA-256 cannot exceed HKDF's limit.
        if let Ok(okm) = prk.expand(&info, Len16) {
            let _ = okm.fill(&mut key);
        }
        key
    };
    let (i_to_r, r_to_i) = (
        derive(b"initiator to responder"),
        derive(b"responder to initiator"),
    );
    if initiator {
        PairKeys {
            outbound: i_to_r,
            inbound: r_to_i,
        }
    } else {
        PairKeys {
            outbound: r_to_i,
            inbound: i_to_r,
        }
    }
}

/// A fresh random nonce.
pub fn nonce() -> Result<[u8; NONCE_LEN], Reason> {
    let mut n = [0u8; NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
        .map_err(|_| Reason::Internal)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts<'static> {
        Facts {
            initiator_id: "spiffe://td/ns/default/sa/a",
            responder_id: "spiffe://td/ns/default/sa/b",
            initiator_addr: "198.18.1.2".parse().unwrap(),
            responder_addr: "198.18.2.2".parse().unwrap(),
            initiator_node: "node-1",
            responder_node: "node-2",
        }
    }

    #[test]
    fn both_sides_derive_the_same_keys_and_any_change_changes_them() {
        let b = Binding {
            proof: [1; 32],
            keying: [2; 32],
        };
        let (ni, nr) = ([3u8; 16], [4u8; 16]);
        let i = pair_keys(&b, &facts(), &ni, &nr, true);
        let r = pair_keys(&b, &facts(), &ni, &nr, false);
        assert_eq!(i.outbound, r.inbound);
        assert_eq!(i.inbound, r.outbound);
        assert_ne!(i.outbound, i.inbound, "each direction has its own key");
        let renewed = pair_keys(&b, &facts(), &ni, &[5u8; 16], true);
        assert_ne!(renewed.outbound, i.outbound, "a new proof, new keys");
        let other_session = Binding {
            proof: [1; 32],
            keying: [9; 32],
        };
        assert_ne!(
            pair_keys(&other_session, &facts(), &ni, &nr, true).outbound,
            i.outbound
        );
        assert_eq!(fingerprint(&i.outbound), fingerprint(&r.inbound));
        assert_eq!(fingerprint(&i.outbound).len(), 16);
    }

    #[test]
    fn a_signature_verifies_only_over_its_own_transcript() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::identity::ca::Ca::init("td", dir.path()).unwrap();
        let svid = crate::handshake::tests::svid(&ca, "spiffe://td/ns/default/sa/a");
        let local = crate::tls::local_svid(&svid).unwrap();
        let b = Binding {
            proof: [1; 32],
            keying: [2; 32],
        };
        let t = transcript(Half::Initiator, &b, &facts(), &[3; 16], None);
        let (scheme, sig) = sign(&local.key, &t).unwrap();
        assert_eq!(verify(&svid.chain[0], scheme, &t, &sig), Ok(()));
        let mut other = facts();
        other.initiator_node = "node-3";
        let t2 = transcript(Half::Initiator, &b, &other, &[3; 16], None);
        assert_eq!(
            verify(&svid.chain[0], scheme, &t2, &sig),
            Err(Reason::BadSignature)
        );
        let t3 = transcript(Half::Responder, &b, &facts(), &[3; 16], None);
        assert_eq!(
            verify(&svid.chain[0], scheme, &t3, &sig),
            Err(Reason::BadSignature)
        );
        let rsa_pkcs1 = u16::from(SignatureScheme::RSA_PKCS1_SHA256);
        assert_eq!(
            verify(&svid.chain[0], rsa_pkcs1, &t, &sig),
            Err(Reason::BadSignature)
        );
    }
}
