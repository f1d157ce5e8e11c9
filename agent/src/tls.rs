//! rustls configuration for node sessions (TLS 1.3 only, our own ALPN, mutual authentication
//! with node SVIDs) and the issuer, and the checks of the workload chains proofs carry.
//!
//! Verification wraps rustls's webpki verifiers (chain to the trust bundle, signatures,
//! validity, key usage for TLS) and then adds the SPIFFE rules from `identity::svid` (one URI
//! SAN, a SPIFFE ID of our trust domain, not a CA, bounded chain). Whether the identity is the
//! one cluster state expects for an address is the handshake's business: it knows the address.

use std::{fmt, sync::Arc, time::SystemTime};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
    version::TLS13,
};

use crate::{
    identity::{SpiffeId, store::Svid, svid},
    reason::Reason,
};

/// The ALPN protocol of node sessions (protocol version 2).
pub const ALPN: &[u8] = b"portcullis/2";
/// The ALPN protocol of version 1 (one TLS handshake per pair), refused with a clear reason.
pub const ALPN_V1: &[u8] = b"portcullis/1";
/// The server name a node session asks for: node SVIDs name their node by URI SAN, so this
/// name is never checked; it is not an address, so a version 1 agent refuses it.
pub const SESSION_SERVER_NAME: &str = "node.portcullis.invalid";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("building a TLS verifier: {0}")]
    Verifier(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] Error),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trust bundle of one trust domain.
#[derive(Clone)]
pub struct Trust {
    pub trust_domain: String,
    pub roots: Arc<RootCertStore>,
    /// SHA-256 over the CA certificates, in order: equal bundles, equal fingerprints.
    pub fingerprint: [u8; 32],
}

impl Trust {
    pub fn new(trust_domain: &str, cas: &[CertificateDer<'static>]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca.clone())?;
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            roots: Arc::new(roots),
            fingerprint: digest(cas),
        })
    }
}

/// SHA-256 over certificates in order, each prefixed by its length: equal lists, equal digests.
#[must_use]
pub fn digest(certs: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    for c in certs {
        hash.update(&u32::try_from(c.len()).unwrap_or(u32::MAX).to_be_bytes());
        hash.update(c);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.finish().as_ref());
    out
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// A local workload's SVID, ready for rustls.
#[derive(Clone)]
pub struct LocalSvid {
    pub id: SpiffeId,
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub serial: String,
}

impl fmt::Debug for LocalSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSvid")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn spiffe_error(reason: Reason) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(reason))))
}

fn spiffe_checks(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    td: &str,
    now: UnixTime,
) -> Result<(), Error> {
    let mut chain = Vec::with_capacity(intermediates.len() + 1);
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs());
    svid::check_chain(&chain, td, now)
        .map(drop)
        .map_err(spiffe_error)
}

/// Refuses a chain longer than [`svid::MAX_CHAIN`] before webpki builds paths through it.
fn bounded(intermediates: &[CertificateDer<'_>]) -> Result<(), Error> {
    if intermediates.len() >= svid::MAX_CHAIN {
        return Err(spiffe_error(Reason::ChainTooLong));
    }
    Ok(())
}

/// webpki's refusal, made precise: an error rustls has no name for (a CA certificate used as
/// the leaf, say) becomes the SPIFFE check's reason when that check fails too.
fn refine(
    err: Error,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    td: &str,
    now: UnixTime,
) -> Error {
    if matches!(err, Error::InvalidCertificate(CertificateError::Other(_)))
        && let Err(spiffe) = spiffe_checks(end_entity, intermediates, td, now)
    {
        return spiffe;
    }
    err
}

/// Verifies initiators' certificates: webpki, then the SPIFFE rules.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        bounded(intermediates)?;
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| refine(e, end_entity, intermediates, &self.trust_domain, now))?;
        spiffe_checks(end_entity, intermediates, &self.trust_domain, now)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies responders' certificates: webpki, then the SPIFFE rules.
#[derive(Debug)]
struct SpiffeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    trust_domain: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        bounded(intermediates)?;
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // An SVID names its workload by URI SAN, not by DNS name: webpki checks the name
            // only after the chain, so this error means the chain itself verified. The
            // identity is checked below and, against cluster state, by the handshake.
            Ok(_)
            | Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => {
                return Err(refine(
                    e,
                    end_entity,
                    intermediates,
                    &self.trust_domain,
                    now,
                ));
            }
        }
        spiffe_checks(end_entity, intermediates, &self.trust_domain, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Always presents the same certificate (this node's SVID).
#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The chain and SPIFFE checks on a client's certificate.
fn client_verifier(
    trust: &Trust,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<SpiffeClientVerifier>, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: trust.trust_domain.clone(),
    }))
}

