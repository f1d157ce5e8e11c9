//! The issuer's protocol: TLS 1.3 with ALPN [`ALPN`], then one JSON request per line, each
//! answered by one JSON line. Keys never travel: the agent sends a certificate signing request
//! (PEM) and gets back a certificate the issuer built itself from the request's public key.
//!
//! - `join` (bootstrap attestor) and `attest` (Kubernetes attestor) run without a client
//!   certificate and answer with a node SVID;
//! - `renew_node` and `sign` run with the node SVID as the client certificate: the node is the
//!   one that certificate names, never one the request claims.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::identity::SpiffeId;

pub const ALPN: &[u8] = b"portcullis-issuer/1";
/// The server name agents ask for; the issuer is recognised by its SPIFFE ID, not by a name.
pub const SERVER_NAME: &str = "issuer.portcullis.invalid";
/// The longest request or answer line.
pub const MAX_LINE: usize = 64 * 1024;
/// The path segment below which the issuer's own and the nodes' identities live: no workload
/// may have an identity there.
pub const RESERVED: &str = "portcullis";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Trade a single-use join token for a node SVID.
    Join {
        node: String,
        token: String,
        csr: String,
    },
    /// Trade a projected service-account token for a node SVID.
    Attest { token: String, csr: String },
    /// A fresh node SVID for the node the client certificate names.
    RenewNode { csr: String },
    /// A workload SVID for `identity`, for the node the client certificate names.
    Sign { identity: String, csr: String },
}

impl Request {
    #[must_use]
    pub fn op(&self) -> &'static str {
        match self {
            Self::Join { .. } => "join",
            Self::Attest { .. } => "attest",
            Self::RenewNode { .. } => "renew_node",
            Self::Sign { .. } => "sign",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Signed {
        /// Leaf first, PEM.
        chain: String,
        not_after_unix: u64,
    },
    Refused {
        code: Code,
        reason: String,
    },
}

/// Why a request was refused: stable names for metrics, audit records and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The line is not a request.
    BadRequest,
    /// The CSR does not parse or its signature does not verify.
    BadCsr,
    /// The CSR asks for names other than the one requested.
    CsrExtraNames,
    /// The CSR asks for CA rights or key usages beyond a workload's.
    CsrCaRights,
    /// The CSR carries an extension the issuer does not honour.
    CsrExtension,
    /// `sign` or `renew_node` without a client certificate.
    NoCredential,
    /// The client certificate does not verify (expired, wrong CA, not a node SVID...).
    BadCredential,
    /// The node is not in cluster state.
    UnknownNode,
    /// The identity is not a valid SPIFFE ID of the trust domain, or a reserved one.
    BadIdentity,
    /// No live workload with the identity runs anywhere.
    NoSuchIdentity,
    /// Workloads with the identity run, but none on the asking node.
    NotOnNode,
    /// The join token is unknown or its secret is wrong.
    TokenUnknown,
    /// The join token was already traded.
    TokenUsed,
    TokenExpired,
    /// The join token is bound to another node.
    TokenNode,
    /// The configured attestor does not take this kind of request.
    WrongAttestor,
    /// The service-account token was refused by the TokenReview, or is of another account,
    /// audience or node.
    TokenReview,
    /// The issuer has no complete cluster state yet.
    NotReady,
    /// The issuer failed (I/O, signing).
    Internal,
}

impl Code {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::BadCsr => "bad_csr",
            Self::CsrExtraNames => "csr_extra_names",
            Self::CsrCaRights => "csr_ca_rights",
            Self::CsrExtension => "csr_extension",
            Self::NoCredential => "no_credential",
            Self::BadCredential => "bad_credential",
            Self::UnknownNode => "unknown_node",
            Self::BadIdentity => "bad_identity",
            Self::NoSuchIdentity => "no_such_identity",
            Self::NotOnNode => "not_on_node",
            Self::TokenUnknown => "token_unknown",
            Self::TokenUsed => "token_used",
            Self::TokenExpired => "token_expired",
            Self::TokenNode => "token_node",
            Self::WrongAttestor => "wrong_attestor",
            Self::TokenReview => "token_review",
            Self::NotReady => "not_ready",
            Self::Internal => "internal",
        }
    }
}

/// A refusal: its code and the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: Code, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.reason)
    }
}

/// The node SVID's identity: `spiffe://<td>/portcullis/node/<name>`.
pub fn node_id(trust_domain: &str, node: &str) -> Result<SpiffeId, crate::identity::SpiffeIdError> {
    SpiffeId::parse(&format!("spiffe://{trust_domain}/{RESERVED}/node/{node}"))
}

/// The issuer's own identity: `spiffe://<td>/portcullis/issuer`.
pub fn issuer_id(trust_domain: &str) -> Result<SpiffeId, crate::identity::SpiffeIdError> {
    SpiffeId::parse(&format!("spiffe://{trust_domain}/{RESERVED}/issuer"))
}

/// The node a node SVID's identity names.
#[must_use]
pub fn node_of(id: &SpiffeId) -> Option<&str> {
    let rest = id
        .as_str()
        .strip_prefix("spiffe://")?
        .strip_prefix(id.trust_domain())?
        .strip_prefix(&format!("/{RESERVED}/node/"))?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// Whether an identity lies in the reserved part of the trust domain.
#[must_use]
pub fn is_reserved(id: &SpiffeId) -> bool {
    let path = &id.as_str()["spiffe://".len() + id.trust_domain().len()..];
    path == format!("/{RESERVED}") || path.starts_with(&format!("/{RESERVED}/"))
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at the end of the stream.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stream ended inside a line",
                ))
            };
        }
        let (used, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        buf.extend_from_slice(&available[..used]);
        r.consume(used);
        if buf.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line longer than {MAX_LINE} bytes"),
            ));
        }
        if done {
            buf.pop();
            return String::from_utf8(buf).map(Some).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "a line that is not UTF-8")
            });
        }
    }
}

/// Writes `msg` as one JSON line.
pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_identities_round_trip_and_are_reserved() {
        let id = node_id("td", "node-2").unwrap();
        assert_eq!(id.as_str(), "spiffe://td/portcullis/node/node-2");
        assert_eq!(node_of(&id), Some("node-2"));
        assert!(is_reserved(&id));
        assert!(is_reserved(&issuer_id("td").unwrap()));
        let w = SpiffeId::parse("spiffe://td/ns/portcullis/sa/node").unwrap();
        assert_eq!(node_of(&w), None);
        assert!(!is_reserved(&w));
        assert!(!is_reserved(
            &SpiffeId::parse("spiffe://td/portcullisx/a").unwrap()
        ));
    }

    #[test]
    fn requests_are_one_tagged_object_and_unknown_fields_are_refused() {
        let r: Request =
            serde_json::from_str(r#"{"op":"sign","identity":"spiffe://td/a","csr":"x"}"#).unwrap();
        assert_eq!(r.op(), "sign");
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"sign","identity":"a","csr":"x","node":"n"}"#)
                .is_err(),
            "a sign request may not name its node"
        );
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let long = vec![b'a'; MAX_LINE + 10];
        let mut r = tokio::io::BufReader::new(&long[..]);
        assert!(read_line(&mut r).await.is_err());
        let mut r = tokio::io::BufReader::new(&b"one\ntwo\n"[..]);
        assert_eq!(read_line(&mut r).await.unwrap().as_deref(), Some("one"));
        assert_eq!(read_line(&mut r).await.unwrap().as_deref(), Some("two"));
        assert_eq!(read_line(&mut r).await.unwrap(), None);
    }
}
