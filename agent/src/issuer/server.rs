//! One agent connection: TLS, who the client is, then requests answered one by one, each
//! decision an audit record and a metric.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls_pki_types::CertificateDer;
use tokio::{io::BufReader, net::TcpStream};

use super::{
    Shared,
    config::Attestor,
    decide,
    protocol::{self, Code, Refusal, Request, Response},
};
use crate::identity::SpiffeId;

/// How long a TLS handshake may take.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// How long an attestation may wait for a free TokenReview slot.
const REVIEW_QUEUE_LIMIT: Duration = Duration::from_secs(2);
/// How long a connection may last, however busy: a client is classified once, at connect.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
/// Requests one connection without a node SVID may make (an agent joins once).
const ANONYMOUS_REQUESTS: usize = 4;
/// How long one TokenReview (and the pod read after it) may take.
const REVIEW_LIMIT: Duration = Duration::from_secs(10);
/// A connection with no request for this long is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// Who is asking, from the TLS layer.
enum Client {
    /// No client certificate (joining).
    Anonymous,
    /// A node SVID that verifies, and when it expires.
    Node(String, std::time::SystemTime),
    /// A certificate that does not verify, or is not a node SVID: what it claimed, and why.
    Refused { claimed: String, why: String },
}

impl Client {
    fn node(&self) -> &str {
        match self {
            Self::Node(n, _) => n,
            Self::Anonymous => "",
            Self::Refused { claimed, .. } => claimed,
        }
    }
}

/// The URI SAN a leaf claims, verified or not (for audit records of refusals).
fn claimed(leaf: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(leaf) else {
        return "<malformed certificate>".to_owned();
    };
    let uri = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
        });
    uri.unwrap_or_else(|| "<no URI SAN>".to_owned())
}

