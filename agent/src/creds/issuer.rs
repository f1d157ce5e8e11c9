//! The agent's side of the issuer (identity source `issuer`): one task that proves the node,
//! keeps a node SVID, and keeps an SVID for every local identity, renewed at half life.
//! Keys are generated here and never leave memory; the issuer sees only CSRs.
//!
//! The task and the [`Store`](crate::identity::store::Store) share [`State`]: the store says
//! which identities are wanted (and which are needed at once, by a handshake), the task puts
//! SVIDs in. While the issuer is unreachable, SVIDs already held stay in use until they
//! expire, and the task retries with backoff.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::{io::BufReader, net::TcpStream, sync::Notify, time::Instant};

use crate::{
    identity::{SpiffeId, store::Svid, svid},
    issuer::protocol::{self, Request, Response},
    tls::{self, Trust},
};

/// How long connecting to one issuer address may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(3);
/// How long one answer may take.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How the agent proves its node to the issuer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Attest {
    /// A join token from `portcullis issuer enroll`, read from `token_file` (used once).
    Bootstrap { token_file: PathBuf },
    /// The projected service-account token in `token_file` (re-read each time).
    Kubernetes { token_file: PathBuf },
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub trust_domain: String,
    pub addresses: Vec<String>,
    pub attest: Attest,
    pub bundle: PathBuf,
    /// Raised when SVIDs arrived, for the core to load them at once.
    pub arrived: crate::inputs::kube::Changed,
}

/// An SVID the task obtained, and when it asks for the next one.
#[derive(Debug, Clone)]
pub struct Got {
    pub svid: Svid,
    pub renew_at: Instant,
}

#[derive(Debug, Default)]
pub struct State {
    wanted: BTreeSet<SpiffeId>,
    urgent: BTreeSet<SpiffeId>,
    svids: HashMap<SpiffeId, Got>,
    /// When an identity the issuer refused may be asked for again.
    retry: HashMap<SpiffeId, (Instant, Duration)>,
    /// The node SVID's expiry, once there is one.
    pub node_not_after: Option<SystemTime>,
    /// The node SVID itself, for node sessions with other agents.
    pub node: Option<Svid>,
    /// Why the last round failed (or an identity was refused), one line each.
    pub problems: Vec<String>,
    /// SVIDs signed since start; the store looks at `svids` again only when it moved.
    pub signed: u64,
}

/// The store's handle on the task.
#[derive(Clone)]
pub struct IssuerHandle {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for IssuerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuerHandle")
    }
}

impl IssuerHandle {
    /// Starts the task on the current runtime.
    #[must_use]
    pub fn start(settings: Settings) -> Self {
        let handle = Self {
            state: Arc::default(),
            wake: Arc::default(),
        };
        tokio::spawn(run(settings, handle.clone()));
        handle
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The identities to hold SVIDs for; the task is woken when they changed.
    pub fn want(&self, wanted: &BTreeSet<SpiffeId>) {
        let mut s = self.lock();
        if &s.wanted == wanted {
            return;
        }
        s.wanted.clone_from(wanted);
        s.svids.retain(|id, _| wanted.contains(id));
        s.urgent.retain(|id| wanted.contains(id));
        s.retry.retain(|id, _| wanted.contains(id));
        drop(s);
        self.wake.notify_one();
    }

    /// A handshake needs the SVID of `id` now: it goes before the warm-up of the others.
    pub fn urgent(&self, id: &SpiffeId) {
        let mut s = self.lock();
        // Only the order changes: an identity the issuer refused keeps its backoff, so that
        // peers' handshakes cannot make the agent ask again and again.
        if s.wanted.contains(id) && !s.svids.contains_key(id) && s.urgent.insert(id.clone()) {
            drop(s);
            self.wake.notify_one();
        }
    }

    /// The SVIDs obtained so far, if any arrived since `seen` (which is brought up to date).
    pub fn svids_since(&self, seen: &mut u64) -> Option<Vec<(SpiffeId, Got)>> {
        let s = self.lock();
        if s.signed == *seen {
            return None;
        }
        *seen = s.signed;
        Some(
            s.svids
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    pub fn problems(&self) -> Vec<String> {
        self.lock().problems.clone()
    }

    pub fn node_not_after(&self) -> Option<SystemTime> {
        self.lock().node_not_after
    }

    /// The node SVID, once the node is attested.
    pub fn node_svid(&self) -> Option<Svid> {
        self.lock().node.clone()
    }

    /// How long until the first SVID (node or workload) held expires.
    fn time_left(&self) -> Duration {
        let s = self.lock();
        let now = SystemTime::now();
        s.svids
            .values()
            .map(|g| g.svid.not_after)
            .chain(s.node_not_after)
            .filter_map(|t| t.duration_since(now).ok())
            .min()
            .unwrap_or(BACKOFF_MAX)
    }
}

/// The node SVID, in memory only.
struct NodeSvid {
    svid: Svid,
    key: Arc<CertifiedKey>,
    renew_at: Instant,
    not_after: SystemTime,
}

fn renew_at(not_after: SystemTime) -> Instant {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Instant::now() + left / 2
}

/// A fresh key and a CSR for `id` (PEM).
fn key_and_csr(id: &SpiffeId) -> Result<(KeyPair, String), String> {
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        id.as_str()
            .try_into()
            .map_err(|e| format!("{id} as a URI: {e:?}"))?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("making a certificate request: {e}"))?;
    Ok((key, csr))
}

/// Turns a signed answer into a validated SVID with its key.
fn svid_from(
    chain_pem: &str,
    key: &KeyPair,
    expected: &SpiffeId,
    td: &str,
) -> Result<Svid, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the issuer's answer is not PEM: {e}"))?;
    let info = svid::check_chain(&chain, td, SystemTime::now())
        .map_err(|r| format!("the issuer's certificate for {expected} is not valid: {r}"))?;
    if &info.id != expected {
        return Err(format!(
            "the issuer signed {} where {expected} was asked for",
            info.id
        ));
    }
    let key = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| format!("the generated key: {e}"))?;
    let svid = Svid::new(chain, key, info);
    // The certificate must be over the key made for it, or every handshake would fail.
    tls::local_svid(&svid)
        .map_err(|e| format!("the issuer's certificate for {expected} is not over our key: {e}"))?;
    Ok(svid)
}

