//! What the issuer signs: the rules, as pure functions of cluster state and the request.
//!
//! - A CSR only proves possession of a key: the issuer reads its public key and refuses one
//!   that asks for anything else (other names, CA rights, key usages or extensions a workload
//!   SVID does not have). Every field of the certificate is set by the issuer.
//! - A workload SVID for identity X goes to node N only if cluster state places a live
//!   workload with identity X on N. The Kubernetes source keeps mirror pods, host-network pods
//!   and finished pods out of cluster state, so they never count.
//! - A node SVID goes only to a node of cluster state.

use rcgen::{CertificateSigningRequestParams, IsCa, KeyUsagePurpose, SanType};
use rustls_pki_types::{CertificateSigningRequestDer, pem::PemObject as _};

use super::protocol::{Code, Refusal, is_reserved};
use crate::{identity::SpiffeId, inputs::Index};

/// Checks a CSR (PEM) and returns its public key. `wanted` is the one name it may ask for.
pub fn csr_key(pem: &str, wanted: &SpiffeId) -> Result<rcgen::PublicKey, Refusal> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Refusal::new(Code::BadCsr, format!("not a PEM certificate request: {e}")))?;
    let csr = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::UnsupportedExtension => Refusal::new(
            Code::CsrExtension,
            "the request carries an extension the issuer does not honour",
        ),
        rcgen::Error::InvalidCertificationRequestSignature => {
            Refusal::new(Code::BadCsr, "the request's signature does not verify")
        }
        other => Refusal::new(Code::BadCsr, format!("the request does not parse: {other}")),
    })?;
    let p = &csr.params;
    if !matches!(p.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
        return Err(Refusal::new(
            Code::CsrCaRights,
            "the request asks to be a CA; the issuer signs leaf certificates only",
        ));
    }
    if p.key_usages
        .iter()
        .any(|u| !matches!(u, KeyUsagePurpose::DigitalSignature))
    {
        return Err(Refusal::new(
            Code::CsrCaRights,
            format!(
                "the request asks for key usages {:?}; a workload SVID has digital signature only",
                p.key_usages
            ),
        ));
    }
    if p.extended_key_usages.iter().any(|u| {
        !matches!(
            u,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth | rcgen::ExtendedKeyUsagePurpose::ClientAuth
        )
    }) {
        return Err(Refusal::new(
            Code::CsrCaRights,
            format!(
                "the request asks for extended key usages {:?}; an SVID is for TLS client and server only",
                p.extended_key_usages
            ),
        ));
    }
    for san in &p.subject_alt_names {
        let ok = matches!(san, SanType::URI(uri) if uri.as_str() == wanted.as_str());
        if !ok {
            return Err(Refusal::new(
                Code::CsrExtraNames,
                format!("the request asks for the name {san:?}; only {wanted} was asked for"),
            ));
        }
    }
    Ok(csr.public_key)
}

/// Whether `node` may have a node SVID.
pub fn node(index: &Index, node: &str) -> Result<(), Refusal> {
    if index.node(node).is_none() {
        return Err(Refusal::new(
            Code::UnknownNode,
            format!("node `{node}` is not in cluster state"),
        ));
    }
    Ok(())
}