fn classify(shared: &Shared, chain: Option<&[CertificateDer<'static>]>) -> Client {
    let Some(chain) = chain.filter(|c| !c.is_empty()) else {
        return Client::Anonymous;
    };
    let (id, not_after) = match shared.client_chain().check(chain) {
        Ok(checked) => checked,
        Err(why) => {
            return Client::Refused {
                claimed: claimed(&chain[0]),
                why,
            };
        }
    };
    match protocol::node_of(&id) {
        Some(n) => Client::Node(n.to_owned(), not_after),
        None => Client::Refused {
            claimed: id.to_string(),
            why: "is not a node SVID".to_owned(),
        },
    }
}

pub async fn connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    // Each answer is one write; nothing is gained by waiting to coalesce.
    let _ = stream.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.server_config());
    let tls = match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake with an agent failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake with an agent timed out");
            return;
        }
    };
    let client = {
        let (_, conn) = tls.get_ref();
        classify(&shared, conn.peer_certificates())
    };
    let (read, mut write) = tokio::io::split(tls);
    let mut read = BufReader::new(read);
    let opened = std::time::Instant::now();
    let mut requests = 0usize;
    loop {
        requests += 1;
        if opened.elapsed() > CONNECTION_LIFETIME
            || (!matches!(client, Client::Node(..)) && requests > ANONYMOUS_REQUESTS)
        {
            return;
        }
        let line = match tokio::time::timeout(IDLE_LIMIT, protocol::read_line(&mut read)).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Err(_) => return,
            // Agents close without a TLS close_notify: that is the end of their requests.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "bad request line; closing");
                return;
            }
        };
        let started = std::time::Instant::now();
        let (op, claimed, identity, answer) = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let op = req.op();
                // A joining node is the one it names (and its token must be bound to).
                let claimed = match &req {
                    Request::Join { node, .. } if valid_node_name(node) => Some(node.clone()),
                    Request::Join { .. } => Some("<invalid name>".to_owned()),
                    _ => None,
                };
                let (identity, answer) = answer(&shared, &client, req).await;
                (op, claimed, identity, answer)
            }
            Err(e) => (
                "unknown",
                None,
                String::new(),
                Err(Refusal::new(
                    Code::BadRequest,
                    format!("not a request: {e}"),
                )),
            ),
        };
        let node = match (&answer, op) {
            (Ok(s), "join" | "attest") => s.node.clone(),
            (Err(_), "join" | "attest") => claimed.unwrap_or_default(),
            _ => client.node().to_owned(),
        };
        let response = match answer {
            Ok(s) => {
                shared.audit(peer, op, &node, &identity, None);
                Response::Signed {
                    chain: s.cert_pem,
                    not_after_unix: s.not_after_unix,
                }
            }
            Err(r) => {
                shared.audit(peer, op, &node, &identity, Some(&r));
                Response::Refused {
                    code: r.code,
                    reason: r.reason,
                }
            }
        };
        shared.observe(started.elapsed());
        if protocol::write_line(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// A certificate just signed.
pub struct Granted {
    pub node: String,
    pub cert_pem: String,
    pub not_after_unix: u64,
}

/// The decision on one request: the identity it was about, and the certificate or refusal.
async fn answer(
    shared: &Shared,
    client: &Client,
    req: Request,
) -> (String, Result<Granted, Refusal>) {
    match req {
        Request::Join { node, token, csr } => {
            let id = protocol::node_id(shared.trust_domain(), &node)
                .map_or_else(|_| String::new(), |i| i.to_string());
            let r = join(shared, &node, &token, &csr);
            (
                id,
                r.map(|mut g| {
                    g.node = node;
                    g
                }),
            )
        }
        Request::Attest { token, csr } => {
            let r = attest(shared, &token, &csr).await;
            let id = r
                .as_ref()
                .ok()
                .and_then(|g| protocol::node_id(shared.trust_domain(), &g.node).ok())
                .map_or_else(String::new, |i| i.to_string());
            (id, r)
        }
        Request::RenewNode { csr } => {
            let r = authenticated(client).and_then(|node| {
                shared.with_index(|ix| decide::node(ix, node))?;
                let id = node_id(shared, node)?;
                let key = decide::csr_key(&csr, &id)?;
                shared.sign(node, &id, &key, shared.node_ttl())
            });
            let id = protocol::node_id(shared.trust_domain(), client.node())
                .map_or_else(|_| String::new(), |i| i.to_string());
            (id, r)
        }
        Request::Sign { identity, csr } => {
            let r = authenticated(client).and_then(|node| {
                let id = shared.with_index(|ix| decide::workload(ix, node, &identity))?;
                let key = decide::csr_key(&csr, &id)?;
                shared.sign(node, &id, &key, shared.svid_ttl())
            });
            (identity, r)
        }
    }
}

fn authenticated(client: &Client) -> Result<&str, Refusal> {
    match client {
        // A connection outliving its certificate does not extend it.
        Client::Node(n, not_after) if *not_after <= std::time::SystemTime::now() => {
            Err(Refusal::new(
                Code::BadCredential,
                format!("the node SVID of `{n}` expired during the connection"),
            ))
        }
        Client::Node(n, _) => Ok(n),
        Client::Anonymous => Err(Refusal::new(
            Code::NoCredential,
            "this request needs the node SVID as the client certificate",
        )),
        Client::Refused { claimed, why } => Err(Refusal::new(
            Code::BadCredential,
            format!("client certificate {claimed}: {why}"),
        )),
    }
}

fn node_id(shared: &Shared, node: &str) -> Result<SpiffeId, Refusal> {
    protocol::node_id(shared.trust_domain(), node)
        .map_err(|e| Refusal::new(Code::UnknownNode, format!("node name `{node}`: {e}")))
}

/// A Kubernetes node name: a DNS subdomain (at most 253 lowercase letters, digits, `-`, `.`).
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn join(shared: &Shared, node: &str, token: &str, csr: &str) -> Result<Granted, Refusal> {
    if !valid_node_name(node) {
        return Err(Refusal::new(
            Code::UnknownNode,
            "the node name is not a DNS subdomain of at most 253 characters",
        ));
    }
    let Some(tokens) = shared.tokens() else {
        return Err(Refusal::new(
            Code::WrongAttestor,
            "this issuer attests nodes by Kubernetes service-account token, not join token",
        ));
    };
    let id = node_id(shared, node)?;
    // Everything that can be checked without spending the token is checked first.
    let key = decide::csr_key(csr, &id)?;
    shared.with_index(|ix| decide::node(ix, node))?;
    tokens.redeem(token, node)?;
    shared.sign(node, &id, &key, shared.node_ttl())
}

async fn attest(shared: &Shared, token: &str, csr: &str) -> Result<Granted, Refusal> {
    let Attestor::Kubernetes {
        audience,
        service_account,
    } = &shared.config().attestor
    else {
        return Err(Refusal::new(
            Code::WrongAttestor,
            "this issuer attests nodes by join token, not service-account token",
        ));
    };
    let Some(client) = shared.kube_client() else {
        return Err(Refusal::new(Code::Internal, "no Kubernetes client"));
    };
    // Anyone may ask, without a credential: the API server is asked a bounded number of
    // questions at a time, each bounded in time, so the issuer cannot be made to flood it.
    let _slot = tokio::time::timeout(REVIEW_QUEUE_LIMIT, shared.reviews().acquire())
        .await
        .map_err(|_| Refusal::new(Code::NotReady, "too many attestations at once; retry"))?
        .map_err(|_| Refusal::new(Code::Internal, "the issuer is stopping"))?;
    let node = tokio::time::timeout(
        REVIEW_LIMIT,
        super::review::node_of_token(&client, token, audience, service_account),
    )
    .await
    .map_err(|_| Refusal::new(Code::Internal, "the TokenReview took too long"))??;
    let id = node_id(shared, &node)?;
    let key = decide::csr_key(csr, &id)?;
    shared.with_index(|ix| decide::node(ix, &node))?;
    let mut g = shared.sign(&node, &id, &key, shared.node_ttl())?;
    g.node = node;
    Ok(g)
}