fn read_trust(settings: &Settings) -> Result<Trust, String> {
    let text = std::fs::read(&settings.bundle)
        .map_err(|e| format!("trust bundle {}: {e}", settings.bundle.display()))?;
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("trust bundle {}: {e}", settings.bundle.display()))?;
    if roots.is_empty() {
        return Err(format!(
            "trust bundle {} holds no certificate",
            settings.bundle.display()
        ));
    }
    Trust::new(&settings.trust_domain, &roots).map_err(|e| e.to_string())
}

type Conn = (
    BufReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>,
    tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
);

/// Connects to the first issuer address that answers and proves to be the issuer.
async fn connect(
    settings: &Settings,
    trust: &Trust,
    node: Option<&NodeSvid>,
    start: usize,
) -> Result<Conn, String> {
    let config =
        tls::issuer_client_config(trust, node.map(|n| n.key.clone())).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let expected = protocol::issuer_id(&settings.trust_domain).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(protocol::SERVER_NAME).map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    let n = settings.addresses.len();
    for i in 0..n {
        let addr = &settings.addresses[(start + i) % n];
        let attempt = async {
            let tcp = TcpStream::connect(addr.as_str())
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("{addr}: TLS: {e}"))?;
            let peer = tls.get_ref().1.peer_certificates().and_then(tls::peer_id);
            if peer.as_ref() != Some(&expected) {
                return Err(format!(
                    "{addr} is not the issuer: it presented {}",
                    peer.map_or_else(|| "no SPIFFE ID".to_owned(), |p| p.to_string())
                ));
            }
            let (r, w) = tokio::io::split(tls);
            Ok::<_, String>((BufReader::new(r), w))
        };
        match tokio::time::timeout(CONNECT_LIMIT, attempt).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(format!("{addr}: timed out")),
        }
    }
    Err(format!("no issuer reachable: {}", errors.join("; ")))
}

async fn ask(conn: &mut Conn, req: &Request) -> Result<Response, String> {
    let exchange = async {
        protocol::write_line(&mut conn.1, req)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let line = protocol::read_line(&mut conn.0)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .ok_or("the issuer closed the connection")?;
        serde_json::from_str(&line).map_err(|e| format!("the issuer's answer: {e}"))
    };
    tokio::time::timeout(ANSWER_LIMIT, exchange)
        .await
        .map_err(|_| "the issuer did not answer in time".to_owned())?
}

