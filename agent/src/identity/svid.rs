//! X.509 SVIDs: the SPIFFE rules on a leaf certificate, checked with x509-parser.
//!
//! Chain building and signatures are rustls-webpki's job (see `tls`); this module checks what
//! webpki does not know about: exactly one URI SAN that is a SPIFFE ID of the expected trust
//! domain, a leaf that is not a CA, the digitalSignature key usage, the validity window, and a
//! bounded chain length.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::SpiffeId;
use crate::reason::Reason;

/// Longest chain accepted, leaf included (leaf, up to two intermediates, and a root).
pub const MAX_CHAIN: usize = 4;

/// What a valid leaf says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
}

fn time(ts: i64) -> SystemTime {
    match u64::try_from(ts) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// Checks a presented chain (leaf first) against the SPIFFE rules, at time `now`, for trust
/// domain `trust_domain`.
pub fn check_chain(
    chain: &[CertificateDer<'_>],
    trust_domain: &str,
    now: SystemTime,
) -> Result<LeafInfo, Reason> {
    let leaf = chain.first().ok_or(Reason::NoCertificate)?;
    if chain.len() > MAX_CHAIN {
        return Err(Reason::ChainTooLong);
    }
    let info = check_leaf(leaf, now)?;
    if info.id.trust_domain() != trust_domain {
        return Err(Reason::WrongTrustDomain);
    }
    Ok(info)
}

/// Checks one leaf certificate, whatever its trust domain.
pub fn check_leaf(der: &[u8], now: SystemTime) -> Result<LeafInfo, Reason> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| Reason::Malformed)?;
    let validity = cert.validity();
    let not_before = time(validity.not_before.timestamp());
    let not_after = time(validity.not_after.timestamp());
    if now < not_before {
        return Err(Reason::NotYetValid);
    }
    if now > not_after {
        return Err(Reason::Expired);
    }
    let is_ca = cert
        .basic_constraints()
        .map_err(|_| Reason::Malformed)?
        .is_some_and(|bc| bc.value.ca);
    if is_ca {
        return Err(Reason::CaAsLeaf);
    }
    match cert.key_usage().map_err(|_| Reason::Malformed)? {
        Some(ku) if ku.value.digital_signature() => {}
        _ => return Err(Reason::NoDigitalSignature),
    }
    let mut uris = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|_| Reason::Malformed)?
    {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(Reason::NoUriSan),
        [one] => *one,
        _ => return Err(Reason::MultipleUriSans),
    };
    let id = SpiffeId::parse(uri).map_err(|_| Reason::NotSpiffe)?;
    Ok(LeafInfo {
        id,
        not_before,
        not_after,
        serial: cert.raw_serial_as_string(),
    })
}

/// The trust domain a CA certificate serves, from its `spiffe://<td>` URI SAN.
pub fn ca_info(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !cert.is_ca() {
        return Err("not a CA certificate (basicConstraints cA is false)".into());
    }
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    let uri = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .find_map(|n| {
            if let GeneralName::URI(u) = n {
                Some(*u)
            } else {
                None
            }
        })
        .ok_or("no spiffe://<trust domain> URI SAN")?;
    let id = SpiffeId::parse(uri).map_err(|e| format!("URI SAN `{uri}`: {e}"))?;
    Ok(id.trust_domain().to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };

    use super::*;

    /// A throwaway CA and helpers to issue leaves with chosen defects.
    pub struct TestCa {
        pub issuer: Issuer<'static, KeyPair>,
        pub der: CertificateDer<'static>,
    }

    impl TestCa {
        pub fn new(td: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names =
                vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
            let cert = params.self_signed(&key).unwrap();
            Self {
                der: cert.der().clone(),
                issuer: Issuer::new(params, key),
            }
        }

        pub fn leaf(&self, edit: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
            self.leaf_with_key(edit).0
        }

        /// A leaf and its private key, to present it in a handshake.
        pub fn leaf_with_key(
            &self,
            edit: impl FnOnce(&mut CertificateParams),
        ) -> (CertificateDer<'static>, KeyPair) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
            params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
            params.subject_alt_names =
                vec![SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap())];
            edit(&mut params);
            let der = params.signed_by(&key, &self.issuer).unwrap().der().clone();
            (der, key)
        }
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn a_good_svid_passes_and_each_defect_has_its_own_reason() {
        let ca = TestCa::new("td");
        let now = SystemTime::now();
        let good = ca.leaf(|_| {});
        let info = check_chain(&[good.clone(), ca.der.clone()], "td", now).unwrap();
        assert_eq!(info.id.as_str(), "spiffe://td/ns/a/sa/b");
        assert!(info.not_after > now && !info.serial.is_empty());

        let cases: Vec<(&str, CertificateDer<'static>, Reason)> = vec![
            (
                "expired",
                ca.leaf(|p| {
                    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
                    p.not_after = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
                }),
                Reason::Expired,
            ),
            (
                "not yet valid",
                ca.leaf(|p| {
                    p.not_before = time::OffsetDateTime::now_utc() + time::Duration::hours(1)
                }),
                Reason::NotYetValid,
            ),
            (
                "no URI SAN",
                ca.leaf(|p| {
                    p.subject_alt_names = vec![SanType::DnsName("web.td".try_into().unwrap())]
                }),
                Reason::NoUriSan,
            ),
            (
                "two URI SANs",
                ca.leaf(|p| p.subject_alt_names = vec![uri("spiffe://td/a"), uri("spiffe://td/b")]),
                Reason::MultipleUriSans,
            ),
            (
                "non-SPIFFE URI",
                ca.leaf(|p| p.subject_alt_names = vec![uri("https://td/a")]),
                Reason::NotSpiffe,
            ),
            (
                "CA as leaf",
                ca.leaf(|p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
                }),
                Reason::CaAsLeaf,
            ),
            (
                "no digitalSignature",
                ca.leaf(|p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]),
                Reason::NoDigitalSignature,
            ),
            (
                "wrong trust domain",
                ca.leaf(|p| p.subject_alt_names = vec![uri("spiffe://other/ns/a/sa/b")]),
                Reason::WrongTrustDomain,
            ),
        ];
        for (what, cert, want) in cases {
            assert_eq!(check_chain(&[cert], "td", now), Err(want), "{what}");
        }
        assert_eq!(check_chain(&[], "td", now), Err(Reason::NoCertificate));
        let long = vec![good.clone(); MAX_CHAIN + 1];
        assert_eq!(check_chain(&long, "td", now), Err(Reason::ChainTooLong));
        assert_eq!(
            check_leaf(b"not a certificate", now),
            Err(Reason::Malformed)
        );
    }
}
