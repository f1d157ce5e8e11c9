//! `portcullis issuer`: the one place that holds the CA key. Agents generate their keys,
//! prove which node they run on (a join token or a service-account token), get a node SVID,
//! and then ask, with it, for the SVIDs of their own workloads. The issuer signs an SVID for
//! identity X to node N only if cluster state places a live workload with identity X on N.
//!
//! State: the CA (read at start), cluster state (the same sources and rules as the agent's,
//! [`crate::inputs`]), and, for the bootstrap attestor, the join tokens in a directory the
//! replicas share. Nothing else: replicas are interchangeable.

pub mod config;
pub mod decide;
mod http;
mod policy_status;
pub mod protocol;
mod review;
mod server;
pub mod tokens;

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rustls::{server::ResolvesServerCert, sign::CertifiedKey};

use self::{
    config::{Attestor, IssuerConfig},
    protocol::Refusal,
    server::Granted,
    tokens::Tokens,
};
use crate::{
    identity::{SpiffeId, ca::Ca, store::Svid, svid},
    inputs::{ClusterSource, Index, Inputs, KubeSource, SharedIndex},
    tls::{self, ClientChain, Trust},
};

/// Agent connections open at once, at most (a node keeps one while it asks; idle ones close
/// after a minute).
const MAX_CONNECTIONS: usize = 4096;
/// TokenReviews the issuer has in flight at once, at most (unauthenticated clients cause them).
const MAX_REVIEWS: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    op: String,
    result: String,
    code: String,
}

pub(crate) struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    latency: Histogram,
    ready: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis_issuer");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Requests answered, by operation, result and refusal code",
            decisions.clone(),
        );
        let latency = Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]);
        registry.register(
            "request_seconds",
            "Time to decide and sign one request",
            latency.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 once cluster state is loaded and the issuer serves",
            ready.clone(),
        );
        Self {
            registry,
            decisions,
            latency,
            ready,
        }
    }
}