/// Proves the node (join token or service-account token) and returns a node SVID.
async fn attest(settings: &Settings, trust: &Trust, start: usize) -> Result<NodeSvid, String> {
    let id =
        protocol::node_id(&settings.trust_domain, &settings.node).map_err(|e| e.to_string())?;
    let (key, csr) = key_and_csr(&id)?;
    let (path, req) = match &settings.attest {
        Attest::Bootstrap { token_file } => (token_file, None),
        Attest::Kubernetes { token_file } => (token_file, Some(())),
    };
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("token file {}: {e}", path.display()))?
        .trim()
        .to_owned();
    let req = match req {
        None => Request::Join {
            node: settings.node.clone(),
            token,
            csr,
        },
        Some(()) => Request::Attest { token, csr },
    };
    let mut conn = connect(settings, trust, None, start).await?;
    node_answer(ask(&mut conn, &req).await?, &key, &id, settings, path)
}

fn node_answer(
    resp: Response,
    key: &KeyPair,
    id: &SpiffeId,
    settings: &Settings,
    token_file: &std::path::Path,
) -> Result<NodeSvid, String> {
    match resp {
        Response::Signed { chain, .. } => {
            let svid = svid_from(&chain, key, id, &settings.trust_domain)?;
            let local = tls::local_svid(&svid).map_err(|e| e.to_string())?;
            tracing::info!(node_svid = %id, serial = %svid.serial, "node SVID obtained");
            Ok(NodeSvid {
                svid: svid.clone(),
                key: local.key,
                renew_at: renew_at(svid.not_after),
                not_after: svid.not_after,
            })
        }
        Response::Refused { code, reason } => Err(match (&settings.attest, code) {
            (Attest::Bootstrap { .. }, _) => format!(
                "the issuer refused to attest node `{}` ({}: {reason}); make a new join token with `portcullis issuer enroll --node {}` and write it to {}",
                settings.node,
                code.as_str(),
                settings.node,
                token_file.display()
            ),
            _ => format!(
                "the issuer refused to attest this node ({}: {reason})",
                code.as_str()
            ),
        }),
    }
}

/// One round: a node SVID, then the SVIDs that are due. Returns when to look again.
async fn round(
    settings: &Settings,
    handle: &IssuerHandle,
    node: &mut Option<NodeSvid>,
    last_trust: &mut Option<Trust>,
    start: usize,
) -> Result<Instant, String> {
    // A bad edit of the bundle keeps the last good one, as the store does.
    let trust = match (read_trust(settings), last_trust.as_ref()) {
        (Ok(t), _) => {
            *last_trust = Some(t.clone());
            t
        }
        (Err(e), Some(t)) => {
            tracing::debug!(error = %e, "keeping the last good trust bundle towards the issuer");
            t.clone()
        }
        (Err(e), None) => return Err(e),
    };
    let now = Instant::now();
    // An expired node SVID cannot be renewed: prove the node again (for the bootstrap
    // attestor, with whatever token the operator has put in the token file since).
    if node
        .as_ref()
        .is_some_and(|n| n.not_after <= SystemTime::now())
    {
        tracing::warn!("the node SVID expired; attesting the node again");
        *node = None;
        let mut s = handle.lock();
        s.node_not_after = None;
        s.node = None;
        drop(s);
    }
    if node.as_ref().is_none_or(|n| now >= n.renew_at) {
        let renewed = match node.as_ref() {
            Some(current) => renew_node(settings, &trust, current, start).await,
            None => Err(String::new()),
        };
        let fresh = match renewed {
            Ok(n) => n,
            // The Kubernetes attestor can always prove the node again; a join token only once.
            Err(e) if node.is_none() || matches!(settings.attest, Attest::Kubernetes { .. }) => {
                if !e.is_empty() {
                    tracing::warn!(error = %e, "renewing the node SVID failed; attesting again");
                }
                attest(settings, &trust, start).await?
            }
            Err(e) => return Err(e),
        };
        let mut s = handle.lock();
        s.node_not_after = Some(fresh.not_after);
        s.node = Some(fresh.svid.clone());
        drop(s);
        settings.arrived.raise();
        *node = Some(fresh);
    }
    let Some(current) = node.as_ref() else {
        return Err("no node SVID".to_owned());
    };
    let due: Vec<SpiffeId> = {
        let s = handle.lock();
        let ready = |id: &SpiffeId| s.retry.get(id).is_none_or(|(at, _)| now >= *at);
        let mut due: Vec<SpiffeId> = s.urgent.iter().filter(|id| ready(id)).cloned().collect();
        due.extend(
            s.wanted
                .iter()
                .filter(|id| {
                    !s.urgent.contains(*id)
                        && ready(id)
                        && s.svids.get(*id).is_none_or(|g| now >= g.renew_at)
                })
                .cloned(),
        );
        due
    };
    let mut problems = Vec::new();
    let signed_before = handle.lock().signed;
    if !due.is_empty() {
        let mut conn = connect(settings, &trust, Some(current), start).await?;
        for id in due {
            let (key, csr) = key_and_csr(&id)?;
            let resp = ask(
                &mut conn,
                &Request::Sign {
                    identity: id.to_string(),
                    csr,
                },
            )
            .await?;
            let mut s = handle.lock();
            s.urgent.remove(&id);
            // One identity that fails (refused, or a certificate we cannot use) waits with
            // its own backoff; the others go on.
            let failed = match resp {
                Response::Signed { chain, .. } => {
                    match svid_from(&chain, &key, &id, &settings.trust_domain) {
                        Ok(svid) => {
                            s.retry.remove(&id);
                            s.signed += 1;
                            if s.wanted.contains(&id) {
                                let at = renew_at(svid.not_after);
                                s.svids.insert(id.clone(), Got { svid, renew_at: at });
                            }
                            None
                        }
                        Err(e) => Some(e),
                    }
                }
                Response::Refused { code, reason } => Some(format!(
                    "the issuer refused the SVID of {id} ({}: {reason})",
                    code.as_str()
                )),
            };
            if let Some(problem) = failed {
                let wait = s
                    .retry
                    .get(&id)
                    .map_or(BACKOFF_MIN, |(_, w)| (*w * 2).min(BACKOFF_MAX));
                s.retry
                    .insert(id.clone(), (Instant::now() + jitter(wait), wait));
                problems.push(problem);
            }
        }
    }
    let mut s = handle.lock();
    s.problems = problems;
    // An SVID that expired (the issuer was away too long) is asked for again, not kept.
    let wall = SystemTime::now();
    s.svids.retain(|_, g| g.svid.not_after > wall);
    if s.signed != signed_before {
        settings.arrived.raise();
    }
    let mut next = current.renew_at;
    for g in s.svids.values() {
        next = next.min(g.renew_at);
    }
    for (at, _) in s.retry.values() {
        next = next.min(*at);
    }
    if s.wanted
        .iter()
        .any(|id| !s.svids.contains_key(id) && !s.retry.contains_key(id))
    {
        next = Instant::now();
    }
    Ok(next)
}