/// A TLS 1.3 server speaking `alpn`, with full handshakes only.
fn server_config_with(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    cert: Arc<dyn ResolvesServerCert>,
    alpn: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![alpn.to_vec()];
    // Every handshake is a full one: a resumed session would skip the certificate checks
    // against the current trust bundle and cluster state.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A TLS 1.3 client speaking `alpn` that checks the server's SVID against `trust`, presents
/// `key` (none: no client certificate), and never resumes.
fn client_config_with(
    trust: &Trust,
    key: Option<Arc<CertifiedKey>>,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(SpiffeServerVerifier {
        inner,
        trust_domain: trust.trust_domain.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match key {
        Some(key) => builder.with_client_cert_resolver(Arc::new(FixedClientCert(key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The accepting side of node sessions: presents this node's SVID, and requires the peer's,
/// verified against the bundle and the SPIFFE rules during the handshake.
pub fn session_server_config(
    trust: &Trust,
    node: &LocalSvid,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = client_verifier(trust, &provider)?;
    server_config_with(
        provider,
        verifier,
        Arc::new(FixedServerCert(node.key.clone())),
        ALPN,
    )
}

/// The opening side of node sessions: presents this node's SVID.
pub fn session_client_config(
    trust: &Trust,
    node: &LocalSvid,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(trust, Some(node.key.clone()), ALPN)
}

/// Always presents the same certificate (this node's SVID, or the issuer's client's).
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The reason behind a failed TLS handshake, from either side's point of view.
#[must_use]
pub fn reason_of(err: &Error) -> Reason {
    use rustls::AlertDescription as A;
    match err {
        Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => e
            .downcast_ref::<Reason>()
            .copied()
            .unwrap_or(Reason::UntrustedChain),
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => Reason::Expired,
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => Reason::NotYetValid,
        Error::InvalidCertificate(CertificateError::BadEncoding) => Reason::Malformed,
        Error::InvalidCertificate(_) => Reason::UntrustedChain,
        Error::NoCertificatesPresented => Reason::NoCertificate,
        // No TLS 1.3 offered (a TLS 1.2-only client), or nothing else in common.
        Error::PeerIncompatible(_) => Reason::Version,
        Error::AlertReceived(A::AccessDenied) => Reason::NotHosted,
        Error::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateExpired
            | A::UnsupportedCertificate
            | A::CertificateUnknown
            | A::CertificateRequired
            | A::DecryptError,
        ) => Reason::PeerRejectedCertificate,
        _ => Reason::Tls,
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
#[must_use]
pub fn rustls_error(e: &std::io::Error) -> Option<&Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
}

/// Turns a validated SVID into a rustls signing key.
pub fn local_svid(svid: &Svid) -> Result<LocalSvid, TlsError> {
    let key = CertifiedKey::from_der(svid.chain.clone(), svid.key.clone_key(), &provider())?;
    Ok(LocalSvid {
        id: svid.id.clone(),
        key: Arc::new(key),
        not_after: svid.not_after,
        serial: svid.serial.clone(),
    })
}

/// Accepts a client certificate, or none, during the handshake, checking only that the client
/// holds the key of the certificate it presents (the TLS 1.3 CertificateVerify signature). The
/// chain itself is checked after the handshake by [`ClientChain`], so that a refusal can be
/// answered and audited with its reason rather than cut as a bare TLS alert.
#[derive(Debug)]
struct DeferredClientCert {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        bounded(intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks a client's certificate chain after the handshake: the same checks the agents'
/// handshake makes (chain to the bundle, validity, SPIFFE rules).
#[derive(Debug, Clone)]
pub struct ClientChain(Arc<dyn ClientCertVerifier>);

impl ClientChain {
    pub fn new(trust: &Trust) -> Result<Self, TlsError> {
        Ok(Self(client_verifier(trust, &provider())?))
    }

    /// The SPIFFE ID and expiry of a verified chain (leaf first), or the reason it does not
    /// verify: the checks a TLS handshake makes of a client certificate, for the workload
    /// chains proofs carry.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'static>],
    ) -> Result<(SpiffeId, SystemTime), Reason> {
        let (leaf, rest) = chain.split_first().ok_or(Reason::NoCertificate)?;
        self.0
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map_err(|e| reason_of(&e))?;
        svid::check_leaf(leaf, SystemTime::now()).map(|info| (info.id, info.not_after))
    }

    /// The SPIFFE ID and expiry of a verified chain (leaf first), or why it does not verify.
    pub fn check(
        &self,
        chain: &[CertificateDer<'static>],
    ) -> Result<(SpiffeId, SystemTime), String> {
        let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
        self.0
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map_err(|e| e.to_string())?;
        svid::check_leaf(leaf, SystemTime::now())
            .map(|info| (info.id, info.not_after))
            .map_err(|r| r.to_string())
    }
}

/// The issuer's server configuration: its own SVID from `cert`, client certificates optional
/// (joining needs none) and checked afterwards with [`ClientChain`].
pub fn issuer_server_config(
    trust: &Trust,
    cert: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let inner = client_verifier(trust, &provider)?;
    server_config_with(
        provider,
        Arc::new(DeferredClientCert { inner }),
        cert,
        crate::issuer::protocol::ALPN,
    )
}

/// An agent's configuration towards the issuer: the issuer is checked against the bundle (its
/// SPIFFE ID is checked by the caller); `node` is the node SVID, absent while joining.
pub fn issuer_client_config(
    trust: &Trust,
    node: Option<Arc<CertifiedKey>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(trust, node, crate::issuer::protocol::ALPN)
}

/// The SPIFFE ID of a peer's leaf certificate (already verified by the TLS layer).
#[must_use]
pub fn peer_id(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    svid::check_leaf(chain.first()?, SystemTime::now())
        .ok()
        .map(|i| i.id)
}
