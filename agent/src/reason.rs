//! Why an authentication failed: one enum, used as the handshake protocol's error code, the
//! audit log's `reason` field, and the `status` column (and later the metrics label).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    #[error("the certificate could not be parsed")]
    Malformed,
    #[error("the certificate has expired")]
    Expired,
    #[error("the certificate is not valid yet")]
    NotYetValid,
    #[error("the certificate has no URI SAN")]
    NoUriSan,
    #[error("the certificate has more than one URI SAN")]
    MultipleUriSans,
    #[error("the URI SAN is not a valid SPIFFE ID")]
    NotSpiffe,
    #[error("the SPIFFE ID is in another trust domain")]
    WrongTrustDomain,
    #[error("the leaf certificate is a CA certificate")]
    CaAsLeaf,
    #[error("the leaf certificate lacks the digitalSignature key usage")]
    NoDigitalSignature,
    #[error("the certificate chain is longer than allowed")]
    ChainTooLong,
    #[error("the certificate chain does not lead to a trusted root")]
    UntrustedChain,
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer rejected our certificate")]
    PeerRejectedCertificate,
    #[error("the peer's identity is not the one cluster state expects for its address")]
    IdentityMismatch,
    #[error("the responder hosts no workload at the requested address")]
    NotHosted,
    #[error("the initiator's address is not a workload of the initiator's node")]
    UnknownInitiator,
    #[error(
        "cluster state puts the workload on another node than the one the session authenticated"
    )]
    NodeMismatch,
    #[error("no SVID for the local workload")]
    NoLocalSvid,
    #[error("the address is not a workload in cluster state")]
    UnknownPeer,
    #[error("the handshake timed out")]
    Timeout,
    #[error("the peer agent could not be reached")]
    Unreachable,
    #[error("the TLS handshake failed")]
    Tls,
    #[error("the peer broke the handshake protocol")]
    Protocol,
    #[error("the peer speaks an unsupported protocol version")]
    Version,
    #[error("the agent could not write the auth entry")]
    Internal,
    #[error("the authorization policy admits the pair in neither direction")]
    NotAuthorized,
    #[error("the responder had too many handshakes under way")]
    Busy,
    #[error("the peer opened handshakes faster than its rate limit")]
    RateLimited,
    #[error("this agent has no node SVID (yet)")]
    NoNodeSvid,
    #[error("the peer's session certificate is not a node SVID of a node in cluster state")]
    NotANode,
    #[error("the workload proof's signature does not verify")]
    BadSignature,
    #[error("the node session closed before the answer came")]
    SessionClosed,
}

impl Reason {
    /// The stable name (also the serde form).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::NoUriSan => "no_uri_san",
            Self::MultipleUriSans => "multiple_uri_sans",
            Self::NotSpiffe => "not_spiffe",
            Self::WrongTrustDomain => "wrong_trust_domain",
            Self::CaAsLeaf => "ca_as_leaf",
            Self::NoDigitalSignature => "no_digital_signature",
            Self::ChainTooLong => "chain_too_long",
            Self::UntrustedChain => "untrusted_chain",
            Self::NoCertificate => "no_certificate",
            Self::PeerRejectedCertificate => "peer_rejected_certificate",
            Self::IdentityMismatch => "identity_mismatch",
            Self::NotHosted => "not_hosted",
            Self::UnknownInitiator => "unknown_initiator",
            Self::NodeMismatch => "node_mismatch",
            Self::NoLocalSvid => "no_local_svid",
            Self::UnknownPeer => "unknown_peer",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Tls => "tls",
            Self::Protocol => "protocol",
            Self::Version => "version",
            Self::Internal => "internal",
            Self::NotAuthorized => "not_authorized",
            Self::Busy => "busy",
            Self::RateLimited => "rate_limited",
            Self::NoNodeSvid => "no_node_svid",
            Self::NotANode => "not_a_node",
            Self::BadSignature => "bad_signature",
            Self::SessionClosed => "session_closed",
        }
    }
}