async fn renew_node(
    settings: &Settings,
    trust: &Trust,
    current: &NodeSvid,
    start: usize,
) -> Result<NodeSvid, String> {
    let id =
        protocol::node_id(&settings.trust_domain, &settings.node).map_err(|e| e.to_string())?;
    let (key, csr) = key_and_csr(&id)?;
    let mut conn = connect(settings, trust, Some(current), start).await?;
    match ask(&mut conn, &Request::RenewNode { csr }).await? {
        Response::Signed { chain, .. } => {
            let svid = svid_from(&chain, &key, &id, &settings.trust_domain)?;
            let local = tls::local_svid(&svid).map_err(|e| e.to_string())?;
            tracing::info!(node_svid = %id, serial = %svid.serial, "node SVID renewed");
            Ok(NodeSvid {
                svid: svid.clone(),
                key: local.key,
                renew_at: renew_at(svid.not_after),
                not_after: svid.not_after,
            })
        }
        Response::Refused { code, reason } => Err(format!(
            "the issuer refused to renew the node SVID ({}: {reason})",
            code.as_str()
        )),
    }
}

/// `d` give or take a fifth, so that a fleet of agents does not retry in step.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    // 0.8 to 1.2.
    d.mul_f64(0.8 + f64::from(nanos % 1000) / 2500.0)
}

async fn run(settings: Settings, handle: IssuerHandle) {
    let mut node = None;
    let mut trust = None;
    let mut backoff = BACKOFF_MIN;
    let mut start = 0usize;
    loop {
        let next = match round(&settings, &handle, &mut node, &mut trust, start).await {
            Ok(next) => {
                backoff = BACKOFF_MIN;
                next
            }
            Err(e) => {
                let mut s = handle.lock();
                if s.problems.first() != Some(&e) {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis(), "issuer");
                }
                s.problems = vec![e];
                drop(s);
                // The next address first: a replica that is down is not asked first again.
                start = start.wrapping_add(1);
                // Never wait so long that the SVIDs held expire in between: as expiry nears,
                // the issuer is asked more often.
                let wait = jitter(backoff.min(handle.time_left() / 4).max(BACKOFF_MIN));
                backoff = (backoff * 2).min(BACKOFF_MAX);
                Instant::now() + wait
            }
        };
        if next > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = handle.wake.notified() => {}
            }
        } else {
            tokio::task::yield_now().await;
        }
    }
}