/// The issuer's serving certificate, replaced at half life.
#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// What every connection reads.
pub struct Shared {
    config: IssuerConfig,
    ca: Ca,
    trust_domain: String,
    client_chain: ClientChain,
    server_config: Arc<rustls::ServerConfig>,
    index: SharedIndex,
    loaded: std::sync::atomic::AtomicBool,
    tokens: Option<Tokens>,
    kube: Option<kube::Client>,
    /// TokenReviews in flight at once, at most.
    reviews: tokio::sync::Semaphore,
    audit: Option<Mutex<std::fs::File>>,
    metrics: Metrics,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Shared {
    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub(crate) fn config(&self) -> &IssuerConfig {
        &self.config
    }

    pub(crate) fn client_chain(&self) -> &ClientChain {
        &self.client_chain
    }

    pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    pub(crate) fn tokens(&self) -> Option<&Tokens> {
        self.tokens.as_ref()
    }

    pub(crate) fn kube_client(&self) -> Option<kube::Client> {
        self.kube.clone()
    }

    pub(crate) fn reviews(&self) -> &tokio::sync::Semaphore {
        &self.reviews
    }

    pub(crate) fn svid_ttl(&self) -> Duration {
        self.config.svid_ttl
    }

    pub(crate) fn node_ttl(&self) -> Duration {
        self.config.node_svid_ttl
    }

    /// Runs `f` on cluster state; refuses while none has been loaded.
    pub(crate) fn with_index<T>(
        &self,
        f: impl FnOnce(&Index) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        if !self.loaded.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Refusal::new(
                protocol::Code::NotReady,
                "the issuer has no complete cluster state yet",
            ));
        }
        let ix = self
            .index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&ix)
    }

    /// Signs `id` over `key`, the public key of a CSR that [`decide::csr_key`] accepted.
    pub(crate) fn sign(
        &self,
        node: &str,
        id: &SpiffeId,
        key: &rcgen::PublicKey,
        ttl: Duration,
    ) -> Result<Granted, Refusal> {
        let signed = self
            .ca
            .sign(id, key, ttl)
            .map_err(|e| Refusal::new(protocol::Code::Internal, format!("signing: {e}")))?;
        Ok(Granted {
            node: node.to_owned(),
            cert_pem: signed.cert_pem,
            not_after_unix: unix(signed.not_after),
        })
    }

    /// One audit record per decision: to the log, the audit file and the metrics.
    pub(crate) fn audit(
        &self,
        peer: SocketAddr,
        op: &str,
        node: &str,
        identity: &str,
        refusal: Option<&Refusal>,
    ) {
        let (result, code, reason) = match refusal {
            None => ("signed", "", ""),
            Some(r) => ("refused", r.code.as_str(), r.reason.as_str()),
        };
        if refusal.is_some() {
            tracing::warn!(target: "portcullis::audit", %peer, op, node, identity, result, code, reason, "refused");
        } else {
            tracing::info!(target: "portcullis::audit", %peer, op, node, identity, result, "signed");
        }
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                op: op.to_owned(),
                result: result.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        if let Some(file) = &self.audit {
            let record = serde_json::json!({
                "time_unix": unix(SystemTime::now()),
                "peer": peer.to_string(),
                "op": op,
                "node": node,
                "identity": identity,
                "result": result,
                "code": code,
                "reason": reason,
            });
            let mut line = record.to_string();
            line.push('\n');
            let mut f = file
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::error!(error = %e, "cannot write the audit log");
            }
        }
    }

    pub(crate) fn observe(&self, took: Duration) {
        self.metrics.latency.observe(took.as_secs_f64());
    }

    pub(crate) fn ready(&self) -> Result<(), String> {
        if !self.loaded.load(std::sync::atomic::Ordering::Acquire) {
            return Err("no complete cluster state yet".to_owned());
        }
        Ok(())
    }

    pub(crate) fn encode_metrics(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Mints the issuer's own serving SVID.
fn serving_key(ca: &Ca, td: &str, ttl: Duration) -> anyhow::Result<Arc<CertifiedKey>> {
    let id = protocol::issuer_id(td)?;
    let issued = ca.issue(&id, ttl)?;
    let info = svid::check_chain(
        std::slice::from_ref(&issued.cert_der),
        td,
        SystemTime::now(),
    )
    .map_err(|r| anyhow::anyhow!("the issuer's own SVID does not verify: {r}"))?;
    let svid = Svid::new(vec![issued.cert_der], issued.key_der, info);
    Ok(tls::local_svid(&svid)?.key)
}

/// `portcullis issuer run`: serves until SIGTERM or SIGINT.
pub async fn serve(config: IssuerConfig) -> anyhow::Result<()> {
    tracing::info!(config = ?config, "starting the issuer");
    let ca = Ca::load(&config.ca_dir)?;
    let td = ca.trust_domain().to_owned();
    let ca_der = <rustls_pki_types::CertificateDer<'static> as rustls_pki_types::pem::PemObject>::from_pem_slice(
        ca.cert_pem().as_bytes(),
    )
    .context("the CA certificate")?;
    let trust = Trust::new(&td, std::slice::from_ref(&ca_der))?;
    let serving = Arc::new(ServingCert(RwLock::new(serving_key(
        &ca,
        &td,
        config.svid_ttl,
    )?)));
    let server_config = tls::issuer_server_config(&trust, serving.clone())?;
    let (source, changed, kube) = match (&config.cluster_state, &config.kubernetes) {
        (_, Some(k)) => {
            if k.trust_domain != td {
                anyhow::bail!(
                    "kubernetes.trust_domain is `{}`, but the CA in {} serves `{td}`",
                    k.trust_domain,
                    config.ca_dir.display()
                );
            }
            // The issuer is the one writer of the policy objects' status.
            let mut k = k.clone();
            k.write_policy_status = k.policy_resources;
            let kube = KubeSource::start(k).await?;
            tracing::info!(
                source = kube.description(),
                "waiting for the first complete lists from the API server"
            );
            kube.wait_ready(Duration::from_secs(300)).await?;
            let changed = kube.changed();
            let client = kube.client();
            if let Some(feed) = kube.status_feed() {
                tracing::info!(
                    "writing the status of PortcullisPolicy and PortcullisClusterPolicy objects"
                );
                tokio::spawn(policy_status::run(feed, client.clone(), td.clone()));
            }
            (ClusterSource::Kube(kube), changed, Some(client))
        }
        (Some(path), None) => (
            ClusterSource::file(path.clone()),
            crate::inputs::kube::Changed::default(),
            None,
        ),
        (None, None) => anyhow::bail!("no source of cluster state configured"),
    };
    let mut inputs = Inputs::new("", source, None)?;
    let tokens = match &config.attestor {
        Attestor::Bootstrap { state_dir, .. } => Some(Tokens::open(state_dir)?),
        Attestor::Kubernetes { .. } => None,
    };
    let audit = match &config.audit_log {
        Some(p) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("audit_log {}", p.display()))?,
        )),
        None => None,
    };
    let shared = Arc::new(Shared {
        client_chain: ClientChain::new(&trust)?,
        trust_domain: td.clone(),
        server_config,
        index: inputs.shared_index(),
        loaded: std::sync::atomic::AtomicBool::new(false),
        tokens,
        kube,
        reviews: tokio::sync::Semaphore::new(MAX_REVIEWS),
        audit,
        metrics: Metrics::new(),
        ca,
        config: config.clone(),
    });
    poll(&mut inputs, &shared);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(addr = %config.listen, trust_domain = %td, "issuing SVIDs");
    {
        let shared = shared.clone();
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                // Bounded: a flood of idle connections cannot take every socket.
                let Ok(slot) = connections.clone().acquire_owned().await else {
                    return;
                };
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            server::connection(shared, stream, peer).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    if let Some(addr) = config.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(http::serve(l, shared.clone()));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renew_every = config.svid_ttl / 2;
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tracing::info!("ready");
    loop {
        tokio::select! {
            _ = tick.tick() => poll(&mut inputs, &shared),
            () = changed.wait() => poll(&mut inputs, &shared),
            _ = renew.tick() => match serving_key(&shared.ca, &td, config.svid_ttl) {
                Ok(key) => *serving.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = key,
                Err(e) => tracing::error!(error = %e, "cannot renew the issuer's own SVID"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping");
    Ok(())
}

fn poll(inputs: &mut Inputs, shared: &Shared) {
    let update = inputs.poll();
    if !update.changes.is_empty() {
        tracing::debug!(changes = ?update.changes, "cluster state changed");
    }
    if let Some(e) = inputs.cluster_error() {
        tracing::warn!(error = %e, "cluster state");
    }
    let loaded = inputs.loaded();
    if loaded && inputs.index().trust_domain() != shared.trust_domain {
        tracing::error!(
            cluster = inputs.index().trust_domain(),
            ca = %shared.trust_domain,
            "cluster state is of another trust domain than the CA; refusing everything"
        );
        shared
            .loaded
            .store(false, std::sync::atomic::Ordering::Release);
        shared.metrics.ready.set(0);
        return;
    }
    shared
        .loaded
        .store(loaded, std::sync::atomic::Ordering::Release);
    shared.metrics.ready.set(i64::from(loaded));
}

/// `portcullis issuer enroll`: a join token for `node`.
pub fn enroll(config: &IssuerConfig, node: &str, ttl: Option<Duration>) -> anyhow::Result<String> {
    let Attestor::Bootstrap {
        state_dir,
        token_ttl_secs,
    } = &config.attestor
    else {
        anyhow::bail!(
            "this issuer attests nodes by Kubernetes service-account token: it makes no join tokens"
        );
    };
    let td = Ca::load(&config.ca_dir)?.trust_domain().to_owned();
    protocol::node_id(&td, node).map_err(|e| anyhow::anyhow!("node name `{node}`: {e}"))?;
    let tokens = Tokens::open(state_dir)?;
    Ok(tokens.enroll(node, ttl.unwrap_or(Duration::from_secs(*token_ttl_secs)))?)
}