/// Whether `node` may have the SVID of `identity`; returns the parsed identity.
pub fn workload(index: &Index, node_name: &str, identity: &str) -> Result<SpiffeId, Refusal> {
    let id = SpiffeId::parse(identity)
        .map_err(|e| Refusal::new(Code::BadIdentity, format!("`{identity}`: {e}")))?;
    if id.trust_domain() != index.trust_domain() {
        return Err(Refusal::new(
            Code::BadIdentity,
            format!("{id} is not in trust domain `{}`", index.trust_domain()),
        ));
    }
    if is_reserved(&id) {
        return Err(Refusal::new(
            Code::BadIdentity,
            format!("{id} is reserved for the issuer and the nodes"),
        ));
    }
    node(index, node_name)?;
    if index.has_pair(id.as_str(), node_name) {
        return Ok(id);
    }
    Err(if index.identity_in_use(id.as_str()) {
        Refusal::new(
            Code::NotOnNode,
            format!("no workload with identity {id} runs on node `{node_name}`"),
        )
    } else {
        Refusal::new(
            Code::NoSuchIdentity,
            format!("no workload with identity {id} runs anywhere"),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, KeyPair};

    use super::*;
    use crate::inputs::index::{Node, Workload};

    fn index() -> Index {
        let mut ix = Index::new("");
        ix.set_trust_domain("td");
        for (i, n) in ["node-1", "node-2", "node-3"].iter().enumerate() {
            ix.set_node(Node {
                name: (*n).to_owned(),
                address: format!("198.18.0.{}:4181", i + 1).parse().unwrap(),
            });
        }
        ix.upsert(Workload {
            name: "db-0".into(),
            namespace: "prod".into(),
            identity: SpiffeId::parse("spiffe://td/ns/prod/sa/db").unwrap(),
            node: Arc::from("node-2"),
            addresses: vec!["198.18.2.2".parse().unwrap()],
        });
        ix
    }

    fn csr(edit: impl FnOnce(&mut CertificateParams)) -> String {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        edit(&mut p);
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn an_identity_is_signed_only_for_a_node_it_runs_on() {
        let ix = index();
        let db = "spiffe://td/ns/prod/sa/db";
        assert!(workload(&ix, "node-2", db).is_ok());
        assert_eq!(
            workload(&ix, "node-3", db).unwrap_err().code,
            Code::NotOnNode
        );
        assert_eq!(
            workload(&ix, "node-3", "spiffe://td/ns/prod/sa/nobody")
                .unwrap_err()
                .code,
            Code::NoSuchIdentity
        );
        assert_eq!(
            workload(&ix, "node-9", db).unwrap_err().code,
            Code::UnknownNode
        );
        assert_eq!(
            workload(&ix, "node-2", "spiffe://other/ns/prod/sa/db")
                .unwrap_err()
                .code,
            Code::BadIdentity
        );
        assert_eq!(
            workload(&ix, "node-2", "spiffe://td/portcullis/node/node-1")
                .unwrap_err()
                .code,
            Code::BadIdentity,
            "a node SVID by the workload route"
        );
        assert_eq!(node(&ix, "node-9").unwrap_err().code, Code::UnknownNode);
    }

    #[test]
    fn a_csr_may_ask_for_its_one_name_and_nothing_more() {
        let id = SpiffeId::parse("spiffe://td/ns/prod/sa/db").unwrap();
        assert!(csr_key(&csr(|_| {}), &id).is_ok());
        let named =
            csr(|p| p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())]);
        assert!(csr_key(&named, &id).is_ok());
        let extra = csr(|p| {
            p.subject_alt_names = vec![
                SanType::URI(id.as_str().try_into().unwrap()),
                SanType::URI("spiffe://td/ns/prod/sa/admin".try_into().unwrap()),
            ];
        });
        assert_eq!(csr_key(&extra, &id).unwrap_err().code, Code::CsrExtraNames);
        let dns = csr(|p| p.subject_alt_names = vec![SanType::DnsName("db".try_into().unwrap())]);
        assert_eq!(csr_key(&dns, &id).unwrap_err().code, Code::CsrExtraNames);
        let ca = csr(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        assert_eq!(csr_key(&ca, &id).unwrap_err().code, Code::CsrCaRights);
        let code_signer = csr(|p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
        });
        assert_eq!(
            csr_key(&code_signer, &id).unwrap_err().code,
            Code::CsrCaRights
        );
        let tls = csr(|p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        });
        assert!(csr_key(&tls, &id).is_ok());
        let signer = csr(|p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]);
        assert_eq!(csr_key(&signer, &id).unwrap_err().code, Code::CsrCaRights);
        assert_eq!(csr_key("garbage", &id).unwrap_err().code, Code::BadCsr);
        // A request whose signature does not match its key: flip a byte of the signature.
        let good = csr(|_| {});
        let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 2;
        der[last] ^= 0x01;
        let bad = pem_of(&der);
        assert_eq!(csr_key(&bad, &id).unwrap_err().code, Code::BadCsr);
    }

    fn pem_of(der: &[u8]) -> String {
        // Tests only: PEM is base64 of the DER between the markers.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
    }
}
